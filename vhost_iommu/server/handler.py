"""The vhost-user protocol state machine of one connection: the request dispatcher.

:class:`ConnectionHandler` takes decoded :class:`~vhost_iommu.protocol.Message` objects and answers them
through a ``send`` callable; it owns the negotiated features, the status byte, the guest memory and one
:class:`~vhost_iommu.server.vring.VringSlot` per queue, and it is the
:class:`~vhost_iommu.backend.BackendContext` of its back-end. The other jobs of a connection live beside it:
``rings.py`` (a ring's phases: which request may do what, which back-end calls follow), ``kick_custody.py``
(who watches a kick fd: the loop or the back-end's thread), ``backend_channel.py`` (SET_BACKEND_REQ_FD),
``device_state.py`` with ``transfer.py`` (migration), ``handover.py`` with ``session.py`` (a session moved
to the next device worker).

Failure policy (the decoder's :class:`~vhost_iommu.protocol.RequestRejected` and a handler's own refusals
are treated alike):

* a request with a reply of its own gets that reply's failure form where the spec defines one (GET_CONFIG:
  an empty payload); where it defines none (GET_VRING_BASE of a ring that does not exist, a malformed GET_*)
  the connection is closed, because the front-end is blocked waiting for an answer we cannot give honestly;
* any other request gets REPLY_ACK with a non-zero u64 if it asked for a reply (need_reply), and is
  otherwise logged and ignored: the spec leaves the back-end no way to report it.

Choices where the spec leaves room:

* need_reply is honoured on every request without a reply of its own, whether or not REPLY_ACK was
  negotiated (a front-end that sets the flag is waiting for the answer);
* a kick on a started but disabled ring is held and delivered when the ring is enabled, rather than the
  ring being processed "without side effects" (a device has no side-effect-free way to process requests);
* RESET_OWNER (deprecated) disables every ring and nothing else, as vhost-user.rst recommends;
* SET_STATUS 0 and RESET_DEVICE reset the device; call/err fds, memory table and back-end channel are
  connection state and survive (QEMU does not send them again before the next start);
* polling (SET_VRING_KICK without an fd), used-ring logging and live-migration config writes are refused;
* device state (SET_DEVICE_STATE_FD, offered when the back-end is a ``MigratableBackend``) moves only while
  every ring is stopped, through the front-end's fd (never one of ours), on the event loop
  (``server/device_state.py``, ``server/transfer.py``); a load is applied when the fd reaches its end,
  refused if a ring started meanwhile, and CHECK_DEVICE_STATE reports the last transfer (reading what is
  left of a load first). A new SET_DEVICE_STATE_FD, a device reset or the disconnect abandons a running
  transfer.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import weakref
from collections.abc import Callable, Mapping
from typing import ParamSpec, TypeVar

from vhost_iommu.abi import VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC
from vhost_iommu.backend import MigratableBackend, SessionLifecycle, VhostUserBackend
from vhost_iommu.memory import GuestMemory, GuestMemoryError, MemoryRegionDesc
from vhost_iommu.protocol import (
    FLAG_NEED_REPLY,
    U64,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VIRTIO_CONFIG_S_NEEDS_RESET,
    BackendRequest,
    ConfigSpace,
    FrontendRequest,
    MemoryRegion,
    MemoryTable,
    Message,
    Payload,
    ProtocolFeature,
    RequestRejected,
    SingleMemoryRegion,
    VringAddress,
    VringFile,
    VringState,
    close_fds,
    encode_ack,
    encode_reply,
    request_has_own_reply,
)
from vhost_iommu.protocol.constants import (
    CONFIG_FLAG_MIGRATION,
    CONFIG_FLAG_WRITABLE,
    DEVICE_STATE_NOFD,
    VRING_F_LOG,
)
from vhost_iommu.server import handover
from vhost_iommu.server.backend_channel import BackendChannel
from vhost_iommu.server.device_state import DeviceStateRequests
from vhost_iommu.server.errors import ConnectionFatal, RequestFailed
from vhost_iommu.server.fds import closed_on_error, set_nonblocking, write_eventfd
from vhost_iommu.server.kick_custody import KickCustody
from vhost_iommu.server.rings import BackendCall, KickAction, RingEvent, RingRefused
from vhost_iommu.server.session import MAX_CONFIG_WRITES, SessionState
from vhost_iommu.server.vring import VringSlot
from vhost_iommu.virtqueue import QueueError, SplitQueue

log = logging.getLogger(__name__)

#: Protocol features this back-end offers.
OFFERED_PROTOCOL_FEATURES = (
    ProtocolFeature.MQ
    | ProtocolFeature.REPLY_ACK
    | ProtocolFeature.CONFIG
    | ProtocolFeature.BACKEND_REQ
    | ProtocolFeature.CONFIGURE_MEM_SLOTS
    | ProtocolFeature.STATUS
    | ProtocolFeature.RESET_DEVICE
)

#: The failure form of requests whose own reply has one (besides GET_CONFIG's empty payload).
_FAILURE_REPLIES = {
    FrontendRequest.SET_DEVICE_STATE_FD: DEVICE_STATE_NOFD | 1,  # an error, and no fd of ours
    FrontendRequest.CHECK_DEVICE_STATE: 1,
}


P = ParamSpec("P")
R = TypeVar("R")


def _send_nothing(_data: bytes) -> None:
    """A closed handler's ``send``."""


def _weakly(method: Callable[P, R], gone: R) -> Callable[P, R]:
    """``method`` (bound) called through a weak reference to its object; ``gone`` once the object is."""
    reference = weakref.WeakMethod(method)

    def call(*args: P.args, **kwargs: P.kwargs) -> R:
        bound = reference()
        return gone if bound is None else bound(*args, **kwargs)

    return call


def _region_desc(region: MemoryRegion) -> MemoryRegionDesc:
    return MemoryRegionDesc(
        guest_phys_addr=region.guest_phys_addr,
        memory_size=region.memory_size,
        userspace_addr=region.userspace_addr,
        mmap_offset=region.mmap_offset,
    )


class ConnectionHandler:
    """Protocol state of one front-end connection; also the BackendContext of its back-end."""

    def __init__(
        self,
        backend: VhostUserBackend,
        loop: asyncio.AbstractEventLoop,
        send: Callable[[bytes], None],
        *,
        name: str = "connection",
        on_fatal: Callable[[BaseException], None] | None = None,
        session_key: str | None = None,
    ) -> None:
        self.backend = backend
        self._session_key = session_key
        #: SET_CONFIG writes accepted this session (latest per offset and size), replayed into the
        #: back-end of a worker that takes the session over.
        self.config_writes: list[tuple[int, bytes]] = []
        self.name = name
        self._loop = loop
        self._send = send
        self._on_fatal = on_fatal
        self._memory = GuestMemory()
        self.slots = [VringSlot(index) for index in range(backend.num_queues)]
        self.owner = False
        self.acked_features = 0
        self.protocol_features = ProtocolFeature(0)
        self.status = 0
        self.broken_reason: str | None = None
        self.channel: BackendChannel | None = None
        #: A config change to announce once the device is no longer suspended (all rings stopped).
        self.config_change_pending = False
        self.closed = False
        # Their callbacks hold this handler weakly: it holds them, and a cycle would keep the handler, its
        # back-end and device alive after the connection until a garbage collection.
        self.device_state = DeviceStateRequests(backend, loop, name, _weakly(self._running_rings, []))
        #: Who watches each ring's kick fd: the loop, or the back-end's thread.
        self.kicks = KickCustody(backend, loop, _weakly(self._on_kick, None))
        backend.attach(self)
        # Unbound methods: a table of bound ones would tie this handler into a cycle with itself, alive after
        # its connection until a garbage collection, and the back-end and device with it.
        cls = type(self)
        self._dispatch: dict[FrontendRequest, Callable[[ConnectionHandler, Message], Payload | None]] = {
            FrontendRequest.GET_FEATURES: cls._get_features,
            FrontendRequest.SET_FEATURES: cls._set_features,
            FrontendRequest.GET_PROTOCOL_FEATURES: cls._get_protocol_features,
            FrontendRequest.SET_PROTOCOL_FEATURES: cls._set_protocol_features,
            FrontendRequest.SET_OWNER: cls._set_owner,
            FrontendRequest.RESET_OWNER: cls._reset_owner,
            FrontendRequest.SET_MEM_TABLE: cls._set_mem_table,
            FrontendRequest.GET_MAX_MEM_SLOTS: cls._get_max_mem_slots,
            FrontendRequest.ADD_MEM_REG: cls._add_mem_reg,
            FrontendRequest.REM_MEM_REG: cls._rem_mem_reg,
            FrontendRequest.SET_VRING_NUM: cls._set_vring_num,
            FrontendRequest.SET_VRING_ADDR: cls._set_vring_addr,
            FrontendRequest.SET_VRING_BASE: cls._set_vring_base,
            FrontendRequest.GET_VRING_BASE: cls._get_vring_base,
            FrontendRequest.SET_VRING_KICK: cls._set_vring_kick,
            FrontendRequest.SET_VRING_CALL: cls._set_vring_call,
            FrontendRequest.SET_VRING_ERR: cls._set_vring_err,
            FrontendRequest.SET_VRING_ENABLE: cls._set_vring_enable,
            FrontendRequest.GET_QUEUE_NUM: cls._get_queue_num,
            FrontendRequest.GET_CONFIG: cls._get_config,
            FrontendRequest.SET_CONFIG: cls._set_config,
            FrontendRequest.SET_BACKEND_REQ_FD: cls._set_backend_req_fd,
            FrontendRequest.GET_STATUS: cls._get_status,
            FrontendRequest.SET_STATUS: cls._set_status,
            FrontendRequest.RESET_DEVICE: cls._reset_device,
            FrontendRequest.SET_DEVICE_STATE_FD: cls._set_device_state_fd,
            FrontendRequest.CHECK_DEVICE_STATE: cls._check_device_state,
        }

    # -- entry points ---------------------------------------------------------------------------------------

    def handle(self, message: Message) -> None:
        """Apply one request and send its reply or REPLY_ACK. Raises ConnectionFatal to end the connection."""
        assert isinstance(message.code, FrontendRequest)
        handler = self._dispatch[message.code]
        try:
            reply = handler(self, message)
        except (RequestFailed, GuestMemoryError, QueueError) as exc:
            self._fail(message.code, message.flags, str(exc))
            return
        if reply is not None:
            self._send(encode_reply(message.code, reply))
        elif message.need_reply:
            self._send(encode_ack(message.code, success=True))

    def reject(self, error: RequestRejected) -> None:
        """Answer a request the decoder refused (its fds are already closed)."""
        self._fail(error.code, error.flags, str(error))

    def close(self) -> None:
        """The connection ended: stop serving, reset the device, release every fd and mapping."""
        if self.closed:
            return
        self.closed = True
        self.device_state.drop("the connection closed")
        for slot in self.slots:
            self._stop_ring(slot)
        try:
            if self._session_key is not None and isinstance(self.backend, SessionLifecycle):
                self.backend.session_ended()
            self.backend.reset()
        finally:
            for slot in self.slots:
                slot.close_fds()
            if self.channel is not None:
                self.channel.close()
                self.channel = None
            self._memory.close()
            # Nothing is sent or reported once closed. Letting go of the connection's callbacks and the
            # back-end's of this handler frees the whole session (device tables included) the moment the
            # server forgets the connection, rather than at some later garbage collection.
            self._send = _send_nothing
            self._on_fatal = None
            self.backend.detach()

    # -- BackendContext -------------------------------------------------------------------------------------

    @property
    def memory(self) -> GuestMemory:
        return self._memory

    @property
    def session_key(self) -> str | None:
        return self._session_key

    def queue(self, index: int) -> SplitQueue | None:
        if self.broken_reason is not None or not 0 <= index < len(self.slots):
            return None
        return self.slots[index].queue

    def signal_used(self, index: int) -> None:
        fd = self.slots[index].call_fd
        if fd is not None:
            write_eventfd(fd, self.name, f"call fd of ring {index}")

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def reschedule(self, index: int) -> None:
        slot = self.slots[index]
        if slot.rescheduled:
            return
        slot.rescheduled = True
        # call_soon runs it in the loop's next iteration, after the fds that are ready now (other
        # connections' kicks and messages) have had their turn.
        self._loop.call_soon(self._on_rescheduled, index)

    def offer_kick_fds(self) -> None:
        self._refresh_all()

    def _on_rescheduled(self, index: int) -> None:
        slot = self.slots[index]
        if not slot.rescheduled:
            return  # the ring stopped meanwhile (a restart serves what is waiting anyway)
        slot.rescheduled = False
        if self.serving(slot):
            self.call_backend(self.backend.queue_kicked, index)

    def config_changed(self) -> None:
        if not any(slot.started for slot in self.slots):
            # vhost-user.rst "Suspended device state": with every ring stopped the back-end must not
            # send messages to the front-end. The change is announced when a ring starts.
            self.config_change_pending = True
            return
        self.config_change_pending = False
        if self.channel is None or not self.channel.open:
            log.debug("%s: config changed, but there is no back-end channel to say so", self.name)
            return
        if not self.protocol_features & ProtocolFeature.CONFIG:
            log.debug("%s: config changed, but CONFIG was not negotiated", self.name)
            return
        need_reply = bool(self.protocol_features & ProtocolFeature.REPLY_ACK)
        self.channel.send(BackendRequest.CONFIG_CHANGE_MSG, need_reply)

    def device_broken(self, reason: str) -> None:
        if self.broken_reason is not None:
            return
        self.broken_reason = reason
        log.error("%s: device needs reset: %s", self.name, reason)
        for slot in self.slots:
            if slot.err_fd is not None:
                write_eventfd(slot.err_fd, self.name, f"err fd of ring {slot.index}")
        self.config_changed()
        # The back-end may be inside one of its own callbacks: tell it its queues stopped afterwards.
        self._loop.call_soon(self._refresh_all)

    # -- failures -------------------------------------------------------------------------------------------

    def _fail(self, code: int, flags: int, reason: str) -> None:
        need_reply = bool(flags & FLAG_NEED_REPLY)
        if code == FrontendRequest.GET_CONFIG:
            log.warning("%s: %s; answering with an empty config (the spec's failure form)", self.name, reason)
            self._send(encode_reply(code))
            return
        if code in _FAILURE_REPLIES:
            log.warning("%s: %s", self.name, reason)
            self._send(encode_reply(code, U64(_FAILURE_REPLIES[FrontendRequest(code)])))
            return
        if request_has_own_reply(code):
            raise ConnectionFatal(f"{reason}; the spec defines no failure reply, closing the connection")
        if need_reply:
            log.warning("%s: %s", self.name, reason)
            self._send(encode_ack(code, success=False))
        else:
            log.warning("%s: %s (the front-end asked for no reply: ignored)", self.name, reason)

    # -- features -------------------------------------------------------------------------------------------

    def offered_features(self) -> int:
        return self.backend.device_features() | VHOST_USER_F_PROTOCOL_FEATURES

    def _get_features(self, _message: Message) -> Payload:
        return U64(self.offered_features())

    def _set_features(self, message: Message) -> None:
        acked = _u64(message)
        unknown = acked & ~self.offered_features()
        if unknown:
            raise RequestFailed(f"SET_FEATURES acks feature bits {unknown:#x} that were not offered")
        self.acked_features = acked
        self.backend.set_features(acked & ~VHOST_USER_F_PROTOCOL_FEATURES)
        if not acked & VHOST_USER_F_PROTOCOL_FEATURES:
            # vhost-user.rst: without protocol features every ring is enabled at once.
            for slot in self.slots:
                self._enable(slot, True)

    def offered_protocol_features(self) -> ProtocolFeature:
        if isinstance(self.backend, MigratableBackend):
            return OFFERED_PROTOCOL_FEATURES | ProtocolFeature.DEVICE_STATE
        return OFFERED_PROTOCOL_FEATURES

    def _get_protocol_features(self, _message: Message) -> Payload:
        return U64(int(self.offered_protocol_features()))

    def _set_protocol_features(self, message: Message) -> None:
        requested = _u64(message)
        unknown = requested & ~int(self.offered_protocol_features())
        if unknown:
            raise RequestFailed(f"SET_PROTOCOL_FEATURES asks for bits {unknown:#x} that were not offered")
        self.protocol_features = ProtocolFeature(requested)

    def _set_owner(self, _message: Message) -> None:
        if self.owner:
            raise RequestFailed("SET_OWNER: this connection already has an owner")
        self.owner = True

    def _reset_owner(self, _message: Message) -> None:
        # Deprecated; vhost-user.rst recommends ignoring it or disabling all rings. Resetting connection
        # state here is the misreading the spec warns leads to bugs.
        for slot in self.slots:
            self._enable(slot, False)

    # -- memory ---------------------------------------------------------------------------------------------

    def _set_mem_table(self, message: Message) -> None:
        assert isinstance(message.payload, MemoryTable)
        table = zip(message.payload.regions, message.fds, strict=True)
        regions = [(_region_desc(region), fd) for region, fd in table]
        with self.kicks.released(self.slots, self.refresh):
            self._memory.replace(regions)  # closes the fds whatever happens
            self._memory_changed()

    def _get_max_mem_slots(self, _message: Message) -> Payload:
        return U64(self._memory.max_regions)

    def _add_mem_reg(self, message: Message) -> None:
        assert isinstance(message.payload, SingleMemoryRegion)
        with self.kicks.released(self.slots, self.refresh):
            self._memory.add_region(_region_desc(message.payload.region), message.fds[0])  # closes the fd
            self._memory_changed()

    def _rem_mem_reg(self, message: Message) -> None:
        assert isinstance(message.payload, SingleMemoryRegion)
        with self.kicks.released(self.slots, self.refresh):
            self._memory.remove_region(_region_desc(message.payload.region))
            self._memory_changed()

    def _memory_changed(self) -> None:
        for slot in self.slots:
            if slot.queue is not None:
                try:
                    slot.queue.rebind(self._memory)
                except (QueueError, GuestMemoryError) as exc:
                    self.device_broken(f"ring {slot.index} after a memory table change: {exc}")
        self.backend.memory_changed()

    # -- rings ----------------------------------------------------------------------------------------------

    def _slot(self, index: int) -> VringSlot:
        if not 0 <= index < len(self.slots):
            raise RequestFailed(f"ring index {index} out of range: the device has {len(self.slots)} queues")
        return self.slots[index]

    def _slot_to_configure(self, index: int, what: str) -> VringSlot:
        """The slot whose layout request ``what`` changes, if its phase allows (only while stopped)."""
        slot = self._slot(index)
        try:
            slot.phases.apply(RingEvent.CONFIGURE)
        except RingRefused:
            raise RequestFailed(f"{what} on {slot.describe()}: stop it with GET_VRING_BASE first") from None
        return slot

    def _set_vring_num(self, message: Message) -> None:
        state = _state(message)
        slot = self._slot_to_configure(state.index, "SET_VRING_NUM")
        size = state.num
        if not 1 <= size <= self.backend.max_queue_size or size & (size - 1):
            raise RequestFailed(
                f"SET_VRING_NUM {size} for ring {state.index}: not a power of 2 between 1 and "
                f"{self.backend.max_queue_size}"
            )
        slot.size = size

    def _set_vring_addr(self, message: Message) -> None:
        assert isinstance(message.payload, VringAddress)
        slot = self._slot_to_configure(message.payload.index, "SET_VRING_ADDR")
        if message.payload.flags & VRING_F_LOG:
            raise RequestFailed("SET_VRING_ADDR asks for used-ring logging, which is not supported")
        slot.address = message.payload

    def _set_vring_base(self, message: Message) -> None:
        state = _state(message)
        slot = self._slot_to_configure(state.index, "SET_VRING_BASE")
        if state.num > 0xFFFF:
            raise RequestFailed(f"SET_VRING_BASE {state.num:#x}: a split ring's index is 16 bits")
        slot.base = state.num

    def _get_vring_base(self, message: Message) -> Payload:
        state = _state(message)
        slot = self._slot(state.index)
        self._stop_ring(slot)
        return VringState(slot.index, slot.base)

    def _set_vring_kick(self, message: Message) -> None:
        with closed_on_error(message.fds):
            vring_file = _file(message)
            slot = self._slot(vring_file.index)
            if not vring_file.has_fd:
                raise RequestFailed("SET_VRING_KICK without an fd asks for polling, which is not supported")
            fd = message.fds[0]
            self.kicks.reclaim(slot)  # offered again by refresh below, or when the ring is served
            queue = slot.queue if slot.queue is not None else self.make_queue(slot)
            set_nonblocking(fd)
            try:
                self.kicks.watch(fd, slot.index)
            except (OSError, ValueError) as exc:
                raise RequestFailed(f"kick fd {fd} of ring {slot.index} cannot be watched: {exc}") from None
        if slot.kick_fd is not None:
            self.kicks.unwatch(slot.kick_fd)
        slot.replace_fd("kick", fd)
        slot.queue = queue
        slot.phases.apply(RingEvent.START)
        self.refresh(slot)
        if self.config_change_pending:
            self.config_changed()

    def make_queue(self, slot: VringSlot) -> SplitQueue:
        """The ring of ``slot`` at its layout, to start it (a restart elsewhere than it stopped at resets
        the device first)."""
        if slot.size is None or slot.address is None:
            raise RequestFailed(f"ring {slot.index} cannot start before SET_VRING_NUM and SET_VRING_ADDR")
        if slot.restarts_elsewhere:
            self._reset_on_ring_restart(slot)
        slot.stopped_layout = None
        address = slot.address
        return SplitQueue(
            self._memory,
            slot.size,
            address.descriptor,
            address.available,
            address.used,
            next_avail=slot.base,
            event_idx=bool(self.acked_features & VIRTIO_RING_F_EVENT_IDX),
            indirect=bool(self.acked_features & VIRTIO_RING_F_INDIRECT_DESC),
        )

    def _set_vring_call(self, message: Message) -> None:
        self._set_notifier(message, "call")

    def _set_vring_err(self, message: Message) -> None:
        self._set_notifier(message, "err")

    def _set_notifier(self, message: Message, which: str) -> None:
        with closed_on_error(message.fds):
            vring_file = _file(message)
            slot = self._slot(vring_file.index)
            fd = message.fds[0] if vring_file.has_fd else None
            if fd is not None:
                set_nonblocking(fd)
        if which == "call":
            self.kicks.replace_call_fd(slot, fd)
        slot.replace_fd(which, fd)

    def _set_vring_enable(self, message: Message) -> None:
        state = _state(message)
        slot = self._slot(state.index)
        if state.num not in (0, 1):
            raise RequestFailed(f"SET_VRING_ENABLE {state.num} for ring {state.index}: must be 0 or 1")
        self._enable(slot, bool(state.num))

    def _get_queue_num(self, _message: Message) -> Payload:
        return U64(self.backend.num_queues)

    def _enable(self, slot: VringSlot, enabled: bool) -> None:
        slot.phases.apply(RingEvent.ENABLE if enabled else RingEvent.DISABLE)
        self.refresh(slot)

    def _stop_ring(self, slot: VringSlot) -> None:
        self.kicks.reclaim(slot)
        slot.rescheduled = False
        if slot.phases.stopping() is BackendCall.QUEUE_STOPPED:
            # Told while the ring is still bound, so that a back-end holding chains (eventq buffers
            # waiting for an event) can return them before next_avail is read for GET_VRING_BASE.
            self.backend.queue_stopped(slot.index)
        if slot.queue is not None:
            slot.base = slot.queue.next_avail
            slot.stopped_layout = slot.layout
        slot.queue = None
        slot.phases.apply(RingEvent.STOP)
        if slot.kick_fd is not None:
            self.kicks.unwatch(slot.kick_fd)
            slot.replace_fd("kick", None)

    def _device_usable(self) -> bool:
        return self.broken_reason is None and not self.closed

    def serving(self, slot: VringSlot) -> bool:
        """Whether the back-end is to be served ``slot``'s ring now (started, enabled, device usable)."""
        return slot.phases.serving(self._device_usable())

    def _refresh_all(self) -> None:
        for slot in self.slots:
            self.refresh(slot)

    def refresh(self, slot: VringSlot) -> None:
        """Tell the back-end when a ring becomes served or stops being served; replay a held kick; offer
        the kick fd of a served ring. Each step asks again: a back-end call may break the device."""
        if not self.serving(slot):
            self.kicks.reclaim(slot)
        call = slot.phases.sync(self._device_usable())
        if call is BackendCall.QUEUE_STARTED:
            self.call_backend(self.backend.queue_started, slot.index)
        elif call is BackendCall.QUEUE_STOPPED:
            self.backend.queue_stopped(slot.index)
        if slot.phases.take_held_kick(self._device_usable()) is BackendCall.QUEUE_KICKED:
            self.call_backend(self.backend.queue_kicked, slot.index)
        if self.serving(slot):
            self.kicks.offer(slot)

    def _on_kick(self, index: int) -> None:
        slot = self.slots[index]
        fd = slot.kick_fd
        if fd is None:
            return
        try:
            data = os.read(fd, 8)
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno != errno.EINTR:
                log.warning("%s: reading the kick fd of ring %d failed: %s", self.name, index, exc)
                self.kicks.unwatch(fd)
            return
        if not data:
            log.warning("%s: kick fd of ring %d reached end of file; no longer watched", self.name, index)
            self.kicks.unwatch(fd)
            return
        if slot.phases.kick(self.broken_reason is None) is KickAction.SERVE:
            self.call_backend(self.backend.queue_kicked, index)

    def call_backend(self, method: Callable[[int], None], index: int) -> None:
        """Call a back-end's per-queue method; a ring or memory fault breaks the device (NEEDS_RESET)."""
        try:
            method(index)
        except (QueueError, GuestMemoryError) as exc:
            self.device_broken(f"ring {index}: {exc}")
        except Exception as exc:
            if self._on_fatal is None:
                raise
            self._on_fatal(exc)

    # -- config, status, reset ------------------------------------------------------------------------------

    def _get_config(self, message: Message) -> Payload:
        assert isinstance(message.payload, ConfigSpace)
        request = message.payload
        if request.offset + request.size > self.backend.config_size:
            raise RequestFailed(
                f"GET_CONFIG {request.offset}+{request.size} is beyond the "
                f"{self.backend.config_size}-byte config"
            )
        try:
            data = self.backend.get_config(request.offset, request.size)
        except ValueError as exc:
            raise RequestFailed(f"GET_CONFIG {request.offset}+{request.size}: {exc}") from None
        if len(data) != request.size:
            raise RequestFailed(f"GET_CONFIG: the device returned {len(data)} bytes for {request.size}")
        return ConfigSpace(request.offset, request.flags, bytes(data))

    def _set_config(self, message: Message) -> None:
        assert isinstance(message.payload, ConfigSpace)
        request = message.payload
        if request.flags == CONFIG_FLAG_MIGRATION:
            raise RequestFailed("SET_CONFIG for live migration is not supported")
        if request.flags != CONFIG_FLAG_WRITABLE:
            raise RequestFailed(f"SET_CONFIG flags {request.flags:#x} are not defined by the spec")
        if request.offset + request.size > self.backend.config_size:
            raise RequestFailed(
                f"SET_CONFIG {request.offset}+{request.size} is beyond the "
                f"{self.backend.config_size}-byte config"
            )
        try:
            self.backend.set_config(request.offset, request.data)
        except ValueError as exc:
            raise RequestFailed(f"SET_CONFIG {request.offset}+{request.size} refused: {exc}") from None
        self.remember_config_write(request.offset, request.data)

    def remember_config_write(self, offset: int, data: bytes) -> None:
        # The latest write per (offset, size) in order of last write: replaying them gives the same
        # config space; bounded, as config space is (the oldest are the ones most likely overwritten).
        key = (offset, len(data))
        self.config_writes = [w for w in self.config_writes if (w[0], len(w[1])) != key]
        self.config_writes.append((offset, bytes(data)))
        del self.config_writes[:-MAX_CONFIG_WRITES]

    def _set_backend_req_fd(self, message: Message) -> None:
        fd = message.fds[0]
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            close_fds(message.fds)
            raise RequestFailed(f"SET_BACKEND_REQ_FD: fd {fd} is not a socket: {exc}") from None
        if sock.family != socket.AF_UNIX:
            sock.close()
            raise RequestFailed("SET_BACKEND_REQ_FD: the back-end channel must be a unix socket")
        if self.channel is not None:
            self.channel.close()
        self.channel = BackendChannel(sock, self._loop, self.name)

    def _get_status(self, _message: Message) -> Payload:
        needs_reset = VIRTIO_CONFIG_S_NEEDS_RESET if self.broken_reason is not None else 0
        return U64(self.status | needs_reset)

    def _set_status(self, message: Message) -> None:
        status = _u64(message)
        if status > 0xFF:
            raise RequestFailed(f"SET_STATUS {status:#x}: the virtio status is 8 bits")
        if status == 0:
            self._reset()
        else:
            self.status = status

    def _reset_device(self, _message: Message) -> None:
        self._reset()

    def _reset_on_ring_restart(self, slot: VringSlot) -> None:
        """A ring restarts elsewhere than where GET_VRING_BASE stopped it: the guest reset the device.

        QEMU 10.2's generic vhost-user device tells the back-end nothing when the guest resets the device
        (no SET_STATUS 0, no RESET_DEVICE): it stops the rings with GET_VRING_BASE and, once the driver
        has set the device up again, restarts them — exactly what it does around a VM pause, except that a
        pause resumes every ring where it stopped, while a reset re-creates them (new addresses, index 0).
        A reset that re-creates a ring at the very address and index it stopped at (a driver that had used
        a multiple of 65536 buffers and re-allocated its rings in place) is indistinguishable from a pause.
        """
        log.info("%s: %s restarts at a new layout: the guest reset the device", self.name, slot.describe())
        for other in self.slots:
            self.kicks.reclaim(other)
            other.stopped_layout = None
        self.broken_reason = None
        self.config_change_pending = False
        self.backend.reset()
        self.backend.set_features(self.acked_features & ~VHOST_USER_F_PROTOCOL_FEATURES)

    def _reset(self) -> None:
        """Virtio device reset: rings stopped and disabled, status and features cleared, back-end reset.

        Call and err fds, the memory table and the back-end channel are vhost-user connection state, not
        device state: QEMU does not send them again before restarting the device, so they are kept.
        """
        for slot in self.slots:
            self._stop_ring(slot)
            slot.phases.apply(RingEvent.DISABLE)
            slot.size = None
            slot.address = None
            slot.base = 0
        self.status = 0
        self.acked_features = 0
        self.broken_reason = None
        self.config_change_pending = False
        self.device_state.drop("the device was reset")
        self.backend.reset()

    # -- session hand-over (serve --state-dir: vhost_iommu.keeper; server/handover.py) ----------------------

    def export_session(
        self, fd_id: Callable[[int], int | None], region_fd_id: Callable[[MemoryRegionDesc], int | None]
    ) -> SessionState:
        """The protocol session as data (see :func:`vhost_iommu.server.handover.export_session`)."""
        return handover.export_session(self, fd_id, region_fd_id)

    def restore_session(self, state: SessionState, fds: Mapping[int, int]) -> None:
        """Take over an exported session (see :func:`vhost_iommu.server.handover.restore_session`)."""
        handover.restore_session(self, state, fds)

    def suspend(self) -> None:
        """Stop serving without ending the session (see :func:`vhost_iommu.server.handover.suspend`)."""
        handover.suspend(self)

    # -- device state (migration: server/device_state.py) ---------------------------------------------------

    def _running_rings(self) -> list[int]:
        return [slot.index for slot in self.slots if slot.started]

    def _device_state_negotiated(self) -> bool:
        return bool(self.protocol_features & ProtocolFeature.DEVICE_STATE)

    def _set_device_state_fd(self, message: Message) -> Payload:
        return self.device_state.set_fd(message, self._device_state_negotiated())

    def _check_device_state(self, _message: Message) -> Payload:
        return self.device_state.check(self._device_state_negotiated())


def _u64(message: Message) -> int:
    assert isinstance(message.payload, U64)
    return message.payload.value


def _state(message: Message) -> VringState:
    assert isinstance(message.payload, VringState)
    return message.payload


def _file(message: Message) -> VringFile:
    assert isinstance(message.payload, VringFile)
    return message.payload


__all__ = [
    "OFFERED_PROTOCOL_FEATURES",
    "BackendChannel",
    "ConnectionFatal",
    "ConnectionHandler",
    "RequestFailed",
]

"""The vhost-user protocol state machine of one connection.

:class:`ConnectionHandler` takes decoded :class:`~vhost_iommu.protocol.Message` objects and answers them
through a ``send`` callable; it owns the negotiated features, the status byte, the guest memory, one
:class:`~vhost_iommu.server.vring.VringSlot` per queue, the back-end channel, and the kick fd watches (on the
event loop it is given). It is the :class:`~vhost_iommu.backend.BackendContext` of its back-end.

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
  (``server/transfer.py``); a load is applied when the fd reaches its end, refused if a ring started
  meanwhile, and CHECK_DEVICE_STATE reports the last transfer (reading what is left of a load first).
  A new SET_DEVICE_STATE_FD, a device reset or the disconnect abandons a running transfer.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import socket
import stat
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

from vhost_iommu.backend import (
    KickFdTaker,
    MigratableBackend,
    RestorableBackend,
    SessionLifecycle,
    VhostUserBackend,
)
from vhost_iommu.memory import GuestMemory, GuestMemoryError, MemoryRegionDesc
from vhost_iommu.protocol import (
    FLAG_NEED_REPLY,
    U64,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VIRTIO_CONFIG_S_NEEDS_RESET,
    BackendRequest,
    ConfigSpace,
    Decoder,
    DeviceStateTransfer,
    FrontendRequest,
    MemoryRegion,
    MemoryTable,
    Message,
    Payload,
    ProtocolError,
    ProtocolFeature,
    RequestRejected,
    SingleMemoryRegion,
    Stream,
    VringAddress,
    VringFile,
    VringState,
    close_fds,
    encode,
    encode_ack,
    encode_reply,
    request_has_own_reply,
)
from vhost_iommu.protocol.constants import (
    CONFIG_FLAG_MIGRATION,
    CONFIG_FLAG_WRITABLE,
    DEVICE_STATE_NOFD,
    DEVICE_STATE_SAVE,
    VRING_F_LOG,
)
from vhost_iommu.server.session import (
    MAX_CONFIG_WRITES,
    RegionState,
    RingState,
    SessionError,
    SessionState,
)
from vhost_iommu.server.transfer import StateTransfer
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

VIRTIO_RING_F_INDIRECT_DESC = 1 << 28
VIRTIO_RING_F_EVENT_IDX = 1 << 29
_EVENTFD_ONE = (1).to_bytes(8, sys.byteorder)


class RequestFailed(Exception):
    """A well-formed request this back-end refuses (bad index, wrong state, unusable memory, ...)."""


class ConnectionFatal(ProtocolError):
    """The connection must be closed (raised out of :meth:`ConnectionHandler.handle`)."""

    fatal = True


def _set_nonblocking(fd: int) -> None:
    # The fd's open file description is shared with the front-end; eventfds from QEMU are already
    # non-blocking, and for anything else blocking would let a front-end hang our event loop.
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)


@contextmanager
def _closed_on_error(fds: Sequence[int]) -> Iterator[None]:
    """Close ``fds`` if the block raises: until a handler has handed an fd on, it must not leak."""
    try:
        yield
    except BaseException:
        close_fds(fds)
        raise


def _send_nothing(_data: bytes) -> None:
    """A closed handler's ``send``."""


def _region_desc(region: MemoryRegion) -> MemoryRegionDesc:
    return MemoryRegionDesc(
        guest_phys_addr=region.guest_phys_addr,
        memory_size=region.memory_size,
        userspace_addr=region.userspace_addr,
        mmap_offset=region.mmap_offset,
    )


class BackendChannel:
    """The back-end -> front-end socket from SET_BACKEND_REQ_FD: sends requests, reads their REPLY_ACKs."""

    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop, name: str) -> None:
        self._sock = sock
        self._loop = loop
        self._name = name
        self._decoder = Decoder(Stream.FRONTEND_REPLIES)
        self.acks_pending = 0
        self.failures = 0
        sock.setblocking(False)
        loop.add_reader(sock.fileno(), self._on_readable)

    @property
    def open(self) -> bool:
        return self._sock.fileno() >= 0

    def fileno(self) -> int:
        return self._sock.fileno()

    def send(self, code: BackendRequest, need_reply: bool) -> None:
        data = encode(code, need_reply=need_reply)
        try:
            sent = self._sock.send(data)
        except OSError as exc:
            log.warning("%s: back-end channel send failed (%s); closing the channel", self._name, exc)
            self.close()
            return
        if sent != len(data):
            # A 12-byte message only fails to fit when the front-end stopped reading long ago.
            log.warning("%s: back-end channel full; closing it", self._name)
            self.close()
            return
        if need_reply:
            self.acks_pending += 1

    def _on_readable(self) -> None:
        try:
            data = self._sock.recv(4096)
        except BlockingIOError:
            return
        except OSError as exc:
            log.warning("%s: back-end channel read failed (%s)", self._name, exc)
            self.close()
            return
        if not data:
            log.info("%s: front-end closed the back-end channel", self._name)
            self.close()
            return
        self._decoder.feed(data)
        try:
            for reply in self._decoder.messages():
                self.acks_pending = max(0, self.acks_pending - 1)
                assert isinstance(reply.payload, U64)
                if reply.payload.value != 0:
                    self.failures += 1
                    log.warning(
                        "%s: front-end answered %r with failure %d",
                        self._name,
                        reply.code,
                        reply.payload.value,
                    )
        except ProtocolError as exc:
            log.warning("%s: bad reply on the back-end channel (%s); closing it", self._name, exc)
            self.close()

    def close(self) -> None:
        if self._sock.fileno() >= 0:
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
        self._decoder.close()


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
        #: The last device-state transfer (SET_DEVICE_STATE_FD), running or ended.
        self.transfer: StateTransfer | None = None
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
        self._drop_transfer("the connection closed")
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
            self._write_eventfd(fd, f"call fd of ring {index}")

    def reschedule(self, index: int) -> None:
        slot = self.slots[index]
        if slot.rescheduled:
            return
        slot.rescheduled = True
        # call_soon runs it in the loop's next iteration, after the fds that are ready now (other
        # connections' kicks and messages) have had their turn.
        self._loop.call_soon(self._on_rescheduled, index)

    def _on_rescheduled(self, index: int) -> None:
        slot = self.slots[index]
        if not slot.rescheduled:
            return  # the ring stopped meanwhile (a restart serves what is waiting anyway)
        slot.rescheduled = False
        if self._active(slot):
            self._call_backend(self.backend.queue_kicked, index)

    def reoffer_kick(self, index: int) -> None:
        if self.closed:
            return  # the disconnect took every fd back already
        slot = self.slots[index]
        self._reclaim_kick(slot)
        self._refresh(slot)  # replays the kick the back-end may have read, then offers the fd

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
                self._write_eventfd(slot.err_fd, f"err fd of ring {slot.index}")
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

    def _write_eventfd(self, fd: int, what: str) -> None:
        try:
            os.write(fd, _EVENTFD_ONE)
        except BlockingIOError:
            pass  # the counter is saturated: the front-end has a notification pending anyway
        except OSError as exc:
            log.warning("%s: writing the %s failed: %s", self.name, what, exc)

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
        with self._kicks_released(self.slots):
            self._memory.replace(regions)  # closes the fds whatever happens
            self._memory_changed()

    def _get_max_mem_slots(self, _message: Message) -> Payload:
        return U64(self._memory.max_regions)

    def _add_mem_reg(self, message: Message) -> None:
        assert isinstance(message.payload, SingleMemoryRegion)
        with self._kicks_released(self.slots):
            self._memory.add_region(_region_desc(message.payload.region), message.fds[0])  # closes the fd
            self._memory_changed()

    def _rem_mem_reg(self, message: Message) -> None:
        assert isinstance(message.payload, SingleMemoryRegion)
        with self._kicks_released(self.slots):
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

    def _stopped_slot(self, index: int, what: str) -> VringSlot:
        slot = self._slot(index)
        if slot.started:
            raise RequestFailed(f"{what} on {slot.describe()}: stop it with GET_VRING_BASE first")
        return slot

    def _set_vring_num(self, message: Message) -> None:
        state = _state(message)
        slot = self._stopped_slot(state.index, "SET_VRING_NUM")
        size = state.num
        if not 1 <= size <= self.backend.max_queue_size or size & (size - 1):
            raise RequestFailed(
                f"SET_VRING_NUM {size} for ring {state.index}: not a power of 2 between 1 and "
                f"{self.backend.max_queue_size}"
            )
        slot.size = size

    def _set_vring_addr(self, message: Message) -> None:
        assert isinstance(message.payload, VringAddress)
        slot = self._stopped_slot(message.payload.index, "SET_VRING_ADDR")
        if message.payload.flags & VRING_F_LOG:
            raise RequestFailed("SET_VRING_ADDR asks for used-ring logging, which is not supported")
        slot.address = message.payload

    def _set_vring_base(self, message: Message) -> None:
        state = _state(message)
        slot = self._stopped_slot(state.index, "SET_VRING_BASE")
        if state.num > 0xFFFF:
            raise RequestFailed(f"SET_VRING_BASE {state.num:#x}: a split ring's index is 16 bits")
        slot.base = state.num

    def _get_vring_base(self, message: Message) -> Payload:
        state = _state(message)
        slot = self._slot(state.index)
        self._stop_ring(slot)
        return VringState(slot.index, slot.base)

    def _set_vring_kick(self, message: Message) -> None:
        with _closed_on_error(message.fds):
            vring_file = _file(message)
            slot = self._slot(vring_file.index)
            if not vring_file.has_fd:
                raise RequestFailed("SET_VRING_KICK without an fd asks for polling, which is not supported")
            fd = message.fds[0]
            self._reclaim_kick(slot)  # offered again by _refresh below, or when the ring is served
            queue = slot.queue if slot.queue is not None else self._make_queue(slot)
            _set_nonblocking(fd)
            try:
                self._loop.add_reader(fd, self._on_kick, slot.index)
            except (OSError, ValueError) as exc:
                raise RequestFailed(f"kick fd {fd} of ring {slot.index} cannot be watched: {exc}") from None
        if slot.kick_fd is not None:
            self._loop.remove_reader(slot.kick_fd)
        slot.replace_fd("kick", fd)
        slot.queue = queue
        self._refresh(slot)
        if self.config_change_pending:
            self.config_changed()

    def _make_queue(self, slot: VringSlot) -> SplitQueue:
        if slot.size is None or slot.address is None:
            raise RequestFailed(f"ring {slot.index} cannot start before SET_VRING_NUM and SET_VRING_ADDR")
        if slot.stopped_layout is not None and slot.stopped_layout != slot.layout:
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
        with _closed_on_error(message.fds):
            vring_file = _file(message)
            slot = self._slot(vring_file.index)
            fd = message.fds[0] if vring_file.has_fd else None
            if fd is not None:
                _set_nonblocking(fd)
        if which == "call" and slot.kick_taken:
            # A back-end serving the ring from its own thread signals the call fd from there: it lets go
            # of the old fd before it is closed, and keeps its thread.
            assert isinstance(self.backend, KickFdTaker)
            self.backend.replace_call_fd(slot.index, fd)
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
        slot.enabled = enabled
        self._refresh(slot)

    def _stop_ring(self, slot: VringSlot) -> None:
        self._reclaim_kick(slot)
        slot.kick_pending = False
        slot.rescheduled = False
        if slot.served:
            # Told while the ring is still bound, so that a back-end holding chains (eventq buffers
            # waiting for an event) can return them before next_avail is read for GET_VRING_BASE.
            slot.served = False
            self.backend.queue_stopped(slot.index)
        if slot.queue is not None:
            slot.base = slot.queue.next_avail
            slot.stopped_layout = slot.layout
        slot.queue = None
        if slot.kick_fd is not None:
            self._loop.remove_reader(slot.kick_fd)
            slot.replace_fd("kick", None)

    def _active(self, slot: VringSlot) -> bool:
        return slot.started and slot.enabled and self.broken_reason is None and not self.closed

    def _refresh_all(self) -> None:
        for slot in self.slots:
            self._refresh(slot)

    def _refresh(self, slot: VringSlot) -> None:
        """Tell the back-end when a ring becomes served or stops being served; replay a held kick."""
        active = self._active(slot)
        if not active:
            self._reclaim_kick(slot)
        if active and not slot.served:
            slot.served = True
            self._call_backend(self.backend.queue_started, slot.index)
        elif not active and slot.served:
            slot.served = False
            self.backend.queue_stopped(slot.index)
        if self._active(slot) and slot.kick_pending:
            slot.kick_pending = False
            self._call_backend(self.backend.queue_kicked, slot.index)
        if self._active(slot):
            self._offer_kick(slot)

    def _offer_kick(self, slot: VringSlot) -> None:
        """Let a back-end that can (KickFdTaker) watch the kick fd of a served ring itself."""
        fd = slot.kick_fd
        if slot.kick_taken or fd is None or not isinstance(self.backend, KickFdTaker):
            return
        if self.backend.takes_kick_fd(slot.index, fd, slot.call_fd):
            self._loop.remove_reader(fd)
            slot.kick_taken = True

    def _reclaim_kick(self, slot: VringSlot) -> None:
        """Take a kick fd back from the back-end (it has stopped touching the ring when this returns)."""
        if not slot.kick_taken:
            return
        slot.kick_taken = False
        assert isinstance(self.backend, KickFdTaker)
        self.backend.release_kick_fd(slot.index)
        if slot.kick_fd is not None:
            self._loop.add_reader(slot.kick_fd, self._on_kick, slot.index)
            # Kicks the back-end read but did not act on are not lost: the ring is looked at again.
            slot.kick_pending = True

    @contextmanager
    def _kicks_released(self, slots: Sequence[VringSlot]) -> Iterator[None]:
        """No back-end thread touches these rings, the memory or their notifiers inside the block."""
        for slot in slots:
            self._reclaim_kick(slot)
        try:
            yield
        finally:
            for slot in slots:
                self._refresh(slot)

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
                self._loop.remove_reader(fd)
            return
        if not data:
            log.warning("%s: kick fd of ring %d reached end of file; no longer watched", self.name, index)
            self._loop.remove_reader(fd)
            return
        if self.broken_reason is not None or not slot.started:
            return
        if not slot.enabled:
            slot.kick_pending = True
            return
        self._call_backend(self.backend.queue_kicked, index)

    def _call_backend(self, method: Callable[[int], None], index: int) -> None:
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
        self._remember_config_write(request.offset, request.data)

    def _remember_config_write(self, offset: int, data: bytes) -> None:
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
            self._reclaim_kick(other)
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
            slot.enabled = False
            slot.size = None
            slot.address = None
            slot.base = 0
        self.status = 0
        self.acked_features = 0
        self.broken_reason = None
        self.config_change_pending = False
        self._drop_transfer("the device was reset")
        self.backend.reset()

    # -- session hand-over (serve --state-dir: vhost_iommu.keeper) ------------------------------------------

    def export_session(
        self, fd_id: Callable[[int], int | None], region_fd_id: Callable[[MemoryRegionDesc], int | None]
    ) -> SessionState:
        """The protocol session as data, fds named by the keeper's ids (``fd_id`` of a local fd number,
        ``region_fd_id`` of a memory region). Raises SessionError for an fd the keeper never numbered."""

        def named(fd: int | None, what: str) -> int | None:
            if fd is None:
                return None
            found = fd_id(fd)
            if found is None:
                raise SessionError(f"{what}: fd {fd} has no keeper id")
            return found

        regions = []
        for region in self._memory.regions:
            desc = region.desc
            found = region_fd_id(desc)
            if found is None:
                raise SessionError(f"memory region {desc}: no keeper id for its fd")
            regions.append(
                RegionState(
                    desc.guest_phys_addr, desc.memory_size, desc.userspace_addr, desc.mmap_offset, found
                )
            )
        rings = []
        for slot in self.slots:
            stopped = slot.stopped_layout
            rings.append(
                RingState(
                    size=slot.size,
                    address=_address_tuple(slot.address),
                    base=slot.base,
                    enabled=slot.enabled,
                    started=slot.started,
                    kick=named(slot.kick_fd, f"kick fd of ring {slot.index}"),
                    call=named(slot.call_fd, f"call fd of ring {slot.index}"),
                    err=named(slot.err_fd, f"err fd of ring {slot.index}"),
                    stopped_layout=None
                    if stopped is None
                    else (stopped[0], stopped[1], _address_tuple(stopped[2])),
                )
            )
        channel = self.channel.fileno() if self.channel is not None and self.channel.open else None
        return SessionState(
            acked_features=self.acked_features,
            protocol_features=int(self.protocol_features),
            owner=self.owner,
            status=self.status,
            broken_reason=self.broken_reason,
            config_change_pending=self.config_change_pending,
            config_writes=tuple(self.config_writes),
            regions=tuple(regions),
            channel=named(channel, "back-end channel"),
            rings=tuple(rings),
        )

    def restore_session(self, state: SessionState, fds: Mapping[int, int]) -> None:
        """Take over a session a previous worker exported; ``fds`` maps its fd ids to fds of this process,
        all of which this call owns (installed or closed, whatever happens).

        Nothing the guest sees is written but what any ring start writes (notifications re-enabled): each
        started ring is rebuilt at its addresses with ``next_avail`` = the used ring's index in guest
        memory, then the back-end is told (see :class:`~vhost_iommu.backend.RestorableBackend`) and each
        served ring is served once, for the kicks that arrived while no worker was there.
        Raises SessionError if the session does not fit this device.
        """
        used: set[int] = set()
        try:
            if len(state.rings) != len(self.slots):
                raise SessionError(f"session has {len(state.rings)} rings, the device {len(self.slots)}")
            unknown = state.protocol_features & ~int(self.offered_protocol_features())
            if unknown or state.acked_features & ~self.offered_features():
                raise SessionError("session negotiated features this device does not offer")
            self.owner = state.owner
            self.acked_features = state.acked_features  # the rings are built with its EVENT_IDX
            self.protocol_features = ProtocolFeature(state.protocol_features)
            self.status = state.status
            self.config_change_pending = state.config_change_pending

            def take(fd_id: int) -> int:
                if fd_id not in fds or fd_id in used:
                    raise SessionError(f"session references fd id {fd_id}, which was not handed over")
                used.add(fd_id)
                return fds[fd_id]

            regions = [
                (
                    MemoryRegionDesc(r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset),
                    take(r.fd),
                )
                for r in state.regions
            ]
            self._memory.replace(regions)  # closes those fds whatever happens
            if state.channel is not None:
                sock = socket.socket(fileno=take(state.channel))
                self.channel = BackendChannel(sock, self._loop, self.name)
            for slot, ring in zip(self.slots, state.rings, strict=True):
                self._restore_ring(slot, ring, take)
        finally:
            close_fds(fd for fd_id, fd in fds.items() if fd_id not in used)
        self.backend.set_features(self.acked_features & ~VHOST_USER_F_PROTOCOL_FEATURES)
        for offset, data in state.config_writes:
            try:
                self.backend.set_config(offset, data)
            except ValueError as exc:
                log.warning("%s: a SET_CONFIG of the session is refused now: %s", self.name, exc)
                continue
            self._remember_config_write(offset, data)
        self.backend.memory_changed()
        self.broken_reason = state.broken_reason
        if isinstance(self.backend, RestorableBackend):
            self.backend.session_restored()
            for slot in self.slots:
                if slot.queue is not None:
                    self._call_backend(self.backend.queue_restored, slot.index)
        for slot in self.slots:
            self._refresh(slot)
        for slot in self.slots:
            if self._active(slot) and not slot.kick_taken:
                self._call_backend(self.backend.queue_kicked, slot.index)
            elif self._active(slot):
                # A back-end serving the ring from its thread is woken through its kick fd.
                self._write_eventfd(slot.kick_fd, f"kick fd of ring {slot.index}")  # type: ignore[arg-type]

    def _restore_ring(self, slot: VringSlot, ring: RingState, take: Callable[[int], int]) -> None:
        slot.size = ring.size
        slot.address = None if ring.address is None else VringAddress(slot.index, *ring.address)
        slot.base = ring.base
        slot.enabled = ring.enabled
        if ring.stopped_layout is not None:
            size, base, address = ring.stopped_layout
            at = None if address is None else VringAddress(slot.index, *address)
            slot.stopped_layout = (size, base, at)
        for which in ("call", "err"):
            fd_id = getattr(ring, which)
            if fd_id is not None:
                fd = take(fd_id)
                slot.replace_fd(which, fd)
                _set_nonblocking(fd)
        if not ring.started or ring.kick is None:
            return
        kick = take(ring.kick)
        slot.replace_fd("kick", kick)
        _set_nonblocking(kick)
        self._loop.add_reader(kick, self._on_kick, slot.index)
        try:
            queue = self._make_queue(slot)
        except (RequestFailed, QueueError, GuestMemoryError) as exc:
            self.device_broken(f"ring {slot.index} cannot be taken over: {exc}")
            return
        # What the device completed is what the used ring says; everything after it is served again
        # (a RestorableBackend moves this where its journal knows better: queue_restored).
        queue.next_avail = queue.used_idx
        slot.queue = queue

    def suspend(self) -> None:
        """Stop serving without ending the session (an upgrade hands it to a new worker): kick threads
        joined, no fd watched, the back-end told (SessionLifecycle.session_suspended); no reset, no
        queue_stopped: the device goes on in the next worker."""
        if self.closed:
            return
        self.closed = True
        # A device-state transfer does not move to the next worker: it ends here, and the front-end's
        # CHECK_DEVICE_STATE (answered by the next worker, which has none) fails.
        self._drop_transfer("the connection moved to another device worker")
        for slot in self.slots:
            self._reclaim_kick(slot)
            slot.rescheduled = False
            if slot.kick_fd is not None:
                self._loop.remove_reader(slot.kick_fd)
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        if isinstance(self.backend, SessionLifecycle):
            self.backend.session_suspended()

    # -- device state (migration) ---------------------------------------------------------------------------

    def _migratable(self, what: str) -> MigratableBackend:
        if not self.protocol_features & ProtocolFeature.DEVICE_STATE:
            raise RequestFailed(f"{what} without VHOST_USER_PROTOCOL_F_DEVICE_STATE negotiated")
        assert isinstance(self.backend, MigratableBackend)  # only offered to such back-ends
        return self.backend

    def _running_rings(self) -> list[int]:
        return [slot.index for slot in self.slots if slot.started]

    def _drop_transfer(self, reason: str) -> None:
        if self.transfer is not None:
            self.transfer.cancel(reason)
            self.transfer = None

    def _set_device_state_fd(self, message: Message) -> Payload:
        with _closed_on_error(message.fds):
            assert isinstance(message.payload, DeviceStateTransfer)
            # A new transfer replaces the last one, whatever becomes of it: CHECK_DEVICE_STATE answers
            # for this one only.
            self._drop_transfer("replaced by a new SET_DEVICE_STATE_FD")
            backend = self._migratable("SET_DEVICE_STATE_FD")
            running = self._running_rings()
            if running:
                # vhost-user.rst: the only phase is "stopped", the device suspended. A state saved while
                # the guest is still served would not be the state it ends up in.
                raise RequestFailed(
                    f"SET_DEVICE_STATE_FD while ring(s) {running} run: stop every ring (GET_VRING_BASE) first"
                )
            fd = message.fds[0]
            kind = stat.S_IFMT(os.fstat(fd).st_mode)
            if kind not in (stat.S_IFIFO, stat.S_IFSOCK):
                raise RequestFailed("SET_DEVICE_STATE_FD: the transfer fd must be a pipe or a socket")
            _set_nonblocking(fd)
            name = self.name
            try:
                if message.payload.direction == DEVICE_STATE_SAVE:
                    try:
                        data = backend.save_state()
                    except ValueError as exc:
                        raise RequestFailed(
                            f"SET_DEVICE_STATE_FD: the state cannot be saved: {exc}"
                        ) from None
                    self.transfer = StateTransfer.save(self._loop, fd, data, name)
                else:
                    self.transfer = StateTransfer.load(
                        self._loop, fd, name, limit=backend.max_state_size(), apply=self._load_state
                    )
            except (OSError, ValueError) as exc:  # the loop cannot watch this fd
                raise RequestFailed(
                    f"SET_DEVICE_STATE_FD: the transfer fd cannot be watched: {exc}"
                ) from None
        log.info(
            "%s: device state transfer started (%s)",
            self.name,
            "save" if message.payload.direction == DEVICE_STATE_SAVE else "load",
        )
        return U64(DEVICE_STATE_NOFD)  # success, and the front-end's own fd is the channel

    def _load_state(self, data: bytes) -> None:
        running = self._running_rings()
        if running:
            raise ValueError(f"ring(s) {running} were started during the transfer")
        assert isinstance(self.backend, MigratableBackend)  # the transfer began through _migratable
        self.backend.load_state(data)

    def _check_device_state(self, _message: Message) -> Payload:
        self._migratable("CHECK_DEVICE_STATE")
        transfer = self.transfer
        if transfer is None:
            raise RequestFailed("CHECK_DEVICE_STATE: no device state transfer to check")
        transfer.finish_now()
        if transfer.error is not None:
            raise RequestFailed(f"CHECK_DEVICE_STATE: the transfer failed: {transfer.error}")
        return U64(0)


def _address_tuple(address: VringAddress | None) -> tuple[int, int, int, int, int] | None:
    if address is None:
        return None
    return (address.flags, address.descriptor, address.used, address.available, address.log)


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

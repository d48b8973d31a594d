"""A blocking vhost-user front-end that plays QEMU over a real unix socket, for tests and scripts.

It speaks through the same codec as the server. Typical use::

    with Frontend.connect(path) as frontend, GuestRam(1 << 20) as ram:
        queues = [DriverQueue(ram, 64), DriverQueue(ram, 64)]
        frontend.start_device(ram, queues)          # QEMU 10.2's start-up sequence
        head = queues[0].post([b"ping"], [16])
        frontend.kick(0)
        assert frontend.wait_used(0, timeout=5)
        assert queues[0].used_with_data() == [(head, 4, b"ping")]

Every call blocks for at most ``timeout`` seconds and raises :class:`FrontendTimeout` after that. A
failure REPLY_ACK raises :class:`RequestFailedError`; a malformed reply raises the codec's
:class:`~vhost_iommu.protocol.ProtocolError`. :meth:`send` is the raw escape hatch for hostile-input tests.

The back-end channel (SET_BACKEND_REQ_FD) is a socketpair whose other end a background thread watches the
way QEMU's main loop does: it acknowledges each CONFIG_CHANGE_MSG (REPLY_ACK when asked) and counts them.

Fds: the front-end owns its eventfds and its end of the back-end channel and closes them in :meth:`close`;
fds passed to :meth:`send` or a request stay the caller's (the kernel hands the back-end copies).
"""

from __future__ import annotations

import array
import contextlib
import os
import select
import socket
import threading
import time
from collections.abc import Sequence
from types import TracebackType

from vhost_iommu.abi import (
    VIRTIO_CONFIG_S_ACKNOWLEDGE,
    VIRTIO_CONFIG_S_DRIVER,
    VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_RING_F_EVENT_IDX,
)
from vhost_iommu.harness.driver_queue import DriverQueue
from vhost_iommu.harness.guest_ram import GuestRam
from vhost_iommu.protocol import (
    U64,
    VHOST_USER_F_PROTOCOL_FEATURES,
    BackendRequest,
    ConfigSpace,
    Decoder,
    DeviceStateTransfer,
    Empty,
    FrontendRequest,
    MemoryRegion,
    MemoryTable,
    Message,
    Payload,
    ProtocolError,
    ProtocolFeature,
    SingleMemoryRegion,
    Stream,
    VringAddress,
    VringFile,
    VringState,
    encode,
    encode_ack,
    request_has_own_reply,
)
from vhost_iommu.protocol.constants import (
    DEVICE_STATE_ERROR_MASK,
    DEVICE_STATE_LOAD,
    DEVICE_STATE_NOFD,
    DEVICE_STATE_PHASE_STOPPED,
    DEVICE_STATE_SAVE,
)

#: What QEMU 10.2 keeps of the protocol features a back-end offers (VHOST_USER_PROTOCOL_FEATURE_MASK).
QEMU_PROTOCOL_FEATURE_MASK = (1 << 20) - 1


class FrontendError(Exception):
    """The back-end did not behave as a front-end needs."""


class FrontendTimeout(FrontendError):
    """No answer within the timeout."""


class RequestFailedError(FrontendError):
    """The back-end answered a request with a failure REPLY_ACK (or an empty GET_CONFIG)."""


def region_of(ram: GuestRam) -> MemoryRegion:
    desc = ram.region_desc()
    return MemoryRegion(desc.guest_phys_addr, desc.memory_size, desc.userspace_addr, desc.mmap_offset)


def _eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def _wait_readable(fd: int, timeout: float) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(max(0.0, timeout) * 1000))


def _wait_writable(fd: int, timeout: float) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return bool(poller.poll(max(0.0, timeout) * 1000))


class BackendChannelWatcher:
    """The front-end's end of the back-end channel, served by a thread: acks CONFIG_CHANGE_MSG."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._condition = threading.Condition()
        self.config_changes = 0
        self.messages: list[Message] = []
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="vhost-user backend channel", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        decoder = Decoder(Stream.BACKEND_REQUESTS)
        try:
            while data := self._sock.recv(4096):
                decoder.feed(data)
                for message in decoder.messages():
                    with self._condition:
                        self.messages.append(message)
                        if message.code is BackendRequest.CONFIG_CHANGE_MSG:
                            self.config_changes += 1
                        self._condition.notify_all()
                    if message.need_reply:
                        self._sock.sendall(encode_ack(message.code, success=True))
        except (OSError, ProtocolError) as exc:
            with self._condition:
                self.error = exc
                self._condition.notify_all()
        finally:
            decoder.close()

    def wait_config_changes(self, count: int, timeout: float) -> bool:
        """Wait until at least ``count`` CONFIG_CHANGE_MSG have arrived in total."""
        with self._condition:
            return self._condition.wait_for(lambda: self.config_changes >= count, timeout)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=5)
        self._sock.close()


class Frontend:
    """A synchronous vhost-user front-end on one connected unix socket."""

    def __init__(self, sock: socket.socket, *, timeout: float = 5.0) -> None:
        self.sock = sock
        self.timeout = timeout
        sock.settimeout(timeout)
        self._decoder = Decoder(Stream.BACKEND_REPLIES)
        self.features = 0
        self.protocol_features = 0
        self.kick_fds: dict[int, int] = {}
        self.call_fds: dict[int, int] = {}
        self.err_fds: dict[int, int] = {}
        self.channel: BackendChannelWatcher | None = None

    @classmethod
    def connect(cls, path: str, *, timeout: float = 5.0) -> Frontend:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(timeout)
            sock.connect(path)
        except BaseException:
            sock.close()
            raise
        return cls(sock, timeout=timeout)

    def __enter__(self) -> Frontend:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Disconnect and close every fd this front-end created."""
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        for fds in (self.kick_fds, self.call_fds, self.err_fds):
            for fd in fds.values():
                os.close(fd)
            fds.clear()
        self.sock.close()
        self._decoder.close()

    # -- raw messages ---------------------------------------------------------------------------------------

    def send(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Send raw bytes with ``fds`` as SCM_RIGHTS ancillary data (one sendmsg)."""
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        sent = self.sock.sendmsg([data], ancillary)
        if sent < len(data):
            self.sock.sendall(data[sent:])

    def receive(self, timeout: float | None = None) -> Message:
        """The next reply from the back-end."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while (message := self._decoder.next_message()) is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not _wait_readable(self.sock.fileno(), remaining):
                raise FrontendTimeout("no reply from the back-end")
            data = self.sock.recv(4096)
            if not data:
                self._decoder.feed_eof()
                if self._decoder.next_message() is None:
                    raise FrontendError("the back-end closed the connection")
            self._decoder.feed(data)
        return message

    def wait_disconnected(self, timeout: float | None = None) -> bool:
        """True if the back-end closes the connection within ``timeout`` (replies meanwhile are dropped)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not _wait_readable(self.sock.fileno(), remaining):
                return False
            try:
                if not self.sock.recv(4096):
                    return True
            except ConnectionResetError:
                return True

    def request(
        self,
        code: int,
        payload: Payload | None = None,
        fds: Sequence[int] = (),
        *,
        need_reply: bool | None = None,
    ) -> Message | None:
        """Send one request and wait for what answers it.

        ``need_reply`` defaults to "REPLY_ACK was negotiated", as QEMU does for the messages where it
        waits. Returns the reply of a GET_* request, the REPLY_ACK when one was asked for, else None.
        Raises RequestFailedError on a failure REPLY_ACK.
        """
        if need_reply is None:
            need_reply = bool(self.protocol_features & ProtocolFeature.REPLY_ACK)
        own_reply = request_has_own_reply(code)
        self.send(encode(code, payload, need_reply=need_reply and not own_reply), fds)
        if not own_reply and not need_reply:
            return None
        reply = self.receive()
        if reply.code != code:
            raise FrontendError(f"expected a reply to {code!r}, got one to {reply.code!r}")
        if not own_reply:
            assert isinstance(reply.payload, U64)
            if reply.payload.value != 0:
                raise RequestFailedError(f"{code!r} failed (REPLY_ACK {reply.payload.value})")
        return reply

    def _get_u64(self, code: FrontendRequest) -> int:
        reply = self.request(code)
        assert reply is not None and isinstance(reply.payload, U64)
        return reply.payload.value

    # -- negotiation ----------------------------------------------------------------------------------------

    def get_features(self) -> int:
        return self._get_u64(FrontendRequest.GET_FEATURES)

    def set_features(self, features: int) -> None:
        self.request(FrontendRequest.SET_FEATURES, U64(features), need_reply=False)
        self.features = features

    def get_protocol_features(self) -> int:
        return self._get_u64(FrontendRequest.GET_PROTOCOL_FEATURES)

    def set_protocol_features(self, features: int) -> None:
        self.request(FrontendRequest.SET_PROTOCOL_FEATURES, U64(features), need_reply=False)
        self.protocol_features = features

    def set_owner(self) -> None:
        self.request(FrontendRequest.SET_OWNER, need_reply=False)

    def reset_owner(self) -> None:
        self.request(FrontendRequest.RESET_OWNER)

    def get_queue_num(self) -> int:
        return self._get_u64(FrontendRequest.GET_QUEUE_NUM)

    def get_max_mem_slots(self) -> int:
        return self._get_u64(FrontendRequest.GET_MAX_MEM_SLOTS)

    def set_backend_req_fd(self) -> BackendChannelWatcher:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.request(FrontendRequest.SET_BACKEND_REQ_FD, fds=[theirs.fileno()])
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        if self.channel is not None:
            self.channel.close()
        self.channel = BackendChannelWatcher(ours)
        return self.channel

    def negotiate(self, num_queues: int, *, protocol_features: int | None = None) -> None:
        """QEMU 10.2's ``vhost_user_backend_init`` and ``vhost_dev_init`` for ``num_queues`` queues."""
        features = self.get_features()
        if not features & VHOST_USER_F_PROTOCOL_FEATURES:
            raise FrontendError("the back-end does not offer VHOST_USER_F_PROTOCOL_FEATURES")
        offered = self.get_protocol_features() & QEMU_PROTOCOL_FEATURE_MASK
        if not offered & ProtocolFeature.CONFIG:
            raise FrontendError("the back-end does not offer VHOST_USER_PROTOCOL_F_CONFIG")
        wanted = offered if protocol_features is None else offered & protocol_features
        self.set_protocol_features(wanted)
        if wanted & ProtocolFeature.MQ and self.get_queue_num() < num_queues:
            raise FrontendError(f"the back-end supports fewer than {num_queues} queues")
        if wanted & ProtocolFeature.CONFIGURE_MEM_SLOTS:
            self.get_max_mem_slots()
        if wanted & ProtocolFeature.BACKEND_REQ:
            self.set_backend_req_fd()
        self.set_owner()
        self.get_features()
        for index in range(num_queues):
            self.set_vring_call(index)
            self.set_vring_err(index)

    # -- memory ---------------------------------------------------------------------------------------------

    def set_mem_table(self, rams: Sequence[GuestRam]) -> None:
        table = MemoryTable(tuple(region_of(ram) for ram in rams))
        self.request(FrontendRequest.SET_MEM_TABLE, table, [ram.fd for ram in rams])

    def add_mem_reg(self, ram: GuestRam) -> None:
        self.request(FrontendRequest.ADD_MEM_REG, SingleMemoryRegion(region_of(ram)), [ram.fd])

    def rem_mem_reg(self, ram: GuestRam) -> None:
        self.request(FrontendRequest.REM_MEM_REG, SingleMemoryRegion(region_of(ram)))

    # -- rings ----------------------------------------------------------------------------------------------

    def set_vring_num(self, index: int, size: int) -> None:
        self.request(FrontendRequest.SET_VRING_NUM, VringState(index, size))

    def set_vring_base(self, index: int, base: int) -> None:
        self.request(FrontendRequest.SET_VRING_BASE, VringState(index, base))

    def set_vring_addr(self, index: int, queue: DriverQueue, *, flags: int = 0) -> None:
        address = VringAddress(index, flags, queue.desc_uva, queue.used_uva, queue.avail_uva, 0)
        self.request(FrontendRequest.SET_VRING_ADDR, address)

    def get_vring_base(self, index: int) -> int:
        reply = self.request(FrontendRequest.GET_VRING_BASE, VringState(index, 0))
        assert reply is not None and isinstance(reply.payload, VringState)
        return reply.payload.num

    def _set_vring_fd(self, code: FrontendRequest, fds: dict[int, int], index: int, with_fd: bool) -> None:
        if not with_fd:
            self.request(code, VringFile(index, has_fd=False))
            return
        if index not in fds:
            fds[index] = _eventfd()
        self.request(code, VringFile(index, has_fd=True), [fds[index]])

    def set_vring_kick(self, index: int, *, with_fd: bool = True) -> None:
        self._set_vring_fd(FrontendRequest.SET_VRING_KICK, self.kick_fds, index, with_fd)

    def set_vring_call(self, index: int, *, with_fd: bool = True) -> None:
        self._set_vring_fd(FrontendRequest.SET_VRING_CALL, self.call_fds, index, with_fd)

    def set_vring_err(self, index: int, *, with_fd: bool = True) -> None:
        self._set_vring_fd(FrontendRequest.SET_VRING_ERR, self.err_fds, index, with_fd)

    def set_vring_enable(self, index: int, enabled: bool) -> None:
        self.request(FrontendRequest.SET_VRING_ENABLE, VringState(index, int(enabled)))

    def kick(self, index: int) -> None:
        """Notify the back-end that ring ``index`` has new buffers (write its kick eventfd)."""
        os.eventfd_write(self.kick_fds[index], 1)

    def _wait_eventfd(self, fd: int, timeout: float | None) -> bool:
        if not _wait_readable(fd, self.timeout if timeout is None else timeout):
            return False
        try:
            os.eventfd_read(fd)
        except BlockingIOError:
            return False
        return True

    def wait_used(self, index: int, timeout: float | None = None) -> bool:
        """Wait for a used-buffer notification on ring ``index`` (its call eventfd); True if one came."""
        return self._wait_eventfd(self.call_fds[index], timeout)

    def wait_error(self, index: int, timeout: float | None = None) -> bool:
        """Wait for ring ``index``'s err eventfd to be signalled."""
        return self._wait_eventfd(self.err_fds[index], timeout)

    # -- config, status, reset ------------------------------------------------------------------------------

    def get_config(self, offset: int, size: int) -> bytes:
        """Read config space; raises RequestFailedError on the spec's empty failure reply."""
        reply = self.request(FrontendRequest.GET_CONFIG, ConfigSpace(offset, 0, bytes(size)))
        assert reply is not None
        if isinstance(reply.payload, Empty):
            raise RequestFailedError(f"GET_CONFIG {offset}+{size} failed (empty reply)")
        assert isinstance(reply.payload, ConfigSpace)
        if (reply.payload.offset, reply.payload.size) != (offset, size):
            raise FrontendError(f"GET_CONFIG reply is for {reply.payload.offset}+{reply.payload.size}")
        return reply.payload.data

    def set_config(self, offset: int, data: bytes, *, flags: int = 0) -> None:
        self.request(FrontendRequest.SET_CONFIG, ConfigSpace(offset, flags, data))

    def get_status(self) -> int:
        return self._get_u64(FrontendRequest.GET_STATUS)

    def set_status(self, status: int) -> None:
        self.request(FrontendRequest.SET_STATUS, U64(status), need_reply=False)

    def add_status(self, bits: int) -> None:
        """QEMU's ``vhost_user_add_status``: read, and write back only if bits are missing."""
        status = self.get_status()
        if status & bits != bits:
            self.set_status(status | bits)

    def reset_device(self) -> None:
        self.request(FrontendRequest.RESET_DEVICE)

    # -- device state (migration) ---------------------------------------------------------------------------

    def set_device_state_fd(self, direction: int, fd: int, *, phase: int = DEVICE_STATE_PHASE_STOPPED) -> int:
        """SET_DEVICE_STATE_FD with ``fd`` (it stays the caller's: the back-end gets a copy); the reply's
        u64 as it came (bits 0-7 zero on success, bit 8 set when the back-end returned no fd)."""
        reply = self.request(FrontendRequest.SET_DEVICE_STATE_FD, DeviceStateTransfer(direction, phase), [fd])
        assert reply is not None and isinstance(reply.payload, U64)
        return reply.payload.value

    def check_device_state(self) -> int:
        """CHECK_DEVICE_STATE: 0 if the back-end says the last transfer worked."""
        return self._get_u64(FrontendRequest.CHECK_DEVICE_STATE)

    def save_state(self) -> bytes:
        """The source side of a migration, as QEMU's ``vhost_save_backend_state`` does it (the rings must
        be stopped): a pipe, SET_DEVICE_STATE_FD(save) with its write end, read to end of file,
        CHECK_DEVICE_STATE. Raises RequestFailedError if the back-end refuses or reports a failure."""
        read_fd = self._start_transfer(DEVICE_STATE_SAVE)
        try:
            chunks = []
            while chunk := self._read_chunk(read_fd):
                chunks.append(chunk)
        finally:
            os.close(read_fd)
        if (status := self.check_device_state()) != 0:
            raise RequestFailedError(f"CHECK_DEVICE_STATE after the save answered {status}")
        return b"".join(chunks)

    def load_state(self, data: bytes, *, close_pipe: bool = True) -> None:
        """The destination side (QEMU's ``vhost_load_backend_state``): a pipe, SET_DEVICE_STATE_FD(load)
        with its read end, write ``data`` and close, CHECK_DEVICE_STATE. ``close_pipe=False`` keeps the
        write end open across the check, as a broken front-end would. Raises RequestFailedError if the
        back-end refuses the transfer or reports that loading failed."""
        write_fd = self._start_transfer(DEVICE_STATE_LOAD)
        try:
            view = memoryview(data)
            while view:
                if not _wait_writable(write_fd, self.timeout):
                    raise FrontendTimeout("the back-end stopped reading the state")
                try:
                    view = view[os.write(write_fd, view[: 1 << 16]) :]
                except BrokenPipeError:
                    break  # the back-end gave up reading; CHECK_DEVICE_STATE says why
            if close_pipe:
                os.close(write_fd)
                write_fd = -1
            status = self.check_device_state()
        finally:
            if write_fd >= 0:
                os.close(write_fd)
        if status != 0:
            raise RequestFailedError(f"CHECK_DEVICE_STATE after the load answered {status}")

    def _start_transfer(self, direction: int) -> int:
        """A pipe, one end sent with SET_DEVICE_STATE_FD (and closed here); the other end, ours."""
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        theirs, ours = (write_fd, read_fd) if direction == DEVICE_STATE_SAVE else (read_fd, write_fd)
        try:
            try:
                result = self.set_device_state_fd(direction, theirs)
            finally:
                os.close(theirs)
            self._check_transfer_reply(result)
        except BaseException:
            os.close(ours)
            raise
        return ours

    @staticmethod
    def _check_transfer_reply(result: int) -> None:
        if result & DEVICE_STATE_ERROR_MASK:
            raise RequestFailedError(f"SET_DEVICE_STATE_FD refused ({result:#x})")
        if not result & DEVICE_STATE_NOFD:
            raise FrontendError(
                "the back-end returned a transfer fd of its own, which this front-end does not take"
            )

    def _read_chunk(self, fd: int) -> bytes:
        if not _wait_readable(fd, self.timeout):
            raise FrontendTimeout("the back-end stopped writing the state")
        return os.read(fd, 1 << 16)

    # -- the whole sequence ---------------------------------------------------------------------------------

    def start_device(
        self,
        ram: GuestRam,
        queues: Sequence[DriverQueue],
        *,
        driver_features: int | None = None,
        use_mem_slots: bool | None = None,
    ) -> None:
        """Connection set-up and device start, as QEMU 10.2 does them for vhost-user-test-device-pci.

        ``driver_features`` defaults to everything the device offers (EVENT_IDX only if the first queue
        was built with ``event_idx``); memory goes by ADD_MEM_REG when CONFIGURE_MEM_SLOTS was negotiated,
        as QEMU does, unless ``use_mem_slots`` says otherwise.
        """
        self.negotiate(len(queues))
        offered = self.get_features() & ~VHOST_USER_F_PROTOCOL_FEATURES
        if driver_features is None:
            driver_features = offered
            if not queues or not queues[0].event_idx:
                driver_features &= ~VIRTIO_RING_F_EVENT_IDX
        self.start_rings(ram, queues, driver_features=driver_features, use_mem_slots=use_mem_slots)

    def start_rings(
        self,
        ram: GuestRam,
        queues: Sequence[DriverQueue],
        *,
        driver_features: int,
        use_mem_slots: bool | None = None,
        driver_ok_status: bool = False,
    ) -> None:
        """QEMU's ``vhost_dev_start``, in the order QEMU 10.2.2 sends it for vhost-user-test-device-pci.

        Observed from a real guest boot: SET_FEATURES, GET_STATUS + SET_STATUS(FEATURES_OK), ADD_MEM_REG,
        per ring NUM/BASE/ADDR/KICK/CALL, SET_VRING_ENABLE 1 for every ring, then SET_VRING_CALL again for
        every ring (``vub_start`` unmasking the notifiers). That device never sends DRIVER_OK through
        SET_STATUS; ``driver_ok_status`` adds it the way other vhost-user devices do.
        """
        self.set_features(driver_features | VHOST_USER_F_PROTOCOL_FEATURES)
        if self.protocol_features & ProtocolFeature.STATUS:
            self.add_status(VIRTIO_CONFIG_S_FEATURES_OK)
        if use_mem_slots is None:
            use_mem_slots = bool(self.protocol_features & ProtocolFeature.CONFIGURE_MEM_SLOTS)
        if use_mem_slots:
            self.add_mem_reg(ram)
        else:
            self.set_mem_table([ram])
        for index, queue in enumerate(queues):
            self.set_vring_num(index, queue.size)
            self.set_vring_base(index, queue.start_index & 0xFFFF)
            self.set_vring_addr(index, queue)
            self.set_vring_kick(index)
            self.set_vring_call(index)
        for index in range(len(queues)):
            self.set_vring_enable(index, True)
        for index in range(len(queues)):
            self.set_vring_call(index)
        if driver_ok_status and self.protocol_features & ProtocolFeature.STATUS:
            self.add_status(VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_DRIVER_OK)

    def stop_device(self, num_queues: int, *, reset_status: bool = True) -> list[int]:
        """QEMU's ``vhost_dev_stop``: SET_VRING_ENABLE 0, GET_VRING_BASE for every ring, then SET_STATUS 0
        (a device reset) when STATUS was negotiated. Returns the rings' next avail indices.

        QEMU 10.2.2's vhost-user-test-device-pci skips that SET_STATUS 0 (``vhost_user_reset_status``
        requires ``vq_index_end``, which the generic device never sets; seen on a real guest's shutdown):
        ``reset_status=False`` reproduces it exactly.
        """
        for index in range(num_queues):
            self.set_vring_enable(index, False)
        bases = [self.get_vring_base(index) for index in range(num_queues)]
        if reset_status and self.protocol_features & ProtocolFeature.STATUS:
            self.set_status(0)
        return bases

    def wait_config_changes(self, count: int, timeout: float | None = None) -> bool:
        """Wait until ``count`` CONFIG_CHANGE_MSG in total have come over the back-end channel."""
        if self.channel is None:
            raise FrontendError("no back-end channel: call set_backend_req_fd (or negotiate) first")
        return self.channel.wait_config_changes(count, self.timeout if timeout is None else timeout)

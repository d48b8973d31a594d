"""Fuzz target ``server``: whole vhost-user conversations over a real socket to a running server.

The server (:class:`~vhost_iommu.harness.background.RunningServer` serving
:class:`~vhost_iommu.virtio_iommu.VirtioIommuBackend`) runs on its own thread for the whole campaign, with a
well-behaved "bystander" front-end connected to it throughout. One execution connects, sends a random
sequence of messages (the ones a front-end sends to set a device up, with real fds: memfd guest RAM,
eventfds, a socketpair for the back-end channel; mixed with the ``codec`` target's hostile messages and
fds that are not what the request wants), writes requests (valid and hostile descriptor chains) into the
rings it set up and kicks them, then hangs up (half-close) and reads what is left.

Checked after each execution: everything the server sent on the socket is a valid stream of replies; the
server closes the connection within the time bound; its thread and
event loop are alive and no exception escaped a callback or was logged as unexpected; the bystander still
gets answers; the process has exactly the fds it had before, and no mapping of the guest RAM but our own.
"""

from __future__ import annotations

import array
import contextlib
import logging
import os
import socket
import struct
import tempfile
import time
from collections.abc import Hashable, Iterable

from vhost_iommu.abi import (
    VIRTIO_CONFIG_S_ACKNOWLEDGE,
    VIRTIO_CONFIG_S_DRIVER,
    VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK,
)
from vhost_iommu.device import Topology
from vhost_iommu.device.layout import (
    RequestType,
    encode_attach,
    encode_detach,
    encode_map,
    encode_probe,
    encode_unmap,
    writable_size,
)
from vhost_iommu.fuzz.codec import hostile_message
from vhost_iommu.fuzz.engine import Choices, FuzzFailure, FuzzTarget, Hang, Script, open_fd_count
from vhost_iommu.harness.background import RunningServer
from vhost_iommu.harness.guest_ram import GuestRam
from vhost_iommu.jit import warm_up as jit_warm_up
from vhost_iommu.protocol import (
    U64,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VIRTIO_CONFIG_S_NEEDS_RESET,
    ConfigSpace,
    Decoder,
    FramingError,
    FrontendRequest,
    MemoryRegion,
    MemoryTable,
    SingleMemoryRegion,
    Stream,
    VringAddress,
    VringFile,
    VringState,
    encode,
)
from vhost_iommu.server import new_event_loop
from vhost_iommu.server.handler import OFFERED_PROTOCOL_FEATURES
from vhost_iommu.virtio_iommu import VirtioIommuBackend
from vhost_iommu.virtqueue import DESC_STRUCT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE

__all__ = ["SETUP_MESSAGE_KINDS", "ServerTarget", "UnexpectedErrors", "send_message"]

RAM_SIZE = 1 << 20
RAM_NAME = "fuzz-server-ram"
QUEUE_SIZE = 16
# Fixed ring layout for the two queues (offsets in the RAM), buffers above.
RINGS = ((0x0000, 0x1000, 0x2000), (0x3000, 0x4000, 0x5000))
BUFFERS = 0x10000
F = FrontendRequest
#: The device status a driver writes as it brings the device up, step by step, and a broken device's.
_STATUSES = (
    0,
    VIRTIO_CONFIG_S_ACKNOWLEDGE,
    VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
    VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_ACKNOWLEDGE
    | VIRTIO_CONFIG_S_DRIVER
    | VIRTIO_CONFIG_S_FEATURES_OK
    | VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_NEEDS_RESET,
)
#: What one kick carries: a request of each type the device knows, or noise (the last).
_REQUEST_KINDS = (*RequestType, None)
SETUP_MESSAGE_KINDS = 20  # kinds of setup message (_setup_message)
_STEP_ACTIONS = 20  # a setup message below 9, a hostile one below 12, else a kick (_step)


class UnexpectedErrors(logging.Handler):
    """Collects log records that carry an exception: the server logs those for errors nobody expected.

    :meth:`install` also quiets the package's logger to errors while a campaign runs: every rejected
    message is logged as a warning, and millions of them would be the campaign's output."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []
        self._logger = logging.getLogger("vhost_iommu")
        self._saved_level = self._logger.level

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            self.records.append(record)

    def install(self) -> None:
        self._saved_level = self._logger.level
        self._logger.addHandler(self)
        self._logger.setLevel(logging.ERROR)

    def remove(self) -> None:
        self._logger.removeHandler(self)
        self._logger.setLevel(self._saved_level)

    def check(self, server: RunningServer) -> None:
        """Raise FuzzFailure for what was collected since the last check, and for exceptions that escaped
        a callback on ``server``'s loop."""
        if server.loop_errors:
            errors, server.loop_errors[:] = list(server.loop_errors), []
            raise FuzzFailure(f"exceptions escaped the server's callbacks: {errors}")
        if self.records:
            records, self.records[:] = list(self.records), []
            raise FuzzFailure(f"the server logged unexpected errors: {[r.getMessage() for r in records]}")


def send_message(sock: socket.socket, data: bytes, fds: list[int], received: bytearray) -> int | None:
    """Send one message with its fds (then closed here: the kernel gave the server its own copies) on a
    non-blocking socket, then add what the server sent so far to ``received``; the bytes sent, or None
    once the server hung up or stopped reading (either way the conversation is over)."""
    try:
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        sent = sock.sendmsg([data], ancillary)
    except (BrokenPipeError, ConnectionResetError, BlockingIOError):
        return None
    finally:
        for fd in fds:
            os.close(fd)
    with contextlib.suppress(BlockingIOError, ConnectionResetError):
        while chunk := sock.recv(65536):  # read as we go, or the socket fills
            received += chunk
    return sent


class ServerTarget(FuzzTarget):
    name = "server"
    description = "random well-formed and malformed vhost-user conversations over a socket to a live server"
    max_input = 4096

    def warm_up(self) -> None:
        # libuv opens a process-wide pipe with its first event loop and keeps it.
        new_event_loop().close()
        # A kernel compiled inside the server's thread (a fresh clone: numba's cache is empty) would hold
        # the first conversations for minutes and the campaign's end past the server's stop timeout.
        jit_warm_up()

    def setup(self) -> None:
        self._directory = tempfile.TemporaryDirectory(prefix="vhost-fuzz-")
        self.server = RunningServer(VirtioIommuBackend, os.path.join(self._directory.name, "sock"))
        self.ram = GuestRam(RAM_SIZE, name=RAM_NAME)
        # On a socket of its own: a socket serves one front-end at a time.
        self.bystander = self.server.connect(path=self.server.listen())
        self.bystander.negotiate(2)
        self.device_features = self.bystander.get_features() & ~VHOST_USER_F_PROTOCOL_FEATURES
        self.probe_size = Topology.default().probe_size  # the topology RunningServer's back-ends serve
        self.unexpected = UnexpectedErrors()
        self.unexpected.install()
        self.fds_before = self.server.call(open_fd_count)

    def teardown(self) -> None:
        self.unexpected.remove()
        self.bystander.close()
        self.server.stop()
        self.ram.close()
        self._directory.cleanup()

    # -- one conversation -----------------------------------------------------------------------------------

    def run(self, choices: Choices) -> Iterable[Hashable]:
        features: list[Hashable] = []
        self.ram.data[: BUFFERS + 0x10000] = 0
        mine: list[int] = []  # fds this execution keeps (kick eventfds, back-end channel ends)
        self._received = bytearray()  # everything the server sent on the main socket
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(self.server.path)
            sock.setblocking(False)
            steps = [] if choices.chance(96) else self._start_device(mine)
            for data, fds in steps:
                if send_message(sock, data, fds, self._received) is None:
                    break
            for _ in range(choices.between(1, 24)):
                if not self._step(choices, sock, mine, features):
                    features.append("closed by the server")
                    break
            features.append(("replies", min(self._hang_up(sock), 8)))
        finally:
            sock.close()
            for fd in mine:
                os.close(fd)
        self._check_server(features)
        return features

    def _step(self, choices: Choices, sock: socket.socket, mine: list[int], features: list[Hashable]) -> bool:
        """One message or one kick; False once the server has hung up."""
        action = choices.below(_STEP_ACTIONS)
        fds: list[int] = []
        if action < 9:
            data, fds = self._setup_message(choices, mine)
            features.append(("setup", struct.unpack_from("<I", data)[0]))
        elif action < 12:
            data, count = hostile_message(choices, Stream.FRONTEND_REQUESTS)
            fds = [self._any_fd(choices) for _ in range(count if choices.chance(200) else choices.below(4))]
            features.append(("hostile", struct.unpack_from("<I", data)[0] if len(data) >= 4 else -1))
        else:
            kind = self._write_request(choices)
            for fd in mine:
                with contextlib.suppress(OSError):
                    os.write(fd, (1).to_bytes(8, "little"))  # kick fds and channel ends alike
            features.append(("kick", kind))
            return True
        return send_message(sock, data, fds, self._received) is not None

    def _hang_up(self, sock: socket.socket) -> int:
        """End the conversation (half-close: the server sees the end of the stream), take every reply
        until the server closes its side, and check they form a valid reply stream; how many replies."""
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
        sock.settimeout(10)
        try:
            while chunk := sock.recv(65536):
                self._received += chunk
        except TimeoutError:
            raise Hang("the server did not close a connection whose front-end hung up") from None
        except ConnectionResetError:
            pass
        decoder = Decoder(Stream.BACKEND_REPLIES)
        decoder.feed(bytes(self._received))
        decoder.feed_eof()
        try:
            replies = decoder.messages()
        except FramingError as exc:
            raise FuzzFailure(f"the server sent a malformed reply stream: {exc}") from None
        finally:
            decoder.close()
        # (Which requests they answer is not checked: after noise the server frames the stream
        # differently from how it was written, so its "requests" are not the ones sent.)
        return len(replies)

    def _start_device(self, mine: list[int]) -> list[tuple[bytes, list[int]]]:
        """What QEMU sends to start the device with both rings running, so that later kicks reach it."""
        ram = self.ram
        region = MemoryRegion(ram.gpa_base, ram.size, ram.uva_base, 0)
        features = self.device_features | VHOST_USER_F_PROTOCOL_FEATURES
        steps: list[tuple[bytes, list[int]]] = [
            (encode(F.SET_FEATURES, U64(features)), []),
            (encode(F.SET_PROTOCOL_FEATURES, U64(int(OFFERED_PROTOCOL_FEATURES))), []),
            (encode(F.SET_OWNER), []),
            (encode(F.SET_MEM_TABLE, MemoryTable((region,))), [os.dup(ram.fd)]),
        ]
        for queue, (desc, avail, used) in enumerate(RINGS):
            uva = ram.uva_base
            kick = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            mine.append(os.dup(kick))
            steps += [
                (encode(F.SET_VRING_NUM, VringState(queue, QUEUE_SIZE)), []),
                (
                    encode(F.SET_VRING_ADDR, VringAddress(queue, 0, uva + desc, uva + used, uva + avail, 0)),
                    [],
                ),
                (encode(F.SET_VRING_BASE, VringState(queue, 0)), []),
                (encode(F.SET_VRING_CALL, VringFile(queue, True)), [os.eventfd(0, os.EFD_CLOEXEC)]),
                (encode(F.SET_VRING_KICK, VringFile(queue, True)), [kick]),
                (encode(F.SET_VRING_ENABLE, VringState(queue, 1)), []),
            ]
        return steps

    def _any_fd(self, choices: Choices) -> int:
        kind = choices.below(4)
        if kind == 0:
            return os.dup(self.ram.fd)
        if kind == 1:
            left, right = socket.socketpair()
            right.close()
            return left.detach()
        if kind == 2:
            return os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
        return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)

    def _setup_message(self, choices: Choices, mine: list[int]) -> tuple[bytes, list[int]]:
        """A request a real front-end sends, with plausible (sometimes bent) values and the right fds."""
        queue = choices.below(2) if choices.chance(240) else choices.below(256)
        need_reply = choices.chance(128)
        ram = self.ram
        region = MemoryRegion(ram.gpa_base, ram.size, ram.uva_base, 0)
        kind = choices.below(SETUP_MESSAGE_KINDS)
        if kind == 0:
            return encode(F.GET_FEATURES), []
        if kind == 1:
            offered = self.device_features | VHOST_USER_F_PROTOCOL_FEATURES
            value = offered if choices.chance(200) else choices.u64()
            return encode(F.SET_FEATURES, U64(value), need_reply=need_reply), []
        if kind == 2:
            value = int(OFFERED_PROTOCOL_FEATURES) if choices.chance(200) else choices.u64()
            return encode(F.SET_PROTOCOL_FEATURES, U64(value), need_reply=need_reply), []
        if kind == 3:
            return encode(F.SET_OWNER, need_reply=need_reply), []
        if kind == 4:
            return encode(F.SET_MEM_TABLE, MemoryTable((region,)), need_reply=need_reply), [os.dup(ram.fd)]
        if kind == 5:
            return encode(F.ADD_MEM_REG, SingleMemoryRegion(region), need_reply=need_reply), [os.dup(ram.fd)]
        if kind == 6:
            return encode(F.REM_MEM_REG, SingleMemoryRegion(region), need_reply=need_reply), []
        if kind == 7:
            size = QUEUE_SIZE if choices.chance(220) else choices.bits(32)
            return encode(F.SET_VRING_NUM, VringState(queue, size), need_reply=need_reply), []
        if kind == 8:
            desc, avail, used = RINGS[queue % 2]
            uva = ram.uva_base
            address = VringAddress(queue, 0, uva + desc, uva + used, uva + avail, 0)
            return encode(F.SET_VRING_ADDR, address, need_reply=need_reply), []
        if kind == 9:
            base = 0 if choices.chance(200) else choices.bits(16)
            return encode(F.SET_VRING_BASE, VringState(queue, base), need_reply=need_reply), []
        if kind in (10, 11, 12):
            code = (F.SET_VRING_KICK, F.SET_VRING_CALL, F.SET_VRING_ERR)[kind - 10]
            fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            if code is F.SET_VRING_KICK:
                mine.append(os.dup(fd))
            return encode(code, VringFile(queue % 256, True), need_reply=need_reply), [fd]
        if kind == 13:
            return encode(F.SET_VRING_ENABLE, VringState(queue, choices.below(2)), need_reply=need_reply), []
        if kind == 14:
            return encode(F.GET_VRING_BASE, VringState(queue, 0)), []
        if kind == 15:
            offset, size = choices.below(48), choices.below(48)
            return encode(F.GET_CONFIG, ConfigSpace(offset, 0, bytes(size))), []
        if kind == 16:
            offset = choices.below(44)
            data = choices.take(choices.between(1, 4))
            return encode(
                F.SET_CONFIG, ConfigSpace(offset, choices.below(3), data), need_reply=need_reply
            ), []
        if kind == 17:
            value = choices.pick((*_STATUSES, choices.bits(8)))
            return encode(F.SET_STATUS, U64(value), need_reply=need_reply), []
        if kind == 18:
            return encode(choices.pick((F.GET_STATUS, F.RESET_DEVICE, F.GET_QUEUE_NUM))), []
        left, right = socket.socketpair()
        mine.append(right.detach())
        return encode(F.SET_BACKEND_REQ_FD, need_reply=need_reply), [left.detach()]

    def _write_request(self, choices: Choices) -> str:
        """Make a chain available on one of the rings: a request and its tail, or hostile descriptors;
        what the request was."""
        desc, avail, _used = RINGS[choices.below(2)]
        head = choices.below(QUEUE_SIZE)
        usual_writable, usual_descriptors, one_more = (
            choices.chance(200),
            choices.chance(220),
            choices.chance(230),
        )
        kind = choices.pick(_REQUEST_KINDS)
        domain, endpoint = choices.between(1, 4), 0x20 + choices.below(4)
        if kind == RequestType.ATTACH:
            request = encode_attach(domain, endpoint)
        elif kind == RequestType.DETACH:
            request = encode_detach(domain, endpoint)
        elif kind == RequestType.MAP:
            start = 0x1000 * choices.below(16)
            request = encode_map(domain, start, start + 0x1000 * choices.between(1, 4) - 1, 0)
        elif kind == RequestType.UNMAP:
            request = encode_unmap(domain, 0, choices.u64())
        elif kind == RequestType.PROBE:
            request = encode_probe(endpoint)
        else:
            request = choices.take(choices.between(1, 80))
        gpa = self.ram.gpa_base
        buffer = BUFFERS + 0x100 * head
        self.ram.write(gpa + buffer, request)
        writable = writable_size(request[0], self.probe_size) if usual_writable else choices.between(1, 0x80)
        if usual_descriptors:
            first = (gpa + buffer, len(request), VIRTQ_DESC_F_NEXT, (head + 1) % QUEUE_SIZE)
            second = (gpa + buffer + 0x80, writable, VIRTQ_DESC_F_WRITE, 0)
        else:
            first = (choices.u64(), choices.bits(32), choices.bits(16), choices.bits(16))
            second = (choices.u64(), choices.bits(32), choices.bits(16), choices.bits(16))
        self.ram.write(gpa + desc + DESC_STRUCT.size * head, DESC_STRUCT.pack(*first))
        self.ram.write(gpa + desc + DESC_STRUCT.size * ((head + 1) % QUEUE_SIZE), DESC_STRUCT.pack(*second))
        # The available ring: flags, idx, then the ring of heads (u16 each).
        index = struct.unpack_from("<H", self.ram.read(gpa + avail + 2, 2))[0]
        self.ram.write(gpa + avail + 4 + 2 * (index % QUEUE_SIZE), struct.pack("<H", head))
        bump = 1 if one_more else choices.bits(16)
        self.ram.write(gpa + avail + 2, struct.pack("<H", (index + bump) & 0xFFFF))
        return kind.name if kind is not None else "noise"

    def seeds(self) -> list[bytes]:
        """An empty conversation; then, on a started device, each kind of setup message once, and each
        request type once after an ATTACH of its domain (the rest of each execution is the input's own)."""
        seeds = [b""]
        for kind in range(SETUP_MESSAGE_KINDS):
            script = Script().chance(96, False).between(1, 24, 1).below(_STEP_ACTIONS, 0)
            seeds.append(
                script.chance(240, True).below(2, 0).chance(128, True).below(SETUP_MESSAGE_KINDS, kind).data
            )
        for request in _REQUEST_KINDS:
            script = Script().chance(96, False).between(1, 24, 2)
            for step, head in ((RequestType.ATTACH, 0), (request, 2)):
                script.below(_STEP_ACTIONS, _STEP_ACTIONS - 1).below(2, 0).below(QUEUE_SIZE, head)
                script.chance(200, True).chance(220, True).chance(230, True).pick(_REQUEST_KINDS, step)
                script.between(1, 4, 1).below(4, 0)  # domain 1, endpoint 0x20
            seeds.append(script.data)
        return seeds

    # -- after the conversation -----------------------------------------------------------------------------

    def _check_server(self, features: list[Hashable]) -> None:
        deadline = time.monotonic() + 10
        while self.server.connection_count() > 1:  # the bystander stays
            if time.monotonic() > deadline:
                raise Hang("the server did not close a connection whose front-end hung up")
            time.sleep(0.0005)
        self.unexpected.check(self.server)
        try:
            if self.bystander.get_features() == 0:
                raise FuzzFailure("the bystander connection got no features")
        except OSError as exc:
            raise FuzzFailure(f"the bystander connection stopped working: {exc}") from None
        # What the conversation got the device to do (the harness keeps every back-end: drop them).
        for backend in self.server.backends[1:]:
            device = getattr(backend, "device", None)
            counts = getattr(device, "request_counts", None)
            if counts is not None:
                features.append(("device requests", min(sum(counts), 4)))
        del self.server.backends[1:]
        # Counted on the server's loop: its own callbacks (the load governor reads /proc/stat four times
        # a second) open files for a moment, which a count from this thread can catch.
        fds = self.server.call(open_fd_count)
        if fds != self.fds_before:
            raise FuzzFailure(f"{fds - self.fds_before:+d} fds after a connection ended")
        features.append("served")

    def check_leaks(self) -> str | None:
        with open("/proc/self/maps") as maps:
            mappings = [line for line in maps if f"memfd:{RAM_NAME}" in line]
        # Our own GuestRam maps it once; every mapping the server made must be gone with its connections.
        return f"{len(mappings) - 1} server mappings of guest RAM left" if len(mappings) > 1 else None

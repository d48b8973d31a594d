"""Fuzz target ``vfio-server``: whole vfio-user conversations over a real socket to a live endpoint server
(issue 11), whose DMA engine really runs through a guest's virtio-iommu.

For the whole campaign a :class:`~vhost_iommu.harness.background.RunningServer` serves the default
topology's vhost-user device and its ``[[devices]]`` (the DMA engine) over vfio-user, on its own thread.
Two guests are connected over vhost-user, each with its RAM (a memfd) and its virtio-iommu driver
(:class:`~vhost_iommu.harness.iommu_driver.IommuDriver`), each with the engine's endpoint attached to a
domain that maps a few IOVA ranges onto a "canvas" of its RAM (read-write, read-only, write-only, and one
range past the end of the RAM):

* the *paired* guest: the fuzzing client maps its RAM's memfd (DMA_MAP), so the engine's DMA goes through
  this guest's IOMMU;
* the *bystander* guest: the client never has its memfd, so nothing the client does may reach it.

A third memfd, the *stranger* RAM, no guest has: a client that maps only it is unpaired (the engine
refuses its DMA), one that maps it beside the paired guest's RAM (past its end) gets DMA through the
paired IOMMU into it.

One execution connects and sends, often after VERSION (or not), a DMA_MAP of the guest's RAM and Bus
Master: DMA_MAP/UNMAP of the three memfds (whole, pieces, overlapping, past the file's end, fd-less, an
fd that is not a file), region reads and writes of configuration space and BAR0 at any offset and size,
the engine programmed (SRC, DST, LENGTH, PATTERN, OP with values near the IOMMU's ranges) and its
DOORBELL rung, SET_IRQS with eventfds and without, DEVICE_RESET, info requests, a second VERSION, the
``vfio-codec`` target's hostile messages with their eventfds, noise, and sometimes a message cut short
before the client goes away; then the client hangs up (half-close, or an abrupt close).

Checked after each execution: what the server sent is a stream of whole replies; it closed the
connection; no exception escaped its callbacks or was logged as unexpected; a fresh client gets VERSION
and the engine's MAGIC; both guests' IOMMUs answer a request; every fault event the paired guest got is
the engine's endpoint's and the bystander got none; no byte of the canvases and of the stranger RAM
changed but in pages the paired IOMMU maps writable, as the client's own DMA map places them (the RAM is
refilled with its pattern after each execution); the process has exactly its fds from before; and
(every ``--leak-every``) no mapping of the three memfds but those of the campaign's set-up.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import socket
import struct
import tempfile
import time
from collections.abc import Callable, Hashable, Iterable

import numpy as np

from vhost_iommu.device import Status, Topology
from vhost_iommu.device.layout import (
    FAULT_SIZE,
    MAP_F_READ,
    MAP_F_WRITE,
    decode_fault,
    encode_attach,
    encode_map,
    encode_unmap,
)
from vhost_iommu.endpoints.dma_engine import (
    BAR0_SIZE,
    MAGIC,
    MAX_LENGTH,
    MSIX,
    R_DOORBELL,
    R_DST,
    R_ERROR,
    R_IRQ_ENABLE,
    R_LENGTH,
    R_MAGIC,
    R_OP,
    R_PATTERN,
    R_SRC,
    R_STATUS,
    DmaEngine,
    Op,
)
from vhost_iommu.fuzz.engine import Choices, FuzzFailure, FuzzTarget, Hang, Script, open_fd_count
from vhost_iommu.fuzz.server import UnexpectedErrors, send_message
from vhost_iommu.fuzz.vfio_codec import hostile_message
from vhost_iommu.harness.background import RunningServer
from vhost_iommu.harness.guest_ram import GuestRam
from vhost_iommu.harness.iommu_driver import IommuDriver
from vhost_iommu.harness.vfio_client import VfioUserClient, VfioUserRequestFailed
from vhost_iommu.jit import warm_up as jit_warm_up
from vhost_iommu.pci.function import (
    COMMAND,
    COMMAND_BUS_MASTER,
    COMMAND_MEMORY,
    CONFIG_SPACE_SIZE,
    MSIX_CAPABILITY_OFFSET,
)
from vhost_iommu.server import new_event_loop
from vhost_iommu.vfio_user import (
    DeviceGetInfo,
    DeviceReset,
    DmaMap,
    DmaUnmap,
    GetIrqInfo,
    GetRegionInfo,
    MessageError,
    RegionRead,
    RegionWrite,
    Request,
    SetIrqs,
    Version,
    encode_request,
)
from vhost_iommu.vfio_user import constants as vu
from vhost_iommu.vfio_user.codec import HEADER_LAYOUT
from vhost_iommu.virtio_iommu import VirtioIommuBackend

__all__ = ["STEP_KINDS", "VfioServerTarget"]

PAGE = vu.DMA_PAGE_SIZE
RAM_SIZE = 1 << 20
STRANGER_SIZE = 64 * PAGE
GUEST_NAME, BYSTANDER_NAME, STRANGER_NAME = "fuzz-vfio-guest", "fuzz-vfio-bystander", "fuzz-vfio-stranger"
CANVAS_PAGES = 16
DOMAIN = 1
EVENT_BUFFERS = 32
#: An IOVA neither guest maps: an UNMAP of it is the request each guest's IOMMU must still answer.
PROBE_IOVA = 0x7000_0000
#: The guest-physical address of the IOMMU range that points past the guest's RAM (the stranger RAM, when
#: the client maps it there).
BEYOND_RAM = RAM_SIZE + 4 * PAGE
WAIT = 10.0
#: (IOVA, first canvas page or None for BEYOND_RAM, pages, MAP flags) of each guest's domain.
_IOMMU_RANGES: tuple[tuple[int, int | None, int, int], ...] = (
    (0x10_0000, 0, 4, MAP_F_READ | MAP_F_WRITE),
    (0x20_0000, 4, 2, MAP_F_READ),
    (0x30_0000, 8, 2, MAP_F_WRITE),
    (0x40_0000, 12, 1, MAP_F_READ | MAP_F_WRITE),
    (0x50_0000, None, 2, MAP_F_READ | MAP_F_WRITE),
)
#: Where the engine's addresses and lengths are interesting: the ends of each range, the longest operation.
_IOMMU_EDGES = tuple(
    edge for iova, _page, pages, _flags in _IOMMU_RANGES for edge in (iova, iova + pages * PAGE)
)
_IOMMU_STARTS = tuple(iova for iova, *_rest in _IOMMU_RANGES)
_LENGTHS = (1, PAGE, 2 * PAGE, 4 * PAGE, MAX_LENGTH, MAX_LENGTH + 1)
#: The engine's 64-bit registers and the 32-bit ones a driver writes (offsets: the engine's own).
_WIDE_REGISTERS = (R_SRC, R_DST, R_LENGTH, R_PATTERN)
_REGISTER_OFFSETS = (*_WIDE_REGISTERS, R_OP, R_DOORBELL, R_STATUS, R_ERROR, R_IRQ_ENABLE, R_MAGIC)
#: Where BAR0 accesses go: the registers, the MSI-X table and PBA (QEMU's to emulate, here only bytes), the
#: end of the BAR.
_BAR0_ANCHORS = (*_REGISTER_OFFSETS, MSIX.table_offset, MSIX.pba_offset, BAR0_SIZE)
#: What one step of a conversation does (_step); the prologue's messages are steps too.
STEP_KINDS = (
    "dma-map",
    "dma-unmap",
    "engine-run",
    "bar-write",
    "region-read",
    "config-write",
    "set-irqs",
    "info",
    # Rarer: they undo the set-up (reset clears Bus Master and the registers) or usually end the
    # conversation (the server closes it, or the client goes away).
    "reset",
    "hostile",
    "version",
    "cut-short",
)
_RARE_STEPS = 4
_RARE_CHANCE = 32  # per 256 steps
#: Among the others, the engine is run this many times as often as each other step is taken.
_ENGINE_WEIGHT = 3
_COMMON_STEPS = (*STEP_KINDS[:-_RARE_STEPS], *("engine-run",) * (_ENGINE_WEIGHT - 1))
_DMA_MAP_KINDS = ("guest-whole", "guest-piece", "stranger", "fd-less", "not-a-file")


@dataclasses.dataclass(frozen=True)
class _SentMap:
    """A DMA_MAP of one of our memfds the client sent (accepted or not: a superset of what the server
    mapped), by the file's offset."""

    ram: GuestRam
    address: int
    offset: int
    size: int


class _Guest:
    """A vhost-user guest with the engine's endpoint attached to a domain mapping a few ranges of its
    canvas (and past its RAM), its canvas filled with a pattern, eventq buffers posted."""

    def __init__(self, server: RunningServer, path: str, name: str, endpoint: int, pattern: bytes) -> None:
        self.ram = GuestRam(RAM_SIZE, name=name)
        try:
            self.driver = IommuDriver(
                server.connect(WAIT, path=path), self.ram, own_frontend=True, timeout=WAIT
            )
        except BaseException:
            self.ram.close()
            raise
        self.canvas = self.ram.alloc(CANVAS_PAGES * PAGE, PAGE)
        self.pattern = pattern
        self.ram.write(self.canvas, pattern)
        requests = [encode_attach(DOMAIN, endpoint)]
        for iova, page, pages, flags in _IOMMU_RANGES:
            gpa = BEYOND_RAM if page is None else self.canvas + page * PAGE
            requests.append(encode_map(DOMAIN, iova, iova + pages * PAGE - 1, gpa, flags))
        statuses = self.driver.statuses(requests)
        if statuses != [Status.OK] * len(requests):
            raise RuntimeError(f"setting up the guest's domain: {statuses}")
        self.driver.post_event_buffers(EVENT_BUFFERS)

    def writable_gpa_pages(self) -> list[int]:
        """The guest-physical pages its IOMMU lets the engine write."""
        return [
            (BEYOND_RAM if page is None else self.canvas + page * PAGE) + n * PAGE
            for _iova, page, pages, flags in _IOMMU_RANGES
            if flags & MAP_F_WRITE
            for n in range(pages)
        ]

    def still_answers(self) -> None:
        try:
            status = self.driver.status(encode_unmap(DOMAIN, PROBE_IOVA, PROBE_IOVA + PAGE - 1))
        except (AssertionError, OSError) as exc:
            raise FuzzFailure(f"{self.ram!r}: its IOMMU no longer answers: {exc}") from None
        if status != Status.OK:
            raise FuzzFailure(f"{self.ram!r}: an UNMAP of nothing answered {status!r}")

    def take_events(self) -> list[bytes]:
        """The fault events written into its eventq since the last call; their buffers posted again."""
        used = self.driver.events.used_with_data()
        if used:
            self.driver.post_event_buffers(len(used))
        return [data for _head, _length, data in used]

    def close(self) -> None:
        self.driver.close()
        self.ram.close()


class VfioServerTarget(FuzzTarget):
    name = "vfio-server"
    description = (
        "random well-formed and malformed vfio-user conversations to a live DMA engine over an IOMMU"
    )
    max_input = 4096

    def warm_up(self) -> None:
        # libuv opens a process-wide pipe with its first event loop and keeps it.
        new_event_loop().close()
        # Kernels compiled before the live server starts (see ServerTarget.warm_up).
        jit_warm_up()

    def setup(self) -> None:
        self._directory = tempfile.TemporaryDirectory(prefix="vfio-fuzz-")
        topology = Topology.default()
        self.server = RunningServer(
            lambda: VirtioIommuBackend(topology), os.path.join(self._directory.name, "sock")
        )
        endpoints = self.server.serve_devices(topology, self._directory.name)
        self.served = endpoints.endpoints[0]
        rng = random.Random(11)
        pattern = rng.randbytes(CANVAS_PAGES * PAGE)
        self.guest = _Guest(self.server, self.server.path, GUEST_NAME, self.served.endpoint, pattern)
        self.bystander = _Guest(
            self.server, self.server.listen(), BYSTANDER_NAME, self.served.endpoint, pattern
        )
        self.stranger = GuestRam(STRANGER_SIZE, name=STRANGER_NAME)
        self.stranger_pattern = rng.randbytes(STRANGER_SIZE)
        self.stranger.write(0, self.stranger_pattern)
        self.unexpected = UnexpectedErrors()
        self.unexpected.install()
        engine = self.served.device
        assert isinstance(engine, DmaEngine)  # the default topology's device
        self.engine = engine
        self._engine_counters = dataclasses.replace(engine.counters)
        self.fds_before = self.server.call(open_fd_count)
        self.mappings_before = self._mappings()

    def teardown(self) -> None:
        self.unexpected.remove()
        self.guest.close()
        self.bystander.close()
        self.stranger.close()
        self.server.stop()
        self._directory.cleanup()

    # -- one conversation -----------------------------------------------------------------------------------

    def run(self, choices: Choices) -> Iterable[Hashable]:
        features: list[Hashable] = []
        self._sent: list[_SentMap] = []
        self._received = bytearray()
        self._msg_id = 0
        # The engine outlives its clients (as the protocol asks): from power-on values each time, or an
        # execution would depend on the ones before it and a finding would not replay on its own.
        self.server.call(self.served.device.reset)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(self.served.path)
            sock.setblocking(False)
            open_ = self._converse(choices, sock, features)
            if open_ and choices.chance(32):
                features.append("abrupt close")  # no half-close: the server may find the socket reset
            elif open_:
                features += self._hang_up(sock)
        finally:
            sock.close()
        self._check_server(features)
        return features

    def _converse(self, choices: Choices, sock: socket.socket, features: list[Hashable]) -> bool:
        """The prologue and the steps; False once the conversation ended (the server hung up, or a message
        was cut short)."""
        prologue = []
        if choices.chance(224):
            prologue.append(("version", self._version(choices)))
        if choices.chance(200):
            guest = self.guest.ram
            prologue.append(("dma-map", self._dma_map_message(guest, 0, 0, guest.size, vu.DMA_MAP_FLAGS)))
        if choices.chance(200):
            bus_master = struct.pack("<H", COMMAND_MEMORY | COMMAND_BUS_MASTER)
            prologue.append(
                ("config-write", self._encode(RegionWrite(self._id(), _CONFIG, COMMAND, bus_master)))
            )
        for kind, (data, fds) in prologue:
            features.append(("prologue", kind))
            if not self._send(sock, data, fds):
                features.append("closed by the server")
                return False
        for _ in range(choices.between(1, 24)):
            kind = _pick_step(choices)
            features.append(("step", kind))
            for data, fds in self._step(choices, kind):
                if kind == "cut-short":
                    with contextlib.suppress(OSError):
                        sock.send(data[: choices.below(len(data))])
                    for fd in fds:
                        os.close(fd)
                    return False
                if not self._send(sock, data, fds):
                    features.append("closed by the server")
                    return False
        return True

    def _step(self, choices: Choices, kind: str) -> list[tuple[bytes, list[int]]]:
        """The messages of one step of ``kind`` (most are one message)."""
        if kind == "dma-map":
            return [self._random_dma_map(choices)]
        if kind == "dma-unmap":
            return [self._dma_unmap(choices)]
        if kind == "engine-run":
            return self._engine_run(choices)
        if kind == "bar-write":
            offset = choices.near(_BAR0_ANCHORS, 8, 16) if choices.chance(224) else choices.near((BAR0_SIZE,))
            size = choices.pick((1, 2, 4, 8)) if choices.chance(224) else choices.between(1, 64)
            region = (
                vu.VFIO_PCI_BAR0_REGION_INDEX
                if choices.chance(224)
                else choices.below(vu.VFIO_PCI_NUM_REGIONS)
            )
            return [self._region_write(choices, region, offset, choices.take(size))]
        if kind == "region-read":
            region = choices.pick(
                (vu.VFIO_PCI_BAR0_REGION_INDEX, _CONFIG, choices.below(vu.VFIO_PCI_NUM_REGIONS))
            )
            anchors = (0, COMMAND, MSIX_CAPABILITY_OFFSET, CONFIG_SPACE_SIZE, *_BAR0_ANCHORS)
            offset = choices.near(anchors, 8, 16)
            size = choices.pick((1, 2, 4, 8)) if choices.chance(192) else choices.between(1, 4096)
            return [self._encode(RegionRead(self._id(), region, offset, size))]
        if kind == "config-write":
            offset = (
                COMMAND
                if choices.chance(128)
                else choices.near((0, MSIX_CAPABILITY_OFFSET, CONFIG_SPACE_SIZE), 16, 16)
            )
            data = bytearray(
                choices.take(choices.pick((1, 2, 4)) if choices.chance(224) else choices.between(1, 300))
            )
            if offset == COMMAND and choices.chance(160):  # a driver mostly keeps DMA on
                data[0] |= COMMAND_MEMORY | COMMAND_BUS_MASTER
            return [self._region_write(choices, _CONFIG, offset, bytes(data))]
        if kind == "set-irqs":
            return [self._set_irqs(choices)]
        if kind == "reset":
            return [self._encode(DeviceReset(self._id(), choices.chance(64)))]
        if kind == "info":
            what = choices.below(3)
            argsz = choices.pick((0, 16, 32, 64, choices.bits(32)))
            builders: tuple[Callable[[], Request], ...] = (
                lambda: DeviceGetInfo(self._id(), max(argsz, vu.DEVICE_INFO_SIZE)),
                lambda: GetRegionInfo(
                    self._id(), max(argsz, vu.REGION_INFO_SIZE), choices.below(vu.VFIO_PCI_NUM_REGIONS)
                ),
                lambda: GetIrqInfo(
                    self._id(), max(argsz, vu.IRQ_INFO_SIZE), choices.below(vu.VFIO_PCI_NUM_IRQS)
                ),
            )
            return [self._encode(builders[what]())]
        if kind == "hostile":
            return [hostile_message(choices)]
        if kind == "version":
            return [self._version(choices)]
        # cut-short: any of the messages above, of which only a part is sent
        return self._step(choices, choices.pick(STEP_KINDS[:-1]))

    # -- messages -------------------------------------------------------------------------------------------

    def _id(self) -> int:
        self._msg_id = (self._msg_id + 1) & 0xFFFF
        return self._msg_id

    @staticmethod
    def _encode(request: Request) -> tuple[bytes, list[int]]:
        data, fds = encode_request(request)
        return data, list(fds)

    def _version(self, choices: Choices) -> tuple[bytes, list[int]]:
        capabilities: dict[str, object] = (
            {vu.CAP_MAX_MSG_FDS: vu.MAX_FDS_PER_MESSAGE} if choices.chance(200) else {}
        )
        return self._encode(Version(self._id(), vu.VERSION_MAJOR, vu.VERSION_MINOR, capabilities))

    def _dma_map_message(
        self, ram: GuestRam | None, address: int, offset: int, size: int, flags: int
    ) -> tuple[bytes, list[int]]:
        """A DMA_MAP of ``ram``'s memfd (None: fd-less), recorded for the DMA oracle."""
        if ram is not None:
            self._sent.append(_SentMap(ram, address, offset, size))
        fd = None if ram is None else ram.dup_fd()
        try:
            return self._encode(DmaMap(self._id(), flags, offset, address, size, fd))
        except BaseException:
            if fd is not None:
                os.close(fd)
            raise

    def _random_dma_map(self, choices: Choices) -> tuple[bytes, list[int]]:
        kind = choices.pick(_DMA_MAP_KINDS)
        flags = vu.DMA_MAP_FLAGS if choices.chance(200) else choices.between(1, vu.DMA_MAP_FLAGS)
        pages = (1, CANVAS_PAGES, RAM_SIZE // PAGE, STRANGER_SIZE // PAGE)
        guest = self.guest
        if kind == "guest-whole":  # at its guest-physical address: only the IOMMU's ranges move data
            size = RAM_SIZE if choices.chance(192) else PAGE * choices.near(pages, 2, 20) or RAM_SIZE
            return self._dma_map_message(guest.ram, guest.ram.gpa_base, 0, size, flags)
        if kind == "guest-piece":  # canvas pages anywhere: the engine then writes them at other addresses
            first = choices.below(CANVAS_PAGES)
            count = choices.between(1, CANVAS_PAGES - first)
            address = PAGE * choices.near([gpa // PAGE for gpa in guest.writable_gpa_pages()], 4, 20)
            return self._dma_map_message(guest.ram, address, guest.canvas + first * PAGE, count * PAGE, flags)
        if kind == "stranger":
            address = choices.pick((RAM_SIZE, 0, PAGE * choices.bits(20)))
            offset = 0 if choices.chance(192) else PAGE * choices.near(pages, 2, 8)
            size = STRANGER_SIZE if choices.chance(160) else PAGE * (choices.near(pages, 2, 8) or 1)
            return self._dma_map_message(self.stranger, address, offset, size, flags)
        address = PAGE * choices.near((0, BEYOND_RAM // PAGE, RAM_SIZE // PAGE), 8, 20)
        size = PAGE * choices.between(1, 32)
        if kind == "fd-less":
            return self._dma_map_message(None, address, 0, size, flags)
        fd = os.eventfd(0, os.EFD_CLOEXEC)  # not a file: refused
        return self._encode(DmaMap(self._id(), flags, 0, address, size, fd))

    def _dma_unmap(self, choices: Choices) -> tuple[bytes, list[int]]:
        if choices.chance(32):
            return self._encode(DmaUnmap(self._id(), vu.DMA_UNMAP_FLAG_ALL, 0, 0, choices.chance(32)))
        if self._sent and choices.chance(200):
            sent = choices.pick(self._sent)
            address, size = sent.address, sent.size
        else:
            address, size = PAGE * choices.bits(20), PAGE * choices.between(1, 256)
        return self._encode(DmaUnmap(self._id(), 0, address, size, choices.chance(32)))

    def _region_write(
        self, choices: Choices, region: int, offset: int, data: bytes
    ) -> tuple[bytes, list[int]]:
        offset %= 1 << 64
        if offset + len(data) > 1 << 64:
            offset = (1 << 64) - len(data)
        return self._encode(RegionWrite(self._id(), region, offset, data, choices.chance(128)))

    def _engine_run(self, choices: Choices) -> list[tuple[bytes, list[int]]]:
        """Program the engine's registers with values near the IOMMU's ranges and ring its doorbell (some
        registers left as they were, some written in pieces)."""
        values = {
            R_SRC: self._iova(choices),
            R_DST: self._iova(choices),
            R_LENGTH: choices.between(1, 5 * PAGE) if choices.chance(160) else choices.near(_LENGTHS, 64),
            R_PATTERN: choices.bits(64),
            R_OP: choices.pick(tuple(Op)) if choices.chance(224) else choices.pick((0, choices.bits(32))),
            R_IRQ_ENABLE: choices.below(4),
        }
        messages = []
        for register, value in values.items():
            if choices.chance(32):
                continue
            width = 8 if register in _WIDE_REGISTERS else 4
            data = value.to_bytes(width, "little")
            if choices.chance(16):  # two halves
                half = width // 2
                messages.append(self._region_write(choices, 0, register, data[:half]))
                messages.append(self._region_write(choices, 0, register + half, data[half:]))
            else:
                messages.append(self._region_write(choices, 0, register, data))
        doorbell = choices.bits(32).to_bytes(4, "little")
        messages.append(self._region_write(choices, 0, R_DOORBELL, doorbell))
        return messages

    @staticmethod
    def _iova(choices: Choices) -> int:
        """Mostly at or near the start of one of the IOMMU's ranges, sometimes near either end."""
        return choices.near(_IOMMU_STARTS if choices.chance(192) else _IOMMU_EDGES, 2 * PAGE)

    def _set_irqs(self, choices: Choices) -> tuple[bytes, list[int]]:
        index = vu.VFIO_PCI_MSIX_IRQ_INDEX if choices.chance(192) else choices.below(vu.VFIO_PCI_NUM_IRQS)
        trigger = vu.IRQ_SET_ACTION_TRIGGER
        form = choices.below(4)
        if form == 0:  # every vector of the index off
            return self._encode(SetIrqs(self._id(), vu.IRQ_SET_DATA_NONE | trigger, index, 0, 0))
        if choices.chance(192):  # vectors the engine's MSI-X table has
            start = choices.below(MSIX.vectors)
            count = choices.between(1, MSIX.vectors - start)
        else:
            start, count = choices.below(MSIX.vectors + 2), choices.between(1, 3)
        if form == 1:  # fire them (DATA_NONE with a count)
            return self._encode(SetIrqs(self._id(), vu.IRQ_SET_DATA_NONE | trigger, index, start, count))
        # eventfds for them (the engine signals its completions there), or none (taken away)
        fds = tuple(os.eventfd(0, os.EFD_CLOEXEC) for _ in range(count)) if form == 2 else ()
        try:
            return self._encode(
                SetIrqs(self._id(), vu.IRQ_SET_DATA_EVENTFD | trigger, index, start, count, fds)
            )
        except MessageError:
            for fd in fds:
                os.close(fd)
            raise

    # -- the socket -----------------------------------------------------------------------------------------

    def _send(self, sock: socket.socket, data: bytes, fds: list[int]) -> bool:
        """Whether the whole message went (a part of one ends the conversation as a cut-short does)."""
        return send_message(sock, data, fds, self._received) == len(data)

    def _hang_up(self, sock: socket.socket) -> list[Hashable]:
        """Half-close, take every reply until the server closes its side, and check they are whole replies;
        (command, error) of each, as features."""
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
        sock.settimeout(WAIT)
        try:
            while chunk := sock.recv(65536):
                self._received += chunk
        except TimeoutError:
            raise Hang("the server did not close a connection whose client hung up") from None
        except ConnectionResetError:
            pass
        features: list[Hashable] = []
        data, at = bytes(self._received), 0
        while at < len(data):
            if len(data) - at < HEADER_LAYOUT.size:
                raise FuzzFailure(f"the server's replies end in {len(data) - at} bytes of a header")
            _msg_id, command, size, flags, error = HEADER_LAYOUT.unpack_from(data, at)
            if (
                flags & vu.FLAG_TYPE_MASK != vu.TYPE_REPLY
                or size < HEADER_LAYOUT.size
                or at + size > len(data)
            ):
                raise FuzzFailure(
                    f"the server sent a malformed reply: {data[at : at + 16].hex()} of {len(data) - at} bytes"
                )
            features.append(("reply", command, error))
            at += size
        return features

    # -- after the conversation -----------------------------------------------------------------------------

    def _wait_for_no_client(self) -> None:
        deadline = time.monotonic() + WAIT
        while self.server.call(lambda: self.served.connection) is not None:
            if time.monotonic() > deadline:
                raise Hang("the server did not close a connection whose client went away")
            time.sleep(0.0005)

    def _check_server(self, features: list[Hashable]) -> None:
        self._wait_for_no_client()
        self.unexpected.check(self.server)
        try:
            with VfioUserClient.connect(self.served.path, WAIT) as fresh:
                fresh.version()
                magic = fresh.bar_read(vu.VFIO_PCI_BAR0_REGION_INDEX, R_MAGIC, 4)
                status = fresh.bar_read(vu.VFIO_PCI_BAR0_REGION_INDEX, R_STATUS, 4)
                error = fresh.bar_read(vu.VFIO_PCI_BAR0_REGION_INDEX, R_ERROR, 4)
        except (OSError, VfioUserRequestFailed) as exc:
            raise FuzzFailure(f"a fresh client is not served: {exc}") from None
        if magic != MAGIC:
            raise FuzzFailure(f"a fresh client reads MAGIC {magic:#x}")
        features.append(("engine", status, error))
        features += self._engine_work()
        self._wait_for_no_client()
        self.guest.still_answers()
        self.bystander.still_answers()
        for event in self.guest.take_events():
            fault = decode_fault(event)
            if len(event) != FAULT_SIZE or fault.endpoint != self.served.endpoint:
                raise FuzzFailure(f"the guest got a fault event not of the engine's endpoint: {fault}")
            features.append(("fault", fault.reason, fault.flags))
        if self.bystander.take_events():
            raise FuzzFailure("the bystander guest got fault events of another VM's engine")
        self._check_memory()
        # Counted on the server's loop: its own callbacks (the load governor reads /proc/stat four times
        # a second) open files for a moment, which a count from this thread can catch.
        fds = self.server.call(open_fd_count)
        if fds != self.fds_before:
            raise FuzzFailure(f"{fds - self.fds_before:+d} fds after a client went away")

    def _engine_work(self) -> list[Hashable]:
        """What the engine did in this execution, from its own counters: operations, bytes, faults."""
        counters = self.server.call(lambda: dataclasses.replace(self.engine.counters))
        before, self._engine_counters = self._engine_counters, counters
        return [
            ("operations", min(counters.operations - before.operations, 3)),
            ("bytes moved", counters.bytes_done > before.bytes_done),
            ("faults", min(counters.faults - before.faults, 2)),
        ]

    def _allowed_offsets(self, ram: GuestRam) -> set[int]:
        """The file offsets of ``ram``'s pages the engine may have written: pages the paired IOMMU maps
        writable, placed in the file by any DMA_MAP of it the client sent."""
        allowed = set()
        for gpa in self.guest.writable_gpa_pages():
            for sent in self._sent:
                if sent.ram is ram and sent.address <= gpa < sent.address + sent.size:
                    allowed.add(sent.offset + gpa - sent.address)
        return allowed

    def _check_memory(self) -> None:
        bystander = self.bystander
        if bytes(bystander.ram.read(bystander.canvas, CANVAS_PAGES * PAGE)) != bystander.pattern:
            raise FuzzFailure("the bystander guest's RAM changed")
        guest = self.guest
        for ram, start, pattern in (
            (guest.ram, guest.canvas, guest.pattern),
            (self.stranger, 0, self.stranger_pattern),
        ):
            now = ram.data[start : start + len(pattern)]
            expected = np.frombuffer(pattern, dtype=np.uint8)
            changed = {
                start + PAGE * int(page) for page in np.unique(np.flatnonzero(now != expected) // PAGE)
            }
            if changed:
                now[:] = expected  # the next execution starts from the pattern, whatever this one finds
            outside = sorted(changed - self._allowed_offsets(ram))
            if outside:
                raise FuzzFailure(
                    f"{ram!r}: DMA wrote pages at file offsets {[hex(o) for o in outside]}, which the "
                    "guest's IOMMU does not map writable"
                )

    def _mappings(self) -> dict[str, int]:
        names = (GUEST_NAME, BYSTANDER_NAME, STRANGER_NAME)
        with open("/proc/self/maps") as maps:
            lines = list(maps)
        return {name: sum(f"memfd:{name} " in line for line in lines) for name in names}

    def check_leaks(self) -> str | None:
        now = self._mappings()
        if now != self.mappings_before:
            return f"mappings of the guests' and the stranger's RAM: {now}, {self.mappings_before} at set-up"
        return None

    def seeds(self) -> list[bytes]:
        """The empty conversation; then, after the usual prologue (VERSION, the guest's RAM mapped, Bus
        Master), each kind of step once, and the engine run three times: a COPY and a FILL within writable
        ranges, a FILL of a read-only one (a fault the guest is told of)."""
        seeds = [b""]
        for kind in STEP_KINDS:
            seeds.append(_after_prologue(kind).data)
        rw, read_only, _write_only, rw_page, _beyond = (iova for iova, *_rest in _IOMMU_RANGES)
        for op, src, dst in ((Op.COPY, rw, rw_page), (Op.FILL, rw, rw), (Op.FILL, rw, read_only)):
            seeds.append(_engine_seed(op, src, dst))
        return seeds


def _after_prologue(kind: str) -> Script:
    """The decisions of a conversation with the whole prologue and one step of ``kind``."""
    script = Script().chance(224, True).chance(200, True).chance(200, True).chance(200, True)
    script.between(1, 24, 1)
    rare = kind in STEP_KINDS[-_RARE_STEPS:]
    script.chance(_RARE_CHANCE, rare)
    return script.pick(STEP_KINDS[-_RARE_STEPS:] if rare else _COMMON_STEPS, kind)


def _pick_step(choices: Choices) -> str:
    if choices.chance(_RARE_CHANCE):
        return choices.pick(STEP_KINDS[-_RARE_STEPS:])
    return choices.pick(_COMMON_STEPS)


def _engine_seed(op: Op, src: int, dst: int) -> bytes:
    """A conversation that programs one page of ``op`` from ``src`` to ``dst`` and rings the doorbell (the
    decisions of :meth:`VfioServerTarget._engine_run`, in its order)."""
    script = _after_prologue("engine-run")
    for iova in (src, dst):
        script.chance(192, True)  # near a start
        script.byte(255).chance(160, False).pick(_IOMMU_STARTS, iova)  # Choices.near: exactly that anchor
    script.chance(160, True).between(1, 5 * PAGE, PAGE)
    script.bits(64, 0x5A5A_5A5A_5A5A_5A5A)  # PATTERN
    script.chance(224, True).pick(tuple(Op), op)  # OP
    script.below(4, 1)  # IRQ_ENABLE
    for _register in range(6):
        script.chance(32, False).chance(16, False).chance(128, False)
    return script.bits(32, 1).chance(128, False).data  # DOORBELL, with a reply


_CONFIG = vu.VFIO_PCI_CONFIG_REGION_INDEX

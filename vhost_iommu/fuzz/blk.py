"""Fuzz target ``blk``: hostile virtio-blk queues served by the kernel (``jit/blk.py``) and by Python.

Two copies of everything a served disk touches: guest RAM, the image, the queue and the device model. One
copy is served as the endpoint server serves it (``TranslatedMemory`` with the endpoint's DmaPort: the
kernel, handing chains to the Python path); the other by the Python path alone (no port). Both translate
through one IOMMU device whose domain maps the RAM at an IOVA base with a hole and a read-only page.

One execution lays out a queue (size, EVENT_IDX, INDIRECT), fills the descriptor table, indirect tables,
request headers and the available ring with requests that are mostly well formed (IN, OUT, FLUSH, GET_ID
or an unknown type; sectors inside, at the end of or past the image; buffers in mapped, unmapped and
read-only pages, scattered) and sometimes bent (zero or huge lengths, loops, INDIRECT and NEXT together,
readable after writable, indices past the ring), writes the same bytes into both copies and serves both.

Checked: the kernel path ends as the Python path does (the same chains served, or the same QueueError),
and leaves the same guest RAM (rings, buffers, status bytes), the same image, the same ring position and
the same counters (the device's, and the port's translations and faults).
"""

from __future__ import annotations

import logging
import os
import struct
import tempfile
from collections.abc import Hashable, Iterable
from pathlib import Path

import numpy as np

from vhost_iommu.abi import (
    VIRTIO_BLK_SECTOR_SIZE,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
)
from vhost_iommu.device.dma import DmaPort
from vhost_iommu.device.layout import MAP_F_READ, MAP_F_WRITE, Access, encode_attach, encode_map
from vhost_iommu.device.translation import Fault, Translation
from vhost_iommu.endpoints.translated_memory import TranslatedMemory
from vhost_iommu.endpoints.virtio_blk import VirtioBlock
from vhost_iommu.fuzz.engine import Choices, FuzzFailure, FuzzTarget, Script
from vhost_iommu.harness.guest_ram import GuestRam
from vhost_iommu.memory import GuestMemory
from vhost_iommu.virtio_iommu import VirtioIommuBackend
from vhost_iommu.virtqueue import (
    DESC_SIZE,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    QueueError,
    SplitQueue,
)

__all__ = ["BlkTarget"]

ENDPOINT = 0x20
DOMAIN = 1
GPA_BASE = 0x1_0000_0000
RAM_SIZE = 256 * 1024
IOVA_BASE = 0x40_0000_0000
PAGE = 4096
HOLE_PAGE = 8  # unmapped: an address there faults (below the buffers, above the rings)
READ_ONLY_PAGE = 9  # mapped for reads only: a device write there faults
BUFFERS = 16 * PAGE  # rings below, buffers and tables above
IMAGE_SIZE = 64 * 1024 + 300  # whole sectors, and a partial one the device does not offer
_SECTORS = IMAGE_SIZE // VIRTIO_BLK_SECTOR_SIZE
_DEVICE_LOG = logging.getLogger("vhost_iommu.endpoints.virtio_blk")
_TYPES = (VIRTIO_BLK_T_IN, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID)


class _Copy:
    """One served disk: its RAM, image and device model, and the memory its queue reads through."""

    def __init__(self, name: str, directory: Path, port: DmaPort, compiled: bool) -> None:
        self.ram = GuestRam(RAM_SIZE, gpa_base=GPA_BASE, name=f"fuzz-blk-{name}")
        self.memory: GuestMemory = self.ram.guest_memory()
        (directory / name).mkdir()
        self.image = directory / name / "disk.img"  # one name: GET_ID answers it
        self.image.write_bytes(bytes(IMAGE_SIZE))
        self.port = port

        def translate(iova: int, length: int, access: Access) -> Translation | Fault:
            return port.translate(iova, length, access, record=True)

        self.translated = TranslatedMemory(translate, self.memory, lambda: None, port if compiled else None)
        self.block = VirtioBlock(str(self.image))
        self.block.open()

    def close(self) -> None:
        self.block.close()
        self.memory.close()
        self.ram.close()


class BlkTarget(FuzzTarget):
    name = "blk"
    description = "hostile virtio-blk queues: the compiled request path (jit/blk.py) against the Python path"
    max_input = 4096

    def warm_up(self) -> None:
        from vhost_iommu.jit import warm_up

        warm_up()

    def setup(self) -> None:
        # A hostile chain is the driver's error the device logs; thousands a second would drown the report.
        self._log_level = _DEVICE_LOG.level
        _DEVICE_LOG.setLevel(logging.ERROR)
        self._hostility = 0
        self._directory = tempfile.TemporaryDirectory(prefix="fuzz-blk-")
        self.backend = VirtioIommuBackend()
        self.backend.set_features(self.backend.device_features())
        device = self.backend.device
        assert device.handle_request(encode_attach(DOMAIN, ENDPOINT), 4)[0] == bytes(4)
        rw = MAP_F_READ | MAP_F_WRITE
        for first, last, flags in (
            (0, HOLE_PAGE - 1, rw),
            (READ_ONLY_PAGE, READ_ONLY_PAGE, MAP_F_READ),
            (READ_ONLY_PAGE + 1, RAM_SIZE // PAGE - 1, rw),
        ):
            request = encode_map(
                DOMAIN,
                IOVA_BASE + first * PAGE,
                IOVA_BASE + (last + 1) * PAGE - 1,
                GPA_BASE + first * PAGE,
                flags,
            )
            assert device.handle_request(request, 4)[0] == bytes(4)
        directory = Path(self._directory.name)
        self.kernel = _Copy("kernel", directory, DmaPort(device, ENDPOINT), compiled=True)
        self.python = _Copy("python", directory, DmaPort(device, ENDPOINT), compiled=False)

    def teardown(self) -> None:
        self.kernel.close()
        self.python.close()
        self._directory.cleanup()
        _DEVICE_LOG.setLevel(self._log_level)

    def seeds(self) -> list[bytes]:
        seeds = [b""]
        for event_idx in (False, True):
            for indirect in (False, True):
                seeds.append(Script().below(8, 3).chance(128, event_idx).chance(128, indirect).data)
        return seeds

    # -- building the queue ---------------------------------------------------------------------------------

    def _address(self, choices: Choices, length: int) -> int:
        """An IOVA for a buffer of ``length``: mostly in the buffer area, sometimes in the hole, the
        read-only page, on the rings, at the end of the mapping or anywhere."""
        kind = choices.below(16) if self._bent(choices) else 16
        if kind == 0:
            return IOVA_BASE + HOLE_PAGE * PAGE + choices.below(PAGE)
        if kind == 1:
            return IOVA_BASE + READ_ONLY_PAGE * PAGE + choices.below(PAGE)
        if kind == 2:
            return IOVA_BASE + choices.below(BUFFERS)
        if kind == 3:
            return IOVA_BASE + RAM_SIZE - choices.below(2 * PAGE)
        if kind == 4:
            return choices.u64()
        span = max(1, RAM_SIZE - BUFFERS - min(length, RAM_SIZE - BUFFERS))
        return IOVA_BASE + BUFFERS + choices.below(span)

    def _bent(self, choices: Choices) -> bool:
        """Whether to bend the next field, at this execution's hostility (never, rarely or often)."""
        return self._hostility > 0 and choices.chance(self._hostility)

    def _request(self, choices: Choices, data: bytearray) -> list[tuple[int, int, int]]:
        """One request's buffers as (iova, length, flags); its header bytes written into ``data``."""
        kind = choices.bits(32) if self._bent(choices) else choices.pick(_TYPES)
        sector = (
            choices.pick((_SECTORS - 1, _SECTORS, choices.u64()))
            if self._bent(choices)
            else choices.below(_SECTORS)
        )
        header_iova = self._address(choices, 16)
        self._write(data, header_iova, struct.pack("<IIQ", kind, 0, sector))
        buffers = [(header_iova, choices.between(1, 64) if self._bent(choices) else 16, 0)]
        sectors = choices.between(0, 300) if self._bent(choices) else choices.between(0, 16)
        length = sectors * VIRTIO_BLK_SECTOR_SIZE + (choices.between(1, 511) if self._bent(choices) else 0)
        writes = kind != VIRTIO_BLK_T_OUT
        pieces = choices.between(1, 4)
        for piece in range(pieces):
            size = length // pieces + (length % pieces if piece == pieces - 1 else 0)
            if size:
                buffers.append((self._address(choices, size), size, VIRTQ_DESC_F_WRITE if writes else 0))
                if not writes and choices.chance(64):
                    self._write(data, buffers[-1][0], os.urandom(min(size, 64)))
        buffers.append((self._address(choices, 1), choices.between(2, 40) if self._bent(choices) else 1, 2))
        return buffers

    @staticmethod
    def _write(data: bytearray, iova: int, payload: bytes) -> None:
        offset = iova - IOVA_BASE
        if offset >= 0 and offset + len(payload) <= RAM_SIZE:
            data[offset : offset + len(payload)] = payload

    def _lay_out(self, choices: Choices, size: int, indirect: bool) -> tuple[bytearray, int]:
        """The RAM's bytes (rings at 0, 0x1000 and 0x2000 of the IOVA space) and how many heads are
        made available."""
        data = bytearray(RAM_SIZE)
        table_next = BUFFERS - 4 * PAGE  # indirect tables go here, below the buffers
        heads = 0
        slot = 0
        while slot < size and heads < size:
            buffers = self._request(choices, data)
            head = slot
            if indirect and choices.chance(100) and len(buffers) <= 64:
                table = table_next
                table_next += len(buffers) * DESC_SIZE
                for index, (iova, length, flags) in enumerate(buffers):
                    last = index == len(buffers) - 1
                    entry = struct.pack(
                        "<QIHH", iova, length, (flags & 2) | (0 if last else VIRTQ_DESC_F_NEXT), index + 1
                    )
                    data[table + index * DESC_SIZE : table + (index + 1) * DESC_SIZE] = entry
                table_length = choices.below(1 << 12) if self._bent(choices) else len(buffers) * DESC_SIZE
                flags = VIRTQ_DESC_F_INDIRECT | (VIRTQ_DESC_F_NEXT if self._bent(choices) else 0)
                data[slot * DESC_SIZE : (slot + 1) * DESC_SIZE] = struct.pack(
                    "<QIHH", IOVA_BASE + table, table_length, flags, 0
                )
                slot += 1
            else:
                if slot + len(buffers) > size:
                    break
                for index, (iova, length, flags) in enumerate(buffers):
                    last = index == len(buffers) - 1
                    next_index = slot + index + 1
                    if self._bent(choices):  # a loop, or a next past the table
                        next_index = choices.pick((head, choices.below(size + 4)))
                    data[(slot + index) * DESC_SIZE : (slot + index + 1) * DESC_SIZE] = struct.pack(
                        "<QIHH",
                        iova,
                        choices.pick((0, 0xFFFF_FFFF)) if self._bent(choices) else length,
                        (flags & 2) | (VIRTQ_DESC_F_NEXT if not last or self._bent(choices) else 0),
                        next_index & 0xFFFF,
                    )
                slot += len(buffers)
            struct.pack_into(
                "<H", data, 0x1000 + 4 + 2 * heads, head if choices.chance(250) else choices.bits(16)
            )
            heads += 1
        published = choices.bits(16) if self._bent(choices) else heads
        struct.pack_into("<HH", data, 0x1000, 0, published)
        return data, heads

    # -- one execution --------------------------------------------------------------------------------------

    def run(self, choices: Choices) -> Iterable[Hashable]:
        self._hostility = choices.pick((0, 0, 4, 32))  # per 256 fields bent
        size = 1 << choices.below(8)
        event_idx, indirect = choices.chance(128), choices.chance(128)
        compiled_before = self.kernel.block.counters.compiled
        data, heads = self._lay_out(choices, size, indirect)
        image = os.urandom(IMAGE_SIZE) if choices.chance(32) else bytes(IMAGE_SIZE)
        outcomes = []
        for copy in (self.kernel, self.python):
            copy.ram.data[:] = np.frombuffer(data, np.uint8)
            with open(copy.image, "r+b") as file:
                file.write(image)
            outcomes.append(self._serve(copy, size, event_idx, indirect))
        if outcomes[0] != outcomes[1]:
            raise FuzzFailure(f"the kernel path ended {outcomes[0]}, the Python path {outcomes[1]}")
        if not np.array_equal(self.kernel.ram.data, self.python.ram.data):
            differ = np.flatnonzero(self.kernel.ram.data != self.python.ram.data)
            raise FuzzFailure(f"guest RAM differs at {len(differ)} bytes from offset {int(differ[0]):#x}")
        if self.kernel.image.read_bytes() != self.python.image.read_bytes():
            raise FuzzFailure("the images differ")
        kernel_counters = self.kernel.block.counters
        python_counters = self.python.block.counters
        compiled = kernel_counters.compiled - compiled_before
        kernel_counters.compiled = python_counters.compiled = 0
        if kernel_counters != python_counters:
            raise FuzzFailure(f"device counters differ: {kernel_counters} against {python_counters}")
        if self.kernel.port.counters() != self.python.port.counters():
            raise FuzzFailure(
                f"port counters differ: {self.kernel.port.counters()} {self.python.port.counters()}"
            )
        return (outcomes[0][0], min(heads, 8), min(compiled, 4), event_idx, indirect, self._hostility)

    def _serve(self, copy: _Copy, size: int, event_idx: bool, indirect: bool) -> tuple[str, int, int, int]:
        """How serving the queue ended: (QueueError or "ok", chains served, next_avail, used index)."""
        try:
            queue = SplitQueue(
                copy.translated,
                size,
                IOVA_BASE,
                IOVA_BASE + 0x1000,
                IOVA_BASE + 0x2000,
                next_avail=0,
                event_idx=event_idx,
                indirect=indirect,
            )
        except QueueError:
            return "ring refused", 0, 0, 0
        try:
            served = copy.block.serve(queue)
            ending = "ok"
        except QueueError:
            served = -1
            ending = "QueueError"
        return ending, served, queue.next_avail, queue.used_idx

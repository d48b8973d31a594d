"""A hostile driver against the virtio-blk device, sans-I/O: random descriptor tables (addresses mapped,
unmapped, read-only or outside RAM; random lengths, flags and next indices, indirect tables, loops), random
available-ring entries and indices. Whatever the driver writes, a notification never raises; it ends with
every chain returned or with the device in NEEDS_RESET; a fault always puts it there and is delivered;
the image is untouched unless an OUT request succeeded."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from vhost_iommu.abi import (
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_ACCESS_PLATFORM,
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
)
from vhost_iommu.device.layout import Access, FaultReason
from vhost_iommu.device.translation import Fault, Translation
from vhost_iommu.endpoints.translated_memory import TranslatedMemory
from vhost_iommu.endpoints.virtio_blk import VirtioBlock
from vhost_iommu.endpoints.virtio_pci import NOTIFY_OFFSET, VirtioPciFunction
from vhost_iommu.harness.driver_queue import DriverQueue
from vhost_iommu.harness.guest_ram import GuestRam
from vhost_iommu.harness.virtio_pci_driver import (
    DEVICE_STATUS,
    DRIVER_FEATURE,
    DRIVER_FEATURE_SELECT,
    QUEUE_DESC,
    QUEUE_DEVICE,
    QUEUE_DRIVER,
    QUEUE_ENABLE,
    QUEUE_SIZE,
)
from vhost_iommu.memory import GuestMemory
from vhost_iommu.pci.function import COMMAND, COMMAND_BUS_MASTER

PAGE = 4096
IOVA_BASE = 0x10_0000_0000
QUEUE = 16
RAM = 1 << 20
IMAGE = 64 * 512
READ_ONLY_PAGE = 200  # the page of RAM mapped read-only
UNMAPPED_PAGE = 201  # the page of RAM left unmapped
FEATURES = (
    VIRTIO_F_VERSION_1 | VIRTIO_F_ACCESS_PLATFORM | VIRTIO_RING_F_EVENT_IDX | VIRTIO_RING_F_INDIRECT_DESC
)


class PageTable:
    """IOVA_BASE + page -> RAM page, read-write except READ_ONLY_PAGE, UNMAPPED_PAGE left out."""

    def __init__(self) -> None:
        self.faults: list[Fault] = []

    def translate(self, iova: int, length: int, access: Access) -> Translation | Fault:
        segments: list[tuple[int, int]] = []
        position = iova
        while position < iova + length:
            page = (position - IOVA_BASE) // PAGE
            writable = page != READ_ONLY_PAGE
            if (
                not 0 <= page < RAM // PAGE
                or page == UNMAPPED_PAGE
                or (access & Access.WRITE and not writable)
            ):
                fault = Fault(FaultReason.MAPPING, int(access), 0x28, position, reported=True)
                self.faults.append(fault)
                return fault
            take = min(iova + length, IOVA_BASE + (page + 1) * PAGE) - position
            segments.append((page * PAGE + position % PAGE, take))
            position += take
        return Translation(iova, length, tuple(segments), bypass=False)


@dataclass
class Rig:
    function: VirtioPciFunction
    block: VirtioBlock
    ram: GuestRam
    memory: GuestMemory
    table: PageTable
    image: Path
    delivered: list[int]


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(IMAGE))
    with GuestRam(RAM) as ram:
        memory = ram.guest_memory()
        table = PageTable()
        delivered: list[int] = []
        translated = TranslatedMemory(table.translate, memory, lambda: delivered.append(1))
        block = VirtioBlock(str(image))
        block.open()
        function = VirtioPciFunction(block, lambda: translated)
        function.pci.config_write(COMMAND, struct.pack("<H", COMMAND_BUS_MASTER))
        yield Rig(function, block, ram, memory, table, image, delivered)
        function.reset()
        block.close()
        memory.close()


def _write(rig: Rig, offset: int, value: int, size: int) -> None:
    rig.function.bar_write(0, offset, value.to_bytes(size, "little"))


def _start(rig: Rig, queue: DriverQueue) -> None:
    _write(rig, DEVICE_STATUS, 0, 1)
    _write(rig, DEVICE_STATUS, 3, 1)
    for word in (0, 1):
        _write(rig, DRIVER_FEATURE_SELECT, word, 4)
        _write(rig, DRIVER_FEATURE, (FEATURES >> (32 * word)) & 0xFFFF_FFFF, 4)
    _write(rig, DEVICE_STATUS, 0xB, 1)
    _write(rig, QUEUE_SIZE, QUEUE, 2)
    for register, gpa in (
        (QUEUE_DESC, queue.desc_gpa),
        (QUEUE_DRIVER, queue.avail_gpa),
        (QUEUE_DEVICE, queue.used_gpa),
    ):
        _write(rig, register, IOVA_BASE + gpa, 8)
    _write(rig, QUEUE_ENABLE, 1, 2)
    _write(rig, DEVICE_STATUS, 0xF, 1)


# An address: mostly somewhere in mapped RAM past the rings, else in the read-only page, in the unmapped
# page, or anywhere at all.


def _address(choice: int, mapped: int, in_page: int, anything: int) -> int:
    if choice == 0:
        return IOVA_BASE + READ_ONLY_PAGE * PAGE + in_page
    if choice == 1:
        return IOVA_BASE + UNMAPPED_PAGE * PAGE + in_page
    if choice == 2:
        return anything
    return IOVA_BASE + mapped


addresses = st.builds(
    _address,
    st.integers(0, 15),  # 13 in 16: mapped (hypothesis draws one_of's branches evenly, not by weight)
    st.integers(64 * PAGE, 190 * PAGE),
    st.integers(0, PAGE - 1),
    st.integers(0, (1 << 64) - 1),
)
lengths = st.one_of(st.integers(1, 8).map(lambda sectors: 512 * sectors), st.integers(0, 3 * PAGE))
# A request as a driver makes it: header, data (written by the device for IN and GET_ID), status byte.
requests = st.tuples(
    st.sampled_from([VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, 7]),
    st.integers(0, 70),  # sector: the image has 64
    addresses,
    lengths,
    addresses,
)
# A descriptor the driver scribbles over one of the requests' with: anything at all.
scribbles = st.tuples(
    st.integers(0, 3 * 4 - 1),
    st.tuples(addresses, st.integers(0, (1 << 32) - 1), st.integers(0, 7), st.integers(0, QUEUE + 1)),
)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    chains=st.lists(requests, min_size=1, max_size=4),
    scribbled=st.lists(scribbles, max_size=2),
    extra_heads=st.lists(st.integers(0, QUEUE + 2), max_size=2),
)
def test_whatever_the_driver_writes_the_device_answers_or_needs_reset(
    rig: Rig,
    chains: list[tuple[int, int, int, int, int]],
    scribbled: list[tuple[int, tuple[int, int, int, int]]],
    extra_heads: list[int],
) -> None:
    before = rig.image.read_bytes()
    counters = (rig.block.counters.reads, rig.block.counters.writes)
    rig.table.faults.clear()
    queue = DriverQueue(rig.ram, QUEUE, event_idx=True)
    headers = [queue.alloc_buffer(struct.pack("<IIQ", kind, 0, sector)) for kind, sector, *_ in chains]
    heads = []
    for index, ((kind, _sector, data, length, status), header) in enumerate(
        zip(chains, headers, strict=True)
    ):
        first = 3 * index
        device_writes = 2 if kind in (VIRTIO_BLK_T_IN, VIRTIO_BLK_T_GET_ID) else 0
        queue.write_desc(first, IOVA_BASE + header, 16, 1, first + 1)
        queue.write_desc(first + 1, data, length, 1 | device_writes, first + 2)
        queue.write_desc(first + 2, status, 1, 2, 0)
        heads.append(first)
    for index, descriptor in scribbled:
        queue.write_desc(index, *descriptor)
    for head in heads + extra_heads:
        queue.make_available(head, publish=False)
    queue.publish()
    try:
        _start(rig, queue)
        _write(rig, NOTIFY_OFFSET, 0, 2)  # must never raise
        status = rig.function.status
        reads, writes = rig.block.counters.reads - counters[0], rig.block.counters.writes - counters[1]
        # What the examples reach (pytest --hypothesis-show-statistics).
        event("needs reset" if status & VIRTIO_CONFIG_S_NEEDS_RESET else "every chain served")
        event(f"fault: {bool(rig.table.faults)}")
        event(f"reads {min(reads, 1)} writes {min(writes, 1)}")
        if rig.table.faults:
            assert status & VIRTIO_CONFIG_S_NEEDS_RESET
            assert rig.delivered  # the fault went to the guest's eventq
        if not status & VIRTIO_CONFIG_S_NEEDS_RESET:
            assert queue.used_idx == len(heads) + len(extra_heads)  # every chain answered
        ring = rig.function.queues[0]
        assert ring is None or ring.in_flight == 0
        after = rig.image.read_bytes()
        if not writes:
            assert after == before
        assert len(after) == IMAGE
    finally:
        rig.function.reset_device()
        rig.delivered.clear()
        for gpa in headers:
            rig.ram.free(gpa)

"""Translated DMA (`DmaPort`) through a served device: the mappings come from real MAP and UNMAP requests
sent by the harness driver and served by each request path (the Python path, the compiled path on the
event loop, the compiled kick thread); a fault becomes an event in the driver's eventq buffer."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import pytest

from vhost_iommu.backend import VhostUserBackend
from vhost_iommu.device.dma import NOT_GUEST_RAM, DmaPort
from vhost_iommu.device.layout import (
    ATTACH_F_BYPASS,
    FAULT_F_ADDRESS,
    FAULT_F_READ,
    FAULT_F_WRITE,
    MAP_F_READ,
    MAP_F_WRITE,
    Access,
    FaultReason,
    Status,
    decode_fault,
    encode_attach,
    encode_detach,
    encode_map,
    encode_unmap,
)
from vhost_iommu.harness.background import RunningServer
from vhost_iommu.harness.frontend import Frontend
from vhost_iommu.harness.iommu_driver import DOMAIN, ENDPOINT, IommuDriver
from vhost_iommu.memory import FlatRegions
from vhost_iommu.virtio_iommu import VirtioIommuBackend

PAGE = 0x1000
RW = MAP_F_READ | MAP_F_WRITE
SRC_IOVA = 0x10_0000
DST_IOVA = 0x20_0000
PAGES = 16
RAM = 1 << 21

pytestmark = pytest.mark.usefixtures("fd_leak_check")

REQUEST_PATHS: dict[str, Callable[[], VhostUserBackend]] = {
    "python": lambda: VirtioIommuBackend(request_path="python"),
    "event-loop": lambda: VirtioIommuBackend(kick_thread=False),
    "kick-thread": lambda: VirtioIommuBackend(kick_thread=True),
}


@pytest.fixture(params=list(REQUEST_PATHS))
def backend_factory(request: pytest.FixtureRequest) -> Callable[[], VhostUserBackend]:
    return REQUEST_PATHS[request.param]


@pytest.fixture
def driver(frontend: Frontend) -> Iterator[IommuDriver]:
    with IommuDriver(frontend, ram_size=RAM, event_idx=True) as driver:
        assert driver.attach() == Status.OK
        yield driver


def backend_of(server: RunningServer) -> VirtioIommuBackend:
    backend = server.backends[-1]
    assert isinstance(backend, VirtioIommuBackend)
    return backend


@pytest.fixture
def port(vhost_server: RunningServer, driver: IommuDriver) -> DmaPort:
    return DmaPort(backend_of(vhost_server).device, ENDPOINT)


@pytest.fixture
def memory(driver: IommuDriver) -> Iterator[FlatRegions]:
    """The guest's RAM as an endpoint's server maps it: the same memfd, mapped again."""
    guest_memory = driver.ram.guest_memory()
    yield guest_memory.flat_tables()
    guest_memory.close()


def scattered(driver: IommuDriver, iova: int, pages: int, flags: int = RW) -> list[int]:
    """Map ``pages`` pages at ``iova`` onto pages of guest RAM in a shuffled order; their gpas."""
    gpas = [driver.ram.alloc(PAGE, PAGE) for _ in range(pages)]
    order = np.random.default_rng(iova).permutation(pages)
    placed = [gpas[i] for i in order]
    for page, gpa in enumerate(placed):
        start = iova + page * PAGE
        assert driver.status(encode_map(DOMAIN, start, start + PAGE - 1, gpa, flags)) == Status.OK
    return placed


def gathered(driver: IommuDriver, gpas: list[int], length: int) -> bytes:
    data = b"".join(driver.ram.read(gpa, PAGE) for gpa in gpas)
    return data[:length]


def test_a_copy_between_scattered_mappings_lands_byte_for_byte(
    driver: IommuDriver, port: DmaPort, memory: FlatRegions
) -> None:
    source = scattered(driver, SRC_IOVA, PAGES)
    target = scattered(driver, DST_IOVA, PAGES)
    payload = np.random.default_rng(7).integers(0, 256, PAGES * PAGE, dtype=np.uint8).tobytes()
    for page, gpa in enumerate(source):
        driver.ram.write(gpa, payload[page * PAGE : (page + 1) * PAGE])
    length = PAGES * PAGE - 123
    result = port.copy(memory, SRC_IOVA + 100, DST_IOVA + 7, length)
    assert result.ok and result.done_bytes == length
    assert gathered(driver, target, PAGES * PAGE)[7 : 7 + length] == payload[100 : 100 + length]
    assert port.compare(memory, SRC_IOVA + 100, DST_IOVA + 7, length).mismatch_offset is None
    counters = port.counters()
    assert counters["bytes_written"] == length
    assert counters["page_translations"] >= 2 * PAGES
    assert counters["faults"] == 0


def test_fill_read_and_write_follow_the_mappings(
    driver: IommuDriver, port: DmaPort, memory: FlatRegions
) -> None:
    target = scattered(driver, DST_IOVA, 4)
    assert port.fill(memory, DST_IOVA + 3, 3 * PAGE, 0x8877665544332211).ok
    expected = bytes([0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88]) * (3 * PAGE // 8)
    assert gathered(driver, target, 4 * PAGE)[3 : 3 + 3 * PAGE] == expected
    data = np.arange(5000, dtype=np.uint32).astype(np.uint8)
    assert port.write(memory, DST_IOVA + PAGE - 10, data).ok
    back = np.zeros(5000, np.uint8)
    assert port.read(memory, DST_IOVA + PAGE - 10, back).ok
    assert bytes(back) == bytes(data)
    assert gathered(driver, target, 4 * PAGE)[PAGE - 10 : PAGE - 10 + 5000] == bytes(data)


def test_use_after_unmap_faults_leaves_the_destination_untouched_and_reaches_the_eventq(
    vhost_server: RunningServer, driver: IommuDriver, port: DmaPort, memory: FlatRegions
) -> None:
    source = scattered(driver, SRC_IOVA, 4)
    target = scattered(driver, DST_IOVA, 4)
    for gpa in source:
        driver.ram.write(gpa, b"\xab" * PAGE)
    before = gathered(driver, target, 4 * PAGE)
    third = DST_IOVA + 2 * PAGE
    assert driver.status(encode_unmap(DOMAIN, third, third + PAGE - 1)) == Status.OK

    result = port.copy(memory, SRC_IOVA, DST_IOVA, 4 * PAGE)
    assert result.done_bytes == 2 * PAGE  # whole chunks before the fault, nothing from it on
    assert result.fault is not None and result.fault.reported
    assert (result.fault.reason, result.fault.address) == (FaultReason.MAPPING, third)
    assert result.fault.flags == FAULT_F_WRITE | FAULT_F_ADDRESS
    after = gathered(driver, target, 4 * PAGE)
    assert after[: 2 * PAGE] == b"\xab" * 2 * PAGE
    assert after[2 * PAGE :] == before[2 * PAGE :]
    assert port.counters()["faults"] == 1 and list(port.last_faults) == [result.fault]

    backend = backend_of(vhost_server)
    driver.post_event_buffers(1)
    vhost_server.call(backend.deliver_events)
    [(_head, length, data)] = driver.events.used_with_data()
    event = decode_fault(data[:length])
    assert (event.reason, event.flags, event.endpoint, event.address) == (
        FaultReason.MAPPING,
        FAULT_F_WRITE | FAULT_F_ADDRESS,
        ENDPOINT,
        third,
    )


def test_a_write_through_a_read_only_mapping_faults_as_a_write(
    driver: IommuDriver, port: DmaPort, memory: FlatRegions
) -> None:
    [gpa] = scattered(driver, DST_IOVA, 1, MAP_F_READ)
    driver.ram.write(gpa, b"\x01" * PAGE)
    result = port.fill(memory, DST_IOVA, PAGE, 0)
    assert result.done_bytes == 0 and result.fault is not None
    assert result.fault.flags == FAULT_F_WRITE | FAULT_F_ADDRESS
    assert driver.ram.read(gpa, PAGE) == b"\x01" * PAGE
    back = np.zeros(PAGE, np.uint8)
    assert port.read(memory, DST_IOVA, back).ok and bytes(back) == b"\x01" * PAGE
    [gpa] = scattered(driver, SRC_IOVA, 1, MAP_F_WRITE)
    read = port.read(memory, SRC_IOVA, back)
    assert read.fault is not None and read.fault.flags == FAULT_F_READ | FAULT_F_ADDRESS


def test_detach_and_attach_elsewhere_take_the_old_translation_away(
    vhost_server: RunningServer, driver: IommuDriver, port: DmaPort, memory: FlatRegions
) -> None:
    vhost_server.call(lambda: port.device.set_bypass(0))  # a detached endpoint's DMA faults
    scattered(driver, DST_IOVA, 1)
    assert port.fill(memory, DST_IOVA, PAGE, 1).ok
    assert driver.status(encode_attach(DOMAIN + 1, ENDPOINT)) == Status.OK  # moved: the domain is gone
    moved = port.fill(memory, DST_IOVA, PAGE, 1)
    assert moved.fault is not None and moved.fault.reason == FaultReason.MAPPING
    assert driver.status(encode_detach(DOMAIN + 1, ENDPOINT)) == Status.OK
    detached = port.fill(memory, DST_IOVA, PAGE, 1)
    assert detached.fault is not None and detached.fault.reason == FaultReason.DOMAIN


def test_a_bypass_domain_reaches_guest_physical_addresses_and_outside_ram_is_an_error(
    driver: IommuDriver, port: DmaPort, memory: FlatRegions
) -> None:
    assert driver.status(encode_attach(DOMAIN + 1, ENDPOINT, ATTACH_F_BYPASS)) == Status.OK
    gpa = driver.ram.alloc(PAGE, PAGE)
    assert port.fill(memory, gpa, PAGE, 0x0101010101010101).ok
    assert driver.ram.read(gpa, PAGE) == b"\x01" * PAGE
    assert port.counters()["bypassed_accesses"] == 1
    outside = port.fill(memory, RAM - PAGE, 2 * PAGE, 0)
    assert (outside.done_bytes, outside.error, outside.error_address) == (PAGE, NOT_GUEST_RAM, RAM)
    assert port.translate(gpa, PAGE, Access.WRITE) == port.device.translate(
        ENDPOINT, gpa, PAGE, Access.WRITE, report=False
    )

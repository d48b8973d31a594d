"""The virtio-blk device served over vfio-user (``kind = "virtio-blk"``), driven the way Linux's virtio_pci
and virtio_blk drivers drive it, with every ring and buffer address an IOVA translated by the guest's own
virtio-iommu state: real sockets, memfd RAM shared by the vhost-user and the vfio-user client, eventfds."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import os
import struct
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from vhost_iommu.abi import (
    VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_ACCESS_PLATFORM,
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
)
from vhost_iommu.device import Status, Topology
from vhost_iommu.device.layout import (
    FAULT_F_ADDRESS,
    FAULT_F_READ,
    FAULT_F_WRITE,
    MAP_F_READ,
    FaultReason,
    encode_map,
)
from vhost_iommu.device.topology import ServedDevice, TopologyError
from vhost_iommu.endpoint_server import ServedEndpoint
from vhost_iommu.endpoints.virtio_blk import BlockCounters
from vhost_iommu.harness.background import RunningServer, running_server
from vhost_iommu.harness.driver_queue import DriverQueue
from vhost_iommu.harness.guest_ram import GuestRam
from vhost_iommu.harness.iommu_driver import IommuDriver
from vhost_iommu.harness.vfio_client import VfioUserClient
from vhost_iommu.harness.virtio_pci_driver import VirtioPciDriver, VirtioPciDriverError
from vhost_iommu.pci.function import DEVICE_ID, VENDOR_ID
from vhost_iommu.virtio_iommu import VirtioIommuBackend

pytestmark = pytest.mark.usefixtures("fd_leak_check")

BLK = 0x30  # 00:06.0
BLK_RO = 0x38  # 00:07.0
DOMAIN = 3
IOVA_BASE = 0x1_0000_0000  # the test maps the whole RAM here: IOVA = IOVA_BASE + guest-physical
IMAGE_SIZE = 1 << 20
SECTOR = 512
WAIT = 10.0
ALL_FEATURES = (
    VIRTIO_F_VERSION_1
    | VIRTIO_F_ACCESS_PLATFORM
    | VIRTIO_RING_F_EVENT_IDX
    | VIRTIO_RING_F_INDIRECT_DESC
    | VIRTIO_BLK_F_SEG_MAX
    | VIRTIO_BLK_F_FLUSH
    | VIRTIO_BLK_F_RO
)
CONFIG_VECTOR, QUEUE_VECTOR = 0, 1


def iova_of(gpa: int) -> int:
    return IOVA_BASE + gpa


def header(kind: int, sector: int = 0) -> bytes:
    return struct.pack("<IIQ", kind, 0, sector)


@dataclass
class Disk:
    """One virtio-blk function: its vfio-user client (QEMU), the guest's virtio-pci driver, its queue."""

    served: ServedEndpoint
    client: VfioUserClient
    pci: VirtioPciDriver
    queue: DriverQueue
    image: Path

    def submit(
        self, readable: list[bytes], writable: list[int], *, indirect: bool = False
    ) -> tuple[int, bytes]:
        """Post one request, notify, and return its used length and its whole writable area."""
        self.queue.post(readable, writable, indirect=indirect)
        self.pci.notify(0)
        [(head, length)] = self.queue.used()
        return length, self.queue.written(head)

    def read(self, sector: int, length: int, *, indirect: bool = False) -> tuple[int, bytes]:
        """(status, data) of an IN request (no data unless OK: the used length counts what was written)."""
        used, area = self.submit([header(VIRTIO_BLK_T_IN, sector)], [length, 1], indirect=indirect)
        status = area[length]
        assert used == (length + 1 if status == VIRTIO_BLK_S_OK else 1)
        return status, area[: used - 1]

    def write(self, sector: int, data: bytes, *, indirect: bool = False) -> int:
        used, written = self.submit([header(VIRTIO_BLK_T_OUT, sector), data], [1], indirect=indirect)
        assert used == 1
        return written[0]


@dataclass
class Rig:
    server: RunningServer
    iommu: IommuDriver
    ram: GuestRam
    disks: dict[int, Disk]

    def map(self, iova: int, gpa: int, size: int, flags: int = 3) -> None:
        assert self.iommu.status(encode_map(DOMAIN, iova, iova + size - 1, gpa, flags)) == Status.OK

    def faults(self) -> list[tuple[int, int, int, int]]:
        return self.iommu.fault_events()

    def counters(self, endpoint: int) -> dict[str, int]:
        port = self.disks[endpoint].served.port
        assert port is not None
        return self.server.call(port.counters)

    def status(self, endpoint: int) -> int:
        return self.disks[endpoint].pci.status()


def _topology(image: Path, readonly_image: Path) -> Topology:
    devices = (
        ServedDevice("dma-engine", 0, 0x28, "dma-engine.sock"),
        ServedDevice("virtio-blk", 0, BLK, "blk.sock", {"image": str(image)}),
        ServedDevice(
            "virtio-blk", 0, BLK_RO, "blk-ro.sock", {"image": str(readonly_image), "readonly": True}
        ),
    )
    return dataclasses.replace(Topology.default(), devices=devices)


@pytest.fixture(params=["kick-thread", "python"])
def rig(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Rig]:
    options = {"kick-thread": {"kick_thread": True}, "python": {"request_path": "python"}}[request.param]
    image, readonly_image = tmp_path / "disk.img", tmp_path / "readonly.img"
    image.write_bytes(os.urandom(IMAGE_SIZE))
    readonly_image.write_bytes(os.urandom(IMAGE_SIZE))
    topology = _topology(image, readonly_image)
    with running_server(lambda: VirtioIommuBackend(topology, **options)) as server:  # type: ignore[arg-type]
        endpoints = server.serve_devices(topology, os.path.dirname(server.path))
        served = {endpoint.spec.bdf: endpoint for endpoint in endpoints.endpoints}
        with (
            GuestRam(16 << 20, name="guest-ram") as ram,
            IommuDriver(server.connect(WAIT), ram, own_frontend=True, timeout=WAIT) as iommu,
        ):
            iommu.post_event_buffers(8)
            rig = Rig(server, iommu, ram, {})
            assert iommu.attach(DOMAIN, BLK) == Status.OK
            assert iommu.attach(DOMAIN, BLK_RO) == Status.OK
            rig.map(IOVA_BASE, ram.gpa_base, ram.size)
            try:
                for bdf, path in ((BLK, image), (BLK_RO, readonly_image)):
                    rig.disks[bdf] = _connect_disk(served[bdf], ram, path)
                yield rig
            finally:
                _close_disks(rig)


def _connect_disk(served: ServedEndpoint, ram: GuestRam, image: Path) -> Disk:
    client = VfioUserClient.connect(served.path, WAIT)
    client.start(ram)  # the same memfd: paired with this guest's IOMMU
    disk = Disk(served, client, VirtioPciDriver(client), DriverQueue(ram, 128, event_idx=True), image)
    disk.queue.device_address = iova_of
    bring_up(disk)
    return disk


def _close_disks(rig: Rig) -> None:
    for disk in rig.disks.values():
        disk.pci.close()
        disk.client.close()
    rig.disks.clear()  # the queues' views of the RAM go before the RAM is closed


def bring_up(disk: Disk, queue_address: int | None = None) -> int:
    """Linux's virtio_pci sequence; the features accepted."""
    accepted = disk.pci.bring_up(ALL_FEATURES)
    disk.pci.use_eventfds(2)
    assert disk.pci.set_config_vector(CONFIG_VECTOR) == CONFIG_VECTOR
    if queue_address is None:
        assert disk.pci.setup_queue(0, disk.queue, iova_of, QUEUE_VECTOR) == QUEUE_VECTOR
    else:
        assert disk.pci.setup_queue(0, disk.queue, lambda _gpa: queue_address, QUEUE_VECTOR) == QUEUE_VECTOR
    disk.pci.driver_ok()
    return accepted


def test_the_device_comes_up_as_a_modern_virtio_blk_function(rig: Rig) -> None:
    disk = rig.disks[BLK]
    assert struct.unpack("<H", disk.client.config_read(VENDOR_ID, 2)) == (0x1AF4,)
    assert struct.unpack("<H", disk.client.config_read(DEVICE_ID, 2)) == (0x1042,)
    offered = disk.pci.device_features()
    expected = ALL_FEATURES & ~VIRTIO_BLK_F_RO
    assert offered == expected
    assert rig.status(BLK) == 0xF  # ACKNOWLEDGE, DRIVER, FEATURES_OK, DRIVER_OK
    assert disk.pci.device_config(0, 8) == IMAGE_SIZE // SECTOR  # capacity
    assert disk.pci.device_config(12, 4) == 126  # seg_max
    assert rig.disks[BLK_RO].pci.device_features() & VIRTIO_BLK_F_RO


def test_features_ok_is_refused_without_access_platform(rig: Rig) -> None:
    disk = rig.disks[BLK]
    with pytest.raises(VirtioPciDriverError, match="refused"):
        disk.pci.bring_up(ALL_FEATURES & ~VIRTIO_F_ACCESS_PLATFORM)
    assert not rig.status(BLK) & VIRTIO_CONFIG_S_FEATURES_OK


@pytest.mark.parametrize("indirect", [False, True])
def test_sectors_written_are_read_back_through_translated_buffers(rig: Rig, indirect: bool) -> None:
    disk = rig.disks[BLK]
    payload = os.urandom(64 << 10)
    assert disk.write(16, payload, indirect=indirect) == VIRTIO_BLK_S_OK
    status, data = disk.read(16, len(payload), indirect=indirect)
    assert status == VIRTIO_BLK_S_OK
    assert hashlib.sha256(data).digest() == hashlib.sha256(payload).digest()
    on_disk = disk.image.read_bytes()[16 * SECTOR : 16 * SECTOR + len(payload)]
    assert hashlib.sha256(on_disk).digest() == hashlib.sha256(payload).digest()
    counters = rig.counters(BLK)
    assert counters["page_translations"] > 0
    assert counters["faults"] == 0
    assert disk.pci.interrupts(QUEUE_VECTOR) > 0
    assert rig.status(BLK) == 0xF


def test_the_kernel_serves_the_requests_that_complete_ok_and_leaves_the_others_to_python(rig: Rig) -> None:
    """Reads, writes (direct and indirect) and flushes are served by jit/blk.py; a request that gets IOERR,
    UNSUPP or GET_ID's answer is handed over unserved and answered by the Python path, and what the kernel
    serves after it is the kernel's again."""
    disk = rig.disks[BLK]
    served = disk.served

    def block_counters() -> BlockCounters:
        assert served.block is not None
        return rig.server.call(lambda: served.block.counters if served.block is not None else None)

    before = block_counters()
    payload = os.urandom(3 * SECTOR)
    assert disk.write(2, payload) == VIRTIO_BLK_S_OK
    assert disk.read(2, len(payload), indirect=True) == (VIRTIO_BLK_S_OK, payload)
    assert disk.submit([header(VIRTIO_BLK_T_FLUSH)], [1]) == (1, bytes((VIRTIO_BLK_S_OK,)))
    assert disk.read(IMAGE_SIZE // SECTOR, SECTOR)[0] == VIRTIO_BLK_S_IOERR
    assert disk.submit([header(0x1234)], [1]) == (1, bytes((VIRTIO_BLK_S_UNSUPP,)))
    assert disk.submit([header(VIRTIO_BLK_T_GET_ID)], [20, 1])[0] == 21
    assert disk.read(2, SECTOR) == (VIRTIO_BLK_S_OK, payload[:SECTOR])
    # One descriptor over 200 IOVA pages mapped to guest pages in reverse order, as Linux's DMA API maps an
    # 800 KiB request (a segment per page): the kernel's too.
    pages, page = 200, 4096
    target = rig.ram.alloc(pages * page, page)
    scattered = 0x3_0000_0000
    for index in range(pages):
        rig.map(scattered + index * page, target + (pages - 1 - index) * page, page)
    status_gpa, header_gpa = rig.ram.alloc(1), rig.ram.alloc(16)
    rig.ram.write(header_gpa, header(VIRTIO_BLK_T_IN, 0))
    queue = disk.queue
    head = 100
    queue.write_desc(head, iova_of(header_gpa), 16, 1, head + 1)
    queue.write_desc(head + 1, scattered, pages * page, 1 | 2, head + 2)
    queue.write_desc(head + 2, iova_of(status_gpa), 1, 2, 0)
    used_before = queue.used_idx
    queue.make_available(head)
    disk.pci.notify(0)
    assert queue.used_idx == used_before + 1
    assert rig.ram.read(status_gpa, 1) == bytes((VIRTIO_BLK_S_OK,))
    image = disk.image.read_bytes()
    assert rig.ram.read(target + (pages - 1) * page, page) == image[:page]
    assert rig.ram.read(target, page) == image[(pages - 1) * page : pages * page]
    after = block_counters()
    assert after.compiled - before.compiled == 5  # three reads, a write, a flush
    assert (after.reads - before.reads, after.writes - before.writes) == (3, 1)
    assert (after.bytes_read - before.bytes_read, after.bytes_written - before.bytes_written) == (
        4 * SECTOR + pages * page,
        3 * SECTOR,
    )
    assert (after.errors - before.errors, after.unsupported - before.unsupported) == (1, 1)
    assert after.flushes - before.flushes == 1
    assert rig.status(BLK) == 0xF


def test_data_in_scattered_iova_pages_lands_in_the_right_guest_pages(rig: Rig) -> None:
    """A read into three IOVA pages mapped to guest pages in reverse order."""
    disk = rig.disks[BLK]
    page = 4096
    target = rig.ram.alloc(3 * page, page)
    scattered = 0x2_0000_0000
    for index in range(3):
        rig.map(scattered + index * page, target + (2 - index) * page, page)
    status_gpa = rig.ram.alloc(1)
    header_gpa = rig.ram.alloc(16)
    rig.ram.write(header_gpa, header(VIRTIO_BLK_T_IN, 8))
    queue = disk.queue
    queue.write_desc(100, iova_of(header_gpa), 16, 1, 101)
    queue.write_desc(101, scattered, 3 * page, 1 | 2, 102)
    queue.write_desc(102, iova_of(status_gpa), 1, 2, 0)
    queue.make_available(100)
    disk.pci.notify(0)
    assert queue.used_idx == 1
    assert rig.ram.read(status_gpa, 1) == bytes((VIRTIO_BLK_S_OK,))
    expected = disk.image.read_bytes()[8 * SECTOR : 8 * SECTOR + 3 * page]
    got = rig.ram.read(target, 3 * page)
    assert [got[(2 - i) * page : (3 - i) * page] for i in range(3)] == [
        expected[i * page : (i + 1) * page] for i in range(3)
    ]


def test_flush_and_get_id(rig: Rig) -> None:
    disk = rig.disks[BLK]
    used, data = disk.submit([header(VIRTIO_BLK_T_FLUSH)], [1])
    assert (used, data[0]) == (1, VIRTIO_BLK_S_OK)
    used, data = disk.submit([header(VIRTIO_BLK_T_GET_ID)], [20, 1])
    assert used == 21
    assert data[:20].rstrip(b"\0") == b"disk.img"
    assert data[20] == VIRTIO_BLK_S_OK


def test_requests_past_the_end_or_of_partial_sectors_get_ioerr_and_unknown_types_unsupp(rig: Rig) -> None:
    disk = rig.disks[BLK]
    last = IMAGE_SIZE // SECTOR
    assert disk.read(last - 1, 2 * SECTOR)[0] == VIRTIO_BLK_S_IOERR
    assert disk.read(last, SECTOR)[0] == VIRTIO_BLK_S_IOERR
    assert disk.read(2**60, SECTOR)[0] == VIRTIO_BLK_S_IOERR
    before = disk.image.read_bytes()
    assert disk.write(last - 1, os.urandom(2 * SECTOR)) == VIRTIO_BLK_S_IOERR
    assert disk.write(0, os.urandom(SECTOR + 1)) == VIRTIO_BLK_S_IOERR
    assert disk.image.read_bytes() == before
    used, data = disk.submit([header(0x1234)], [1])
    assert (used, data[0]) == (1, VIRTIO_BLK_S_UNSUPP)
    assert disk.read(last - 1, SECTOR)[0] == VIRTIO_BLK_S_OK  # the last sector is there
    assert not rig.status(BLK) & VIRTIO_CONFIG_S_NEEDS_RESET


def test_a_readonly_disk_refuses_writes_and_reads(rig: Rig) -> None:
    disk = rig.disks[BLK_RO]
    before = disk.image.read_bytes()
    assert disk.write(0, os.urandom(4096)) == VIRTIO_BLK_S_IOERR
    assert disk.image.read_bytes() == before
    status, data = disk.read(0, 4096)
    assert (status, data) == (VIRTIO_BLK_S_OK, before[:4096])


def test_a_buffer_the_driver_mapped_read_only_cannot_be_written_by_a_read(rig: Rig) -> None:
    """Linux maps an IN request's data DMA_FROM_DEVICE and an OUT's DMA_TO_DEVICE: the permissions are
    the mappings', checked for the access the device makes."""
    disk = rig.disks[BLK]
    target = rig.ram.alloc(4096, 4096)
    rig.map(0x3_0000_0000, target, 4096, MAP_F_READ)
    status_gpa, header_gpa = rig.ram.alloc(1), rig.ram.alloc(16)
    rig.ram.write(header_gpa, header(VIRTIO_BLK_T_IN, 0))
    queue = disk.queue
    queue.write_desc(100, iova_of(header_gpa), 16, 1, 101)
    queue.write_desc(101, 0x3_0000_0000, 4096, 1 | 2, 102)
    queue.write_desc(102, iova_of(status_gpa), 1, 2, 0)
    queue.make_available(100)
    disk.pci.notify(0)
    assert rig.status(BLK) & VIRTIO_CONFIG_S_NEEDS_RESET
    assert rig.faults() == [(FaultReason.MAPPING, FAULT_F_WRITE | FAULT_F_ADDRESS, BLK, 0x3_0000_0000)]


def _still_serving(rig: Rig) -> None:
    """The IOMMU's requestq answers, and the other disk, another endpoint of the same process, serves."""
    other = rig.ram.alloc(4096, 4096)
    rig.map(0x4_0000_0000, other, 4096)
    readonly = rig.disks[BLK_RO]
    status, data = readonly.read(1, SECTOR)
    assert (status, data) == (VIRTIO_BLK_S_OK, readonly.image.read_bytes()[SECTOR : 2 * SECTOR])


def test_an_unmapped_buffer_iova_faults_and_needs_reset_and_the_rest_keeps_serving(rig: Rig) -> None:
    disk = rig.disks[BLK]
    header_gpa = rig.ram.alloc(16)
    rig.ram.write(header_gpa, header(VIRTIO_BLK_T_IN, 0))
    status_gpa = rig.ram.alloc(1)
    unmapped = 0x7_0000_0000
    queue = disk.queue
    queue.write_desc(100, iova_of(header_gpa), 16, 1, 101)
    queue.write_desc(101, unmapped, 4096, 1 | 2, 102)
    queue.write_desc(102, iova_of(status_gpa), 1, 2, 0)
    queue.make_available(100)
    disk.pci.notify(0)
    assert rig.status(BLK) & VIRTIO_CONFIG_S_NEEDS_RESET
    assert disk.pci.interrupts(CONFIG_VECTOR) == 1
    assert queue.used_idx == 0  # nothing returned
    assert rig.faults() == [(FaultReason.MAPPING, FAULT_F_WRITE | FAULT_F_ADDRESS, BLK, unmapped)]
    assert rig.counters(BLK)["faults"] == 1
    disk.pci.notify(0)  # further notifications are ignored until a reset
    assert rig.faults() == []
    _still_serving(rig)
    # A reset brings the device back.
    disk.queue = DriverQueue(rig.ram, 128, event_idx=True, device_address=iova_of)
    bring_up(disk)
    assert rig.status(BLK) == 0xF
    assert disk.read(0, SECTOR) == (VIRTIO_BLK_S_OK, disk.image.read_bytes()[:SECTOR])


def test_an_unmapped_ring_faults_at_driver_ok(rig: Rig) -> None:
    disk = rig.disks[BLK]
    disk.queue = DriverQueue(rig.ram, 128, event_idx=True, device_address=iova_of)
    unmapped = 0x7_0000_0000
    bring_up(disk, queue_address=unmapped)
    status = rig.status(BLK)
    assert status & VIRTIO_CONFIG_S_NEEDS_RESET and status & VIRTIO_CONFIG_S_DRIVER_OK
    [(reason, flags, endpoint, address)] = rig.faults()
    assert (reason, endpoint, address) == (FaultReason.MAPPING, BLK, unmapped)
    assert flags & FAULT_F_READ
    _still_serving(rig)


def test_a_descriptor_loop_needs_reset_without_a_fault(rig: Rig) -> None:
    disk = rig.disks[BLK]
    header_gpa = rig.ram.alloc(16)
    rig.ram.write(header_gpa, header(VIRTIO_BLK_T_OUT, 0))
    queue = disk.queue
    queue.write_desc(100, iova_of(header_gpa), 16, 1, 101)
    queue.write_desc(101, iova_of(header_gpa), 16, 1, 100)  # back to the head
    queue.make_available(100)
    disk.pci.notify(0)
    assert rig.status(BLK) & VIRTIO_CONFIG_S_NEEDS_RESET
    assert "loops" in (disk.served.device.needs_reset_reason or "")  # type: ignore[union-attr]
    assert rig.faults() == []
    _still_serving(rig)


@contextlib.contextmanager
def _one_disk(image: Path) -> Iterator[tuple[RunningServer, ServedEndpoint]]:
    """A server of the test topology, its virtio-blk at BLK over ``image`` (the read-only one too)."""
    topology = _topology(image, image)
    with running_server(lambda: VirtioIommuBackend(topology)) as server:
        endpoints = server.serve_devices(topology, os.path.dirname(server.path))
        yield server, next(endpoint for endpoint in endpoints.endpoints if endpoint.spec.bdf == BLK)


def test_the_identity_domain_reaches_guest_physical_addresses(tmp_path: Path) -> None:
    """iommu.passthrough=1: the endpoint is left unattached with config.bypass, so its addresses are
    guest-physical and nothing is translated through a mapping."""
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(IMAGE_SIZE))
    with (
        _one_disk(image) as (server, served),
        GuestRam(8 << 20, name="guest-ram") as ram,
        IommuDriver(server.connect(WAIT), ram, own_frontend=True, timeout=WAIT),
        VfioUserClient.connect(served.path, WAIT) as client,
    ):
        client.start(ram)
        pci = VirtioPciDriver(client)
        try:
            disk = Disk(served, client, pci, DriverQueue(ram, 128, event_idx=True), image)
            accepted = pci.bring_up(ALL_FEATURES)
            assert accepted & VIRTIO_F_ACCESS_PLATFORM
            pci.use_eventfds(2)
            pci.setup_queue(0, disk.queue, lambda gpa: gpa, QUEUE_VECTOR)
            assert pci.driver_ok() == 0xF
            payload = os.urandom(8192)
            assert disk.write(4, payload) == VIRTIO_BLK_S_OK
            assert disk.read(4, len(payload)) == (VIRTIO_BLK_S_OK, payload)
            port = served.port
            assert port is not None
            counters = server.call(port.counters)
            assert counters["bypassed_accesses"] > 0
            assert counters["page_translations"] == 0
        finally:
            pci.close()


def test_the_image_is_open_only_while_a_client_is_served(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(IMAGE_SIZE))
    with _one_disk(image) as (server, served):
        assert served.block is not None
        assert not server.call(lambda: served.block.is_open)  # type: ignore[union-attr]
        with VfioUserClient.connect(served.path, WAIT) as client:
            client.version()
            assert server.call(lambda: served.block.is_open)  # type: ignore[union-attr]
            connection = server.call(lambda: served.connection)
            assert connection is not None
        # The client went: wait until its connection has ended (the image is closed on the way).
        ended = asyncio.wait_for(asyncio.shield(connection.done), WAIT)
        asyncio.run_coroutine_threadsafe(ended, server.loop).result()
        assert not server.call(lambda: served.block.is_open)  # type: ignore[union-attr]


def test_a_missing_image_refuses_the_client_and_the_server_goes_on(tmp_path: Path) -> None:
    with _one_disk(tmp_path / "absent.img") as (server, served):
        with VfioUserClient.connect(served.path, WAIT) as client, pytest.raises(ConnectionError):
            client.version()
        assert served.connection is None
        assert server.call(lambda: served.block is not None and not served.block.is_open)


def test_the_topology_takes_a_virtio_blk_with_its_image_beside_the_sockets(tmp_path: Path) -> None:
    topology = Topology.loads(
        """
        [[endpoints]]
        bdf_start = "00:04.0"
        bdf_end = "00:1e.7"
        endpoint_start = 0x20
        [[devices]]
        kind = "virtio-blk"
        bdf = "00:06.0"
        socket = "blk.sock"
        image = "disk.img"
        readonly = true
        """
    )
    [device] = topology.devices
    assert device.options == {"image": "disk.img", "readonly": True}
    resolved = device.with_paths_in("/run/vm")
    assert resolved.options["image"] == "/run/vm/disk.img"
    assert device.socket_path("/run/vm") == "/run/vm/blk.sock"
    assert device.with_paths_in(None).options["image"] == "disk.img"
    absolute = dataclasses.replace(device, options={"image": "/srv/disk.img"})
    assert absolute.with_paths_in("/run/vm").options["image"] == "/srv/disk.img"


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ("", "image: missing"),
        ('image = ""', "is not a path"),
        ("image = 3", "is not a path"),
        ('image = "d.img"\nreadonly = "yes"', "is not a bool"),
        ('image = "d.img"\nsize = 3', "size"),
    ],
)
def test_the_topology_refuses_a_bad_virtio_blk(keys: str, message: str) -> None:
    text = (
        '[[endpoints]]\nbdf_start = "00:04.0"\nbdf_end = "00:1e.7"\nendpoint_start = 0x20\n'
        f'[[devices]]\nkind = "virtio-blk"\nbdf = "00:06.0"\nsocket = "blk.sock"\n{keys}\n'
    )
    with pytest.raises(TopologyError, match=message):
        Topology.loads(text)


def test_the_virtio_blk_preset_is_the_default_topology_with_a_disk_for_the_engine() -> None:
    preset = Topology.load(Path(__file__).resolve().parent.parent / "qemu-configs/topologies/virtio-blk.toml")
    assert preset.devices == (ServedDevice("virtio-blk", 0, 0x28, "virtio-blk.sock", {"image": "disk.img"}),)
    assert dataclasses.replace(preset, devices=Topology.default().devices) == Topology.default()


def test_the_program_refuses_to_start_without_the_image(tmp_path: Path) -> None:
    """A missing image is said at start-up, before any socket exists, not when QEMU first connects."""
    topology = Path(__file__).resolve().parent.parent / "qemu-configs/topologies/virtio-blk.toml"
    command = [sys.executable, "-m", "vhost_iommu", f"--socket-path={tmp_path}/s", f"--topology={topology}"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode != 0
    assert f"virtio-blk at 00:05.0: image {tmp_path}/disk.img: No such file or directory" in result.stderr
    assert not os.path.exists(tmp_path / "s") and not os.path.exists(tmp_path / "virtio-blk.sock")

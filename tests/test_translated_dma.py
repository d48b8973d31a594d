"""The DMA engine served over vfio-user, paired with its guest's virtio-iommu through shared guest RAM:
every access translated by the guest's own IOMMU state, with the vfio-user client playing QEMU and the
harness driver playing the guest's virtio-iommu driver (real sockets, memfd RAM, eventfds)."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from vhost_iommu.device import Status, Topology
from vhost_iommu.device.layout import (
    FAULT_F_ADDRESS,
    FAULT_F_READ,
    FAULT_F_WRITE,
    MAP_F_READ,
    FaultReason,
    encode_detach,
    encode_map,
    encode_unmap,
)
from vhost_iommu.endpoints.dma_engine import (
    R_DONE_BYTES,
    R_DOORBELL,
    R_DST,
    R_ERROR,
    R_FAULT_ADDRESS,
    R_FAULT_FLAGS,
    R_FAULT_REASON,
    R_LENGTH,
    R_OP,
    R_PATTERN,
    R_SRC,
    R_STATUS,
    EngineError,
    Op,
    StatusBit,
)
from vhost_iommu.harness.background import RunningServer, running_server
from vhost_iommu.harness.guest_ram import GuestRam
from vhost_iommu.harness.iommu_driver import IommuDriver
from vhost_iommu.harness.vfio_client import VfioUserClient
from vhost_iommu.pci.function import COMMAND, COMMAND_BUS_MASTER, COMMAND_MEMORY
from vhost_iommu.virtio_iommu import VirtioIommuBackend

TOPOLOGY = Topology.default()
ENGINE = 0x28  # 00:05.0, the default topology's DMA engine
DOMAIN = 3
PAGE = 4096
WAIT = 10.0


@dataclass
class Rig:
    server: RunningServer
    driver: IommuDriver
    engine: VfioUserClient
    ram: GuestRam

    def run(self, op: Op, src: int, dst: int, length: int, pattern: int = 0) -> int:
        """Program the engine and ring its doorbell; the STATUS it ends with."""
        for register, value in ((R_SRC, src), (R_DST, dst), (R_LENGTH, length), (R_PATTERN, pattern)):
            self.engine.bar_write(0, register, value, 8)
        self.engine.bar_write(0, R_OP, op)
        self.engine.bar_write(0, R_DOORBELL, 1)
        return self.engine.bar_read(0, R_STATUS, 4)

    def register(self, offset: int, size: int = 4) -> int:
        return self.engine.bar_read(0, offset, size)

    def map(self, iova: int, gpa: int, size: int, flags: int = 3) -> None:
        assert self.driver.status(encode_map(DOMAIN, iova, iova + size - 1, gpa, flags)) == Status.OK

    def unmap(self, iova: int, size: int) -> None:
        assert self.driver.status(encode_unmap(DOMAIN, iova, iova + size - 1)) == Status.OK

    def faults(self) -> list[tuple[int, int, int, int]]:
        """The fault events the device wrote into the driver's eventq buffers."""
        return self.driver.fault_events()


@pytest.fixture(params=["kick-thread", "event-loop", "python"])
def rig(request: pytest.FixtureRequest) -> Iterator[Rig]:
    options = {
        "kick-thread": {"kick_thread": True},
        "event-loop": {"kick_thread": False},
        "python": {"request_path": "python"},
    }[request.param]
    with running_server(lambda: VirtioIommuBackend(TOPOLOGY, **options)) as server:  # type: ignore[arg-type]
        endpoints = server.serve_devices(TOPOLOGY, os.path.dirname(server.path))
        with (
            GuestRam(8 << 20, name="guest-ram") as ram,
            IommuDriver(server.connect(WAIT), ram, own_frontend=True, timeout=WAIT) as driver,
            VfioUserClient.connect(endpoints.endpoints[0].path, WAIT) as engine,
        ):
            engine.start(ram)  # the same memfd: this client is paired with this guest
            engine.config_write(COMMAND, struct.pack("<H", COMMAND_MEMORY | COMMAND_BUS_MASTER))
            driver.post_event_buffers(8)
            yield Rig(server, driver, engine, ram)


def test_a_copy_is_translated_through_the_attached_domain(rig: Rig) -> None:
    assert rig.driver.attach(DOMAIN, ENGINE) == Status.OK
    src, dst = rig.ram.alloc(3 * PAGE, PAGE), rig.ram.alloc(3 * PAGE, PAGE)
    payload = os.urandom(3 * PAGE)
    rig.ram.write(src, payload)
    # Three IOVA pages each: the engine crosses mappings, and the destination's pages are out of order.
    for page in range(3):
        rig.map(0x10_0000 + page * PAGE, src + page * PAGE, PAGE)
        rig.map(0x20_0000 + page * PAGE, dst + (2 - page) * PAGE, PAGE)
    assert rig.run(Op.COPY, 0x10_0000, 0x20_0000, 3 * PAGE) == StatusBit.DONE
    assert rig.register(R_DONE_BYTES, 8) == 3 * PAGE
    written = rig.ram.read(dst, 3 * PAGE)
    assert [written[(2 - p) * PAGE : (3 - p) * PAGE] for p in range(3)] == [
        payload[p * PAGE : (p + 1) * PAGE] for p in range(3)
    ]
    assert rig.run(Op.COMPARE, 0x10_0000, 0x20_0000, 3 * PAGE) == StatusBit.DONE


def test_use_after_unmap_is_blocked_and_reported_to_the_guest(rig: Rig) -> None:
    assert rig.driver.attach(DOMAIN, ENGINE) == Status.OK
    src, dst = rig.ram.alloc(PAGE, PAGE), rig.ram.alloc(PAGE, PAGE)
    rig.ram.write(dst, b"\xaa" * PAGE)
    rig.map(0x10_0000, src, PAGE)
    rig.map(0x20_0000, dst, PAGE)
    rig.unmap(0x20_0000, PAGE)
    status = rig.run(Op.FILL, 0, 0x20_0000, PAGE, pattern=0x5555_5555_5555_5555)
    assert status == StatusBit.DONE | StatusBit.FAULT
    assert rig.ram.read(dst, PAGE) == b"\xaa" * PAGE  # not one byte written
    assert (rig.register(R_FAULT_REASON), rig.register(R_FAULT_ADDRESS, 8)) == (
        FaultReason.MAPPING,
        0x20_0000,
    )
    assert rig.register(R_FAULT_FLAGS) == FAULT_F_WRITE | FAULT_F_ADDRESS
    assert rig.driver.frontend.wait_used(1, WAIT)
    assert rig.faults() == [(FaultReason.MAPPING, FAULT_F_WRITE | FAULT_F_ADDRESS, ENGINE, 0x20_0000)]


def test_a_write_through_a_read_only_mapping_faults_and_a_read_works(rig: Rig) -> None:
    assert rig.driver.attach(DOMAIN, ENGINE) == Status.OK
    ro, rw = rig.ram.alloc(PAGE, PAGE), rig.ram.alloc(PAGE, PAGE)
    rig.ram.write(ro, b"r" * PAGE)
    rig.map(0x10_0000, ro, PAGE, MAP_F_READ)
    rig.map(0x20_0000, rw, PAGE)
    assert rig.run(Op.COPY, 0x20_0000, 0x10_0000, PAGE) == StatusBit.DONE | StatusBit.FAULT
    assert rig.register(R_FAULT_FLAGS) == FAULT_F_WRITE | FAULT_F_ADDRESS
    assert rig.ram.read(ro, PAGE) == b"r" * PAGE
    assert rig.run(Op.COPY, 0x10_0000, 0x20_0000, PAGE) == StatusBit.DONE
    assert rig.ram.read(rw, PAGE) == b"r" * PAGE


def test_an_unattached_endpoint_bypasses_while_config_bypass_is_set(rig: Rig) -> None:
    src, dst = rig.ram.alloc(PAGE, PAGE), rig.ram.alloc(PAGE, PAGE)
    rig.ram.write(src, b"b" * PAGE)
    # Boot bypass (the default topology's boot_bypass = 1): the IOVA is the guest-physical address.
    assert rig.run(Op.COPY, src, dst, PAGE) == StatusBit.DONE
    assert rig.ram.read(dst, PAGE) == b"b" * PAGE


def test_detach_ends_translation_and_a_missing_domain_faults(rig: Rig) -> None:
    assert rig.driver.attach(DOMAIN, ENGINE) == Status.OK
    page = rig.ram.alloc(PAGE, PAGE)
    rig.map(0x10_0000, page, PAGE)
    assert rig.run(Op.FILL, 0, 0x10_0000, 64, pattern=1) == StatusBit.DONE
    assert rig.driver.status(encode_detach(DOMAIN, ENGINE)) == Status.OK
    rig.server.call(lambda: rig.server.backends[0].device.set_bypass(False))  # type: ignore[attr-defined]
    assert rig.run(Op.COPY, 0x10_0000, 0x10_0000, 64) == StatusBit.DONE | StatusBit.FAULT
    assert rig.register(R_FAULT_REASON) == FaultReason.DOMAIN
    assert rig.register(R_FAULT_FLAGS) == FAULT_F_READ | FAULT_F_ADDRESS


def test_an_address_outside_the_shared_ram_is_an_engine_error(rig: Rig) -> None:
    assert rig.driver.attach(DOMAIN, ENGINE) == Status.OK
    rig.map(0x10_0000, 0x4000_0000, PAGE)  # mapped by the driver, but no RAM there
    assert rig.run(Op.FILL, 0, 0x10_0000, 64) & StatusBit.ERROR
    assert rig.register(R_ERROR) == EngineError.NOT_GUEST_RAM


def test_a_range_past_the_top_of_the_iova_space_is_refused_and_the_session_goes_on(rig: Rig) -> None:
    """Found by the vfio-server fuzz target: the DMA port's ValueError for such a range closed the
    connection as an unexpected error."""
    assert rig.driver.attach(DOMAIN, ENGINE) == Status.OK
    assert rig.run(Op.COMPARE, 0x10_0000, (1 << 64) - 0x100, 4 * PAGE) == StatusBit.DONE | StatusBit.ERROR
    assert rig.register(R_ERROR) == EngineError.BAD_LENGTH


def test_two_guests_each_get_their_own_engine_translated_by_their_own_iommu() -> None:
    """One back-end, two VMs with an engine each at the same address: each engine is paired with the guest
    whose RAM its client shares, translated by that guest's IOMMU, and never reaches the other's RAM."""
    topology = Topology.loads(
        "[[endpoints]]\nbdf_start = '00:04.0'\nbdf_end = '00:1e.7'\n"
        "[[devices]]\nkind = 'dma-engine'\nbdf = '00:05.0'\nsocket = 'a.sock'\n"
        "[[devices]]\nkind = 'dma-engine'\nbdf = '00:05.0'\nsocket = 'b.sock'\n"
    )
    with running_server(lambda: VirtioIommuBackend(topology)) as server:
        endpoints = server.serve_devices(topology, os.path.dirname(server.path))
        second_socket = server.listen()
        with (
            GuestRam(4 << 20, name="guest-ram-a") as ram_a,
            GuestRam(4 << 20, name="guest-ram-b") as ram_b,
            IommuDriver(server.connect(WAIT), ram_a, own_frontend=True, timeout=WAIT) as guest_a,
            IommuDriver(
                server.connect(WAIT, path=second_socket), ram_b, own_frontend=True, timeout=WAIT
            ) as guest_b,
            VfioUserClient.connect(endpoints.endpoints[0].path, WAIT) as engine_a,
            VfioUserClient.connect(endpoints.endpoints[1].path, WAIT) as engine_b,
        ):
            for engine, ram in ((engine_a, ram_a), (engine_b, ram_b)):
                engine.start(ram)
                engine.config_write(COMMAND, struct.pack("<H", COMMAND_MEMORY | COMMAND_BUS_MASTER))
            rig_a, rig_b = Rig(server, guest_a, engine_a, ram_a), Rig(server, guest_b, engine_b, ram_b)
            guest_b.post_event_buffers(4)
            assert guest_a.attach(DOMAIN, ENGINE) == Status.OK
            assert guest_b.attach(DOMAIN, ENGINE) == Status.OK
            page_a, page_b = ram_a.alloc(PAGE, PAGE), ram_b.alloc(PAGE, PAGE)
            rig_a.map(0x10_0000, page_a, PAGE)  # only guest A maps the IOVA
            assert rig_a.run(Op.FILL, 0, 0x10_0000, PAGE, pattern=0x4141414141414141) == StatusBit.DONE
            assert rig_b.run(Op.FILL, 0, 0x10_0000, PAGE, pattern=0x4242424242424242) & StatusBit.FAULT
            assert ram_a.read(page_a, PAGE) == b"A" * PAGE and ram_b.read(page_b, PAGE) == bytes(PAGE)
            assert guest_b.frontend.wait_used(1, WAIT)
            assert rig_b.faults() == [
                (FaultReason.MAPPING, FAULT_F_WRITE | FAULT_F_ADDRESS, ENGINE, 0x10_0000)
            ]
            assert rig_a.faults() == []
            pairs = server.call(lambda: [served.paired_connection for served in endpoints.endpoints])
            assert pairs[0] is not pairs[1]

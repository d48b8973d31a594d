"""End to end: a real QEMU (>= 10.2) and a real Linux guest under TCG, against vhost-iommu.

Each test boots the guest built by ``scripts/build-guest`` on the QEMU from ``scripts/get-qemu`` and looks
at both sides: what the guest printed and what the back-end's device holds, read on the back-end's own
event loop while the guest waits at a prompt. ``-m "not e2e"`` leaves them out.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from vhost_iommu.device import IommuDevice, Topology
from vhost_iommu.device.layout import MAP_F_READ, MAP_F_WRITE
from vhost_iommu.lab import Lab, LabConfig
from vhost_iommu.machine import RAM_BASE, Arch
from vhost_iommu.provision.boot import GuestRun, parse_fields
from vhost_iommu.provision.guest import GuestImage
from vhost_iommu.provision.klog import kernel_trouble
from vhost_iommu.qemu import PciTestDevice, VirtioBlockDevice

pytestmark = pytest.mark.e2e

TOPOLOGIES = Path(__file__).resolve().parent.parent / "qemu-configs" / "topologies"
BOOT_TIMEOUT = 240.0
STEP_TIMEOUT = 60.0
TESTDEV_ENDPOINT = 0x20  # pci-testdev at 00:04.0: endpoint ID = BDF in the default topology
BLOCK_ENDPOINT = 0x28  # virtio-blk at 00:05.0
GUEST_RAM = 1 << 30

# What a healthy guest never logs, beyond kernel trouble (the guest's /init prints its kernel log's
# warnings and errors at the end): the driver's own complaints.
DRIVER_TROUBLE = re.compile(r"virtio_iommu.*(error|fail|timeout)|viommu.*(error|fail)", re.IGNORECASE)


def assert_kernel_log_clean(run: GuestRun) -> None:
    trouble = kernel_trouble(run.lines) + [line for line in run.lines if DRIVER_TROUBLE.search(line)]
    assert not trouble, "the guest kernel complained:\n" + "\n".join(trouble)
    assert run.marker_lines("VHOST_IOMMU_KLOG_END"), "the guest's /init did not report its kernel log"


def attached_domain(device: IommuDevice, endpoint: int) -> int | None:
    return device.domain_of(endpoint)


def coalesced(mappings: list[tuple[int, int, int, int]]) -> list[tuple[int, int, int]]:
    """The device's mappings as (start, last, flags) intervals, adjacent pieces with equal flags joined:
    the guest's IOMMU layer may split one VFIO mapping into several MAP requests."""
    intervals: list[tuple[int, int, int]] = []
    for start, last, _phys, flags in sorted(mappings):
        if intervals and intervals[-1][1] + 1 == start and intervals[-1][2] == flags:
            intervals[-1] = (intervals[-1][0], last, flags)
        else:
            intervals.append((start, last, flags))
    return intervals


def vfio_flags(permissions: str) -> int:
    flags = 0
    if "r" in permissions:
        flags |= MAP_F_READ
    if "w" in permissions:
        flags |= MAP_F_WRITE
    return flags


@pytest.fixture(params=[True, False], ids=["control-channel", "kick-thread"])
def vfio_lab(request: pytest.FixtureRequest, qemu: Path, guest_image: GuestImage) -> Iterator[Lab]:
    # The control channel times every kick on the event loop, so the back-end then serves the requestq
    # there; without it, the requestq thread's kick loop serves it (the default).
    config = LabConfig(job="vfio-steps", params={"hold": "1"}, control=request.param)
    with Lab(config, qemu=qemu, guest=guest_image) as lab:
        lab.guest.expect(r"VFIO_STEP_READY seq=0", BOOT_TIMEOUT)
        yield lab


def finish(lab: Lab) -> GuestRun:
    lab.guest.send("quit")
    lab.guest.expect(r"VHOST_IOMMU_HOLD", STEP_TIMEOUT)
    lab.guest.send("")
    return lab.guest.wait(STEP_TIMEOUT)


@pytest.mark.every_arch
def test_driver_binds_probes_and_attaches_the_viot_endpoint(vfio_lab: Lab) -> None:
    counters = vfio_lab.inspect(lambda device: device.request_counters())
    domain = vfio_lab.inspect(lambda device: attached_domain(device, TESTDEV_ENDPOINT))
    statuses = vfio_lab.inspect(lambda device: device.status_counters())
    run = finish(vfio_lab)

    assert run.job_rc == 0
    assert "virtio_iommu virtio0: input address: 48 bits" in run.output
    assert counters["PROBE"] >= 1, counters
    assert counters["ATTACH"] >= 1, counters
    assert domain is not None, "the back-end does not show 00:04.0 attached while VFIO owns it"
    # Every request the driver sent at boot and bind succeeded.
    assert sum(statuses.values()) == statuses["OK"], statuses
    assert_kernel_log_clean(run)


@pytest.mark.every_kernel
@pytest.mark.every_arch
def test_vfio_map_unmap_steps_match_the_backend_table(vfio_lab: Lab, guest_arch: str) -> None:
    steps = [
        ("map", 0x1_0000_0000, 0x1000, "rw"),
        ("map", 0x1_0001_0000, 0x4000, "r"),
        ("map", 0x2_0000_0000, 0x20_0000, "w"),
        ("map", 0x3_0000_0000, 0x10_0000, "rw"),
        ("unmap", 0x1_0001_0000, 0x4000, ""),
        ("unmap", 0x1_0000_0000, 0x1000, ""),
        ("unmap", 0x2_0000_0000, 0x20_0000, ""),
    ]
    domain = vfio_lab.inspect(lambda device: attached_domain(device, TESTDEV_ENDPOINT))
    assert domain is not None
    expected: dict[int, tuple[int, int, int]] = {}
    for sequence, (op, iova, size, permissions) in enumerate(steps, start=1):
        vfio_lab.guest.send(f"{op} {iova:#x} {size:#x} {permissions}".strip())
        result = parse_fields(vfio_lab.guest.expect(rf"VFIO_STEP seq={sequence} .*", STEP_TIMEOUT)[0])
        vfio_lab.guest.expect(rf"VFIO_STEP_READY seq={sequence}", STEP_TIMEOUT)
        assert result["rc"] == "0", result
        if op == "map":
            expected[iova] = (iova, iova + size - 1, vfio_flags(permissions))
        else:
            del expected[iova]
        mappings = vfio_lab.inspect(lambda device: device.mappings(domain))
        assert coalesced(mappings) == sorted(expected.values()), f"after step {sequence}: {op} {iova:#x}"
        # The guest's IOMMU layer mapped guest RAM pages of the VFIO user's buffer.
        low = RAM_BASE[Arch(guest_arch)]
        assert all(low < phys and phys + last - start < low + GUEST_RAM for start, last, phys, _ in mappings)
    # The kick thread serves the requestq with or without the control channel (the control layer takes
    # the ring to the event loop only while a delay or an observer needs every kick in Python).
    kicks = vfio_lab.backend().kick_thread_counters()
    assert kicks is not None and kicks["kicks"] >= len(steps), kicks
    run = finish(vfio_lab)
    assert run.job_rc == 0
    assert_kernel_log_clean(run)


@pytest.mark.arm64_only
def test_an_iommu_on_virtio_mmio_translates_for_the_pci_endpoints(
    qemu: Path, guest_image: GuestImage
) -> None:
    """Arm's second transport: the IOMMU a virtio-mmio device (arm-virt-mmio.toml), the PCI functions
    translated through the PCIe host's iommu-map. The guest finds it in the device tree, VFIO maps through
    it, and the back-end holds what the guest mapped."""
    topology = Topology.load(TOPOLOGIES / "arm-virt-mmio.toml")
    config = LabConfig(job="vfio-steps", params={"hold": "1"}, topology=topology)
    with Lab(config, qemu=qemu, guest=guest_image) as lab:
        lab.guest.expect(r"VFIO_STEP_READY seq=0", BOOT_TIMEOUT)
        domain = lab.inspect(lambda device: attached_domain(device, TESTDEV_ENDPOINT))
        assert domain is not None, "00:04.0 is not attached through the virtio-mmio IOMMU"
        lab.guest.send("map 0x100000000 0x4000 rw")
        result = parse_fields(lab.guest.expect(r"VFIO_STEP seq=1 .*", STEP_TIMEOUT)[0])
        lab.guest.expect(r"VFIO_STEP_READY seq=1", STEP_TIMEOUT)
        mappings = lab.inspect(lambda device: device.mappings(domain))
        run = finish(lab)
    assert result["rc"] == "0", result
    assert coalesced(mappings) == [(0x1_0000_0000, 0x1_0000_3FFF, MAP_F_READ | MAP_F_WRITE)]
    assert run.job_rc == 0
    # The driver bound the one virtio-iommu there is: the generic device on virt's virtio-mmio bus.
    devices = [arg for arg in lab.command.argv if arg.startswith("vhost-user-test-device")]
    assert devices and all(device.startswith("vhost-user-test-device,") for device in devices), devices
    assert "bus=virtio-mmio-bus.31" in devices[0]
    assert "virtio_iommu virtio0: input address: 48 bits" in run.output
    assert_kernel_log_clean(run)


def test_identity_domain_lets_a_dma_endpoint_work(qemu: Path, guest_image: GuestImage) -> None:
    with tempfile.TemporaryDirectory(prefix="vhost-iommu-disk-") as scratch:
        disk = Path(scratch) / "disk.img"
        disk.write_bytes(bytes(32 << 20))
        config = LabConfig(
            job="blk-io",
            params={"blk_mb": "8", "hold": "1"},
            kernel_args=["iommu.passthrough=1"],
            endpoints=[PciTestDevice(slot=4), VirtioBlockDevice(slot=5, image=disk)],
        )
        with Lab(config, qemu=qemu, guest=guest_image) as lab:
            io = parse_fields(lab.guest.expect(r"VHOST_IOMMU_BLK .*", BOOT_TIMEOUT)[0])
            lab.guest.expect(r"VHOST_IOMMU_HOLD", STEP_TIMEOUT)
            domain = lab.inspect(lambda device: attached_domain(device, BLOCK_ENDPOINT))
            domains = lab.inspect(lambda device: {info.domain: info for info in device.domains()})
            lab.guest.send("")
            run = lab.guest.wait(STEP_TIMEOUT)
    assert io["match"] == "1", io
    assert domain is not None, "virtio-blk's endpoint is not attached"
    assert domains[domain].bypass, "iommu.passthrough=1 must give the endpoint an identity (bypass) domain"
    assert domains[domain].mapping_count == 0
    assert run.job_rc == 0
    assert_kernel_log_clean(run)

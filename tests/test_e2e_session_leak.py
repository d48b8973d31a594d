"""End to end: real QEMU guests booted one after another against one ``vhost-iommu`` process.

Every VM restart against a running back-end used to pin the RAM that VM touched for the life of the
process (issue 15: the host's Shmem grew by each guest's RAM until the back-end stopped). Each guest here
runs the quickest job (probe) and powers off; after each, the back-end holds no mapping of guest RAM, and
after the last no more fds, threads, mappings or memory than after the first. ``-m "not e2e"`` leaves it
out.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_session_leak import Footprint, ServerProcess, settled_footprint

from vhost_iommu.device import Topology
from vhost_iommu.provision.boot import GuestSession
from vhost_iommu.provision.guest import ensure_guest
from vhost_iommu.provision.qemu_build import ensure_qemu
from vhost_iommu.qemu import IommuKind, PciTestDevice, QemuSetup, build_command
from vhost_iommu.viot import viot_from_topology, viot_topology_from

pytestmark = pytest.mark.e2e

GUESTS = 3
BOOT_TIMEOUT = 240.0
STEP_TIMEOUT = 60.0
GUEST_MEMORY_MIB = 512
# A guest's RAM kept mapped is GUEST_MEMORY_MIB of address space; what the back-end's own allocator moves
# between guests is a few MiB at most.
MEMORY_TOLERANCE_KIB = 32 << 10
MAPPING_COUNT_TOLERANCE = 8


@pytest.fixture
def directory() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="vhost-e2e-leak-") as path:  # short: socket paths <= 108 bytes
        yield Path(path)


def boot(socket_path: Path, viot: Path) -> GuestSession:
    topology = Topology.default()
    image = ensure_guest()
    setup = QemuSetup(
        qemu=ensure_qemu(),
        kernel=image.kernel,
        initrd=image.initrd,
        kernel_args=["vhost_iommu.job=probe", "vhost_iommu.hold=1"],
        iommu=IommuKind.VHOST_USER,
        socket_path=socket_path,
        viot_path=viot,
        topology=viot_topology_from(topology),
        endpoints=(PciTestDevice(slot=4),),
        memory_mib=GUEST_MEMORY_MIB,
    )
    return GuestSession(build_command(setup).argv)


def test_guests_booted_one_after_another_leave_nothing_in_the_back_end(directory: Path) -> None:
    viot = directory / "viot.bin"
    viot.write_bytes(viot_from_topology(Topology.default()))
    server = ServerProcess(str(directory), [], control=False)
    settled: list[Footprint] = []
    try:
        for _ in range(GUESTS):
            with boot(Path(server.path), viot) as guest:
                guest.expect(r"VHOST_IOMMU_HOLD rc=0", BOOT_TIMEOUT)
                # While the guest runs, the back-end maps its RAM (the check below can fail).
                assert Footprint.of(server.process.pid).guest_ram_mappings >= 1
                guest.send("")
                assert guest.wait(STEP_TIMEOUT).job_rc == 0
            settled.append(settled_footprint(server))
        context = f"after each guest: {settled}; server log:\n{server.log_text()[-4000:]}"
    finally:
        server.stop()
    assert [footprint.guest_ram_mappings for footprint in settled] == [0] * GUESTS, context
    first, last = settled[0], settled[-1]
    assert last.fds == first.fds, context
    assert last.threads == first.threads, context
    assert last.mappings - first.mappings <= MAPPING_COUNT_TOLERANCE, context
    assert last.vm_size_kib - first.vm_size_kib <= MEMORY_TOLERANCE_KIB, context
    assert last.vm_rss_kib - first.vm_rss_kib <= MEMORY_TOLERANCE_KIB, context

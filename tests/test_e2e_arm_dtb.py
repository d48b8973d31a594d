"""QEMU's own virt machine and the device tree made from it: the dump, the IOMMU added from the topology,
and QEMU taking the result back with -dtb (it dumps what it loaded, so what the guest gets is checked)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from vhost_iommu.device.topology import Topology
from vhost_iommu.dtb import read_description
from vhost_iommu.lab import provisioned_qemu
from vhost_iommu.machine import Arch
from vhost_iommu.provision.configs import configs_dir
from vhost_iommu.provision.devicetree import dump_machine_dtb, write_guest_dtb
from vhost_iommu.qemu import QemuSetup, dtb_dump_command, placement_from

pytestmark = pytest.mark.e2e


def virt_setup(qemu: Path, preset: str) -> QemuSetup:
    topology = Topology.load(configs_dir() / "topologies" / preset)
    return QemuSetup(
        qemu=qemu,
        kernel=Path("vmlinuz"),
        initrd=Path("initrd.gz"),
        arch=Arch.ARM64,
        topology=placement_from(topology),
    )


@pytest.mark.parametrize(
    ("preset", "iommu_path"),
    [("arm-virt.toml", "/pcie@10000000/virtio_iommu@3,0"), ("arm-virt-mmio.toml", "/virtio_mmio@a003e00")],
)
def test_qemu_boots_the_tree_made_from_its_own_dump(tmp_path: Path, preset: str, iommu_path: str) -> None:
    qemu = provisioned_qemu(Arch.ARM64)
    setup = virt_setup(qemu, preset)
    topology = Topology.load(configs_dir() / "topologies" / preset)
    dump = dump_machine_dtb(setup)
    # QEMU's working buffer, not a packed tree: what hung the guest when passed back as it was.
    assert len(dump) == 1 << 20
    tree = write_guest_dtb(setup, topology, tmp_path / "guest.dtb")
    made = read_description(tree.read_bytes())
    assert made.iommu_path == iommu_path
    assert [(entry.rid_base, entry.endpoint_base, entry.length) for entry in made.iommu_map] == [
        (0x20, 0x20, 0xD8)
    ]
    # QEMU loads the tree with -dtb (adding /chosen and the memory node as it does for any -dtb) and
    # dumps it again: the IOMMU's description is intact in what the guest would get.
    reloaded = tmp_path / "reloaded.dtb"
    argv = [*dtb_dump_command(setup, reloaded).argv, "-dtb", str(tree)]
    subprocess.run(argv, check=True, capture_output=True, timeout=60)
    assert read_description(reloaded.read_bytes()) == made

"""The ready-made command lines of ``qemu-configs/``, generated from :mod:`vhost_iommu.qemu` so they never
drift from what the project itself runs (a test compares the files with this output).

``python -m vhost_iommu.provision.configs`` rewrites them.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from vhost_iommu.device.topology import Topology
from vhost_iommu.machine import Arch
from vhost_iommu.provision.paths import repo_root
from vhost_iommu.qemu import (
    IommuKind,
    PciTestDevice,
    QemuSetup,
    VfioUserEndpoint,
    VirtioBlockDevice,
    build_command,
    placement_from,
)

_HOW_TO_GET = (
    "Set QEMU, KERNEL and INITRD first, e.g. from the repository:\n"
    '  export QEMU=$(scripts/get-qemu); eval "$(scripts/build-guest)"; export KERNEL INITRD\n'
    "Arguments given to this script go to QEMU."
)

_VARIABLES = {
    "QEMU": ': "${QEMU:=qemu-system-x86_64}"  # QEMU >= 10.2 (scripts/get-qemu prints one)',
    "KERNEL": ': "${KERNEL:?set KERNEL to the guest kernel (scripts/build-guest prints it)}"',
    "INITRD": ': "${INITRD:?set INITRD to the guest initramfs (scripts/build-guest prints it)}"',
    "MEM": ': "${MEM:=1024}"  # MiB of guest RAM',
}
_BACKEND_VARIABLES = {
    "SOCK": ': "${SOCK:=/tmp/vhost-iommu.sock}"  # vhost-iommu --socket-path=$SOCK must be listening',
    "VIOT": ': "${VIOT:=viot.bin}"  # made by: vhost-iommu viot -o $VIOT',
}


_HOW_TO_GET_ARM64 = (
    "Set QEMU, KERNEL and INITRD first, e.g. from the repository:\n"
    "  export QEMU=$(scripts/get-qemu --arch arm64)\n"
    '  eval "$(scripts/build-guest --arch arm64)"; export KERNEL INITRD\n'
    "Arguments given to this script go to QEMU."
)


def _arm64_variables(topology: str) -> dict[str, str]:
    """QEMU, the guest, the back-end's socket and the device tree of an arm64 script with ``topology``."""
    return {
        "QEMU": ': "${QEMU:=qemu-system-aarch64}"  # QEMU >= 10.2 (scripts/get-qemu --arch arm64 prints one)',
        "KERNEL": _VARIABLES["KERNEL"].replace("build-guest", "build-guest --arch arm64"),
        "INITRD": _VARIABLES["INITRD"].replace("build-guest", "build-guest --arch arm64"),
        "MEM": _VARIABLES["MEM"],
        "SOCK": _BACKEND_VARIABLES["SOCK"].replace("--socket-path", f"--topology={topology} --socket-path"),
        # The tree comes from QEMU's dump of this very machine (same QEMU, same memory size).
        "DTB": ': "${DTB:=virt.dtb}"  # made by: vhost-iommu dtb --topology='
        + topology
        + ' --qemu="$QEMU" --memory="$MEM" -o "$DTB"',
    }


def _arm64_setup(job: str, topology: str, **fields: object) -> QemuSetup:
    values: dict[str, object] = {
        "arch": Arch.ARM64,
        "topology": placement_from(Topology.load(repo_root() / topology)),
        "viot_path": None,
        "dtb_path": Path("@DTB@"),
    }
    values.update(fields)
    return _setup(job, **values)


_ARM_VIRT = "qemu-configs/topologies/arm-virt.toml"
_ARM_VIRT_MMIO = "qemu-configs/topologies/arm-virt-mmio.toml"


@dataclass(frozen=True)
class ConfigFile:
    name: str
    title: str
    setup: QemuSetup
    variables: dict[str, str]


def _setup(job: str, **fields: object) -> QemuSetup:
    values: dict[str, object] = {
        "qemu": Path("@QEMU@"),
        "kernel": Path("@KERNEL@"),
        "initrd": Path("@INITRD@"),
        "kernel_args": [f"vhost_iommu.job={job}"],
        "socket_path": Path("@SOCK@"),
        "viot_path": Path("@VIOT@"),
        "endpoints": [PciTestDevice(4)],
    }
    values.update(fields)
    return QemuSetup(**values)  # type: ignore[arg-type]


def config_files() -> list[ConfigFile]:
    """Every file of ``qemu-configs/`` but the README and the topologies."""
    job = {"JOB": ': "${JOB:=probe}"  # probe, shell, vfio-steps, vfio-bench, vfio-info, blk-io, dma-engine'}
    backend = {**_VARIABLES, **_BACKEND_VARIABLES}
    return [
        ConfigFile(
            "q35-vhost-iommu.sh",
            "x86 q35 guest whose virtio-iommu is vhost-iommu (the default topology: IOMMU at 00:03.0,\n"
            "endpoints 00:04.0-00:1e.7), with a pci-testdev at 00:04.0.\n"
            "The guest runs the job $JOB (guest/init).",
            _setup("@JOB@"),
            {**backend, **job},
        ),
        ConfigFile(
            "q35-builtin-virtio-iommu.sh",
            "The same guest and machine behind QEMU's built-in virtio-iommu-pci, for comparisons.\n"
            "QEMU builds its own VIOT (one range over the whole root bus), so no table and no back-end.\n"
            "The guest runs the job $JOB (guest/init).",
            _setup("@JOB@", iommu=IommuKind.BUILTIN, socket_path=None, viot_path=None),
            {**_VARIABLES, **job},
        ),
        ConfigFile(
            "q35-vfio-testdev.sh",
            "Guest VFIO behind vhost-iommu: /init binds the pci-testdev at 00:04.0 to vfio-pci and runs\n"
            "vfio-dma's workloads ($BENCH, $COUNT times each): real MAP/UNMAP traffic, no device DMA.",
            _setup(
                "vfio-bench",
                kernel_args=[
                    "vhost_iommu.job=vfio-bench",
                    "vhost_iommu.count=@COUNT@",
                    "vhost_iommu.bench=@BENCH@",
                ],
            ),
            {
                **backend,
                "COUNT": ': "${COUNT:=1000}"',
                "BENCH": ': "${BENCH:=pairs,bulk,mixed}"',
            },
        ),
        ConfigFile(
            "q35-dma-engine.sh",
            "Translated DMA: vhost-iommu's DMA test engine at 00:05.0, served by vhost-iommu over vfio-user\n"
            "on $ENGINE (the default topology's [[devices]]: `vhost-iommu --socket-path=$SOCK` listens on\n"
            "dma-engine.sock beside $SOCK). Every access it makes goes through the guest's IOMMU state;\n"
            "/init drives it through VFIO ($DMA: copy, uaf, readonly, busmaster, release, bypass).",
            _setup(
                "dma-engine",
                kernel_args=["vhost_iommu.job=dma-engine", "vhost_iommu.dma=@DMA@"],
                endpoints=[PciTestDevice(4), VfioUserEndpoint(5, Path("@ENGINE@"))],
            ),
            {
                **backend,
                "ENGINE": ': "${ENGINE:=$(dirname "$SOCK")/dma-engine.sock}"  # served by vhost-iommu',
                "DMA": ': "${DMA:=copy,uaf,readonly,busmaster,release}"',
            },
        ),
        ConfigFile(
            "q35-virtio-blk-translated.sh",
            "A disk whose every DMA access vhost-iommu translates: virtio-blk at 00:05.0, served\n"
            "by vhost-iommu over vfio-user on $BLK, with the topology\n"
            "qemu-configs/topologies/virtio-blk.toml (`vhost-iommu --socket-path=$SOCK\n"
            "--topology=qemu-configs/topologies/virtio-blk.toml` serves the raw image disk.img\n"
            "beside $SOCK). The guest's own virtio_pci and virtio_blk put IOVAs in the rings and\n"
            "buffers. The guest runs the job $JOB (blk-io: write $BLK_MB MiB, read them back, md5).",
            _setup(
                "@JOB@",
                kernel_args=["vhost_iommu.job=@JOB@", "vhost_iommu.blk_mb=@BLK_MB@"],
                endpoints=[PciTestDevice(4), VfioUserEndpoint(5, Path("@BLK@"), kind="virtio-blk")],
            ),
            {
                **backend,
                "BLK": ': "${BLK:=$(dirname "$SOCK")/virtio-blk.sock}"  # served by vhost-iommu',
                "JOB": ': "${JOB:=blk-io}"  # blk-io, probe, shell, ... (guest/init)',
                "BLK_MB": ': "${BLK_MB:=64}"  # MiB the blk-io job writes and reads back',
            },
        ),
        ConfigFile(
            "q35-virtio-blk-identity.sh",
            "A DMA-doing endpoint behind vhost-iommu: virtio-blk at 00:05.0 on the raw image $DISK.\n"
            "QEMU does the disk's DMA itself with guest-physical addresses and never asks a vhost-user\n"
            "device for translations, so the guest gives it an identity domain (iommu.passthrough=1).",
            _setup(
                "blk-io",
                endpoints=[PciTestDevice(4), VirtioBlockDevice(5, Path("@DISK@"))],
            ),
            {**backend, "DISK": ': "${DISK:?set DISK to a raw disk image, e.g. truncate -s 64M disk.img}"'},
        ),
        ConfigFile(
            "virt-vhost-iommu.sh",
            "arm64 virt guest (GICv3) whose virtio-iommu is vhost-iommu at 00:03.0, with the topology\n"
            f"{_ARM_VIRT} (endpoints 00:04.0-00:1e.7, the ITS doorbell as MSI region)\n"
            "and a pci-testdev at 00:04.0. The guest learns the topology from $DTB, QEMU's own device tree\n"
            "with the IOMMU's node and iommu-map added. The guest runs the job $JOB (guest/init).",
            _arm64_setup("@JOB@", _ARM_VIRT),
            {**_arm64_variables(_ARM_VIRT), **job},
        ),
        ConfigFile(
            "virt-mmio-vhost-iommu.sh",
            "arm64 virt guest (GICv3) whose virtio-iommu is vhost-iommu on the virtio-mmio transport at\n"
            f"0x0a003e00, with the topology {_ARM_VIRT_MMIO}: the PCI endpoints\n"
            "00:04.0-00:1e.7 (a pci-testdev at 00:04.0) reach it through the PCIe host's iommu-map in $DTB.\n"
            "The guest runs the job $JOB (guest/init).",
            _arm64_setup("@JOB@", _ARM_VIRT_MMIO),
            {**_arm64_variables(_ARM_VIRT_MMIO), **job},
        ),
        ConfigFile(
            "virt-dma-engine.sh",
            "Translated DMA on arm64: vhost-iommu's DMA test engine at 00:05.0 (inside the device tree's\n"
            f"iommu-map), served over vfio-user on $ENGINE ({_ARM_VIRT}'s [[devices]]:\n"
            f"`vhost-iommu --topology={_ARM_VIRT} --socket-path=$SOCK` listens on\n"
            "dma-engine.sock beside $SOCK); /init drives it through VFIO ($DMA).",
            _arm64_setup(
                "dma-engine",
                _ARM_VIRT,
                kernel_args=["vhost_iommu.job=dma-engine", "vhost_iommu.dma=@DMA@"],
                endpoints=[PciTestDevice(4), VfioUserEndpoint(5, Path("@ENGINE@"))],
            ),
            {
                **_arm64_variables(_ARM_VIRT),
                "ENGINE": ': "${ENGINE:=$(dirname "$SOCK")/dma-engine.sock}"  # served by vhost-iommu',
                "DMA": ': "${DMA:=copy,uaf,readonly,busmaster,release}"',
            },
        ),
    ]


def render(config: ConfigFile) -> str:
    setup = config.setup
    # The memory size is a variable too: the memfd must stay as large as -m.
    command = build_command(setup)
    how_to_get = _HOW_TO_GET_ARM64 if setup.arch is Arch.ARM64 else _HOW_TO_GET
    text = command.shell_script(f"{config.title}\n\n{how_to_get}", config.variables)
    return text.replace(f"size={setup.memory_mib}M", "size=${MEM}M").replace(
        f"-m {setup.memory_mib}M", '-m "${MEM}M"'
    )


def configs_dir() -> Path:
    return repo_root() / "qemu-configs"


def main() -> int:
    for config in config_files():
        path = configs_dir() / config.name
        path.write_text(render(config))
        path.chmod(0o755)
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

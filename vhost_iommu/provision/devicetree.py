"""The Arm guest's device tree, made for one machine setup: QEMU dumps the tree its virt builds for the very
same machine options, and :func:`vhost_iommu.dtb.add_iommu` adds the IOMMU from the topology. The dump is
the I/O half (a subprocess); the codec stays bytes in, bytes out.

:func:`describe_topology` is the one place a guest booted against vhost-iommu gets its topology's firmware
description: the ACPI VIOT on x86 q35, this device tree on arm64 virt.
"""

from __future__ import annotations

import subprocess
import tempfile
from dataclasses import replace
from pathlib import Path

from vhost_iommu.device.topology import Topology
from vhost_iommu.dtb import DtbError, add_iommu
from vhost_iommu.machine import Arch, IommuFacts
from vhost_iommu.provision.errors import ProvisionError
from vhost_iommu.qemu import CommandError, QemuSetup, dtb_dump_command, placement_from
from vhost_iommu.viot import viot_from_topology

#: QEMU exits right after writing the dump; a minute covers a loaded machine.
DUMP_TIMEOUT = 60.0


def dump_machine_dtb(setup: QemuSetup) -> bytes:
    """The device tree QEMU builds for ``setup``'s machine (``-machine dumpdtb``), as it writes it."""
    with tempfile.TemporaryDirectory(prefix="vhost-iommu-dtb-") as scratch:
        output = Path(scratch) / "machine.dtb"
        try:
            argv = dtb_dump_command(setup, output).argv
        except CommandError as error:
            raise ProvisionError(str(error)) from None
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=DUMP_TIMEOUT, check=False)
        except (OSError, subprocess.TimeoutExpired) as error:
            raise ProvisionError(f"dumping the machine's device tree with {argv[0]}: {error}") from None
        if done.returncode != 0 or not output.is_file():
            raise ProvisionError(
                f"{argv[0]} did not dump its device tree (exit {done.returncode}): "
                f"{done.stderr.strip()[-500:]}"
            )
        return output.read_bytes()


def write_guest_dtb(setup: QemuSetup, topology: IommuFacts, output: Path) -> Path:
    """Dump ``setup``'s machine, add the IOMMU of ``topology`` and write the packed tree to ``output``."""
    try:
        blob = add_iommu(dump_machine_dtb(setup), topology)
    except DtbError as error:
        raise ProvisionError(f"the guest's device tree: {error}") from None
    output.write_bytes(blob)
    return output


def describe_topology(setup: QemuSetup, topology: Topology, directory: Path) -> QemuSetup:
    """``setup`` for a guest of ``topology``'s machine whose IOMMU is vhost-iommu, with the firmware
    description the guest learns the topology from written into ``directory``: the ACPI VIOT on x86_64,
    the device tree dumped from this very machine (its memory, CPUs and devices) with the IOMMU added on
    arm64."""
    setup = replace(setup, arch=topology.arch, topology=placement_from(topology))
    if topology.arch is Arch.ARM64:
        dtb = directory / "guest.dtb"
        setup = replace(setup, dtb_path=dtb)
        write_guest_dtb(setup, topology, dtb)
        return setup
    viot = directory / "viot.bin"
    viot.write_bytes(viot_from_topology(topology))
    return replace(setup, viot_path=viot)

"""The Arm guest's device tree, made for one machine setup: QEMU dumps the tree its virt builds for the very
same machine options, and :func:`vhost_iommu.dtb.add_iommu` adds the IOMMU from the topology. The dump is
the I/O half (a subprocess); the codec stays bytes in, bytes out.
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

from vhost_iommu.dtb import DtbError, add_iommu
from vhost_iommu.machine import IommuFacts
from vhost_iommu.provision.errors import ProvisionError
from vhost_iommu.qemu import CommandError, QemuSetup, dtb_dump_command

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

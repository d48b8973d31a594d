"""The guest machines a topology can describe, and where the IOMMU sits on them.

A topology names its architecture (``arch``); the architecture fixes QEMU's machine (x86_64: q35, arm64:
virt) and so how the guest learns the topology: an ACPI VIOT on q35 (``vhost-iommu viot``), a device tree
on virt (``vhost-iommu dtb``; ACPI tables cannot be added on Arm without a QEMU patch). On virt the IOMMU
is a PCI function (like q35) or one of the machine's virtio-mmio transports.
"""

from __future__ import annotations

from enum import Enum
from typing import Protocol


class Arch(Enum):
    """A guest architecture, named as ``--arch`` and ``$VHOST_IOMMU_GUEST_ARCH`` name it."""

    X86_64 = "x86_64"
    ARM64 = "arm64"


class IommuTransport(Enum):
    PCI = "pci"  # a PCI function (the generic vhost-user-test-device-pci)
    MMIO = "mmio"  # a virtio-mmio transport of virt (the generic vhost-user-test-device); arm64 only


class IommuFacts(Protocol):
    """Where the IOMMU sits and what it translates, as a firmware description or a command line needs it:
    facts ``vhost_iommu.device.topology.Topology`` exposes."""

    @property
    def iommu_transport(self) -> IommuTransport: ...

    @property
    def iommu_segment(self) -> int: ...

    @property
    def iommu_bdf(self) -> int: ...

    @property
    def iommu_mmio_address(self) -> int | None: ...

    def viot_ranges(self) -> list[tuple[int, int, int, int]]:
        """(segment, bdf_start, bdf_end, endpoint_start) of each PCI range."""
        ...


#: virt's GICv3 ITS translation register page (``gic-version=3``): the MSI doorbell endpoints write, which
#: must be the RESV_MEM MSI region (x86's 0xfee00000 window means nothing there).
VIRT_ITS_DOORBELL_START = 0x0809_0000
VIRT_ITS_DOORBELL_END = 0x0809_FFFF

#: Where each machine's guest RAM starts in guest-physical space: q35 from 0 (a guest of up to 2 GiB lies
#: entirely below the PCI hole), virt from 1 GiB (hw/arm/virt.c, VIRT_MEM).
RAM_BASE = {Arch.X86_64: 0, Arch.ARM64: 0x4000_0000}

#: virt's 32 virtio-mmio transports: 0x200 bytes each from 0x0a000000 (hw/arm/virt.c, VIRT_MMIO).
VIRT_MMIO_BASE = 0x0A00_0000
VIRT_MMIO_SIZE = 0x200
VIRT_MMIO_COUNT = 32
#: Where QEMU puts a ``-device vhost-user-test-device`` given no ``bus=``: the transport with the HIGHEST
#: address. virt creates the transports lowest address first, but each new bus is prepended to the list
#: that ``-device`` searches for a free one, so the last created (0x0a003e00, bus virtio-mmio-bus.31) is
#: taken first; virt numbers the device-tree nodes the same way, so the guest probes it at
#: virtio_mmio@a003e00. Checked with QEMU 10.2.2 (``info qtree``: the device on virtio-mmio-bus.31,
#: mmio 000000000a003e00/0000000000000200). The command lines name the bus anyway (``bus=``), so a
#: topology may pick any transport.
VIRT_DEFAULT_MMIO_TRANSPORT = VIRT_MMIO_BASE + (VIRT_MMIO_COUNT - 1) * VIRT_MMIO_SIZE


def virt_mmio_bus(address: int) -> str:
    """QEMU's name of the virtio-mmio bus whose transport sits at ``address`` on virt."""
    index, offset = divmod(address - VIRT_MMIO_BASE, VIRT_MMIO_SIZE)
    if offset or not 0 <= index < VIRT_MMIO_COUNT:
        raise ValueError(
            f"{address:#x} is not one of virt's virtio-mmio transports ({VIRT_MMIO_COUNT} of "
            f"{VIRT_MMIO_SIZE:#x} bytes from {VIRT_MMIO_BASE:#x})"
        )
    return f"virtio-mmio-bus.{index}"

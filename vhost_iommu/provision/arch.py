"""The guest architectures the project provisions for: what differs between an x86_64 and an arm64 guest
on the provisioning side (QEMU target, Debian architecture, compiler, extra modules), in one table.

``$VHOST_IOMMU_GUEST_ARCH`` names the architecture of every guest a process boots when no caller names one,
as ``$VHOST_IOMMU_GUEST_SUITE`` names the kernel's suite.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from vhost_iommu.machine import Arch
from vhost_iommu.provision.errors import ProvisionError


@dataclass(frozen=True)
class GuestArch:
    """One guest architecture: how to provision for the machine a topology's ``arch`` names."""

    machine: Arch
    qemu_target: str  # QEMU's name: the softmmu target and the binary's suffix
    debian_arch: str  # Debian's name: the kernel flavour and the architecture of downloaded packages
    # Whether the project's hosts (x86_64 Debian) run this architecture's programs: then the guest takes the
    # host's own busybox-static, else the package of its own architecture.
    native: bool
    # The C compiler for the guest programs and the host packages that provide it with a static libc.
    compiler: str
    compiler_packages: tuple[str, ...]
    # Modules this architecture's guest loads before the common ones (its transports' drivers).
    first_modules: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        """What --arch and $VHOST_IOMMU_GUEST_ARCH take (the topology's ``arch``)."""
        return self.machine.value

    @property
    def qemu_binary(self) -> str:
        return f"qemu-system-{self.qemu_target}"

    @property
    def kernel_meta_package(self) -> str:
        return f"linux-image-{self.debian_arch}"


X86_64 = GuestArch(Arch.X86_64, "x86_64", "amd64", True, "gcc", ("gcc", "libc6-dev"))
# The guest programs are cross-compiled with bookworm's cross toolchain; virtio-mmio (the second transport
# of QEMU's virt machine) is a module in Debian's arm64 kernel, loaded before virtio_iommu so that an
# IOMMU on that transport is found when virtio_iommu probes.
ARM64 = GuestArch(
    Arch.ARM64,
    "aarch64",
    "arm64",
    False,
    "aarch64-linux-gnu-gcc",
    ("gcc-aarch64-linux-gnu", "libc6-dev-arm64-cross"),
    first_modules=("virtio_mmio",),
)

ARCHES = {arch.name: arch for arch in (X86_64, ARM64)}
DEFAULT_ARCH = X86_64
#: Names the architecture of every guest this process boots when no caller names one.
ARCH_VARIABLE = "VHOST_IOMMU_GUEST_ARCH"


def guest_arch(name: str | None = None) -> GuestArch:
    """The architecture called ``name``; with None, ``$VHOST_IOMMU_GUEST_ARCH``, else x86_64."""
    chosen = name or os.environ.get(ARCH_VARIABLE) or DEFAULT_ARCH.name
    if chosen not in ARCHES:
        raise ProvisionError(f"no guest architecture {chosen!r}: choose one of {', '.join(ARCHES)}")
    return ARCHES[chosen]


def provisioning_for(machine: Arch) -> GuestArch:
    """How to provision guests of ``machine`` (a topology's ``arch``)."""
    return ARCHES[machine.value]

"""The project's private view of the Debian archive: trixie's binaries and sid/forky's sources, and the
binaries of each suite a guest kernel may come from."""

from __future__ import annotations

from vhost_iommu.provision.apt import PrivateApt, SourceLine
from vhost_iommu.provision.arch import X86_64, GuestArch
from vhost_iommu.provision.paths import cache_root

# trixie carries the guest kernel (6.12 with VIRTIO_IOMMU and ACPI_VIOT); sid and forky carry QEMU 10.2.
PROJECT_SOURCES = (
    SourceLine("deb", "trixie"),
    SourceLine("deb-src", "sid"),
    SourceLine("deb-src", "forky"),
)


def project_apt() -> PrivateApt:
    """The one private apt state shared by the QEMU and guest provisioning (indexes fetched once)."""
    return PrivateApt(cache_root() / "apt", PROJECT_SOURCES)


#: The suites ``scripts/build-guest --suite`` takes a kernel from, oldest kernel line first.
KERNEL_SUITES = ("trixie", "trixie-backports", "sid")


def kernel_apt(suite: str, arch: GuestArch = X86_64) -> PrivateApt:
    """The apt state that lists ``suite``'s binaries for ``arch``: for x86_64 the project's own for trixie, a
    small one of its own for any other suite (its binary index alone, so that no other suite's kernel shows
    in it); for another architecture a small one per suite, that architecture's packages alone."""
    if suite not in KERNEL_SUITES:
        raise ValueError(f"no kernel suite {suite!r}")
    if arch == X86_64:
        if suite == "trixie":
            return project_apt()
        return PrivateApt(cache_root() / "apt-kernel" / suite, (SourceLine("deb", suite),))
    return PrivateApt(
        cache_root() / "apt-kernel" / arch.debian_arch / suite,
        (SourceLine("deb", suite),),
        architecture=arch.debian_arch,
    )

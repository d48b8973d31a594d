"""The project's private view of the Debian archive: trixie's binaries and sid/forky's sources."""

from __future__ import annotations

from vhost_iommu.provision.apt import PrivateApt, SourceLine
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

"""PCI functions as a device model sees them: configuration space, BARs, MSI-X, reset (no transport)."""

from vhost_iommu.pci.function import (
    CONFIG_SPACE_SIZE,
    MsixLayout,
    PciFunction,
    PciIdentity,
)

__all__ = ["CONFIG_SPACE_SIZE", "MsixLayout", "PciFunction", "PciIdentity"]

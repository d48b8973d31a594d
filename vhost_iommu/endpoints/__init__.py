"""PCI endpoint devices whose DMA the virtio-iommu translates (served to QEMU over vfio-user)."""

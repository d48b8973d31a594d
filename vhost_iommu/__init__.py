"""vhost-iommu: a virtio-iommu device served as a vhost-user back-end."""

__version__ = "0.1.0"

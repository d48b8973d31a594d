"""Obtaining the tools the end-to-end tests need: a new-enough QEMU and a Linux guest image.

Everything here is a cold path run once per machine; results are cached outside the repository in
:func:`vhost_iommu.provision.paths.cache_root` (``$VHOST_IOMMU_CACHE`` or ``~/.cache/vhost-iommu``).
"""

from vhost_iommu.provision.errors import ProvisionError

__all__ = ["ProvisionError"]

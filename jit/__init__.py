"""numba kernels of vhost-iommu, installed as ``vhost_iommu.jit``."""

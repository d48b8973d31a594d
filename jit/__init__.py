"""numba kernels of vhost-iommu, installed as ``vhost_iommu.jit``.

Kernels are pure functions over numpy arrays and scalars, compiled with ``cache=True``; :func:`warm_up`
compiles (or loads from numba's cache) every one of them, so that no request waits for a compiler.
"""


def warm_up() -> None:
    """Compile every kernel with the signatures the back-end uses."""
    from vhost_iommu.jit import barriers, blk, bulk, dma, guard, kickloop, requests, tables

    barriers.warm_up()
    guard.warm_up()
    tables.warm_up()
    bulk.warm_up()
    requests.warm_up()
    kickloop.warm_up()
    dma.warm_up()
    blk.warm_up()

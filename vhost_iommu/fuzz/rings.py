"""What a driver writes into a split virtqueue, in the virtqueue module's own layout: the targets that
write descriptor tables (``chains``, ``backend``, ``server``) pack and read descriptors with this."""

from __future__ import annotations

import struct

from vhost_iommu.virtqueue import DESC_DTYPE, DESC_SIZE

__all__ = ["DESCRIPTOR"]

_UNSIGNED = {1: "B", 2: "H", 4: "I", 8: "Q"}

#: One descriptor table entry (addr, len, flags, next), as :data:`vhost_iommu.virtqueue.DESC_DTYPE` lays
#: it out.
DESCRIPTOR = struct.Struct(
    "<" + "".join(_UNSIGNED[DESC_DTYPE[name].itemsize] for name in DESC_DTYPE.names or ())
)
if DESCRIPTOR.size != DESC_SIZE or DESC_DTYPE.itemsize != DESC_SIZE:
    raise ImportError(f"descriptor layout {DESCRIPTOR.format!r} is not the virtqueue's {DESC_DTYPE}")

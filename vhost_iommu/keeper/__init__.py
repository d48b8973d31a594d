"""The keeper: a small process that owns the vhost-user connections so that the device worker can die.

``vhost-iommu serve --state-dir DIR`` runs :mod:`vhost_iommu.keeper.keeper` (stdlib and the sans-I/O codec
only: it never needs upgrading), which spawns the device worker (:mod:`vhost_iommu.keeper.worker`, the
whole back-end) and relays every vhost-user message between QEMU and it over :mod:`vhost_iommu.keeper.wire`.
docs/restart.md tells the whole story. Importing this package imports nothing heavy.
"""

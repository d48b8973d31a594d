"""Device state that survives the device worker: a journal of every request served, and snapshots.

- `statedir`: the state directory and one subdirectory per guest (0600 files, nothing followed)
- `journal`: the mmap'd journal of fixed-size records, each committed by a word written last
- `image`: the snapshot format (the device state a journal starts from)
- `persistence`: the files of one guest, rotation, loading
- `replay`: a device rebuilt from a snapshot and its journal

docs/persistence.md describes the whole; `vhost_iommu.virtio_iommu.VirtioIommuBackend` uses it.
"""

from vhost_iommu.persist.persistence import Persistence
from vhost_iommu.persist.statedir import GuestDir, StateDir, StateError

__all__ = ["GuestDir", "Persistence", "StateDir", "StateError"]

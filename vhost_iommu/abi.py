"""Numbers fixed outside this program's code, each defined once: virtio 1.3 (feature bits, split rings,
the virtio-iommu device) and the journal's record layout (a previous worker's file holds it).

A leaf: it imports nothing of the package and holds plain ints, so the numba kernels in ``jit/`` read
them as compile-time constants (numba freezes a module's int globals when it compiles a function) and
every Python module imports them from here. The vhost-user protocol's own numbers live in
``vhost_iommu.protocol.constants``, the same kind of leaf. Byte layouts as ``struct`` formats, the enums
and the encoders built on these numbers are in ``vhost_iommu.device.layout``.
"""

from __future__ import annotations

from typing import Final

U32_MAX: Final = (1 << 32) - 1
U64_MAX: Final = (1 << 64) - 1

# -- virtio feature bits of every device (virtio 1.3, "Reserved Feature Bits") ----------------------------

VIRTIO_RING_F_INDIRECT_DESC: Final = 1 << 28
VIRTIO_RING_F_EVENT_IDX: Final = 1 << 29
VIRTIO_F_VERSION_1: Final = 1 << 32
VIRTIO_F_ACCESS_PLATFORM: Final = 1 << 33
"""The device's DMA goes through the platform's IOMMU: ring and buffer addresses are IOVAs."""

# Device status bits (virtio 1.3, "Device Status Field").
VIRTIO_CONFIG_S_ACKNOWLEDGE: Final = 0x01
VIRTIO_CONFIG_S_DRIVER: Final = 0x02
VIRTIO_CONFIG_S_DRIVER_OK: Final = 0x04
VIRTIO_CONFIG_S_FEATURES_OK: Final = 0x08
VIRTIO_CONFIG_S_NEEDS_RESET: Final = 0x40
"""The back-end sets it when it has hit an error it cannot recover from."""

# -- split virtqueues (virtio 1.3, "Split Virtqueues") -----------------------------------------------------

VIRTQ_DESC_F_NEXT: Final = 1
VIRTQ_DESC_F_WRITE: Final = 2
VIRTQ_DESC_F_INDIRECT: Final = 4
VIRTQ_AVAIL_F_NO_INTERRUPT: Final = 1
VIRTQ_USED_F_NO_NOTIFY: Final = 1
DESC_SIZE: Final = 16
"""struct virtq_desc {le64 addr; le32 len; le16 flags; le16 next}."""
MAX_QUEUE_SIZE: Final = 32768
# "Drivers MUST NOT add a descriptor chain longer than 2^32 bytes in total."
MAX_CHAIN_BYTES: Final = 1 << 32

# -- the virtio-iommu device (virtio 1.3, "IOMMU Device") ------------------------------------------------

VIRTIO_ID_IOMMU: Final = 23
"""The device ID (virtio 1.3, "Device Types")."""
REQUEST_QUEUE: Final = 0
EVENT_QUEUE: Final = 1
QUEUE_COUNT: Final = 2

F_INPUT_RANGE: Final = 1 << 0
F_DOMAIN_RANGE: Final = 1 << 1
F_MAP_UNMAP: Final = 1 << 2
F_BYPASS: Final = 1 << 3
"""Legacy; superseded by F_BYPASS_CONFIG and never offered by this device."""
F_PROBE: Final = 1 << 4
F_MMIO: Final = 1 << 5
F_BYPASS_CONFIG: Final = 1 << 6

T_ATTACH: Final = 1
T_DETACH: Final = 2
T_MAP: Final = 3
T_UNMAP: Final = 4
T_PROBE: Final = 5

S_OK: Final = 0
S_IOERR: Final = 1
S_UNSUPP: Final = 2
S_DEVERR: Final = 3
S_INVAL: Final = 4
S_RANGE: Final = 5
S_NOENT: Final = 6
S_FAULT: Final = 7
S_NOMEM: Final = 8

ATTACH_F_BYPASS: Final = 1 << 0

MAP_F_READ: Final = 1 << 0
MAP_F_WRITE: Final = 1 << 1
MAP_F_MMIO: Final = 1 << 2

PROBE_T_NONE: Final = 0
PROBE_T_RESV_MEM: Final = 1
PROBE_T_MASK: Final = 0x0FFF
RESV_MEM_T_RESERVED: Final = 0
RESV_MEM_T_MSI: Final = 1

FAULT_R_UNKNOWN: Final = 0
FAULT_R_DOMAIN: Final = 1
FAULT_R_MAPPING: Final = 2
FAULT_F_READ: Final = 1 << 0
FAULT_F_WRITE: Final = 1 << 1
FAULT_F_EXEC: Final = 1 << 2
"""Not in the virtio 1.3 text of struct virtio_iommu_fault, but defined with this value by the
virtio_iommu.h header that Linux and QEMU share, and decoded by the Linux driver ("X")."""
FAULT_F_ADDRESS: Final = 1 << 8

# Sizes in bytes of the packed little-endian structs (``vhost_iommu.device.layout`` has their formats).
HEAD_SIZE: Final = 4
"""struct virtio_iommu_req_head {u8 type; u8 reserved[3]}."""
TAIL_SIZE: Final = 4
"""struct virtio_iommu_req_tail {u8 status; u8 reserved[3]}."""
ATTACH_SIZE: Final = 20
"""The device-readable part of an ATTACH: head, domain, endpoint, flags, reserved[4] (the tail apart,
as for every request size here)."""
DETACH_SIZE: Final = 20
MAP_SIZE: Final = 36
UNMAP_SIZE: Final = 28
PROBE_SIZE: Final = 72
CONFIG_SIZE: Final = 40
FAULT_SIZE: Final = 24
"""struct virtio_iommu_fault: one eventq buffer's worth."""
PROPERTY_HEAD_SIZE: Final = 4
RESV_MEM_SIZE: Final = 24

# Byte offsets of the fields of the readable part of MAP and UNMAP (after the head).
REQ_DOMAIN: Final = 4
REQ_VIRT_START: Final = 8
REQ_VIRT_END: Final = 16
MAP_PHYS_START: Final = 24
MAP_FLAGS: Final = 32
UNMAP_RESERVED: Final = 24

# Byte offsets of the config fields (struct virtio_iommu_config).
CONFIG_PAGE_SIZE_MASK: Final = 0
CONFIG_INPUT_RANGE: Final = 8
CONFIG_DOMAIN_RANGE: Final = 24
CONFIG_PROBE_SIZE: Final = 32
CONFIG_BYPASS: Final = 36

# -- virtio over PCI, the modern transport (virtio 1.3, "Virtio Over PCI Bus") ----------------------------

VIRTIO_PCI_VENDOR: Final = 0x1AF4
VIRTIO_PCI_DEVICE_BASE: Final = 0x1040
"""A modern device's PCI device ID is this plus its virtio device ID."""
PCI_CAP_ID_VENDOR: Final = 0x09
VIRTIO_PCI_CAP_COMMON_CFG: Final = 1
VIRTIO_PCI_CAP_NOTIFY_CFG: Final = 2
VIRTIO_PCI_CAP_ISR_CFG: Final = 3
VIRTIO_PCI_CAP_DEVICE_CFG: Final = 4
# struct virtio_pci_common_cfg: each field's offset
VIRTIO_PCI_COMMON_DEVICE_FEATURE_SELECT: Final = 0x00
VIRTIO_PCI_COMMON_DEVICE_FEATURE: Final = 0x04
VIRTIO_PCI_COMMON_DRIVER_FEATURE_SELECT: Final = 0x08
VIRTIO_PCI_COMMON_DRIVER_FEATURE: Final = 0x0C
VIRTIO_PCI_COMMON_CONFIG_MSIX_VECTOR: Final = 0x10
VIRTIO_PCI_COMMON_NUM_QUEUES: Final = 0x12
VIRTIO_PCI_COMMON_DEVICE_STATUS: Final = 0x14
VIRTIO_PCI_COMMON_CONFIG_GENERATION: Final = 0x15
VIRTIO_PCI_COMMON_QUEUE_SELECT: Final = 0x16
VIRTIO_PCI_COMMON_QUEUE_SIZE: Final = 0x18
VIRTIO_PCI_COMMON_QUEUE_MSIX_VECTOR: Final = 0x1A
VIRTIO_PCI_COMMON_QUEUE_ENABLE: Final = 0x1C
VIRTIO_PCI_COMMON_QUEUE_NOTIFY_OFF: Final = 0x1E
VIRTIO_PCI_COMMON_QUEUE_DESC: Final = 0x20
VIRTIO_PCI_COMMON_QUEUE_DRIVER: Final = 0x28
VIRTIO_PCI_COMMON_QUEUE_DEVICE: Final = 0x30
VIRTIO_PCI_COMMON_QUEUE_NOTIFY_DATA: Final = 0x38
VIRTIO_PCI_COMMON_QUEUE_RESET: Final = 0x3A
VIRTIO_MSI_NO_VECTOR: Final = 0xFFFF
VIRTIO_PCI_ISR_QUEUE: Final = 0x1
VIRTIO_PCI_ISR_CONFIG: Final = 0x2

# -- the block device (virtio 1.3, "Block Device") -----------------------------------------------------------

VIRTIO_ID_BLOCK: Final = 2
VIRTIO_BLK_F_SIZE_MAX: Final = 1 << 1
VIRTIO_BLK_F_SEG_MAX: Final = 1 << 2
VIRTIO_BLK_F_RO: Final = 1 << 5
VIRTIO_BLK_F_BLK_SIZE: Final = 1 << 6
VIRTIO_BLK_F_FLUSH: Final = 1 << 9
VIRTIO_BLK_T_IN: Final = 0
VIRTIO_BLK_T_OUT: Final = 1
VIRTIO_BLK_T_FLUSH: Final = 4
VIRTIO_BLK_T_GET_ID: Final = 8
VIRTIO_BLK_S_OK: Final = 0
VIRTIO_BLK_S_IOERR: Final = 1
VIRTIO_BLK_S_UNSUPP: Final = 2
VIRTIO_BLK_SECTOR_SIZE: Final = 512
"""Request sectors are 512 bytes whatever the block size."""
VIRTIO_BLK_ID_BYTES: Final = 20
VIRTIO_BLK_HEADER_SIZE: Final = 16
"""struct virtio_blk_outhdr {le32 type; le32 reserved; le64 sector}."""

# -- the journal's records (``vhost_iommu.persist.journal`` has the whole file layout) ---------------------
# RECORD_WORDS u64 per record: [0] commit, [1] kind/status/queue/flags/used length, [2] ring positions
# or a value, [3..] the first J_REQUEST_BYTES readable bytes of a request. The compiled request path
# (``vhost_iommu.jit.requests``) writes REQUEST records with these numbers through raw addresses.

RECORD_WORDS: Final = 8
J_REQUEST_BYTES: Final = 40
"""Readable bytes of a request kept in its record: more than any request's layout."""
J_REQUEST_WORD: Final = 3
"""The word where a REQUEST record's request bytes start."""
J_NO_STATUS: Final = 0xFF
"""Status field of a chain whose tail was not found (nothing written, used length 0)."""

KIND_REQUEST: Final = 1
KIND_FEATURES: Final = 2
KIND_BYPASS: Final = 3
KIND_RESET: Final = 4
KIND_RING: Final = 5
F_FORCED: Final = 1
"""The answer was forced by an injection (``IommuDevice.inject``): nothing was applied."""

# Word 1: kind (bits 0-7), status (8-15), queue (16-23), flags (24-31: F_*), used length (32-63).
J_STATUS_SHIFT: Final = 8
J_QUEUE_SHIFT: Final = 16
J_FLAGS_SHIFT: Final = 24
J_USED_LENGTH_SHIFT: Final = 32
# Word 2 of a REQUEST: ring position of the chain (bits 0-15), used-ring position (16-31), head (32-47).
J_USED_POS_SHIFT: Final = 16
J_HEAD_SHIFT: Final = 32

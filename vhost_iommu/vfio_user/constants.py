"""Numbers of the vfio-user protocol (QEMU ``docs/interop/vfio-user.rst``) and of the ``<linux/vfio.h>``
structures it reuses.

Only numbers live here: command codes, header flag bits, the fixed sizes of the wire structures, the flag
bits and indexes of the VFIO structures, and the limits this implementation enforces on what a client
sends (and advertises to it in the VERSION reply).
"""

from __future__ import annotations

import enum


class Command(enum.IntEnum):
    """Command codes ("Commands"); 14 is QEMU's ``VFIO_USER_DIRTY_PAGES`` (hw/vfio-user/protocol.h)."""

    VERSION = 1
    DMA_MAP = 2
    DMA_UNMAP = 3
    DEVICE_GET_INFO = 4
    DEVICE_GET_REGION_INFO = 5
    DEVICE_GET_REGION_IO_FDS = 6
    DEVICE_GET_IRQ_INFO = 7
    DEVICE_SET_IRQS = 8
    REGION_READ = 9
    REGION_WRITE = 10
    DMA_READ = 11
    DMA_WRITE = 12
    DEVICE_RESET = 13
    DIRTY_PAGES = 14
    REGION_WRITE_MULTI = 15
    DEVICE_FEATURE = 16
    MIG_DATA_READ = 17
    MIG_DATA_WRITE = 18


#: Commands only the server sends (client -> server is a protocol violation).
SERVER_TO_CLIENT_COMMANDS = frozenset({Command.DMA_READ, Command.DMA_WRITE})

# -- the 16-byte header: u16 message id, u16 command, u32 message size (header included), u32 flags,
# u32 error (an errno in an error reply; reserved, so zero, in a command).
HEADER_SIZE = 16
#: Flags bits 0-3: the message type.
FLAG_TYPE_MASK = 0xF
TYPE_COMMAND = 0x0
TYPE_REPLY = 0x1
#: Flags bit 4: the sender wants no reply to this command.
FLAG_NO_REPLY = 1 << 4
#: Flags bit 5: this reply reports an error (its errno is in the error field).
FLAG_ERROR = 1 << 5
KNOWN_HEADER_FLAGS = FLAG_TYPE_MASK | FLAG_NO_REPLY | FLAG_ERROR

#: The only protocol version spoken (QEMU's VFIO_USER_MAJOR_VER / MINOR_VER).
VERSION_MAJOR = 0
VERSION_MINOR = 0

# -- fixed payload sizes (the part before any variable data) -------------------------------------------------
VERSION_FIXED_SIZE = 4  # u16 major, u16 minor, then optional NUL-terminated JSON
DMA_MAP_SIZE = 32  # argsz, flags, offset, address, size
DMA_UNMAP_SIZE = 24  # argsz, flags, address, size
DEVICE_INFO_SIZE = 16  # argsz, flags, num_regions, num_irqs
REGION_INFO_SIZE = 32  # argsz, flags, index, cap_offset, size, offset
REGION_IO_FDS_SIZE = 16  # argsz, flags, index, count (the reply's sub-regions follow)
IRQ_INFO_SIZE = 16  # argsz, flags, index, count
IRQ_SET_SIZE = 20  # argsz, flags, index, start, count, then data
REGION_ACCESS_SIZE = 16  # offset (u64), region, count, then data

# -- DMA_MAP / DMA_UNMAP flags (vfio_iommu_type1_dma_map / _unmap) -------------------------------------------
DMA_MAP_FLAG_READ = 1 << 0
DMA_MAP_FLAG_WRITE = 1 << 1
DMA_MAP_FLAGS = DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE
#: ``VFIO_DMA_UNMAP_FLAG_ALL``: every mapping at once (address and size 0). QEMU sends it for a section that
#: spans the whole 64-bit space (with a vIOMMU in QEMU).
DMA_UNMAP_FLAG_ALL = 1 << 1
DMA_UNMAP_FLAGS = DMA_UNMAP_FLAG_ALL

# -- device info flags (vfio_device_info) --------------------------------------------------------------------
DEVICE_FLAGS_RESET = 1 << 0
DEVICE_FLAGS_PCI = 1 << 1

# -- PCI region indexes (enum VFIO_PCI_*_REGION_INDEX) -------------------------------------------------------
VFIO_PCI_BAR0_REGION_INDEX = 0
VFIO_PCI_BAR1_REGION_INDEX = 1
VFIO_PCI_BAR2_REGION_INDEX = 2
VFIO_PCI_BAR3_REGION_INDEX = 3
VFIO_PCI_BAR4_REGION_INDEX = 4
VFIO_PCI_BAR5_REGION_INDEX = 5
VFIO_PCI_ROM_REGION_INDEX = 6
VFIO_PCI_CONFIG_REGION_INDEX = 7
VFIO_PCI_VGA_REGION_INDEX = 8
VFIO_PCI_NUM_REGIONS = 9

# -- region info flags (vfio_region_info) --------------------------------------------------------------------
REGION_INFO_FLAG_READ = 1 << 0
REGION_INFO_FLAG_WRITE = 1 << 1
REGION_INFO_FLAG_MMAP = 1 << 2
REGION_INFO_FLAG_CAPS = 1 << 3
REGION_INFO_FLAGS = (
    REGION_INFO_FLAG_READ | REGION_INFO_FLAG_WRITE | REGION_INFO_FLAG_MMAP | REGION_INFO_FLAG_CAPS
)

# -- PCI IRQ indexes (enum VFIO_PCI_*_IRQ_INDEX) -------------------------------------------------------------
VFIO_PCI_INTX_IRQ_INDEX = 0
VFIO_PCI_MSI_IRQ_INDEX = 1
VFIO_PCI_MSIX_IRQ_INDEX = 2
VFIO_PCI_ERR_IRQ_INDEX = 3
VFIO_PCI_REQ_IRQ_INDEX = 4
VFIO_PCI_NUM_IRQS = 5

# -- IRQ info flags (vfio_irq_info) --------------------------------------------------------------------------
IRQ_INFO_EVENTFD = 1 << 0
IRQ_INFO_MASKABLE = 1 << 1
IRQ_INFO_AUTOMASKED = 1 << 2
IRQ_INFO_NORESIZE = 1 << 3
IRQ_INFO_FLAGS = IRQ_INFO_EVENTFD | IRQ_INFO_MASKABLE | IRQ_INFO_AUTOMASKED | IRQ_INFO_NORESIZE

# -- SET_IRQS flags (vfio_irq_set): exactly one DATA bit and exactly one ACTION bit --------------------------
IRQ_SET_DATA_NONE = 1 << 0
IRQ_SET_DATA_BOOL = 1 << 1
IRQ_SET_DATA_EVENTFD = 1 << 2
IRQ_SET_DATA_MASK = IRQ_SET_DATA_NONE | IRQ_SET_DATA_BOOL | IRQ_SET_DATA_EVENTFD
IRQ_SET_ACTION_MASK = 1 << 3
IRQ_SET_ACTION_UNMASK = 1 << 4
IRQ_SET_ACTION_TRIGGER = 1 << 5
IRQ_SET_ACTION_TYPE_MASK = IRQ_SET_ACTION_MASK | IRQ_SET_ACTION_UNMASK | IRQ_SET_ACTION_TRIGGER

# -- VERSION capabilities (JSON member names) ----------------------------------------------------------------
CAPABILITIES_KEY = "capabilities"
CAP_MAX_MSG_FDS = "max_msg_fds"
CAP_MAX_DATA_XFER_SIZE = "max_data_xfer_size"
CAP_PGSIZES = "pgsizes"
CAP_MAX_DMA_MAPS = "max_dma_maps"
CAP_MIGRATION = "migration"
CAP_TWIN_SOCKET = "twin_socket"
CAP_WRITE_MULTIPLE = "write_multiple"

# -- limits this implementation enforces (and advertises in its VERSION reply) -------------------------------
#: The most fds one message may carry (QEMU's VFIO_USER_MAX_MAX_FDS); advertised as max_msg_fds, so QEMU
#: splits SET_IRQS into messages of at most this many eventfds.
MAX_FDS_PER_MESSAGE = 16
#: The largest REGION_READ/WRITE count (the spec's default max_data_xfer_size, 1 MiB).
MAX_DATA_XFER_SIZE = 1 << 20
#: The largest message accepted: a REGION_WRITE of MAX_DATA_XFER_SIZE bytes. Anything larger is not
#: buffered: the peer is broken or hostile.
MAX_MESSAGE_SIZE = HEADER_SIZE + REGION_ACCESS_SIZE + MAX_DATA_XFER_SIZE
#: The largest VERSION JSON accepted (NUL included); QEMU 10.2 sends about 200 bytes.
MAX_VERSION_DATA_SIZE = 4096
#: The DMA page size (advertised as pgsizes): DMA_MAP/UNMAP addresses and sizes are multiples of it.
DMA_PAGE_SIZE = 4096
#: The most vectors one SET_IRQS may name: an MSI-X table's maximum size.
MAX_IRQ_VECTORS = 2048
#: The most DMA mappings a client may have at once (the spec's default max_dma_maps): advertised; the server
#: keeps the count (the codec sees one message at a time).
MAX_DMA_MAPS = 65535

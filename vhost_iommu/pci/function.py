"""The configuration space of one PCI function served to a VMM, and its function-level state.

What the model owns is what the VMM's vfio client does not emulate itself (QEMU's vfio-pci emulates
BAR sizing, the capability-list pointers it rewrites, and the MSI-X capability's control word and table):
identity (vendor, device, class, subsystem), the command and status registers (Bus Master gates the
function's DMA), the BAR type bits, and the MSI-X capability's table and PBA location. Everything is
validated against the 256-byte conventional configuration space: an access outside it, of an odd size or
crossing its end is refused with :class:`PciAccessError` (the transport turns that into an error reply).

Writes are masked per byte: only bits a real function lets software change are changed (command
register bits, the BAR address bits above the BAR's size, the interrupt line). Function reset puts every
register back to its power-on value.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

CONFIG_SPACE_SIZE = 256

# Header offsets (PCI Local Bus 3.0, type 0 header).
VENDOR_ID = 0x00
DEVICE_ID = 0x02
COMMAND = 0x04
STATUS = 0x06
REVISION_ID = 0x08
CLASS_CODE = 0x09  # 3 bytes: programming interface, subclass, base class
HEADER_TYPE = 0x0E
BAR0 = 0x10
BAR_COUNT = 6
SUBSYSTEM_VENDOR_ID = 0x2C
SUBSYSTEM_ID = 0x2E
CAPABILITIES_POINTER = 0x34
INTERRUPT_LINE = 0x3C
INTERRUPT_PIN = 0x3D

COMMAND_MEMORY = 1 << 1
COMMAND_BUS_MASTER = 1 << 2
COMMAND_INTX_DISABLE = 1 << 10
#: The command bits this model lets software set: memory decoding, bus mastering, INTx disable.
COMMAND_WRITABLE = COMMAND_MEMORY | COMMAND_BUS_MASTER | COMMAND_INTX_DISABLE
STATUS_CAPABILITIES_LIST = 1 << 4

BAR_MEMORY_32 = 0x0  # memory space, 32-bit, not prefetchable (bits 0-3 of the BAR)

CAP_ID_MSIX = 0x11
MSIX_CAPABILITY_OFFSET = 0x40
MSIX_CAPABILITY_SIZE = 12


class PciAccessError(ValueError):
    """A configuration-space access the function refuses (out of range, bad size)."""


@dataclass(frozen=True, slots=True)
class PciIdentity:
    vendor: int
    device: int
    class_code: int  # base class << 16 | subclass << 8 | programming interface
    subsystem_vendor: int = 0
    subsystem: int = 0
    revision: int = 0


@dataclass(frozen=True, slots=True)
class MsixLayout:
    """Where the MSI-X table and PBA sit: BAR index and offset in it, and how many vectors."""

    vectors: int
    table_bar: int
    table_offset: int
    pba_bar: int
    pba_offset: int

    def __post_init__(self) -> None:
        if not 1 <= self.vectors <= 2048:
            raise ValueError(f"MSI-X has 1 to 2048 vectors, not {self.vectors}")
        for name, offset in (("table", self.table_offset), ("PBA", self.pba_offset)):
            if offset % 8:
                raise ValueError(f"the MSI-X {name} offset {offset:#x} must be 8-byte aligned")


def check_span(offset: int, size: int, limit: int, what: str) -> None:
    """Refuse an access that is empty or not wholly inside ``limit`` bytes."""
    if size < 1 or offset < 0 or offset + size > limit:
        raise PciAccessError(f"{what}: {size} bytes at {offset:#x} are outside its {limit:#x} bytes")


def check_access(offset: int, size: int, limit: int, what: str) -> None:
    """Refuse an access that is not 1, 2, 4 or 8 bytes wholly inside ``limit`` bytes."""
    if size not in (1, 2, 4, 8):
        raise PciAccessError(f"{what}: an access of {size} bytes (1, 2, 4 or 8)")
    if offset < 0 or offset + size > limit:
        raise PciAccessError(f"{what}: {size} bytes at {offset:#x} are outside its {limit:#x} bytes")


class PciFunction:
    """Configuration space of a type 0 function with 32-bit memory BARs and optional MSI-X."""

    def __init__(
        self,
        identity: PciIdentity,
        bar_sizes: tuple[int, ...],
        msix: MsixLayout | None,
        capabilities: tuple[tuple[int, bytes], ...] = (),
    ) -> None:
        """``capabilities``: more read-only capabilities after MSI-X's, each (capability ID, its bytes
        after the ID and next-pointer bytes), such as virtio's vendor-specific ones."""
        if len(bar_sizes) > BAR_COUNT:
            raise ValueError(f"at most {BAR_COUNT} BARs")
        for index, size in enumerate(bar_sizes):
            if size and (size < 16 or size & (size - 1) or size > 1 << 31):
                raise ValueError(f"BAR{index}: size {size:#x} must be 0 or a power of two 16 B..2 GiB")
        if msix is not None:
            for bar, offset, length, name in (
                (msix.table_bar, msix.table_offset, 16 * msix.vectors, "table"),
                (msix.pba_bar, msix.pba_offset, 8 * ((msix.vectors + 63) // 64), "PBA"),
            ):
                if bar >= len(bar_sizes) or offset + length > bar_sizes[bar]:
                    raise ValueError(f"the MSI-X {name} does not fit in BAR{bar}")
        self.identity = identity
        self.bar_sizes = bar_sizes + (0,) * (BAR_COUNT - len(bar_sizes))
        self.msix = msix
        self.capabilities = capabilities
        if self._capability_offsets()[-1] > CONFIG_SPACE_SIZE:
            raise ValueError("the capabilities do not fit in the configuration space")
        self._power_on = self._build()
        self._writable = self._writable_masks()
        self.config = bytearray(self._power_on)

    def _build(self) -> bytes:
        config = bytearray(CONFIG_SPACE_SIZE)
        ident = self.identity
        struct.pack_into("<HH", config, VENDOR_ID, ident.vendor, ident.device)
        config[REVISION_ID] = ident.revision
        config[CLASS_CODE : CLASS_CODE + 3] = ident.class_code.to_bytes(3, "little")
        struct.pack_into("<HH", config, SUBSYSTEM_VENDOR_ID, ident.subsystem_vendor, ident.subsystem)
        for index, size in enumerate(self.bar_sizes):
            if size:
                struct.pack_into("<I", config, BAR0 + 4 * index, BAR_MEMORY_32)
        chain: list[tuple[int, bytes]] = []
        if self.msix is not None:
            msix = self.msix
            body = struct.pack(
                "<HII",
                msix.vectors - 1,  # table size - 1; enable and mask bits start clear
                msix.table_offset | msix.table_bar,
                msix.pba_offset | msix.pba_bar,
            )
            chain.append((CAP_ID_MSIX, body))
        chain.extend(self.capabilities)
        offsets = self._capability_offsets()
        if chain:
            struct.pack_into("<H", config, STATUS, STATUS_CAPABILITIES_LIST)
            config[CAPABILITIES_POINTER] = offsets[0]
        for index, (cap_id, body) in enumerate(chain):
            at = offsets[index]
            following = offsets[index + 1] if index + 1 < len(chain) else 0  # 0: the last capability
            config[at : at + 2 + len(body)] = bytes((cap_id, following)) + body
        return bytes(config)

    def _capability_offsets(self) -> list[int]:
        """Where each capability starts (MSI-X's first, at MSIX_CAPABILITY_OFFSET; each 4-byte aligned),
        then the end of the last."""
        sizes = ([MSIX_CAPABILITY_SIZE] if self.msix is not None else []) + [
            2 + len(body) for _cap_id, body in self.capabilities
        ]
        offsets = [MSIX_CAPABILITY_OFFSET]
        for size in sizes:
            offsets.append(offsets[-1] + (size + 3) // 4 * 4)
        return offsets

    def _writable_masks(self) -> bytes:
        masks = bytearray(CONFIG_SPACE_SIZE)
        struct.pack_into("<H", masks, COMMAND, COMMAND_WRITABLE)
        for index, size in enumerate(self.bar_sizes):
            if size:
                struct.pack_into("<I", masks, BAR0 + 4 * index, ~(size - 1) & 0xFFFF_FFFF)
        masks[INTERRUPT_LINE] = 0xFF
        if self.msix is not None:
            # Message control: MSI-X enable (bit 15) and function mask (bit 14).
            struct.pack_into("<H", masks, MSIX_CAPABILITY_OFFSET + 2, 0xC000)
        return bytes(masks)

    # -- configuration space ------------------------------------------------------------------------------

    # The VMM reads and writes configuration space in any size (QEMU reads all 256 bytes at once when it
    # realizes the device): any span inside it is an access.

    def config_read(self, offset: int, size: int) -> bytes:
        check_span(offset, size, CONFIG_SPACE_SIZE, "configuration space")
        return bytes(self.config[offset : offset + size])

    def config_write(self, offset: int, data: bytes) -> None:
        check_span(offset, len(data), CONFIG_SPACE_SIZE, "configuration space")
        for index, byte in enumerate(data):
            at = offset + index
            mask = self._writable[at]
            self.config[at] = (self.config[at] & ~mask) | (byte & mask)

    def _word(self, offset: int) -> int:
        return int.from_bytes(self.config[offset : offset + 2], "little")

    @property
    def command(self) -> int:
        return self._word(COMMAND)

    @property
    def bus_master(self) -> bool:
        """Whether the function may master the bus (start DMA)."""
        return bool(self.command & COMMAND_BUS_MASTER)

    @property
    def msix_enabled(self) -> bool:
        return self.msix is not None and bool(self._word(MSIX_CAPABILITY_OFFSET + 2) & 0x8000)

    def reset(self) -> None:
        """Function-level reset: every register at its power-on value."""
        self.config[:] = self._power_on

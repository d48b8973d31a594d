"""The DMA test engine (docs/dma-engine.md): a PCI function that only does DMA, through the vIOMMU.

The model is sans-I/O: BAR0 reads and writes come in as (offset, bytes), DMA goes out through a
:class:`DmaTarget` (the endpoint's translated view of guest memory, or None while no IOMMU is paired),
and completion interrupts through a callable. Each rule of the register file lives here once; the
register offsets and codes are the document's table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import Protocol

from vhost_iommu.pci.function import MsixLayout, PciFunction, PciIdentity, check_access

IDENTITY = PciIdentity(
    vendor=0x1234, device=0x11E9, class_code=0x088000, subsystem_vendor=0x1AF4, subsystem=0x1100
)
BAR0_SIZE = 8192
REGISTERS_SIZE = 4096
MSIX = MsixLayout(vectors=1, table_bar=0, table_offset=0x1000, pba_bar=0, pba_offset=0x1800)
MAGIC = 0x45414D44  # b"DMAE" little-endian
VERSION = 1
MAX_LENGTH = 16 << 20
COMPLETION_VECTOR = 0

# Register offsets (docs/dma-engine.md).
R_MAGIC = 0x00
R_VERSION = 0x04
R_SRC = 0x08
R_DST = 0x10
R_LENGTH = 0x18
R_PATTERN = 0x20
R_OP = 0x28
R_DOORBELL = 0x2C
R_STATUS = 0x30
R_ERROR = 0x34
R_FAULT_ADDRESS = 0x38
R_FAULT_REASON = 0x40
R_FAULT_FLAGS = 0x44
R_DONE_BYTES = 0x48
R_MISMATCH_OFFSET = 0x50
R_COMPLETED = 0x58
R_IRQ_ENABLE = 0x60
R_MAX_LENGTH = 0x64


class Op(IntEnum):
    COPY = 1
    FILL = 2
    COMPARE = 3


class StatusBit(IntFlag):
    DONE = 1 << 0
    FAULT = 1 << 1
    MISMATCH = 1 << 2
    ERROR = 1 << 3


class EngineError(IntEnum):
    NONE = 0
    BAD_OP = 1
    BAD_LENGTH = 2
    NO_BUS_MASTER = 3
    NO_IOMMU = 4
    NOT_GUEST_RAM = 5


class FaultInfo(Protocol):
    @property
    def reason(self) -> int: ...
    @property
    def flags(self) -> int: ...
    @property
    def address(self) -> int: ...


class DmaOutcome(Protocol):
    """What one DMA operation through the IOMMU came to."""

    @property
    def done_bytes(self) -> int: ...
    @property
    def fault(self) -> FaultInfo | None: ...
    @property
    def error(self) -> int: ...  # 0, or nonzero: a translated address outside the VM's shared RAM
    @property
    def mismatch_offset(self) -> int | None: ...


class DmaTarget(Protocol):
    """The endpoint's DMA, translated by the IOMMU for its endpoint ID."""

    def copy(self, src: int, dst: int, length: int) -> DmaOutcome: ...
    def fill(self, dst: int, length: int, pattern: int) -> DmaOutcome: ...
    def compare(self, a: int, b: int, length: int) -> DmaOutcome: ...


@dataclass
class Registers:
    src: int = 0
    dst: int = 0
    length: int = 0
    pattern: int = 0
    op: int = 0
    status: int = 0
    error: int = 0
    fault_address: int = 0
    fault_reason: int = 0
    fault_flags: int = 0
    done_bytes: int = 0
    mismatch_offset: int = 0
    completed: int = 0
    irq_enable: int = 0


# offset -> (attribute, width in bytes, writable)
_LAYOUT: dict[int, tuple[str, int, bool]] = {
    R_SRC: ("src", 8, True),
    R_DST: ("dst", 8, True),
    R_LENGTH: ("length", 8, True),
    R_PATTERN: ("pattern", 8, True),
    R_OP: ("op", 4, True),
    R_STATUS: ("status", 4, False),
    R_ERROR: ("error", 4, False),
    R_FAULT_ADDRESS: ("fault_address", 8, False),
    R_FAULT_REASON: ("fault_reason", 4, False),
    R_FAULT_FLAGS: ("fault_flags", 4, False),
    R_DONE_BYTES: ("done_bytes", 8, False),
    R_MISMATCH_OFFSET: ("mismatch_offset", 8, False),
    R_COMPLETED: ("completed", 8, False),
    R_IRQ_ENABLE: ("irq_enable", 4, True),
}
_CONSTANTS = {R_MAGIC: MAGIC, R_VERSION: VERSION, R_MAX_LENGTH: MAX_LENGTH}


@dataclass
class EngineCounters:
    operations: int = 0
    faults: int = 0
    errors: int = 0
    bytes_done: int = 0


class DmaEngine:
    """One DMA test engine function: configuration space, BAR0 registers, operations."""

    kind = "dma-engine"

    def __init__(
        self,
        dma: Callable[[], DmaTarget | None],
        interrupt: Callable[[int], None] = lambda _vector: None,
    ) -> None:
        self.pci = PciFunction(IDENTITY, (BAR0_SIZE,), MSIX)
        self.registers = Registers()
        self.counters = EngineCounters()
        self._dma = dma
        self._interrupt = interrupt

    # -- BAR0 -----------------------------------------------------------------------------------------------

    def bar_read(self, bar: int, offset: int, size: int) -> bytes:
        check_access(offset, size, BAR0_SIZE if bar == 0 else 0, f"BAR{bar}")
        value = 0
        for byte in range(size):
            value |= self._register_byte(offset + byte) << (8 * byte)
        return value.to_bytes(size, "little")

    def _register_byte(self, offset: int) -> int:
        """Byte ``offset`` of the register file (so any aligned or split access reads the same bits)."""
        for base, (name, width, _writable) in _LAYOUT.items():
            if base <= offset < base + width:
                register: int = getattr(self.registers, name)
                return (register >> (8 * (offset - base))) & 0xFF
        for base, value in _CONSTANTS.items():
            if base <= offset < base + 4:
                return (value >> (8 * (offset - base))) & 0xFF
        return 0

    def bar_write(self, bar: int, offset: int, data: bytes) -> None:
        check_access(offset, len(data), BAR0_SIZE if bar == 0 else 0, f"BAR{bar}")
        if offset <= R_DOORBELL < offset + len(data):
            self._write_bytes(offset, data)
            self.run()
            return
        self._write_bytes(offset, data)

    def _write_bytes(self, offset: int, data: bytes) -> None:
        for index, byte in enumerate(data):
            at = offset + index
            for base, (name, width, writable) in _LAYOUT.items():
                if writable and base <= at < base + width:
                    shift = 8 * (at - base)
                    old = getattr(self.registers, name)
                    setattr(self.registers, name, (old & ~(0xFF << shift)) | (byte << shift))
                    break

    # -- operations -----------------------------------------------------------------------------------------

    def run(self) -> None:
        """Run OP with the current registers to its end (DOORBELL)."""
        regs = self.registers
        regs.status = regs.error = regs.fault_address = regs.fault_reason = regs.fault_flags = 0
        regs.done_bytes = regs.mismatch_offset = 0
        self.counters.operations += 1
        error = self._refusal()
        if error is not EngineError.NONE:
            self._end(StatusBit.ERROR, error)
            return
        target = self._dma()
        if target is None:
            self._end(StatusBit.ERROR, EngineError.NO_IOMMU)
            return
        if regs.op == Op.COPY:
            outcome = target.copy(regs.src, regs.dst, regs.length)
        elif regs.op == Op.FILL:
            outcome = target.fill(regs.dst, regs.length, regs.pattern)
        else:
            outcome = target.compare(regs.src, regs.dst, regs.length)
        regs.done_bytes = outcome.done_bytes
        self.counters.bytes_done += outcome.done_bytes
        status = int(StatusBit.DONE)
        if outcome.fault is not None:
            regs.fault_address = outcome.fault.address
            regs.fault_reason = int(outcome.fault.reason)
            regs.fault_flags = outcome.fault.flags
            self.counters.faults += 1
            status |= StatusBit.FAULT
        if outcome.error:
            self._end(status | StatusBit.ERROR, EngineError.NOT_GUEST_RAM)
            return
        if outcome.mismatch_offset is not None:
            regs.mismatch_offset = outcome.mismatch_offset
            status |= StatusBit.MISMATCH
        self._end(status, EngineError.NONE)

    def _refusal(self) -> EngineError:
        regs = self.registers
        if regs.op not in tuple(Op):
            return EngineError.BAD_OP
        if not 1 <= regs.length <= MAX_LENGTH:
            return EngineError.BAD_LENGTH
        # A range past the top of the 64-bit IOVA space has no bytes to translate there: refused like a
        # bad length, not handed to the DMA port (which rejects it as a caller's error).
        addresses = (regs.dst,) if regs.op == Op.FILL else (regs.src, regs.dst)
        if any(address + regs.length > 1 << 64 for address in addresses):
            return EngineError.BAD_LENGTH
        if not self.pci.bus_master:
            return EngineError.NO_BUS_MASTER
        return EngineError.NONE

    def _end(self, status: int, error: EngineError) -> None:
        regs = self.registers
        regs.status = int(status) | StatusBit.DONE
        regs.error = int(error)
        regs.completed += 1
        if error is not EngineError.NONE:
            self.counters.errors += 1
        # An MSI-X message is a memory write by the function: none without Bus Master.
        if regs.irq_enable & 1 and self.pci.bus_master:
            self._interrupt(COMPLETION_VECTOR)

    def reset(self) -> None:
        """Function-level reset: configuration space and registers at their power-on values."""
        self.pci.reset()
        self.registers = Registers()

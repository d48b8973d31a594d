"""The DMA engine's register file and operations (docs/dma-engine.md), over a recorded DMA target."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import pytest

from vhost_iommu.endpoints.dma_engine import (
    MAGIC,
    MAX_LENGTH,
    R_COMPLETED,
    R_DONE_BYTES,
    R_DOORBELL,
    R_DST,
    R_ERROR,
    R_FAULT_ADDRESS,
    R_FAULT_FLAGS,
    R_FAULT_REASON,
    R_IRQ_ENABLE,
    R_LENGTH,
    R_MAGIC,
    R_MISMATCH_OFFSET,
    R_OP,
    R_PATTERN,
    R_SRC,
    R_STATUS,
    DmaEngine,
    EngineError,
    Op,
    StatusBit,
)
from vhost_iommu.pci.function import COMMAND, COMMAND_BUS_MASTER


@dataclass(frozen=True)
class Fault:
    reason: int
    flags: int
    address: int


@dataclass(frozen=True)
class Outcome:
    done_bytes: int
    fault: Fault | None = None
    error: int = 0
    mismatch_offset: int | None = None


@dataclass
class Target:
    answer: Outcome = Outcome(0)
    calls: list[tuple[str, tuple[int, ...]]] = field(default_factory=list)

    def copy(self, src: int, dst: int, length: int) -> Outcome:
        self.calls.append(("copy", (src, dst, length)))
        return self.answer

    def fill(self, dst: int, length: int, pattern: int) -> Outcome:
        self.calls.append(("fill", (dst, length, pattern)))
        return self.answer

    def compare(self, a: int, b: int, length: int) -> Outcome:
        self.calls.append(("compare", (a, b, length)))
        return self.answer


def engine(target: Target | None) -> tuple[DmaEngine, list[int]]:
    interrupts: list[int] = []
    device = DmaEngine(lambda: target, interrupts.append)
    device.pci.config_write(COMMAND, struct.pack("<H", COMMAND_BUS_MASTER))
    return device, interrupts


def write64(device: DmaEngine, offset: int, value: int) -> None:
    device.bar_write(0, offset, struct.pack("<Q", value))


def read(device: DmaEngine, offset: int, size: int = 4) -> int:
    return int.from_bytes(device.bar_read(0, offset, size), "little")


def start(device: DmaEngine, op: int, length: int = 4096, src: int = 0x1000, dst: int = 0x2000) -> None:
    write64(device, R_SRC, src)
    write64(device, R_DST, dst)
    write64(device, R_LENGTH, length)
    device.bar_write(0, R_OP, struct.pack("<I", op))
    device.bar_write(0, R_DOORBELL, b"\x01\x00\x00\x00")


def test_identification_registers() -> None:
    device, _ = engine(Target())
    assert read(device, R_MAGIC) == MAGIC and device.bar_read(0, R_MAGIC, 4) == b"DMAE"


def test_copy_runs_through_the_target_and_reports_done() -> None:
    target = Target(Outcome(4096))
    device, interrupts = engine(target)
    start(device, Op.COPY)
    assert target.calls == [("copy", (0x1000, 0x2000, 4096))]
    assert read(device, R_STATUS) == StatusBit.DONE
    assert read(device, R_DONE_BYTES, 8) == 4096 and read(device, R_COMPLETED, 8) == 1
    assert interrupts == []  # IRQ_ENABLE is off


def test_sixty_four_bit_registers_take_two_halves() -> None:
    target = Target(Outcome(8))
    device, _ = engine(target)
    device.bar_write(0, R_SRC, struct.pack("<I", 0xDEAD0000))
    device.bar_write(0, R_SRC + 4, struct.pack("<I", 0x1))
    assert read(device, R_SRC, 8) == 0x1_DEAD_0000
    assert read(device, R_SRC + 4) == 1


def test_fill_passes_the_pattern_and_compare_reports_a_mismatch() -> None:
    target = Target(Outcome(100, mismatch_offset=37))
    device, _ = engine(target)
    write64(device, R_PATTERN, 0x0102030405060708)
    start(device, Op.FILL, length=100)
    assert target.calls[-1] == ("fill", (0x2000, 100, 0x0102030405060708))
    start(device, Op.COMPARE, length=100)
    assert read(device, R_STATUS) == StatusBit.DONE | StatusBit.MISMATCH
    assert read(device, R_MISMATCH_OFFSET, 8) == 37


def test_a_fault_is_reported_in_the_registers_and_by_interrupt() -> None:
    target = Target(Outcome(8192, fault=Fault(reason=2, flags=0x102, address=0x4000)))
    device, interrupts = engine(target)
    device.bar_write(0, R_IRQ_ENABLE, b"\x01\x00\x00\x00")
    start(device, Op.COPY, length=3 * 4096)
    assert read(device, R_STATUS) == StatusBit.DONE | StatusBit.FAULT
    assert read(device, R_FAULT_ADDRESS, 8) == 0x4000
    assert (read(device, R_FAULT_REASON), read(device, R_FAULT_FLAGS)) == (2, 0x102)
    assert read(device, R_DONE_BYTES, 8) == 8192
    assert interrupts == [0]


@pytest.mark.parametrize(
    ("op", "length", "bus_master", "error"),
    [
        (0, 4096, True, EngineError.BAD_OP),
        (7, 4096, True, EngineError.BAD_OP),
        (Op.COPY, 0, True, EngineError.BAD_LENGTH),
        (Op.COPY, MAX_LENGTH + 1, True, EngineError.BAD_LENGTH),
        (Op.COPY, 4096, False, EngineError.NO_BUS_MASTER),
    ],
)
def test_refused_operations_touch_nothing(op: int, length: int, bus_master: bool, error: EngineError) -> None:
    target = Target(Outcome(4096))
    device, _ = engine(target)
    if not bus_master:
        device.pci.config_write(COMMAND, b"\x00\x00")
    start(device, op, length=length)
    assert target.calls == []
    assert read(device, R_STATUS) == StatusBit.DONE | StatusBit.ERROR and read(device, R_ERROR) == error


@pytest.mark.parametrize(
    ("op", "src", "dst"),
    [
        (Op.COPY, (1 << 64) - 0x100, 0x2000),
        (Op.COMPARE, 0x1000, (1 << 64) - 0xFF),
        (Op.FILL, 0x1000, (1 << 64) - 1),
    ],
)
def test_a_range_past_the_top_of_the_iova_space_is_a_bad_length(op: Op, src: int, dst: int) -> None:
    """Found by the vfio-server fuzz target: such a range reached the DMA port, whose ValueError closed the
    client's connection as an unexpected error."""
    target = Target(Outcome(4096))
    device, _ = engine(target)
    start(device, op, length=4096, src=src, dst=dst)
    assert target.calls == []
    assert read(device, R_STATUS) == StatusBit.DONE | StatusBit.ERROR
    assert read(device, R_ERROR) == EngineError.BAD_LENGTH


def test_fill_ignores_src_so_any_src_is_accepted() -> None:
    target = Target(Outcome(4096))
    device, _ = engine(target)
    start(device, Op.FILL, length=4096, src=(1 << 64) - 1, dst=0x2000)
    assert read(device, R_STATUS) == StatusBit.DONE and len(target.calls) == 1


def test_without_an_iommu_the_engine_does_no_dma() -> None:
    device, _ = engine(None)
    start(device, Op.COPY)
    assert read(device, R_ERROR) == EngineError.NO_IOMMU


def test_a_translation_outside_guest_ram_is_an_error() -> None:
    device, _ = engine(Target(Outcome(0, error=1)))
    start(device, Op.COPY)
    assert read(device, R_STATUS) & StatusBit.ERROR and read(device, R_ERROR) == EngineError.NOT_GUEST_RAM


def test_function_reset_clears_registers_and_bus_master() -> None:
    device, _ = engine(Target(Outcome(4096)))
    start(device, Op.COPY)
    device.reset()
    assert read(device, R_STATUS) == 0 and read(device, R_SRC, 8) == 0 and read(device, R_COMPLETED, 8) == 0
    assert not device.pci.bus_master and read(device, R_MAGIC) == MAGIC


def test_accesses_outside_bar0_are_refused() -> None:
    device, _ = engine(Target())
    with pytest.raises(ValueError):
        device.bar_read(0, 8192, 4)
    with pytest.raises(ValueError):
        device.bar_read(1, 0, 4)

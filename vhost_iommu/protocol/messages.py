"""Typed, immutable vhost-user payloads.

One frozen dataclass per payload layout of ``vhost-user.rst`` ("Payload"). Each validates its own fields in
``__post_init__`` (so no invalid payload object can exist, whoever built it), knows its wire size, and packs
and unpacks itself in the machine's native byte order, as the spec demands.
"""

from __future__ import annotations

import itertools
import struct
from dataclasses import dataclass
from typing import ClassVar, Protocol, Self

from vhost_iommu.protocol.constants import (
    DEVICE_STATE_LOAD,
    DEVICE_STATE_PHASE_STOPPED,
    DEVICE_STATE_SAVE,
    MAX_CONFIG_SIZE,
    MAX_MEM_TABLE_REGIONS,
    VRING_F_LOG,
    VRING_INDEX_MASK,
    VRING_NOFD_MASK,
)

U32_MAX = (1 << 32) - 1
U64_MAX = (1 << 64) - 1


class PayloadError(ValueError):
    """A payload's bytes or fields break the layout or a rule of the spec."""


def _check_uint(name: str, value: int, bits: int) -> None:
    if not 0 <= value < (1 << bits):
        raise PayloadError(f"{name}={value!r} is not an unsigned {bits}-bit value")


class Payload(Protocol):
    def pack(self) -> bytes: ...


@dataclass(frozen=True, slots=True)
class Empty:
    """No payload (size 0)."""

    SIZE: ClassVar[int] = 0

    def pack(self) -> bytes:
        return b""

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        if data:
            raise PayloadError(f"expected no payload, got {len(data)} bytes")
        return cls()


@dataclass(frozen=True, slots=True)
class U64:
    """A single 64-bit integer (features, status, REPLY_ACK result, counts)."""

    value: int
    _FORMAT: ClassVar[struct.Struct] = struct.Struct("=Q")
    SIZE: ClassVar[int] = 8

    def __post_init__(self) -> None:
        _check_uint("u64", self.value, 64)

    def pack(self) -> bytes:
        return self._FORMAT.pack(self.value)

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        _expect_size(data, cls.SIZE, "u64")
        return cls(*cls._FORMAT.unpack(data))


@dataclass(frozen=True, slots=True)
class VringState:
    """A vring state description: ``index`` and ``num`` (size, base, enable flag or next avail index)."""

    index: int
    num: int
    _FORMAT: ClassVar[struct.Struct] = struct.Struct("=II")
    SIZE: ClassVar[int] = 8

    def __post_init__(self) -> None:
        _check_uint("vring index", self.index, 32)
        _check_uint("vring num", self.num, 32)

    def pack(self) -> bytes:
        return self._FORMAT.pack(self.index, self.num)

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        _expect_size(data, cls.SIZE, "vring state")
        return cls(*cls._FORMAT.unpack(data))


@dataclass(frozen=True, slots=True)
class VringAddress:
    """A vring address description (SET_VRING_ADDR): ring addresses in the front-end's address space."""

    index: int
    flags: int
    descriptor: int
    used: int
    available: int
    log: int
    _FORMAT: ClassVar[struct.Struct] = struct.Struct("=IIQQQQ")
    SIZE: ClassVar[int] = 40

    def __post_init__(self) -> None:
        _check_uint("vring index", self.index, 32)
        _check_uint("vring flags", self.flags, 32)
        if self.flags & ~VRING_F_LOG:
            raise PayloadError(f"vring address flags {self.flags:#x} has bits the spec does not define")
        for name in ("descriptor", "used", "available", "log"):
            _check_uint(f"vring {name} address", getattr(self, name), 64)

    def pack(self) -> bytes:
        return self._FORMAT.pack(self.index, self.flags, self.descriptor, self.used, self.available, self.log)

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        _expect_size(data, cls.SIZE, "vring address")
        return cls(*cls._FORMAT.unpack(data))


@dataclass(frozen=True, slots=True)
class VringFile:
    """The u64 of SET_VRING_KICK/CALL/ERR: bits 0-7 the ring index, bit 8 set when no fd is attached."""

    index: int
    has_fd: bool
    SIZE: ClassVar[int] = 8

    def __post_init__(self) -> None:
        if not 0 <= self.index <= VRING_INDEX_MASK:
            raise PayloadError(f"vring index {self.index!r} does not fit the 8-bit index field")

    def pack(self) -> bytes:
        return U64(self.index | (0 if self.has_fd else VRING_NOFD_MASK)).pack()

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        value = U64.unpack(data).value
        if value & ~(VRING_INDEX_MASK | VRING_NOFD_MASK):
            raise PayloadError(f"vring file payload {value:#x} has bits above bit 8 set (reserved)")
        return cls(value & VRING_INDEX_MASK, not value & VRING_NOFD_MASK)


@dataclass(frozen=True, slots=True)
class MemoryRegion:
    """A memory region description; sizes and ends must not wrap the 64-bit address spaces."""

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int
    _FORMAT: ClassVar[struct.Struct] = struct.Struct("=QQQQ")
    SIZE: ClassVar[int] = 32

    def __post_init__(self) -> None:
        for name in ("guest_phys_addr", "memory_size", "userspace_addr", "mmap_offset"):
            _check_uint(f"memory region {name}", getattr(self, name), 64)
        if self.memory_size == 0:
            raise PayloadError(f"memory region at guest address {self.guest_phys_addr:#x} has size 0")
        for name in ("guest_phys_addr", "userspace_addr", "mmap_offset"):
            if getattr(self, name) + self.memory_size - 1 > U64_MAX:
                raise PayloadError(
                    f"memory region {name}={getattr(self, name):#x} + size {self.memory_size:#x} "
                    "wraps around 2^64"
                )

    @property
    def gpa_end(self) -> int:
        """One past the last guest-physical address (may be 2^64)."""
        return self.guest_phys_addr + self.memory_size

    @property
    def uva_end(self) -> int:
        """One past the last front-end address (may be 2^64)."""
        return self.userspace_addr + self.memory_size

    def pack(self) -> bytes:
        return self._FORMAT.pack(
            self.guest_phys_addr, self.memory_size, self.userspace_addr, self.mmap_offset
        )

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        _expect_size(data, cls.SIZE, "memory region")
        return cls(*cls._FORMAT.unpack(data))


def _overlapping(regions: tuple[MemoryRegion, ...], start: str, end: str) -> tuple[int, int] | None:
    ordered = sorted(range(len(regions)), key=lambda i: getattr(regions[i], start))
    for before, after in itertools.pairwise(ordered):
        if getattr(regions[after], start) < getattr(regions[before], end):
            return before, after
    return None


@dataclass(frozen=True, slots=True)
class MemoryTable:
    """Multiple memory regions description (SET_MEM_TABLE): at most 8 regions, none overlapping."""

    regions: tuple[MemoryRegion, ...]
    _HEAD: ClassVar[struct.Struct] = struct.Struct("=II")

    def __post_init__(self) -> None:
        if len(self.regions) > MAX_MEM_TABLE_REGIONS:
            raise PayloadError(
                f"memory table has {len(self.regions)} regions, at most {MAX_MEM_TABLE_REGIONS} allowed"
            )
        for space, start, end in (
            ("guest-physical", "guest_phys_addr", "gpa_end"),
            ("front-end", "userspace_addr", "uva_end"),
        ):
            clash = _overlapping(self.regions, start, end)
            if clash is not None:
                raise PayloadError(f"memory table regions {clash[0]} and {clash[1]} overlap in {space} space")

    @property
    def size(self) -> int:
        return self._HEAD.size + MemoryRegion.SIZE * len(self.regions)

    def pack(self) -> bytes:
        return self._HEAD.pack(len(self.regions), 0) + b"".join(r.pack() for r in self.regions)

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        if len(data) < cls._HEAD.size:
            raise PayloadError(f"memory table payload of {len(data)} bytes is shorter than its 8-byte head")
        count, _padding = cls._HEAD.unpack_from(data)
        if count > MAX_MEM_TABLE_REGIONS:
            raise PayloadError(f"memory table has {count} regions, at most {MAX_MEM_TABLE_REGIONS} allowed")
        expected = cls._HEAD.size + MemoryRegion.SIZE * count
        if len(data) != expected:
            raise PayloadError(f"memory table of {count} regions must be {expected} bytes, got {len(data)}")
        regions = tuple(
            MemoryRegion.unpack(data[offset : offset + MemoryRegion.SIZE])
            for offset in range(cls._HEAD.size, expected, MemoryRegion.SIZE)
        )
        return cls(regions)


@dataclass(frozen=True, slots=True)
class SingleMemoryRegion:
    """Single memory region description (ADD_MEM_REG, REM_MEM_REG): 8 bytes of padding, then a region."""

    region: MemoryRegion
    SIZE: ClassVar[int] = 8 + MemoryRegion.SIZE

    def pack(self) -> bytes:
        return bytes(8) + self.region.pack()

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        _expect_size(data, cls.SIZE, "single memory region")
        return cls(MemoryRegion.unpack(data[8:]))


@dataclass(frozen=True, slots=True)
class ConfigSpace:
    """Virtio device config space access: ``offset``, ``size``, ``flags``, then ``size`` bytes.

    A GET_CONFIG request carries ``size`` bytes too (QEMU sends zeros); its reply echoes the header with the
    contents. An empty reply to GET_CONFIG is the spec's error answer and is represented by :class:`Empty`.
    """

    offset: int
    flags: int
    data: bytes
    _HEAD: ClassVar[struct.Struct] = struct.Struct("=III")

    def __post_init__(self) -> None:
        _check_uint("config offset", self.offset, 32)
        _check_uint("config flags", self.flags, 32)
        if len(self.data) > MAX_CONFIG_SIZE:
            raise PayloadError(f"config access of {len(self.data)} bytes, at most {MAX_CONFIG_SIZE} allowed")
        if self.offset + len(self.data) > MAX_CONFIG_SIZE:
            raise PayloadError(
                f"config access {self.offset}+{len(self.data)} ends beyond {MAX_CONFIG_SIZE} bytes"
            )

    @property
    def size(self) -> int:
        return len(self.data)

    def pack(self) -> bytes:
        return self._HEAD.pack(self.offset, len(self.data), self.flags) + self.data

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        if len(data) < cls._HEAD.size:
            raise PayloadError(f"config payload of {len(data)} bytes is shorter than its 12-byte head")
        offset, size, flags = cls._HEAD.unpack_from(data)
        if size != len(data) - cls._HEAD.size:
            raise PayloadError(
                f"config payload says {size} bytes of data but carries {len(data) - cls._HEAD.size}"
            )
        return cls(offset, flags, bytes(data[cls._HEAD.size :]))


@dataclass(frozen=True, slots=True)
class DeviceStateTransfer:
    """SET_DEVICE_STATE_FD's parameters: the direction (save on the source, load on the destination) and
    the migration phase; only the values the spec defines exist."""

    direction: int
    phase: int
    _FORMAT: ClassVar[struct.Struct] = struct.Struct("=II")
    SIZE: ClassVar[int] = 8

    def __post_init__(self) -> None:
        if self.direction not in (DEVICE_STATE_SAVE, DEVICE_STATE_LOAD):
            raise PayloadError(f"transfer direction {self.direction!r} is neither 0 (save) nor 1 (load)")
        if self.phase != DEVICE_STATE_PHASE_STOPPED:
            raise PayloadError(f"migration phase {self.phase!r}: only 0 (stopped) is defined")

    def pack(self) -> bytes:
        return self._FORMAT.pack(self.direction, self.phase)

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        _expect_size(data, cls.SIZE, "device state transfer")
        return cls(*cls._FORMAT.unpack(data))


def _expect_size(data: bytes, size: int, what: str) -> None:
    if len(data) != size:
        raise PayloadError(f"{what} payload must be {size} bytes, got {len(data)}")

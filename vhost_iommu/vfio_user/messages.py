"""Typed, immutable vfio-user requests: one frozen dataclass per command the server accepts.

Each validates its own fields in ``__post_init__`` (so no invalid request object can exist, whoever built
it: the decoder or a test client), packs its payload and unpacks itself, in the host's byte order as the
spec demands. The wire layouts (``struct`` formats) live here once; the codec's reply builders use the
same ones, since most replies echo their request's layout.

fds: a request's fds are in its fields (``DmaMap.fd``, ``SetIrqs.fds``); they belong to whoever holds the
request, who must close them or hand them on.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

from vhost_iommu.vfio_user.constants import (
    CAP_MAX_DATA_XFER_SIZE,
    CAP_MAX_DMA_MAPS,
    CAP_MAX_MSG_FDS,
    CAP_MIGRATION,
    CAP_PGSIZES,
    CAP_TWIN_SOCKET,
    CAP_WRITE_MULTIPLE,
    CAPABILITIES_KEY,
    DEVICE_INFO_SIZE,
    DMA_MAP_FLAGS,
    DMA_MAP_SIZE,
    DMA_PAGE_SIZE,
    DMA_UNMAP_FLAG_ALL,
    DMA_UNMAP_FLAGS,
    DMA_UNMAP_SIZE,
    IRQ_INFO_SIZE,
    IRQ_SET_ACTION_TYPE_MASK,
    IRQ_SET_DATA_BOOL,
    IRQ_SET_DATA_EVENTFD,
    IRQ_SET_DATA_MASK,
    IRQ_SET_DATA_NONE,
    IRQ_SET_SIZE,
    MAX_DATA_XFER_SIZE,
    MAX_FDS_PER_MESSAGE,
    MAX_IRQ_VECTORS,
    MAX_VERSION_DATA_SIZE,
    REGION_ACCESS_SIZE,
    REGION_INFO_SIZE,
    REGION_IO_FDS_SIZE,
    SERVER_TO_CLIENT_COMMANDS,
    VERSION_FIXED_SIZE,
    VERSION_MAJOR,
    VFIO_PCI_NUM_IRQS,
    VFIO_PCI_NUM_REGIONS,
    Command,
)

U16_MAX = (1 << 16) - 1
U32_MAX = (1 << 32) - 1
U64_LIMIT = 1 << 64

# -- wire layouts (payloads, after the 16-byte header) -------------------------------------------------------
VERSION_LAYOUT = struct.Struct("=HH")  # major, minor
DMA_MAP_LAYOUT = struct.Struct("=IIQQQ")  # argsz, flags, offset, address, size
DMA_UNMAP_LAYOUT = struct.Struct("=IIQQ")  # argsz, flags, address, size
DEVICE_INFO_LAYOUT = struct.Struct("=IIII")  # argsz, flags, num_regions, num_irqs
REGION_INFO_LAYOUT = struct.Struct("=IIIIQQ")  # argsz, flags, index, cap_offset, size, offset
REGION_IO_FDS_LAYOUT = struct.Struct("=IIII")  # argsz, flags, index, count
IRQ_INFO_LAYOUT = struct.Struct("=IIII")  # argsz, flags, index, count
IRQ_SET_LAYOUT = struct.Struct("=IIIII")  # argsz, flags, index, start, count
REGION_ACCESS_LAYOUT = struct.Struct("=QII")  # offset, region, count
_EMPTY_LAYOUT = struct.Struct("=")  # DEVICE_RESET
for _layout, _size in (
    (VERSION_LAYOUT, VERSION_FIXED_SIZE),
    (DMA_MAP_LAYOUT, DMA_MAP_SIZE),
    (DMA_UNMAP_LAYOUT, DMA_UNMAP_SIZE),
    (DEVICE_INFO_LAYOUT, DEVICE_INFO_SIZE),
    (REGION_INFO_LAYOUT, REGION_INFO_SIZE),
    (REGION_IO_FDS_LAYOUT, REGION_IO_FDS_SIZE),
    (IRQ_INFO_LAYOUT, IRQ_INFO_SIZE),
    (IRQ_SET_LAYOUT, IRQ_SET_SIZE),
    (REGION_ACCESS_LAYOUT, REGION_ACCESS_SIZE),
):
    assert _layout.size == _size, (_layout.format, _size)


class MessageError(ValueError):
    """A request's payload, fields or fds break the layout or a rule of the spec (the codec reports it as a
    protocol violation, prefixed with the command's name)."""


def _check_uint(name: str, value: int, bits: int) -> None:
    if not 0 <= value < (1 << bits):
        raise MessageError(f"{name} {value!r} is not an unsigned {bits}-bit value")


def _check_size(data: bytes, size: int) -> None:
    if len(data) != size:
        raise MessageError(f"payload must be {size} bytes, got {len(data)}")


def _check_at_least(data: bytes, size: int) -> None:
    if len(data) < size:
        raise MessageError(f"payload of {len(data)} bytes is shorter than its {size}-byte fixed part")


def _check_argsz(argsz: int, minimum: int) -> None:
    _check_uint("argsz", argsz, 32)
    if argsz < minimum:
        raise MessageError(f"argsz {argsz} is smaller than the {minimum}-byte structure")


def _check_zero(**fields: int) -> None:
    for name, value in fields.items():
        if value:
            raise MessageError(f"{name} {value:#x} must be zero in a request")


def _check_no_fds(fds: tuple[int, ...]) -> None:
    if fds:
        raise MessageError(f"carries {len(fds)} fds, expected none")


def _check_region_index(index: int) -> None:
    if not 0 <= index < VFIO_PCI_NUM_REGIONS:
        raise MessageError(f"region index {index!r} is not a PCI region (0-{VFIO_PCI_NUM_REGIONS - 1})")


def _check_irq_index(index: int) -> None:
    if not 0 <= index < VFIO_PCI_NUM_IRQS:
        raise MessageError(f"IRQ index {index!r} is not a PCI IRQ type (0-{VFIO_PCI_NUM_IRQS - 1})")


def _check_page_aligned(name: str, value: int) -> None:
    if value % DMA_PAGE_SIZE:
        raise MessageError(f"{name} {value:#x} is not a multiple of the {DMA_PAGE_SIZE}-byte DMA page")


def _check_range(name: str, start: int, size: int) -> None:
    _check_uint(name, start, 64)
    if start + size > U64_LIMIT:
        raise MessageError(f"{name} {start:#x} + size {size:#x} wraps around 2^64")


def _check_access(region: int, offset: int, count: int) -> None:
    _check_region_index(region)
    if not 1 <= count <= MAX_DATA_XFER_SIZE:
        raise MessageError(f"count {count!r} is not within 1-{MAX_DATA_XFER_SIZE} (max_data_xfer_size)")
    _check_range("offset", offset, count)


def _check_msg_id(msg_id: int) -> None:
    _check_uint("message id", msg_id, 16)


# -- VERSION capabilities ------------------------------------------------------------------------------------

#: The type of each capability the spec defines; unknown names are let through (later minor versions add
#: some), known ones must have their type.
_CAPABILITY_TYPES: Mapping[str, type] = {
    CAP_MAX_MSG_FDS: int,
    CAP_MAX_DATA_XFER_SIZE: int,
    CAP_PGSIZES: int,
    CAP_MAX_DMA_MAPS: int,
    CAP_MIGRATION: dict,
    CAP_TWIN_SOCKET: dict,
    CAP_WRITE_MULTIPLE: bool,
}


def check_capabilities(capabilities: object) -> dict[str, Any]:
    """``capabilities`` if it is a JSON object whose known members have the spec's types (numbers are
    non-negative integers); raises :class:`MessageError`."""
    if not isinstance(capabilities, dict):
        raise MessageError(f"capabilities is a {type(capabilities).__name__}, not an object")
    for name, value in capabilities.items():
        if not isinstance(name, str):
            raise MessageError(f"capability name {name!r} is not a string")
        expected = _CAPABILITY_TYPES.get(name)
        if expected is None:
            continue
        # bool is an int in Python, not a number in JSON.
        if expected is int and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise MessageError(f"capability {name} {value!r} is not a non-negative integer")
        if expected is not int and not isinstance(value, expected):
            raise MessageError(f"capability {name} {value!r} is not a JSON {expected.__name__}")
    return capabilities


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise MessageError("version data has a duplicate JSON member name")
    return result


def _reject_constant(name: str) -> None:
    raise MessageError(f"version data holds {name}, which is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999: JSON has no infinity, and it would not encode back
        raise MessageError(f"version data holds {text}, which is not a finite number")
    return value


def parse_version_data(data: bytes) -> dict[str, Any]:
    """The capabilities object of VERSION's optional version data: UTF-8 JSON, one NUL at its end, at most
    :data:`MAX_VERSION_DATA_SIZE` bytes, an object whose ``capabilities`` member (optional) is an object."""
    if not data:
        return {}
    if len(data) > MAX_VERSION_DATA_SIZE:
        raise MessageError(
            f"version data of {len(data)} bytes exceeds the {MAX_VERSION_DATA_SIZE}-byte limit"
        )
    if data[-1] != 0:
        raise MessageError("version data is not NUL-terminated")
    if 0 in data[:-1]:
        raise MessageError(f"version data has a NUL at byte {data.index(0)} before its end")
    try:
        document = json.loads(
            data[:-1].decode("utf-8"),
            object_pairs_hook=_reject_duplicates,
            parse_constant=_reject_constant,
            parse_float=_finite_float,
        )
    except MessageError:
        raise
    except RecursionError:
        raise MessageError("version data nests too deeply") from None
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise MessageError(f"version data is not UTF-8 JSON: {exc}") from None
    if not isinstance(document, dict):
        raise MessageError(f"version data is a JSON {type(document).__name__}, not an object")
    return check_capabilities(document.get(CAPABILITIES_KEY, {}))


def version_data(capabilities: Mapping[str, Any]) -> bytes:
    """The version data that carries ``capabilities``: compact JSON and its terminating NUL."""
    text = json.dumps({CAPABILITIES_KEY: dict(capabilities)}, separators=(",", ":"), allow_nan=False)
    return text.encode("utf-8") + b"\0"


class _CarriesNoFds:
    """A request whose message carries no fds."""

    __slots__ = ()

    @property
    def fds(self) -> tuple[int, ...]:
        return ()


def _unpack_fixed(layout: struct.Struct, data: bytes, fds: tuple[int, ...]) -> tuple[Any, ...]:
    """The fields of a payload that is exactly ``layout`` and comes without fds."""
    _check_size(data, layout.size)
    _check_no_fds(fds)
    return layout.unpack(data)


# -- requests ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Version(_CarriesNoFds):
    """VERSION: the client proposes a version and its capabilities (the ``capabilities`` member of the
    version data; empty when the client sent none)."""

    msg_id: int
    major: int
    minor: int
    capabilities: dict[str, Any] = field(default_factory=dict)
    COMMAND: ClassVar[Command] = Command.VERSION
    no_reply: ClassVar[bool] = False  # the reply carries the version: a client cannot go without it

    def __post_init__(self) -> None:
        _check_msg_id(self.msg_id)
        _check_uint("major", self.major, 16)
        _check_uint("minor", self.minor, 16)
        if self.major != VERSION_MAJOR:
            raise MessageError(f"major version {self.major} is not spoken (only {VERSION_MAJOR})")
        check_capabilities(self.capabilities)

    def pack(self) -> bytes:
        data = version_data(self.capabilities) if self.capabilities else b""
        return VERSION_LAYOUT.pack(self.major, self.minor) + data

    @classmethod
    def unpack(cls, msg_id: int, no_reply: bool, data: bytes, fds: tuple[int, ...]) -> Self:
        _check_at_least(data, VERSION_FIXED_SIZE)
        _check_no_fds(fds)
        major, minor = VERSION_LAYOUT.unpack_from(data)
        return cls(msg_id, major, minor, parse_version_data(data[VERSION_FIXED_SIZE:]))


@dataclass(frozen=True, slots=True)
class DmaMap:
    """DMA_MAP: ``size`` bytes at DMA ``address`` are ``offset`` bytes into ``fd`` (None: the region is not
    mappable, ``offset`` is 0). ``flags``: DMA_MAP_FLAG_READ / _WRITE."""

    msg_id: int
    flags: int
    offset: int
    address: int
    size: int
    fd: int | None
    no_reply: bool = False
    COMMAND: ClassVar[Command] = Command.DMA_MAP

    def __post_init__(self) -> None:
        _check_msg_id(self.msg_id)
        _check_uint("flags", self.flags, 32)
        if self.flags & ~DMA_MAP_FLAGS:
            raise MessageError(f"flags {self.flags:#x} has bits the spec does not define")
        if not self.flags:
            raise MessageError("flags 0x0 grants neither read nor write access")
        _check_uint("size", self.size, 64)
        if self.size == 0:
            raise MessageError("size 0x0 must be non-zero")
        _check_page_aligned("size", self.size)
        _check_range("address", self.address, self.size)
        _check_page_aligned("address", self.address)
        _check_range("offset", self.offset, self.size)
        if self.fd is None:
            if self.offset:
                raise MessageError(f"offset {self.offset:#x} without an fd (it must be zero)")
        else:
            if self.fd < 0:
                raise MessageError(f"fd {self.fd} is not a file descriptor")
            _check_page_aligned("offset", self.offset)

    @property
    def fds(self) -> tuple[int, ...]:
        return () if self.fd is None else (self.fd,)

    def pack(self) -> bytes:
        return DMA_MAP_LAYOUT.pack(DMA_MAP_SIZE, self.flags, self.offset, self.address, self.size)

    @classmethod
    def unpack(cls, msg_id: int, no_reply: bool, data: bytes, fds: tuple[int, ...]) -> Self:
        _check_size(data, DMA_MAP_SIZE)
        argsz, flags, offset, address, size = DMA_MAP_LAYOUT.unpack(data)
        _check_argsz(argsz, DMA_MAP_SIZE)
        if len(fds) > 1:
            raise MessageError(f"carries {len(fds)} fds, expected 0 or 1")
        return cls(msg_id, flags, offset, address, size, fds[0] if fds else None, no_reply)


@dataclass(frozen=True, slots=True)
class DmaUnmap(_CarriesNoFds):
    """DMA_UNMAP: the mapping of exactly ``size`` bytes at ``address`` goes away (with ``flags``
    DMA_UNMAP_FLAG_ALL, and address and size 0: every mapping)."""

    msg_id: int
    flags: int
    address: int
    size: int
    no_reply: bool = False
    COMMAND: ClassVar[Command] = Command.DMA_UNMAP

    def __post_init__(self) -> None:
        _check_msg_id(self.msg_id)
        _check_uint("flags", self.flags, 32)
        if self.flags & ~DMA_UNMAP_FLAGS:
            raise MessageError(f"flags {self.flags:#x} has bits this implementation does not support")
        _check_uint("size", self.size, 64)
        _check_uint("address", self.address, 64)
        if self.flags & DMA_UNMAP_FLAG_ALL:
            if self.address or self.size:
                raise MessageError(
                    f"address {self.address:#x} and size {self.size:#x} must be zero with the ALL flag"
                )
            return
        if self.size == 0:
            raise MessageError("size 0x0 must be non-zero")
        _check_page_aligned("size", self.size)
        _check_range("address", self.address, self.size)
        _check_page_aligned("address", self.address)

    def pack(self) -> bytes:
        return DMA_UNMAP_LAYOUT.pack(DMA_UNMAP_SIZE, self.flags, self.address, self.size)

    @classmethod
    def unpack(cls, msg_id: int, no_reply: bool, data: bytes, fds: tuple[int, ...]) -> Self:
        argsz, flags, address, size = _unpack_fixed(DMA_UNMAP_LAYOUT, data, fds)
        _check_argsz(argsz, DMA_UNMAP_SIZE)
        return cls(msg_id, flags, address, size, no_reply)


@dataclass(frozen=True, slots=True)
class DeviceGetInfo(_CarriesNoFds):
    """DEVICE_GET_INFO: ``argsz`` is the room the client has for the reply."""

    msg_id: int
    argsz: int
    COMMAND: ClassVar[Command] = Command.DEVICE_GET_INFO
    no_reply: ClassVar[bool] = False

    def __post_init__(self) -> None:
        _check_msg_id(self.msg_id)
        _check_argsz(self.argsz, DEVICE_INFO_SIZE)

    def pack(self) -> bytes:
        return DEVICE_INFO_LAYOUT.pack(self.argsz, 0, 0, 0)

    @classmethod
    def unpack(cls, msg_id: int, no_reply: bool, data: bytes, fds: tuple[int, ...]) -> Self:
        argsz, flags, num_regions, num_irqs = _unpack_fixed(DEVICE_INFO_LAYOUT, data, fds)
        _check_zero(flags=flags, num_regions=num_regions, num_irqs=num_irqs)
        return cls(msg_id, argsz)


@dataclass(frozen=True, slots=True)
class GetRegionInfo(_CarriesNoFds):
    """DEVICE_GET_REGION_INFO of region ``index``; ``argsz`` is the room the client has for the reply
    (region info and capabilities)."""

    msg_id: int
    argsz: int
    index: int
    COMMAND: ClassVar[Command] = Command.DEVICE_GET_REGION_INFO
    no_reply: ClassVar[bool] = False

    def __post_init__(self) -> None:
        _check_msg_id(self.msg_id)
        _check_argsz(self.argsz, REGION_INFO_SIZE)
        _check_region_index(self.index)

    def pack(self) -> bytes:
        return REGION_INFO_LAYOUT.pack(self.argsz, 0, self.index, 0, 0, 0)

    @classmethod
    def unpack(cls, msg_id: int, no_reply: bool, data: bytes, fds: tuple[int, ...]) -> Self:
        argsz, flags, index, cap_offset, size, offset = _unpack_fixed(REGION_INFO_LAYOUT, data, fds)
        _check_zero(flags=flags, cap_offset=cap_offset, size=size, offset=offset)
        return cls(msg_id, argsz, index)


@dataclass(frozen=True, slots=True)
class GetRegionIoFds(_CarriesNoFds):
    """DEVICE_GET_REGION_IO_FDS of region ``index`` (QEMU 10.2's client never sends it)."""

    msg_id: int
    argsz: int
    index: int
    COMMAND: ClassVar[Command] = Command.DEVICE_GET_REGION_IO_FDS
    no_reply: ClassVar[bool] = False

    def __post_init__(self) -> None:
        _check_msg_id(self.msg_id)
        _check_argsz(self.argsz, REGION_IO_FDS_SIZE)
        _check_region_index(self.index)

    def pack(self) -> bytes:
        return REGION_IO_FDS_LAYOUT.pack(self.argsz, 0, self.index, 0)

    @classmethod
    def unpack(cls, msg_id: int, no_reply: bool, data: bytes, fds: tuple[int, ...]) -> Self:
        argsz, flags, index, count = _unpack_fixed(REGION_IO_FDS_LAYOUT, data, fds)
        _check_zero(flags=flags, count=count)
        return cls(msg_id, argsz, index)


@dataclass(frozen=True, slots=True)
class GetIrqInfo(_CarriesNoFds):
    """DEVICE_GET_IRQ_INFO of IRQ type ``index`` (VFIO_PCI_*_IRQ_INDEX)."""

    msg_id: int
    argsz: int
    index: int
    COMMAND: ClassVar[Command] = Command.DEVICE_GET_IRQ_INFO
    no_reply: ClassVar[bool] = False

    def __post_init__(self) -> None:
        _check_msg_id(self.msg_id)
        _check_argsz(self.argsz, IRQ_INFO_SIZE)
        _check_irq_index(self.index)

    def pack(self) -> bytes:
        return IRQ_INFO_LAYOUT.pack(self.argsz, 0, self.index, 0)

    @classmethod
    def unpack(cls, msg_id: int, no_reply: bool, data: bytes, fds: tuple[int, ...]) -> Self:
        argsz, flags, index, count = _unpack_fixed(IRQ_INFO_LAYOUT, data, fds)
        _check_zero(flags=flags, count=count)
        return cls(msg_id, argsz, index)


@dataclass(frozen=True, slots=True)
class SetIrqs:
    """DEVICE_SET_IRQS: ``flags`` holds one DATA and one ACTION bit, applied to vectors ``start`` ..
    ``start + count - 1`` of IRQ type ``index``.

    DATA_NONE: no data, no fds (count 0 and start 0: every vector of the type). DATA_BOOL: ``data`` holds one
    byte (0 or 1) per vector. DATA_EVENTFD: ``fds`` holds one eventfd per vector, or none to de-assign them
    (QEMU sends a run of unassigned vectors that way).
    """

    msg_id: int
    flags: int
    index: int
    start: int
    count: int
    fds: tuple[int, ...] = ()
    data: bytes = b""
    no_reply: bool = False
    COMMAND: ClassVar[Command] = Command.DEVICE_SET_IRQS

    def __post_init__(self) -> None:
        _check_msg_id(self.msg_id)
        _check_uint("flags", self.flags, 32)
        if self.flags & ~(IRQ_SET_DATA_MASK | IRQ_SET_ACTION_TYPE_MASK):
            raise MessageError(f"flags {self.flags:#x} has bits the spec does not define")
        data_type = self.flags & IRQ_SET_DATA_MASK
        action = self.flags & IRQ_SET_ACTION_TYPE_MASK
        if data_type.bit_count() != 1 or action.bit_count() != 1:
            raise MessageError(f"flags {self.flags:#x} must hold exactly one DATA and one ACTION bit")
        _check_irq_index(self.index)
        _check_uint("start", self.start, 32)
        _check_uint("count", self.count, 32)
        if self.start + self.count > MAX_IRQ_VECTORS:
            raise MessageError(
                f"vectors {self.start}+{self.count} go beyond the {MAX_IRQ_VECTORS} vectors an IRQ type has"
            )
        if self.count == 0 and (data_type != IRQ_SET_DATA_NONE or self.start):
            raise MessageError("count 0 is only defined with DATA_NONE and start 0 (every vector)")
        if data_type == IRQ_SET_DATA_BOOL:
            if len(self.data) != self.count:
                raise MessageError(f"DATA_BOOL carries {len(self.data)} bytes for {self.count} vectors")
            if any(value > 1 for value in self.data):
                raise MessageError("DATA_BOOL bytes must be 0 or 1")
        elif self.data:
            raise MessageError(f"carries {len(self.data)} data bytes, only DATA_BOOL has data")
        if data_type == IRQ_SET_DATA_EVENTFD:
            if len(self.fds) not in (0, self.count):
                raise MessageError(f"DATA_EVENTFD carries {len(self.fds)} fds for {self.count} vectors")
            if len(self.fds) > MAX_FDS_PER_MESSAGE:
                raise MessageError(f"{len(self.fds)} eventfds, at most {MAX_FDS_PER_MESSAGE} per message")
            if any(fd < 0 for fd in self.fds):
                raise MessageError(f"fds {self.fds} are not all file descriptors")
        else:
            _check_no_fds(self.fds)

    def pack(self) -> bytes:
        size = IRQ_SET_SIZE + len(self.data)
        return IRQ_SET_LAYOUT.pack(size, self.flags, self.index, self.start, self.count) + self.data

    @classmethod
    def unpack(cls, msg_id: int, no_reply: bool, data: bytes, fds: tuple[int, ...]) -> Self:
        _check_at_least(data, IRQ_SET_SIZE)
        argsz, flags, index, start, count = IRQ_SET_LAYOUT.unpack_from(data)
        _check_argsz(argsz, len(data))
        return cls(msg_id, flags, index, start, count, fds, bytes(data[IRQ_SET_SIZE:]), no_reply)


@dataclass(frozen=True, slots=True)
class RegionRead(_CarriesNoFds):
    """REGION_READ of ``count`` bytes at ``offset`` of region ``region``."""

    msg_id: int
    region: int
    offset: int
    count: int
    COMMAND: ClassVar[Command] = Command.REGION_READ
    no_reply: ClassVar[bool] = False  # the reply carries the data

    def __post_init__(self) -> None:
        _check_msg_id(self.msg_id)
        _check_access(self.region, self.offset, self.count)

    def pack(self) -> bytes:
        return REGION_ACCESS_LAYOUT.pack(self.offset, self.region, self.count)

    @classmethod
    def unpack(cls, msg_id: int, no_reply: bool, data: bytes, fds: tuple[int, ...]) -> Self:
        offset, region, count = _unpack_fixed(REGION_ACCESS_LAYOUT, data, fds)
        return cls(msg_id, region, offset, count)


@dataclass(frozen=True, slots=True)
class RegionWrite(_CarriesNoFds):
    """REGION_WRITE of ``data`` at ``offset`` of region ``region``; ``no_reply``: a posted write (QEMU's
    writes to memory BARs), answered by nothing."""

    msg_id: int
    region: int
    offset: int
    data: bytes
    no_reply: bool = False
    COMMAND: ClassVar[Command] = Command.REGION_WRITE

    def __post_init__(self) -> None:
        _check_msg_id(self.msg_id)
        _check_access(self.region, self.offset, len(self.data))

    def pack(self) -> bytes:
        return REGION_ACCESS_LAYOUT.pack(self.offset, self.region, len(self.data)) + self.data

    @classmethod
    def unpack(cls, msg_id: int, no_reply: bool, data: bytes, fds: tuple[int, ...]) -> Self:
        _check_at_least(data, REGION_ACCESS_SIZE)
        _check_no_fds(fds)
        offset, region, count = REGION_ACCESS_LAYOUT.unpack_from(data)
        if count != len(data) - REGION_ACCESS_SIZE:
            raise MessageError(
                f"count {count} does not match the {len(data) - REGION_ACCESS_SIZE} data bytes"
            )
        return cls(msg_id, region, offset, bytes(data[REGION_ACCESS_SIZE:]), no_reply)


@dataclass(frozen=True, slots=True)
class DeviceReset(_CarriesNoFds):
    """DEVICE_RESET: no payload."""

    msg_id: int
    no_reply: bool = False
    COMMAND: ClassVar[Command] = Command.DEVICE_RESET

    def __post_init__(self) -> None:
        _check_msg_id(self.msg_id)

    def pack(self) -> bytes:
        return b""

    @classmethod
    def unpack(cls, msg_id: int, no_reply: bool, data: bytes, fds: tuple[int, ...]) -> Self:
        _unpack_fixed(_EMPTY_LAYOUT, data, fds)
        return cls(msg_id, no_reply)


#: Commands a client may send that this implementation does not serve: decoded as :class:`Unsupported`
#: (payload unread, fds closed) so the server answers an errno reply and the connection goes on. QEMU 10.2
#: sends none of them while ``write_multiple`` is not advertised.
UNSUPPORTED_COMMANDS = frozenset(
    {
        Command.DIRTY_PAGES,
        Command.REGION_WRITE_MULTI,
        Command.DEVICE_FEATURE,
        Command.MIG_DATA_READ,
        Command.MIG_DATA_WRITE,
    }
)
assert not UNSUPPORTED_COMMANDS & SERVER_TO_CLIENT_COMMANDS


@dataclass(frozen=True, slots=True)
class Unsupported(_CarriesNoFds):
    """A well-framed command this implementation does not serve (its payload is not kept, its fds are
    closed): answer it with ``encode_error(msg_id, command, ENOTSUP)`` unless ``no_reply``."""

    msg_id: int
    command: Command
    no_reply: bool = False

    def __post_init__(self) -> None:
        _check_msg_id(self.msg_id)
        if self.command not in UNSUPPORTED_COMMANDS:
            raise MessageError(f"command {self.command!r} is not one decoded as unsupported")

    @property
    def COMMAND(self) -> Command:
        return self.command

    def pack(self) -> bytes:
        return b""


#: Every request the decoder returns.
Request = (
    Version
    | DmaMap
    | DmaUnmap
    | DeviceGetInfo
    | GetRegionInfo
    | GetRegionIoFds
    | GetIrqInfo
    | SetIrqs
    | RegionRead
    | RegionWrite
    | DeviceReset
    | Unsupported
)

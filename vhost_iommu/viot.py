"""The ACPI Virtual I/O Translation table (VIOT): which endpoints a virtio-iommu manages.

QEMU builds a VIOT only for its own ``virtio-iommu-pci``. With the vhost-user device the guest learns the
topology from the whole table passed as ``-acpitable file=viot.bin``: header, checksum and nodes.

Layout (ACPI 6.5, section 5.2.32; Linux ``include/acpi/actbl3.h``; all fields little-endian)::

    0   ACPI header (36 bytes): "VIOT", length, revision 0, checksum, OEM id/table id/revision, creator
    36  u16 node_count      40  8 reserved bytes
    38  u16 node_offset     48  nodes, each starting with u8 type, u8 reserved, u16 length

    type 1 PCI range (24):   u32 endpoint_start, u16 segment_start, u16 segment_end, u16 bdf_start,
                             u16 bdf_end, u16 output_node, 6 reserved
    type 2 MMIO (24):        u32 endpoint, u64 base_address, u16 output_node, 6 reserved
    type 3 virtio-iommu-pci (16):  u16 segment, u16 bdf, 8 reserved
    type 4 virtio-iommu-mmio (16): 4 reserved, u64 base_address

Linux gives a PCI endpoint the ID ``((segment - segment_start) << 16) + bdf - bdf_start + endpoint_start``
(``drivers/acpi/viot.c``); that is the endpoint ID the guest sends in ATTACH and PROBE requests.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

SIGNATURE = b"VIOT"
REVISION = 0
HEADER_SIZE = 36
NODES_OFFSET = 48  # the 36-byte ACPI header, node_count, node_offset, 8 reserved bytes

NODE_PCI_RANGE = 1
NODE_MMIO = 2
NODE_VIRTIO_IOMMU_PCI = 3
NODE_VIRTIO_IOMMU_MMIO = 4

PCI_RANGE_SIZE = 24
MMIO_SIZE = 24
VIRTIO_IOMMU_PCI_SIZE = 16
VIRTIO_IOMMU_MMIO_SIZE = 16

DEFAULT_OEM_ID = b"VHIOMU"
DEFAULT_OEM_TABLE_ID = b"VHOSTIOM"
DEFAULT_OEM_REVISION = 1
DEFAULT_CREATOR_ID = b"VHIO"
DEFAULT_CREATOR_REVISION = 1

_ACPI_HEADER = struct.Struct("<4sIBB6s8sI4sI")
_VIOT_FIELDS = struct.Struct("<HH8x")
_NODE_HEADER = struct.Struct("<BxH")
_PCI_RANGE = struct.Struct("<BxHIHHHHH6x")
_MMIO = struct.Struct("<BxHIQH6x")
_VIRTIO_IOMMU_PCI = struct.Struct("<BxHHH8x")
_VIRTIO_IOMMU_MMIO = struct.Struct("<BxH4xQ")

assert _ACPI_HEADER.size == HEADER_SIZE
assert HEADER_SIZE + _VIOT_FIELDS.size == NODES_OFFSET
assert _PCI_RANGE.size == PCI_RANGE_SIZE and _MMIO.size == MMIO_SIZE
assert _VIRTIO_IOMMU_PCI.size == VIRTIO_IOMMU_PCI_SIZE and _VIRTIO_IOMMU_MMIO.size == VIRTIO_IOMMU_MMIO_SIZE

_U16 = 0xFFFF
_U32 = 0xFFFF_FFFF


class ViotError(ValueError):
    """A topology that cannot be described, or bytes that are not a well-formed VIOT."""


def bdf(bus: int, device: int, function: int) -> int:
    """The 16-bit PCI requester ID of ``bus:device.function``."""
    if not (0 <= bus <= 0xFF and 0 <= device <= 0x1F and 0 <= function <= 7):
        raise ViotError(f"not a PCI address: bus {bus:#x}, device {device:#x}, function {function}")
    return (bus << 8) | (device << 3) | function


def format_bdf(segment: int, requester_id: int) -> str:
    """``SSSS:BB:DD.F`` as lspci prints it."""
    return f"{segment:04x}:{requester_id >> 8:02x}:{(requester_id >> 3) & 0x1F:02x}.{requester_id & 7}"


@dataclass(frozen=True)
class PciRange:
    """PCI functions ``bdf_start..bdf_end`` (inclusive) of one segment, managed by the IOMMU.

    The function at ``bdf_start`` gets endpoint ID ``endpoint_start``, the next one ``endpoint_start + 1``...
    Ranges over several segments exist in the table format; the topologies here keep one segment per range,
    which is what every current VMM emits.
    """

    segment: int
    bdf_start: int
    bdf_end: int
    endpoint_start: int

    def __post_init__(self) -> None:
        _check_u16("segment", self.segment)
        _check_u16("bdf_start", self.bdf_start)
        _check_u16("bdf_end", self.bdf_end)
        if self.bdf_end < self.bdf_start:
            raise ViotError(f"PCI range ends ({self.bdf_end:#x}) before it starts ({self.bdf_start:#x})")
        if not 0 <= self.endpoint_start <= _U32 - (self.bdf_end - self.bdf_start):
            raise ViotError(f"endpoint_start {self.endpoint_start:#x} makes endpoint IDs overflow 32 bits")

    def endpoint_id(self, segment: int, requester_id: int) -> int | None:
        """The endpoint ID Linux derives for ``segment:requester_id``, or None when outside the range."""
        if segment != self.segment or not self.bdf_start <= requester_id <= self.bdf_end:
            return None
        return requester_id - self.bdf_start + self.endpoint_start


@dataclass(frozen=True)
class ViotTopology:
    """One virtio-iommu-pci and the PCI ranges it translates: everything a VIOT for it says."""

    iommu_segment: int
    iommu_bdf: int
    ranges: tuple[PciRange, ...]
    oem_id: bytes = DEFAULT_OEM_ID
    oem_table_id: bytes = DEFAULT_OEM_TABLE_ID
    oem_revision: int = DEFAULT_OEM_REVISION
    creator_id: bytes = DEFAULT_CREATOR_ID
    creator_revision: int = DEFAULT_CREATOR_REVISION

    def __post_init__(self) -> None:
        _check_u16("iommu_segment", self.iommu_segment)
        _check_u16("iommu_bdf", self.iommu_bdf)
        if not self.ranges:
            raise ViotError("a VIOT with no PCI range manages nothing")
        if len(self.ranges) + 1 > _U16:
            raise ViotError(f"too many nodes ({len(self.ranges) + 1}) for the u16 node count")
        _check_ascii("oem_id", self.oem_id, 6)
        _check_ascii("oem_table_id", self.oem_table_id, 8)
        _check_ascii("creator_id", self.creator_id, 4)
        _check_u32("oem_revision", self.oem_revision)
        _check_u32("creator_revision", self.creator_revision)
        for index, first in enumerate(self.ranges):
            if first.endpoint_id(self.iommu_segment, self.iommu_bdf) is not None:
                raise ViotError(
                    f"the IOMMU {format_bdf(self.iommu_segment, self.iommu_bdf)} lies in a range it "
                    "would translate; Linux refuses to translate the IOMMU itself"
                )
            for second in self.ranges[index + 1 :]:
                if first.segment == second.segment and not (
                    first.bdf_end < second.bdf_start or second.bdf_end < first.bdf_start
                ):
                    raise ViotError(f"PCI ranges overlap: {first} and {second}")

    def endpoint_id(self, segment: int, requester_id: int) -> int | None:
        """The endpoint ID the guest will use for a PCI function, None when no range covers it."""
        return ranges_endpoint_id(self.ranges, segment, requester_id)


def ranges_endpoint_id(ranges: tuple[PciRange, ...], segment: int, requester_id: int) -> int | None:
    """The endpoint ID of ``segment:requester_id`` in the first of ``ranges`` covering it, or None."""
    for pci_range in ranges:
        endpoint = pci_range.endpoint_id(segment, requester_id)
        if endpoint is not None:
            return endpoint
    return None


def default_topology() -> ViotTopology:
    """IOMMU at 0000:00:03.0; endpoints 0000:00:04.0 to 0000:00:1e.7 with endpoint IDs equal to their BDF."""
    return ViotTopology(
        iommu_segment=0,
        iommu_bdf=bdf(0, 3, 0),
        ranges=(
            PciRange(segment=0, bdf_start=bdf(0, 4, 0), bdf_end=bdf(0, 0x1E, 7), endpoint_start=bdf(0, 4, 0)),
        ),
    )


def acpi_checksum(table: bytes | bytearray) -> int:
    """The byte that makes all bytes of ``table`` sum to 0 modulo 256 (with the checksum byte zeroed)."""
    return (-sum(table)) & 0xFF


def build_viot(topology: ViotTopology) -> bytes:
    """The complete VIOT table for ``topology``: one virtio-iommu-pci node first, then its PCI ranges."""
    iommu_offset = NODES_OFFSET
    nodes = [_VIRTIO_IOMMU_PCI.pack(NODE_VIRTIO_IOMMU_PCI, VIRTIO_IOMMU_PCI_SIZE, topology.iommu_segment,
                                    topology.iommu_bdf)]  # fmt: skip
    for pci_range in topology.ranges:
        nodes.append(
            _PCI_RANGE.pack(
                NODE_PCI_RANGE,
                PCI_RANGE_SIZE,
                pci_range.endpoint_start,
                pci_range.segment,
                pci_range.segment,
                pci_range.bdf_start,
                pci_range.bdf_end,
                iommu_offset,
            )
        )
    body = _VIOT_FIELDS.pack(len(nodes), NODES_OFFSET) + b"".join(nodes)
    length = HEADER_SIZE + len(body)
    header = _ACPI_HEADER.pack(
        SIGNATURE,
        length,
        REVISION,
        0,
        topology.oem_id.ljust(6, b" "),
        topology.oem_table_id.ljust(8, b" "),
        topology.oem_revision,
        topology.creator_id.ljust(4, b" "),
        topology.creator_revision,
    )
    table = bytearray(header + body)
    table[9] = acpi_checksum(table)
    return bytes(table)


def write_viot(topology: ViotTopology, path: Path) -> Path:
    """Write :func:`build_viot` to ``path`` (for ``-acpitable file=``) and return it."""
    path.write_bytes(build_viot(topology))
    return path


# --- parsing: for tests, for reading what a guest saw (/sys/firmware/acpi/tables/VIOT), and for humans ---


@dataclass(frozen=True)
class AcpiHeader:
    signature: bytes
    length: int
    revision: int
    checksum: int
    oem_id: bytes
    oem_table_id: bytes
    oem_revision: int
    creator_id: bytes
    creator_revision: int


@dataclass(frozen=True)
class ParsedPciRange:
    offset: int
    endpoint_start: int
    segment_start: int
    segment_end: int
    bdf_start: int
    bdf_end: int
    output_node: int


@dataclass(frozen=True)
class ParsedMmioEndpoint:
    offset: int
    endpoint: int
    base_address: int
    output_node: int


@dataclass(frozen=True)
class ParsedVirtioIommuPci:
    offset: int
    segment: int
    bdf: int


@dataclass(frozen=True)
class ParsedVirtioIommuMmio:
    offset: int
    base_address: int


ParsedNode = ParsedPciRange | ParsedMmioEndpoint | ParsedVirtioIommuPci | ParsedVirtioIommuMmio


@dataclass(frozen=True)
class ParsedViot:
    header: AcpiHeader
    node_count: int
    node_offset: int
    nodes: tuple[ParsedNode, ...] = field(default_factory=tuple)

    def iommu_at(self, offset: int) -> ParsedVirtioIommuPci | ParsedVirtioIommuMmio | None:
        for node in self.nodes:
            if node.offset == offset and isinstance(node, ParsedVirtioIommuPci | ParsedVirtioIommuMmio):
                return node
        return None


def parse_viot(table: bytes) -> ParsedViot:
    """Decode a VIOT, validating what Linux checks plus the checksum; raises :class:`ViotError`."""
    if len(table) < NODES_OFFSET:
        raise ViotError(f"{len(table)} bytes is shorter than the {NODES_OFFSET}-byte VIOT header")
    header = AcpiHeader(*_ACPI_HEADER.unpack_from(table, 0))
    if header.signature != SIGNATURE:
        raise ViotError(f"signature {header.signature!r} is not {SIGNATURE!r}")
    if header.length != len(table):
        raise ViotError(f"header length {header.length} but {len(table)} bytes given")
    if sum(table) & 0xFF:
        raise ViotError(f"checksum does not sum to zero (byte sum {sum(table) & 0xFF:#04x} mod 256)")
    node_count, node_offset = _VIOT_FIELDS.unpack_from(table, HEADER_SIZE)
    if node_count and node_offset < NODES_OFFSET:
        raise ViotError(f"node offset {node_offset} points into the table header")
    nodes: list[ParsedNode] = []
    offset = node_offset
    for index in range(node_count):
        if offset + _NODE_HEADER.size > len(table):
            raise ViotError(f"node {index} at offset {offset} overflows the table")
        node_type, node_length = _NODE_HEADER.unpack_from(table, offset)
        if node_length < _NODE_HEADER.size or offset + node_length > len(table):
            raise ViotError(f"node {index} at offset {offset} has a bad length {node_length}")
        nodes.append(_parse_node(table, offset, node_type, node_length))
        offset += node_length
    parsed = ParsedViot(header, node_count, node_offset, tuple(nodes))
    for node in parsed.nodes:
        if (
            isinstance(node, ParsedPciRange | ParsedMmioEndpoint)
            and parsed.iommu_at(node.output_node) is None
        ):
            raise ViotError(
                f"node at offset {node.offset} names output node {node.output_node}, not an IOMMU"
            )
    return parsed


def _parse_node(table: bytes, offset: int, node_type: int, length: int) -> ParsedNode:
    layouts: dict[int, tuple[struct.Struct, str]] = {
        NODE_PCI_RANGE: (_PCI_RANGE, "PCI range"),
        NODE_MMIO: (_MMIO, "MMIO endpoint"),
        NODE_VIRTIO_IOMMU_PCI: (_VIRTIO_IOMMU_PCI, "virtio-iommu-pci"),
        NODE_VIRTIO_IOMMU_MMIO: (_VIRTIO_IOMMU_MMIO, "virtio-iommu-mmio"),
    }
    if node_type not in layouts:
        raise ViotError(f"node at offset {offset} has unknown type {node_type}")
    layout, name = layouts[node_type]
    if length < layout.size:
        raise ViotError(f"{name} node at offset {offset} is {length} bytes, needs {layout.size}")
    fields = layout.unpack_from(table, offset)[2:]
    if node_type == NODE_PCI_RANGE:
        endpoint_start, segment_start, segment_end, bdf_start, bdf_end, output_node = fields
        if segment_end < segment_start or bdf_end < bdf_start:
            raise ViotError(f"PCI range node at offset {offset} ends before it starts")
        return ParsedPciRange(
            offset, endpoint_start, segment_start, segment_end, bdf_start, bdf_end, output_node
        )
    if node_type == NODE_MMIO:
        return ParsedMmioEndpoint(offset, *fields)
    if node_type == NODE_VIRTIO_IOMMU_PCI:
        return ParsedVirtioIommuPci(offset, *fields)
    return ParsedVirtioIommuMmio(offset, *fields)


def topology_from_viot(table: bytes) -> ViotTopology:
    """The inverse of :func:`build_viot` for tables with one virtio-iommu-pci and single-segment ranges."""
    parsed = parse_viot(table)
    iommus = [node for node in parsed.nodes if isinstance(node, ParsedVirtioIommuPci)]
    if len(iommus) != 1 or any(
        isinstance(node, ParsedVirtioIommuMmio | ParsedMmioEndpoint) for node in parsed.nodes
    ):
        raise ViotError("only tables with exactly one virtio-iommu-pci and PCI ranges are supported")
    ranges: list[PciRange] = []
    for node in parsed.nodes:
        if isinstance(node, ParsedPciRange):
            if node.segment_start != node.segment_end:
                raise ViotError(f"PCI range at offset {node.offset} spans several segments")
            ranges.append(PciRange(node.segment_start, node.bdf_start, node.bdf_end, node.endpoint_start))
    header = parsed.header
    return ViotTopology(
        iommu_segment=iommus[0].segment,
        iommu_bdf=iommus[0].bdf,
        ranges=tuple(ranges),
        oem_id=header.oem_id.rstrip(b" "),
        oem_table_id=header.oem_table_id.rstrip(b" "),
        oem_revision=header.oem_revision,
        creator_id=header.creator_id.rstrip(b" "),
        creator_revision=header.creator_revision,
    )


def describe_viot(table: bytes) -> str:
    """A human-readable dump of a VIOT, one line per node."""
    parsed = parse_viot(table)
    header = parsed.header
    lines = [
        f"VIOT rev {header.revision}, {header.length} bytes, checksum {header.checksum:#04x}, "
        f"OEM {header.oem_id.decode(errors='replace')!r}/{header.oem_table_id.decode(errors='replace')!r} "
        f"rev {header.oem_revision}, {parsed.node_count} nodes from offset {parsed.node_offset}"
    ]
    for node in parsed.nodes:
        if isinstance(node, ParsedVirtioIommuPci):
            lines.append(f"  @{node.offset}: virtio-iommu-pci {format_bdf(node.segment, node.bdf)}")
        elif isinstance(node, ParsedVirtioIommuMmio):
            lines.append(f"  @{node.offset}: virtio-iommu-mmio at {node.base_address:#x}")
        elif isinstance(node, ParsedPciRange):
            lines.append(
                f"  @{node.offset}: PCI range segments {node.segment_start:#x}-{node.segment_end:#x} "
                f"{format_bdf(node.segment_start, node.bdf_start)}.."
                f"{format_bdf(node.segment_end, node.bdf_end)} "
                f"-> endpoints from {node.endpoint_start:#x}, IOMMU @{node.output_node}"
            )
        else:
            lines.append(
                f"  @{node.offset}: MMIO endpoint {node.endpoint:#x} at {node.base_address:#x}, "
                f"IOMMU @{node.output_node}"
            )
    return "\n".join(lines)


class TopologyFacts(Protocol):
    """What :func:`viot_from_topology` needs: the facts ``vhost_iommu.device.topology.Topology`` exposes."""

    @property
    def iommu_segment(self) -> int: ...

    @property
    def iommu_bdf(self) -> int: ...

    def viot_ranges(self) -> list[tuple[int, int, int, int]]:
        """(segment, bdf_start, bdf_end, endpoint_start) of each PCI range."""
        ...


def viot_topology_from(topology: TopologyFacts) -> ViotTopology:
    """The VIOT view of a device topology (the same ranges, so the IDs the device accepts agree)."""
    ranges = tuple(PciRange(*entry) for entry in topology.viot_ranges())
    return ViotTopology(topology.iommu_segment, topology.iommu_bdf, ranges)


def viot_from_topology(topology: TopologyFacts) -> bytes:
    """The whole VIOT table for a device topology (``Topology.default()``, or one loaded from TOML)."""
    return build_viot(viot_topology_from(topology))


def _check_u16(name: str, value: int) -> None:
    if not 0 <= value <= _U16:
        raise ViotError(f"{name} {value!r} does not fit 16 bits")


def _check_u32(name: str, value: int) -> None:
    if not 0 <= value <= _U32:
        raise ViotError(f"{name} {value!r} does not fit 32 bits")


def _check_ascii(name: str, value: bytes, width: int) -> None:
    if len(value) > width or not all(0x20 <= byte < 0x7F for byte in value):
        raise ViotError(f"{name} {value!r} must be at most {width} printable ASCII bytes")

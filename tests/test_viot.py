"""The ACPI VIOT table: the exact bytes Linux's drivers/acpi/viot.c reads, and the checks of the parser."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from vhost_iommu.device.topology import Topology
from vhost_iommu.viot import (
    NODE_PCI_RANGE,
    NODE_VIRTIO_IOMMU_PCI,
    ParsedPciRange,
    ParsedVirtioIommuPci,
    PciRange,
    ViotError,
    ViotTopology,
    bdf,
    build_viot,
    default_topology,
    describe_viot,
    parse_viot,
    topology_from_viot,
    viot_from_topology,
)

# The VIOT QEMU 10.2.2 built for its own virtio-iommu-pci at 00:03.0 on q35, read by the guest from
# /sys/firmware/acpi/tables/VIOT (the probe job prints it): one range over the whole root bus 0x00-0xff.
QEMU_BUILTIN_VIOT = bytes.fromhex(
    "56494f54580000000056424f434853204258504320202020010000004258504301000000"
    "020030000000000000000000"
    "03001000000018000000000000000000"
    "0100180000000000000000000000ff003000000000000000"
)


def u16(table: bytes, offset: int) -> int:
    return int(struct.unpack_from("<H", table, offset)[0])


def u32(table: bytes, offset: int) -> int:
    return int(struct.unpack_from("<I", table, offset)[0])


def test_default_table_field_by_field() -> None:
    table = build_viot(default_topology())

    # ACPI header
    assert table[0:4] == b"VIOT"
    assert u32(table, 4) == len(table) == 48 + 16 + 24
    assert table[8] == 0  # revision
    assert table[10:16] == b"VHIOMU"
    assert table[16:24] == b"VHOSTIOM"
    # VIOT fields: node count, node offset, 8 reserved bytes
    assert u16(table, 36) == 2
    assert u16(table, 38) == 48
    assert table[40:48] == bytes(8)
    # virtio-iommu-pci node at 48: type 3, length 16, segment 0, BDF 00:03.0
    assert table[48] == NODE_VIRTIO_IOMMU_PCI and table[49] == 0
    assert u16(table, 50) == 16
    assert u16(table, 52) == 0
    assert u16(table, 54) == 0x18
    assert table[56:64] == bytes(8)
    # PCI range node at 64: type 1, length 24, endpoint_start, segments, BDFs, output node -> 48
    assert table[64] == NODE_PCI_RANGE and table[65] == 0
    assert u16(table, 66) == 24
    assert u32(table, 68) == 0x20
    assert (u16(table, 72), u16(table, 74)) == (0, 0)
    assert (u16(table, 76), u16(table, 78)) == (0x20, 0xF7)
    assert u16(table, 80) == 48
    assert table[82:88] == bytes(6)


def test_checksum_makes_the_table_sum_to_zero() -> None:
    for oem_revision in range(0, 600, 37):
        topology = ViotTopology(0, 0x18, (PciRange(0, 0x20, 0xF7, 0x20),), oem_revision=oem_revision)
        assert sum(build_viot(topology)) % 256 == 0


def test_node_layout_matches_the_table_qemu_builds() -> None:
    """Same header and virtio-iommu node as QEMU's own VIOT once the OEM fields and range are QEMU's."""
    parsed = parse_viot(QEMU_BUILTIN_VIOT)
    assert parsed.node_count == 2 and parsed.node_offset == 48
    iommu, pci_range = parsed.nodes
    assert iommu == ParsedVirtioIommuPci(offset=48, segment=0, bdf=0x18)
    assert pci_range == ParsedPciRange(
        offset=64, endpoint_start=0, segment_start=0, segment_end=0, bdf_start=0, bdf_end=0xFF, output_node=48
    )
    ours = build_viot(
        ViotTopology(
            0, 0x18, (PciRange(0, 0x20, 0xF7, 0x20),),
            oem_id=b"BOCHS", oem_table_id=b"BXPC", creator_id=b"BXPC", oem_revision=1, creator_revision=1,
        )
    )  # fmt: skip
    # Everything but the checksum byte (9) and the range's endpoint/BDF fields (68-72, 76-80) agrees.
    differing = {index for index, (a, b) in enumerate(zip(ours, QEMU_BUILTIN_VIOT, strict=True)) if a != b}
    assert differing <= {9, *range(68, 72), *range(76, 80)}


def test_round_trip_of_the_default_topology() -> None:
    assert topology_from_viot(build_viot(default_topology())) == default_topology()


def test_the_device_topology_and_the_table_give_the_same_endpoint_ids() -> None:
    """The IDs the back-end accepts are the ones Linux derives from the table it is given."""
    device_topology = Topology.default()
    table = viot_from_topology(device_topology)
    assert table == build_viot(default_topology())
    viot_view = topology_from_viot(table)
    for requester_id in range(0x10000):
        assert viot_view.endpoint_id(0, requester_id) == device_topology.endpoint_for(0, requester_id)


def test_endpoint_ids_follow_linux_formula() -> None:
    topology = ViotTopology(
        0,
        bdf(0, 3, 0),
        (PciRange(0, bdf(0, 4, 0), bdf(0, 7, 7), 0x100), PciRange(1, bdf(2, 0, 0), bdf(2, 0, 7), 7)),
    )
    assert topology.endpoint_id(0, bdf(0, 4, 0)) == 0x100
    assert topology.endpoint_id(0, bdf(0, 5, 1)) == 0x100 + 9
    assert topology.endpoint_id(1, bdf(2, 0, 3)) == 10
    assert topology.endpoint_id(0, bdf(0, 3, 0)) is None  # the IOMMU itself
    assert topology.endpoint_id(1, bdf(0, 4, 0)) is None  # right BDF, wrong segment


def test_multi_range_table_lists_every_range_pointing_at_the_iommu() -> None:
    ranges = (
        PciRange(0, 0x20, 0x27, 0x20),
        PciRange(0, 0x40, 0x47, 0x1000),
        PciRange(3, 0x100, 0x1FF, 0x2000),
    )
    parsed = parse_viot(build_viot(ViotTopology(0, 0x18, ranges)))
    assert parsed.node_count == 4
    assert [node.offset for node in parsed.nodes] == [48, 64, 88, 112]
    assert all(isinstance(node, ParsedPciRange) and node.output_node == 48 for node in parsed.nodes[1:])


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: ViotTopology(0, 0x18, (PciRange(0, 0x00, 0xFF, 0),)), "Linux refuses"),
        (
            lambda: ViotTopology(0, 0x18, (PciRange(0, 0x20, 0x30, 0), PciRange(0, 0x30, 0x40, 0x100))),
            "overlap",
        ),
        (lambda: ViotTopology(0, 0x18, ()), "manages nothing"),
        (lambda: PciRange(0, 0x30, 0x20, 0), "ends"),
        (lambda: PciRange(0, 0x20, 0x30, 0xFFFF_FFFF), "overflow"),
        (lambda: PciRange(0x10000, 0x20, 0x30, 0), "16 bits"),
        (lambda: ViotTopology(0, 0x18, (PciRange(0, 0x20, 0x30, 0),), oem_id=b"TOOLONG"), "oem_id"),
        (lambda: ViotTopology(0, 0x18, (PciRange(0, 0x20, 0x30, 0),), creator_id=b"\x00ab"), "creator_id"),
        (lambda: bdf(0, 32, 0), "not a PCI address"),
    ],
)
def test_impossible_topologies_are_refused_with_a_reason(make: object, message: str) -> None:
    with pytest.raises(ViotError, match=message):
        make()  # type: ignore[operator]


def _corrupt(table: bytes, offset: int, value: bytes, fix_checksum: bool = True) -> bytes:
    data = bytearray(table)
    data[offset : offset + len(value)] = value
    if fix_checksum:
        data[9] = 0
        data[9] = (-sum(data)) & 0xFF
    return bytes(data)


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda t: t[:40], "shorter"),
        (lambda t: _corrupt(t, 0, b"VIOX"), "signature"),
        (lambda t: _corrupt(t, 9, b"\x01", fix_checksum=False), "checksum"),
        (lambda t: t + b"\0", "header length"),
        (lambda t: _corrupt(t, 36, struct.pack("<H", 3)), "overflows"),
        (lambda t: _corrupt(t, 38, struct.pack("<H", 8)), "header"),
        (lambda t: _corrupt(t, 66, struct.pack("<H", 2)), "length"),
        (lambda t: _corrupt(t, 66, struct.pack("<H", 16)), "needs 24"),
        (lambda t: _corrupt(t, 80, struct.pack("<H", 64)), "not an IOMMU"),
        (lambda t: _corrupt(t, 64, b"\x09"), "unknown type"),
        (lambda t: _corrupt(t, 76, struct.pack("<HH", 0x30, 0x20)), "ends before"),
    ],
)
def test_parser_rejects_malformed_tables_with_a_reason(mangle: object, message: str) -> None:
    with pytest.raises(ViotError, match=message):
        parse_viot(mangle(build_viot(default_topology())))  # type: ignore[operator]


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=200), offset=st.integers(0, 120))
def test_parser_never_fails_other_than_with_viot_error(data: bytes, offset: int) -> None:
    table = bytearray(build_viot(default_topology()))
    table[offset : offset + len(data)] = data
    with contextlib.suppress(ViotError):
        parse_viot(bytes(table))


@st.composite
def topologies(draw: st.DrawFn) -> ViotTopology:
    """Valid topologies: disjoint ranges in up to three segments, the IOMMU anywhere outside them."""
    ranges: list[PciRange] = []
    for segment in draw(st.lists(st.integers(0, 2), min_size=1, max_size=3, unique=True)):
        cursor = draw(st.integers(0, 0x100))
        for _ in range(draw(st.integers(1, 3))):
            start = cursor + draw(st.integers(0, 0x40))
            end = start + draw(st.integers(0, 0x80))
            ranges.append(PciRange(segment, start, end, draw(st.integers(0, 0xFFFF_0000))))
            cursor = end + 1
    iommu_segment, iommu_bdf = draw(st.integers(0, 3)), draw(st.integers(0, 0xFFFF))
    assume(not any(r.segment == iommu_segment and r.bdf_start <= iommu_bdf <= r.bdf_end for r in ranges))
    return ViotTopology(
        iommu_segment, iommu_bdf, tuple(ranges), oem_revision=draw(st.integers(0, 0xFFFF_FFFF))
    )


@settings(max_examples=200, deadline=None)
@given(topology=topologies())
def test_any_valid_topology_round_trips_and_checksums(topology: ViotTopology) -> None:
    table = build_viot(topology)
    assert sum(table) % 256 == 0
    assert len(table) == 48 + 16 + 24 * len(topology.ranges)
    assert topology_from_viot(table) == topology


def test_description_names_every_node() -> None:
    text = describe_viot(build_viot(default_topology()))
    assert "virtio-iommu-pci 0000:00:03.0" in text
    assert "0000:00:04.0..0000:00:1e.7" in text and "endpoints from 0x20" in text

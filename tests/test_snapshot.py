"""vhost_iommu.device.snapshot: round trips, and every malformed state refused with the device unchanged."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vhost_iommu.device import snapshot
from vhost_iommu.device.core import IommuDevice
from vhost_iommu.device.layout import (
    ATTACH_F_BYPASS,
    CONFIG_BYPASS,
    F_BYPASS_CONFIG,
    F_MMIO,
    MAP_F_MMIO,
    ResvMemType,
    encode_attach,
    encode_detach,
    encode_map,
    encode_unmap,
)
from vhost_iommu.device.snapshot import SnapshotError
from vhost_iommu.device.topology import ReservedRegion, Topology
from vhost_iommu.harness.mappings import add_mappings

ENDPOINTS = (0x20, 0x21, 0x22, 0x23)
DOMAINS = (1, 2, 3, 7)
PAGE = 0x1000
BASE = 1 << 32  # above the x86 MSI window every default endpoint reserves


def state_of(device: IommuDevice) -> dict[str, Any]:
    """Everything a snapshot must carry, through the device's public inspection methods."""
    return {
        "acked": device.acked_features,
        "driver": device.driver_features,
        "bypass": device.bypass,
        "domains": device.domains(),
        "endpoints": device.endpoints(),
        "mappings": {info.domain: device.mappings(info.domain) for info in device.domains()},
        "events": device.pending_events(),
        "counters": (device.request_counters(), device.status_counters(), device.fault_counters()),
        "queued": device.events.queued_count,
        "regions": {e: device.reserved_regions(e) for e in device.topology.endpoint_ids()},
    }


def request(device: IommuDevice, data: bytes) -> None:
    device.handle_request(data, 4)


def populated() -> IommuDevice:
    device = IommuDevice()
    device.set_features(device.device_features())
    request(device, encode_attach(3, 0x20))
    request(device, encode_attach(3, 0x21))
    request(device, encode_attach(9, 0x22, ATTACH_F_BYPASS))
    for page in range(5):
        address = BASE + page * 2 * PAGE
        request(device, encode_map(3, address, address + PAGE - 1, 0x200000 + page * PAGE, 1 + page % 3))
    device.set_config(CONFIG_BYPASS, b"\x00")
    device.report_fault(1, 2, 0x20, 0xDEAD000)
    return device


def reseal(data: bytes | bytearray) -> bytes:
    """A state with its checksum recomputed: what a hostile writer (who can compute it too) sends."""
    body = bytes(data[: len(data) - 32])
    return body + hashlib.sha256(body).digest()


def sections_of(data: bytes) -> dict[int, tuple[int, int]]:
    """tag -> (payload offset, payload length) of a well-formed state."""
    found = {}
    at = 64
    for _ in range(7):
        tag, _reserved, length = struct.unpack_from("<IIQ", data, at)
        found[tag] = (at + 16, length)
        at += 16 + length
    return found


def assert_refused(device: IommuDevice, data: bytes | bytearray, match: str = "") -> None:
    before = snapshot.save(device)
    with pytest.raises(SnapshotError, match=match):
        snapshot.restore(device, data)
    assert snapshot.save(device) == before


# -- round trips -------------------------------------------------------------------------------------------


def test_round_trip_of_a_populated_device() -> None:
    device = populated()
    saved = snapshot.save(device)
    restored = IommuDevice()
    snapshot.restore(restored, saved)
    assert state_of(restored) == state_of(device)
    assert snapshot.save(restored) == saved
    # The restored device serves as the original does: the same answers to the same requests.
    for probe in (
        encode_map(3, BASE, BASE + PAGE - 1, 0),  # overlaps a restored mapping
        encode_map(3, BASE + PAGE, BASE + 2 * PAGE - 1, 0),  # fits between two
        encode_unmap(3, BASE, BASE + 3 * PAGE - 1),
        encode_map(9, BASE, BASE + PAGE - 1, 0),  # bypass domain
        encode_attach(3, 0x22),  # endpoint of a bypass domain into a paging one
        encode_detach(3, 0x20),
    ):
        assert restored.handle_request(probe, 4) == device.handle_request(probe, 4)
    assert state_of(restored) == state_of(device)
    assert restored.translate(0x21, BASE + 0x10, 4, 1) == device.translate(0x21, BASE + 0x10, 4, 1)


def test_restore_replaces_whatever_the_device_held() -> None:
    saved = snapshot.save(populated())
    target = IommuDevice()
    target.set_features(target.device_features())
    request(target, encode_attach(7, 0x23))
    request(target, encode_map(7, BASE, BASE + PAGE - 1, 0))
    snapshot.restore(target, saved)
    assert state_of(target) == state_of(populated())
    assert target.mappings(7) == []


def test_empty_device_round_trip() -> None:
    saved = snapshot.save(IommuDevice())
    restored = IommuDevice()
    snapshot.restore(restored, saved)
    assert snapshot.save(restored) == saved


def test_reserved_region_overrides_round_trip() -> None:
    device = populated()
    override = (ReservedRegion(ResvMemType.RESERVED, BASE, BASE + 0xFFFF),)
    # Made after the MAPs: the mappings inside the new region stay, and must come back too.
    device.set_reserved_regions(0x21, override)
    device.set_reserved_regions(0x23, ())
    saved = snapshot.save(device)
    restored = IommuDevice()
    snapshot.restore(restored, saved)
    assert restored.reserved_regions(0x21) == override
    assert restored.reserved_regions(0x23) == ()
    assert restored.reserved_regions(0x20) == IommuDevice().reserved_regions(0x20)
    assert state_of(restored) == state_of(device)
    probe = encode_map(3, BASE + 16 * PAGE, BASE + 17 * PAGE - 1, 0)
    assert restored.handle_request(probe, 4) == device.handle_request(probe, 4)  # RANGE on both
    # A device of the same topology refuses nothing for lacking the override: it is part of the state.
    assert snapshot.topology_fingerprint(IommuDevice()) == snapshot.topology_fingerprint(device)


def test_unusable_override_regions_are_refused() -> None:
    device = populated()
    device.set_reserved_regions(0x21, (ReservedRegion(ResvMemType.RESERVED, 0x10000, 0x1FFFF),))
    saved = snapshot.save(device)
    at, _length = sections_of(saved)[snapshot.SECTION_REGIONS]
    region = at + 16 + 8  # the one override record, then its one region
    for offset, fmt, value, match in (
        (0, "<I", 7, "unknown region kind"),
        (4, "<I", 1, "reserved field"),
        (8, "<Q", 0x20000, "0x21"),  # starts after its end
        (-8, "<I", 0x10, "not managed"),
    ):
        data = bytearray(saved)
        struct.pack_into(fmt, data, region + offset, value)
        assert_refused(IommuDevice(), reseal(data), match)


operation = st.one_of(
    st.tuples(st.just("attach"), st.sampled_from(DOMAINS), st.sampled_from(ENDPOINTS), st.booleans()),
    st.tuples(st.just("detach"), st.sampled_from(DOMAINS), st.sampled_from(ENDPOINTS)),
    st.tuples(
        st.just("map"),
        st.sampled_from(DOMAINS),
        st.integers(0, 63),
        st.integers(1, 4),
        st.integers(1, 7),
    ),
    st.tuples(st.just("unmap"), st.sampled_from(DOMAINS), st.integers(0, 63), st.integers(1, 8)),
    st.tuples(st.just("bypass"), st.booleans()),
    st.tuples(st.just("fault"), st.sampled_from(ENDPOINTS), st.integers(0, 1 << 40)),
    st.tuples(st.just("resv"), st.sampled_from(ENDPOINTS), st.one_of(st.none(), st.integers(0, 63))),
)


def apply(device: IommuDevice, op: tuple[Any, ...]) -> None:
    kind = op[0]
    if kind == "attach":
        request(device, encode_attach(op[1], op[2], ATTACH_F_BYPASS if op[3] else 0))
    elif kind == "detach":
        request(device, encode_detach(op[1], op[2]))
    elif kind == "map":
        start = BASE + op[2] * PAGE
        request(device, encode_map(op[1], start, start + op[3] * PAGE - 1, op[2] * PAGE, op[4]))
    elif kind == "unmap":
        start = BASE + op[2] * PAGE
        request(device, encode_unmap(op[1], start, start + op[3] * PAGE - 1))
    elif kind == "bypass":
        device.set_config(CONFIG_BYPASS, b"\x01" if op[1] else b"\x00")
    elif kind == "resv":
        start = BASE + (op[2] or 0) * PAGE
        region = (ReservedRegion(ResvMemType.RESERVED, start, start + PAGE - 1),)
        device.set_reserved_regions(op[1], None if op[2] is None else region)
    else:
        device.translate(op[1], op[2], 4, 1)  # a fault when nothing maps it


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    features=st.sampled_from(["all", "no-mmio"]),
    operations=st.lists(operation, max_size=60),
    capacity=st.integers(0, 8),
)
def test_round_trip_of_random_states(features: str, operations: list[tuple[Any, ...]], capacity: int) -> None:
    device = IommuDevice(max_pending_events=capacity)
    offered = device.device_features()
    device.set_features(offered if features == "all" else offered & ~F_MMIO)
    for op in operations:
        apply(device, op)
    saved = snapshot.save(device)
    restored = IommuDevice(max_pending_events=capacity)
    snapshot.restore(restored, saved)
    assert state_of(restored) == state_of(device)
    assert snapshot.save(restored) == saved
    restored.store.verify()  # type: ignore[attr-defined]
    # Both devices go on alike.
    for op in operations[:10]:
        apply(device, op)
        apply(restored, op)
    assert state_of(restored) == state_of(device)


# -- refusals ----------------------------------------------------------------------------------------------


def test_every_truncation_is_refused() -> None:
    saved = snapshot.save(populated())
    target = populated()
    request(target, encode_attach(2, 0x23))  # a state of its own, which must survive every refusal
    before = snapshot.save(target)
    for length in range(len(saved)):
        with pytest.raises(SnapshotError):
            snapshot.restore(target, saved[:length])
    assert snapshot.save(target) == before


def test_every_corrupted_byte_is_refused() -> None:
    saved = snapshot.save(populated())
    target = IommuDevice()
    before = snapshot.save(target)
    for index in range(len(saved)):
        corrupt = bytearray(saved)
        corrupt[index] ^= 0xFF
        with pytest.raises(SnapshotError):
            snapshot.restore(target, corrupt)
    assert snapshot.save(target) == before


def test_trailing_bytes_are_refused() -> None:
    saved = snapshot.save(populated())
    assert_refused(IommuDevice(), saved + bytes(8), "header says")


def test_another_topology_is_refused() -> None:
    saved = snapshot.save(populated())
    other = Topology(pci_ranges=Topology.default().pci_ranges, domain_end=0xFF)
    assert_refused(IommuDevice(other), saved, "another topology")
    msi_elsewhere = dataclasses.replace(
        Topology.default(),
        pci_ranges=(
            dataclasses.replace(
                Topology.default().pci_ranges[0],
                reserved=(
                    ReservedRegion(ResvMemType.MSI, 0xFEE00000, 0xFEEFFFFF),
                    ReservedRegion(ResvMemType.RESERVED, 0x0, 0xFFF),
                ),
            ),
        ),
    )
    assert_refused(IommuDevice(msi_elsewhere), saved, "another topology")


def test_magic_and_version() -> None:
    saved = bytearray(snapshot.save(populated()))
    wrong_magic = bytearray(saved)
    wrong_magic[:8] = b"NOTSTATE"
    assert_refused(IommuDevice(), reseal(wrong_magic), "not a vhost-iommu device state")
    wrong_version = bytearray(saved)
    struct.pack_into("<I", wrong_version, 8, 2)
    assert_refused(IommuDevice(), reseal(wrong_version), "version 2")
    assert_refused(IommuDevice(), b"", "truncated")


def patched(saved: bytes, tag: int, offset: int, fmt: str, *values: int) -> bytes:
    """``saved`` with ``values`` packed at ``offset`` of section ``tag``'s payload, checksum recomputed."""
    data = bytearray(saved)
    at, _length = sections_of(saved)[tag]
    struct.pack_into(fmt, data, at + offset, *values)
    return reseal(data)


HUGE = (1 << 64) - 1


@pytest.mark.parametrize(
    ("tag", "offset", "fmt", "values", "match"),
    [
        (snapshot.SECTION_DEVICE, 0, "<Q", (1 << 40,), "does not offer"),
        (snapshot.SECTION_DEVICE, 8, "<Q", (0,), "not a subset"),
        (snapshot.SECTION_DEVICE, 16, "<B", (2,), "bypass 2"),
        (snapshot.SECTION_DEVICE, 17, "<B", (1,), "padding"),
        (snapshot.SECTION_COUNTERS, 0, "<I", (99,), "counter counts"),
        (snapshot.SECTION_COUNTERS, 0, "<I", (0xFFFFFFFF,), "counter counts"),
        (snapshot.SECTION_DOMAINS, 0, "<Q", (HUGE,), "cannot fit"),
        (snapshot.SECTION_DOMAINS, 0, "<Q", (3,), "needs"),
        (snapshot.SECTION_DOMAINS, 0, "<Q", (1,), "left over"),
        (snapshot.SECTION_DOMAINS, 8, "<I", (0x10000,), "strictly ascending|outside the domain range"),
        (snapshot.SECTION_DOMAINS, 8, "<I", (0,), "outside the domain range"),
        (snapshot.SECTION_DOMAINS, 8, "<I", (9,), "strictly ascending"),
        (snapshot.SECTION_DOMAINS, 12, "<I", (2,), "unknown domain flags"),
        (snapshot.SECTION_DOMAINS, 12, "<I", (1,), "bypass domain has mappings"),
        (snapshot.SECTION_DOMAINS, 16, "<Q", (6,), "add up"),
        (snapshot.SECTION_DOMAINS, 16, "<Q", (HUGE,), "limit"),
        (snapshot.SECTION_ENDPOINTS, 0, "<Q", (HUGE,), "cannot fit"),
        (snapshot.SECTION_ENDPOINTS, 8, "<I", (0x10,), "not managed"),
        (snapshot.SECTION_ENDPOINTS, 8, "<I", (0x21,), "strictly ascending"),
        (snapshot.SECTION_ENDPOINTS, 12, "<I", (5,), "missing from DOMAINS"),
        (snapshot.SECTION_ENDPOINTS, 28, "<I", (3,), "has no endpoint"),
        (snapshot.SECTION_MAPPINGS, 0, "<Q", (HUGE,), "add up"),
        (snapshot.SECTION_MAPPINGS, 8, "<Q", (BASE + 0x10,), "aligned"),
        (snapshot.SECTION_MAPPINGS, 8 + 5 * 8, "<Q", (BASE + 3 * PAGE - 1,), "sorted by address or overlap"),
        (snapshot.SECTION_MAPPINGS, 8, "<Q", (BASE + 3 * PAGE,), "ends before it starts"),
        (snapshot.SECTION_MAPPINGS, 8 + 5 * 8, "<Q", (HUGE,), "outside the input range"),
        (snapshot.SECTION_MAPPINGS, 8 + 15 * 8, "<I", (8,), "flags outside"),
        (snapshot.SECTION_MAPPINGS, 8 + 15 * 8 + 5 * 4, "<I", (1,), "padding"),
        (snapshot.SECTION_EVENTS, 0, "<Q", (HUGE,), "queues at most"),
        (snapshot.SECTION_EVENTS, 0, "<Q", (0,), "left over"),
        (snapshot.SECTION_REGIONS, 0, "<Q", (HUGE,), "cannot fit"),
        (snapshot.SECTION_REGIONS, 8, "<Q", (HUGE,), "cannot fit|needs"),
    ],
)
def test_hostile_fields_are_refused(
    tag: int, offset: int, fmt: str, values: tuple[int, ...], match: str
) -> None:
    saved = snapshot.save(populated())
    target = populated()
    request(target, encode_attach(2, 0x23))
    assert_refused(target, patched(saved, tag, offset, fmt, *values), match)


def test_physical_wrap_is_refused() -> None:
    saved = snapshot.save(populated())
    data = bytearray(saved)
    at, _length = sections_of(saved)[snapshot.SECTION_MAPPINGS]
    struct.pack_into("<Q", data, at + 8 + 5 * 8, BASE + 2 * PAGE - 1)  # the first mapping: two pages
    struct.pack_into("<Q", data, at + 8 + 10 * 8, 0xFFFF_FFFF_FFFF_F000)  # from the last physical page
    assert_refused(IommuDevice(), reseal(data), "wraps")


def test_section_framing_is_checked() -> None:
    saved = snapshot.save(populated())
    at, _length = sections_of(saved)[snapshot.SECTION_COUNTERS]
    for field_offset, value, match in (
        (-16, 5, "section 5 where section 2"),
        (-12, 1, "reserved field"),
        (-8, 1 << 40, "only"),
        (-8, 12, "multiple of 8"),
    ):
        data = bytearray(saved)
        struct.pack_into("<I" if field_offset != -8 else "<Q", data, at + field_offset, value)
        assert_refused(IommuDevice(), reseal(data), match)
    data = bytearray(saved)
    struct.pack_into("<I", data, 12, 6)
    assert_refused(IommuDevice(), reseal(data), "sections")
    data = bytearray(saved)
    struct.pack_into("<Q", data, 56, 1)
    assert_refused(IommuDevice(), reseal(data), "reserved header field")


def test_limits_of_the_restoring_device_apply() -> None:
    saved = snapshot.save(populated())
    assert_refused(IommuDevice(max_mappings=4), saved, "limit 4|at most 4")
    assert_refused(IommuDevice(max_domains=1), saved, "allows 1")
    assert_refused(IommuDevice(max_pending_events=0), saved, "queues at most 0")


def test_mmio_mapping_needs_mmio_negotiated() -> None:
    device = populated()
    request(device, encode_map(3, BASE + 64 * PAGE, BASE + 65 * PAGE - 1, 0, MAP_F_MMIO))
    saved = bytearray(snapshot.save(device))
    at, _length = sections_of(bytes(saved))[snapshot.SECTION_DEVICE]
    acked = device.acked_features & ~F_MMIO
    struct.pack_into("<Q", saved, at, acked)
    assert_refused(IommuDevice(), reseal(saved), "flags outside")
    struct.pack_into("<Q", saved, at, acked & ~F_BYPASS_CONFIG | F_MMIO)
    assert_refused(IommuDevice(), reseal(saved), "bypass domain without")


@settings(max_examples=300, deadline=None)
@given(
    edits=st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), min_size=1, max_size=4),
    cut=st.integers(0, 64),
)
def test_random_damage_is_refused_or_restores_a_consistent_device(
    edits: list[tuple[int, int]], cut: int
) -> None:
    saved = snapshot.save(populated())
    data = bytearray(saved)
    for position, value in edits:
        data[64 + position % (len(saved) - 96)] = value
    hostile = reseal(data[: len(data) - 32 - (cut % 9) * 8] + data[len(data) - 32 :])
    target = IommuDevice()
    try:
        snapshot.restore(target, hostile)
    except SnapshotError:
        assert snapshot.save(target) == snapshot.save(IommuDevice())
        return
    target.store.verify()  # type: ignore[attr-defined]
    again = IommuDevice()
    snapshot.restore(again, snapshot.save(target))
    assert state_of(again) == state_of(target)


def test_restore_needs_a_mapping_table() -> None:
    class NotATable:
        pass

    device = IommuDevice(mapping_store=NotATable())  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        snapshot.save(device)


def test_max_size_bounds_a_full_state() -> None:
    device = populated()
    assert len(snapshot.save(device)) <= snapshot.max_size(device)


# -- a million mappings ------------------------------------------------------------------------------------


def test_a_million_mappings() -> None:
    # How long it takes: scripts/bench-persist.
    device = IommuDevice()
    device.set_features(device.device_features())
    request(device, encode_attach(3, 0x20))
    request(device, encode_attach(5, 0x22))
    count = 1_000_000
    add_mappings(device, 3, BASE, count // 2)
    last = int(add_mappings(device, 5, BASE + count * PAGE, count - count // 2)[-1])

    saved = snapshot.save(device)
    restored = IommuDevice()
    snapshot.restore(restored, saved)
    assert restored.store.count() == count
    assert restored.mappings(5)[-1] == device.mappings(5)[-1]
    assert restored.translate(0x22, last + 5, 1, 1) == device.translate(0x22, last + 5, 1, 1)


def test_file_objects() -> None:
    device = populated()
    file = io.BytesIO()
    assert snapshot.write(device, file) == len(file.getvalue())
    file.seek(0)
    restored = IommuDevice()
    snapshot.read(restored, file)
    assert state_of(restored) == state_of(device)
    endless = io.BytesIO(bytes(snapshot.max_size(restored) + 1))
    assert_refused(restored, b"", "truncated")
    before = snapshot.save(restored)
    with pytest.raises(SnapshotError, match="larger than any state"):
        snapshot.read(restored, endless)
    assert snapshot.save(restored) == before

"""Save and restore the whole state of an `IommuDevice` as one versioned byte string.

Used for migration (VHOST_USER_SET_DEVICE_STATE_FD: the state travels through the front-end) and for
crash-persistence snapshots. A state comes from outside the process (a front-end, a file), so
`restore` trusts nothing in it: every magic, version, length, count, id, range, order and flag is
checked, and the device is only touched once the whole state has been checked and built beside it.
Any problem raises `SnapshotError` naming it, and leaves the device exactly as it was. ``save`` /
``restore`` work on bytes, ``write`` / ``read`` on binary file objects (``read`` stops at ``max_size``).

What is saved: acked and driver-written features, the config's ``bypass``, every domain (id, bypass
flag, how many mappings), every attached endpoint and its domain, every mapping of every domain, the
pending fault events (and the queued/dropped event counts), reserved-region overrides (endpoints
whose regions `IommuDevice.set_reserved_regions` replaced: PROBE, MAP and translate follow them), and
the request/status/fault counters. Not saved: the topology itself (only its fingerprint: a state is
refused by a device of another topology), the limits (``max_mappings``, ``max_domains``, event queue
capacity: the restoring device's own apply, and a state that does not fit them is refused), forced
answers (``IommuDevice.inject``, ``inject_rate``) and observers (a tool's, not the device's), and the
vhost-user connection (rings, memory, fds: the front-end sets those up again).

Format, version 1 (all integers little-endian; every section length is a multiple of 8)::

    header, 64 bytes
      0   magic            8 bytes  b"VIOMMUST"
      8   version          u32      1
      12  section count    u32      7
      16  total length     u64      of the whole state, trailer included
      24  fingerprint      32 bytes SHA-256 of the topology (see topology_fingerprint)
      56  reserved         u64      0
    sections, in this order, each: tag u32, reserved u32 (0), payload length u64, payload
      1 DEVICE     acked features u64, driver features u64, bypass u8, 7 zero bytes
      2 COUNTERS   n_requests u32, n_statuses u32, n_faults u32, reserved u32 (0),
                   then u64 counters: requests[n_requests], statuses[n_statuses], faults[n_faults],
                   events queued, events dropped
      3 DOMAINS    count u64, then per domain ascending by id: id u32, flags u32 (bit 0: bypass),
                   mappings u64
      4 ENDPOINTS  count u64, then per attached endpoint ascending by id: endpoint u32, domain u32
      5 MAPPINGS   count u64, then four columns of ``count`` entries: starts u64, lasts u64, phys u64,
                   flags u32 (zero-padded to 8 bytes); the mappings of the domains of DOMAINS in that
                   order, each domain's sorted by start, as many as its record says
      6 EVENTS     count u64, then ``count`` 24-byte virtio_iommu_fault records, oldest first
      7 REGIONS    override count u64, region count u64, then per overriding endpoint ascending:
                   endpoint u32, its region count u32; then the regions in that order: kind u32,
                   reserved u32 (0), start u64, end u64
    trailer: SHA-256 of everything before it (32 bytes)

The checksum catches truncation and corruption on the way; it is no defence against a hostile writer,
who can compute it too, which is why every field is checked as well. Mappings are written and read as
whole numpy columns, and loaded into a fresh mapping table by one compiled loop (``jit/bulk.py``), so a
million mappings take well under a second each way.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO, Final, NamedTuple

import numpy as np
import numpy.typing as npt

from vhost_iommu.device.domains import NO_DOMAIN, Domains
from vhost_iommu.device.events import FaultQueue
from vhost_iommu.device.layout import (
    F_BYPASS_CONFIG,
    F_MAP_UNMAP,
    F_MMIO,
    FAULT_SIZE,
    MAP_F_MMIO,
    MAP_F_READ,
    MAP_F_WRITE,
    U64_MAX,
    ResvMemType,
    Status,
)
from vhost_iommu.device.topology import ReservedRegion
from vhost_iommu.jit import tables
from vhost_iommu.jit.bulk import load_sorted
from vhost_iommu.jit.tables import MappingTable

if TYPE_CHECKING:
    from vhost_iommu.device.core import IommuDevice

MAGIC: Final = b"VIOMMUST"
VERSION: Final = 1


class Header(NamedTuple):
    """The fields of a state's header, in order (see the format above)."""

    magic: bytes
    version: int
    section_count: int
    total_length: int
    fingerprint: bytes
    reserved: int


#: The framing of a state (public for tools that take states apart: the snapshot fuzz target).
HEADER: Final = struct.Struct("<8sIIQ32sQ")  # a Header
SECTION_HEADER: Final = struct.Struct("<IIQ")  # tag, reserved, payload length
DIGEST_SIZE: Final = 32  # the SHA-256 trailer
_DEVICE = struct.Struct("<QQB7s")
_COUNTER_HEAD = struct.Struct("<IIII")
_COUNT = struct.Struct("<Q")
_REGION_HEAD = struct.Struct("<QQ")

SECTION_DEVICE: Final = 1
SECTION_COUNTERS: Final = 2
SECTION_DOMAINS: Final = 3
SECTION_ENDPOINTS: Final = 4
SECTION_MAPPINGS: Final = 5
SECTION_EVENTS: Final = 6
SECTION_REGIONS: Final = 7
_SECTIONS: Final = (
    SECTION_DEVICE,
    SECTION_COUNTERS,
    SECTION_DOMAINS,
    SECTION_ENDPOINTS,
    SECTION_MAPPINGS,
    SECTION_EVENTS,
    SECTION_REGIONS,
)
_SECTION_NAMES: Final = {
    SECTION_DEVICE: "DEVICE",
    SECTION_COUNTERS: "COUNTERS",
    SECTION_DOMAINS: "DOMAINS",
    SECTION_ENDPOINTS: "ENDPOINTS",
    SECTION_MAPPINGS: "MAPPINGS",
    SECTION_EVENTS: "EVENTS",
    SECTION_REGIONS: "REGIONS",
}

_DOMAIN_RECORD = np.dtype([("domain", "<u4"), ("flags", "<u4"), ("mappings", "<u8")])
_ENDPOINT_RECORD = np.dtype([("endpoint", "<u4"), ("domain", "<u4")])
_OVERRIDE_RECORD = np.dtype([("endpoint", "<u4"), ("regions", "<u4")])
_REGION_RECORD = np.dtype([("kind", "<u4"), ("reserved", "<u4"), ("start", "<u8"), ("end", "<u8")])
_DOMAIN_F_BYPASS = 1

U64Array = npt.NDArray[np.uint64]


class SnapshotError(ValueError):
    """A state that cannot be restored into this device; the message says what is wrong with it."""


# -- fingerprint -------------------------------------------------------------------------------------------


def topology_fingerprint(device: IommuDevice) -> bytes:
    """SHA-256 of what a state depends on: every number of the topology and its reserved regions (not
    the regions a tool put in their place: those are part of the state)."""
    topology = device.topology
    parts = [
        b"vhost-iommu topology 1",
        struct.pack(
            "<IIQQQIIIBI",
            topology.iommu_segment,
            topology.iommu_bdf,
            topology.page_size_mask,
            topology.input_start,
            topology.input_end,
            topology.domain_start,
            topology.domain_end,
            topology.probe_size,
            bool(topology.boot_bypass),
            len(topology.pci_ranges),
        ),
    ]
    for pci_range in topology.pci_ranges:
        parts.append(
            struct.pack(
                "<IIII", pci_range.segment, pci_range.bdf_start, pci_range.bdf_end, pci_range.endpoint_start
            )
        )
    endpoints = topology.endpoint_ids()
    parts.append(struct.pack("<I", len(endpoints)))
    for endpoint in endpoints:
        regions = topology.reserved_regions(endpoint)
        parts.append(struct.pack("<II", endpoint, len(regions)))
        parts.extend(struct.pack("<IQQ", region.kind, region.start, region.end) for region in regions)
    return hashlib.sha256(b"".join(parts)).digest()


# -- save --------------------------------------------------------------------------------------------------


def checksum(*parts: bytes | memoryview) -> bytes:
    """The trailer of a state whose bytes before it are ``parts``, in order."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    return digest.digest()


def _section(tag: int, *payload: bytes) -> bytes:
    body = b"".join(payload)
    assert len(body) % 8 == 0
    return SECTION_HEADER.pack(tag, 0, len(body)) + body


def _table(device: IommuDevice) -> MappingTable:
    store = device.store
    if not isinstance(store, MappingTable):
        raise TypeError(f"snapshots need the device's MappingTable store, not {type(store).__name__}")
    return store


def save(device: IommuDevice) -> bytes:
    """The whole state of ``device`` (see the module docstring for the format)."""
    table = _table(device)
    domains = device.domain_table
    events = device.events

    device_section = _DEVICE.pack(
        device.acked_features, device.driver_features, 1 if device.config.bypass else 0, bytes(7)
    )

    counters = [*device.request_counts, *device.status_counts, *device.fault_counts]
    counters += [events.queued_count, events.dropped_count]
    counter_section = (
        _COUNTER_HEAD.pack(len(device.request_counts), len(device.status_counts), len(device.fault_counts), 0)
        + np.array(counters, "<u8").tobytes()
    )

    existing = domains.existing()
    records = np.zeros(len(existing), _DOMAIN_RECORD)
    starts: list[U64Array] = []
    lasts: list[U64Array] = []
    phys: list[U64Array] = []
    flags: list[npt.NDArray[np.int32]] = []
    for row, domain in enumerate(existing):
        index = domain - domains.first
        count = table.count(domain)
        records[row] = (domain, _DOMAIN_F_BYPASS if domains.bypass[index] else 0, count)
        if count:
            columns = table.mapping_arrays(domain, 0, count)
            starts.append(columns[0])
            lasts.append(columns[1])
            phys.append(columns[2])
            flags.append(columns[3])
    total = int(records["mappings"].sum()) if len(records) else 0

    attached = np.flatnonzero(domains.endpoint_domain != NO_DOMAIN)
    endpoints = np.zeros(len(attached), _ENDPOINT_RECORD)
    endpoints["endpoint"] = domains.endpoint_ids[attached]
    endpoints["domain"] = domains.endpoint_domain[attached]

    def column(parts: list[U64Array]) -> bytes:
        return np.concatenate(parts).astype("<u8").tobytes() if parts else b""

    flag_bytes = np.concatenate(flags).astype("<u4").tobytes() if flags else b""
    mapping_section = [
        _COUNT.pack(total),
        column(starts),
        column(lasts),
        column(phys),
        flag_bytes,
        bytes(len(flag_bytes) % 8),
    ]

    pending = events.peek_all()
    event_section = _COUNT.pack(len(pending)) + b"".join(pending)

    overrides: list[tuple[int, tuple[ReservedRegion, ...]]] = []
    for endpoint, current in zip(domains.endpoint_ids.tolist(), domains.endpoint_regions, strict=True):
        if current != device.topology.reserved_regions(endpoint):
            overrides.append((endpoint, current))
    override_records = np.zeros(len(overrides), _OVERRIDE_RECORD)
    region_list = [region for _endpoint, regions in overrides for region in regions]
    region_records = np.zeros(len(region_list), _REGION_RECORD)
    for row, (endpoint, regions) in enumerate(overrides):
        override_records[row] = (endpoint, len(regions))
    for row, region in enumerate(region_list):
        region_records[row] = (int(region.kind), 0, region.start, region.end)
    region_section = (
        _REGION_HEAD.pack(len(overrides), len(region_list))
        + override_records.tobytes()
        + region_records.tobytes()
    )

    sections = [
        _section(SECTION_DEVICE, device_section),
        _section(SECTION_COUNTERS, counter_section),
        _section(SECTION_DOMAINS, _COUNT.pack(len(records)), records.tobytes()),
        _section(SECTION_ENDPOINTS, _COUNT.pack(len(endpoints)), endpoints.tobytes()),
        _section(SECTION_MAPPINGS, *mapping_section),
        _section(SECTION_EVENTS, event_section),
        _section(SECTION_REGIONS, region_section),
    ]
    total_length = HEADER.size + sum(len(section) for section in sections) + DIGEST_SIZE
    header = HEADER.pack(
        *Header(MAGIC, VERSION, len(sections), total_length, topology_fingerprint(device), 0)
    )
    return b"".join([header, *sections, checksum(header, *sections)])


def max_size(device: IommuDevice) -> int:
    """An upper bound on the size of any state this device could restore: a reader of an untrusted
    stream stops there instead of buffering without end."""
    domains = device.domain_table
    endpoints = len(domains.endpoint_ids)
    mappings = _table(device).limit
    regions = endpoints * (device.topology.probe_size // 20 + 1)  # a RESV_MEM property is 20 bytes
    return (
        HEADER.size
        + len(_SECTIONS) * SECTION_HEADER.size
        + _DEVICE.size
        + _COUNTER_HEAD.size
        + 8 * (len(device.request_counts) + len(device.status_counts) + len(device.fault_counts) + 2)
        + 8
        + 16 * min(domains.size, domains.max_domains)
        + 8
        + 8 * endpoints
        + 8
        + 32 * mappings
        + 8
        + FAULT_SIZE * device.events.capacity
        + 16
        + 8 * endpoints
        + 24 * regions
        + DIGEST_SIZE
    )


# -- restore -----------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Staged:
    """Everything a restore puts into the device, built and checked beside it."""

    acked_features: int
    driver_features: int
    bypass: int
    request_counts: list[int]
    status_counts: list[int]
    fault_counts: list[int]
    events: FaultQueue
    domains: Domains
    table: MappingTable


class _Reader:
    """Bounds-checked reads from one section's payload."""

    def __init__(self, data: memoryview, name: str) -> None:
        self.data = data
        self.name = name
        self.at = 0

    def fail(self, message: str) -> SnapshotError:
        return SnapshotError(f"section {self.name}: {message}")

    def take(self, size: int, what: str) -> memoryview:
        if size < 0 or size > len(self.data) - self.at:
            raise self.fail(f"{what} needs {size} bytes, {len(self.data) - self.at} are left")
        chunk = self.data[self.at : self.at + size]
        self.at += size
        return chunk

    def unpack(self, layout: struct.Struct, what: str) -> tuple[Any, ...]:
        return layout.unpack(self.take(layout.size, what))

    def records(self, dtype: np.dtype[np.void], count: int, what: str) -> npt.NDArray[np.void]:
        if count > len(self.data):  # before multiplying: a huge count must not become a huge number
            raise self.fail(f"{what}: count {count} cannot fit in {len(self.data)} bytes")
        return np.frombuffer(self.take(count * dtype.itemsize, what), dtype)

    def column(self, dtype: str, count: int, what: str) -> npt.NDArray[np.generic]:
        size = np.dtype(dtype).itemsize
        return np.frombuffer(self.take(count * size, what), dtype)

    def padding(self, size: int, what: str) -> None:
        if any(self.take(size, what)):
            raise self.fail(f"{what} must be zero")

    def done(self) -> None:
        if self.at != len(self.data):
            raise self.fail(f"{len(self.data) - self.at} bytes left over")


def _sections(device: IommuDevice, data: memoryview) -> dict[int, memoryview]:
    if len(data) < HEADER.size + DIGEST_SIZE:
        raise SnapshotError(f"truncated: {len(data)} bytes, a state has at least {HEADER.size + DIGEST_SIZE}")
    magic, version, section_count, total_length, fingerprint, reserved = Header._make(
        HEADER.unpack(data[: HEADER.size])
    )
    if magic != MAGIC:
        raise SnapshotError(f"not a vhost-iommu device state (magic {bytes(magic)!r}, expected {MAGIC!r})")
    if version != VERSION:
        raise SnapshotError(f"format version {version}; this back-end reads version {VERSION} only")
    if total_length != len(data):
        raise SnapshotError(
            f"the header says {total_length} bytes, the state has {len(data)} (truncated or padded)"
        )
    body = data[: len(data) - DIGEST_SIZE]
    if checksum(body) != bytes(data[len(data) - DIGEST_SIZE :]):
        raise SnapshotError("checksum mismatch: the state was corrupted on the way")
    if reserved != 0:
        raise SnapshotError(f"reserved header field is {reserved:#x}, must be 0")
    if fingerprint != topology_fingerprint(device):
        raise SnapshotError(
            "the state was saved by a device of another topology (IOMMU address, endpoints, reserved "
            "regions, granule, input or domain range, probe size or boot bypass differ)"
        )
    if section_count != len(_SECTIONS):
        raise SnapshotError(f"{section_count} sections; version {VERSION} has {len(_SECTIONS)}")
    found: dict[int, memoryview] = {}
    at = HEADER.size
    for expected in _SECTIONS:
        name = _SECTION_NAMES[expected]
        if len(body) - at < SECTION_HEADER.size:
            raise SnapshotError(f"section {name}: missing")
        tag, section_reserved, length = SECTION_HEADER.unpack(body[at : at + SECTION_HEADER.size])
        at += SECTION_HEADER.size
        if tag != expected:
            raise SnapshotError(f"section {tag} where section {expected} ({name}) belongs")
        if section_reserved != 0:
            raise SnapshotError(f"section {name}: reserved field is {section_reserved:#x}, must be 0")
        if length > len(body) - at:
            raise SnapshotError(f"section {name}: {length} bytes, only {len(body) - at} are left")
        if length % 8:
            raise SnapshotError(f"section {name}: length {length} is not a multiple of 8")
        found[tag] = body[at : at + length]
        at += length
    if at != len(body):
        raise SnapshotError(f"{len(body) - at} bytes after the last section")
    return found


def _stage(device: IommuDevice, data: memoryview) -> _Staged:
    sections = _sections(device, data)
    old_domains = device.domain_table
    old_table = _table(device)

    # DEVICE
    reader = _Reader(sections[SECTION_DEVICE], "DEVICE")
    acked, driver, bypass, pad = reader.unpack(_DEVICE, "features and bypass")
    reader.done()
    if any(pad):
        raise reader.fail("padding must be zero")
    if acked & ~device.device_features():
        raise reader.fail(f"acked features {acked:#x} include bits this device does not offer")
    if acked & ~driver:
        raise reader.fail(f"acked features {acked:#x} are not a subset of the driver's {driver:#x}")
    if bypass not in (0, 1):
        raise reader.fail(f"bypass {bypass} is neither 0 nor 1")

    # COUNTERS
    reader = _Reader(sections[SECTION_COUNTERS], "COUNTERS")
    n_requests, n_statuses, n_faults, counter_reserved = reader.unpack(_COUNTER_HEAD, "counter counts")
    expected_counts = (len(device.request_counts), len(device.status_counts), len(device.fault_counts))
    if (n_requests, n_statuses, n_faults) != expected_counts or counter_reserved:
        raise reader.fail(f"counter counts {(n_requests, n_statuses, n_faults)}, expected {expected_counts}")
    counters = reader.column("<u8", n_requests + n_statuses + n_faults + 2, "counters").tolist()
    reader.done()
    request_counts = counters[:n_requests]
    status_counts = counters[n_requests : n_requests + n_statuses]
    fault_counts = counters[n_requests + n_statuses : -2]
    queued_count, dropped_count = counters[-2:]

    # DOMAINS
    reader = _Reader(sections[SECTION_DOMAINS], "DOMAINS")
    (domain_count,) = reader.unpack(_COUNT, "domain count")
    records = reader.records(_DOMAIN_RECORD, domain_count, "domain records")
    reader.done()
    domain_ids = records["domain"].astype(np.int64)
    domain_flags = records["flags"]
    mapping_counts = records["mappings"]
    if domain_count > old_domains.max_domains:
        raise reader.fail(f"{domain_count} domains; this device allows {old_domains.max_domains}")
    if np.any(domain_ids[1:] <= domain_ids[:-1]):
        raise reader.fail("domain ids are not strictly ascending")
    if domain_count and (domain_ids[0] < old_domains.first or domain_ids[-1] > old_domains.last):
        raise reader.fail(f"a domain id is outside the domain range {old_domains.first}..{old_domains.last}")
    if np.any(domain_flags & ~np.uint32(_DOMAIN_F_BYPASS)):
        raise reader.fail("unknown domain flags")
    bypass_domains = (domain_flags & _DOMAIN_F_BYPASS) != 0
    if np.any(bypass_domains) and not acked & F_BYPASS_CONFIG:
        raise reader.fail("a bypass domain without VIRTIO_IOMMU_F_BYPASS_CONFIG negotiated")
    if np.any(mapping_counts[bypass_domains]):
        raise reader.fail("a bypass domain has mappings")
    if np.any(mapping_counts > np.uint64(old_table.limit)):
        raise reader.fail(f"a domain has more mappings than this device's limit {old_table.limit}")
    total_mappings = int(mapping_counts.sum()) if domain_count else 0
    if total_mappings > old_table.limit:
        raise reader.fail(f"{total_mappings} mappings; this device holds at most {old_table.limit}")
    if total_mappings and not acked & F_MAP_UNMAP:
        raise reader.fail("mappings without VIRTIO_IOMMU_F_MAP_UNMAP negotiated")

    # ENDPOINTS
    reader = _Reader(sections[SECTION_ENDPOINTS], "ENDPOINTS")
    (endpoint_count,) = reader.unpack(_COUNT, "endpoint count")
    attached = reader.records(_ENDPOINT_RECORD, endpoint_count, "endpoint records")
    reader.done()
    endpoint_ids = attached["endpoint"].astype(np.int64)
    endpoint_domains = attached["domain"].astype(np.int64)
    if np.any(endpoint_ids[1:] <= endpoint_ids[:-1]):
        raise reader.fail("endpoint ids are not strictly ascending")
    known_endpoints = old_domains.endpoint_ids.astype(np.int64)
    if not np.all(np.isin(endpoint_ids, known_endpoints)):
        raise reader.fail("an endpoint is not managed by this IOMMU")
    if not np.all(np.isin(endpoint_domains, domain_ids)):
        raise reader.fail("an endpoint is attached to a domain missing from DOMAINS")
    if not np.all(np.isin(domain_ids, endpoint_domains)):
        raise reader.fail("a domain has no endpoint (a domain exists only while an endpoint is attached)")

    # MAPPINGS
    reader = _Reader(sections[SECTION_MAPPINGS], "MAPPINGS")
    (mapping_total,) = reader.unpack(_COUNT, "mapping count")
    if mapping_total != total_mappings:
        raise reader.fail(f"{mapping_total} mappings, the domain records add up to {total_mappings}")
    if mapping_total > len(reader.data):
        raise reader.fail(f"count {mapping_total} cannot fit in {len(reader.data)} bytes")
    starts = reader.column("<u8", mapping_total, "starts").astype(np.uint64)
    lasts = reader.column("<u8", mapping_total, "lasts").astype(np.uint64)
    phys = reader.column("<u8", mapping_total, "phys").astype(np.uint64)
    flags = reader.column("<u4", mapping_total, "flags").astype(np.uint64)
    reader.padding(4 * (mapping_total % 2), "flag padding")
    reader.done()
    offsets = np.zeros(domain_count + 1, np.int64)
    np.cumsum(mapping_counts, out=offsets[1:])
    _check_mappings(device, reader, acked, starts, lasts, phys, flags, offsets)

    # EVENTS
    reader = _Reader(sections[SECTION_EVENTS], "EVENTS")
    (event_count,) = reader.unpack(_COUNT, "event count")
    if event_count > device.events.capacity:
        raise reader.fail(
            f"{event_count} pending events; this device queues at most {device.events.capacity}"
        )
    raw_events = reader.take(event_count * FAULT_SIZE, "events")
    reader.done()
    events = FaultQueue(device.events.capacity)
    for index in range(event_count):
        events.push(bytes(raw_events[index * FAULT_SIZE : (index + 1) * FAULT_SIZE]))
    events.queued_count = queued_count
    events.dropped_count = dropped_count

    # REGIONS
    reader = _Reader(sections[SECTION_REGIONS], "REGIONS")
    override_count, region_count = reader.unpack(_REGION_HEAD, "override and region counts")
    overrides = reader.records(_OVERRIDE_RECORD, override_count, "override records")
    region_records = reader.records(_REGION_RECORD, region_count, "region records")
    reader.done()
    override_ids = overrides["endpoint"].astype(np.int64)
    if np.any(override_ids[1:] <= override_ids[:-1]):
        raise reader.fail("override endpoints are not strictly ascending")
    if not np.all(np.isin(override_ids, known_endpoints)):
        raise reader.fail("an override names an endpoint not managed by this IOMMU")
    if int(overrides["regions"].sum()) != region_count:
        raise reader.fail("the override records do not add up to the region count")
    if np.any(region_records["reserved"]):
        raise reader.fail("reserved field of a region must be zero")
    valid_kinds = {int(kind) for kind in ResvMemType}
    replaced: list[tuple[int, tuple[ReservedRegion, ...]]] = []
    row = 0
    for endpoint, count in zip(override_ids.tolist(), overrides["regions"].tolist(), strict=True):
        regions = []
        for kind, _reserved, start, end in region_records[row : row + count].tolist():
            if kind not in valid_kinds:
                raise reader.fail(f"endpoint {endpoint:#x}: unknown region kind {kind}")
            regions.append(ReservedRegion(ResvMemType(kind), start, end))
        row += count
        replaced.append((endpoint, tuple(regions)))

    # Build the domains and the table beside the device.
    table = MappingTable(old_table.limit)
    domains = Domains(device.topology, table, max_domains=old_domains.max_domains)
    for endpoint, wanted in replaced:
        try:
            domains.set_reserved_regions(endpoint, wanted)
        except ValueError as exc:
            raise reader.fail(f"endpoint {endpoint:#x}: {exc}") from None
    bypass_of = dict(zip(domain_ids.tolist(), bypass_domains.tolist(), strict=True))
    for endpoint, domain in zip(endpoint_ids.tolist(), endpoint_domains.tolist(), strict=True):
        # The table is still empty: no ATTACH-time region conflict can arise, whatever the regions.
        status = domains.attach(endpoint, domain, bypass_of[domain])
        if status != Status.OK:
            raise SnapshotError(
                f"section ENDPOINTS: endpoint {endpoint:#x} cannot join domain {domain}: {status.name}"
            )
    # Mappings inside reserved regions are not refused: they are legitimate once regions change after
    # the MAP (set_reserved_regions keeps existing mappings), and the state must come back as it was.
    loaded = load_sorted(table, domain_ids, offsets, starts, lasts, phys, flags)
    if loaded != tables.OK:
        raise SnapshotError(
            f"section MAPPINGS: the mapping table refused the mappings ({tables.STATUS_NAMES[loaded]})"
        )
    domains.mapping_count[domain_ids - domains.first] = mapping_counts.astype(np.int64)
    return _Staged(
        acked_features=acked,
        driver_features=driver,
        bypass=bypass,
        request_counts=request_counts,
        status_counts=status_counts,
        fault_counts=fault_counts,
        events=events,
        domains=domains,
        table=table,
    )


def _check_mappings(
    device: IommuDevice,
    reader: _Reader,
    acked: int,
    starts: U64Array,
    lasts: U64Array,
    phys: U64Array,
    flags: U64Array,
    offsets: npt.NDArray[np.int64],
) -> None:
    """What MAP would have refused, checked over whole columns."""
    if not len(starts):
        return
    topology = device.topology
    granule_mask = np.uint64(device.granule - 1)
    if np.any(starts > lasts):
        raise reader.fail("a mapping ends before it starts")
    # lasts + 1 wraps to 0 for the top address: aligned, as MAP sees it.
    if (
        np.any(starts & granule_mask)
        or np.any(phys & granule_mask)
        or np.any((lasts + np.uint64(1)) & granule_mask)
    ):
        raise reader.fail(f"a mapping is not aligned to the granule {device.granule:#x}")
    if np.any(starts < np.uint64(topology.input_start)) or np.any(lasts > np.uint64(topology.input_end)):
        raise reader.fail("a mapping is outside the input range")
    if np.any(phys > np.uint64(U64_MAX) - (lasts - starts)):
        raise reader.fail("a mapping's physical range wraps around 2**64")
    known = MAP_F_READ | MAP_F_WRITE | (MAP_F_MMIO if acked & F_MMIO else 0)
    if np.any(flags & np.uint64(~known & 0xFFFF_FFFF)):
        raise reader.fail(f"a mapping has flags outside {known:#x}")
    # Within a domain, each mapping ends before the next starts (sorted, no overlap).
    same_domain = np.ones(len(starts) - 1, np.bool_)
    inner = offsets[1:-1]
    inner = inner[(inner > 0) & (inner < len(starts))]
    same_domain[inner - 1] = False
    if np.any(same_domain & (lasts[:-1] >= starts[1:])):
        raise reader.fail("a domain's mappings are not sorted by address or overlap")


def restore(device: IommuDevice, data: bytes | bytearray | memoryview) -> None:
    """Replace the whole state of ``device`` with a saved one; SnapshotError (device unchanged) if the
    state is malformed, corrupt, from another topology, or does not fit this device's limits."""
    view = memoryview(data).cast("B")
    staged = _stage(device, view)
    # Nothing below can fail: the device moves to the new state in one step, which DMA sees whole.
    with device.translation_guard.changing():
        device.store = staged.table
        device.domain_table = staged.domains
        device.config.bypass = staged.bypass
    device.events = staged.events
    device.acked_features = staged.acked_features
    device.driver_features = staged.driver_features
    device.request_counts[:] = staged.request_counts
    device.status_counts[:] = staged.status_counts
    device.fault_counts[:] = staged.fault_counts


def write(device: IommuDevice, file: BinaryIO) -> int:
    """Save ``device`` into ``file`` (a binary file object); returns the bytes written."""
    data = save(device)
    file.write(data)
    return len(data)


def read(device: IommuDevice, file: BinaryIO) -> None:
    """Restore ``device`` from ``file``, reading no more than any state of this device can be (a file of
    another size, or an endless stream, is refused without being read whole)."""
    limit = max_size(device)
    data = file.read(limit + 1)
    if len(data) > limit:
        raise SnapshotError(f"more than {limit} bytes: larger than any state of this device")
    restore(device, data)

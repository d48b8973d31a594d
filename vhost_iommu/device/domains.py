"""Domain and endpoint policy: ATTACH, DETACH, the life of a domain, reserved regions per domain.

The state MAP and UNMAP read is kept in flat numpy arrays indexed by ``domain - domain_range.start`` (does
the domain exist, is it a bypass domain, how many endpoints and mappings it has, which merged set of
reserved regions applies to it), so a compiled batch kernel can reach it without Python objects. The
rules that change it (ATTACH, DETACH, reset) are cold and stay plain Python.

A domain exists from the ATTACH that names it until its last endpoint leaves (DETACH, or ATTACH of that
endpoint elsewhere); its mappings go with it, as the spec says a domain "ceases to exist and its ID can be
reused by the driver for another domain".

Reserved regions start as the topology's and can be replaced per endpoint at run time
(`set_reserved_regions`, for tools). Device state a snapshot must keep besides the arrays above:
``endpoint_regions`` (the current regions of each endpoint slot, overrides included).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from vhost_iommu.device.layout import RESV_MEM_SIZE, U64_MAX, Status
from vhost_iommu.device.mapping import MappingStore
from vhost_iommu.device.topology import ReservedRegion, Topology, check_regions
from vhost_iommu.jit.dma import NO_DOMAIN

__all__ = ["MAX_REGION_SETS", "NO_DOMAIN", "DomainInfo", "Domains", "RegionSets"]

#: Interned region sets are never freed; a tool replacing regions over and over must not grow the device
#: without bound, so replacements stop being accepted past this many distinct sets.
MAX_REGION_SETS = 4096


class RegionSets:
    """Interned sets of merged reserved intervals: one per distinct endpoint set, one per domain mix.

    A MAP is refused when it overlaps a reserved region of any endpoint attached to the domain, so each
    domain points at the union of its endpoints' regions. Unions are memoised: endpoints of one PCI range
    share one set and a domain of such endpoints shares it too.
    Flat arrays (``starts``, ``ends``, ``offsets``) hold the same data for the MAP rule
    (``vhost_iommu.jit.rules.reserved_overlap``), compiled or not.
    """

    def __init__(self) -> None:
        self._intervals: list[tuple[tuple[int, int], ...]] = []
        self._ids: dict[tuple[tuple[int, int], ...], int] = {}
        self._unions: dict[frozenset[int], int] = {}
        self.starts = np.zeros(0, np.uint64)
        self.ends = np.zeros(0, np.uint64)
        self.offsets = np.zeros(1, np.int64)
        self.empty = self.intern(())

    def intern(self, intervals: tuple[tuple[int, int], ...]) -> int:
        merged = _merge(intervals)
        found = self._ids.get(merged)
        if found is not None:
            return found
        set_id = len(self._intervals)
        self._intervals.append(merged)
        self._ids[merged] = set_id
        self.starts = np.concatenate([self.starts, np.array([s for s, _ in merged], np.uint64)])
        self.ends = np.concatenate([self.ends, np.array([e for _, e in merged], np.uint64)])
        self.offsets = np.append(self.offsets, len(self.starts))
        return set_id

    def union(self, set_ids: frozenset[int]) -> int:
        if len(set_ids) == 1:
            return next(iter(set_ids))
        found = self._unions.get(set_ids)
        if found is None:
            found = self.intern(tuple(interval for i in set_ids for interval in self._intervals[i]))
            self._unions[set_ids] = found
        return found

    @property
    def count(self) -> int:
        """How many distinct sets were interned (they are never forgotten: ids live in the arrays)."""
        return len(self._intervals)

    def intervals(self, set_id: int) -> tuple[tuple[int, int], ...]:
        return self._intervals[set_id]


def _merge(intervals: tuple[tuple[int, int], ...]) -> tuple[tuple[int, int], ...]:
    merged: list[tuple[int, int]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return tuple(merged)


@dataclass(frozen=True, slots=True)
class DomainInfo:
    """A snapshot of one domain, for tools and tests."""

    domain: int
    bypass: bool
    endpoints: tuple[int, ...]
    mapping_count: int
    reserved: tuple[tuple[int, int], ...]


class Domains:
    """Domains and endpoint attachments of one device.

    Arrays indexed by ``domain - first`` (what MAP/UNMAP read): ``exists``, ``bypass``, ``endpoint_count``,
    ``mapping_count`` and ``resv_set`` (the `RegionSets` id of the union of its endpoints' reserved
    regions). Arrays indexed by endpoint slot (endpoints in ascending ID order, ``endpoint_ids``):
    ``endpoint_domain`` (NO_DOMAIN when detached) and ``endpoint_resv_set``.
    """

    def __init__(self, topology: Topology, store: MappingStore, *, max_domains: int) -> None:
        self.store = store
        self.topology = topology
        self.first = topology.domain_start
        self.last = topology.domain_end
        self.max_domains = max_domains
        self.size = size = self.last - self.first + 1
        self.exists: npt.NDArray[np.bool_] = np.zeros(size, np.bool_)
        self.bypass: npt.NDArray[np.bool_] = np.zeros(size, np.bool_)
        self.endpoint_count: npt.NDArray[np.int32] = np.zeros(size, np.int32)
        self.mapping_count: npt.NDArray[np.int64] = np.zeros(size, np.int64)
        self.resv_set: npt.NDArray[np.int32] = np.zeros(size, np.int32)
        self.live = 0

        self.regions = RegionSets()
        ids = topology.endpoint_ids()
        self.endpoint_ids: npt.NDArray[np.uint32] = np.array(ids, np.uint32)
        self._slots = {endpoint: slot for slot, endpoint in enumerate(ids)}
        self.endpoint_domain: npt.NDArray[np.int64] = np.full(len(ids), NO_DOMAIN, np.int64)
        self.endpoint_regions: list[tuple[ReservedRegion, ...]] = [topology.reserved_regions(e) for e in ids]
        self.endpoint_resv_set: npt.NDArray[np.int32] = np.array(
            [self.regions.intern(tuple((r.start, r.end) for r in rs)) for rs in self.endpoint_regions],
            np.int32,
        )
        # Per existing domain: how many of its endpoints use each region set (cold-path bookkeeping).
        self._members: dict[int, Counter[int]] = {}
        self._flatten_endpoint_regions()

    def _flatten_endpoint_regions(self) -> None:
        """``endpoint_regions`` as flat arrays for translation (compiled or not,
        ``vhost_iommu.jit.dma``): the regions of slot s are rows ``region_offsets[s]`` to
        ``region_offsets[s + 1]`` of ``region_starts``, ``region_ends`` (inclusive) and ``region_kinds``
        (RESV_MEM_T_*), sorted by start. Replaced whole whenever regions change."""
        flat = [region for regions in self.endpoint_regions for region in regions]
        self.region_starts: npt.NDArray[np.uint64] = np.array([r.start for r in flat], np.uint64)
        self.region_ends: npt.NDArray[np.uint64] = np.array([r.end for r in flat], np.uint64)
        self.region_kinds: npt.NDArray[np.int64] = np.array([int(r.kind) for r in flat], np.int64)
        self.region_offsets: npt.NDArray[np.int64] = np.cumsum(
            [0] + [len(regions) for regions in self.endpoint_regions], dtype=np.int64
        )

    # -- lookups -----------------------------------------------------------------------------------------

    def slot(self, endpoint: int) -> int | None:
        return self._slots.get(endpoint)

    def in_range(self, domain: int) -> bool:
        return self.first <= domain <= self.last

    def domain_exists(self, domain: int) -> bool:
        return self.in_range(domain) and bool(self.exists[domain - self.first])

    def domain_of(self, endpoint: int) -> int | None:
        slot = self._slots.get(endpoint)
        if slot is None:
            return None
        domain = int(self.endpoint_domain[slot])
        return None if domain == NO_DOMAIN else domain

    def endpoints_of(self, domain: int) -> tuple[int, ...]:
        attached = np.flatnonzero(self.endpoint_domain == domain)
        return tuple(int(self.endpoint_ids[slot]) for slot in attached)

    def existing(self) -> list[int]:
        return [int(index) + self.first for index in np.flatnonzero(self.exists)]

    def info(self, domain: int) -> DomainInfo:
        index = domain - self.first
        if not self.domain_exists(domain):
            raise KeyError(f"domain {domain} does not exist")
        return DomainInfo(
            domain,
            bool(self.bypass[index]),
            self.endpoints_of(domain),
            int(self.mapping_count[index]),
            self.regions.intervals(int(self.resv_set[index])),
        )

    # -- reserved regions --------------------------------------------------------------------------------

    def reserved_regions(self, endpoint: int) -> tuple[ReservedRegion, ...]:
        slot = self._slots.get(endpoint)
        return () if slot is None else self.endpoint_regions[slot]

    def set_reserved_regions(self, endpoint: int | None, regions: tuple[ReservedRegion, ...] | None) -> None:
        """Replace the regions of one endpoint (None: all), or restore the topology's (regions None).
        Validates everything before changing anything (ValueError)."""
        if endpoint is None:
            slots = list(range(len(self.endpoint_regions)))
        else:
            slot = self._slots.get(endpoint)
            if slot is None:
                raise ValueError(f"endpoint {endpoint:#x} is not managed by this IOMMU")
            slots = [slot]
        changes: list[tuple[int, tuple[ReservedRegion, ...]]] = []
        for slot in slots:
            wanted = (
                self.topology.reserved_regions(int(self.endpoint_ids[slot]))
                if regions is None
                else self._checked(regions)
            )
            changes.append((slot, wanted))
        if self.regions.count >= MAX_REGION_SETS:
            raise ValueError(f"{MAX_REGION_SETS} distinct reserved-region sets exist: no more replacements")
        for slot, wanted in changes:
            self._replace_regions(slot, wanted)
        self._flatten_endpoint_regions()

    def _checked(self, regions: tuple[ReservedRegion, ...]) -> tuple[ReservedRegion, ...]:
        for region in regions:
            if not 0 <= region.start <= region.end <= U64_MAX:
                raise ValueError(f"reserved region {region.start:#x}-{region.end:#x}: not a 64-bit range")
        ordered = tuple(sorted(regions, key=lambda region: region.start))
        problem = check_regions(ordered)
        if problem is not None:
            raise ValueError(problem)
        probe_size = self.topology.probe_size
        if probe_size and len(ordered) * RESV_MEM_SIZE > probe_size:
            raise ValueError(
                f"{len(ordered)} reserved regions do not fit probe_size {probe_size} "
                f"({RESV_MEM_SIZE} bytes each)"
            )
        return ordered

    def _replace_regions(self, slot: int, regions: tuple[ReservedRegion, ...]) -> None:
        old_set = int(self.endpoint_resv_set[slot])
        new_set = self.regions.intern(tuple((r.start, r.end) for r in regions))
        self.endpoint_regions[slot] = regions
        self.endpoint_resv_set[slot] = new_set
        domain = int(self.endpoint_domain[slot])
        if domain == NO_DOMAIN or old_set == new_set:
            return
        # The domain's merged set follows: MAP checks the union of its endpoints' regions.
        members = self._members[domain]
        members[old_set] -= 1
        if members[old_set] == 0:
            del members[old_set]
        members[new_set] += 1
        self.resv_set[domain - self.first] = self.regions.union(frozenset(members))

    # -- ATTACH / DETACH ---------------------------------------------------------------------------------

    def attach(self, endpoint: int, domain: int, bypass: bool) -> Status:
        """Attach ``endpoint`` to ``domain`` (creating it), moving it from its current domain.

        Every refusal happens before any state changes, so a refused ATTACH leaves the endpoint where it was.
        """
        slot = self._slots.get(endpoint)
        if slot is None:
            return Status.NOENT
        if not self.in_range(domain):
            # "domain_range describes the values supported in a domain field"; S_RANGE: "Out-of-range
            # parameters".
            return Status.RANGE
        index = domain - self.first
        current = int(self.endpoint_domain[slot])
        if self.exists[index]:
            if bool(self.bypass[index]) != bypass:
                # "If the domain already exists and the VIRTIO_IOMMU_ATTACH_F_BYPASS flag is not consistent
                # with that domain, the device SHOULD reject the request and set status to
                # VIRTIO_IOMMU_S_INVAL."
                return Status.INVAL
            if current == domain:
                return Status.OK
            # A bypass domain too is shared by every endpoint attached to it (Linux since 6.16 attaches
            # every bypassed endpoint to one): "If another endpoint is already attached to the domain
            # identified by domain, then the device MAY attach the endpoint identified by endpoint to the
            # domain."
            if not bypass and self._maps_over_regions(domain, self.endpoint_regions[slot]):
                # The endpoint's reserved regions are incompatible with mappings the domain already has
                # ("If properties of the endpoint ... are compatible ... Otherwise ... UNSUPP").
                return Status.UNSUPP
        else:
            frees_one = current != NO_DOMAIN and int(self.endpoint_count[current - self.first]) == 1
            if self.live - frees_one >= self.max_domains:
                return Status.NOMEM
        if current != NO_DOMAIN:
            # "If the endpoint identified by endpoint is already attached to another domain, then the device
            # SHOULD first detach it from that domain and attach it to the one identified by domain. In that
            # case the device SHOULD behave as if the driver issued a DETACH request with this endpoint,
            # followed by the ATTACH request." So the old domain may cease here (`_leave`), as Linux's
            # viommu_attach_dev expects: it replays a domain's mappings when it attaches it again.
            self._leave(slot, current)
        if not self.exists[index]:
            self.exists[index] = True
            self.bypass[index] = bypass
            self.endpoint_count[index] = 0
            self.mapping_count[index] = 0
            self._members[domain] = Counter()
            self.live += 1
        self._join(slot, domain)
        return Status.OK

    def detach(self, endpoint: int, domain: int) -> Status:
        slot = self._slots.get(endpoint)
        if slot is None:
            return Status.NOENT
        if not self.in_range(domain):
            # "If the VIRTIO_IOMMU_F_DOMAIN_RANGE feature is negotiated, the driver MUST NOT send requests
            # with domain less than domain_range.start or greater than domain_range.end"; S_RANGE:
            # "Out-of-range parameters". Linux since 6.16 sends DETACH of domain 0 when a bypassed endpoint
            # is released (its static identity domain has no ID): with a range that does not start at 0
            # this answer is RANGE and the endpoint stays in the identity domain.
            return Status.RANGE
        if int(self.endpoint_domain[slot]) != domain:
            # "If the domain identified by domain doesn't exist, or if the endpoint identified by endpoint
            # isn't attached to this domain, then the device MAY set the request status to INVAL."
            return Status.INVAL
        self._leave(slot, domain)
        return Status.OK

    def clear(self) -> None:
        """Device reset: every endpoint detached, every domain and its mappings gone."""
        for domain in self.existing():
            self.store.remove_domain(domain)
        self.exists[:] = False
        self.bypass[:] = False
        self.endpoint_count[:] = 0
        self.mapping_count[:] = 0
        self.resv_set[:] = self.regions.empty
        self.endpoint_domain[:] = NO_DOMAIN
        self._members.clear()
        self.live = 0

    # -- internals ---------------------------------------------------------------------------------------

    def _join(self, slot: int, domain: int) -> None:
        index = domain - self.first
        self.endpoint_domain[slot] = domain
        self.endpoint_count[index] += 1
        members = self._members[domain]
        members[int(self.endpoint_resv_set[slot])] += 1
        self.resv_set[index] = self.regions.union(frozenset(members))

    def _leave(self, slot: int, domain: int) -> None:
        index = domain - self.first
        self.endpoint_domain[slot] = NO_DOMAIN
        self.endpoint_count[index] -= 1
        if self.endpoint_count[index] == 0:
            # "After all endpoints have been successfully detached from a domain, it ceases to exist and its
            # ID can be reused by the driver for another domain": its mappings go with it.
            self.store.remove_domain(domain)
            self.exists[index] = False
            self.bypass[index] = False
            self.mapping_count[index] = 0
            self.resv_set[index] = self.regions.empty
            del self._members[domain]
            self.live -= 1
            return
        members = self._members[domain]
        set_id = int(self.endpoint_resv_set[slot])
        members[set_id] -= 1
        if members[set_id] == 0:
            del members[set_id]
        self.resv_set[index] = self.regions.union(frozenset(members))

    def _maps_over_regions(self, domain: int, regions: tuple[ReservedRegion, ...]) -> bool:
        for region in regions:
            # The first mapping ending at or after the region's start overlaps it iff it starts by its end.
            for start, _last, _phys, _flags in self.store.mappings(domain, region.start, 1):
                if start <= region.end:
                    return True
        return False

"""`IommuDevice`: the virtio-iommu device core, sans-I/O.

Bytes in, bytes out: the glue hands it the readable bytes of one requestq chain and the size of the
chain's writable part, and writes back what it returns. It knows nothing of sockets, rings or asyncio.

Framing rules (what happens to a chain whose sizes do not fit its request type):

- no head (fewer than 4 readable bytes), an unknown type, or PROBE when PROBE is not offered: nothing is
  written and the used length is 0 (the spec's rule for unrecognised requests);
- a writable part that cannot be the request's tail (smaller than 4 bytes; not exactly 4 bytes for
  ATTACH/DETACH/MAP/UNMAP; larger than probe_size + 4 for PROBE): nothing is written, used length 0. The
  spec: when the device "cannot find the tail ... it returns the buffers without writing to them".
  Writing a status at a guessed offset could let the driver read a zero (OK) where it looks for it;
- a readable part that is not exactly the request's layout (too short or too long): status IOERR. The
  tail is found, but the request cannot be read as its type, a virtio communication error rather than
  invalid parameters.

Otherwise the status is written in the tail (the last 4 bytes of the writable part), reserved bytes of the
tail are zero, and the used length is the whole writable size (the Linux driver copies the status back
only when the used length equals the writable size).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from time import perf_counter_ns

from vhost_iommu.abi import S_OK
from vhost_iommu.device import mapping
from vhost_iommu.device.config import ConfigSpace
from vhost_iommu.device.domains import DomainInfo, Domains
from vhost_iommu.device.events import FaultQueue
from vhost_iommu.device.history import FaultExplanation, MappingHistory, explain
from vhost_iommu.device.layout import (
    ATTACH,
    ATTACH_F_BYPASS,
    CONFIG_SIZE,
    DETACH,
    F_BYPASS_CONFIG,
    F_DOMAIN_RANGE,
    F_INPUT_RANGE,
    F_MAP_UNMAP,
    F_MMIO,
    F_PROBE,
    F_VERSION_1,
    HEAD,
    MAP,
    PROBE,
    READABLE_SIZE,
    TAIL_SIZE,
    UNMAP,
    FaultEvent,
    FaultReason,
    RequestType,
    Status,
    decode_fault,
    encode_fault,
    encode_resv_mem,
)
from vhost_iommu.device.mapping import MappingStore, default_store
from vhost_iommu.device.observers import DeviceObserver, RateInjection
from vhost_iommu.device.topology import ReservedRegion, Topology
from vhost_iommu.device.translation import Fault, Translation, translate
from vhost_iommu.jit import rules
from vhost_iommu.jit.guard import TranslationGuard
from vhost_iommu.jit.history import OP_ATTACH, OP_DETACH, OP_MAP, OP_RESET, OP_UNMAP

_STATUS_TAILS = [bytes((status, 0, 0, 0)) for status in range(len(Status))]  # indexed by status
_ZERO4 = bytes(4)
# Plain ints for the per-request dispatch (comparisons with IntEnum members cost a Python call each).
_ATTACH, _DETACH, _MAP, _UNMAP, _PROBE = (int(kind) for kind in RequestType)
_READABLE_SIZES = {int(kind): size for kind, size in READABLE_SIZE.items()}


@dataclass(frozen=True, slots=True)
class EndpointInfo:
    """A snapshot of one endpoint, for tools and tests."""

    endpoint: int
    segment: int
    bdf: int
    domain: int | None
    reserved: tuple[ReservedRegion, ...]


class IommuDevice:
    """One virtio-iommu device: config space, endpoints, domains, mappings, fault events.

    ``max_mappings`` sizes the mapping table (MAP answers NOMEM when it is full); ``max_domains`` bounds
    how many domains exist at once (an ATTACH that would create one more answers NOMEM); by default every
    ID of the domain range may exist at once.
    """

    config_size: int = CONFIG_SIZE

    def __init__(
        self,
        topology: Topology | None = None,
        *,
        max_pending_events: int = 64,
        max_mappings: int = 1 << 22,
        max_domains: int | None = None,
        mapping_store: MappingStore | None = None,
    ) -> None:
        self.topology = topology if topology is not None else Topology.default()
        self.config = ConfigSpace(self.topology)
        self.store = mapping_store if mapping_store is not None else default_store(max_mappings)
        range_size = self.topology.domain_end - self.topology.domain_start + 1
        self.domain_table = Domains(
            self.topology, self.store, max_domains=range_size if max_domains is None else max_domains
        )
        self.events = FaultQueue(max_pending_events)
        #: Held by every change of the translation state and by each DMA chunk (``vhost_iommu.jit.guard``).
        self.translation_guard = TranslationGuard()
        #: Every change of the tables, bounded (``vhost_iommu.device.history``): read to explain faults.
        self.history = MappingHistory()
        self.granule = self.topology.granule
        self.acked_features = 0
        self.driver_features = 0  # as the driver wrote them, offered or not
        # Index 0 counts requests that were not served (no head, unknown type, tail not found). Plain lists:
        # incrementing a numpy element costs several times more, twice per request.
        self.request_counts: list[int] = [0] * (len(RequestType) + 1)
        self.status_counts: list[int] = [0] * len(Status)
        self.fault_counts: list[int] = [0] * len(FaultReason)
        # Answers forced on upcoming requests by `inject`: request type -> [(status or None, remaining)].
        self._injected: dict[int, list[tuple[Status | None, int]]] = {}
        # Answers forced at a rate by `inject_rate`: request type -> its seeded draw.
        self._rates: dict[int, RateInjection] = {}
        self.injected_count = 0
        #: Tools watching every request and response (`DeviceObserver`); see observers.py.
        self.observers: list[DeviceObserver] = []

    # -- features and config -----------------------------------------------------------------------------

    def device_features(self) -> int:
        # Never the legacy F_BYPASS: "Devices SHOULD NOT offer both VIRTIO_IOMMU_F_BYPASS and
        # VIRTIO_IOMMU_F_BYPASS_CONFIG" and "New devices SHOULD NOT offer VIRTIO_IOMMU_F_BYPASS".
        features = F_VERSION_1 | F_MAP_UNMAP | F_INPUT_RANGE | F_DOMAIN_RANGE | F_MMIO | F_BYPASS_CONFIG
        if self.topology.probe_size:
            features |= F_PROBE
        return features

    def set_features(self, acked: int) -> None:
        self.driver_features = acked
        self.acked_features = acked & self.device_features()
        for observer in self.observers:
            observer.features(acked)

    def negotiated(self, feature: int) -> bool:
        return bool(self.acked_features & feature)

    def get_config(self, offset: int, size: int) -> bytes:
        return self.config.read(offset, size)

    def set_config(self, offset: int, data: bytes) -> None:
        for observer in self.observers:
            observer.config_write(offset, bytes(data))
        with self.translation_guard.changing():  # config.bypass decides unattached endpoints' DMA
            self.config.write(offset, bytes(data), bypass_config_negotiated=self.negotiated(F_BYPASS_CONFIG))

    @property
    def bypass(self) -> bool:
        return bool(self.config.bypass)

    def set_bypass(self, value: bool | int) -> None:
        """Change config.bypass from outside the driver (a tool breaking things on purpose). The caller
        tells the driver (a configuration change notification); the device itself has no transport."""
        if value not in (0, 1):  # True and False compare equal to 1 and 0
            raise ValueError(f"bypass {value!r} is neither 0 nor 1")
        with self.translation_guard.changing():
            self.config.bypass = int(value)
        for observer in self.observers:
            observer.bypass(int(value))

    # -- requests ----------------------------------------------------------------------------------------

    def handle_request(
        self, request: bytes | memoryview, writable_size: int, *, observed: bool = True
    ) -> tuple[bytes, int]:
        """Serve one requestq chain: (bytes for the start of the writable part, used length).
        ``observed`` False: a request the device answers again while it is being restored (journal
        replay), not one the driver sent now; observers do not see it."""
        observers = self.observers
        if not observers or not observed:
            return self._serve(request, writable_size)
        for observer in observers:
            observer.request(request, writable_size)
        injected = self.injected_count
        started = perf_counter_ns()
        response, used = self._serve(request, writable_size)
        elapsed = perf_counter_ns() - started
        forced = self.injected_count != injected
        for observer in observers:
            observer.response(request, writable_size, response, used, forced=forced, ns=elapsed)
        return response, used

    def _serve(self, request: bytes | memoryview, writable_size: int) -> tuple[bytes, int]:
        if len(request) < HEAD.size:
            self.request_counts[0] += 1
            return b"", 0
        request_type = request[0]
        readable_size = _READABLE_SIZES.get(request_type)
        if readable_size is None or (request_type == _PROBE and not self.topology.probe_size):
            self.request_counts[0] += 1
            return b"", 0
        if request_type == _PROBE:
            if not TAIL_SIZE <= writable_size <= self.topology.probe_size + TAIL_SIZE:
                self.request_counts[0] += 1
                return b"", 0
        elif writable_size != TAIL_SIZE:
            self.request_counts[0] += 1
            return b"", 0
        self.request_counts[request_type] += 1
        if self._injected and request_type in self._injected:
            return self._forced_answer(request_type, writable_size)
        if self._rates and request_type in self._rates:
            rate = self._rates[request_type]
            if rate.draw():
                return self._forced_status(rate.status, writable_size)

        status: int
        if request_type == _PROBE:
            properties_size = writable_size - TAIL_SIZE
            if len(request) != readable_size:
                properties, status = bytes(properties_size), Status.IOERR
            else:
                properties, status = self._probe(request, properties_size)
            self.status_counts[status] += 1
            return properties + _STATUS_TAILS[status], writable_size

        if len(request) != readable_size:
            status = Status.IOERR
        else:
            # Held until the change is made, released before the caller publishes the answer: no DMA
            # translated through the state before the change is still running when the driver sees it.
            with self.translation_guard.changing():
                if request_type == _MAP:
                    status = self._map(request)
                elif request_type == _UNMAP:
                    status = self._unmap(request)
                elif request_type == _ATTACH:
                    status = self._attach(request)
                else:
                    status = self._detach(request)
        self.status_counts[status] += 1
        return _STATUS_TAILS[status], writable_size

    # -- breaking things on purpose ----------------------------------------------------------------------

    def inject(self, request_type: RequestType, status: Status | None, *, times: int = 1) -> None:
        """Answer the next ``times`` requests of ``request_type`` whose tail can be found with ``status``
        instead of serving them (no state changes); ``status=None`` returns their buffers unwritten (used
        length 0), as for a request the device could not parse. For provoking a driver's error paths."""
        if times < 1:
            raise ValueError(f"times {times} must be at least 1")
        self._injected.setdefault(int(request_type), []).append((status, times))

    def inject_rate(
        self, request_type: RequestType, status: Status | None, rate: float, *, seed: int
    ) -> RateInjection | None:
        """Answer each request of ``request_type`` (whose tail can be found) with ``status`` with
        probability ``rate``, drawn from ``random.Random(seed)``: the same seed and requests force the
        same ones. Replaces the type's previous rate; ``rate`` 0 removes it. A count injection
        (`inject`) waiting for the type answers first, without a draw."""
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"rate {rate} is not within 0..1")
        if rate == 0.0:
            self._rates.pop(int(request_type), None)
            return None
        injection = RateInjection(RequestType(request_type), status, rate, seed)
        self._rates[int(request_type)] = injection
        return injection

    @property
    def rate_injections(self) -> list[RateInjection]:
        return list(self._rates.values())

    def clear_injections(self) -> None:
        """Every forced answer off: count injections and rates."""
        self._injected.clear()
        self._rates.clear()

    @property
    def has_injections(self) -> bool:
        """Whether answers may be forced on upcoming requests (a compiled request path must then leave
        those requests to `handle_request`)."""
        return bool(self._injected or self._rates)

    def _forced_answer(self, request_type: int, writable_size: int) -> tuple[bytes, int]:
        queue = self._injected[request_type]
        status, remaining = queue[0]
        if remaining > 1:
            queue[0] = (status, remaining - 1)
        else:
            queue.pop(0)
            if not queue:
                del self._injected[request_type]
        return self._forced_status(status, writable_size)

    def _forced_status(self, status: Status | None, writable_size: int) -> tuple[bytes, int]:
        self.injected_count += 1
        if status is None:
            return b"", 0
        self.status_counts[status] += 1
        return bytes(writable_size - TAIL_SIZE) + _STATUS_TAILS[status], writable_size

    def _attach(self, request: bytes | memoryview) -> Status:
        _type, _head_reserved, domain, endpoint, flags, reserved = ATTACH.unpack(request)
        if reserved != _ZERO4:
            return Status.INVAL
        known_flags = ATTACH_F_BYPASS if self.negotiated(F_BYPASS_CONFIG) else 0
        if flags & ~known_flags:
            return Status.INVAL
        previous = self.domain_table.domain_of(endpoint)
        status = self.domain_table.attach(endpoint, domain, bool(flags & ATTACH_F_BYPASS))
        if status == Status.OK and previous != domain:
            self.history.append(OP_ATTACH, domain, value=endpoint, extra=-1 if previous is None else previous)
        return status

    def _detach(self, request: bytes | memoryview) -> Status:
        # The reserved field is ignored: "The device MUST ignore reserved."
        _type, _head_reserved, domain, endpoint, _reserved = DETACH.unpack(request)
        status = self.domain_table.detach(endpoint, domain)
        if status == Status.OK:
            removed = not self.domain_table.domain_exists(domain)
            self.history.append(OP_DETACH, domain, value=endpoint, extra=int(removed))
        return status

    def _map(self, request: bytes | memoryview) -> int:
        # The rules are the compiled request path's own (jit/rules.py), run here as Python.
        _type, _head_reserved, domain, virt_start, virt_end, phys_start, flags = MAP.unpack(request)
        acked = self.acked_features
        domains = self.domain_table
        regions = domains.regions
        topology = self.topology
        index = domain - domains.first
        status = rules.map_status(
            bool(acked & F_MAP_UNMAP),
            bool(acked & F_MMIO),
            index,
            domains.exists,
            domains.bypass,
            domains.resv_set,
            regions.starts,
            regions.ends,
            regions.offsets,
            virt_start,
            virt_end,
            phys_start,
            flags,
            self.granule,
            topology.input_start,
            topology.input_end,
        )
        if status != S_OK:
            return status
        result = self.store.map(domain, virt_start, virt_end, phys_start, flags)
        if result == mapping.OK:
            domains.mapping_count[index] += 1
            self.history.append(OP_MAP, domain, virt_start, virt_end, phys_start, flags)
        return rules.mapped_status(result)

    def _unmap(self, request: bytes | memoryview) -> int:
        _type, _head_reserved, domain, virt_start, virt_end, reserved = UNMAP.unpack(request)
        domains = self.domain_table
        index = domain - domains.first
        status = rules.unmap_status(
            bool(self.acked_features & F_MAP_UNMAP),
            int.from_bytes(reserved, "little"),
            index,
            domains.exists,
            domains.bypass,
            virt_start,
            virt_end,
        )
        if status != S_OK:
            return status
        result, removed = self.store.unmap(domain, virt_start, virt_end)
        if result == mapping.OK:
            domains.mapping_count[index] -= removed
            self.history.append(OP_UNMAP, domain, virt_start, virt_end, removed)
        return rules.unmapped_status(result)

    def _probe(self, request: bytes | memoryview, properties_size: int) -> tuple[bytes, Status]:
        if not self.acked_features & F_PROBE:
            return bytes(properties_size), Status.UNSUPP
        if properties_size < self.topology.probe_size:
            return bytes(properties_size), Status.INVAL
        _type, _head_reserved, endpoint, _reserved = PROBE.unpack(request)
        if not self.topology.has_endpoint(endpoint):
            return bytes(properties_size), Status.NOENT
        properties = b"".join(
            encode_resv_mem(region.kind, region.start, region.end)
            for region in self.reserved_regions(endpoint)
        )
        return properties + bytes(properties_size - len(properties)), Status.OK

    # -- reserved regions ------------------------------------------------------------------------------

    def reserved_regions(self, endpoint: int) -> tuple[ReservedRegion, ...]:
        """The regions PROBE reports for ``endpoint`` and MAP and translate respect (the topology's,
        unless `set_reserved_regions` replaced them); () for an endpoint this IOMMU does not manage."""
        return self.domain_table.reserved_regions(endpoint)

    def set_reserved_regions(self, endpoint: int | None, regions: tuple[ReservedRegion, ...] | None) -> None:
        """Replace the reserved regions of ``endpoint`` (None: of every endpoint) with ``regions``
        (None: the topology's own again), for the next PROBE, every MAP from now on and translation.

        Mappings that already exist in a newly reserved range stay (the device never drops a mapping
        by itself); a MAP into it is refused (RANGE) from now on. ValueError for regions PROBE could not
        report (overlapping, more than one MSI region, more than probe_size holds, end before start)
        or an endpoint this IOMMU does not manage; nothing changes then. The replacement survives a
        device reset (the driver re-probes then); `system_reset` does not restore it either.

        Like every tool entry point, call it while nothing else drives the device: it replaces arrays
        the compiled request path reads (a back-end's requestq thread is parked meanwhile:
        `VirtioIommuBackend.quiesced`, which the control channel wraps every command in)."""
        with self.translation_guard.changing():
            self.domain_table.set_reserved_regions(endpoint, regions)
        for observer in self.observers:
            observer.reserved_regions(endpoint, regions)

    # -- translation and faults --------------------------------------------------------------------------

    def translate(
        self, endpoint: int, iova: int, size: int, access: int, *, report: bool = True
    ) -> Translation | Fault:
        """Translate a DMA access by ``endpoint``; a Fault is queued for the eventq unless report=False."""
        result = translate(self.domain_table, self.bypass, endpoint, iova, size, access)
        if isinstance(result, Translation):
            return result
        return self.record_fault(result, report=report)

    def record_fault(self, fault: Fault, *, report: bool = True) -> Fault:
        """Count a fault of a DMA access and, unless report=False, queue its event for the eventq when the
        endpoint is one this IOMMU manages (and the queue has room); the Fault as recorded, which
        observers are shown (``DeviceObserver.fault``)."""
        self.fault_counts[fault.reason] += 1
        if report and self.topology.has_endpoint(fault.endpoint) and self.events.push(fault.encode()):
            fault = replace(fault, reported=True)
        for observer in self.observers:
            observer.fault(fault)
        return fault

    def explain(self, fault: Fault, at_ticks: int | None = None) -> FaultExplanation:
        """Why ``fault`` happened, from the current state and the mapping history
        (``vhost_iommu.device.history``); ``at_ticks``: when the access was made (default: now)."""
        return explain(self, fault, at_ticks)

    def report_fault(self, reason: int, flags: int, endpoint: int, address: int = 0) -> bool:
        """Queue an arbitrary fault event (for tools that provoke a driver on purpose)."""
        return self.events.push(encode_fault(reason, flags, endpoint, address))

    def take_event(self) -> bytes | None:
        """The oldest pending 24-byte fault event, for the next eventq buffer."""
        return self.events.take()

    def pending_events(self) -> list[FaultEvent]:
        """The events waiting for eventq buffers, oldest first, decoded (they stay queued)."""
        return [decode_fault(event) for event in self.events.peek_all()]

    @property
    def pending_event_count(self) -> int:
        return len(self.events)

    @property
    def dropped_event_count(self) -> int:
        return self.events.dropped_count

    # -- reset -------------------------------------------------------------------------------------------

    def reset(self) -> None:
        """Device reset: every endpoint detached, every domain (and its mappings) dropped, pending events
        dropped, features forgotten. ``bypass`` keeps its value; the counters are lifetime statistics and
        keep theirs."""
        with self.translation_guard.changing():
            self.domain_table.clear()
            self.history.append(OP_RESET)
        self.events.clear()
        self.acked_features = 0
        self.driver_features = 0
        for observer in self.observers:
            observer.reset()

    def system_reset(self) -> None:
        """System reset: a device reset that also restores ``bypass`` to its boot value."""
        with self.translation_guard.changing():
            self.reset()
            self.config.system_reset()

    # -- inspection --------------------------------------------------------------------------------------

    def endpoints(self) -> list[EndpointInfo]:
        found = []
        for endpoint in self.topology.endpoint_ids():
            address = self.topology.pci_address(endpoint)
            assert address is not None
            found.append(
                EndpointInfo(
                    endpoint,
                    address[0],
                    address[1],
                    self.domain_table.domain_of(endpoint),
                    self.reserved_regions(endpoint),
                )
            )
        return found

    def domain_of(self, endpoint: int) -> int | None:
        return self.domain_table.domain_of(endpoint)

    def domains(self) -> list[DomainInfo]:
        return [self.domain_table.info(domain) for domain in self.domain_table.existing()]

    def mappings(self, domain: int) -> list[tuple[int, int, int, int]]:
        """(virt_start, virt_end, phys_start, flags) of every mapping of ``domain``, by address."""
        if not self.domain_table.domain_exists(domain):
            return []
        return [tuple(map(int, entry)) for entry in self.store.mappings(domain)]  # type: ignore[misc]

    def request_counters(self) -> dict[str, int]:
        counters = {kind.name: int(self.request_counts[kind]) for kind in RequestType}
        counters["UNSERVED"] = int(self.request_counts[0])
        return counters

    def status_counters(self) -> dict[str, int]:
        return {status.name: int(self.status_counts[status]) for status in Status}

    def fault_counters(self) -> dict[str, int]:
        counters = {reason.name: int(self.fault_counts[reason]) for reason in FaultReason}
        counters["DROPPED"] = self.events.dropped_count
        return counters

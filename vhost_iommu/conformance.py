"""Driver conformance: which driver-normative statements of the virtio-iommu spec a driver breaks.

The virtio 1.3 "IOMMU Device" section (oasis-tcs/virtio-spec, device-types/iommu/description.tex) holds
"The driver MUST/SHOULD ..." statements. The ones a device can see being broken are checked here, from
the requests, the config writes and the features a driver sends, against the device's state *before* the
request is applied (an ATTACH's bypass flag is compared with the domain as it was). :data:`STATEMENTS`
lists them with the spec's words; :data:`NOT_CHECKABLE` the ones a device cannot observe.

A :class:`ConformanceChecker` only reads the device through public attributes and never changes it; it
counts violations per statement and logs the first of each kind once (a driver that breaks a rule tends
to break it on every request). The control layer feeds it (docs/toolkit.md); it knows nothing of
sockets or rings.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from vhost_iommu.device import IommuDevice
from vhost_iommu.device.layout import (
    ATTACH,
    ATTACH_F_BYPASS,
    CONFIG_BYPASS,
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
    MAP_F_MMIO,
    MAP_F_READ,
    MAP_F_WRITE,
    PROBE,
    READABLE_SIZE,
    TAIL_SIZE,
    UNMAP,
    RequestType,
)

log = logging.getLogger(__name__)

_SECTION = "IOMMU Device"


@dataclass(frozen=True, slots=True)
class Statement:
    """One driver-normative statement: where it is and what it says (shortened, the spec's words)."""

    section: str
    text: str


#: Every statement checked, by a stable ID (the control channel and the testing plugin use the IDs).
STATEMENTS: dict[str, Statement] = {
    "features-accept": Statement(
        f"{_SECTION} / Feature bits",
        "The driver SHOULD accept any of the VIRTIO_IOMMU_F_INPUT_RANGE, VIRTIO_IOMMU_F_DOMAIN_RANGE and "
        "VIRTIO_IOMMU_F_PROBE feature bits if offered by the device.",
    ),
    "config-write-other": Statement(
        f"{_SECTION} / Device configuration layout",
        "The driver MUST NOT write to any other device configuration field [than bypass].",
    ),
    "config-bypass-unnegotiated": Statement(
        f"{_SECTION} / Device configuration layout",
        "When the VIRTIO_IOMMU_F_BYPASS_CONFIG feature is negotiated, the driver MAY write to bypass "
        "[and only then].",
    ),
    "config-bypass-value": Statement(
        f"{_SECTION} / Device configuration layout",
        "The driver MUST NOT write a value different than 0 or 1 to bypass.",
    ),
    "probe-before-attach": Statement(
        f"{_SECTION} / Device Initialization",
        "If the VIRTIO_IOMMU_F_PROBE feature is negotiated, the driver SHOULD send a VIRTIO_IOMMU_T_PROBE "
        "request for each endpoint before attaching the endpoint to a domain.",
    ),
    "request-before-features": Statement(
        "General Initialization And Device Operation / Device Initialization",
        "[The driver sets FEATURES_OK before] performing device-specific setup ... [and only then uses] the "
        "device's virtqueues. (A request arrived before the driver's features were set.)",
    ),
    "request-layout": Statement(
        f"{_SECTION} / Device operations",
        "All requests are split in two parts: one device-readable, one device-writable [of the request "
        "type's layout]. (Unknown type, or readable/writable sizes that are not the type's struct.)",
    ),
    "request-unnegotiated": Statement(
        f"{_SECTION} / Feature bits",
        "MAP and UNMAP need VIRTIO_IOMMU_F_MAP_UNMAP, PROBE needs VIRTIO_IOMMU_F_PROBE [negotiated].",
    ),
    "head-reserved": Statement(
        f"{_SECTION} / Device operations",
        "The driver SHOULD set field reserved of struct virtio_iommu_req_head to zero.",
    ),
    "input-range": Statement(
        f"{_SECTION} / Device operations",
        "If the VIRTIO_IOMMU_F_INPUT_RANGE feature is negotiated, the driver MUST NOT send requests with "
        "virt_start less than input_range.start or virt_end greater than input_range.end.",
    ),
    "domain-range": Statement(
        f"{_SECTION} / Device operations",
        "If the VIRTIO_IOMMU_F_DOMAIN_RANGE feature is negotiated, the driver MUST NOT send requests with "
        "domain less than domain_range.start or greater than domain_range.end.",
    ),
    "attach-reserved": Statement(
        f"{_SECTION} / Device operations / ATTACH request", "The driver SHOULD set reserved to zero."
    ),
    "attach-bypass-consistent": Statement(
        f"{_SECTION} / Device operations / ATTACH request",
        "If the domain already exists and is a bypass domain, the driver SHOULD set the "
        "VIRTIO_IOMMU_ATTACH_F_BYPASS flag. If the domain exists and is not a bypass domain, the driver "
        "SHOULD NOT set the VIRTIO_IOMMU_ATTACH_F_BYPASS flag.",
    ),
    "attach-flags-undefined": Statement(
        f"{_SECTION} / Device operations / ATTACH request",
        "[Flags other than VIRTIO_IOMMU_ATTACH_F_BYPASS, which needs VIRTIO_IOMMU_F_BYPASS_CONFIG, are "
        "undefined; the device MUST reject them.]",
    ),
    "detach-reserved": Statement(
        f"{_SECTION} / Device operations / DETACH request", "The driver SHOULD set reserved to zero."
    ),
    "map-flags-undefined": Statement(
        f"{_SECTION} / Device operations / MAP request",
        "The driver SHOULD set undefined flags bits to zero.",
    ),
    "map-bypass-domain": Statement(
        f"{_SECTION} / Device operations / MAP request",
        "The driver SHOULD NOT send MAP requests on a bypass domain.",
    ),
    "map-virt-end": Statement(
        f"{_SECTION} / Device operations / MAP request",
        "virt_end MUST be strictly greater than virt_start.",
    ),
    "map-mmio-unnegotiated": Statement(
        f"{_SECTION} / Device operations / MAP request",
        "If the VIRTIO_IOMMU_F_MMIO feature isn't negotiated, the driver MUST NOT use the "
        "VIRTIO_IOMMU_MAP_F_MMIO flag.",
    ),
    "map-overlap": Statement(
        f"{_SECTION} / Device operations / MAP request",
        "[A MAP over an existing mapping of the domain:] If a mapping already exists in the requested "
        "range, the device SHOULD reject the request.",
    ),
    "map-reserved-region": Statement(
        f"{_SECTION} / Device operations / PROBE properties / RESVMEM",
        "The driver SHOULD NOT map any virtual address described by a VIRTIO_IOMMU_RESV_MEM_T_RESERVED or "
        "VIRTIO_IOMMU_RESV_MEM_T_MSI property.",
    ),
    "unmap-reserved": Statement(
        f"{_SECTION} / Device operations / UNMAP request", "The driver SHOULD set the reserved field to zero."
    ),
    "unmap-split": Statement(
        f"{_SECTION} / Device operations / UNMAP request",
        "The first address of a range MUST either be the first address of a mapping or be outside any "
        "mapping. The last address of a range MUST either be the last address of a mapping or be outside "
        "any mapping.",
    ),
    "unmap-bypass-domain": Statement(
        f"{_SECTION} / Device operations / UNMAP request",
        "The driver SHOULD NOT send UNMAP requests on a bypass domain.",
    ),
    "probe-size": Statement(
        f"{_SECTION} / Device operations / PROBE request",
        "The size of properties MUST be probe_size bytes.",
    ),
    "probe-reserved": Statement(
        f"{_SECTION} / Device operations / PROBE request",
        "The driver SHOULD set field reserved of the PROBE request to zero.",
    ),
}

#: Driver-normative statements a device cannot see broken, and why (docs/toolkit.md lists them).
NOT_CHECKABLE: dict[str, str] = {
    "MUST NOT negotiate MAP_UNMAP if incapable of sending MAP and UNMAP": "a capability, not a message",
    "MUST ignore reserved of virtio_iommu_req_tail": "what the driver does with a response",
    "SHOULD interpret a used length of zero as a request failure": "what the driver does with a response",
    "SHOULD ensure endpoints that cannot be isolated share a domain": "isolation is platform knowledge",
    "SHOULD set MAP_F_MMIO for device registers; one memory type per range": "the device cannot tell "
    "RAM from registers in a guest-physical address",
    "MUST set MAP_F_READ if it intends to allow reads": "an intention",
    "SHOULD ignore bits 1-7 of bypass; property and fault parsing rules": "how the driver reads",
}

_KNOWN_ATTACH_FLAGS = ATTACH_F_BYPASS
_KNOWN_MAP_FLAGS = MAP_F_READ | MAP_F_WRITE | MAP_F_MMIO
_ACCEPT_IF_OFFERED = F_INPUT_RANGE | F_DOMAIN_RANGE | F_PROBE


@dataclass
class ConformanceChecker:
    """Counts the driver-normative statements a driver breaks on one device.

    Call :meth:`check_request` *before* the device handles each request, :meth:`check_config_write` for
    each byte range the driver writes to the config space, :meth:`check_features` when it sets its
    features, and :meth:`device_reset` when the device is reset.
    """

    device: IommuDevice
    #: Where log lines come from (the connection's name), so several guests can be told apart.
    name: str = "device"
    counts: dict[str, int] = field(default_factory=dict)
    #: The first violation of each statement, described (what a test failure shows).
    first: dict[str, str] = field(default_factory=dict)
    _probed: set[int] = field(default_factory=set)
    # What each endpoint's last PROBE told the driver: "described by a RESV_MEM property" means described
    # to it, so a region a tool added after that PROBE is not one the driver was told to avoid.
    _told: dict[int, tuple[tuple[int, int], ...]] = field(default_factory=dict)
    _features_set: bool = False
    #: Called with (statement, detail) the first time a statement is broken on this device: a device
    #: worker under a keeper tells the keeper, whose exit status --conformance=strict decides.
    on_first: Callable[[str, str], None] | None = None

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def reset_counts(self) -> None:
        self.counts.clear()
        self.first.clear()

    def _flag(self, statement: str, detail: str) -> None:
        assert statement in STATEMENTS
        count = self.counts.get(statement, 0)
        self.counts[statement] = count + 1
        if count == 0 and statement not in self.first:
            self.first[statement] = detail
            # Once per kind: a driver that breaks a rule usually breaks it on every request.
            log.warning(
                "%s: driver breaks %s (%s): %s", self.name, statement, STATEMENTS[statement].text, detail
            )
            if self.on_first is not None:
                self.on_first(statement, f"{self.name}: {statement}: {detail}")

    # -- device lifetime --------------------------------------------------------------------------------

    def device_reset(self) -> None:
        # A reset detaches every endpoint; the driver probes them again as it re-initialises.
        self._probed.clear()
        self._told.clear()
        self._features_set = False

    def assume_history(self) -> None:
        """What the driver did before this checker existed is unknown (a device worker took the session
        over): assume it did what it had to, so that nothing it did right is flagged: features set, every
        endpoint probed and told the reserved regions it has now."""
        self._features_set = True
        for endpoint in self.device.topology.endpoint_ids():
            self._probed.add(endpoint)
            self._told[endpoint] = tuple((r.start, r.end) for r in self.device.reserved_regions(endpoint))

    def check_features(self, acked: int) -> None:
        self._features_set = True
        offered = self.device.device_features()
        missing = offered & _ACCEPT_IF_OFFERED & ~acked
        if missing:
            self._flag("features-accept", f"offered but not accepted: feature bits {missing:#x}")

    def check_config_write(self, offset: int, data: bytes) -> None:
        if not data:
            return
        end = offset + len(data)
        if offset != CONFIG_BYPASS or len(data) != 1:
            self._flag("config-write-other", f"{len(data)} bytes written at config offset {offset}")
            if not offset <= CONFIG_BYPASS < end:
                return
        value = data[CONFIG_BYPASS - offset]
        if not self.device.acked_features & F_BYPASS_CONFIG:
            self._flag("config-bypass-unnegotiated", f"bypass written ({value}) without BYPASS_CONFIG")
        if value not in (0, 1):
            self._flag("config-bypass-value", f"bypass written with {value:#x}")

    # -- requests ---------------------------------------------------------------------------------------

    def check_request(self, request: bytes | memoryview, writable_size: int) -> None:
        """Check one request against the device's current state (call before the device applies it)."""
        request = bytes(request)
        device = self.device
        if not self._features_set and not device.driver_features & F_VERSION_1:
            self._flag("request-before-features", "a request before the driver set its features")
        if len(request) < HEAD.size:
            self._flag("request-layout", f"{len(request)} readable bytes: no request head")
            return
        kind = request[0]
        if kind not in READABLE_SIZE:
            self._flag("request-layout", f"unknown request type {kind}")
            return
        name = RequestType(kind).name
        if request[1:4] != bytes(3):
            self._flag("head-reserved", f"{name} with head reserved bytes {request[1:4].hex()}")
        probe_size = device.topology.probe_size
        wanted_writable = probe_size + TAIL_SIZE if kind == RequestType.PROBE else TAIL_SIZE
        if len(request) != READABLE_SIZE[kind]:
            self._flag(
                "request-layout",
                f"{name} with {len(request)} readable bytes (its layout has {READABLE_SIZE[kind]})",
            )
            return
        if kind == RequestType.PROBE:
            if writable_size != wanted_writable:
                self._flag(
                    "probe-size",
                    f"PROBE with {writable_size - TAIL_SIZE} bytes for properties (probe_size {probe_size})",
                )
        elif writable_size != wanted_writable:
            self._flag(
                "request-layout", f"{name} with {writable_size} writable bytes (a tail is {TAIL_SIZE})"
            )
        acked = device.acked_features
        if kind in (RequestType.MAP, RequestType.UNMAP) and not acked & F_MAP_UNMAP:
            self._flag("request-unnegotiated", f"{name} without MAP_UNMAP negotiated")
        if kind == RequestType.PROBE and not acked & F_PROBE:
            self._flag("request-unnegotiated", "PROBE without PROBE negotiated")
        if kind == RequestType.ATTACH:
            self._attach(request)
        elif kind == RequestType.DETACH:
            _t, _r, domain, _endpoint, reserved = DETACH.unpack(request)
            self._domain_range(domain, name)
            if reserved != bytes(8):
                self._flag("detach-reserved", f"DETACH with reserved {reserved.hex()}")
        elif kind == RequestType.MAP:
            self._map(request)
        elif kind == RequestType.UNMAP:
            self._unmap(request)
        else:
            _t, _r, endpoint, reserved = PROBE.unpack(request)
            if reserved != bytes(64):
                self._flag("probe-reserved", f"PROBE of endpoint {endpoint:#x} with reserved bytes not zero")
            self._probed.add(endpoint)
            # The answer this PROBE is about to get (checked before the device serves it).
            self._told[endpoint] = tuple((r.start, r.end) for r in device.reserved_regions(endpoint))

    def _domain_range(self, domain: int, name: str) -> bool:
        topology = self.device.topology
        if not topology.domain_start <= domain <= topology.domain_end:
            if self.device.acked_features & F_DOMAIN_RANGE:
                self._flag(
                    "domain-range",
                    f"{name} of domain {domain} outside {topology.domain_start}-{topology.domain_end}",
                )
            return False
        return True

    def _input_range(self, start: int, end: int, name: str) -> None:
        topology = self.device.topology
        if self.device.acked_features & F_INPUT_RANGE and (
            start < topology.input_start or end > topology.input_end
        ):
            self._flag(
                "input-range",
                f"{name} of {start:#x}-{end:#x} outside {topology.input_start:#x}-{topology.input_end:#x}",
            )

    def _bypass_domain(self, domain: int) -> bool | None:
        """Whether an existing domain is a bypass domain; None if it does not exist."""
        table = self.device.domain_table
        if not table.domain_exists(domain):
            return None
        return bool(table.bypass[domain - table.first])

    def _attach(self, request: bytes) -> None:
        _t, _r, domain, endpoint, flags, reserved = ATTACH.unpack(request)
        device = self.device
        if reserved != bytes(4):
            self._flag("attach-reserved", f"ATTACH with reserved {reserved.hex()}")
        known = _KNOWN_ATTACH_FLAGS if device.acked_features & F_BYPASS_CONFIG else 0
        if flags & ~known:
            self._flag("attach-flags-undefined", f"ATTACH with flags {flags:#x}")
        probing = device.acked_features & F_PROBE and device.topology.has_endpoint(endpoint)
        if probing and endpoint not in self._probed:
            self._flag("probe-before-attach", f"ATTACH of endpoint {endpoint:#x} before its PROBE")
        if not self._domain_range(domain, "ATTACH"):
            return
        existing = self._bypass_domain(domain)
        wants_bypass = bool(flags & ATTACH_F_BYPASS)
        if existing is not None and existing != wants_bypass:
            kind = "a bypass" if existing else "a translated"
            self._flag(
                "attach-bypass-consistent",
                f"ATTACH of endpoint {endpoint:#x} to {kind} domain {domain} with flags {flags:#x}",
            )

    def _map(self, request: bytes) -> None:
        _t, _r, domain, start, end, _phys, flags = MAP.unpack(request)
        device = self.device
        if flags & ~_KNOWN_MAP_FLAGS:
            self._flag("map-flags-undefined", f"MAP with flags {flags:#x}")
        if flags & MAP_F_MMIO and not device.acked_features & F_MMIO:
            self._flag("map-mmio-unnegotiated", "MAP with MAP_F_MMIO without MMIO negotiated")
        if end <= start:
            self._flag("map-virt-end", f"MAP of {start:#x}-{end:#x}")
        self._input_range(start, end, "MAP")
        if not self._domain_range(domain, "MAP"):
            return
        bypass = self._bypass_domain(domain)
        if bypass is None:
            return
        if bypass:
            self._flag("map-bypass-domain", f"MAP on bypass domain {domain}")
            return
        if end < start:
            return
        if self._maps_over_told_regions(domain, start, end):
            self._flag("map-reserved-region", f"MAP of {start:#x}-{end:#x} over a reserved region")
        # The first mapping that ends at or after `start`: it overlaps if it starts at or before `end`.
        for first_start, _last, _p, _f in device.store.mappings(domain, start, 1):
            if int(first_start) <= end:
                self._flag("map-overlap", f"MAP of {start:#x}-{end:#x} over a mapping of domain {domain}")

    def _maps_over_told_regions(self, domain: int, start: int, end: int) -> bool:
        device = self.device
        for endpoint in device.domain_table.endpoints_of(domain):
            # An endpoint never probed: the regions it would have been told (probe-before-attach is
            # flagged on its own).
            told = self._told.get(endpoint)
            if told is None:
                told = tuple((r.start, r.end) for r in device.reserved_regions(endpoint))
            if any(low <= end and start <= high for low, high in told):
                return True
        return False

    def _unmap(self, request: bytes) -> None:
        _t, _r, domain, start, end, reserved = UNMAP.unpack(request)
        device = self.device
        if reserved != bytes(4):
            self._flag("unmap-reserved", f"UNMAP with reserved {reserved.hex()}")
        self._input_range(start, end, "UNMAP")
        if not self._domain_range(domain, "UNMAP"):
            return
        bypass = self._bypass_domain(domain)
        if bypass is None:
            return
        if bypass:
            self._flag("unmap-bypass-domain", f"UNMAP on bypass domain {domain}")
            return
        store = device.store
        for address, edge in ((start, "first"), (end, "last")):
            hit = store.translate(domain, address)
            if hit is None:
                continue
            boundary = hit.map_start if edge == "first" else hit.map_last
            if boundary != address:
                self._flag(
                    "unmap-split",
                    f"UNMAP of {start:#x}-{end:#x}: its {edge} address is inside mapping "
                    f"{hit.map_start:#x}-{hit.map_last:#x}",
                )
                return

    def report(self) -> dict[str, object]:
        """Counters and first occurrences, for the control channel."""
        return {
            "total": self.total,
            "counts": dict(sorted(self.counts.items())),
            "first": dict(sorted(self.first.items())),
        }

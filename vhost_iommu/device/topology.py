"""The platform around the IOMMU: which endpoints it manages, their reserved regions, and its limits.

One TOML file (read with the standard library's tomllib) describes it; `Topology.default()` is the q35
layout the project ships (`qemu-configs/topologies/default.toml` is the same thing, commented). Endpoint IDs
are computed the way ACPI VIOT defines them for a PCI range node, so the table `vhost_iommu.viot` emits
from `Topology.pci_ranges` and the IDs this device accepts always agree:
``endpoint = endpoint_start + (bdf - bdf_start)`` within one PCI segment.

A bad file raises `TopologyError` whose message names the file and the field, e.g.
``topology.toml: endpoints[1].bdf_end: 0x10000 is not a valid BDF``.
"""

from __future__ import annotations

import itertools
import os
import re
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from vhost_iommu.device.layout import RESV_MEM_SIZE, U32_MAX, U64_MAX, ResvMemType
from vhost_iommu.machine import (
    VIRT_DEFAULT_MMIO_TRANSPORT,
    VIRT_ITS_DOORBELL_END,
    VIRT_ITS_DOORBELL_START,
    Arch,
    IommuTransport,
    virt_mmio_bus,
)

# Per-domain state lives in arrays indexed by domain ID (see domains.py), so the domain range is bounded.
# 65536 matches the 16-bit domain IDs of VT-d, AMD-Vi and SMMU, far more than a guest uses at once.
MAX_DOMAIN_RANGE_SIZE = 1 << 16
MIN_GRANULE = 4096
# A PROBE buffer is allocated by the guest for every endpoint; keep it to a sane size.
MAX_PROBE_SIZE = 1 << 16

#: The default topology's DMA engine socket, beside the vhost-user socket.
DEFAULT_DMA_ENGINE_SOCKET = "dma-engine.sock"

X86_MSI_START = 0xFEE0_0000
X86_MSI_END = 0xFEEF_FFFF


class TopologyError(ValueError):
    """A topology description that cannot be used; the message names the file and field."""


@dataclass(frozen=True, slots=True)
class ReservedRegion:
    """A RESV_MEM region of an endpoint: RESERVED (never mapped, accesses fault) or MSI (identity)."""

    kind: ResvMemType
    start: int
    end: int

    def overlaps(self, start: int, end: int) -> bool:
        return self.start <= end and start <= self.end


@dataclass(frozen=True, slots=True)
class PciRange:
    """A VIOT PCI range node: BDF ``bdf_start + n`` of ``segment`` is endpoint ``endpoint_start + n``."""

    segment: int
    bdf_start: int
    bdf_end: int
    endpoint_start: int
    reserved: tuple[ReservedRegion, ...] = ()

    @property
    def endpoint_end(self) -> int:
        return self.endpoint_start + (self.bdf_end - self.bdf_start)

    def endpoint_of(self, bdf: int) -> int | None:
        if self.bdf_start <= bdf <= self.bdf_end:
            return self.endpoint_start + (bdf - self.bdf_start)
        return None


#: The endpoint kinds ``[[devices]]`` may name, with the keys of their own each takes.
DEVICE_KINDS: dict[str, frozenset[str]] = {
    "dma-engine": frozenset(),
    "virtio-blk": frozenset({"image", "readonly"}),
}
#: The keys of a kind it cannot do without.
_REQUIRED_OPTIONS: dict[str, frozenset[str]] = {"virtio-blk": frozenset({"image"})}
#: Each kind's key's type: a path (a non-empty string, relative ones beside the sockets) or a boolean.
_OPTION_TYPES: dict[str, type] = {"image": str, "readonly": bool}
#: The keys that are paths (resolved as ``socket`` is).
_PATH_OPTIONS = frozenset({"image"})


@dataclass(frozen=True, slots=True)
class ServedDevice:
    """A PCI endpoint vhost-iommu itself serves to QEMU over vfio-user (a ``[[devices]]`` table).

    ``socket`` is the vfio-user socket's path as written; a relative one lives in the directory of the
    back-end's (first) vhost-user socket. ``options`` are the keys of the device's own kind."""

    kind: str
    segment: int
    bdf: int
    socket: str
    options: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def socket_path(self, socket_dir: str | None) -> str | None:
        """The socket's path; a relative one in ``socket_dir`` (None: no directory to put it in)."""
        return _beside(self.socket, socket_dir)

    def with_paths_in(self, socket_dir: str | None) -> ServedDevice:
        """This device with its path options (a virtio-blk's ``image``) resolved as its socket is: a
        relative one in ``socket_dir``, the directory of the back-end's first vhost-user socket (left as
        written when there is none)."""
        options = dict(self.options)
        for key in _PATH_OPTIONS & options.keys():
            options[key] = _beside(options[key], socket_dir) or options[key]
        return replace(self, options=options)


def _beside(path: str, socket_dir: str | None) -> str | None:
    """``path``, or a relative one in ``socket_dir`` (None: no directory to put it in)."""
    if os.path.isabs(path):
        return path
    return None if socket_dir is None else os.path.join(socket_dir, path)


@dataclass(frozen=True)
class Topology:
    """Everything platform-specific the device needs; immutable once built."""

    iommu_segment: int = 0
    iommu_bdf: int = 0x18  # 00:03.0 (IommuTransport.PCI only)
    # The guest's architecture, hence QEMU's machine and how the guest learns this topology (machine.py).
    arch: Arch = Arch.X86_64
    iommu_transport: IommuTransport = IommuTransport.PCI
    # The virtio-mmio transport's base address (IommuTransport.MMIO only).
    iommu_mmio_address: int | None = None
    pci_ranges: tuple[PciRange, ...] = ()
    # Extra regions for single endpoints, on top of those of their range.
    endpoint_reserved: Mapping[int, tuple[ReservedRegion, ...]] = field(default_factory=dict, hash=False)
    page_size_mask: int = 0xFFFF_FFFF_FFFF_F000
    input_start: int = 0
    input_end: int = (1 << 48) - 1
    domain_start: int = 1
    domain_end: int = 0xFFFF
    probe_size: int = 512
    boot_bypass: bool = True
    devices: tuple[ServedDevice, ...] = ()
    source: str = field(default="<default>", compare=False)
    _regions: dict[int, tuple[ReservedRegion, ...]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        problems = list(_check(self))
        if problems:
            raise TopologyError(f"{self.source}: {problems[0]}")
        regions: dict[int, tuple[ReservedRegion, ...]] = {}
        for pci_range in self.pci_ranges:
            for endpoint in range(pci_range.endpoint_start, pci_range.endpoint_end + 1):
                merged = pci_range.reserved + self.endpoint_reserved.get(endpoint, ())
                regions[endpoint] = tuple(sorted(merged, key=lambda region: region.start))
        self._regions.update(regions)
        for endpoint, endpoint_regions in regions.items():
            problem = check_regions(endpoint_regions)
            if problem:
                raise TopologyError(f"{self.source}: endpoint {endpoint:#x}: {problem}")
            if len(endpoint_regions) * RESV_MEM_SIZE > self.probe_size and self.probe_size:
                raise TopologyError(
                    f"{self.source}: probe_size: {self.probe_size} bytes cannot hold the "
                    f"{len(endpoint_regions)} reserved regions of endpoint {endpoint:#x} "
                    f"({RESV_MEM_SIZE} bytes each)"
                )

    # -- constructors ------------------------------------------------------------------------------------

    @classmethod
    def default(cls, arch: Arch = Arch.X86_64) -> Topology:
        """IOMMU at 0000:00:03.0, endpoints 0000:00:04.0-0000:00:1e.7 with endpoint ID = BDF, the DMA engine
        at 00:05.0: on x86 q35 (qemu-configs/topologies/default.toml) with x86's MSI window as the MSI
        region, on arm64 virt (arm-virt.toml) with the GICv3 ITS doorbell instead."""
        if arch is Arch.ARM64:
            msi = ReservedRegion(ResvMemType.MSI, VIRT_ITS_DOORBELL_START, VIRT_ITS_DOORBELL_END)
        else:
            msi = ReservedRegion(ResvMemType.MSI, X86_MSI_START, X86_MSI_END)
        return cls(
            arch=arch,
            pci_ranges=(PciRange(0, 0x20, 0xF7, 0x20, (msi,)),),
            devices=(ServedDevice("dma-engine", 0, 0x28, DEFAULT_DMA_ENGINE_SOCKET),),
        )

    @classmethod
    def load(cls, path: str | Path) -> Topology:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as error:
            raise TopologyError(f"{path}: cannot read: {error.strerror}") from error
        return cls.loads(text, source=path.name)

    @classmethod
    def loads(cls, text: str, *, source: str = "<string>") -> Topology:
        try:
            document = tomllib.loads(text)
        except tomllib.TOMLDecodeError as error:
            raise TopologyError(f"{source}: not valid TOML: {error}") from error
        return _Parser(source).topology(document)

    # -- queries -----------------------------------------------------------------------------------------

    @property
    def granule(self) -> int:
        """The page granularity: the least significant bit set in page_size_mask."""
        return self.page_size_mask & -self.page_size_mask

    def endpoint_ids(self) -> list[int]:
        return sorted(self._regions)

    def has_endpoint(self, endpoint: int) -> bool:
        return endpoint in self._regions

    def reserved_regions(self, endpoint: int) -> tuple[ReservedRegion, ...]:
        """The RESV_MEM regions reported for ``endpoint`` by PROBE, sorted by start."""
        return self._regions[endpoint]

    def endpoint_for(self, segment: int, bdf: int) -> int | None:
        """The endpoint ID of PCI function ``segment:bdf``, or None if this IOMMU does not manage it."""
        for pci_range in self.pci_ranges:
            if pci_range.segment == segment and (endpoint := pci_range.endpoint_of(bdf)) is not None:
                return endpoint
        return None

    def pci_address(self, endpoint: int) -> tuple[int, int] | None:
        """(segment, bdf) of an endpoint ID, or None."""
        for pci_range in self.pci_ranges:
            if pci_range.endpoint_start <= endpoint <= pci_range.endpoint_end:
                return pci_range.segment, pci_range.bdf_start + (endpoint - pci_range.endpoint_start)
        return None

    def viot_ranges(self) -> list[tuple[int, int, int, int]]:
        """(segment, bdf_start, bdf_end, endpoint_start) of each VIOT PCI range node."""
        return [(r.segment, r.bdf_start, r.bdf_end, r.endpoint_start) for r in self.pci_ranges]


# -- validation --------------------------------------------------------------------------------------------


def format_bdf(bdf: int, segment: int | None = None) -> str:
    text = f"{bdf >> 8:02x}:{(bdf >> 3) & 0x1F:02x}.{bdf & 7}"
    return f"{segment:04x}:{text}" if segment is not None else text


def _check(topology: Topology) -> Iterator[str]:
    on_pci = topology.iommu_transport is IommuTransport.PCI
    if on_pci and topology.iommu_mmio_address is not None:
        yield "iommu.address: only an IOMMU on a virtio-mmio transport has one"
    if not on_pci:
        if topology.arch is not Arch.ARM64:
            yield f'iommu.transport: virtio-mmio needs arch = "{Arch.ARM64.value}" (QEMU\'s virt machine)'
        elif topology.iommu_mmio_address is None:
            yield "iommu.address: an IOMMU on virtio-mmio needs its transport's address"
        else:
            try:
                virt_mmio_bus(topology.iommu_mmio_address)
            except ValueError as error:
                yield f"iommu.address: {error}"
    if not 0 <= topology.iommu_segment <= 0xFFFF:
        yield f"iommu.segment: {topology.iommu_segment:#x} is not a valid PCI segment"
    if not 0 <= topology.iommu_bdf <= 0xFFFF:
        yield f"iommu.bdf: {topology.iommu_bdf:#x} is not a valid BDF"
    mask = topology.page_size_mask
    if not 0 < mask <= U64_MAX:
        yield f"page_size_mask: {mask:#x} must set at least one bit of 64"
        return
    granule = mask & -mask
    if granule < MIN_GRANULE:
        yield (
            f"page_size_mask: {mask:#x} gives a {granule}-byte granule; at least {MIN_GRANULE} is needed "
            "(the mapping table keeps flags in the low 12 bits of each guest-physical address)"
        )
    if not 0 <= topology.input_start <= topology.input_end <= U64_MAX:
        yield f"input_range: {topology.input_start:#x}-{topology.input_end:#x} is not a 64-bit range"
    elif topology.input_start % granule or (topology.input_end + 1) % granule:
        yield f"input_range: {topology.input_start:#x}-{topology.input_end:#x} is not aligned on the granule"
    if not 0 <= topology.domain_start <= topology.domain_end <= U32_MAX:
        yield f"domain_range: {topology.domain_start:#x}-{topology.domain_end:#x} is not a 32-bit range"
    elif topology.domain_end - topology.domain_start + 1 > MAX_DOMAIN_RANGE_SIZE:
        yield (
            f"domain_range: {topology.domain_end - topology.domain_start + 1} domain IDs; "
            f"at most {MAX_DOMAIN_RANGE_SIZE} are supported"
        )
    if not 0 <= topology.probe_size <= MAX_PROBE_SIZE:
        yield f"probe_size: {topology.probe_size} is not within 0..{MAX_PROBE_SIZE} (0 disables PROBE)"
    if not topology.pci_ranges:
        yield "endpoints: the IOMMU manages no endpoint"
    seen: list[PciRange] = []
    for index, pci_range in enumerate(topology.pci_ranges):
        new = pci_range
        where = f"endpoints[{index}]"
        if not 0 <= pci_range.segment <= 0xFFFF:
            yield f"{where}.segment: {pci_range.segment:#x} is not a valid PCI segment"
        for name in ("bdf_start", "bdf_end"):
            value = getattr(pci_range, name)
            if not 0 <= value <= 0xFFFF:
                yield f"{where}.{name}: {value:#x} is not a valid BDF"
                return
        if pci_range.bdf_end < pci_range.bdf_start:
            yield f"{where}.bdf_end: {pci_range.bdf_end:#x} is below bdf_start {pci_range.bdf_start:#x}"
            return
        if pci_range.endpoint_start < 0 or pci_range.endpoint_end > U32_MAX:
            yield f"{where}.endpoint_start: {pci_range.endpoint_start:#x} makes endpoint IDs beyond 32 bits"
        if (
            on_pci
            and pci_range.segment == topology.iommu_segment
            and pci_range.bdf_start <= topology.iommu_bdf <= pci_range.bdf_end
        ):
            iommu = format_bdf(topology.iommu_bdf, topology.iommu_segment)
            yield f"{where}: includes the IOMMU itself ({iommu})"
        for other_index, other in enumerate(seen):
            if other.segment == pci_range.segment and (
                other.bdf_start <= pci_range.bdf_end and pci_range.bdf_start <= other.bdf_end
            ):
                yield f"{where}: BDFs overlap those of endpoints[{other_index}]"
            if new.endpoint_start <= other.endpoint_end and other.endpoint_start <= new.endpoint_end:
                yield f"{where}: endpoint IDs overlap those of endpoints[{other_index}]"
        seen.append(pci_range)
    for endpoint in topology.endpoint_reserved:
        if not any(r.endpoint_start <= endpoint <= r.endpoint_end for r in topology.pci_ranges):
            yield f"reserved: endpoint {endpoint:#x} is not in any endpoint range"
    # Two entries may name the same BDF on different sockets: one per VM (each VM has its own PCI bus).
    sockets: dict[str, int] = {}
    for index, device in enumerate(topology.devices):
        where = f"devices[{index}]"
        if device.kind not in DEVICE_KINDS:
            yield f"{where}.kind: {device.kind!r} is not one of: {', '.join(sorted(DEVICE_KINDS))}"
        if topology.endpoint_for(device.segment, device.bdf) is None:
            yield f"{where}.bdf: {format_bdf(device.bdf, device.segment)} is not in any endpoint range"
        if not device.socket or "\0" in device.socket:
            yield f"{where}.socket: {device.socket!r} is not a path"
        elif device.socket in sockets:
            yield f"{where}.socket: {device.socket!r} is also devices[{sockets[device.socket]}]'s"
        sockets[device.socket] = index


def check_regions(regions: tuple[ReservedRegion, ...]) -> str | None:
    if sum(region.kind == ResvMemType.MSI for region in regions) > 1:
        # virtio 1.3: "The device SHOULD NOT present more than one VIRTIO_IOMMU_RESV_MEM_T_MSI property
        # per endpoint."
        return "more than one MSI region"
    for before, after in itertools.pairwise(regions):
        # "The device SHOULD NOT present multiple RESV_MEM properties that overlap each other for the same
        # endpoint."
        if after.start <= before.end:
            first = f"{before.start:#x}-{before.end:#x}"
            return f"reserved regions {first} and {after.start:#x}-{after.end:#x} overlap"
    return None


# -- TOML parsing ------------------------------------------------------------------------------------------

_BDF_TEXT = re.compile(
    r"^(?:(?P<segment>[0-9a-fA-F]{1,4}):)?(?P<bus>[0-9a-fA-F]{1,2}):(?P<device>[0-9a-fA-F]{1,2})\.(?P<function>[0-7])$"
)

_SEGMENT = "a valid PCI segment"
_ENDPOINT = "a 32-bit endpoint ID"
_TOP_KEYS = {
    "arch",
    "iommu",
    "endpoints",
    "reserved",
    "page_size_mask",
    "granule",
    "input_range",
    "domain_range",
    "probe_size",
    "boot_bypass",
    "devices",
}
_DEVICE_KEYS = {"kind", "bdf", "segment", "socket"}
_RANGE_KEYS = {"segment", "bdf_start", "bdf_end", "endpoint_start", "reserved"}
_REGION_KEYS = {"type", "start", "end"}
_ENDPOINT_REGION_KEYS = _REGION_KEYS | {"endpoint", "bdf", "segment"}


class _Parser:
    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, where: str, message: str) -> TopologyError:
        return TopologyError(f"{self.source}: {where}: {message}")

    def keys(self, table: Any, allowed: set[str], where: str) -> dict[str, Any]:
        if not isinstance(table, dict):
            raise self.fail(where, "must be a table")
        for key in table:
            if key not in allowed:
                label = f"{where}.{key}" if where else key
                raise self.fail(label, f"unknown key (expected one of: {', '.join(sorted(allowed))})")
        return table

    def integer(self, value: Any, where: str, low: int, high: int, what: str = "") -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(where, f"{value!r} is not an integer")
        if not low <= value <= high:
            raise self.fail(where, f"{value:#x} is not {what or f'within {low:#x}..{high:#x}'}")
        return value

    def bdf(self, value: Any, where: str, segment: int | None) -> tuple[int | None, int]:
        """A BDF as an integer (bus << 8 | device << 3 | function) or text ``[SSSS:]BB:DD.F``."""
        if isinstance(value, str):
            match = _BDF_TEXT.match(value.strip())
            if not match or int(match["device"], 16) > 0x1F:
                raise self.fail(where, f"{value!r} is not a valid BDF (expected [SSSS:]BB:DD.F)")
            text_segment = int(match["segment"], 16) if match["segment"] else None
            if text_segment is not None and segment is not None and text_segment != segment:
                raise self.fail(where, f"{value!r} is in segment {text_segment:#x}, not {segment:#x}")
            bdf = int(match["bus"], 16) << 8 | int(match["device"], 16) << 3 | int(match["function"])
            return text_segment, bdf
        return None, self.integer(value, where, 0, 0xFFFF, "a valid BDF")

    def region(self, table: Any, where: str, allowed: set[str]) -> ReservedRegion:
        table = self.keys(table, allowed, where)
        for key in ("type", "start", "end"):
            if key not in table:
                raise self.fail(f"{where}.{key}", "missing")
        kinds = {"reserved": ResvMemType.RESERVED, "msi": ResvMemType.MSI}
        kind = table["type"]
        if not isinstance(kind, str) or kind.lower() not in kinds:
            raise self.fail(f"{where}.type", f"{kind!r} is not one of: reserved, msi")
        start = self.integer(table["start"], f"{where}.start", 0, U64_MAX, "a 64-bit address")
        end = self.integer(table["end"], f"{where}.end", 0, U64_MAX, "a 64-bit address")
        if end < start:
            raise self.fail(f"{where}.end", f"{end:#x} is below start {start:#x}")
        return ReservedRegion(kinds[kind.lower()], start, end)

    def pair(self, value: Any, where: str, high: int) -> tuple[int, int]:
        table = self.keys(value, {"start", "end"}, where)
        for key in ("start", "end"):
            if key not in table:
                raise self.fail(f"{where}.{key}", "missing")
        start = self.integer(table["start"], f"{where}.start", 0, high)
        end = self.integer(table["end"], f"{where}.end", 0, high)
        if end < start:
            raise self.fail(f"{where}.end", f"{end:#x} is below start {start:#x}")
        return start, end

    def topology(self, document: dict[str, Any]) -> Topology:
        self.keys(document, _TOP_KEYS, "")
        options: dict[str, Any] = {"source": self.source}

        if "arch" in document:
            arch = document["arch"]
            names = [choice.value for choice in Arch]
            if arch not in names:
                raise self.fail("arch", f"{arch!r} is not one of: {', '.join(names)}")
            options["arch"] = Arch(arch)
        iommu = self.keys(document.get("iommu", {}), {"segment", "bdf", "transport", "address"}, "iommu")
        transport = iommu.get("transport", IommuTransport.PCI.value)
        if transport not in [choice.value for choice in IommuTransport]:
            raise self.fail("iommu.transport", f"{transport!r} is not one of: pci, mmio")
        options["iommu_transport"] = IommuTransport(transport)
        if options["iommu_transport"] is IommuTransport.MMIO:
            for key in ("segment", "bdf"):
                if key in iommu:
                    raise self.fail(f"iommu.{key}", "an IOMMU on virtio-mmio is not a PCI function")
            options["iommu_mmio_address"] = self.integer(
                iommu.get("address", VIRT_DEFAULT_MMIO_TRANSPORT), "iommu.address", 0, U64_MAX
            )
        elif "address" in iommu:
            raise self.fail("iommu.address", "only an IOMMU on a virtio-mmio transport has one")
        iommu_segment = self.integer(iommu.get("segment", 0), "iommu.segment", 0, 0xFFFF, _SEGMENT)
        text_segment, options["iommu_bdf"] = self.bdf(iommu.get("bdf", 0x18), "iommu.bdf", iommu_segment)
        options["iommu_segment"] = text_segment if text_segment is not None else iommu_segment

        if "page_size_mask" in document and "granule" in document:
            raise self.fail("granule", "give either granule or page_size_mask, not both")
        if "granule" in document:
            granule = self.integer(document["granule"], "granule", 1, 1 << 63)
            if granule & (granule - 1):
                raise self.fail("granule", f"{granule:#x} is not a power of two")
            options["page_size_mask"] = U64_MAX & ~(granule - 1)
        if "page_size_mask" in document:
            options["page_size_mask"] = self.integer(
                document["page_size_mask"], "page_size_mask", 1, U64_MAX, "a non-zero 64-bit mask"
            )
        if "input_range" in document:
            options["input_start"], options["input_end"] = self.pair(
                document["input_range"], "input_range", U64_MAX
            )
        if "domain_range" in document:
            options["domain_start"], options["domain_end"] = self.pair(
                document["domain_range"], "domain_range", U32_MAX
            )
        if "probe_size" in document:
            options["probe_size"] = self.integer(document["probe_size"], "probe_size", 0, MAX_PROBE_SIZE)
        if "boot_bypass" in document:
            bypass = document["boot_bypass"]
            if bypass not in (0, 1) or not isinstance(bypass, int):
                raise self.fail("boot_bypass", f"{bypass!r} is not 0, 1, true or false")
            options["boot_bypass"] = bool(bypass)

        ranges = document.get("endpoints")
        if not isinstance(ranges, list) or not ranges:
            raise self.fail("endpoints", "missing: give at least one [[endpoints]] range")
        pci_ranges = []
        for index, table in enumerate(ranges):
            where = f"endpoints[{index}]"
            table = self.keys(table, _RANGE_KEYS, where)
            for key in ("bdf_start", "bdf_end"):
                if key not in table:
                    raise self.fail(f"{where}.{key}", "missing")
            segment = self.integer(table.get("segment", 0), f"{where}.segment", 0, 0xFFFF, _SEGMENT)
            start_segment, bdf_start = self.bdf(table["bdf_start"], f"{where}.bdf_start", segment)
            end_segment, bdf_end = self.bdf(table["bdf_end"], f"{where}.bdf_end", segment)
            if "segment" not in table:
                # A segment written only in the BDF text counts as the range's segment.
                segment = start_segment if start_segment is not None else (end_segment or 0)
                if end_segment is not None and end_segment != segment:
                    raise self.fail(f"{where}.bdf_end", f"segment {end_segment:#x} differs from bdf_start's")
            if bdf_end < bdf_start:
                raise self.fail(f"{where}.bdf_end", f"{bdf_end:#x} is below bdf_start {bdf_start:#x}")
            endpoint_start = self.integer(
                table.get("endpoint_start", bdf_start), f"{where}.endpoint_start", 0, U32_MAX, _ENDPOINT
            )
            if endpoint_start + (bdf_end - bdf_start) > U32_MAX:
                raise self.fail(
                    f"{where}.endpoint_start", f"{endpoint_start:#x} makes endpoint IDs beyond 32 bits"
                )
            regions_list = table.get("reserved", [])
            if not isinstance(regions_list, list):
                raise self.fail(f"{where}.reserved", "must be an array of tables")
            regions = tuple(
                self.region(region, f"{where}.reserved[{i}]", _REGION_KEYS)
                for i, region in enumerate(regions_list)
            )
            pci_ranges.append(PciRange(segment, bdf_start, bdf_end, endpoint_start, regions))
        options["pci_ranges"] = tuple(pci_ranges)

        extra = document.get("reserved", [])
        if not isinstance(extra, list):
            raise self.fail("reserved", "must be an array of tables")
        endpoint_reserved: dict[int, tuple[ReservedRegion, ...]] = {}
        for index, table in enumerate(extra):
            where = f"reserved[{index}]"
            table = self.keys(table, _ENDPOINT_REGION_KEYS, where)
            region = self.region({k: v for k, v in table.items() if k in _REGION_KEYS}, where, _REGION_KEYS)
            endpoint = self._endpoint_of(table, where, pci_ranges)
            endpoint_reserved[endpoint] = (*endpoint_reserved.get(endpoint, ()), region)
        options["endpoint_reserved"] = endpoint_reserved
        options["devices"] = self._devices(document.get("devices", []))
        return Topology(**options)

    def _devices(self, tables: Any) -> tuple[ServedDevice, ...]:
        if not isinstance(tables, list):
            raise self.fail("devices", "must be an array of tables ([[devices]])")
        devices = []
        for index, table in enumerate(tables):
            where = f"devices[{index}]"
            if not isinstance(table, dict):
                raise self.fail(where, "must be a table")
            kind = table.get("kind")
            if not isinstance(kind, str) or kind not in DEVICE_KINDS:
                raise self.fail(f"{where}.kind", f"{kind!r} is not one of: {', '.join(sorted(DEVICE_KINDS))}")
            table = self.keys(table, _DEVICE_KEYS | DEVICE_KINDS[kind], where)
            for key in ("bdf", "socket"):
                if key not in table:
                    raise self.fail(f"{where}.{key}", "missing")
            segment = self.integer(table.get("segment", 0), f"{where}.segment", 0, 0xFFFF, _SEGMENT)
            text_segment, bdf = self.bdf(
                table["bdf"], f"{where}.bdf", segment if "segment" in table else None
            )
            socket_path = table["socket"]
            if not isinstance(socket_path, str):
                raise self.fail(f"{where}.socket", f"{socket_path!r} is not a path")
            options = {key: value for key, value in table.items() if key in DEVICE_KINDS[kind]}
            for key in sorted(_REQUIRED_OPTIONS.get(kind, frozenset()) - options.keys()):
                raise self.fail(f"{where}.{key}", f"missing (a {kind} needs it)")
            for key, value in options.items():
                wanted = _OPTION_TYPES[key]
                if not isinstance(value, wanted) or (isinstance(value, str) and (not value or "\0" in value)):
                    what = "a path" if key in _PATH_OPTIONS else f"a {wanted.__name__}"
                    raise self.fail(f"{where}.{key}", f"{value!r} is not {what}")
            devices.append(
                ServedDevice(
                    kind, text_segment if text_segment is not None else segment, bdf, socket_path, options
                )
            )
        return tuple(devices)

    def _endpoint_of(self, table: dict[str, Any], where: str, pci_ranges: list[PciRange]) -> int:
        if ("endpoint" in table) == ("bdf" in table):
            raise self.fail(where, "give exactly one of endpoint or bdf")
        if "endpoint" in table:
            endpoint = self.integer(table["endpoint"], f"{where}.endpoint", 0, U32_MAX, _ENDPOINT)
            if not any(r.endpoint_start <= endpoint <= r.endpoint_end for r in pci_ranges):
                raise self.fail(f"{where}.endpoint", f"{endpoint:#x} is not in any endpoint range")
            return endpoint
        segment = self.integer(table.get("segment", 0), f"{where}.segment", 0, 0xFFFF, _SEGMENT)
        text_segment, bdf = self.bdf(table["bdf"], f"{where}.bdf", segment if "segment" in table else None)
        if text_segment is not None:
            segment = text_segment
        for pci_range in pci_ranges:
            if pci_range.segment == segment and (found := pci_range.endpoint_of(bdf)) is not None:
                return found
        raise self.fail(f"{where}.bdf", f"{format_bdf(bdf, segment)} is not in any endpoint range")

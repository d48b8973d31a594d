"""Request traces: record what a driver asked of the device and what it answered; replay it offline.

A trace is JSON lines. The first line of each file is a header::

    {"trace": "vhost-iommu", "version": 1, "part": 0, "first": 0, "started": UNIX_TIME,
     "topology": {...}, "features": ACKED}

then one line per event, in the order the device saw them (``n`` numbers them across files, ``t`` is
nanoseconds since the recording started):

- a request: ``{"n", "t", "kind": "request", "request": HEX, "writable": N, "used": N,
  "status": S or null, "forced": bool, "ns": service time}`` (``status`` is null when the buffers came
  back unwritten; ``forced`` marks an answer injected through the control channel);
- ``{"kind": "features", "acked": N}``, ``{"kind": "config", "offset": N, "data": HEX}`` (a driver's
  config write), ``{"kind": "reset"}`` (device reset), ``{"kind": "bypass", "value": 0|1}`` (the
  control channel set the config field), ``{"kind": "resv", "endpoint": N or null, "regions": [...] or
  null}`` (the control channel replaced reserved regions; null endpoint: all, null regions: the
  topology's);
- ``{"kind": "fault", "fault": {...}}``: a DMA access faulted (an endpoint served over vfio-user, or a
  tool's ``translate --report``): reason, flags, endpoint, address, whether it was reported, and its
  explanation from the mapping history (``vhost_iommu.device.history.fault_json``); not replayed (the
  accesses are not requests);
- ``{"kind": "takeover"}``: under ``serve --state-dir``, a new device worker took the session over and
  continues the trace; the device state continues too (the previous worker wrote every record through
  before the guest could see its answer, so none is missing).

Traces recorded on a client's request go to one directory only (`TraceDirectory`, serve's
``--trace-dir``): the client names a file, never a path.

Files are bounded: when one passes ``max_bytes`` it is renamed ``PATH.1`` (older parts move to ``.2`` ...,
the oldest beyond ``keep`` is deleted) and a new ``PATH`` starts with its own header. Only part 0 starts
from a fresh device, so only it can be replayed; later parts are for reading.

:func:`replay` runs a trace against a fresh device core (sans-I/O, no guest) and lists every request
whose status or used length differs from the recording: a regression test of the device against what a
real driver sent, and a benchmark of the core (the time it took). Every line is validated: a corrupt
trace raises :class:`TraceError` naming the file and line.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from vhost_iommu.conformance import ConformanceChecker
from vhost_iommu.device import IommuDevice, PciRange, ReservedRegion, ResvMemType, Topology, TopologyError
from vhost_iommu.device.history import fault_json
from vhost_iommu.device.layout import READABLE_SIZE, RequestType, Status
from vhost_iommu.device.topology import ServedDevice
from vhost_iommu.device.translation import Fault
from vhost_iommu.machine import Arch, IommuTransport

TRACE_MAGIC = "vhost-iommu"
TRACE_VERSION = 1
DEFAULT_MAX_BYTES = 64 << 20
DEFAULT_KEEP = 4
MAX_LINE = 1 << 20  # a PROBE record is about 1.2 KiB; anything near this is not a trace line
MAX_REQUEST_BYTES = 4096
MAX_WRITABLE = 1 << 20
U64 = (1 << 64) - 1


class TraceError(ValueError):
    """A trace that cannot be read; the message names the file and line."""


# -- topology as JSON ----------------------------------------------------------------------------------------


def _region_json(region: ReservedRegion) -> dict[str, Any]:
    return {"type": region.kind.name, "start": region.start, "end": region.end}


def topology_to_json(topology: Topology) -> dict[str, Any]:
    """Everything of a topology the device uses, as plain JSON (the reverse of :func:`topology_from_json`)."""
    return {
        "iommu_segment": topology.iommu_segment,
        "iommu_bdf": topology.iommu_bdf,
        # Where the IOMMU sits (a virtio-mmio one has no PCI function, so its ranges may cover iommu_bdf).
        "arch": topology.arch.value,
        "iommu_transport": topology.iommu_transport.value,
        "iommu_mmio_address": topology.iommu_mmio_address,
        "pci_ranges": [
            {
                "segment": r.segment,
                "bdf_start": r.bdf_start,
                "bdf_end": r.bdf_end,
                "endpoint_start": r.endpoint_start,
                "reserved": [_region_json(region) for region in r.reserved],
            }
            for r in topology.pci_ranges
        ],
        "endpoint_reserved": [
            {"endpoint": endpoint, "reserved": [_region_json(region) for region in regions]}
            for endpoint, regions in sorted(topology.endpoint_reserved.items())
        ],
        "page_size_mask": topology.page_size_mask,
        "input_start": topology.input_start,
        "input_end": topology.input_end,
        "domain_start": topology.domain_start,
        "domain_end": topology.domain_end,
        "probe_size": topology.probe_size,
        "boot_bypass": topology.boot_bypass,
        # The served endpoints (the device core does not use them; a replay keeps the whole topology).
        "devices": [
            {
                "kind": d.kind,
                "segment": d.segment,
                "bdf": d.bdf,
                "socket": d.socket,
                "options": dict(d.options),
            }
            for d in topology.devices
        ],
    }


def _object(value: Any, where: str, keys: set[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise TraceError(f"{where}: not an object")
    unknown = set(value) - keys
    missing = keys - set(value)
    if unknown or missing:
        raise TraceError(f"{where}: unknown keys {sorted(unknown)}, missing keys {sorted(missing)}")
    return value


def _int(value: Any, where: str, high: int = U64) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= high:
        raise TraceError(f"{where}: {value!r} is not an integer in 0..{high:#x}")
    return value


def _list(value: Any, where: str, most: int = 4096) -> list[Any]:
    if not isinstance(value, list) or len(value) > most:
        raise TraceError(f"{where}: not a list of at most {most} items")
    return value


def _regions(value: Any, where: str) -> tuple[ReservedRegion, ...]:
    regions = []
    for index, item in enumerate(_list(value, where, 256)):
        item = _object(item, f"{where}[{index}]", {"type", "start", "end"})
        kind = item["type"]
        if kind not in ResvMemType.__members__:
            raise TraceError(f"{where}[{index}].type: {kind!r} is not RESERVED or MSI")
        regions.append(
            ReservedRegion(
                ResvMemType[kind],
                _int(item["start"], f"{where}[{index}].start"),
                _int(item["end"], f"{where}[{index}].end"),
            )
        )
    return tuple(regions)


def topology_from_json(value: Any, where: str = "topology") -> Topology:
    """A topology from :func:`topology_to_json`'s form; TraceError for anything else."""
    keys = set(topology_to_json(Topology.default()))
    if isinstance(value, dict):
        # Traces from before served endpoints, and before arm64 topologies, existed.
        value = {
            "devices": [],
            "arch": "x86_64",
            "iommu_transport": "pci",
            "iommu_mmio_address": None,
            **value,
        }
    fields = _object(value, where, keys)
    try:
        arch, transport = Arch(fields["arch"]), IommuTransport(fields["iommu_transport"])
    except ValueError:
        raise TraceError(
            f"{where}: arch {fields['arch']!r} or transport {fields['iommu_transport']!r} unknown"
        ) from None
    mmio_address = fields["iommu_mmio_address"]
    if mmio_address is not None:
        mmio_address = _int(mmio_address, f"{where}.iommu_mmio_address")
    devices = []
    for index, item in enumerate(_list(fields["devices"], f"{where}.devices", 256)):
        at = f"{where}.devices[{index}]"
        item = _object(item, at, {"kind", "segment", "bdf", "socket", "options"})
        if not isinstance(item["kind"], str) or not isinstance(item["socket"], str):
            raise TraceError(f"{at}: kind and socket must be strings")
        if not isinstance(item["options"], dict):
            raise TraceError(f"{at}.options: not an object")
        devices.append(
            ServedDevice(
                item["kind"],
                _int(item["segment"], f"{at}.segment", 0xFFFF),
                _int(item["bdf"], f"{at}.bdf", 0xFFFF),
                item["socket"],
                item["options"],
            )
        )
    ranges = []
    for index, item in enumerate(_list(fields["pci_ranges"], f"{where}.pci_ranges", 256)):
        at = f"{where}.pci_ranges[{index}]"
        item = _object(item, at, {"segment", "bdf_start", "bdf_end", "endpoint_start", "reserved"})
        ranges.append(
            PciRange(
                _int(item["segment"], f"{at}.segment", 0xFFFF),
                _int(item["bdf_start"], f"{at}.bdf_start", 0xFFFF),
                _int(item["bdf_end"], f"{at}.bdf_end", 0xFFFF),
                _int(item["endpoint_start"], f"{at}.endpoint_start", 0xFFFF_FFFF),
                _regions(item["reserved"], f"{at}.reserved"),
            )
        )
    per_endpoint = {}
    for index, item in enumerate(_list(fields["endpoint_reserved"], f"{where}.endpoint_reserved")):
        at = f"{where}.endpoint_reserved[{index}]"
        item = _object(item, at, {"endpoint", "reserved"})
        per_endpoint[_int(item["endpoint"], f"{at}.endpoint", 0xFFFF_FFFF)] = _regions(item["reserved"], at)
    if not isinstance(fields["boot_bypass"], bool):
        raise TraceError(f"{where}.boot_bypass: not true or false")
    try:
        return Topology(
            iommu_segment=_int(fields["iommu_segment"], f"{where}.iommu_segment", 0xFFFF),
            iommu_bdf=_int(fields["iommu_bdf"], f"{where}.iommu_bdf", 0xFFFF),
            arch=arch,
            iommu_transport=transport,
            iommu_mmio_address=mmio_address,
            pci_ranges=tuple(ranges),
            endpoint_reserved=per_endpoint,
            devices=tuple(devices),
            page_size_mask=_int(fields["page_size_mask"], f"{where}.page_size_mask"),
            input_start=_int(fields["input_start"], f"{where}.input_start"),
            input_end=_int(fields["input_end"], f"{where}.input_end"),
            domain_start=_int(fields["domain_start"], f"{where}.domain_start", 0xFFFF_FFFF),
            domain_end=_int(fields["domain_end"], f"{where}.domain_end", 0xFFFF_FFFF),
            probe_size=_int(fields["probe_size"], f"{where}.probe_size", 0xFFFF_FFFF),
            boot_bypass=fields["boot_bypass"],
            source=where,
        )
    except TopologyError as exc:
        raise TraceError(str(exc)) from None


# -- recording -----------------------------------------------------------------------------------------------


class TraceDirectoryError(ValueError):
    """A trace directory or file name that is refused."""


class TraceDirectory:
    """The directory traces are confined to: created 0700 if missing; refused if it is a symlink, not a
    directory, owned by another user, or writable by group or others (anyone who can write there could
    swap a trace's parts). Held open: names are resolved against this directory, whatever later happens
    to its path."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        with contextlib.suppress(FileExistsError):
            os.mkdir(self.path, 0o700)
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            # ELOOP for a symlink, ENOTDIR for a file: either way not a directory of ours.
            raise TraceDirectoryError(f"{self.path}: not a directory ({exc.strerror or exc})") from None
        info = os.fstat(fd)
        problem = None
        if info.st_uid != os.geteuid():
            problem = f"owned by uid {info.st_uid}, not by this process's uid {os.geteuid()}"
        elif info.st_mode & 0o022:
            problem = f"mode {info.st_mode & 0o777:04o} lets group or others write in it"
        if problem is not None:
            os.close(fd)
            raise TraceDirectoryError(f"{self.path}: {problem}")
        self.fd: int | None = fd

    @staticmethod
    def check_name(name: str) -> str:
        """``name`` if it is a plain file name (no separator, not . or .., no NUL, at most 200 bytes:
        rotation appends .N); TraceDirectoryError otherwise."""
        if not isinstance(name, str) or not name:
            raise TraceDirectoryError("a file name is needed")
        if "/" in name or "\0" in name or name in (".", "..") or len(name.encode()) > 200:
            raise TraceDirectoryError(
                f"{name!r} is not a plain file name (no '/', not '.' or '..', at most 200 bytes)"
            )
        return name

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class TraceWriter:
    """Writes one device's trace to ``path``, rotating at ``max_bytes`` and keeping ``keep`` old parts.

    Not thread-safe: it is fed from the back-end's event loop, one event at a time.
    """

    def __init__(
        self,
        path: str | Path,
        topology: Topology,
        *,
        features: int = 0,
        max_bytes: int = DEFAULT_MAX_BYTES,
        keep: int = DEFAULT_KEEP,
        directory: TraceDirectory | None = None,
        write_through: bool = False,
        resume: bool = False,
    ) -> None:
        """``path``: a file path, replaced if it exists; with ``directory``, a file name in it that must
        not exist yet (TraceDirectoryError for anything but a plain name; FileExistsError).

        ``write_through``: every record reaches the file before the next one is made (a device worker
        under a keeper can be killed at any instant; the page cache outlives it). ``resume`` (with
        ``directory``): continue the trace that file holds (a device worker that took the session over),
        numbering on from its last record, after a ``takeover`` event; TraceError if it is not one."""
        if max_bytes < 4096:
            raise ValueError(f"max_bytes {max_bytes} is below 4096 (a header alone can take 1 KiB)")
        if keep < 0:
            raise ValueError(f"keep {keep} is negative")
        if directory is not None:
            if directory.fd is None:
                raise TraceDirectoryError(f"{directory.path}: closed")
            self._name = TraceDirectory.check_name(str(path))
            self.path = directory.path / self._name
            self._dir_fd: int | None = directory.fd
        else:
            self.path = Path(path)
            self._name = str(path)
            self._dir_fd = None
        self.max_bytes = max_bytes
        self.keep = keep
        self.records = 0
        self.parts = 0
        self.rotated_away = 0  # parts deleted because more than `keep` old ones existed
        self._topology = topology_to_json(topology)
        self._features = features
        self._started = time.time()
        self._clock = time.perf_counter_ns()
        self._file: IO[str] | None = None
        self._size = 0
        self._write_through = write_through
        if resume:
            if self._dir_fd is None:
                raise ValueError("resume needs a trace directory")
            self._reopen()
            self._event("takeover")
        else:
            self._open()

    def _reopen(self) -> None:
        """Open the existing file for appending and carry on its numbering, parts and clock."""
        fd = os.open(self._name, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW, dir_fd=self._dir_fd)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise TraceError(f"{self.path}: not a regular file")
            with os.fdopen(os.dup(fd), "rb") as existing:
                header = _header(self.path, existing.readline(MAX_LINE + 1))
                lines = sum(1 for line in existing if line.strip())
                self._size = existing.tell()
        except BaseException:
            os.close(fd)
            raise
        self._file = os.fdopen(fd, "w", encoding="utf-8")
        self.parts = header.part + 1
        self.records = header.first + lines
        self._started = header.started
        # ``t`` counts from the recording's start, whichever process writes.
        self._clock = time.perf_counter_ns() - int((time.time() - header.started) * 1e9)

    def _open(self) -> None:
        # Not following a symlink planted at the trace's path: the file is ours, created fresh. In a trace
        # directory never an existing file either (O_EXCL): a name is not a way to overwrite one.
        flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
        flags |= os.O_EXCL if self._dir_fd is not None else os.O_TRUNC
        fd = os.open(self._name, flags, 0o600, dir_fd=self._dir_fd)
        self._file = os.fdopen(fd, "w", encoding="utf-8")
        self._size = 0
        header = {
            "trace": TRACE_MAGIC,
            "version": TRACE_VERSION,
            "part": self.parts,
            "first": self.records,
            "started": self._started,
            "topology": self._topology,
            "features": self._features,
        }
        self.parts += 1
        self._write(header)

    def _write(self, record: dict[str, Any]) -> None:
        assert self._file is not None
        line = json.dumps(record, separators=(",", ":")) + "\n"
        self._file.write(line)
        self._size += len(line)
        if self._write_through:
            self._file.flush()

    def _rotate(self) -> None:
        assert self._file is not None
        self._file.close()
        self._file = None
        where = self._dir_fd
        if self.keep == 0:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._name, dir_fd=where)
            self.rotated_away += 1
        else:
            oldest = f"{self._name}.{self.keep}"
            if self._exists(oldest):
                os.unlink(oldest, dir_fd=where)
                self.rotated_away += 1
            for number in range(self.keep - 1, 0, -1):
                older = f"{self._name}.{number}"
                if self._exists(older):
                    os.rename(older, f"{self._name}.{number + 1}", src_dir_fd=where, dst_dir_fd=where)
            os.rename(self._name, f"{self._name}.1", src_dir_fd=where, dst_dir_fd=where)
        self._open()

    def _exists(self, name: str) -> bool:
        try:
            os.stat(name, dir_fd=self._dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        return True

    def _event(self, kind: str, **fields: Any) -> None:
        if self._file is None:
            return
        if self._size >= self.max_bytes:
            self._rotate()
        record = {"n": self.records, "t": time.perf_counter_ns() - self._clock, "kind": kind, **fields}
        self.records += 1
        self._write(record)

    def request(
        self, request: bytes, writable: int, response: bytes, used: int, *, forced: bool, ns: int
    ) -> None:
        status = response[-4] if used and len(response) >= 4 else None
        self._event(
            "request",
            request=request.hex(),
            writable=writable,
            used=used,
            status=status,
            forced=forced,
            ns=ns,
        )

    def features(self, acked: int) -> None:
        self._features = acked
        self._event("features", acked=acked)

    def config(self, offset: int, data: bytes) -> None:
        self._event("config", offset=offset, data=data.hex())

    def reset(self) -> None:
        self._event("reset")

    def bypass(self, value: int) -> None:
        self._event("bypass", value=value)

    def reserved_regions(self, endpoint: int | None, regions: tuple[ReservedRegion, ...] | None) -> None:
        """A tool replaced reserved regions (endpoint None: all; regions None: the topology's again)."""
        self._event(
            "resv",
            endpoint=endpoint,
            regions=None if regions is None else [_region_json(region) for region in regions],
        )

    def fault(self, fault: Fault) -> None:
        self._event("fault", fault=fault_json(fault))

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    @property
    def closed(self) -> bool:
        return self._file is None


# -- reading -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TraceHeader:
    part: int
    first: int
    started: float
    topology: Topology
    features: int


@dataclass(frozen=True)
class TraceEvent:
    line: int
    kind: str
    fields: dict[str, Any]


def _hex(value: Any, where: str, most: int) -> bytes:
    if not isinstance(value, str) or len(value) > 2 * most:
        raise TraceError(f"{where}: not a hex string of at most {most} bytes")
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise TraceError(f"{where}: not hex") from None


_EVENT_KEYS = {
    "request": {"request", "writable", "used", "status", "forced", "ns"},
    "features": {"acked"},
    "config": {"offset", "data"},
    "reset": set(),
    "bypass": {"value"},
    "resv": {"endpoint", "regions"},
    "takeover": set(),
    "fault": {"fault"},
}


def _event(record: Any, where: str) -> tuple[str, dict[str, Any]]:
    if not isinstance(record, dict) or record.get("kind") not in _EVENT_KEYS:
        kind = record.get("kind") if isinstance(record, dict) else None
        raise TraceError(f"{where}: not a trace event (kind {kind!r})")
    kind = record["kind"]
    fields = _object(record, where, {"n", "t", "kind"} | _EVENT_KEYS[kind])
    _int(fields["n"], f"{where}: n")
    _int(fields["t"], f"{where}: t")
    parsed: dict[str, Any] = {"n": fields["n"]}
    if kind == "request":
        parsed["request"] = _hex(fields["request"], f"{where}: request", MAX_REQUEST_BYTES)
        parsed["writable"] = _int(fields["writable"], f"{where}: writable", MAX_WRITABLE)
        parsed["used"] = _int(fields["used"], f"{where}: used", MAX_WRITABLE)
        status = fields["status"]
        parsed["status"] = None if status is None else _int(status, f"{where}: status", 0xFF)
        if not isinstance(fields["forced"], bool):
            raise TraceError(f"{where}: forced: not true or false")
        parsed["forced"] = fields["forced"]
        parsed["ns"] = _int(fields["ns"], f"{where}: ns")
    elif kind == "features":
        parsed["acked"] = _int(fields["acked"], f"{where}: acked")
    elif kind == "config":
        parsed["offset"] = _int(fields["offset"], f"{where}: offset", 0xFFFF)
        parsed["data"] = _hex(fields["data"], f"{where}: data", 4096)
    elif kind == "bypass":
        parsed["value"] = _int(fields["value"], f"{where}: value", 1)
    elif kind == "resv":
        endpoint, regions = fields["endpoint"], fields["regions"]
        parsed["endpoint"] = None if endpoint is None else _int(endpoint, f"{where}: endpoint", 0xFFFFFFFF)
        parsed["regions"] = None if regions is None else _regions(regions, f"{where}: regions")
    elif kind == "fault":
        if not isinstance(fields["fault"], dict):
            raise TraceError(f"{where}: fault: not an object")
        parsed["fault"] = fields["fault"]
    return kind, parsed


def read_trace(path: str | Path) -> tuple[TraceHeader, Iterator[TraceEvent]]:
    """The header (read and checked now) and the events (read and checked as they are iterated)."""
    path = Path(path)
    try:
        stream = path.open("rb")
    except OSError as exc:
        raise TraceError(f"{path}: {exc.strerror or exc}") from None
    try:
        header = _header(path, stream.readline(MAX_LINE + 1))
    except BaseException:
        stream.close()
        raise

    def events() -> Iterator[TraceEvent]:
        with stream:
            for number, raw in enumerate(iter(lambda: stream.readline(MAX_LINE + 1), b""), start=2):
                where = f"{path}:{number}"
                if len(raw) > MAX_LINE:
                    raise TraceError(f"{where}: a line over {MAX_LINE} bytes")
                if not raw.strip():
                    continue
                try:
                    record = json.loads(raw)
                except (ValueError, RecursionError):
                    raise TraceError(f"{where}: not a JSON line") from None
                kind, fields = _event(record, where)
                yield TraceEvent(number, kind, fields)

    return header, events()


def _header(path: Path, raw: bytes) -> TraceHeader:
    where = f"{path}:1"
    if len(raw) > MAX_LINE:
        raise TraceError(f"{where}: a line over {MAX_LINE} bytes")
    try:
        record = json.loads(raw)
    except (ValueError, RecursionError):
        raise TraceError(f"{where}: not a JSON line (is this a vhost-iommu trace?)") from None
    if not isinstance(record, dict) or record.get("trace") != TRACE_MAGIC:
        raise TraceError(f"{where}: not a vhost-iommu trace header")
    if record.get("version") != TRACE_VERSION:
        raise TraceError(
            f"{where}: trace version {record.get('version')!r}; this program reads {TRACE_VERSION}"
        )
    fields = _object(record, where, {"trace", "version", "part", "first", "started", "topology", "features"})
    started = fields["started"]
    if not isinstance(started, (int, float)) or isinstance(started, bool):
        raise TraceError(f"{where}: started: not a number")
    return TraceHeader(
        part=_int(fields["part"], f"{where}: part"),
        first=_int(fields["first"], f"{where}: first"),
        started=float(started),
        topology=topology_from_json(fields["topology"], f"{where}: topology"),
        features=_int(fields["features"], f"{where}: features"),
    )


# -- replay --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Difference:
    line: int
    record: int
    request_type: str
    recorded: tuple[int | None, int]  # (status, used length)
    replayed: tuple[int | None, int]

    def describe(self) -> str:
        def answer(pair: tuple[int | None, int]) -> str:
            status, used = pair
            name = (
                "unwritten"
                if status is None
                else Status(status).name
                if status in Status._value2member_map_
                else str(status)
            )
            return f"{name} (used {used})"

        return (
            f"line {self.line} (request {self.record}, {self.request_type}): recorded "
            f"{answer(self.recorded)}, replayed {answer(self.replayed)}"
        )


@dataclass
class ReplayResult:
    requests: int = 0
    events: int = 0
    differences: list[Difference] = field(default_factory=list)
    difference_count: int = 0
    #: Per request type: [count, total ns] of the replay (the device core alone) and of the recording.
    replay_ns: dict[str, list[int]] = field(default_factory=dict)
    recorded_ns: dict[str, list[int]] = field(default_factory=dict)
    #: The conformance report of the recorded driver, when replay() was given a checker.
    conformance: dict[str, object] | None = None

    @property
    def ok(self) -> bool:
        return self.difference_count == 0


def _type_name(request: bytes) -> str:
    if not request:
        return "EMPTY"
    kind = request[0]
    return RequestType(kind).name if kind in READABLE_SIZE else f"TYPE {kind}"


def replay(
    path: str | Path,
    *,
    topology: Topology | None = None,
    keep_differences: int = 100,
    checker: Callable[[IommuDevice], ConformanceChecker] | None = None,
) -> ReplayResult:
    """Run the trace at ``path`` against a fresh device core; TraceError if the trace is unusable.

    ``checker`` builds a conformance checker for the replayed device (``ConformanceChecker``): the
    recorded driver is then checked offline, its report in ``result.conformance``."""
    header, events = read_trace(path)
    if header.part != 0:
        raise TraceError(
            f"{path}:1: part {header.part} of a rotated trace starts in the middle of a session "
            f"(from record {header.first}); only part 0 can be replayed on a fresh device"
        )
    device = IommuDevice(topology if topology is not None else header.topology)
    check = checker(device) if checker is not None else None
    if header.features:
        device.set_features(header.features)
        if check is not None:
            check.check_features(header.features)
    result = ReplayResult()
    for event in events:
        result.events += 1
        fields = event.fields
        if event.kind == "features":
            device.set_features(fields["acked"])
            if check is not None:
                check.check_features(fields["acked"])
        elif event.kind == "reset":
            device.reset()
            if check is not None:
                check.device_reset()
        elif event.kind == "bypass":
            device.set_bypass(fields["value"])
        elif event.kind == "resv":
            try:
                device.set_reserved_regions(fields["endpoint"], fields["regions"])
            except ValueError as exc:  # accepted when recorded: another topology than the recorded one
                raise TraceError(f"{path}:{event.line}: resv: {exc}") from None
        elif event.kind == "config":
            if check is not None:
                check.check_config_write(fields["offset"], fields["data"])
            # A write the device refuses was refused when recorded too, the same way.
            with contextlib.suppress(ValueError):
                device.set_config(fields["offset"], fields["data"])
        elif event.kind in ("takeover", "fault"):
            pass  # another device worker, the same device state; a DMA access: nothing to replay
        else:
            if check is not None:
                check.check_request(fields["request"], fields["writable"])
            _replay_request(device, event, result, keep_differences)
    if check is not None:
        result.conformance = check.report()
    return result


def _replay_request(device: IommuDevice, event: TraceEvent, result: ReplayResult, keep: int) -> None:
    fields = event.fields
    request: bytes = fields["request"]
    name = _type_name(request)
    result.requests += 1
    if fields["forced"] and request and request[0] in READABLE_SIZE:
        # The recorded answer was injected through the control channel: inject the same one, so the
        # replayed device does not apply a request the recorded one did not.
        status = fields["status"]
        device.inject(
            RequestType(request[0]),
            None
            if status is None
            else Status(status)
            if status in Status._value2member_map_
            else Status.DEVERR,
        )
    started = time.perf_counter_ns()
    response, used = device.handle_request(request, fields["writable"])
    elapsed = time.perf_counter_ns() - started
    device.clear_injections()  # a forced answer the replay did not consume must not leak onward
    for table, ns in ((result.replay_ns, elapsed), (result.recorded_ns, fields["ns"])):
        slot = table.setdefault(name, [0, 0])
        slot[0] += 1
        slot[1] += ns
    status = response[-4] if used and len(response) >= 4 else None
    if (status, used) != (fields["status"], fields["used"]):
        result.difference_count += 1
        if len(result.differences) < keep:
            result.differences.append(
                Difference(event.line, fields["n"], name, (fields["status"], fields["used"]), (status, used))
            )

"""The control commands: inspection and injection on the back-ends of one VhostUserServer.

:class:`ControlService` runs on the server's own event loop; every command is a plain synchronous call, so
it reads or changes device state between two requests, never in the middle of one. It reaches the device
only through the back-end's public attributes (``backend.device``, ``backend.context``,
``backend.deliver_events``) and the server's public connection state (``server.connections``, each
connection's ``handler``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import itertools
import logging
import os
import random
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from vhost_iommu import __version__
from vhost_iommu.abi import REQUEST_QUEUE, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC
from vhost_iommu.conformance import STATEMENTS, ConformanceChecker
from vhost_iommu.control.instrument import ConnectionTools
from vhost_iommu.control.protocol import (
    BAD_ARGUMENT,
    NO_CONNECTION,
    NOT_FOUND,
    U32_MAX,
    UNAVAILABLE,
    UNKNOWN_COMMAND,
    VERSION,
    Arguments,
    ControlError,
    Request,
)
from vhost_iommu.device import (
    Access,
    FaultReason,
    RequestType,
    ReservedRegion,
    ResvMemType,
    Status,
    Translation,
)
from vhost_iommu.device.dma import DmaPort
from vhost_iommu.device.history import fault_json
from vhost_iommu.device.layout import FAULT_F_ADDRESS, decode_config, feature_names
from vhost_iommu.device.topology import format_bdf
from vhost_iommu.protocol.constants import VHOST_USER_F_PROTOCOL_FEATURES, ProtocolFeature
from vhost_iommu.trace import (
    DEFAULT_KEEP,
    DEFAULT_MAX_BYTES,
    TraceDirectory,
    TraceDirectoryError,
    TraceWriter,
)

if TYPE_CHECKING:
    from vhost_iommu.backend import VhostUserBackend
    from vhost_iommu.endpoint_server import ServedEndpoint
    from vhost_iommu.server import Connection, VhostUserServer
    from vhost_iommu.virtio_iommu import VirtioIommuBackend

log = logging.getLogger(__name__)

#: Names of the transport feature bits the device's own table does not name.
TRANSPORT_FEATURE_NAMES = {
    mask.bit_length() - 1: name
    for mask, name in (
        (VIRTIO_RING_F_INDIRECT_DESC, "RING_INDIRECT_DESC"),
        (VIRTIO_RING_F_EVENT_IDX, "RING_EVENT_IDX"),
        (VHOST_USER_F_PROTOCOL_FEATURES, "PROTOCOL_FEATURES"),
    )
}
DEFAULT_PAGE = 1000
MAX_PAGE = 10000
MAX_DELAY_US = 10_000_000  # 10 s: longer would only trip the guest's soft-lockup detector
MAX_REGIONS = 64
MAX_FAULTS_PER_REQUEST = 4096

STATUS_CHOICES: dict[str, Status | None] = {status.name: status for status in Status}
STATUS_CHOICES["NONE"] = None  # buffers returned unwritten, used length 0
TYPE_CHOICES = {kind.name: kind for kind in RequestType}
REASON_CHOICES = {reason.name: int(reason) for reason in FaultReason}
RESV_CHOICES = {kind.name: kind for kind in ResvMemType}


def _names(features: int) -> list[str]:
    names = []
    for name in feature_names(features):
        if name.startswith("bit "):
            bit = int(name[4:])
            name = TRANSPORT_FEATURE_NAMES.get(bit, name)
        names.append(name)
    return names


def _access(text: str, name: str = "access") -> int:
    letters = {"r": Access.READ, "w": Access.WRITE, "x": Access.EXEC}
    if not isinstance(text, str) or not text or any(letter not in letters for letter in text.lower()):
        raise ControlError(BAD_ARGUMENT, f"{name}: {text!r} is not a combination of r, w and x")
    access = 0
    for letter in text.lower():
        access |= letters[letter]
    return access


@dataclasses.dataclass(frozen=True)
class TraceSettings:
    """What a device worker needs to continue a connection's trace: a file of the trace directory."""

    name: str
    max_bytes: int
    keep: int

    def to_json(self) -> dict[str, object]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, value: object) -> TraceSettings:
        """ValueError for anything but what ``to_json`` makes."""
        if not isinstance(value, dict) or set(value) != {"name", "max_bytes", "keep"}:
            raise ValueError(f"not trace settings: {value!r}")
        name, max_bytes, keep = value["name"], value["max_bytes"], value["keep"]
        if not isinstance(name, str) or not isinstance(max_bytes, int) or not isinstance(keep, int):
            raise ValueError(f"not trace settings: {value!r}")
        return cls(TraceDirectory.check_name(name), max_bytes, keep)


class TrackedFactory(Protocol):
    """A back-end factory wrapped by ``ControlService.track``."""

    def __call__(
        self, number: int | None = None, *, taking_over: bool = False, trace: TraceSettings | None = None
    ) -> VhostUserBackend: ...


def _numbered(name: str, number: int) -> str:
    """The trace file of connection ``number``: NAME for the first, NAME-N.EXT (or NAME-N) after."""
    if number == 1:
        return name
    stem, dot, suffix = name.rpartition(".")
    return f"{stem}-{number}.{suffix}" if dot and stem and "/" not in suffix else f"{name}-{number}"


def _region(region: ReservedRegion) -> dict[str, object]:
    return {"type": region.kind.name, "start": region.start, "end": region.end}


_C = "connection"
#: The arguments each command accepts (besides "version" and "command"); docs/control.md lists them.
ARGUMENTS: dict[str, set[str]] = {
    "hello": set(),
    "connections": set(),
    "endpoints": {_C, "served"},
    "domains": {_C},
    "mappings": {_C, "domain", "endpoint", "iova_start", "iova_end", "limit", "after"},
    "counters": {_C},
    "latency-reset": {_C},
    "features": {_C},
    "queues": {_C},
    "config": {_C},
    "events": {_C},
    "fault": {_C, "endpoint", "reason", "address", "access", "flags", "count"},
    "events-clear": {_C},
    "translate": {_C, "endpoint", "iova", "size", "access", "report"},
    "inject": {_C, "type", "status", "times"},
    "inject-rate": {_C, "type", "status", "rate", "seed"},
    "inject-clear": {_C},
    "delay": {_C, "us", "type"},
    "bypass": {_C, "value", "boot"},
    "resv": {_C, "endpoint", "regions"},
    "resv-clear": {_C, "endpoint"},
    "conformance": {_C, "statements"},
    "conformance-start": {_C},
    "conformance-stop": {_C},
    "conformance-reset": {_C},
    "trace-start": {_C, "name", "path", "max_bytes", "keep"},
    "trace-stop": {_C},
    "upgrade": set(),
}


class ControlService:
    """Serves control requests for the connections of ``server``; call :meth:`track` on its factory."""

    def __init__(
        self,
        server: VhostUserServer | None = None,
        *,
        conformance: bool = False,
        trace_path: str | None = None,
        trace_dir: TraceDirectory | None = None,
        trace_name: str | None = None,
        trace_max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        """``conformance``: check every connection's driver from its first message (docs/toolkit.md);
        its findings outlive the connection (:meth:`violations`).

        ``trace_dir``: the only directory ``trace-start`` writes to (it takes a file name); without it
        ``trace-start`` is refused. ``trace_name``: record every connection's requests from the start
        into that file of ``trace_dir`` (connection N > 1 to NAME-N.EXT). ``trace_path`` does the same
        at a path the program chose (the Lab, tests), replacing the file."""
        if trace_name is not None:
            if trace_dir is None:
                raise ValueError("trace_name needs trace_dir")
            TraceDirectory.check_name(trace_name)
        if trace_name is not None and trace_path is not None:
            raise ValueError("trace_name or trace_path, not both")
        self.server = server
        #: The vfio-user endpoints served beside (vhost_iommu.endpoint_server.EndpointServer), if any.
        self.endpoint_server: Any = None
        self.conformance = conformance
        self.trace_path = trace_path
        self.trace_dir = trace_dir
        self.trace_name = trace_name
        self.trace_max_bytes = trace_max_bytes
        # Conformance reports of connections that are gone (number -> report), kept for violations().
        self._past_reports: dict[int, dict[str, object]] = {}
        self._numbers = itertools.count(1)
        # Tools live as long as their back-end (the back-end's wrapper holds them); gone connections fall
        # out of the registry with it.
        self._tools: weakref.WeakValueDictionary[int, ConnectionTools] = weakref.WeakValueDictionary()
        self._commands: dict[str, Callable[[Arguments], object]] = {
            "hello": self.hello,
            "connections": self.connections,
            "endpoints": self.endpoints,
            "domains": self.domains,
            "mappings": self.mappings,
            "counters": self.counters,
            "latency-reset": self.latency_reset,
            "features": self.features,
            "queues": self.queues,
            "config": self.config,
            "events": self.events,
            "fault": self.fault,
            "events-clear": self.events_clear,
            "translate": self.translate,
            "inject": self.inject,
            "inject-rate": self.inject_rate,
            "inject-clear": self.inject_clear,
            "delay": self.delay,
            "bypass": self.bypass,
            "resv": self.resv,
            "resv-clear": self.resv_clear,
            "conformance": self.conformance_report,
            "conformance-start": self.conformance_start,
            "conformance-stop": self.conformance_stop,
            "conformance-reset": self.conformance_reset,
            "trace-start": self.trace_start,
            "trace-stop": self.trace_stop,
            "upgrade": self.upgrade,
        }
        #: Set by a device worker under a keeper (serve --state-dir): asks the keeper for an upgrade.
        self.upgrade_hook: Callable[[], None] | None = None
        #: Set by a device worker under a keeper: told (statement, description) the first time a checker
        #: sees a statement broken, so the keeper's exit status reflects it (--conformance=strict).
        self.violation_hook: Callable[[str, str], None] | None = None
        #: Set by a device worker under a keeper: told (connection number, the trace's settings or None)
        #: whenever a connection's trace starts or stops, so that a worker taking the session over
        #: continues it (``took_over``). Traces are then written through record by record.
        self.trace_hook: Callable[[int, TraceSettings | None], None] | None = None
        assert set(self._commands) == set(ARGUMENTS)

    # -- wiring ---------------------------------------------------------------------------------------------

    def track(self, factory: Callable[[], VhostUserBackend]) -> TrackedFactory:
        """Wrap a back-end factory so every virtio-iommu back-end it makes gets the control's tools.
        A device worker under a keeper passes the keeper's ``number`` of the connection, and
        ``taking_over`` for a session a previous worker served (with ``trace``, the settings of the trace
        it recorded): its checker and trace are then installed by ``took_over`` once the back-end has
        rebuilt the session (its ``restored_hook``), before it serves a request: the rebuilding replays
        the journal through the device, which they must not take for the driver's requests."""

        def tracked(
            number: int | None = None, *, taking_over: bool = False, trace: TraceSettings | None = None
        ) -> VhostUserBackend:
            backend = factory()
            if hasattr(backend, "device") and hasattr(backend, "deliver_events"):
                number = next(self._numbers) if number is None else number
                tools = ConnectionTools(number, backend, asyncio.get_running_loop())  # type: ignore[arg-type]
                self._tools[tools.number] = tools
                if taking_over:
                    backend.restored_hook = functools.partial(self.took_over, number, trace)  # type: ignore[attr-defined]
                    return backend
                if self.conformance:
                    self._check_from_start(tools)
                name = self.trace_name if self.trace_name is not None else self.trace_path
                if name is not None:
                    self._record_from_start(tools, _numbered(name, tools.number))
            return backend

        return tracked

    def took_over(self, number: int, trace: TraceSettings | None) -> None:
        """Connection ``number``'s session, served by a previous device worker, is restored here: check it
        (its history unknown to this checker: the driver is assumed to have done what it had to) and
        continue its trace, if one was recording. Once per connection."""
        tools = self._tools.get(number)
        if tools is None or tools.checker is not None or tools.trace is not None:
            return
        if self.conformance:
            self._check_from_start(tools).assume_history()
        if trace is not None:
            self._continue_trace(tools, trace)

    def _check_from_start(self, tools: ConnectionTools) -> ConformanceChecker:
        checker = ConformanceChecker(
            tools.backend.device, name=f"connection {tools.number}", on_first=self._first_violation
        )
        tools.set_checker(checker)
        # When the connection's tools go, its findings stay (the checker, not the tools, is held by the
        # finaliser, and only until then).
        weakref.finalize(tools, self._keep_report, tools.number, checker)
        return checker

    def _record_from_start(self, tools: ConnectionTools, name: str) -> None:
        topology = tools.backend.device.topology
        try:
            if self.trace_name is not None:
                writer = TraceWriter(
                    name,
                    topology,
                    max_bytes=self.trace_max_bytes,
                    directory=self.trace_dir,
                    write_through=self.trace_hook is not None,
                )
            else:
                writer = TraceWriter(name, topology, max_bytes=self.trace_max_bytes)
        except OSError as exc:
            # The guest is served all the same; the missing trace is said where the operator looks.
            log.error("connection %d: no trace: %s: %s", tools.number, name, exc.strerror or exc)
            return
        self._set_trace(tools, writer)

    def _continue_trace(self, tools: ConnectionTools, settings: TraceSettings) -> None:
        """Continue the trace a previous device worker recorded for this session."""
        try:
            if self.trace_dir is None:
                raise TraceDirectoryError("this worker has no --trace-dir")
            writer = TraceWriter(
                settings.name,
                tools.backend.device.topology,
                max_bytes=settings.max_bytes,
                keep=settings.keep,
                directory=self.trace_dir,
                write_through=True,
                resume=True,
            )
        except (OSError, ValueError) as exc:
            log.error("connection %d: trace %s not continued: %s", tools.number, settings.name, exc)
            return
        tools.set_trace(writer)

    def _set_trace(self, tools: ConnectionTools, writer: TraceWriter | None) -> TraceWriter | None:
        """Start or stop a connection's trace on the driver's or a client's behalf (the keeper is told)."""
        previous = tools.set_trace(writer)
        if self.trace_hook is not None:
            settings = None
            if writer is not None:
                settings = TraceSettings(writer.path.name, writer.max_bytes, writer.keep)
            self.trace_hook(tools.number, settings)
        return previous

    def _first_violation(self, statement: str, description: str) -> None:
        if self.violation_hook is not None:
            self.violation_hook(statement, description)

    def _keep_report(self, number: int, checker: ConformanceChecker) -> None:
        self._past_reports[number] = checker.report()

    def violations(self) -> dict[int, dict[str, object]]:
        """Conformance reports with at least one violation, of every connection so far (gone or not)."""
        reports = dict(self._past_reports)
        for tools in list(self._tools.values()):
            if tools.checker is not None:
                reports[tools.number] = tools.checker.report()
        return {number: report for number, report in sorted(reports.items()) if report.get("total")}

    def close(self) -> None:
        """Close every trace still recording (their files are complete afterwards)."""
        for tools in list(self._tools.values()):
            tools.set_trace(None)

    def handle(self, request: Request) -> object:
        """Run one request; raises ControlError for anything the client got wrong."""
        command = self._commands.get(request.command)
        if command is None:
            raise ControlError(UNKNOWN_COMMAND, f"unknown command {request.command!r}; try 'hello'")
        # Refused before the command runs: a misspelt argument must not leave a half-applied injection.
        unknown = request.arguments.names() - ARGUMENTS[request.command]
        if unknown:
            raise ControlError(
                BAD_ARGUMENT, f"{request.command}: unknown argument(s): {', '.join(sorted(unknown))}"
            )
        # Commands read and change device state: every requestq thread stays out of its device meanwhile
        # (and hands over the batch times it took).
        live = [tools for tools, _connection in self._live()]
        with contextlib.ExitStack() as quiet:
            for tools in live:
                quiet.enter_context(tools.backend.quiesced())
            return command(request.arguments)

    def _live(self) -> list[tuple[ConnectionTools, Connection]]:
        found: list[tuple[ConnectionTools, Connection]] = []
        if self.server is None:
            return found
        # A back-end may be going away on another thread (its kick thread can drop the last reference)
        # while its tools are held here: those are skipped, as the connection is being closed.
        by_backend = {
            id(backend): tools for tools in list(self._tools.values()) if (backend := tools.live_backend)
        }
        for connection in self.server.connections:
            tools = by_backend.get(id(connection.handler.backend))
            if tools is not None and not connection.done.done():
                found.append((tools, connection))
        return sorted(found, key=lambda pair: pair[0].number)

    def _select(self, arguments: Arguments) -> tuple[ConnectionTools, Connection]:
        wanted = arguments.optional_integer("connection", low=0, high=U32_MAX)
        live = self._live()
        if wanted is None:
            if not live:
                raise ControlError(NO_CONNECTION, "no front-end is connected")
            if len(live) > 1:
                numbers = ", ".join(str(tools.number) for tools, _ in live)
                raise ControlError(BAD_ARGUMENT, f"connection: several front-ends ({numbers}); choose one")
            return live[0]
        for tools, connection in live:
            if tools.number == wanted:
                return tools, connection
        raise ControlError(NO_CONNECTION, f"connection {wanted} does not exist (see 'connections')")

    def _backend(self, arguments: Arguments) -> tuple[VirtioIommuBackend, ConnectionTools]:
        tools, _connection = self._select(arguments)
        return tools.backend, tools

    # -- inspection -----------------------------------------------------------------------------------------

    def hello(self, arguments: Arguments) -> object:
        return {
            "version": VERSION,
            "program": "vhost-iommu",
            "program_version": __version__,
            "pid": os.getpid(),
            "commands": sorted(self._commands),
        }

    def upgrade(self, arguments: Arguments) -> object:
        """Ask the keeper to start a worker with the code on disk and hand it every connection (the same as
        SIGHUP to the keeper); answered before the hand-over, which ends this control connection."""
        if self.upgrade_hook is None:
            raise ControlError(UNAVAILABLE, "upgrade needs serve --state-dir (a keeper to hand over to)")
        self.upgrade_hook()
        return {"requested": True, "pid": os.getpid()}

    def connections(self, arguments: Arguments) -> object:
        rows = []
        for tools, connection in self._live():
            handler = connection.handler
            device = tools.backend.device
            rows.append(
                {
                    "connection": tools.number,
                    "name": connection.name,
                    "since": tools.created,
                    "started_queues": sum(1 for slot in handler.slots if slot.started),
                    "broken": handler.broken_reason,
                    "attached_endpoints": sum(1 for e in device.endpoints() if e.domain is not None),
                    "domains": len(device.domains()),
                    "requests": sum(device.request_counters().values()),
                }
            )
        return rows

    def endpoints(self, arguments: Arguments) -> object:
        """The IOMMU's endpoints on one connection, each with its vfio-user endpoint (``vfio_user``) if one
        is served for it and not paired with another guest; with ``served``, only the vfio-user
        endpoints, of every guest (no connection needed)."""
        if arguments.boolean("served", default=False):
            if "connection" in arguments:
                raise ControlError(BAD_ARGUMENT, "connection: not with served (it lists every guest's)")
            return [self._served_row(served) for served in self._served()]
        backend, tools = self._backend(arguments)
        ours: dict[int, dict[str, object]] = {}
        for served in self._served():
            row = self._served_row(served)
            paired = row["paired"]
            if paired is None or paired["connection"] == tools.number:  # type: ignore[index]
                ours[served.endpoint] = row
        rows = []
        for info in backend.device.endpoints():
            rows.append(
                {
                    "endpoint": info.endpoint,
                    "segment": info.segment,
                    "bdf": info.bdf,
                    "domain": info.domain,
                    "reserved": [_region(region) for region in info.reserved],
                    "vfio_user": ours.get(info.endpoint),
                }
            )
        return rows

    def _served(self) -> list[ServedEndpoint]:
        server = self.endpoint_server
        return [] if server is None else list(server.endpoints)

    def _served_row(self, served: ServedEndpoint) -> dict[str, object]:
        """One vfio-user endpoint: its device, its client, the guest it is paired with, its DMA."""
        connection, unpaired = served.pairing()
        paired = None
        if connection is not None:
            number = next((tools.number for tools, live in self._live() if live is connection), None)
            paired = {"connection": number, "name": getattr(connection, "name", None)}
        port = served.port if connection is not None else None
        client = served.handler
        return {
            "kind": served.spec.kind,
            "bdf": format_bdf(served.spec.bdf),
            "segment": served.spec.segment,
            "endpoint": served.endpoint,
            "socket": served.path,
            "connected": client is not None,
            "client": None if client is None else client.name,
            "paired": paired,
            "unpaired": unpaired,
            "counters": None if port is None else port.counters(),
            "last_faults": [] if port is None else [fault_json(fault) for fault in port.last_faults],
        }

    def domains(self, arguments: Arguments) -> object:
        backend, _tools = self._backend(arguments)
        return [
            {
                "domain": info.domain,
                "bypass": info.bypass,
                "endpoints": list(info.endpoints),
                "mappings": info.mapping_count,
                "reserved": [list(interval) for interval in info.reserved],
            }
            for info in backend.device.domains()
        ]

    def mappings(self, arguments: Arguments) -> object:
        """Mappings by (domain, IOVA), filtered, one page at a time; ``next`` resumes after this page."""
        backend, _tools = self._backend(arguments)
        device = backend.device
        domain = arguments.optional_integer("domain", high=U32_MAX)
        endpoint = arguments.optional_integer("endpoint", high=U32_MAX)
        low = arguments.integer("iova_start", default=0)
        high = arguments.integer("iova_end", default=(1 << 64) - 1)
        limit = arguments.integer("limit", default=DEFAULT_PAGE, low=1, high=MAX_PAGE)
        after = arguments.raw("after")
        if low > high:
            raise ControlError(BAD_ARGUMENT, "iova_start: after iova_end")
        existing = sorted(info.domain for info in device.domains())
        if endpoint is not None:
            if not device.topology.has_endpoint(endpoint):
                raise ControlError(NOT_FOUND, f"endpoint {endpoint:#x} is not managed by this IOMMU")
            attached = device.domain_of(endpoint)
            if domain is not None and attached != domain:
                existing = []
            else:
                existing = [attached] if attached is not None else []
        if domain is not None:
            if domain not in existing and endpoint is None:
                raise ControlError(NOT_FOUND, f"domain {domain} does not exist")
            existing = [d for d in existing if d == domain]
        cursor_domain, cursor_iova = -1, -1
        if after is not None:
            if (
                not isinstance(after, list)
                or len(after) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in after)
            ):
                raise ControlError(BAD_ARGUMENT, "after: must be [domain, iova] from a previous 'next'")
            cursor_domain, cursor_iova = after
        rows: list[dict[str, int]] = []
        next_cursor: list[int] | None = None
        for current in existing:
            if current < cursor_domain:
                continue
            start = low
            if current == cursor_domain:
                if cursor_iova >= high:
                    continue
                start = max(low, cursor_iova + 1)
            # One more than the page needs: tells whether a next page exists.
            for virt_start, virt_end, phys, flags in device.store.mappings(current, start, limit + 1):
                virt_start, virt_end = int(virt_start), int(virt_end)
                if virt_start > high:
                    break
                if current == cursor_domain and virt_start <= cursor_iova:
                    continue
                if len(rows) == limit:
                    next_cursor = [rows[-1]["domain"], rows[-1]["iova_start"]]
                    break
                rows.append(
                    {
                        "domain": current,
                        "iova_start": virt_start,
                        "iova_end": virt_end,
                        "phys": int(phys),
                        "flags": int(flags),
                    }
                )
            if next_cursor is not None:
                break
            if len(rows) == limit:
                # The page is full at a domain boundary: another domain may still have mappings.
                later = [d for d in existing if d > current]
                if later:
                    next_cursor = [rows[-1]["domain"], rows[-1]["iova_start"]]
                break
        return {"mappings": rows, "next": next_cursor}

    def counters(self, arguments: Arguments) -> object:
        backend, tools = self._backend(arguments)
        device = backend.device
        return {
            "requests": device.request_counters(),
            "statuses": device.status_counters(),
            "faults": device.fault_counters(),
            "injected": device.injected_count,
            "latency": {name: histogram.summary() for name, histogram in sorted(tools.latency.items())},
            "batches": tools.batches.summary(),
            "delay_us": tools.delay_us,
            "delayed_batches": tools.delayed_batches,
            "type_delays_us": {RequestType(kind).name: us for kind, us in sorted(tools.type_delays.items())},
            "delayed_requests": tools.delayed_requests,
            "rates": [
                {
                    "type": rate.request_type.name,
                    "status": rate.status.name if rate.status is not None else "NONE",
                    "rate": rate.rate,
                    "seed": rate.seed,
                    "seen": rate.seen,
                    "forced": rate.forced,
                }
                for rate in device.rate_injections
            ],
        }

    def latency_reset(self, arguments: Arguments) -> object:
        _backend, tools = self._backend(arguments)
        tools.reset_latency()
        return {}

    def features(self, arguments: Arguments) -> object:
        tools, connection = self._select(arguments)
        handler = connection.handler
        offered = handler.offered_features()
        acked = handler.acked_features
        return {
            "offered": offered,
            "offered_names": _names(offered),
            "acked": acked,
            "acked_names": _names(acked),
            "driver_wrote": tools.backend.device.driver_features,
            "protocol": int(handler.protocol_features),
            "protocol_names": [f.name for f in ProtocolFeature if f & handler.protocol_features and f.name],
        }

    def queues(self, arguments: Arguments) -> object:
        tools, connection = self._select(arguments)
        handler = connection.handler
        # The kick thread serves while it holds the kick fd and the kernel may serve; otherwise every
        # kick is served on the event loop (the thread, if any, hands it over).
        by_thread = tools.backend.kernel_serves()
        rows = []
        for slot in handler.slots:
            ring = slot.queue
            rows.append(
                {
                    "index": slot.index,
                    "size": slot.size,
                    "started": slot.started,
                    "enabled": slot.enabled,
                    "next_avail": ring.next_avail if ring is not None else slot.base,
                    "used_idx": ring.used_idx if ring is not None else None,
                    "in_flight": ring.in_flight if ring is not None else 0,
                    "event_idx": ring.event_idx if ring is not None else None,
                    "kick_pending": slot.kick_pending,
                    # The requestq's path (compiled, python, or python while a cold start compiles);
                    # the eventq is always the device core's.
                    "path": tools.backend.serving_path() if slot.index == REQUEST_QUEUE else "python",
                    "served_by": (
                        ("thread" if slot.kick_taken and by_thread else "event-loop") if slot.served else None
                    ),
                    # The requestq thread's scheduling class, as it got it (a fallback says why).
                    "scheduling": (
                        tools.backend.kick_thread_scheduling()
                        if slot.index == REQUEST_QUEUE and slot.kick_taken
                        else None
                    ),
                    "broken": handler.broken_reason,
                }
            )
        return rows

    def config(self, arguments: Arguments) -> object:
        backend, _tools = self._backend(arguments)
        device = backend.device
        fields = decode_config(device.get_config(0, device.config_size))
        decoded = dataclasses.asdict(fields)
        decoded["reserved"] = fields.reserved.hex()
        decoded["boot_bypass"] = device.config.boot_bypass
        return decoded

    def events(self, arguments: Arguments) -> object:
        backend, _tools = self._backend(arguments)
        device = backend.device
        return {
            "pending": [
                {"reason": e.reason, "flags": e.flags, "endpoint": e.endpoint, "address": e.address}
                for e in device.pending_events()
            ],
            "queued_total": device.events.queued_count,
            "dropped": device.dropped_event_count,
            "capacity": device.events.capacity,
        }

    # -- injection ------------------------------------------------------------------------------------------

    def fault(self, arguments: Arguments) -> object:
        """Queue fault events and deliver them to the eventq buffers the driver posted."""
        backend, _tools = self._backend(arguments)
        device = backend.device
        # A name, or any u8: reasons the driver does not know are worth sending too.
        if isinstance(arguments.raw("reason"), int):
            reason = arguments.integer("reason", high=0xFF)
        else:
            reason = arguments.choice("reason", REASON_CHOICES, default="MAPPING")
        endpoint = arguments.integer("endpoint", high=U32_MAX)
        address = arguments.optional_integer("address")
        access = _access(arguments.string("access", default="r"))
        extra = arguments.integer("flags", default=0, high=U32_MAX)
        count = arguments.integer("count", default=1, low=1, high=MAX_FAULTS_PER_REQUEST)
        flags = access | extra | (FAULT_F_ADDRESS if address is not None else 0)
        queued = sum(1 for _ in range(count) if device.report_fault(reason, flags, endpoint, address or 0))
        backend.deliver_events()
        return {
            "queued": queued,
            "dropped": count - queued,
            "pending": device.pending_event_count,
            "flags": flags,
        }

    def events_clear(self, arguments: Arguments) -> object:
        backend, _tools = self._backend(arguments)
        dropped = backend.device.pending_event_count
        backend.device.events.clear()
        return {"cleared": dropped}

    def translate(self, arguments: Arguments) -> object:
        backend, _tools = self._backend(arguments)
        device = backend.device
        endpoint = arguments.integer("endpoint", high=U32_MAX)
        iova = arguments.integer("iova")
        size = arguments.integer("size", default=1, low=1, high=1 << 48)
        access = _access(arguments.string("access", default="r"))
        report = arguments.boolean("report", default=False)
        # The engine's own translation: a DMA port's (the compiled kernel of jit/dma.py), not a copy.
        try:
            result = DmaPort(device, endpoint).translate(iova, size, Access(access))
        except ValueError as exc:
            raise ControlError(BAD_ARGUMENT, str(exc)) from None
        except TypeError as exc:
            raise ControlError(UNAVAILABLE, str(exc)) from None
        if isinstance(result, Translation):
            return {
                "translated": True,
                "iova": iova,
                "size": size,
                "bypass": result.bypass,
                "segments": [list(segment) for segment in result.segments],
            }
        result = dataclasses.replace(result, explanation=device.explain(result))
        result = device.record_fault(result, report=report)  # counted as ever, queued only when asked
        if result.reported:
            backend.deliver_events()
        return {
            "translated": False,
            "reason": result.reason.name,
            "flags": result.flags,
            "endpoint": result.endpoint,
            "address": result.address,
            "reported": result.reported,
            "explanation": result.explanation.to_json() if result.explanation is not None else None,
        }

    def inject(self, arguments: Arguments) -> object:
        backend, _tools = self._backend(arguments)
        kind = arguments.choice("type", TYPE_CHOICES)
        status = arguments.choice("status", STATUS_CHOICES)
        times = arguments.integer("times", default=1, low=1, high=1 << 31)
        backend.device.inject(kind, status, times=times)
        return {"type": kind.name, "status": status.name if status is not None else "NONE", "times": times}

    def inject_rate(self, arguments: Arguments) -> object:
        """Force ``status`` on a seeded fraction of the requests of a type (one rate per type)."""
        backend, _tools = self._backend(arguments)
        kind = arguments.choice("type", TYPE_CHOICES)
        status = arguments.choice("status", STATUS_CHOICES)
        rate = arguments.number("rate", low=0.0, high=1.0)
        seed = arguments.integer("seed", default=random.randrange(1 << 32), high=(1 << 63) - 1)
        backend.device.inject_rate(kind, status, rate, seed=seed)
        return {"type": kind.name, "rate": rate, "seed": seed}

    def inject_clear(self, arguments: Arguments) -> object:
        """Every forced answer off: pending count injections, rates, added latency of every kind."""
        backend, tools = self._backend(arguments)
        backend.device.clear_injections()
        tools.clear_delays()
        return {}

    def delay(self, arguments: Arguments) -> object:
        """Added latency per requestq batch, or with ``type`` per request of that type."""
        _backend, tools = self._backend(arguments)
        microseconds = arguments.integer("us", high=MAX_DELAY_US)
        kind = arguments.choice("type", TYPE_CHOICES) if "type" in arguments else None
        tools.set_delay(microseconds, kind)
        return {"us": microseconds, "type": kind.name if kind is not None else None}

    def bypass(self, arguments: Arguments) -> object:
        """Set config.bypass (or restore its boot value) and tell the driver the config changed."""
        backend, _tools = self._backend(arguments)
        device = backend.device
        if arguments.boolean("boot", default=False):
            if "value" in arguments:
                raise ControlError(BAD_ARGUMENT, "value: not with boot")
            value = device.config.boot_bypass
        else:
            value = arguments.integer("value", high=1)
        context = backend.context
        if context is None:
            raise ControlError(UNAVAILABLE, "the back-end is not attached to a connection")
        device.set_bypass(value)
        context.config_changed()
        return {"bypass": value}

    def resv(self, arguments: Arguments) -> object:
        """Replace an endpoint's reserved regions: what the next PROBE reports, and what MAP and
        translation respect from now on."""
        backend, _tools = self._backend(arguments)
        device = backend.device
        endpoint = arguments.integer("endpoint", high=U32_MAX)
        if not device.topology.has_endpoint(endpoint):
            raise ControlError(NOT_FOUND, f"endpoint {endpoint:#x} is not managed by this IOMMU")
        regions = []
        for index, item in enumerate(arguments.list_of_objects("regions", most=MAX_REGIONS)):
            kind = item.choice("type", RESV_CHOICES)
            start = item.integer("start")
            end = item.integer("end")
            item.check_used(f"regions[{index}]")
            if end < start:
                raise ControlError(BAD_ARGUMENT, f"regions[{index}]: end before start")
            regions.append(ReservedRegion(kind, start, end))
        try:
            device.set_reserved_regions(endpoint, tuple(regions))
        except ValueError as exc:
            raise ControlError(BAD_ARGUMENT, f"regions: {exc}") from None
        return {"endpoint": endpoint, "reserved": [_region(r) for r in device.reserved_regions(endpoint)]}

    def resv_clear(self, arguments: Arguments) -> object:
        """The topology's own reserved regions again, for one endpoint or (no endpoint) all."""
        backend, _tools = self._backend(arguments)
        device = backend.device
        endpoint = arguments.optional_integer("endpoint", high=U32_MAX)
        if endpoint is not None and not device.topology.has_endpoint(endpoint):
            raise ControlError(NOT_FOUND, f"endpoint {endpoint:#x} is not managed by this IOMMU")
        device.set_reserved_regions(endpoint, None)
        if endpoint is None:
            return {"restored": "all"}
        return {"endpoint": endpoint, "reserved": [_region(r) for r in device.reserved_regions(endpoint)]}

    # -- driver conformance and traces (docs/toolkit.md) -----------------------------------------------------

    def conformance_report(self, arguments: Arguments) -> object:
        _backend, tools = self._backend(arguments)
        with_statements = arguments.boolean("statements", default=False)
        checker = tools.checker
        report: dict[str, object] = {"enabled": checker is not None}
        report.update(checker.report() if checker is not None else {"total": 0, "counts": {}, "first": {}})
        if with_statements:
            report["statements"] = {
                key: {"section": statement.section, "text": statement.text}
                for key, statement in STATEMENTS.items()
            }
        return report

    def conformance_start(self, arguments: Arguments) -> object:
        """Check the driver's requests from now on (a PROBE sent before starting is not seen)."""
        _backend, tools = self._backend(arguments)
        if tools.checker is None:
            checker = ConformanceChecker(
                tools.backend.device, name=f"connection {tools.number}", on_first=self._first_violation
            )
            # The driver set its features before the checker existed: not a request before features.
            checker.check_features(tools.backend.device.driver_features)
            checker.reset_counts()
            tools.set_checker(checker)
        return {"enabled": True}

    def conformance_stop(self, arguments: Arguments) -> object:
        _backend, tools = self._backend(arguments)
        checker = tools.checker
        tools.set_checker(None)
        return checker.report() if checker is not None else {"total": 0, "counts": {}, "first": {}}

    def conformance_reset(self, arguments: Arguments) -> object:
        _backend, tools = self._backend(arguments)
        if tools.checker is None:
            raise ControlError(
                UNAVAILABLE, "no conformance checker runs on this connection (conformance-start)"
            )
        tools.checker.reset_counts()
        return {}

    def trace_start(self, arguments: Arguments) -> object:
        """Record this connection's requests to a new file ``name`` of the trace directory."""
        backend, tools = self._backend(arguments)
        if "path" in arguments:
            raise ControlError(
                BAD_ARGUMENT, "path: traces take a file name (name) in the back-end's --trace-dir, not a path"
            )
        directory = self.trace_dir
        if directory is None:
            raise ControlError(
                UNAVAILABLE, "this back-end records no traces on request (serve it with --trace-dir DIR)"
            )
        name = arguments.string("name", default="")
        try:
            TraceDirectory.check_name(name)
        except TraceDirectoryError as exc:
            raise ControlError(BAD_ARGUMENT, f"name: {exc}") from None
        max_bytes = arguments.integer("max_bytes", default=DEFAULT_MAX_BYTES, low=4096, high=1 << 40)
        keep = arguments.integer("keep", default=DEFAULT_KEEP, high=1000)
        if tools.trace is not None:
            raise ControlError(
                UNAVAILABLE, f"a trace is already recording to {tools.trace.path} (trace-stop)"
            )
        device = backend.device
        try:
            writer = TraceWriter(
                name,
                device.topology,
                features=device.driver_features,
                max_bytes=max_bytes,
                keep=keep,
                directory=directory,
                write_through=self.trace_hook is not None,
            )
        except FileExistsError:
            raise ControlError(BAD_ARGUMENT, f"name: {name} exists in the trace directory") from None
        except OSError as exc:
            raise ControlError(BAD_ARGUMENT, f"name: {name}: {exc.strerror or exc}") from None
        if device.domains() or any(info.domain is not None for info in device.endpoints()):
            # Replay starts from a fresh device: a trace started mid-session says so in its first event.
            note = "started on a device with domains: a replay from a fresh device will differ"
        else:
            note = ""
        self._set_trace(tools, writer)
        return {"path": str(writer.path), "max_bytes": max_bytes, "keep": keep, "note": note}

    def trace_stop(self, arguments: Arguments) -> object:
        _backend, tools = self._backend(arguments)
        writer = self._set_trace(tools, None)
        if writer is None:
            raise ControlError(UNAVAILABLE, "no trace is recording on this connection")
        return {"path": str(writer.path), "records": writer.records, "parts": writer.parts}

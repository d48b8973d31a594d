"""What the control layer installs on each back-end it serves: timing, added latency, device observers.

The request path belongs to the device; the control layer only uses the hooks the back-end and its device
offer, on one back-end instance at a time (other back-ends and the tests of the device are untouched):

- ``backend.kick_timing``: the back-end times each requestq batch, on its kick thread (the kick loop's
  integer histograms, `vhost_iommu.jit.kickloop`'s ``timing``) and on the event loop alike, and hands the
  samples over on the event loop (whenever the thread is parked, hands a chain over or stops, and after
  each batch the loop serves). A batch's time is attributed to a request type when every request of the
  batch had that type; a batch of several types is counted as MIXED. The Linux driver sends ATTACH,
  DETACH and PROBE one per notification and waits, so those are exact; MAP/UNMAP batches are per request
  on average.
- ``backend.request_delay``: added latency, per batch (``delay``: the first request of a batch is held
  that long) or per request of a type (``delay --type``: each such request is held that long). The
  back-end holds the chain off the ring (``loop.call_later``: the event loop never blocks), serves it and
  what follows when the time has passed, in ring order, through its one serve loop (which journals under
  ``--state-dir``).
- ``device.observers`` (`vhost_iommu.device.observers.DeviceObserver`), only while a conformance checker
  or a trace is on: the checker sees each request before the device applies it, the trace records each
  request with its answer, features, config writes, resets and the tools' own changes. Forced answers
  (count and rate) are the device's own (``IommuDevice.inject``, ``inject_rate``).

While an added latency or an observer is on, the back-end's kernel steps aside (``kernel_serves``) and
every request goes through the device core on the event loop; the kick thread, if one serves, only hands
each kick over.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from vhost_iommu.conformance import ConformanceChecker
from vhost_iommu.device import RequestType, ReservedRegion
from vhost_iommu.device.observers import DeviceObserver
from vhost_iommu.jit import kickloop
from vhost_iommu.trace import TraceWriter

if TYPE_CHECKING:
    from vhost_iommu.device.translation import Fault
    from vhost_iommu.virtio_iommu import VirtioIommuBackend

log = logging.getLogger(__name__)

#: Counter slots of IommuDevice.request_counts: 0 counts unserved requests, then one per RequestType.
COUNTER_NAMES = ["UNSERVED", *(kind.name for kind in RequestType)]
HISTOGRAM_BUCKETS = 40  # bucket k holds [2**k, 2**(k+1)) ns; 2**40 ns is about 18 minutes
# The kick loop keeps the same histograms (same buckets, one row per counter slot, then MIXED, then batches).
assert HISTOGRAM_BUCKETS == kickloop.TIMING_BUCKETS
assert len(COUNTER_NAMES) == kickloop.TIMING_KINDS == kickloop.T_MIXED  # MIXED: the row after the slots


@dataclass
class Histogram:
    """Log2 buckets of nanosecond durations; cheap to update on the request path's thread."""

    buckets: list[int] = field(default_factory=lambda: [0] * HISTOGRAM_BUCKETS)
    count: int = 0
    total_ns: int = 0
    min_ns: int = 0
    max_ns: int = 0

    def add(self, ns: int, weight: int = 1) -> None:
        bucket = ns.bit_length() - 1
        if bucket < 0:
            bucket = 0
        elif bucket >= HISTOGRAM_BUCKETS:
            bucket = HISTOGRAM_BUCKETS - 1
        self.buckets[bucket] += weight
        if self.count == 0 or ns < self.min_ns:
            self.min_ns = ns
        if ns > self.max_ns:
            self.max_ns = ns
        self.count += weight
        self.total_ns += ns * weight

    def absorb(self, row: npt.NDArray[np.int64]) -> None:
        """Add the samples of one row of the kick loop's ``timing`` array (``kickloop.T_*`` columns)."""
        count = int(row[kickloop.T_COUNT])
        if not count:
            return
        self.buckets = [a + b for a, b in zip(self.buckets, row[:HISTOGRAM_BUCKETS].tolist(), strict=True)]
        low, high = int(row[kickloop.T_MIN_NS]), int(row[kickloop.T_MAX_NS])
        if self.count == 0 or low < self.min_ns:
            self.min_ns = low
        if high > self.max_ns:
            self.max_ns = high
        self.count += count
        self.total_ns += int(row[kickloop.T_TOTAL_NS])

    def percentile_us(self, fraction: float) -> float:
        """Upper bound (µs) of the bucket holding the given fraction of samples."""
        wanted = max(1, round(self.count * fraction))
        seen = 0
        for bucket, count in enumerate(self.buckets):
            seen += count
            if seen >= wanted:
                return (1 << (bucket + 1)) / 1000
        return 0.0

    def summary(self) -> dict[str, object]:
        return {
            "count": self.count,
            "mean_us": round(self.total_ns / self.count / 1000, 3) if self.count else 0.0,
            "min_us": round(self.min_ns / 1000, 3),
            "max_us": round(self.max_ns / 1000, 3),
            "p50_us": self.percentile_us(0.5),
            "p99_us": self.percentile_us(0.99),
            # Only the buckets that hold samples: [upper bound in µs, count].
            "buckets": [
                [(1 << (bucket + 1)) / 1000, count] for bucket, count in enumerate(self.buckets) if count
            ],
        }


class _ToolsObserver(DeviceObserver):
    """The device's observer for one ConnectionTools: forwards to its checker and trace. It holds the
    tools weakly: the device holds it, and the tools hold (through the checker) the device."""

    def __init__(self, tools: ConnectionTools) -> None:
        self._tools = weakref.ref(tools)

    def request(self, request: bytes | memoryview, writable_size: int) -> None:
        tools = self._tools()
        if tools is not None and tools.checker is not None:
            tools.checker.check_request(request, writable_size)

    def response(
        self,
        request: bytes | memoryview,
        writable_size: int,
        response: bytes,
        used: int,
        *,
        forced: bool,
        ns: int,
    ) -> None:
        tools = self._tools()
        if tools is not None and tools.trace is not None:
            tools.trace.request(bytes(request), writable_size, response, used, forced=forced, ns=ns)

    def batch_served(self) -> None:
        tools = self._tools()
        if tools is not None and tools.trace is not None:
            tools.trace.flush()  # one write per batch, not per request

    def features(self, acked: int) -> None:
        tools = self._tools()
        if tools is None:
            return
        if tools.checker is not None:
            tools.checker.check_features(acked)
        if tools.trace is not None:
            tools.trace.features(acked)

    def config_write(self, offset: int, data: bytes) -> None:
        tools = self._tools()
        if tools is None:
            return
        if tools.checker is not None:
            tools.checker.check_config_write(offset, data)
        if tools.trace is not None:
            tools.trace.config(offset, data)

    def reset(self) -> None:
        tools = self._tools()
        if tools is None:
            return
        if tools.checker is not None:
            tools.checker.device_reset()
        if tools.trace is not None:
            tools.trace.reset()

    def bypass(self, value: int) -> None:
        tools = self._tools()
        if tools is not None and tools.trace is not None:
            tools.trace.bypass(value)

    def reserved_regions(self, endpoint: int | None, regions: tuple[ReservedRegion, ...] | None) -> None:
        tools = self._tools()
        if tools is not None and tools.trace is not None:
            tools.trace.reserved_regions(endpoint, regions)

    def fault(self, fault: Fault) -> None:
        tools = self._tools()
        if tools is not None and tools.trace is not None:
            tools.trace.fault(fault)


class ConnectionTools:
    """The control layer's per-back-end state and the hooks it installed.

    The back-end holds its tools (through its ``kick_timing`` and ``request_delay`` hooks); the tools hold
    the back-end weakly. A cycle would keep a disconnected back-end, and the guest-memory mappings its
    request path holds, alive until the garbage collector happens to run.
    """

    def __init__(self, number: int, backend: VirtioIommuBackend, loop: asyncio.AbstractEventLoop) -> None:
        self.number = number
        self._backend = weakref.ref(backend)
        self.loop = loop
        self.created = time.time()
        # One per request counter slot, then MIXED.
        self._histograms = [Histogram() for _ in range(len(COUNTER_NAMES) + 1)]
        self.batches = Histogram()
        self.delay_us = 0
        self.delayed_batches = 0
        #: Added latency per request of a type (RequestType value -> microseconds).
        self.type_delays: dict[int, int] = {}
        self.delayed_requests = 0
        self.checker: ConformanceChecker | None = None
        self.trace: TraceWriter | None = None
        self._observer = _ToolsObserver(self)
        backend.kick_timing = self._absorb_kick_timing

    @property
    def live_backend(self) -> VirtioIommuBackend | None:
        """The back-end, or None once it is gone."""
        return self._backend()

    @property
    def backend(self) -> VirtioIommuBackend:
        backend = self._backend()
        if backend is None:  # only reachable through a back-end, so never while one is served
            raise RuntimeError("the back-end of these tools is gone")
        return backend

    def _absorb_kick_timing(self, timing: npt.NDArray[np.int64]) -> None:
        for kind, histogram in enumerate(self._histograms):
            histogram.absorb(timing[kind])
        self.batches.absorb(timing[kickloop.T_BATCHES])

    # -- added latency -------------------------------------------------------------------------------

    def _delay_for(self, request_type: int, starts_batch: bool) -> int:
        """The back-end's ``request_delay`` hook: microseconds to hold a request before it is served."""
        hold = 0
        if starts_batch and self.delay_us:
            self.delayed_batches += 1
            hold = self.delay_us
        by_type = self.type_delays.get(request_type, 0)
        if by_type:
            self.delayed_requests += 1
            hold += by_type
        return hold

    @property
    def latency(self) -> dict[str, Histogram]:
        """The per-type histograms that hold samples, by name (MIXED: batches of several types)."""
        names = [*COUNTER_NAMES, "MIXED"]
        return {names[kind]: histogram for kind, histogram in enumerate(self._histograms) if histogram.count}

    def set_delay(self, microseconds: int, request_type: RequestType | None = None) -> None:
        """Added latency per requestq batch, or per request of ``request_type``; 0 takes it off. Inside
        the back-end's ``quiesced()`` (every control command is)."""
        if request_type is None:
            self.delay_us = microseconds
        elif microseconds:
            self.type_delays[int(request_type)] = microseconds
        else:
            self.type_delays.pop(int(request_type), None)
        backend = self.backend
        backend.request_delay = self._delay_for if self.delay_us or self.type_delays else None
        if not microseconds:
            # What was held is served now rather than after the old delay (once the command answered).
            self.loop.call_soon(backend.release_held)

    def clear_delays(self) -> None:
        self.type_delays.clear()
        self.set_delay(0)

    def reset_latency(self) -> None:
        self._histograms = [Histogram() for _ in range(len(COUNTER_NAMES) + 1)]
        self.batches = Histogram()

    # -- the device observer: conformance checks, traces -------------------------------------------------

    def set_checker(self, checker: ConformanceChecker | None) -> None:
        self.checker = checker
        self._observe()

    def set_trace(self, trace: TraceWriter | None) -> TraceWriter | None:
        """Start (or with None stop) recording; returns the writer that was recording, closed."""
        previous = self.trace
        self.trace = trace
        self._observe()
        if previous is not None:
            previous.close()
        return previous

    def _observe(self) -> None:
        """The observer is on the device while a checker or a trace needs it, and only then: while it
        is, the back-end serves every request through the (slower) Python path."""
        observers = self.backend.device.observers
        wanted = self.checker is not None or self.trace is not None
        present = self._observer in observers
        if wanted and not present:
            observers.append(self._observer)
        elif present and not wanted:
            observers.remove(self._observer)

    def close(self) -> None:
        if self.trace is not None:
            self.trace.close()
        backend = self._backend()
        if backend is not None:
            backend.request_delay = None
            backend.kick_timing = None

"""What the control layer installs on each back-end it serves: timing, added latency, device observers.

The request path belongs to the device; the control layer wraps one public entry point of one back-end
instance (never the class, so other back-ends and the tests of the device are untouched) and attaches
one observer to its device:

- ``backend.queue_kicked``, only while the event loop serves the requestq: each requestq kick batch is
  timed (about 2.5 us of Python per kick, measured), and can be deferred by an added latency
  (``loop.call_later``, so the event loop never blocks): per batch (``delay``), or per request of a type
  (``delay --type``: the chains are then served one by one through the device core, and before each
  chain of a delayed type the ring waits that long). A batch's time is attributed to a request type
  when every request of the batch had that type (the device's request counters before and after tell);
  a batch of several types is counted as MIXED. The Linux driver sends ATTACH, DETACH and PROBE one per
  notification and waits, so those are exact; MAP/UNMAP batches are per request on average.
- ``backend.kick_timing``: while the back-end's requestq thread serves (no added latency, no checker,
  no trace: nothing needs every kick in Python), ``queue_kicked`` is not wrapped and the thread's kick
  loop times each batch itself, with the same rule, into integer histograms
  (`vhost_iommu.jit.kickloop`'s ``timing``) that the back-end hands over whenever the thread is parked
  (every control command parks it), hands a chain to the event loop, or stops. Setting an added latency
  or an observer wraps ``queue_kicked`` and has the server take the kick fd back from the thread
  (``kick_path_changed``); clearing them unwraps it and the thread serves again.
- ``device.observers`` (`vhost_iommu.device.observers.DeviceObserver`), only while a conformance checker
  or a trace is on: the checker sees each request before the device applies it, the trace records each
  request with its answer, features, config writes, resets and the tools' own changes. Forced answers
  (count and rate) are the device's own (``IommuDevice.inject``, ``inject_rate``).
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from dataclasses import dataclass, field
from time import perf_counter_ns
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from vhost_iommu.abi import REQUEST_QUEUE
from vhost_iommu.conformance import ConformanceChecker
from vhost_iommu.device import RequestType, ReservedRegion
from vhost_iommu.device.observers import DeviceObserver
from vhost_iommu.jit import kickloop
from vhost_iommu.memory import GuestMemoryError
from vhost_iommu.trace import TraceWriter
from vhost_iommu.virtqueue import QueueError

if TYPE_CHECKING:
    from vhost_iommu.virtio_iommu import VirtioIommuBackend
    from vhost_iommu.virtqueue import DescriptorChain, SplitQueue

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


class ConnectionTools:
    """The control layer's per-back-end state and the wrappers it installed.

    The back-end holds its tools (through ``kick_timing`` and the wrapper); the tools hold the back-end
    weakly. A cycle would keep a disconnected back-end, and the guest-memory mappings its request path
    holds, alive until the garbage collector happens to run.
    """

    def __init__(self, number: int, backend: VirtioIommuBackend, loop: asyncio.AbstractEventLoop) -> None:
        self.number = number
        self._backend = weakref.ref(backend)
        self.loop = loop
        self.created = time.time()
        # One per request counter slot, then MIXED; a list, not a dict, to keep the per-kick work small.
        self._histograms = [Histogram() for _ in range(len(COUNTER_NAMES) + 1)]
        self.batches = Histogram()
        self.delay_us = 0
        self.delayed_batches = 0
        #: Added latency per request of a type (RequestType value -> microseconds).
        self.type_delays: dict[int, int] = {}
        self.delayed_requests = 0
        self._deferred: asyncio.TimerHandle | None = None
        # A chain of a delayed type, taken off the ring, waiting for its delay (with the ring it is on).
        self._held: tuple[DescriptorChain, SplitQueue] | None = None
        self.checker: ConformanceChecker | None = None
        self.trace: TraceWriter | None = None
        self._observer = _ToolsObserver(self)
        self._kicked = type(backend).queue_kicked
        backend.kick_timing = self._absorb_kick_timing
        # Wrapped until the first kick (queue_started's): the service may yet give these tools a checker or
        # a trace (serve --conformance, --trace) outside any command. A wrapped kick with nothing needing
        # it schedules the switch to the thread (sync_kick_path).
        self._wrapped = False
        self._sync_scheduled = False
        self._wrap(backend)

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

    # -- which path serves: the kick thread, or the event loop through the wrapper ---------------------------

    def _wrap(self, backend: VirtioIommuBackend) -> None:
        # An instance attribute shadows the method for this back-end only; the server looks the method
        # up at each kick, and queue_started calls it through self too.
        backend.queue_kicked = self._on_kick  # type: ignore[method-assign]
        self._wrapped = True

    def _needs_every_kick(self, backend: VirtioIommuBackend) -> bool:
        """Whether the requestq must be served from the event loop through the wrapper: an added latency
        (set, or a batch or chain still held), an observer (a checker or a trace: the device serves
        every request in Python then, and a trace is flushed per batch), or a back-end that would serve
        from the event loop anyway (whose kicks only the wrapper can time)."""
        return (
            bool(self.delay_us or self.type_delays)
            or self._deferred is not None
            or self._held is not None
            or self.checker is not None
            or self.trace is not None
            or not backend.kick_thread_wanted()
        )

    def sync_kick_path(self) -> None:
        """Wrap ``queue_kicked`` if every kick is needed in Python, unwrap it if not, and when that changes
        have the server move the kick fd (to the event loop, or to a new kick thread). On the event loop,
        outside ``quiesced()``: the control service calls it after every command."""
        self._sync_scheduled = False
        backend = self._backend()
        if backend is None:
            return
        wanted = self._needs_every_kick(backend)
        if wanted == self._wrapped:
            return
        if wanted:
            self._wrap(backend)
        else:
            if vars(backend).get("queue_kicked") == self._on_kick:
                del backend.queue_kicked
            self._wrapped = False
        backend.kick_path_changed()

    def _absorb_kick_timing(self, timing: npt.NDArray[np.int64]) -> None:
        for kind, histogram in enumerate(self._histograms):
            histogram.absorb(timing[kind])
        self.batches.absorb(timing[kickloop.T_BATCHES])

    # -- timing and added latency ---------------------------------------------------------------------------

    def _on_kick(self, index: int) -> None:
        if index == REQUEST_QUEUE and not self._sync_scheduled:
            backend = self._backend()
            if backend is not None and not self._needs_every_kick(backend):
                # Not from inside the kick: the switch takes the kick fd back and offers it again.
                self._sync_scheduled = True
                self.loop.call_soon(self.sync_kick_path)
        if index == REQUEST_QUEUE and self._deferred is not None:
            return  # a held batch or chain: its release serves whatever came meanwhile, in order
        if index == REQUEST_QUEUE and self.delay_us and self._has_requests():
            self.delayed_batches += 1
            self._deferred = self.loop.call_later(self.delay_us / 1e6, self._release)
            return
        self._serve(index)

    def _has_requests(self) -> bool:
        """Whether the requestq holds a chain to serve: a kick with none (one replayed when the ring
        moved from the kick thread to the event loop) starts no delayed batch."""
        backend = self._backend()
        context = backend.context if backend is not None else None
        ring = context.queue(REQUEST_QUEUE) if context is not None else None
        return ring is not None and ring.has_available()

    def _release(self) -> None:
        self._deferred = None
        backend = self._backend()
        context = backend.context if backend is not None else None
        if context is None or getattr(context, "closed", False):
            self._held = None
            return  # the connection ended while the batch waited
        try:
            self._serve(REQUEST_QUEUE)
        except Exception as exc:  # the server's own kick path would have marked the device broken
            log.exception("delayed requestq batch failed")
            context.device_broken(f"requestq (delayed batch): {exc}")
        self.sync_kick_path()  # the last held chain of a delay taken off: the thread may serve again

    def _serve(self, index: int) -> None:
        backend = self._backend()
        if backend is None:
            return
        if index != REQUEST_QUEUE:
            self._kicked(backend, index)
            return
        counts = backend.device.request_counts
        before = counts.copy()
        started = perf_counter_ns()
        if self.type_delays or self._held is not None:
            self._serve_one_by_one(backend)
            backend.deliver_events()
        else:
            self._kicked(backend, index)
        elapsed = perf_counter_ns() - started
        if self.trace is not None:
            # One write per batch, not per request; a reader of a live trace sees whole batches.
            self.trace.flush()
        # Cheap on purpose (this runs once per kick of every guest): one pass over six counters.
        kind = -1
        total = 0
        for slot in range(len(counts)):
            served = counts[slot] - before[slot]
            if served:
                kind = slot if total == 0 else len(COUNTER_NAMES)  # a second type: MIXED
                total += served
        if total:
            self.batches.add(elapsed)
            self._histograms[kind].add(elapsed // total, total)

    def _serve_one_by_one(self, backend: VirtioIommuBackend) -> None:
        """Serve the requestq chain by chain through the device core; stop before a chain of a delayed
        type (taken off the ring and held) and serve it, then the rest, when its delay has passed. Later
        chains wait behind it, so the device still answers in ring order."""
        context = backend.context
        ring = context.queue(REQUEST_QUEUE) if context is not None else None
        held, self._held = self._held, None
        if held is not None and held[1] is not ring:
            held = None  # the ring was stopped or restarted meanwhile: the chain went with it
        if ring is None or context is None:
            return
        device = backend.device
        served = 0
        try:
            while served < ring.size:
                if held is not None:
                    chain = held[0]
                    request = chain.read()
                    held = None
                else:
                    popped = ring.pop()
                    if popped is None:
                        break
                    chain = popped
                    request = chain.read()
                    delay = self.type_delays.get(request[0], 0) if request else 0
                    if delay:
                        self._held = (chain, ring)
                        self.delayed_requests += 1
                        self._deferred = self.loop.call_later(delay / 1e6, self._release)
                        break
                response, used = device.handle_request(request, chain.writable_len)
                if response:
                    chain.write(response)
                ring.push_used(chain.head, used)
                served += 1
            else:
                context.reschedule(REQUEST_QUEUE)  # a ring's worth at a time, as the back-end does
        except (QueueError, GuestMemoryError) as exc:  # a broken ring, as the back-end's own path says
            context.device_broken(f"requestq: {exc}")
            return
        if served and ring.needs_notification():
            context.signal_used(REQUEST_QUEUE)

    @property
    def latency(self) -> dict[str, Histogram]:
        """The per-type histograms that hold samples, by name (MIXED: batches of several types)."""
        names = [*COUNTER_NAMES, "MIXED"]
        return {names[kind]: histogram for kind, histogram in enumerate(self._histograms) if histogram.count}

    def set_delay(self, microseconds: int, request_type: RequestType | None = None) -> None:
        """Added latency per requestq batch, or per request of ``request_type``; 0 takes it off."""
        if request_type is None:
            self.delay_us = microseconds
        elif microseconds:
            self.type_delays[int(request_type)] = microseconds
        else:
            self.type_delays.pop(int(request_type), None)
        if not microseconds and self._deferred is not None:
            # Serve what was held now rather than after the old delay.
            self._deferred.cancel()
            self._deferred = None
            self.loop.call_soon(self._release)

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
        if self._deferred is not None:
            self._deferred.cancel()
            self._deferred = None

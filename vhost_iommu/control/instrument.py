"""What the control layer installs on each back-end it serves: timing, added latency, rate injection.

The request path belongs to the device; the control layer only wraps two public entry points of one
back-end instance (never the class, so other back-ends and the tests of the device are untouched):

- ``backend.queue_kicked``: each requestq kick batch is timed (about 2.5 us of Python per kick, measured),
  and can be deferred by an added latency
  (``loop.call_later``, so the event loop never blocks). A batch's time is attributed to a request type
  when every request of the batch had that type (the device's request counters before and after tell);
  a batch of several types is counted as MIXED. The Linux driver sends ATTACH, DETACH and PROBE one per
  notification and waits, so those are exact; MAP/UNMAP batches are per request on average.
- ``device.handle_request``, only while a rate injection, a conformance checker or a trace is on: before
  each request of the chosen type a seeded draw decides whether the device's own
  ``inject(type, status, times=1)`` answers it; the checker sees each request before the device applies
  it; the trace records each request with its answer (``set_features``, ``set_config`` and ``reset``
  are wrapped too for those two).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import weakref
from dataclasses import dataclass, field
from time import perf_counter_ns
from typing import TYPE_CHECKING

from vhost_iommu.conformance import ConformanceChecker
from vhost_iommu.device import RequestType, Status, Topology
from vhost_iommu.trace import TraceWriter

if TYPE_CHECKING:
    from vhost_iommu.virtio_iommu import VirtioIommuBackend

log = logging.getLogger(__name__)

REQUEST_QUEUE = 0
#: Counter slots of IommuDevice.request_counts: 0 counts unserved requests, then one per RequestType.
COUNTER_NAMES = ["UNSERVED", *(kind.name for kind in RequestType)]
HISTOGRAM_BUCKETS = 40  # bucket k holds [2**k, 2**(k+1)) ns; 2**40 ns is about 18 minutes


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


@dataclass
class RateInjection:
    request_type: RequestType
    status: Status | None
    rate: float
    seed: int
    rng: random.Random
    forced: int = 0
    seen: int = 0


class ConnectionTools:
    """The control layer's per-back-end state and the wrappers it installed.

    The back-end holds its tools (through the wrapper); the tools hold the back-end weakly. A cycle
    would keep a disconnected back-end, and the guest-memory mappings its request path holds, alive
    until the garbage collector happens to run.
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
        self._deferred: asyncio.TimerHandle | None = None
        self.rate: RateInjection | None = None
        self.checker: ConformanceChecker | None = None
        self.trace: TraceWriter | None = None
        self.original_topology: Topology = backend.device.topology
        self._kicked = type(backend).queue_kicked
        # An instance attribute shadows the method for this back-end only; the server looks the method
        # up at each kick, and queue_started calls it through self too.
        backend.queue_kicked = self._on_kick  # type: ignore[method-assign]

    @property
    def backend(self) -> VirtioIommuBackend:
        backend = self._backend()
        if backend is None:  # only reachable through a back-end, so never while one is served
            raise RuntimeError("the back-end of these tools is gone")
        return backend

    # -- timing and added latency ---------------------------------------------------------------------------

    def _on_kick(self, index: int) -> None:
        if index == REQUEST_QUEUE and self.delay_us:
            if self._deferred is None:
                self.delayed_batches += 1
                self._deferred = self.loop.call_later(self.delay_us / 1e6, self._release)
            return
        self._serve(index)

    def _release(self) -> None:
        self._deferred = None
        backend = self._backend()
        context = backend.context if backend is not None else None
        if context is None or getattr(context, "closed", False):
            return  # the connection ended while the batch waited
        try:
            self._serve(REQUEST_QUEUE)
        except Exception as exc:  # the server's own kick path would have marked the device broken
            log.exception("delayed requestq batch failed")
            context.device_broken(f"requestq (delayed batch): {exc}")

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

    @property
    def latency(self) -> dict[str, Histogram]:
        """The per-type histograms that hold samples, by name (MIXED: batches of several types)."""
        names = [*COUNTER_NAMES, "MIXED"]
        return {names[kind]: histogram for kind, histogram in enumerate(self._histograms) if histogram.count}

    def set_delay(self, microseconds: int) -> None:
        self.delay_us = microseconds
        if not microseconds and self._deferred is not None:
            # Serve what was held now rather than after the old delay.
            self._deferred.cancel()
            self._deferred = None
            self.loop.call_soon(self._release)

    def reset_latency(self) -> None:
        self._histograms = [Histogram() for _ in range(len(COUNTER_NAMES) + 1)]
        self.batches = Histogram()

    # -- the request hook: rate injection, conformance checks, traces ---------------------------------------

    def set_rate(self, rate: RateInjection | None) -> None:
        self.rate = rate
        self._install_hooks()

    def set_checker(self, checker: ConformanceChecker | None) -> None:
        self.checker = checker
        self._install_hooks()

    def set_trace(self, trace: TraceWriter | None) -> TraceWriter | None:
        """Start (or with None stop) recording; returns the writer that was recording, closed."""
        previous = self.trace
        self.trace = trace
        self._install_hooks()
        if previous is not None:
            previous.close()
        return previous

    def _install_hooks(self) -> None:
        """Wrap the device's public entry points on this instance while any tool needs them.

        Workaround until the device core offers per-request hooks itself: the wrappers are instance
        attributes shadowing ``IommuDevice.handle_request`` (and ``set_features``, ``set_config``,
        ``reset`` for the checker and the trace). A wrapped ``handle_request`` also makes the back-end's
        compiled request path step aside (``CompiledRequestPath.usable``), so every request takes the
        Python path, which is slower.
        """
        device = self.backend.device
        attributes = vars(device)
        for name in ("handle_request", "set_features", "set_config", "reset"):
            attributes.pop(name, None)
        if self.rate is None and self.checker is None and self.trace is None:
            return
        cls = type(device)
        weak_device = weakref.ref(device)  # the device holds these wrappers: no cycle back to it
        tools = self
        original_request = cls.handle_request

        def handle_request(request: bytes | memoryview, writable_size: int) -> tuple[bytes, int]:
            target = weak_device()
            assert target is not None  # called by the device's owner, through the device
            if tools.checker is not None:
                tools.checker.check_request(request, writable_size)
            rate = tools.rate
            if rate is not None and len(request) and request[0] == int(rate.request_type):
                rate.seen += 1
                if rate.rng.random() < rate.rate:
                    rate.forced += 1
                    target.inject(rate.request_type, rate.status, times=1)
            trace = tools.trace
            if trace is None:
                answer: tuple[bytes, int] = original_request(target, request, writable_size)
                return answer
            injected = target.injected_count
            started = perf_counter_ns()
            answer = original_request(target, request, writable_size)
            elapsed = perf_counter_ns() - started
            response, used = answer
            trace.request(
                bytes(request),
                writable_size,
                response,
                used,
                forced=target.injected_count != injected,
                ns=elapsed,
            )
            return answer

        device.handle_request = handle_request  # type: ignore[method-assign]
        if self.checker is None and self.trace is None:
            return
        original_features, original_config, original_reset = cls.set_features, cls.set_config, cls.reset

        def set_features(acked: int) -> None:
            target = weak_device()
            assert target is not None
            original_features(target, acked)
            if tools.checker is not None:
                tools.checker.check_features(acked)
            if tools.trace is not None:
                tools.trace.features(acked)

        def set_config(offset: int, data: bytes) -> None:
            target = weak_device()
            assert target is not None
            if tools.checker is not None:
                tools.checker.check_config_write(offset, bytes(data))
            if tools.trace is not None:
                tools.trace.config(offset, bytes(data))
            original_config(target, offset, data)

        def reset() -> None:
            target = weak_device()
            assert target is not None
            original_reset(target)
            if tools.checker is not None:
                tools.checker.device_reset()
            if tools.trace is not None:
                tools.trace.reset()

        device.set_features = set_features  # type: ignore[method-assign]
        device.set_config = set_config  # type: ignore[method-assign]
        device.reset = reset  # type: ignore[method-assign]

    def close(self) -> None:
        if self.trace is not None:
            self.trace.close()
        if self._deferred is not None:
            self._deferred.cancel()
            self._deferred = None

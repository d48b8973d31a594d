"""What the control layer installs on each back-end it serves: timing, added latency, rate injection.

The request path belongs to the device; the control layer only wraps two public entry points of one
back-end instance (never the class, so other back-ends and the tests of the device are untouched):

- ``backend.queue_kicked``: each requestq kick batch is timed (about 2.5 us of Python per kick, measured),
  and can be deferred by an added latency
  (``loop.call_later``, so the event loop never blocks). A batch's time is attributed to a request type
  when every request of the batch had that type (the device's request counters before and after tell);
  a batch of several types is counted as MIXED. The Linux driver sends ATTACH, DETACH and PROBE one per
  notification and waits, so those are exact; MAP/UNMAP batches are per request on average.
- ``device.handle_request``, only while a rate injection is on: before each request of the chosen type a
  seeded draw decides whether the device's own ``inject(type, status, times=1)`` answers it.
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

from vhost_iommu.device import RequestType, Status, Topology

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

    # -- rate injection -------------------------------------------------------------------------------------

    def set_rate(self, rate: RateInjection | None) -> None:
        backend = self.backend
        device = backend.device
        self.rate = rate
        compiled = getattr(backend, "_compiled", None)
        if rate is None:
            vars(device).pop("handle_request", None)
            if compiled is not None:
                vars(compiled).pop("usable", None)
            return
        if compiled is not None:
            # Workaround until the device core offers rate injections itself: the compiled request path
            # serves MAP/UNMAP without calling handle_request, so while a rate is on every request takes
            # the Python path (the way the back-end already does while count injections are pending).
            compiled.usable = lambda: False
        original = type(device).handle_request
        chosen = int(rate.request_type)
        weak_device = weakref.ref(device)  # the device holds this wrapper: no cycle back to it

        def handle_request(request: bytes | memoryview, writable_size: int) -> tuple[bytes, int]:
            target = weak_device()
            assert target is not None  # called by the device's owner, through the device
            if len(request) and request[0] == chosen:
                rate.seen += 1
                if rate.rng.random() < rate.rate:
                    rate.forced += 1
                    target.inject(rate.request_type, rate.status, times=1)
            answer: tuple[bytes, int] = original(target, request, writable_size)
            return answer

        device.handle_request = handle_request  # type: ignore[method-assign]

    def close(self) -> None:
        if self._deferred is not None:
            self._deferred.cancel()
            self._deferred = None

"""The virtio-iommu device behind the vhost-user seam.

`VirtioIommuBackend` implements :class:`vhost_iommu.backend.VhostUserBackend` by walking the requestq and
eventq rings into the sans-I/O device core (`vhost_iommu.device.IommuDevice`). It owns no sockets and no fds;
the server lends it the rings and a way to signal the front-end.

By default the requestq goes through `CompiledRequestPath`: one numba kernel
(`vhost_iommu.jit.requests.serve_requests`) walks, validates and serves every available MAP and UNMAP,
and hands any other chain (ATTACH, DETACH, PROBE, anything odd, a broken ring) to the Python path one at a
time. docs/performance.md describes it and its measurements.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import platform
import select
import sys
import threading
import time
from collections.abc import Callable
from typing import Literal

import numpy as np
import numpy.typing as npt

from vhost_iommu.backend import BackendContext
from vhost_iommu.device import IommuDevice, Topology, snapshot
from vhost_iommu.device.layout import F_MAP_UNMAP, F_MMIO
from vhost_iommu.jit import requests as kernel
from vhost_iommu.jit.tables import MappingTable
from vhost_iommu.memory import FlatRegions, GuestMemory, GuestMemoryError
from vhost_iommu.virtqueue import QueueError, SplitQueue

log = logging.getLogger(__name__)

REQUEST_QUEUE = 0
EVENT_QUEUE = 1

VIRTIO_F_VERSION_1 = 1 << 32
VIRTIO_RING_F_INDIRECT_DESC = 1 << 28
VIRTIO_RING_F_EVENT_IDX = 1 << 29
RING_FEATURES = VIRTIO_RING_F_INDIRECT_DESC | VIRTIO_RING_F_EVENT_IDX
FAULT_EVENT_SIZE = 24  # struct virtio_iommu_fault


_WEAK_ORDER = platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686")
# Module constants rather than attribute lookups on every kick; the three words are adjacent.
_R_NEXT_AVAIL = kernel.R_NEXT_AVAIL
_R_USED_IDX = kernel.R_USED_IDX
_R_COMPLETED = kernel.R_COMPLETED
_R_BUDGET = kernel.R_BUDGET
assert (_R_USED_IDX, _R_COMPLETED) == (_R_NEXT_AVAIL + 1, _R_NEXT_AVAIL + 2)
_MAX_GROWTHS = 3


MAX_POLL_US = 10_000.0
POLL_LIMIT_US = 2000.0
"""Longest one kick may keep polling in total (the event loop, sockets included, waits meanwhile), or
twice the poll window if that is longer."""


@functools.cache
def _ticks_per_us() -> float:
    """Cycle-counter ticks per microsecond, measured once over 5 ms."""
    wall, ticks = time.perf_counter_ns(), int(kernel.cycles())
    time.sleep(0.005)
    return (int(kernel.cycles()) - ticks) / ((time.perf_counter_ns() - wall) / 1000)


class CompiledRequestPath:
    """Serves the requestq with `vhost_iommu.jit.requests.serve_requests`, handing the chains the kernel
    does not serve to a Python callback one at a time.

    The kernel works on raw addresses of the ring views and of guest memory; this class takes them from
    the live numpy views and holds those views (through the ring and `FlatRegions`) for as long as it
    uses the addresses. The ring's indices live in the `SplitQueue` between calls and in the kernel's
    parameter array during one.

    It relies on this back-end completing every chain before it returns (no chain stays in flight), so
    the SplitQueue's in-flight bookkeeping has nothing to check across kernel calls.
    """

    def __init__(self, device: IommuDevice, *, poll_us: float = 0.0) -> None:
        if not 0 <= poll_us <= MAX_POLL_US:
            raise ValueError(f"poll_us {poll_us} is outside 0..{MAX_POLL_US}")
        self.device = device
        self._ring_params = np.zeros(kernel.RING_WORDS, np.uint64)
        if poll_us:
            ticks_per_us = _ticks_per_us()
            self._ring_params[kernel.R_POLL_TICKS] = int(poll_us * ticks_per_us)
            self._ring_params[kernel.R_POLL_LIMIT_TICKS] = int(max(POLL_LIMIT_US, 2 * poll_us) * ticks_per_us)
        self._counts = np.zeros(kernel.COUNT_WORDS, np.int64)
        # What the parameter words were last derived from: the ring, its views (re-derived on a memory
        # change), the acked features and whether kicks are wanted. Compared by identity and value on
        # every kick: cheaper than rewriting the words.
        self._ring: SplitQueue | None = None
        self._views: tuple[object, object, object] = (None, None, None)
        self._features = -1
        self._notify = False
        self._memory: GuestMemory | None = None
        self._memory_generation = -1
        self._memory_table: npt.NDArray[np.uint64] = np.zeros((0, 3), np.uint64)
        self._memory_flat: FlatRegions | None = None
        #: How many times the kernel stopped for each reason (STOP_* codes): for tests and benchmarks.
        self.stops = [0] * len(kernel.STOP_NAMES)

    def usable(self) -> bool:
        """The kernel serves what the Python path would: the real table, no injected answers (rare,
        tool-driven states the device core keeps in Python), and no observer on the device (tools such as
        the control layer watch every request through ``IommuDevice.observers``)."""
        device = self.device
        return isinstance(device.store, MappingTable) and not device.has_injections and not device.observers

    def _bind(self, ring: SplitQueue, memory: GuestMemory) -> None:
        # SplitQueue keeps its ring views private; they are re-derived on a memory change (rebind).
        desc, avail, used = ring._desc_table, ring._avail16, ring._used16
        device = self.device
        if memory is not self._memory or memory.generation != self._memory_generation:
            flat = memory.flat_tables()
            table = np.empty((len(flat.gpa_starts), 3), np.uint64)
            table[:, kernel.M_GPA_START] = flat.gpa_starts
            table[:, kernel.M_GPA_LAST] = flat.gpa_lasts
            table[:, kernel.M_HOST] = flat.host_addresses
            self._memory_flat = flat  # keeps the mappings behind host_addresses alive
            self._memory_table = table
            self._memory_generation = memory.generation
            self._memory = memory
        cached = self._views
        if (
            ring is self._ring
            and desc is cached[0]
            and avail is cached[1]
            and used is cached[2]
            and device.acked_features == self._features
            and ring._notifications_enabled == self._notify
        ):
            return
        params = self._ring_params
        params[kernel.R_DESC] = desc.ctypes.data
        params[kernel.R_AVAIL] = avail.ctypes.data
        params[kernel.R_USED] = used.ctypes.data
        params[kernel.R_SIZE] = ring.size
        flags = kernel.RF_NOTIFY if ring._notifications_enabled else 0
        if ring.event_idx:
            flags |= kernel.RF_EVENT_IDX
        if ring.indirect:
            flags |= kernel.RF_INDIRECT
        if _WEAK_ORDER:
            flags |= kernel.RF_WEAK_ORDER
        if device.acked_features & F_MAP_UNMAP:
            flags |= kernel.RF_MAP_UNMAP
        if device.acked_features & F_MMIO:
            flags |= kernel.RF_MMIO
        params[kernel.R_FLAGS] = flags
        params[kernel.R_DOMAIN_FIRST] = device.domain_table.first
        params[kernel.R_GRANULE] = device.granule
        params[kernel.R_INPUT_START] = device.topology.input_start
        params[kernel.R_INPUT_END] = device.topology.input_end
        self._ring = ring
        self._views = (desc, avail, used)
        self._features = device.acked_features
        self._notify = ring._notifications_enabled

    def serve(
        self,
        ring: SplitQueue,
        memory: GuestMemory,
        serve_one: Callable[[SplitQueue], bool],
        budget: int,
    ) -> tuple[int, bool]:
        """Serve available chains, at most ``budget`` of them (kernel and ``serve_one`` together);
        returns how many were completed and whether chains are still available. Raises QueueError (from
        ``serve_one``'s ``SplitQueue.pop``) when the driver broke the ring."""
        self._bind(ring, memory)
        store = self.device.store
        assert isinstance(store, MappingTable)
        completed = 0
        grown = 0  # growths in a row without a completed chain
        try:
            while True:
                if completed >= budget:
                    return completed, ring.has_available()
                done, reason = self._call_kernel(ring, budget - completed)
                completed += done
                if reason == kernel.STOP_EMPTY:
                    return completed, False
                if reason == kernel.STOP_BUDGET:
                    return completed, True
                if reason == kernel.STOP_GROW:
                    grown = grown + 1 if not done else 1
                    if grown > _MAX_GROWTHS:
                        # grow() guarantees room for one more map: a bug, not something a guest can cause.
                        raise RuntimeError("mapping table still short of space after growing")
                    store.grow()
                    continue
                # STOP_PYTHON or STOP_BROKEN: the chain goes through the Python path, whose walk raises
                # QueueError for a broken one. The call may change domains (ATTACH), which the next
                # kernel call sees through the arrays fetched again above.
                if serve_one(ring):
                    completed += 1
        finally:
            if completed:
                self._merge_counts()

    def serve_kernel_only(self, ring: SplitQueue, memory: GuestMemory, budget: int) -> tuple[int, int]:
        """One kernel call and nothing else (the kick thread's step): returns the chains it completed
        and its STOP_* reason; whatever the reason asks for is the caller's to arrange."""
        self._bind(ring, memory)
        done, reason = self._call_kernel(ring, budget)
        if done:
            self._merge_counts()
        return done, reason

    def _call_kernel(self, ring: SplitQueue, budget: int) -> tuple[int, int]:
        store = self.device.store
        assert isinstance(store, MappingTable)
        domains = self.device.domain_table
        params = self._ring_params
        params[_R_BUDGET] = budget
        params[_R_NEXT_AVAIL] = ring.next_avail
        params[_R_USED_IDX] = ring.used_idx
        leaves, nodes, directory, meta = store.arrays
        regions = domains.regions
        reason = kernel.serve_requests(
            params,
            self._memory_table,
            domains.exists,
            domains.bypass,
            domains.mapping_count,
            domains.resv_set,
            regions.starts,
            regions.ends,
            regions.offsets,
            leaves,
            nodes,
            directory,
            meta,
            self._counts,
        )
        next_avail, used_idx, done = params[_R_NEXT_AVAIL : _R_COMPLETED + 1].tolist()
        self.stops[reason] += 1
        if done:
            ring.next_avail = next_avail
            ring.used_idx = used_idx
            ring._pushed_since_check += done
        return done, reason

    def _merge_counts(self) -> None:
        counts = self._counts
        device = self.device
        requests = counts[kernel.C_REQUEST : kernel.C_REQUEST + len(device.request_counts)].tolist()
        statuses = counts[kernel.C_STATUS : kernel.C_STATUS + len(device.status_counts)].tolist()
        device.request_counts[:] = [a + b for a, b in zip(device.request_counts, requests, strict=True)]
        device.status_counts[:] = [a + b for a, b in zip(device.status_counts, statuses, strict=True)]
        counts[:] = 0


_EVENTFD_ONE = (1).to_bytes(8, sys.byteorder)
_POLL_GONE = select.POLLHUP | select.POLLERR | select.POLLNVAL


class _KickThread:
    """Serves the requestq from a thread of its own, woken by the kick eventfd directly: no event-loop
    iteration between a kick and the kernel, and the kernel runs with the GIL released.

    The thread runs only the kernel (MAP and UNMAP) and signals the call fd itself. Whatever the kernel
    stops at (ATTACH, DETACH, PROBE, a broken chain, table growth) and a device the kernel cannot serve
    (``CompiledRequestPath.usable``) are handed to the event loop, which runs the ordinary path while the
    thread waits: device state other than the mapping table and domain arrays is only ever changed on
    the loop, and never while the kernel runs.
    """

    def __init__(
        self,
        backend: VirtioIommuBackend,
        compiled: CompiledRequestPath,
        ring: SplitQueue,
        memory: GuestMemory,
        kick_fd: int,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self._backend = backend
        self._compiled = compiled
        self._ring = ring
        self._memory = memory
        self._kick_fd = kick_fd
        self._loop = loop
        # Wakes the thread for a stop, or for a queue_kicked the loop received (a held kick, a reschedule).
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._stopping = threading.Event()
        self._handed_back = threading.Event()
        self._progress = threading.Condition()
        self._answered = 0
        self._finished = False
        self._thread = threading.Thread(target=self._run, name="virtio-iommu requestq", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        os.write(self._wake_fd, _EVENTFD_ONE)

    def stop(self) -> None:
        """Stop the thread and join it (on the loop; the thread may be waiting for the loop)."""
        self._stopping.set()
        self.wake()
        self._handed_back.set()
        self._thread.join()
        os.close(self._wake_fd)

    def wait_answered(self, kicks: int, timeout: float) -> bool:
        """Wait until ``kicks`` kicks have been read from the kick fd and everything available after each
        was served, or the thread has finished; False on timeout (for tests and tools)."""
        with self._progress:
            return self._progress.wait_for(lambda: self._answered >= kicks or self._finished, timeout)

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._kick_fd, select.POLLIN)
        poller.register(self._wake_fd, select.POLLIN)
        kicks = 0  # read from the kick fd and not yet answered by a complete serve
        try:
            while not self._stopping.is_set():
                if not self._serve():
                    return  # the loop found the device broken: nothing to do until the stop
                with self._progress:
                    self._answered += kicks
                    self._progress.notify_all()
                kicks = 0
                for fd, events in poller.poll():
                    if fd == self._wake_fd:
                        _drain(self._wake_fd)
                        continue
                    read = self._drain_kick(events)
                    if read is None:
                        # A front-end's fd that can no longer signal (not an eventfd, a closed pipe):
                        # the loop's wake-ups still reach the thread.
                        poller.unregister(fd)
                    else:
                        kicks += read
        except Exception as exc:  # a bug: report it where the device's failures go, on the loop
            log.exception("requestq thread failed")
            self._loop.call_soon_threadsafe(self._backend._broken, f"requestq thread: {exc!r}")
        finally:
            with self._progress:
                self._finished = True
                self._progress.notify_all()

    def _drain_kick(self, events: int) -> int | None:
        """The eventfd's count (0 if there was nothing to read), or None if the fd is unusable."""
        try:
            data = os.read(self._kick_fd, 8)
        except BlockingIOError:
            return None if events & _POLL_GONE else 0
        except OSError as exc:
            log.warning("reading the requestq kick fd failed: %s; no longer watched", exc)
            return None
        if not data:
            return None
        return int.from_bytes(data, sys.byteorder) if len(data) == 8 else 1

    def _serve(self) -> bool:
        """Serve until the ring is empty; False if the loop found the device broken.

        The used-buffer notification is decided when the ring is empty (or a ring's worth was served),
        not before a hand-over: the loop's path decides it for what it serves, so a batch gets the
        notifications it would get from the loop alone."""
        compiled, ring, backend = self._compiled, self._ring, self._backend
        while not self._stopping.is_set():
            if compiled.usable():
                _done, reason = compiled.serve_kernel_only(ring, self._memory, ring.size)
                if reason in (kernel.STOP_EMPTY, kernel.STOP_BUDGET):
                    if ring.needs_notification():
                        backend._signal(REQUEST_QUEUE)
                    if reason == kernel.STOP_EMPTY:
                        return True
                    continue  # the thread is this ring's own: there is no one else to let through
            # The loop's path serves the rest of the ring (up to its fairness bound; past it, its
            # reschedule comes back here as a wake-up).
            self._handed_back.clear()
            self._loop.call_soon_threadsafe(self._on_loop)
            self._handed_back.wait()
            return backend.context is not None and backend.context.queue(REQUEST_QUEUE) is ring
        return False

    def _on_loop(self) -> None:
        try:
            if not self._stopping.is_set():
                self._backend._serve_requests()
                self._backend.deliver_events()
        finally:
            self._handed_back.set()


def _drain(fd: int) -> None:
    with contextlib.suppress(BlockingIOError):
        os.read(fd, 8)


class VirtioIommuBackend:
    """One virtio-iommu device, for the life of one front-end connection."""

    num_queues = 2
    # The spec's largest split ring; QEMU's generic device asks for 64 unless told `vq_size=`.
    max_queue_size = 32768

    def __init__(
        self,
        topology: Topology | None = None,
        *,
        device: IommuDevice | None = None,
        request_path: Literal["compiled", "python"] = "compiled",
        poll_us: float = 0.0,
        kick_thread: bool = False,
    ) -> None:
        """``request_path`` picks how the requestq is served: "compiled" (a numba kernel serves MAP and
        UNMAP in batches, everything else goes through the device core) or "python" (every chain through
        ``SplitQueue.pop`` and ``IommuDevice.handle_request``). Both give the same answers.

        ``poll_us`` (compiled path only; 0, the default, turns it off): after serving a request the kernel
        keeps watching the ring that long for the next one, with kicks suppressed, instead of returning
        to the event loop to wait for a kick; at most POLL_LIMIT_US per kick in total. It pays off only
        when a CPU is free for it: docs/performance.md has the measurements.

        ``kick_thread`` (compiled path only; off by default): the requestq is served by a thread of its
        own that waits on the kick fd (`KickFdTaker`), rather than from the event loop."""
        if request_path not in ("compiled", "python"):
            raise ValueError(f"request_path {request_path!r} is neither 'compiled' nor 'python'")
        if kick_thread and request_path != "compiled":
            raise ValueError("kick_thread needs the compiled request path")
        self.kick_thread = kick_thread
        self._kick_thread: _KickThread | None = None
        self.device = device if device is not None else IommuDevice(topology or Topology.default())
        self.context: BackendContext | None = None
        self.acked_features = 0
        self.request_path = request_path
        self._compiled = (
            CompiledRequestPath(self.device, poll_us=poll_us) if request_path == "compiled" else None
        )

    # -- features and config ----------------------------------------------------------------------------

    def device_features(self) -> int:
        return self.device.device_features() | VIRTIO_F_VERSION_1 | RING_FEATURES

    def set_features(self, acked: int) -> None:
        self.acked_features = acked
        self.device.set_features(acked & ~RING_FEATURES)

    @property
    def event_idx(self) -> bool:
        return bool(self.acked_features & VIRTIO_RING_F_EVENT_IDX)

    @property
    def indirect_desc(self) -> bool:
        return bool(self.acked_features & VIRTIO_RING_F_INDIRECT_DESC)

    @property
    def config_size(self) -> int:
        return self.device.config_size

    def get_config(self, offset: int, size: int) -> bytes:
        return self.device.get_config(offset, size)

    def set_config(self, offset: int, data: bytes) -> None:
        # QEMU's generic vhost-user device forwards every guest config write as a write of its whole cached
        # config (vub_set_config: offset 0, config_size bytes), so only the bytes that differ from the
        # device's current config are the guest's write; unchanged read-only fields are not a write to them.
        current = self.device.get_config(offset, len(data))
        start = 0
        while start < len(data):
            if data[start] == current[start]:
                start += 1
                continue
            end = start
            while end < len(data) and data[end] != current[end]:
                end += 1
            self.device.set_config(offset + start, bytes(data[start:end]))
            start = end

    # -- lifetime ---------------------------------------------------------------------------------------

    def attach(self, context: BackendContext) -> None:
        self.context = context

    def memory_changed(self) -> None:
        pass

    def reset(self) -> None:
        self.release_kick_fd(REQUEST_QUEUE)  # the server releases it first; this keeps reset() safe alone
        self.device.reset()
        self.acked_features = 0

    # -- migration (MigratableBackend: the server calls these only while every ring is stopped) ----------

    def save_state(self) -> bytes:
        try:
            return snapshot.save(self.device)
        except TypeError as exc:  # a device built on another mapping store (tests, tools)
            raise ValueError(str(exc)) from None

    def load_state(self, data: bytes) -> None:
        snapshot.restore(self.device, data)  # SnapshotError is a ValueError; the device is unchanged then

    def max_state_size(self) -> int:
        return snapshot.max_size(self.device)

    # -- queues -----------------------------------------------------------------------------------------

    def queue_started(self, index: int) -> None:
        self.queue_kicked(index)

    def queue_stopped(self, index: int) -> None:
        pass

    def takes_kick_fd(self, index: int, fd: int) -> bool:
        if not self.kick_thread or index != REQUEST_QUEUE or self._kick_thread is not None:
            return False
        if "queue_kicked" in vars(self) or type(self).queue_kicked is not VirtioIommuBackend.queue_kicked:
            # Kicks are watched or served differently (the control channel times each kick by wrapping
            # queue_kicked on the instance; a subclass may answer kicks itself): kicks the thread read
            # would bypass that.
            return False
        ring = self._ring(index)
        if ring is None or self._compiled is None or self.context is None:
            return False
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return False  # driven without an event loop (a test's fake server): nothing to hand back to
        self._kick_thread = _KickThread(self, self._compiled, ring, self.context.memory, fd, loop)
        return True

    def release_kick_fd(self, index: int) -> None:
        thread = self._kick_thread
        if index == REQUEST_QUEUE and thread is not None:
            self._kick_thread = None
            thread.stop()

    def queue_kicked(self, index: int) -> None:
        if index == REQUEST_QUEUE:
            if self._kick_thread is not None:
                self._kick_thread.wake()
            else:
                self._serve_requests()
        # Fault events may be waiting for buffers either way: a kick of the eventq brings buffers, a request
        # may have produced a fault.
        self.deliver_events()

    def _ring(self, index: int) -> SplitQueue | None:
        return self.context.queue(index) if self.context is not None else None

    def _serve_requests(self) -> None:
        ring = self._ring(REQUEST_QUEUE)
        if ring is None:
            return
        # Fairness: one call serves at most a ring's worth of chains. Every connection shares the event
        # loop, so a driver that re-posts as fast as it is answered would otherwise keep this call (and
        # every other guest) waiting for as long as it likes; the rest is served from a callback the loop
        # runs after it has looked at everyone else's fds.
        budget = ring.size
        completed = 0
        try:
            if self._compiled is not None and self.context is not None and self._compiled.usable():
                completed, more = self._compiled.serve(ring, self.context.memory, self._serve_one, budget)
            else:
                while completed < budget and self._serve_one(ring):
                    completed += 1
                more = completed == budget and ring.has_available()
        except (QueueError, GuestMemoryError) as error:
            self._broken(f"requestq: {error}")
            return
        if completed and ring.needs_notification():
            self._signal(REQUEST_QUEUE)
        if more and self.context is not None:
            self.context.reschedule(REQUEST_QUEUE)

    def _serve_one(self, ring: SplitQueue) -> bool:
        """Pop and serve one chain through the device core; False if none is available.
        Raises QueueError if the driver broke the ring."""
        chain = ring.pop()
        if chain is None:
            return False
        response, used_length = self.device.handle_request(chain.read(), chain.writable_len)
        if response:
            chain.write(response)
        ring.push_used(chain.head, used_length)
        return True

    def deliver_events(self) -> None:
        """Move pending fault events into the buffers the driver posted on the eventq."""
        if not self.device.pending_event_count:
            return
        ring = self._ring(EVENT_QUEUE)
        if ring is None:
            return
        delivered = 0
        try:
            while self.device.pending_event_count:
                chain = ring.pop()
                if chain is None:
                    break
                if chain.writable_len < FAULT_EVENT_SIZE:
                    # A driver-normative violation (eventq buffers hold a whole event); give the buffer back
                    # empty rather than truncate an event into it.
                    ring.push_used(chain.head, 0)
                    continue
                event = self.device.take_event()
                assert event is not None
                chain.write(event)
                ring.push_used(chain.head, len(event))
                delivered += 1
        except (QueueError, GuestMemoryError) as error:
            self._broken(f"eventq: {error}")
            return
        if delivered and ring.needs_notification():
            self._signal(EVENT_QUEUE)

    def _signal(self, index: int) -> None:
        if self.context is not None:
            self.context.signal_used(index)

    def _broken(self, reason: str) -> None:
        log.warning("device broken: %s", reason)
        if self.context is not None:
            self.context.device_broken(reason)

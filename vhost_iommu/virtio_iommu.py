"""The virtio-iommu device behind the vhost-user seam.

`VirtioIommuBackend` implements :class:`vhost_iommu.backend.VhostUserBackend` by walking the requestq and
eventq rings into the sans-I/O device core (`vhost_iommu.device.IommuDevice`). It owns no sockets and no fds;
the server lends it the rings and a way to signal the front-end.

By default the requestq goes through `CompiledRequestPath`: one numba kernel
(`vhost_iommu.jit.requests.serve_requests`) walks, validates and serves every available MAP and UNMAP,
and hands any other chain (ATTACH, DETACH, PROBE, anything odd, a broken ring) to the Python path one at a
time. By default a thread of the back-end's own runs that kernel inside the kick loop
(`vhost_iommu.jit.kickloop`: poll, serve, notify, without the interpreter lock), handing those chains to
the event loop. docs/performance.md describes both and their measurements.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from vhost_iommu.abi import (
    EVENT_QUEUE,
    F_MAP_UNMAP,
    F_MMIO,
    FAULT_SIZE,
    J_NO_STATUS,
    J_QUEUE_SHIFT,
    MAX_QUEUE_SIZE,
    QUEUE_COUNT,
    REQUEST_QUEUE,
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
)
from vhost_iommu.backend import BackendContext
from vhost_iommu.device import IommuDevice, ReservedRegion, Topology, snapshot
from vhost_iommu.jit import kickloop
from vhost_iommu.jit import requests as kernel
from vhost_iommu.jit.tables import MappingTable
from vhost_iommu.memory import FlatRegions, GuestMemory, GuestMemoryError
from vhost_iommu.persist import Persistence, StateDir, StateError
from vhost_iommu.persist.image import RingPosition, capture
from vhost_iommu.persist.journal import (
    DEFAULT_SLOTS,
    F_FORCED,
    KIND_BYPASS,
    KIND_FEATURES,
    KIND_RESET,
    KIND_RING,
    Journal,
    request_words,
)
from vhost_iommu.persist.replay import Recovered, recover
from vhost_iommu.virtqueue import DescriptorChain, QueueError, SplitQueue

log = logging.getLogger(__name__)

RING_FEATURES = VIRTIO_RING_F_INDIRECT_DESC | VIRTIO_RING_F_EVENT_IDX


_MAX_GROWTHS = 3


MAX_POLL_US = 10_000.0
THREAD_POLL_US = 30.0
"""The kick thread's poll window when none is asked for: on a host with a core to spare it catches the
guest's next synchronous request without a wake-up (docs/benchmarks.md, "On a quiet machine"), and the
loop stops polling by itself where windows come back empty (a busy host)."""


def poll_windows(poll_us: float | None) -> tuple[float, float]:
    """(event-loop path, kick thread) poll windows in microseconds for a ``poll_us`` option: None, the
    default, polls only on the kick thread (adaptive, THREAD_POLL_US); a number sets both, 0 turns
    polling off. The event loop is shared by every guest of the process, so it polls only when told."""
    if poll_us is None:
        return 0.0, THREAD_POLL_US
    if not 0 <= poll_us <= MAX_POLL_US:
        raise ValueError(f"poll_us {poll_us} is outside 0..{MAX_POLL_US}")
    return poll_us, poll_us


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

    The kernel works on raw addresses of the ring views and of guest memory: the ring's come with its
    state record (``SplitQueue.state``, which the kernel reads and advances in place: the ring's position
    has no other copy; the SplitQueue holds the views), guest memory's from `FlatRegions`, which this
    class holds for as long as it uses the addresses: from a call until ``unbind``, which the back-end
    calls when the ring stops, the memory changes or the device resets, so that nothing here keeps an
    ended session's guest RAM mapped. Its own words (``params``) are the device's side: features, domain
    range, granule, input range, polling, budget, journal.

    It relies on this back-end completing every chain before it returns (no chain stays in flight), so
    the SplitQueue's in-flight bookkeeping has nothing to check across kernel calls.
    """

    def __init__(self, device: IommuDevice, *, poll_us: float | None = None, no_work: bool = False) -> None:
        """``poll_us``: see `VirtioIommuBackend`. ``no_work``: answer MAP and UNMAP OK without applying
        them (``RF_NO_WORK``; benchmarks only)."""
        loop_poll_us, thread_poll_us = poll_windows(poll_us)
        self.device = device
        self._params = np.zeros(kernel.PARAM_WORDS, np.uint64)
        #: The kick thread's poll window in cycle-counter ticks (0: no polling); adaptive in the loop.
        self.thread_poll_ticks = int(thread_poll_us * _ticks_per_us()) if thread_poll_us else 0
        #: The event-loop path's poll window in cycle-counter ticks (0: no polling).
        self.poll_ticks = 0
        poll_us = loop_poll_us
        if poll_us:
            ticks_per_us = _ticks_per_us()
            self.poll_ticks = int(poll_us * ticks_per_us)
            self._params[kernel.R_POLL_TICKS] = self.poll_ticks
            self._params[kernel.R_POLL_LIMIT_TICKS] = int(max(POLL_LIMIT_US, 2 * poll_us) * ticks_per_us)
        self._counts = np.zeros(kernel.COUNT_WORDS, np.int64)
        self._extra_flags = kernel.RF_NO_WORK if no_work else 0
        # The acked features the device's words were last derived from (the rest is the topology's,
        # fixed for the device's life): compared on every kick, cheaper than rewriting the words.
        self._features = -1
        self._memory: GuestMemory | None = None
        self._memory_generation = -1
        self._memory_table: npt.NDArray[np.uint64] = np.zeros((0, 3), np.uint64)
        self._memory_flat: FlatRegions | None = None
        # The chain a kernel stopped at and left to the Python path, as (ring state, avail index): the
        # next serve() hands it to the Python path at once instead of walking it in the kernel again.
        self._left: tuple[npt.NDArray[np.int64], int] | None = None
        # Table growths in a row with the ring's used index unchanged (a kernel that keeps asking is a bug).
        self._growths = 0
        self._grown_at = -1
        #: How many times the kernel stopped for each reason (STOP_* codes): for tests and benchmarks.
        self.stops = [0] * len(kernel.STOP_NAMES)
        self._journal: Journal | None = None

    @property
    def journal(self) -> Journal | None:
        """The journal every served chain is recorded in before it is published (None: no state dir)."""
        return self._journal

    @journal.setter
    def journal(self, journal: Journal | None) -> None:
        self._journal = journal
        params = self._params
        if journal is not None:
            params[kernel.R_JOURNAL] = journal.address
            params[kernel.R_JOURNAL_SLOTS] = journal.slots
        self._set_flags()

    @property
    def params(self) -> npt.NDArray[np.uint64]:
        """The device's words (``R_*``), the kernels' second argument."""
        return self._params

    def usable(self) -> bool:
        """The kernel serves what the Python path would: the real table, no injected answers (rare,
        tool-driven states the device core keeps in Python), and no observer on the device (tools such as
        the control layer watch every request through ``IommuDevice.observers``)."""
        device = self.device
        return isinstance(device.store, MappingTable) and not device.has_injections and not device.observers

    def set_polling(self, enabled: bool) -> None:
        """Turn this path's own poll window on or off (the kick thread polls in its loop instead)."""
        self._params[kernel.R_POLL_TICKS] = self.poll_ticks if enabled else 0

    def unbind(self) -> None:
        """Drop guest memory's regions (and the chain left to the Python path, with its ring's record);
        the next call binds afresh. Only while no kernel runs with this path's arguments (the kick thread
        parked or gone): the addresses it was given may be unmapped once these views are dropped."""
        self._memory = None
        self._memory_generation = -1
        self._memory_flat = None
        self._memory_table = np.zeros((0, 3), np.uint64)
        self._left = None

    def _bind(self, memory: GuestMemory) -> None:
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
        device = self.device
        if device.acked_features == self._features:
            return
        params = self._params
        params[kernel.R_DOMAIN_FIRST] = device.domain_table.first
        params[kernel.R_GRANULE] = device.granule
        params[kernel.R_INPUT_START] = device.topology.input_start
        params[kernel.R_INPUT_END] = device.topology.input_end
        self._features = device.acked_features
        self._set_flags()

    def _set_flags(self) -> None:
        features = max(self._features, 0)
        flags = self._extra_flags
        if features & F_MAP_UNMAP:
            flags |= kernel.RF_MAP_UNMAP
        if features & F_MMIO:
            flags |= kernel.RF_MMIO
        if self._journal is not None:
            flags |= kernel.RF_JOURNAL
        self._params[kernel.R_FLAGS] = flags

    def serve(
        self,
        ring: SplitQueue,
        memory: GuestMemory,
        serve_one: Callable[[SplitQueue], bool],
        budget: int,
        journal_full: Callable[[], None] | None = None,
    ) -> tuple[int, bool]:
        """Serve available chains, at most ``budget`` of them (kernel and ``serve_one`` together);
        returns how many were completed and whether chains are still available. Raises QueueError (from
        ``serve_one``'s ``SplitQueue.pop``) when the driver broke the ring. ``journal_full`` is called when
        ``journal`` is full, and must install a new one. (Callbacks are passed per call: one kept here
        would tie the back-end into a cycle, and a connection's guest memory would outlive it.)"""
        self._bind(memory)
        completed = 0
        try:
            while True:
                if completed >= budget:
                    return completed, ring.has_available()
                if self._take_left(ring):
                    # STOP_PYTHON or STOP_BROKEN, here or in the kick loop: the chain goes through the
                    # Python path, whose walk is its one full walk and raises QueueError for a broken
                    # one. The call may change domains (ATTACH), which the next kernel call sees through
                    # the arrays fetched again below.
                    if serve_one(ring):
                        completed += 1
                    continue
                reason = kernel.serve_requests(*self._arguments(ring, budget - completed))
                self.finish_call(ring, reason)
                completed += int(self._params[kernel.R_COMPLETED])
                if reason == kernel.STOP_EMPTY:
                    return completed, False
                if reason == kernel.STOP_BUDGET:
                    return completed, True
                if reason == kernel.STOP_JOURNAL:
                    assert journal_full is not None
                    journal_full()
                elif reason == kernel.STOP_GROW:
                    self.grow_table(ring)
        finally:
            if completed:
                self.merge_counts()

    def _take_left(self, ring: SplitQueue) -> bool:
        """Whether the chain at ``ring``'s next_avail is one a kernel stopped at and left to the Python
        path (forgotten once asked)."""
        left = self._left
        if left is None:
            return False
        self._left = None
        return left[0] is ring.state and left[1] == ring.next_avail

    def grow_table(self, ring: SplitQueue) -> None:
        """A kernel stopped with STOP_GROW: make room in the mapping table. Only the caller, who owns the
        table while a kernel serves, may call it (the kick thread before it lets a tool in)."""
        used_idx = ring.used_idx
        self._growths = self._growths + 1 if used_idx == self._grown_at else 1
        self._grown_at = used_idx
        if self._growths > _MAX_GROWTHS:
            # grow() guarantees room for one more map: a bug, not something a guest can cause.
            raise RuntimeError("mapping table still short of space after growing")
        store = self.device.store
        assert isinstance(store, MappingTable)
        store.grow()

    def kernel_arguments(self, ring: SplitQueue, memory: GuestMemory, budget: int) -> tuple[Any, ...]:
        """``serve_requests``' arguments for ``ring`` (its state record first, then ``params``) and
        ``budget``, also those of ``kick_loop`` after its control words. Taken again before every call:
        table growth and a memory change replace arrays. Call ``finish_call`` after the kernel returns."""
        self._bind(memory)
        return self._arguments(ring, budget)

    def finish_call(self, ring: SplitQueue, reason: int) -> None:
        """After a kernel call on ``ring`` that returned ``reason`` (a STOP_* code, or one of the kick
        loop's): the journal's next record, the stop counts, the chain left to the Python path."""
        journal = self._journal
        if journal is not None:
            journal.next = int(self._params[kernel.R_JOURNAL_NEXT])
            if reason == kernel.STOP_TRAP:
                os.kill(os.getpid(), signal.SIGKILL)  # test hook: die between commit and publish
        if reason in kernel.STOP_NAMES:
            self.stops[reason] += 1
        if reason == kernel.STOP_PYTHON or reason == kernel.STOP_BROKEN:
            self._left = (ring.state, ring.next_avail)

    def _arguments(self, ring: SplitQueue, budget: int) -> tuple[Any, ...]:
        store = self.device.store
        assert isinstance(store, MappingTable)
        domains = self.device.domain_table
        params = self._params
        params[kernel.R_BUDGET] = budget
        leaves, nodes, directory, meta = store.arrays
        regions = domains.regions
        journal = self._journal
        if journal is not None:
            params[kernel.R_JOURNAL_NEXT] = journal.next
            params[kernel.R_JOURNAL_TRAP] = journal.trap + 1
        return (
            ring.state,
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

    def merge_counts(self) -> None:
        """Add what the kernel counted since the last merge to the device's counters."""
        counts = self._counts
        device = self.device
        requests = counts[kernel.C_REQUEST : kernel.C_REQUEST + len(device.request_counts)].tolist()
        statuses = counts[kernel.C_STATUS : kernel.C_STATUS + len(device.status_counts)].tolist()
        device.request_counts[:] = [a + b for a, b in zip(device.request_counts, requests, strict=True)]
        device.status_counts[:] = [a + b for a, b in zip(device.status_counts, statuses, strict=True)]
        counts[:] = 0

    @property
    def counts(self) -> npt.NDArray[np.int64]:
        """The array the kernel counts requests and statuses in (``C_*`` words) until ``merge_counts``."""
        return self._counts


_EVENTFD_ONE = (1).to_bytes(8, sys.byteorder)


class _KickThread:
    """Serves the requestq from a thread of its own that runs `vhost_iommu.jit.kickloop.kick_loop`: the
    thread blocks in poll(2) on the kick eventfd, serves MAP and UNMAP and writes the call eventfd without
    the interpreter lock, and takes it back only when the loop returns.

    The loop returns for what only the event loop does: ATTACH, DETACH, PROBE, a broken chain, a full
    journal, a device the kernel cannot serve (``VirtioIommuBackend.kernel_serves``). The thread then
    hands the ring to the event loop, which runs the ordinary path while the thread waits: device state
    other than the mapping table and domain arrays is only ever changed on the loop, and never while the
    kernel runs.
    A mapping table short of room is grown by the thread itself, before it lets anyone else in, and the
    loop goes on: the table is the thread's while it serves (tools park it first, the event loop serves
    the ring only in a hand-over).

    The ring's position needs no hand-over of its own: the kernels advance the SplitQueue's state record
    in place, and the thread and the event loop never use it at the same time.

    ``parked()`` holds the thread out of the kernel (stopped at a batch boundary, its counts merged) for
    as long as the event loop needs the device to itself.

    With a receiver for them (``VirtioIommuBackend.kick_timing``) the loop times every batch into
    ``timing`` (``kickloop.TIMING_*``), and the hand-overs are timed into it too; the back-end passes the
    array on whenever the thread is out of the kernel (parked, handing over, stopped).
    """

    def __init__(
        self,
        backend: VirtioIommuBackend,
        compiled: CompiledRequestPath,
        ring: SplitQueue,
        memory: GuestMemory,
        kick_fd: int,
        call_fd: int | None,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self._backend = backend
        self._compiled = compiled
        self._ring = ring
        self._memory = memory
        self._loop = loop
        # A doorbell: stop, park, or serve again (a queue_kicked the loop received: a held kick, a
        # reschedule). The kick and call fds stay the server's.
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        control = self._control = np.zeros(kickloop.CONTROL_WORDS, np.int64)
        control[kickloop.K_KICK_FD] = kick_fd
        control[kickloop.K_WAKE_FD] = self._wake_fd
        control[kickloop.K_CALL_FD] = -1 if call_fd is None else call_fd
        control[kickloop.K_POLL_TICKS] = compiled.thread_poll_ticks
        #: Batch times (``kickloop.TIMING_*``); written by the kernel, read and zeroed only while the
        #: thread is out of it.
        self.timing = np.zeros((kickloop.TIMING_ROWS, kickloop.TIMING_COLUMNS), np.int64)
        if backend.kick_timing is not None:
            control[kickloop.K_TICKS_PER_MS] = max(1, round(_ticks_per_us() * 1000))
        # The loop polls after it has notified; the event loop's path, which serves the hand-overs while
        # this thread waits, must not spin as well.
        compiled.set_polling(False)
        # Everything below is guarded by _state.
        self._state = threading.Condition()
        self._parks = 0  # parked() blocks in force: the thread stays out of the kernel
        self._settle_requests = 0  # settle() calls so far
        self._settled = 0  # settle() calls answered: the loop settled after they asked
        self._in_kernel = False
        self._handovers = 0  # times the ring was handed to the event loop
        self._stopping = False
        self._finished = False
        self._handed_back = threading.Event()
        self._thread = threading.Thread(target=self._run, name="virtio-iommu requestq", daemon=True)
        try:
            self._thread.start()
        except RuntimeError as exc:  # no thread to be had: leave nothing behind, the event loop serves
            os.close(self._wake_fd)
            compiled.set_polling(True)
            raise OSError(f"cannot start the requestq thread: {exc}") from None

    # -- from the event loop (or, for settle, any other thread) ----------------------------------------------

    def wake(self) -> None:
        with contextlib.suppress(BlockingIOError):  # the counter is full: a wake-up is pending anyway
            os.write(self._wake_fd, _EVENTFD_ONE)

    def stop(self) -> None:
        """Stop the thread and join it (on the loop; the thread may be waiting for the loop)."""
        with self._state:
            self._stopping = True
            self._update_park_word()
            self._state.notify_all()
        self.wake()
        self._handed_back.set()
        self._thread.join()
        os.close(self._wake_fd)
        self._compiled.set_polling(True)

    @contextlib.contextmanager
    def parked(self) -> Iterator[None]:
        """Inside the block the thread is out of the kernel and stays out: at a batch boundary, waiting for
        the event loop in a hand-over, or finished. Call on the event loop (the wait for a batch boundary
        is at most one ring's worth of chains)."""
        with self._state:
            self._parks += 1
            self._update_park_word()
        try:
            self.wake()
            with self._state:
                self._state.wait_for(lambda: not self._in_kernel)
            yield
        finally:
            with self._state:
                self._parks -= 1
                self._update_park_word()
                self._state.notify_all()

    def set_call_fd(self, fd: int | None) -> None:
        """Notify through ``fd`` from now on (None: not at all); the loop never writes the old fd again
        once this returns, so the server may close it."""
        with self.parked():
            self._control[kickloop.K_CALL_FD] = -1 if fd is None else fd

    def settle(self, timeout: float) -> bool:
        """Wait until every chain announced by a kick (or ``wake``) made before this call was served and
        notified, or the thread finished; False on timeout. For tests and tools, from any thread but the
        event loop's (a hand-over in progress needs the loop)."""
        with self._state:
            if self._finished:
                return True
            self._settle_requests += 1
            request = self._settle_requests
            self._update_park_word()
        self.wake()
        with self._state:
            return self._state.wait_for(lambda: self._settled >= request or self._finished, timeout)

    def counters(self) -> dict[str, int]:
        """What the loop counted: kicks read, wake-ups, notifications written, chains caught by polling,
        and the hand-overs of the ring to the event loop."""
        control = self._control
        return {
            "handovers": self._handovers,
            "kicks": int(control[kickloop.K_KICKS]),
            "wakeups": int(control[kickloop.K_WAKEUPS]),
            "notified": int(control[kickloop.K_NOTIFIED]),
            "poll_hits": int(control[kickloop.K_POLL_HITS]),
            "poll_backoffs": int(control[kickloop.K_POLL_BACKOFFS]),
        }

    def _update_park_word(self) -> None:
        if self._parks or self._stopping:
            word = kickloop.PARK_NOW
        elif self._settled < self._settle_requests:
            word = kickloop.PARK_SETTLED
        else:
            word = kickloop.PARK_NO
        self._control[kickloop.K_PARK] = word

    # -- the thread ------------------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while self._step():
                pass
        except Exception as exc:  # a bug or an exhausted system: reported where the device's failures go
            log.exception("requestq thread failed")
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody left to tell
                self._loop.call_soon_threadsafe(self._backend._broken, f"requestq thread: {exc!r}")
        finally:
            with self._state:
                self._finished = True
                self._in_kernel = False
                self._state.notify_all()

    def _step(self) -> bool:
        """One run of the kick loop and what it returned for; False when the thread is done."""
        compiled, control = self._compiled, self._control
        with self._state:
            while self._parks and not self._stopping:
                self._state.wait()
            if self._stopping:
                return False
            usable = self._backend.kernel_serves()
        # Not usable: the event loop serves every chain (the kick loop below only waits for the next
        # kick): a device with injections, observers or an added latency answers through the device core.
        if not usable and not self._hand_over():
            return False
        with self._state:
            if self._parks or self._stopping:
                return not self._stopping
            ring = self._ring
            control[kickloop.K_SERVE] = 1 if usable else 0
            arguments = compiled.kernel_arguments(ring, self._memory, ring.size)
            # A settled return answers the settle() calls made before the loop started, not later ones:
            # their kicks may come after the loop last looked.
            settles = self._settle_requests
            self._in_kernel = True
        reason = -1
        try:
            reason = kickloop.kick_loop(control, self.timing, compiled.counts, *arguments)
            if reason == kernel.STOP_GROW:
                compiled.grow_table(ring)  # while still _in_kernel: no tool reads the table meanwhile
        finally:
            compiled.finish_call(ring, reason)
            compiled.merge_counts()
            with self._state:
                self._in_kernel = False
                self._state.notify_all()
        if reason == kickloop.LOOP_SETTLED:
            with self._state:
                self._settled = max(self._settled, settles)
                self._update_park_word()
                self._state.notify_all()
            return True
        if reason == kickloop.LOOP_PARKED:
            return True
        if reason == kickloop.LOOP_KICK_FAILED:
            error = int(control[kickloop.K_ERRNO])
            why = os.strerror(error) if error else "end of file"
            log.warning("reading the requestq kick fd failed: %s; no longer watched", why)
            control[kickloop.K_KICK_FD] = -1  # poll(2) ignores it; wake-ups still reach the loop
            return True
        if reason == kickloop.LOOP_CALL_FAILED:
            error = int(control[kickloop.K_ERRNO])
            log.warning("writing the requestq call fd failed: %s", os.strerror(error))
            return True
        if reason == kickloop.LOOP_POLL_FAILED:
            raise OSError(int(control[kickloop.K_ERRNO]), "poll on the requestq kick and wake fds")
        if reason == kickloop.LOOP_KICKED:
            return True  # not usable: the next step hands the ring over
        if reason == kernel.STOP_GROW:
            return True  # grown above: the loop serves that MAP first when it starts again
        # STOP_PYTHON, STOP_BROKEN or STOP_JOURNAL: the chain the kernel stopped at is the event loop's.
        return self._hand_over()

    def _hand_over(self) -> bool:
        """Let the event loop serve the ring and wait until it has; False if the thread should finish
        (stopping, the device broke, the ring is no longer served)."""
        with self._state:
            if self._stopping:
                return False
            self._handed_back.clear()
            self._handovers += 1
        try:
            self._loop.call_soon_threadsafe(self._on_loop)
        except RuntimeError:
            return False  # the loop is closed
        self._handed_back.wait()
        context = self._backend.context
        return not self._stopping and context is not None and context.queue(REQUEST_QUEUE) is self._ring

    def _on_loop(self) -> None:
        try:
            if not self._stopping:
                self._backend._serve_on_loop(self.timing if self._control[kickloop.K_TICKS_PER_MS] else None)
        finally:
            self._handed_back.set()


@dataclass
class _HeldChain:
    """A requestq chain taken off the ring and held for an added latency (``request_delay``)."""

    ring: SplitQueue
    chain: DescriptorChain
    request: bytes
    timer: asyncio.TimerHandle | None = None
    released: bool = False


class VirtioIommuBackend:
    """One virtio-iommu device, for the life of one front-end connection."""

    num_queues = QUEUE_COUNT
    # The spec's largest split ring; QEMU's generic device asks for 64 unless told `vq_size=`.
    max_queue_size = MAX_QUEUE_SIZE

    def __init__(
        self,
        topology: Topology | None = None,
        *,
        device: IommuDevice | None = None,
        request_path: Literal["compiled", "python"] = "compiled",
        poll_us: float | None = None,
        kick_thread: bool | None = None,
        state_dir: StateDir | None = None,
        journal_slots: int = DEFAULT_SLOTS,
    ) -> None:
        """``request_path`` picks how the requestq is served: "compiled" (a numba kernel serves MAP and
        UNMAP in batches, everything else goes through the device core) or "python" (every chain through
        ``SplitQueue.pop`` and ``IommuDevice.handle_request``). Both give the same answers.

        ``poll_us`` (compiled path only): after serving a request, keep watching the ring that long for
        the next one, with kicks suppressed, instead of waiting for a kick. None, the default: only the
        kick thread polls, THREAD_POLL_US, and stops by itself while its windows come back empty; a
        number: both paths poll that long (the event loop at most POLL_LIMIT_US per kick in total); 0:
        no polling. It pays off when a CPU is free for it: docs/performance.md has the measurements.

        ``kick_thread`` (compiled path only; None, the default, means yes with the compiled path): the
        requestq is served by a thread of its own running the kick loop (`vhost_iommu.jit.kickloop`),
        woken by the kick fd directly (`KickFdTaker`), rather than from the event loop. The event loop
        still serves it when the server offers no kick fd; while the kernel cannot serve
        (``kernel_serves``: observers, forced answers, an added latency) the thread hands every kick to
        the event loop, which serves through the device core.

        ``state_dir`` (``serve --state-dir``, under a keeper): the device state of a connection whose
        ``context.session_key`` names it is kept in that subdirectory, every request served and every
        other state change journaled before the guest can see it (docs/persistence.md). A worker that
        takes over a running session rebuilds it in ``session_restored``; a new session erases what
        the subdirectory held at its first ring start, request or reset, the first events only a live
        session has (``journal_slots``: records per journal before the first snapshot)."""
        if request_path not in ("compiled", "python"):
            raise ValueError(f"request_path {request_path!r} is neither 'compiled' nor 'python'")
        if kick_thread and request_path != "compiled":
            raise ValueError("kick_thread needs the compiled request path")
        self.kick_thread = request_path == "compiled" if kick_thread is None else kick_thread
        self._kick_thread: _KickThread | None = None
        #: Receives the requestq thread's batch times (``kickloop.TIMING_*`` rows: the control channel's
        #: latency histograms) on the event loop, whenever the thread is parked, hands over or stops;
        #: set before the ring starts (a thread times batches only if it was set when it started).
        self.kick_timing: Callable[[npt.NDArray[np.int64]], None] | None = None
        #: Added latency (the control channel's ``delay``): called with a request's type byte (-1: an
        #: empty request) and whether it starts a batch, before the request is served; returns the
        #: microseconds to hold it off the ring first (0: serve it now). While set, every request goes
        #: through the device core on the event loop. Change it inside ``quiesced()``.
        self.request_delay: Callable[[int, bool], int] | None = None
        #: Called once a worker has rebuilt the session it took over (``session_restored``), before any
        #: request is served: the control channel installs its observers then.
        self.restored_hook: Callable[[], None] | None = None
        self._held: _HeldChain | None = None
        self._batch_fresh = True  # no request of the current batch has been served yet
        self._loop_timing = np.zeros((kickloop.TIMING_ROWS, kickloop.TIMING_COLUMNS), np.int64)
        self.device = device if device is not None else IommuDevice(topology or Topology.default())
        self.context: BackendContext | None = None
        self.acked_features = 0
        self.request_path = request_path
        self._compiled = (
            CompiledRequestPath(self.device, poll_us=poll_us) if request_path == "compiled" else None
        )
        self._state_dir = state_dir
        self._journal_slots = journal_slots
        self._persistence: Persistence | None = None
        #: Until a live-session event or session_restored decides it, nothing is journaled: the calls a
        #: restoring worker gets first (set_features, set_config) come in a new session too.
        self._persist_decided = False
        self._journaled_bypass = -1
        self._journaled_regions: list[tuple[ReservedRegion, ...]] = []
        self._recovered: Recovered | None = None

    # -- features and config ----------------------------------------------------------------------------

    def device_features(self) -> int:
        return self.device.device_features() | VIRTIO_F_VERSION_1 | RING_FEATURES

    def set_features(self, acked: int) -> None:
        self._apply_features(acked)
        self._log(KIND_FEATURES, acked, live=False)

    def _apply_features(self, acked: int) -> None:
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
        self._log_bypass(live=False)

    # -- lifetime ---------------------------------------------------------------------------------------

    def attach(self, context: BackendContext) -> None:
        self.context = context
        key = context.session_key
        if self._state_dir is not None and key is not None:
            self._persistence = Persistence(self._state_dir.guest(key), slots=self._journal_slots)

    def detach(self) -> None:
        self.context = None

    def memory_changed(self) -> None:
        self._unbind_compiled()

    def reset(self) -> None:
        self.release_kick_fd(REQUEST_QUEUE)  # the server releases it first; this keeps reset() safe alone
        self._drop_held()
        self._unbind_compiled()
        self._reset_device()
        self._log(KIND_RESET, 0)

    def _unbind_compiled(self) -> None:
        """The compiled path lets go of the ring's and guest memory's views (the next serve binds again),
        so that a ring or memory region the server drops is unmapped at once, not when this back-end is
        collected. A requestq thread is parked meanwhile: its kernel works on those views' addresses."""
        compiled = self._compiled
        if compiled is None:
            return
        thread = self._kick_thread
        with thread.parked() if thread is not None else contextlib.nullcontext():
            compiled.unbind()

    def _reset_device(self) -> None:
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
        ring = self._ring(index)
        if ring is not None:
            # Where the ring starts: recovery counts the requestq's records from here, and puts the
            # eventq back at the same distance between next_avail and used_idx.
            self._log(KIND_RING, ring.next_avail | ring.used_idx << 16, queue=index)
        self.queue_kicked(index)

    def queue_stopped(self, index: int) -> None:
        if index == REQUEST_QUEUE:
            held = self._held
            if held is not None:
                # A chain held for an added latency goes back to the ring unserved: the next start serves it.
                self._drop_held()
                if held.ring is self._ring(index):
                    held.ring.give_back(held.chain)
            self._unbind_compiled()

    def takes_kick_fd(self, index: int, fd: int, call_fd: int | None) -> bool:
        if not self.kick_thread or index != REQUEST_QUEUE or self._kick_thread is not None:
            return False
        if type(self).queue_kicked is not VirtioIommuBackend.queue_kicked:
            return False  # a subclass answers kicks itself: kicks the thread read would bypass it
        ring = self._ring(index)
        compiled = self._compiled
        if ring is None or compiled is None or self.context is None:
            return False
        if not isinstance(self.device.store, MappingTable):
            return False  # the kernel's arrays are the MappingTable's: the loop cannot even wait with another
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return False  # driven without an event loop (a test's fake server): nothing to hand back to
        try:
            self._kick_thread = _KickThread(self, compiled, ring, self.context.memory, fd, call_fd, loop)
        except OSError as exc:  # no eventfd or thread to be had: the event loop keeps serving
            log.warning("requestq thread not started: %s", exc)
            return False
        return True

    def release_kick_fd(self, index: int) -> None:
        thread = self._kick_thread
        if index == REQUEST_QUEUE and thread is not None:
            self._kick_thread = None
            thread.stop()
            self._pass_timing(thread.timing)

    def _pass_timing(self, timing: npt.NDArray[np.int64]) -> None:
        """Hand batch times (the thread's, or the event loop's own) to ``kick_timing``, and zero them; the
        thread's only while it is out of the kernel."""
        if self.kick_timing is not None and timing[kickloop.T_BATCHES, kickloop.T_COUNT]:
            self.kick_timing(timing)
        timing[:] = 0

    def replace_call_fd(self, index: int, fd: int | None) -> None:
        thread = self._kick_thread
        if index == REQUEST_QUEUE and thread is not None:
            thread.set_call_fd(fd)

    def kick_thread_counters(self) -> dict[str, int] | None:
        """What the requestq thread's kick loop counted (``_KickThread.counters``); None without one."""
        thread = self._kick_thread
        return thread.counters() if thread is not None else None

    @contextlib.contextmanager
    def quiesced(self) -> Iterator[None]:
        """Inside the block no thread of this back-end touches the device: the requestq thread, if one
        serves, is parked at a batch boundary with its counts merged into the device's counters. Tools
        that read or change device state (mappings, domains, counters, injections) use it; call it on
        the event loop."""
        thread = self._kick_thread
        if thread is None:
            yield
            self._after_tools()
            return
        with thread.parked():
            self._pass_timing(thread.timing)
            yield
            self._after_tools()

    def _after_tools(self) -> None:
        # What a tool changed (bypass, reserved regions) is journaled before the thread serves again.
        if self._persistence is not None and self._persist_decided:
            self._log_tool_changes()

    def queue_kicked(self, index: int) -> None:
        if index == REQUEST_QUEUE and self._kick_thread is not None:
            self._kick_thread.wake()  # the thread serves, or hands the ring to _serve_on_loop
            self.deliver_events()
            return
        self._serve_on_loop(self._loop_timing if self.kick_timing is not None else None, index)

    def kernel_serves(self) -> bool:
        """Whether the compiled kernel may serve MAP and UNMAP now: the compiled path, its real table, and
        nothing that needs every request in Python (observers, forced answers, an added latency, a held
        chain)."""
        compiled = self._compiled
        return (
            compiled is not None
            and compiled.usable()
            and self.request_delay is None
            and self._held is None
            and self.context is not None
        )

    def _serve_on_loop(self, timing: npt.NDArray[np.int64] | None, index: int = REQUEST_QUEUE) -> None:
        """Serve a kick of queue ``index`` on the event loop (the requestq thread's hand-overs come here
        too). With ``timing`` (the control channel listens: ``kick_timing``) the requestq batch is timed
        into it with the kick loop's rule and passed on."""
        if index != REQUEST_QUEUE:
            self.deliver_events()  # a kick of the eventq brings buffers for waiting fault events
            return
        if timing is None:
            self._serve_requests()
        else:
            counts = self.device.request_counts
            before = np.array(counts, np.int64)
            began = time.perf_counter_ns()
            self._serve_requests()
            kickloop.record_batch(timing, time.perf_counter_ns() - began, before, np.array(counts, np.int64))
            self._pass_timing(timing)
        for observer in self.device.observers:
            observer.batch_served()
        self.deliver_events()  # a request may have produced a fault event

    def _ring(self, index: int) -> SplitQueue | None:
        return self.context.queue(index) if self.context is not None else None

    def _serve_requests(self) -> None:
        """The one serve loop of the requestq (the kick thread's kernel aside): a batch through the
        compiled kernel when it may serve, else chain by chain through the device core, every chain
        journaled before it is published."""
        ring = self._ring(REQUEST_QUEUE)
        if ring is None:
            return
        held = self._held
        if held is not None and held.ring is not ring:
            self._drop_held()  # the ring was restarted meanwhile (a stop gave the chain back)
            held = None
        if held is not None and not held.released:
            return  # later chains wait behind the held one: the device answers in ring order
        if self._persistence is not None:
            self._log_tool_changes()
        # Fairness: one call serves at most a ring's worth of chains. Every connection shares the event
        # loop, so a driver that re-posts as fast as it is answered would otherwise keep this call (and
        # every other guest) waiting for as long as it likes; the rest is served from a callback the loop
        # runs after it has looked at everyone else's fds.
        budget = ring.size
        completed = 0
        more = False
        try:
            # A batch starts with this call, unless it continues one a held chain interrupted.
            self._batch_fresh = held is None
            if held is not None:
                self._held = None
                self._complete(ring, held.chain, held.request)
                completed = 1
            if self.kernel_serves():
                assert self._compiled is not None and self.context is not None
                done, more = self._compiled.serve(
                    ring, self.context.memory, self._serve_one, budget - completed, self._rotate_journal
                )
                completed += done
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
        """Pop and serve one chain through the device core (the compiled path calls it at a chain its
        kernel does not serve); False if none is available, or if ``request_delay`` held it. Raises
        QueueError if the driver broke the ring."""
        journal = self._journal_with_room() if self._persistence is not None else None
        chain = ring.pop()
        if chain is None:
            return False
        request = chain.read()
        delay_of = self.request_delay
        if delay_of is not None:
            hold_us = delay_of(request[0] if request else -1, self._batch_fresh)
            self._batch_fresh = False
            if hold_us and self._hold(ring, chain, request, hold_us):
                return False
        self._complete(ring, chain, request, journal)
        return True

    def _complete(
        self, ring: SplitQueue, chain: DescriptorChain, request: bytes, journal: Journal | None = None
    ) -> None:
        """Serve ``request`` through the device core, write the answer, journal it (with a state
        directory: committed before the used entry is pushed, so what the guest sees completed is in the
        journal) and publish it."""
        if journal is None and self._persistence is not None:
            journal = self._journal_with_room()
        forced = self.device.injected_count
        response, used_length = self.device.handle_request(request, chain.writable_len)
        if response:
            chain.write(response)
        if journal is not None:
            word1, word2 = request_words(
                response[used_length - 4] if used_length >= 4 else J_NO_STATUS,
                used_length,
                (ring.next_avail - 1) & 0xFFFF,
                ring.used_idx,
                chain.head,
                F_FORCED if self.device.injected_count != forced else 0,
            )
            journal.append(word1, word2, request)
        ring.push_used(chain.head, used_length)

    # -- added latency (request_delay) ---------------------------------------------------------------------

    def _hold(self, ring: SplitQueue, chain: DescriptorChain, request: bytes, microseconds: int) -> bool:
        """Hold ``chain`` off the ring for ``microseconds``; False (serve it now) without an event loop
        (a test's fake server): no time passes there."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return False
        held = self._held = _HeldChain(ring, chain, request)
        held.timer = loop.call_later(microseconds / 1e6, self.release_held)
        return True

    def release_held(self) -> None:
        """Serve the chain held for an added latency now (its delay passed, or was taken off), then the
        chains behind it. On the event loop."""
        held = self._held
        if held is None or held.released:
            return
        if held.timer is not None:
            held.timer.cancel()
        held.released = True
        self.queue_kicked(REQUEST_QUEUE)

    def _drop_held(self) -> None:
        held, self._held = self._held, None
        if held is not None and held.timer is not None:
            held.timer.cancel()

    # -- persistence (docs/persistence.md) ----------------------------------------------------------------

    def _start_journal(self) -> None:
        assert self._persistence is not None
        self._persist_decided = True
        journal = self._persistence.start_fresh()
        if self._compiled is not None:
            self._compiled.journal = journal
        if self.acked_features:
            self._log(KIND_FEATURES, self.acked_features)
        self._journaled_bypass = -1
        self._log_bypass()
        self._journaled_regions = list(self.device.domain_table.endpoint_regions)
        if self._journaled_regions != self._topology_regions():
            self._rotate_journal()  # overrides set before the first request: only a snapshot holds them

    def _topology_regions(self) -> list[tuple[ReservedRegion, ...]]:
        device = self.device
        return [device.topology.reserved_regions(int(e)) for e in device.domain_table.endpoint_ids]

    def _journal_with_room(self, *, live: bool = True) -> Journal | None:
        """The journal with a free record, or None without persistence. ``live``: the caller's event
        happens only in a live session, so an undecided back-end starts a new session (erasing its
        subdirectory); otherwise an undecided back-end journals nothing."""
        persistence = self._persistence
        if persistence is None:
            return None
        if not self._persist_decided:
            if not live:
                return None
            self._start_journal()
        assert persistence.journal is not None
        if persistence.journal.full:
            self._rotate_journal()
        return persistence.journal

    def _log(self, kind: int, value: int, *, queue: int = 0, live: bool = True) -> None:
        # The journal has one writer at a time: a requestq thread in its kernel appends too, so it is
        # parked meanwhile (these events are rare: features, config writes, ring starts).
        thread = self._kick_thread
        with thread.parked() if thread is not None else contextlib.nullcontext():
            journal = self._journal_with_room(live=live)
            if journal is not None:
                journal.append(kind | queue << J_QUEUE_SHIFT, value)

    def _log_tool_changes(self) -> None:
        """Journal what a tool (the control channel) changed: tools change the device on the loop, inside
        ``quiesced()``, which calls this on its way out (and so does every serve from the loop).
        Reserved-region overrides are not records: a snapshot holds them, so a change starts a new
        generation."""
        self._log_bypass()
        regions = self.device.domain_table.endpoint_regions
        if regions != self._journaled_regions and self._journal_with_room() is not None:
            self._rotate_journal()

    def _log_bypass(self, *, live: bool = True) -> None:
        bypass = self.device.config.bypass
        if bypass != self._journaled_bypass and self._journal_with_room(live=live) is not None:
            self._log(KIND_BYPASS, bypass)
            self._journaled_bypass = bypass

    def _ring_position(self, index: int) -> RingPosition | None:
        ring = self._ring(index)
        return None if ring is None else RingPosition(ring.next_avail, ring.used_idx)

    def _rotate_journal(self) -> None:
        """The journal is full: snapshot the state it leads to and continue in a new one. Called between
        chains, when everything served has been published."""
        persistence = self._persistence
        assert persistence is not None
        image = capture(
            self.device,
            self.acked_features,
            (self._ring_position(REQUEST_QUEUE), self._ring_position(EVENT_QUEUE)),
            persistence.generation + 1,
        )
        journal = persistence.rotate(image)
        if self._compiled is not None:
            self._compiled.journal = journal
        self._journaled_regions = list(self.device.domain_table.endpoint_regions)

    def session_restored(self) -> None:
        """A worker took over a running session (`RestorableBackend`): rebuild the device from its
        subdirectory (snapshot, then the journal's records) before any kick. Raises StateError, naming
        the file and record, when the state cannot be trusted or does not fit this device. Then
        ``restored_hook``, if set: tools watch the device from here on, not its rebuilding."""
        self._restore_state()
        if self.restored_hook is not None:
            self.restored_hook()

    def _restore_state(self) -> None:
        persistence = self._persistence
        if persistence is None:
            return
        if self._persist_decided:
            raise StateError(f"{persistence.directory.path}: session_restored after the session went live")
        self._persist_decided = True
        began = time.perf_counter()
        try:
            loaded = persistence.load()
        except StateError:
            if persistence.directory.names():
                raise
            # The previous worker died before it journaled anything: there is nothing to restore.
            log.warning("%s: no persisted state; starting empty", persistence.directory.path)
            self._start_journal()
            self._recovered = None
            return
        self._recovered = recover(self.device, loaded, self._apply_features, self._reset_device)
        self._journaled_bypass = self.device.config.bypass
        self._journaled_regions = list(self.device.domain_table.endpoint_regions)
        if self._compiled is not None:
            self._compiled.journal = persistence.journal
        log.info(
            "%s: state restored in %.3f s (%d records, %d replayed, %d mappings)",
            persistence.directory.path,
            time.perf_counter() - began,
            len(loaded.records),
            self._recovered.replayed,
            self.device.store.count(),
        )

    def queue_restored(self, index: int) -> None:
        """A respawned worker's ring ``index`` is set up again: put its indices where the journal says,
        and complete from their records the requests that were served but not yet published (their used
        entries never reached the guest); they are not executed again. Then serve from there."""
        recovered = self._recovered
        ring = self._ring(index)
        if ring is None or recovered is None or index in recovered.restored:
            return
        recovered.restored.add(index)
        position = recovered.rings[index]
        if position is None:
            log.warning("queue %d restored with no journaled position: serving from its used index", index)
            ring.next_avail = ring.used_idx
            return
        published = ring.used_idx  # what the guest has seen: the used index in guest memory
        if index == EVENT_QUEUE:
            # Buffers popped and not used were lost with the worker: pop them again.
            ring.next_avail = (published + position.next_avail - position.used_idx) & 0xFFFF
            return
        unpublished = (position.used_idx - published) & 0xFFFF
        pending = recovered.requests
        if unpublished > min(len(pending), ring.size):
            raise StateError(
                f"requestq: the guest's used index {published} is {unpublished} entries behind the journal's "
                f"{position.used_idx}, more than the {len(pending)} journaled requests"
            )
        records = list(pending)[len(pending) - unpublished :]
        ring.next_avail = records[0].avail_pos if records else position.next_avail
        for record in records:
            chain = ring.pop()
            if chain is None or chain.head != record.head or ring.used_idx != record.used_pos:
                raise StateError(
                    f"requestq: the chain at ring position {record.avail_pos} is not the journaled one "
                    f"(head {record.head})"
                )
            if record.request[0] == 5 and record.used_length:  # PROBE changes nothing: answer it again
                response, used_length = self.device.handle_request(
                    chain.read(), chain.writable_len, observed=False
                )
                chain.write(response)
            elif record.used_length:
                used_length = record.used_length
                chain.write(bytes((record.status, 0, 0, 0)), used_length - 4)
            else:
                used_length = 0
            ring.push_used(chain.head, used_length)
        if records and ring.needs_notification():
            self._signal(REQUEST_QUEUE)

    def session_ended(self) -> None:
        """The front-end is gone for good (`SessionLifecycle`): its state will never be restored."""
        persistence = self._persistence
        if persistence is not None and self._state_dir is not None:
            name = os.path.basename(persistence.directory.path)
            persistence.close()
            self._persistence = None
            self._state_dir.remove_guest(name)
        if self._compiled is not None:
            self._compiled.journal = None

    def session_suspended(self) -> None:
        """A new worker takes over (`SessionLifecycle`): the journal is already up to date in the
        page cache; nothing to write."""

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
                if chain.writable_len < FAULT_SIZE:
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

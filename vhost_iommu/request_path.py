"""The compiled request path: the requestq served by one numba kernel per batch.

`CompiledRequestPath` hands `vhost_iommu.jit.requests.serve_requests` the ring-state record of the
`SplitQueue`, the device's parameter words and the arrays of the mapping table and domains; the kernel
walks, validates and serves every available MAP and UNMAP and stops at any other chain (ATTACH, DETACH,
PROBE, anything odd, a broken ring), which goes to the back-end's Python serve loop one at a time. The
same arguments serve the kick thread's loop (`vhost_iommu.kick_thread`). docs/performance.md has the
design and the measurements.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from vhost_iommu.abi import F_MAP_UNMAP, F_MMIO
from vhost_iommu.device import IommuDevice
from vhost_iommu.jit import requests as kernel
from vhost_iommu.jit.requests import ticks_per_us
from vhost_iommu.jit.tables import MappingTable
from vhost_iommu.memory import FlatRegions, GuestMemory
from vhost_iommu.persist.journal import Journal
from vhost_iommu.virtqueue import SplitQueue

_MAX_GROWTHS = 3


MAX_POLL_US = 10_000.0
THREAD_POLL_US = 60.0
"""The kick thread's poll window when none is asked for: on a host with a core to spare it catches the
guest's next synchronous request without a wake-up (docs/benchmarks.md, "On a quiet machine"), and the
loop stops polling by itself where windows come back empty (a busy host). 30 us caught the next request
in some boots and missed it in others (quiet pairs at 0.96x the built-in device in one boot, 2.87x in the
next); 60 us caught 98-99% of them in every boot (docs/benchmarks.md, "Quiet and busy host")."""


THREAD_POLL_LIMIT_US = 1000.0
"""How far the kick thread's default window may grow, learned from the guest's gaps between requests
(``jit/kickloop.py``, ``_learn_window``): a guest whose synchronous MAP comes a few hundred microseconds
after the last answer (one per I/O of a disk at queue depth 1 in DMA mode) finds the thread watching
instead of asleep, and a wake-up on a host whose idle CPUs sleep costs more than the request. An
explicit ``poll_us`` fixes the window."""


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
        self._params[kernel.R_HISTORY] = device.history.address
        #: The kick thread's poll window in cycle-counter ticks (0: no polling); adaptive in the loop.
        self.thread_poll_ticks = int(thread_poll_us * ticks_per_us()) if thread_poll_us else 0
        #: How far the kick thread may grow its window (at most thread_poll_ticks: fixed).
        self.thread_poll_limit_ticks = (
            int(THREAD_POLL_LIMIT_US * ticks_per_us()) if poll_us is None else self.thread_poll_ticks
        )
        #: The event-loop path's poll window in cycle-counter ticks (0: no polling).
        self.poll_ticks = 0
        poll_us = loop_poll_us
        if poll_us:
            ticks = ticks_per_us()
            self.poll_ticks = int(poll_us * ticks)
            self._params[kernel.R_POLL_TICKS] = self.poll_ticks
            self._params[kernel.R_POLL_LIMIT_TICKS] = int(max(POLL_LIMIT_US, 2 * poll_us) * ticks)
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
        with self.device.translation_guard.changing():  # may replace arrays a DMA kernel holds
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
            self.device.translation_guard.words,
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

"""The virtio-iommu device behind the vhost-user seam.

`VirtioIommuBackend` implements :class:`vhost_iommu.backend.VhostUserBackend` by walking the requestq and
eventq rings into the sans-I/O device core (`vhost_iommu.device.IommuDevice`). It owns no sockets and no fds;
the server lends it the rings and a way to signal the front-end.

By default the requestq goes through the compiled path (`vhost_iommu.request_path`): one numba kernel
walks, validates and serves every available MAP and UNMAP, and hands any other chain (ATTACH, DETACH,
PROBE, anything odd, a broken ring) to this module's one Python serve loop. By default a thread of the
back-end's own runs that kernel inside the kick loop (`vhost_iommu.kick_thread`), handing those chains
to the event loop. This module keeps the serve loop, the device's lifetime and its journaling
(docs/persistence.md: every request is journaled before it is published).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from vhost_iommu import cold_start
from vhost_iommu.abi import (
    EVENT_QUEUE,
    FAULT_SIZE,
    MAX_QUEUE_SIZE,
    QUEUE_COUNT,
    REQUEST_QUEUE,
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
)
from vhost_iommu.backend import BackendContext
from vhost_iommu.device import IommuDevice, Topology, snapshot
from vhost_iommu.jit import interpreted, kickloop
from vhost_iommu.jit.tables import MappingTable
from vhost_iommu.kick_thread import KickThread
from vhost_iommu.memory import GuestMemoryError
from vhost_iommu.persist import Persistence, StateDir
from vhost_iommu.persist.journal import (
    DEFAULT_SLOTS,
    KIND_FEATURES,
    KIND_RESET,
    KIND_RING,
    Journal,
)
from vhost_iommu.persist.session import SessionJournal
from vhost_iommu.request_path import MAX_POLL_US, THREAD_POLL_US, CompiledRequestPath, poll_windows
from vhost_iommu.thread_priority import DEFAULT_PRIORITY, ThreadPriority
from vhost_iommu.virtqueue import DescriptorChain, QueueError, SplitQueue

__all__ = [
    "MAX_POLL_US",
    "RING_FEATURES",
    "THREAD_POLL_US",
    "CompiledRequestPath",
    "VirtioIommuBackend",
    "poll_windows",
]

log = logging.getLogger(__name__)

RING_FEATURES = VIRTIO_RING_F_INDIRECT_DESC | VIRTIO_RING_F_EVENT_IDX


@dataclass
class _Hold:
    """An added latency (``request_delay``) running: the ring's next chain, given back to it, is served
    when ``timer`` fires (``released``), before anything after it."""

    ring: SplitQueue
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
        kick_thread_priority: ThreadPriority = DEFAULT_PRIORITY,
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

        ``kick_thread_priority``: the scheduling the requestq thread asks for (`vhost_iommu.thread_priority`;
        real-time by default, falling back to normal with a log line when the process may not).

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
        self._kick_thread: KickThread | None = None
        self.kick_thread_priority = kick_thread_priority
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
        self._held: _Hold | None = None
        self._batch_fresh = True  # no request of the current batch has been served yet
        self._release_next = False  # the next chain is a held one whose time has passed
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
        self._session: SessionJournal | None = None

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
        if self._session is not None:
            self._session.log_bypass(live=False)

    # -- lifetime ---------------------------------------------------------------------------------------

    def attach(self, context: BackendContext) -> None:
        self.context = context
        if self._compiled is not None and interpreted.interpreting():
            cold_start.when_compiled(self)
        key = context.session_key
        if self._state_dir is not None and key is not None:
            self._session = SessionJournal(self, self._state_dir, key, self._journal_slots)

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
            self._drop_held()  # a held chain is still on the ring, unserved: the next start serves it
            self._unbind_compiled()

    def takes_kick_fd(self, index: int, fd: int, call_fd: int | None) -> bool:
        if not self.kick_thread or index != REQUEST_QUEUE or self._kick_thread is not None:
            return False
        if interpreted.interpreting():
            return False  # the kick loop is not compiled yet: offered again in kernels_compiled
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
            self._kick_thread = KickThread(
                self, compiled, ring, self.context.memory, fd, call_fd, loop, self.kick_thread_priority
            )
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

    def kick_thread_scheduling(self) -> str | None:
        """The scheduling the requestq thread got ("SCHED_FIFO 1", "normal (...)"); None without one."""
        thread = self._kick_thread
        return thread.scheduling if thread is not None else None

    def kick_thread_counters(self) -> dict[str, int] | None:
        """What the requestq thread's kick loop counted (``KickThread.counters``); None without one."""
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
        if self._session is not None and self._session.live:
            self._session.log_tool_changes()

    def queue_kicked(self, index: int) -> None:
        if index == REQUEST_QUEUE and self._kick_thread is not None:
            self._kick_thread.wake()  # the thread serves, or hands the ring to serve_on_loop
            self.deliver_events()
            return
        self.serve_on_loop(self._loop_timing if self.kick_timing is not None else None, index)

    def kernel_serves(self) -> bool:
        """Whether the compiled kernel may serve MAP and UNMAP now: the compiled path, its real table, and
        nothing that needs every request in Python (observers, forced answers, an added latency, a held
        chain)."""
        compiled = self._compiled
        return (
            compiled is not None
            and not interpreted.interpreting()
            and compiled.usable()
            and self.request_delay is None
            and self._held is None
            and self.context is not None
        )

    def serving_path(self) -> str:
        """Which path serves the requestq now: "compiled" (the kernel, on the requestq thread or the
        event loop), "python" (chain by chain through the device core: ``request_path`` "python", or a
        tool that needs every request in Python), or "python (compiling)" (a cold start: the kernels are
        still being compiled in the background, `vhost_iommu.cold_start`)."""
        if self._compiled is not None and interpreted.interpreting():
            return "python (compiling)"
        return "compiled" if self.kernel_serves() else "python"

    def kernels_compiled(self) -> None:
        """A cold start's kernels are compiled (`cold_start`, on the event loop between batches): the next
        batch takes the compiled path, and the requestq's kick fd is offered again for its thread."""
        if self.context is not None:
            self.context.offer_kick_fds()

    def serve_on_loop(self, timing: npt.NDArray[np.int64] | None, index: int = REQUEST_QUEUE) -> None:
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
        if self._session is not None:
            self._session.log_tool_changes()
        # Fairness: one call serves at most a ring's worth of chains. Every connection shares the event
        # loop, so a driver that re-posts as fast as it is answered would otherwise keep this call (and
        # every other guest) waiting for as long as it likes; the rest is served from a callback the loop
        # runs after it has looked at everyone else's fds.
        budget = ring.size
        completed = 0
        more = False
        try:
            # A batch starts with this call, unless it continues one a held chain interrupted, whose held
            # chain is then served first, not held again.
            self._batch_fresh = held is None
            self._release_next = held is not None
            self._held = None
            if self.kernel_serves():
                assert self._compiled is not None and self.context is not None
                journal_full = self._session.rotate if self._session is not None else None
                completed, more = self._compiled.serve(
                    ring, self.context.memory, self._serve_one, budget, journal_full
                )
            else:
                while completed < budget and self._serve_one(ring):
                    completed += 1
                more = completed == budget and ring.has_available()
        except (QueueError, GuestMemoryError) as error:
            self.broken(f"requestq: {error}")
            return
        finally:
            # A released chain the kernel served (the delay was taken off) must not let a later,
            # delayed chain skip its hold.
            self._release_next = False
        if completed and ring.needs_notification():
            self._signal(REQUEST_QUEUE)
        if more and self.context is not None:
            self.context.reschedule(REQUEST_QUEUE)

    def _serve_one(self, ring: SplitQueue) -> bool:
        """Pop and serve one chain through the device core (the compiled path calls it at a chain its
        kernel does not serve); False if none is available, or if ``request_delay`` held it. Raises
        QueueError if the driver broke the ring."""
        # Before the pop: a full journal rotates behind a snapshot, which must see no chain in flight.
        journal = self._session.with_room() if self._session is not None else None
        chain = ring.pop()
        if chain is None:
            return False
        request = chain.read()
        delay_of = self.request_delay
        if delay_of is not None and not self._release_next:
            hold_us = delay_of(request[0] if request else -1, self._batch_fresh)
            self._batch_fresh = False
            if hold_us and self._hold(ring, hold_us):
                ring.give_back(chain)  # popped again when the time has passed: nothing held in flight
                return False
        self._release_next = False
        self._complete(ring, chain, request, journal)
        return True

    def _complete(
        self, ring: SplitQueue, chain: DescriptorChain, request: bytes, journal: Journal | None
    ) -> None:
        """Serve ``request`` through the device core, write the answer, journal it (with a state
        directory: committed before the used entry is pushed, so what the guest sees completed is in the
        journal) and publish it."""
        forced = self.device.injected_count
        response, used_length = self.device.handle_request(request, chain.writable_len)
        if response:
            chain.write(response)
        if journal is not None:
            assert self._session is not None
            self._session.log_request(
                journal,
                ring,
                chain.head,
                request,
                response,
                used_length,
                forced=self.device.injected_count != forced,
            )
        ring.push_used(chain.head, used_length)

    # -- added latency (request_delay) ---------------------------------------------------------------------

    def _hold(self, ring: SplitQueue, microseconds: int) -> bool:
        """Hold the ring's next chain for ``microseconds``; False (serve it now) without an event loop (a
        test's fake server): no time passes there."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return False
        held = self._held = _Hold(ring)
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

    # -- persistence (docs/persistence.md; the journaling itself is persist/session.SessionJournal's) -----

    @property
    def persistence(self) -> Persistence | None:
        """This connection's persisted state under ``state_dir`` (None: nothing is persisted)."""
        return self._session.persistence if self._session is not None else None

    def _log(self, kind: int, value: int, *, queue: int = 0, live: bool = True) -> None:
        if self._session is not None:
            self._session.log(kind, value, queue=queue, live=live)

    def session_restored(self) -> None:
        """A worker took over a running session (`RestorableBackend`): rebuild the device from its
        subdirectory (snapshot, then the journal's records) before any kick. Raises StateError, naming
        the file and record, when the state cannot be trusted or does not fit this device. Then
        ``restored_hook``, if set: tools watch the device from here on, not its rebuilding."""
        if self._session is not None:
            self._session.restore()
        if self.restored_hook is not None:
            self.restored_hook()

    def queue_restored(self, index: int) -> None:
        """A respawned worker's ring ``index`` is set up again: put its indices where the journal says,
        and complete from their records the requests that were served but not yet published (their used
        entries never reached the guest); they are not executed again. Then serve from there."""
        if self._session is not None:
            self._session.queue_restored(index)

    def session_ended(self) -> None:
        """The front-end is gone for good (`SessionLifecycle`): its state will never be restored."""
        if self._session is not None:
            self._session.ended()
            self._session = None

    def session_suspended(self) -> None:
        """A new worker takes over (`SessionLifecycle`): the journal is already up to date in the
        page cache; nothing to write."""

    # -- what the journal needs of the back-end (persist.session.JournalHost) -------------------------------

    def ring(self, index: int) -> SplitQueue | None:
        return self._ring(index)

    def journal_writers_parked(self) -> AbstractContextManager[None]:
        thread = self._kick_thread
        return thread.parked() if thread is not None else contextlib.nullcontext()

    def journal_changed(self, journal: Journal | None) -> None:
        if self._compiled is not None:
            self._compiled.journal = journal

    def apply_features(self, acked: int) -> None:
        self._apply_features(acked)

    def reset_device(self) -> None:
        self._reset_device()

    def signal(self, index: int) -> None:
        self._signal(index)

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
            self.broken(f"eventq: {error}")
            return
        if delivered and ring.needs_notification():
            self._signal(EVENT_QUEUE)

    def _signal(self, index: int) -> None:
        if self.context is not None:
            self.context.signal_used(index)

    def broken(self, reason: str) -> None:
        """Enter NEEDS_RESET for ``reason`` (the driver broke a ring, or the requestq thread failed)."""
        log.warning("device broken: %s", reason)
        if self.context is not None:
            self.context.device_broken(reason)

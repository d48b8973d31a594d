"""The requestq's own thread: the kick loop of `vhost_iommu.jit.kickloop` run without the interpreter lock.

`KickThread` blocks in poll(2) on the ring's kick eventfd, serves MAP and UNMAP through the compiled
request path and writes the call eventfd, and hands the ring to the event loop for everything else.
docs/performance.md describes it (hand-overs, parking, the fd swap, polling) and its measurements.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from vhost_iommu.abi import REQUEST_QUEUE
from vhost_iommu.jit import kickloop
from vhost_iommu.jit import requests as kernel
from vhost_iommu.memory import GuestMemory
from vhost_iommu.request_path import CompiledRequestPath
from vhost_iommu.thread_priority import LoadGovernor, ThreadPriority, apply_to_current_thread, governor_of
from vhost_iommu.virtqueue import SplitQueue

if TYPE_CHECKING:
    from vhost_iommu.virtio_iommu import VirtioIommuBackend

log = logging.getLogger(__name__)

_EVENTFD_ONE = (1).to_bytes(8, sys.byteorder)


class KickThread:
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
        priority: ThreadPriority,
    ) -> None:
        self._backend = backend
        self._priority = priority
        self._fixed_scheduling: str | None = None  # what a fixed priority got, once the thread runs
        self._governor: LoadGovernor | None = None  # the adaptive priority's
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
        self._poll_limit_ticks = compiled.thread_poll_limit_ticks
        control[kickloop.K_POLL_LIMIT_TICKS] = self._poll_limit_ticks
        self._ticks_per_second = kernel.ticks_per_us() * 1e6
        #: Batch times (``kickloop.TIMING_*``); written by the kernel, read and zeroed only while the
        #: thread is out of it.
        self.timing = np.zeros((kickloop.TIMING_ROWS, kickloop.TIMING_COLUMNS), np.int64)
        if backend.kick_timing is not None:
            control[kickloop.K_TICKS_PER_MS] = max(1, round(kernel.ticks_per_us() * 1000))
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
        if priority is ThreadPriority.ADAPTIVE and self._thread.native_id is not None:
            self._governor = governor_of(loop)
            self._governor.register(self._thread.native_id, self)

    # -- from the event loop (or, for settle, any other thread) ----------------------------------------------

    @property
    def scheduling(self) -> str | None:
        """The thread's scheduling as it got it ("SCHED_FIFO 1", "normal (SCHED_FIFO 1 not permitted)"),
        with the adaptive policy's view of the host; None before a fixed priority was applied."""
        governor = self._governor
        if governor is not None:
            return f"adaptive, host {'busy' if governor.busy else 'not busy'}: {governor.scheduling}"
        return self._fixed_scheduling

    @property
    def native_id(self) -> int | None:
        """The thread's kernel thread ID (for tools that look at its scheduling)."""
        return self._thread.native_id

    def spare_seconds(self) -> float:
        """CPU seconds spent so far watching the ring beyond the fixed window (the learned windows' cost,
        which the governor counts as idle time: the thread gives it up as soon as anything else runs)."""
        return float(self._control[kickloop.K_POLL_EXTRA_TICKS]) / self._ticks_per_second

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
        if self._governor is not None and self._thread.native_id is not None:
            self._governor.unregister(self._thread.native_id)
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
        poll windows watched and skipped (and the backoffs that skipped them), and the hand-overs of the
        ring to the event loop."""
        control = self._control
        return {
            "handovers": self._handovers,
            "kicks": int(control[kickloop.K_KICKS]),
            "wakeups": int(control[kickloop.K_WAKEUPS]),
            "notified": int(control[kickloop.K_NOTIFIED]),
            "poll_hits": int(control[kickloop.K_POLL_HITS]),
            "poll_backoffs": int(control[kickloop.K_POLL_BACKOFFS]),
            "poll_windows": int(control[kickloop.K_POLL_WINDOWS]),
            "poll_skips": int(control[kickloop.K_POLL_SKIPS]),
            "poll_window_us": round(
                int(control[kickloop.K_POLL_WINDOW_TICKS]) / self._ticks_per_second * 1e6
            ),
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
        self._fixed_scheduling = apply_to_current_thread(self._priority)
        try:
            while self._step():
                pass
        except Exception as exc:  # a bug or an exhausted system: reported where the device's failures go
            log.exception("requestq thread failed")
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody left to tell
                self._loop.call_soon_threadsafe(self._backend.broken, f"requestq thread: {exc!r}")
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
                self._backend.serve_on_loop(self.timing if self._control[kickloop.K_TICKS_PER_MS] else None)
        finally:
            self._handed_back.set()

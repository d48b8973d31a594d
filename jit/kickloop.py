"""The requestq's kick loop: one nogil kernel that waits for kicks, serves them and notifies, in a loop.

``kick_loop`` is what the back-end's requestq thread runs. It blocks in poll(2) on the queue's kick
eventfd and a wake eventfd of the back-end's own, reads the kick, calls
:func:`vhost_iommu.jit.requests.serve_requests` directly, decides the used-buffer notification itself
(the rule of ``SplitQueue.needs_notification``: VRING_AVAIL_F_NO_INTERRUPT, or with EVENT_IDX the
driver's ``used_event``) and writes the call eventfd itself, then optionally watches ``avail.idx`` for a
bounded time before it blocks again. A wake-up costs no Python and no interpreter lock.
It returns to its caller only for:

- a chain ``serve_requests`` stops at (``STOP_PYTHON``, ``STOP_BROKEN``, ``STOP_GROW``, returned as is);
- ``LOOP_PARKED`` or ``LOOP_SETTLED``: the ``K_PARK`` word asked it to (the back-end's thread stops,
  parks for a tool, or waits for everything announced to be served), checked at every batch boundary
  and whenever the wake eventfd rings;
- ``LOOP_KICKED``: with ``K_SERVE`` 0 (the device cannot use the kernel), a kick or a wake-up arrived;
- an fd that failed (``LOOP_KICK_FAILED``, ``LOOP_CALL_FAILED``, ``LOOP_POLL_FAILED``, errno in
  ``K_ERRNO``): the caller reports it.

With ``K_TICKS_PER_MS`` set it also times every batch it serves (the cycle counter around
``serve_requests`` and the notification) into the ``timing`` array: the control channel's latency
histograms (``vhost_iommu.control.instrument.Histogram``: log2 buckets of nanoseconds, per request type,
MIXED, whole batches), kept as integers and absorbed by the control layer whenever the thread is out of
the loop.

libc's poll, read and write and glibc's errno location are called as external symbols the JIT linker
resolves in the running process (LLVM declarations), not through ctypes function pointers: numba refuses
to cache a function that holds a ctypes pointer, and compiling this loop on every start would cost many
seconds. The call fd is a word of ``control`` read before every write, so the back-end can swap it while
the loop is parked; the loop never closes an fd.
"""

from __future__ import annotations

import sys
from typing import Any, Final

import numpy as np
import numpy.typing as npt
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from vhost_iommu import abi
from vhost_iommu.abi import VIRTQ_AVAIL_F_NO_INTERRUPT
from vhost_iommu.jit import barriers, guard, history, libc, requests, rules, tables
from vhost_iommu.jit.barriers import full_fence
from vhost_iommu.jit.caching import cache_on_sources
from vhost_iommu.jit.libc import EAGAIN as _EAGAIN
from vhost_iommu.jit.libc import EINTR as _EINTR
from vhost_iommu.jit.libc import errno as _errno
from vhost_iommu.jit.libc import poll as _poll
from vhost_iommu.jit.libc import read as _read
from vhost_iommu.jit.libc import write as _write
from vhost_iommu.jit.requests import (
    C_REQUEST,
    Q_AVAIL,
    Q_FLAGS,
    Q_NEXT_AVAIL,
    Q_NOTIFY,
    Q_SIGNALLED_USED,
    Q_SIGNALLED_VALID,
    Q_SIZE,
    Q_USED,
    Q_USED_IDX,
    QF_EVENT_IDX,
    R_COMPLETED,
    STOP_BUDGET,
    STOP_EMPTY,
    _cycles,
    _store16,
    serve_requests,
)

I64Array = npt.NDArray[np.int64]

# -- the ``control`` array (int64), shared by the loop and the back-end's thread --------------------------

K_KICK_FD: Final = 0
"""In: the kick eventfd; negative: not watched (poll ignores it), e.g. after it failed."""
K_WAKE_FD: Final = 1
"""In: the back-end's wake eventfd (a doorbell: look at K_PARK, serve again)."""
K_CALL_FD: Final = 2
"""In: the call eventfd, read before every notification; negative: none (notifications are dropped)."""
K_PARK: Final = 3
"""In, read at every batch boundary: ``PARK_*``."""
K_SERVE: Final = 4
"""In: 1 serve the ring; 0 only wait (the device cannot use the kernel) and return LOOP_KICKED."""
K_POLL_TICKS: Final = 5
"""In: after serving, watch avail.idx this many cycle-counter ticks before blocking (0: never)."""
K_ERRNO: Final = 6
"""Out: errno of a LOOP_*_FAILED return."""
K_KICKS: Final = 7
"""Out, cumulative: kicks read (the eventfd's counts)."""
K_WAKEUPS: Final = 8
"""Out, cumulative: returns from a blocking poll."""
K_NOTIFIED: Final = 9
"""Out, cumulative: call-fd writes."""
K_POLL_HITS: Final = 10
"""Out, cumulative: chains found while watching avail.idx after a batch (no kick, no wake-up)."""
K_TICKS_PER_MS: Final = 11
"""In: cycle-counter ticks per millisecond, to time batches into ``timing``; 0: no timing."""
K_POLL_BACKOFFS: Final = 12
"""Out, cumulative: times the poll window was suspended after POLL_MISSES empty windows in a row."""
K_POLL_WINDOWS: Final = 13
"""Out, cumulative: poll windows watched after a batch (caught something or not)."""
K_POLL_SKIPS: Final = 14
"""Out, cumulative: batches after which the window was skipped (the backoff of K_POLL_BACKOFFS)."""
K_POLL_LIMIT_TICKS: Final = 15
"""In, read whenever a window is learned: the longest a learned window may grow to; at or below
K_POLL_TICKS the window stays K_POLL_TICKS (a fixed window)."""
K_POLL_WINDOW_TICKS: Final = 16
"""Out: the window the loop watches now (K_POLL_TICKS, or longer when learned)."""
K_POLL_EXTRA_TICKS: Final = 17
"""Out, cumulative: ticks spent watching beyond K_POLL_TICKS (what the learned windows cost)."""
CONTROL_WORDS: Final = 18

POLL_MISSES: Final = 2
"""Empty poll windows in a row after which the window is skipped for a while."""
POLL_BACKOFF_MAX: Final = 1024
"""Most batches served without a window after a run of empty ones."""

PARK_NO: Final = 0
PARK_NOW: Final = 1
"""Return LOOP_PARKED at the next batch boundary, chains still available or not."""
PARK_SETTLED: Final = 2
"""Return LOOP_SETTLED once the ring is empty and no kick or wake-up is pending (everything announced
before the request was served)."""

# -- why the loop returned (beside serve_requests' STOP_PYTHON, STOP_BROKEN and STOP_GROW) ----------------

LOOP_PARKED: Final = 16
"""K_PARK was PARK_NOW at a batch boundary."""
LOOP_SETTLED: Final = 17
"""K_PARK was PARK_SETTLED, and the ring was empty with no kick or wake-up pending."""
LOOP_KICKED: Final = 18
"""K_SERVE was 0 and a kick or a wake-up came."""
LOOP_KICK_FAILED: Final = 19
"""Reading or polling the kick fd failed (errno in K_ERRNO, 0 for end of file); it is unusable."""
LOOP_CALL_FAILED: Final = 20
"""Writing the call fd failed (errno in K_ERRNO); the notification is lost, as on the event loop."""
LOOP_POLL_FAILED: Final = 21
"""poll(2) or the wake fd failed (errno in K_ERRNO): a bug or an exhausted system, not the guest."""

_POLLIN: Final = 0x001
_POLLERR: Final = 0x008
_POLLHUP: Final = 0x010
_POLLNVAL: Final = 0x020
# struct pollfd {int fd; short events; short revents;} held as two int32 per fd: the second packs the shorts.
_EVENTS_SHIFT: Final = 0 if sys.byteorder == "little" else 16
_REVENTS_SHIFT: Final = 16 - _EVENTS_SHIFT


# -- the ``timing`` array (int64[TIMING_ROWS, TIMING_COLUMNS]): histograms of batch service times ----------

TIMING_KINDS: Final = 6
"""Rows 0-5: the request counter slots (``counts[C_REQUEST + k]``: 0 unserved, then each RequestType)."""
T_MIXED: Final = TIMING_KINDS
"""Row of batches of several types (each request counted with the batch's mean)."""
T_BATCHES: Final = TIMING_KINDS + 1
"""Row of whole batches."""
TIMING_ROWS: Final = TIMING_KINDS + 2
TIMING_BUCKETS: Final = 40
"""Columns 0-39: bucket k counts durations in [2**k, 2**(k+1)) ns (the last one: everything longer)."""
T_COUNT: Final = TIMING_BUCKETS
T_TOTAL_NS: Final = TIMING_BUCKETS + 1
T_MIN_NS: Final = TIMING_BUCKETS + 2
T_MAX_NS: Final = TIMING_BUCKETS + 3
TIMING_COLUMNS: Final = TIMING_BUCKETS + 4


@njit(cache=True, nogil=True)
def _histogram_add(row: I64Array, ns: int, weight: int) -> None:
    """``Histogram.add`` on one row of ``timing``."""
    bucket = -1
    rest = ns
    while rest > 0:
        rest >>= 1
        bucket += 1
    bucket = min(max(bucket, 0), TIMING_BUCKETS - 1)
    row[bucket] += weight
    if row[T_COUNT] == 0 or ns < row[T_MIN_NS]:
        row[T_MIN_NS] = ns
    if ns > row[T_MAX_NS]:
        row[T_MAX_NS] = ns
    row[T_COUNT] += weight
    row[T_TOTAL_NS] += ns * weight


@njit(cache=True, nogil=True)
def record_batch(timing: I64Array, ns: int, before: I64Array, after: I64Array) -> None:
    """Count one batch that took ``ns``: ``before`` and ``after`` are the request counter slots (TIMING_KINDS
    words) around it. Its time goes to the type of its requests, divided among them, or to MIXED if they
    had several types (the control layer's rule on the event loop); a batch that served nothing is not
    counted."""
    kind = -1
    total = 0
    for slot in range(TIMING_KINDS):
        served = after[slot] - before[slot]
        if served:
            kind = slot if total == 0 else T_MIXED
            total += served
    if total == 0:
        return
    _histogram_add(timing[T_BATCHES], ns, 1)
    _histogram_add(timing[kind], ns // total, total)


@njit(cache=True, nogil=True)
def _elapsed_ns(began: np.uint64, ticks_per_ms: int) -> int:
    ticks = int(_cycles() - began)
    if ticks >= 1 << 43:  # about 45 minutes at 3 GHz: ticks * 10**6 would overflow
        return (ticks // ticks_per_ms) * 1_000_000
    return (ticks * 1_000_000) // ticks_per_ms


# -- atomics -----------------------------------------------------------------------------------------------


def _load_acquire_typer(typingctx: Any, address: Any) -> Any:
    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        # Atomic: a word another thread writes while this loop spins must be read again every time.
        return builder.load_atomic(builder.inttoptr(args[0], ir.IntType(64).as_pointer()), "acquire", 8)

    return types.int64(types.uint64), codegen


def _volatile_load16_codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
    # Atomic (monotonic): the driver writes these words while the poll window watches them, so every
    # iteration must load them again.
    pointer = builder.inttoptr(args[0], ir.IntType(16).as_pointer())
    return builder.zext(builder.load_atomic(pointer, "monotonic", 2), ir.IntType(64))


def _watched16_typer(typingctx: Any, address: Any) -> Any:
    return types.int64(types.uint64), _volatile_load16_codegen


# Typed as Any: numba supplies the typing context argument, so the Python-level signatures mislead mypy.
_load_acquire: Any = intrinsic(_load_acquire_typer)
_watched16: Any = intrinsic(_watched16_typer)


# -- the notification rule (SplitQueue.needs_notification) ---------------------------------------------------


@njit(cache=True, nogil=True)
def _needs_notification(queue: I64Array) -> bool:
    """``SplitQueue.needs_notification`` on the same words of the ring-state record."""
    pushed_total = queue[Q_USED_IDX]
    signalled = queue[Q_SIGNALLED_USED]
    queue[Q_SIGNALLED_USED] = pushed_total
    pushed = pushed_total - signalled
    old = signalled & 0xFFFF
    new = pushed_total & 0xFFFF
    if pushed == 0:
        return False
    # used.idx must be visible before the driver's suppression state is read, or a driver that re-enabled
    # interrupts and then checked used.idx could miss both our update and our notification.
    full_fence()
    avail = np.uint64(queue[Q_AVAIL])
    if not queue[Q_FLAGS] & QF_EVENT_IDX:
        return bool(not _watched16(avail) & VIRTQ_AVAIL_F_NO_INTERRUPT)
    was_valid = queue[Q_SIGNALLED_VALID]
    queue[Q_SIGNALLED_VALID] = 1
    if not was_valid or pushed >= 0x10000:
        return True  # what the driver saw before is unknown: a spurious interrupt is harmless
    used_event = _watched16(avail + np.uint64(4 + 2 * queue[Q_SIZE]))
    due: bool = ((new - used_event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)
    return due


@njit(cache=True, nogil=True)
def _learn_window(control: I64Array, window: np.int64, gap: np.int64) -> tuple[np.int64, bool]:
    """The next window after one that missed by ``gap`` ticks (from its end to the batch that served the
    chain it missed), and whether the miss was a far one (beyond what a window may grow to).

    The rule of Linux's halt polling, applied to the guest's gaps between requests: a miss the limit
    could have covered grows the window to cover it with a quarter to spare (a guest at queue depth 1
    has the same gap every time, so one miss teaches it); a far miss halves it, down to K_POLL_TICKS."""
    base = control[K_POLL_TICKS]
    limit = control[K_POLL_LIMIT_TICKS]
    reach = window + gap
    if limit > base and reach <= limit:
        return min(limit, reach + reach // 4), False
    return max(base, min(window, limit) // 2), True


@njit(cache=True, nogil=True)
def _await_chain(control: I64Array, queue: I64Array, park_word: np.uint64, window: np.int64) -> bool:
    """Watch avail.idx for up to ``window`` ticks with kicks suppressed (EVENT_IDX); True if a chain came.
    The caller must call serve_requests next whatever the answer: it asks for kicks again (and looks once
    more) when it finds the ring empty, and nothing else undoes the suppression."""
    avail_idx = np.uint64(queue[Q_AVAIL]) + np.uint64(2)
    next_avail = queue[Q_NEXT_AVAIL]
    if queue[Q_FLAGS] & QF_EVENT_IDX and queue[Q_NOTIFY]:
        # avail_event one behind next_avail: vring_need_event is false for every index the driver publishes.
        size = queue[Q_SIZE]
        _store16(np.uint64(queue[Q_USED]) + np.uint64(4 + 8 * size), np.uint64((next_avail - 1) & 0xFFFF))
        full_fence()
    began = _cycles()
    ticks = np.uint64(window)
    while _cycles() - began < ticks:
        if _watched16(avail_idx) != next_avail:
            control[K_POLL_HITS] += 1
            return True
        if _load_acquire(park_word) != PARK_NO:
            return False
    return False


# -- the loop -----------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def kick_loop(control: I64Array, timing: I64Array, counts: I64Array, *arguments: Any) -> int:
    """Serve the requestq until something needs the caller; ``arguments`` are ``serve_requests``',
    passed through whatever they are (the first is the ring-state record, ``Q_*`` words, whose indices
    both kernels advance in place; in the second, the parameter words, ``R_BUDGET`` bounds one batch,
    after which the loop notifies and goes on). ``counts`` is the counts
    array among them (the timing attributes each batch by its request counts); ``timing`` gathers the
    batch times when ``K_TICKS_PER_MS`` is set. Returns a STOP_* or LOOP_* code."""
    queue = arguments[0]
    params = arguments[1]
    ticks_per_ms = control[K_TICKS_PER_MS]
    requests_seen = counts[C_REQUEST : C_REQUEST + TIMING_KINDS]
    before = np.zeros(TIMING_KINDS, np.int64)
    began = np.uint64(0)
    fds = np.zeros(4, np.int32)  # two struct pollfd: the kick fd, the wake fd
    word = np.ones(1, np.uint64)  # eventfd I/O: 8 bytes
    fds_address = np.uint64(fds.ctypes.data)
    word_address = np.uint64(word.ctypes.data)
    park_word = np.uint64(control.ctypes.data) + np.uint64(8 * K_PARK)
    serve = control[K_SERVE] != 0
    served = serve  # serve once on entry: kicks may have come while the caller held the ring
    # Adaptive polling: a window pays only while it catches the guest's next request (a core to spare);
    # on a busy host it rarely does and its spinning takes the CPU the vCPU needs. A window that misses is
    # learned from when the chain it missed is served (_learn_window): a near miss grows the next window,
    # a far one shrinks it and counts; after POLL_MISSES far misses in a row the next batches skip the
    # window, twice as many each time up to POLL_BACKOFF_MAX; a window that catches a chain starts over.
    window = control[K_POLL_TICKS]
    control[K_POLL_WINDOW_TICKS] = window
    missed_at = np.uint64(0)
    learning = False  # a window missed; the next batch that serves a chain says by how much
    poll_misses = 0
    poll_backoff = 1
    poll_skip = 0
    while True:
        if served:
            if ticks_per_ms:
                before[:] = requests_seen
                began = _cycles()
            arrived = _cycles()
            reason = serve_requests(*arguments)
            done = np.int64(params[R_COMPLETED])
            if learning and done:
                learning = False
                window, far = _learn_window(control, window, np.int64(arrived - missed_at))
                control[K_POLL_WINDOW_TICKS] = window
                if far:
                    poll_misses += 1
                    if poll_misses >= POLL_MISSES:
                        poll_misses = 0
                        poll_skip = poll_backoff
                        control[K_POLL_BACKOFFS] += 1
                        poll_backoff = min(2 * poll_backoff, POLL_BACKOFF_MAX)
            if reason != STOP_EMPTY and reason != STOP_BUDGET:
                if ticks_per_ms:  # what the kernel served before the chain it hands over is a batch
                    record_batch(timing, _elapsed_ns(began, ticks_per_ms), before, requests_seen)
                return reason  # the notification is decided after the caller served that chain
            if _needs_notification(queue):
                call_fd = control[K_CALL_FD]
                if call_fd >= 0:
                    word[0] = 1
                    if _write(call_fd, word_address, 8) < 0:
                        error = _errno()
                        if error != _EAGAIN:  # EAGAIN: the counter is full, a notification is pending anyway
                            control[K_ERRNO] = error
                            return LOOP_CALL_FAILED
                    control[K_NOTIFIED] += 1
            if ticks_per_ms:
                record_batch(timing, _elapsed_ns(began, ticks_per_ms), before, requests_seen)
            park = _load_acquire(park_word)
            if park == PARK_NOW:
                return LOOP_PARKED
            if reason == STOP_BUDGET:
                continue  # the thread is this ring's own: nobody else to let through
            if done and control[K_POLL_TICKS] > 0 and park == PARK_NO:
                if poll_skip > 0:
                    poll_skip -= 1
                    control[K_POLL_SKIPS] += 1
                else:
                    watched = _cycles()
                    caught = _await_chain(control, queue, park_word, window)
                    missed_at = _cycles()
                    extra = min(np.int64(missed_at - watched), window) - control[K_POLL_TICKS]
                    if extra > 0:  # only a learned window's (a fixed one's overrun is not)
                        control[K_POLL_EXTRA_TICKS] += extra
                    control[K_POLL_WINDOWS] += 1  # after the window: a watcher sees it over
                    learning = not caught
                    if caught:
                        poll_misses = 0
                        poll_backoff = 1
                    # Serve what came, or find the ring empty: serve_requests then asks for kicks again
                    # (the window suppressed them) and looks once more before the loop blocks.
                    continue
        park = _load_acquire(park_word)
        if park == PARK_NOW:
            return LOOP_PARKED
        # Block until a kick or a wake-up; when settling, only look whether one is pending.
        fds[0] = np.int32(control[K_KICK_FD])
        fds[1] = np.int32(_POLLIN << _EVENTS_SHIFT)
        fds[2] = np.int32(control[K_WAKE_FD])
        fds[3] = np.int32(_POLLIN << _EVENTS_SHIFT)
        ready = _poll(fds_address, 2, 0 if park == PARK_SETTLED else -1)
        if ready < 0:
            error = _errno()
            if error == _EINTR:
                served = False
                continue
            control[K_ERRNO] = error
            return LOOP_POLL_FAILED
        if ready == 0:
            return LOOP_SETTLED  # served to empty, nothing pending
        control[K_WAKEUPS] += 1
        kick_events = (np.int64(fds[1]) >> _REVENTS_SHIFT) & 0xFFFF
        wake_events = (np.int64(fds[3]) >> _REVENTS_SHIFT) & 0xFFFF
        if wake_events and _read(control[K_WAKE_FD], word_address, 8) < 0:
            error = _errno()
            if error != _EAGAIN and error != _EINTR:
                control[K_ERRNO] = error
                return LOOP_POLL_FAILED
        if kick_events:
            got = _read(control[K_KICK_FD], word_address, 8)
            if got > 0:
                control[K_KICKS] += np.int64(word[0]) if got == 8 else 1
            elif got == 0:
                control[K_ERRNO] = 0
                return LOOP_KICK_FAILED  # end of file: not an eventfd the front-end can still write
            else:
                error = _errno()
                gone = kick_events & (_POLLERR | _POLLHUP | _POLLNVAL)
                if (error != _EAGAIN and error != _EINTR) or (error == _EAGAIN and gone):
                    control[K_ERRNO] = error
                    return LOOP_KICK_FAILED
        if not serve:
            return LOOP_KICKED
        served = True


def warm_up() -> None:
    """Compile ``kick_loop`` with the argument types the back-end passes: ``serve_requests``' warm-up
    arguments (an empty ring) and the loop told to park at once (it serves once, finds nothing and returns
    LOOP_PARKED without any system call)."""
    control = np.zeros(CONTROL_WORDS, np.int64)
    control[[K_KICK_FD, K_WAKE_FD, K_CALL_FD]] = -1
    control[K_PARK] = PARK_NOW
    control[K_SERVE] = 1
    control[K_TICKS_PER_MS] = 1
    timing = np.zeros((TIMING_ROWS, TIMING_COLUMNS), np.int64)
    with requests.warm_up_arguments() as arguments:
        reason = kick_loop(control, timing, np.zeros(requests.COUNT_WORDS, np.int64), *arguments)
    assert reason == LOOP_PARKED
    record_batch(timing, 0, np.zeros(TIMING_KINDS, np.int64), np.zeros(TIMING_KINDS, np.int64))


# kick_loop compiles serve_requests, the rules and the table kernels into itself.
cache_on_sources(globals(), abi, requests, rules, tables, barriers, guard, history, libc)

"""The scheduling class of the requestq thread: how fast it gets a CPU when the guest kicks.

The Linux driver waits for each IOMMU request by spinning on the used ring, so every microsecond between the
kick and the thread running is the guest's. QEMU's built-in device serves in the vCPU thread that kicked;
this back-end's thread has to be woken and scheduled first. What that costs depends on the host
(docs/performance.md, "Busy host"):

- On a host with a CPU to spare, the ordinary class wakes the thread on an idle CPU, beside the vCPU.
  SCHED_FIFO is worse there: a real-time thread wakes on the CPU it last ran on and preempts whatever runs
  there, which may be the very vCPU that waits for it (measured: 1.8-2.9x the built-in device where the
  ordinary class gave 0.9-1.8x).
- On a host whose CPUs are all busy, the ordinary class leaves the woken thread waiting behind the other
  runnable threads (4.8x the built-in device with two CPU hogs), and SCHED_FIFO, which runs it at once,
  is far better (1.5x). A lower nice value does not help (3.9x).

So the default, ``adaptive``, follows the host: a :class:`LoadGovernor` on the event loop looks at the
host's idle time (``/proc/stat``) four times a second and moves every requestq thread to SCHED_FIFO while
the host has no idle CPU to wake it on (less than a quarter of a CPU idle in five of the last eight
looks), back to the ordinary class when it has (two or fewer of the last eight). (Counting runnable
threads instead can call a quiet host busy: the spinning vCPU and the polling thread alone make two.)
The fixed choices: ``realtime`` (SCHED_FIFO at the lowest real-time priority always), ``high`` (nice
-10), ``normal`` (whatever the process has).

SCHED_FIFO is safe to hand this thread: it sleeps in poll(2) whenever the ring is empty and its poll windows
are bounded and back off, so it takes a CPU only for the requests it serves, and Linux's real-time throttling
(``kernel.sched_rt_runtime_us``) keeps a share of every CPU for ordinary threads whatever it does. It needs
CAP_SYS_NICE or an RLIMIT_RTPRIO of at least 1 (nice -10: RLIMIT_NICE of 30). A priority the process may not
take falls back to the ordinary class and says so once in the log; the thread runs either way.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import errno
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger(__name__)

_FIFO_PRIORITY = 1
_HIGH_NICE = -10
REALTIME_NAME = f"SCHED_FIFO {_FIFO_PRIORITY}"

#: Seconds between two looks at the host's idle time.
SAMPLE_PERIOD = 0.25
#: How many recent looks decide, and how many of them must see a busy host to raise the threads (and at
#: most how many may, for them to go back): two seconds, with hysteresis.
SAMPLE_WINDOW = 8
BUSY_TO_RAISE = 5
BUSY_TO_LOWER = 2


class ThreadPriority(enum.Enum):
    ADAPTIVE = "adaptive"
    REALTIME = "realtime"
    HIGH = "high"
    NORMAL = "normal"


DEFAULT_PRIORITY = ThreadPriority.ADAPTIVE

_warned: set[str] = set()
_warned_lock = threading.Lock()


def _warn_once(wanted: str, why: str) -> None:
    with _warned_lock:
        first = wanted not in _warned
        _warned.add(wanted)
    if first:
        limit = "ulimit -e 30" if wanted.startswith("nice") else "ulimit -r 1"
        log.warning(
            "requestq thread: %s %s (needs CAP_SYS_NICE or `%s`); it runs at normal priority, "
            "slower on a busy host",
            wanted,
            why,
            limit,
        )


def _set(thread_id: int, priority: ThreadPriority) -> str:
    """Give the thread ``thread_id`` (0: the calling one) ``priority`` (not ADAPTIVE); what it got."""
    wanted = {ThreadPriority.REALTIME: REALTIME_NAME, ThreadPriority.HIGH: f"nice {_HIGH_NICE}"}.get(priority)
    try:
        if priority is ThreadPriority.REALTIME:
            # Linux schedules threads: this changes the one thread alone, not the process.
            os.sched_setscheduler(thread_id, os.SCHED_FIFO, os.sched_param(_FIFO_PRIORITY))
        elif priority is ThreadPriority.HIGH:
            os.setpriority(os.PRIO_PROCESS, thread_id or threading.get_native_id(), _HIGH_NICE)
        elif os.sched_getscheduler(thread_id) != os.SCHED_OTHER:
            os.sched_setscheduler(thread_id, os.SCHED_OTHER, os.sched_param(0))
    except OSError as exc:
        why = "not permitted" if exc.errno in (errno.EPERM, errno.EACCES) else os.strerror(exc.errno or 0)
        _warn_once(wanted or "normal", why)
        return f"normal ({wanted} {why})"
    return wanted or "normal"


def apply_to_current_thread(priority: ThreadPriority) -> str:
    """Give the calling thread a fixed ``priority`` (ADAPTIVE: leave it to the governor) and return what it
    got, for people: "SCHED_FIFO 1", "nice -10", "normal", or "normal (SCHED_FIFO 1 not permitted)"."""
    if priority is ThreadPriority.ADAPTIVE:
        return "normal"
    return _set(0, priority)


#: Below this many CPUs' worth of idle time between two looks, the host counts as busy: a woken thread of
#: the ordinary class would find no idle CPU to run on.
IDLE_CPUS_BUSY = 0.25


def cpu_times() -> tuple[int, int]:
    """(idle, total) clock ticks of all CPUs so far, from ``/proc/stat``'s first line (idle counts iowait)."""
    with open("/proc/stat", "rb") as stat:
        fields = [int(value) for value in stat.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal (guest and guest_nice are inside user and nice)
    return fields[3] + fields[4], sum(fields[:8])


class IdleSampler:
    """Whether the host was busy since the last call: less than IDLE_CPUS_BUSY CPUs' worth of idle time,
    counting as idle the ``spare`` CPU seconds the caller's own threads spent watching for work they would
    have given up to anyone (a learned poll window's spinning: it must not make the host look busy and so
    switch itself off). The first call compares with the moment the sampler was made."""

    def __init__(
        self,
        read: Callable[[], tuple[int, int]] = cpu_times,
        cpus: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._read = read
        self._clock = clock
        self._cpus = cpus or len(os.sched_getaffinity(0))
        self._last = read()
        self._last_time = clock()

    def __call__(self, spare: float = 0.0) -> bool:
        idle, total = self._read()
        now = self._clock()
        last_idle, last_total = self._last
        elapsed = now - self._last_time
        self._last, self._last_time = (idle, total), now
        if total <= last_total or elapsed <= 0:
            return False  # no tick went by: nothing to go by
        idle_cpus = (idle - last_idle) / (total - last_total) * self._cpus + spare / elapsed
        return idle_cpus < IDLE_CPUS_BUSY


class GovernedThread(Protocol):
    """What the governor asks of a thread beside its ID: the CPU seconds it spent so far watching for work
    beyond its fixed poll window, which count as idle (a learned window that made the host look busy
    would raise the thread, and a real-time thread that spins takes the CPU from the vCPU it waits for)."""

    def spare_seconds(self) -> float: ...


class LoadGovernor:
    """Moves the requestq threads of one event loop to SCHED_FIFO while the host is busy and back when it is
    not (the ``adaptive`` policy). Ticks on the loop only while it has threads, so an idle process that
    serves no guest costs nothing.

    ``sample`` says whether the host was busy since the last look (default: :class:`IdleSampler`, less
    than a quarter of a CPU idle); tests give their own and drive :meth:`tick` by hand."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, sample: Callable[[float], bool] | None = None
    ) -> None:
        self._loop = loop
        self._sample = sample or IdleSampler()
        self._samples: collections.deque[bool] = collections.deque(maxlen=SAMPLE_WINDOW)
        self._threads: dict[int, GovernedThread | None] = {}
        self._spare = 0.0  # the threads' spare_seconds() at the last look, summed
        self._timer: asyncio.TimerHandle | None = None
        self.busy = False
        self.scheduling = "normal"  # what the threads got at the last change
        self.changes = 0

    def register(self, thread_id: int, thread: GovernedThread | None = None) -> None:
        """Govern the thread ``thread_id`` from now on (on the loop)."""
        self._threads[thread_id] = thread
        if thread is not None:
            self._spare += thread.spare_seconds()
        if self.busy:
            _set(thread_id, ThreadPriority.REALTIME)
        if self._timer is None:
            self._timer = self._loop.call_later(SAMPLE_PERIOD, self._on_timer)

    def unregister(self, thread_id: int) -> None:
        thread = self._threads.pop(thread_id, None)
        if thread is not None:
            self._spare -= thread.spare_seconds()
        if not self._threads:
            self._spare = 0.0
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._samples.clear()
            self.busy = False
            self.scheduling = "normal"

    def _on_timer(self) -> None:
        self._timer = None
        self.tick()
        if self._threads:
            self._timer = self._loop.call_later(SAMPLE_PERIOD, self._on_timer)

    def tick(self) -> None:
        """One look at the host; changes the threads' class when the recent looks say so."""
        spare = sum(thread.spare_seconds() for thread in self._threads.values() if thread is not None)
        spare_since, self._spare = spare - self._spare, spare
        try:
            self._samples.append(self._sample(max(0.0, spare_since)))
        except (OSError, ValueError, IndexError):
            return  # no /proc: nothing to go by, nothing changes
        busy_looks = sum(self._samples)
        if not self.busy and busy_looks >= BUSY_TO_RAISE:
            self._change(busy=True)
        elif self.busy and busy_looks <= BUSY_TO_LOWER:
            self._change(busy=False)

    def _change(self, *, busy: bool) -> None:
        self.busy = busy
        self.changes += 1
        priority = ThreadPriority.REALTIME if busy else ThreadPriority.NORMAL
        for thread_id in list(self._threads):
            self.scheduling = _set(thread_id, priority)
        log.info("requestq threads: host %s, now %s", "busy" if busy else "not busy", self.scheduling)


_governors: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoadGovernor] = weakref.WeakKeyDictionary()


def governor_of(loop: asyncio.AbstractEventLoop) -> LoadGovernor:
    """The loop's one governor (created on first use; call on the loop)."""
    governor = _governors.get(loop)
    if governor is None:
        governor = _governors[loop] = LoadGovernor(loop)
    return governor

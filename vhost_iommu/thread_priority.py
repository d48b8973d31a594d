"""The scheduling class of the requestq thread: how fast it gets a CPU when the guest kicks a busy host.

The Linux driver waits for each IOMMU request by spinning on the used ring, so every microsecond between the
kick and the thread running is the guest's. QEMU's built-in device serves in the vCPU thread that kicked;
this back-end's thread has to be woken and scheduled first. On an idle host that is a few microseconds; on
a host whose CPUs are all busy the thread waits behind the other runnable threads for its turn (measured
in docs/performance.md, "Busy host").

- ``realtime`` (the default): SCHED_FIFO at the lowest real-time priority. The thread runs as soon as it
  is woken, ahead of every ordinary thread, and it sleeps in poll(2) whenever the ring is empty, so it
  takes a CPU only for the requests it serves and its short bounded poll windows. Linux's real-time
  throttling (``kernel.sched_rt_runtime_us``) keeps a share of every CPU for ordinary threads whatever
  it does. It needs CAP_SYS_NICE or an RLIMIT_RTPRIO of at least 1.
- ``high``: the ordinary class at nice -10 (about ten times the CPU share of a nice-0 thread when it
  competes). Needs CAP_SYS_NICE or an RLIMIT_NICE of at least 30.
- ``normal``: whatever the process has.

A priority the process may not take falls back to ``normal`` and says so once in the log; the thread runs
either way.
"""

from __future__ import annotations

import enum
import errno
import logging
import os
import threading

log = logging.getLogger(__name__)

_FIFO_PRIORITY = 1
_HIGH_NICE = -10


class ThreadPriority(enum.Enum):
    REALTIME = "realtime"
    HIGH = "high"
    NORMAL = "normal"


DEFAULT_PRIORITY = ThreadPriority.REALTIME

_warned: set[ThreadPriority] = set()
_warned_lock = threading.Lock()


def apply_to_current_thread(priority: ThreadPriority) -> str:
    """Give the calling thread ``priority`` and return what it got, for people: "SCHED_FIFO 1",
    "nice -10", "normal", or "normal (SCHED_FIFO not permitted: ...)" after a fallback."""
    if priority is ThreadPriority.NORMAL:
        return "normal"
    try:
        if priority is ThreadPriority.REALTIME:
            # pid 0 is the calling thread: Linux schedules threads, and this changes this one alone.
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(_FIFO_PRIORITY))
            return f"SCHED_FIFO {_FIFO_PRIORITY}"
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), _HIGH_NICE)
        return f"nice {_HIGH_NICE}"
    except OSError as exc:
        realtime = priority is ThreadPriority.REALTIME
        wanted = f"SCHED_FIFO {_FIFO_PRIORITY}" if realtime else f"nice {_HIGH_NICE}"
        why = "not permitted" if exc.errno in (errno.EPERM, errno.EACCES) else os.strerror(exc.errno or 0)
        with _warned_lock:
            first = priority not in _warned
            _warned.add(priority)
        if first:
            limit = "ulimit -r 1" if realtime else "ulimit -e 30"
            log.warning(
                "requestq thread: %s %s (needs CAP_SYS_NICE or `%s`); it runs at normal priority, "
                "slower on a busy host",
                wanted,
                why,
                limit,
            )
        return f"normal ({wanted} {why})"

"""One guest boot per back-end kind running the VFIO workloads; what it printed, checked.

Every kind boots the same guest on the same QEMU with the same endpoint (pci-testdev at 00:04.0 bound to
vfio-pci) and the IOMMU at the same address; only the IOMMU differs:

- ``builtin``: QEMU's own ``virtio-iommu-pci``, whose requests run in the vCPU thread that notifies;
- ``vhost-iommu``: the vhost-user device served from this process (:class:`VirtioIommuBackend`);
- ``empty``: the same vhost-user path with a device that does no work (:class:`EmptyBackend`);
- ``vhost-iommu-python`` (optional): vhost-iommu with its Python request path instead of the compiled one;
- ``vhost-iommu-thread``, ``vhost-iommu-loop``, ``empty-thread``, ``empty-loop`` (optional): vhost-iommu
  and the floor with the requestq served by the kick thread or by the event loop, whichever is default;
- ``vhost-iommu-realtime``, ``vhost-iommu-high``, ``vhost-iommu-normal`` (optional): the kick thread
  always SCHED_FIFO, at nice -10 or at normal priority instead of the default adaptive policy
  (`vhost_iommu.thread_priority`);
- ``vhost-iommu-no-poll`` (optional): vhost-iommu with no poll window (``--poll-us 0``), to compare with
  the default adaptive window in the same run.

QEMU's built-in device has 256-entry queues while the generic vhost-user device defaults to 64; the
vhost-user runs get ``vq_size`` (256 by default) so that both batch the same number of requests per
notification when the driver fills the ring.
"""

from __future__ import annotations

import os
import re
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from vhost_iommu.bench.empty import EmptyBackend
from vhost_iommu.bench.results import (
    BUILTIN,
    EMPTY,
    EMPTY_LOOP,
    EMPTY_THREAD,
    VHOST_IOMMU,
    VHOST_IOMMU_HIGH,
    VHOST_IOMMU_LOOP,
    VHOST_IOMMU_NO_POLL,
    VHOST_IOMMU_NORMAL,
    VHOST_IOMMU_PYTHON,
    VHOST_IOMMU_REALTIME,
    VHOST_IOMMU_THREAD,
    Figure,
    Metric,
    figures_from_lines,
    kernel_warnings,
    stalls,
)
from vhost_iommu.device import Topology
from vhost_iommu.lab import Lab, LabConfig, LabError
from vhost_iommu.provision.errors import ProvisionError
from vhost_iommu.qemu import CommandError, IommuKind
from vhost_iommu.thread_priority import ThreadPriority
from vhost_iommu.virtio_iommu import VirtioIommuBackend

WORKLOADS = ("pairs", "bulk", "mixed", "scatter")
# The lines that end a workload (VFIO_MIXED: the first of its per-size lines), or the job.
_PROGRESS = re.compile(
    r"(?P<marker>VHOST_IOMMU_JOB_START|VHOST_IOMMU_JOB_DONE"
    r"|VFIO_PAIRS |VFIO_BULK_UNMAP |VFIO_MIXED |VFIO_SCATTER |VFIO_ERROR )"
)


@dataclass(frozen=True)
class BenchPlan:
    """What each boot runs: the guest's vfio-bench items (``workload:count``) in order."""

    pairs: int = 2000
    bulk: Sequence[int] = (4096, 65536)
    mixed: int = 700
    scatter: Sequence[int] = (4096, 65536)
    workloads: Sequence[str] = WORKLOADS
    vq_size: int = 256
    # The vhost-user back-ends' poll window after a batch (VirtioIommuBackend(poll_us=...)); None: the
    # back-end's default (the kick thread's adaptive window), 0: none.
    poll_us: float | None = None
    # Seconds the guest may stay silent between two workload lines (a boot included).
    step_timeout: float = 300.0

    def items(self) -> list[str]:
        """The guest's ``vhost_iommu.bench`` items, one per workload run."""
        items: list[str] = []
        for workload in self.workloads:
            if workload == "pairs":
                items.append(f"pairs:{self.pairs}")
            elif workload == "bulk":
                items += [f"bulk:{count}" for count in self.bulk]
            elif workload == "mixed":
                items.append(f"mixed:{self.mixed}")
            elif workload == "scatter":
                items += [f"scatter:{count}" for count in self.scatter]
            else:
                raise ValueError(f"unknown workload {workload!r} (known: {', '.join(WORKLOADS)})")
        return items


def lab_config(backend: str, plan: BenchPlan) -> LabConfig:
    """The lab of one back-end kind; the guest side is identical for all of them."""
    params = {"count": str(plan.pairs), "bench": ",".join(plan.items())}
    if backend == BUILTIN:
        return LabConfig(job="vfio-bench", params=params, iommu=IommuKind.BUILTIN, control=False)
    poll_us = plan.poll_us
    factories: dict[str, Callable[[Topology], VirtioIommuBackend]] = {
        VHOST_IOMMU: lambda topology: VirtioIommuBackend(topology, poll_us=poll_us),
        EMPTY: lambda topology: EmptyBackend(topology, poll_us=poll_us),
        VHOST_IOMMU_PYTHON: lambda topology: VirtioIommuBackend(topology, request_path="python"),
        VHOST_IOMMU_THREAD: lambda topology: VirtioIommuBackend(topology, kick_thread=True, poll_us=poll_us),
        VHOST_IOMMU_LOOP: lambda topology: VirtioIommuBackend(topology, kick_thread=False, poll_us=poll_us),
        EMPTY_THREAD: lambda topology: EmptyBackend(topology, kick_thread=True, poll_us=poll_us),
        EMPTY_LOOP: lambda topology: EmptyBackend(topology, kick_thread=False, poll_us=poll_us),
        VHOST_IOMMU_REALTIME: lambda topology: VirtioIommuBackend(
            topology, poll_us=poll_us, kick_thread_priority=ThreadPriority.REALTIME
        ),
        VHOST_IOMMU_HIGH: lambda topology: VirtioIommuBackend(
            topology, poll_us=poll_us, kick_thread_priority=ThreadPriority.HIGH
        ),
        VHOST_IOMMU_NORMAL: lambda topology: VirtioIommuBackend(
            topology, poll_us=poll_us, kick_thread_priority=ThreadPriority.NORMAL
        ),
        VHOST_IOMMU_NO_POLL: lambda topology: VirtioIommuBackend(topology, poll_us=0),
    }
    if backend not in factories:
        raise ValueError(f"unknown back-end {backend!r}")
    # -global reaches the vhost-user-test-device inside the -pci proxy, which has no vq_size of its own.
    queue_size = ("-global", f"vhost-user-test-device.vq_size={plan.vq_size}") if plan.vq_size else ()
    return LabConfig(
        job="vfio-bench",
        params=params,
        iommu=IommuKind.VHOST_USER,
        backend_factory=factories[backend],
        extra_qemu_args=queue_size,
        # With the event loop serving (the -loop back-ends) the control channel times every kick in
        # Python: a cost the measured device would not have. (The kick thread times its batches itself.)
        control=False,
    )


@dataclass
class RunOutcome:
    """One boot of one back-end kind: its figures, the kernel's warnings, and what went wrong if anything."""

    backend: str
    repeat: int
    figures: dict[Metric, Figure] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    stalls: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    job_rc: int | None = None
    seconds: float = 0.0
    load_before: tuple[float, float, float] = (0.0, 0.0, 0.0)
    load_after: tuple[float, float, float] = (0.0, 0.0, 0.0)
    request_counters: dict[str, int] = field(default_factory=dict)
    # What the requestq thread's kick loop counted (kicks, wake-ups, notifications, poll hits); empty
    # when the event loop served the requestq.
    kick_counters: dict[str, int] = field(default_factory=dict)
    # The requestq thread's scheduling at the job's end (KickThread.scheduling): the adaptive policy's
    # view of the host and the class it gave the thread.
    kick_scheduling: str | None = None
    # CPU seconds of each thread of QEMU ("qemu: <name>") and of this process ("bench: <name>") from the
    # start of the guest's job to its end: who used the two cores while the workloads ran.
    thread_cpu: dict[str, float] = field(default_factory=dict)
    # The requestq size the vhost-user device was given (0: not a vhost-user run, or never seen).
    queue_size: int = 0
    log: Path | None = None

    @property
    def failed(self) -> bool:
        return bool(self.errors or self.stalls) or self.job_rc != 0


def check(outcome: RunOutcome, lines: Sequence[str], plan: BenchPlan) -> None:
    """Fill in the figures and warnings from the console, and every reason to call the run failed."""
    outcome.figures = figures_from_lines(lines)
    outcome.warnings = kernel_warnings(lines)
    outcome.stalls = stalls(outcome.warnings)
    for marker in ("VFIO_ERROR", "VHOST_IOMMU_ERROR"):
        outcome.errors += [line[line.index(marker) :] for line in lines if marker in line]
    workloads = {metric.workload for metric in outcome.figures}
    expected = {
        "pairs": ["pairs"],
        "bulk": ["bulk-map", "bulk-unmap"],
        "mixed": ["mixed"],
        "scatter": ["scatter-map", "scatter-unmap"],
    }
    for workload in plan.workloads:
        missing = [name for name in expected[workload] if name not in workloads]
        if missing:
            outcome.errors.append(f"no {', '.join(missing)} figures in the guest's output")
    if outcome.job_rc is None:
        outcome.errors.append("the guest never reported the end of its job")
    elif outcome.job_rc != 0:
        outcome.errors.append(f"the guest's job failed (rc={outcome.job_rc})")


def _request_queue_size(lab: Lab) -> int:
    # The guest has bound the IOMMU driver by the job's start, so the ring is set up; the size is a plain
    # attribute set once per ring, read here from the caller's thread.
    context = lab.backend().context
    ring = context.queue(0) if context is not None else None
    return ring.size if ring is not None else 0


def run_once(
    backend: str,
    plan: BenchPlan,
    repeat: int,
    *,
    log: Path | None = None,
    on_step: Callable[[str], None] = lambda step: None,
) -> RunOutcome:
    """Boot the guest with ``backend``, run the plan's workloads to the end of the job, power off.

    ``on_step`` is told what the guest is doing now ("booting", then the workload item running). Failures
    of QEMU, the guest or the back-end are recorded in the outcome, not raised.
    """
    outcome = RunOutcome(backend=backend, repeat=repeat, log=log, load_before=os.getloadavg())
    started = time.monotonic()
    items = plan.items()
    lines: Sequence[str] = ()
    on_step("booting")
    try:
        with Lab(lab_config(backend, plan), log=log) as lab:
            finished = 0
            previous = ""
            cpu_at_start: dict[str, float] = {}
            try:
                while True:
                    marker = lab.guest.expect(_PROGRESS, plan.step_timeout)["marker"].strip()
                    if marker == "VHOST_IOMMU_JOB_DONE":
                        outcome.thread_cpu = _cpu_since(cpu_at_start, thread_cpu(lab.guest.pid))
                        break
                    if marker == "VFIO_MIXED" and previous == "VFIO_MIXED":
                        continue  # the same workload's next size
                    if marker == "VHOST_IOMMU_JOB_START":
                        cpu_at_start = thread_cpu(lab.guest.pid)
                        outcome.queue_size = _request_queue_size(lab) if backend != BUILTIN else 0
                    else:
                        finished += 1
                    previous = marker
                    on_step(items[finished] if finished < len(items) else "finishing")
            finally:
                lines = lab.guest.run.lines
                outcome.job_rc = lab.guest.run.job_rc
            if backend != BUILTIN:
                outcome.request_counters = lab.inspect(lambda device: device.request_counters())
                outcome.kick_counters = lab.backend().kick_thread_counters() or {}
                outcome.kick_scheduling = lab.backend().kick_thread_scheduling()
    except (ProvisionError, LabError, CommandError, OSError, TimeoutError) as error:
        outcome.errors.append(f"{type(error).__name__}: {error}")
    outcome.seconds = time.monotonic() - started
    outcome.load_after = os.getloadavg()
    check(outcome, lines, plan)
    return outcome


def thread_cpu(qemu_pid: int) -> dict[str, float]:
    """CPU seconds (user + system) so far of every thread of QEMU and of this process, by name (a name
    seen twice gets " #2"); threads that exited meanwhile are left out."""
    tick = os.sysconf("SC_CLK_TCK")
    names = {thread.native_id: thread.name for thread in threading.enumerate()}
    found: dict[str, float] = {}
    for owner, pid in (("qemu", qemu_pid), ("bench", os.getpid())):
        try:
            tasks = sorted(os.listdir(f"/proc/{pid}/task"), key=int)
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{pid}/task/{task}/stat") as stat:
                    text = stat.read()
            except OSError:
                continue
            # The name is between the first "(" and the last ")"; it may hold spaces and parentheses.
            comm = text[text.index("(") + 1 : text.rindex(")")]
            fields = text[text.rindex(")") + 2 :].split()
            name = f"{owner}: {names.get(int(task), comm) if owner == 'bench' else comm}"
            key, copy = name, 1
            while key in found:
                copy += 1
                key = f"{name} #{copy}"
            found[key] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return found


def _cpu_since(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {name: round(seconds - before.get(name, 0.0), 2) for name, seconds in after.items()}


@contextmanager
def cpu_hogs(count: int) -> Iterator[list[subprocess.Popen[bytes]]]:
    """``count`` processes that each spin on a CPU for as long as the block runs (a busy host), stopped and
    reaped however it ends."""
    hogs: list[subprocess.Popen[bytes]] = []
    try:
        for _ in range(count):
            hogs.append(subprocess.Popen([sys.executable, "-c", "while True: pass"]))
        yield hogs
    finally:
        for hog in hogs:
            hog.kill()
        for hog in hogs:
            hog.wait()


@dataclass
class IdleOutcome:
    """The back-end's CPU while a booted guest sits idle with its IOMMU idle."""

    seconds: float = 0.0
    cpu_seconds: float = 0.0
    errors: list[str] = field(default_factory=list)

    @property
    def cpu_share(self) -> float:
        """Of one CPU, over the measured window."""
        return self.cpu_seconds / self.seconds if self.seconds else 0.0


def idle_cost(backend: str, plan: BenchPlan, seconds: float, *, log: Path | None = None) -> IdleOutcome:
    """Boot the guest with ``backend`` (a vhost-user one), let it sit idle at the end of a job that does no
    IOMMU work, and measure this process's CPU over ``seconds``: the back-end's threads are its only work
    then (the bench's own thread waits)."""
    outcome = IdleOutcome()
    config = replace(lab_config(backend, plan), job="probe", params={"hold": "1"})
    try:
        with Lab(config, log=log) as lab:
            lab.guest.expect(r"VHOST_IOMMU_HOLD", plan.step_timeout)
            before, began = _own_cpu(), time.monotonic()
            time.sleep(seconds)  # the measurement window itself, not a wait for anything
            outcome.cpu_seconds, outcome.seconds = _own_cpu() - before, time.monotonic() - began
            lab.guest.send("")
            lab.guest.wait(60)
    except (ProvisionError, LabError, CommandError, OSError, TimeoutError) as error:
        outcome.errors.append(f"{type(error).__name__}: {error}")
    return outcome


def _own_cpu() -> float:
    """CPU seconds of every thread of this process so far (getrusage: microseconds, not clock ticks)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime

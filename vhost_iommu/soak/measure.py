"""What a soak measures and how it is judged: pure functions over samples and console lines.

Nothing here starts a process or touches a socket (only :func:`read_process` reads ``/proc``), so the growth
and verdict computations are tested on made-up samples (tests/test_soak.py).
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vhost_iommu.provision.klog import KERNEL_TROUBLE, klog_message

# The first minutes grow caches legitimately (numba dispatchers, table nodes, the guest's request buffers
# touched for the first time): growth is measured from the end of the warm-up.
WARMUP_FRACTION = 0.1
WARMUP_CAP_SECONDS = 180.0

# Lines of guest/init and vfio-dma that report a failed operation.
GUEST_ERROR = re.compile(r"VHOST_IOMMU_SOAK_ERROR|VHOST_IOMMU_ERROR|VFIO_ERROR")
ROUND = re.compile(r"VHOST_IOMMU_SOAK_ROUND ")
_FIELD = re.compile(r"(\w+)=(\S*)")
# The back-end logs "vhost-iommu: LEVEL: message" (cli._setup_logging); with -v, INFO lines are normal.
_BACKEND_PROBLEM = re.compile(r": (WARNING|ERROR|CRITICAL): |^Traceback ")


@dataclass(frozen=True)
class ProcessSample:
    """One look at a process in /proc: memory in KiB, open fds, threads, CPU time."""

    rss_kib: int  # VmRSS: resident set, anonymous + file + shared memory (the guest RAM it touched)
    rss_max_kib: int  # VmHWM: the peak resident set so far
    anon_kib: int  # RssAnon: heap and other private memory (where a leak of Python objects shows)
    file_kib: int  # RssFile: code and mapped files
    shmem_kib: int  # RssShmem: shared memory, here the pages of guest RAM the back-end has touched
    fds: int
    threads: int
    cpu_seconds: float  # user + system
    vm_size_kib: int = 0  # VmSize: address space, where a mapping kept after use shows even untouched


def read_process(pid: int) -> ProcessSample:
    """Sample ``pid`` from /proc (OSError if it is gone)."""
    fields: dict[str, list[str]] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.split()

    def kib(name: str) -> int:
        return int(fields[name][0]) if fields.get(name) else 0

    stat = Path(f"/proc/{pid}/stat").read_text()
    # The command name may hold spaces and parentheses: the fields after it start past the last ")".
    rest = stat[stat.rindex(")") + 2 :].split()
    ticks = int(rest[11]) + int(rest[12])  # utime and stime, fields 14 and 15 of proc(5)
    return ProcessSample(
        rss_kib=kib("VmRSS"),
        rss_max_kib=kib("VmHWM"),
        anon_kib=kib("RssAnon"),
        file_kib=kib("RssFile"),
        shmem_kib=kib("RssShmem"),
        fds=len(os.listdir(f"/proc/{pid}/fd")),
        threads=kib("Threads"),
        cpu_seconds=ticks / os.sysconf("SC_CLK_TCK"),
        vm_size_kib=kib("VmSize"),
    )


@dataclass(frozen=True)
class MappingCount:
    """The mappings of a process (/proc/PID/maps)."""

    total: int
    memfd: int  # of memfds: in a back-end, the guest RAM of the front-ends it serves (or served)


def read_mappings(pid: int) -> MappingCount:
    """Count ``pid``'s mappings (OSError if it is gone)."""
    lines = Path(f"/proc/{pid}/maps").read_text().splitlines()
    return MappingCount(total=len(lines), memfd=sum(1 for line in lines if " /memfd:" in line))


def descendants(pid: int) -> list[int]:
    """``pid``'s children, grandchildren... (from /proc/PID/task/TID/children), in no particular order."""
    found: list[int] = []
    pending = [pid]
    while pending:
        parent = pending.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue  # gone meanwhile
        for task in tasks:
            try:
                children = Path(f"/proc/{parent}/task/{task}/children").read_text().split()
            except OSError:
                continue
            for child in map(int, children):
                found.append(child)
                pending.append(child)
    return found


def read_backend(pid: int) -> tuple[ProcessSample, tuple[int, ...]]:
    """The back-end as a whole: ``pid`` and every process under it (with --state-dir, the keeper and its
    device worker), their figures added up, and their pids (OSError if ``pid`` itself is gone)."""
    total = read_process(pid)
    pids = [pid]
    for child in descendants(pid):
        try:
            part = read_process(child)
        except OSError:
            continue  # ended between the listing and the reading
        pids.append(child)
        total = ProcessSample(
            *(getattr(total, name) + getattr(part, name) for name in ProcessSample.__dataclass_fields__)
        )
    return total, tuple(sorted(pids))


@dataclass(frozen=True)
class GuestProgress:
    """What the guest's soak job has completed so far (cumulative, from its VHOST_IOMMU_SOAK_ROUND lines)."""

    rounds: int = 0
    vfio_ops: int = 0  # VFIO MAP_DMA and UNMAP_DMA calls
    blk_mb: int = 0  # MiB written to the disk and read back
    rebinds: int = 0  # unbind + bind of the VFIO device
    errors: int = 0
    uptime_ms: int = 0


def parse_round(line: str) -> GuestProgress | None:
    """The progress a VHOST_IOMMU_SOAK_ROUND line reports, or None for any other line."""
    if not ROUND.search(line):
        return None
    values = {key: value for key, value in _FIELD.findall(line[line.index("VHOST_IOMMU_SOAK_ROUND") :])}
    try:
        return GuestProgress(
            rounds=int(values["round"]),
            vfio_ops=int(values["vfio_ops"]),
            blk_mb=int(values["blk_mb"]),
            rebinds=int(values["rebinds"]),
            errors=int(values["errors"]),
            uptime_ms=int(values["uptime_ms"]),
        )
    except (KeyError, ValueError):
        return None


@dataclass(frozen=True)
class Sample:
    """Everything looked at in one tick."""

    seconds: float  # since the guest's workload started
    process: ProcessSample  # the back-end's process
    guest: GuestProgress
    device_requests: int  # requests the device has served, from the control channel (-1: unknown)
    load: tuple[float, float, float]  # the machine's load average
    pids: tuple[int, ...] = ()  # the back-end's processes added up in `process`


def warmup_seconds(duration: float) -> float:
    """How long the start of a soak of ``duration`` seconds is left out of the growth figures."""
    return min(duration * WARMUP_FRACTION, WARMUP_CAP_SECONDS)


@dataclass(frozen=True)
class Growth:
    """From the first sample after the warm-up (the reference) to the last one."""

    warmup_seconds: float
    reference: Sample
    end: Sample
    rss_max_kib: int  # the largest VmRSS of any sample, warm-up included

    @property
    def rss_growth_percent(self) -> float:
        before = self.reference.process.rss_kib
        return 100.0 * (self.end.process.rss_kib - before) / before if before else 0.0

    @property
    def anon_growth_percent(self) -> float:
        before = self.reference.process.anon_kib
        return 100.0 * (self.end.process.anon_kib - before) / before if before else 0.0

    @property
    def fd_growth(self) -> int:
        return self.end.process.fds - self.reference.process.fds

    @property
    def thread_growth(self) -> int:
        return self.end.process.threads - self.reference.process.threads

    @property
    def measured_seconds(self) -> float:
        return self.end.seconds - self.reference.seconds


def growth(samples: Sequence[Sample], warmup: float) -> Growth | None:
    """The growth after ``warmup`` seconds; None when no two samples lie after it (too short to say)."""
    after = [sample for sample in samples if sample.seconds >= warmup]
    if len(after) < 2:
        return None
    return Growth(
        warmup_seconds=warmup,
        reference=after[0],
        end=after[-1],
        rss_max_kib=max(sample.process.rss_kib for sample in samples),
    )


@dataclass(frozen=True)
class Limits:
    """The verdict's thresholds."""

    rss_growth_percent: float = 5.0
    fd_growth: int = 0


@dataclass
class Findings:
    """Everything that went wrong besides growth, by kind; each entry is one line for a person."""

    kernel: list[str] = field(default_factory=list)  # stalls, lockups, oopses in the guest's kernel log
    guest_errors: list[str] = field(default_factory=list)  # failed guest operations
    backend_log: list[str] = field(default_factory=list)  # warnings, errors, tracebacks of the back-end
    needs_reset: list[str] = field(default_factory=list)  # the device entered NEEDS_RESET
    control: list[str] = field(default_factory=list)  # control-channel calls that were refused or failed
    run: list[str] = field(default_factory=list)  # the soak itself: stalls, exits, leftovers, timeouts

    def all(self) -> list[str]:
        labelled = (
            ("guest kernel", self.kernel),
            ("guest", self.guest_errors),
            ("back-end log", self.backend_log),
            ("NEEDS_RESET", self.needs_reset),
            ("control channel", self.control),
            ("soak", self.run),
        )
        return [f"{label}: {entry}" for label, entries in labelled for entry in entries]


def verdict(measured: Growth | None, findings: Findings, limits: Limits = Limits()) -> list[str]:
    """Why the soak failed, one reason per line; empty when it passed."""
    reasons: list[str] = []
    if measured is None:
        reasons.append("too short: fewer than two samples after the warm-up, no growth measured")
    else:
        if measured.rss_growth_percent >= limits.rss_growth_percent:
            reasons.append(
                f"RSS grew {measured.rss_growth_percent:.2f}% after the warm-up "
                f"({measured.reference.process.rss_kib} -> {measured.end.process.rss_kib} KiB; "
                f"limit {limits.rss_growth_percent:g}%)"
            )
        if measured.fd_growth > limits.fd_growth:
            reasons.append(
                f"open fds grew by {measured.fd_growth} after the warm-up "
                f"({measured.reference.process.fds} -> {measured.end.process.fds})"
            )
    reasons += findings.all()
    return reasons


def process_changes(samples: Sequence[Sample]) -> list[str]:
    """When the back-end's set of processes changed between samples (a device worker restarted or
    replaced: its figures would then not compare)."""
    changes = []
    for before, after in itertools.pairwise(samples):
        if before.pids and after.pids and before.pids != after.pids:
            changes.append(
                f"at {after.seconds:.0f} s the back-end's processes went from {list(before.pids)} to "
                f"{list(after.pids)}"
            )
    return changes


def unique(lines: Iterable[str]) -> list[str]:
    """``lines`` without repeats, in first-seen order (the guest reports its kernel log twice)."""
    return list(dict.fromkeys(lines))


def kernel_trouble(lines: Iterable[str]) -> list[str]:
    """Console lines (kernel messages on the console, or VHOST_IOMMU_KLOG reports) of a stall or worse."""
    found = []
    for line in lines:
        message = klog_message(line)
        text = line if message is None else message
        if KERNEL_TROUBLE.search(text):
            found.append(text.strip())
    return unique(found)


def guest_errors(lines: Iterable[str]) -> list[str]:
    """The guest's lines that report a failed operation."""
    found = []
    for line in lines:
        match = GUEST_ERROR.search(line)
        if match:
            found.append(line[match.start() :])
    return unique(found)


def backend_problems(lines: Iterable[str]) -> list[str]:
    """The back-end's log lines at WARNING or worse, and tracebacks."""
    return [line for line in lines if _BACKEND_PROBLEM.search(line)]


def needs_reset(connections: Sequence[Mapping[str, object]]) -> list[str]:
    """The NEEDS_RESET reasons of the control channel's ``connections`` rows."""
    return [f"{row.get('name')}: {row['broken']}" for row in connections if row.get("broken")]

"""``scripts/soak``: boot a guest against a vhost-iommu back-end process and soak it (docs/soak.md)."""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from vhost_iommu.provision.paths import source_commit
from vhost_iommu.soak import report
from vhost_iommu.soak.measure import Limits, Sample
from vhost_iommu.soak.run import DEFAULT_PLAN, Reporter, SoakConfig, SoakResult, run_soak


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/soak",
        description="Boot one guest (default topology, qboot) against a `vhost-iommu serve` process, keep a "
        "mixed workload running (VFIO map/unmap of every shape, virtio-blk I/O through an identity domain, "
        "vfio-pci rebinds, control-channel inspection and injections), sample the back-end's RSS, fds, "
        "threads and CPU time, and judge: RSS growth after the warm-up under the limit, no fd growth, a "
        "clean guest kernel log, no NEEDS_RESET, no errors. Exit status 0 when it passed, 1 when not, 130 "
        "when interrupted (the children are stopped either way).",
    )
    parser.add_argument("--minutes", type=float, default=30.0, help="minutes of guest workload (default 30)")
    parser.add_argument("--interval", type=float, help="seconds between samples (default 5; 2 under 5 min)")
    parser.add_argument(
        "--warmup", type=float, help="seconds left out of the growth figures (default 10%%, at most 180)"
    )
    parser.add_argument("--plan", default=DEFAULT_PLAN, help=f"one guest round (default {DEFAULT_PLAN})")
    parser.add_argument("--blk-mb", type=int, default=4, help="MiB the blk item writes and reads back")
    parser.add_argument("--no-disk", action="store_true", help="no virtio-blk disk (the blk item is skipped)")
    parser.add_argument("--vq-size", type=int, default=256, help="the requestq size (0: QEMU's default, 64)")
    parser.add_argument("--memory", type=int, default=1024, help="guest RAM in MiB (default 1024)")
    parser.add_argument(
        "--stall-timeout", type=float, default=300.0, help="seconds without a guest round that fail the soak"
    )
    parser.add_argument(
        "--max-rss-growth", type=float, default=5.0, help="the RSS growth limit, in percent (default 5)"
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        help="serve through the keeper (vhost-iommu serve --state-dir DIR): a keeper process holds QEMU's "
        "connection and a device worker under it serves; both are sampled, added up",
    )
    parser.add_argument(
        "--output", type=Path, default=Path("soak-results"), help="where the files go (default soak-results)"
    )
    args = parser.parse_args(argv)
    if args.minutes <= 0:
        parser.error("--minutes must be positive")
    if args.interval is None:
        args.interval = 5.0 if args.minutes >= 5 else 2.0
    if args.interval <= 0 or args.interval > args.minutes * 60:
        parser.error("--interval must be positive and at most the duration")
    if args.blk_mb < 1 or args.blk_mb > 32:
        parser.error("--blk-mb is 1..32 (the disk has 64 MiB)")
    if args.vq_size and (args.vq_size & (args.vq_size - 1) or args.vq_size > 1024):
        parser.error("--vq-size is a power of two up to 1024 (QEMU's limit), or 0")
    return args


def _status(sample: Sample) -> str:
    process, guest = sample.process, sample.guest
    return (
        f"RSS {process.rss_kib / 1024:.1f} MiB, {process.fds} fds, {process.threads} threads, "
        f"CPU {process.cpu_seconds:.0f} s | guest {guest.rounds} rounds, {guest.vfio_ops} VFIO calls, "
        f"{guest.blk_mb} MiB disk, {guest.rebinds} rebinds | {sample.device_requests} requests | "
        f"load {sample.load[0]:.1f}"
    )


class RichReporter(Reporter):
    """A progress bar over the soak's duration, and a line now and then (also in a log file)."""

    def __init__(self, progress: Progress, duration: float) -> None:
        self.progress = progress
        self.task = progress.add_task("starting", total=duration, status="")
        # About twenty lines over the run, at most one a minute: enough to follow a run in a log file.
        self.every = min(60.0, max(duration / 20, 1.0))
        self.next_line = 0.0

    def event(self, text: str) -> None:
        # Whole lines (no wrapping at 80 columns) when the output goes to a file.
        self.progress.console.print(f"{time.strftime('%H:%M:%S')} {text}", soft_wrap=True)
        self.progress.update(self.task, description=text.split(";")[0][:40])

    def sample(self, sample: Sample, result: SoakResult) -> None:
        status = _status(sample)
        warm = sample.seconds < result.config.warmup_seconds
        self.progress.update(
            self.task, completed=sample.seconds, description="warm-up" if warm else "soaking", status=status
        )
        if sample.seconds >= self.next_line or sample.seconds >= result.config.duration:
            line = f"{time.strftime('%H:%M:%S')} {sample.seconds:6.0f} s  {status}"
            self.progress.console.print(line, soft_wrap=True)
            self.next_line = sample.seconds + self.every


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(arguments)
    # SIGTERM ends the soak as Ctrl-C does: the children are stopped on the way out and a report written.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    config = SoakConfig(
        minutes=args.minutes,
        interval=args.interval,
        warmup=args.warmup,
        plan=args.plan,
        blk_mb=args.blk_mb,
        disk=not args.no_disk,
        vq_size=args.vq_size,
        memory_mib=args.memory,
        stall_timeout=args.stall_timeout,
        limits=Limits(rss_growth_percent=args.max_rss_growth),
        state_dir=args.state_dir,
    )
    command = shlex.join(["scripts/soak", *arguments])
    commit = source_commit()
    console = Console()
    console.print(f"{command} at {commit}")
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
        console=console,
        refresh_per_second=1,
    ) as progress:
        result = run_soak(config, args.output, RichReporter(progress, config.duration))
    for path in report.write(result, args.output, command, commit):
        console.print(f"wrote {path}")
    if result.passed:
        console.print("[green]soak passed[/green]")
    else:
        console.print("[red]soak FAILED[/red]")
        for reason in result.reasons[:30]:
            console.print(f"  {reason}")
    if result.interrupted:
        return 130
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())

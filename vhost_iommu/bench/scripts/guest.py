"""Guest VFIO benchmark: vhost-iommu side by side with QEMU's built-in virtio-iommu, plus an empty floor.

One run boots the same guest on the same QEMU once per back-end and repeat, runs the same VFIO workloads
in the guest (guest/vfio-dma.c) and prints, for each workload, the figures of each back-end and the ratio
to the built-in device:

  built-in      QEMU's own -device virtio-iommu-pci (requests run in the vCPU thread, no wake-up)
  vhost-iommu   this project's device, served from this process over vhost-user (its default: the
                requestq kick thread)
  empty         the same back-end and wake-up path with the request kernel doing no work (the floor)
  optional (only if named in --backends):
  vhost-iommu-loop, empty-loop       both with the requestq served from the event loop
  vhost-iommu-thread, empty-thread   both with the kick thread, whatever the default
  vhost-iommu-python                 vhost-iommu with its Python request path
  vhost-iommu-realtime, -high, -normal  the kick thread always SCHED_FIFO / at nice -10 / at normal
                                     priority instead of its default adaptive policy
  vhost-iommu-no-poll                vhost-iommu with no poll window (--poll-us 0), beside the adaptive one

Workloads: pairs (single-page MAP_DMA+UNMAP_DMA, per pair), bulk (N single-page maps, then one UNMAP_DMA
over all of them; for each N), mixed (map+unmap of 4 KiB..2 MiB), scatter (one MAP_DMA over N pages that
are scattered in guest-physical memory, then one UNMAP_DMA: the driver batches that unmap; for each N).
It writes results.md (table and the exact command), results.json (every run's figures) and results.png
(bar chart) to the output directory, and exits 1 if any run failed: QEMU or the guest job failed, a
figure is missing, or the guest kernel reported a soft lockup, RCU stall or hung task. Every figure is
wall-clock time inside a TCG guest on a shared machine: noisy; the load average is recorded with each run.

Example (the default run, a few minutes):
    scripts/bench-guest --output docs/benchmarks
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from vhost_iommu.bench.results import (
    BACKENDS,
    BUILTIN,
    KNOWN_BACKENDS,
    VHOST_IOMMU,
    Row,
    combine,
    compare,
    figure_records,
    figures_from_records,
    format_ns,
    markdown_table,
)
from vhost_iommu.bench.runner import WORKLOADS, BenchPlan, RunOutcome, cpu_hogs, idle_cost, run_once
from vhost_iommu.provision.debian import KERNEL_SUITES
from vhost_iommu.provision.guest import DEFAULT_SUITE, NEWEST, SUITE_VARIABLE, ensure_guest
from vhost_iommu.provision.paths import source_commit
from vhost_iommu.virtio_iommu import MAX_POLL_US


def _counts(text: str) -> list[int]:
    try:
        counts = [int(float(part)) for part in text.split(",") if part]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"not a list of counts: {text!r}") from error
    if not counts or any(count < 1 or count > 1_000_000 for count in counts):
        raise argparse.ArgumentTypeError("counts are 1..1000000 (the guest program's limit)")
    return counts


def _names(known: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [part for part in text.split(",") if part]
        unknown = [name for name in names if name not in known]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"choose among {', '.join(known)} (got {text!r})")
        return names

    return parse


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/bench-guest",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )
    parser.add_argument("--pairs", type=int, default=2000, help="map+unmap pairs (default 2000)")
    parser.add_argument(
        "--bulk", type=_counts, default=[4096, 65536], help="N of the bulk workload, comma-separated"
    )
    parser.add_argument("--mixed", type=int, default=700, help="mixed-size map+unmap pairs (default 700)")
    parser.add_argument(
        "--scatter", type=_counts, default=[4096, 65536], help="N of the scatter workload, comma-separated"
    )
    parser.add_argument(
        "--workloads",
        type=_names(WORKLOADS),
        default=list(WORKLOADS),
        help="which workloads, comma-separated (default pairs,bulk,mixed,scatter)",
    )
    parser.add_argument(
        "--backends",
        type=_names(KNOWN_BACKENDS),
        default=list(BACKENDS),
        help="which back-ends, comma-separated (default builtin,vhost-iommu,empty; also vhost-iommu-thread, "
        "vhost-iommu-loop, empty-thread, empty-loop, vhost-iommu-python, vhost-iommu-realtime, "
        "vhost-iommu-high, vhost-iommu-normal, vhost-iommu-no-poll)",
    )
    parser.add_argument(
        "--repeat", type=int, default=3, help="boots per back-end (default 3); medians are reported"
    )
    parser.add_argument(
        "--vq-size", type=int, default=256, help="vhost-user queue size (the built-in's is 256; 0: QEMU's 64)"
    )
    parser.add_argument(
        "--poll-us",
        type=float,
        default=None,
        help="the vhost-user back-ends watch the ring this long after a batch (default: the back-end's "
        "own, an adaptive 60 us window on the requestq thread; 0: off)",
    )
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="seconds of guest silence to give up after"
    )
    parser.add_argument(
        "--replot",
        action="store_true",
        help="boot nothing: re-make the plot and print the table from OUTPUT/results.json",
    )
    parser.add_argument("--note", default="", help="a sentence for results.md (e.g. what tree was measured)")
    parser.add_argument(
        "--load",
        type=int,
        default=0,
        help="CPU hogs (one spinning process each) the bench starts before the first boot and stops after "
        "the last: a busy host (default 0)",
    )
    parser.add_argument(
        "--idle",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="after the runs, boot vhost-iommu once more and measure its CPU while the guest and its IOMMU "
        "sit idle for SECONDS (default 0: not measured)",
    )
    parser.add_argument(
        "--suite",
        choices=(*KERNEL_SUITES, NEWEST),
        default=None,
        help="the Debian suite of the guest kernel (scripts/build-guest --suite; default $"
        f"{SUITE_VARIABLE}, else {DEFAULT_SUITE})",
    )
    parser.add_argument(
        "--output", type=Path, default=Path("bench-results"), help="output directory (default bench-results)"
    )
    args = parser.parse_args(argv)
    if args.poll_us is not None and not 0 <= args.poll_us <= MAX_POLL_US:
        parser.error(f"--poll-us is 0..{MAX_POLL_US:.0f}")
    if not 0 <= args.load <= 64 or not 0 <= args.idle <= 3600:
        parser.error("--load is 0..64 and --idle 0..3600")
    if args.pairs < 1 or args.mixed < 1 or args.repeat < 1:
        parser.error("--pairs, --mixed and --repeat must be at least 1")
    if args.vq_size and (args.vq_size & (args.vq_size - 1) or args.vq_size > 1024):
        parser.error("--vq-size is a power of two up to 1024 (QEMU's limit), or 0")
    return args


def _name(outcome: RunOutcome) -> str:
    return f"{outcome.backend} #{outcome.repeat + 1}"


def _load(load: tuple[float, float, float]) -> str:
    return " ".join(f"{value:.2f}" for value in load)


def _summary(outcome: RunOutcome) -> str:
    state = "[red]FAILED[/red]" if outcome.failed else "[green]ok[/green]"
    return (
        f"{_name(outcome)}: {state} in {outcome.seconds:.1f} s, "
        f"load {_load(outcome.load_before)} -> {_load(outcome.load_after)}, "
        f"{len(outcome.warnings)} kernel warnings"
    )


def run_all(args: argparse.Namespace, plan: BenchPlan, console: Console) -> list[RunOutcome]:
    """Every back-end once per repeat, interleaved so that a change of load hits all of them alike."""
    logs = args.output / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    outcomes: list[RunOutcome] = []
    runs = [(repeat, backend) for repeat in range(args.repeat) for backend in args.backends]
    # Few refreshes: the back-end runs on a thread of this process and shares its interpreter lock.
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} boots"),
        TimeElapsedColumn(),
        console=console,
        refresh_per_second=2,
    ) as progress:
        overall = progress.add_task("starting", total=len(runs))
        for repeat, backend in runs:

            def show(step: str, backend: str = backend, repeat: int = repeat) -> None:
                progress.update(overall, description=f"{backend} #{repeat + 1}: {step}")

            outcome = run_once(backend, plan, repeat, log=logs / f"{backend}-{repeat + 1}.log", on_step=show)
            outcomes.append(outcome)
            progress.console.print(_summary(outcome))
            for problem in [*outcome.errors, *(f"kernel: {stall}" for stall in outcome.stalls)]:
                progress.console.print(f"  [red]{problem.splitlines()[0]}[/red]")
            progress.advance(overall)
    return outcomes


def _console_table(rows: Sequence[Row], backends: Sequence[str]) -> Table:
    """Means and ratios only, to fit a terminal; the markdown file has the percentiles."""
    others = [backend for backend in backends if backend != BUILTIN]
    table = Table(
        "workload",
        *(f"{backend} mean" for backend in backends),
        *(f"{backend} / built-in" for backend in others),
        "target",
        title="guest VFIO, means (percentiles in results.md)",
    )
    for row in rows:
        table.add_row(
            row.metric.label,
            *(
                format_ns(row.by_backend[backend].figure.mean_ns) if backend in row.by_backend else "-"
                for backend in backends
            ),
            *(_ratio(row.ratio(backend)) for backend in others),
            f"<= {row.metric.target:.1f}" + ("" if row.meets_target() is not False else " missed"),
        )
    return table


def _ratio(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}"


def _outcome_record(outcome: RunOutcome) -> dict[str, object]:
    return {
        "backend": outcome.backend,
        "repeat": outcome.repeat + 1,
        "failed": outcome.failed,
        "errors": outcome.errors,
        "stalls": outcome.stalls,
        "kernel_warnings": outcome.warnings,
        "job_rc": outcome.job_rc,
        "seconds": round(outcome.seconds, 2),
        "load_before": outcome.load_before,
        "load_after": outcome.load_after,
        "request_counters": outcome.request_counters,
        "kick_counters": outcome.kick_counters,
        "kick_scheduling": outcome.kick_scheduling,
        "thread_cpu": outcome.thread_cpu,
        "queue_size": outcome.queue_size,
        "figures": figure_records(outcome.figures),
    }


def write_results(
    args: argparse.Namespace, command: str, outcomes: Sequence[RunOutcome], rows: Sequence[Row], started: str
) -> list[Path]:
    output: Path = args.output
    commit = source_commit()
    loads = "; ".join(
        f"{_name(outcome)}: {_load(outcome.load_before)} -> {_load(outcome.load_after)}"
        for outcome in outcomes
    )
    failed = [outcome for outcome in outcomes if outcome.failed]
    queue_sizes = (
        ", ".join(sorted({str(outcome.queue_size) for outcome in outcomes if outcome.backend != BUILTIN}))
        or "none"
    )
    verdict = (
        "every run completed; no soft lockup, RCU stall or hung task in the guest"
        if not failed
        else "FAILED runs: " + ", ".join(_name(outcome) for outcome in failed)
    )
    text = (
        "# Guest VFIO benchmark: vhost-iommu vs QEMU's built-in virtio-iommu\n\n"
        f"Command: `{command}`\n\n"
        f"Started {started} on {platform.node()} ({os.cpu_count()} CPUs, shared with other work), "
        f"vhost-iommu {commit}, guest Linux {args.kernel}, QEMU/TCG with -smp 1, "
        f"{args.repeat} boot(s) per back-end "
        f"(medians; brackets: lowest..highest mean). Load averages (1/5/15 min) before -> after each run: "
        f"{loads}.\n\n"
        + (f"{args.note}\n\n" if args.note else "")
        + (
            f"Busy host: {args.load} CPU hogs ran from before the first boot to after the last.\n\n"
            if args.load
            else ""
        )
        + (
            f"Idle guest: vhost-iommu's back-end used {1000 * args.idle_outcome.cpu_seconds:.1f} CPU ms in "
            f"{args.idle_outcome.seconds:.0f} s, {100 * args.idle_outcome.cpu_share:.3f}% of a CPU.\n\n"
            if args.idle_outcome is not None and not args.idle_outcome.errors
            else ""
        )
        + f"vhost-user requestq size: {queue_sizes}.\n\n"
        f"Result: {verdict}.\n\n"
        + markdown_table(rows, args.backends)
        + "\nRatios are of means (of p50s in parentheses); targets apply to vhost-iommu / built-in, judged "
        "on means. See docs/benchmarks.md for what each workload exercises and why the two devices differ "
        "under TCG.\n"
    )
    written = [output / "results.md", output / "results.json"]
    written[0].write_text(text)
    record = {
        "command": command,
        "started": started,
        "commit": commit,
        "guest_kernel": args.kernel,
        "load_hogs": args.load,
        "idle": None
        if args.idle_outcome is None
        else {
            "seconds": args.idle_outcome.seconds,
            "cpu_seconds": args.idle_outcome.cpu_seconds,
            "errors": args.idle_outcome.errors,
        },
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "runs": [_outcome_record(outcome) for outcome in outcomes],
    }
    written[1].write_text(json.dumps(record, indent=1) + "\n")
    if importlib.util.find_spec("matplotlib") is None:
        # The plot is optional (pip install '.[bench]'); the table and the JSON are the results.
        print("no plot: matplotlib is not installed (pip install 'vhost-iommu[bench]')", file=sys.stderr)
        return written
    from vhost_iommu.bench.plot import plot_rows

    plot_path = output / "results.png"
    plot_rows(rows, plot_path, _plot_title(args.repeat, started), args.backends)
    return [*written, plot_path]


def replot(args: argparse.Namespace, console: Console) -> int:
    """Table and plot again from a previous run's results.json (e.g. after a change to the plot)."""
    if importlib.util.find_spec("matplotlib") is None:
        console.print(
            "bench-guest: --replot needs matplotlib (pip install 'vhost-iommu[bench]')", markup=False
        )
        return 1
    from vhost_iommu.bench.plot import plot_rows

    record = json.loads((args.output / "results.json").read_text())
    backends = [
        backend for backend in KNOWN_BACKENDS if any(run["backend"] == backend for run in record["runs"])
    ]
    combined = {
        backend: combine(
            [figures_from_records(run["figures"]) for run in record["runs"] if run["backend"] == backend]
        )
        for backend in backends
    }
    rows = compare(combined)
    console.print(_console_table(rows, backends))
    repeats = max(run["repeat"] for run in record["runs"])
    path = args.output / "results.png"
    plot_rows(rows, path, _plot_title(repeats, record["started"]), backends)
    console.print(f"wrote {path}")
    return 0


def _plot_title(repeats: int, started: str) -> str:
    return f"Guest VFIO under QEMU/TCG, {repeats} boot(s) per back-end ({started}, noisy 2-core host)"


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    console = Console()
    if args.replot:
        return replot(args, console)
    plan = BenchPlan(
        pairs=args.pairs,
        bulk=tuple(args.bulk),
        mixed=args.mixed,
        scatter=tuple(args.scatter),
        workloads=tuple(args.workloads),
        vq_size=args.vq_size,
        poll_us=args.poll_us,
        step_timeout=args.timeout,
    )
    try:
        import matplotlib  # noqa: F401  (checked before minutes of boots, not after)
    except ImportError:
        console.print("[yellow]no matplotlib (pip install -e '.[bench]'): no plot will be written[/yellow]")
    if args.suite is not None:
        # Every boot of the run (each through provision.guest.ensure_guest) takes this suite's kernel.
        os.environ[SUITE_VARIABLE] = args.suite
    args.kernel = ensure_guest().kernel_version
    command = shlex.join(["scripts/bench-guest", *argv])
    started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    console.print(
        f"{command}\nguest Linux {args.kernel}; items: {','.join(plan.items())}; "
        f"load {_load(os.getloadavg())}"
    )
    idle = None
    with cpu_hogs(args.load):
        outcomes = run_all(args, plan, console)
        if args.idle:
            console.print(f"idle: booting vhost-iommu, then {args.idle:.0f} s of an idle guest")
            idle = idle_cost(VHOST_IOMMU, plan, args.idle, log=args.output / "logs" / "idle.log")
            if idle.errors:
                console.print(f"  [red]{idle.errors[0].splitlines()[0]}[/red]")
            else:
                console.print(
                    f"idle guest: the back-end used {1000 * idle.cpu_seconds:.1f} CPU ms in "
                    f"{idle.seconds:.0f} s, {100 * idle.cpu_share:.3f}% of a CPU"
                )
    args.idle_outcome = idle
    combined = {
        backend: combine([outcome.figures for outcome in outcomes if outcome.backend == backend])
        for backend in args.backends
    }
    rows = compare(combined)
    console.print(_console_table(rows, args.backends))
    if BUILTIN in args.backends and VHOST_IOMMU in args.backends:
        missed = [row.metric.label for row in rows if row.meets_target() is False]
        console.print(f"targets missed: {len(missed)} of {len(rows)}" if missed else "every target met")
    for path in write_results(args, command, outcomes, rows, started):
        console.print(f"wrote {path}")
    return 1 if any(outcome.failed for outcome in outcomes) else 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:
        # Lab's context managers have stopped QEMU and the back-end on the way out.
        sys.exit(130)

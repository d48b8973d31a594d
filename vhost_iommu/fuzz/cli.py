"""Command line of ``scripts/fuzz``: run one target (or all), replay a saved finding, list the targets."""

from __future__ import annotations

import argparse
import faulthandler
import sys
import time

from vhost_iommu.fuzz import TARGETS
from vhost_iommu.fuzz.engine import FuzzReport, default_artifact_dir, fuzz, fuzz_atheris, replay


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scripts/fuzz",
        description="Fuzz the code that reads hostile input. Exit status 1 when anything was found.",
    )
    parser.add_argument("target", help=f"one of {', '.join(TARGETS)}, or 'all', or 'list'")
    parser.add_argument("--runs", type=float, help="executions (1e6 is accepted)")
    parser.add_argument("--seconds", type=float, help="stop after this long")
    parser.add_argument("--seed", type=int, help="random seed of the built-in driver (default: random)")
    parser.add_argument("--timeout", type=float, default=2.0, help="per-execution time bound (hang)")
    parser.add_argument("--leak-every", type=int, default=256, help="executions between full leak checks")
    parser.add_argument("--artifacts", default=default_artifact_dir(), help="where findings are saved")
    parser.add_argument("--keep-going", action="store_true", help="do not stop at the first finding")
    parser.add_argument("--reproduce", metavar="FILE", help="run one saved input and show what it does")
    parser.add_argument(
        "--engine",
        choices=("builtin", "atheris"),
        default="builtin",
        help="atheris needs the 'fuzz' extra; extra libFuzzer options go after --",
    )
    parser.add_argument("libfuzzer", nargs="*", help=argparse.SUPPRESS)
    return parser


def _progress(report: FuzzReport) -> None:
    print(
        f"  {report.target}: {report.executions} executions, {report.rate:.0f}/s, "
        f"corpus {report.corpus_size}, features {report.features}",
        file=sys.stderr,
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # A crash in compiled code kills the process: show where (the input is in <artifacts>/TARGET-current.bin).
    faulthandler.enable()
    if args.target == "list":
        for name, target_class in TARGETS.items():
            print(f"{name:10} {target_class.description}")
        return 0
    names = list(TARGETS) if args.target == "all" else [args.target]
    unknown = [name for name in names if name not in TARGETS]
    if unknown:
        print(f"unknown target {unknown[0]!r}; targets: {', '.join(TARGETS)}", file=sys.stderr)
        return 2
    if args.reproduce:
        with open(args.reproduce, "rb") as file:
            data = file.read()
        features = replay(TARGETS[names[0]](), data, timeout=max(args.timeout, 10.0))
        print(f"no finding; features: {sorted(map(str, features or ()))}")
        return 0
    runs = int(args.runs) if args.runs is not None else None
    if runs is None and args.seconds is None:
        runs = 100_000
    if args.engine == "atheris":
        options = [sys.argv[0], *args.libfuzzer, f"-timeout={max(1, round(args.timeout))}"]
        if runs is not None:
            options.append(f"-runs={runs}")
        if args.seconds is not None:
            options.append(f"-max_total_time={round(args.seconds)}")
        fuzz_atheris(TARGETS[names[0]](), options, leak_every=args.leak_every)
        return 0  # not reached: libFuzzer exits the process
    failed = False
    for name in names:
        print(f"fuzzing {name}: {TARGETS[name].description}", file=sys.stderr, flush=True)
        started = time.strftime("%H:%M:%S")
        report = fuzz(
            TARGETS[name](),
            runs=runs,
            seconds=args.seconds,
            seed=args.seed,
            timeout=args.timeout,
            leak_every=args.leak_every,
            artifact_dir=args.artifacts,
            keep_going=args.keep_going,
            progress=_progress,
        )
        print(f"[{started}] {report.summary()}", flush=True)
        for finding in report.findings:
            failed = True
            print(f"  {finding.kind}: {finding.message}\n    input: {finding.path}", flush=True)
            if finding.path:
                print(f"    replay: scripts/fuzz {name} --reproduce {finding.path}", flush=True)
    return 1 if failed else 0

"""Block I/O behind a vIOMMU: vhost-iommu's virtio-blk over vfio-user against QEMU's own behind QEMU's.

Four set-ups, each booted ``--rounds`` times, interleaved (vhost_iommu/bench/blk.py): QEMU's virtio-blk-pci
behind QEMU's built-in virtio-iommu and vhost-iommu's virtio-blk (served over vfio-user, every access
translated by vhost-iommu), each with the guest's default DMA domain and with ``iommu.passthrough=1``.
The same guest, QEMU and raw image; in the guest, guest/blk-bench.c: 4 KiB random reads at queue depth 1
and 16, 1 MiB sequential reads and writes, O_DIRECT, ``--seconds`` each.

Printed (and written to OUTPUT/results.md, results.json, results.png): IOPS and MB/s of each set-up
(median of the rounds, lowest..highest), the IOMMU cost of each device (DMA-mode time per request over
identity-mode time per request; 1.00: free), and the two targets: vhost-iommu's cost no worse than the
built-in device's on every workload, and this virtio-blk's 4 KiB depth-1 read latency within 2x of QEMU's
own virtio-blk, both in identity mode.

Example (16 boots, about 6 minutes under TCG):
    scripts/bench-blk --output docs/benchmarks/blk
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path

from rich.console import Console
from rich.table import Table

from vhost_iommu.bench.blk import (
    DISK_SLOT,
    PAIRS,
    QEMU_IDENTITY,
    SETUPS,
    VHOST_IDENTITY,
    WORKLOADS,
    BootOutcome,
    Summary,
    iommu_cost,
    make_image,
    run_boot,
    summarise,
)
from vhost_iommu.device import Topology
from vhost_iommu.device.topology import ServedDevice
from vhost_iommu.provision.debian import KERNEL_SUITES
from vhost_iommu.provision.guest import DEFAULT_SUITE, NEWEST, SUITE_VARIABLE, ensure_guest
from vhost_iommu.provision.paths import source_commit

#: Targets of issue 12: vhost-iommu's IOMMU cost over the built-in device's, and the 4 KiB depth-1 read
#: latency of this virtio-blk over QEMU's (identity mode).
COST_TARGET = 1.0
LATENCY_TARGET = 2.0
QD1_READ = ("randread4k", 1)


def disk_topology(image: Path) -> Topology:
    """The default topology with the disk (``image``) as its one served device, at DISK_SLOT."""
    topology = Topology.default()
    disk = ServedDevice("virtio-blk", 0, DISK_SLOT << 3, "virtio-blk.sock", {"image": str(image)})
    return replace(topology, devices=(disk,))


def label(key: tuple[str, int]) -> str:
    workload, depth = key
    return f"{workload} depth {depth}"


def figure_text(summary: Summary | None) -> str:
    if summary is None:
        return "-"
    spread = f"[{summary.iops_low:,.0f}..{summary.iops_high:,.0f}]"
    return f"{summary.iops:,.0f} IOPS, {summary.mbps:,.1f} MB/s {spread}"


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/bench-blk",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--rounds", type=int, default=4, help="boots per set-up (default 4)")
    parser.add_argument("--seconds", type=int, default=5, help="seconds per workload (default 5)")
    parser.add_argument(
        "--setups",
        default=",".join(SETUPS),
        help=f"which set-ups, comma-separated (default {','.join(SETUPS)})",
    )
    parser.add_argument(
        "--suite",
        choices=(*KERNEL_SUITES, NEWEST),
        default=None,
        help=f"the Debian suite of the guest kernel (default ${SUITE_VARIABLE}, else {DEFAULT_SUITE})",
    )
    parser.add_argument(
        "--output", type=Path, default=Path("bench-blk"), help="output directory (default bench-blk)"
    )
    args = parser.parse_args(argv)
    args.setups = [setup for setup in args.setups.split(",") if setup]
    unknown = sorted(set(args.setups) - set(SETUPS))
    if unknown:
        parser.error(f"unknown set-up(s) {', '.join(unknown)} (known: {', '.join(SETUPS)})")
    if args.rounds < 1 or not 1 <= args.seconds <= 600:
        parser.error("--rounds is at least 1 and --seconds 1..600")
    return args


def report(
    table: dict[str, dict[tuple[str, int], Summary]], setups: Sequence[str]
) -> tuple[Table, list[str], list[str]]:
    """The console table, the markdown lines and the verdict lines."""
    costs = {dma: iommu_cost(table, dma, identity) for dma, identity in PAIRS}
    console_table = Table("workload", *setups, "IOMMU cost, QEMU", "IOMMU cost, vhost-iommu")
    markdown = [
        "| workload | " + " | ".join(setups) + " | IOMMU cost, QEMU | IOMMU cost, vhost-iommu |",
        "| --- | " + " | ".join("---" for _ in setups) + " | ---: | ---: |",
    ]
    for key in WORKLOADS:
        cells = [figure_text(table.get(setup, {}).get(key)) for setup in setups]
        qemu_cost, vhost_cost = (costs[dma].get(key) for dma, _ in PAIRS)
        cost_cells = [f"{cost:.2f}" if cost is not None else "-" for cost in (qemu_cost, vhost_cost)]
        console_table.add_row(label(key), *cells, *cost_cells)
        markdown.append(f"| {label(key)} | " + " | ".join([*cells, *cost_cells]) + " |")
    verdicts = []
    for key in WORKLOADS:
        qemu_cost, vhost_cost = (costs[dma].get(key) for dma, _ in PAIRS)
        if qemu_cost is not None and vhost_cost is not None:
            met = vhost_cost <= qemu_cost * COST_TARGET
            verdicts.append(
                f"{label(key)}: IOMMU cost {vhost_cost:.3f} (vhost-iommu) against {qemu_cost:.3f} "
                "(built-in): " + ("met" if met else "MISSED")
            )
    ours, theirs = table.get(VHOST_IDENTITY, {}).get(QD1_READ), table.get(QEMU_IDENTITY, {}).get(QD1_READ)
    if ours is not None and theirs is not None:
        ratio = ours.latency_ns / theirs.latency_ns
        verdicts.append(
            f"4 KiB depth-1 read latency, identity: {ours.latency_ns / 1000:.0f} us against "
            f"{theirs.latency_ns / 1000:.0f} us for QEMU's virtio-blk, {ratio:.2f}x (target <= "
            f"{LATENCY_TARGET:.0f}x): " + ("met" if ratio <= LATENCY_TARGET else "MISSED")
        )
    return console_table, markdown, verdicts


def plot(table: dict[str, dict[tuple[str, int], Summary]], path: Path, title: str) -> bool:
    """IOMMU cost per workload, the built-in device's beside vhost-iommu's; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    costs = [iommu_cost(table, dma, identity) for dma, identity in PAIRS]
    labels = [label(key) for key in WORKLOADS]
    figure, axes = plt.subplots(figsize=(8, 4))
    width = 0.38
    for offset, (name, cost) in enumerate(
        zip(("QEMU virtio-iommu + virtio-blk", "vhost-iommu + its virtio-blk"), costs, strict=True)
    ):
        positions = [index + (offset - 0.5) * width for index in range(len(WORKLOADS))]
        axes.bar(positions, [cost.get(key, 0.0) for key in WORKLOADS], width, label=name)
    axes.axhline(1.0, color="grey", linewidth=0.8)
    axes.set_xticks(range(len(WORKLOADS)), labels)
    axes.set_ylabel("DMA-mode time per request / identity-mode")
    axes.set_title(title)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    console = Console()
    if args.suite is not None:
        os.environ[SUITE_VARIABLE] = args.suite  # every boot's ensure_guest() takes this suite's kernel
    kernel = ensure_guest().kernel_version
    command = shlex.join(["scripts/bench-blk", *argv])
    started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    console.print(f"{command}\nguest Linux {kernel}; load {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    args.output.mkdir(parents=True, exist_ok=True)
    logs = args.output / "logs"
    logs.mkdir(exist_ok=True)
    outcomes: list[BootOutcome] = []
    with tempfile.TemporaryDirectory(prefix="vhost-blk-") as scratch:
        image = Path(scratch) / "disk.img"
        make_image(image)
        for round_number in range(1, args.rounds + 1):
            for setup in args.setups:
                outcome = run_boot(
                    setup,
                    round_number,
                    image,
                    args.seconds,
                    disk_topology,
                    log=logs / f"{setup}-{round_number}.log",
                )
                outcomes.append(outcome)
                state = "[red]FAILED[/red]" if outcome.failed else "[green]ok[/green]"
                console.print(
                    f"{setup} #{round_number}: {state} in {outcome.seconds:.1f} s {outcome.counters or ''}"
                )
                for error in outcome.errors:
                    console.print(f"  [red]{error.splitlines()[0]}[/red]")
    table = summarise(outcomes)
    console_table, markdown, verdicts = report(table, args.setups)
    console.print(console_table)
    for verdict in verdicts:
        console.print(verdict)
    failed = [f"{o.setup} #{o.round}" for o in outcomes if o.failed]
    translations = [o.counters.get("page_translations", 0) for o in outcomes if o.setup == "vhost-dma"]
    text = (
        "# Block I/O behind a vIOMMU: vhost-iommu's virtio-blk against QEMU's\n\n"
        f"Command: `{command}`\n\n"
        f"Started {started} on {platform.node()} ({os.cpu_count()} CPUs, shared with other work), "
        f"vhost-iommu {source_commit()}, guest Linux {kernel}, QEMU/TCG with -smp 1, {args.rounds} boot(s) "
        f"per set-up, interleaved, {args.seconds} s per workload; medians of the rounds, brackets: "
        "lowest..highest IOPS. IOMMU cost: DMA-mode time per request over identity-mode.\n\n"
        + ("Every boot completed.\n\n" if not failed else f"FAILED boots: {', '.join(failed)}.\n\n")
        + "\n".join(markdown)
        + "\n\n"
        + "\n".join(f"- {verdict}" for verdict in verdicts)
        + f"\n\nPage translations counted by vhost-iommu's virtio-blk per DMA-mode boot: {translations}.\n"
    )
    (args.output / "results.md").write_text(text)
    record = {
        "command": command,
        "started": started,
        "commit": source_commit(),
        "guest_kernel": kernel,
        "boots": [
            {**asdict(o), "figures": {label(k): asdict(f) for k, f in o.figures.items()}} for o in outcomes
        ],
    }
    (args.output / "results.json").write_text(json.dumps(record, indent=2) + "\n")
    written = [args.output / "results.md", args.output / "results.json"]
    if plot(table, args.output / "results.png", f"IOMMU cost of block I/O (guest Linux {kernel})"):
        written.append(args.output / "results.png")
    for path in written:
        console.print(f"wrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:
        sys.exit(130)  # each Lab stopped QEMU and the back-end on the way out

"""The block benchmark of ``scripts/bench-blk``: what the vIOMMU costs real I/O (issue 12).

Four set-ups boot the same guest on the same QEMU and run the same ``blk-bench`` job (guest/blk-bench.c:
4 KiB random reads at queue depth 1 and 16, 1 MiB sequential reads and writes, O_DIRECT, each for a fixed
time) on a disk backed by the same raw image:

- ``qemu-dma``, ``qemu-identity``: QEMU's own virtio-blk-pci behind QEMU's built-in virtio-iommu, the
  guest's default (translated, lazily invalidated) DMA domain or ``iommu.passthrough=1``;
- ``vhost-dma``, ``vhost-identity``: vhost-iommu's virtio-blk served over vfio-user, every ring and buffer
  access translated through vhost-iommu's device (``vhost_iommu/endpoints/virtio_blk.py``), in the same two
  modes.

The IOMMU cost of a set-up pair is time per request in DMA mode over time per request in identity mode
(identity IOPS or MB/s over DMA's): 1.0 means the IOMMU costs nothing.
"""

from __future__ import annotations

import os
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vhost_iommu.bench.results import kernel_warnings, stalls
from vhost_iommu.device import Topology
from vhost_iommu.lab import Lab, LabConfig, LabError
from vhost_iommu.provision.errors import ProvisionError
from vhost_iommu.qemu import CommandError, IommuKind, VirtioBlockDevice

QEMU_DMA, QEMU_IDENTITY = "qemu-dma", "qemu-identity"
VHOST_DMA, VHOST_IDENTITY = "vhost-dma", "vhost-identity"
SETUPS = (QEMU_DMA, QEMU_IDENTITY, VHOST_DMA, VHOST_IDENTITY)
#: Each DMA set-up with the identity set-up of the same disk and IOMMU.
PAIRS = ((QEMU_DMA, QEMU_IDENTITY), (VHOST_DMA, VHOST_IDENTITY))
#: (workload, queue depth) in the order the guest runs them.
WORKLOADS = (("randread4k", 1), ("randread4k", 16), ("seqread1m", 1), ("seqwrite1m", 1))
IMAGE_MIB = 256
#: Where the disk sits in both set-ups (the DMA engine's slot in the default topology).
DISK_SLOT = 5
_RESULT = re.compile(r"BLK_BENCH (?P<fields>.*)")


@dataclass(frozen=True)
class Figure:
    """One run of one workload: what guest/blk-bench.c printed."""

    iops: float
    mbps: float
    latency_ns: int
    errors: int


@dataclass
class BootOutcome:
    setup: str
    round: int
    figures: dict[tuple[str, int], Figure] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def failed(self) -> bool:
        return bool(self.errors) or len(self.figures) != len(WORKLOADS)


def parse_results(lines: Sequence[str]) -> dict[tuple[str, int], Figure]:
    """The BLK_BENCH lines of one boot, by (workload, depth)."""
    found: dict[tuple[str, int], Figure] = {}
    for line in lines:
        match = _RESULT.search(line)
        if not match:
            continue
        fields = dict(re.findall(r"(\w+)=(\S+)", match["fields"]))
        found[(fields["workload"], int(fields["depth"]))] = Figure(
            float(fields["iops"]), float(fields["mbps"]), int(fields["lat_ns"]), int(fields["errors"])
        )
    return found


def make_image(path: Path, mib: int = IMAGE_MIB) -> None:
    """A raw image of ``mib`` MiB of non-zero data (no holes: every read reaches the file's pages)."""
    chunk = os.urandom(1 << 20)
    with path.open("wb") as image:
        for _ in range(mib):
            image.write(chunk)


def lab_config(
    setup: str, image: Path, seconds: int, vhost_topology: Callable[[Path], Topology]
) -> LabConfig:
    """The lab of one set-up; ``vhost_topology(image)``: the topology whose [[devices]] serve the disk."""
    params = {
        "blk_bench": ",".join(f"{workload}:{depth}" for workload, depth in WORKLOADS),
        "blk_seconds": str(seconds),
        "hold": "1",  # the back-end's counters are read before the guest powers off
    }
    identity = ("iommu.passthrough=1",) if setup in (QEMU_IDENTITY, VHOST_IDENTITY) else ()
    if setup in (QEMU_DMA, QEMU_IDENTITY):
        return LabConfig(
            job="blk-bench",
            params=params,
            kernel_args=identity,
            iommu=IommuKind.BUILTIN,
            endpoints=(VirtioBlockDevice(slot=DISK_SLOT, image=image),),
            control=False,
        )
    if setup in (VHOST_DMA, VHOST_IDENTITY):
        return LabConfig(
            job="blk-bench",
            params=params,
            kernel_args=identity,
            topology=vhost_topology(image),
            endpoints=(),
            serve_devices=True,
            control=False,
        )
    raise ValueError(f"unknown set-up {setup!r} (known: {', '.join(SETUPS)})")


def run_boot(
    setup: str,
    round_number: int,
    image: Path,
    seconds: int,
    vhost_topology: Callable[[Path], Topology],
    log: Path | None = None,
) -> BootOutcome:
    """Boot one set-up, run every workload, power off; failures recorded, not raised."""
    outcome = BootOutcome(setup, round_number)
    started = time.monotonic()
    lines: Sequence[str] = ()
    try:
        with Lab(lab_config(setup, image, seconds, vhost_topology), log=log) as lab:
            try:
                lab.guest.expect(r"VHOST_IOMMU_HOLD", seconds * len(WORKLOADS) + 300)
                if lab.endpoints is not None:
                    served = lab.endpoints.endpoints[0]
                    outcome.counters = lab.call(
                        lambda: {} if served.port is None else dict(served.port.counters())
                    )
                lab.guest.send("")
                run = lab.guest.wait(60)
                if run.job_rc != 0:
                    outcome.errors.append(f"the guest's blk-bench job ended with rc={run.job_rc}")
            finally:
                lines = lab.guest.run.lines
    except (ProvisionError, LabError, CommandError, OSError, TimeoutError) as error:
        outcome.errors.append(f"{type(error).__name__}: {error}")
    outcome.figures = parse_results(lines)
    outcome.warnings = kernel_warnings(lines)
    outcome.errors += [f"kernel: {stall}" for stall in stalls(outcome.warnings)]
    outcome.errors += [
        f"{workload} depth {depth}: {figure.errors} I/O errors"
        for (workload, depth), figure in outcome.figures.items()
        if figure.errors
    ]
    outcome.seconds = time.monotonic() - started
    return outcome


@dataclass(frozen=True)
class Summary:
    """Medians over rounds of one set-up's workload, with the spread of the rounds."""

    iops: float
    mbps: float
    latency_ns: float
    iops_low: float
    iops_high: float


def summarise(outcomes: Sequence[BootOutcome]) -> dict[str, dict[tuple[str, int], Summary]]:
    """Per set-up and workload: the median of the rounds that produced it (failed boots included only for
    the workloads they completed)."""
    table: dict[str, dict[tuple[str, int], Summary]] = {}
    for setup in SETUPS:
        for key in WORKLOADS:
            figures = [o.figures[key] for o in outcomes if o.setup == setup and key in o.figures]
            if figures:
                iops = [figure.iops for figure in figures]
                table.setdefault(setup, {})[key] = Summary(
                    statistics.median(iops),
                    statistics.median(figure.mbps for figure in figures),
                    statistics.median(figure.latency_ns for figure in figures),
                    min(iops),
                    max(iops),
                )
    return table


def iommu_cost(
    table: dict[str, dict[tuple[str, int], Summary]], dma: str, identity: str
) -> dict[tuple[str, int], float]:
    """Per workload: time per request in DMA mode over identity mode (identity IOPS / DMA IOPS)."""
    costs: dict[tuple[str, int], float] = {}
    for key in WORKLOADS:
        if key in table.get(dma, {}) and key in table.get(identity, {}) and table[dma][key].iops > 0:
            costs[key] = table[identity][key].iops / table[dma][key].iops
    return costs

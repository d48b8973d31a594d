"""The guest benchmark's parsing, combining and tables (vhost_iommu.bench), and its empty back-end.

No QEMU here: console lines are written out as the guest prints them, and the empty back-end is driven
through the harness front-end.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from vhost_iommu.bench.empty import EmptyBackend
from vhost_iommu.bench.results import (
    BUILTIN,
    BULK_MAP,
    BULK_UNMAP,
    EMPTY,
    MIXED,
    PAIRS,
    SCATTER_MAP,
    SCATTER_UNMAP,
    VHOST_IOMMU,
    VHOST_IOMMU_PYTHON,
    Combined,
    Figure,
    Metric,
    Row,
    combine,
    compare,
    figure_records,
    figures_from_lines,
    figures_from_records,
    format_ns,
    format_size,
    kernel_warnings,
    markdown_table,
    stalls,
)
from vhost_iommu.bench.runner import BenchPlan, RunOutcome, check, lab_config
from vhost_iommu.device import Topology
from vhost_iommu.device.layout import encode_attach, encode_map, encode_unmap
from vhost_iommu.harness import IommuDriver
from vhost_iommu.harness.background import RunningServer
from vhost_iommu.qemu import IommuKind
from vhost_iommu.virtio_iommu import VirtioIommuBackend

GUEST_LINES = [
    "VHOST_IOMMU_JOB_START job=vfio-bench iommu_bound=1 uptime_ms=2100",
    "VFIO_OPEN device=0000:00:04.0 group=0",
    "VFIO_PAIRS size=4096 n=2000 mean_ns=24000 min_ns=15000 p50_ns=18000 p99_ns=64000 max_ns=900000 "
    "total_ns=48000000",
    # A kernel message can share the console line a marker starts on.
    "[   12.5] random: crng init done VFIO_BULK_MAP size=4096 n=4096 mean_ns=20000 min_ns=9000 p50_ns=12000 "
    "p99_ns=62000 max_ns=500000 total_ns=81920000",
    "VFIO_BULK_UNMAP n=4096 bytes=16777216 unmap_ns=27900000",
    "VFIO_MIXED size=4096 n=300 mean_ns=20000 min_ns=1 p50_ns=18000 p99_ns=90000 max_ns=1 total_ns=6000000",
    "VFIO_MIXED size=2097152 n=100 mean_ns=340000 min_ns=1 p50_ns=165000 p99_ns=4500000 max_ns=1 "
    "total_ns=34000000",
    "VFIO_SCATTER n=4096 bytes=16777216 runs=4000 map_ns=90000000 unmap_ns=30000000",
    "VHOST_IOMMU_KLOG [    1.6] amd_pstate: the _CPC object is not present in SBIOS or ACPI disabled",
    "VHOST_IOMMU_KLOG [   30.1] watchdog: BUG: soft lockup - CPU#0 stuck for 22s! [vfio-dma:90]",
    "VHOST_IOMMU_KLOG_END",
    "VHOST_IOMMU_JOB_DONE rc=0 uptime_ms=40000",
]


def test_figures_from_the_guest_lines() -> None:
    figures = figures_from_lines(GUEST_LINES)
    assert figures[Metric(PAIRS, size=4096)] == Figure(24000, 18000, 64000, 2000)
    assert figures[Metric(BULK_MAP, count=4096, size=4096)] == Figure(20000, 12000, 62000, 4096)
    assert figures[Metric(BULK_UNMAP, count=4096)] == Figure(27900000)
    assert figures[Metric(MIXED, size=2097152)].p99_ns == 4500000
    # All sizes: the mean over every pair, weighted by each size's count; no percentiles.
    assert figures[Metric(MIXED)] == Figure((20000 * 300 + 340000 * 100) / 400, None, None, 400)
    assert figures[Metric(SCATTER_MAP, count=4096)] == Figure(90000000, n=4000)
    assert figures[Metric(SCATTER_UNMAP, count=4096)] == Figure(30000000, n=4000)
    assert len(figures) == 8
    # results.json keeps them as records; --replot reads them back.
    assert figures_from_records(json.loads(json.dumps(figure_records(figures)))) == figures


def test_kernel_warnings_and_stalls() -> None:
    warnings = kernel_warnings(GUEST_LINES)
    assert len(warnings) == 2 and warnings[0].startswith("[    1.6] amd_pstate")
    assert stalls(warnings) == [warnings[1]]
    assert stalls(["rcu: INFO: rcu_preempt self-detected stall on CPU"]) != []
    assert stalls(["INFO: task vfio-dma:90 blocked for more than 120 seconds."]) != []
    assert stalls(["vfio-pci 0000:00:04.0: enabling device"]) == []


def test_metric_labels_and_targets() -> None:
    assert Metric(BULK_UNMAP, count=65536).target == Metric(SCATTER_UNMAP, count=8).target == 1.0
    assert Metric(SCATTER_MAP, count=8).target == 1.5 and not Metric(SCATTER_MAP, count=8).per_operation
    assert not Metric(BULK_UNMAP, count=65536).per_operation
    assert Metric(PAIRS, size=4096).target == 1.5
    assert Metric(MIXED, size=2 << 20).label == "mixed: map+unmap 2 MiB"
    assert Metric(BULK_MAP, count=4096, size=4096).label == "N=4096 single-page maps, per map"
    assert (format_size(4096), format_size(1000)) == ("4 KiB", "1000 B")
    assert (format_ns(14_700), format_ns(22_400_000), format_ns(6_330_000_000)) == (
        "14.7 us",
        "22.4 ms",
        "6.33 s",
    )


def test_combine_takes_medians_and_keeps_the_spread() -> None:
    metric = Metric(PAIRS, size=4096)
    runs = [{metric: Figure(mean, mean - 1, mean + 1, 10)} for mean in (30.0, 10.0, 20.0)]
    combined = combine(runs)[metric]
    assert combined.figure == Figure(20.0, 19.0, 21.0, 10)
    assert (combined.runs, combined.lowest_mean_ns, combined.highest_mean_ns) == (3, 10.0, 30.0)


def _combined(mean: float, p50: float | None = None) -> Combined:
    return Combined(Figure(mean, p50, None if p50 is None else 2 * p50), 1, mean, mean)


def test_rows_ratios_and_targets() -> None:
    pairs, unmap = Metric(PAIRS, size=4096), Metric(BULK_UNMAP, count=4096)
    rows = compare(
        {
            BUILTIN: {unmap: _combined(20e6), pairs: _combined(20e3, 10e3)},
            VHOST_IOMMU: {pairs: _combined(28e3, 20e3), unmap: _combined(30e6)},
            EMPTY: {pairs: _combined(10e3, 8e3)},
        }
    )
    assert [row.metric for row in rows] == [pairs, unmap]
    assert rows[0].ratio(VHOST_IOMMU) == pytest.approx(1.4)
    assert rows[0].median_ratio(VHOST_IOMMU) == pytest.approx(2.0)
    assert rows[0].meets_target() is True
    assert rows[1].ratio(VHOST_IOMMU) == pytest.approx(1.5) and rows[1].meets_target() is False
    assert rows[1].ratio(EMPTY) is None and rows[1].median_ratio(VHOST_IOMMU) is None
    assert Row(pairs, {VHOST_IOMMU: _combined(1.0)}).meets_target() is None


def test_markdown_table() -> None:
    pairs = Metric(PAIRS, size=4096)
    rows = compare({BUILTIN: {pairs: _combined(20e3, 10e3)}, VHOST_IOMMU: {pairs: _combined(28e3, 20e3)}})
    lines = markdown_table(rows).splitlines()
    assert lines[0].startswith("| workload | built-in (QEMU virtio-iommu-pci) | vhost-iommu |")
    assert lines[1].count("---") == lines[0].count("|") - 1
    assert lines[2] == (
        "| pairs: map+unmap 4 KiB, per pair | 20.0 us (p50 10.0 us, p99 20.0 us) | "
        "28.0 us (p50 20.0 us, p99 40.0 us) | - | 1.40 (p50 2.00) | - | <= 1.5 | yes |"
    )


def test_plan_items_and_lab_configs() -> None:
    plan = BenchPlan(pairs=100, bulk=(8, 16), scatter=(32,), workloads=("bulk", "pairs", "scatter"))
    assert plan.items() == ["bulk:8", "bulk:16", "pairs:100", "scatter:32"]
    with pytest.raises(ValueError, match="unknown workload"):
        BenchPlan(workloads=("nope",)).items()
    builtin, vhost, empty = (lab_config(kind, plan) for kind in (BUILTIN, VHOST_IOMMU, EMPTY))
    assert builtin.iommu is IommuKind.BUILTIN and not builtin.extra_qemu_args
    assert vhost.params == builtin.params == {"count": "100", "bench": "bulk:8,bulk:16,pairs:100,scatter:32"}
    assert vhost.iommu is IommuKind.VHOST_USER and vhost.backend_factory is not None
    assert empty.backend_factory is not None
    assert type(vhost.backend_factory(Topology.default())) is VirtioIommuBackend
    assert type(empty.backend_factory(Topology.default())) is EmptyBackend
    polling = lab_config(VHOST_IOMMU, BenchPlan(poll_us=20)).backend_factory
    assert polling is not None
    compiled = polling(Topology.default())._compiled
    assert compiled is not None and compiled.poll_ticks > 0
    assert not any(config.control for config in (builtin, vhost, empty))  # no per-kick instrumentation
    assert empty.extra_qemu_args == ("-global", "vhost-user-test-device.vq_size=256")
    assert lab_config(EMPTY, BenchPlan(vq_size=0)).extra_qemu_args == ()
    python_path = lab_config(VHOST_IOMMU_PYTHON, plan).backend_factory
    assert python_path is not None and python_path(Topology.default()).request_path == "python"


def test_check_finds_every_reason_to_fail() -> None:
    plan = BenchPlan(workloads=("pairs", "bulk", "mixed"))
    good = RunOutcome(VHOST_IOMMU, 0, job_rc=0)
    check(good, [line for line in GUEST_LINES if "soft lockup" not in line], plan)
    assert not good.failed and good.errors == [] and len(good.warnings) == 1

    stalled = RunOutcome(VHOST_IOMMU, 0, job_rc=0)
    check(stalled, GUEST_LINES, plan)
    assert stalled.failed and stalled.stalls and stalled.errors == []

    broken = RunOutcome(BUILTIN, 0, job_rc=1)
    lines = [*GUEST_LINES[:3], 'VFIO_ERROR op=map errno=28 msg="No space left on device"']
    check(broken, lines, plan)
    assert broken.failed
    assert broken.errors == [
        'VFIO_ERROR op=map errno=28 msg="No space left on device"',
        "no bulk-map, bulk-unmap figures in the guest's output",
        "no mixed figures in the guest's output",
        "the guest's job failed (rc=1)",
    ]

    silent = RunOutcome(EMPTY, 0)
    check(silent, [], BenchPlan(workloads=("pairs",)))
    assert silent.errors == [
        "no pairs figures in the guest's output",
        "the guest never reported the end of its job",
    ]


@pytest.fixture(params=[False, True], ids=["event-loop", "kick-thread"])
def backend_factory(request: pytest.FixtureRequest) -> Callable[[], VirtioIommuBackend]:
    return lambda: EmptyBackend(Topology.default(), kick_thread=request.param)


def test_empty_backend_answers_map_and_unmap_without_work(
    vhost_server: RunningServer, iommu_driver: IommuDriver
) -> None:
    requests, frontend = iommu_driver.requests, iommu_driver.frontend
    (backend,) = vhost_server.backends
    assert isinstance(backend, EmptyBackend)
    # No ATTACH yet: the real device would answer NOENT (no such domain); the empty one says OK,
    # for direct chains and indirect ones (what Linux posts when VIRTIO_RING_F_INDIRECT_DESC is on).
    requests.post([encode_map(domain=5, virt_start=0x1000, virt_end=0x1FFF, phys_start=0x8000)], [4])
    requests.post([encode_unmap(domain=5, virt_start=0x1000, virt_end=0x1FFF)], [4], indirect=True)
    # A MAP whose tail cannot be found goes to the device core, which returns it unwritten.
    requests.post([encode_map(domain=5, virt_start=0, virt_end=0xFFF, phys_start=0)], [8])
    # ATTACH is served for real: the guest needs its endpoint attached to bind VFIO.
    requests.post([encode_attach(domain=1, endpoint=0x20)], [4])
    frontend.kick(0)
    assert frontend.wait_used(0)
    used = requests.used_with_data()
    assert [(length, data) for _, length, data in used] == [
        (4, bytes(4)),
        (4, bytes(4)),
        (0, b""),
        (4, bytes(4)),
    ]
    with backend.quiesced():  # the requestq thread's counts merged, if it serves
        counters = backend.device.request_counters()
        assert (counters["MAP"], counters["UNMAP"], counters["ATTACH"], counters["UNSERVED"]) == (
            1,
            1,
            1,
            1,
        )
        assert backend.device.domain_of(0x20) == 1 and backend.device.mappings(1) == []

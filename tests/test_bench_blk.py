"""scripts/bench-blk's arithmetic: what it reads from the guest and the IOMMU cost it reports."""

from __future__ import annotations

from vhost_iommu.bench.blk import (
    QEMU_DMA,
    QEMU_IDENTITY,
    WORKLOADS,
    BootOutcome,
    Figure,
    iommu_cost,
    parse_results,
    summarise,
)

LINES = [
    "VHOST_IOMMU_BLK_DISK disk=/dev/vda pci=0000:00:05.0 domain=DMA-FQ",
    "BLK_BENCH workload=randread4k depth=1 ops=100 bytes=409600 ns=1000000000 iops=100 mbps=0.4 "
    "lat_ns=10000000 errors=0",
    "BLK_BENCH workload=randread4k depth=16 ops=800 bytes=3276800 ns=1000000000 iops=800 mbps=3.3 "
    "lat_ns=20000000 errors=2",
]


def test_the_guest_lines_give_one_figure_per_workload_and_depth() -> None:
    assert parse_results(LINES) == {
        ("randread4k", 1): Figure(100.0, 0.4, 10_000_000, 0),
        ("randread4k", 16): Figure(800.0, 3.3, 20_000_000, 2),
    }


def test_the_iommu_cost_is_dma_time_per_request_over_identity_of_the_medians() -> None:
    key = WORKLOADS[0]
    boots = [
        BootOutcome(QEMU_DMA, 1, {key: Figure(100.0, 0.4, 0, 0)}),
        BootOutcome(QEMU_DMA, 2, {key: Figure(300.0, 1.2, 0, 0)}),
        BootOutcome(QEMU_DMA, 3, {key: Figure(200.0, 0.8, 0, 0)}),
        BootOutcome(QEMU_IDENTITY, 1, {key: Figure(500.0, 2.0, 0, 0)}),
    ]
    table = summarise(boots)
    assert (table[QEMU_DMA][key].iops, table[QEMU_DMA][key].iops_low) == (200.0, 100.0)
    assert iommu_cost(table, QEMU_DMA, QEMU_IDENTITY) == {key: 2.5}
    # A workload no boot of one side completed has no cost, rather than a made-up one.
    assert iommu_cost(table, QEMU_DMA, "vhost-identity") == {}

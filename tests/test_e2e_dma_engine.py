"""End to end: the DMA test engine served over vfio-user to a real QEMU, driven by the guest's own VFIO
(guest/dma-engine.c), every access translated by vhost-iommu from the guest's virtio-iommu state.

One guest boot runs every test of the guest program (bypass first, while no driver owns the engine, then
copy, use after unmap, read-only, bus master and release through vfio-pci) and holds while the back-end's
counters are read; each test below asserts on one part of that run.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from vhost_iommu.device.layout import FAULT_F_ADDRESS, FAULT_F_READ, FAULT_F_WRITE, FaultReason
from vhost_iommu.endpoints.dma_engine import EngineError, StatusBit
from vhost_iommu.lab import Lab, LabConfig
from vhost_iommu.provision.boot import GuestRun
from vhost_iommu.provision.dma_engine_report import EngineReport, parse_dma_engine

# every_arch: the DMA engine over vfio-user on Arm too, inside the device tree's iommu-map.
pytestmark = [pytest.mark.e2e, pytest.mark.every_kernel, pytest.mark.every_arch]

ENGINE_BDF = "0000:00:05.0"
ENGINE_ENDPOINT = 0x28  # 00:05.0: endpoint ID = BDF in the default topology; the guest prints it decimal
TESTS = "bypass,copy,uaf,readonly,busmaster,release"
BOOT_TIMEOUT = 300.0
JOB_TIMEOUT = 600.0


@dataclass
class EngineRun:
    run: GuestRun
    report: EngineReport
    engine: dict[str, Any]  # the engine model's counters while the guest held
    port: dict[str, int]  # the endpoint's DMA counters in the IOMMU (its DmaPort)


@pytest.fixture(scope="module")
def engine_run(guest_kind: object) -> Iterator[EngineRun]:  # one guest per kernel and architecture
    config = LabConfig(
        job="dma-engine", params={"dev": ENGINE_BDF, "dma": TESTS, "hold": "1"}, serve_devices=True
    )
    with Lab(config) as lab:
        lab.guest.expect(r"VHOST_IOMMU_HOLD", JOB_TIMEOUT)
        assert lab.endpoints is not None
        served = lab.endpoints.endpoints[0]

        def counters() -> tuple[dict[str, Any], dict[str, int]]:
            port = served.port
            return vars(served.device.counters).copy(), ({} if port is None else dict(port.counters()))

        engine, port = lab.call(counters)
        lab.guest.send("")
        run = lab.guest.wait(BOOT_TIMEOUT)
    yield EngineRun(run, parse_dma_engine(run.lines), engine, port)


def test_every_guest_check_passed(engine_run: EngineRun) -> None:
    for name in TESTS.split(","):
        test = engine_run.report[name]
        assert test.rc == 0 and not test.failed_checks, "\n".join(test.lines)


def test_a_copy_between_vfio_buffers_is_translated_byte_for_byte(engine_run: EngineRun) -> None:
    copy = engine_run.report["copy"]
    assert copy.ops and all(op.status == StatusBit.DONE or op.step.startswith("compare") for op in copy.ops)
    assert any(check.check == "bytes" and check.ok for check in copy.checks)
    assert engine_run.port["page_translations"] > 0  # the engine's accesses went through the IOMMU's tables


def test_use_after_unmap_is_blocked_and_the_guest_logs_the_fault(engine_run: EngineRun) -> None:
    op = engine_run.report["uaf"].op("copy-after-unmap")
    assert op.status == StatusBit.DONE | StatusBit.FAULT and op.done_bytes == 0
    assert (op.fault_reason, op.fault_flags) == (FaultReason.MAPPING, FAULT_F_WRITE | FAULT_F_ADDRESS)
    line = f"page fault from EP {ENGINE_ENDPOINT} at {op.fault_address:#x} [W]"
    assert any(line in text for text in engine_run.run.lines), f"no '{line}' in the guest's log"


def test_a_write_through_a_read_only_mapping_is_blocked(engine_run: EngineRun) -> None:
    test = engine_run.report["readonly"]
    blocked = test.op("copy-into-readonly")
    assert blocked.status & StatusBit.FAULT and blocked.fault_flags == FAULT_F_WRITE | FAULT_F_ADDRESS
    assert test.op("copy-from-readonly").status == StatusBit.DONE


def test_bypass_reaches_guest_physical_addresses(engine_run: EngineRun) -> None:
    test = engine_run.report["bypass"]
    assert test.ops and all(op.status == StatusBit.DONE for op in test.ops)
    assert engine_run.port["bypassed_accesses"] > 0


def test_without_bus_master_the_engine_does_no_dma(engine_run: EngineRun) -> None:
    op = engine_run.report["busmaster"].op("copy-without-bus-master")
    assert op.status == StatusBit.DONE | StatusBit.ERROR and op.error == EngineError.NO_BUS_MASTER


def test_after_the_vfio_release_no_stale_translation_is_used(engine_run: EngineRun) -> None:
    test = engine_run.report["release"]
    for step in ("copy-after-release", "fill-after-release"):
        op = test.op(step)
        assert op.done_bytes == 0 and op.status & (StatusBit.FAULT | StatusBit.ERROR)
    assert test.op("copy-after-release").fault_flags in (FAULT_F_READ | FAULT_F_ADDRESS, 0)

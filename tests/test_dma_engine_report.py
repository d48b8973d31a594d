"""The guest's dma-engine program: its DMAE_ lines parsed into typed results, and its own judging of the
engine's registers, run on the host against a memory page standing for BAR0 (tests/guest/)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from vhost_iommu.device.layout import Access, FaultReason
from vhost_iommu.provision.dma_engine_report import EngineError, EngineStatus, parse_dma_engine
from vhost_iommu.provision.paths import repo_root

# Recorded from guest/dma-engine.c's printf lines (tests/guest/dma_engine_harness.c), with the console's
# kernel text and the guest's other lines around them.
SAMPLE = """\
VHOST_IOMMU_JOB_START job=dma-engine iommu_bound=1 uptime_ms=2100
VHOST_IOMMU_VFIO_BOUND dev=0000:00:05.0 group=1
DMAE_OPEN device=0000:00:05.0 group=1
DMAE_ERROR op=set-irqs-msix errno=22 msg="Invalid argument"
DMAE_COMMAND test=uaf command=0x0406 memory=1 bus_master=1
DMAE_ENGINE test=uaf device=0000:00:05.0 bar=mmap irq=poll magic=0x45414d44 version=1 \
max_length=16777216
DMAE_BUFFERS test=uaf src=0x100000000 dst=0x200000000 size=16384 maps=page
DMAE_OP test=uaf step=copy-while-mapped op=copy src=0x100000000 dst=0x200000000 length=16384 \
status=0x1 error=0 fault_reason=0 fault_flags=0x0 fault_address=0x0 done_bytes=16384 \
mismatch_offset=0 completed=1 irq=off ns=9120345
DMAE_CHECK test=uaf step=copy-while-mapped check=engine ok=1 want="DONE done_bytes=16384"
[   12.345678] virtio_iommu virtio0: page fault from EP 40 at 0x200000000 [W]
DMAE_OP test=uaf step=copy-after-unmap op=copy src=0x100000000 dst=0x200000000 length=16384 \
status=0x3 error=0 fault_reason=2 fault_flags=0x102 fault_address=0x200000000 done_bytes=0 \
mismatch_offset=0 completed=2 irq=off ns=120
DMAE_CHECK test=uaf step=copy-after-unmap check=engine ok=1 want="FAULT reason=2 flags=0x102 \
address=0x200000000 done_bytes=0"
DMAE_CHECK test=uaf step=copy-after-partial-unmap check=bytes ok=0 want="canary 0x1000-0x4000" \
first_wrong=4100
DMAE_RESULT test=uaf rc=1
DMAE_OP test=busmaster step=copy-without-bus-master op=copy src=0x100000000 dst=0x200000000 \
length=8192 status=0x9 error=3 fault_reason=0 fault_flags=0x0 fault_address=0x0 done_bytes=0 \
mismatch_offset=0 completed=0 irq=fired ns=61
DMAE_CHECK test=busmaster step=copy-without-bus-master check=irq ok=1 want="MSI-X vector 0 within \
20000 ms"
DMAE_CHECK test=busmaster step=copy-without-bus-master check=engine ok=1 want="ERROR error=3 \
done_bytes=0"
DMAE_RESULT test=busmaster rc=0
DMAE_ENGINE test=release device=0000:00:05.0 bar=sysfs irq=poll magic=0x45414d44 version=1 \
max_length=16777216
VHOST_IOMMU_JOB_DONE rc=1 uptime_ms=9000
"""


def test_sample_parses_into_one_typed_result_per_run() -> None:
    report = parse_dma_engine(SAMPLE.splitlines())

    assert [test.name for test in report.tests] == ["uaf", "busmaster", "release"]
    uaf = report["uaf"]
    assert uaf.rc == 1 and not uaf.passed
    # DMAE_OPEN and the recovered DMAE_ERROR came before any line that names the test: they belong to it.
    assert uaf.errors == [{"op": "set-irqs-msix", "errno": "22", "msg": "Invalid argument"}]
    assert [reached["bar"] for reached in uaf.reached] == ["mmap"]
    assert uaf.op("copy-while-mapped").succeeded
    fault = uaf.op("copy-after-unmap")
    assert not fault.succeeded
    assert fault.status == EngineStatus.DONE | EngineStatus.FAULT
    assert fault.fault_reason is FaultReason.MAPPING
    assert fault.fault_access == Access.WRITE and fault.fault_address_valid
    assert fault.fault_address == 0x2_0000_0000 and fault.done_bytes == 0
    (wrong,) = uaf.failed_checks
    assert (wrong.step, wrong.check, wrong.first_wrong) == ("copy-after-partial-unmap", "bytes", 4100)
    assert wrong.want == "canary 0x1000-0x4000"

    busmaster = report["busmaster"]
    assert busmaster.passed
    blocked = busmaster.op("copy-without-bus-master")
    assert EngineStatus.ERROR in blocked.status and blocked.error is EngineError.NO_BUS_MASTER
    assert blocked.irq == "fired"
    with pytest.raises(KeyError, match="copy-with-bus-master"):
        busmaster.op("copy-with-bus-master")

    # A run the guest never finished has no rc, and does not pass.
    assert report["release"].rc is None and not report["release"].passed
    assert report["release"].reached[0]["bar"] == "sysfs"
    with pytest.raises(KeyError):
        report["bypass"]


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc (scripts/build-guest installs it)")
def test_the_guest_program_judges_the_engine_registers_as_documented(tmp_path: Path) -> None:
    harness = tmp_path / "harness"
    subprocess.run(
        ["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-I", repo_root() / "guest", "-o", harness,
         repo_root() / "tests" / "guest" / "dma_engine_harness.c"],
        check=True,
    )  # fmt: skip
    output = subprocess.run([harness], check=True, capture_output=True, text=True).stdout
    report = parse_dma_engine(output.splitlines())

    uaf = report["uaf"]
    assert uaf.rc == 1
    assert {(check.step, check.check): check.ok for check in uaf.checks} == {
        ("copy-after-unmap", "engine"): True,
        ("copy-after-unmap", "bytes"): True,
        # The same fault judged for a partial unmap (one page done), and a byte changed past it.
        ("copy-after-partial-unmap", "engine"): False,
        ("copy-after-partial-unmap", "bytes"): False,
    }
    assert uaf.failed_checks[-1].first_wrong == 0x1004
    fault = uaf.op("copy-after-unmap")
    assert (fault.src, fault.dst, fault.length) == (0x1_0000_0000, 0x2_0000_0000, 0x2000)
    assert fault.fault_access == Access.WRITE and fault.fault_address == 0x2_0000_0000

    assert report["busmaster"].passed
    assert report["busmaster"].op("copy-without-bus-master").error is EngineError.NO_BUS_MASTER
    copy = report["copy"]
    # DONE beside MISMATCH is a mismatch, not a success.
    assert [check.ok for check in copy.checks] == [True, False]
    assert copy.op("compare-differing-4096").mismatch_offset == 2051

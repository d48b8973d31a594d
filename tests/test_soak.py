"""The soak's figures and verdict (vhost_iommu.soak.measure), its report and its command line, on made-up
samples; the soak itself boots a guest (tests/test_soak_e2e.py, scripts/soak)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vhost_iommu.soak.__main__ import parse_args
from vhost_iommu.soak.measure import (
    Findings,
    GuestProgress,
    Limits,
    ProcessSample,
    Sample,
    backend_problems,
    descendants,
    growth,
    guest_errors,
    kernel_trouble,
    needs_reset,
    parse_round,
    process_changes,
    read_backend,
    read_process,
    verdict,
    warmup_seconds,
)
from vhost_iommu.soak.report import markdown, to_json
from vhost_iommu.soak.run import SoakConfig, SoakResult


def process(rss: int = 100_000, fds: int = 20, anon: int = 50_000, threads: int = 3) -> ProcessSample:
    return ProcessSample(
        rss_kib=rss,
        rss_max_kib=rss,
        anon_kib=anon,
        file_kib=rss - anon,
        shmem_kib=0,
        fds=fds,
        threads=threads,
        cpu_seconds=1.0,
    )


def sample(seconds: float, rss: int = 100_000, fds: int = 20, rounds: int = 0) -> Sample:
    return Sample(
        seconds=seconds,
        process=process(rss=rss, fds=fds),
        guest=GuestProgress(rounds=rounds, vfio_ops=rounds * 100),
        device_requests=rounds * 250,
        load=(1.0, 1.0, 1.0),
    )


def test_read_process_sees_this_process_and_counts_its_fds() -> None:
    before = read_process(os.getpid())
    with open(os.devnull) as _extra:
        during = read_process(os.getpid())
    assert during.fds == before.fds + 1
    assert before.rss_kib > 0 and before.rss_max_kib >= before.rss_kib
    assert before.anon_kib + before.file_kib + before.shmem_kib == pytest.approx(before.rss_kib, abs=16)
    assert before.threads >= 1
    assert during.cpu_seconds >= before.cpu_seconds >= 0


def test_read_process_of_a_missing_process_raises() -> None:
    with pytest.raises(OSError):
        read_process(2**22 + 1)  # above the largest pid Linux hands out


def test_read_backend_adds_up_the_process_and_its_children() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        assert child.pid in descendants(os.getpid())
        total, pids = read_backend(os.getpid())
        alone, child_alone = read_process(os.getpid()), read_process(child.pid)
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait()
    assert os.getpid() in pids and child.pid in pids
    assert total.threads >= alone.threads + child_alone.threads
    assert total.fds >= alone.fds + child_alone.fds - 1  # less the fd the listing of ours held
    assert child.pid not in descendants(os.getpid())


def test_process_changes_reports_a_changed_set_of_processes() -> None:
    def at(seconds: float, pids: tuple[int, ...]) -> Sample:
        return dataclasses.replace(sample(seconds), pids=pids)

    assert process_changes([at(0, (10, 11)), at(5, (10, 11)), at(10, ())]) == []
    assert process_changes([at(0, (10, 11)), at(5, (10, 12))]) == [
        "at 5 s the back-end's processes went from [10, 11] to [10, 12]"
    ]


def test_parse_round_reads_the_guests_line() -> None:
    line = (
        "[   12.3] noise VHOST_IOMMU_SOAK_ROUND round=7 vfio_ops=16989 blk_mb=28 rebinds=7 errors=1 "
        "uptime_ms=12345"
    )
    assert parse_round(line) == GuestProgress(
        rounds=7, vfio_ops=16989, blk_mb=28, rebinds=7, errors=1, uptime_ms=12345
    )
    assert parse_round("VHOST_IOMMU_SOAK_START plan=pairs:1 disk=none seconds=0") is None
    assert parse_round("VHOST_IOMMU_SOAK_ROUND round=x") is None  # cut or garbled: not progress


def test_warmup_is_a_tenth_of_the_run_at_most_three_minutes() -> None:
    assert warmup_seconds(120) == pytest.approx(12)
    assert warmup_seconds(30 * 60) == pytest.approx(180)
    assert warmup_seconds(4 * 3600) == pytest.approx(180)


def test_growth_runs_from_the_first_sample_after_the_warmup_to_the_last() -> None:
    samples = [sample(0, rss=80_000, fds=18), sample(5, rss=120_000, fds=25), sample(10, rss=100_000)]
    samples += [sample(15, rss=101_000, fds=20), sample(20, rss=102_000, fds=19)]
    measured = growth(samples, warmup=10)
    assert measured is not None
    assert measured.reference.seconds == 10 and measured.end.seconds == 20
    assert measured.rss_growth_percent == pytest.approx(2.0)
    assert measured.fd_growth == -1
    assert measured.rss_max_kib == 120_000  # the warm-up's peak is still reported
    assert measured.measured_seconds == 10


def test_growth_needs_two_samples_after_the_warmup() -> None:
    assert growth([sample(0), sample(5)], warmup=5) is None
    assert growth([], warmup=0) is None


def test_verdict_passes_flat_figures_and_a_clean_run() -> None:
    measured = growth([sample(10), sample(20, rss=104_900, fds=20)], warmup=10)
    assert verdict(measured, Findings()) == []


@pytest.mark.parametrize(
    ("rss", "fds", "failing"),
    [
        (105_000, 20, "RSS grew 5.00%"),  # the limit itself fails: growth must stay under it
        (100_000, 21, "open fds grew by 1"),
        (106_000, 22, "RSS grew 6.00%"),
    ],
)
def test_verdict_fails_growth(rss: int, fds: int, failing: str) -> None:
    measured = growth([sample(10), sample(20, rss=rss, fds=fds)], warmup=10)
    reasons = verdict(measured, Findings())
    assert any(reason.startswith(failing) for reason in reasons), reasons


def test_verdict_limits_are_configurable() -> None:
    measured = growth([sample(10), sample(20, rss=108_000, fds=21)], warmup=10)
    assert verdict(measured, Findings(), Limits(rss_growth_percent=10, fd_growth=1)) == []


def test_verdict_fails_a_run_too_short_to_measure() -> None:
    assert verdict(None, Findings())[0].startswith("too short")


def test_verdict_lists_every_finding_with_its_kind() -> None:
    measured = growth([sample(10), sample(20)], warmup=10)
    findings = Findings(
        kernel=["watchdog: BUG: soft lockup - CPU#0 stuck for 22s!"],
        needs_reset=["connection 1: bad chain"],
        control=["at 5 s: inject: bad-argument: no"],
        run=["the back-end exited during the soak"],
    )
    assert verdict(measured, findings) == [
        "guest kernel: watchdog: BUG: soft lockup - CPU#0 stuck for 22s!",
        "NEEDS_RESET: connection 1: bad chain",
        "control channel: at 5 s: inject: bad-argument: no",
        "soak: the back-end exited during the soak",
    ]


def test_kernel_trouble_finds_stalls_and_oopses_once_and_leaves_expected_messages() -> None:
    lines = [
        "VHOST_IOMMU_KLOG [    9.2] virtio_iommu virtio0: page fault from EP 32 at 0xdead000 [W]",
        "VHOST_IOMMU_KLOG [   19.2] virtio_iommu virtio0: config changed",
        "VHOST_IOMMU_KLOG [   30.1] watchdog: BUG: soft lockup - CPU#0 stuck for 22s! [vfio-dma:81]",
        "VHOST_IOMMU_KLOG [   30.1] watchdog: BUG: soft lockup - CPU#0 stuck for 22s! [vfio-dma:81]",
        "[   40.0] rcu: INFO: rcu_preempt self-detected stall on CPU",
        "[   50.0] Oops: general protection fault, probably for non-canonical address",
        "VHOST_IOMMU_SOAK_ROUND round=3 vfio_ops=1 blk_mb=0 rebinds=0 errors=0 uptime_ms=1",
    ]
    assert kernel_trouble(lines) == [
        "[   30.1] watchdog: BUG: soft lockup - CPU#0 stuck for 22s! [vfio-dma:81]",
        "[   40.0] rcu: INFO: rcu_preempt self-detected stall on CPU",
        "[   50.0] Oops: general protection fault, probably for non-canonical address",
    ]


def test_guest_errors_backend_problems_and_needs_reset() -> None:
    assert guest_errors(
        [
            "VHOST_IOMMU_SOAK_ROUND round=1 vfio_ops=2 blk_mb=0 rebinds=0 errors=1 uptime_ms=1",
            'VHOST_IOMMU_SOAK_ERROR VFIO_ERROR op=map errno=12 msg="Cannot allocate memory"',
            "VHOST_IOMMU_ERROR no PCI device 0000:00:04.0",
        ]
    ) == [
        'VHOST_IOMMU_SOAK_ERROR VFIO_ERROR op=map errno=12 msg="Cannot allocate memory"',
        "VHOST_IOMMU_ERROR no PCI device 0000:00:04.0",
    ]
    log = [
        "vhost-iommu: INFO: listening on /tmp/x/viommu.sock",
        "vhost-iommu: WARNING: connection 1: kick fd of ring 0 reached end of file; no longer watched",
        "vhost-iommu: ERROR: connection 1: device needs reset: descriptor loop",
        "Traceback (most recent call last):",
        '  File "x.py", line 1, in <module>',
    ]
    assert backend_problems(log) == log[1:4]
    rows = [{"name": "connection 1", "broken": None}, {"name": "connection 2", "broken": "bad index"}]
    assert needs_reset(rows) == ["connection 2: bad index"]


def result_of(samples: list[Sample], findings: Findings | None = None) -> SoakResult:
    config = SoakConfig(minutes=1.0, interval=5.0, warmup=10.0)
    result = SoakResult(config=config, samples=samples, findings=findings or Findings())
    result.growth = growth(samples, config.warmup_seconds)
    result.reasons = verdict(result.growth, result.findings, config.limits)
    result.final = samples[-1].guest
    return result


def test_report_shows_the_figures_and_the_verdict(tmp_path: Path) -> None:
    passed = result_of([sample(0, rounds=0), sample(10, rounds=5), sample(60, rss=101_000, rounds=40)])
    text = markdown(passed, "scripts/soak --minutes 1", "abc123")
    assert "**Verdict: PASSED**" in text
    assert "| VmRSS | 97.7 MiB | 98.6 MiB | +1.00% |" in text
    assert "| open fds | 20 | 20 | +0 |" in text
    record = json.loads(json.dumps(to_json(passed, "scripts/soak --minutes 1", "abc123")))
    assert record["passed"] is True and len(record["samples"]) == 3
    assert record["growth"]["rss_growth_percent"] == pytest.approx(1.0)

    failed = result_of([sample(10), sample(60, fds=24)], Findings(run=["QEMU exited during the soak"]))
    text = markdown(failed, "scripts/soak", "abc123")
    assert "**Verdict: FAILED**" in text
    assert "- open fds grew by 4 after the warm-up (20 -> 24)" in text
    assert "- soak: QEMU exited during the soak" in text


def test_command_line_defaults_and_refusals(capsys: pytest.CaptureFixture[str]) -> None:
    args = parse_args([])
    assert args.minutes == 30 and args.interval == 5
    assert parse_args(["--minutes", "2"]).interval == 2  # short runs sample more often
    for wrong in (["--minutes", "0"], ["--interval", "0"], ["--blk-mb", "64"], ["--vq-size", "100"]):
        with pytest.raises(SystemExit):
            parse_args(wrong)
    assert "--minutes" in capsys.readouterr().err

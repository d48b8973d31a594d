"""End to end: the soak's machinery on a real QEMU and guest (half a minute), and its clean-up on Ctrl-C.

These check that the soak runs every workload and every control action, samples the back-end process,
judges and writes its files, and leaves no process behind; not the growth target itself, which only a long
run measures (``scripts/soak``, docs/soak.md). ``-m "not e2e"`` leaves them out.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vhost_iommu.provision.guest import ensure_guest
from vhost_iommu.provision.qemu_build import ensure_qemu

pytestmark = pytest.mark.e2e

RUN_TIMEOUT = 400.0  # boot (slow on a loaded machine) + 30 s of soak + shutdown


@pytest.fixture(scope="module", autouse=True)
def provisioned() -> None:
    # Built before the soak starts, so a first build does not eat the soak's boot timeout.
    ensure_qemu()
    ensure_guest()


def soak(output: Path, *arguments: str) -> list[str]:
    return [sys.executable, "-m", "vhost_iommu.soak", "--output", str(output), *arguments]


def gone(pid: int) -> bool:
    """Dead: no such process, or a zombie left for init to reap (a grandchild whose parent died too)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat[stat.rindex(")") + 2] == "Z"


@pytest.mark.parametrize("keeper", [False, True], ids=["serve", "keeper"])
def test_a_short_soak_runs_every_workload_and_judges(tmp_path: Path, keeper: bool) -> None:
    options = ["--state-dir", str(tmp_path / "state")] if keeper else []
    finished = subprocess.run(
        soak(tmp_path, "--minutes", "0.5", *options), capture_output=True, text=True, timeout=RUN_TIMEOUT
    )
    record = json.loads((tmp_path / "soak.json").read_text())
    # The exit status is the verdict's.
    assert finished.returncode == (0 if record["passed"] else 1), finished.stdout + finished.stderr
    assert bool(record["reasons"]) is not record["passed"]
    # Whatever the growth over half a minute, nothing else went wrong.
    assert {kind: entries for kind, entries in record["findings"].items() if entries} == {}
    samples = record["samples"]
    assert len(samples) >= 10  # one every 2 s over 30 s
    assert samples[-1]["seconds"] >= 30
    assert all(sample["process"]["rss_kib"] > 0 and sample["process"]["fds"] > 0 for sample in samples)
    # With the keeper, the keeper and its device worker are measured together.
    assert all(len(sample["pids"]) == (2 if keeper else 1) for sample in samples)
    guest = record["guest"]
    assert guest["rounds"] > 0 and guest["vfio_ops"] > 0 and guest["errors"] == 0
    assert guest["blk_mb"] > 0 and guest["rebinds"] > 0
    requests = record["device_requests"]
    assert requests["MAP"] > 0 and requests["UNMAP"] > 0 and requests["ATTACH"] > 0
    assert record["mappings_left"] == 0
    assert set(record["control_actions"]) == {
        "inspect", "mappings", "fault", "translate", "inject", "delay", "trace", "bypass", "latency-reset"
    }  # fmt: skip
    assert record["growth"] is not None
    assert record["job_rc"] == 0 and record["backend_exit"] == 0
    assert gone(record["backend_pid"]) and gone(record["qemu_pid"])
    summary = (tmp_path / "soak.md").read_text()
    assert ("**Verdict: PASSED**" if record["passed"] else "**Verdict: FAILED**") in summary


@pytest.mark.parametrize("keeper", [False, True], ids=["serve", "keeper"])
def test_ctrl_c_stops_qemu_and_the_backend_and_still_reports(tmp_path: Path, keeper: bool) -> None:
    options = ["--state-dir", str(tmp_path / "state")] if keeper else []
    process = subprocess.Popen(
        soak(tmp_path, "--minutes", "5", *options), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    assert process.stdout is not None
    seen = b""
    deadline = time.monotonic() + RUN_TIMEOUT
    try:
        # Interrupted once the first sample is taken: the back-end serving (a keeper: its worker too), the
        # guest running.
        while b" 0 s  RSS" not in seen:
            ready, _, _ = select.select([process.stdout], [], [], max(0.0, deadline - time.monotonic()))
            assert ready, f"the soak took no sample: {seen.decode(errors='replace')}"
            chunk = os.read(process.stdout.fileno(), 4096)
            assert chunk, f"the soak ended early: {seen.decode(errors='replace')}"
            seen += chunk
        process.send_signal(signal.SIGINT)
        rest, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        process.stdout.close()
    output = (seen + rest).decode(errors="replace")
    assert process.returncode == 130, output
    record = json.loads((tmp_path / "soak.json").read_text())
    assert record["interrupted"] is True and record["passed"] is False
    backend = record["samples"][0]["pids"]
    assert len(backend) == (2 if keeper else 1)
    assert all(gone(pid) for pid in [*backend, record["qemu_pid"]]), output

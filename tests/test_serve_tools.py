"""serve's options for the driver-testing tools, through the real program: --trace-dir (traces confined to
one private directory), --trace (record every guest from its first request), --conformance warn|strict
(strict: exit status 3 at shutdown when a driver broke a driver-normative statement)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from test_multi_guest import Program, directory, guest_on  # noqa: F401 (directory is a fixture)

from vhost_iommu.control.client import ControlClient
from vhost_iommu.control.options import EXIT_VIOLATIONS
from vhost_iommu.device.layout import Status, encode_attach
from vhost_iommu.trace import replay

pytestmark = pytest.mark.usefixtures("fd_leak_check")
ENDPOINT = 0x20


def test_a_trace_from_the_start_and_strict_conformance(directory: str) -> None:  # noqa: F811
    traces = Path(directory) / "traces"
    program = Program(
        directory,
        [
            f"--socket-path={directory}/viommu.sock",
            f"--trace-dir={traces}",
            "--trace=boot.jsonl",
            "--conformance=strict",
        ],
    )
    try:
        assert stat.S_IMODE(traces.stat().st_mode) == 0o700
        with guest_on(f"{directory}/viommu.sock") as guest:
            # ATTACH before PROBE: a driver-normative statement broken on purpose.
            assert guest.status(encode_attach(1, ENDPOINT)) == Status.OK
            with ControlClient(program.control) as client:
                assert client.call("conformance")["counts"] == {"probe-before-attach": 1}
                assert client.call("trace-stop")["path"] == str(traces / "boot.jsonl")
                # trace-start writes only in --trace-dir, and only new names.
                started = client.call("trace-start", name="later.jsonl")
                assert started["path"] == str(traces / "later.jsonl")
                client.call("trace-stop")
        assert program.terminate() == EXIT_VIOLATIONS
        assert program.process.stderr is not None
        log = program.log + program.process.stderr.read()
    finally:
        program.close()
    assert "connection 1: the driver broke {'probe-before-attach'" in log
    trace = traces / "boot.jsonl"
    assert stat.S_IMODE(trace.stat().st_mode) == 0o600
    result = replay(trace)
    assert result.ok and result.requests == 1


def test_warn_reports_but_exits_cleanly(directory: str) -> None:  # noqa: F811
    program = Program(directory, [f"--socket-path={directory}/viommu.sock", "--conformance=warn"])
    try:
        with guest_on(f"{directory}/viommu.sock") as guest:
            assert guest.status(encode_attach(1, ENDPOINT)) == Status.OK
            with ControlClient(program.control) as client:
                assert client.call("conformance")["total"] == 1
        assert program.terminate() == 0
        assert program.process.stderr is not None
        log = program.log + program.process.stderr.read()
    finally:
        program.close()
    assert "driver breaks probe-before-attach" in log


def run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vhost_iommu", *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_unsafe_trace_options_are_refused(directory: str) -> None:  # noqa: F811
    sock = f"--socket-path={directory}/viommu.sock"
    refused = run([sock, "--trace=boot.jsonl"])
    assert refused.returncode == 1 and "--trace needs --trace-dir" in refused.stderr
    shared = Path(directory) / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    refused = run([sock, f"--trace-dir={shared}"])
    assert refused.returncode == 1 and "group or others" in refused.stderr
    private = Path(directory) / "private"
    private.mkdir(mode=0o700)
    (private / "boot.jsonl").write_text("kept")
    refused = run([sock, f"--trace-dir={private}", "--trace=boot.jsonl"])
    assert refused.returncode == 1 and "exists" in refused.stderr
    refused = run([sock, f"--trace-dir={private}", "--trace=../boot.jsonl"])
    assert refused.returncode == 1 and "plain file name" in refused.stderr
    assert (private / "boot.jsonl").read_text() == "kept"
    assert not os.path.exists(f"{directory}/viommu.sock")  # nothing left behind

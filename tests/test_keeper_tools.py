"""serve --state-dir with the control channel's tools on: the device worker takes the same options."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from vhost_iommu.control.client import ControlClient
from vhost_iommu.control.options import EXIT_VIOLATIONS
from vhost_iommu.device.layout import Status, encode_attach, encode_map, encode_unmap
from vhost_iommu.harness.iommu_driver import IommuDriver
from vhost_iommu.harness.keeper_process import KeeperProcess
from vhost_iommu.trace import replay

TIMEOUT = 60.0


@pytest.fixture
def directory() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="vhost-kt-") as path:  # short: socket paths <= 108 bytes
        yield path


def test_a_worker_with_a_trace_dir_serves_and_traces(directory: str) -> None:
    # The worker once handed --conformance's "strict" flag (the program's, the keeper's) to the control
    # service and died before it was ready.
    program = KeeperProcess(directory, f"--trace-dir={directory}/traces", backend="iommu")
    try:
        with (
            IommuDriver.connect(program.socket, timeout=TIMEOUT),
            ControlClient(program.control) as client,
        ):
            assert [row["started_queues"] for row in client.call("connections")] == [2]
            client.call("trace-start", name="t.jsonl")
            assert client.call("trace-stop")["path"].endswith("t.jsonl")
        assert (Path(directory) / "traces" / "t.jsonl").is_file()
        assert program.terminate() == 0
    finally:
        program.close()


def test_strict_conformance_is_the_programs_exit_status_across_worker_kills(directory: str) -> None:
    program = KeeperProcess(directory, "--conformance=strict", backend="iommu")
    try:
        with IommuDriver.connect(program.socket, timeout=TIMEOUT) as driver:
            # ATTACH before PROBE: a driver-normative statement broken on purpose, seen by this worker...
            assert driver.attach() == Status.OK
            program.wait_for("driver breaks probe-before-attach")
            # ... which dies: the keeper, whose status is the program's, remembers it.
            program.kill_worker(wait_takeover=True)
        assert program.terminate() == EXIT_VIOLATIONS
    finally:
        program.close()
    assert "the driver broke connection 1: probe-before-attach: " in program.log


def test_a_clean_driver_under_strict_conformance_exits_cleanly(directory: str) -> None:
    program = KeeperProcess(directory, "--conformance=strict", backend="iommu")
    try:
        with IommuDriver.connect(program.socket, timeout=TIMEOUT):
            pass
        assert program.terminate() == 0
    finally:
        program.close()


def test_traces_go_on_across_worker_kills_and_replay_whole(directory: str) -> None:
    traces = Path(directory) / "traces"
    program = KeeperProcess(directory, f"--trace-dir={traces}", "--trace=boot.jsonl", backend="iommu")
    try:
        with IommuDriver.connect(program.socket, timeout=TIMEOUT) as driver:
            assert driver.status(encode_attach(1, 0x20)) == Status.OK
            assert driver.status(encode_map(1, 0, 0xFFF, 0x10000)) == Status.OK
            program.kill_worker(wait_takeover=True)
            assert driver.status(encode_map(1, 0, 0xFFF, 0x10000)) == Status.INVAL  # the mapping was kept
            assert driver.status(encode_unmap(1, 0, 0xFFF)) == Status.OK
            program.kill_worker(wait_takeover=True)
            with ControlClient(program.control, timeout=TIMEOUT) as client:
                stopped = client.call("trace-stop", connection=1)
            assert stopped["records"] == 1 + 4 + 2  # features, ATTACH, MAP, MAP, UNMAP, two takeovers
            program.kill_worker(wait_takeover=True)  # a stopped trace is not continued
            with ControlClient(program.control, timeout=TIMEOUT) as client:
                client.call("trace-start", name="later.jsonl", connection=1)
            assert driver.status(encode_map(1, 0, 0xFFF, 0x10000)) == Status.OK
            program.kill_worker(wait_takeover=True)  # one started by a client goes on too
            assert driver.status(encode_unmap(1, 0, 0xFFF)) == Status.OK
            with ControlClient(program.control, timeout=TIMEOUT) as client:
                assert client.call("trace-stop", connection=1)["records"] == 3
        assert program.terminate() == 0
    finally:
        program.close()
    kinds = [json.loads(line)["kind"] for line in (traces / "boot.jsonl").read_text().splitlines()[1:]]
    assert kinds == ["features", "request", "request", "takeover", "request", "request", "takeover"]
    result = replay(traces / "boot.jsonl")  # the whole session, across workers, against a fresh device
    assert result.ok and result.requests == 4
    later = [json.loads(line)["kind"] for line in (traces / "later.jsonl").read_text().splitlines()[1:]]
    assert later == ["request", "takeover", "request"]

"""serve --state-dir with the control channel's tools on: the device worker takes the same options."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from vhost_iommu.control.client import ControlClient
from vhost_iommu.harness.iommu_driver import IommuDriver
from vhost_iommu.harness.keeper_process import KeeperProcess

TIMEOUT = 60.0


@pytest.fixture
def directory() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="vhost-kt-") as path:  # short: socket paths <= 108 bytes
        yield path


def test_a_worker_with_a_trace_dir_serves_and_traces(directory: str) -> None:
    # The worker once handed --conformance's "strict" flag (the program's, refused with --state-dir) to
    # the control service and died before it was ready.
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

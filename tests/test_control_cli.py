"""``vhost-iommu --control-socket`` and ``vhost-iommu ctl``: real processes and sockets."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from test_cli import start, stop, wait_for_log_line

from vhost_iommu.device.layout import Status, decode_fault, encode_map
from vhost_iommu.harness.iommu_driver import IommuDriver

pytestmark = pytest.mark.usefixtures("fd_leak_check")
TIMEOUT = 30.0  # a fresh interpreter on a loaded 2-core machine


@dataclass
class Program:
    socket: str
    control: str


@pytest.fixture
def program() -> Iterator[Program]:
    with tempfile.TemporaryDirectory(prefix="vctl-cli-") as directory:
        paths = Program(os.path.join(directory, "sock"), os.path.join(directory, "control"))
        process = start([f"--socket-path={paths.socket}", f"--control-socket={paths.control}"])
        try:
            wait_for_log_line(process, "listening on")
            yield paths
        finally:
            assert stop(process) == 0
        assert not os.path.exists(paths.socket) and not os.path.exists(paths.control)


def ctl(program: Program, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vhost_iommu", "ctl", f"--control-socket={program.control}", *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


def ctl_json(program: Program, *args: str) -> object:
    done = ctl(program, "--json", *args)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_ctl_against_a_served_guest(program: Program) -> None:
    assert stat.S_IMODE(os.stat(program.control).st_mode) == 0o600
    with IommuDriver.connect(program.socket, timeout=TIMEOUT) as driver:
        assert driver.attach(3, 0x20) == Status.OK
        assert driver.status(encode_map(3, 0x100000000, 0x10000FFFF, 0x200000)) == Status.OK

        table = ctl(program, "domains")
        assert table.returncode == 0, table.stderr
        assert "paging" in table.stdout and "0x20" in table.stdout
        mappings = ctl(program, "mappings", "--endpoint", "0x20")
        assert (
            "0x100000000" in mappings.stdout and "0x10000ffff" in mappings.stdout and "RW" in mappings.stdout
        )
        counters = ctl(program, "counters")
        assert "ATTACH 1" in counters.stdout and "MAP 1" in counters.stdout
        assert ctl_json(program, "connections")[0]["connection"] == 1  # type: ignore[index]
        # Added latency per request type and a seeded rate: set through ctl, shown by its counters.
        assert ctl_json(program, "delay", "250000", "--type", "map") == {"us": 250000, "type": "MAP"}
        assert ctl(program, "inject-rate", "MAP", "NOMEM", "2.5%", "--seed", "9").returncode == 0
        shown = ctl(program, "counters").stdout
        assert "added latency: 250000 us per MAP request" in shown
        assert "rate injection: NOMEM on 2.50% of MAP (seed 9; 0 of 0 so far)" in shown
        assert ctl(program, "inject-clear").returncode == 0
        shown = ctl(program, "counters").stdout
        assert "added latency" not in shown and "rate injection" not in shown

        [head] = driver.post_event_buffers(1)
        reply = ctl_json(program, "fault", "--endpoint", "0x20", "--address", "0x1000", "--access", "rw")
        assert reply == {"queued": 1, "dropped": 0, "pending": 0, "flags": 0x103}
        assert driver.frontend.wait_used(1, timeout=TIMEOUT)
        assert driver.events.used() == [(head, 24)]
        assert decode_fault(driver.events.written(head)).address == 0x1000


def test_ctl_errors_are_one_line_and_status_1(program: Program) -> None:
    no_guest = ctl(program, "endpoints")
    assert no_guest.returncode == 1
    assert no_guest.stderr.strip().splitlines() == [
        "vhost-iommu: error: endpoints: no front-end is connected (no-connection)"
    ]
    assert ctl_json(program, "hello")["version"] == 1  # type: ignore[index]
    bad = ctl(program, "inject", "MAP", "PERHAPS")
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


def test_ctl_without_a_back_end_is_a_clear_error() -> None:
    with tempfile.TemporaryDirectory(prefix="vctl-cli-") as directory:
        done = subprocess.run(
            [sys.executable, "-m", "vhost_iommu", "ctl", f"--control-socket={directory}/none", "hello"],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
    assert done.returncode == 1
    assert "No such file or directory (unreachable)" in done.stderr


def test_an_unusable_control_path_is_a_one_line_error() -> None:
    with tempfile.TemporaryDirectory(prefix="vctl-cli-") as directory:
        taken = os.path.join(directory, "file")
        open(taken, "w").close()
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "vhost_iommu",
                f"--socket-path={directory}/sock",
                f"--control-socket={taken}",
            ],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
        assert done.returncode == 1
        assert done.stderr.splitlines() == [
            f"vhost-iommu: error: --control-socket: {taken} exists and is not a socket; "
            "refusing to replace it"
        ]
        assert os.listdir(directory) == ["file"]  # the vhost-user socket went with the failed start


def test_ctl_endpoints_served_lists_the_vfio_user_endpoints_without_a_guest(program: Program) -> None:
    # The default topology serves a DMA engine over vfio-user; no QEMU has connected to it.
    shown = ctl(program, "endpoints", "--served")
    assert shown.returncode == 0, shown.stderr
    assert "dma-engine 00:05.0 endpoint 0x28 on " in shown.stdout
    assert "not paired: no vfio-user client is connected" in shown.stdout
    [row] = ctl_json(program, "endpoints", "--served")  # type: ignore[misc]
    assert (row["kind"], row["endpoint"], row["connected"]) == ("dma-engine", 0x28, False)
    assert row["counters"] is None and row["last_faults"] == []
    assert os.path.dirname(row["socket"]) == os.path.dirname(program.socket)

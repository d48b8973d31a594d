"""End to end: the driver-testing toolkit (vhost_iommu.testing) against a real QEMU and Linux guest.

The first test is the example of docs/toolkit.md: a driver test in a few lines, checked for conformance
to the spec's driver-normative statements when it ends. The second records a trace of a guest's driver
and replays it offline against a fresh device core.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from vhost_iommu.lab import Lab, LabConfig
from vhost_iommu.trace import replay

if TYPE_CHECKING:  # imported by pytest_plugins below; importing it here first would defeat assert rewriting
    from vhost_iommu.testing import DriverLab

pytest_plugins = ["vhost_iommu.testing"]
pytestmark = pytest.mark.e2e

TESTDEV = "0000:00:04.0"  # the pci-testdev the Lab adds, endpoint 0x20 in the default topology


def test_binding_a_device_to_vfio_attaches_its_endpoint(driver: DriverLab) -> None:
    # No driver owns the pci-testdev at boot: its endpoint is in bypass through config.bypass.
    assert driver.control.call("domains") == []

    driver.guest.check(f"echo vfio-pci > /sys/bus/pci/devices/{TESTDEV}/driver_override")
    driver.guest.check(f"echo {TESTDEV} > /sys/bus/pci/drivers_probe")
    assert driver.guest.check(f"basename $(readlink /sys/bus/pci/devices/{TESTDEV}/driver)") == "vfio-pci"

    # VFIO owns the device now: the driver attached its endpoint to a translated domain.
    [domain] = driver.control.call("domains")
    assert domain["endpoints"] == [0x20] and not domain["bypass"]
    assert driver.guest.run("cat /no/such/file").rc != 0  # a failing command is an answer, not a hang
    # When the test returns, the plugin fails it if the driver broke a driver-normative statement.


def test_a_recorded_guest_trace_replays_with_the_same_statuses(tmp_path: Path) -> None:
    trace = tmp_path / "guest.jsonl"
    config = LabConfig(job="vfio-steps", params={"hold": "1"}, trace=trace, conformance=True)
    with Lab(config) as lab:
        lab.guest.expect(r"VFIO_STEP_READY seq=0", 240)
        lab.guest.send("map 0x100000000 0x10000 rw")
        lab.guest.expect(r"VFIO_STEP_READY seq=1", 60)
        lab.guest.send("quit")
        lab.guest.expect(r"VHOST_IOMMU_HOLD", 60)
    result = replay(trace)
    assert result.requests >= 4, "PROBE, ATTACH, MAP and UNMAP at least"
    assert {"PROBE", "ATTACH", "MAP", "UNMAP"} <= set(result.replay_ns)
    assert result.ok, [difference.describe() for difference in result.differences]
    command = [sys.executable, "-m", "vhost_iommu", "replay", str(trace)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "every status as recorded" in done.stdout

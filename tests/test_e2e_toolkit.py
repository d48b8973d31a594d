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

from vhost_iommu.lab import TESTDEV_ENDPOINT, Lab, LabConfig
from vhost_iommu.provision.guest import ensure_guest
from vhost_iommu.trace import replay

if TYPE_CHECKING:  # imported by pytest_plugins below; importing it here first would defeat assert rewriting
    from vhost_iommu.testing import DriverLab

pytest_plugins = ["vhost_iommu.testing"]
pytestmark = [pytest.mark.e2e, pytest.mark.every_kernel]


def guest_kernel_major(driver: DriverLab) -> int:
    return int(driver.guest.check("uname -r").split(".", 1)[0])


def test_binding_a_device_to_vfio_attaches_its_endpoint(driver: DriverLab) -> None:
    at_boot = driver.control.call("domains")
    if guest_kernel_major(driver) < 7:
        # Linux 6.12 attaches no domain for a device no driver owns: its endpoint is in bypass through
        # config.bypass.
        assert at_boot == []
    else:
        # Linux 7.x attaches every endpoint to its group's default (DMA) domain when it probes the device,
        # driver or not: translated, nothing mapped yet.
        [boot_domain] = at_boot
        assert boot_domain["endpoints"] == [TESTDEV_ENDPOINT] and not boot_domain["bypass"]
        assert boot_domain["mappings"] == 0

    driver.bind_vfio()

    # VFIO owns the device now: the driver attached its endpoint to a translated domain, and a domain the
    # endpoint left went with it (a domain lives while an endpoint is attached to it).
    [domain] = driver.control.call("domains")
    assert domain["endpoints"] == [TESTDEV_ENDPOINT] and not domain["bypass"]
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
        # Whichever way the guest's VFIO let go of its domain, no mapping of it is left in the device.
        assert lab.inspect(lambda device: [info.mapping_count for info in device.domains()]) in ([], [0])
    result = replay(trace)
    if ensure_guest().kernel_version.startswith("6."):
        # Linux 6.12's VFIO unmaps its IOVAs before it detaches the group: UNMAP, then DETACH or ATTACH.
        expected = {"PROBE", "ATTACH", "MAP", "UNMAP"}
    else:
        # Linux 7.x detaches first (the endpoint goes to a blocking domain, an empty one, then back to its
        # default domain), and the driver sends no UNMAP to a domain no endpoint is attached to: the
        # device dropped its mappings with it (a domain lives while an endpoint is attached to it).
        expected = {"PROBE", "ATTACH", "MAP"}
    assert expected <= set(result.replay_ns), result.replay_ns
    assert result.ok, [difference.describe() for difference in result.differences]
    command = [sys.executable, "-m", "vhost_iommu", "replay", str(trace)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "every status as recorded" in done.stdout

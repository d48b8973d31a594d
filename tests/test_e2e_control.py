"""End to end: the control channel against a real QEMU and a real Linux guest.

The guest holds at the VFIO steps prompt while the test looks at the back-end and breaks it through the Lab's
control socket; what the guest can show (its driver's fault reports, the time a VFIO map takes) is checked
in the guest's own output.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from vhost_iommu.control import ControlClient
from vhost_iommu.lab import Lab, LabConfig
from vhost_iommu.provision.boot import GuestRun, parse_fields
from vhost_iommu.provision.guest import GuestImage
from vhost_iommu.provision.klog import kernel_trouble

pytestmark = pytest.mark.e2e

BOOT_TIMEOUT = 240.0
STEP_TIMEOUT = 60.0
TESTDEV = 0x20  # pci-testdev at 00:04.0, endpoint ID = BDF in the default topology
ADDED_LATENCY_US = 200_000
# drivers/iommu/virtio-iommu.c, viommu_fault_handler: "%s fault from EP %u at %#llx [%s%s%s]" (dev_err).
FAULT_REPORT = "{reason} fault from EP {endpoint} at {address:#x} [{access}]"


@pytest.fixture
def lab(qemu: Path, guest_image: GuestImage) -> Iterator[Lab]:
    config = LabConfig(job="vfio-steps", params={"hold": "1"})
    with Lab(config, qemu=qemu, guest=guest_image) as running:
        running.guest.expect(r"VFIO_STEP_READY seq=0", BOOT_TIMEOUT)
        yield running


def step(lab: Lab, sequence: int, command: str) -> dict[str, str]:
    lab.guest.send(command)
    fields = parse_fields(lab.guest.expect(rf"VFIO_STEP seq={sequence} .*", STEP_TIMEOUT)[0])
    lab.guest.expect(rf"VFIO_STEP_READY seq={sequence}", STEP_TIMEOUT)
    return fields


def finish(lab: Lab) -> GuestRun:
    lab.guest.send("quit")
    lab.guest.expect(r"VHOST_IOMMU_HOLD", STEP_TIMEOUT)
    lab.guest.send("")
    return lab.guest.wait(STEP_TIMEOUT)


def test_control_inspects_and_breaks_a_running_guest(lab: Lab) -> None:
    assert lab.control_path is not None
    with ControlClient(str(lab.control_path)) as control:
        [connection] = control.call("connections")
        assert connection["started_queues"] == 2 and connection["broken"] is None
        endpoints = {row["endpoint"]: row for row in control.call("endpoints")}
        domain = endpoints[TESTDEV]["domain"]
        assert domain is not None, "VFIO owns 00:04.0: its endpoint is attached"
        assert {"MAP_UNMAP", "PROBE", "VERSION_1"} <= set(control.call("features")["acked_names"])
        requestq, eventq = control.call("queues")
        assert requestq["started"] and requestq["enabled"] and requestq["used_idx"] == requestq["next_avail"]
        assert requestq["served_by"] == "thread"  # the kick thread serves with the control channel on
        # The driver fills the eventq with buffers at probe time.
        assert eventq["next_avail"] == 0 and eventq["started"]

        # Added latency: the guest's own clock sees the held batch.
        control.call("delay", us=ADDED_LATENCY_US)
        assert control.call("queues")[0]["served_by"] == "event-loop"  # a delay needs every kick in Python
        slow = step(lab, 1, "map 0x100000000 0x1000 rw")
        control.call("delay", us=0)
        assert control.call("queues")[0]["served_by"] == "thread"
        maps = control.call("counters")["latency"]["MAP"]["count"]
        fast = step(lab, 2, "map 0x100010000 0x1000 rw")
        assert slow["rc"] == "0" and fast["rc"] == "0"
        assert int(slow["ns"]) >= ADDED_LATENCY_US * 1000, slow
        counters = control.call("counters")
        # The MAP served by the thread is timed too (by its kick loop).
        assert counters["delayed_batches"] >= 1 and counters["latency"]["MAP"]["count"] > maps

        page = control.call("mappings", endpoint=TESTDEV, iova_start=0x100000000, iova_end=0x1FFFFFFFF)
        assert [m["iova_start"] for m in page["mappings"]] == [0x100000000, 0x100010000]
        hit = control.call("translate", endpoint=TESTDEV, iova=0x100000010, size=16, access="rw")
        assert hit["translated"] and hit["segments"][0][0] == page["mappings"][0]["phys"] + 0x10

        # Faults: one injected, one from a translation that misses; both reach the driver.
        assert control.call("fault", endpoint=TESTDEV, address=0xDEAD000, access="w")["queued"] == 1
        miss = control.call("translate", endpoint=TESTDEV, iova=0xBEEF000, access="r", report=True)
        assert miss["reason"] == "MAPPING" and miss["reported"]
        events = control.call("events")
        assert events["pending"] == [] and events["dropped"] == 0 and events["queued_total"] == 2

    # The command-line client against the same back-end.
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "vhost_iommu",
            "ctl",
            f"--control-socket={lab.control_path}",
            "--json",
            "domains",
        ],
        capture_output=True,
        text=True,
        timeout=STEP_TIMEOUT,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)[0]["endpoints"] == [TESTDEV]

    run = finish(lab)
    assert run.job_rc == 0
    kernel_log = [line for line in run.lines if "VHOST_IOMMU_KLOG " in line]
    for reason, address, access in (("page", 0xDEAD000, "W"), ("page", 0xBEEF000, "R")):
        report = FAULT_REPORT.format(reason=reason, endpoint=TESTDEV, address=address, access=access)
        assert any(report in line for line in kernel_log), f"no {report!r} in:\n" + "\n".join(kernel_log)
    trouble = kernel_trouble(kernel_log)
    assert not trouble, "the guest kernel complained:\n" + "\n".join(trouble)

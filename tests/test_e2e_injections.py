"""End to end: the control channel's injections as a real Linux guest sees them (QEMU 10.2, Linux 6.12, TCG).

Each test breaks the device through the control channel while the guest runs, and checks the effect in
the guest's own output:

- forced statuses: a forced ATTACH status fails the guest's VFIO open with the errno the driver maps it
  to; a forced MAP status is not seen by the driver (it never reads MAP statuses, drivers/iommu/
  virtio-iommu.c: MAPs are queued without write-back and ``__viommu_sync_req`` returns 0), so VFIO's map
  succeeds; the guest sees it when the endpoint uses the address: the fault the device reports for it
  shows in the guest's kernel log. At a rate: exactly the MAPs the seeded draw picks;
- added latency per request type: the guest's VFIO map takes that long, its unmap does not;
- config.bypass changed at run time: the guest takes the config interrupt and reads the new value from
  the device's config space;
- reserved regions changed: the endpoint's next PROBE (after a PCI remove and rescan) gives the guest the
  new region, and VFIO refuses to map into it.

The guest is the ``shell`` job (vhost_iommu.testing); 00:04.0 is QEMU's pci-testdev, endpoint 0x20.
"""

from __future__ import annotations

import random
import re
from typing import TYPE_CHECKING

import pytest

from vhost_iommu.abi import CONFIG_BYPASS
from vhost_iommu.lab import TESTDEV
from vhost_iommu.lab import TESTDEV_ENDPOINT as ENDPOINT

if TYPE_CHECKING:  # imported by pytest_plugins below; importing it here first would defeat assert rewriting
    from vhost_iommu.testing import DriverLab

pytest_plugins = ["vhost_iommu.testing"]
pytestmark = [pytest.mark.e2e, pytest.mark.every_kernel]

IOMMU = "0000:00:03.0"  # the vhost-user virtio-iommu
IOVA = 0x100000000
PAGE = 0x1000
# errno values of the guest (x86-64 Linux)
ENOMEM, EINVAL, ERANGE = 12, 22, 34
# drivers/iommu/virtio-iommu.c, viommu_fault_handler: "%s fault from EP %u at %#llx [%s%s%s]".
FAULT_REPORT = "page fault from EP {endpoint} at {address:#x} [R]"
TYPE_DELAY_US = 500_000


def vfio_steps(driver: DriverLab, *commands: str) -> list[str]:
    """Run vfio-dma's steps (one VFIO container for all of them); its VFIO_ lines."""
    script = "\\n".join([*commands, "quit"])
    result = driver.guest.run(f"printf '{script}\\n' | vfio-dma {TESTDEV} steps")
    return [line for line in result.lines if line.startswith("VFIO_")]


def fields(line: str) -> dict[str, str]:
    return dict(re.findall(r"(\w+)=(\S+)", line))


class HeldSteps:
    """vfio-dma steps running in the guest's background, fed through a FIFO: its container, and so its
    mappings, live while the test looks at the back-end."""

    def __init__(self, driver: DriverLab) -> None:
        self.driver = driver
        self.sequence = 0
        driver.guest.check("rm -f /tmp/steps /tmp/steps.out; mkfifo /tmp/steps")
        # The shell keeps the FIFO's write end (fd 3) open between commands, so vfio-dma reads on.
        driver.guest.check(
            f"vfio-dma {TESTDEV} steps < /tmp/steps > /tmp/steps.out 2>&1 & exec 3> /tmp/steps"
        )
        self._wait("VFIO_STEP_READY seq=0")

    def _wait(self, text: str) -> None:
        # Polls a file in the guest until vfio-dma wrote the line (the shell command's timeout bounds it).
        self.driver.guest.wait_until(f"grep -q '{text}' /tmp/steps.out")

    def step(self, command: str) -> dict[str, str]:
        self.sequence += 1
        self.driver.guest.check(f"echo '{command}' >&3")
        self._wait(f"VFIO_STEP_READY seq={self.sequence}")
        output = self.driver.guest.check("cat /tmp/steps.out")
        [line] = [line for line in output.splitlines() if line.startswith(f"VFIO_STEP seq={self.sequence} ")]
        return fields(line)

    def close(self) -> None:
        self.driver.guest.check("echo quit >&3; exec 3>&-")
        self._wait("VFIO_STEPS_DONE")


def test_a_forced_attach_status_fails_the_guests_vfio_open_with_its_errno(driver: DriverLab) -> None:
    driver.bind_vfio()
    # The driver sends ATTACH synchronously and maps its status to an errno (viommu_get_req_errno).
    for status, errno in (("NOMEM", ENOMEM), ("RANGE", ERANGE), ("INVAL", EINVAL)):
        driver.control.call("inject", type="ATTACH", status=status)
        [error] = vfio_steps(driver, f"map {IOVA:#x} {PAGE:#x} rw")
        assert error.startswith("VFIO_ERROR ") and fields(error)["errno"] == str(errno), error
        assert driver.control.call("counters")["injected"] >= 1
    # Nothing pending any more: VFIO opens and maps again.
    driver.control.call("inject-clear")
    lines = vfio_steps(driver, f"map {IOVA:#x} {PAGE:#x} rw")
    [mapped] = [line for line in lines if line.startswith("VFIO_STEP seq=1 ")]
    assert fields(mapped)["rc"] == "0", lines


@pytest.mark.every_arch
def test_a_forced_map_status_shows_in_the_guest_when_the_endpoint_uses_the_address(
    driver: DriverLab,
) -> None:
    driver.bind_vfio()
    steps = HeldSteps(driver)
    driver.control.call("inject", type="MAP", status="NOMEM")
    refused = steps.step(f"map {IOVA:#x} {PAGE:#x} rw")
    kept = steps.step(f"map {IOVA + 0x10000:#x} {PAGE:#x} rw")
    # The driver does not read MAP statuses: both VFIO maps succeed in the guest ...
    assert refused["rc"] == "0" and kept["rc"] == "0"
    assert driver.control.call("counters")["statuses"]["NOMEM"] == 1
    # ... but the device has only the second; a DMA to the first faults, and the guest's driver says so.
    [domain] = driver.control.call("domains")
    mapped = driver.control.call("mappings", domain=domain["domain"])["mappings"]
    assert [m["iova_start"] for m in mapped] == [IOVA + 0x10000]
    miss = driver.control.call("translate", endpoint=ENDPOINT, iova=IOVA, access="r", report=True)
    assert miss["reason"] == "MAPPING" and miss["reported"]
    assert driver.control.call("translate", endpoint=ENDPOINT, iova=IOVA + 0x10000)["translated"]
    report = FAULT_REPORT.format(endpoint=ENDPOINT, address=IOVA)
    driver.guest.wait_until(f"dmesg | grep -qF '{report}'")
    steps.close()


def test_forced_map_statuses_at_a_seeded_rate_hit_the_drawn_requests(driver: DriverLab) -> None:
    driver.bind_vfio()
    steps = HeldSteps(driver)
    seed, rate, count = 7, 0.5, 8
    draws = random.Random(seed)
    expected = [draws.random() < rate for _ in range(count)]
    assert 0 < sum(expected) < count  # this seed refuses some and not all
    driver.control.call("inject-rate", type="MAP", status="NOMEM", rate=rate, seed=seed)
    pages = [IOVA + index * 0x10000 for index in range(count)]
    for page in pages:
        assert steps.step(f"map {page:#x} {PAGE:#x} r")["rc"] == "0"
    [injection] = driver.control.call("counters")["rates"]
    assert injection["seen"] == count and injection["forced"] == sum(expected)
    driver.control.call("inject-rate", type="MAP", status="NOMEM", rate=0)
    # Each refused page faults when used, reported to the guest; each other one translates.
    for page, forced in zip(pages, expected, strict=True):
        answer = driver.control.call("translate", endpoint=ENDPOINT, iova=page, access="r", report=forced)
        assert answer["translated"] is not forced, (hex(page), answer)
    faults = sum(expected)
    driver.guest.wait_until(f"[ $(dmesg | grep -c 'page fault from EP {ENDPOINT}') -ge {faults} ]")
    log = driver.guest.check(f"dmesg | grep 'page fault from EP {ENDPOINT}'")
    for page, forced in zip(pages, expected, strict=True):
        shown = FAULT_REPORT.format(endpoint=ENDPOINT, address=page) in log
        assert shown is forced, (hex(page), log)
    steps.close()


def test_added_latency_per_request_type_holds_only_that_type_in_the_guest(driver: DriverLab) -> None:
    driver.bind_vfio()
    steps = HeldSteps(driver)
    driver.control.call("delay", us=TYPE_DELAY_US, type="MAP")
    mapped = steps.step(f"map {IOVA:#x} {PAGE:#x} rw")
    unmapped = steps.step(f"unmap {IOVA:#x} {PAGE:#x}")
    driver.control.call("delay", us=0, type="MAP")
    # The guest's own clock: its MAP_DMA waited for the MAP request, its UNMAP_DMA did not.
    assert mapped["rc"] == "0" and int(mapped["ns"]) >= TYPE_DELAY_US * 1000, mapped
    assert unmapped["rc"] == "0" and int(unmapped["ns"]) < TYPE_DELAY_US * 1000, unmapped
    assert driver.control.call("counters")["delayed_requests"] == 1
    steps.close()


def interrupts_command(name: str) -> str:
    """Guest shell: the count of the /proc/interrupts line of ``name`` (-smp 1: one CPU column)."""
    return f"awk '/ {name}$/ {{print $2}}' /proc/interrupts"


def interrupts_of(driver: DriverLab, name: str) -> int:
    return int(driver.guest.check(interrupts_command(name)))


def wait_for_interrupt(driver: DriverLab, name: str, seen: int) -> None:
    # The interrupt arrives asynchronously (back-end -> QEMU -> the guest's IRQ line); the shell
    # command's timeout bounds the wait.
    driver.guest.wait_until(f'[ "$({interrupts_command(name)})" != {seen} ]')


def read_bypass(driver: DriverLab) -> int:
    line = driver.guest.check(f"vfio-dma {IOMMU} virtio-config {CONFIG_BYPASS} 1")
    return int(fields(line)["bytes"], 16)


def test_bypass_changed_at_run_time_reaches_the_guest(driver: DriverLab) -> None:
    # The virtio device of the IOMMU (device ID 23) and its interrupt line.
    name = driver.guest.check("grep -l 0x0017 /sys/bus/virtio/devices/*/device | cut -d/ -f6")
    before = interrupts_of(driver, name)
    assert read_bypass(driver) == 1  # the default topology boots in bypass
    assert driver.control.call("bypass", value=0) == {"bypass": 0}
    wait_for_interrupt(driver, name, before)
    assert interrupts_of(driver, name) > before
    assert read_bypass(driver) == 0
    # The virtio core logs the change (the virtio-iommu driver has no handler of its own for it).
    assert f"virtio_iommu {name}: config changed" in driver.guest.check("dmesg | grep 'config changed'")
    middle = interrupts_of(driver, name)
    assert driver.control.call("bypass", boot=True) == {"bypass": 1}
    wait_for_interrupt(driver, name, middle)
    assert read_bypass(driver) == 1


def test_reserved_regions_changed_reach_the_next_probe_and_vfio_refuses_them(driver: DriverLab) -> None:
    group = f"$(readlink -f /sys/bus/pci/devices/{TESTDEV}/iommu_group)"
    driver.bind_vfio()
    assert driver.guest.check(f"cat {group}/reserved_regions") == "0x00000000fee00000 0x00000000feefffff msi"
    regions = [
        {"type": "RESERVED", "start": 0x200000, "end": 0x2FFFFF},
        {"type": "MSI", "start": 0xFEE00000, "end": 0xFEEFFFFF},
    ]
    driver.control.call("resv", endpoint=ENDPOINT, regions=regions)
    # The guest probed the endpoint at bind time: it still has the old regions ...
    assert "0x0000000000200000" not in driver.guest.check(f"cat {group}/reserved_regions")
    # ... until the endpoint is probed again: removed, rescanned, bound.
    driver.guest.check(f"echo 1 > /sys/bus/pci/devices/{TESTDEV}/remove; echo 1 > /sys/bus/pci/rescan")
    driver.bind_vfio()
    assert driver.guest.check(f"cat {group}/reserved_regions").splitlines() == [
        "0x0000000000200000 0x00000000002fffff reserved",
        "0x00000000fee00000 0x00000000feefffff msi",
    ]
    # VFIO keeps out of it: a map into the new region fails, one beside it works.
    lines = vfio_steps(driver, f"map 0x200000 {PAGE:#x} rw", f"map 0x300000 {PAGE:#x} rw")
    first, second = (fields(line) for line in lines if line.startswith("VFIO_STEP seq="))
    assert first["rc"] == "-1" and first["errno"] == str(EINVAL), lines
    assert second["rc"] == "0", lines
    # The device itself refuses it too (RANGE for a MAP; a DMA there faults).
    assert driver.control.call("translate", endpoint=ENDPOINT, iova=0x200000)["reason"] == "MAPPING"
    driver.control.call("resv-clear")
    driver.guest.check(f"echo 1 > /sys/bus/pci/devices/{TESTDEV}/remove; echo 1 > /sys/bus/pci/rescan")
    driver.bind_vfio()
    assert driver.guest.check(f"cat {group}/reserved_regions") == "0x00000000fee00000 0x00000000feefffff msi"

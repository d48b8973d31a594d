"""End to end: what the Linux driver does differently since 6.12, served on every guest kernel CI covers.

tests/test_driver_sequences.py replays each sequence, read from the driver's source, on every serving path;
here the real guest sends it. The tests switch a device no driver
owns to an identity domain through its group's type, which 6.12 cannot do (it gives such a device no
group), so they run on the newer kernels and are skipped on 6.12, saying so:
- identity domains: 6.16 gives every bypassed endpoint one shared identity domain at domain_range.start
  (ATTACH_F_BYPASS; paging domains from start+1);
- a device removed while its endpoint is in that identity domain: 6.16+ sends DETACH of domain 0 (its
  identity domain has no ID), which the spec makes a RANGE error when the range starts at 1;
- VFIO's claim and release of a group: 7.x moves the endpoint to a blocking domain (an empty paging
  domain) first and back to its default domain after, with no UNMAP (tests/test_e2e_toolkit.py checks
  the release leaves no mapping);
- spurious kicks (front-ends may write a kick eventfd with nothing new on the ring): written on both queues
  while the guest runs, they change nothing, on both kernels;
- the PCI-reset path cannot be driven here: the guest cannot reset QEMU's pci-testdev (no reset method).
The guest is the ``shell`` job (vhost_iommu.testing); 00:04.0 is QEMU's pci-testdev, endpoint 0x20.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

from vhost_iommu.device.topology import Topology
from vhost_iommu.lab import TESTDEV
from vhost_iommu.lab import TESTDEV_ENDPOINT as ENDPOINT

if TYPE_CHECKING:  # imported by pytest_plugins below; importing it here first would defeat assert rewriting
    from vhost_iommu.testing import DriverLab

pytest_plugins = ["vhost_iommu.testing"]
pytestmark = [pytest.mark.e2e, pytest.mark.every_kernel]

#: The Lab serves the default topology, whose domain_range starts here.
DOMAIN_START = Topology.default().domain_start


def kernel_major(driver: DriverLab) -> int:
    return int(driver.guest.check("uname -r").split(".", 1)[0])


def domains_of_endpoint(driver: DriverLab) -> list[dict[str, Any]]:
    return [domain for domain in driver.control.call("domains") if ENDPOINT in domain["endpoints"]]


def switch_to_identity(driver: DriverLab) -> None:
    """Make the testdev's group use an identity domain (the device is bound to no driver at boot)."""
    if kernel_major(driver) < 7:
        # 6.12 probes the IOMMU side of a device that was enumerated before the virtio-iommu module loaded
        # only when a driver binds it: until then the testdev has no group, so no type to set.
        # test_e2e_guest.py::test_identity_domain_lets_a_dma_endpoint_work covers 6.12's identity domains.
        assert driver.guest.run(f"test -e /sys/bus/pci/devices/{TESTDEV}/iommu_group").rc != 0
        pytest.skip("Linux 6.12 gives a device no driver owns no IOMMU group to switch")
    group = driver.guest.check(f"readlink -f /sys/bus/pci/devices/{TESTDEV}/iommu_group")
    driver.guest.check(f"echo identity > {group}/type")
    assert driver.guest.check(f"cat {group}/type") == "identity"


def test_an_identity_group_is_attached_to_the_shared_identity_domain(driver: DriverLab) -> None:
    switch_to_identity(driver)
    # 6.16+: the one identity domain of the driver, at domain_range.start, shared by every bypassed
    # endpoint (ATTACH_F_BYPASS); paging domains start after it.
    [identity] = domains_of_endpoint(driver)
    assert identity["domain"] == DOMAIN_START and identity["bypass"] and identity["mappings"] == 0
    assert all(domain["domain"] > DOMAIN_START for domain in driver.control.call("domains")
               if not domain["bypass"])  # fmt: skip


@pytest.mark.allow_violations("domain-range")  # 6.16+'s DETACH of domain 0, below
def test_removing_a_bypassed_device_and_rescanning_it_leaves_nothing_over(driver: DriverLab) -> None:
    switch_to_identity(driver)
    statuses_before = driver.control.call("counters")["statuses"]
    driver.guest.check(f"echo 1 > /sys/bus/pci/devices/{TESTDEV}/remove")
    # 6.16+ detaches from "domain 0" (its identity domain has no ID of its own) and the range starts at 1:
    # the spec's RANGE, and the device changes nothing (the endpoint stays in the identity domain).
    assert DOMAIN_START > 0
    statuses = driver.control.call("counters")["statuses"]
    assert statuses["RANGE"] == statuses_before["RANGE"] + 1
    [identity] = domains_of_endpoint(driver)
    assert identity["domain"] == DOMAIN_START and identity["bypass"]
    # Probed again, the device gets the kernel's default domain, as at boot; the identity domain went
    # with its last endpoint, and no domain is left without one.
    driver.guest.check("echo 1 > /sys/bus/pci/rescan")
    assert driver.guest.check(f"test -e /sys/bus/pci/devices/{TESTDEV} && echo present") == "present"
    [domain] = domains_of_endpoint(driver)
    assert not domain["bypass"] and domain["mappings"] == 0 and domain["domain"] > DOMAIN_START
    assert all(domain["endpoints"] for domain in driver.control.call("domains"))
    # And the device still serves: VFIO binds the rescanned device (its domain IDs are the guest's to reuse).
    driver.bind_vfio()
    [vfio_domain] = domains_of_endpoint(driver)
    assert not vfio_domain["bypass"]


def queues(driver: DriverLab) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = driver.control.call("queues")
    return rows


def test_spurious_kicks_on_both_queues_change_nothing(driver: DriverLab) -> None:
    """On both kernels: nothing here depends on the driver's version."""
    events_before = queues(driver)[1]
    for _ in range(10):
        assert driver.lab.spurious_kick(0) == 1 and driver.lab.spurious_kick(1) == 1
    # The device goes on serving the guest: binding VFIO attaches the endpoint (requests after the kicks).
    driver.bind_vfio()
    [vfio_domain] = domains_of_endpoint(driver)
    assert not vfio_domain["bypass"]
    requests, events = queues(driver)
    assert requests["broken"] is None and requests["in_flight"] == 0
    assert requests["used_idx"] == requests["next_avail"]  # every request popped was answered
    # No fault happened: a kick took no event buffer from the guest.
    assert events["next_avail"] == events_before["next_avail"]
    assert events["used_idx"] == events_before["used_idx"]
    status = int(driver.guest.check("cat /sys/bus/virtio/devices/virtio0/status"), 16)
    assert status & 0x04 and not status & 0x40  # DRIVER_OK, no NEEDS_RESET

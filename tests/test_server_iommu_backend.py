"""The real program's back-end (VirtioIommuBackend) behind the server, started the way QEMU starts it."""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest

from vhost_iommu.abi import CONFIG_SIZE, T_DETACH
from vhost_iommu.backend import VhostUserBackend
from vhost_iommu.device.layout import Status
from vhost_iommu.harness.background import RunningServer
from vhost_iommu.harness.frontend import Frontend
from vhost_iommu.harness.iommu_driver import IommuDriver

virtio_iommu = pytest.importorskip("vhost_iommu.virtio_iommu")

pytestmark = pytest.mark.usefixtures("fd_leak_check")


@pytest.fixture
def backend_factory() -> Callable[[], VhostUserBackend]:
    return lambda: virtio_iommu.VirtioIommuBackend(None)


def test_qemu_sees_a_forty_byte_config_and_version_1(frontend: Frontend) -> None:
    frontend.negotiate(2)
    assert len(frontend.get_config(0, CONFIG_SIZE)) == CONFIG_SIZE
    assert frontend.get_features() & (1 << 32)  # VIRTIO_F_VERSION_1
    assert frontend.get_queue_num() == 2


def test_a_request_on_the_requestq_is_answered(iommu_driver: IommuDriver) -> None:
    # DETACH of an endpoint from a domain it is not attached to: any well-formed request gets a status in
    # the 4-byte tail; what the status is belongs to the device's own tests.
    request = struct.pack("<BBHIIxxxx", T_DETACH, 0, 0, 1, 0)
    assert len(iommu_driver.send(request)) == 4


def test_a_vm_pause_keeps_the_device_state(iommu_driver: IommuDriver, vhost_server: RunningServer) -> None:
    # QEMU 10.2's generic device stops the rings around a VM pause exactly as around a guest reset;
    # only the restart tells them apart: a pause resumes every ring where GET_VRING_BASE left it.
    assert iommu_driver.attach(domain=3, endpoint=0x20) == Status.OK
    iommu_driver.restart(iommu_driver.frontend.stop_device(2, reset_status=False))
    device = vhost_server.backends[0].device
    assert vhost_server.call(lambda: device.domain_of(0x20)) == 3


def test_rings_recreated_after_a_stop_mean_a_guest_reset(
    iommu_driver: IommuDriver, vhost_server: RunningServer
) -> None:
    assert iommu_driver.attach(domain=3, endpoint=0x20) == Status.OK
    iommu_driver.frontend.stop_device(2, reset_status=False)
    iommu_driver.restart()  # the driver set the device up again: new rings, index 0
    device = vhost_server.backends[0].device
    assert vhost_server.call(lambda: device.domain_of(0x20)) is None
    assert vhost_server.call(lambda: device.domains()) == []
    # Served again, with the features of the restart.
    assert iommu_driver.attach(domain=4, endpoint=0x20) == Status.OK

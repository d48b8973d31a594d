"""The real program's back-end (VirtioIommuBackend) behind the server, started the way QEMU starts it."""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest

from vhost_iommu.backend import VhostUserBackend
from vhost_iommu.harness.driver_queue import DriverQueue
from vhost_iommu.harness.frontend import Frontend
from vhost_iommu.harness.guest_ram import GuestRam

virtio_iommu = pytest.importorskip("vhost_iommu.virtio_iommu")

VIRTIO_ID_IOMMU_CONFIG_SIZE = 40
VIRTIO_IOMMU_T_DETACH = 2
pytestmark = pytest.mark.usefixtures("fd_leak_check")


@pytest.fixture
def backend_factory() -> Callable[[], VhostUserBackend]:
    return lambda: virtio_iommu.VirtioIommuBackend(None)


def test_qemu_sees_a_forty_byte_config_and_version_1(frontend: Frontend) -> None:
    frontend.negotiate(2)
    assert len(frontend.get_config(0, VIRTIO_ID_IOMMU_CONFIG_SIZE)) == VIRTIO_ID_IOMMU_CONFIG_SIZE
    assert frontend.get_features() & (1 << 32)  # VIRTIO_F_VERSION_1
    assert frontend.get_queue_num() == 2


def test_a_request_on_the_requestq_is_answered(frontend: Frontend) -> None:
    with GuestRam(1 << 20) as ram:
        queues = [DriverQueue(ram, 64), DriverQueue(ram, 64)]
        frontend.start_device(ram, queues)
        # DETACH of an endpoint from a domain it is not attached to: any well-formed request gets a
        # status in the 4-byte tail; what the status is belongs to the device's own tests.
        request = struct.pack("<BBHIIxxxx", VIRTIO_IOMMU_T_DETACH, 0, 0, 1, 0)
        head = queues[0].post([request], [4])
        frontend.kick(0)
        assert frontend.wait_used(0, timeout=10)
        [(used_head, length)] = queues[0].used()
        assert (used_head, length) == (head, 4)

"""The real program's back-end (VirtioIommuBackend) behind the server, started the way QEMU starts it."""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest

from vhost_iommu.abi import CONFIG_SIZE, T_DETACH
from vhost_iommu.backend import VhostUserBackend
from vhost_iommu.device.layout import encode_attach
from vhost_iommu.harness.background import RunningServer
from vhost_iommu.harness.driver_queue import DriverQueue
from vhost_iommu.harness.frontend import Frontend
from vhost_iommu.harness.guest_ram import GuestRam

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


def test_a_request_on_the_requestq_is_answered(frontend: Frontend) -> None:
    with GuestRam(1 << 20) as ram:
        queues = [DriverQueue(ram, 64), DriverQueue(ram, 64)]
        frontend.start_device(ram, queues)
        # DETACH of an endpoint from a domain it is not attached to: any well-formed request gets a
        # status in the 4-byte tail; what the status is belongs to the device's own tests.
        request = struct.pack("<BBHIIxxxx", T_DETACH, 0, 0, 1, 0)
        head = queues[0].post([request], [4])
        frontend.kick(0)
        assert frontend.wait_used(0, timeout=10)
        [(used_head, length)] = queues[0].used()
        assert (used_head, length) == (head, 4)


def _attach(frontend: Frontend, queue: DriverQueue, domain: int, endpoint: int) -> int:
    head = queue.post([encode_attach(domain, endpoint)], [4])
    frontend.kick(0)
    assert frontend.wait_used(0, timeout=10)
    [(used_head, _length)] = queue.used()
    assert used_head == head
    return queue.written(head)[0]


def _restart(frontend: Frontend, queues: list[DriverQueue], bases: list[int]) -> None:
    """QEMU's vhost_dev_start after a stop: features, rings at the given bases, enable."""
    frontend.set_features(frontend.get_features())
    for index, (queue, base) in enumerate(zip(queues, bases, strict=True)):
        frontend.set_vring_num(index, queue.size)
        frontend.set_vring_base(index, base)
        frontend.set_vring_addr(index, queue)
        frontend.set_vring_kick(index)
        frontend.set_vring_call(index)
    for index in range(len(queues)):
        frontend.set_vring_enable(index, True)


def test_a_vm_pause_keeps_the_device_state(frontend: Frontend, vhost_server: RunningServer) -> None:
    # QEMU 10.2's generic device stops the rings around a VM pause exactly as around a guest reset;
    # only the restart tells them apart: a pause resumes every ring where GET_VRING_BASE left it.
    with GuestRam(1 << 20) as ram:
        queues = [DriverQueue(ram, 64, event_idx=True), DriverQueue(ram, 64, event_idx=True)]
        frontend.start_device(ram, queues)
        assert _attach(frontend, queues[0], domain=3, endpoint=0x20) == 0
        bases = frontend.stop_device(2, reset_status=False)
        _restart(frontend, queues, bases)
        device = vhost_server.backends[0].device
        assert vhost_server.call(lambda: device.domain_of(0x20)) == 3


def test_rings_recreated_after_a_stop_mean_a_guest_reset(
    frontend: Frontend, vhost_server: RunningServer
) -> None:
    with GuestRam(1 << 20) as ram:
        queues = [DriverQueue(ram, 64, event_idx=True), DriverQueue(ram, 64, event_idx=True)]
        frontend.start_device(ram, queues)
        assert _attach(frontend, queues[0], domain=3, endpoint=0x20) == 0
        frontend.stop_device(2, reset_status=False)
        # The driver set the device up again: new rings, index 0.
        fresh = [DriverQueue(ram, 64, event_idx=True), DriverQueue(ram, 64, event_idx=True)]
        _restart(frontend, fresh, [0, 0])
        device = vhost_server.backends[0].device
        assert vhost_server.call(lambda: device.domain_of(0x20)) is None
        assert vhost_server.call(lambda: device.domains()) == []
        # Served again, with the features of the restart.
        assert _attach(frontend, fresh[0], domain=4, endpoint=0x20) == 0

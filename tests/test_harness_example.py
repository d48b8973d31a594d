"""The README's example of a device test through the harness, kept here so it stays true."""

from collections.abc import Callable

import pytest

from vhost_iommu.device.layout import encode_attach
from vhost_iommu.harness import Frontend
from vhost_iommu.harness.driver_queue import DriverQueue
from vhost_iommu.harness.guest_ram import GuestRam
from vhost_iommu.virtio_iommu import VirtioIommuBackend


@pytest.fixture
def backend_factory() -> Callable[[], VirtioIommuBackend]:  # the harness serves the echo device by default
    return VirtioIommuBackend


def test_attach(frontend: Frontend) -> None:  # also: vhost_server, backend_factory, fd_leak_check
    with GuestRam(1 << 20) as ram:
        requests, events = DriverQueue(ram, 64, event_idx=True), DriverQueue(ram, 64, event_idx=True)
        frontend.start_device(ram, [requests, events])
        head = requests.post([encode_attach(domain=1, endpoint=0x20)], [4])
        frontend.kick(0)
        assert frontend.wait_used(0)
        assert requests.used() == [(head, 4)] and requests.written(head) == bytes(4)  # status OK

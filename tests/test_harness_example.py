"""The README's example of a device test through the harness, kept here so it stays true."""

from collections.abc import Callable

import pytest

from vhost_iommu.device.layout import Status, encode_map
from vhost_iommu.harness import IommuDriver
from vhost_iommu.virtio_iommu import VirtioIommuBackend


@pytest.fixture
def backend_factory() -> Callable[[], VirtioIommuBackend]:  # the harness serves the echo device by default
    return VirtioIommuBackend


def test_map(attached_driver: IommuDriver) -> None:  # also: iommu_driver, frontend, fd_leak_check
    # attached_driver: the device served, its rings started, endpoint 0x20 attached to domain 1.
    assert attached_driver.status(encode_map(1, 0x10000, 0x1FFFF, 0x200000)) == Status.OK
    assert attached_driver.status(encode_map(1, 0x10000, 0x10FFF, 0x300000)) == Status.INVAL  # overlaps

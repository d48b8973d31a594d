"""A front-end that plays QEMU, for tests and scripts: guest RAM, driver-side rings, the vhost-user client.

* :class:`~vhost_iommu.harness.frontend.Frontend`: blocking vhost-user front-end over a unix socket;
* :class:`~vhost_iommu.harness.echo.EchoBackend`: a two-queue echo device for exercising the server;
* :class:`~vhost_iommu.harness.background.RunningServer`: the server on a background thread (no pytest);
  ``running_server(factory)`` one on a private socket for a ``with`` block;
* :class:`~vhost_iommu.harness.iommu_driver.IommuDriver`: a virtio-iommu driver on a front-end (rings
  started, requests sent and their answers checked);
* ``vhost_iommu.harness.pytest_plugin``: fixtures (server in a thread, connected front-end, a served device
  with an attached endpoint, fd-leak check);
* ``guest_ram.GuestRam`` and ``driver_queue.DriverQueue``: memfd RAM and driver-side split rings
  (``device_address`` turns the guest-physical addresses it writes into the IOVAs a test mapped);
* ``vfio_client.VfioUserClient`` (QEMU's vfio-user client) and ``virtio_pci_driver.VirtioPciDriver``
  (Linux's virtio_pci over it): for the endpoints served over vfio-user.
"""

from vhost_iommu.harness.background import RunningServer, running_server
from vhost_iommu.harness.echo import EchoBackend
from vhost_iommu.harness.frontend import (
    Frontend,
    FrontendError,
    FrontendTimeout,
    RequestFailedError,
)
from vhost_iommu.harness.iommu_driver import IommuDriver

__all__ = [
    "EchoBackend",
    "Frontend",
    "FrontendError",
    "FrontendTimeout",
    "IommuDriver",
    "RequestFailedError",
    "RunningServer",
    "running_server",
]

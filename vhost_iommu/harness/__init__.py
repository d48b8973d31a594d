"""A front-end that plays QEMU, for tests and scripts: guest RAM, driver-side rings, the vhost-user client.

* :class:`~vhost_iommu.harness.frontend.Frontend`: blocking vhost-user front-end over a unix socket;
* :class:`~vhost_iommu.harness.echo.EchoBackend`: a two-queue echo device for exercising the server;
* :class:`~vhost_iommu.harness.background.RunningServer`: the server on a background thread (no pytest);
* ``vhost_iommu.harness.pytest_plugin``: fixtures (server in a thread, connected front-end, fd-leak check);
* ``guest_ram.GuestRam`` and ``driver_queue.DriverQueue``: memfd RAM and driver-side split rings.
"""

from vhost_iommu.harness.background import RunningServer
from vhost_iommu.harness.echo import EchoBackend
from vhost_iommu.harness.frontend import (
    Frontend,
    FrontendError,
    FrontendTimeout,
    RequestFailedError,
)

__all__ = [
    "EchoBackend",
    "Frontend",
    "FrontendError",
    "FrontendTimeout",
    "RequestFailedError",
    "RunningServer",
]

"""Pytest fixtures: a back-end server in a background thread, a connected front-end, an fd-leak check.

Load with ``pytest_plugins = ["vhost_iommu.harness.pytest_plugin"]``. Fixtures:

* ``backend_factory``: what the server builds per connection (default: :class:`EchoBackend`). Override it
  in a test module or ``conftest.py``, or parametrise it indirectly, to serve another device.
* ``vhost_server``: a :class:`~vhost_iommu.harness.background.RunningServer` on a temporary socket, its
  own event loop in its own thread; stopped, joined and its socket removed afterwards.
* ``frontend``: a :class:`~vhost_iommu.harness.frontend.Frontend` connected to ``vhost_server``.
* ``iommu_driver``: a virtio-iommu device served by ``vhost_server`` and started on ``frontend`` by an
  :class:`~vhost_iommu.harness.iommu_driver.IommuDriver` (1 MiB of RAM, rings of 64 with EVENT_IDX);
  override ``backend_factory`` to serve the :class:`~vhost_iommu.virtio_iommu.VirtioIommuBackend` wanted.
* ``attached_driver``: the same with ``ENDPOINT`` attached to ``DOMAIN`` (0x20 to 1): a served device with
  an attached endpoint.
* ``fd_leak_check``: fails the test if the process has fds open afterwards that it did not have before
  (request it first, so that it is torn down last).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator

import pytest

from vhost_iommu.backend import VhostUserBackend
from vhost_iommu.device.layout import Status
from vhost_iommu.harness.background import RunningServer, running_server
from vhost_iommu.harness.echo import EchoBackend
from vhost_iommu.harness.frontend import Frontend
from vhost_iommu.harness.iommu_driver import IommuDriver
from vhost_iommu.server import new_event_loop

__all__ = [
    "RunningServer",
    "attached_driver",
    "backend_factory",
    "fd_leak_check",
    "frontend",
    "iommu_driver",
    "open_fds",
    "vhost_server",
]


def open_fds() -> dict[int, str]:
    """This process's open fds and what they point at."""
    found: dict[int, str] = {}
    for name in os.listdir("/proc/self/fd"):
        # The listing's own fd is closed by the time we look at it.
        with contextlib.suppress(OSError):
            found[int(name)] = os.readlink(f"/proc/self/fd/{name}")
    return found


@functools.cache
def _warm_up_event_loop() -> None:
    # libuv opens a process-wide pipe with its first loop and keeps it: not a leak of any test's.
    new_event_loop().close()


@pytest.fixture
def fd_leak_check() -> Iterator[None]:
    _warm_up_event_loop()
    before = open_fds()
    yield
    after = open_fds()
    leaked = {fd: target for fd, target in after.items() if before.get(fd) != target}
    assert not leaked, f"fds leaked by the test: {leaked}"


@pytest.fixture
def backend_factory() -> Callable[[], VhostUserBackend]:
    return EchoBackend


@pytest.fixture
def vhost_server(backend_factory: Callable[[], VhostUserBackend]) -> Iterator[RunningServer]:
    with running_server(backend_factory) as server:
        yield server


@pytest.fixture
def frontend(vhost_server: RunningServer) -> Iterator[Frontend]:
    with vhost_server.connect() as connected:
        yield connected


@pytest.fixture
def iommu_driver(frontend: Frontend) -> Iterator[IommuDriver]:
    with IommuDriver(frontend, event_idx=True) as driver:
        yield driver


@pytest.fixture
def attached_driver(iommu_driver: IommuDriver) -> IommuDriver:
    assert iommu_driver.attach() == Status.OK
    return iommu_driver

"""Fairness between connections: every front-end shares the server's event loop, so a guest that keeps
its requestq full must not keep another guest's request waiting for as long as it floods."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import pytest

from vhost_iommu.backend import VhostUserBackend
from vhost_iommu.device.layout import encode_attach
from vhost_iommu.harness.background import RunningServer
from vhost_iommu.harness.driver_queue import DriverQueue
from vhost_iommu.harness.frontend import Frontend
from vhost_iommu.harness.guest_ram import GuestRam
from vhost_iommu.virtio_iommu import VirtioIommuBackend
from vhost_iommu.virtqueue import SplitQueue

pytestmark = pytest.mark.usefixtures("fd_leak_check")

EP = 0x20
SIZE = 64
#: A safety stop for the flood, far beyond what the other guest needs: with the back-end looping until
#: its ring is empty, the other guest would be answered only after all of these.
MAX_REPOSTS = 2_000_000


class FloodingBackend(VirtioIommuBackend):
    """A back-end whose driver re-posts a request the moment one is answered, for as long as it is
    allowed to: the repost is made from inside the device's serve, on the server's own thread, so the
    ring is never empty when the device looks again, however slow or loaded the machine is."""

    def __init__(self, request_path: str) -> None:
        super().__init__(
            request_path="python" if request_path == "python" else "compiled",
            kick_thread=request_path == "kick-thread",
        )
        self.driver: DriverQueue | None = None
        self.reposts = 0
        self.flooding = threading.Event()
        self.stop = threading.Event()

    def _serve_one(self, ring: SplitQueue) -> bool:
        served = super()._serve_one(ring)
        driver = self.driver
        if served and driver is not None and not self.stop.is_set() and self.reposts < MAX_REPOSTS:
            driver.used()
            driver.post([encode_attach(1, EP)], [4], indirect=True)
            self.reposts += 1
            if self.reposts == 4 * SIZE:
                self.flooding.set()
        return served


@pytest.fixture(params=["compiled", "python", "kick-thread"])
def request_path(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def backend_factory(request_path: str) -> Callable[[], VhostUserBackend]:
    made: list[VhostUserBackend] = []

    def factory() -> VhostUserBackend:
        # The first connection floods, the others are ordinary.
        backend: VhostUserBackend = (
            FloodingBackend(request_path)
            if not made
            else VirtioIommuBackend(
                request_path="python" if request_path == "python" else "compiled",
                kick_thread=request_path == "kick-thread",
            )
        )
        made.append(backend)
        return backend

    return factory


@pytest.fixture
def flooder_and_bystander(vhost_server: RunningServer) -> Iterator[tuple[Frontend, Frontend]]:
    # Two guests, two sockets of one server (a socket serves one front-end at a time).
    with vhost_server.connect() as flooder, vhost_server.connect(path=vhost_server.listen()) as bystander:
        yield flooder, bystander


def test_a_flooding_guest_does_not_starve_another(
    vhost_server: RunningServer, flooder_and_bystander: tuple[Frontend, Frontend]
) -> None:
    flooder, bystander = flooder_and_bystander
    with GuestRam(1 << 20) as flood_ram, GuestRam(1 << 20) as ram:
        flood_queues = [DriverQueue(flood_ram, SIZE), DriverQueue(flood_ram, 8)]
        flooder.start_device(flood_ram, flood_queues)
        queues = [DriverQueue(ram, SIZE), DriverQueue(ram, 8)]
        bystander.start_device(ram, queues)
        [flooding, _] = vhost_server.backends
        assert isinstance(flooding, FloodingBackend)

        def arm() -> None:
            flooding.driver = flood_queues[0]

        vhost_server.call(arm)
        for _ in range(SIZE):
            flood_queues[0].post([encode_attach(1, EP)], [4], indirect=True)
        flooder.kick(0)
        try:
            assert flooding.flooding.wait(timeout=60)
            head = queues[0].post([encode_attach(2, EP)], [4])
            bystander.kick(0)
            assert bystander.wait_used(0, timeout=60)
            # Answered while the flood went on: the flooder was not stopped yet, nor out of requests.
            assert not flooding.stop.is_set()
            assert flooding.reposts < MAX_REPOSTS
            assert queues[0].used() == [(head, 4)]
            assert queues[0].written(head)[0] == 0
        finally:
            flooding.stop.set()
        # Stopped at any point of the flood, the ring is consistent: every chain taken was answered.
        bases = flooder.stop_device(2)
        assert bases[0] == flood_queues[0].used_idx

        def disarm() -> None:
            flooding.driver = None  # its views would keep the RAM's mapping (and memfd) alive

        vhost_server.call(disarm)

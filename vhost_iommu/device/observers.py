"""What tools can attach to a device core: observers that see every request, and seeded forced answers.

`DeviceObserver` is the seam for tools that watch a device without changing its code: a trace writer,
a driver-conformance checker, a latency histogram. An observer is a plain object in
``IommuDevice.observers``; the device calls it synchronously, on whatever thread drives the device, and
never catches what it raises (an observer that fails is a bug of the tool, not a guest's doing). Every
method has a do-nothing default, so an observer overrides only what it needs.

While any observer is attached, a back-end serves every request through ``IommuDevice.handle_request``
(its compiled batch path steps aside: ``CompiledRequestPath.usable``), so observers see every request at
the cost of the Python path's speed.

`RateInjection` is a forced answer drawn per request: a seeded `random.Random` decides, for each request
of one type, whether the device answers it with a given status instead of serving it. The same seed and
the same sequence of requests force the same requests.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from vhost_iommu.device.layout import RequestType, Status
from vhost_iommu.device.topology import ReservedRegion

if TYPE_CHECKING:
    from vhost_iommu.device.translation import Fault


class DeviceObserver:
    """Callbacks from one `IommuDevice`; the defaults do nothing."""

    def request(self, request: bytes | memoryview, writable_size: int) -> None:
        """A requestq chain, before the device serves it (the device state is still the one before)."""

    def response(
        self,
        request: bytes | memoryview,
        writable_size: int,
        response: bytes,
        used: int,
        *,
        forced: bool,
        ns: int,
    ) -> None:
        """The device's answer to ``request``: the bytes for the start of the writable part, the used
        length, whether an injection forced it, and how long the device took (nanoseconds)."""

    def batch_served(self) -> None:
        """The request path served a batch of requests (what one kick made available): a trace writes
        its buffered records here, so a reader of a live trace sees whole batches."""

    def features(self, acked: int) -> None:
        """The driver's feature bits, after the device applied them."""

    def config_write(self, offset: int, data: bytes) -> None:
        """A driver write to config space, before the device applies (or refuses) it."""

    def reset(self) -> None:
        """After a device reset."""

    def fault(self, fault: Fault) -> None:
        """A fault of a DMA access recorded by the device (``IommuDevice.record_fault``), with its
        explanation when the caller made one (a `DmaPort` does)."""

    def bypass(self, value: int) -> None:
        """config.bypass changed by a tool (`IommuDevice.set_bypass`), not by the driver."""

    def reserved_regions(self, endpoint: int | None, regions: tuple[ReservedRegion, ...] | None) -> None:
        """An endpoint's reserved regions replaced by a tool (`IommuDevice.set_reserved_regions`):
        ``endpoint`` None means every endpoint, ``regions`` None the topology's own."""


@dataclass
class RateInjection:
    """Answer each request of ``request_type`` with ``status`` with probability ``rate``."""

    request_type: RequestType
    status: Status | None  # None: buffers returned unwritten (used length 0)
    rate: float
    seed: int
    rng: random.Random = field(init=False, repr=False)
    seen: int = 0  # requests of the type drawn for
    forced: int = 0  # of which answered with ``status``

    def __post_init__(self) -> None:
        if not 0.0 < self.rate <= 1.0:
            raise ValueError(f"rate {self.rate} is not within (0, 1]")
        self.rng = random.Random(self.seed)

    def draw(self) -> bool:
        self.seen += 1
        if self.rng.random() < self.rate:
            self.forced += 1
            return True
        return False

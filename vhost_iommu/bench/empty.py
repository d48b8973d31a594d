"""A back-end that answers MAP and UNMAP with OK and does nothing else: the floor of the vhost-user path.

What is left when the device does no work is what every request pays anyway: QEMU writing the kick
eventfd, the back-end waking up (its requestq thread in poll(2), or the event loop), the ring walk, the
used-ring update and the call eventfd back into the guest. Comparing it with the real device separates
that cost from the device's own.

It is the real back-end with the request kernel told not to work (``RF_NO_WORK``): the same wake-up
path (kick thread or event loop, as asked), the same validated ring walk, every well-formed MAP and
UNMAP answered OK without a check and without touching the mapping table. Every other chain (ATTACH,
DETACH, PROBE, anything unusual) goes to the real device core: the guest only binds its VFIO endpoint
once those succeed, and they happen a handful of times per boot, outside the timed loops. It answers
requests a real device would refuse, so it is a benchmark tool, not a device.
"""

from __future__ import annotations

from vhost_iommu.device import Topology
from vhost_iommu.virtio_iommu import CompiledRequestPath, VirtioIommuBackend


class EmptyBackend(VirtioIommuBackend):
    """Completes every well-formed MAP/UNMAP with status OK and the full used length, touching no table.

    The used length equals the writable size, as for a real answer: the Linux driver copies a status back
    only then, and counts a zero used length as an I/O error.
    """

    def __init__(
        self,
        topology: Topology | None = None,
        *,
        kick_thread: bool | None = None,
        poll_us: float | None = None,
    ) -> None:
        """``kick_thread``: serve from the requestq thread or the event loop; None: what the real
        back-end does by default, so that the floor moves with it. ``poll_us``: as the real one's."""
        super().__init__(topology, kick_thread=kick_thread, poll_us=poll_us)
        self._compiled = CompiledRequestPath(self.device, poll_us=poll_us, no_work=True)

"""A back-end that answers MAP and UNMAP with OK and does nothing else: the floor of the vhost-user path.

What is left when the device does no work is what every request pays anyway: QEMU writing the kick
eventfd, the event loop waking up, the ring walk in Python, the used-ring update and the call eventfd
back into the guest. Comparing it with the real device separates that cost from the device's own.

ATTACH, DETACH and PROBE still go to the real device core: the guest only binds its VFIO endpoint once
they succeed, and they happen a handful of times per boot, outside the timed loops.
"""

from __future__ import annotations

from vhost_iommu.device import RequestType
from vhost_iommu.device.layout import TAIL_SIZE
from vhost_iommu.memory import GuestMemoryError
from vhost_iommu.virtio_iommu import REQUEST_QUEUE, VirtioIommuBackend
from vhost_iommu.virtqueue import QueueError

_SKIPPED_TYPES = frozenset((RequestType.MAP, RequestType.UNMAP))
# Status OK (0) and three reserved zero bytes: struct virtio_iommu_req_tail.
_OK_TAIL = bytes(TAIL_SIZE)


class EmptyBackend(VirtioIommuBackend):
    """Completes every well-framed MAP/UNMAP with status OK and the full used length, touching no table.

    The used length must equal the writable size, as for a real answer: the Linux driver copies a status
    back only then, and counts a zero used length as an I/O error.
    """

    def queue_started(self, index: int) -> None:
        self.queue_kicked(index)

    def queue_kicked(self, index: int) -> None:
        if index == REQUEST_QUEUE:
            self._complete_requests()

    def _complete_requests(self) -> None:
        ring = self.context.queue(REQUEST_QUEUE) if self.context is not None else None
        if ring is None:
            return
        completed = 0
        try:
            while (chain := ring.pop()) is not None:
                request = chain.read()
                if request and request[0] in _SKIPPED_TYPES and chain.writable_len == TAIL_SIZE:
                    chain.write(_OK_TAIL)
                    ring.push_used(chain.head, TAIL_SIZE)
                else:
                    response, used_length = self.device.handle_request(request, chain.writable_len)
                    if response:
                        chain.write(response)
                    ring.push_used(chain.head, used_length)
                completed += 1
        except (QueueError, GuestMemoryError) as error:
            if self.context is not None:
                self.context.device_broken(f"requestq: {error}")
            return
        if completed and ring.needs_notification() and self.context is not None:
            self.context.signal_used(REQUEST_QUEUE)

"""A back-end that answers MAP and UNMAP with OK and does nothing else: the floor of the vhost-user path.

What is left when the device does no work is what every request pays anyway: QEMU writing the kick
eventfd, the event loop waking up, the back-end's own dispatch, the used-ring update and the call eventfd
back into the guest. Comparing it with the real device separates that cost from the device's own.

To be a floor, the ring walk is as lean as Python allows: it reads the two descriptors of a request
(directly or through an indirect table) with no validation beyond what it needs to recognise a
well-formed MAP or UNMAP, writes the OK tail and publishes the used entries once per batch. It trusts the
driver, so it is a benchmark tool, not a device. Every other chain (ATTACH, DETACH, PROBE, anything
unusual) goes through the validated :class:`~vhost_iommu.virtqueue.SplitQueue` walk to the real device
core: the guest only binds its VFIO endpoint once those succeed, and they happen a handful of times per
boot, outside the timed loops.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from vhost_iommu.device import RequestType
from vhost_iommu.device.layout import MAP, TAIL_SIZE, UNMAP
from vhost_iommu.memory import GuestMemory, GuestMemoryError
from vhost_iommu.virtio_iommu import REQUEST_QUEUE, VirtioIommuBackend
from vhost_iommu.virtqueue import (
    DESC_SIZE,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    QueueError,
    SplitQueue,
    full_fence,
    ring_sizes,
    vring_need_event,
)

_DESC_F_NEXT = 1
_DESC_F_WRITE = 2
_DESC_F_INDIRECT = 4
# The readable size of each request the lean walk answers (anything else goes to the device core).
_ANSWERED = {int(RequestType.MAP): MAP.size, int(RequestType.UNMAP): UNMAP.size}


class _RingViews:
    """Views of one ring's descriptor table (as u64 pairs), available ring and used ring."""

    def __init__(self, ring: SplitQueue, memory: GuestMemory) -> None:
        desc_bytes, avail_bytes, used_bytes = ring_sizes(ring.size, ring.event_idx)
        self.ring = ring
        self.generation = memory.generation
        # Each descriptor as two u64: the address, then len (u32) | flags (u16) << 32 | next (u16) << 48.
        self.descriptors: npt.NDArray[np.uint64] = memory.uva_view(ring.desc_uva, desc_bytes).view("<u8")
        # [flags, idx, ring[size], used_event]
        self.avail: npt.NDArray[np.uint16] = memory.uva_view(ring.avail_uva, avail_bytes).view("<u2")
        used = memory.uva_view(ring.used_uva, used_bytes)
        self.used_index: npt.NDArray[np.uint16] = used[:4].view("<u2")
        # One used element {le32 id; le32 len} as one little-endian u64.
        self.used_ring: npt.NDArray[np.uint64] = used[4 : 4 + 8 * ring.size].view("<u8")
        self.avail_event: npt.NDArray[np.uint16] = used[4 + 8 * ring.size :].view("<u2")
        # The used index up to which the driver has been notified; None until the first notification.
        self.signalled: int | None = None


class EmptyBackend(VirtioIommuBackend):
    """Completes every well-formed MAP/UNMAP with status OK and the full used length, touching no table.

    The used length must equal the writable size, as for a real answer: the Linux driver copies a status
    back only then, and counts a zero used length as an I/O error.
    """

    _views: _RingViews | None = None

    def queue_started(self, index: int) -> None:
        self.queue_kicked(index)

    def queue_kicked(self, index: int) -> None:
        if index != REQUEST_QUEUE or self.context is None:
            return
        ring = self.context.queue(REQUEST_QUEUE)
        if ring is None:
            return
        try:
            self._complete(ring, self.context.memory)
        except (QueueError, GuestMemoryError, IndexError, ValueError) as error:
            self.context.device_broken(f"requestq: {error}")

    def _ring_views(self, ring: SplitQueue, memory: GuestMemory) -> _RingViews:
        views = self._views
        if views is None or views.ring is not ring or views.generation != memory.generation:
            views = self._views = _RingViews(ring, memory)
        return views

    def _complete(self, ring: SplitQueue, memory: GuestMemory) -> None:
        views = self._ring_views(ring, memory)
        descriptors, avail, used_ring = views.descriptors, views.avail, views.used_ring
        mask = ring.size - 1
        used_idx = started_at = ring.used_idx
        while ring.next_avail != avail.item(1):
            head = avail.item(2 + (ring.next_avail & mask))
            tail = self._tail_of_plain_request(descriptors, head, ring.size, memory)
            if tail is None:
                # Not a plain MAP/UNMAP: the validated walk and the real device core answer it.
                self._publish(views, ring, used_idx)
                self._answer_with_device(ring)
                used_idx = ring.used_idx
                continue
            memory.gpa_view(tail, TAIL_SIZE)[:] = 0  # status OK, reserved bytes zero
            used_ring[used_idx & mask] = head | TAIL_SIZE << 32
            used_idx = (used_idx + 1) & 0xFFFF
            ring.next_avail = (ring.next_avail + 1) & 0xFFFF
            if ring.event_idx:
                views.avail_event[0] = ring.next_avail  # kick me again for the next one
        self._publish(views, ring, used_idx)
        if ring.used_idx != started_at:
            self._notify_if_wanted(views, ring)

    @staticmethod
    def _tail_of_plain_request(
        descriptors: npt.NDArray[np.uint64], head: int, size: int, memory: GuestMemory
    ) -> int | None:
        """The guest-physical address of the tail of a two-descriptor MAP/UNMAP chain at ``head``."""
        if head >= size:
            return None
        table, first = descriptors, head
        word = descriptors.item(2 * head + 1)
        if (word >> 32) & _DESC_F_INDIRECT:
            length = word & 0xFFFFFFFF
            if length != 2 * DESC_SIZE:
                return None
            table, first = memory.gpa_view(descriptors.item(2 * head), length).view("<u8"), 0
            word = table.item(1)
        flags, second = (word >> 32) & 0xFFFF, word >> 48
        if flags & (_DESC_F_WRITE | _DESC_F_INDIRECT) or not flags & _DESC_F_NEXT:
            return None
        if second >= len(table) // 2:
            return None
        readable_address, readable_length = table.item(2 * first), word & 0xFFFFFFFF
        tail_word = table.item(2 * second + 1)
        if (tail_word >> 32) & 0xFFFF != _DESC_F_WRITE or tail_word & 0xFFFFFFFF != TAIL_SIZE:
            return None
        if _ANSWERED.get(int(memory.gpa_view(readable_address, 1)[0])) != readable_length:
            return None
        tail_address: int = table.item(2 * second)
        return tail_address

    def _answer_with_device(self, ring: SplitQueue) -> None:
        chain = ring.pop()
        if chain is None:
            return
        response, used_length = self.device.handle_request(chain.read(), chain.writable_len)
        if response:
            chain.write(response)
        ring.push_used(chain.head, used_length)

    @staticmethod
    def _publish(views: _RingViews, ring: SplitQueue, used_idx: int) -> None:
        if used_idx == ring.used_idx:
            return
        full_fence()  # the entries and the tails written before them, ahead of the index
        views.used_index[1] = used_idx
        ring.used_idx = used_idx

    def _notify_if_wanted(self, views: _RingViews, ring: SplitQueue) -> None:
        new, old = ring.used_idx, views.signalled
        # used.idx must be visible before the driver's suppression state is read (see SplitQueue).
        full_fence()
        if ring.event_idx:
            # The first notification of a ring is always sent: what the driver saw before is unknown.
            wanted = old is None or vring_need_event(views.avail.item(2 + ring.size), new, old)
        else:
            wanted = not views.avail.item(0) & VIRTQ_AVAIL_F_NO_INTERRUPT
        views.signalled = new
        if wanted and self.context is not None:
            self.context.signal_used(REQUEST_QUEUE)

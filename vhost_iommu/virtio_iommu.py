"""The virtio-iommu device behind the vhost-user seam.

`VirtioIommuBackend` implements :class:`vhost_iommu.backend.VhostUserBackend` by walking the requestq and
eventq rings into the sans-I/O device core (`vhost_iommu.device.IommuDevice`). It owns no sockets and no fds;
the server lends it the rings and a way to signal the front-end.
"""

from __future__ import annotations

import logging

from vhost_iommu.backend import BackendContext
from vhost_iommu.device import IommuDevice, Topology
from vhost_iommu.memory import GuestMemoryError
from vhost_iommu.virtqueue import QueueError, SplitQueue

log = logging.getLogger(__name__)

REQUEST_QUEUE = 0
EVENT_QUEUE = 1

VIRTIO_F_VERSION_1 = 1 << 32
VIRTIO_RING_F_INDIRECT_DESC = 1 << 28
VIRTIO_RING_F_EVENT_IDX = 1 << 29
RING_FEATURES = VIRTIO_RING_F_INDIRECT_DESC | VIRTIO_RING_F_EVENT_IDX
FAULT_EVENT_SIZE = 24  # struct virtio_iommu_fault


class VirtioIommuBackend:
    """One virtio-iommu device, for the life of one front-end connection."""

    num_queues = 2
    # The spec's largest split ring; QEMU's generic device asks for 64 unless told `vq_size=`.
    max_queue_size = 32768

    def __init__(self, topology: Topology | None = None, *, device: IommuDevice | None = None) -> None:
        self.device = device if device is not None else IommuDevice(topology or Topology.default())
        self.context: BackendContext | None = None
        self.acked_features = 0

    # -- features and config ----------------------------------------------------------------------------

    def device_features(self) -> int:
        return self.device.device_features() | VIRTIO_F_VERSION_1 | RING_FEATURES

    def set_features(self, acked: int) -> None:
        self.acked_features = acked
        self.device.set_features(acked & ~RING_FEATURES)

    @property
    def event_idx(self) -> bool:
        return bool(self.acked_features & VIRTIO_RING_F_EVENT_IDX)

    @property
    def indirect_desc(self) -> bool:
        return bool(self.acked_features & VIRTIO_RING_F_INDIRECT_DESC)

    @property
    def config_size(self) -> int:
        return self.device.config_size

    def get_config(self, offset: int, size: int) -> bytes:
        return self.device.get_config(offset, size)

    def set_config(self, offset: int, data: bytes) -> None:
        # QEMU's generic vhost-user device forwards every guest config write as a write of its whole cached
        # config (vub_set_config: offset 0, config_size bytes), so only the bytes that differ from the
        # device's current config are the guest's write; unchanged read-only fields are not a write to them.
        current = self.device.get_config(offset, len(data))
        start = 0
        while start < len(data):
            if data[start] == current[start]:
                start += 1
                continue
            end = start
            while end < len(data) and data[end] != current[end]:
                end += 1
            self.device.set_config(offset + start, bytes(data[start:end]))
            start = end

    # -- lifetime ---------------------------------------------------------------------------------------

    def attach(self, context: BackendContext) -> None:
        self.context = context

    def memory_changed(self) -> None:
        pass

    def reset(self) -> None:
        self.device.reset()
        self.acked_features = 0

    # -- queues -----------------------------------------------------------------------------------------

    def queue_started(self, index: int) -> None:
        self.queue_kicked(index)

    def queue_stopped(self, index: int) -> None:
        pass

    def queue_kicked(self, index: int) -> None:
        if index == REQUEST_QUEUE:
            self._serve_requests()
        # Fault events may be waiting for buffers either way: a kick of the eventq brings buffers, a request
        # may have produced a fault.
        self.deliver_events()

    def _ring(self, index: int) -> SplitQueue | None:
        return self.context.queue(index) if self.context is not None else None

    def _serve_requests(self) -> None:
        ring = self._ring(REQUEST_QUEUE)
        if ring is None:
            return
        completed = 0
        try:
            while (chain := ring.pop()) is not None:
                response, used_length = self.device.handle_request(chain.read(), chain.writable_len)
                if response:
                    chain.write(response)
                ring.push_used(chain.head, used_length)
                completed += 1
        except (QueueError, GuestMemoryError) as error:
            self._broken(f"requestq: {error}")
            return
        if completed and ring.needs_notification():
            self._signal(REQUEST_QUEUE)

    def deliver_events(self) -> None:
        """Move pending fault events into the buffers the driver posted on the eventq."""
        if not self.device.pending_event_count:
            return
        ring = self._ring(EVENT_QUEUE)
        if ring is None:
            return
        delivered = 0
        try:
            while self.device.pending_event_count:
                chain = ring.pop()
                if chain is None:
                    break
                if chain.writable_len < FAULT_EVENT_SIZE:
                    # A driver-normative violation (eventq buffers hold a whole event); give the buffer back
                    # empty rather than truncate an event into it.
                    ring.push_used(chain.head, 0)
                    continue
                event = self.device.take_event()
                assert event is not None
                chain.write(event)
                ring.push_used(chain.head, len(event))
                delivered += 1
        except (QueueError, GuestMemoryError) as error:
            self._broken(f"eventq: {error}")
            return
        if delivered and ring.needs_notification():
            self._signal(EVENT_QUEUE)

    def _signal(self, index: int) -> None:
        if self.context is not None:
            self.context.signal_used(index)

    def _broken(self, reason: str) -> None:
        log.warning("device broken: %s", reason)
        if self.context is not None:
            self.context.device_broken(reason)

"""A tiny back-end for exercising the vhost-user machinery: two queues that echo, eight bytes of config.

Every chain made available on either queue gets its readable bytes copied into its writable buffers (as
many as fit) and is returned with that length. Writing the config stores the bytes and raises a
config-change notification, so the back-end channel can be tested too. ``events`` records what the
server told the back-end, in order, for tests to assert on.
"""

from __future__ import annotations

import threading

from vhost_iommu.abi import VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC
from vhost_iommu.backend import BackendContext

ECHO_CONFIG_SIZE = 8


class EchoBackend:
    """Implements :class:`vhost_iommu.backend.VhostUserBackend`."""

    num_queues = 2
    max_queue_size = 1024

    def __init__(self, initial_config: bytes = b"ECHOECHO") -> None:
        if len(initial_config) != ECHO_CONFIG_SIZE:
            raise ValueError(f"the echo config is {ECHO_CONFIG_SIZE} bytes")
        self._initial_config = bytes(initial_config)
        self.config = bytearray(initial_config)
        self.acked_features = 0
        self.context: BackendContext | None = None
        self.echoed = 0
        self.events: list[tuple[str, int]] = []
        self._lock = threading.Lock()  # events are read by test threads while the server appends

    def _record(self, event: str, index: int = -1) -> None:
        with self._lock:
            self.events.append((event, index))

    def events_snapshot(self) -> list[tuple[str, int]]:
        with self._lock:
            return list(self.events)

    def device_features(self) -> int:
        return VIRTIO_F_VERSION_1 | VIRTIO_RING_F_INDIRECT_DESC | VIRTIO_RING_F_EVENT_IDX

    def set_features(self, acked: int) -> None:
        self.acked_features = acked
        self._record("set_features")

    @property
    def config_size(self) -> int:
        return ECHO_CONFIG_SIZE

    def get_config(self, offset: int, size: int) -> bytes:
        if offset < 0 or size < 0 or offset + size > ECHO_CONFIG_SIZE:
            raise ValueError(f"config read {offset}+{size} outside {ECHO_CONFIG_SIZE} bytes")
        return bytes(self.config[offset : offset + size])

    def set_config(self, offset: int, data: bytes) -> None:
        if offset < 0 or offset + len(data) > ECHO_CONFIG_SIZE:
            raise ValueError(f"config write {offset}+{len(data)} outside {ECHO_CONFIG_SIZE} bytes")
        self.config[offset : offset + len(data)] = data
        self._record("set_config", offset)
        if self.context is not None:
            self.context.config_changed()

    def attach(self, context: BackendContext) -> None:
        self.context = context

    def detach(self) -> None:
        self.context = None

    def memory_changed(self) -> None:
        self._record("memory_changed")

    def queue_started(self, index: int) -> None:
        self._record("queue_started", index)
        self._drain(index)

    def queue_stopped(self, index: int) -> None:
        self._record("queue_stopped", index)

    def queue_kicked(self, index: int) -> None:
        self._record("queue_kicked", index)
        self._drain(index)

    def reset(self) -> None:
        self._record("reset")
        self.config[:] = self._initial_config
        self.acked_features = 0

    def _drain(self, index: int) -> None:
        assert self.context is not None
        queue = self.context.queue(index)
        if queue is None:
            return
        # QueueError from pop() propagates: the server turns it into NEEDS_RESET.
        while (chain := queue.pop()) is not None:
            written = chain.write(chain.read()) if chain.writable_len else 0
            queue.push_used(chain.head, written)
            self.echoed += 1
        if queue.needs_notification():
            self.context.signal_used(index)

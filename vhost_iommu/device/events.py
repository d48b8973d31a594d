"""Fault events waiting for eventq buffers.

The spec lets a device with no eventq buffer "either wait for one to be consumed, or drop the event". We
wait, up to a bound, so a burst of faults while the driver is slow to repost buffers is not lost; past the
bound we drop the newest event (the first faults of a burst are the ones that explain it) and count it.
"""

from __future__ import annotations

from collections import deque


class FaultQueue:
    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"event queue capacity {capacity} is negative")
        self.capacity = capacity
        self._events: deque[bytes] = deque()
        self.queued_count = 0  # events ever accepted
        self.dropped_count = 0  # events refused because the queue was full

    def __len__(self) -> int:
        return len(self._events)

    def push(self, event: bytes) -> bool:
        """Queue one encoded event; False (and counted) when the queue is full."""
        if len(self._events) >= self.capacity:
            self.dropped_count += 1
            return False
        self._events.append(event)
        self.queued_count += 1
        return True

    def take(self) -> bytes | None:
        return self._events.popleft() if self._events else None

    def peek_all(self) -> list[bytes]:
        return list(self._events)

    def clear(self) -> None:
        self._events.clear()

"""The server's side of the seam without a server: a `BackendContext` over rings a test or script set up.

For driving a back-end directly (no socket, no event loop): the rings are `SplitQueue`s over guest
memory the caller maps, and what the back-end asks of the server is recorded instead of done.
"""

from __future__ import annotations

from vhost_iommu.memory import GuestMemory
from vhost_iommu.virtqueue import SplitQueue

__all__ = ["StandaloneContext"]


class StandaloneContext:
    """Lends ``queues`` to a back-end; counts used-buffer signals and reschedules, keeps the reason of
    the first NEEDS_RESET (after which no queue is lent, as the server stops serving)."""

    def __init__(
        self, memory: GuestMemory, queues: list[SplitQueue], *, session_key: str | None = None
    ) -> None:
        #: What a keeper names the connection by (None: served without one; nothing is persisted).
        self.session_key = session_key
        self.memory = memory
        self.queues = queues
        self.broken: str | None = None
        self.signals = [0] * len(queues)
        self.rescheduled = [0] * len(queues)
        self.config_changes = 0

    def queue(self, index: int) -> SplitQueue | None:
        return None if self.broken is not None else self.queues[index]

    def signal_used(self, index: int) -> None:
        self.signals[index] += 1

    def reschedule(self, index: int) -> None:
        self.rescheduled[index] += 1

    def config_changed(self) -> None:
        self.config_changes += 1

    def offer_kick_fds(self) -> None:
        pass  # no server, no kick fds

    def device_broken(self, reason: str) -> None:
        if self.broken is None:
            self.broken = reason

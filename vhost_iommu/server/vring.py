"""Per-queue ring state, as data: layout, fds, the live ring, and the ring's phase.

The phase (stopped/started, disabled/enabled, a held kick, what the back-end was last told) is the state
machine of ``server/rings.py``; the slot adds what a started ring needs: its layout, its fds (owned by the
slot) and the :class:`~vhost_iommu.virtqueue.SplitQueue` bound while it is started.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vhost_iommu.protocol import VringAddress, close_fds
from vhost_iommu.server.rings import RingMachine
from vhost_iommu.virtqueue import SplitQueue


@dataclass
class VringSlot:
    """Everything the server knows about one queue. Fds here are owned by the slot."""

    index: int
    #: Ring layout from SET_VRING_NUM / SET_VRING_ADDR / SET_VRING_BASE, used when the ring starts.
    size: int | None = None
    address: VringAddress | None = None
    base: int = 0
    kick_fd: int | None = None
    call_fd: int | None = None
    err_fd: int | None = None
    #: Started/stopped, enabled/disabled, a held kick, what the back-end was last told.
    phases: RingMachine = field(default_factory=RingMachine)
    #: The live ring while started; None while stopped.
    queue: SplitQueue | None = None
    #: The back-end watches kick_fd itself (KickFdTaker.takes_kick_fd); the loop does not meanwhile.
    kick_taken: bool = False
    #: The back-end asked for queue_kicked again (BackendContext.reschedule) and has not had it yet.
    rescheduled: bool = False
    #: (size, next avail, addresses) of the ring when GET_VRING_BASE last stopped it, until it restarts:
    #: a restart with another layout means the front-end re-created the rings, i.e. a device reset.
    stopped_layout: tuple[int | None, int, VringAddress | None] | None = None

    @property
    def layout(self) -> tuple[int | None, int, VringAddress | None]:
        return (self.size, self.base, self.address)

    @property
    def started(self) -> bool:
        return self.phases.phase.started

    @property
    def enabled(self) -> bool:
        return self.phases.phase.enabled

    @property
    def kick_pending(self) -> bool:
        """A kick the back-end has not acted on, delivered when the ring is served."""
        return self.phases.kick_held

    @property
    def served(self) -> bool:
        """Whether the back-end was last told queue_started (True) or queue_stopped (False)."""
        return self.phases.served

    @property
    def restarts_elsewhere(self) -> bool:
        """The ring starts at another layout than GET_VRING_BASE stopped it at: the front-end re-created
        the rings, i.e. the guest reset the device (see ConnectionHandler._reset_on_ring_restart)."""
        return self.stopped_layout is not None and self.stopped_layout != self.layout

    def replace_fd(self, which: str, fd: int | None) -> None:
        """Install ``fd`` as the kick, call or err fd, closing the one it replaces."""
        old = getattr(self, f"{which}_fd")
        setattr(self, f"{which}_fd", fd)
        if old is not None and old != fd:
            close_fds([old])

    def close_fds(self) -> None:
        for which in ("kick", "call", "err"):
            self.replace_fd(which, None)

    def describe(self) -> str:
        return f"ring {self.index} ({self.phases.phase.value})"

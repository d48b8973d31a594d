"""Per-queue ring state, as explicit data (vhost-user.rst "Ring states").

A ring is *stopped* until it gets a kick fd (SET_VRING_KICK) and *started* from then until GET_VRING_BASE.
Independently it is *enabled* or *disabled* (SET_VRING_ENABLE; all rings are enabled by a SET_FEATURES that
does not carry VHOST_USER_F_PROTOCOL_FEATURES). The back-end is served a ring only while it is started,
enabled and the device is not broken: that is :attr:`VringSlot.active`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vhost_iommu.protocol import VringAddress, close_fds
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
    enabled: bool = False
    #: The live ring while started; None while stopped.
    queue: SplitQueue | None = None
    #: A kick arrived while the ring was disabled: deliver it when the ring is enabled.
    kick_pending: bool = False
    #: The back-end watches kick_fd itself (KickFdTaker.takes_kick_fd); the loop does not meanwhile.
    kick_taken: bool = False
    #: The back-end asked for queue_kicked again (BackendContext.reschedule) and has not had it yet.
    rescheduled: bool = False
    #: Whether the back-end was last told queue_started (True) or queue_stopped (False).
    served: bool = field(default=False)
    #: (size, next avail, addresses) of the ring when GET_VRING_BASE last stopped it, until it restarts:
    #: a restart with another layout means the front-end re-created the rings, i.e. a device reset.
    stopped_layout: tuple[int | None, int, VringAddress | None] | None = None

    @property
    def layout(self) -> tuple[int | None, int, VringAddress | None]:
        return (self.size, self.base, self.address)

    @property
    def started(self) -> bool:
        return self.queue is not None

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
        state = "started" if self.started else "stopped"
        enabled = "enabled" if self.enabled else "disabled"
        return f"ring {self.index} ({state}, {enabled})"

"""The phases of one ring as an explicit state machine (vhost-user.rst "Ring states"); no I/O.

A ring is *stopped* or *started* (SET_VRING_KICK starts it, GET_VRING_BASE stops it) and, independently,
*disabled* or *enabled* (SET_VRING_ENABLE; a SET_FEATURES without VHOST_USER_F_PROTOCOL_FEATURES enables
every ring). The four combinations are the :class:`RingPhase` members. Which request may move a ring from
which phase to which is the table :data:`TRANSITIONS`; a request that is not in it is refused. What a
kick does is the table :data:`KICKS`: a kick on a started but disabled ring is held until the ring is
enabled (a device has no side-effect-free way to process requests), one on a stopped ring is ignored.

The back-end is *served* a ring while the ring is started and enabled and the device is usable (not
broken, connection open): it is told ``queue_started`` when that begins, ``queue_stopped`` when it ends,
and ``queue_kicked`` for a held kick once the ring is served. :class:`RingMachine` says which of those
calls follows (:meth:`RingMachine.sync`, :meth:`RingMachine.take_held_kick`) and records it as made; the
handler (``server/handler.py``) makes the call. Nothing here touches an fd, a ring in guest memory or
the event loop: the machine is tested alone by feeding it events.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class RingPhase(enum.Enum):
    """Started or stopped, times enabled or disabled."""

    STOPPED_DISABLED = "stopped, disabled"
    STOPPED_ENABLED = "stopped, enabled"
    STARTED_DISABLED = "started, disabled"
    STARTED_ENABLED = "started, enabled"

    @property
    def started(self) -> bool:
        return self in (RingPhase.STARTED_DISABLED, RingPhase.STARTED_ENABLED)

    @property
    def enabled(self) -> bool:
        return self in (RingPhase.STOPPED_ENABLED, RingPhase.STARTED_ENABLED)


class RingEvent(enum.Enum):
    """What the front-end does to one ring."""

    #: SET_VRING_NUM, SET_VRING_ADDR or SET_VRING_BASE: the ring's layout changes.
    CONFIGURE = "SET_VRING_NUM/ADDR/BASE"
    #: SET_VRING_KICK with an fd (a new kick fd for a started ring keeps it started).
    START = "SET_VRING_KICK"
    #: GET_VRING_BASE (or anything that stops the ring as it does: a device reset, the disconnect).
    STOP = "GET_VRING_BASE"
    ENABLE = "SET_VRING_ENABLE 1"
    DISABLE = "SET_VRING_ENABLE 0"


class KickAction(enum.Enum):
    """What a kick read from the kick fd leads to."""

    IGNORE = "ignore"
    HOLD = "hold"
    SERVE = "serve"


class BackendCall(enum.Enum):
    """A call the back-end is owed, named by its VhostUserBackend method."""

    QUEUE_STARTED = "queue_started"
    QUEUE_STOPPED = "queue_stopped"
    QUEUE_KICKED = "queue_kicked"


_P = RingPhase
_E = RingEvent

#: Every allowed (phase, event) and the phase it leads to; a pair that is missing is refused. A ring's
#: layout changes only while it is stopped: a started ring's addresses and index are the device's.
TRANSITIONS: dict[tuple[RingPhase, RingEvent], RingPhase] = {
    (_P.STOPPED_DISABLED, _E.CONFIGURE): _P.STOPPED_DISABLED,
    (_P.STOPPED_ENABLED, _E.CONFIGURE): _P.STOPPED_ENABLED,
    (_P.STOPPED_DISABLED, _E.START): _P.STARTED_DISABLED,
    (_P.STOPPED_ENABLED, _E.START): _P.STARTED_ENABLED,
    (_P.STARTED_DISABLED, _E.START): _P.STARTED_DISABLED,
    (_P.STARTED_ENABLED, _E.START): _P.STARTED_ENABLED,
    (_P.STOPPED_DISABLED, _E.STOP): _P.STOPPED_DISABLED,
    (_P.STOPPED_ENABLED, _E.STOP): _P.STOPPED_ENABLED,
    (_P.STARTED_DISABLED, _E.STOP): _P.STOPPED_DISABLED,
    (_P.STARTED_ENABLED, _E.STOP): _P.STOPPED_ENABLED,
    (_P.STOPPED_DISABLED, _E.ENABLE): _P.STOPPED_ENABLED,
    (_P.STOPPED_ENABLED, _E.ENABLE): _P.STOPPED_ENABLED,
    (_P.STARTED_DISABLED, _E.ENABLE): _P.STARTED_ENABLED,
    (_P.STARTED_ENABLED, _E.ENABLE): _P.STARTED_ENABLED,
    (_P.STOPPED_DISABLED, _E.DISABLE): _P.STOPPED_DISABLED,
    (_P.STOPPED_ENABLED, _E.DISABLE): _P.STOPPED_DISABLED,
    (_P.STARTED_DISABLED, _E.DISABLE): _P.STARTED_DISABLED,
    (_P.STARTED_ENABLED, _E.DISABLE): _P.STARTED_DISABLED,
}

#: What a kick does in each phase (on a usable device; on a broken one every kick is ignored).
KICKS: dict[RingPhase, KickAction] = {
    _P.STOPPED_DISABLED: KickAction.IGNORE,
    _P.STOPPED_ENABLED: KickAction.IGNORE,
    _P.STARTED_DISABLED: KickAction.HOLD,
    _P.STARTED_ENABLED: KickAction.SERVE,
}

#: The one phase in which the back-end is served the ring (when the device is usable).
SERVED_PHASE = RingPhase.STARTED_ENABLED


class RingRefused(Exception):
    """An event the ring's phase does not allow (the request that caused it is refused)."""

    def __init__(self, phase: RingPhase, event: RingEvent) -> None:
        super().__init__(f"{event.value} is not allowed on a {phase.value} ring")
        self.phase = phase
        self.event = event


@dataclass
class RingMachine:
    """One ring's phase, its held kick, and what the back-end was last told."""

    phase: RingPhase = RingPhase.STOPPED_DISABLED
    #: A kick the back-end has not acted on yet: delivered (queue_kicked) once the ring is served.
    kick_held: bool = False
    #: Whether the back-end was last told queue_started (True) or queue_stopped (False).
    served: bool = False

    def may(self, event: RingEvent) -> bool:
        return (self.phase, event) in TRANSITIONS

    def apply(self, event: RingEvent) -> None:
        """Move to the phase ``event`` leads to; raises RingRefused (nothing changed) if it is not allowed.

        A stop drops a held kick: a restart serves whatever the driver queued meanwhile anyway.
        """
        following = TRANSITIONS.get((self.phase, event))
        if following is None:
            raise RingRefused(self.phase, event)
        self.phase = following
        if event is RingEvent.STOP:
            self.kick_held = False

    def stopping(self) -> BackendCall | None:
        """The ring is about to stop: its held kick is dropped, and QUEUE_STOPPED is returned (recorded as
        told) if the back-end was served it. Called before :meth:`apply` of STOP, while the ring is still
        bound, so that a back-end holding chains (eventq buffers) can return them first."""
        self.kick_held = False
        if self.served:
            self.served = False
            return BackendCall.QUEUE_STOPPED
        return None

    def kick(self, device_usable: bool) -> KickAction:
        """A kick arrived: serve it, hold it (recorded here) or ignore it."""
        action = KICKS[self.phase] if device_usable else KickAction.IGNORE
        if action is KickAction.HOLD:
            self.kick_held = True
        return action

    def hold_kick(self) -> None:
        """Kicks the back-end read but may not have acted on (it gave the kick fd back): look again."""
        self.kick_held = True

    def serving(self, device_usable: bool) -> bool:
        """Whether the back-end is to be served this ring now."""
        return self.phase is SERVED_PHASE and device_usable

    def sync(self, device_usable: bool) -> BackendCall | None:
        """The call that tells the back-end the ring became served or stopped being served, if it did
        since it was last told (recorded as told); None if the back-end is up to date."""
        serving = self.serving(device_usable)
        if serving and not self.served:
            self.served = True
            return BackendCall.QUEUE_STARTED
        if not serving and self.served:
            self.served = False
            return BackendCall.QUEUE_STOPPED
        return None

    def take_held_kick(self, device_usable: bool) -> BackendCall | None:
        """QUEUE_KICKED (and the kick no longer held) if a kick is held and the ring is served now."""
        if self.kick_held and self.serving(device_usable):
            self.kick_held = False
            return BackendCall.QUEUE_KICKED
        return None


__all__ = [
    "KICKS",
    "SERVED_PHASE",
    "TRANSITIONS",
    "BackendCall",
    "KickAction",
    "RingEvent",
    "RingMachine",
    "RingPhase",
    "RingRefused",
]

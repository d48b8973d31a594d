"""The ring phase machine (server/rings.py) alone: every transition, refused ones included; kicks held,
served or ignored; the back-end calls it says follow. No sockets, no loop, no guest memory."""

from __future__ import annotations

import itertools

import pytest

from vhost_iommu.server.rings import (
    BackendCall,
    KickAction,
    RingEvent,
    RingMachine,
    RingPhase,
    RingRefused,
)

IDLE = RingPhase.STOPPED_DISABLED
READY = RingPhase.STOPPED_ENABLED
PAUSED = RingPhase.STARTED_DISABLED
RUNNING = RingPhase.STARTED_ENABLED

# Written out here from vhost-user.rst's "Ring states", not read from the module's table: a change to one
# must be a change to the other. None: the request is refused in that phase.
EXPECTED: dict[tuple[RingPhase, RingEvent], RingPhase | None] = {
    (IDLE, RingEvent.CONFIGURE): IDLE,
    (READY, RingEvent.CONFIGURE): READY,
    (PAUSED, RingEvent.CONFIGURE): None,
    (RUNNING, RingEvent.CONFIGURE): None,
    (IDLE, RingEvent.START): PAUSED,
    (READY, RingEvent.START): RUNNING,
    (PAUSED, RingEvent.START): PAUSED,
    (RUNNING, RingEvent.START): RUNNING,
    (IDLE, RingEvent.STOP): IDLE,
    (READY, RingEvent.STOP): READY,
    (PAUSED, RingEvent.STOP): IDLE,
    (RUNNING, RingEvent.STOP): READY,
    (IDLE, RingEvent.ENABLE): READY,
    (READY, RingEvent.ENABLE): READY,
    (PAUSED, RingEvent.ENABLE): RUNNING,
    (RUNNING, RingEvent.ENABLE): RUNNING,
    (IDLE, RingEvent.DISABLE): IDLE,
    (READY, RingEvent.DISABLE): IDLE,
    (PAUSED, RingEvent.DISABLE): PAUSED,
    (RUNNING, RingEvent.DISABLE): PAUSED,
}


def test_the_expectation_names_every_phase_and_event() -> None:
    assert set(EXPECTED) == set(itertools.product(RingPhase, RingEvent))


@pytest.mark.parametrize(
    ("phase", "event"), sorted(EXPECTED, key=lambda pair: (pair[0].value, pair[1].value))
)
def test_transition(phase: RingPhase, event: RingEvent) -> None:
    ring = RingMachine(phase=phase)
    target = EXPECTED[(phase, event)]
    assert ring.may(event) is (target is not None)
    if target is None:
        with pytest.raises(RingRefused, match=event.value):
            ring.apply(event)
        assert ring.phase is phase  # a refused request changes nothing
    else:
        ring.apply(event)
        assert ring.phase is target
        assert ring.phase.started is (target in (PAUSED, RUNNING))
        assert ring.phase.enabled is (target in (READY, RUNNING))


@pytest.mark.parametrize(
    ("phase", "action"),
    [
        (IDLE, KickAction.IGNORE),
        (READY, KickAction.IGNORE),
        (PAUSED, KickAction.HOLD),
        (RUNNING, KickAction.SERVE),
    ],
)
def test_a_kick_is_served_held_or_ignored_by_phase(phase: RingPhase, action: KickAction) -> None:
    ring = RingMachine(phase=phase)
    assert ring.kick(device_usable=True) is action
    assert ring.kick_held is (action is KickAction.HOLD)


@pytest.mark.parametrize("phase", list(RingPhase))
def test_a_kick_on_a_broken_device_is_ignored(phase: RingPhase) -> None:
    ring = RingMachine(phase=phase)
    assert ring.kick(device_usable=False) is KickAction.IGNORE
    assert not ring.kick_held


def test_a_ring_is_served_once_started_and_enabled_in_either_order() -> None:
    for first, second in ((RingEvent.START, RingEvent.ENABLE), (RingEvent.ENABLE, RingEvent.START)):
        ring = RingMachine()
        ring.apply(first)
        assert ring.sync(device_usable=True) is None
        ring.apply(second)
        assert ring.sync(device_usable=True) is BackendCall.QUEUE_STARTED
        assert ring.served
        assert ring.sync(device_usable=True) is None  # told once


def test_disabling_a_served_ring_stops_serving_it() -> None:
    ring = RingMachine(phase=RUNNING)
    assert ring.sync(device_usable=True) is BackendCall.QUEUE_STARTED
    ring.apply(RingEvent.DISABLE)
    assert ring.sync(device_usable=True) is BackendCall.QUEUE_STOPPED
    assert not ring.served
    assert ring.sync(device_usable=True) is None


def test_a_broken_device_stops_serving_and_a_usable_one_resumes() -> None:
    ring = RingMachine(phase=RUNNING)
    assert ring.sync(device_usable=True) is BackendCall.QUEUE_STARTED
    assert not ring.serving(device_usable=False)
    assert ring.sync(device_usable=False) is BackendCall.QUEUE_STOPPED
    assert ring.sync(device_usable=True) is BackendCall.QUEUE_STARTED


def test_a_kick_held_while_disabled_is_delivered_once_the_ring_is_served() -> None:
    ring = RingMachine(phase=PAUSED)
    assert ring.kick(device_usable=True) is KickAction.HOLD
    assert ring.take_held_kick(device_usable=True) is None  # still disabled
    ring.apply(RingEvent.ENABLE)
    assert ring.take_held_kick(device_usable=False) is None  # not on a broken device
    assert ring.take_held_kick(device_usable=True) is BackendCall.QUEUE_KICKED
    assert not ring.kick_held
    assert ring.take_held_kick(device_usable=True) is None  # delivered once


def test_a_kick_given_back_by_the_back_end_is_looked_at_again() -> None:
    ring = RingMachine(phase=RUNNING)
    ring.hold_kick()
    assert ring.take_held_kick(device_usable=True) is BackendCall.QUEUE_KICKED


def test_stopping_a_served_ring_tells_the_back_end_and_drops_a_held_kick() -> None:
    ring = RingMachine(phase=RUNNING)
    assert ring.sync(device_usable=True) is BackendCall.QUEUE_STARTED
    ring.hold_kick()
    assert ring.stopping() is BackendCall.QUEUE_STOPPED
    assert not ring.kick_held
    ring.apply(RingEvent.STOP)
    assert ring.phase is READY
    assert ring.stopping() is None  # not served any more: nothing to tell
    assert ring.sync(device_usable=True) is None


def test_a_stop_drops_a_kick_held_while_disabled() -> None:
    ring = RingMachine(phase=PAUSED)
    ring.kick(device_usable=True)
    ring.apply(RingEvent.STOP)
    assert not ring.kick_held
    ring.apply(RingEvent.ENABLE)
    ring.apply(RingEvent.START)
    assert ring.sync(device_usable=True) is BackendCall.QUEUE_STARTED
    assert ring.take_held_kick(device_usable=True) is None

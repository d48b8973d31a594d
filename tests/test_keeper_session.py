"""The session a device worker exports for the next one: round trips and hostile encodings.

The in-process half of serve --state-dir (tests/test_keeper.py runs the whole program): a handler's
session exported after a real front-end set it up, taken over by a second handler on the same memory, and
every malformed or oversized encoding refused with SessionError.
"""

from __future__ import annotations

import itertools
import json
import os

import pytest

from vhost_iommu.harness.driver_queue import DriverQueue
from vhost_iommu.harness.echo import EchoBackend
from vhost_iommu.harness.frontend import region_of
from vhost_iommu.harness.guest_ram import GuestRam
from vhost_iommu.protocol import (
    U64,
    VERSION,
    ConfigSpace,
    FrontendRequest,
    Message,
    Payload,
    SingleMemoryRegion,
    VringAddress,
    VringFile,
    VringState,
)
from vhost_iommu.protocol.constants import CONFIG_FLAG_WRITABLE
from vhost_iommu.server import OFFERED_PROTOCOL_FEATURES, ConnectionHandler, new_event_loop
from vhost_iommu.server.session import (
    MAX_CONFIG_WRITES,
    MAX_SESSION_BYTES,
    RegionState,
    RingState,
    SessionError,
    SessionState,
)

SAMPLE = SessionState(
    acked_features=(1 << 32) | (1 << 30),
    protocol_features=0x3F,
    owner=True,
    status=0x0B,
    broken_reason=None,
    config_change_pending=True,
    config_writes=((36, b"\x00"), (0, b"abcd")),
    regions=(RegionState(0, 1 << 20, 0x7F00_0000_0000, 0, 4),),
    channel=1,
    rings=(
        RingState(
            size=64,
            address=(0, 0x7F00_0000_0000, 0x7F00_0000_1000, 0x7F00_0000_0800, 0),
            base=3,
            enabled=True,
            started=True,
            kick=7,
            call=8,
            err=9,
        ),
        RingState(size=64, base=0, stopped_layout=(64, 5, (0, 1, 2, 3, 0))),
    ),
)


def test_a_session_survives_its_encoding() -> None:
    assert SessionState.decode(SAMPLE.encode()) == SAMPLE
    assert SAMPLE.fd_ids() == [4, 1, 7, 8, 9]


def _mutated(**changes: object) -> bytes:
    document = json.loads(SAMPLE.encode())
    document.update(changes)
    return json.dumps(document).encode()


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not json",
        b"[]",
        b"{}",
        _mutated(version=2),
        _mutated(acked_features=-1),
        _mutated(acked_features=1 << 64),
        _mutated(status=256),
        _mutated(owner=1),
        _mutated(broken_reason=5),
        _mutated(channel="3"),
        _mutated(channel=-1),
        _mutated(regions=[[0, 1, 2, 3]]),
        _mutated(regions=[[0, 1, 2, 3, True]]),
        _mutated(regions=[[0, 1, 2, 3, 4]] * 129),
        _mutated(config_writes=[[0, "zz"]]),
        _mutated(config_writes=[[0, "00"]] * (MAX_CONFIG_WRITES + 1)),
        _mutated(rings=[{"size": 1 << 20}]),
        _mutated(rings=[{"base": 1 << 16}]),
        _mutated(rings=[{"address": [1, 2, 3]}]),
        _mutated(rings=[{"stopped_layout": [64, 0]}]),
        _mutated(rings=[{"kick": 1.5}]),
        _mutated(rings=["ring"]),
        _mutated(rings=[{}] * 65),
        b"[" * 100000 + b"]" * 100000,
        b" " * (MAX_SESSION_BYTES + 1),
    ],
)
def test_a_malformed_session_is_refused(data: bytes) -> None:
    with pytest.raises(SessionError):
        SessionState.decode(data)


class Restorable(EchoBackend):
    """The echo device with the RestorableBackend hooks, recording where each ring stands at them."""

    def session_restored(self) -> None:
        self._record("session_restored")

    def queue_restored(self, index: int) -> None:
        assert self.context is not None
        queue = self.context.queue(index)
        assert queue is not None
        self._record(f"queue_restored next_avail={queue.next_avail}", index)


@pytest.mark.usefixtures("fd_leak_check")
def test_a_session_taken_over_by_a_second_handler_calls_the_backend_in_order() -> None:
    loop = new_event_loop()
    ram = GuestRam(1 << 20)
    queues = [DriverQueue(ram, 64), DriverQueue(ram, 64)]
    replies: list[bytes] = []
    first = ConnectionHandler(EchoBackend(), loop, replies.append, session_key="conn-1")
    ids: dict[int, int] = {}  # fd number -> id, as the keeper numbers them: each fd a new id
    numbers = itertools.count(1)
    region_ids: dict[tuple[int, int], int] = {}

    def send(code: FrontendRequest, payload: Payload, fds: tuple[int, ...] = ()) -> None:
        for fd in fds:
            ids[fd] = next(numbers)
        first.handle(Message(code, VERSION, payload, fds))

    try:
        send(FrontendRequest.SET_FEATURES, U64(first.offered_features()))
        send(FrontendRequest.SET_PROTOCOL_FEATURES, U64(int(OFFERED_PROTOCOL_FEATURES)))
        region = region_of(ram)
        memfd = ram.dup_fd()
        send(FrontendRequest.ADD_MEM_REG, SingleMemoryRegion(region), (memfd,))
        memfd_id = ids.pop(memfd)  # mapped and closed: its number is free for the fds that follow
        region_ids[(region.guest_phys_addr, region.memory_size)] = memfd_id
        for index, queue in enumerate(queues):
            send(FrontendRequest.SET_VRING_NUM, VringState(index, queue.size))
            address = VringAddress(index, 0, queue.desc_uva, queue.used_uva, queue.avail_uva, 0)
            send(FrontendRequest.SET_VRING_ADDR, address)
            send(FrontendRequest.SET_VRING_KICK, VringFile(index, True), (os.eventfd(0, os.EFD_NONBLOCK),))
            send(FrontendRequest.SET_VRING_CALL, VringFile(index, True), (os.eventfd(0, os.EFD_NONBLOCK),))
            send(FrontendRequest.SET_VRING_ENABLE, VringState(index, 1))
        send(FrontendRequest.SET_CONFIG, ConfigSpace(0, CONFIG_FLAG_WRITABLE, b"AB"))
        served = queues[0].post([b"served"], [6])
        first.backend.queue_kicked(0)
        assert queues[0].used() == [(served, 6)]
        waiting = queues[0].post([b"waiting"], [7])  # made available after the last kick was served

        state = first.export_session(ids.get, lambda d: region_ids.get((d.guest_phys_addr, d.memory_size)))
        assert SessionState.decode(state.encode()) == state
        dups = {fd_id: os.dup(fd) for fd, fd_id in ids.items() if fd_id in state.fd_ids()}
        dups[memfd_id] = ram.dup_fd()
        second_backend = Restorable()
        second = ConnectionHandler(second_backend, loop, replies.append, session_key="conn-1")
        try:
            second.restore_session(state, dups)
            assert second_backend.events_snapshot() == [
                ("set_features", -1),
                ("set_config", 0),
                ("memory_changed", -1),
                ("session_restored", -1),
                ("queue_restored next_avail=1", 0),  # the used index: one chain was completed
                ("queue_restored next_avail=0", 1),
                ("queue_started", 0),
                ("queue_started", 1),
                ("queue_kicked", 0),
                ("queue_kicked", 1),
            ]
            assert queues[0].used() == [(waiting, 7)]  # served by the second, once
            assert queues[0].written(waiting) == b"waiting"
            assert second_backend.config[:2] == b"AB"
            assert (
                second.export_session({fd: i for i, fd in dups.items()}.get, lambda d: ids[memfd]).rings
                == state.rings
            )
            assert replies == []
        finally:
            second.close()
    finally:
        first.close()
        ram.close()
        loop.close()

"""Ring states (vhost-user.rst "Ring states"), NEEDS_RESET, resets, connections that must not interfere."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest

from vhost_iommu.abi import VIRTQ_DESC_F_NEXT
from vhost_iommu.backend import VhostUserBackend
from vhost_iommu.harness.background import RunningServer
from vhost_iommu.harness.driver_queue import DriverQueue
from vhost_iommu.harness.echo import EchoBackend
from vhost_iommu.harness.frontend import Frontend
from vhost_iommu.harness.guest_ram import GuestRam
from vhost_iommu.protocol import VHOST_USER_F_PROTOCOL_FEATURES, VIRTIO_CONFIG_S_NEEDS_RESET

pytestmark = pytest.mark.usefixtures("fd_leak_check")

#: How long to wait for something that must NOT happen (a notification on a ring that is not served).
QUIET_PERIOD = 0.3


@pytest.fixture
def ram() -> Iterator[GuestRam]:
    with GuestRam(1 << 20) as guest_ram:
        yield guest_ram


def two_queues(ram: GuestRam) -> list[DriverQueue]:
    # Made inside each test, not as a fixture: pytest would keep the ring views (and so the RAM's mapping
    # and its fd) alive until after the fd-leak check.
    return [DriverQueue(ram, 16), DriverQueue(ram, 16)]


def echo_backend(server: RunningServer, connection: int = 0) -> EchoBackend:
    backend = server.backends[connection]
    assert isinstance(backend, EchoBackend)
    return backend


def configure_rings(frontend: Frontend, ram: GuestRam, queues: list[DriverQueue], *, features: int) -> None:
    """Everything QEMU does up to SET_VRING_KICK/CALL, but no SET_VRING_ENABLE."""
    frontend.set_features(features)
    frontend.set_mem_table([ram])
    for index, queue in enumerate(queues):
        frontend.set_vring_num(index, queue.size)
        frontend.set_vring_base(index, 0)
        frontend.set_vring_addr(index, queue)
        frontend.set_vring_kick(index)
        frontend.set_vring_call(index)


def post_and_kick(frontend: Frontend, queue: DriverQueue, index: int, data: bytes) -> int:
    head = queue.post([data], [len(data)])
    frontend.kick(index)
    return head


def test_kick_on_a_disabled_ring_is_held_and_served_on_enable(
    frontend: Frontend, ram: GuestRam, vhost_server: RunningServer
) -> None:
    queues = two_queues(ram)
    frontend.negotiate(2)
    configure_rings(frontend, ram, queues, features=VHOST_USER_F_PROTOCOL_FEATURES)
    head = post_and_kick(frontend, queues[0], 0, b"early")
    assert not frontend.wait_used(0, timeout=QUIET_PERIOD)
    assert queues[0].used() == []
    frontend.set_vring_enable(0, True)
    assert frontend.wait_used(0, timeout=5)
    assert queues[0].used_with_data() == [(head, 5, b"early")]
    assert ("queue_started", 0) in echo_backend(vhost_server).events_snapshot()


def test_rings_start_enabled_without_protocol_features(frontend: Frontend, ram: GuestRam) -> None:
    queues = two_queues(ram)
    frontend.get_features()
    configure_rings(frontend, ram, queues, features=0)
    frontend.get_features()  # without REPLY_ACK, QEMU's way of waiting until the back-end caught up
    head = post_and_kick(frontend, queues[1], 1, b"no enable needed")
    assert frontend.wait_used(1, timeout=5)
    assert queues[1].used() == [(head, 16)]


def test_get_vring_base_stops_the_ring_and_reports_next_avail(
    frontend: Frontend, ram: GuestRam, vhost_server: RunningServer
) -> None:
    queues = two_queues(ram)
    frontend.start_device(ram, queues)
    for round_number in range(3):
        post_and_kick(frontend, queues[0], 0, bytes([round_number]))
        assert frontend.wait_used(0, timeout=5)
        queues[0].used()
    assert frontend.get_vring_base(0) == 3
    assert ("queue_stopped", 0) in echo_backend(vhost_server).events_snapshot()

    # Stopped: buffers made available now are not touched.
    head = queues[0].post([b"while stopped"], [16])
    assert not frontend.wait_used(0, timeout=QUIET_PERIOD)
    assert queues[0].used() == []

    # Restarted where it stopped, it serves what is waiting.
    frontend.set_vring_base(0, 3)
    frontend.set_vring_kick(0)
    assert frontend.wait_used(0, timeout=5)
    assert queues[0].used_with_data() == [(head, 13, b"while stopped")]
    assert frontend.get_vring_base(0) == 4


def test_get_vring_base_of_a_ring_never_started_returns_its_base(frontend: Frontend) -> None:
    frontend.negotiate(2)
    frontend.set_vring_base(1, 0x1234)
    assert frontend.get_vring_base(1) == 0x1234


def test_disable_stops_serving_and_enable_resumes(
    frontend: Frontend, ram: GuestRam, vhost_server: RunningServer
) -> None:
    queues = two_queues(ram)
    frontend.start_device(ram, queues)
    frontend.set_vring_enable(0, False)
    assert echo_backend(vhost_server).events_snapshot()[-1] == ("queue_stopped", 0)
    head = post_and_kick(frontend, queues[0], 0, b"held")
    assert not frontend.wait_used(0, timeout=QUIET_PERIOD)
    frontend.set_vring_enable(0, True)
    assert frontend.wait_used(0, timeout=5)
    assert queues[0].used() == [(head, 4)]


def test_new_call_fd_replaces_the_old_one(frontend: Frontend, ram: GuestRam) -> None:
    queues = two_queues(ram)
    frontend.start_device(ram, queues)
    old_call = frontend.call_fds.pop(0)
    try:
        frontend.set_vring_call(0)  # a fresh eventfd
        post_and_kick(frontend, queues[0], 0, b"x")
        assert frontend.wait_used(0, timeout=5)
        with pytest.raises(BlockingIOError):
            os.eventfd_read(old_call)  # never written: the server let go of it
    finally:
        os.close(old_call)


def test_call_fd_removed_with_the_no_fd_bit(frontend: Frontend, ram: GuestRam) -> None:
    queues = two_queues(ram)
    frontend.start_device(ram, queues)
    frontend.set_vring_call(0, with_fd=False)
    first = post_and_kick(frontend, queues[0], 0, b"silent")
    assert not frontend.wait_used(0, timeout=QUIET_PERIOD)
    # Served all the same, only not notified: a second chain with a call fd back shows both.
    frontend.set_vring_call(0)
    second = post_and_kick(frontend, queues[0], 0, b"loud")
    assert frontend.wait_used(0, timeout=5)
    assert queues[0].used() == [(first, 6), (second, 4)]


# -- NEEDS_RESET -------------------------------------------------------------------------------------------


def make_descriptor_loop(queue: DriverQueue) -> None:
    """A chain whose descriptor points at itself: the ring layer must refuse it."""
    buffer = queue.alloc_buffer(b"loop")
    queue.write_desc(0, buffer, 4, VIRTQ_DESC_F_NEXT, 0)
    queue.make_available(0)


def test_bad_chain_breaks_that_device_only(vhost_server: RunningServer) -> None:
    bystander_socket = vhost_server.listen()  # a guest of its own: a socket serves one front-end at a time
    with (
        vhost_server.connect() as victim,
        vhost_server.connect(path=bystander_socket) as bystander,
        GuestRam(1 << 20) as victim_ram,
        GuestRam(1 << 20) as bystander_ram,
    ):
        victim_queues = [DriverQueue(victim_ram, 16), DriverQueue(victim_ram, 16)]
        bystander_queues = [DriverQueue(bystander_ram, 16), DriverQueue(bystander_ram, 16)]
        victim.start_device(victim_ram, victim_queues)
        bystander.start_device(bystander_ram, bystander_queues)

        make_descriptor_loop(victim_queues[0])
        victim.kick(0)
        assert victim.wait_error(0, timeout=5)
        assert victim.wait_error(1, timeout=5)
        assert victim.get_status() & VIRTIO_CONFIG_S_NEEDS_RESET
        assert victim.wait_config_changes(1, timeout=5)

        # The broken device serves no ring any more, but still answers the protocol.
        post_and_kick(victim, victim_queues[1], 1, b"ignored")
        assert not victim.wait_used(1, timeout=QUIET_PERIOD)
        assert victim.get_queue_num() == 2

        # The other connection is untouched.
        head = post_and_kick(bystander, bystander_queues[0], 0, b"fine")
        assert bystander.wait_used(0, timeout=5)
        assert bystander_queues[0].used() == [(head, 4)]
        assert not bystander.get_status() & VIRTIO_CONFIG_S_NEEDS_RESET

        # A device reset clears NEEDS_RESET and the device can be started again.
        victim.stop_device(2)
        victim.reset_device()
        assert victim.get_status() == 0
        fresh = [DriverQueue(victim_ram, 16), DriverQueue(victim_ram, 16)]
        victim.start_rings(victim_ram, fresh, driver_features=0, use_mem_slots=False)
        head = post_and_kick(victim, fresh[0], 0, b"alive")
        assert victim.wait_used(0, timeout=5)
        assert fresh[0].used() == [(head, 5)]


def test_status_zero_resets_the_device(
    frontend: Frontend, ram: GuestRam, vhost_server: RunningServer
) -> None:
    queues = two_queues(ram)
    frontend.start_device(ram, queues)
    frontend.set_config(0, b"CHANGED!")
    frontend.stop_device(2)
    assert frontend.get_status() == 0
    assert frontend.get_config(0, 8) == b"ECHOECHO"
    assert ("reset", -1) in echo_backend(vhost_server).events_snapshot()


# -- connections -------------------------------------------------------------------------------------------


def test_a_new_connection_gets_fresh_state(vhost_server: RunningServer, ram: GuestRam) -> None:
    with vhost_server.connect() as first:
        first.start_device(ram, [DriverQueue(ram, 16), DriverQueue(ram, 16)])
        first.set_config(0, b"12345678")
        assert first.get_status() == 0x08
    vhost_server.wait_all_closed(timeout=5)
    assert ("reset", -1) in echo_backend(vhost_server, 0).events_snapshot()
    with vhost_server.connect() as second:
        second.negotiate(2)
        assert second.get_status() == 0
        assert second.get_config(0, 8) == b"ECHOECHO"
        queues = [DriverQueue(ram, 16), DriverQueue(ram, 16)]
        second.start_rings(ram, queues, driver_features=0)
        head = post_and_kick(second, queues[0], 0, b"again")
        assert second.wait_used(0, timeout=5)
        assert queues[0].used() == [(head, 5)]
    assert len(vhost_server.backends) == 2


def test_concurrent_connections_do_not_disturb_each_other(vhost_server: RunningServer) -> None:
    rams = [GuestRam(1 << 20) for _ in range(3)]
    # Three guests, three sockets of one server (a socket serves one front-end at a time).
    paths = [vhost_server.path, vhost_server.listen(), vhost_server.listen()]
    frontends = [vhost_server.connect(path=path) for path in paths]
    try:
        all_queues = [[DriverQueue(ram, 16), DriverQueue(ram, 16)] for ram in rams]
        for frontend, ram, queues in zip(frontends, rams, all_queues, strict=True):
            frontend.start_device(ram, queues)
        for round_number in range(10):
            heads = []
            for number, (frontend, queues) in enumerate(zip(frontends, all_queues, strict=True)):
                heads.append(
                    post_and_kick(frontend, queues[round_number % 2], round_number % 2, bytes([number]))
                )
            for number, (frontend, queues) in enumerate(zip(frontends, all_queues, strict=True)):
                assert frontend.wait_used(round_number % 2, timeout=5)
                assert queues[round_number % 2].used_with_data() == [(heads[number], 1, bytes([number]))]
    finally:
        for frontend in frontends:
            frontend.close()
        for ram in rams:
            ram.close()


class ExplodingBackend(EchoBackend):
    """A back-end with a bug: every kick raises."""

    def queue_kicked(self, index: int) -> None:
        raise RuntimeError("bug in the back-end")


@pytest.mark.parametrize("backend_factory", [ExplodingBackend])
def test_a_backend_bug_closes_only_its_connection(
    vhost_server: RunningServer, backend_factory: Callable[[], VhostUserBackend]
) -> None:
    with vhost_server.connect() as doomed, GuestRam(1 << 20) as ram:
        queues = [DriverQueue(ram, 16), DriverQueue(ram, 16)]
        doomed.start_device(ram, queues)
        post_and_kick(doomed, queues[0], 0, b"boom")
        assert doomed.wait_disconnected(timeout=5)
    with vhost_server.connect() as survivor:
        assert survivor.get_queue_num() == 2


class HoldingBackend(EchoBackend):
    """Keeps every chain it pops (as the eventq keeps buffers for future events) until its ring stops."""

    def __init__(self) -> None:
        super().__init__()
        self.held: dict[int, list[int]] = {0: [], 1: []}

    def _drain(self, index: int) -> None:
        assert self.context is not None
        queue = self.context.queue(index)
        while queue is not None and (chain := queue.pop()) is not None:
            self.held[index].append(chain.head)

    def queue_stopped(self, index: int) -> None:
        super().queue_stopped(index)
        assert self.context is not None
        queue = self.context.queue(index)
        assert queue is not None, "the ring must still be bound while queue_stopped runs"
        for head in self.held[index]:
            queue.push_used(head, 0)
        self.held[index].clear()


@pytest.mark.parametrize("backend_factory", [HoldingBackend])
def test_a_backend_returns_held_chains_before_get_vring_base_answers(
    frontend: Frontend, ram: GuestRam, backend_factory: Callable[[], VhostUserBackend]
) -> None:
    queues = two_queues(ram)
    frontend.start_device(ram, queues)
    heads = [queues[1].post([b"event buffer"], [8]) for _ in range(3)]
    frontend.kick(1)
    assert not frontend.wait_used(1, timeout=QUIET_PERIOD)  # held, not returned
    assert frontend.get_vring_base(1) == 3
    assert queues[1].used() == [(head, 0) for head in heads]


def test_new_memory_table_while_running_keeps_the_rings_served(frontend: Frontend, ram: GuestRam) -> None:
    queues = two_queues(ram)
    frontend.start_device(ram, queues)  # memory by ADD_MEM_REG
    with GuestRam(1 << 16, gpa_base=1 << 32) as extra:
        frontend.set_mem_table([ram, extra])
        head = post_and_kick(frontend, queues[0], 0, b"after the new table")
        assert frontend.wait_used(0, timeout=5)
        assert queues[0].used() == [(head, 19)]


def test_removing_the_memory_under_a_running_ring_needs_reset(frontend: Frontend, ram: GuestRam) -> None:
    queues = two_queues(ram)
    frontend.start_device(ram, queues)
    frontend.rem_mem_reg(ram)
    assert frontend.get_status() & VIRTIO_CONFIG_S_NEEDS_RESET
    assert frontend.wait_error(0, timeout=5)

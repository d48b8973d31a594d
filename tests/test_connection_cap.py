"""One front-end per socket: a second concurrent connection is refused at once, the first is not disturbed,
and the socket takes the next front-end as soon as the first has gone."""

from __future__ import annotations

import logging
import socket
import tempfile
import threading

import pytest

from vhost_iommu.harness.background import RunningServer
from vhost_iommu.harness.driver_queue import DriverQueue
from vhost_iommu.harness.frontend import Frontend
from vhost_iommu.harness.guest_ram import GuestRam
from vhost_iommu.harness.keeper_process import KeeperProcess
from vhost_iommu.protocol import FrontendRequest, VringState, encode

pytestmark = pytest.mark.usefixtures("fd_leak_check")


def refused(path: str) -> bool:
    """Connect and see the server close the connection without a word (end of file)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(path)
        try:
            return sock.recv(1) == b""
        except ConnectionResetError:
            return True


def test_a_second_front_end_is_refused_and_the_first_goes_on(
    vhost_server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    with vhost_server.connect() as first, GuestRam(1 << 20) as ram:
        queues = [DriverQueue(ram, 16), DriverQueue(ram, 16)]
        first.start_device(ram, queues)
        with caplog.at_level(logging.WARNING, logger="vhost_iommu.server"):
            assert refused(vhost_server.path)
            # A refused front-end that sends something before it notices changes nothing either.
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as second:
                second.settimeout(5)
                second.connect(vhost_server.path)
                with pytest.raises((BrokenPipeError, ConnectionResetError)):
                    for _ in range(64):  # until the server's close reaches us
                        second.sendall(b"\x01\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00")
                        second.recv(1)
        assert "refused a second front-end while connection 1 is connected" in caplog.text
        # The first front-end's connection, device and rings are untouched.
        assert len(vhost_server.backends) == 1 and vhost_server.connection_count() == 1
        head = queues[0].post([b"still here"], [16])
        first.kick(0)
        assert first.wait_used(0, timeout=5)
        assert queues[0].used() == [(head, 10)]
        assert first.get_queue_num() == 2


def test_reconnecting_at_once_after_a_disconnect_works(vhost_server: RunningServer) -> None:
    # No waiting for the server to notice each hang-up: a front-end that goes and comes straight back
    # (QEMU after a back-end restart of its own, a test's next case) is let in every time.
    for _ in range(20):
        with vhost_server.connect() as frontend:
            frontend.negotiate(2)
            assert frontend.get_queue_num() == 2
    assert len(vhost_server.backends) == 20


def test_a_front_end_that_hung_up_mid_message_does_not_block_the_socket(vhost_server: RunningServer) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as gone:
        gone.connect(vhost_server.path)
        gone.sendall(b"\x01\x00\x00\x00\x01")  # half a header, then gone
    with vhost_server.connect() as frontend:
        assert frontend.get_queue_num() == 2


def test_other_sockets_of_the_process_take_other_front_ends(vhost_server: RunningServer) -> None:
    second_socket = vhost_server.listen()
    with vhost_server.connect() as first, vhost_server.connect(path=second_socket) as second:
        first.negotiate(2)
        second.negotiate(2)
        assert refused(vhost_server.path) and refused(second_socket)
        assert vhost_server.connection_count() == 2
        assert first.get_queue_num() == 2 and second.get_queue_num() == 2


def test_a_front_end_back_before_the_server_saw_it_leave_is_let_in(vhost_server: RunningServer) -> None:
    # The server's loop is held while the front-end sends a burst, leaves and comes back, so that it
    # finds the new connection waiting while the old one's last messages and hang-up are still unread
    # (a connection reads a bounded number of messages per wake-up).
    release = threading.Event()
    holding = threading.Event()

    def hold() -> None:
        holding.set()
        release.wait(10)

    first = vhost_server.connect()
    first.negotiate(2)
    vhost_server.loop.call_soon_threadsafe(hold)
    try:
        assert holding.wait(5)
        burst = encode(FrontendRequest.SET_VRING_ENABLE, VringState(0, 1)) * 300  # no replies
        first.send(burst)
        first.close()
        second = vhost_server.connect()  # queued by the kernel; the server has not accepted it yet
    finally:
        release.set()
    with second:
        assert second.get_queue_num() == 2


def test_the_keeper_serves_one_front_end_per_socket_too() -> None:
    # serve --state-dir: the keeper process accepts QEMU's connections instead of the server.
    with tempfile.TemporaryDirectory(prefix="vhost-cap-") as directory:
        keeper = KeeperProcess(directory)
        try:
            with Frontend.connect(keeper.socket, timeout=keeper.timeout) as first:
                first.negotiate(2)
                assert refused(keeper.socket)
                keeper.wait_for("refused a second front-end while connection 1 is connected")
                assert first.get_queue_num() == 2
            for _ in range(3):  # back at once, each time
                with Frontend.connect(keeper.socket, timeout=keeper.timeout) as again:
                    assert again.get_queue_num() == 2
            assert keeper.terminate() == 0
        finally:
            keeper.close()

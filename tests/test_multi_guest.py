"""One back-end process, several guests: ``--socket-count``/repeated ``--socket-path``, per-guest devices and
limits, isolation of one guest's failures, clean shutdown, and who may reach the sockets.

Every test runs the real program (``python -m vhost_iommu``) and plays its guests with harness front-ends;
the control channel shows the device state the wire cannot.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence

import pytest

from vhost_iommu.control.client import ControlClient
from vhost_iommu.device.layout import Status, encode_attach, encode_detach, encode_map, encode_unmap
from vhost_iommu.device.topology import Topology
from vhost_iommu.harness.echo import EchoBackend
from vhost_iommu.harness.frontend import Frontend
from vhost_iommu.harness.iommu_driver import IommuDriver
from vhost_iommu.protocol import VIRTIO_CONFIG_S_NEEDS_RESET
from vhost_iommu.server import VhostUserServer, create_unix_listener
from vhost_iommu.virtqueue import VIRTQ_DESC_F_NEXT

pytestmark = pytest.mark.usefixtures("fd_leak_check")
STARTUP_TIMEOUT = 30.0  # a fresh interpreter importing numpy and numba on a loaded 2-core machine
REPLY_TIMEOUT = 10.0
ENDPOINT = 0x20  # 00:04.0, the first endpoint of the default topology
OTHER_ENDPOINT = 0x28  # 00:05.0


class Program:
    """``vhost-iommu`` serving several sockets and a control socket in ``directory``."""

    def __init__(self, directory: str, args: Sequence[str], *, umask: int = 0o022) -> None:
        self.control = os.path.join(directory, "ctl")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "vhost_iommu", "-v", f"--control-socket={self.control}", *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            umask=umask,
        )
        self.log = ""
        self._wait_for("listening on")

    def _wait_for(self, text: str) -> None:
        # The program says when every socket is ready; read the fd itself so select() sees every byte.
        import select

        assert self.process.stderr is not None
        fd = self.process.stderr.fileno()
        while text not in self.log:
            ready, _, _ = select.select([fd], [], [], STARTUP_TIMEOUT)
            assert ready, f"no {text!r} within {STARTUP_TIMEOUT}s: {self.log!r}"
            chunk = os.read(fd, 4096)
            assert chunk, f"the program ended before saying {text!r}: {self.log!r}"
            self.log += chunk.decode(errors="replace")

    def terminate(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=10)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        assert self.process.stderr is not None
        self.process.stderr.close()


@pytest.fixture
def directory() -> Iterator[str]:
    # Short: unix socket paths are limited to 108 bytes.
    with tempfile.TemporaryDirectory(prefix="vhost-mg-") as path:
        yield path


def serve(directory: str, *args: str, count: int = 2) -> Program:
    return Program(directory, [f"--socket-path={directory}/viommu.sock", f"--socket-count={count}", *args])


def guest_on(path: str) -> IommuDriver:
    """A driver on one socket: its own RAM, rings started, requests answered one at a time."""
    return IommuDriver.connect(path, timeout=REPLY_TIMEOUT)


def connections(program: Program) -> list[dict[str, object]]:
    with ControlClient(program.control) as client:
        rows: list[dict[str, object]] = client.call("connections")
    return rows


def mapping_count(program: Program, connection: object) -> int:
    with ControlClient(program.control) as client:
        return len(client.call("mappings", connection=connection)["mappings"])


def number_on(program: Program, path: str) -> object:
    """The control channel's number of the one connection that came in on ``path``."""
    [row] = [row for row in connections(program) if str(row["name"]).endswith(f" on {path}")]
    return row["connection"]


# -- sockets ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("style", ["count", "repeated"])
def test_every_socket_is_served_0600_and_removed_on_sigterm(directory: str, style: str) -> None:
    paths = [f"{directory}/viommu.sock{index}" for index in range(3)]
    if style == "count":  # rust-vmm's convention: the prefix suffixed by 0 .. N-1
        args = [f"--socket-path={directory}/viommu.sock", "--socket-count=3"]
    else:
        args = [f"--socket-path={path}" for path in paths]
    program = Program(directory, args, umask=0)  # no help from the umask: the modes are the program's
    # The default topology's DMA engine listens beside the vhost-user sockets (its vfio-user socket).
    engine = os.path.join(directory, Topology.default().devices[0].socket)
    try:
        for path in [*paths, program.control, engine]:
            assert stat.S_ISSOCK(os.lstat(path).st_mode)
            assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600, path
        created = [*paths, program.control, engine]
        assert sorted(os.listdir(directory)) == sorted(os.path.basename(p) for p in created)
        guests = [guest_on(path) for path in paths]
        try:
            assert program.terminate() == 0
            for guest in guests:
                assert guest.frontend.wait_disconnected(timeout=REPLY_TIMEOUT)
        finally:
            for guest in guests:
                guest.close()
    finally:
        program.close()
    assert os.listdir(directory) == []


def test_connections_say_which_socket_they_came_from(directory: str) -> None:
    program = serve(directory)
    try:
        with guest_on(f"{directory}/viommu.sock1") as second, guest_on(f"{directory}/viommu.sock0") as first:
            assert first.status(encode_attach(1, ENDPOINT)) == Status.OK
            assert second.status(encode_attach(1, ENDPOINT)) == Status.OK
            names = sorted(str(row["name"]) for row in connections(program))
            assert names == [
                f"connection 1 on {directory}/viommu.sock1",
                f"connection 2 on {directory}/viommu.sock0",
            ]
    finally:
        assert program.terminate() == 0
        program.close()


# -- per-guest state and limits -----------------------------------------------------------------------------


def test_a_mapping_made_by_one_guest_is_not_seen_by_the_other(directory: str) -> None:
    program = serve(directory)
    try:
        with guest_on(f"{directory}/viommu.sock0") as one, guest_on(f"{directory}/viommu.sock1") as other:
            n_one = number_on(program, f"{directory}/viommu.sock0")
            n_other = number_on(program, f"{directory}/viommu.sock1")
            # The same domain number, endpoint and IOVA in both: on a shared device the second MAP would
            # overlap the first and be refused.
            for guest in (one, other):
                assert guest.status(encode_attach(1, ENDPOINT)) == Status.OK
                assert guest.status(encode_map(1, 0x10000, 0x1FFFF, 0x100000)) == Status.OK
            assert mapping_count(program, n_one) == 1 and mapping_count(program, n_other) == 1
            assert other.status(encode_unmap(1, 0x10000, 0x1FFFF)) == Status.OK
            assert mapping_count(program, n_one) == 1 and mapping_count(program, n_other) == 0
            assert other.status(encode_detach(1, ENDPOINT)) == Status.OK
            assert one.status(encode_map(1, 0x20000, 0x2FFFF, 0x200000)) == Status.OK  # still attached
            assert mapping_count(program, n_one) == 2
    finally:
        assert program.terminate() == 0
        program.close()


def test_limits_are_counted_per_guest(directory: str) -> None:
    program = serve(directory, "--max-domains=1", "--max-mappings=2")
    try:
        with guest_on(f"{directory}/viommu.sock0") as one, guest_on(f"{directory}/viommu.sock1") as other:
            assert one.status(encode_attach(1, ENDPOINT)) == Status.OK
            assert one.status(encode_attach(2, OTHER_ENDPOINT)) == Status.NOMEM  # a second domain
            assert other.status(encode_attach(2, ENDPOINT)) == Status.OK  # its own first domain
            for guest, domain in ((one, 1), (other, 2)):
                assert guest.status(encode_map(domain, 0x0000, 0x0FFF, 0x100000)) == Status.OK
                assert guest.status(encode_map(domain, 0x1000, 0x1FFF, 0x101000)) == Status.OK
            assert one.status(encode_map(1, 0x2000, 0x2FFF, 0x102000)) == Status.NOMEM
            assert other.status(encode_map(2, 0x2000, 0x2FFF, 0x102000)) == Status.NOMEM
            # Freeing one guest's room gives nothing to the other.
            assert one.status(encode_unmap(1, 0x0000, 0x0FFF)) == Status.OK
            assert other.status(encode_map(2, 0x2000, 0x2FFF, 0x102000)) == Status.NOMEM
            assert one.status(encode_map(1, 0x2000, 0x2FFF, 0x102000)) == Status.OK
    finally:
        assert program.terminate() == 0
        program.close()


def test_without_limits_a_guest_gets_the_device_defaults(directory: str) -> None:
    program = serve(directory, count=1)
    try:
        with guest_on(f"{directory}/viommu.sock0") as guest:
            for domain, endpoint in ((1, ENDPOINT), (2, OTHER_ENDPOINT)):
                assert guest.status(encode_attach(domain, endpoint)) == Status.OK
            for index in range(3):
                start = index << 12
                assert guest.status(encode_map(1, start, start + 0xFFF, 0x100000)) == Status.OK
    finally:
        assert program.terminate() == 0
        program.close()


# -- one guest's trouble stays its own ----------------------------------------------------------------------


def test_a_broken_ring_or_a_disconnect_leaves_the_other_guest_alone(directory: str) -> None:
    program = serve(directory)
    try:
        with guest_on(f"{directory}/viommu.sock1") as bystander:
            assert bystander.status(encode_attach(1, ENDPOINT)) == Status.OK
            with guest_on(f"{directory}/viommu.sock0") as victim:
                # A descriptor that chains to itself: the device must stop serving that guest only.
                queue = victim.queues[0]
                buffer = queue.alloc_buffer(b"loop")
                queue.write_desc(0, buffer, 4, VIRTQ_DESC_F_NEXT, 0)
                queue.make_available(0)
                victim.frontend.kick(0)
                assert victim.frontend.wait_error(0, timeout=REPLY_TIMEOUT)
                assert victim.frontend.get_status() & VIRTIO_CONFIG_S_NEEDS_RESET
                assert bystander.status(encode_map(1, 0, 0xFFF, 0x100000)) == Status.OK
                assert not bystander.frontend.get_status() & VIRTIO_CONFIG_S_NEEDS_RESET
            # The victim has gone; its socket takes the next guest with a fresh device.
            assert bystander.status(encode_map(1, 0x1000, 0x1FFF, 0x101000)) == Status.OK
            with guest_on(f"{directory}/viommu.sock0") as newcomer:
                assert newcomer.status(encode_map(1, 0, 0xFFF, 0)) == Status.NOENT  # no domain 1 here
                assert newcomer.status(encode_attach(1, ENDPOINT)) == Status.OK
            assert mapping_count(program, number_on(program, f"{directory}/viommu.sock1")) == 2
    finally:
        assert program.terminate() == 0
        program.close()


def test_a_stalled_front_end_does_not_hold_up_a_new_guest(directory: str) -> None:
    # Half a vhost-user header and then silence: the process must keep serving everyone else.
    program = serve(directory)
    stalled = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        stalled.connect(f"{directory}/viommu.sock1")
        stalled.sendall(b"\x01\x00\x00\x00\x01\x00")
        with guest_on(f"{directory}/viommu.sock0") as newcomer:
            assert newcomer.status(encode_attach(1, ENDPOINT)) == Status.OK
        # The stalled front-end still holds its socket (one front-end per socket): a second one there
        # is closed at once; once the stalled one has gone, the socket takes the next.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as second_on_same_socket:
            second_on_same_socket.connect(f"{directory}/viommu.sock1")
            second_on_same_socket.settimeout(REPLY_TIMEOUT)
            assert second_on_same_socket.recv(1) == b""
        stalled.close()
        with guest_on(f"{directory}/viommu.sock1") as after_it:
            assert after_it.status(encode_attach(1, ENDPOINT)) == Status.OK
    finally:
        stalled.close()
        assert program.terminate() == 0
        program.close()


def test_a_guest_is_served_while_another_floods_its_ring(directory: str) -> None:
    # Not the request path's fairness bound (its owner tests that): only that a guest keeping the
    # process busy with full rings does not keep the other guest's requests from being answered.
    program = serve(directory)
    stop = threading.Event()
    flooded: list[int] = []
    failure: list[BaseException] = []

    def flood(guest: IommuDriver) -> None:
        queue = guest.queues[0]
        try:
            while not stop.is_set():
                for index in range(16):  # 32 two-descriptor chains: the whole 64-entry ring
                    start = index << 12
                    queue.post([encode_map(1, start, start + 0xFFF, 0x100000)], [4])
                    queue.post([encode_unmap(1, start, start + 0xFFF)], [4])
                guest.frontend.kick(0)
                done = 0
                while done < 32:
                    assert guest.frontend.wait_used(0, timeout=REPLY_TIMEOUT)
                    done += len(queue.used())
                flooded.append(done)
        except BaseException as exc:
            failure.append(exc)

    try:
        with guest_on(f"{directory}/viommu.sock0") as flooder, guest_on(f"{directory}/viommu.sock1") as quiet:
            assert flooder.status(encode_attach(1, ENDPOINT)) == Status.OK
            thread = threading.Thread(target=flood, args=(flooder,))
            thread.start()
            try:
                for index in range(50):
                    endpoint = ENDPOINT + (index % 2) * 8
                    assert quiet.status(encode_attach(1 + index % 3, endpoint)) == Status.OK
            finally:
                stop.set()
                thread.join(timeout=30)
            assert not thread.is_alive() and not failure, failure
            assert flooded, "the flooding guest was not served at all"
    finally:
        assert program.terminate() == 0
        program.close()


# -- refusals -----------------------------------------------------------------------------------------------


def run(args: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vhost_iommu", *args], capture_output=True, text=True, timeout=STARTUP_TIMEOUT
    )


def test_a_file_at_any_socket_path_is_kept_and_nothing_is_left_behind(directory: str) -> None:
    precious = f"{directory}/viommu.sock1"
    with open(precious, "w") as handle:
        handle.write("keep me")
    result = run([f"--socket-path={directory}/viommu.sock", "--socket-count=3", "--backend=echo"])
    assert result.returncode == 1
    assert f"{precious} exists and is not a socket" in result.stderr
    with open(precious) as handle:
        assert handle.read() == "keep me"
    assert os.listdir(directory) == ["viommu.sock1"]  # sock0, made before, was removed


def test_a_file_at_the_control_socket_path_is_kept(directory: str) -> None:
    control = f"{directory}/ctl"
    with open(control, "w") as handle:
        handle.write("keep me")
    result = run([f"--socket-path={directory}/s", f"--control-socket={control}", "--backend=echo"])
    assert result.returncode == 1
    assert "--control-socket" in result.stderr and "is not a socket" in result.stderr
    with open(control) as handle:
        assert handle.read() == "keep me"
    assert os.listdir(directory) == ["ctl"]


def test_a_symlink_at_a_socket_path_is_not_followed(directory: str) -> None:
    # Even one pointing at a stale socket: replacing "through" it would act outside the path given.
    target = f"{directory}/elsewhere"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(target)
    stale.close()
    os.symlink(target, f"{directory}/s")
    result = run([f"--socket-path={directory}/s", "--backend=echo"])
    assert result.returncode == 1 and "is not a socket" in result.stderr
    assert os.path.islink(f"{directory}/s") and stat.S_ISSOCK(os.lstat(target).st_mode)


def test_a_fifo_as_topology_is_refused_unread(directory: str) -> None:
    fifo = f"{directory}/topology.toml"
    os.mkfifo(fifo)  # opening it for reading would block forever without a writer
    result = run([f"--socket-path={directory}/s", f"--topology={fifo}"])
    assert result.returncode == 1
    assert "is not a regular file" in result.stderr and result.stderr.count("\n") == 1
    assert os.listdir(directory) == ["topology.toml"]


def test_a_connection_lost_before_accept_does_not_end_the_listener(directory: str) -> None:
    # accept(2) may fail for one pending connection (ECONNABORTED): the socket must keep serving the rest.
    path = f"{directory}/s"
    failures = [ConnectionAbortedError(errno.ECONNABORTED, "aborted"), OSError(errno.EPROTO, "protocol")]

    async def scenario() -> int:
        loop = asyncio.get_running_loop()
        real_accept = loop.sock_accept

        async def flaky_accept(sock: socket.socket) -> tuple[socket.socket, object]:
            if failures:
                raise failures.pop(0)
            return await real_accept(sock)

        loop.sock_accept = flaky_accept  # type: ignore[method-assign]
        server = VhostUserServer(EchoBackend)
        listener, created = create_unix_listener(path)
        serving = asyncio.create_task(server.serve_listener(listener, path))
        try:

            def guest() -> int:
                with Frontend.connect(path, timeout=REPLY_TIMEOUT) as frontend:
                    return frontend.get_queue_num()

            return await loop.run_in_executor(None, guest)
        finally:
            server.close()
            serving.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await serving
            listener.close()
            created.remove()

    # asyncio's own loop: uvloop's cannot have sock_accept replaced.
    loop = asyncio.new_event_loop()
    try:
        assert loop.run_until_complete(scenario()) == 2
    finally:
        loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()
    assert failures == [] and os.listdir(directory) == []

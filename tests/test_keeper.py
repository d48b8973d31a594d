"""serve --state-dir: the keeper holds QEMU's connection while device workers die, restart and upgrade.

Every test runs the real program (``python -m vhost_iommu --state-dir ...``) and plays QEMU with the
harness front-end; workers are killed with SIGKILL between messages, with a message relayed and not yet
answered, and while the rings carry traffic. What must hold: the front-end never sees a disconnect, every
message gets exactly one reply, the rings keep working, and SIGTERM leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import select
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator

import pytest

from vhost_iommu.harness.driver_queue import DriverQueue
from vhost_iommu.harness.frontend import Frontend
from vhost_iommu.harness.guest_ram import GuestRam
from vhost_iommu.harness.keeper_process import KeeperProcess
from vhost_iommu.harness.keeper_process import children as _children
from vhost_iommu.protocol import (
    U64,
    ConfigSpace,
    FrontendRequest,
    ProtocolFeature,
    VringFile,
    encode,
)
from vhost_iommu.protocol.constants import CONFIG_FLAG_WRITABLE

pytestmark = pytest.mark.usefixtures("fd_leak_check")
#: A fresh interpreter (numpy, numba's cache for the IOMMU device) on a loaded 2-core machine.
TIMEOUT = 60.0


@pytest.fixture
def directory() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="vhost-kp-") as path:  # short: socket paths <= 108 bytes
        yield path


@pytest.fixture
def keeper(directory: str) -> Iterator[KeeperProcess]:
    program = KeeperProcess(directory)
    try:
        yield program
    finally:
        program.close()


class Guest:
    """A front-end with RAM and two started rings on the echo device."""

    def __init__(self, path: str) -> None:
        self.frontend = Frontend.connect(path, timeout=TIMEOUT)
        self.ram = GuestRam(1 << 20)
        self.queues = [DriverQueue(self.ram, 64), DriverQueue(self.ram, 64)]
        self.frontend.start_device(self.ram, self.queues)
        self.sent = 0

    def echo(self, count: int = 1) -> None:
        """Post ``count`` chains, kick, and check each comes back once with its own bytes."""
        queue = self.queues[0]
        heads = {}
        for _ in range(count):
            data = f"chain {self.sent:06d}".encode()
            self.sent += 1
            heads[queue.post([data], [len(data)])] = data
        self.frontend.kick(0)
        answered: list[tuple[int, int]] = []
        while len(answered) < count:
            assert self.frontend.wait_used(0, timeout=TIMEOUT), f"no answer; {len(answered)} of {count}"
            answered += queue.used()
        assert sorted(head for head, _ in answered) == sorted(heads)
        for head, length in answered:
            assert length == len(heads[head]) and queue.written(head) == heads[head]

    def close(self) -> None:
        self.frontend.close()
        self.ram.close()

    def __enter__(self) -> Guest:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


# -- restarts -----------------------------------------------------------------------------------------------


def test_a_worker_killed_between_messages_is_invisible_to_the_front_end(keeper: KeeperProcess) -> None:
    with Guest(keeper.socket) as guest:
        guest.echo()
        guest.frontend.set_config(0, b"ABCD", flags=CONFIG_FLAG_WRITABLE)
        first = keeper.kill_worker()
        # No message at all: the chain is served because the new worker serves each ring once and then
        # watches the kick fd the keeper kept.
        guest.echo(3)
        assert keeper.worker() != first
        assert guest.frontend.get_config(0, 8)[:4] == b"ABCD"  # the session's config writes replayed
        assert guest.frontend.get_features() & (1 << 30)  # PROTOCOL_FEATURES
        keeper.kill_worker()
        bases = guest.frontend.stop_device(2)
        assert bases == [guest.queues[0].avail_idx, 0]
        keeper.wait_for("session taken over", 2)
    assert keeper.terminate() == 0


def test_a_message_relayed_to_a_worker_that_dies_is_answered_once_by_the_next(keeper: KeeperProcess) -> None:
    with Guest(keeper.socket) as guest:
        frontend = guest.frontend
        worker = keeper.worker()
        os.kill(worker, signal.SIGSTOP)  # it will never answer what the keeper relays now
        try:
            frontend.send(
                encode(
                    FrontendRequest.SET_CONFIG, ConfigSpace(0, CONFIG_FLAG_WRITABLE, b"WXYZ"), need_reply=True
                )
            )
            frontend.send(encode(FrontendRequest.GET_CONFIG, ConfigSpace(0, 0, bytes(8))))
            frontend.send(encode(FrontendRequest.GET_QUEUE_NUM))
        finally:
            os.kill(worker, signal.SIGKILL)
        replies = [frontend.receive() for _ in range(3)]
        assert [reply.code for reply in replies] == [
            FrontendRequest.SET_CONFIG,
            FrontendRequest.GET_CONFIG,
            FrontendRequest.GET_QUEUE_NUM,
        ]
        assert replies[0].payload == U64(0)
        config = replies[1].payload
        assert isinstance(config, ConfigSpace) and config.data[:4] == b"WXYZ"
        assert replies[2].payload == U64(2)
        # Nothing more comes: the next request's reply is the next thing on the socket.
        assert frontend.get_protocol_features() & ProtocolFeature.REPLY_ACK
        guest.echo()
    assert keeper.terminate() == 0


def test_workers_killed_at_random_moments_under_messages_and_traffic(keeper: KeeperProcess) -> None:
    """Kills land anywhere: between messages, inside one, inside a batch of chains."""
    kills = 4
    rng = random.Random(7)
    with Guest(keeper.socket) as guest:
        stop = threading.Event()
        killed: list[int] = []

        def killer() -> None:
            for _ in range(kills):
                if stop.wait(rng.uniform(0.05, 0.6)):
                    return
                with contextlib.suppress(AssertionError, ProcessLookupError):
                    killed.append(keeper.kill_worker())
                # The next one must be serving before it is worth killing again.
                keeper.wait_for("session taken over", len(killed))

        thread = threading.Thread(target=killer)
        thread.start()
        try:
            frontend = guest.frontend
            rounds = 0
            while thread.is_alive() or rounds < 10:
                rounds += 1
                guest.echo(rng.randint(1, 8))
                assert frontend.get_queue_num() == 2
                # A message with an fd: the keeper must number it and keep exactly what is used.
                call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
                frontend.request(FrontendRequest.SET_VRING_CALL, VringFile(1, True), [call])
                old = frontend.call_fds.get(1)
                frontend.call_fds[1] = call
                if old is not None:
                    os.close(old)
                assert frontend.get_status() & 0x8  # FEATURES_OK, from the session
        finally:
            stop.set()
            thread.join()
        assert killed, "no worker was killed"
        guest.echo(8)
        # The keeper keeps only the fds the session references: memory, kick/call/err of 2 rings, channel.
        keeper_fds = len(os.listdir(f"/proc/{keeper.process.pid}/fd"))
        assert keeper_fds < 32, os.listdir(f"/proc/{keeper.process.pid}/fd")
    assert keeper.terminate() == 0


def test_sighup_upgrades_the_worker_under_traffic(keeper: KeeperProcess) -> None:
    with Guest(keeper.socket) as guest:
        guest.echo(4)
        old = keeper.worker()
        keeper.process.send_signal(signal.SIGHUP)
        guest.echo(4)  # served by whichever worker has it: never by none
        keeper.wait_for("session taken over")
        assert keeper.worker() != old
        guest.echo(4)
        assert guest.frontend.get_features() & (1 << 30)
    assert "suspended for the upgrade" in keeper.log
    assert keeper.terminate() == 0


def test_sigterm_leaves_no_process_socket_or_fd(directory: str) -> None:
    program = KeeperProcess(directory)
    try:
        guest = Guest(program.socket)
        worker = program.worker()
        guest.echo()
        assert stat.S_IMODE(os.lstat(program.socket).st_mode) == 0o600
        assert program.terminate() == 0
        assert guest.frontend.wait_disconnected(timeout=TIMEOUT)
        guest.close()
        with pytest.raises(ProcessLookupError):
            os.kill(worker, 0)
        assert sorted(os.listdir(directory)) == ["state"]
        assert stat.S_IMODE(os.stat(program.state).st_mode) == 0o700
    finally:
        program.close()


def test_the_keeper_loads_no_numpy_or_numba(directory: str) -> None:
    program = KeeperProcess(directory, backend="iommu")
    try:
        with Guest(program.socket) as guest:
            guest.frontend.get_features()  # the worker (which loads them) is up
            with open(f"/proc/{program.process.pid}/maps") as handle:
                maps = handle.read()
            for heavy in ("numpy", "numba", "llvmlite", "uvloop"):
                assert heavy not in maps
            with open(f"/proc/{program.worker()}/maps") as handle:
                assert "numba" in handle.read()
        assert program.terminate() == 0
    finally:
        program.close()


# -- refusals -----------------------------------------------------------------------------------------------


def _serve(directory: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vhost_iommu", f"--socket-path={directory}/s", "--backend=echo", *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


@pytest.mark.parametrize("mode", [0o770, 0o707, 0o777])
def test_a_state_dir_others_can_write_is_refused(directory: str, mode: int) -> None:
    state = os.path.join(directory, "state")
    os.mkdir(state)
    os.chmod(state, mode)
    result = _serve(directory, f"--state-dir={state}")
    assert result.returncode == 1 and "writable by group or others" in result.stderr
    assert os.listdir(directory) == ["state"]


def test_a_state_dir_that_is_not_a_directory_is_refused(directory: str) -> None:
    target = os.path.join(directory, "elsewhere")
    os.mkdir(target, 0o700)
    os.symlink(target, os.path.join(directory, "state"))
    result = _serve(directory, f"--state-dir={directory}/state")
    assert result.returncode == 1 and "not a directory" in result.stderr


def test_a_worker_that_cannot_start_ends_the_keeper_with_its_error(directory: str) -> None:
    # --topology is refused with --backend=echo, by the worker: the keeper does not know the options.
    result = _serve(directory, f"--state-dir={directory}/state", "--topology=/nonexistent")
    assert result.returncode == 1
    assert "--topology" in result.stderr and "before it was ready" in result.stderr
    assert sorted(os.listdir(directory)) == ["state"]


def test_a_spare_worker_takes_over_at_once_and_is_replaced(directory: str) -> None:
    program = KeeperProcess(directory, "--spare-worker")
    try:
        with Guest(program.socket) as guest:
            program.wait_for("ready as the spare")
            spare = [pid for pid in _children(program.process.pid) if pid != program.worker()]
            assert len(spare) == 1
            guest.echo()
            program.kill_worker()
            guest.echo(3)
            assert program.worker() == spare[0]
            program.wait_for("the spare takes over")
            program.wait_for("ready as the spare", 2)  # the next spare
            assert len(_children(program.process.pid)) == 2
            workers = _children(program.process.pid)
        assert program.terminate() == 0
        for pid in workers:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
    finally:
        program.close()


def test_one_front_end_per_socket_and_a_new_one_after_the_first_hung_up(keeper: KeeperProcess) -> None:
    with Guest(keeper.socket) as first:
        with Frontend.connect(keeper.socket, timeout=TIMEOUT) as second:
            assert second.wait_disconnected(timeout=TIMEOUT)  # refused at once
        first.echo()  # undisturbed
        first.frontend.sock.shutdown(socket.SHUT_RDWR)  # hung up; the keeper may not have read it yet
    with Guest(keeper.socket) as third:
        third.echo()
    keeper.wait_for("refused a second front-end")
    assert keeper.terminate() == 0


def test_ctl_upgrade_hands_over_as_sighup_does(keeper: KeeperProcess) -> None:
    with Guest(keeper.socket) as guest:
        guest.echo()
        old = keeper.worker()
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "vhost_iommu",
                "ctl",
                f"--control-socket={keeper.control}",
                "--json",
                "upgrade",
            ],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == {"requested": True, "pid": old}
        keeper.wait_for("suspended for the upgrade")
        guest.echo(2)
        assert keeper.worker() != old
    assert "upgrade requested (control channel)" in keeper.log
    assert keeper.terminate() == 0


def test_workers_that_keep_failing_never_end_the_keeper_or_the_connection(directory: str) -> None:
    """Every new worker exits at start-up (its --topology became unreadable): the keeper backs off, logs
    louder, keeps QEMU's connection and the message QEMU waits on, and the first worker that starts
    again answers it."""
    topology = os.path.join(directory, "topology.toml")
    with open("qemu-configs/topologies/default.toml") as source, open(topology, "w") as copy:
        copy.write(source.read())
    program = KeeperProcess(directory, f"--topology={topology}", backend="iommu")
    try:
        with Frontend.connect(program.socket, timeout=TIMEOUT) as frontend:
            features = frontend.get_features()
            os.rename(topology, topology + ".away")  # every worker from now on refuses to start
            program.kill_worker()
            program.wait_for("failure 3 in a row")
            frontend.send(encode(FrontendRequest.GET_QUEUE_NUM))  # waits for a worker that serves
            program.wait_for("failure 4 in a row")
            assert program.process.poll() is None
            os.rename(topology + ".away", topology)
            reply = frontend.receive()
            assert reply.code == FrontendRequest.GET_QUEUE_NUM and reply.payload == U64(2)
            assert frontend.get_features() == features
        assert program.terminate() == 0
    finally:
        program.close()


def test_a_connected_fd_is_served_through_the_keeper_and_its_end_ends_the_program(directory: str) -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    command = [sys.executable, "-m", "vhost_iommu", f"--fd={theirs.fileno()}", "--backend=echo"]
    process = subprocess.Popen(
        [*command, f"--state-dir={directory}/state"], pass_fds=(theirs.fileno(),), stderr=subprocess.PIPE
    )
    theirs.close()
    try:
        with Frontend(ours, timeout=TIMEOUT) as frontend, GuestRam(1 << 20) as ram:
            queues = [DriverQueue(ram, 64), DriverQueue(ram, 64)]
            frontend.start_device(ram, queues)
            head = queues[0].post([b"through"], [7])
            frontend.kick(0)
            assert frontend.wait_used(0, timeout=TIMEOUT)
            assert queues[0].used() == [(head, 7)] and queues[0].written(head) == b"through"
        assert process.wait(timeout=TIMEOUT) == 0  # the front-end left: the program ends
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        assert process.stderr is not None
        process.stderr.close()


def test_the_worker_dies_with_the_keeper(directory: str) -> None:
    program = KeeperProcess(directory)
    try:
        worker = program.worker()
        exited = os.pidfd_open(worker)
        try:
            program.process.kill()  # no chance to stop its worker: PR_SET_PDEATHSIG does
            assert select.select([exited], [], [], TIMEOUT)[0], "the worker outlived its keeper"
        finally:
            os.close(exited)
    finally:
        program.close()


def test_a_worker_that_stops_answering_is_replaced(directory: str) -> None:
    program = KeeperProcess(directory, "--worker-timeout=2")
    try:
        with Guest(program.socket) as guest:
            guest.echo()
            hung = program.worker()
            os.kill(hung, signal.SIGSTOP)  # alive, holding its fds, answering nothing
            guest.echo(2)  # served once the keeper has given up on it
            program.wait_for("has not answered for")
            assert program.worker() != hung
        assert program.terminate() == 0
    finally:
        program.close()


def test_vfio_user_endpoints_are_refused_up_front_under_a_state_dir(directory: str) -> None:
    """QEMU's vfio-user client never reconnects, and the keeper does not hold vfio-user connections: a
    topology that serves endpoints is refused before anything starts, with the way out."""
    command = [
        sys.executable,
        "-m",
        "vhost_iommu",
        f"--socket-path={directory}/s",
        f"--state-dir={directory}/state",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, check=False)
    assert result.returncode != 0
    assert "--state-dir cannot keep vfio-user endpoints" in result.stderr
    assert "dma-engine at 00:05.0" in result.stderr and "--no-devices" in result.stderr
    assert not os.path.exists(f"{directory}/s") and not os.path.exists(f"{directory}/state")

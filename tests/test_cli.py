"""The ``vhost-iommu`` program as a management layer runs it: a real process, real signals, real sockets."""

from __future__ import annotations

import argparse
import inspect
import json
import os
import select
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence

import pytest

from vhost_iommu import cli
from vhost_iommu.harness.frontend import Frontend
from vhost_iommu.server import create_unix_listener

pytestmark = pytest.mark.usefixtures("fd_leak_check")
STARTUP_TIMEOUT = 30.0  # importing numpy and numba in a fresh interpreter on a loaded 2-core machine


@pytest.fixture
def directory() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="vhost-cli-") as path:
        yield path


def run(args: Sequence[str], timeout: float = STARTUP_TIMEOUT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vhost_iommu", *args], capture_output=True, text=True, timeout=timeout
    )


def start(args: Sequence[str], pass_fds: Sequence[int] = ()) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "vhost_iommu", "-v", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        pass_fds=pass_fds,
    )


def wait_for_log_line(process: subprocess.Popen[str], text: str, timeout: float = STARTUP_TIMEOUT) -> None:
    """Read the program's stderr until ``text`` appears (the program says when it is ready)."""
    assert process.stderr is not None
    fd = process.stderr.fileno()  # read the fd itself: a buffered reader would hide lines from select()
    seen = b""
    while text.encode() not in seen:
        ready, _, _ = select.select([fd], [], [], timeout)
        assert ready, f"no {text!r} within {timeout}s; stderr so far: {seen!r}"
        chunk = os.read(fd, 4096)
        assert chunk, f"the program ended before saying {text!r}: {seen!r}"
        seen += chunk


def stop(process: subprocess.Popen[str]) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()


def test_print_capabilities_is_json_per_the_convention() -> None:
    result = run(["--print-capabilities"])
    assert result.returncode == 0
    assert json.loads(result.stdout) == {"type": "iommu"}
    assert result.stdout.count("\n") == 1


def test_print_capabilities_ignores_every_other_argument() -> None:
    result = run(["--socket-path=/nonexistent/dir/sock", "--bogus", "--print-capabilities"])
    assert result.returncode == 0
    assert json.loads(result.stdout) == {"type": "iommu"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "one of --socket-path or --fd is required"),
        (["--socket-path=/tmp/a", "--fd=3"], "not allowed with"),
        (["--socket-path"], "expected one argument"),
        (["--socket-path=/tmp/a", "--socket-mode=999"], "not an octal mode"),
        (["--socket-path=/tmp/a", "--socket-mode=1777"], "between 0 and 0777"),
        (["--fd=-1"], "not a file descriptor number"),
        (["--socket-path=/tmp/a", "--frobnicate"], "unrecognized arguments: --frobnicate"),
        (["--socket-path=/tmp/a", "--backend=echo", "--topology=t.json"], "not to --backend=echo"),
        (["--socket-path=/tmp/a", "--socket-path=/tmp/b", "--socket-count=2"], "exactly one --socket-path"),
        (["--fd=3", "--socket-count=2"], "--socket-count applies to --socket-path"),
        (["--socket-path=/tmp/a", "--socket-count=0"], "between 1 and 256"),
        (["--socket-path=/tmp/a", "--socket-count=257"], "between 1 and 256"),
        (["--socket-path=/tmp/a", "--socket-path=/tmp/../tmp/a"], "given twice"),
        (["--socket-path=/tmp/a0", "--socket-count=1", "--control-socket=/tmp/a00"], "also a --socket-path"),
        (["--socket-path=/tmp/a", "--max-domains=0"], "not a number of domains between 1"),
        (["--socket-path=/tmp/a", "--max-mappings=lots"], "not a number of mappings"),
        (["--socket-path=/tmp/a", "--backend=echo", "--max-mappings=9"], "not to --backend=echo"),
        (["--socket-path=/tmp/a", "--kick-thread-priority=urgent"], "invalid choice: 'urgent'"),
        (["--socket-path=/tmp/a", "--backend=echo", "--kick-thread-priority=high"], "not to --backend=echo"),
        (["--socket-path=/tmp/a", "--no-kick-thread", "--kick-thread-priority=high"], "--no-kick-thread has"),
        (
            ["--socket-path=/tmp/a", "--request-path=python", "--kick-thread-priority=normal"],
            "apply to --request-path=compiled",
        ),
    ],
)
def test_bad_arguments_exit_non_zero_with_one_line(args: list[str], message: str) -> None:
    result = run(args)
    assert result.returncode != 0
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("vhost-iommu: error: ")
    assert message in result.stderr


def test_missing_topology_file_is_a_one_line_error(directory: str) -> None:
    result = run([f"--socket-path={directory}/sock", f"--topology={directory}/missing.json"])
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("vhost-iommu: error: --topology: ") and "missing.json" in result.stderr
    assert not os.path.exists(f"{directory}/sock")


def test_fd_that_is_not_a_socket_is_refused() -> None:
    read_end, write_end = os.pipe()
    try:
        result = subprocess.run(
            [sys.executable, "-m", "vhost_iommu", f"--fd={read_end}", "--backend=echo"],
            capture_output=True,
            text=True,
            timeout=STARTUP_TIMEOUT,
            pass_fds=[read_end],
        )
    finally:
        os.close(read_end)
        os.close(write_end)
    assert result.returncode == 1
    assert "vhost-iommu: error: --fd=" in result.stderr and result.stderr.count("\n") == 1


def test_existing_path_that_is_not_a_socket_is_refused(directory: str) -> None:
    path = os.path.join(directory, "precious")
    with open(path, "w") as handle:
        handle.write("keep me")
    result = run([f"--socket-path={path}", "--backend=echo"])
    assert result.returncode == 1
    assert "is not a socket" in result.stderr
    with open(path) as handle:
        assert handle.read() == "keep me"


def test_serves_until_sigterm_then_removes_its_socket(directory: str) -> None:
    path = os.path.join(directory, "sock")
    process = start([f"--socket-path={path}", "--backend=echo"])
    try:
        wait_for_log_line(process, "listening on")
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        with Frontend.connect(path) as frontend:
            frontend.negotiate(2)
            assert frontend.get_config(0, 8) == b"ECHOECHO"
            process.send_signal(signal.SIGTERM)
            assert frontend.wait_disconnected(timeout=10)
        status = process.wait(timeout=10)
    finally:
        stop(process)
    assert status == 0
    assert not os.path.exists(path)


def test_sigint_also_ends_the_program_cleanly(directory: str) -> None:
    path = os.path.join(directory, "sock")
    process = start([f"--socket-path={path}", "--backend=echo"])
    try:
        wait_for_log_line(process, "listening on")
        process.send_signal(signal.SIGINT)
        status = process.wait(timeout=10)
    finally:
        stop(process)
    assert status == 0
    assert not os.path.exists(path)


def test_socket_mode_and_stale_socket_replacement(directory: str) -> None:
    path = os.path.join(directory, "sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # the path stays, nobody listens: what a killed server leaves behind
    process = start([f"--socket-path={path}", "--socket-mode=0660", "--backend=echo"])
    try:
        wait_for_log_line(process, "listening on")
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
        with Frontend.connect(path) as frontend:
            assert frontend.get_features() & (1 << 30)
    finally:
        assert stop(process) == 0


def test_live_socket_is_not_taken_over(directory: str) -> None:
    path = os.path.join(directory, "sock")
    first = start([f"--socket-path={path}", "--backend=echo"])
    try:
        wait_for_log_line(first, "listening on")
        second = run([f"--socket-path={path}", "--backend=echo"])
        assert second.returncode == 1
        assert "in use" in second.stderr
        with Frontend.connect(path) as frontend:
            assert frontend.get_features() & (1 << 30)
    finally:
        assert stop(first) == 0


def test_inherited_connected_fd_is_served_until_it_closes() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        process = start([f"--fd={theirs.fileno()}", "--backend=echo"], pass_fds=[theirs.fileno()])
    finally:
        theirs.close()
    try:
        with Frontend(ours, timeout=STARTUP_TIMEOUT) as frontend:
            frontend.negotiate(2)
            assert frontend.get_queue_num() == 2
        assert process.wait(timeout=10) == 0
    finally:
        stop(process)


def test_inherited_listening_fd_accepts_connections(directory: str) -> None:
    path = os.path.join(directory, "sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen()
    try:
        process = start([f"--fd={listener.fileno()}", "--backend=echo"], pass_fds=[listener.fileno()])
    finally:
        listener.close()
    try:
        for _ in range(2):  # one after the other, each with its own device
            with Frontend.connect(path, timeout=STARTUP_TIMEOUT) as frontend:
                frontend.negotiate(2)
                frontend.set_config(0, b"changed!")
                assert frontend.get_config(0, 8) == b"changed!"
    finally:
        assert stop(process) == 0


def test_help_names_the_device_default_mapping_limit() -> None:
    # The help is written without importing the device (arguments answer at once); it must not drift.
    from vhost_iommu.device import IommuDevice

    parser = argparse.ArgumentParser()
    cli.configure_serve(parser)
    default = inspect.signature(IommuDevice).parameters["max_mappings"].default
    assert f"(default {default})" in " ".join(parser.format_help().split())


def test_a_socket_file_is_removed_only_while_it_is_ours(directory: str) -> None:
    path = os.path.join(directory, "sock")
    listener, created = create_unix_listener(path)
    listener.close()
    assert os.listdir(directory) == ["sock"]  # the private directory it was made in is gone
    os.unlink(path)
    with open(path, "w") as handle:
        handle.write("someone else's")
    assert not created.remove()
    with open(path) as handle:
        assert handle.read() == "someone else's"
    os.unlink(path)
    listener, created = create_unix_listener(path, 0o640)
    listener.close()
    assert stat.S_IMODE(os.lstat(path).st_mode) == 0o640
    assert created.remove() and os.listdir(directory) == []


def test_a_socket_path_in_a_missing_directory_is_a_one_line_error(directory: str) -> None:
    result = run([f"--socket-path={directory}/missing/sock", "--backend=echo"])
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert "cannot create socket" in result.stderr


def test_serve_is_also_an_explicit_sub_command() -> None:
    result = run(["serve", "--frobnicate"])
    assert result.returncode == 2
    assert result.stderr.startswith("vhost-iommu serve: error: ") and result.stderr.count("\n") == 1


def test_registered_commands_get_their_own_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []

    def configure(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--colour", required=True)

    def execute(args: argparse.Namespace) -> int:
        seen.append(args.colour)
        return 7

    # Registered first, so that the real commands are in the copy and not lost with it afterwards.
    cli._load_command_modules()
    monkeypatch.setattr(cli, "COMMANDS", dict(cli.COMMANDS))
    cli.register_command(cli.Command("paint", "paints", configure, execute))
    with pytest.raises(ValueError, match="already registered"):
        cli.register_command(cli.Command("paint", "again", configure, execute))
    assert cli.main(["paint", "--colour=blue"]) == 7
    assert seen == ["blue"]

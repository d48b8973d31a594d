"""A long-running back-end serves guest after guest: an ended session must leave nothing behind in it.

One ``vhost-iommu`` process per serving path serves many front-end sessions in a row (connect, memory
table with memfd guest RAM, ATTACH, MAP, disconnect), as a host whose VMs restart against a running
back-end. After the last one the process holds no mapping of any session's guest RAM, and no more fds,
threads, mappings or memory than after the first few (issue 15: the compiled request path kept every
ended session's guest RAM mapped until a garbage collection happened to run).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import IO

import pytest

from vhost_iommu.control.client import ControlClient
from vhost_iommu.device.layout import encode_attach, encode_map
from vhost_iommu.harness import Frontend
from vhost_iommu.harness.driver_queue import DriverQueue
from vhost_iommu.harness.guest_ram import GuestRam
from vhost_iommu.server import create_unix_listener
from vhost_iommu.soak.measure import read_mappings, read_process

SESSIONS = 100
WARM_UP_SESSIONS = 5  # kernels loaded, allocator pools and the loop's structures at their working size
RAM_SIZE = 64 << 20  # what a small guest gives; sparse, so it costs nothing unless leaked
# Far below what one leaked mapping per session adds over SESSIONS sessions (64 MiB of address space
# each, or even 1 MiB: ~95 MiB), far above what the process's own allocator moves (flat when measured).
MEMORY_TOLERANCE_KIB = 8 << 10
MAPPING_COUNT_TOLERANCE = 8
STARTUP_TIMEOUT = 60.0  # a fresh interpreter importing numpy and numba on a loaded 2-core machine
ENDPOINT = 0x20
OK = bytes(4)  # a status tail of VIRTIO_IOMMU_S_OK


@dataclass(frozen=True)
class Footprint:
    """What a server process holds."""

    guest_ram_mappings: int
    mappings: int
    fds: int
    threads: int
    vm_size_kib: int
    vm_rss_kib: int

    @classmethod
    def of(cls, pid: int) -> Footprint:
        sample, mappings = read_process(pid), read_mappings(pid)
        return cls(
            mappings.memfd, mappings.total, sample.fds, sample.threads, sample.vm_size_kib, sample.rss_kib
        )


class ServerProcess:
    """``vhost-iommu --fd=N OPTIONS`` on a listening socket this test made (so a front-end can connect
    before the program is ready: its first request is answered once it is), logging to a file; with
    ``control``, its control socket at ``control_path`` too."""

    def __init__(self, directory: str, options: Sequence[str], *, control: bool) -> None:
        self.path = os.path.join(directory, "vhost.sock")
        self.control_path = os.path.join(directory, "control.sock") if control else None
        if self.control_path is not None:
            options = [*options, f"--control-socket={self.control_path}"]
        listener, socket_file = create_unix_listener(self.path)
        self._socket_file = socket_file
        self._log: IO[bytes] = open(os.path.join(directory, "server.log"), "w+b")  # noqa: SIM115
        with listener:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "vhost_iommu", f"--fd={listener.fileno()}", *options],
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=self._log,
                pass_fds=[listener.fileno()],
            )

    def log_text(self) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")

    def stop(self) -> None:
        try:
            self.process.terminate()
            self.process.wait(timeout=10)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            self._log.close()
            self._socket_file.remove()


def serve_one_session(path: str, control: ControlClient | None, *, timeout: float = 10.0) -> None:
    """A guest's life as the back-end sees it: set-up, ATTACH, MAP (served by the kernel on the compiled
    path, which binds the guest's memory), then the front-end goes away without stopping anything."""
    with GuestRam(RAM_SIZE) as ram, Frontend.connect(path, timeout=timeout) as frontend:
        requests, events = DriverQueue(ram, 64), DriverQueue(ram, 64)
        frontend.start_device(ram, [requests, events])
        for request in (encode_attach(domain=1, endpoint=ENDPOINT), encode_map(1, 0x10000, 0x1FFFF, 0x40000)):
            head = requests.post([request], [len(OK)])
            frontend.kick(0)
            assert frontend.wait_used(0, timeout)
            assert requests.used()[-1] == (head, len(OK)) and requests.written(head) == OK
        if control is not None:  # a tool reads the device while the session is live
            assert [(m["iova_start"], m["iova_end"]) for m in control.call("mappings")["mappings"]] == [
                (0x10000, 0x1FFFF)
            ]


def settled_footprint(server: ServerProcess) -> Footprint:
    """The server's footprint once every earlier session has ended: the listener finishes a connection
    whose front-end has gone before it serves the next, so a probe answered means they are closed (the
    probe's own socket is counted every time)."""
    with Frontend.connect(server.path) as probe:
        assert probe.get_features()
        return Footprint.of(server.process.pid)


#: Serving path: (options, with a control socket whose client reads the device in every session).
PATHS = {
    "compiled, kick thread": ([], False),
    "compiled, event loop": (["--no-kick-thread"], False),
    "python": (["--request-path=python"], False),
    "compiled, kick thread, control socket": ([], True),
}


@pytest.fixture(params=list(PATHS), ids=list(PATHS))
def server(request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    with tempfile.TemporaryDirectory(prefix="vhost-leak-") as directory:
        options, control = PATHS[request.param]
        process = ServerProcess(directory, options, control=control)
        try:
            yield process
        finally:
            process.stop()


def test_sessions_in_a_row_leave_nothing_in_the_server(server: ServerProcess) -> None:
    serve_one_session(server.path, None, timeout=STARTUP_TIMEOUT)  # answered once the program is up
    control = ControlClient(server.control_path) if server.control_path is not None else None
    try:
        for _ in range(WARM_UP_SESSIONS):
            serve_one_session(server.path, control)
        before = settled_footprint(server)
        for _ in range(SESSIONS):
            serve_one_session(server.path, control)
        after = settled_footprint(server)
    finally:
        if control is not None:
            control.close()
    context = f"before {before}, after {SESSIONS} sessions {after}; server log:\n{server.log_text()[-4000:]}"
    assert before.guest_ram_mappings == after.guest_ram_mappings == 0, context
    assert after.fds == before.fds, context
    assert after.threads == before.threads, context
    assert after.mappings - before.mappings <= MAPPING_COUNT_TOLERANCE, context
    assert after.vm_size_kib - before.vm_size_kib <= MEMORY_TOLERANCE_KIB, context
    assert after.vm_rss_kib - before.vm_rss_kib <= MEMORY_TOLERANCE_KIB, context

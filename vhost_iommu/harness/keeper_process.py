"""The real program with ``--state-dir`` in a subprocess, for tests: the keeper and its device worker."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from vhost_iommu.control.client import ControlClient

TAKEOVER_LINE = "session taken over"
"""What a worker logs once it serves a front-end whose session it took over from a previous worker."""


class ProgramProcess:
    """The real program (``command``) in a subprocess whose log (stderr) is drained by a thread and
    searchable; ``env`` and ``cwd`` as for subprocess.Popen."""

    def __init__(
        self,
        command: list[str],
        *,
        timeout: float = 60.0,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
    ) -> None:
        self.timeout = timeout
        self.command = command
        #: When the program was started (time.monotonic()).
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
            cwd=cwd,
        )
        self.log = ""
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        assert self.process.stderr is not None
        for line in iter(self.process.stderr.readline, b""):
            with self._changed:
                self.log += line.decode(errors="replace")
                self._changed.notify_all()
        with self._changed:
            self.log += "<EOF>"
            self._changed.notify_all()

    def wait_for(self, text: str, count: int = 1) -> None:
        with self._changed:
            done = self._changed.wait_for(
                lambda: self.log.count(text) >= count or "<EOF>" in self.log, self.timeout
            )
            assert done and self.log.count(text) >= count, f"no {text!r} x{count}: {self.log[-3000:]}"

    def terminate(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        status = self.process.wait(timeout=self.timeout)
        self._reader.join(self.timeout)
        return status

    def close(self) -> None:
        for pid in children(self.process.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self._reader.join(self.timeout)
        assert self.process.stderr is not None
        self.process.stderr.close()


class KeeperProcess(ProgramProcess):
    """``vhost-iommu --state-dir`` on one socket (and a control socket); its log is drained by a thread
    and searchable; its device worker can be found and killed."""

    def __init__(self, directory: str, *args: str, backend: str = "echo", timeout: float = 60.0) -> None:
        self.directory = directory
        self.socket = os.path.join(directory, "s")
        self.control = os.path.join(directory, "ctl")
        self.state = os.path.join(directory, "state")
        command = [
            sys.executable,
            "-m",
            "vhost_iommu",
            "-v",
            f"--state-dir={self.state}",
            f"--socket-path={self.socket}",
            f"--control-socket={self.control}",
            f"--backend={backend}",
            # The keeper cannot keep vfio-user endpoints across a worker restart; serve the IOMMU alone.
            *(["--no-devices"] if backend == "iommu" else []),
            *args,
        ]
        super().__init__(command, timeout=timeout)
        self.wait_for("listening on")

    def worker(self) -> int:
        """The pid of the device worker serving now (the one that answers the control channel: a spare
        or a worker still loading does not), waiting for one if there is none at the moment."""
        with ControlClient(self.control, timeout=self.timeout) as client:
            pid = client.call("hello")["pid"]
        assert isinstance(pid, int) and pid in children(self.process.pid), (pid, children(self.process.pid))
        return pid

    def kill_worker(self, *, wait_takeover: bool = False) -> int:
        """SIGKILL the serving worker; its pid. With ``wait_takeover``, return once the next worker has
        taken over the (one) front-end's session: until then the control channel may be answered by a
        worker that has no connection yet."""
        taken_over = self.log.count(TAKEOVER_LINE)
        pid = self.worker()
        os.kill(pid, signal.SIGKILL)
        if wait_takeover:
            self.wait_for(TAKEOVER_LINE, taken_over + 1)
        return pid

    def stop_worker(self) -> StoppedWorker:
        """SIGSTOP the serving worker; return once every thread of it has stopped, with what its eventfds
        held then (see :meth:`StoppedWorker.wait_kicked`)."""
        pid = self.worker()
        os.kill(pid, signal.SIGSTOP)
        # The kernel stops each thread as it next runs and tells only the parent (the keeper, with
        # waitpid): /proc is where anyone else sees it.
        assert poll_until(lambda: all_threads_stopped(pid), self.timeout), f"worker {pid} did not stop"
        return StoppedWorker(pid, eventfd_counts(pid))


def children(pid: int) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(name))
    return found


@dataclass(frozen=True)
class StoppedWorker:
    """A device worker held by SIGSTOP, and the counts of its eventfds when it stopped."""

    pid: int
    counts_at_stop: dict[int, int]

    def kicked(self) -> bool:
        """Whether an eventfd of the worker has counted up since it stopped. Nothing of the worker runs to
        read one, and the only writers of its eventfds besides itself are the front-end's notifications:
        the guest's driver published a request on a ring and notified the device."""
        now = eventfd_counts(self.pid)
        return any(count > self.counts_at_stop.get(fd, 0) for fd, count in now.items())

    def wait_kicked(self, timeout: float) -> bool:
        """Wait until :meth:`kicked`; False on timeout. A driver that was told not to notify (a device
        polling its ring: EVENT_IDX or NO_NOTIFY) posts without a kick, and this cannot see it."""
        # Polled: an eventfd of a stopped process wakes only its own readers.
        return poll_until(self.kicked, timeout)

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)


def poll_until(condition: Callable[[], bool], timeout: float, interval: float = 0.01) -> bool:
    """Ask ``condition`` every ``interval`` seconds until it holds (True) or ``timeout`` has passed
    (False). Only for conditions that nothing signals (another process's state, a counter that only
    answers when asked); anything that can be waited on is waited on instead."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
    return True


def all_threads_stopped(pid: int) -> bool:
    """Whether every thread of process ``pid`` is stopped by a signal (state T in /proc)."""
    states = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError), open(f"/proc/{pid}/task/{task}/stat") as handle:
            states.append(handle.read().rsplit(")", 1)[1].split()[0])
    return bool(states) and all(state == "T" for state in states)


def eventfd_counts(pid: int) -> dict[int, int]:
    """The counts of the eventfds process ``pid`` holds, by fd number (from /proc/PID/fdinfo)."""
    counts = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            if os.readlink(f"/proc/{pid}/fd/{name}") != "anon_inode:[eventfd]":
                continue
            with open(f"/proc/{pid}/fdinfo/{name}") as handle:
                for line in handle:
                    if line.startswith("eventfd-count:"):
                        counts[int(name)] = int(line.split(":", 1)[1], 16)
    return counts

"""Pytest fixtures: a back-end server in a background thread, a connected front-end, an fd-leak check.

Load with ``pytest_plugins = ["vhost_iommu.harness.pytest_plugin"]``. Fixtures:

* ``backend_factory``: what the server builds per connection (default: :class:`EchoBackend`). Override it
  in a test module or ``conftest.py``, or parametrise it indirectly, to serve another device.
* ``vhost_server``: a :class:`RunningServer` on a temporary socket, its own event loop in its own thread;
  stopped, joined and its socket removed afterwards.
* ``frontend``: a :class:`~vhost_iommu.harness.frontend.Frontend` connected to ``vhost_server``.
* ``fd_leak_check``: fails the test if the process has fds open afterwards that it did not have before
  (request it first, so that it is torn down last).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any, TypeVar

import pytest

from vhost_iommu.backend import VhostUserBackend
from vhost_iommu.harness.echo import EchoBackend
from vhost_iommu.harness.frontend import Frontend
from vhost_iommu.server import VhostUserServer, bind_unix_socket, new_event_loop

T = TypeVar("T")


class RunningServer:
    """A :class:`VhostUserServer` accepting on ``path``, run by its own event loop in a thread."""

    def __init__(self, backend_factory: Callable[[], VhostUserBackend], path: str) -> None:
        self.path = path
        self.backends: list[VhostUserBackend] = []

        def recording_factory() -> VhostUserBackend:
            backend = backend_factory()
            self.backends.append(backend)
            return backend

        self.server = VhostUserServer(recording_factory)
        self._listener = bind_unix_socket(path)
        self.loop = new_event_loop()
        #: Exceptions that escaped a callback on the server's loop: a server bug, reported at stop().
        self.loop_errors: list[dict[str, Any]] = []
        self.loop.set_exception_handler(lambda _loop, context: self.loop_errors.append(context))
        self._serving: Future[None] = Future()
        self._thread = threading.Thread(target=self._run, name="vhost-user server", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        task = self.loop.create_task(self.server.serve_listener(self._listener))
        self._task = task
        try:
            self.loop.run_until_complete(task)
        except asyncio.CancelledError:
            pass
        except BaseException as exc:
            self._serving.set_exception(exc)
        finally:
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()
            if not self._serving.done():
                self._serving.set_result(None)

    def call(self, function: Callable[[], T], timeout: float = 5.0) -> T:
        """Run ``function`` on the server's loop (to inspect server state safely) and return its result."""

        async def run() -> T:
            return function()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout)

    def connect(self, timeout: float = 5.0) -> Frontend:
        return Frontend.connect(self.path, timeout=timeout)

    def wait_all_closed(self, timeout: float = 5.0) -> None:
        """Wait until the server has finished closing every connection (front-ends that went away)."""

        async def closed() -> None:
            while self.server.connections:
                await asyncio.gather(*(c.wait_closed() for c in list(self.server.connections)))

        asyncio.run_coroutine_threadsafe(asyncio.wait_for(closed(), timeout), self.loop).result(timeout + 1)

    def connection_count(self) -> int:
        return self.call(lambda: len(self.server.connections))

    def stop(self, timeout: float = 5.0) -> None:
        """Close every connection, stop accepting, join the thread, remove the socket."""
        if self._thread.is_alive():

            def shutdown() -> None:
                self.server.close()
                self._task.cancel()

            self.loop.call_soon_threadsafe(shutdown)
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise RuntimeError("the vhost-user server thread did not stop")
        self._listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self._serving.result(0)
        if self.loop_errors:
            raise RuntimeError(f"unhandled errors on the server's event loop: {self.loop_errors}")


def open_fds() -> dict[int, str]:
    """This process's open fds and what they point at."""
    found: dict[int, str] = {}
    for name in os.listdir("/proc/self/fd"):
        # The listing's own fd is closed by the time we look at it.
        with contextlib.suppress(OSError):
            found[int(name)] = os.readlink(f"/proc/self/fd/{name}")
    return found


@functools.cache
def _warm_up_event_loop() -> None:
    # libuv opens a process-wide pipe with its first loop and keeps it: not a leak of any test's.
    new_event_loop().close()


@pytest.fixture
def fd_leak_check() -> Iterator[None]:
    _warm_up_event_loop()
    before = open_fds()
    yield
    after = open_fds()
    leaked = {fd: target for fd, target in after.items() if before.get(fd) != target}
    assert not leaked, f"fds leaked by the test: {leaked}"


@pytest.fixture
def backend_factory() -> Callable[[], VhostUserBackend]:
    return EchoBackend


@pytest.fixture
def vhost_server(backend_factory: Callable[[], VhostUserBackend]) -> Iterator[RunningServer]:
    # A short directory: unix socket paths are limited to 108 bytes and pytest's tmp_path can exceed it.
    with tempfile.TemporaryDirectory(prefix="vhost-") as directory:
        server = RunningServer(backend_factory, os.path.join(directory, "sock"))
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture
def frontend(vhost_server: RunningServer) -> Iterator[Frontend]:
    with vhost_server.connect() as connected:
        yield connected



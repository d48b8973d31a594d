"""A vhost-user server on a background thread with its own event loop, for tests, scripts and the lab.

:class:`RunningServer` binds a socket, serves every connection with a fresh back-end from the factory on a
private event loop (uvloop when available) in a daemon thread, and lets the caller inspect server state
on that loop (:meth:`RunningServer.call`). :meth:`RunningServer.stop` closes every connection, joins the
thread and removes the socket. No pytest here: the program's own ``run`` path may use it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, TypeVar

from vhost_iommu.backend import VhostUserBackend
from vhost_iommu.device.topology import Topology
from vhost_iommu.endpoint_server import EndpointServer
from vhost_iommu.harness.frontend import Frontend
from vhost_iommu.server import VhostUserServer, bind_unix_socket, new_event_loop

if TYPE_CHECKING:
    from vhost_iommu.control.service import ControlService

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
        #: Further sockets of the same server (:meth:`listen`, :meth:`serve_devices`): path -> (listener,
        #: accepting task).
        self._extra: dict[str, tuple[socket.socket, asyncio.Task[None]]] = {}
        #: The vfio-user endpoints served beside (:meth:`serve_devices`).
        self.endpoints: EndpointServer | None = None
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
            extra = [task for _listener, task in self._extra.values()]
            if extra:  # cancelled with the first; let them finish being cancelled
                self.loop.run_until_complete(asyncio.gather(*extra, return_exceptions=True))
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()
            if not self._serving.done():
                self._serving.set_result(None)

    def call(self, function: Callable[[], T], timeout: float = 5.0) -> T:
        """Run ``function`` on the server's loop (to inspect server state safely) and return its result."""

        async def run() -> T:
            return function()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout)

    def listen(self, path: str | None = None) -> str:
        """Serve one more socket (default: ``path`` + "-N" next to the first) on the same server and
        loop, as ``serve --socket-count`` does: each socket serves one front-end at a time, so tests of
        several guests at once give each its own. Returns its path."""
        if path is None:
            path = f"{self.path}-{len(self._extra) + 1}"
        listener = bind_unix_socket(path)

        async def start() -> asyncio.Task[None]:
            return asyncio.get_running_loop().create_task(self.server.serve_listener(listener, path))

        try:
            task = asyncio.run_coroutine_threadsafe(start(), self.loop).result(5)
        except BaseException:
            listener.close()
            raise
        self._extra[path] = (listener, task)
        return path

    def serve_devices(self, topology: Topology, directory: str) -> EndpointServer:
        """Serve ``topology``'s ``[[devices]]`` over vfio-user on this server's loop, relative sockets in
        ``directory``, their DMA paired with this server's guests (as ``serve`` does)."""
        if self.endpoints is not None:
            raise RuntimeError("the devices are served already")
        endpoints = EndpointServer(topology, self.server)
        self.endpoints = endpoints
        for spec in topology.devices:
            path = spec.socket_path(directory)
            assert path is not None
            listener = bind_unix_socket(path)
            served = endpoints.add(spec.with_paths_in(directory), path)

            async def start(
                served: object = served, listener: socket.socket = listener
            ) -> asyncio.Task[None]:
                return asyncio.get_running_loop().create_task(endpoints.serve(served, listener))  # type: ignore[arg-type]

            try:
                task = asyncio.run_coroutine_threadsafe(start(), self.loop).result(5)
            except BaseException:
                listener.close()
                raise
            self._extra[path] = (listener, task)
        return endpoints

    @contextlib.contextmanager
    def control_channel(self, service: ControlService, timeout: float = 5.0) -> Iterator[str]:
        """``service``'s control channel on this server's loop, its socket beside the server's: its
        path, until the block ends. The service must track this server's back-ends."""
        from vhost_iommu.control.server import ControlServer

        service.server = self.server
        path = os.path.join(os.path.dirname(self.path), "control")

        async def start() -> ControlServer:
            control = ControlServer(service, path)
            await control.start()
            return control

        control = asyncio.run_coroutine_threadsafe(start(), self.loop).result(timeout)
        try:
            yield path
        finally:
            asyncio.run_coroutine_threadsafe(control.close(), self.loop).result(timeout)

    def connect(self, timeout: float = 5.0, *, path: str | None = None) -> Frontend:
        """A front-end connected to the first socket, or to ``path`` (one of :meth:`listen`'s)."""
        return Frontend.connect(self.path if path is None else path, timeout=timeout)

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
                if self.endpoints is not None:
                    self.endpoints.close()
                self.server.close()
                for _listener, task in self._extra.values():
                    task.cancel()
                self._task.cancel()

            self.loop.call_soon_threadsafe(shutdown)
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise RuntimeError("the vhost-user server thread did not stop")
        self._listener.close()
        for path, (listener, _task) in self._extra.items():
            listener.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self._serving.result(0)
        if self.loop_errors:
            raise RuntimeError(f"unhandled errors on the server's event loop: {self.loop_errors}")


@contextlib.contextmanager
def running_server(backend_factory: Callable[[], VhostUserBackend]) -> Iterator[RunningServer]:
    """A :class:`RunningServer` on a socket in a private temporary directory (``server.path``'s), stopped
    and the directory removed at the end."""
    # A short directory: unix socket paths are limited to 108 bytes and pytest's tmp_path can exceed it.
    with tempfile.TemporaryDirectory(prefix="vhost-") as directory:
        server = RunningServer(backend_factory, os.path.join(directory, "sock"))
        try:
            yield server
        finally:
            server.stop()

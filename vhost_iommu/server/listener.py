"""Accepting front-ends: the unix socket listener, ``--fd`` sockets, and the event loop choice.

:class:`VhostUserServer` creates one back-end (through the factory) and one :class:`Connection` per accepted
front-end. Connections are independent: one failing, being reset or broken never touches another, and the
server keeps accepting after any of them ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import logging
import os
import secrets
import socket
import stat
import sys
from collections.abc import Callable

from vhost_iommu.backend import VhostUserBackend
from vhost_iommu.server.connection import Connection

log = logging.getLogger(__name__)

BackendFactory = Callable[[], VhostUserBackend]


class SocketPathError(Exception):
    """The socket path cannot be used (not a socket, in use by a live server, or not creatable)."""


class VhostUserServer:
    """Serves front-ends with a fresh back-end per connection, on the running event loop."""

    def __init__(self, backend_factory: BackendFactory) -> None:
        self._factory = backend_factory
        self._counter = itertools.count(1)
        self.connections: set[Connection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False

    def serve_connection(self, sock: socket.socket) -> Connection:
        """Start serving one connected socket (the server owns it from now on)."""
        loop = asyncio.get_running_loop()
        name = f"connection {next(self._counter)}"
        try:
            backend = self._factory()
            connection = Connection(sock, backend, loop, name)
        except Exception:
            sock.close()
            raise
        self.connections.add(connection)
        connection.done.add_done_callback(lambda _future: self.connections.discard(connection))
        return connection

    async def serve_listener(self, listener: socket.socket) -> None:
        """Accept front-ends on ``listener`` until :meth:`close` (the caller keeps owning ``listener``)."""
        loop = asyncio.get_running_loop()
        listener.setblocking(False)
        while not self._closing:
            try:
                sock, _ = await loop.sock_accept(listener)
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.error("cannot accept a connection now (%s); retrying in a second", exc)
                    await asyncio.sleep(1)
                    continue
                raise
            try:
                self.serve_connection(sock)
            except Exception:
                log.exception("could not start serving a new connection")

    async def serve_socket(self, sock: socket.socket) -> None:
        """Serve ``sock``: accept on it if it is listening, else serve it as the one connection."""
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            await self.serve_listener(sock)
        else:
            await self.serve_connection(sock).wait_closed()

    def close(self) -> None:
        """Close every connection (each resets its device and closes its fds)."""
        self._closing = True
        for connection in list(self.connections):
            connection.close()


def bind_unix_socket(path: str, mode: int = 0o600) -> socket.socket:
    """A listening unix socket at ``path`` with permissions ``mode``.

    An existing path that is not a socket is refused; a socket nobody accepts on (stale, left by a dead
    server) is replaced; a live one is refused. The socket appears at ``path`` with its final mode already
    set: it is bound under a temporary name, chmod'ed, then renamed into place.
    """
    try:
        existing = os.lstat(path)
    except FileNotFoundError:
        existing = None
    if existing is not None:
        if not stat.S_ISSOCK(existing.st_mode):
            raise SocketPathError(f"{path} exists and is not a socket; refusing to replace it")
        if _socket_is_live(path):
            raise SocketPathError(f"{path} is in use by a running server")
        log.info("replacing stale socket %s", path)
    directory = os.path.dirname(os.path.abspath(path))
    # Short, so that a path near the 108-byte limit of unix socket addresses still fits.
    temporary = os.path.join(directory, f".{os.getpid()}.{secrets.token_hex(2)}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(temporary)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        listener.bind(temporary)
        os.chmod(temporary, mode)
        listener.listen(8)
        os.replace(temporary, path)
    except OSError as exc:
        listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise SocketPathError(f"cannot create socket {path}: {exc.strerror or exc}") from None
    return listener


def _socket_is_live(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError as exc:
        raise SocketPathError(f"cannot tell whether {path} is in use: {exc.strerror or exc}") from None
    finally:
        probe.close()
    return True


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop on Linux when installed, else asyncio's default loop."""
    if sys.platform == "linux":
        try:
            import uvloop
        except ImportError:
            log.debug("uvloop is not installed; using asyncio's event loop")
        else:
            loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
            return loop
    return asyncio.new_event_loop()

"""Accepting front-ends: the unix socket listeners, ``--fd`` sockets, and the event loop choice.

:class:`VhostUserServer` creates one back-end (through the factory) and one :class:`Connection` per accepted
front-end, on as many listening sockets as it is given (one per guest). Connections are independent: one
failing, being reset or broken never touches another, and the server keeps accepting after any of them
ends.

Socket files (:func:`create_unix_listener`): created with their final mode inside a private directory and
linked into place, so nobody reaches a socket more open than asked, and nothing already at the path but a
stale socket is ever replaced; removed only if the path still holds the socket this process made.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import logging
import os
import socket
import stat
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

from vhost_iommu.backend import VhostUserBackend
from vhost_iommu.server.connection import Connection

log = logging.getLogger(__name__)

BackendFactory = Callable[[], VhostUserBackend]

#: accept(2) errors that concern one pending connection only (accept(2) "Error handling": the listener is
#: fine and the next accept may succeed).
_ONE_CONNECTION_FAILED = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM})


class SocketPathError(Exception):
    """The socket path cannot be used (not a socket, in use by a live server, or not creatable)."""


class VhostUserServer:
    """Serves front-ends with a fresh back-end per connection, on the running event loop."""

    def __init__(self, backend_factory: BackendFactory) -> None:
        self._factory = backend_factory
        self._counter = itertools.count(1)
        self.connections: set[Connection] = set()
        #: Where each live connection came from (the socket path or "fd N" given to serve_*), for the
        #: log and the control channel; absent for connections served without an origin.
        self.origins: dict[Connection, str] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False

    def serve_connection(self, sock: socket.socket, origin: str | None = None) -> Connection:
        """Start serving one connected socket (the server owns it from now on).

        ``origin`` names the listening socket it came from: it is added to the connection's name (so a log
        line says which guest it is about) and kept in :attr:`origins`."""
        loop = asyncio.get_running_loop()
        number = next(self._counter)
        name = f"connection {number}" if origin is None else f"connection {number} on {origin}"
        try:
            backend = self._factory()
            connection = Connection(sock, backend, loop, name)
        except Exception:
            sock.close()
            raise
        self.connections.add(connection)
        if origin is not None:
            self.origins[connection] = origin

        def forget(_future: object) -> None:
            self.connections.discard(connection)
            self.origins.pop(connection, None)

        connection.done.add_done_callback(forget)
        return connection

    def origin(self, connection: Connection) -> str | None:
        """The socket ``connection`` was accepted on, if it was served with one."""
        return self.origins.get(connection)

    async def serve_listener(self, listener: socket.socket, origin: str | None = None) -> None:
        """Accept front-ends on ``listener`` until :meth:`close` (the caller keeps owning ``listener``).

        Several listeners may be served at once by one server (a guest per socket); each accepted
        front-end gets its own back-end whichever socket it came on."""
        loop = asyncio.get_running_loop()
        listener.setblocking(False)
        while not self._closing:
            try:
                sock, _ = await loop.sock_accept(listener)
            except OSError as exc:
                if exc.errno in _ONE_CONNECTION_FAILED:
                    # That front-end went away between connect and accept: its trouble, not the socket's.
                    log.info("a connection was lost before it was accepted (%s)", exc)
                    continue
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.error("cannot accept a connection now (%s); retrying in a second", exc)
                    await asyncio.sleep(1)
                    continue
                raise
            try:
                self.serve_connection(sock, origin)
            except Exception:
                log.exception("could not start serving a new connection")

    async def serve_socket(self, sock: socket.socket, origin: str | None = None) -> None:
        """Serve ``sock``: accept on it if it is listening, else serve it as the one connection."""
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            await self.serve_listener(sock, origin)
        else:
            await self.serve_connection(sock, origin).wait_closed()

    def close(self) -> None:
        """Close every connection (each resets its device and closes its fds)."""
        self._closing = True
        for connection in list(self.connections):
            connection.close()


@dataclass(frozen=True)
class SocketFile:
    """The socket file a listener was bound to: its path and the inode this process created there."""

    path: str
    device: int
    inode: int

    def remove(self) -> bool:
        """Unlink :attr:`path` if it still is our socket; True if it was removed.

        Whatever else stands there now (put by someone with write access to the directory after we bound)
        is left alone: a program cleaning up must not delete a file it did not make."""
        try:
            current = os.lstat(self.path)
        except FileNotFoundError:
            return False
        if (current.st_dev, current.st_ino) != (self.device, self.inode):
            log.warning("%s is no longer the socket this process created; leaving it", self.path)
            return False
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        return True


def bind_unix_socket(path: str, mode: int = 0o600) -> socket.socket:
    """A listening unix socket at ``path`` with permissions ``mode`` (see :func:`create_unix_listener`)."""
    listener, _ = create_unix_listener(path, mode)
    return listener


def create_unix_listener(path: str, mode: int = 0o600) -> tuple[socket.socket, SocketFile]:
    """A listening unix socket at ``path`` with permissions ``mode``, and the file it made.

    An existing path that is not a socket (a regular file, a directory, a symlink, a FIFO) is refused; a
    socket nobody accepts on (stale, left by a dead server) is replaced; a live one is refused. The socket
    is bound inside a fresh 0700 directory of ours next to ``path``, chmod'ed there (nobody else can
    reach or swap it), then hard-linked to ``path``: a link never overwrites, so a file that appears at
    ``path`` meanwhile is refused rather than replaced, and the socket is never reachable with a wider
    mode than ``mode``.
    """
    existing = _lstat(path)
    if existing is not None:
        if not stat.S_ISSOCK(existing.st_mode):
            raise SocketPathError(f"{path} exists and is not a socket; refusing to replace it")
        if _socket_is_live(path):
            raise SocketPathError(f"{path} is in use by a running server")
        log.info("replacing stale socket %s", path)
        # Only the stale socket we just looked at; if something else takes its place before the link
        # below, the link fails and nothing is overwritten.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    directory = os.path.dirname(os.path.abspath(path))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    private: str | None = None
    try:
        # Short names: a path near the 108-byte limit of unix socket addresses should still fit.
        private = tempfile.mkdtemp(prefix=".", dir=directory)
        temporary = os.path.join(private, "s")
        # Linux gives the new socket file the socket inode's mode less the umask: never wider than mode.
        os.fchmod(listener.fileno(), mode)
        listener.bind(temporary)
        os.chmod(temporary, mode)  # exactly mode, whatever the umask took away; safe in our 0700 directory
        listener.listen(8)
        os.link(temporary, path)
        created = os.lstat(path)
    except OSError as exc:
        listener.close()
        if isinstance(exc, FileExistsError):
            message = f"{path} appeared while the socket was being created; not replacing it"
            raise SocketPathError(message) from None
        raise SocketPathError(f"cannot create socket {path}: {exc.strerror or exc}") from None
    finally:
        if private is not None:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(private, "s"))
            with contextlib.suppress(OSError):
                os.rmdir(private)
    return listener, SocketFile(path, created.st_dev, created.st_ino)


def _lstat(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise SocketPathError(f"cannot use {path}: {exc.strerror or exc}") from None


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

"""Accepting front-ends: the unix socket listeners, ``--fd`` sockets, and the event loop choice.

:class:`VhostUserServer` creates one back-end (through the factory) and one :class:`Connection` per accepted
front-end, on as many listening sockets as it is given (one per guest). Connections are independent: one
failing, being reset or broken never touches another, and the server keeps accepting after any of them
ends.

Socket files (:func:`create_unix_listener`) are made by :mod:`vhost_iommu.sockfile`.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import logging
import socket
import sys
from collections.abc import Callable

from vhost_iommu.backend import VhostUserBackend
from vhost_iommu.server.connection import Connection

# Socket files live in a module of their own (stdlib only) so that the keeper can make them without
# importing the server; re-exported here, where callers have always found them.
from vhost_iommu.sockfile import SocketFile as SocketFile
from vhost_iommu.sockfile import SocketPathError as SocketPathError
from vhost_iommu.sockfile import bind_unix_socket as bind_unix_socket
from vhost_iommu.sockfile import create_unix_listener as create_unix_listener

log = logging.getLogger(__name__)

BackendFactory = Callable[[], VhostUserBackend]

#: accept(2) errors that concern one pending connection only (accept(2) "Error handling": the listener is
#: fine and the next accept may succeed).
_ONE_CONNECTION_FAILED = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM})


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
        front-end gets its own back-end whichever socket it came on. One socket serves one front-end at a
        time (QEMU connects once per device): a second one while the first is connected is closed at
        once, and the first goes on undisturbed; once the first has gone, the socket takes the next."""
        loop = asyncio.get_running_loop()
        listener.setblocking(False)
        current: Connection | None = None
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
            if current is not None:
                current.finish_if_peer_gone()  # a front-end that just left and came back is let in
                if not current.done.done():
                    log.warning(
                        "%s: refused a second front-end while %s is connected (one front-end per socket)",
                        origin or "socket",
                        current.name,
                    )
                    sock.close()
                    continue
            try:
                current = self.serve_connection(sock, origin)
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

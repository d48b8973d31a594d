"""The control socket: a unix socket on the back-end's event loop, JSON lines, one client task each.

The socket is created mode 0600 (through the server's own :func:`create_unix_listener`) and, because a mode
can be widened later and a directory's permissions are not ours to trust, each accepted peer's uid is read
with SO_PEERCRED and anyone but this process's uid (or root) is refused with one error line.

Requests are served one at a time per client, synchronously on the loop: a command never interleaves with
the handling of a kick, so it sees the device between two requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct

from vhost_iommu.control.protocol import (
    INTERNAL,
    LINE_TOO_LONG,
    MAX_LINE,
    ControlError,
    encode_error,
    encode_result,
    parse_request,
)
from vhost_iommu.control.service import ControlService
from vhost_iommu.server import SocketFile, create_unix_listener

log = logging.getLogger(__name__)

_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
#: Clients served at once; more wait in the listen backlog. A tool, not a service for crowds.
MAX_CLIENTS = 16


def peer_uid(sock: socket.socket) -> int:
    _pid, uid, _gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return int(uid)


class ControlServer:
    """Accepts control clients on ``path`` and answers them with ``service``, on the running loop."""

    def __init__(
        self,
        service: ControlService,
        path: str,
        *,
        mode: int = 0o600,
        listener: socket.socket | None = None,
    ) -> None:
        self.service = service
        self.path = path
        # A listener handed over (the keeper's, serve --state-dir) stays its owner's: not removed here.
        self._socket_file: SocketFile | None = None
        if listener is None:
            self._listener, self._socket_file = create_unix_listener(path, mode)
        else:
            self._listener = listener
        self._listener.setblocking(False)
        self._server: asyncio.AbstractServer | None = None
        self._clients: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(MAX_CLIENTS)
        self.refused = 0

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._client, sock=self._listener, limit=MAX_LINE)

    async def close(self) -> None:
        """Stop accepting, end every client, remove the socket."""
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None
        for task in list(self._clients):
            task.cancel()
        for task in list(self._clients):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._listener.close()
        if self._socket_file is not None:
            # Only the socket this server made: whatever stands at the path now (someone replaced it) stays.
            self._socket_file.remove()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._clients.add(task)
        try:
            await self._session(reader, writer)
        except asyncio.CancelledError:
            # close() ends clients by cancelling them. The task must still end normally: Python 3.11's
            # start_unix_server asks a finished client task for its exception(), which raises for a
            # cancelled task and lands on the loop's exception handler as an unhandled error.
            writer.close()
        finally:
            self._clients.discard(task)

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            sock = writer.get_extra_info("socket")
            uid = peer_uid(sock) if sock is not None else -1
            if uid not in (os.getuid(), 0):
                self.refused += 1
                log.warning("control: refused a client of uid %d", uid)
                writer.write(
                    encode_error("permission-denied", "this back-end is controlled by its own user only")
                )
                await writer.drain()
                return
            async with self._slots:
                await self._serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                line = await reader.readuntil(b"\n")
            except asyncio.LimitOverrunError:
                writer.write(encode_error(LINE_TOO_LONG, f"a request line is at most {MAX_LINE} bytes"))
                await writer.drain()
                return  # the rest of the line cannot be told apart from the next request
            except asyncio.IncompleteReadError as exc:
                if exc.partial.strip():
                    writer.write(self.answer(exc.partial))
                    await writer.drain()
                return
            if not line.strip():
                continue
            writer.write(self.answer(line))
            await writer.drain()

    def answer(self, line: bytes) -> bytes:
        """The reply line to one request line (never raises)."""
        try:
            return encode_result(self.service.handle(parse_request(line)))
        except ControlError as exc:
            return encode_error(exc.code, exc.message)
        except Exception as exc:
            log.exception("control: a command failed")
            return encode_error(INTERNAL, f"{type(exc).__name__}: {exc}")

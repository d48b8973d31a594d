"""One front-end connection on the event loop: recvmsg with SCM_RIGHTS, the codec, the handler, replies.

Reads go through ``loop.add_reader`` and ``socket.recvmsg`` (asyncio has no recvmsg with ancillary data,
and this works the same on uvloop). Each read asks for at most what the decoder needs to finish the
current header or payload, so fds never get attached to the wrong message. Replies are written directly
and only buffered when the socket is full.
"""

from __future__ import annotations

import array
import asyncio
import logging
import select
import socket

from vhost_iommu.backend import VhostUserBackend
from vhost_iommu.protocol import (
    MAX_FDS_PER_MESSAGE,
    Decoder,
    FramingError,
    RequestRejected,
    Stream,
    close_fds,
)
from vhost_iommu.server.handler import ConnectionFatal, ConnectionHandler

log = logging.getLogger(__name__)

_FD_SIZE = array.array("i").itemsize
ANCILLARY_SPACE = socket.CMSG_SPACE(MAX_FDS_PER_MESSAGE * _FD_SIZE)
#: Messages handled per readiness callback before yielding to other connections and kick fds.
_MESSAGES_PER_WAKEUP = 64
#: Replies buffered for a front-end that stopped reading them; past this the connection is closed
#: rather than letting one peer grow our memory without bound.
MAX_PENDING_OUTPUT = 1 << 20


def received_fds(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    """The fds of every SCM_RIGHTS control message (any other control message is ignored)."""
    fds: list[int] = []
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % _FD_SIZE
            fds.extend(array.array("i", data[:usable]))
    return fds


class Connection:
    """Serves one connected socket until the peer goes away, a fatal error, or :meth:`close`."""

    def __init__(
        self, sock: socket.socket, backend: VhostUserBackend, loop: asyncio.AbstractEventLoop, name: str
    ) -> None:
        self.name = name
        self._sock = sock
        self._loop = loop
        self._decoder = Decoder(Stream.FRONTEND_REQUESTS)
        self._outgoing = bytearray()
        self._writer_armed = False
        self.done: asyncio.Future[None] = loop.create_future()
        sock.setblocking(False)
        self.handler = ConnectionHandler(backend, loop, self._send, name=name, on_fatal=self._fatal)
        loop.add_reader(sock.fileno(), self._on_readable)
        log.info("%s: connected", name)

    async def wait_closed(self) -> None:
        await asyncio.shield(self.done)

    # -- reading --------------------------------------------------------------------------------------------

    def finish_if_peer_gone(self) -> None:
        """If the front-end has hung up but the loop has not yet seen it, serve what it sent last and end
        the connection now (so that a front-end reconnecting at once finds its old connection gone)."""
        fileno = self._sock.fileno()
        if self.done.done() or fileno < 0:
            return
        poller = select.poll()
        poller.register(fileno, select.POLLRDHUP | select.POLLHUP)
        if not poller.poll(0):
            return
        # A hung-up peer can have left at most a socket buffer of messages: bounded work.
        while not self.done.done():
            self._on_readable()

    def _on_readable(self) -> None:
        try:
            for _ in range(_MESSAGES_PER_WAKEUP):
                if not self._read_once():
                    return
        except ConnectionFatal as exc:
            self._fatal(exc)
        except Exception as exc:
            self._fatal(exc)

    def _read_once(self) -> bool:
        """Read and process what one recvmsg returns; False when there is nothing more to read now."""
        try:
            data, ancillary, flags, _ = self._sock.recvmsg(
                self._decoder.bytes_needed(), ANCILLARY_SPACE, socket.MSG_CMSG_CLOEXEC
            )
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            log.info("%s: read failed (%s); closing", self.name, exc)
            self.close()
            return False
        fds = received_fds(ancillary)
        if flags & socket.MSG_CTRUNC:
            close_fds(fds)
            raise FramingError(
                f"ancillary data truncated: a message carried more than {MAX_FDS_PER_MESSAGE} fds"
            )
        if not data:
            close_fds(fds)
            self._decoder.feed_eof()
            self._process()  # raises FramingError if the front-end left in the middle of a message
            log.info("%s: front-end disconnected", self.name)
            self.close()
            return False
        self._decoder.feed(data, fds)
        self._process()
        return not self.done.done()

    def _process(self) -> None:
        while not self.done.done():
            try:
                message = self._decoder.next_message()
            except RequestRejected as exc:
                self.handler.reject(exc)
                continue
            if message is None:
                return
            log.debug("%s: %r %s fds=%s", self.name, message.code, message.payload, message.fds)
            self.handler.handle(message)

    # -- writing --------------------------------------------------------------------------------------------

    def _send(self, data: bytes) -> None:
        if self.done.done():
            return
        if not self._outgoing:
            try:
                sent = self._sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                log.info("%s: write failed (%s); closing", self.name, exc)
                self._loop.call_soon(self.close)
                return
            data = data[sent:]
        if data:
            if len(self._outgoing) + len(data) > MAX_PENDING_OUTPUT:
                log.warning("%s: the front-end is not reading its replies; closing", self.name)
                self._loop.call_soon(self.close)
                return
            self._outgoing += data
            if not self._writer_armed:
                self._writer_armed = True
                self._loop.add_writer(self._sock.fileno(), self._on_writable)

    def _on_writable(self) -> None:
        try:
            sent = self._sock.send(self._outgoing)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.info("%s: write failed (%s); closing", self.name, exc)
            self.close()
            return
        del self._outgoing[:sent]
        if not self._outgoing:
            self._writer_armed = False
            self._loop.remove_writer(self._sock.fileno())

    # -- ending ---------------------------------------------------------------------------------------------

    def _fatal(self, exc: BaseException) -> None:
        if isinstance(exc, FramingError | ConnectionFatal):
            log.warning("%s: protocol error, closing the connection: %s", self.name, exc)
        else:
            log.error("%s: unexpected error, closing the connection", self.name, exc_info=exc)
        self.close()

    def close(self) -> None:
        """End the connection: stop reading, reset the device, close every fd it held."""
        if self.done.done():
            return
        self.done.set_result(None)
        fileno = self._sock.fileno()
        if fileno >= 0:
            self._loop.remove_reader(fileno)
            if self._writer_armed:
                self._loop.remove_writer(fileno)
        try:
            self.handler.close()
        except Exception:
            log.exception("%s: the back-end failed while being reset at disconnect", self.name)
        finally:
            self._decoder.close()
            self._sock.close()
            log.info("%s: closed", self.name)

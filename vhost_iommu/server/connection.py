"""One front-end connection on the event loop: recvmsg with SCM_RIGHTS, the codec, the handler, replies.

Reads go through ``loop.add_reader`` and ``socket.recvmsg`` (asyncio has no recvmsg with ancillary data,
and this works the same on uvloop). Each read asks for at most what the decoder needs to finish the
current header or payload, so fds never get attached to the wrong message. Replies are written directly
and only buffered when the socket is full.
"""

from __future__ import annotations

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
from vhost_iommu.server.socket_io import BufferedSender, ancillary_space, receive

log = logging.getLogger(__name__)

ANCILLARY_SPACE = ancillary_space(MAX_FDS_PER_MESSAGE)
#: Messages handled per readiness callback before yielding to other connections and kick fds.
_MESSAGES_PER_WAKEUP = 64


class Connection:
    """Serves one connected socket until the peer goes away, a fatal error, or :meth:`close`."""

    def __init__(
        self, sock: socket.socket, backend: VhostUserBackend, loop: asyncio.AbstractEventLoop, name: str
    ) -> None:
        self.name = name
        self._sock = sock
        self._loop = loop
        self._decoder = Decoder(Stream.FRONTEND_REQUESTS)
        self.done: asyncio.Future[None] = loop.create_future()
        sock.setblocking(False)
        self._sender = BufferedSender(sock, loop, name, "front-end", self.close)
        self.handler = ConnectionHandler(backend, loop, self._sender.send, name=name, on_fatal=self._fatal)
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
            received = receive(self._sock, self._decoder.bytes_needed(), ANCILLARY_SPACE)
        except OSError as exc:
            log.info("%s: read failed (%s); closing", self.name, exc)
            self.close()
            return False
        if received is None:
            return False
        data, fds, truncated = received
        if truncated:
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
        self._sender.stop()
        try:
            self.handler.close()
        except Exception:
            log.exception("%s: the back-end failed while being reset at disconnect", self.name)
        finally:
            self._decoder.close()
            self._sock.close()
            log.info("%s: closed", self.name)

"""One vfio-user client connection on the event loop: recvmsg with SCM_RIGHTS, the codec, the handler.

The same shape as the vhost-user server's connection: reads through ``loop.add_reader`` and
``socket.recvmsg`` asking for no more than the decoder needs (so fds attach to the right message), replies
written at once and buffered only while the socket is full, a bounded output buffer. A protocol violation
or a session error closes the connection with a log line that says why; nothing of it outlives
:meth:`close` (fds, mappings, the reader).
"""

from __future__ import annotations

import asyncio
import logging
import socket

from vhost_iommu.server.socket_io import BufferedSender, ancillary_space, receive
from vhost_iommu.vfio_server.handler import SessionError, VfioUserHandler
from vhost_iommu.vfio_user import close_fds, codec
from vhost_iommu.vfio_user import constants as vu

log = logging.getLogger(__name__)

_ANCILLARY_SPACE = ancillary_space(vu.MAX_FDS_PER_MESSAGE)
_MESSAGES_PER_WAKEUP = 64


class VfioUserConnection:
    """Serves one connected vfio-user client until it goes away, breaks the protocol, or :meth:`close`."""

    def __init__(
        self, sock: socket.socket, handler: VfioUserHandler, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.handler = handler
        self.name = handler.name
        self._sock = sock
        self._loop = loop
        self._decoder = codec.Decoder()
        self.done: asyncio.Future[None] = loop.create_future()
        sock.setblocking(False)
        self._sender = BufferedSender(sock, loop, self.name, "client", self.close)
        loop.add_reader(sock.fileno(), self._on_readable)
        log.info("%s: vfio-user client connected", self.name)

    async def wait_closed(self) -> None:
        await asyncio.shield(self.done)

    def _on_readable(self) -> None:
        try:
            for _ in range(_MESSAGES_PER_WAKEUP):
                if not self._read_once():
                    return
        except (codec.VfioUserProtocolError, SessionError) as exc:
            log.warning("%s: protocol error, closing the connection: %s", self.name, exc)
            self.close()
        except Exception:
            log.exception("%s: unexpected error, closing the connection", self.name)
            self.close()

    def _read_once(self) -> bool:
        try:
            received = receive(self._sock, self._decoder.bytes_needed(), _ANCILLARY_SPACE)
        except OSError as exc:
            log.info("%s: read failed (%s); closing", self.name, exc)
            self.close()
            return False
        if received is None:
            return False
        data, fds, truncated = received
        if truncated:
            close_fds(fds)
            raise codec.VfioUserProtocolError(f"a message carried more than {vu.MAX_FDS_PER_MESSAGE} fds")
        if not data:
            close_fds(fds)
            log.info("%s: vfio-user client disconnected", self.name)
            self.close()
            return False
        for request in self._decoder.feed(data, fds):
            if self.done.done():
                self.handler.close_fds_of(request)
                continue
            reply = self.handler.handle(request)
            if reply is not None:
                self._sender.send(reply)
        return not self.done.done()

    def close(self) -> None:
        if self.done.done():
            return
        self.done.set_result(None)
        fileno = self._sock.fileno()
        if fileno >= 0:
            self._loop.remove_reader(fileno)
        self._sender.stop()
        try:
            self.handler.close()
        finally:
            self._decoder.close()
            self._sock.close()
            log.info("%s: closed", self.name)

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

from vhost_iommu.server.connection import MAX_PENDING_OUTPUT, received_fds
from vhost_iommu.vfio_server.handler import SessionError, VfioUserHandler
from vhost_iommu.vfio_user import close_fds, codec
from vhost_iommu.vfio_user import constants as vu

log = logging.getLogger(__name__)

_ANCILLARY_SPACE = socket.CMSG_SPACE(vu.MAX_FDS_PER_MESSAGE * 4)
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
        self._outgoing = bytearray()
        self._writer_armed = False
        self.done: asyncio.Future[None] = loop.create_future()
        sock.setblocking(False)
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
            data, ancillary, flags, _ = self._sock.recvmsg(
                self._decoder.bytes_needed(), _ANCILLARY_SPACE, socket.MSG_CMSG_CLOEXEC
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
                self._send(reply)
        return not self.done.done()

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
                log.warning("%s: the client is not reading its replies; closing", self.name)
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

    def close(self) -> None:
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
        finally:
            self._decoder.close()
            self._sock.close()
            log.info("%s: closed", self.name)

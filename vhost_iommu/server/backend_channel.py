"""The back-end -> front-end channel of one connection (SET_BACKEND_REQ_FD)."""

from __future__ import annotations

import asyncio
import logging
import socket

from vhost_iommu.protocol import U64, BackendRequest, Decoder, ProtocolError, Stream, encode

log = logging.getLogger(__name__)


class BackendChannel:
    """The back-end -> front-end socket from SET_BACKEND_REQ_FD: sends requests, reads their REPLY_ACKs."""

    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop, name: str) -> None:
        self._sock = sock
        self._loop = loop
        self._name = name
        self._decoder = Decoder(Stream.FRONTEND_REPLIES)
        self.acks_pending = 0
        self.failures = 0
        sock.setblocking(False)
        loop.add_reader(sock.fileno(), self._on_readable)

    @property
    def open(self) -> bool:
        return self._sock.fileno() >= 0

    def fileno(self) -> int:
        return self._sock.fileno()

    def send(self, code: BackendRequest, need_reply: bool) -> None:
        data = encode(code, need_reply=need_reply)
        try:
            sent = self._sock.send(data)
        except OSError as exc:
            log.warning("%s: back-end channel send failed (%s); closing the channel", self._name, exc)
            self.close()
            return
        if sent != len(data):
            # A 12-byte message only fails to fit when the front-end stopped reading long ago.
            log.warning("%s: back-end channel full; closing it", self._name)
            self.close()
            return
        if need_reply:
            self.acks_pending += 1

    def _on_readable(self) -> None:
        try:
            data = self._sock.recv(4096)
        except BlockingIOError:
            return
        except OSError as exc:
            log.warning("%s: back-end channel read failed (%s)", self._name, exc)
            self.close()
            return
        if not data:
            log.info("%s: front-end closed the back-end channel", self._name)
            self.close()
            return
        self._decoder.feed(data)
        try:
            for reply in self._decoder.messages():
                self.acks_pending = max(0, self.acks_pending - 1)
                assert isinstance(reply.payload, U64)
                if reply.payload.value != 0:
                    self.failures += 1
                    log.warning(
                        "%s: front-end answered %r with failure %d",
                        self._name,
                        reply.code,
                        reply.payload.value,
                    )
        except ProtocolError as exc:
            log.warning("%s: bad reply on the back-end channel (%s); closing it", self._name, exc)
            self.close()

    def close(self) -> None:
        if self._sock.fileno() >= 0:
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
        self._decoder.close()


__all__ = ["BackendChannel"]

"""What every connection of the event loop does with its socket, whatever protocol it speaks (vhost-user
here, vfio-user in ``vfio_server``): one recvmsg with SCM_RIGHTS of at most what the decoder needs, and
replies written at once, buffered only while the socket is full, in a bounded buffer."""

from __future__ import annotations

import array
import asyncio
import logging
import socket
from collections.abc import Callable

log = logging.getLogger(__name__)

_FD_SIZE = array.array("i").itemsize
#: Replies buffered for a peer that stopped reading them; past this the connection is closed rather than
#: letting one peer grow our memory without bound.
MAX_PENDING_OUTPUT = 1 << 20


def received_fds(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    """The fds of every SCM_RIGHTS control message (any other control message is ignored)."""
    fds: list[int] = []
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % _FD_SIZE
            fds.extend(array.array("i", data[:usable]))
    return fds


def ancillary_space(max_fds: int) -> int:
    """The control-message room for ``max_fds`` fds: one more would be truncated (MSG_CTRUNC)."""
    return socket.CMSG_SPACE(max_fds * _FD_SIZE)


def receive(sock: socket.socket, size: int, room: int) -> tuple[bytes, list[int], bool] | None:
    """One recvmsg of at most ``size`` bytes and the fds that came with them (close-on-exec), and whether
    more fds came than ``room`` holds (they are lost: the message is unusable); None when nothing is to
    be read now. OSError other than EAGAIN/EINTR propagates."""
    try:
        data, ancillary, flags, _ = sock.recvmsg(size, room, socket.MSG_CMSG_CLOEXEC)
    except (BlockingIOError, InterruptedError):
        return None
    return data, received_fds(ancillary), bool(flags & socket.MSG_CTRUNC)


class BufferedSender:
    """Writes to a non-blocking socket at once; what the socket cannot take yet waits in a buffer that the
    loop drains when the socket is writable. A write error, or a peer that lets more than
    MAX_PENDING_OUTPUT pile up, calls ``close`` (soon: never from inside the caller's send)."""

    def __init__(
        self,
        sock: socket.socket,
        loop: asyncio.AbstractEventLoop,
        name: str,
        peer: str,
        close: Callable[[], None],
    ) -> None:
        self._sock = sock
        self._loop = loop
        self._name = name
        self._peer = peer
        self._close = close
        self._outgoing = bytearray()
        self._armed = False
        self.stopped = False

    def send(self, data: bytes) -> None:
        if self.stopped:
            return
        if not self._outgoing:
            try:
                sent = self._sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                log.info("%s: write failed (%s); closing", self._name, exc)
                self._loop.call_soon(self._close)
                return
            data = data[sent:]
        if data:
            if len(self._outgoing) + len(data) > MAX_PENDING_OUTPUT:
                log.warning("%s: the %s is not reading its replies; closing", self._name, self._peer)
                self._loop.call_soon(self._close)
                return
            self._outgoing += data
            if not self._armed:
                self._armed = True
                self._loop.add_writer(self._sock.fileno(), self._on_writable)

    def _on_writable(self) -> None:
        try:
            sent = self._sock.send(self._outgoing)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.info("%s: write failed (%s); closing", self._name, exc)
            self._close()
            return
        del self._outgoing[:sent]
        if not self._outgoing:
            self._armed = False
            self._loop.remove_writer(self._sock.fileno())

    def stop(self) -> None:
        """Write nothing more; the loop stops watching the socket for room (call before closing it)."""
        self.stopped = True
        fileno = self._sock.fileno()
        if self._armed and fileno >= 0:
            self._loop.remove_writer(fileno)
        self._armed = False
        self._outgoing.clear()
        # The owner's close refers back to the owner, which holds this sender: without this the two wait
        # for the cycle collector, and with them the owner's device and its tables (a session's memory).
        self._close = _do_nothing


def _do_nothing() -> None:
    pass

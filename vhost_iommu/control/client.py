"""A blocking client of the control socket, for ``vhost-iommu ctl``, tests and scripts."""

from __future__ import annotations

import socket
from types import TracebackType
from typing import Any

from vhost_iommu.control.protocol import MAX_LINE, ControlError, decode_reply, encode_request

UNREACHABLE = "unreachable"


class ControlClient:
    """One connection to a back-end's control socket; :meth:`call` sends a request and returns its result."""

    def __init__(self, path: str, *, timeout: float = 10.0) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(path)
        except OSError as exc:
            self._sock.close()
            raise ControlError(UNREACHABLE, f"{path}: {exc.strerror or exc}") from None
        self._buffer = bytearray()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._sock.close()

    def send_line(self, line: bytes) -> bytes:
        """Send raw bytes (tests use it to send what no well-behaved client would) and read one reply line."""
        try:
            self._sock.sendall(line)
            while b"\n" not in self._buffer:
                data = self._sock.recv(65536)
                if not data:
                    raise ControlError(UNREACHABLE, "the back-end closed the control connection")
                self._buffer += data
                if len(self._buffer) > 64 * MAX_LINE and b"\n" not in self._buffer:
                    raise ControlError(UNREACHABLE, "the back-end's reply line is unreasonably long")
        except OSError as exc:
            raise ControlError(UNREACHABLE, f"control socket: {exc.strerror or exc}") from None
        end = self._buffer.index(b"\n") + 1
        line = bytes(self._buffer[:end])
        del self._buffer[:end]
        return line

    def call(self, command: str, **arguments: Any) -> Any:
        """The result of ``command``; ControlError (with the back-end's code and message) when refused."""
        present = {name: value for name, value in arguments.items() if value is not None}
        return decode_reply(self.send_line(encode_request(command, present)))

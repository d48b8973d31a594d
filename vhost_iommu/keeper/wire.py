"""The keeper <-> worker channel: one SOCK_SEQPACKET socketpair, one datagram per message.

A datagram is a u32 length, a JSON object (the *head*: ``op`` and its fields), then an opaque payload (a
vhost-user message, a reply, an encoded session); fds ride in the same datagram as SCM_RIGHTS. Seqpacket
keeps datagram boundaries and attaches fds to exactly one datagram, and a datagram arrives whole or not at
all: a worker killed half-way through a send leaves nothing behind for the keeper to misread.

Stdlib only: the keeper imports it.
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import socket
import struct
from collections.abc import Sequence
from typing import Any

#: Largest datagram either side sends (an encoded session is at most 256 KiB, a relayed message 4 KiB).
MAX_DATAGRAM = (1 << 18) + (1 << 16)
#: The kernel's SCM_MAX_FD: no datagram carries more fds.
MAX_FDS = 253
MAX_HEAD = 1 << 16

_LENGTH = struct.Struct("=I")
_FD_SIZE = array.array("i").itemsize
_ANCILLARY = socket.CMSG_SPACE(MAX_FDS * _FD_SIZE)


class WireError(Exception):
    """A datagram that is not what the channel carries."""


Datagram = tuple[dict[str, Any], bytes, list[int]]


def channel_pair() -> tuple[socket.socket, socket.socket]:
    """(keeper end, worker end); both close-on-exec (the worker's end is passed explicitly)."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)


def send(sock: socket.socket, head: dict[str, Any], payload: bytes = b"", fds: Sequence[int] = ()) -> None:
    """Send one datagram (blocking, or raising BlockingIOError/TimeoutError per the socket's mode)."""
    if len(fds) > MAX_FDS:
        raise WireError(f"{len(fds)} fds in one datagram; at most {MAX_FDS}")
    encoded = json.dumps(head, separators=(",", ":")).encode()
    if len(encoded) > MAX_HEAD or _LENGTH.size + len(encoded) + len(payload) > MAX_DATAGRAM:
        raise WireError(f"datagram of {len(encoded)} + {len(payload)} bytes is too large")
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    sock.sendmsg([_LENGTH.pack(len(encoded)) + encoded, payload], ancillary)


def receive(sock: socket.socket) -> Datagram | None:
    """The next datagram, or None at end of stream (the peer is gone). Raises BlockingIOError when a
    non-blocking socket has nothing, WireError (fds closed) for a datagram that cannot be read."""
    data, ancillary, flags, _ = sock.recvmsg(MAX_DATAGRAM, _ANCILLARY, socket.MSG_CMSG_CLOEXEC)
    fds: list[int] = []
    for level, kind, item in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.extend(array.array("i", item[: len(item) - len(item) % _FD_SIZE]))
    try:
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            raise WireError("datagram or its fds truncated")
        if not data:
            if fds:
                raise WireError("empty datagram with fds")
            return None
        if len(data) < _LENGTH.size:
            raise WireError("datagram shorter than its length field")
        (length,) = _LENGTH.unpack_from(data)
        if length > len(data) - _LENGTH.size or length > MAX_HEAD:
            raise WireError("datagram head length out of range")
        try:
            head = json.loads(data[_LENGTH.size : _LENGTH.size + length])
        except ValueError as exc:
            raise WireError(f"datagram head is not JSON: {exc}") from None
        if not isinstance(head, dict) or not isinstance(head.get("op"), str):
            raise WireError("datagram head has no op")
    except BaseException:
        close_all(fds)
        raise
    return head, bytes(data[_LENGTH.size + length :]), fds


def close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def int_field(head: dict[str, Any], key: str, limit: int = (1 << 63) - 1) -> int:
    value = head.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
        raise WireError(f"{head.get('op')}: field {key} is not an integer in range")
    return value


def int_list(head: dict[str, Any], key: str, limit: int = MAX_FDS) -> list[int]:
    value = head.get(key, [])
    if not isinstance(value, list) or len(value) > limit:
        raise WireError(f"{head.get('op')}: field {key} is not a list of at most {limit}")
    if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 31 for v in value):
        raise WireError(f"{head.get('op')}: field {key} holds something else than ids")
    return list(value)

"""The vhost-user codec: bytes and fds in, typed messages out; typed messages in, bytes out. No I/O.

Two layers. A :class:`Framer` holds the wire rules every vhost-user stream shares: a message is a 12-byte
header (code, flags, payload size) and its payload, the version bits are 1, a payload is at most
:data:`MAX_PAYLOAD_SIZE` bytes, a message carries at most :data:`MAX_FDS_PER_MESSAGE` fds, and it yields
:class:`Frame` objects (the message's bytes as sent and its fds) without reading a payload. The keeper,
which relays messages it does not interpret, frames with it. A :class:`Decoder` frames with a Framer and
turns each frame into a typed, validated :class:`Message`.

A :class:`Decoder` reads one of the four message streams of a vhost-user connection (see :class:`Stream`).
Feed it what the socket gave (``feed(data, fds)``) and take complete messages with ``next_message()``; it
returns ``None`` when it needs more bytes. :func:`encode` turns a code and a payload into bytes.

Errors
------
Every problem is a :class:`ProtocolError`; its subclass says what the caller must do:

* :class:`FramingError` (``fatal``): the byte stream can no longer be trusted to be split into messages
  (bad version bits, a payload larger than :data:`MAX_PAYLOAD_SIZE`, an fd count no message can carry,
  end of stream inside a message, a malformed reply). Close the connection. The decoder (or framer) stays
  broken and raises the same error again.
* :class:`RequestRejected` (not fatal): one well-framed request was refused (unknown or unsupported code,
  reserved flag bits, the REPLY bit on a request, a payload of the wrong size or with invalid fields, fds on
  a request that takes none or the wrong number). The decoder has consumed the message and closed its fds;
  it keeps decoding what follows. The caller answers with the spec's failure reply (see
  :attr:`RequestRejected.reply_required`).

File descriptors: who owns which fd
-----------------------------------
* Once passed to :meth:`Decoder.feed`, an fd belongs to the decoder. fds arriving with any byte of a message
  belong to that message (a stream socket delivers a message's fds with its first bytes when the sender
  sent it in one ``sendmsg``; read at most :meth:`Decoder.bytes_needed` bytes per ``recvmsg`` so that one
  read never spans two messages).
* The decoder closes every fd of a message it rejects, every fd the spec says to close unused
  (REM_MEM_REG), and every fd it still holds when :meth:`Decoder.close` is called or a
  :class:`FramingError` is raised.
* An fd in a returned :class:`Message` belongs to the caller, who must close it or hand it on.
"""

from __future__ import annotations

import contextlib
import enum
import os
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import NoReturn, Protocol

from vhost_iommu.protocol.constants import (
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    HEADER_SIZE,
    KNOWN_FLAGS,
    MAX_FDS_PER_MESSAGE,
    MAX_PAYLOAD_SIZE,
    VERSION,
    VERSION_MASK,
    BackendRequest,
    FrontendRequest,
)
from vhost_iommu.protocol.messages import (
    U64,
    ConfigSpace,
    DeviceStateTransfer,
    Empty,
    MemoryTable,
    Payload,
    PayloadError,
    SingleMemoryRegion,
    VringAddress,
    VringFile,
    VringState,
)

_HEADER = struct.Struct("=III")
assert _HEADER.size == HEADER_SIZE


class ProtocolError(Exception):
    """The peer broke the vhost-user protocol."""

    fatal: bool = True


class FramingError(ProtocolError):
    """Message boundaries are lost or the peer is not speaking vhost-user: close the connection."""

    fatal = True


class RequestRejected(ProtocolError):
    """One well-framed request was refused; its fds are closed and decoding continues.

    ``reply_required`` is True when the request has a reply of its own (a GET_* request): the front-end is
    blocked waiting for it whatever ``need_reply`` says.
    """

    fatal = False

    def __init__(self, message: str, *, code: int, flags: int, reply_required: bool) -> None:
        super().__init__(message)
        self.code = code
        self.flags = flags
        self.reply_required = reply_required

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)


class Stream(enum.Enum):
    """The four message streams of one vhost-user connection, named by who sends what."""

    #: Main socket, read by the back-end.
    FRONTEND_REQUESTS = "front-end requests"
    #: Main socket, read by the front-end.
    BACKEND_REPLIES = "back-end replies"
    #: Back-end channel (SET_BACKEND_REQ_FD), read by the front-end.
    BACKEND_REQUESTS = "back-end requests"
    #: Back-end channel, read by the back-end.
    FRONTEND_REPLIES = "front-end replies"

    @property
    def carries_replies(self) -> bool:
        return self in (Stream.BACKEND_REPLIES, Stream.FRONTEND_REPLIES)


@dataclass(frozen=True, slots=True)
class Message:
    """One decoded (or to-be-encoded) message. Its fds belong to whoever holds the message."""

    #: A FrontendRequest or BackendRequest member; a plain int only in a reply to an unknown request.
    code: int
    flags: int
    payload: Payload
    fds: tuple[int, ...] = field(default=())

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & FLAG_REPLY)

    def close_fds(self) -> None:
        close_fds(self.fds)


def close_fds(fds: Iterable[int]) -> None:
    """Close every fd, ignoring ones already closed (EBADF): used on every error path."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def encode(
    code: int, payload: Payload | None = None, *, reply: bool = False, need_reply: bool = False
) -> bytes:
    """The bytes of one message (fds travel beside them, in the ``sendmsg`` ancillary data)."""
    body = payload.pack() if payload is not None else b""
    flags = VERSION | (FLAG_REPLY if reply else 0) | (FLAG_NEED_REPLY if need_reply else 0)
    return _HEADER.pack(code, flags, len(body)) + body


def encode_reply(code: int, payload: Payload | None = None) -> bytes:
    """A reply from the peer that received request ``code``."""
    return encode(code, payload, reply=True)


def encode_ack(code: int, success: bool) -> bytes:
    """A REPLY_ACK: u64 zero on success, non-zero on failure."""
    return encode_reply(code, U64(0 if success else 1))


# -- what each request carries ----------------------------------------------------------------------------

FdRule = Callable[[Payload], range]
_NO_FDS: FdRule = lambda _payload: range(0, 1)  # noqa: E731
_ONE_FD: FdRule = lambda _payload: range(1, 2)  # noqa: E731


def _vring_file_fds(payload: Payload) -> range:
    assert isinstance(payload, VringFile)
    return range(1, 2) if payload.has_fd else range(0, 1)


def _mem_table_fds(payload: Payload) -> range:
    assert isinstance(payload, MemoryTable)
    count = len(payload.regions)
    return range(count, count + 1)


class PayloadLayout(Protocol):
    """A payload class of :mod:`vhost_iommu.protocol.messages`: it reads its own bytes."""

    def unpack(self, data: bytes, /) -> Payload: ...


@dataclass(frozen=True, slots=True)
class RequestSpec:
    """What one request carries: its payload layout and how many fds. The decoder enforces it; tools that
    build or check messages (the fuzz targets) read it instead of keeping their own copy."""

    payload: PayloadLayout
    fds: FdRule = _NO_FDS
    has_own_reply: bool = False
    #: fds the spec allows but says to close without using (REM_MEM_REG's legacy fd).
    discard_fds: bool = False

    def fds_handed_out(self, payload: Payload) -> range:
        """How many fds a decoded request with ``payload`` hands to its receiver."""
        return range(0, 1) if self.discard_fds else self.fds(payload)


#: Every front-end request this implementation decodes, and what it carries.
FRONTEND_REQUEST_SPECS: Mapping[int, RequestSpec] = MappingProxyType(
    {
        FrontendRequest.GET_FEATURES: RequestSpec(Empty, has_own_reply=True),
        FrontendRequest.SET_FEATURES: RequestSpec(U64),
        FrontendRequest.SET_OWNER: RequestSpec(Empty),
        FrontendRequest.RESET_OWNER: RequestSpec(Empty),
        FrontendRequest.SET_MEM_TABLE: RequestSpec(MemoryTable, fds=_mem_table_fds),
        FrontendRequest.SET_VRING_NUM: RequestSpec(VringState),
        FrontendRequest.SET_VRING_ADDR: RequestSpec(VringAddress),
        FrontendRequest.SET_VRING_BASE: RequestSpec(VringState),
        FrontendRequest.GET_VRING_BASE: RequestSpec(VringState, has_own_reply=True),
        FrontendRequest.SET_VRING_KICK: RequestSpec(VringFile, fds=_vring_file_fds),
        FrontendRequest.SET_VRING_CALL: RequestSpec(VringFile, fds=_vring_file_fds),
        FrontendRequest.SET_VRING_ERR: RequestSpec(VringFile, fds=_vring_file_fds),
        FrontendRequest.GET_PROTOCOL_FEATURES: RequestSpec(Empty, has_own_reply=True),
        FrontendRequest.SET_PROTOCOL_FEATURES: RequestSpec(U64),
        FrontendRequest.GET_QUEUE_NUM: RequestSpec(Empty, has_own_reply=True),
        FrontendRequest.SET_VRING_ENABLE: RequestSpec(VringState),
        FrontendRequest.SET_BACKEND_REQ_FD: RequestSpec(Empty, fds=_ONE_FD),
        FrontendRequest.GET_CONFIG: RequestSpec(ConfigSpace, has_own_reply=True),
        FrontendRequest.SET_CONFIG: RequestSpec(ConfigSpace),
        FrontendRequest.RESET_DEVICE: RequestSpec(Empty),
        FrontendRequest.GET_MAX_MEM_SLOTS: RequestSpec(Empty, has_own_reply=True),
        FrontendRequest.ADD_MEM_REG: RequestSpec(SingleMemoryRegion, fds=_ONE_FD),
        FrontendRequest.REM_MEM_REG: RequestSpec(
            SingleMemoryRegion, fds=lambda _payload: range(0, 2), discard_fds=True
        ),
        FrontendRequest.SET_STATUS: RequestSpec(U64),
        FrontendRequest.GET_STATUS: RequestSpec(Empty, has_own_reply=True),
        FrontendRequest.SET_DEVICE_STATE_FD: RequestSpec(
            DeviceStateTransfer, fds=_ONE_FD, has_own_reply=True
        ),
        FrontendRequest.CHECK_DEVICE_STATE: RequestSpec(Empty, has_own_reply=True),
    }
)

#: Requests that always get a reply of their own, supported or not (the front-end blocks on them).
_OWN_REPLY_CODES = frozenset(
    {
        FrontendRequest.GET_FEATURES,
        FrontendRequest.GET_PROTOCOL_FEATURES,
        FrontendRequest.GET_VRING_BASE,
        FrontendRequest.GET_QUEUE_NUM,
        FrontendRequest.GET_CONFIG,
        FrontendRequest.GET_MAX_MEM_SLOTS,
        FrontendRequest.GET_STATUS,
        FrontendRequest.GET_INFLIGHT_FD,
        FrontendRequest.POSTCOPY_ADVISE,
        FrontendRequest.POSTCOPY_END,
        FrontendRequest.GET_SHARED_OBJECT,
        FrontendRequest.SET_DEVICE_STATE_FD,
        FrontendRequest.CHECK_DEVICE_STATE,
        FrontendRequest.IOTLB_MSG,
        FrontendRequest.CREATE_CRYPTO_SESSION,
    }
)

#: Every back-end request this implementation decodes (on the back-end channel), and what it carries.
BACKEND_REQUEST_SPECS: Mapping[int, RequestSpec] = MappingProxyType(
    {
        BackendRequest.CONFIG_CHANGE_MSG: RequestSpec(Empty),
        BackendRequest.VRING_CALL: RequestSpec(VringState),
        BackendRequest.VRING_ERR: RequestSpec(VringState),
    }
)

#: The back-end's replies with a layout of their own (GET_CONFIG's may also be empty: the read failed);
#: every other reply, either way, is a u64.
BACKEND_REPLY_PAYLOADS: Mapping[int, PayloadLayout] = MappingProxyType(
    {FrontendRequest.GET_VRING_BASE: VringState, FrontendRequest.GET_CONFIG: ConfigSpace}
)


def request_has_own_reply(code: int) -> bool:
    """Whether front-end request ``code`` is answered by a reply of its own rather than a REPLY_ACK."""
    return code in _OWN_REPLY_CODES


def _parse_backend_reply(code: FrontendRequest, data: bytes) -> Payload:
    if code is FrontendRequest.GET_CONFIG and not data:
        return Empty()  # a zero-length GET_CONFIG reply is the spec's way of saying the read failed
    return BACKEND_REPLY_PAYLOADS.get(code, U64).unpack(data)


@dataclass(frozen=True, slots=True)
class Frame:
    """One message as framed: its header fields, its bytes as sent (header and payload) and its fds (which
    belong to whoever holds the frame)."""

    code: int
    flags: int
    data: bytes
    fds: tuple[int, ...] = ()

    @property
    def payload(self) -> bytes:
        return self.data[HEADER_SIZE:]


class Framer:
    """Splits one stream into :class:`Frame` objects by the wire rules every stream shares.

    ``name`` starts every error's text; ``check_header(code, flags, size)`` adds a stream's own header rule
    (a reason string makes the header a :class:`FramingError`, None accepts it). The header is checked as
    soon as it is complete, before its payload arrives. fds are owned as :class:`Decoder` owns them.
    """

    def __init__(self, name: str, check_header: Callable[[int, int, int], str | None] | None = None) -> None:
        self.name = name
        self._check_stream_header = check_header
        self._buffer = bytearray()
        self._fds: list[int] = []
        self._header: tuple[int, int, int] | None = None
        self._broken: FramingError | None = None
        self._eof = False

    def bytes_needed(self) -> int:
        """How many more bytes complete the header or payload now being read (at least 1)."""
        if self._header is None:
            return max(1, HEADER_SIZE - len(self._buffer))
        return max(1, HEADER_SIZE + self._header[2] - len(self._buffer))

    def feed(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Add received bytes and the fds that arrived with them (the framer now owns those fds). Raises
        :class:`FramingError` when more fds arrived with one message than any message carries."""
        if self._broken is not None or self._eof:
            close_fds(fds)
            return
        self._fds.extend(fds)
        self._buffer += data
        if len(self._fds) > MAX_FDS_PER_MESSAGE:
            self.fail(
                f"{len(self._fds)} fds arrived with one message, no message carries more than "
                f"{MAX_FDS_PER_MESSAGE}"
            )

    def feed_eof(self) -> None:
        """The peer closed the stream; a partial message left behind becomes a :class:`FramingError`."""
        self._eof = True

    @property
    def at_boundary(self) -> bool:
        """True when no partial message is buffered."""
        return not self._buffer and not self._fds

    def close(self) -> None:
        """Release every fd still held (call when the connection ends)."""
        self._drop_fds()
        self._buffer.clear()

    def next_frame(self) -> Frame | None:
        """The next complete message, or None until more bytes arrive. Raises :class:`FramingError`."""
        if self._broken is not None:
            raise self._broken
        if self._header is None:
            if len(self._buffer) < HEADER_SIZE:
                self._check_eof()
                return None
            self._header = _HEADER.unpack_from(self._buffer)
            self._check_header(*self._header)
        code, flags, size = self._header
        if len(self._buffer) < HEADER_SIZE + size:
            self._check_eof()
            return None
        data = bytes(self._buffer[: HEADER_SIZE + size])
        del self._buffer[: HEADER_SIZE + size]
        self._header = None
        fds, self._fds = tuple(self._fds), []
        return Frame(code, flags, data, fds)

    def fail(self, reason: str) -> NoReturn:
        """The stream can no longer be framed: its fds are closed and every later call raises the same."""
        self._drop_fds()
        self._broken = FramingError(f"{self.name}: {reason}")
        raise self._broken

    def _check_eof(self) -> None:
        if self._eof and (self._buffer or self._fds):
            self.fail(f"stream ended inside a message ({len(self._buffer)} bytes buffered)")

    def _check_header(self, code: int, flags: int, size: int) -> None:
        if flags & VERSION_MASK != VERSION:
            self.fail(f"request {code}: protocol version {flags & VERSION_MASK}, only {VERSION} is spoken")
        if size > MAX_PAYLOAD_SIZE:
            self.fail(f"request {code}: payload size {size} exceeds the {MAX_PAYLOAD_SIZE}-byte limit")
        if self._check_stream_header is not None:
            reason = self._check_stream_header(code, flags, size)
            if reason is not None:
                self.fail(reason)

    def _drop_fds(self) -> None:
        fds, self._fds = self._fds, []
        close_fds(fds)


def _reply_header(code: int, flags: int, _size: int) -> str | None:
    """A reply stream's header rule: replies carry the reply flag and nothing else."""
    if flags != VERSION | FLAG_REPLY:
        return f"reply to request {code} has flags {flags:#x}, expected {VERSION | FLAG_REPLY:#x}"
    return None


class Decoder:
    """Splits one stream into :class:`Message` objects. See the module docstring for errors and fds."""

    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self._framer = Framer(stream.value, _reply_header if stream.carries_replies else None)

    # -- input ----------------------------------------------------------------------------------------------

    def bytes_needed(self) -> int:
        """How many more bytes complete the header or payload now being read (at least 1)."""
        return self._framer.bytes_needed()

    def feed(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Add received bytes and the fds that arrived with them (the decoder now owns those fds)."""
        self._framer.feed(data, fds)

    def feed_eof(self) -> None:
        """The peer closed the stream; a partial message left behind becomes a :class:`FramingError`."""
        self._framer.feed_eof()

    @property
    def at_boundary(self) -> bool:
        """True when no partial message is buffered."""
        return self._framer.at_boundary

    def close(self) -> None:
        """Release every fd still held (call when the connection ends)."""
        self._framer.close()

    # -- output ---------------------------------------------------------------------------------------------

    def next_message(self) -> Message | None:
        """The next complete message, or None until more bytes arrive.

        Raises :class:`FramingError` (fatal) or :class:`RequestRejected` (that message is dropped).
        """
        frame = self._framer.next_frame()
        if frame is None:
            return None
        return self._build(frame.code, frame.flags, frame.payload, frame.fds)

    def messages(self) -> list[Message]:
        """Every complete message buffered now (stops at, and raises, the first error)."""
        found: list[Message] = []
        while (message := self.next_message()) is not None:
            found.append(message)
        return found

    # -- internals ------------------------------------------------------------------------------------------

    def _build(self, code: int, flags: int, body: bytes, fds: tuple[int, ...]) -> Message:
        if self.stream is Stream.FRONTEND_REQUESTS:
            return self._build_request(code, flags, body, fds, FrontendRequest, FRONTEND_REQUEST_SPECS)
        if self.stream is Stream.BACKEND_REQUESTS:
            return self._build_request(code, flags, body, fds, BackendRequest, BACKEND_REQUEST_SPECS)
        return self._build_reply(code, flags, body, fds)

    def _build_request(
        self,
        code: int,
        flags: int,
        body: bytes,
        fds: tuple[int, ...],
        codes: type[FrontendRequest] | type[BackendRequest],
        specs: Mapping[int, RequestSpec],
    ) -> Message:
        own_reply = codes is FrontendRequest and request_has_own_reply(code)

        def reject(reason: str) -> RequestRejected:
            close_fds(fds)
            name = codes(code).name if code in codes._value2member_map_ else f"request {code}"
            return RequestRejected(
                f"{self.stream.value}: {name}: {reason}", code=code, flags=flags, reply_required=own_reply
            )

        if flags & ~KNOWN_FLAGS:
            raise reject(f"reserved header flag bits {flags & ~KNOWN_FLAGS:#x} are set")
        if flags & FLAG_REPLY:
            raise reject("the reply flag is set on a request")
        if code not in codes._value2member_map_:
            raise reject("unknown request code")
        request = codes(code)
        spec = specs.get(request)
        if spec is None:
            raise reject("not supported by this implementation")
        try:
            payload = spec.payload.unpack(body)
        except PayloadError as exc:
            raise reject(str(exc)) from None
        allowed = spec.fds(payload)
        if len(fds) not in allowed:
            expected = " or ".join(str(n) for n in allowed)
            raise reject(f"carries {len(fds)} fds, expected {expected}")
        if spec.discard_fds:
            close_fds(fds)
            fds = ()
        return Message(request, flags, payload, fds)

    def _build_reply(self, code: int, flags: int, body: bytes, fds: tuple[int, ...]) -> Message:
        if fds:
            close_fds(fds)
            self._framer.fail(
                f"reply to request {code} carries {len(fds)} fds; no supported reply carries any"
            )
        try:
            if self.stream is Stream.BACKEND_REPLIES and code in FrontendRequest._value2member_map_:
                request = FrontendRequest(code)
                return Message(request, flags, _parse_backend_reply(request, body))
            if self.stream is Stream.FRONTEND_REPLIES and code in BackendRequest._value2member_map_:
                return Message(BackendRequest(code), flags, U64.unpack(body))
            # A reply to a request the receiver does not know can only be a REPLY_ACK.
            return Message(code, flags, U64.unpack(body))
        except ValueError as exc:  # PayloadError is a ValueError, as is an unknown enum value
            self._framer.fail(f"malformed reply to request {code}: {exc}")

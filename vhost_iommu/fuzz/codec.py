"""Fuzz target ``codec``: byte streams and real fds through :class:`vhost_iommu.protocol.Decoder`.

One execution picks a stream kind, builds a stream of messages (well-formed ones with hostile field values,
headers with random flags and sizes, raw noise), attaches real eventfds to random points of it, cuts it at
arbitrary points (or the way :mod:`vhost_iommu.server.connection` reads: at most ``bytes_needed`` bytes per
read) and feeds it, taking messages after every feed; sometimes the stream then ends (``feed_eof``).

Checked:

* only :class:`FramingError` and :class:`RequestRejected` leave the decoder, and only ``FramingError`` on a
  reply stream; a broken decoder stays broken (same error again) and closes what it is fed;
* a returned message's fds are fds this execution created, still open, handed out once, and as many as
  its request carries (REM_MEM_REG's are closed by the decoder, replies carry none);
* a returned message is a known request of that stream (or a reply), its payload packs back to bytes that
  unpack to the same payload;
* every fd created is closed once the returned messages' fds are closed and the decoder is closed.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Hashable, Iterable

from vhost_iommu.fuzz.engine import Choices, FuzzFailure, FuzzTarget, fd_is_open, shape
from vhost_iommu.protocol import (
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    MAX_PAYLOAD_SIZE,
    VERSION,
    BackendRequest,
    Decoder,
    FramingError,
    FrontendRequest,
    MemoryTable,
    Message,
    RequestRejected,
    Stream,
    VringFile,
    close_fds,
)

__all__ = ["CodecTarget"]

_STREAMS = tuple(Stream)
_FRONTEND_CODES = tuple(int(code) for code in FrontendRequest)
_BACKEND_CODES = tuple(int(code) for code in BackendRequest)
_HEADER = struct.Struct("=III")


# Payload layouts, by number: what _payload builds.
_EMPTY, _U64, _VRING_FILE, _VRING_STATE, _VRING_ADDRESS, _MEM_TABLE, _SINGLE_REGION, _CONFIG, _NOISE = range(
    9
)

_F = FrontendRequest
#: The layout each front-end request carries (every other code: a random layout).
_FRONTEND_LAYOUTS: dict[int, int] = {
    **dict.fromkeys(
        (
            _F.GET_FEATURES,
            _F.SET_OWNER,
            _F.RESET_OWNER,
            _F.GET_PROTOCOL_FEATURES,
            _F.GET_QUEUE_NUM,
            _F.SET_BACKEND_REQ_FD,
            _F.RESET_DEVICE,
            _F.GET_MAX_MEM_SLOTS,
            _F.GET_STATUS,
        ),
        _EMPTY,
    ),
    **dict.fromkeys((_F.SET_FEATURES, _F.SET_PROTOCOL_FEATURES, _F.SET_STATUS), _U64),
    **dict.fromkeys((_F.SET_VRING_KICK, _F.SET_VRING_CALL, _F.SET_VRING_ERR), _VRING_FILE),
    **dict.fromkeys(
        (_F.SET_VRING_NUM, _F.SET_VRING_BASE, _F.GET_VRING_BASE, _F.SET_VRING_ENABLE), _VRING_STATE
    ),
    _F.SET_VRING_ADDR: _VRING_ADDRESS,
    _F.SET_MEM_TABLE: _MEM_TABLE,
    **dict.fromkeys((_F.ADD_MEM_REG, _F.REM_MEM_REG), _SINGLE_REGION),
    **dict.fromkeys((_F.GET_CONFIG, _F.SET_CONFIG), _CONFIG),
}
_BACKEND_LAYOUTS: dict[int, int] = {
    BackendRequest.CONFIG_CHANGE_MSG: _EMPTY,
    BackendRequest.VRING_CALL: _VRING_STATE,
    BackendRequest.VRING_ERR: _VRING_STATE,
}
#: Replies the back-end sends (read by the front-end): acks are u64, two replies have their own layout.
_BACKEND_REPLY_LAYOUTS: dict[int, int] = {_F.GET_VRING_BASE: _VRING_STATE, _F.GET_CONFIG: _CONFIG}


def _layout(stream: Stream, code: int) -> int:
    if stream is Stream.FRONTEND_REQUESTS:
        return _FRONTEND_LAYOUTS.get(code, _NOISE)
    if stream is Stream.BACKEND_REQUESTS:
        return _BACKEND_LAYOUTS.get(code, _NOISE)
    if stream is Stream.BACKEND_REPLIES:
        return _BACKEND_REPLY_LAYOUTS.get(code, _U64)
    return _U64


def _small(choices: Choices, bits: int = 32) -> int:
    """Usually a small number (valid indices, counts), sometimes any ``bits``-bit value."""
    return choices.bits(bits) if choices.chance(32) else choices.below(4)


def _payload(choices: Choices, layout: int) -> tuple[bytes, int]:
    """The bytes of one payload of ``layout`` with field values that are often invalid, and how many fds
    the request would carry if those values were valid."""
    if layout == _EMPTY:
        return b"", 0
    if layout == _U64:
        return struct.pack("=Q", choices.u64()), 0
    if layout == _VRING_FILE:
        no_fd = choices.chance(48)
        value = (
            _small(choices, 8) | (0x100 if no_fd else 0) | (choices.u64() << 9 if choices.chance(16) else 0)
        )
        return struct.pack("=Q", value & ((1 << 64) - 1)), 0 if no_fd else 1
    if layout == _VRING_STATE:
        return struct.pack("=II", _small(choices), choices.u64() & 0xFFFFFFFF), 0
    if layout == _VRING_ADDRESS:
        fields = [choices.u64() for _ in range(4)]
        return struct.pack("=IIQQQQ", _small(choices), _small(choices), *fields), 0
    if layout in (_MEM_TABLE, _SINGLE_REGION):
        count = choices.below(10) if layout == _MEM_TABLE else 1
        regions = b"".join(struct.pack("=QQQQ", *(choices.u64() for _ in range(4))) for _ in range(count))
        if layout == _SINGLE_REGION:
            return bytes(8) + regions, 1
        declared = count if choices.chance(240) else choices.bits(32)
        return struct.pack("=II", declared, choices.bits(32) if choices.chance(16) else 0) + regions, count
    if layout == _CONFIG:
        size = choices.below(300)
        declared = size if choices.chance(240) else choices.bits(32)
        offset = choices.below(300) if choices.chance(240) else choices.bits(32)
        return struct.pack("=III", offset, declared, choices.below(3)) + choices.take(size), 0
    return choices.take(choices.below(64)), 0


def _message(choices: Choices, stream: Stream) -> tuple[bytes, int]:
    """One message (well-framed with a payload of its code's layout, a hostile header, or noise), and
    how many fds it would carry."""
    shape = choices.byte()
    if shape >= 248:
        return choices.take(choices.between(1, 40)), choices.below(3)
    codes = (
        _BACKEND_CODES if stream in (Stream.BACKEND_REQUESTS, Stream.FRONTEND_REPLIES) else _FRONTEND_CODES
    )
    code = choices.pick(codes) if choices.chance(240) else choices.bits(32)
    if shape >= 240:
        flags = choices.bits(32)
    else:
        flags = VERSION
        if stream.carries_replies or choices.chance(8):
            flags |= FLAG_REPLY
        if choices.chance(64):
            flags |= FLAG_NEED_REPLY
    layout = _layout(stream, code) if choices.chance(230) else choices.below(_NOISE + 1)
    payload, fd_count = _payload(choices, layout)
    size = len(payload)
    if shape >= 232:  # a size that lies
        size = choices.pick(
            (0, size + 1, max(0, size - 1), MAX_PAYLOAD_SIZE, MAX_PAYLOAD_SIZE + 1, choices.bits(32))
        )
    return _HEADER.pack(code, flags, size) + payload, fd_count


def _expected_fds(message: Message) -> int:
    payload = message.payload
    if message.is_reply:
        return 0
    if isinstance(payload, MemoryTable):
        return len(payload.regions)
    if isinstance(payload, VringFile):
        return 1 if payload.has_fd else 0
    if message.code in (FrontendRequest.ADD_MEM_REG, FrontendRequest.SET_BACKEND_REQ_FD):
        return 1
    return 0


class CodecTarget(FuzzTarget):
    name = "codec"
    description = "byte streams split anywhere, with real eventfds, through Decoder for each stream kind"
    max_input = 4096

    def run(self, choices: Choices) -> Iterable[Hashable]:
        stream = choices.pick(_STREAMS)
        features: list[Hashable] = [stream.name]
        # The stream, and where each fd rides: fds arrive with the byte at their position.
        data = bytearray()
        fd_positions: list[int] = []
        for _ in range(choices.between(1, 8)):
            start = len(data)
            message, count = _message(choices, stream)
            data += message
            if choices.chance(16):
                count = choices.below(3) if choices.chance(200) else choices.below(11)
            where = start if choices.chance(220) else choices.below(len(data) + 1)
            fd_positions += [where] * count
        if choices.chance(16) and data:  # corrupt one byte anywhere
            data[choices.below(len(data))] ^= 1 << choices.below(8)
        fd_positions.sort()
        created = [os.eventfd(0, os.EFD_CLOEXEC) for _ in fd_positions]
        try:
            self._feed_all(
                choices, stream, bytes(data), list(zip(fd_positions, created, strict=True)), features
            )
        finally:
            leaked = [fd for fd in created if fd_is_open(fd)]
            close_fds(leaked)
        if leaked:
            raise FuzzFailure(f"{stream.value}: fds {leaked} still open after the decoder was closed")
        return features

    def _feed_all(
        self,
        choices: Choices,
        stream: Stream,
        data: bytes,
        fds: list[tuple[int, int]],
        features: list[Hashable],
    ) -> None:
        decoder = Decoder(stream)
        handed: set[int] = set()
        created = {fd for _, fd in fds}
        broken: FramingError | None = None
        connection_like = choices.chance(128)
        position = 0
        try:
            while position < len(data) or fds:
                if position == len(data):
                    step = 0  # fds beyond the last byte arrive on their own
                elif broken is not None:
                    step = len(data) - position  # the rest at once: a broken decoder only drops it
                elif connection_like:
                    needed = min(decoder.bytes_needed(), len(data) - position)
                    step = needed if choices.chance(192) else choices.between(1, needed)
                else:
                    step = choices.between(1, len(data) - position)
                end = position + step
                chunk_fds = [fd for at, fd in fds if at < end or end == len(data)]
                fds = fds[len(chunk_fds) :]
                try:
                    decoder.feed(data[position:end], chunk_fds)
                except FramingError as exc:
                    broken = self._broken(stream, broken, exc, features)
                position = end
                broken = self._drain(decoder, stream, broken, handed, created, features)
            if choices.chance(128):
                decoder.feed_eof()
                broken = self._drain(decoder, stream, broken, handed, created, features)
            if broken is not None:
                fd = os.eventfd(0, os.EFD_CLOEXEC)
                decoder.feed(b"\x00", [fd])  # a broken decoder closes what it is given
                if fd_is_open(fd):
                    os.close(fd)
                    raise FuzzFailure(f"{stream.value}: a broken decoder kept an fd fed to it")
        finally:
            decoder.close()

    @staticmethod
    def _broken(
        stream: Stream, before: FramingError | None, exc: FramingError, features: list[Hashable]
    ) -> FramingError:
        if before is not None:
            if exc is not before:
                raise FuzzFailure(f"{stream.value}: a broken decoder raised a new error: {exc}")
            return exc
        features.append(("framing", shape(str(exc))))
        return exc

    def _drain(
        self,
        decoder: Decoder,
        stream: Stream,
        broken: FramingError | None,
        handed: set[int],
        created: set[int],
        features: list[Hashable],
    ) -> FramingError | None:
        for _ in range(64):  # each call consumes a message or raises; the stream holds at most a few
            try:
                message = decoder.next_message()
            except FramingError as exc:
                return self._broken(stream, broken, exc, features)
            except RequestRejected as exc:
                if broken is not None:
                    raise FuzzFailure(f"{stream.value}: a broken decoder rejected a request: {exc}") from None
                if stream.carries_replies:
                    raise FuzzFailure(f"{stream.value}: RequestRejected on a reply stream: {exc}") from None
                code = exc.code if exc.code in _FRONTEND_CODES else -1
                features.append(("rejected", code, shape(str(exc))))
                continue
            if message is None:
                return broken
            if broken is not None:
                message.close_fds()
                raise FuzzFailure(f"{stream.value}: a broken decoder returned {message}")
            self._check_message(stream, message, handed, created)
            features.append(("message", int(message.code), len(message.fds)))
        raise FuzzFailure(f"{stream.value}: more than 64 messages from one feed")

    @staticmethod
    def _check_message(stream: Stream, message: Message, handed: set[int], created: set[int]) -> None:
        fds = message.fds
        try:
            problem = None
            if len(set(fds)) != len(fds) or not set(fds) <= created or set(fds) & handed:
                problem = f"fds {fds} are not fresh fds of this stream (handed out before: {sorted(handed)})"
            elif not all(fd_is_open(fd) for fd in fds):
                problem = f"fds {fds} were closed by the decoder but handed out"
            elif len(fds) != _expected_fds(message):
                problem = f"{len(fds)} fds, its request carries {_expected_fds(message)}"
            elif stream.carries_replies != message.is_reply:
                problem = "reply flag does not match the stream"
            elif stream is Stream.FRONTEND_REQUESTS and not isinstance(message.code, FrontendRequest):
                problem = "not a front-end request"
            elif stream is Stream.BACKEND_REQUESTS and not isinstance(message.code, BackendRequest):
                problem = "not a back-end request"
            else:
                payload = message.payload
                again = type(payload).unpack(payload.pack())  # type: ignore[attr-defined]
                if again != payload:
                    problem = f"payload {payload} packs to bytes that unpack to {again}"
            if problem is not None:
                raise FuzzFailure(f"{stream.value}: message {message.code!r} {message.payload}: {problem}")
        finally:
            handed.update(fds)
            # The caller owns a returned message's fds; closing them is part of handling it.
            for fd in fds:
                try:
                    os.close(fd)
                except OSError as exc:
                    raise FuzzFailure(f"{stream.value}: fd {fd} of a returned message: {exc}") from None

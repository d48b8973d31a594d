"""Fuzz target ``codec``: byte streams and real fds through :class:`vhost_iommu.protocol.Decoder`.

One execution picks a stream kind, builds a stream of messages (payloads built by the codec's own payload
classes for the layout the codec's table gives each code, then sometimes bent: fields set to hostile
values, cut, extended; headers with random flags and sizes; raw noise), attaches real eventfds to random
points of it, cuts it at arbitrary points (or the way :mod:`vhost_iommu.server.connection` reads: at most
``bytes_needed`` bytes per read) and feeds it, taking messages after every feed; sometimes the stream then
ends (``feed_eof``).

Checked:

* only :class:`FramingError` and :class:`RequestRejected` leave the decoder, and only ``FramingError`` on a
  reply stream; a broken decoder stays broken (same error again) and closes what it is fed;
* a returned message's fds are fds this execution created, still open, handed out once, and as many as
  the codec's own table says its request hands out (:data:`FRONTEND_REQUEST_SPECS`; REM_MEM_REG's are
  closed by the decoder, replies carry none);
* a returned message is a request of that stream's table (or a reply), its payload is of the layout the
  table gives it and packs back to bytes that unpack to the same payload;
* every fd created is closed once the returned messages' fds are closed and the decoder is closed.
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Hashable, Iterable, Mapping

from vhost_iommu.fuzz.engine import Choices, FuzzFailure, FuzzTarget, Script, fd_is_open, shape
from vhost_iommu.protocol import (
    BACKEND_REPLY_PAYLOADS,
    BACKEND_REQUEST_SPECS,
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    FRONTEND_REQUEST_SPECS,
    HEADER_SIZE,
    MAX_CONFIG_SIZE,
    MAX_MEM_TABLE_REGIONS,
    MAX_PAYLOAD_SIZE,
    U64,
    VERSION,
    BackendRequest,
    ConfigSpace,
    Decoder,
    DeviceStateTransfer,
    Empty,
    FramingError,
    FrontendRequest,
    MemoryRegion,
    MemoryTable,
    Message,
    Payload,
    PayloadError,
    RequestRejected,
    RequestSpec,
    SingleMemoryRegion,
    Stream,
    VringAddress,
    VringFile,
    VringState,
    close_fds,
)
from vhost_iommu.protocol.codec import PayloadLayout
from vhost_iommu.protocol.constants import DEVICE_STATE_LOAD, DEVICE_STATE_PHASE_STOPPED, DEVICE_STATE_SAVE

__all__ = ["CodecTarget", "hostile_message"]

_STREAMS = tuple(Stream)
_FRONTEND_CODES = tuple(int(code) for code in FrontendRequest)
_BACKEND_CODES = tuple(int(code) for code in BackendRequest)
_HEADER = struct.Struct("=III")  # code, flags, size: the header encode() writes, for headers that lie
assert _HEADER.size == HEADER_SIZE

#: The requests each request stream decodes: the codec's own tables.
_SPECS: dict[Stream, Mapping[int, RequestSpec]] = {
    Stream.FRONTEND_REQUESTS: FRONTEND_REQUEST_SPECS,
    Stream.BACKEND_REQUESTS: BACKEND_REQUEST_SPECS,
}
#: Every payload layout the codec knows (a random one, now and then, in place of the right one).
_LAYOUTS: tuple[PayloadLayout, ...] = (
    Empty,
    U64,
    VringFile,
    VringState,
    VringAddress,
    MemoryTable,
    SingleMemoryRegion,
    ConfigSpace,
    DeviceStateTransfer,
)


def _codes(stream: Stream) -> tuple[int, ...]:
    """The codes a message of ``stream`` carries: requests of the front-end or the back-end."""
    return _BACKEND_CODES if stream in (Stream.BACKEND_REQUESTS, Stream.FRONTEND_REPLIES) else _FRONTEND_CODES


def _layout(stream: Stream, code: int) -> PayloadLayout | None:
    """The payload layout the codec gives ``code`` on ``stream`` (None: it knows none, noise)."""
    if stream in _SPECS:
        spec = _SPECS[stream].get(code)
        return spec.payload if spec is not None else None
    if stream is Stream.BACKEND_REPLIES:
        return BACKEND_REPLY_PAYLOADS.get(code, U64)
    return U64


def _small(choices: Choices, bits: int = 32) -> int:
    """Usually a small number (valid indices, counts), sometimes any ``bits``-bit value."""
    return choices.bits(bits) if choices.chance(32) else choices.below(4)


def _region(choices: Choices, slot: int) -> MemoryRegion:
    """A region valid on its own: in its own ``slot`` of both address spaces (so that a table of them
    does not overlap), or now and then anywhere its fields allow."""
    base = slot << 40
    region = MemoryRegion(base, 0x1000 * choices.between(1, 16), base, 0x1000 * choices.below(4))
    if choices.chance(32):
        with contextlib.suppress(PayloadError):
            region = MemoryRegion(choices.u64(), choices.u64(), choices.u64(), choices.u64())
    return region


def _valid_payload(choices: Choices, layout: PayloadLayout | None) -> bytes:
    """The bytes of a payload of ``layout`` built through the layout's own class, so valid (the
    values it checks are in range); its content comes from ``choices``. None: noise."""
    if layout is Empty:
        return Empty().pack()
    if layout is U64:
        return U64(choices.u64()).pack()
    if layout is VringFile:
        return VringFile(_small(choices, 8), has_fd=choices.chance(208)).pack()
    if layout is VringState:
        return VringState(_small(choices), choices.bits(32)).pack()
    if layout is VringAddress:
        fields = (choices.u64() for _ in range(4))
        return VringAddress(_small(choices), choices.below(2), *fields).pack()
    if layout is MemoryTable:
        regions = tuple(_region(choices, slot) for slot in range(choices.below(MAX_MEM_TABLE_REGIONS + 1)))
        try:
            return MemoryTable(regions).pack()
        except PayloadError:  # regions placed anywhere overlap
            return MemoryTable(regions[:1]).pack()
    if layout is SingleMemoryRegion:
        return SingleMemoryRegion(_region(choices, 0)).pack()
    if layout is ConfigSpace:
        size = choices.below(MAX_CONFIG_SIZE + 1)
        offset = choices.below(MAX_CONFIG_SIZE - size + 1)
        return ConfigSpace(offset, choices.bits(32), choices.take(size)).pack()
    if layout is DeviceStateTransfer:
        direction = choices.pick((DEVICE_STATE_SAVE, DEVICE_STATE_LOAD))
        return DeviceStateTransfer(direction, DEVICE_STATE_PHASE_STOPPED).pack()
    return choices.take(choices.below(64))


def _bend(choices: Choices, data: bytes) -> bytes:
    """``data`` with a few of its 32- or 64-bit fields set to hostile values (a count or size that lies,
    reserved bits, an address that wraps), or cut or extended."""
    bent = bytearray(data)
    for _ in range(choices.between(1, 3)):
        what = choices.below(8)
        if what < 6 and len(bent) >= 4:
            width = 8 if what < 3 and len(bent) >= 8 else 4
            at = choices.below((len(bent) - width) // 4 + 1) * 4
            bent[at : at + width] = (choices.u64() % (1 << (8 * width))).to_bytes(width, "little")
        elif what == 6:
            del bent[choices.below(len(bent) + 1) :]
        else:
            bent += choices.take(choices.between(1, 16))
    return bytes(bent)


def _fds_for(stream: Stream, code: int, payload: bytes, choices: Choices) -> int:
    """How many fds the codec's table says the request carries (when its payload is valid)."""
    spec = _SPECS[stream].get(code) if stream in _SPECS else None
    if spec is None:
        return 0
    try:
        return choices.pick(spec.fds(spec.payload.unpack(payload)))
    except PayloadError:
        return choices.below(2)


def hostile_message(choices: Choices, stream: Stream) -> tuple[bytes, int]:
    """One message of ``stream`` (well-framed with a payload of its code's layout, bent or not, a hostile
    header, or noise), and how many fds it would carry."""
    shape = choices.byte()
    if shape >= 248:
        return choices.take(choices.between(1, 40)), choices.below(3)
    codes = _codes(stream)
    code = choices.pick(codes) if choices.chance(240) else choices.bits(32)
    if shape >= 240:
        flags = choices.bits(32)
    else:
        flags = VERSION
        if stream.carries_replies or choices.chance(8):
            flags |= FLAG_REPLY
        if choices.chance(64):
            flags |= FLAG_NEED_REPLY
    layout = _layout(stream, code) if choices.chance(230) else choices.pick((*_LAYOUTS, None))
    bend = choices.chance(64)
    payload = _valid_payload(choices, layout)
    fd_count = _fds_for(stream, code, payload, choices)
    if bend:
        payload = _bend(choices, payload)
    size = len(payload)
    if shape >= 232:  # a size that lies
        size = choices.pick(
            (0, size + 1, max(0, size - 1), MAX_PAYLOAD_SIZE, MAX_PAYLOAD_SIZE + 1, choices.bits(32))
        )
    return _HEADER.pack(code, flags, size) + payload, fd_count


def seed_cases() -> list[tuple[Stream, int]]:
    """Each (stream, code) the codec decodes with a layout of its own: the requests of its tables, the
    replies with a layout, and one REPLY_ACK per reply stream."""
    cases = [(stream, int(code)) for stream, specs in _SPECS.items() for code in specs]
    cases += [(Stream.BACKEND_REPLIES, int(code)) for code in BACKEND_REPLY_PAYLOADS]
    cases += [(Stream.BACKEND_REPLIES, int(FrontendRequest.SET_FEATURES))]
    cases += [(Stream.FRONTEND_REPLIES, int(code)) for code in BACKEND_REQUEST_SPECS]
    return cases


def _well_formed(stream: Stream, code: int, tail: int) -> bytes:
    """The input of one execution that sends a single well-formed message of ``code`` on ``stream``,
    with the fds the codec's table gives it; ``tail`` varies what follows (the payload's values)."""
    script = Script().pick(_STREAMS, stream).chance(16, False).between(1, 8, 1)
    script.chance(16, False).chance(220, True)  # the right fd count, with the message's first byte
    script.byte(0).chance(240, True).pick(_codes(stream), code)  # shape: well-framed; a known code
    if not stream.carries_replies:
        script.chance(8, False)  # no reply flag on a request
    script.chance(64, False).chance(230, True).chance(64, False)  # no NEED_REPLY; its own layout, unbent
    return script.byte(tail).data


def _of_layout(payload: Payload, layout: PayloadLayout) -> bool:
    kind: object = type(payload)
    return kind is layout


def _expected_fds(stream: Stream, message: Message) -> range:
    """How many fds the codec's table says ``message`` hands out."""
    if message.is_reply:
        return range(0, 1)
    return _SPECS[stream][message.code].fds_handed_out(message.payload)


class CodecTarget(FuzzTarget):
    name = "codec"
    description = "byte streams split anywhere, with real eventfds, through Decoder for each stream kind"
    max_input = 4096

    def run(self, choices: Choices) -> Iterable[Hashable]:
        stream = choices.pick(_STREAMS)
        features: list[Hashable] = [stream.name]
        corrupt = choices.chance(16)
        # The stream, and where each fd rides: fds arrive with the byte at their position.
        data = bytearray()
        fd_positions: list[int] = []
        for _ in range(choices.between(1, 8)):
            start = len(data)
            wrong_count, anywhere = choices.chance(16), not choices.chance(220)
            message, count = hostile_message(choices, stream)
            data += message
            if wrong_count:
                count = choices.below(3) if choices.chance(200) else choices.below(11)
            where = choices.below(len(data) + 1) if anywhere else start
            fd_positions += [where] * count
        if corrupt and data:  # one byte anywhere
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

    def seeds(self) -> list[bytes]:
        """A well-formed message of every code each stream knows (twice: the payload's values differ),
        so that any run, however short, sends each one with its fds."""
        return [_well_formed(stream, code, tail) for stream, code in seed_cases() for tail in (0, 255)]

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
            features.append(("message", stream.name, int(message.code), len(message.fds)))
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
            elif stream.carries_replies != message.is_reply:
                problem = "reply flag does not match the stream"
            elif stream in _SPECS and message.code not in _SPECS[stream]:
                problem = "not a request the codec's table has for this stream"
            elif stream in _SPECS and not _of_layout(message.payload, _SPECS[stream][message.code].payload):
                problem = f"not of the layout the codec's table gives {message.code!r}"
            elif len(fds) not in _expected_fds(stream, message):
                expected = " or ".join(map(str, _expected_fds(stream, message)))
                problem = f"{len(fds)} fds, the codec's table says its request hands out {expected}"
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

"""The vfio-user codec, server side: bytes and fds in, typed requests out; reply fields in, bytes out. No I/O.

A message is a 16-byte header (message id, command, message size including the header, flags, error) and
its payload. :class:`Decoder` frames a client's byte stream into messages, checks every header, and turns
each command into the typed request of :data:`COMMAND_SPECS` (:mod:`vhost_iommu.vfio_user.messages`), each
of which validates its own fields. The encoders build the server's replies: :func:`encode_reply` /
:func:`encode_error` frame a payload, the ``*_reply`` functions build the payloads.

Errors
------
Every violation is a :class:`VfioUserProtocolError` whose text says what was wrong (``"DMA_MAP: size 0x0
must be non-zero"``). It is fatal: the decoder closes every fd it holds, and from then on closes whatever it
is fed and raises the same error again. Close the connection. A command this implementation does not serve
(:data:`UNSUPPORTED_COMMANDS`) is not a violation: it decodes to :class:`Unsupported`, for an errno reply.

File descriptors: who owns which fd
-----------------------------------
* Once passed to :meth:`Decoder.feed`, an fd belongs to the decoder.
* fds belong to the message whose first byte arrives in the same chunk (the kernel delivers a message's
  fds with the first bytes of the ``sendmsg`` that carried them, and ends a read after those bytes). When
  several messages begin in one chunk, the fds are the last one's (the earlier ones were sent before, by
  ``sendmsg`` calls that carried no fds); fds in a chunk where no message begins are a violation.
* A returned request holds its message's fds (``DmaMap.fd``, ``SetIrqs.fds``), which now belong to the
  caller. The decoder closes the fds of an :class:`Unsupported` command, of a message it refuses, of the
  requests decoded by a :meth:`Decoder.feed` call that then meets a violation, and every fd it still holds
  when it breaks or :meth:`Decoder.close` is called.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, NoReturn, Protocol

# One rule for closing fds on error paths, shared with the vhost-user codec.
from vhost_iommu.protocol.codec import close_fds
from vhost_iommu.vfio_user.constants import (
    CAP_MAX_DATA_XFER_SIZE,
    CAP_MAX_DMA_MAPS,
    CAP_MAX_MSG_FDS,
    CAP_PGSIZES,
    CAP_WRITE_MULTIPLE,
    DEVICE_FLAGS_PCI,
    DEVICE_FLAGS_RESET,
    DEVICE_INFO_SIZE,
    DMA_PAGE_SIZE,
    DMA_UNMAP_SIZE,
    FLAG_ERROR,
    FLAG_NO_REPLY,
    FLAG_TYPE_MASK,
    HEADER_SIZE,
    IRQ_INFO_FLAGS,
    IRQ_INFO_SIZE,
    KNOWN_HEADER_FLAGS,
    MAX_DATA_XFER_SIZE,
    MAX_DMA_MAPS,
    MAX_FDS_PER_MESSAGE,
    MAX_MESSAGE_SIZE,
    REGION_INFO_FLAG_CAPS,
    REGION_INFO_FLAGS,
    REGION_INFO_SIZE,
    SERVER_TO_CLIENT_COMMANDS,
    TYPE_COMMAND,
    TYPE_REPLY,
    VERSION_MAJOR,
    VERSION_MINOR,
    Command,
)
from vhost_iommu.vfio_user.messages import (
    DEVICE_INFO_LAYOUT,
    DMA_UNMAP_LAYOUT,
    IRQ_INFO_LAYOUT,
    REGION_ACCESS_LAYOUT,
    REGION_INFO_LAYOUT,
    UNSUPPORTED_COMMANDS,
    VERSION_LAYOUT,
    DeviceGetInfo,
    DeviceReset,
    DmaMap,
    DmaUnmap,
    GetIrqInfo,
    GetRegionInfo,
    GetRegionIoFds,
    MessageError,
    RegionRead,
    RegionWrite,
    Request,
    SetIrqs,
    Unsupported,
    Version,
    check_capabilities,
    version_data,
)

HEADER_LAYOUT = struct.Struct("=HHIII")  # message id, command, message size, flags, error
assert HEADER_LAYOUT.size == HEADER_SIZE


class VfioUserProtocolError(Exception):
    """The client broke the vfio-user protocol: close the connection."""


# -- what each command carries -------------------------------------------------------------------------------


class RequestLayout(Protocol):
    """A request class of :mod:`vhost_iommu.vfio_user.messages`: it reads its own payload and fds."""

    def unpack(self, msg_id: int, no_reply: bool, data: bytes, fds: tuple[int, ...], /) -> Request: ...


@dataclass(frozen=True, slots=True)
class CommandSpec:
    """What the decoder accepts for one command. The decoder enforces it; tools that build or check messages
    (the fuzz target, the tests) read it instead of keeping their own copy."""

    #: The request class the command decodes to (None: :class:`Unsupported`, payload unread).
    message: RequestLayout | None
    #: Whether the client may set NO_REPLY (not on a command whose reply carries what it asked for).
    no_reply_allowed: bool
    #: The most fds the message may carry (the request class checks the exact count).
    max_fds: int = 0


#: Every command a client may send: the requests served, then the ones decoded as :class:`Unsupported`
#: (their fds, up to the message limit, are closed).
COMMAND_SPECS: Mapping[Command, CommandSpec] = MappingProxyType(
    {
        Command.VERSION: CommandSpec(Version, no_reply_allowed=False),
        Command.DMA_MAP: CommandSpec(DmaMap, no_reply_allowed=True, max_fds=1),
        Command.DMA_UNMAP: CommandSpec(DmaUnmap, no_reply_allowed=True),
        Command.DEVICE_GET_INFO: CommandSpec(DeviceGetInfo, no_reply_allowed=False),
        Command.DEVICE_GET_REGION_INFO: CommandSpec(GetRegionInfo, no_reply_allowed=False),
        Command.DEVICE_GET_REGION_IO_FDS: CommandSpec(GetRegionIoFds, no_reply_allowed=False),
        Command.DEVICE_GET_IRQ_INFO: CommandSpec(GetIrqInfo, no_reply_allowed=False),
        Command.DEVICE_SET_IRQS: CommandSpec(SetIrqs, no_reply_allowed=True, max_fds=MAX_FDS_PER_MESSAGE),
        Command.REGION_READ: CommandSpec(RegionRead, no_reply_allowed=False),
        Command.REGION_WRITE: CommandSpec(RegionWrite, no_reply_allowed=True),
        Command.DEVICE_RESET: CommandSpec(DeviceReset, no_reply_allowed=True),
        **{
            command: CommandSpec(None, no_reply_allowed=True, max_fds=MAX_FDS_PER_MESSAGE)
            for command in sorted(UNSUPPORTED_COMMANDS)
        },
    }
)
assert set(COMMAND_SPECS) | SERVER_TO_CLIENT_COMMANDS == set(Command)


def command_name(command: int) -> str:
    """``DMA_MAP`` for 2: how errors name a command."""
    return Command(command).name if command in Command._value2member_map_ else f"command {command}"


def _header_problem(command: int, size: int, flags: int, error: int) -> str | None:
    """Why a client's header is a violation (None: it is a command the decoder accepts)."""
    if size < HEADER_SIZE:
        return f"message size {size} is smaller than the {HEADER_SIZE}-byte header"
    if size > MAX_MESSAGE_SIZE:
        return f"message size {size} exceeds the {MAX_MESSAGE_SIZE}-byte limit"
    kind = flags & FLAG_TYPE_MASK
    if kind == TYPE_REPLY:
        return "a reply from the client (the server sends no commands)"
    if kind != TYPE_COMMAND:
        return f"message type {kind} is neither a command nor a reply"
    if flags & ~KNOWN_HEADER_FLAGS:
        return f"reserved header flag bits {flags & ~KNOWN_HEADER_FLAGS:#x} are set"
    if flags & FLAG_ERROR:
        return "the ERROR flag is set on a command"
    if error:
        return f"error field {error:#x} is reserved in a command and must be zero"
    if command in SERVER_TO_CLIENT_COMMANDS:
        return "is sent by the server, never by the client"
    if command not in COMMAND_SPECS:
        return "unknown command"
    if flags & FLAG_NO_REPLY and not COMMAND_SPECS[Command(command)].no_reply_allowed:
        return "NO_REPLY is set but the reply carries what the command asks for"
    return None


class Decoder:
    """Splits one client's byte stream into typed requests. See the module docstring for errors and fds."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        #: Stream position of the buffer's first byte (always the start of a message) and of its end.
        self._start = 0
        self._end = 0
        #: fds held for messages not yet complete, by the stream position where each message starts.
        self._fds: dict[int, tuple[int, ...]] = {}
        self._broken: VfioUserProtocolError | None = None

    # -- input ----------------------------------------------------------------------------------------------

    def feed(self, data: bytes, fds: Sequence[int] = ()) -> list[Request]:
        """Add received bytes and the fds that arrived with them (the decoder now owns those fds); return
        every request they complete, in order. Raises :class:`VfioUserProtocolError`."""
        unowned = tuple(fds)
        if self._broken is not None:
            close_fds(unowned)
            raise self._broken.with_traceback(None)  # the same error, without piling up tracebacks
        decoded: list[Request] = []
        try:
            chunk_start = self._end
            self._buffer += data
            self._end += len(data)
            if unowned:
                owner = self._last_message_start(chunk_start)
                if owner is None:
                    where = "in the middle of a message" if data else "without a byte of any message"
                    self._fail(f"{len(unowned)} fds arrived {where}")
                if len(unowned) > MAX_FDS_PER_MESSAGE:
                    self._fail(f"{len(unowned)} fds arrived with one message, at most {MAX_FDS_PER_MESSAGE}")
                self._fds[owner], unowned = unowned, ()
            while (request := self._next_request()) is not None:
                decoded.append(request)
        except BaseException:
            close_fds(unowned)
            for request in decoded:
                close_fds(request.fds)
            self._drop_fds()
            raise
        return decoded

    def feed_eof(self) -> None:
        """The client closed the stream: a partial message left behind is a violation."""
        if self._broken is None and not self.at_boundary:
            self._fail(f"stream ended inside a message ({len(self._buffer)} bytes buffered)")

    @property
    def at_boundary(self) -> bool:
        """True when no partial message (nor its fds) is buffered."""
        return not self._buffer and not self._fds

    def bytes_needed(self) -> int:
        """How many more bytes complete the header or the message now being read (at least 1): a reader
        that reads no more per ``recvmsg`` never gets two messages' bytes in one chunk."""
        if len(self._buffer) < HEADER_SIZE:
            return HEADER_SIZE - len(self._buffer)
        size: int = HEADER_LAYOUT.unpack_from(self._buffer)[2]
        return max(1, size - len(self._buffer))

    def close(self) -> None:
        """Release every fd still held (call when the connection ends)."""
        self._drop_fds()
        self._buffer.clear()

    # -- internals ------------------------------------------------------------------------------------------

    def _fail(self, reason: str) -> NoReturn:
        self._drop_fds()
        self._buffer.clear()
        self._broken = VfioUserProtocolError(reason)
        raise self._broken

    def _drop_fds(self) -> None:
        held, self._fds = self._fds, {}
        for fds in held.values():
            close_fds(fds)

    def _last_message_start(self, chunk_start: int) -> int | None:
        """The stream position where the last message beginning at or after ``chunk_start`` begins (None:
        the chunk lies inside one message). Walks the buffered headers; a header that is a violation ends
        the walk (decoding it raises)."""
        position, found = 0, None
        while position < len(self._buffer):
            if self._start + position >= chunk_start:
                found = self._start + position
            if position + HEADER_SIZE > len(self._buffer):
                break
            size = HEADER_LAYOUT.unpack_from(self._buffer, position)[2]
            if not HEADER_SIZE <= size <= MAX_MESSAGE_SIZE:
                break
            position += size
        return found

    def _next_request(self) -> Request | None:
        if len(self._buffer) < HEADER_SIZE:
            return None
        msg_id, command, size, flags, error = HEADER_LAYOUT.unpack_from(self._buffer)
        problem = _header_problem(command, size, flags, error)
        if problem is not None:
            self._fail(f"{command_name(command)}: {problem}")
        if len(self._buffer) < size:
            return None
        payload = bytes(self._buffer[HEADER_SIZE:size])
        fds = self._fds.pop(self._start, ())
        del self._buffer[:size]
        self._start += size
        try:
            return self._build(Command(command), msg_id, bool(flags & FLAG_NO_REPLY), payload, fds)
        except BaseException:
            close_fds(fds)
            raise

    def _build(
        self, command: Command, msg_id: int, no_reply: bool, payload: bytes, fds: tuple[int, ...]
    ) -> Request:
        """The request of one complete message. On a violation the caller closes ``fds`` (once: an fd number
        closed twice may by then be another thread's)."""
        spec = COMMAND_SPECS[command]
        if len(fds) > spec.max_fds:
            self._fail(f"{command.name}: carries {len(fds)} fds, at most {spec.max_fds}")
        if spec.message is None:
            unsupported = Unsupported(msg_id, command, no_reply)
            close_fds(fds)
            return unsupported
        try:
            return spec.message.unpack(msg_id, no_reply, payload, fds)
        except MessageError as exc:
            self._fail(f"{command.name}: {exc}")


# -- encoders: the server's messages -------------------------------------------------------------------------


def _header(msg_id: int, command: int, payload_size: int, flags: int, error: int) -> bytes:
    if not 0 <= msg_id <= 0xFFFF:
        raise ValueError(f"message id {msg_id!r} is not an unsigned 16-bit value")
    if not 0 <= command <= 0xFFFF:
        raise ValueError(f"command {command!r} is not an unsigned 16-bit value")
    size = HEADER_SIZE + payload_size
    if size > 0xFFFF_FFFF:
        raise ValueError(f"message of {size} bytes does not fit the 32-bit size field")
    return HEADER_LAYOUT.pack(msg_id, command, size, flags, error)


def encode_reply(msg_id: int, command: int, payload: bytes = b"") -> bytes:
    """The reply to the client's command ``msg_id``: its header and ``payload``."""
    return _header(msg_id, command, len(payload), TYPE_REPLY, 0) + payload


def encode_error(msg_id: int, command: int, errno: int) -> bytes:
    """The error reply to the client's command ``msg_id``: a header alone, with ``errno``."""
    if not 0 < errno <= 0xFFFF_FFFF:
        raise ValueError(f"errno {errno!r} is not a positive 32-bit value")
    return _header(msg_id, command, 0, TYPE_REPLY | FLAG_ERROR, errno)


def encode_request(request: Request) -> tuple[bytes, tuple[int, ...]]:
    """The bytes of a client's command and the fds to send with them (a client's side: tests, fuzzing)."""
    flags = TYPE_COMMAND | (FLAG_NO_REPLY if request.no_reply else 0)
    payload = request.pack()
    return _header(request.msg_id, request.COMMAND, len(payload), flags, 0) + payload, request.fds


#: What the server advertises in its VERSION reply: the limits the decoder enforces, each read from the one
#: constant the decoder uses (and no write_multiple).
SERVER_CAPABILITIES: Mapping[str, int] = MappingProxyType(
    {
        CAP_MAX_MSG_FDS: MAX_FDS_PER_MESSAGE,
        CAP_MAX_DATA_XFER_SIZE: MAX_DATA_XFER_SIZE,
        CAP_PGSIZES: DMA_PAGE_SIZE,
        CAP_MAX_DMA_MAPS: MAX_DMA_MAPS,
    }
)


def version_reply(capabilities: Mapping[str, Any] = SERVER_CAPABILITIES) -> bytes:
    """VERSION's reply payload: major 0, minor 0 and ``capabilities`` as NUL-terminated JSON.

    QEMU reads the reply into the buffer of its own VERSION message: the reply must be no longer than the
    command it answers. ``write_multiple`` is refused: the decoder serves no REGION_WRITE_MULTI, and QEMU
    would post writes in it."""
    check_capabilities(dict(capabilities))
    if capabilities.get(CAP_WRITE_MULTIPLE):
        raise ValueError("write_multiple: REGION_WRITE_MULTI is not decoded, do not advertise it")
    return VERSION_LAYOUT.pack(VERSION_MAJOR, VERSION_MINOR) + version_data(capabilities)


def _check_reply_argsz(argsz: int, minimum: int, what: str) -> None:
    # The decoder refuses a request whose argsz is below its structure's size.
    if argsz < minimum:
        raise ValueError(f"{what}: the request's argsz {argsz} is below the {minimum}-byte structure")


def _check_flags(flags: int, known: int, what: str) -> None:
    if flags & ~known:
        raise ValueError(f"{what} flags {flags:#x} has bits the spec does not define")


def device_info_reply(argsz: int, flags: int, num_regions: int, num_irqs: int) -> bytes:
    """DEVICE_GET_INFO's reply payload (``argsz`` is the request's; the reply's is the structure's size)."""
    _check_reply_argsz(argsz, DEVICE_INFO_SIZE, "device info")
    _check_flags(flags, DEVICE_FLAGS_RESET | DEVICE_FLAGS_PCI, "device info")
    return DEVICE_INFO_LAYOUT.pack(DEVICE_INFO_SIZE, flags, num_regions, num_irqs)


def region_info_reply(argsz: int, index: int, flags: int, size: int, offset: int, cap: bytes = b"") -> bytes:
    """DEVICE_GET_REGION_INFO's reply payload. ``cap``: the region's capability chain (its ``next``
    offsets counted from the start of the region info), placed right after the structure; CAPS is set
    with it.

    The reply's argsz is the size of the full reply. When the request's ``argsz`` leaves no room for the
    capabilities the reply is the structure alone, without CAPS (QEMU's client refuses CAPS with a
    cap_offset outside the reply); the client sees the larger argsz and asks again."""
    _check_reply_argsz(argsz, REGION_INFO_SIZE, "region info")
    _check_flags(flags, REGION_INFO_FLAGS, "region info")
    if flags & REGION_INFO_FLAG_CAPS:
        raise ValueError("region info: CAPS is set by the encoder, from cap")
    needed = REGION_INFO_SIZE + len(cap)
    if cap and argsz >= needed:
        return (
            REGION_INFO_LAYOUT.pack(
                needed, flags | REGION_INFO_FLAG_CAPS, index, REGION_INFO_SIZE, size, offset
            )
            + cap
        )
    return REGION_INFO_LAYOUT.pack(needed, flags, index, 0, size, offset)


def irq_info_reply(argsz: int, index: int, flags: int, count: int) -> bytes:
    """DEVICE_GET_IRQ_INFO's reply payload (``argsz`` is the request's; the reply's is the structure's)."""
    _check_reply_argsz(argsz, IRQ_INFO_SIZE, "IRQ info")
    _check_flags(flags, IRQ_INFO_FLAGS, "IRQ info")
    return IRQ_INFO_LAYOUT.pack(IRQ_INFO_SIZE, flags, index, count)


def dma_unmap_reply(request: DmaUnmap) -> bytes:
    """DMA_UNMAP's reply payload: the spec has the server answer with the request's DMA entry (QEMU reads
    nothing of it)."""
    return DMA_UNMAP_LAYOUT.pack(DMA_UNMAP_SIZE, request.flags, request.address, request.size)


def region_read_reply(region: int, offset: int, data: bytes) -> bytes:
    """REGION_READ's reply payload: the access and the bytes read."""
    return REGION_ACCESS_LAYOUT.pack(offset, region, len(data)) + data


def region_write_reply(region: int, offset: int, count: int) -> bytes:
    """REGION_WRITE's reply payload: the access, ``count`` bytes written."""
    return REGION_ACCESS_LAYOUT.pack(offset, region, count)

"""Fuzz target ``vfio-codec``: a vfio-user client's byte stream and real fds through
:class:`vhost_iommu.vfio_user.Decoder`.

One execution builds a stream of commands: requests built by the codec's own request classes, for the
commands of the codec's own table (:data:`COMMAND_SPECS`), with real eventfds where they carry fds; some
of them then bent (fields set to hostile values, cut, extended), some with a hostile header (flags, size,
error field, command: any 16-bit value), some raw noise. Each message's fds ride with its first byte, or
are one too many or too few, or ride anywhere. The stream is cut at random points, or the way the kernel
delivers it (a read that takes fds ends within their message), or the way a reader using
``bytes_needed`` reads it; sometimes one bit is flipped; sometimes the stream then ends (``feed_eof``).

Checked:

* only :class:`VfioUserProtocolError` leaves the decoder; once it has, the decoder raises the same error
  again and closes what it is fed;
* a returned request is of the class the codec's table gives its command (:class:`Unsupported` for the
  ones it marks unsupported), carries NO_REPLY only where the table allows it and at most the table's fds;
  its fds are fds this execution created, open, handed out once;
* a returned request encodes (``encode_request``) to bytes that decode to the same request;
* a stream of valid requests only, each with its own fds, read as the kernel or a ``bytes_needed``
  reader delivers it, decodes to exactly those requests (nothing valid is refused);
* every fd created is closed once the returned requests' fds are closed and the decoder is closed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field

from vhost_iommu.fuzz.engine import Choices, FuzzFailure, FuzzTarget, Script, fd_is_open, shape, struct_fields
from vhost_iommu.vfio_user import (
    COMMAND_SPECS,
    Command,
    Decoder,
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
    VfioUserProtocolError,
    close_fds,
    encode_request,
)
from vhost_iommu.vfio_user.codec import HEADER_LAYOUT
from vhost_iommu.vfio_user.constants import (
    CAP_MAX_DATA_XFER_SIZE,
    CAP_MAX_DMA_MAPS,
    CAP_MAX_MSG_FDS,
    CAP_MIGRATION,
    CAP_PGSIZES,
    CAP_TWIN_SOCKET,
    CAP_WRITE_MULTIPLE,
    DMA_MAP_FLAGS,
    DMA_PAGE_SIZE,
    DMA_UNMAP_FLAG_ALL,
    FLAG_NO_REPLY,
    HEADER_SIZE,
    IRQ_SET_ACTION_TYPE_MASK,
    IRQ_SET_DATA_BOOL,
    IRQ_SET_DATA_EVENTFD,
    IRQ_SET_DATA_MASK,
    IRQ_SET_DATA_NONE,
    KNOWN_HEADER_FLAGS,
    MAX_DATA_XFER_SIZE,
    MAX_FDS_PER_MESSAGE,
    MAX_IRQ_VECTORS,
    MAX_MESSAGE_SIZE,
    VERSION_MAJOR,
    VFIO_PCI_NUM_IRQS,
    VFIO_PCI_NUM_REGIONS,
)

__all__ = ["VfioCodecTarget", "hostile_message"]

#: The commands of the codec's table, and every command number the protocol defines (some of which the
#: server must refuse: DMA_READ/WRITE go the other way).
_TABLE_COMMANDS = tuple(sorted(COMMAND_SPECS))
_ALL_COMMANDS = tuple(Command)
_HEADER_FIELDS = struct_fields(HEADER_LAYOUT)  # id, command, size, flags, error
_SHAPES = ("valid", "bent", "header", "noise")
_CUTS = ("random", "kernel", "bytes_needed")
_BIT_FLAGS = tuple(1 << bit for bit in range(32))
#: SET_IRQS's DATA bits and ACTION bits, one by one: a valid request holds one of each.
_IRQ_DATA_TYPES = tuple(bit for bit in _BIT_FLAGS if bit & IRQ_SET_DATA_MASK)
_IRQ_ACTIONS = tuple(bit for bit in _BIT_FLAGS if bit & IRQ_SET_ACTION_TYPE_MASK)

NewFd = Callable[[], int]


def _small(choices: Choices, limit: int) -> int:
    """Usually a small value below ``limit``, sometimes any."""
    return choices.below(min(limit, 8)) if choices.chance(224) else choices.below(limit)


def _pages(choices: Choices, most: int) -> int:
    return DMA_PAGE_SIZE * (choices.between(1, 16) if choices.chance(192) else choices.between(1, most))


def _capabilities(choices: Choices) -> dict[str, object]:
    """Capabilities like QEMU's (each one or not), sometimes with members the spec does not define."""
    offered: dict[str, object] = {
        CAP_MAX_MSG_FDS: MAX_FDS_PER_MESSAGE,
        CAP_MAX_DATA_XFER_SIZE: MAX_DATA_XFER_SIZE,
        CAP_PGSIZES: DMA_PAGE_SIZE,
        CAP_MAX_DMA_MAPS: choices.bits(16),
        CAP_MIGRATION: {"pgsize": DMA_PAGE_SIZE, "max_bitmap_size": choices.bits(32)},
        CAP_TWIN_SOCKET: {"supported": choices.chance(128)},
        CAP_WRITE_MULTIPLE: choices.chance(128),
    }
    chosen = {name: value for name, value in offered.items() if choices.chance(160)}
    if choices.chance(32):
        chosen[f"x-{choices.bits(16)}"] = choices.pick((None, 1.5, "text", [1, {"a": []}], -3))
    return chosen


def _build(choices: Choices, command: Command, new_fd: NewFd) -> Request:
    """A valid request of ``command`` built by the codec's own class (its values from ``choices``; the
    class checks them)."""
    msg_id = choices.bits(16)
    if command is Command.VERSION:
        return Version(msg_id, VERSION_MAJOR, choices.bits(16), _capabilities(choices))
    if command is Command.DMA_MAP:
        size = _pages(choices, 1 << 20)
        address = choices.below((1 << 64) // DMA_PAGE_SIZE - size // DMA_PAGE_SIZE + 1) * DMA_PAGE_SIZE
        flags = choices.between(1, DMA_MAP_FLAGS)
        if choices.chance(64):  # a piece of ROM: no fd
            return DmaMap(msg_id, flags, 0, address, size, None, choices.chance(16))
        offset = _pages(choices, 1 << 20) - DMA_PAGE_SIZE
        return DmaMap(msg_id, flags, offset, address, size, new_fd(), choices.chance(16))
    if command is Command.DMA_UNMAP:
        if choices.chance(16):
            return DmaUnmap(msg_id, DMA_UNMAP_FLAG_ALL, 0, 0, choices.chance(16))
        size = _pages(choices, 1 << 20)
        address = choices.below((1 << 64) // DMA_PAGE_SIZE - size // DMA_PAGE_SIZE + 1) * DMA_PAGE_SIZE
        return DmaUnmap(msg_id, 0, address, size, choices.chance(16))
    if command is Command.DEVICE_GET_INFO:
        return DeviceGetInfo(msg_id, 16 + _small(choices, 1 << 16))
    if command is Command.DEVICE_GET_REGION_INFO:
        return GetRegionInfo(msg_id, 32 + _small(choices, 1 << 16), choices.below(VFIO_PCI_NUM_REGIONS))
    if command is Command.DEVICE_GET_REGION_IO_FDS:
        return GetRegionIoFds(msg_id, 16 + _small(choices, 1 << 16), choices.below(VFIO_PCI_NUM_REGIONS))
    if command is Command.DEVICE_GET_IRQ_INFO:
        return GetIrqInfo(msg_id, 16 + _small(choices, 1 << 16), choices.below(VFIO_PCI_NUM_IRQS))
    if command is Command.DEVICE_SET_IRQS:
        return _set_irqs(choices, msg_id, new_fd)
    if command is Command.REGION_READ:
        count = choices.between(1, 8) if choices.chance(224) else choices.between(1, MAX_DATA_XFER_SIZE)
        offset = choices.below((1 << 64) - count + 1) if choices.chance(32) else _small(choices, 1 << 12)
        return RegionRead(msg_id, choices.below(VFIO_PCI_NUM_REGIONS), offset, count)
    if command is Command.REGION_WRITE:
        data = choices.take(choices.between(1, 8) if choices.chance(224) else choices.between(1, 4096))
        offset = choices.below((1 << 64) - len(data) + 1) if choices.chance(32) else _small(choices, 1 << 12)
        return RegionWrite(msg_id, choices.below(VFIO_PCI_NUM_REGIONS), offset, data, choices.chance(128))
    if command is Command.DEVICE_RESET:
        return DeviceReset(msg_id, choices.chance(16))
    return Unsupported(msg_id, command, choices.chance(64))


def _set_irqs(choices: Choices, msg_id: int, new_fd: NewFd) -> SetIrqs:
    data_type, action = choices.pick(_IRQ_DATA_TYPES), choices.pick(_IRQ_ACTIONS)
    index = choices.below(VFIO_PCI_NUM_IRQS)
    no_reply = choices.chance(16)
    if data_type == IRQ_SET_DATA_NONE and choices.chance(64):
        return SetIrqs(msg_id, data_type | action, index, 0, 0, no_reply=no_reply)  # every vector
    most = MAX_FDS_PER_MESSAGE if data_type == IRQ_SET_DATA_EVENTFD and choices.chance(192) else 64
    count = choices.between(1, most)
    start = choices.below(MAX_IRQ_VECTORS - count + 1) if choices.chance(64) else choices.below(8)
    if data_type == IRQ_SET_DATA_BOOL:
        data = bytes(choices.below(2) for _ in range(count))
        return SetIrqs(msg_id, data_type | action, index, start, count, data=data, no_reply=no_reply)
    fds: tuple[int, ...] = ()
    if data_type == IRQ_SET_DATA_EVENTFD and count <= MAX_FDS_PER_MESSAGE and choices.chance(192):
        fds = tuple(new_fd() for _ in range(count))
    return SetIrqs(msg_id, data_type | action, index, start, count, fds, no_reply=no_reply)


def _bend(choices: Choices, data: bytearray) -> None:
    """A few of the payload's 32- or 64-bit fields set to hostile values, or the payload cut or extended
    (the header's size follows, so the message stays framed)."""
    for _ in range(choices.between(1, 3)):
        what = choices.below(8)
        payload = len(data) - HEADER_SIZE
        if what < 6 and payload >= 4:
            width = 8 if what < 3 and payload >= 8 else 4
            at = HEADER_SIZE + choices.below((payload - width) // 4 + 1) * 4
            data[at : at + width] = (choices.u64() % (1 << (8 * width))).to_bytes(width, "little")
        elif what == 6:
            del data[HEADER_SIZE + choices.below(payload + 1) :]
        else:
            data += choices.take(choices.between(1, 16))
    _set_header_field(data, 2, len(data))


def _set_header_field(data: bytearray, index: int, value: int) -> None:
    offset, size, _code = _HEADER_FIELDS[index]
    data[offset : offset + size] = (value % (1 << (8 * size))).to_bytes(size, "little")


def _hostile_header(choices: Choices, data: bytearray) -> None:
    """One or two header fields set to values a client may not send (or may: the decoder decides)."""
    for _ in range(choices.between(1, 2)):
        index = choices.below(len(_HEADER_FIELDS))
        if index == 1:
            value = choices.pick(_ALL_COMMANDS) if choices.chance(128) else choices.bits(16)
        elif index == 2:
            value = choices.pick((0, HEADER_SIZE - 1, len(data) + 1, len(data) - 1, MAX_MESSAGE_SIZE + 1))
        elif index == 3:
            value = choices.pick(_BIT_FLAGS) | (FLAG_NO_REPLY if choices.chance(64) else 0)
            value = value if choices.chance(200) else choices.bits(32) & ~KNOWN_HEADER_FLAGS | value
        else:
            value = choices.bits(8 * _HEADER_FIELDS[index][1])
        _set_header_field(data, index, value)


@dataclass
class _Message:
    data: bytes
    fds: list[int]
    #: What the decoder must return for it (None: a bent, hostile or noisy message).
    expected: Request | None


@dataclass
class _Execution:
    """The fds of one execution: every one created, and those the decoder handed out."""

    created: list[int] = field(default_factory=list)
    handed: set[int] = field(default_factory=set)

    def new_fd(self) -> int:
        fd = os.eventfd(0, os.EFD_CLOEXEC)
        self.created.append(fd)
        return fd


def _message(choices: Choices, execution: _Execution) -> _Message:
    kind = choices.pick(_SHAPES) if choices.chance(96) else "valid"
    if kind == "noise":
        return _Message(choices.take(choices.between(1, 40)), [], None)
    command = choices.pick(_TABLE_COMMANDS)
    wrong_fds = choices.chance(16)
    request = _build(choices, command, execution.new_fd)
    data, request_fds = encode_request(request)
    message = _Message(data, list(request_fds), request if kind == "valid" and not wrong_fds else None)
    if wrong_fds:
        if message.fds and choices.chance(128):
            os.close(message.fds.pop(choices.below(len(message.fds))))  # never given to the decoder
        else:
            message.fds += [execution.new_fd() for _ in range(choices.between(1, 3))]
    if kind == "bent":
        bent = bytearray(data)
        _bend(choices, bent)
        message.data = bytes(bent)
    elif kind == "header":
        hostile = bytearray(data)
        _hostile_header(choices, hostile)
        message.data = bytes(hostile)
    return message


def hostile_message(choices: Choices) -> tuple[bytes, list[int]]:
    """One message as this target makes them (valid, bent, with a hostile header, or noise) and the open
    eventfds to send with it, which become the caller's (the ``vfio-server`` target sends them to a live
    server)."""
    message = _message(choices, _Execution())
    return message.data, message.fds


class VfioCodecTarget(FuzzTarget):
    name = "vfio-codec"
    description = "a vfio-user client's commands, bent and cut anywhere, with real eventfds, through Decoder"
    max_input = 4096

    def run(self, choices: Choices) -> Iterable[Hashable]:
        corrupt = choices.chance(16)
        cuts = choices.pick(_CUTS)
        execution = _Execution()
        features: list[Hashable] = [cuts]
        try:
            messages = [_message(choices, execution) for _ in range(choices.between(1, 8))]
            stream = bytearray(b"".join(message.data for message in messages))
            starts = [sum(len(m.data) for m in messages[:i]) for i in range(len(messages))]
            fds_at: list[tuple[int, list[int]]] = []
            for start, message in zip(starts, messages, strict=True):
                anywhere = message.fds and choices.chance(16)
                fds_at.append((choices.below(len(stream)) if anywhere else start, message.fds))
                if anywhere:
                    message.expected = None
            if corrupt:
                stream[choices.below(len(stream))] ^= 1 << choices.below(8)
            exact = not corrupt and cuts != "random" and all(m.expected is not None for m in messages)
            ends = [start + len(m.data) for start, m in zip(starts, messages, strict=True) if m.fds]
            decoded = self._feed(choices, bytes(stream), fds_at, cuts, ends, execution, features)
            if exact:
                expected = [message.expected for message in messages]
                if decoded != expected:
                    raise FuzzFailure(f"valid requests {expected} decoded as {decoded}")
                features.append("exact")
        finally:
            leaked = self._close_and_check(execution)
        if leaked:
            raise FuzzFailure(f"fds {leaked} still open after the decoder was closed")
        return features

    @staticmethod
    def _close_and_check(execution: _Execution) -> list[int]:
        """Close the returned requests' fds (the caller's job); what is still open then was leaked by the
        decoder."""
        close_fds(execution.handed)
        leaked = [fd for fd in execution.created if fd_is_open(fd)]
        close_fds(leaked)
        return leaked

    def _feed(
        self,
        choices: Choices,
        stream: bytes,
        fds_at: list[tuple[int, list[int]]],
        cuts: str,
        message_ends: list[int],
        execution: _Execution,
        features: list[Hashable],
    ) -> list[Request]:
        decoder = Decoder()
        decoded: list[Request] = []
        broken: VfioUserProtocolError | None = None
        pending = sorted(fds_at, key=lambda item: item[0])
        position = 0
        try:
            while position < len(stream):
                if broken is not None:
                    step = len(stream) - position
                elif cuts == "bytes_needed":
                    step = min(decoder.bytes_needed(), len(stream) - position)
                else:
                    step = choices.between(1, len(stream) - position)
                    if cuts == "kernel":  # a read that takes fds ends within their message
                        later = [end for end in message_ends if end > position]
                        step = min(step, later[0] - position) if later else step
                end = position + step
                chunk_fds = [fd for at, fds in pending if at < end for fd in fds]
                pending = [(at, fds) for at, fds in pending if at >= end]
                try:
                    requests = decoder.feed(stream[position:end], chunk_fds)
                except VfioUserProtocolError as exc:
                    broken = self._broken(broken, exc, features)
                else:
                    if broken is not None:
                        raise FuzzFailure(f"a broken decoder accepted input: {requests}")
                    for request in requests:
                        self._check(request, execution, features)
                    decoded += requests
                position = end
            if choices.chance(64):
                try:
                    decoder.feed_eof()
                except VfioUserProtocolError as exc:
                    broken = self._broken(broken, exc, features)
            if broken is not None:
                fd = execution.new_fd()
                try:
                    decoder.feed(b"\x00", [fd])
                except VfioUserProtocolError as exc:
                    if exc is not broken:
                        raise FuzzFailure(f"a broken decoder raised a new error: {exc}") from None
                else:
                    raise FuzzFailure("a broken decoder accepted input")
                if fd_is_open(fd):
                    raise FuzzFailure("a broken decoder kept an fd fed to it")
                return []
            return decoded
        finally:
            decoder.close()

    @staticmethod
    def _broken(
        before: VfioUserProtocolError | None, exc: VfioUserProtocolError, features: list[Hashable]
    ) -> VfioUserProtocolError:
        if before is not None:
            if exc is not before:
                raise FuzzFailure(f"a broken decoder raised a new error: {exc}")
            return exc
        features.append(("violation", shape(str(exc))))
        return exc

    @staticmethod
    def _check(request: Request, execution: _Execution, features: list[Hashable]) -> None:
        fds = request.fds
        spec = COMMAND_SPECS[request.COMMAND]
        problem = None
        if len(set(fds)) != len(fds) or not set(fds) <= set(execution.created) or set(fds) & execution.handed:
            problem = f"fds {fds} are not fresh fds of this execution"
        elif not all(fd_is_open(fd) for fd in fds):
            problem = f"fds {fds} were closed by the decoder but handed out"
        elif len(fds) > spec.max_fds:
            problem = f"{len(fds)} fds, the codec's table allows {spec.max_fds}"
        elif request.no_reply and not spec.no_reply_allowed:
            problem = "NO_REPLY, which the codec's table does not allow for it"
        elif (spec.message is None) != isinstance(request, Unsupported) or (
            spec.message is not None and type(request) is not spec.message
        ):
            problem = f"not of the class the codec's table gives {request.COMMAND.name}"
        execution.handed.update(fds)
        if problem is None:
            data, same_fds = encode_request(request)
            try:  # a decoder that accepts them hands the same fds back
                again = Decoder().feed(data, same_fds)
            except (VfioUserProtocolError, MessageError) as exc:
                problem = f"its own encoding is refused: {exc}"
            else:
                if again != [request]:
                    problem = f"its own encoding decodes to {again}"
        if problem is not None:
            raise FuzzFailure(f"{request}: {problem}")
        features.append(("request", request.COMMAND.name, len(fds), request.no_reply))

    def seeds(self) -> list[bytes]:
        """A valid command of every command of the codec's table, with its fds, read the kernel's way, so
        that any run, however short, sends each one (twice: the values differ)."""
        return [_valid_alone(command, tail) for command in _TABLE_COMMANDS for tail in (0, 255)]


def _valid_alone(command: Command, tail: int) -> bytes:
    """The input of one execution that sends one valid ``command`` with its fds, read the kernel's way."""
    script = Script().chance(16, False).pick(_CUTS, "kernel").between(1, 8, 1)
    script.chance(96, False).pick(_TABLE_COMMANDS, command).chance(16, False)
    return script.byte(tail).data

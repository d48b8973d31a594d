"""The sans-I/O vfio-user codec, fed bytes and fds directly: no sockets."""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import os
import re
import socket
from collections.abc import Callable, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vhost_iommu.fuzz.engine import fd_is_open, open_fd_count
from vhost_iommu.vfio_user import (
    COMMAND_SPECS,
    SERVER_CAPABILITIES,
    UNSUPPORTED_COMMANDS,
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
    device_info_reply,
    dma_unmap_reply,
    encode_error,
    encode_reply,
    encode_request,
    irq_info_reply,
    region_info_reply,
    region_read_reply,
    region_write_reply,
    version_reply,
)
from vhost_iommu.vfio_user.codec import HEADER_LAYOUT
from vhost_iommu.vfio_user.constants import (
    DEVICE_FLAGS_PCI,
    DEVICE_FLAGS_RESET,
    DMA_MAP_FLAG_READ,
    DMA_MAP_FLAG_WRITE,
    DMA_UNMAP_FLAG_ALL,
    FLAG_ERROR,
    FLAG_NO_REPLY,
    HEADER_SIZE,
    IRQ_INFO_EVENTFD,
    IRQ_SET_ACTION_MASK,
    IRQ_SET_ACTION_TRIGGER,
    IRQ_SET_ACTION_UNMASK,
    IRQ_SET_DATA_BOOL,
    IRQ_SET_DATA_EVENTFD,
    IRQ_SET_DATA_NONE,
    MAX_DATA_XFER_SIZE,
    MAX_FDS_PER_MESSAGE,
    MAX_IRQ_VECTORS,
    MAX_MESSAGE_SIZE,
    MAX_VERSION_DATA_SIZE,
    REGION_INFO_FLAG_CAPS,
    REGION_INFO_FLAG_READ,
    REGION_INFO_FLAG_WRITE,
    TYPE_REPLY,
    VFIO_PCI_BAR0_REGION_INDEX,
    VFIO_PCI_CONFIG_REGION_INDEX,
    VFIO_PCI_MSIX_IRQ_INDEX,
    VFIO_PCI_NUM_IRQS,
    VFIO_PCI_NUM_REGIONS,
)
from vhost_iommu.vfio_user.messages import (
    DEVICE_INFO_LAYOUT,
    DMA_MAP_LAYOUT,
    DMA_UNMAP_LAYOUT,
    IRQ_INFO_LAYOUT,
    IRQ_SET_LAYOUT,
    REGION_ACCESS_LAYOUT,
    REGION_INFO_LAYOUT,
    VERSION_LAYOUT,
)

#: What QEMU 10.2's client sends in VERSION (hw/vfio-user/proxy.c, caps_json), as its JSON text.
QEMU_CAPABILITIES = {
    "migration": {"pgsize": 4096, "max_bitmap_size": 268435456},
    "max_msg_fds": 16,
    "max_data_xfer_size": 1048576,
    "pgsizes": 4096,
    "max_dma_maps": 65535,
    "write_multiple": True,
}


@pytest.fixture
def make_fds() -> Iterator[Callable[[int], list[int]]]:
    """Fresh eventfds for messages; whatever the test left open is closed afterwards (the test asserts
    what must be closed or open before that)."""
    made: list[int] = []

    def make(count: int) -> list[int]:
        fds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(count)]
        made.extend(fds)
        return fds

    yield make
    close_fds(fd for fd in made if fd_is_open(fd))


def raw(command: int, payload: bytes = b"", *, msg_id: int = 1, flags: int = 0, error: int = 0) -> bytes:
    """A command's bytes as a client could write them, right or wrong."""
    return HEADER_LAYOUT.pack(msg_id, command, HEADER_SIZE + len(payload), flags, error) + payload


def decode_one(data: bytes, fds: list[int] | tuple[int, ...] = ()) -> Request:
    (request,) = Decoder().feed(data, fds)
    return request


def every_request(fds: Callable[[int], list[int]]) -> list[Request]:
    """One request of every command the decoder serves, with real fds where the command carries them."""
    return [
        Version(1, 0, 0, QEMU_CAPABILITIES),
        Version(2, 0, 3),
        DmaMap(3, DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE, 0x20000, 0x100000, 0x7FF00000, fds(1)[0]),
        DmaMap(4, DMA_MAP_FLAG_READ, 0, 0xFFFC0000, 0x40000, None),
        DmaUnmap(5, 0, 0x100000, 0x7FF00000),
        DmaUnmap(6, DMA_UNMAP_FLAG_ALL, 0, 0, no_reply=True),
        DeviceGetInfo(7, 16),
        GetRegionInfo(8, 32, VFIO_PCI_CONFIG_REGION_INDEX),
        GetRegionIoFds(9, 16, VFIO_PCI_BAR0_REGION_INDEX),
        GetIrqInfo(10, 16, VFIO_PCI_MSIX_IRQ_INDEX),
        SetIrqs(
            11, IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER, VFIO_PCI_MSIX_IRQ_INDEX, 0, 3, tuple(fds(3))
        ),
        SetIrqs(12, IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER, VFIO_PCI_MSIX_IRQ_INDEX, 3, 5),
        SetIrqs(13, IRQ_SET_DATA_NONE | IRQ_SET_ACTION_TRIGGER, VFIO_PCI_MSIX_IRQ_INDEX, 0, 0),
        SetIrqs(14, IRQ_SET_DATA_BOOL | IRQ_SET_ACTION_MASK, 0, 0, 1, data=b"\x01"),
        RegionRead(15, VFIO_PCI_CONFIG_REGION_INDEX, 0, 4),
        RegionWrite(16, VFIO_PCI_BAR0_REGION_INDEX, 0x10, b"\x01\x02\x03\x04", no_reply=True),
        RegionWrite(17, VFIO_PCI_CONFIG_REGION_INDEX, 4, b"\x06\x00"),
        DeviceReset(18),
    ]


# -- round trips -----------------------------------------------------------------------------------------


def test_every_request_round_trips_with_its_fds(make_fds: Callable[[int], list[int]]) -> None:
    for request in every_request(make_fds):
        data, fds = encode_request(request)
        assert decode_one(data, fds) == request
        assert all(fd_is_open(fd) for fd in fds)  # handed over, not closed


def test_every_command_the_table_serves_has_a_round_trip(make_fds: Callable[[int], list[int]]) -> None:
    served = {request.COMMAND for request in every_request(make_fds)}
    assert served == set(COMMAND_SPECS) - UNSUPPORTED_COMMANDS


def test_qemus_version_decodes_to_its_capabilities() -> None:
    text = json.dumps({"capabilities": QEMU_CAPABILITIES}).encode() + b"\0"
    request = decode_one(raw(Command.VERSION, VERSION_LAYOUT.pack(0, 0) + text, msg_id=0))
    assert request == Version(0, 0, 0, QEMU_CAPABILITIES)


def test_version_without_data_has_no_capabilities() -> None:
    assert decode_one(raw(Command.VERSION, VERSION_LAYOUT.pack(0, 7))) == Version(1, 0, 7, {})


def test_posted_region_write_keeps_no_reply() -> None:
    write = RegionWrite(9, VFIO_PCI_BAR0_REGION_INDEX, 0x40, b"\xff" * 4, no_reply=True)
    data, _ = encode_request(write)
    assert HEADER_LAYOUT.unpack_from(data)[3] == FLAG_NO_REPLY
    assert decode_one(data) == write


@pytest.mark.parametrize("command", sorted(UNSUPPORTED_COMMANDS))
def test_unsupported_commands_decode_for_an_errno_reply_and_close_their_fds(
    command: Command, make_fds: Callable[[int], list[int]]
) -> None:
    fds = make_fds(2)
    decoder = Decoder()
    assert decoder.feed(raw(command, b"\x00" * 24, msg_id=77, flags=FLAG_NO_REPLY), fds) == [
        Unsupported(77, command, no_reply=True)
    ]
    assert not any(fd_is_open(fd) for fd in fds)
    assert decoder.feed(encode_request(DeviceReset(78))[0]) == [DeviceReset(78)]  # the stream goes on


# -- framing ------------------------------------------------------------------------------------------------


def test_messages_split_anywhere_and_merged_decode_the_same(make_fds: Callable[[int], list[int]]) -> None:
    requests = [request for request in every_request(make_fds) if not request.fds]
    stream = b"".join(encode_request(request)[0] for request in requests)
    assert Decoder().feed(stream) == requests
    decoder = Decoder()
    one_byte_at_a_time = [
        request for byte in range(len(stream)) for request in decoder.feed(stream[byte : byte + 1])
    ]
    assert one_byte_at_a_time == requests and decoder.at_boundary
    for cut in range(0, len(stream), 7):
        decoder = Decoder()
        assert decoder.feed(stream[:cut]) + decoder.feed(stream[cut:]) == requests


def test_bytes_needed_reads_one_message_at_a_time() -> None:
    data, _ = encode_request(RegionWrite(1, 0, 0, b"x" * 100))
    decoder = Decoder()
    assert decoder.bytes_needed() == HEADER_SIZE
    decoder.feed(data[:5])
    assert decoder.bytes_needed() == HEADER_SIZE - 5
    decoder.feed(data[5:HEADER_SIZE])
    assert decoder.bytes_needed() == len(data) - HEADER_SIZE
    assert decoder.feed(data[HEADER_SIZE:]) == [RegionWrite(1, 0, 0, b"x" * 100)]


def test_eof_inside_a_message_is_a_violation() -> None:
    decoder = Decoder()
    decoder.feed(encode_request(DeviceReset(1))[0][:10])
    with pytest.raises(VfioUserProtocolError, match="stream ended inside a message"):
        decoder.feed_eof()
    Decoder().feed_eof()  # at a boundary: nothing to say


# -- fds -----------------------------------------------------------------------------------------------------


def test_fds_belong_to_the_last_message_that_begins_in_their_chunk(
    make_fds: Callable[[int], list[int]],
) -> None:
    (fd,) = make_fds(1)
    reset, _ = encode_request(DeviceReset(1))
    dma_map, _ = encode_request(DmaMap(2, DMA_MAP_FLAG_READ, 0, 0, 0x1000, fd))
    decoder = Decoder()
    assert decoder.feed(reset[:3]) == []
    # The rest of the reset (sent before, without fds), then the map with its fd, in one read.
    assert decoder.feed(reset[3:] + dma_map[:20], [fd]) == [DeviceReset(1)]
    assert decoder.feed(dma_map[20:]) == [DmaMap(2, DMA_MAP_FLAG_READ, 0, 0, 0x1000, fd)]


def test_the_kernels_reads_deliver_each_messages_fds_to_it(make_fds: Callable[[int], list[int]]) -> None:
    """The fd rule against the kernel itself: commands sent one ``sendmsg`` each, as QEMU sends them, read
    with a large buffer (several messages per read), give every request the fds it was sent with."""
    sent: list[Request] = [
        DeviceReset(1),
        DmaMap(2, DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE, 0, 0, 0x10000, make_fds(1)[0]),
        RegionWrite(3, VFIO_PCI_BAR0_REGION_INDEX, 0, b"\x01" * 8, no_reply=True),
        DmaMap(4, DMA_MAP_FLAG_READ, 0, 0x10000, 0x1000, None),
        SetIrqs(5, EVENTFD_TRIGGER, VFIO_PCI_MSIX_IRQ_INDEX, 0, 3, tuple(make_fds(3))),
        DmaMap(6, DMA_MAP_FLAG_READ, 0x2000, 0x20000, 0x1000, make_fds(1)[0]),
        RegionRead(7, VFIO_PCI_CONFIG_REGION_INDEX, 0, 4),
    ]
    client, server = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    decoder = Decoder()
    received: list[Request] = []
    try:
        for request in sent:
            data, fds = encode_request(request)
            socket.send_fds(client, [data], list(fds))
        client.shutdown(socket.SHUT_WR)
        while True:
            chunk, chunk_fds, _flags, _address = socket.recv_fds(server, 1 << 16, MAX_FDS_PER_MESSAGE)
            if not chunk and not chunk_fds:
                break
            received += decoder.feed(chunk, chunk_fds)
        decoder.feed_eof()
        assert [type(request) for request in received] == [type(request) for request in sent]
        for got, want in zip(received, sent, strict=True):
            assert [os.fstat(fd).st_ino for fd in got.fds] == [os.fstat(fd).st_ino for fd in want.fds]
    finally:
        client.close()
        server.close()
        decoder.close()
        close_fds(fd for request in received for fd in request.fds)


def test_fds_in_the_middle_of_a_message_are_a_violation_and_closed(
    make_fds: Callable[[int], list[int]],
) -> None:
    fds = make_fds(2)
    data, _ = encode_request(RegionWrite(1, 0, 0, b"abcd"))
    decoder = Decoder()
    decoder.feed(data[:10])
    with pytest.raises(VfioUserProtocolError, match="2 fds arrived in the middle of a message"):
        decoder.feed(data[10:12], fds)
    assert not any(fd_is_open(fd) for fd in fds)


def test_fds_without_a_byte_are_a_violation(make_fds: Callable[[int], list[int]]) -> None:
    fds = make_fds(1)
    with pytest.raises(VfioUserProtocolError, match="1 fds arrived without a byte of any message"):
        Decoder().feed(b"", fds)
    assert not fd_is_open(fds[0])


def test_too_many_fds_with_one_message_are_a_violation(make_fds: Callable[[int], list[int]]) -> None:
    fds = make_fds(MAX_FDS_PER_MESSAGE + 1)
    with pytest.raises(
        VfioUserProtocolError, match=f"{MAX_FDS_PER_MESSAGE + 1} fds arrived with one message"
    ):
        Decoder().feed(encode_request(DeviceReset(1))[0], fds)
    assert not any(fd_is_open(fd) for fd in fds)


def test_a_violation_closes_the_fds_of_requests_decoded_in_the_same_feed(
    make_fds: Callable[[int], list[int]],
) -> None:
    (fd,) = make_fds(1)
    held = make_fds(1)
    good, _ = encode_request(DmaMap(1, DMA_MAP_FLAG_READ, 0, 0, 0x1000, fd))
    decoder = Decoder()
    assert decoder.feed(good[:HEADER_SIZE], [fd]) == []
    partial, _ = encode_request(DmaMap(2, DMA_MAP_FLAG_READ, 0, 0x1000, 0x1000, held[0]))
    with pytest.raises(VfioUserProtocolError, match="DEVICE_RESET: payload must be 0 bytes"):
        decoder.feed(good[HEADER_SIZE:] + raw(Command.DEVICE_RESET, b"junk"))
    assert not fd_is_open(fd)
    # Broken: what it is fed is closed, and it says why again.
    with pytest.raises(VfioUserProtocolError, match="DEVICE_RESET: payload must be 0 bytes"):
        decoder.feed(partial, held)
    assert not fd_is_open(held[0])


def test_close_releases_the_fds_of_a_partial_message(make_fds: Callable[[int], list[int]]) -> None:
    (fd,) = make_fds(1)
    data, _ = encode_request(DmaMap(1, DMA_MAP_FLAG_READ, 0, 0, 0x1000, fd))
    decoder = Decoder()
    decoder.feed(data[:20], [fd])
    assert not decoder.at_boundary
    decoder.close()
    assert not fd_is_open(fd)


def test_no_fd_leaks_on_any_path(fd_leak_check: None) -> None:
    """Every request decoded, refused or left partial, with fds: /proc/self/fd is as it was once the
    returned requests' fds are closed."""
    for request in every_request(lambda count: [os.eventfd(0) for _ in range(count)]):
        data, fds = encode_request(request)
        for cut in (len(data), len(data) // 2, 1):
            decoder = Decoder()
            got: list[Request] = []
            try:
                got += decoder.feed(data[:cut], [os.dup(fd) for fd in fds])
                got += decoder.feed(data[cut:])
                damaged = bytearray(data)
                damaged[8] ^= 0x40  # a reserved header flag
                got += decoder.feed(bytes(damaged), [os.eventfd(0)])
            except VfioUserProtocolError:
                pass
            for returned in got:
                close_fds(returned.fds)
            decoder.close()
        close_fds(fds)


# -- header rules --------------------------------------------------------------------------------------------

HEADER_VIOLATIONS = [
    pytest.param(
        HEADER_LAYOUT.pack(1, Command.DEVICE_RESET, 8, 0, 0),
        "DEVICE_RESET: message size 8 is smaller",
        id="short",
    ),
    pytest.param(
        HEADER_LAYOUT.pack(1, Command.REGION_WRITE, MAX_MESSAGE_SIZE + 1, 0, 0),
        f"REGION_WRITE: message size {MAX_MESSAGE_SIZE + 1} exceeds the {MAX_MESSAGE_SIZE}-byte limit",
        id="long",
    ),
    pytest.param(raw(Command.VERSION, flags=TYPE_REPLY), "a reply from the client", id="reply"),
    pytest.param(raw(Command.DEVICE_RESET, flags=0x7), "message type 7 is neither", id="type"),
    pytest.param(raw(Command.DEVICE_RESET, flags=0x40), "reserved header flag bits 0x40", id="reserved-flag"),
    pytest.param(
        raw(Command.DEVICE_RESET, flags=FLAG_ERROR), "ERROR flag is set on a command", id="error-flag"
    ),
    pytest.param(raw(Command.DEVICE_RESET, error=5), "error field 0x5 is reserved", id="error-field"),
    pytest.param(raw(0), "command 0: unknown command", id="command-0"),
    pytest.param(raw(19), "command 19: unknown command", id="command-19"),
    pytest.param(raw(Command.DMA_READ), "DMA_READ: is sent by the server", id="dma-read"),
    pytest.param(raw(Command.DMA_WRITE), "DMA_WRITE: is sent by the server", id="dma-write"),
    pytest.param(
        raw(Command.REGION_READ, REGION_ACCESS_LAYOUT.pack(0, 0, 4), flags=FLAG_NO_REPLY),
        "REGION_READ: NO_REPLY is set but the reply carries",
        id="no-reply-read",
    ),
    pytest.param(
        raw(Command.VERSION, VERSION_LAYOUT.pack(0, 0), flags=FLAG_NO_REPLY),
        "VERSION: NO_REPLY",
        id="no-reply-ver",
    ),
]


@pytest.mark.parametrize(("data", "message"), HEADER_VIOLATIONS)
def test_header_violations_break_the_decoder_as_soon_as_the_header_is_in(data: bytes, message: str) -> None:
    decoder = Decoder()
    with pytest.raises(VfioUserProtocolError, match=re.escape(message)):
        decoder.feed(data[:HEADER_SIZE])  # the payload, if any, never needed
    with pytest.raises(VfioUserProtocolError, match=re.escape(message)):
        decoder.feed(b"")


# -- payload rules -------------------------------------------------------------------------------------------

PAGE = 0x1000
U64_MAX = (1 << 64) - 1


def _dma_map(flags: int = DMA_MAP_FLAG_READ, offset: int = 0, address: int = 0, size: int = PAGE) -> bytes:
    return raw(Command.DMA_MAP, DMA_MAP_LAYOUT.pack(32, flags, offset, address, size))


def _irq_set(
    flags: int, index: int = 2, start: int = 0, count: int = 1, data: bytes = b"", argsz: int = 0
) -> bytes:
    payload = IRQ_SET_LAYOUT.pack(argsz or 20 + len(data), flags, index, start, count) + data
    return raw(Command.DEVICE_SET_IRQS, payload)


EVENTFD_TRIGGER = IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER

PAYLOAD_VIOLATIONS = [
    # VERSION
    (
        raw(Command.VERSION, b"\x00\x00"),
        0,
        "VERSION: payload of 2 bytes is shorter than its 4-byte fixed part",
    ),
    (raw(Command.VERSION, VERSION_LAYOUT.pack(1, 0)), 0, "VERSION: major version 1 is not spoken (only 0)"),
    (
        raw(Command.VERSION, VERSION_LAYOUT.pack(0, 0) + b"{}"),
        0,
        "VERSION: version data is not NUL-terminated",
    ),
    (
        raw(Command.VERSION, VERSION_LAYOUT.pack(0, 0) + b"{}\0{}\0"),
        0,
        "VERSION: version data has a NUL at byte 2",
    ),
    (raw(Command.VERSION, VERSION_LAYOUT.pack(0, 0) + b"[1]\0"), 0, "VERSION: version data is a JSON list"),
    (raw(Command.VERSION, VERSION_LAYOUT.pack(0, 0) + b"{\0"), 0, "VERSION: version data is not UTF-8 JSON"),
    (
        raw(Command.VERSION, VERSION_LAYOUT.pack(0, 0) + b"\xff\0"),
        0,
        "VERSION: version data is not UTF-8 JSON",
    ),
    (raw(Command.VERSION, VERSION_LAYOUT.pack(0, 0) + b"[" * 3000 + b"\0"), 0, "VERSION: version data nests"),
    (
        raw(Command.VERSION, VERSION_LAYOUT.pack(0, 0) + b" " * MAX_VERSION_DATA_SIZE + b"\0"),
        0,
        f"VERSION: version data of {MAX_VERSION_DATA_SIZE + 1} bytes exceeds",
    ),
    (
        raw(Command.VERSION, VERSION_LAYOUT.pack(0, 0) + b'{"capabilities":{"pgsizes":NaN}}\0'),
        0,
        "VERSION: version data holds NaN",
    ),
    (
        raw(Command.VERSION, VERSION_LAYOUT.pack(0, 0) + b'{"capabilities":{"x-size":1e999}}\0'),
        0,
        "VERSION: version data holds 1e999, which is not a finite number",
    ),
    (
        raw(Command.VERSION, VERSION_LAYOUT.pack(0, 0) + b'{"capabilities":1,"capabilities":{}}\0'),
        0,
        "VERSION: version data has a duplicate JSON member name",
    ),
    (
        raw(Command.VERSION, VERSION_LAYOUT.pack(0, 0) + b'{"capabilities":[]}\0'),
        0,
        "VERSION: capabilities is a list, not an object",
    ),
    (
        raw(Command.VERSION, VERSION_LAYOUT.pack(0, 0) + b'{"capabilities":{"max_msg_fds":-1}}\0'),
        0,
        "VERSION: capability max_msg_fds -1 is not a non-negative integer",
    ),
    (
        raw(Command.VERSION, VERSION_LAYOUT.pack(0, 0) + b'{"capabilities":{"pgsizes":true}}\0'),
        0,
        "VERSION: capability pgsizes True is not a non-negative integer",
    ),
    (
        raw(Command.VERSION, VERSION_LAYOUT.pack(0, 0) + b'{"capabilities":{"write_multiple":1}}\0'),
        0,
        "VERSION: capability write_multiple 1 is not a JSON bool",
    ),
    (raw(Command.VERSION, VERSION_LAYOUT.pack(0, 0)), 1, "VERSION: carries 1 fds, at most 0"),
    # DMA_MAP
    (_dma_map(size=0), 1, "DMA_MAP: size 0x0 must be non-zero"),
    (_dma_map(flags=0), 1, "DMA_MAP: flags 0x0 grants neither read nor write access"),
    (_dma_map(flags=4 | DMA_MAP_FLAG_READ), 1, "DMA_MAP: flags 0x5 has bits the spec does not define"),
    (_dma_map(size=0x800), 1, "DMA_MAP: size 0x800 is not a multiple of the 4096-byte DMA page"),
    (_dma_map(address=0x10), 1, "DMA_MAP: address 0x10 is not a multiple"),
    (_dma_map(offset=0x10), 1, "DMA_MAP: offset 0x10 is not a multiple"),
    (
        _dma_map(address=U64_MAX - PAGE + 1, size=2 * PAGE),
        1,
        "DMA_MAP: address 0xfffffffffffff000 + size 0x2000 wraps",
    ),
    (
        _dma_map(offset=U64_MAX - PAGE + 1, size=2 * PAGE),
        1,
        "DMA_MAP: offset 0xfffffffffffff000 + size 0x2000 wraps",
    ),
    (_dma_map(offset=PAGE), 0, "DMA_MAP: offset 0x1000 without an fd"),
    (_dma_map(), 2, "DMA_MAP: carries 2 fds, at most 1"),
    (
        raw(Command.DMA_MAP, DMA_MAP_LAYOUT.pack(31, 1, 0, 0, PAGE)),
        1,
        "DMA_MAP: argsz 31 is smaller than the 32-byte",
    ),
    (
        raw(Command.DMA_MAP, DMA_MAP_LAYOUT.pack(32, 1, 0, 0, PAGE) + b"x"),
        1,
        "DMA_MAP: payload must be 32 bytes, got 33",
    ),
    # DMA_UNMAP
    (raw(Command.DMA_UNMAP, DMA_UNMAP_LAYOUT.pack(24, 0, 0, 0)), 0, "DMA_UNMAP: size 0x0 must be non-zero"),
    (raw(Command.DMA_UNMAP, DMA_UNMAP_LAYOUT.pack(24, 1, 0, PAGE)), 0, "DMA_UNMAP: flags 0x1 has bits this"),
    (
        raw(Command.DMA_UNMAP, DMA_UNMAP_LAYOUT.pack(24, DMA_UNMAP_FLAG_ALL, 0, PAGE)),
        0,
        "DMA_UNMAP: address 0x0 and size 0x1000 must be zero with the ALL flag",
    ),
    (
        raw(Command.DMA_UNMAP, DMA_UNMAP_LAYOUT.pack(24, 0, U64_MAX - PAGE + 1, 2 * PAGE)),
        0,
        "DMA_UNMAP: address 0xfffffffffffff000 + size 0x2000 wraps around 2^64",
    ),
    (
        raw(Command.DMA_UNMAP, DMA_UNMAP_LAYOUT.pack(24, 0, 0, 0x10)),
        0,
        "DMA_UNMAP: size 0x10 is not a multiple",
    ),
    (raw(Command.DMA_UNMAP, DMA_UNMAP_LAYOUT.pack(23, 0, 0, PAGE)), 0, "DMA_UNMAP: argsz 23 is smaller"),
    (raw(Command.DMA_UNMAP, DMA_UNMAP_LAYOUT.pack(24, 0, 0, PAGE)), 1, "DMA_UNMAP: carries 1 fds, at most 0"),
    # DEVICE_GET_INFO
    (
        raw(Command.DEVICE_GET_INFO, DEVICE_INFO_LAYOUT.pack(15, 0, 0, 0)),
        0,
        "DEVICE_GET_INFO: argsz 15 is smaller",
    ),
    (
        raw(Command.DEVICE_GET_INFO, DEVICE_INFO_LAYOUT.pack(16, 0, 9, 0)),
        0,
        "DEVICE_GET_INFO: num_regions 0x9 must",
    ),
    (
        raw(Command.DEVICE_GET_INFO, b"\x10\x00\x00\x00"),
        0,
        "DEVICE_GET_INFO: payload must be 16 bytes, got 4",
    ),
    # DEVICE_GET_REGION_INFO
    (
        raw(Command.DEVICE_GET_REGION_INFO, REGION_INFO_LAYOUT.pack(32, 0, VFIO_PCI_NUM_REGIONS, 0, 0, 0)),
        0,
        "DEVICE_GET_REGION_INFO: region index 9 is not a PCI region (0-8)",
    ),
    (
        raw(Command.DEVICE_GET_REGION_INFO, REGION_INFO_LAYOUT.pack(31, 0, 0, 0, 0, 0)),
        0,
        "DEVICE_GET_REGION_INFO: argsz 31 is smaller than the 32-byte structure",
    ),
    (
        raw(Command.DEVICE_GET_REGION_INFO, REGION_INFO_LAYOUT.pack(32, 0, 0, 0, 0, 8)),
        0,
        "DEVICE_GET_REGION_INFO: offset 0x8 must be zero in a request",
    ),
    # DEVICE_GET_REGION_IO_FDS
    (
        raw(Command.DEVICE_GET_REGION_IO_FDS, IRQ_INFO_LAYOUT.pack(16, 0, 0, 3)),
        0,
        "DEVICE_GET_REGION_IO_FDS: count 0x3 must be zero",
    ),
    # DEVICE_GET_IRQ_INFO
    (
        raw(Command.DEVICE_GET_IRQ_INFO, IRQ_INFO_LAYOUT.pack(16, 0, VFIO_PCI_NUM_IRQS, 0)),
        0,
        "DEVICE_GET_IRQ_INFO: IRQ index 5 is not a PCI IRQ type (0-4)",
    ),
    (
        raw(Command.DEVICE_GET_IRQ_INFO, IRQ_INFO_LAYOUT.pack(8, 0, 0, 0)),
        0,
        "DEVICE_GET_IRQ_INFO: argsz 8 is smaller",
    ),
    # DEVICE_SET_IRQS
    (_irq_set(EVENTFD_TRIGGER, count=2), 1, "DEVICE_SET_IRQS: DATA_EVENTFD carries 1 fds for 2 vectors"),
    (_irq_set(EVENTFD_TRIGGER, count=17), 17, "17 fds arrived with one message, at most 16"),
    (
        _irq_set(IRQ_SET_DATA_EVENTFD),
        0,
        "DEVICE_SET_IRQS: flags 0x4 must hold exactly one DATA and one ACTION bit",
    ),
    (
        _irq_set(EVENTFD_TRIGGER | IRQ_SET_ACTION_MASK),
        0,
        "DEVICE_SET_IRQS: flags 0x2c must hold exactly one DATA and one ACTION bit",
    ),
    (_irq_set(EVENTFD_TRIGGER | 1 << 6), 0, "DEVICE_SET_IRQS: flags 0x64 has bits the spec does not define"),
    (_irq_set(EVENTFD_TRIGGER, index=5), 0, "DEVICE_SET_IRQS: IRQ index 5 is not a PCI IRQ type"),
    (
        _irq_set(EVENTFD_TRIGGER, start=0xFFFF_FFFF, count=2),
        0,
        f"DEVICE_SET_IRQS: vectors 4294967295+2 go beyond the {MAX_IRQ_VECTORS} vectors",
    ),
    (
        _irq_set(EVENTFD_TRIGGER, count=0),
        0,
        "DEVICE_SET_IRQS: count 0 is only defined with DATA_NONE and start 0",
    ),
    (
        _irq_set(IRQ_SET_DATA_NONE | IRQ_SET_ACTION_TRIGGER, start=1, count=0),
        0,
        "DEVICE_SET_IRQS: count 0 is only defined",
    ),
    (
        _irq_set(IRQ_SET_DATA_BOOL | IRQ_SET_ACTION_UNMASK, count=2, data=b"\x01"),
        0,
        "DEVICE_SET_IRQS: DATA_BOOL carries 1 bytes for 2 vectors",
    ),
    (
        _irq_set(IRQ_SET_DATA_BOOL | IRQ_SET_ACTION_UNMASK, count=1, data=b"\x02"),
        0,
        "DEVICE_SET_IRQS: DATA_BOOL bytes must be 0 or 1",
    ),
    (
        _irq_set(IRQ_SET_DATA_NONE | IRQ_SET_ACTION_UNMASK, count=1, data=b"\x01"),
        0,
        "DEVICE_SET_IRQS: carries 1 data bytes, only DATA_BOOL has data",
    ),
    (_irq_set(IRQ_SET_DATA_NONE | IRQ_SET_ACTION_UNMASK), 1, "DEVICE_SET_IRQS: carries 1 fds, expected none"),
    (
        _irq_set(EVENTFD_TRIGGER, argsz=19),
        1,
        "DEVICE_SET_IRQS: argsz 19 is smaller than the 20-byte structure",
    ),
    (raw(Command.DEVICE_SET_IRQS, b"\x00" * 16), 0, "DEVICE_SET_IRQS: payload of 16 bytes is shorter"),
    # REGION_READ / REGION_WRITE
    (
        raw(Command.REGION_READ, REGION_ACCESS_LAYOUT.pack(0, 0, 0)),
        0,
        "REGION_READ: count 0 is not within 1-",
    ),
    (
        raw(Command.REGION_READ, REGION_ACCESS_LAYOUT.pack(0, 0, MAX_DATA_XFER_SIZE + 1)),
        0,
        f"REGION_READ: count {MAX_DATA_XFER_SIZE + 1} is not within 1-{MAX_DATA_XFER_SIZE}",
    ),
    (
        raw(Command.REGION_READ, REGION_ACCESS_LAYOUT.pack(U64_MAX - 1, 0, 4)),
        0,
        "REGION_READ: offset 0xfffffffffffffffe + size 0x4 wraps around 2^64",
    ),
    (raw(Command.REGION_READ, REGION_ACCESS_LAYOUT.pack(0, 9, 4)), 0, "REGION_READ: region index 9 is not"),
    (
        raw(Command.REGION_READ, REGION_ACCESS_LAYOUT.pack(0, 0, 4) + b"abcd"),
        0,
        "REGION_READ: payload must be 16",
    ),
    (
        raw(Command.REGION_WRITE, REGION_ACCESS_LAYOUT.pack(0, 0, 4) + b"abc"),
        0,
        "REGION_WRITE: count 4 does not match the 3 data bytes",
    ),
    (raw(Command.REGION_WRITE, REGION_ACCESS_LAYOUT.pack(0, 0, 0)), 0, "REGION_WRITE: count 0 is not within"),
    (
        raw(Command.REGION_WRITE, REGION_ACCESS_LAYOUT.pack(0, 0, 1) + b"a"),
        1,
        "REGION_WRITE: carries 1 fds, at most 0",
    ),
    # DEVICE_RESET
    (raw(Command.DEVICE_RESET, b"\x00"), 0, "DEVICE_RESET: payload must be 0 bytes, got 1"),
]


@pytest.mark.parametrize(("data", "fd_count", "message"), PAYLOAD_VIOLATIONS)
def test_payload_violations_say_what_was_wrong_and_close_the_fds(
    data: bytes, fd_count: int, message: str, make_fds: Callable[[int], list[int]]
) -> None:
    fds = make_fds(fd_count)
    decoder = Decoder()
    with pytest.raises(VfioUserProtocolError, match=re.escape(message)):
        decoder.feed(data, fds)
    assert not any(fd_is_open(fd) for fd in fds)
    later = make_fds(1)
    with pytest.raises(VfioUserProtocolError, match=re.escape(message)):  # refuses further input
        decoder.feed(encode_request(DeviceReset(2))[0], later)
    assert not fd_is_open(later[0])


@pytest.mark.parametrize(("data", "fd_count", "message"), [case for case in PAYLOAD_VIOLATIONS if case[1]])
def test_no_fd_is_closed_twice_on_a_violation(
    data: bytes,
    fd_count: int,
    message: str,
    make_fds: Callable[[int], list[int]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """By the time of a second close the number may be another thread's fd."""
    closed: list[int] = []
    real_close = os.close

    def recording_close(fd: int) -> None:
        closed.append(fd)
        real_close(fd)

    fds = make_fds(fd_count)
    monkeypatch.setattr(os, "close", recording_close)
    with pytest.raises(VfioUserProtocolError):
        Decoder().feed(data, fds)
    monkeypatch.undo()
    assert sorted(closed) == sorted(fds)


def test_dma_unmap_all_and_eventfd_de_assignment_are_accepted() -> None:
    assert decode_one(
        raw(Command.DMA_UNMAP, DMA_UNMAP_LAYOUT.pack(24, DMA_UNMAP_FLAG_ALL, 0, 0), msg_id=3)
    ) == (DmaUnmap(3, DMA_UNMAP_FLAG_ALL, 0, 0))
    # QEMU de-assigns a run of vectors with a SET_IRQS that carries no fds.
    assert decode_one(_irq_set(EVENTFD_TRIGGER, start=4, count=12)) == SetIrqs(1, EVENTFD_TRIGGER, 2, 4, 12)


def test_request_objects_validate_their_fields_whoever_builds_them() -> None:
    with pytest.raises(MessageError, match="message id 65536"):
        DeviceReset(1 << 16)
    with pytest.raises(MessageError, match="size 0x0 must be non-zero"):
        DmaMap(1, DMA_MAP_FLAG_READ, 0, 0, 0, None)
    with pytest.raises(MessageError, match="fd -1 is not a file descriptor"):
        DmaMap(1, DMA_MAP_FLAG_READ, 0, 0, PAGE, -1)
    with pytest.raises(MessageError, match="is not one decoded as unsupported"):
        Unsupported(1, Command.DMA_MAP)
    with pytest.raises(MessageError, match="17 eventfds, at most 16 per message"):
        SetIrqs(1, EVENTFD_TRIGGER, VFIO_PCI_MSIX_IRQ_INDEX, 0, 17, tuple(range(3, 20)))
    with pytest.raises(MessageError, match=re.escape("fds (3, -1) are not all file descriptors")):
        SetIrqs(1, EVENTFD_TRIGGER, VFIO_PCI_MSIX_IRQ_INDEX, 0, 2, (3, -1))
    with pytest.raises(MessageError, match="capability name 1 is not a string"):
        Version(1, 0, 0, {1: 2})  # type: ignore[dict-item]


# -- encoders ------------------------------------------------------------------------------------------------


def test_reply_and_error_headers() -> None:
    reply = encode_reply(513, Command.REGION_READ, b"abc")
    assert HEADER_LAYOUT.unpack_from(reply) == (513, Command.REGION_READ, HEADER_SIZE + 3, TYPE_REPLY, 0)
    assert reply[HEADER_SIZE:] == b"abc"
    error_reply = encode_error(7, Command.DMA_MAP, errno.EEXIST)
    assert error_reply == HEADER_LAYOUT.pack(
        7, Command.DMA_MAP, HEADER_SIZE, TYPE_REPLY | FLAG_ERROR, errno.EEXIST
    )
    with pytest.raises(ValueError, match="message id 65536"):
        encode_reply(1 << 16, Command.DMA_MAP)
    with pytest.raises(ValueError, match="errno 0"):
        encode_error(1, Command.DMA_MAP, 0)


def test_version_reply_is_major_0_minor_0_and_nul_terminated_json() -> None:
    capabilities = {"max_msg_fds": 16, "max_data_xfer_size": 1 << 20, "pgsizes": 4096, "max_dma_maps": 65535}
    payload = version_reply(capabilities)
    assert VERSION_LAYOUT.unpack_from(payload) == (0, 0)
    assert payload.endswith(b"\0") and payload.count(b"\0", VERSION_LAYOUT.size) == 1
    assert json.loads(payload[VERSION_LAYOUT.size : -1]) == {"capabilities": capabilities}
    # The decoder (the client side's rules are the same) reads it back.
    assert decode_one(raw(Command.VERSION, payload)) == Version(1, 0, 0, capabilities)


def test_the_servers_version_reply_advertises_the_decoders_limits_and_fits_qemus_buffer() -> None:
    payload = version_reply()
    advertised = json.loads(payload[VERSION_LAYOUT.size : -1])["capabilities"]
    assert advertised == dict(SERVER_CAPABILITIES)
    assert advertised["max_msg_fds"] == MAX_FDS_PER_MESSAGE
    assert advertised["max_data_xfer_size"] == MAX_DATA_XFER_SIZE
    assert "write_multiple" not in advertised
    # QEMU reads the reply into its own VERSION message's buffer: the reply may not be longer.
    qemus_version = json.dumps({"capabilities": QEMU_CAPABILITIES}, separators=(",", ":")).encode() + b"\0"
    assert len(payload) <= VERSION_LAYOUT.size + len(qemus_version)


def test_version_reply_refuses_write_multiple_and_bad_capabilities() -> None:
    with pytest.raises(ValueError, match="write_multiple"):
        version_reply({"write_multiple": True})
    with pytest.raises(MessageError, match="max_msg_fds"):
        version_reply({"max_msg_fds": "16"})


def test_device_and_irq_info_replies() -> None:
    assert DEVICE_INFO_LAYOUT.unpack(device_info_reply(16, DEVICE_FLAGS_PCI | DEVICE_FLAGS_RESET, 9, 5)) == (
        16,
        DEVICE_FLAGS_PCI | DEVICE_FLAGS_RESET,
        9,
        5,
    )
    assert IRQ_INFO_LAYOUT.unpack(irq_info_reply(16, 2, IRQ_INFO_EVENTFD, 8)) == (16, IRQ_INFO_EVENTFD, 2, 8)
    with pytest.raises(ValueError, match="flags 0x4"):
        device_info_reply(16, 4, 9, 5)


def test_region_info_reply_with_room_for_its_capabilities() -> None:
    cap = bytes(range(24))
    flags = REGION_INFO_FLAG_READ | REGION_INFO_FLAG_WRITE
    payload = region_info_reply(32 + len(cap), 0, flags, 0x1000, 0x0)
    assert REGION_INFO_LAYOUT.unpack(payload) == (32, flags, 0, 0, 0x1000, 0)
    payload = region_info_reply(64, 0, flags, 0x1000, 0x0, cap)
    assert REGION_INFO_LAYOUT.unpack_from(payload) == (56, flags | REGION_INFO_FLAG_CAPS, 0, 32, 0x1000, 0)
    assert payload[32:] == cap


def test_region_info_reply_too_small_says_the_size_needed_without_caps() -> None:
    cap = bytes(24)
    payload = region_info_reply(32, 2, REGION_INFO_FLAG_READ, 0x4000, 0, cap)
    # The structure alone, argsz saying how much room the full reply needs, CAPS clear (cap_offset 0).
    assert REGION_INFO_LAYOUT.unpack(payload) == (56, REGION_INFO_FLAG_READ, 2, 0, 0x4000, 0)
    with pytest.raises(ValueError, match="CAPS is set by the encoder"):
        region_info_reply(64, 0, REGION_INFO_FLAG_CAPS, 0, 0, cap)


def test_region_access_and_unmap_replies() -> None:
    assert region_read_reply(7, 0x10, b"\x01\x02") == REGION_ACCESS_LAYOUT.pack(0x10, 7, 2) + b"\x01\x02"
    assert region_write_reply(0, 0x40, 4) == REGION_ACCESS_LAYOUT.pack(0x40, 0, 4)
    unmap = DmaUnmap(1, 0, 0x2000, 0x1000)
    assert dma_unmap_reply(unmap) == DMA_UNMAP_LAYOUT.pack(24, 0, 0x2000, 0x1000)


# -- properties ----------------------------------------------------------------------------------------------


def feed_in_chunks(data: bytes, cuts: list[int], fd_chunks: list[tuple[int, int]]) -> None:
    """Feed ``data`` cut at ``cuts`` (modulo its length), with ``count`` fresh eventfds at chunk ``chunk`` for
    each (chunk, count); close the fds of what is returned (the caller's job); stop at the first protocol
    error, or else end the stream; then close the decoder."""
    bounds = sorted({0, len(data), *(cut % (len(data) or 1) for cut in cuts)})
    fds_at = dict(fd_chunks)
    decoder = Decoder()
    try:
        for chunk, (start, end) in enumerate(itertools.pairwise(bounds)):
            fds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(fds_at.get(chunk, 0))]
            try:
                for request in decoder.feed(data[start:end], fds):
                    close_fds(request.fds)
            except VfioUserProtocolError:
                return
        with contextlib.suppress(VfioUserProtocolError):
            decoder.feed_eof()
    finally:
        decoder.close()


@settings(max_examples=300, deadline=None)
@given(
    data=st.binary(max_size=400),
    cuts=st.lists(st.integers(0, 400), max_size=8),
    fd_chunks=st.lists(st.tuples(st.integers(0, 8), st.integers(0, 3)), max_size=4),
)
def test_random_bytes_in_random_chunks_raise_only_protocol_errors_and_leak_no_fd(
    data: bytes, cuts: list[int], fd_chunks: list[tuple[int, int]]
) -> None:
    before = open_fd_count()
    feed_in_chunks(data, cuts, fd_chunks)
    assert open_fd_count() == before


#: Valid requests to damage (their fd numbers are not sent, only how many).
VALID_REQUESTS = every_request(lambda count: [0] * count)


@settings(max_examples=200, deadline=None)
@given(
    pieces=st.lists(st.sampled_from(VALID_REQUESTS), min_size=1, max_size=6),
    flips=st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 7)), max_size=3),
    cuts=st.lists(st.integers(0, 1 << 16), max_size=6),
    fd_chunks=st.lists(st.tuples(st.integers(0, 6), st.integers(0, 3)), max_size=4),
)
def test_valid_streams_with_flipped_bits_raise_only_protocol_errors_and_leak_no_fd(
    pieces: list[Request], flips: list[tuple[int, int]], cuts: list[int], fd_chunks: list[tuple[int, int]]
) -> None:
    """Random bytes rarely get past the header; damaged valid streams reach every payload rule."""
    before = open_fd_count()
    stream = bytearray(b"".join(encode_request(request)[0] for request in pieces))
    for at, bit in flips:
        stream[at % len(stream)] ^= 1 << bit
    feed_in_chunks(bytes(stream), cuts, fd_chunks)
    assert open_fd_count() == before


_u16 = st.integers(0, 0xFFFF)
_pages = st.integers(1, 1 << 20).map(lambda pages: pages * PAGE)


@settings(max_examples=200, deadline=None)
@given(
    msg_id=_u16,
    address=st.integers(0, (1 << 40) - 1).map(lambda page: page * PAGE),
    size=_pages,
    offset=st.integers(0, 1 << 30).map(lambda page: page * PAGE),
    data=st.binary(min_size=1, max_size=64),
    region=st.integers(0, VFIO_PCI_NUM_REGIONS - 1),
    cut=st.integers(0, 300),
)
def test_valid_requests_round_trip_at_any_cut(
    msg_id: int, address: int, size: int, offset: int, data: bytes, region: int, cut: int
) -> None:
    fd = os.eventfd(0, os.EFD_CLOEXEC)
    sent: list[Request] = [
        DmaUnmap(msg_id, 0, address, size),
        RegionWrite(msg_id, region, offset, data, no_reply=bool(msg_id & 1)),
        RegionRead(msg_id, region, offset, len(data)),
        DmaMap(msg_id, DMA_MAP_FLAG_READ, offset, address, size, fd),
    ]
    stream = b"".join(encode_request(request)[0] for request in sent)
    map_start = len(stream) - len(encode_request(sent[-1])[0])
    cut = min(cut, map_start)  # the map's fd rides with its first byte: the second chunk
    decoder = Decoder()
    try:
        assert decoder.feed(stream[:cut]) + decoder.feed(stream[cut:], [fd]) == sent
    finally:
        os.close(fd)

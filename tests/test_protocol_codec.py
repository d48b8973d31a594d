"""The sans-I/O codec, fed bytes and fds directly: no sockets."""

from __future__ import annotations

import contextlib
import itertools
import os
import struct
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vhost_iommu.protocol import (
    U64,
    BackendRequest,
    ConfigSpace,
    Decoder,
    Empty,
    FramingError,
    FrontendRequest,
    MemoryRegion,
    MemoryTable,
    Message,
    PayloadError,
    ProtocolError,
    RequestRejected,
    SingleMemoryRegion,
    Stream,
    VringAddress,
    VringFile,
    VringState,
    encode,
    encode_ack,
    encode_reply,
)

HEADER = struct.Struct("=III")


def fd_is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


@pytest.fixture
def pipe_fds() -> Iterator[list[int]]:
    """Fresh fds for messages; whatever the test did not see closed is closed afterwards."""
    made: list[int] = []

    def make(count: int) -> list[int]:
        fds: list[int] = []
        for _ in range(count):
            r, w = os.pipe()
            os.close(w)
            fds.append(r)
        made.extend(fds)
        return fds

    holder: list[int] = []
    holder.extend(make(9))
    yield holder
    for fd in made:
        if fd_is_open(fd):
            os.close(fd)


def decode_one(
    data: bytes, fds: list[int] | None = None, stream: Stream = Stream.FRONTEND_REQUESTS
) -> Message:
    decoder = Decoder(stream)
    decoder.feed(data, fds or [])
    message = decoder.next_message()
    assert message is not None
    assert decoder.next_message() is None
    return message


REGION = MemoryRegion(
    guest_phys_addr=0x1000, memory_size=0x10000, userspace_addr=0x7F0000000000, mmap_offset=0
)


@pytest.mark.parametrize(
    ("code", "payload"),
    [
        (FrontendRequest.GET_FEATURES, Empty()),
        (FrontendRequest.SET_FEATURES, U64(1 << 32 | 1 << 30)),
        (FrontendRequest.SET_VRING_NUM, VringState(1, 256)),
        (FrontendRequest.SET_VRING_ADDR, VringAddress(0, 0, 0x1000, 0x3000, 0x2000, 0)),
        (FrontendRequest.GET_VRING_BASE, VringState(1, 0)),
        (FrontendRequest.SET_VRING_CALL, VringFile(1, has_fd=False)),
        (FrontendRequest.SET_CONFIG, ConfigSpace(4, 0, b"\x01\x02\x03\x04")),
        (FrontendRequest.GET_CONFIG, ConfigSpace(0, 0, bytes(40))),
        (FrontendRequest.REM_MEM_REG, SingleMemoryRegion(REGION)),
        (FrontendRequest.SET_STATUS, U64(0x0F)),
    ],
)
def test_requests_without_fds_round_trip(code: FrontendRequest, payload: object) -> None:
    message = decode_one(encode(code, payload, need_reply=True))  # type: ignore[arg-type]
    assert message.code is code
    assert message.payload == payload
    assert message.need_reply
    assert message.fds == ()


def test_set_mem_table_takes_one_fd_per_region(pipe_fds: list[int]) -> None:
    second = MemoryRegion(0x100000, 0x1000, 0x7F1000000000, 0x2000)
    table = MemoryTable((REGION, second))
    message = decode_one(encode(FrontendRequest.SET_MEM_TABLE, table), pipe_fds[:2])
    assert message.payload == table
    assert message.fds == tuple(pipe_fds[:2])
    assert len(table.pack()) == 8 + 2 * 32  # QEMU sends only the regions it fills


def test_vring_kick_with_fd_and_the_no_fd_bit(pipe_fds: list[int]) -> None:
    with_fd = decode_one(encode(FrontendRequest.SET_VRING_KICK, VringFile(1, has_fd=True)), pipe_fds[:1])
    assert with_fd.payload == VringFile(1, has_fd=True)
    assert with_fd.fds == (pipe_fds[0],)
    raw = decode_one(HEADER.pack(12, 1, 8) + struct.pack("=Q", 0x101))
    assert raw.payload == VringFile(1, has_fd=False)


def test_message_split_in_single_bytes_is_reassembled(pipe_fds: list[int]) -> None:
    data = encode(FrontendRequest.ADD_MEM_REG, SingleMemoryRegion(REGION))
    decoder = Decoder(Stream.FRONTEND_REQUESTS)
    seen: list[Message] = []
    for i, byte in enumerate(data):
        assert decoder.bytes_needed() >= 1
        decoder.feed(bytes([byte]), pipe_fds[:1] if i == 0 else [])
        message = decoder.next_message()
        if message is not None:
            seen.append(message)
    assert [m.payload for m in seen] == [SingleMemoryRegion(REGION)]
    assert seen[0].fds == (pipe_fds[0],)
    assert decoder.at_boundary


def test_bytes_needed_walks_header_then_payload() -> None:
    decoder = Decoder(Stream.FRONTEND_REQUESTS)
    assert decoder.bytes_needed() == 12
    data = encode(FrontendRequest.SET_FEATURES, U64(5))
    decoder.feed(data[:12])
    assert decoder.next_message() is None
    assert decoder.bytes_needed() == 8
    decoder.feed(data[12:])
    assert decoder.next_message() == Message(FrontendRequest.SET_FEATURES, 1, U64(5))
    assert decoder.bytes_needed() == 12


def test_two_messages_in_one_feed() -> None:
    decoder = Decoder(Stream.FRONTEND_REQUESTS)
    decoder.feed(encode(FrontendRequest.SET_OWNER) + encode(FrontendRequest.GET_FEATURES))
    assert [m.code for m in decoder.messages()] == [FrontendRequest.SET_OWNER, FrontendRequest.GET_FEATURES]


# -- fatal: framing lost ---------------------------------------------------------------------------


@pytest.mark.parametrize("flags", [0, 2, 3])
def test_bad_version_is_fatal_and_stays_fatal(flags: int) -> None:
    decoder = Decoder(Stream.FRONTEND_REQUESTS)
    decoder.feed(HEADER.pack(FrontendRequest.GET_FEATURES, flags, 0))
    with pytest.raises(FramingError, match="version"):
        decoder.next_message()
    decoder.feed(encode(FrontendRequest.GET_FEATURES))
    with pytest.raises(FramingError):
        decoder.next_message()


def test_oversize_payload_is_fatal_and_closes_fds(pipe_fds: list[int]) -> None:
    decoder = Decoder(Stream.FRONTEND_REQUESTS)
    decoder.feed(HEADER.pack(FrontendRequest.SET_MEM_TABLE, 1, 0xFFFFFFFF), pipe_fds[:3])
    with pytest.raises(FramingError, match="exceeds"):
        decoder.next_message()
    assert not any(fd_is_open(fd) for fd in pipe_fds[:3])


def test_more_fds_than_any_message_carries_is_fatal(pipe_fds: list[int]) -> None:
    decoder = Decoder(Stream.FRONTEND_REQUESTS)
    with pytest.raises(FramingError, match="9 fds"):
        decoder.feed(encode(FrontendRequest.SET_OWNER), pipe_fds[:9])
    assert not any(fd_is_open(fd) for fd in pipe_fds[:9])


def test_end_of_stream_inside_a_message_is_fatal(pipe_fds: list[int]) -> None:
    decoder = Decoder(Stream.FRONTEND_REQUESTS)
    decoder.feed(encode(FrontendRequest.SET_FEATURES, U64(1))[:15], pipe_fds[:1])
    assert decoder.next_message() is None
    decoder.feed_eof()
    with pytest.raises(FramingError, match="ended inside"):
        decoder.next_message()
    assert not fd_is_open(pipe_fds[0])


def test_clean_end_of_stream_is_not_an_error() -> None:
    decoder = Decoder(Stream.FRONTEND_REQUESTS)
    decoder.feed_eof()
    assert decoder.next_message() is None


def test_close_releases_fds_of_a_partial_message(pipe_fds: list[int]) -> None:
    decoder = Decoder(Stream.FRONTEND_REQUESTS)
    decoder.feed(encode(FrontendRequest.SET_VRING_KICK, VringFile(0, True))[:5], pipe_fds[:1])
    decoder.close()
    assert not fd_is_open(pipe_fds[0])


# -- rejected: one request refused, decoding goes on -----------------------------------------------


def expect_rejected(data: bytes, fds: list[int], match: str) -> RequestRejected:
    decoder = Decoder(Stream.FRONTEND_REQUESTS)
    decoder.feed(data + encode(FrontendRequest.GET_FEATURES), fds)
    with pytest.raises(RequestRejected, match=match) as info:
        decoder.next_message()
    assert not any(fd_is_open(fd) for fd in fds)
    follow = decoder.next_message()
    assert follow is not None and follow.code is FrontendRequest.GET_FEATURES
    return info.value


def test_reserved_flag_bits_are_rejected() -> None:
    rejected = expect_rejected(HEADER.pack(FrontendRequest.SET_OWNER, 1 | 0x8 | 0x10, 0), [], "reserved")
    assert rejected.need_reply


def test_reply_flag_on_a_request_is_rejected() -> None:
    expect_rejected(HEADER.pack(FrontendRequest.SET_OWNER, 1 | 0x4, 0), [], "reply flag")


def test_unknown_request_code_is_rejected_with_its_fds_closed(pipe_fds: list[int]) -> None:
    rejected = expect_rejected(HEADER.pack(999, 9, 4) + b"abcd", pipe_fds[:2], "unknown request code")
    assert rejected.code == 999
    assert rejected.need_reply and not rejected.reply_required


def test_known_but_unsupported_request_is_rejected(pipe_fds: list[int]) -> None:
    rejected = expect_rejected(
        HEADER.pack(FrontendRequest.SET_LOG_FD, 1, 0), pipe_fds[:1], "SET_LOG_FD: not supported"
    )
    assert not rejected.reply_required


def test_unsupported_get_request_still_requires_a_reply() -> None:
    rejected = expect_rejected(HEADER.pack(FrontendRequest.GET_INFLIGHT_FD, 1, 0), [], "not supported")
    assert rejected.reply_required


@pytest.mark.parametrize(
    ("code", "size"),
    [
        (FrontendRequest.SET_VRING_NUM, 4),
        (FrontendRequest.SET_FEATURES, 16),
        (FrontendRequest.GET_FEATURES, 8),
        (FrontendRequest.SET_VRING_ADDR, 32),
        (FrontendRequest.ADD_MEM_REG, 32),
        (FrontendRequest.SET_MEM_TABLE, 8 + 32 + 1),
    ],
)
def test_wrong_payload_size_is_rejected(code: FrontendRequest, size: int) -> None:
    expect_rejected(HEADER.pack(code, 1, size) + bytes(size), [], "bytes")


def test_fds_on_a_request_that_takes_none_are_closed(pipe_fds: list[int]) -> None:
    expect_rejected(encode(FrontendRequest.SET_VRING_NUM, VringState(0, 64)), pipe_fds[:1], "carries 1 fds")


def test_vring_file_fd_count_must_match_the_no_fd_bit(pipe_fds: list[int]) -> None:
    expect_rejected(encode(FrontendRequest.SET_VRING_CALL, VringFile(0, True)), [], "carries 0 fds")
    expect_rejected(encode(FrontendRequest.SET_VRING_CALL, VringFile(0, False)), pipe_fds[:1], "carries 1")
    expect_rejected(encode(FrontendRequest.SET_VRING_KICK, VringFile(0, True)), pipe_fds[1:3], "carries 2")


def test_vring_file_reserved_bits_are_rejected(pipe_fds: list[int]) -> None:
    data = HEADER.pack(FrontendRequest.SET_VRING_KICK, 1, 8) + struct.pack("=Q", 0x200)
    expect_rejected(data, pipe_fds[:1], "reserved")


def test_mem_table_fd_count_must_match_regions(pipe_fds: list[int]) -> None:
    table = MemoryTable((REGION,))
    expect_rejected(encode(FrontendRequest.SET_MEM_TABLE, table), pipe_fds[:2], "carries 2 fds, expected 1")


def test_mem_table_with_overlapping_regions_is_rejected(pipe_fds: list[int]) -> None:
    overlapping = MemoryRegion(REGION.guest_phys_addr + 0x1000, 0x1000, 0x7F2000000000, 0)
    data = HEADER.pack(FrontendRequest.SET_MEM_TABLE, 1, 8 + 64) + struct.pack("=II", 2, 0)
    data += REGION.pack() + overlapping.pack()
    expect_rejected(data, pipe_fds[:2], "overlap in guest-physical space")


def test_mem_table_with_more_than_eight_regions_is_rejected() -> None:
    count = 9
    data = HEADER.pack(FrontendRequest.SET_MEM_TABLE, 1, 8 + 32 * count) + struct.pack("=II", count, 0)
    data += b"".join(MemoryRegion(i << 32, 0x1000, i << 32, 0).pack() for i in range(count))
    expect_rejected(data, [], "at most 8")


def test_region_that_wraps_the_address_space_is_rejected(pipe_fds: list[int]) -> None:
    data = HEADER.pack(FrontendRequest.ADD_MEM_REG, 1, 40) + bytes(8)
    data += struct.pack("=QQQQ", 0xFFFFFFFFFFFFF000, 0x2000, 0, 0)
    expect_rejected(data, pipe_fds[:1], "wraps")


def test_zero_sized_region_is_rejected(pipe_fds: list[int]) -> None:
    data = HEADER.pack(FrontendRequest.ADD_MEM_REG, 1, 40) + bytes(8) + struct.pack("=QQQQ", 0, 0, 0, 0)
    expect_rejected(data, pipe_fds[:1], "size 0")


def test_config_size_field_must_match_the_payload() -> None:
    data = HEADER.pack(FrontendRequest.SET_CONFIG, 1, 12 + 4) + struct.pack("=III", 0, 8, 0) + bytes(4)
    expect_rejected(data, [], "says 8 bytes")


def test_config_larger_than_256_bytes_is_rejected() -> None:
    data = HEADER.pack(FrontendRequest.GET_CONFIG, 1, 12 + 260) + struct.pack("=III", 0, 260, 0) + bytes(260)
    rejected = expect_rejected(data, [], "at most 256")
    assert rejected.reply_required


def test_vring_address_with_undefined_flags_is_rejected() -> None:
    data = HEADER.pack(FrontendRequest.SET_VRING_ADDR, 1, 40) + struct.pack("=IIQQQQ", 0, 2, 0, 0, 0, 0)
    expect_rejected(data, [], "does not define")


def test_rem_mem_reg_closes_a_legacy_fd_and_accepts_the_request(pipe_fds: list[int]) -> None:
    message = decode_one(encode(FrontendRequest.REM_MEM_REG, SingleMemoryRegion(REGION)), pipe_fds[:1])
    assert message.fds == ()
    assert not fd_is_open(pipe_fds[0])


# -- the other three streams -----------------------------------------------------------------------


def test_backend_replies_are_typed_by_the_request_they_answer() -> None:
    decoder = Decoder(Stream.BACKEND_REPLIES)
    decoder.feed(
        encode_reply(FrontendRequest.GET_FEATURES, U64(1 << 30))
        + encode_reply(FrontendRequest.GET_VRING_BASE, VringState(0, 17))
        + encode_reply(FrontendRequest.GET_CONFIG, ConfigSpace(0, 0, b"12345678"))
        + encode_reply(FrontendRequest.GET_CONFIG)
        + encode_ack(FrontendRequest.SET_VRING_ENABLE, success=False)
    )
    assert [m.payload for m in decoder.messages()] == [
        U64(1 << 30),
        VringState(0, 17),
        ConfigSpace(0, 0, b"12345678"),
        Empty(),
        U64(1),
    ]


def test_reply_with_wrong_flags_is_fatal_for_the_front_end() -> None:
    decoder = Decoder(Stream.BACKEND_REPLIES)
    decoder.feed(encode(FrontendRequest.GET_FEATURES, U64(0)))
    with pytest.raises(FramingError, match="flags"):
        decoder.next_message()


def test_backend_channel_config_change_and_its_ack() -> None:
    request = decode_one(
        encode(BackendRequest.CONFIG_CHANGE_MSG, need_reply=True), stream=Stream.BACKEND_REQUESTS
    )
    assert request.code is BackendRequest.CONFIG_CHANGE_MSG and request.need_reply
    ack = decode_one(encode_ack(BackendRequest.CONFIG_CHANGE_MSG, True), stream=Stream.FRONTEND_REPLIES)
    assert ack == Message(BackendRequest.CONFIG_CHANGE_MSG, 0x5, U64(0))


def test_payload_objects_refuse_invalid_fields() -> None:
    with pytest.raises(PayloadError):
        U64(1 << 64)
    with pytest.raises(PayloadError):
        VringFile(256, True)
    with pytest.raises(PayloadError):
        ConfigSpace(250, 0, bytes(8))
    with pytest.raises(PayloadError):
        MemoryTable((REGION, REGION))


# -- properties ------------------------------------------------------------------------------------

u32 = st.integers(0, (1 << 32) - 1)
u64 = st.integers(0, (1 << 64) - 1)


@settings(max_examples=300, deadline=None)
@given(
    stream=st.sampled_from(list(Stream)),
    data=st.binary(max_size=600),
    cuts=st.lists(st.integers(0, 600), max_size=8),
)
def test_any_bytes_in_any_chunks_give_messages_or_protocol_errors(
    stream: Stream, data: bytes, cuts: list[int]
) -> None:
    decoder = Decoder(stream)
    bounds = sorted({0, len(data), *(c for c in cuts if c <= len(data))})
    for start, end in itertools.pairwise(bounds):
        decoder.feed(data[start:end])
        try:
            while decoder.next_message() is not None:
                pass
        except RequestRejected:
            continue
        except ProtocolError:
            return
    decoder.feed_eof()
    with contextlib.suppress(ProtocolError):
        decoder.messages()


@settings(max_examples=200, deadline=None)
@given(
    index=u32,
    num=u32,
    addresses=st.tuples(u64, u64, u64, u64),
    config=st.binary(max_size=64),
    offset=st.integers(0, 192),
    value=u64,
)
def test_encoded_requests_decode_to_equal_payloads(
    index: int, num: int, addresses: tuple[int, int, int, int], config: bytes, offset: int, value: int
) -> None:
    decoder = Decoder(Stream.FRONTEND_REQUESTS)
    sent = [
        (FrontendRequest.SET_VRING_NUM, VringState(index, num)),
        (FrontendRequest.SET_VRING_ADDR, VringAddress(index, 0, *addresses)),
        (FrontendRequest.SET_CONFIG, ConfigSpace(offset, 0, config)),
        (FrontendRequest.SET_FEATURES, U64(value)),
    ]
    decoder.feed(b"".join(encode(code, payload) for code, payload in sent))
    assert [(m.code, m.payload) for m in decoder.messages()] == sent

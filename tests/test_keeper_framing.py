"""The keeper frames QEMU's messages with the codec's Framer: the same wire rules as the worker's Decoder,
its own rule on top (a reply on the request stream closes the connection), and nothing but the standard
library and the codec loaded (the keeper is never upgraded)."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator

import pytest

from vhost_iommu.keeper.keeper import Relay
from vhost_iommu.protocol import (
    FLAG_REPLY,
    MAX_FDS_PER_MESSAGE,
    MAX_PAYLOAD_SIZE,
    VERSION,
    Decoder,
    FramingError,
    FrontendRequest,
    Stream,
    VringFile,
    encode,
)

HEADER = struct.Struct("=III")


@pytest.fixture
def relay() -> Iterator[Relay]:
    ours, theirs = socket.socketpair()
    theirs.close()
    held = Relay(ident=1, sock=ours, origin="test")
    yield held
    held.close()


def _eventfds(count: int) -> list[int]:
    return [os.eventfd(0) for _ in range(count)]


def _open(fds: list[int]) -> list[int]:
    return [fd for fd in fds if os.path.exists(f"/proc/self/fd/{fd}")]


def test_a_message_fed_a_byte_at_a_time_is_one_frame_of_its_exact_bytes_and_fds(relay: Relay) -> None:
    data = encode(FrontendRequest.SET_VRING_KICK, VringFile(0, has_fd=True))
    (fd,) = _eventfds(1)
    framer = relay.framer
    for position in range(len(data)):
        assert framer.bytes_needed() >= 1
        framer.feed(data[position : position + 1], [fd] if position == 0 else [])
        frame = framer.next_frame()
        assert (frame is None) is (position < len(data) - 1)
    assert frame is not None
    assert frame.data == data  # relayed to the worker exactly as QEMU sent it
    assert frame.code == FrontendRequest.SET_VRING_KICK and frame.fds == (fd,)
    assert framer.at_boundary
    os.close(fd)


@pytest.mark.parametrize(
    ("flags", "size"),
    [(0, 0), (VERSION | FLAG_REPLY, 0), (VERSION, MAX_PAYLOAD_SIZE + 1)],
    ids=["version", "reply-flag", "oversize"],
)
def test_a_header_that_cannot_be_relayed_is_fatal_before_its_payload(
    relay: Relay, flags: int, size: int
) -> None:
    fds = _eventfds(2)
    relay.framer.feed(HEADER.pack(FrontendRequest.SET_OWNER, flags, size), fds)
    with pytest.raises(FramingError):
        relay.framer.next_frame()
    assert _open(fds) == []
    with pytest.raises(FramingError):  # and stays so
        relay.framer.next_frame()


def test_the_keeper_and_the_decoder_share_the_wire_limits(relay: Relay) -> None:
    """One rule, two users: what the worker's decoder cannot frame, the keeper does not relay."""
    oversize = HEADER.pack(FrontendRequest.SET_OWNER, VERSION, MAX_PAYLOAD_SIZE + 1)
    decoder = Decoder(Stream.FRONTEND_REQUESTS)
    decoder.feed(oversize)
    with pytest.raises(FramingError):
        decoder.next_message()
    fds = _eventfds(MAX_FDS_PER_MESSAGE + 1)
    with pytest.raises(FramingError, match=f"more than {MAX_FDS_PER_MESSAGE}"):
        relay.framer.feed(b"", fds)
    assert _open(fds) == []


def test_the_keeper_loads_only_the_standard_library_and_the_codec() -> None:
    code = (
        "import json, sys\n"
        "before = set(sys.modules)\n"
        "import vhost_iommu.keeper.keeper\n"
        "print(json.dumps(sorted(set(sys.modules) - before)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    loaded = json.loads(result.stdout)
    ours = ("vhost_iommu.keeper", "vhost_iommu.protocol", "vhost_iommu.sockfile")
    outside = [
        name
        for name in loaded
        if name.split(".")[0] not in sys.stdlib_module_names
        and name != "vhost_iommu"
        and not name.startswith(ours)
    ]
    assert outside == []
    assert "vhost_iommu.protocol.codec" in loaded

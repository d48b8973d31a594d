"""Every front-end message QEMU 10.2 sends, and hostile variants, through a real socket to the echo device."""

from __future__ import annotations

import contextlib
import os
import re
import struct
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vhost_iommu.harness.background import RunningServer
from vhost_iommu.harness.driver_queue import DriverQueue
from vhost_iommu.harness.echo import ECHO_CONFIG_SIZE, EchoBackend
from vhost_iommu.harness.frontend import Frontend, RequestFailedError, region_of
from vhost_iommu.harness.guest_ram import GuestRam
from vhost_iommu.harness.pytest_plugin import open_fds
from vhost_iommu.protocol import (
    U64,
    VHOST_USER_F_PROTOCOL_FEATURES,
    ConfigSpace,
    Empty,
    FrontendRequest,
    MemoryRegion,
    MemoryTable,
    ProtocolFeature,
    VringAddress,
    VringFile,
    VringState,
    encode,
)

HEADER = struct.Struct("=III")
#: How long to wait for something that must NOT happen.
QUIET_PERIOD = 0.3
pytestmark = pytest.mark.usefixtures("fd_leak_check")


@pytest.fixture
def ram() -> Iterator[GuestRam]:
    with GuestRam(1 << 20) as guest_ram:
        yield guest_ram


@pytest.fixture
def negotiated(frontend: Frontend) -> Frontend:
    frontend.negotiate(2)
    return frontend


def echo_round_trip(frontend: Frontend, queue: DriverQueue, index: int, data: bytes) -> None:
    head = queue.post([data], [len(data) + 8])
    frontend.kick(index)
    assert frontend.wait_used(index, timeout=5)
    assert queue.used_with_data() == [(head, len(data), data)]


@contextlib.contextmanager
def refused(caplog: pytest.LogCaptureFixture, reason: str) -> Iterator[None]:
    """The request in the block gets a failure REPLY_ACK, and the server logged ``reason`` for it."""
    caplog.clear()
    with pytest.raises(RequestFailedError):
        yield
    assert re.search(reason, caplog.text), f"{reason!r} not in the server's log:\n{caplog.text}"


def assert_still_serving(frontend: Frontend) -> None:
    """The connection survived and its framing is intact: a GET gets its own, correct reply."""
    assert frontend.get_queue_num() == 2


# -- the QEMU start-up sequence --------------------------------------------------------------------


@pytest.mark.parametrize("use_mem_slots", [True, False], ids=["add-mem-reg", "set-mem-table"])
def test_qemu_start_up_then_a_chain_is_echoed(frontend: Frontend, ram: GuestRam, use_mem_slots: bool) -> None:
    queues = [DriverQueue(ram, 64), DriverQueue(ram, 64)]
    frontend.start_device(ram, queues, use_mem_slots=use_mem_slots)
    echo_round_trip(frontend, queues[0], 0, b"ping")
    echo_round_trip(frontend, queues[1], 1, b"pong on the second queue")
    assert frontend.get_status() == 0x08  # FEATURES_OK: all QEMU 10.2's generic device sets
    assert frontend.stop_device(2, reset_status=False) == [1, 1]
    assert frontend.get_status() == 0x08  # stopped, not reset: a paused VM resumes where it was


def test_event_idx_and_indirect_chains_are_served(frontend: Frontend, ram: GuestRam) -> None:
    queues = [DriverQueue(ram, 8, event_idx=True), DriverQueue(ram, 8, event_idx=True)]
    frontend.start_device(ram, queues)
    for round_number in range(20):  # wraps the 8-entry ring several times
        data = bytes([round_number]) * (round_number + 1)
        head = queues[0].post([data[:1], data[1:] or b"x"], [4, 64], indirect=round_number % 2 == 1)
        frontend.kick(0)
        assert frontend.wait_used(0, timeout=5)
        [(used_head, length, written)] = queues[0].used_with_data()
        queues[0].used_event = queues[0].used_idx  # as a driver does: notify me of the next one
        assert used_head == head
        assert written == (data[:1] + (data[1:] or b"x"))[:length]


def test_features_offer_the_device_bits_and_protocol_features_bit(frontend: Frontend) -> None:
    assert frontend.get_features() == EchoBackend().device_features() | VHOST_USER_F_PROTOCOL_FEATURES


def test_protocol_features_offered(frontend: Frontend) -> None:
    offered = ProtocolFeature(frontend.get_protocol_features())
    assert offered == (
        ProtocolFeature.MQ
        | ProtocolFeature.REPLY_ACK
        | ProtocolFeature.CONFIG
        | ProtocolFeature.BACKEND_REQ
        | ProtocolFeature.CONFIGURE_MEM_SLOTS
        | ProtocolFeature.STATUS
        | ProtocolFeature.RESET_DEVICE
    )


def test_queue_count_and_memory_slots(negotiated: Frontend) -> None:
    assert negotiated.get_queue_num() == 2
    assert negotiated.get_max_mem_slots() == 512


def test_reply_ack_is_sent_for_every_message_without_a_reply_of_its_own(frontend: Frontend) -> None:
    frontend.set_protocol_features(int(ProtocolFeature.REPLY_ACK))
    for code, payload in [
        (FrontendRequest.SET_OWNER, None),
        (FrontendRequest.SET_FEATURES, U64(VHOST_USER_F_PROTOCOL_FEATURES)),
        (FrontendRequest.SET_VRING_NUM, VringState(0, 64)),
        (FrontendRequest.SET_VRING_BASE, VringState(0, 0)),
        (FrontendRequest.SET_VRING_ENABLE, VringState(1, 1)),
        (FrontendRequest.SET_STATUS, U64(1)),
        (FrontendRequest.SET_CONFIG, ConfigSpace(0, 0, b"x")),
    ]:
        reply = frontend.request(code, payload, need_reply=True)
        assert reply is not None and reply.code is code and reply.payload == U64(0)


# -- negotiation refusals --------------------------------------------------------------------------


def test_features_that_were_not_offered_are_refused(
    caplog: pytest.LogCaptureFixture, negotiated: Frontend
) -> None:
    with refused(caplog, "SET_FEATURES"):
        negotiated.request(FrontendRequest.SET_FEATURES, U64(1 << 40 | VHOST_USER_F_PROTOCOL_FEATURES))
    assert_still_serving(negotiated)


def test_protocol_features_that_were_not_offered_are_refused(frontend: Frontend) -> None:
    with pytest.raises(RequestFailedError):
        frontend.request(
            FrontendRequest.SET_PROTOCOL_FEATURES, U64(int(ProtocolFeature.LOG_SHMFD)), need_reply=True
        )


def test_second_set_owner_is_refused(caplog: pytest.LogCaptureFixture, negotiated: Frontend) -> None:
    with refused(caplog, "SET_OWNER"):
        negotiated.request(FrontendRequest.SET_OWNER)


# -- hostile headers -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(HEADER.pack(FrontendRequest.GET_FEATURES, 0, 0), id="version-0"),
        pytest.param(HEADER.pack(FrontendRequest.GET_FEATURES, 2, 0), id="version-2"),
        pytest.param(HEADER.pack(FrontendRequest.SET_FEATURES, 1, 0x10000), id="oversize"),
        pytest.param(HEADER.pack(FrontendRequest.GET_FEATURES, 1, 8) + bytes(8), id="get-with-payload"),
        pytest.param(encode(FrontendRequest.GET_VRING_BASE, VringState(7, 0)), id="get-vring-base-bad-index"),
        pytest.param(HEADER.pack(FrontendRequest.GET_INFLIGHT_FD, 1, 0), id="unsupported-get"),
    ],
)
def test_fatal_inputs_close_that_connection_only(vhost_server: RunningServer, raw: bytes) -> None:
    bystander_socket = vhost_server.listen()  # a guest of its own: a socket serves one front-end at a time
    with vhost_server.connect() as hostile, vhost_server.connect(path=bystander_socket) as bystander:
        bystander.negotiate(2)
        hostile.send(raw)
        assert hostile.wait_disconnected(timeout=5)
        assert_still_serving(bystander)
    with vhost_server.connect() as fresh:
        assert fresh.get_queue_num() == 2


def test_reserved_flag_bits_get_a_failure_ack(negotiated: Frontend) -> None:
    negotiated.send(HEADER.pack(FrontendRequest.SET_OWNER, 1 | 0x8 | 0x100, 0))
    assert negotiated.receive().payload == U64(1)
    assert_still_serving(negotiated)


def test_reply_flag_on_a_request_gets_a_failure_ack(negotiated: Frontend) -> None:
    negotiated.send(HEADER.pack(FrontendRequest.SET_STATUS, 1 | 0x4 | 0x8, 8) + struct.pack("=Q", 1))
    assert negotiated.receive().payload == U64(1)
    assert negotiated.get_status() == 0


def test_unknown_request_gets_a_failure_ack_and_framing_survives(negotiated: Frontend) -> None:
    negotiated.send(HEADER.pack(200, 1 | 0x8, 5) + b"hello")
    reply = negotiated.receive()
    assert reply.code == 200 or int(reply.code) == 200
    assert reply.payload == U64(1)
    assert_still_serving(negotiated)


def test_unknown_request_without_need_reply_is_ignored(negotiated: Frontend) -> None:
    negotiated.send(HEADER.pack(200, 1, 3) + b"abc")
    assert_still_serving(negotiated)  # no stray reply was queued before this one


def test_wrong_payload_size_gets_a_failure_ack(negotiated: Frontend) -> None:
    negotiated.send(HEADER.pack(FrontendRequest.SET_VRING_NUM, 1 | 0x8, 4) + bytes(4))
    assert negotiated.receive().payload == U64(1)
    assert_still_serving(negotiated)


def test_fds_on_a_message_that_takes_none_are_closed(negotiated: Frontend) -> None:
    read_end, write_end = os.pipe()
    try:
        with pytest.raises(RequestFailedError):
            negotiated.request(FrontendRequest.SET_VRING_NUM, VringState(0, 64), [read_end])
        assert_still_serving(negotiated)
        os.close(read_end)
        read_end = -1
        # The server closed its copy of the read end: nobody can read any more.
        with pytest.raises(BrokenPipeError):
            os.write(write_end, b"x")
    finally:
        os.close(write_end)
        if read_end >= 0:
            os.close(read_end)


def test_too_many_fds_close_the_connection_and_every_fd(vhost_server: RunningServer) -> None:
    pipes = [os.pipe() for _ in range(10)]
    try:
        with vhost_server.connect() as hostile:
            hostile.send(encode(FrontendRequest.SET_OWNER), [r for r, _ in pipes])
            assert hostile.wait_disconnected(timeout=5)
        with vhost_server.connect() as fresh:
            assert fresh.get_queue_num() == 2
    finally:
        for r, w in pipes:
            os.close(r)
            os.close(w)


def test_disconnect_in_the_middle_of_a_message_releases_its_fds(
    vhost_server: RunningServer, ram: GuestRam
) -> None:
    before = open_fds()
    with vhost_server.connect() as leaving:
        region = struct.pack("=QQQQQ", 0, 0, ram.size, ram.uva_base, 0)
        leaving.send(HEADER.pack(FrontendRequest.ADD_MEM_REG, 1, 40) + region[:10], [ram.fd])
    vhost_server.wait_all_closed(timeout=5)
    assert open_fds() == before


# -- memory ----------------------------------------------------------------------------------------


def test_mem_table_with_overlapping_regions_is_refused(negotiated: Frontend, ram: GuestRam) -> None:
    region = region_of(ram)
    overlapping = MemoryRegion(region.guest_phys_addr + 4096, 4096, region.uva_end + 4096, 0)
    data = HEADER.pack(FrontendRequest.SET_MEM_TABLE, 1 | 0x8, 8 + 64) + struct.pack("=II", 2, 0)
    negotiated.send(data + region.pack() + overlapping.pack(), [ram.fd, ram.fd])
    assert negotiated.receive().payload == U64(1)
    assert_still_serving(negotiated)


def test_add_then_remove_memory_region(negotiated: Frontend, ram: GuestRam) -> None:
    with GuestRam(1 << 16, gpa_base=1 << 30, uva_base=0x7F5500000000) as second:
        negotiated.add_mem_reg(ram)
        negotiated.add_mem_reg(second)
        with pytest.raises(RequestFailedError):
            negotiated.add_mem_reg(second)  # overlaps itself
        negotiated.rem_mem_reg(second)
        with pytest.raises(RequestFailedError):
            negotiated.rem_mem_reg(second)  # already gone
        negotiated.set_mem_table([ram, second])
    assert_still_serving(negotiated)


def test_mem_table_fd_that_is_not_memory_is_refused(negotiated: Frontend) -> None:
    read_end, write_end = os.pipe()
    try:
        with pytest.raises(RequestFailedError):
            negotiated.request(
                FrontendRequest.SET_MEM_TABLE, MemoryTable((MemoryRegion(0, 4096, 0x10000, 0),)), [read_end]
            )
    finally:
        os.close(read_end)
        os.close(write_end)


# -- rings: validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "payload"),
    [
        (FrontendRequest.SET_VRING_NUM, VringState(2, 64)),
        (FrontendRequest.SET_VRING_BASE, VringState(255, 0)),
        (FrontendRequest.SET_VRING_ENABLE, VringState(9, 1)),
        (FrontendRequest.SET_VRING_ADDR, VringAddress(3, 0, 0, 0, 0, 0)),
        (FrontendRequest.SET_VRING_CALL, VringFile(2, has_fd=False)),
    ],
)
def test_ring_messages_with_an_out_of_range_index_are_refused(
    caplog: pytest.LogCaptureFixture, negotiated: Frontend, code: FrontendRequest, payload: object
) -> None:
    with refused(caplog, "out of range"):
        negotiated.request(code, payload)  # type: ignore[arg-type]
    assert_still_serving(negotiated)


def test_ring_fd_with_an_out_of_range_index_is_closed(negotiated: Frontend) -> None:
    read_end, write_end = os.pipe()
    try:
        with pytest.raises(RequestFailedError):
            negotiated.request(FrontendRequest.SET_VRING_CALL, VringFile(2, has_fd=True), [write_end])
        os.close(write_end)
        write_end = -1
        assert os.read(read_end, 1) == b""  # the server's copy of the write end is gone too
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)


@pytest.mark.parametrize("size", [0, 3, 100, 2048, 1 << 16])
def test_vring_num_must_be_a_power_of_two_within_the_device_limit(
    caplog: pytest.LogCaptureFixture, negotiated: Frontend, size: int
) -> None:
    with refused(caplog, "power of 2"):
        negotiated.set_vring_num(0, size)


def test_vring_enable_takes_only_zero_or_one(caplog: pytest.LogCaptureFixture, negotiated: Frontend) -> None:
    with refused(caplog, "0 or 1"):
        negotiated.request(FrontendRequest.SET_VRING_ENABLE, VringState(0, 2))


def test_vring_base_beyond_16_bits_is_refused(caplog: pytest.LogCaptureFixture, negotiated: Frontend) -> None:
    with refused(caplog, "16 bits"):
        negotiated.set_vring_base(0, 0x10000)


def test_used_ring_logging_is_refused(
    caplog: pytest.LogCaptureFixture, negotiated: Frontend, ram: GuestRam
) -> None:
    with refused(caplog, "logging"):
        negotiated.set_vring_addr(0, DriverQueue(ram, 64), flags=1)


def test_kick_before_the_ring_is_configured_is_refused_and_its_fd_closed(
    caplog: pytest.LogCaptureFixture, negotiated: Frontend
) -> None:
    with refused(caplog, "SET_VRING_NUM"):
        negotiated.set_vring_kick(0)
    assert_still_serving(negotiated)


def test_kick_without_fd_polling_is_refused(caplog: pytest.LogCaptureFixture, negotiated: Frontend) -> None:
    with refused(caplog, "polling"):
        negotiated.set_vring_kick(0, with_fd=False)


def test_ring_addresses_outside_guest_memory_are_refused(
    caplog: pytest.LogCaptureFixture, negotiated: Frontend, ram: GuestRam
) -> None:
    negotiated.set_mem_table([ram])
    negotiated.set_vring_num(0, 64)
    negotiated.request(FrontendRequest.SET_VRING_ADDR, VringAddress(0, 0, 0x1000, 0x3000, 0x2000, 0))
    with refused(caplog, "not in guest memory"):
        negotiated.set_vring_kick(0)


def test_ring_layout_cannot_change_while_started(
    caplog: pytest.LogCaptureFixture, negotiated: Frontend, ram: GuestRam
) -> None:
    queues = [DriverQueue(ram, 64), DriverQueue(ram, 64)]
    negotiated.start_rings(ram, queues, driver_features=0)
    with refused(caplog, "GET_VRING_BASE first"):
        negotiated.set_vring_num(0, 32)
    echo_round_trip(negotiated, queues[0], 0, b"still served")


# -- config and status -----------------------------------------------------------------------------


def test_config_read_write_and_change_notification(frontend: Frontend, ram: GuestRam) -> None:
    frontend.negotiate(2)
    assert frontend.get_config(0, ECHO_CONFIG_SIZE) == b"ECHOECHO"
    frontend.set_config(2, b"xy")
    assert frontend.get_config(0, ECHO_CONFIG_SIZE) == b"ECxyECHO"
    assert frontend.get_config(6, 2) == b"HO"
    # Every ring is stopped: the device is suspended and must not message the front-end yet.
    assert not frontend.wait_config_changes(1, timeout=QUIET_PERIOD)
    frontend.start_rings(ram, [DriverQueue(ram, 64), DriverQueue(ram, 64)], driver_features=0)
    assert frontend.wait_config_changes(1, timeout=5)
    frontend.set_config(0, b"z")
    assert frontend.wait_config_changes(2, timeout=5)
    assert frontend.channel is not None and frontend.channel.error is None


def test_config_access_out_of_range_fails_the_spec_way(
    caplog: pytest.LogCaptureFixture, negotiated: Frontend
) -> None:
    with refused(caplog, "beyond the 8-byte config"):
        negotiated.get_config(4, 8)
    reply = negotiated.request(FrontendRequest.GET_CONFIG, ConfigSpace(8, 0, b"\0"))
    assert reply is not None and reply.payload == Empty()
    with pytest.raises(RequestFailedError):
        negotiated.set_config(7, b"ab")
    assert negotiated.get_config(0, ECHO_CONFIG_SIZE) == b"ECHOECHO"


def test_live_migration_config_writes_are_refused(negotiated: Frontend) -> None:
    with pytest.raises(RequestFailedError):
        negotiated.set_config(0, b"zz", flags=1)
    with pytest.raises(RequestFailedError):
        negotiated.set_config(0, b"zz", flags=7)


def test_status_round_trip_and_eight_bit_limit(
    caplog: pytest.LogCaptureFixture, negotiated: Frontend
) -> None:
    negotiated.set_status(0x0B)
    assert negotiated.get_status() == 0x0B
    with refused(caplog, "8 bits"):
        negotiated.request(FrontendRequest.SET_STATUS, U64(0x100), need_reply=True)
    assert negotiated.get_status() == 0x0B


def test_backend_req_fd_must_be_a_socket(caplog: pytest.LogCaptureFixture, frontend: Frontend) -> None:
    frontend.set_protocol_features(int(ProtocolFeature.REPLY_ACK | ProtocolFeature.BACKEND_REQ))
    read_end, write_end = os.pipe()
    try:
        with refused(caplog, "socket"):
            frontend.request(FrontendRequest.SET_BACKEND_REQ_FD, fds=[read_end])
    finally:
        os.close(read_end)
        os.close(write_end)
    assert frontend.get_queue_num() == 2


def test_reset_owner_disables_the_rings(
    negotiated: Frontend, ram: GuestRam, vhost_server: RunningServer
) -> None:
    queues = [DriverQueue(ram, 64), DriverQueue(ram, 64)]
    negotiated.start_rings(ram, queues, driver_features=0)
    negotiated.reset_owner()
    backend = vhost_server.backends[0]
    assert isinstance(backend, EchoBackend)
    events = backend.events_snapshot()
    assert ("queue_stopped", 0) in events and ("queue_stopped", 1) in events
    assert ("reset", -1) not in events


def test_a_front_end_that_never_reads_its_replies_is_disconnected(
    vhost_server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("vhost_iommu.server.socket_io.MAX_PENDING_OUTPUT", 1 << 16)
    with vhost_server.connect() as greedy:
        burst = encode(FrontendRequest.GET_FEATURES) * 1000
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            for _ in range(100):  # far more replies than the socket and the server's buffer hold
                greedy.send(burst)
        assert greedy.wait_disconnected(timeout=10)
    with vhost_server.connect() as fresh:
        assert fresh.get_queue_num() == 2


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    garbage=st.lists(
        st.one_of(
            st.binary(min_size=1, max_size=64),
            st.builds(
                lambda code, flags, body: HEADER.pack(code, flags, len(body)) + body,
                st.integers(0, 50),
                st.sampled_from([1, 1 | 0x8, 0, 5, 0x109]),
                st.binary(max_size=48),
            ),
        ),
        min_size=1,
        max_size=6,
    )
)
def test_garbage_never_takes_the_server_down(vhost_server: RunningServer, garbage: list[bytes]) -> None:
    with vhost_server.connect(timeout=2) as hostile, contextlib.suppress(OSError):
        for chunk in garbage:
            hostile.send(chunk)
    with vhost_server.connect() as fresh:
        assert fresh.get_queue_num() == 2

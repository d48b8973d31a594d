"""The control channel through the harness: a real back-end on a real socket, a front-end playing QEMU, and
a control client on the control socket (docs/control.md)."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from vhost_iommu.control import ControlClient, ControlError
from vhost_iommu.control.protocol import MAX_LINE
from vhost_iommu.control.server import ControlServer
from vhost_iommu.control.service import ControlService
from vhost_iommu.device import Status
from vhost_iommu.device.layout import (
    FAULT_F_ADDRESS,
    FAULT_F_READ,
    FAULT_F_WRITE,
    MAP_F_READ,
    ResvMemProperty,
    decode_config,
    decode_fault,
    decode_properties,
    decode_status,
    encode_attach,
    encode_map,
    encode_probe,
    encode_unmap,
)
from vhost_iommu.harness.background import RunningServer, running_server
from vhost_iommu.harness.iommu_driver import IommuDriver
from vhost_iommu.jit import warm_up
from vhost_iommu.virtio_iommu import VirtioIommuBackend

pytestmark = pytest.mark.usefixtures("fd_leak_check")

ENDPOINT = 0x20
WAIT = 10.0
PROBE_SIZE = 512


@dataclass
class Controlled:
    server: RunningServer
    path: str

    def client(self) -> ControlClient:
        return ControlClient(self.path)

    def call(self, command: str, **arguments: Any) -> Any:
        with self.client() as client:
            return client.call(command, **arguments)


@pytest.fixture
def controlled() -> Iterator[Controlled]:
    # A request must never wait for numba to compile a kernel (the Lab and the program do the same).
    warm_up()
    service = ControlService()
    with (
        running_server(service.track(lambda: VirtioIommuBackend(None))) as server,
        server.control_channel(service, WAIT) as path,
    ):
        yield Controlled(server, path)


@pytest.fixture
def guest(controlled: Controlled) -> Iterator[IommuDriver]:
    """The device started by a driver with a requestq of 256 entries and 4 MiB of RAM."""
    frontend = controlled.server.connect()
    with IommuDriver(frontend, ram_size=4 << 20, queue_size=256, timeout=WAIT, own_frontend=True) as driver:
        yield driver


MAX_HOLD_US = 10_000_000


def error_of(controlled: Controlled, command: str, **arguments: Any) -> str:
    with pytest.raises(ControlError) as caught:
        controlled.call(command, **arguments)
    return caught.value.code


# -- the socket and the protocol ----------------------------------------------------------------------------


def test_socket_is_private_and_says_hello(controlled: Controlled) -> None:
    assert stat.S_IMODE(os.stat(controlled.path).st_mode) == 0o600
    hello = controlled.call("hello")
    assert isinstance(hello, dict)
    assert hello["version"] == 1 and hello["pid"] == os.getpid()
    assert {"endpoints", "mappings", "fault", "inject", "bypass", "resv"} <= set(hello["commands"])


def test_close_removes_only_the_socket_it_made(tmp_path: Any) -> None:
    async def scenario() -> None:
        path = str(tmp_path / "control")
        control = ControlServer(ControlService(), path)
        await control.start()
        os.unlink(path)  # someone replaced the socket with a file of theirs
        (tmp_path / "control").write_text("not ours")
        await control.close()
        assert (tmp_path / "control").read_text() == "not ours"
        ours = ControlServer(ControlService(), path + "2")
        await ours.start()
        await ours.close()
        assert not os.path.exists(path + "2")

    asyncio.run(scenario())


def test_closing_with_a_client_connected_ends_it_cleanly(tmp_path: Any) -> None:
    """A back-end that stops while a control client is connected ends that client without an unhandled
    error on its loop (CI caught one: a cancelled client task reported by the stream server)."""

    async def scenario() -> list[dict[str, Any]]:
        loop = asyncio.get_running_loop()
        errors: list[dict[str, Any]] = []
        loop.set_exception_handler(lambda _loop, context: errors.append(context))
        path = str(tmp_path / "control")
        control = ControlServer(ControlService(), path)
        await control.start()
        reader, writer = await asyncio.open_unix_connection(path)
        writer.write(b'{"version": 1, "command": "hello"}\n')
        assert b'"result"' in await reader.readline()  # the client's task is now serving, idle
        await control.close()
        assert await reader.read() == b""  # the server ended the connection
        writer.close()
        await asyncio.sleep(0)  # the stream server's done-callbacks run on the next loop turns
        await asyncio.sleep(0)
        return errors

    assert asyncio.run(scenario()) == []


@pytest.mark.parametrize(
    ("line", "code"),
    [
        (b"{not json\n", "bad-json"),
        (b"\xff\xfe\n", "bad-json"),
        (b"[1, 2]\n", "bad-request"),
        (b'{"command": "hello"}\n', "bad-version"),
        (b'{"version": 2, "command": "hello"}\n', "bad-version"),
        (b'{"version": true, "command": "hello"}\n', "bad-version"),
        (b'{"version": 1}\n', "bad-request"),
        (b'{"version": 1, "command": "reboot"}\n', "unknown-command"),
        (b'{"version": 1, "command": "hello", "surprise": 1}\n', "bad-argument"),
        (b'{"version": 1, "command": "endpoints", "connection": "x"}\n', "bad-argument"),
        (b'{"version": 1, "command": "endpoints", "connection": 7}\n', "no-connection"),
        (b"[" * 100000 + b"\n", "line-too-long"),
    ],
)
def test_hostile_lines_get_error_replies_and_the_connection_keeps_serving(
    controlled: Controlled, line: bytes, code: str
) -> None:
    with controlled.client() as client:
        reply = client.send_line(line)
        assert f'"code":"{code}"'.encode() in reply, reply
        if code != "line-too-long":  # the rest of an over-long line cannot be framed: the server hangs up
            assert client.call("hello")["version"] == 1


def test_deep_json_nesting_is_an_error_not_a_crash(controlled: Controlled) -> None:
    with controlled.client() as client:
        reply = client.send_line(b"[" * 30000 + b"]" * 30000 + b"\n")
        assert b'"ok":false' in reply
        assert len(b"[" * 30000) < MAX_LINE
        assert client.call("hello")["version"] == 1


def test_a_client_that_disconnects_mid_line_leaves_the_server_serving(controlled: Controlled) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(controlled.path)
    sock.sendall(b'{"version": 1, "comm')
    sock.close()
    assert controlled.call("hello")["version"] == 1


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to connect as another user")
def test_other_users_are_refused_by_peer_credentials(controlled: Controlled) -> None:
    # Widen the mode on purpose: the peer check, not the file mode, must be what refuses.
    os.chmod(controlled.path, 0o666)
    os.chmod(os.path.dirname(controlled.path), 0o755)
    # A forked child that becomes nobody before connecting: SO_PEERCRED records the uid at connect time.
    # (A fresh interpreter as nobody cannot be used: this Python may live where nobody cannot read.)
    reading, writing = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child only makes system calls, then _exits
        try:
            os.setuid(65534)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(WAIT)
                sock.connect(controlled.path)
                # The back-end speaks first to a refused peer, then hangs up: nothing to send.
                os.write(writing, sock.recv(4096))
        except BaseException as exc:
            os.write(writing, repr(exc).encode())
        finally:
            os._exit(0)
    os.close(writing)
    try:
        reply = b""
        while chunk := os.read(reading, 4096):
            reply += chunk
    finally:
        os.close(reading)
        os.waitpid(child, 0)
    assert b'"code":"permission-denied"' in reply, reply
    assert controlled.call("hello")["version"] == 1


def test_without_a_front_end_commands_say_so(controlled: Controlled) -> None:
    assert controlled.call("connections") == []
    assert error_of(controlled, "endpoints") == "no-connection"


def test_several_front_ends_need_a_choice(controlled: Controlled) -> None:
    # Two guests of one process come on two sockets: a socket serves one front-end at a time.
    second_socket = controlled.server.listen()
    with controlled.server.connect() as first, controlled.server.connect(path=second_socket) as second:
        first.negotiate(2)
        second.negotiate(2)
        rows = controlled.call("connections")
        assert isinstance(rows, list) and [row["connection"] for row in rows] == [1, 2]
        assert error_of(controlled, "config") == "bad-argument"
        assert controlled.call("config", connection=2)["bypass"] == 1


# -- inspection ---------------------------------------------------------------------------------------------


def test_endpoints_domains_and_counters(controlled: Controlled, guest: IommuDriver) -> None:
    assert guest.status(encode_attach(3, ENDPOINT)) == Status.OK
    assert guest.status(encode_map(3, 0x10000, 0x10FFF, 0x200000)) == Status.OK
    endpoints = {row["endpoint"]: row for row in controlled.call("endpoints")}
    assert endpoints[ENDPOINT]["domain"] == 3 and endpoints[ENDPOINT]["bdf"] == 0x20
    assert endpoints[ENDPOINT]["reserved"] == [{"type": "MSI", "start": 0xFEE00000, "end": 0xFEEFFFFF}]
    assert endpoints[0x28]["domain"] is None
    [domain] = controlled.call("domains")
    assert domain == {
        "domain": 3,
        "bypass": False,
        "endpoints": [ENDPOINT],
        "mappings": 1,
        "reserved": [[0xFEE00000, 0xFEEFFFFF]],
    }
    counters = controlled.call("counters")
    assert counters["requests"]["ATTACH"] == 1 and counters["requests"]["MAP"] == 1
    assert counters["statuses"]["OK"] == 2
    # One request per kick: each type's latency is its own batch's.
    assert counters["latency"]["ATTACH"]["count"] == 1 and counters["latency"]["MAP"]["count"] == 1
    assert counters["batches"]["count"] == 2
    assert counters["latency"]["MAP"]["min_us"] > 0
    controlled.call("latency-reset")
    assert controlled.call("counters")["latency"] == {}


def test_a_batch_of_several_types_counts_as_mixed(controlled: Controlled, guest: IommuDriver) -> None:
    guest.requests.post([encode_attach(3, ENDPOINT)], [4])
    guest.requests.post([encode_map(3, 0x1000, 0x1FFF, 0x100000)], [4])
    guest.frontend.kick(0)
    assert guest.frontend.wait_used(0, timeout=WAIT)
    assert len(guest.requests.used()) == 2
    latency = controlled.call("counters")["latency"]
    assert set(latency) == {"MIXED"} and latency["MIXED"]["count"] == 2


def test_a_front_end_that_leaves_leaves_the_list(controlled: Controlled) -> None:
    with controlled.server.connect() as frontend:
        frontend.negotiate(2)
        assert len(controlled.call("connections")) == 1
    controlled.server.wait_all_closed()
    assert controlled.call("connections") == []
    assert error_of(controlled, "queues", connection=1) == "no-connection"


def test_mappings_filters_and_pages(controlled: Controlled, guest: IommuDriver) -> None:
    assert guest.status(encode_attach(3, ENDPOINT)) == Status.OK
    assert guest.status(encode_attach(4, 0x28)) == Status.OK
    for page in range(5):
        assert guest.status(encode_map(3, page << 12, (page << 12) + 0xFFF, 0x100000 + (page << 12))) == 0
    assert guest.status(encode_map(4, 0x7000, 0x7FFF, 0x300000, MAP_F_READ)) == 0

    everything = controlled.call("mappings")
    assert [(m["domain"], m["iova_start"]) for m in everything["mappings"]] == [
        *((3, page << 12) for page in range(5)),
        (4, 0x7000),
    ]
    assert everything["next"] is None
    assert everything["mappings"][-1] == {
        "domain": 4,
        "iova_start": 0x7000,
        "iova_end": 0x7FFF,
        "phys": 0x300000,
        "flags": MAP_F_READ,
    }

    seen: list[tuple[int, int]] = []
    after = None
    for _ in range(10):
        page = controlled.call("mappings", limit=2, after=after)
        seen += [(m["domain"], m["iova_start"]) for m in page["mappings"]]
        after = page["next"]
        if after is None:
            break
    assert seen == [(m["domain"], m["iova_start"]) for m in everything["mappings"]]

    by_endpoint = controlled.call("mappings", endpoint=0x28)["mappings"]
    assert [m["domain"] for m in by_endpoint] == [4]
    ranged = controlled.call("mappings", domain=3, iova_start="0x1800", iova_end="0x3000")["mappings"]
    assert [m["iova_start"] for m in ranged] == [0x1000, 0x2000, 0x3000]
    assert controlled.call("mappings", endpoint=0x30)["mappings"] == []  # not attached
    assert error_of(controlled, "mappings", domain=99) == "not-found"
    assert error_of(controlled, "mappings", endpoint=0x1) == "not-found"
    assert error_of(controlled, "mappings", limit=0) == "bad-argument"
    assert error_of(controlled, "mappings", after=[3]) == "bad-argument"
    assert error_of(controlled, "mappings", iova_start=5, iova_end=4) == "bad-argument"


def test_features_queues_and_config(controlled: Controlled, guest: IommuDriver) -> None:
    features = controlled.call("features")
    assert {"VERSION_1", "MAP_UNMAP", "PROBE", "BYPASS_CONFIG", "RING_INDIRECT_DESC"} <= set(
        features["acked_names"]
    )
    assert "CONFIG" in features["protocol_names"] and "BACKEND_REQ" in features["protocol_names"]
    guest.status(encode_attach(3, ENDPOINT))
    requestq, eventq = controlled.call("queues")
    assert requestq["size"] == 256 and requestq["started"] and requestq["enabled"]
    assert requestq["next_avail"] == 1 and requestq["used_idx"] == 1 and requestq["in_flight"] == 0
    assert eventq["index"] == 1 and eventq["next_avail"] == 0
    config = controlled.call("config")
    assert config["probe_size"] == PROBE_SIZE and config["bypass"] == 1 and config["boot_bypass"] == 1
    assert config["input_end"] == (1 << 48) - 1 and config["domain_start"] == 1


# -- injection ----------------------------------------------------------------------------------------------


def test_fault_events_reach_the_eventq_and_wait_for_buffers(
    controlled: Controlled, guest: IommuDriver
) -> None:
    # No eventq buffer yet: the event waits.
    reply = controlled.call("fault", endpoint=ENDPOINT, address="0x1234000", access="w")
    assert reply["queued"] == 1 and reply["pending"] == 1
    assert reply["flags"] == FAULT_F_WRITE | FAULT_F_ADDRESS
    events = controlled.call("events")
    assert events["pending"] == [
        {"reason": 2, "flags": FAULT_F_WRITE | FAULT_F_ADDRESS, "endpoint": ENDPOINT, "address": 0x1234000}
    ]
    [head] = guest.post_event_buffers(1)
    assert guest.frontend.wait_used(1, timeout=WAIT)
    [(used, length)] = guest.events.used()
    assert (used, length) == (head, 24)
    event = decode_fault(guest.events.written(head))
    assert (event.reason, event.flags, event.endpoint, event.address) == (
        2,
        FAULT_F_WRITE | FAULT_F_ADDRESS,
        ENDPOINT,
        0x1234000,
    )
    assert controlled.call("events")["pending"] == []
    # The counterpart: events not delivered yet can be dropped.
    controlled.call("fault", endpoint=ENDPOINT, reason="DOMAIN", count=3)
    assert controlled.call("events-clear") == {"cleared": 3}
    assert controlled.call("events")["pending"] == []
    assert error_of(controlled, "fault", endpoint=ENDPOINT, reason="LOUD") == "bad-argument"
    assert error_of(controlled, "fault", endpoint=ENDPOINT, access="q") == "bad-argument"
    assert error_of(controlled, "fault", endpoint=-1) == "bad-argument"


def test_a_full_event_queue_drops_and_counts(controlled: Controlled, guest: IommuDriver) -> None:
    reply = controlled.call("fault", endpoint=ENDPOINT, count=70)
    assert reply["queued"] == 64 and reply["dropped"] == 6
    assert controlled.call("events")["dropped"] == 6
    controlled.call("events-clear")


def test_translate_answers_and_reports_on_request(controlled: Controlled, guest: IommuDriver) -> None:
    guest.status(encode_attach(3, ENDPOINT))
    guest.status(encode_map(3, 0x10000, 0x11FFF, 0x200000))
    hit = controlled.call("translate", endpoint=ENDPOINT, iova="0x10800", size=0x1000, access="rw")
    assert hit == {
        "translated": True,
        "iova": 0x10800,
        "size": 0x1000,
        "bypass": False,
        "segments": [[0x200800, 0x1000]],
    }
    quiet = controlled.call("translate", endpoint=ENDPOINT, iova="0x40000")
    assert quiet["translated"] is False and quiet["reason"] == "MAPPING" and quiet["reported"] is False
    assert controlled.call("events")["pending"] == []
    [head] = guest.post_event_buffers(1)
    loud = controlled.call("translate", endpoint=ENDPOINT, iova="0x40000", access="r", report=True)
    assert loud["reported"] is True
    assert guest.frontend.wait_used(1, timeout=WAIT)
    assert guest.events.used() == [(head, 24)]
    event = decode_fault(guest.events.written(head))
    assert (event.endpoint, event.address, event.flags) == (ENDPOINT, 0x40000, FAULT_F_READ | FAULT_F_ADDRESS)
    assert error_of(controlled, "translate", endpoint=ENDPOINT, iova=0, size=0) == "bad-argument"


def test_forced_statuses_for_the_next_requests_and_clear(controlled: Controlled, guest: IommuDriver) -> None:
    guest.status(encode_attach(3, ENDPOINT))
    controlled.call("inject", type="MAP", status="NOMEM", times=2)
    statuses = [guest.status(encode_map(3, n << 12, (n << 12) + 0xFFF, 0x100000)) for n in range(3)]
    assert statuses == [Status.NOMEM, Status.NOMEM, Status.OK]
    controlled.call("inject", type="map", status="DEVERR", times=5)
    controlled.call("inject-clear")
    assert guest.status(encode_map(3, 0x8000, 0x8FFF, 0x100000)) == Status.OK
    assert controlled.call("counters")["injected"] == 2
    assert error_of(controlled, "inject", type="MAP", status="MAYBE") == "bad-argument"
    assert error_of(controlled, "inject", type="FLY", status="OK") == "bad-argument"
    assert error_of(controlled, "inject", type="MAP", status="OK", times=0) == "bad-argument"
    # A misspelt argument refuses the whole request: nothing is half applied.
    assert error_of(controlled, "inject", type="MAP", status="NOMEM", time=3) == "bad-argument"
    assert guest.status(encode_map(3, 0x9000, 0x9FFF, 0x100000)) == Status.OK


def test_rate_injection_is_seeded_and_switches_off(controlled: Controlled, guest: IommuDriver) -> None:
    guest.status(encode_attach(3, ENDPOINT))
    controlled.call("inject-rate", type="MAP", status="NOMEM", rate=0.3, seed=7)
    statuses = [guest.status(encode_map(3, n << 12, (n << 12) + 0xFFF, 0x100000)) for n in range(60)]
    forced = statuses.count(Status.NOMEM)
    [rate] = controlled.call("counters")["rates"]
    assert rate["seen"] == 60 and rate["forced"] == forced
    assert 5 <= forced <= 35  # 0.3 of 60 = 18
    assert set(statuses) == {Status.OK, Status.NOMEM}
    # The same seed draws the same requests.
    import random

    draws = random.Random(7)
    assert [draws.random() < 0.3 for _ in range(60)] == [s == Status.NOMEM for s in statuses]
    controlled.call("inject-rate", type="MAP", status="NOMEM", rate=0)
    assert controlled.call("counters")["rates"] == []
    assert all(guest.status(encode_map(3, n << 12, (n << 12) + 0xFFF, 0x100000)) == 0 for n in range(60, 80))
    assert error_of(controlled, "inject-rate", type="MAP", status="NOMEM", rate=1.5) == "bad-argument"


def test_added_latency_holds_batches_without_blocking_the_loop(
    controlled: Controlled, guest: IommuDriver
) -> None:
    controlled.call("delay", us=200_000)
    started = time.monotonic()
    head = guest.requests.post([encode_attach(3, ENDPOINT)], [4])
    guest.frontend.kick(0)
    # While the batch is held the loop still answers (the control socket is served by the same loop).
    assert controlled.call("queues")[0]["used_idx"] == 0
    assert guest.frontend.wait_used(0, timeout=WAIT)
    # The loop's timers have millisecond resolution.
    assert time.monotonic() - started >= 0.19
    assert guest.requests.used() == [(head, 4)]
    counters = controlled.call("counters")
    assert counters["delayed_batches"] == 1 and counters["delay_us"] == 200_000
    # Off: a batch held under a long delay is served at once.
    controlled.call("delay", us=5_000_000)
    guest.requests.post([encode_attach(4, 0x28)], [4])
    guest.frontend.kick(0)
    controlled.call("delay", us=0)
    assert guest.frontend.wait_used(0, timeout=2.0)
    assert controlled.call("domains")[1]["domain"] == 4
    assert error_of(controlled, "delay", us=-1) == "bad-argument"


def test_added_latency_per_request_type_holds_only_that_type(
    controlled: Controlled, guest: IommuDriver
) -> None:
    guest.status(encode_attach(3, ENDPOINT))
    # Long enough that nothing but the release below can end it while the test looks.
    controlled.call("delay", us=MAX_HOLD_US, type="MAP")
    assert guest.status(encode_unmap(3, 0, 0xFFF)) == Status.OK  # another type: not held
    # A batch of UNMAP, MAP, UNMAP: the first is answered at once, the MAP and what follows it wait.
    heads = [
        guest.requests.post([encode_unmap(3, 0x10000, 0x10FFF)], [4]),
        guest.requests.post([encode_map(3, 0x20000, 0x20FFF, 0x100000)], [4]),
        guest.requests.post([encode_unmap(3, 0x30000, 0x30FFF)], [4]),
    ]
    guest.frontend.kick(0)
    assert guest.frontend.wait_used(0, timeout=WAIT)
    assert [head for head, _ in guest.requests.used()] == heads[:1]
    assert controlled.call("mappings")["mappings"] == []  # the MAP is held, not applied
    counters = controlled.call("counters")
    assert counters["type_delays_us"] == {"MAP": MAX_HOLD_US} and counters["delayed_requests"] == 1
    # Off for the type: what was held is served at once, in ring order.
    controlled.call("delay", us=0, type="MAP")
    assert [head for head, _length in guest.harvest(2)] == heads[1:]
    assert [m["iova_start"] for m in controlled.call("mappings")["mappings"]] == [0x20000]
    assert controlled.call("counters")["type_delays_us"] == {}
    assert error_of(controlled, "delay", us=1, type="JUMP") == "bad-argument"


def test_a_request_held_by_a_delay_when_the_ring_stops_is_served_after_a_pause(
    controlled: Controlled, guest: IommuDriver
) -> None:
    assert guest.status(encode_attach(3, ENDPOINT)) == Status.OK
    controlled.call("delay", us=MAX_HOLD_US, type="MAP")
    head = guest.requests.post([encode_map(3, 0x20000, 0x20FFF, 0x100000)], [4])
    guest.frontend.kick(0)
    # Nothing tells a front-end that a request is held: the control channel is asked until it says so.
    deadline = time.monotonic() + WAIT
    while controlled.call("counters")["delayed_requests"] == 0:
        assert time.monotonic() < deadline, "the MAP was never held"
    # A VM pause (QEMU stops the rings, then starts them at the bases it was told): the held MAP is
    # given back to the ring, not lost, and answered once the ring runs again.
    bases = guest.frontend.stop_device(2, reset_status=False)
    assert bases[0] == 1 and guest.requests.used() == []
    controlled.call("delay", us=0, type="MAP")
    guest.restart(bases)
    guest.frontend.kick(0)
    assert guest.frontend.wait_used(0, timeout=WAIT)
    assert guest.requests.used() == [(head, 4)] and decode_status(guest.requests.written(head)) == Status.OK
    assert [m["iova_start"] for m in controlled.call("mappings")["mappings"]] == [0x20000]


def test_a_broken_ring_under_a_per_type_delay_needs_reset(controlled: Controlled, guest: IommuDriver) -> None:
    controlled.call("delay", us=MAX_HOLD_US, type="MAP")
    # A descriptor pointing outside guest memory: the chain walk fails, the device asks for a reset.
    guest.requests.write_desc(0, 1 << 40, 16, 0, 0)
    guest.requests.make_available(0)
    guest.frontend.kick(0)
    assert guest.frontend.wait_error(0, timeout=WAIT)  # NEEDS_RESET writes the rings' err eventfds
    assert "requestq" in controlled.call("connections")[0]["broken"]
    assert controlled.call("hello")["version"] == 1  # the loop serves on


def test_added_latency_per_request_type_takes_that_long(controlled: Controlled, guest: IommuDriver) -> None:
    guest.status(encode_attach(3, ENDPOINT))
    controlled.call("delay", us=200_000, type="MAP")
    started = time.monotonic()
    assert guest.status(encode_map(3, 0x20000, 0x20FFF, 0x100000)) == Status.OK
    assert time.monotonic() - started >= 0.19  # the loop's timers have millisecond resolution
    controlled.call("inject-clear")
    assert controlled.call("counters")["type_delays_us"] == {}


def test_bypass_changes_at_run_time_with_a_config_change_message(
    controlled: Controlled, guest: IommuDriver
) -> None:
    channel = guest.frontend.channel
    assert channel is not None
    before = channel.config_changes
    assert controlled.call("bypass", value=0) == {"bypass": 0}
    assert guest.frontend.wait_config_changes(before + 1, timeout=WAIT)
    assert decode_config(guest.frontend.get_config(0, 40)).bypass == 0
    assert controlled.call("bypass", boot=True) == {"bypass": 1}
    assert guest.frontend.wait_config_changes(before + 2, timeout=WAIT)
    assert decode_config(guest.frontend.get_config(0, 40)).bypass == 1
    assert error_of(controlled, "bypass", value=2) == "bad-argument"


def probe(guest: IommuDriver, endpoint: int) -> list[tuple[int, int, int]]:
    written = guest.send(encode_probe(endpoint), PROBE_SIZE + 4)
    assert decode_status(written) == Status.OK
    return [
        (p.subtype, p.start, p.end) for p in decode_properties(written[:-4]) if isinstance(p, ResvMemProperty)
    ]


def test_reserved_regions_change_for_the_next_probe(controlled: Controlled, guest: IommuDriver) -> None:
    msi = (1, 0xFEE00000, 0xFEEFFFFF)
    assert probe(guest, ENDPOINT) == [msi]
    regions = [
        {"type": "RESERVED", "start": 0x100000, "end": 0x1FFFFF},
        {"type": "msi", "start": "0x8000000", "end": "0x80fffff"},
    ]
    reply = controlled.call("resv", endpoint=ENDPOINT, regions=regions)
    assert [r["start"] for r in reply["reserved"]] == [0x100000, 0x8000000]
    assert probe(guest, ENDPOINT) == [(0, 0x100000, 0x1FFFFF), (1, 0x8000000, 0x80FFFFF)]
    assert probe(guest, 0x28) == [msi]  # its neighbours keep theirs
    controlled.call("resv", endpoint=0x28, regions=[])
    assert probe(guest, 0x28) == []
    controlled.call("resv-clear", endpoint=ENDPOINT)
    assert probe(guest, ENDPOINT) == [msi]
    controlled.call("resv-clear")
    assert probe(guest, 0x28) == [msi]
    overlapping = [{"type": "MSI", "start": 0, "end": 0xFFF}, {"type": "MSI", "start": 0x800, "end": 0x1FFF}]
    assert error_of(controlled, "resv", endpoint=ENDPOINT, regions=overlapping) == "bad-argument"
    assert (
        error_of(controlled, "resv", endpoint=ENDPOINT, regions=[{"type": "MSI", "start": 5}])
        == "bad-argument"
    )
    too_many = [{"type": "RESERVED", "start": n << 12, "end": (n << 12) + 0xFFF} for n in range(30)]
    assert error_of(controlled, "resv", endpoint=ENDPOINT, regions=too_many) == "bad-argument"
    assert error_of(controlled, "resv", endpoint=0x2, regions=[]) == "not-found"
    assert probe(guest, ENDPOINT) == [msi]


def test_reserved_regions_changed_at_run_time_refuse_maps(controlled: Controlled, guest: IommuDriver) -> None:
    assert guest.status(encode_attach(3, ENDPOINT)) == Status.OK
    hole = {"type": "RESERVED", "start": 0x200000, "end": 0x2FFFFF}
    controlled.call("resv", endpoint=ENDPOINT, regions=[hole])
    assert controlled.call("domains")[0]["reserved"] == [[0x200000, 0x2FFFFF]]
    assert guest.status(encode_map(3, 0x200000, 0x200FFF, 0x100000)) == Status.RANGE
    miss = controlled.call("translate", endpoint=ENDPOINT, iova=0x200000)
    assert miss["reason"] == "MAPPING"
    controlled.call("resv-clear")
    assert guest.status(encode_map(3, 0x200000, 0x200FFF, 0x100000)) == Status.OK


def test_the_back_end_keeps_serving_after_control_errors(controlled: Controlled, guest: IommuDriver) -> None:
    cases: list[tuple[str, dict[str, Any]]] = [
        ("fault", {"endpoint": "0xzz"}),
        ("mappings", {"after": "yes"}),
        ("resv", {"endpoint": ENDPOINT, "regions": "all"}),
        ("inject-rate", {"type": "MAP", "status": "OK", "rate": "NaN"}),
        ("translate", {"endpoint": ENDPOINT, "iova": 1 << 70}),
    ]
    for command, arguments in cases:
        assert error_of(controlled, command, **arguments) == "bad-argument", command
    assert guest.status(encode_attach(3, ENDPOINT)) == Status.OK


# -- which path serves the requestq ------------------------------------------------------------------------


def served_by(controlled: Controlled) -> str:
    served: str = controlled.call("queues")[0]["served_by"]
    return served


def test_the_kick_thread_serves_and_times_batches_until_a_delay_or_an_observer_needs_the_loop(
    controlled: Controlled, guest: IommuDriver
) -> None:
    assert guest.status(encode_attach(3, ENDPOINT)) == Status.OK  # handed over by the thread, timed there
    assert served_by(controlled) == "thread"
    maps = [encode_map(3, n << 12, (n << 12) + 0xFFF, 0x100000) for n in range(16, 24)]
    for request in maps[:4]:
        assert guest.status(request) == Status.OK
    # Four MAPs in one kick: one batch of the kernel's (published at once: a poll window could catch them
    # one at a time).
    heads = [guest.requests.post([request], [4], publish=False) for request in maps[4:]]
    guest.requests.publish()
    guest.frontend.kick(0)
    guest.harvest(len(heads))
    counters = controlled.call("counters")
    assert counters["requests"]["MAP"] == 8
    assert counters["latency"]["MAP"]["count"] == 8 and counters["latency"]["ATTACH"]["count"] == 1
    assert counters["batches"]["count"] == 1 + 4 + 1
    assert counters["latency"]["MAP"]["min_us"] > 0
    # An added latency needs every kick on the loop; taking it off gives the ring back to a thread.
    controlled.call("delay", us=1000)
    assert served_by(controlled) == "event-loop"
    assert guest.status(encode_unmap(3, 16 << 12, (16 << 12) + 0xFFF)) == Status.OK
    assert controlled.call("counters")["delayed_batches"] == 1
    controlled.call("delay", us=0)
    assert served_by(controlled) == "thread"
    controlled.call("delay", us=MAX_HOLD_US, type="PROBE")
    assert served_by(controlled) == "event-loop"
    controlled.call("inject-clear")
    assert served_by(controlled) == "thread"
    # The conformance checker sees every request: the loop serves while it checks.
    controlled.call("conformance-start")
    assert served_by(controlled) == "event-loop"
    assert guest.status(encode_unmap(3, 17 << 12, (17 << 12) + 0xFFF)) == Status.OK
    odd = bytearray(encode_map(3, 0x10000, 0x10FFF, 0x100000))
    odd[1] = 1  # a head reserved byte: what the kernel would have served without a look
    guest.send(bytes(odd))
    report = controlled.call("conformance-stop")
    assert served_by(controlled) == "thread"
    assert report["counts"] == {"head-reserved": 1}
    counters = controlled.call("counters")
    assert counters["requests"]["UNMAP"] == 2 and counters["latency"]["UNMAP"]["count"] == 2
    assert counters["batches"]["count"] == 1 + 4 + 1 + 1 + 2

"""Migration through the front-end: SET_DEVICE_STATE_FD / CHECK_DEVICE_STATE (vhost-user.rst, "Migrating
back-end state"), from one back-end to another over two connections, with the harness playing QEMU."""

from __future__ import annotations

import fcntl
import os
import socket
import struct
import tempfile
from collections.abc import Callable, Iterator

import pytest

from vhost_iommu.device import snapshot
from vhost_iommu.device.core import IommuDevice
from vhost_iommu.device.layout import (
    ATTACH_F_BYPASS,
    CONFIG_BYPASS,
    Status,
    encode_attach,
    encode_map,
    encode_unmap,
)
from vhost_iommu.harness.background import RunningServer, running_server
from vhost_iommu.harness.frontend import Frontend, RequestFailedError
from vhost_iommu.harness.guest_ram import GuestRam
from vhost_iommu.harness.iommu_driver import IommuDriver
from vhost_iommu.harness.keeper_process import KeeperProcess
from vhost_iommu.harness.mappings import add_mappings
from vhost_iommu.protocol import (
    U64,
    VHOST_USER_F_PROTOCOL_FEATURES,
    DeviceStateTransfer,
    FrontendRequest,
    ProtocolFeature,
    encode,
)
from vhost_iommu.protocol.constants import DEVICE_STATE_LOAD, DEVICE_STATE_NOFD, DEVICE_STATE_SAVE
from vhost_iommu.virtio_iommu import VirtioIommuBackend

pytestmark = pytest.mark.usefixtures("fd_leak_check")

PAGE = 0x1000
BASE = 1 << 32


@pytest.fixture
def servers() -> Iterator[tuple[RunningServer, RunningServer]]:
    """A source and a destination back-end process, each on its own socket."""
    with running_server(VirtioIommuBackend) as source, running_server(VirtioIommuBackend) as destination:
        yield source, destination


def backend_of(server: RunningServer) -> VirtioIommuBackend:
    [backend] = server.backends
    assert isinstance(backend, VirtioIommuBackend)
    return backend


def saved_state(server: RunningServer) -> bytes:
    backend = backend_of(server)
    return server.call(lambda: snapshot.save(backend.device))


WORKLOAD = [
    encode_attach(3, 0x20),
    encode_attach(3, 0x21),
    encode_attach(9, 0x22, ATTACH_F_BYPASS),
    # Enough mappings for a state larger than a small pipe's buffer (see the save tests).
    *(
        encode_map(3, BASE + n * 2 * PAGE, BASE + n * 2 * PAGE + PAGE - 1, 0x300000 + n * PAGE)
        for n in range(200)
    ),
    encode_unmap(3, BASE + 4 * PAGE, BASE + 5 * PAGE - 1),
]
AFTERWARDS = [
    encode_map(3, BASE, BASE + PAGE - 1, 0),  # overlaps a migrated mapping: INVAL
    encode_map(3, BASE + 4 * PAGE, BASE + 5 * PAGE - 1, 0),  # where the migrated UNMAP made room: OK
    encode_unmap(3, BASE + 2 * PAGE, BASE + 3 * PAGE - 1),  # OK
    encode_map(9, BASE, BASE + PAGE - 1, 0),  # a migrated bypass domain: INVAL
    encode_attach(3, 0x22),  # from a bypass domain into a paging one: OK
    encode_unmap(7, 0, PAGE - 1),  # no such domain: NOENT
]


def populate(frontend: Frontend, ram: GuestRam, *, stop: bool = False) -> IommuDriver:
    """Start the device, serve WORKLOAD, turn bypass off; ``stop``: then stop the rings as QEMU 10.2's
    generic device does before a migration (no SET_STATUS 0). The driver that did it."""
    driver = IommuDriver(frontend, ram)
    for request in WORKLOAD:
        assert driver.status(request) == Status.OK
    frontend.set_config(CONFIG_BYPASS, b"\x00")
    if stop:
        frontend.stop_device(2, reset_status=False)
    return driver


def resumed_on(frontend: Frontend, ram: GuestRam, source: Frontend) -> IommuDriver:
    """A migration's destination resuming over the same guest RAM: its rings started with the features the
    source negotiated, the connection's set-up left to the caller (the state load needs it first)."""
    driver = IommuDriver(frontend, ram, start=False)
    frontend.start_rings(
        ram, driver.queues, driver_features=source.features & ~VHOST_USER_F_PROTOCOL_FEATURES
    )
    return driver


def test_state_moves_to_another_back_end_which_keeps_serving(
    servers: tuple[RunningServer, RunningServer],
) -> None:
    source, destination = servers
    with GuestRam(1 << 20) as ram, source.connect() as src, destination.connect() as dst:
        populate(src, ram, stop=True)
        before = saved_state(source)
        state = src.save_state()
        assert saved_state(source) == before  # saving changes nothing

        dst.negotiate(2)
        assert dst.protocol_features & ProtocolFeature.DEVICE_STATE
        dst.load_state(state)
        assert saved_state(destination) == before

        # The destination resumes: the guest's driver, unaware, goes on with the same device.
        driver = resumed_on(dst, ram, src)
        assert dst.get_config(CONFIG_BYPASS, 1) == b"\x00"
        reference = IommuDevice()
        snapshot.restore(reference, state)
        for request in AFTERWARDS:
            assert driver.status(request) == reference.handle_request(request, 4)[0][0]
        destination_device = backend_of(destination).device
        for endpoint, address in ((0x20, BASE + 0x123), (0x21, BASE + 6 * PAGE), (0x22, BASE + 4 * PAGE)):
            assert destination.call(
                lambda e=endpoint, a=address: destination_device.translate(e, a, 4, 1)
            ) == (reference.translate(endpoint, address, 4, 1))
        destination_backend = backend_of(destination)

        def saved() -> bytes:
            with destination_backend.quiesced():  # the requestq thread's counts merged into the device
                return snapshot.save(destination_device)

        assert destination.call(saved) == snapshot.save(reference)


def test_a_saved_state_loads_again_and_again(servers: tuple[RunningServer, RunningServer]) -> None:
    source, destination = servers
    with GuestRam(1 << 20) as ram, source.connect() as src, destination.connect() as dst:
        populate(src, ram, stop=True)
        state = src.save_state()
        assert src.save_state() == state  # a failed migration can be retried from the same source
        dst.negotiate(2)
        dst.load_state(state)
        dst.load_state(state)
        assert saved_state(destination) == state


@pytest.mark.parametrize(
    "damage",
    [
        lambda state: state[: len(state) // 2],  # truncated on the way
        lambda state: b"",  # nothing at all
        lambda state: bytes([state[0] ^ 1]) + state[1:],  # another format
        lambda state: state[:100] + bytes([state[100] ^ 0x40]) + state[101:],  # corrupted
        lambda state: state + b"\0" * 8,  # trailing bytes
        lambda state: os.urandom(4096),
    ],
)
def test_a_hostile_state_fails_the_check_and_leaves_the_device_alone(
    servers: tuple[RunningServer, RunningServer], damage: Callable[[bytes], bytes]
) -> None:
    source, destination = servers
    with GuestRam(1 << 20) as ram, source.connect() as src, destination.connect() as dst:
        populate(src, ram, stop=True)
        state = src.save_state()
        # The destination already holds a state of its own, which must survive.
        other = IommuDevice()
        other.set_features(other.device_features())
        other.handle_request(encode_attach(5, 0x23), 4)
        own = snapshot.save(other)
        dst.negotiate(2)
        dst.load_state(own)
        with pytest.raises(RequestFailedError, match="CHECK_DEVICE_STATE"):
            dst.load_state(damage(state))
        assert saved_state(destination) == own
        assert dst.check_device_state() != 0  # the result of the last transfer stays
        dst.load_state(state)  # and the connection still works
        assert dst.check_device_state() == 0


def test_a_state_of_another_topology_is_refused() -> None:
    from vhost_iommu.device.topology import Topology

    narrow = Topology(pci_ranges=Topology.default().pci_ranges, domain_end=0xFF)
    with running_server(lambda: VirtioIommuBackend(narrow)) as server, server.connect() as frontend:
        frontend.negotiate(2)
        with pytest.raises(RequestFailedError):
            frontend.load_state(snapshot.save(IommuDevice()))
        assert server.call(lambda: snapshot.save(backend_of(server).device)) == snapshot.save(
            IommuDevice(narrow)
        )


def test_transfers_while_rings_run_are_refused(servers: tuple[RunningServer, RunningServer]) -> None:
    source, _destination = servers
    with GuestRam(1 << 20) as ram, source.connect() as src:
        driver = populate(src, ram)
        before = saved_state(source)
        with pytest.raises(RequestFailedError, match="SET_DEVICE_STATE_FD refused"):
            src.save_state()
        with pytest.raises(RequestFailedError, match="SET_DEVICE_STATE_FD refused"):
            src.load_state(snapshot.save(IommuDevice()))
        assert saved_state(source) == before
        # Nothing was disturbed: the device goes on serving.
        assert driver.status(encode_map(3, BASE + PAGE, BASE + 2 * PAGE - 1, 0)) == Status.OK


def test_a_ring_started_during_a_load_fails_it(servers: tuple[RunningServer, RunningServer]) -> None:
    source, destination = servers
    with GuestRam(1 << 20) as ram, source.connect() as src, destination.connect() as dst:
        populate(src, ram, stop=True)
        state = src.save_state()
        dst.negotiate(2)
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        try:
            assert dst.set_device_state_fd(DEVICE_STATE_LOAD, read_fd) == DEVICE_STATE_NOFD
        finally:
            os.close(read_fd)
        try:
            os.write(write_fd, state[:1000])
            resumed_on(dst, ram, src)
            os.write(write_fd, state[1000:])  # the state is far smaller than a pipe's buffer
        finally:
            os.close(write_fd)
        assert dst.check_device_state() != 0
        device = backend_of(destination).device
        assert destination.call(device.domains) == []


def test_check_before_the_front_end_closed_its_end_fails(
    servers: tuple[RunningServer, RunningServer],
) -> None:
    _source, destination = servers
    with destination.connect() as dst:
        dst.negotiate(2)
        with pytest.raises(RequestFailedError, match="CHECK_DEVICE_STATE"):
            dst.load_state(snapshot.save(IommuDevice()), close_pipe=False)


def test_check_before_the_front_end_read_the_state_fails(
    servers: tuple[RunningServer, RunningServer],
) -> None:
    source, _destination = servers
    with GuestRam(1 << 20) as ram, source.connect() as src:
        populate(src, ram, stop=True)
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        try:
            fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, 4096)
            assert len(saved_state(source)) > 4096  # so the back-end cannot have written it all
            assert src.set_device_state_fd(DEVICE_STATE_SAVE, write_fd) == DEVICE_STATE_NOFD
            assert src.check_device_state() != 0  # nothing read yet
        finally:
            os.close(read_fd)
            os.close(write_fd)
        assert src.check_device_state() != 0
        src.save_state()  # a new transfer works


def test_a_reader_that_goes_away_fails_the_save(servers: tuple[RunningServer, RunningServer]) -> None:
    source, _destination = servers
    with GuestRam(1 << 20) as ram, source.connect() as src:
        populate(src, ram, stop=True)
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        os.close(read_fd)
        try:
            assert src.set_device_state_fd(DEVICE_STATE_SAVE, write_fd) == DEVICE_STATE_NOFD
        finally:
            os.close(write_fd)
        assert src.check_device_state() != 0


def test_an_endless_stream_is_cut_at_the_device_limit() -> None:
    with (
        running_server(lambda: VirtioIommuBackend(device=IommuDevice(max_mappings=16))) as server,
        server.connect() as frontend,
    ):
        frontend.negotiate(2)
        limit = server.call(lambda: backend_of(server).max_state_size())
        with pytest.raises(RequestFailedError, match="CHECK_DEVICE_STATE"):
            frontend.load_state(bytes(limit + 1))


def test_no_check_without_a_transfer_and_no_transfer_without_the_feature(
    servers: tuple[RunningServer, RunningServer],
) -> None:
    source, _destination = servers
    with source.connect() as frontend:
        frontend.negotiate(2)
        assert frontend.check_device_state() != 0
    source.wait_all_closed()
    with source.connect() as frontend:
        frontend.negotiate(2, protocol_features=~int(ProtocolFeature.DEVICE_STATE))
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        try:
            assert frontend.set_device_state_fd(DEVICE_STATE_SAVE, write_fd) & 0xFF
        finally:
            os.close(read_fd)
            os.close(write_fd)
        assert frontend.check_device_state() != 0


class RawTransfer:
    """A SET_DEVICE_STATE_FD payload the codec's own class would refuse to build."""

    def __init__(self, direction: int, phase: int) -> None:
        self.data = struct.pack("=II", direction, phase)

    def pack(self) -> bytes:
        return self.data


@pytest.mark.parametrize(("direction", "phase"), [(2, 0), (0, 1), (0xFFFFFFFF, 0xFFFFFFFF)])
def test_undefined_directions_and_phases_fail_cleanly(
    servers: tuple[RunningServer, RunningServer], direction: int, phase: int
) -> None:
    source, _destination = servers
    with source.connect() as frontend:
        frontend.negotiate(2)
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        try:
            frontend.send(
                encode(FrontendRequest.SET_DEVICE_STATE_FD, RawTransfer(direction, phase)), [write_fd]
            )
            reply = frontend.receive()
        finally:
            os.close(read_fd)
            os.close(write_fd)
        assert reply.code is FrontendRequest.SET_DEVICE_STATE_FD
        assert isinstance(reply.payload, U64) and reply.payload.value & 0xFF
        assert frontend.get_queue_num() == 2  # the connection goes on


def test_the_transfer_fd_must_be_a_pipe_or_socket(servers: tuple[RunningServer, RunningServer]) -> None:
    source, _destination = servers
    with source.connect() as frontend, tempfile.TemporaryFile() as regular:
        frontend.negotiate(2)
        assert frontend.set_device_state_fd(DEVICE_STATE_LOAD, regular.fileno()) & 0xFF
        # A socket works as a pipe does.
        ours, theirs = socket.socketpair()
        with ours, theirs:
            assert frontend.set_device_state_fd(DEVICE_STATE_LOAD, theirs.fileno()) == DEVICE_STATE_NOFD
            ours.sendall(snapshot.save(IommuDevice()))
            ours.shutdown(socket.SHUT_WR)
            assert frontend.check_device_state() == 0


def test_a_missing_fd_fails_cleanly(servers: tuple[RunningServer, RunningServer]) -> None:
    source, _destination = servers
    with source.connect() as frontend:
        frontend.negotiate(2)
        frontend.send(encode(FrontendRequest.SET_DEVICE_STATE_FD, DeviceStateTransfer(DEVICE_STATE_SAVE, 0)))
        reply = frontend.receive()
        assert isinstance(reply.payload, U64) and reply.payload.value & 0xFF


def test_disconnecting_mid_transfer_leaves_nothing_behind(
    servers: tuple[RunningServer, RunningServer],
) -> None:
    source, _destination = servers
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    try:
        with source.connect() as frontend:
            frontend.negotiate(2)
            assert frontend.set_device_state_fd(DEVICE_STATE_LOAD, read_fd) == DEVICE_STATE_NOFD
            os.close(read_fd)
            read_fd = -1
            os.write(write_fd, b"VIOMMUST")
        source.wait_all_closed()
        # The back-end closed its copy of the read end: the pipe has no reader left.
        with pytest.raises(BrokenPipeError):
            os.write(write_fd, b"more")
    finally:
        if read_fd >= 0:
            os.close(read_fd)
        os.close(write_fd)


def test_a_back_end_without_state_does_not_offer_it(frontend: Frontend) -> None:
    # The harness's default back-end is the echo device, which is not a MigratableBackend.
    assert not frontend.get_protocol_features() & ProtocolFeature.DEVICE_STATE


def test_a_stalled_transfer_holds_up_no_other_connection(
    servers: tuple[RunningServer, RunningServer],
) -> None:
    source, _destination = servers
    with GuestRam(1 << 20) as ram, source.connect() as src:
        populate(src, ram, stop=True)
        backend = backend_of(source)
        count = 100_000
        source.call(lambda: add_mappings(backend.device, 3, BASE + (1 << 30), count))
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        chunks = []
        try:
            try:
                assert src.set_device_state_fd(DEVICE_STATE_SAVE, write_fd) == DEVICE_STATE_NOFD
            finally:
                os.close(write_fd)
            # Nobody reads the pipe: it fills up and the back-end's transfer waits. Another front-end on
            # the same event loop is served meanwhile.
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            source.call(lambda: source.server.serve_connection(theirs))
            with IommuDriver(Frontend(ours), own_frontend=True) as other:
                assert other.attach(1, 0x20) == Status.OK
            while chunk := src._read_chunk(read_fd):
                chunks.append(chunk)
        finally:
            os.close(read_fd)
        assert src.check_device_state() == 0
        restored = IommuDevice()
        snapshot.restore(restored, b"".join(chunks))
        assert restored.store.count() == count + 199  # and the 200 mapped minus 1 unmapped by WORKLOAD


def test_migration_through_the_keeper() -> None:
    # serve --state-dir: the keeper relays the transfer fd to the device worker like any other message.
    with tempfile.TemporaryDirectory(prefix="vhost-") as directory:
        keeper = KeeperProcess(directory, backend="iommu")
        try:
            with Frontend.connect(keeper.socket, timeout=keeper.timeout) as frontend:
                frontend.negotiate(2)
                device = IommuDevice()
                device.set_features(device.device_features())
                device.handle_request(encode_attach(4, 0x20), 4)
                device.handle_request(encode_map(4, BASE, BASE + PAGE - 1, 0), 4)
                state = snapshot.save(device)
                frontend.load_state(state)
                assert frontend.save_state() == state
                with pytest.raises(RequestFailedError):
                    frontend.load_state(state[:-1])
                assert frontend.save_state() == state
            assert keeper.terminate() == 0
        finally:
            keeper.close()

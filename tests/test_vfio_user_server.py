"""The vfio-user server through a client that plays QEMU's vfio-user-pci: the session, the PCI function
as QEMU reads it, interrupts, reset, hostile clients, and nothing left behind."""

from __future__ import annotations

import asyncio
import errno
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from vhost_iommu.device import Topology
from vhost_iommu.endpoints.dma_engine import (
    MAGIC,
    R_DOORBELL,
    R_ERROR,
    R_IRQ_ENABLE,
    R_LENGTH,
    R_MAGIC,
    R_OP,
    R_STATUS,
    EngineError,
    Op,
    StatusBit,
)
from vhost_iommu.harness.background import RunningServer, running_server
from vhost_iommu.harness.guest_ram import GuestRam
from vhost_iommu.harness.vfio_client import VfioUserClient, VfioUserRequestFailed
from vhost_iommu.pci.function import COMMAND, COMMAND_BUS_MASTER, COMMAND_MEMORY
from vhost_iommu.vfio_user import codec, messages
from vhost_iommu.vfio_user import constants as vu
from vhost_iommu.virtio_iommu import VirtioIommuBackend

TOPOLOGY = Topology.default()
WAIT = 5.0


@pytest.fixture
def server() -> Iterator[RunningServer]:
    with running_server(lambda: VirtioIommuBackend(TOPOLOGY)) as running:
        running.serve_devices(TOPOLOGY, os.path.dirname(running.path))
        yield running


def engine_path(server: RunningServer) -> str:
    assert server.endpoints is not None
    return server.endpoints.endpoints[0].path


@pytest.fixture
def client(server: RunningServer) -> Iterator[VfioUserClient]:
    with VfioUserClient.connect(engine_path(server), WAIT) as connected:
        connected.version()
        yield connected


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_the_device_is_what_qemu_asks_for(client: VfioUserClient) -> None:
    info = client.request(messages.DeviceGetInfo(client.msg_id(), 16))
    _argsz, flags, regions, irqs = struct.unpack("=IIII", info)
    assert flags & vu.DEVICE_FLAGS_PCI and flags & vu.DEVICE_FLAGS_RESET
    assert regions >= 8 and irqs >= 3  # what QEMU's vfio-user-pci requires
    bar0 = client.request(messages.GetRegionInfo(client.msg_id(), 32, 0))
    _argsz, flags, index, _cap, size, _offset = struct.unpack("=IIIIQQ", bar0)
    assert (
        (index, size) == (0, 8192) and flags & vu.REGION_INFO_FLAG_READ and flags & vu.REGION_INFO_FLAG_WRITE
    )
    config = client.request(messages.GetRegionInfo(client.msg_id(), 32, vu.VFIO_PCI_CONFIG_REGION_INDEX))
    assert struct.unpack("=IIIIQQ", config)[4] == 256
    msix = client.request(messages.GetIrqInfo(client.msg_id(), 16, vu.VFIO_PCI_MSIX_IRQ_INDEX))
    assert struct.unpack("=IIII", msix)[3] == 1
    for index in (vu.VFIO_PCI_ERR_IRQ_INDEX, vu.VFIO_PCI_REQ_IRQ_INDEX):  # QEMU warns without them
        assert struct.unpack("=IIII", client.request(messages.GetIrqInfo(client.msg_id(), 16, index)))[3] == 1
    assert client.config_read(0, 4) == struct.pack("<HH", 0x1234, 0x11E9)
    assert client.bar_read(0, R_MAGIC, 4) == MAGIC


def test_bus_master_gates_the_engine_and_errors_interrupt(client: VfioUserClient) -> None:
    irq = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        client.set_msix_eventfds(0, (irq,))
        client.bar_write(0, R_IRQ_ENABLE, 1)
        client.bar_write(0, R_LENGTH, 4096, 8)
        client.bar_write(0, R_OP, Op.COPY)
        client.bar_write(0, R_DOORBELL, 1)
        assert client.bar_read(0, R_STATUS, 4) == StatusBit.DONE | StatusBit.ERROR
        assert client.bar_read(0, R_ERROR, 4) == EngineError.NO_BUS_MASTER
        with pytest.raises(BlockingIOError):
            os.eventfd_read(irq)  # no MSI-X message without Bus Master
        client.config_write(COMMAND, struct.pack("<H", COMMAND_MEMORY | COMMAND_BUS_MASTER))
        client.bar_write(0, R_DOORBELL, 1)
        # No RAM mapped by this client, so no guest can share it: the engine has no IOMMU to go through.
        assert client.bar_read(0, R_ERROR, 4) == EngineError.NO_IOMMU
        assert os.eventfd_read(irq) == 1  # the completion interrupt, on the eventfd QEMU gave
    finally:
        os.close(irq)


def test_reset_clears_the_function(client: VfioUserClient) -> None:
    client.config_write(COMMAND, struct.pack("<H", COMMAND_BUS_MASTER))
    client.bar_write(0, R_LENGTH, 123, 8)
    client.reset()
    assert client.bar_read(0, R_LENGTH, 8) == 0
    assert client.config_read(COMMAND, 2) == b"\x00\x00"


def test_bad_accesses_get_error_replies_and_the_session_goes_on(client: VfioUserClient) -> None:
    with pytest.raises(VfioUserRequestFailed) as caught:
        client.region_read(0, 8192, 4)  # past BAR0
    assert caught.value.errno == errno.EINVAL
    with pytest.raises(VfioUserRequestFailed):
        client.region_read(3, 0, 4)  # a BAR the device does not have
    with pytest.raises(VfioUserRequestFailed):
        client.dma_unmap(0x1000, 0x1000)  # never mapped
    assert client.bar_read(0, R_MAGIC, 4) == MAGIC


def test_dma_regions_map_and_unmap(client: VfioUserClient, server: RunningServer) -> None:
    with GuestRam(1 << 20, gpa_base=0x1000_0000) as ram:
        client.dma_map(ram.gpa_base, ram.size, ram.fd)
        client.dma_map(0xC0000, 0x20000, None)  # a ROM piece, as QEMU sends it: no fd
        with pytest.raises(VfioUserRequestFailed) as caught:
            client.dma_map(ram.gpa_base + 0x1000, 0x1000, ram.fd)
        assert caught.value.errno == errno.EEXIST
        assert server.endpoints is not None
        handler = server.call(lambda: server.endpoints.endpoints[0].handler)  # type: ignore[union-attr]
        assert handler is not None and len(handler.memory) == 1
        client.dma_unmap(ram.gpa_base, ram.size)
        assert server.call(lambda: len(handler.memory)) == 0


def test_a_request_before_version_closes_the_connection(server: RunningServer) -> None:
    with VfioUserClient.connect(engine_path(server), WAIT) as client:
        data, _fds = codec.encode_request(messages.RegionRead(1, 0, 0, 4))
        client.send(data)
        with pytest.raises(ConnectionError):
            client.read_reply()


def test_garbage_closes_the_connection_and_the_next_client_is_served(server: RunningServer) -> None:
    with VfioUserClient.connect(engine_path(server), WAIT) as client:
        client.send(b"\xff" * 64)
        with pytest.raises(ConnectionError):
            client.read_reply()
    with VfioUserClient.connect(engine_path(server), WAIT) as client:
        client.version()
        assert client.bar_read(0, R_MAGIC, 4) == MAGIC


def test_a_second_client_is_refused_while_the_first_is_served(
    server: RunningServer, client: VfioUserClient
) -> None:
    with VfioUserClient.connect(engine_path(server), WAIT) as second, pytest.raises(ConnectionError):
        second.version()
    assert client.bar_read(0, R_MAGIC, 4) == MAGIC


def wait_client_gone(server: RunningServer) -> None:
    """Wait until the server has finished closing the engine's client connection (if any)."""
    assert server.endpoints is not None
    served = server.endpoints.endpoints[0]
    connection = server.call(lambda: served.connection)
    if connection is not None:
        asyncio.run_coroutine_threadsafe(connection.wait_closed(), server.loop).result(WAIT)
    assert server.call(lambda: served.connection) is None


def guest_ram_mappings() -> int:
    return Path("/proc/self/maps").read_text().count("memfd:guest-ram")


def test_a_client_leaves_nothing_behind(server: RunningServer) -> None:
    """Its DMA regions are unmapped and its eventfds closed when it goes (the device state stays)."""

    def session() -> None:
        with VfioUserClient.connect(engine_path(server), WAIT) as client, GuestRam(1 << 20) as ram:
            client.start(ram)
            irq = os.eventfd(0)
            client.set_msix_eventfds(0, (irq,))
            os.close(irq)
            client.config_write(COMMAND, struct.pack("<H", COMMAND_BUS_MASTER))
        wait_client_gone(server)

    session()  # the first session's one-off allocations (the loop's, the codec's) are not a leak
    fds, mappings = open_fds(), guest_ram_mappings()
    for _ in range(5):
        session()
    assert open_fds() == fds
    assert guest_ram_mappings() == mappings == 0
    with VfioUserClient.connect(engine_path(server), WAIT) as client:
        client.version()
        assert client.config_read(COMMAND, 2) == struct.pack("<H", COMMAND_BUS_MASTER)  # device state kept


def test_dma_regions_are_bounded_and_checked_for_overlap_quickly(client: VfioUserClient) -> None:
    """A client that maps page after page (fd-less, as ROM pieces come) meets the advertised limit, and
    each map is checked against its neighbours only (this many maps in well under the timeout)."""
    count = 3000
    for index in range(count):
        client.dma_map(0x1_0000_0000 + 2 * index * 4096, 4096, None)
    for address in (0x1_0000_0000, 0x1_0000_0000 + 4096 * (2 * count - 2), 0x0_FFFF_F000 + 4096):
        with pytest.raises(VfioUserRequestFailed) as caught:
            client.dma_map(address, 4096, None)
        assert caught.value.errno == errno.EEXIST
    client.dma_map(0x1_0000_0000 + 4096, 4096, None)  # the hole between two regions is free
    client.dma_unmap(0x1_0000_0000, 4096)
    client.dma_map(0x1_0000_0000, 4096, None)

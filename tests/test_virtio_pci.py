"""The modern virtio-pci transport as a sans-I/O model (vhost_iommu/endpoints/virtio_pci.py): register
semantics a driver relies on, without sockets, over untranslated guest memory."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from vhost_iommu.abi import (
    PCI_CAP_ID_VENDOR,
    VIRTIO_CONFIG_S_ACKNOWLEDGE,
    VIRTIO_CONFIG_S_DRIVER,
    VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_ACCESS_PLATFORM,
    VIRTIO_F_VERSION_1,
    VIRTIO_MSI_NO_VECTOR,
    VIRTIO_PCI_CAP_COMMON_CFG,
    VIRTIO_PCI_CAP_DEVICE_CFG,
    VIRTIO_PCI_CAP_ISR_CFG,
    VIRTIO_PCI_CAP_NOTIFY_CFG,
    VIRTIO_PCI_ISR_CONFIG,
)
from vhost_iommu.endpoints.virtio_pci import ISR_OFFSET, NOTIFY_OFFSET, VirtioPciFunction
from vhost_iommu.harness.driver_queue import DriverQueue
from vhost_iommu.harness.guest_ram import GuestRam
from vhost_iommu.harness.virtio_pci_driver import (
    CONFIG_MSIX_VECTOR,
    DEVICE_FEATURE,
    DEVICE_FEATURE_SELECT,
    DEVICE_STATUS,
    DRIVER_FEATURE,
    DRIVER_FEATURE_SELECT,
    QUEUE_DESC,
    QUEUE_ENABLE,
    QUEUE_MSIX_VECTOR,
    QUEUE_SELECT,
    QUEUE_SIZE,
)
from vhost_iommu.memory import GuestMemory
from vhost_iommu.pci.function import CAP_ID_MSIX, CAPABILITIES_POINTER, COMMAND, COMMAND_BUS_MASTER
from vhost_iommu.virtqueue import SplitQueue

REQUIRED = VIRTIO_F_VERSION_1 | VIRTIO_F_ACCESS_PLATFORM


@dataclass
class EchoDevice:
    """A virtio device that returns every chain with nothing written."""

    kind: str = "echo"
    device_id: int = 42
    device_features: int = 1 << 3
    queue_count: int = 2
    queue_max_size: int = 64
    config_size: int = 8
    served: list[int] = field(default_factory=list)
    resets: int = 0

    def config_read(self, offset: int, size: int) -> bytes:
        return bytes(range(8))[offset : offset + size]

    def serve(self, queue: SplitQueue) -> int:
        count = 0
        while (chain := queue.pop()) is not None:
            queue.push_used(chain.head, 0)
            self.served.append(chain.head)
            count += 1
        return count

    def reset(self) -> None:
        self.resets += 1


@dataclass
class Rig:
    function: VirtioPciFunction
    device: EchoDevice
    ram: GuestRam
    memory: GuestMemory
    interrupts: list[int]

    def write(self, offset: int, value: int, size: int) -> None:
        self.function.bar_write(0, offset, value.to_bytes(size, "little"))

    def read(self, offset: int, size: int) -> int:
        return int.from_bytes(self.function.bar_read(0, offset, size), "little")

    def negotiate(self, features: int = REQUIRED) -> int:
        self.write(DEVICE_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER, 1)
        for word in (0, 1):
            self.write(DRIVER_FEATURE_SELECT, word, 4)
            self.write(DRIVER_FEATURE, (features >> (32 * word)) & 0xFFFF_FFFF, 4)
        self.write(DEVICE_STATUS, 0xB, 1)
        return self.read(DEVICE_STATUS, 1)


@pytest.fixture
def rig() -> Iterator[Rig]:
    with GuestRam(1 << 20) as ram:
        memory = ram.guest_memory()
        device = EchoDevice()
        interrupts: list[int] = []
        function = VirtioPciFunction(device, lambda: memory, interrupts.append)
        function.pci.config_write(COMMAND, struct.pack("<H", COMMAND_BUS_MASTER))
        yield Rig(function, device, ram, memory, interrupts)
        function.reset()  # the queues' views go before the memory
        memory.close()


def test_the_capabilities_chain_msix_then_the_four_virtio_structures(rig: Rig) -> None:
    config = rig.function.pci.config_read(0, 256)
    at, found = config[CAPABILITIES_POINTER], []
    while at:
        found.append((config[at], config[at + 3] if config[at] == PCI_CAP_ID_VENDOR else None))
        at = config[at + 1]
    assert found == [
        (CAP_ID_MSIX, None),
        (PCI_CAP_ID_VENDOR, VIRTIO_PCI_CAP_COMMON_CFG),
        (PCI_CAP_ID_VENDOR, VIRTIO_PCI_CAP_ISR_CFG),
        (PCI_CAP_ID_VENDOR, VIRTIO_PCI_CAP_DEVICE_CFG),
        (PCI_CAP_ID_VENDOR, VIRTIO_PCI_CAP_NOTIFY_CFG),
    ]
    assert struct.unpack("<HH", config[:4]) == (0x1AF4, 0x1040 + 42)


def test_features_are_read_a_word_at_a_time_and_fixed_at_features_ok(rig: Rig) -> None:
    words = []
    for word in (0, 1, 2):
        rig.write(DEVICE_FEATURE_SELECT, word, 4)
        words.append(rig.read(DEVICE_FEATURE, 4))
    assert words[0] & (1 << 3) and words[1] & 0b11 == 0b11 and words[2] == 0
    assert rig.negotiate() & VIRTIO_CONFIG_S_FEATURES_OK
    rig.write(DRIVER_FEATURE_SELECT, 0, 4)
    rig.write(DRIVER_FEATURE, 1 << 3, 4)
    assert rig.function.driver_features == REQUIRED


def test_features_ok_is_refused_for_a_feature_not_offered(rig: Rig) -> None:
    assert not rig.negotiate(REQUIRED | 1 << 7) & VIRTIO_CONFIG_S_FEATURES_OK


def test_a_vector_the_table_lacks_reads_back_as_no_vector(rig: Rig) -> None:
    rig.write(CONFIG_MSIX_VECTOR, 2, 2)
    assert rig.read(CONFIG_MSIX_VECTOR, 2) == 2  # 1 + 2 queues: vectors 0-2
    rig.write(CONFIG_MSIX_VECTOR, 3, 2)
    assert rig.read(CONFIG_MSIX_VECTOR, 2) == VIRTIO_MSI_NO_VECTOR
    rig.write(QUEUE_SELECT, 1, 2)
    rig.write(QUEUE_MSIX_VECTOR, 9, 2)
    assert rig.read(QUEUE_MSIX_VECTOR, 2) == VIRTIO_MSI_NO_VECTOR


def test_queue_registers_are_per_queue_and_64_bit_ones_take_halves(rig: Rig) -> None:
    rig.write(QUEUE_SELECT, 1, 2)
    rig.write(QUEUE_DESC, 0x1234_5000, 4)
    rig.write(QUEUE_DESC + 4, 0xAB, 4)
    rig.write(QUEUE_SIZE, 48, 2)  # not a power of two: ignored
    assert rig.read(QUEUE_SIZE, 2) == 64
    rig.write(QUEUE_SIZE, 16, 2)
    assert (rig.read(QUEUE_DESC, 8), rig.read(QUEUE_SIZE, 2)) == (0xAB_1234_5000, 16)
    rig.write(QUEUE_SELECT, 0, 2)
    assert (rig.read(QUEUE_DESC, 8), rig.read(QUEUE_SIZE, 2)) == (0, 64)
    rig.write(QUEUE_SELECT, 7, 2)  # no such queue: size 0
    assert rig.read(QUEUE_SIZE, 2) == 0


def _start(rig: Rig, size: int = 16) -> DriverQueue:
    queue = DriverQueue(rig.ram, size)
    assert rig.negotiate() & VIRTIO_CONFIG_S_FEATURES_OK
    rig.write(CONFIG_MSIX_VECTOR, 0, 2)
    rig.write(QUEUE_SELECT, 0, 2)
    rig.write(QUEUE_SIZE, size, 2)
    rig.write(QUEUE_MSIX_VECTOR, 1, 2)
    # Untranslated guest memory takes front-end addresses for rings (vhost-user's SET_VRING_ADDR view).
    for offset, address in ((0, queue.desc_uva), (8, queue.avail_uva), (16, queue.used_uva)):
        rig.write(QUEUE_DESC + offset, address, 8)
    rig.write(QUEUE_ENABLE, 1, 2)
    rig.write(DEVICE_STATUS, 0xF, 1)
    return queue


def test_a_notification_serves_the_queue_and_signals_its_vector(rig: Rig) -> None:
    queue = _start(rig)
    assert rig.read(DEVICE_STATUS, 1) == 0xF
    head = queue.post([b"x"], [4])
    rig.write(NOTIFY_OFFSET, 0, 2)
    assert rig.device.served == [head]
    assert queue.used() == [(head, 0)]
    assert rig.interrupts == [1]


def test_no_dma_and_no_interrupt_without_bus_master(rig: Rig) -> None:
    queue = _start(rig)
    rig.function.pci.config_write(COMMAND, b"\0\0")
    queue.post([b"x"], [4])
    rig.write(NOTIFY_OFFSET, 0, 2)
    assert rig.device.served == [] and rig.interrupts == []


def test_needs_reset_sticks_until_a_reset_and_is_signalled(rig: Rig) -> None:
    queue = _start(rig)
    queue.write_desc(0, queue.desc_gpa, 16, 1, 0)  # a descriptor that chains to itself
    queue.make_available(0)
    rig.write(NOTIFY_OFFSET, 0, 2)
    assert rig.read(DEVICE_STATUS, 1) & VIRTIO_CONFIG_S_NEEDS_RESET
    assert rig.interrupts == [0]  # the configuration vector
    assert rig.read(ISR_OFFSET, 1) & VIRTIO_PCI_ISR_CONFIG
    assert rig.read(ISR_OFFSET, 1) == 0  # reading ISR cleared it
    rig.write(DEVICE_STATUS, 0xF, 1)
    assert rig.read(DEVICE_STATUS, 1) & VIRTIO_CONFIG_S_NEEDS_RESET
    rig.write(DEVICE_STATUS, 0, 1)
    assert rig.read(DEVICE_STATUS, 1) == 0 and rig.device.resets == 1
    assert rig.function.queues == [None, None]


def test_driver_ok_without_features_ok_or_memory_needs_reset(rig: Rig) -> None:
    rig.write(DEVICE_STATUS, VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_DRIVER_OK, 1)
    assert rig.function.needs_reset_reason == "DRIVER_OK without FEATURES_OK"
    unpaired = Rig(VirtioPciFunction(EchoDevice(), lambda: None), rig.device, rig.ram, rig.memory, [])
    assert unpaired.negotiate() & VIRTIO_CONFIG_S_FEATURES_OK
    unpaired.write(DEVICE_STATUS, 0xF, 1)
    assert unpaired.function.status & VIRTIO_CONFIG_S_NEEDS_RESET
    assert "no IOMMU" in (unpaired.function.needs_reset_reason or "")

"""Virtio over PCI, the modern transport (virtio 1.3, "Virtio Over PCI Bus"), for a device model served
over vfio-user: the PCI function with its virtio capabilities, BAR0's common, ISR, device-configuration and
notification structures, MSI-X vectors, the device status and feature negotiation, and the split queues.

The transport is sans-I/O like the DMA engine: BAR accesses come in as (bar, offset, bytes), a queue's
memory comes from ``memory()`` (the endpoint's translated view of guest RAM, or None while no IOMMU is
paired: then the device cannot reach its rings and enters NEEDS_RESET), interrupts go out through
``interrupt(vector)``. The virtio device itself (:class:`VirtioDevice`: its ID, features, configuration
bytes and what it does with a queue's chains) knows nothing of PCI.

BAR0 (16 KiB, 32-bit memory):

    0x0000  common configuration (virtio_pci_common_cfg, through queue_reset: 0x40 bytes)
    0x1000  ISR status (1 byte; read clears)
    0x2000  device configuration (the device's bytes)
    0x3000  notifications: queue q at 0x3000 + 4 * q (notify_off_multiplier 4, queue_notify_off = q)
    0x3800  MSI-X table (vector 0: configuration changes; vector 1 + q: queue q), PBA at 0x3c00

Every register of the common structure may be accessed in any width inside it (the 64-bit queue
addresses as two halves, as Linux writes them). Errors of the driver (a broken ring, an address its
domain does not translate, a queue set up while DRIVER_OK) put the device in NEEDS_RESET: the status bit,
a configuration-change interrupt; only a reset (status 0 or a function reset) brings it back.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from vhost_iommu import abi
from vhost_iommu.abi import (
    PCI_CAP_ID_VENDOR,
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
    VIRTIO_PCI_DEVICE_BASE,
    VIRTIO_PCI_ISR_CONFIG,
    VIRTIO_PCI_ISR_QUEUE,
    VIRTIO_PCI_VENDOR,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
)
from vhost_iommu.pci.function import MsixLayout, PciFunction, PciIdentity, check_access
from vhost_iommu.virtqueue import QueueError, QueueMemory, SplitQueue

log = logging.getLogger(__name__)

BAR0_SIZE = 0x4000
COMMON_OFFSET = 0x0000
COMMON_SIZE = 0x40
ISR_OFFSET = 0x1000
DEVICE_OFFSET = 0x2000
DEVICE_REGION = 0x1000
NOTIFY_OFFSET = 0x3000
NOTIFY_MULTIPLIER = 4
MSIX_TABLE_OFFSET = 0x3800
MSIX_PBA_OFFSET = 0x3C00
CONFIG_VECTOR = 0
"""The MSI-X vector the device's driver is expected to give configuration changes (queues take 1 + q);
the transport uses whatever vector the driver writes."""

# virtio_pci_common_cfg: field -> (offset, struct format, writable by the driver)
_COMMON: dict[str, tuple[int, str, bool]] = {
    "device_feature_select": (abi.VIRTIO_PCI_COMMON_DEVICE_FEATURE_SELECT, "<I", True),
    "device_feature": (abi.VIRTIO_PCI_COMMON_DEVICE_FEATURE, "<I", False),
    "driver_feature_select": (abi.VIRTIO_PCI_COMMON_DRIVER_FEATURE_SELECT, "<I", True),
    "driver_feature": (abi.VIRTIO_PCI_COMMON_DRIVER_FEATURE, "<I", True),
    "config_msix_vector": (abi.VIRTIO_PCI_COMMON_CONFIG_MSIX_VECTOR, "<H", True),
    "num_queues": (abi.VIRTIO_PCI_COMMON_NUM_QUEUES, "<H", False),
    "device_status": (abi.VIRTIO_PCI_COMMON_DEVICE_STATUS, "<B", True),
    "config_generation": (abi.VIRTIO_PCI_COMMON_CONFIG_GENERATION, "<B", False),
    "queue_select": (abi.VIRTIO_PCI_COMMON_QUEUE_SELECT, "<H", True),
    "queue_size": (abi.VIRTIO_PCI_COMMON_QUEUE_SIZE, "<H", True),
    "queue_msix_vector": (abi.VIRTIO_PCI_COMMON_QUEUE_MSIX_VECTOR, "<H", True),
    "queue_enable": (abi.VIRTIO_PCI_COMMON_QUEUE_ENABLE, "<H", True),
    "queue_notify_off": (abi.VIRTIO_PCI_COMMON_QUEUE_NOTIFY_OFF, "<H", False),
    "queue_desc": (abi.VIRTIO_PCI_COMMON_QUEUE_DESC, "<Q", True),
    "queue_driver": (abi.VIRTIO_PCI_COMMON_QUEUE_DRIVER, "<Q", True),
    "queue_device": (abi.VIRTIO_PCI_COMMON_QUEUE_DEVICE, "<Q", True),
    "queue_notify_data": (abi.VIRTIO_PCI_COMMON_QUEUE_NOTIFY_DATA, "<H", False),
    "queue_reset": (abi.VIRTIO_PCI_COMMON_QUEUE_RESET, "<H", False),  # VIRTIO_F_RING_RESET is not offered
}
TRANSPORT_FEATURES = (
    VIRTIO_F_VERSION_1 | VIRTIO_F_ACCESS_PLATFORM | VIRTIO_RING_F_EVENT_IDX | VIRTIO_RING_F_INDIRECT_DESC
)
"""Offered with every device: modern only, DMA through the IOMMU, both ring extensions."""
REQUIRED_FEATURES = VIRTIO_F_VERSION_1 | VIRTIO_F_ACCESS_PLATFORM
"""FEATURES_OK is refused without these: the device only speaks the modern interface, and its addresses
are always translated (a driver that takes them for guest-physical ones would be misread)."""


class VirtioDevice(Protocol):
    """A virtio device behind the transport."""

    kind: str
    device_id: int
    device_features: int  # the device's own bits; the transport adds TRANSPORT_FEATURES
    queue_count: int
    queue_max_size: int
    config_size: int

    def config_read(self, offset: int, size: int) -> bytes: ...
    def serve(self, queue: SplitQueue) -> int:
        """Serve the chains available on ``queue``; how many were pushed. Raises QueueError."""
        ...

    def reset(self) -> None: ...


QueueMemorySource = Callable[[], QueueMemory | None]


@dataclass
class QueueSetup:
    """What the driver wrote about one queue."""

    size: int
    msix_vector: int = VIRTIO_MSI_NO_VECTOR
    enabled: bool = False
    desc: int = 0
    driver: int = 0
    device: int = 0


@dataclass
class TransportCounters:
    notifications: int = 0
    chains: int = 0
    interrupts: int = 0
    needs_reset: int = 0


def _vendor_capability(cfg_type: int, offset: int, length: int, extra: bytes = b"") -> tuple[int, bytes]:
    """struct virtio_pci_cap after its ID and next bytes: cap_len, cfg_type, bar, id, padding, offset,
    length (and the notification structure's multiplier)."""
    body = struct.pack("<BBBB2xII", 16 + len(extra), cfg_type, 0, 0, offset, length) + extra
    return PCI_CAP_ID_VENDOR, body


class VirtioPciFunction:
    """One virtio device as a PCI function (the ``EndpointDevice`` the vfio-user handler serves)."""

    def __init__(
        self,
        device: VirtioDevice,
        memory: QueueMemorySource,
        interrupt: Callable[[int], None] = lambda _vector: None,
    ) -> None:
        if device.config_size > DEVICE_REGION:
            raise ValueError(f"device configuration of {device.config_size} bytes")
        self.device = device
        self.kind = device.kind
        self._memory = memory
        self._interrupt = interrupt
        notify_length = NOTIFY_MULTIPLIER * device.queue_count
        capabilities = (
            _vendor_capability(VIRTIO_PCI_CAP_COMMON_CFG, COMMON_OFFSET, COMMON_SIZE),
            _vendor_capability(VIRTIO_PCI_CAP_ISR_CFG, ISR_OFFSET, 1),
            _vendor_capability(VIRTIO_PCI_CAP_DEVICE_CFG, DEVICE_OFFSET, device.config_size),
            _vendor_capability(
                VIRTIO_PCI_CAP_NOTIFY_CFG, NOTIFY_OFFSET, notify_length, struct.pack("<I", NOTIFY_MULTIPLIER)
            ),
        )
        identity = PciIdentity(
            vendor=VIRTIO_PCI_VENDOR,
            device=VIRTIO_PCI_DEVICE_BASE + device.device_id,
            class_code=0x018000,  # mass storage, other (what QEMU's virtio-blk-pci reports)
            subsystem_vendor=VIRTIO_PCI_VENDOR,
            subsystem=0x1100,
            revision=1,  # a modern-only device
        )
        msix = MsixLayout(
            vectors=1 + device.queue_count,
            table_bar=0,
            table_offset=MSIX_TABLE_OFFSET,
            pba_bar=0,
            pba_offset=MSIX_PBA_OFFSET,
        )
        self.pci = PciFunction(identity, (BAR0_SIZE,), msix, capabilities)
        self.counters = TransportCounters()
        self._set_power_on()

    def _set_power_on(self) -> None:
        self.status = 0
        self.device_feature_select = 0
        self.driver_feature_select = 0
        self.driver_features = 0
        self.config_msix_vector = VIRTIO_MSI_NO_VECTOR
        self.config_generation = 0
        self.queue_select = 0
        self.isr = 0
        self.setups = [QueueSetup(self.device.queue_max_size) for _ in range(self.device.queue_count)]
        self.queues: list[SplitQueue | None] = [None] * self.device.queue_count
        self._queue_memory: QueueMemory | None = None
        self.needs_reset_reason: str | None = None

    @property
    def features(self) -> int:
        """What the device offers."""
        return TRANSPORT_FEATURES | self.device.device_features

    # -- BAR0 -----------------------------------------------------------------------------------------------

    def bar_read(self, bar: int, offset: int, size: int) -> bytes:
        check_access(offset, size, BAR0_SIZE if bar == 0 else 0, f"BAR{bar}")
        if COMMON_OFFSET <= offset < COMMON_OFFSET + COMMON_SIZE:
            image = self._common_image() + bytes(8)  # an access may run past the structure's end
            start = offset - COMMON_OFFSET
            return image[start : start + size]
        if offset == ISR_OFFSET:
            value, self.isr = self.isr, 0  # reading ISR status clears it
            return bytes((value,)) + bytes(size - 1)
        if DEVICE_OFFSET <= offset < DEVICE_OFFSET + DEVICE_REGION:
            start = offset - DEVICE_OFFSET
            within = max(0, min(size, self.device.config_size - start))
            data = self.device.config_read(start, within) if within else b""
            return data + bytes(size - len(data))
        return bytes(size)

    def bar_write(self, bar: int, offset: int, data: bytes) -> None:
        check_access(offset, len(data), BAR0_SIZE if bar == 0 else 0, f"BAR{bar}")
        if COMMON_OFFSET <= offset < COMMON_OFFSET + COMMON_SIZE:
            self._common_write(offset - COMMON_OFFSET, data)
        elif NOTIFY_OFFSET <= offset < NOTIFY_OFFSET + NOTIFY_MULTIPLIER * self.device.queue_count:
            self.notify((offset - NOTIFY_OFFSET) // NOTIFY_MULTIPLIER)
        # the device configuration of a block device is read-only; other offsets ignore writes

    # -- the common structure -------------------------------------------------------------------------------

    def _field(self, name: str) -> int:
        setup = self.setups[self.queue_select] if self.queue_select < len(self.setups) else None
        if name == "device_feature":
            word = self.device_feature_select
            return (self.features >> (32 * word)) & 0xFFFF_FFFF if word < 2 else 0
        if name == "driver_feature":
            word = self.driver_feature_select
            return (self.driver_features >> (32 * word)) & 0xFFFF_FFFF if word < 2 else 0
        if name == "num_queues":
            return self.device.queue_count
        if name == "device_status":
            return self.status
        if name.startswith("queue_") and name != "queue_select":
            if setup is None:  # no such queue: size 0 tells the driver so
                return 0
            if name == "queue_size":
                return setup.size
            if name == "queue_msix_vector":
                return setup.msix_vector
            if name == "queue_enable":
                return int(setup.enabled)
            if name == "queue_notify_off":
                return self.queue_select
            if name in ("queue_desc", "queue_driver", "queue_device"):
                value: int = getattr(setup, name.removeprefix("queue_"))
                return value
            return 0
        attribute: int = getattr(self, name)
        return attribute

    def _common_image(self) -> bytes:
        image = bytearray(COMMON_SIZE)
        for name, (at, layout, _writable) in _COMMON.items():
            struct.pack_into(layout, image, at, self._field(name))
        return bytes(image)

    def _common_write(self, start: int, data: bytes) -> None:
        image = bytearray(self._common_image())
        end = min(start + len(data), COMMON_SIZE)
        image[start:end] = data[: end - start]
        for name, (at, layout, writable) in _COMMON.items():
            if writable and at < end and start < at + struct.calcsize(layout):
                (value,) = struct.unpack_from(layout, image, at)
                self._store(name, value)

    def _store(self, name: str, value: int) -> None:
        setup = self.setups[self.queue_select] if self.queue_select < len(self.setups) else None
        if name in ("device_feature_select", "driver_feature_select", "queue_select"):
            setattr(self, name, value)
        elif name == "driver_feature":
            if self.status & VIRTIO_CONFIG_S_FEATURES_OK or self.driver_feature_select >= 2:
                return  # features are fixed once FEATURES_OK is set
            shift = 32 * self.driver_feature_select
            self.driver_features = (self.driver_features & ~(0xFFFF_FFFF << shift)) | (value << shift)
        elif name == "config_msix_vector":
            self.config_msix_vector = self._vector(value)
        elif name == "device_status":
            self._write_status(value)
        elif setup is not None and not self.status & VIRTIO_CONFIG_S_DRIVER_OK:
            # The queue's fields are the driver's until DRIVER_OK (no VIRTIO_F_RING_RESET).
            if name == "queue_size":
                if value and not value & (value - 1) and value <= self.device.queue_max_size:
                    setup.size = value
            elif name == "queue_msix_vector":
                setup.msix_vector = self._vector(value)
            elif name == "queue_enable":
                setup.enabled = value == 1
            else:
                setattr(setup, name.removeprefix("queue_"), value)

    def _vector(self, value: int) -> int:
        """A vector the driver asks for: kept if the table has it, else NO_VECTOR (the driver reads it
        back)."""
        msix = self.pci.msix
        assert msix is not None
        return value if value < msix.vectors else VIRTIO_MSI_NO_VECTOR

    def _write_status(self, value: int) -> None:
        if value == 0:
            self.reset_device()
            return
        if value & VIRTIO_CONFIG_S_FEATURES_OK and not self.status & VIRTIO_CONFIG_S_FEATURES_OK:
            unknown = self.driver_features & ~self.features
            missing = REQUIRED_FEATURES & ~self.driver_features
            if unknown or missing:
                log.info(
                    "%s: FEATURES_OK refused (features %#x not offered, %#x required but not accepted)",
                    self.kind,
                    unknown,
                    missing,
                )
                value &= ~VIRTIO_CONFIG_S_FEATURES_OK
        starting = value & VIRTIO_CONFIG_S_DRIVER_OK and not self.status & VIRTIO_CONFIG_S_DRIVER_OK
        # The driver cannot clear NEEDS_RESET: only a reset does.
        self.status = value | (self.status & VIRTIO_CONFIG_S_NEEDS_RESET)
        if starting:
            self._start()

    # -- queues ---------------------------------------------------------------------------------------------

    def _start(self) -> None:
        if not self.status & VIRTIO_CONFIG_S_FEATURES_OK:
            self.enter_needs_reset("DRIVER_OK without FEATURES_OK")
            return
        memory = self._memory()
        if memory is None:
            self.enter_needs_reset("no IOMMU is paired with this device's client: its rings are unreachable")
            return
        self._bind(memory)

    def _bind(self, memory: QueueMemory) -> None:
        """Build (or rebind to ``memory``) every enabled queue; a ring its domain does not translate puts
        the device in NEEDS_RESET."""
        self._queue_memory = memory
        event_idx = bool(self.driver_features & VIRTIO_RING_F_EVENT_IDX)
        indirect = bool(self.driver_features & VIRTIO_RING_F_INDIRECT_DESC)
        for index, setup in enumerate(self.setups):
            if not setup.enabled:
                continue
            try:
                queue = self.queues[index]
                if queue is None:
                    self.queues[index] = SplitQueue(
                        memory,
                        setup.size,
                        setup.desc,
                        setup.driver,
                        setup.device,
                        next_avail=0,
                        event_idx=event_idx,
                        indirect=indirect,
                    )
                else:
                    queue.rebind(memory)
            except QueueError as exc:
                self.enter_needs_reset(f"queue {index}: {exc}")
                return

    def notify(self, index: int) -> None:
        """The driver notified queue ``index``: serve what it made available."""
        self.counters.notifications += 1
        if not self.status & VIRTIO_CONFIG_S_DRIVER_OK or self.status & VIRTIO_CONFIG_S_NEEDS_RESET:
            return
        if not self.pci.bus_master:
            return  # no DMA without Bus Master: the chains stay available
        memory = self._memory()
        if memory is None:
            self.enter_needs_reset("no IOMMU is paired with this device's client: its rings are unreachable")
            return
        if memory is not self._queue_memory:  # the client's RAM or the pairing changed
            self._bind(memory)
            if self.status & VIRTIO_CONFIG_S_NEEDS_RESET:
                return
        queue = self.queues[index] if index < len(self.queues) else None
        if queue is None:
            return
        try:
            self.counters.chains += self.device.serve(queue)
        except QueueError as exc:
            self.enter_needs_reset(f"queue {index}: {exc}")
            return
        finally:
            if queue.needs_notification():
                self.isr |= VIRTIO_PCI_ISR_QUEUE
                self._signal(self.setups[index].msix_vector)

    def _signal(self, vector: int) -> None:
        # An MSI-X message is a memory write of the function: none without Bus Master. (MSI-X enable and
        # masking are the VMM's: QEMU emulates the capability and sets an eventfd per unmasked vector.)
        if vector != VIRTIO_MSI_NO_VECTOR and self.pci.bus_master:
            self.counters.interrupts += 1
            self._interrupt(vector)

    def enter_needs_reset(self, reason: str) -> None:
        """The device cannot go on until the driver resets it (status bit, configuration interrupt)."""
        if self.status & VIRTIO_CONFIG_S_NEEDS_RESET:
            return
        log.warning("%s: NEEDS_RESET: %s", self.kind, reason)
        self.counters.needs_reset += 1
        self.needs_reset_reason = reason
        self.status |= VIRTIO_CONFIG_S_NEEDS_RESET
        self.config_generation = (self.config_generation + 1) & 0xFF
        self.isr |= VIRTIO_PCI_ISR_CONFIG
        self._signal(self.config_msix_vector)

    # -- resets ---------------------------------------------------------------------------------------------

    def reset_device(self) -> None:
        """Virtio device reset (status 0): queues, features and vectors back to their initial values."""
        self._set_power_on()
        self.device.reset()

    def reset(self) -> None:
        """Function-level reset (vfio-user DEVICE_RESET): configuration space and the virtio device."""
        self.pci.reset()
        self.reset_device()

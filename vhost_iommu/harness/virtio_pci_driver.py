"""The guest's virtio-pci driver for a device served over vfio-user, as Linux's ``virtio_pci`` drives it:
capabilities found in configuration space, feature negotiation, queue setup in the common structure,
DRIVER_OK, notifications, MSI-X vectors on eventfds.

The client (:class:`~vhost_iommu.harness.vfio_client.VfioUserClient`) plays QEMU; every BAR write it sends is
posted, so the driver syncs by reading a register afterwards (vfio-user serves a client's messages in
order: the reply to a read comes after every earlier write was served). Typical use::

    driver = VirtioPciDriver(client)
    driver.bring_up(FEATURES)                      # reset .. FEATURES_OK
    driver.setup_queue(0, queue, iova_of, vector=1)
    driver.driver_ok()
    driver.notify(0)                               # and wait: driver.status() reads back
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

from vhost_iommu import abi
from vhost_iommu.abi import (
    PCI_CAP_ID_VENDOR,
    VIRTIO_CONFIG_S_ACKNOWLEDGE,
    VIRTIO_CONFIG_S_DRIVER,
    VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_PCI_CAP_COMMON_CFG,
    VIRTIO_PCI_CAP_DEVICE_CFG,
    VIRTIO_PCI_CAP_ISR_CFG,
    VIRTIO_PCI_CAP_NOTIFY_CFG,
)
from vhost_iommu.harness.driver_queue import DriverQueue
from vhost_iommu.harness.vfio_client import VfioUserClient
from vhost_iommu.pci.function import CAPABILITIES_POINTER, COMMAND, COMMAND_BUS_MASTER, COMMAND_MEMORY

# virtio_pci_common_cfg offsets, by the names the spec gives the fields
DEVICE_FEATURE_SELECT = abi.VIRTIO_PCI_COMMON_DEVICE_FEATURE_SELECT
DEVICE_FEATURE = abi.VIRTIO_PCI_COMMON_DEVICE_FEATURE
DRIVER_FEATURE_SELECT = abi.VIRTIO_PCI_COMMON_DRIVER_FEATURE_SELECT
DRIVER_FEATURE = abi.VIRTIO_PCI_COMMON_DRIVER_FEATURE
CONFIG_MSIX_VECTOR = abi.VIRTIO_PCI_COMMON_CONFIG_MSIX_VECTOR
NUM_QUEUES = abi.VIRTIO_PCI_COMMON_NUM_QUEUES
DEVICE_STATUS = abi.VIRTIO_PCI_COMMON_DEVICE_STATUS
CONFIG_GENERATION = abi.VIRTIO_PCI_COMMON_CONFIG_GENERATION
QUEUE_SELECT = abi.VIRTIO_PCI_COMMON_QUEUE_SELECT
QUEUE_SIZE = abi.VIRTIO_PCI_COMMON_QUEUE_SIZE
QUEUE_MSIX_VECTOR = abi.VIRTIO_PCI_COMMON_QUEUE_MSIX_VECTOR
QUEUE_ENABLE = abi.VIRTIO_PCI_COMMON_QUEUE_ENABLE
QUEUE_NOTIFY_OFF = abi.VIRTIO_PCI_COMMON_QUEUE_NOTIFY_OFF
QUEUE_DESC = abi.VIRTIO_PCI_COMMON_QUEUE_DESC
QUEUE_DRIVER = abi.VIRTIO_PCI_COMMON_QUEUE_DRIVER
QUEUE_DEVICE = abi.VIRTIO_PCI_COMMON_QUEUE_DEVICE


class VirtioPciDriverError(Exception):
    """The device did not do what a driver relies on."""


@dataclass(frozen=True)
class VirtioCapability:
    cfg_type: int
    bar: int
    offset: int
    length: int
    notify_multiplier: int = 0


class VirtioPciDriver:
    def __init__(self, client: VfioUserClient) -> None:
        self.client = client
        client.config_write(COMMAND, struct.pack("<H", COMMAND_MEMORY | COMMAND_BUS_MASTER))
        self.capabilities = self._find_capabilities()
        for needed in (
            VIRTIO_PCI_CAP_COMMON_CFG,
            VIRTIO_PCI_CAP_NOTIFY_CFG,
            VIRTIO_PCI_CAP_ISR_CFG,
            VIRTIO_PCI_CAP_DEVICE_CFG,
        ):
            if needed not in self.capabilities:
                raise VirtioPciDriverError(f"no virtio capability of type {needed}")
        self.eventfds: list[int] = []

    def _find_capabilities(self) -> dict[int, VirtioCapability]:
        config = self.client.config_read(0, 256)
        found: dict[int, VirtioCapability] = {}
        at, seen = config[CAPABILITIES_POINTER], 0
        while at and seen < 48:
            seen += 1
            if config[at] == PCI_CAP_ID_VENDOR:
                _length, cfg_type, bar, _id, offset, length = struct.unpack_from("<BBBB2xII", config, at + 2)
                multiplier = 0
                if cfg_type == VIRTIO_PCI_CAP_NOTIFY_CFG:
                    (multiplier,) = struct.unpack_from("<I", config, at + 16)
                found.setdefault(cfg_type, VirtioCapability(cfg_type, bar, offset, length, multiplier))
            at = config[at + 1]
        return found

    # -- registers ------------------------------------------------------------------------------------------

    def _at(self, cfg_type: int, offset: int) -> tuple[int, int]:
        capability = self.capabilities[cfg_type]
        return capability.bar, capability.offset + offset

    def read(self, offset: int, size: int, cfg_type: int = VIRTIO_PCI_CAP_COMMON_CFG) -> int:
        return self.client.bar_read(*self._at(cfg_type, offset), size)

    def write(self, offset: int, value: int, size: int, cfg_type: int = VIRTIO_PCI_CAP_COMMON_CFG) -> None:
        bar, at = self._at(cfg_type, offset)
        self.client.bar_write(bar, at, value, size)

    def write64(self, offset: int, value: int) -> None:
        """A 64-bit register as Linux writes it: two 32-bit halves, low first."""
        self.write(offset, value & 0xFFFF_FFFF, 4)
        self.write(offset + 4, value >> 32, 4)

    def status(self) -> int:
        """The device status (a read: every earlier posted write has been served by its reply)."""
        return self.read(DEVICE_STATUS, 1)

    def device_config(self, offset: int, size: int) -> int:
        return self.read(offset, size, VIRTIO_PCI_CAP_DEVICE_CFG)

    # -- bring-up -------------------------------------------------------------------------------------------

    def device_features(self) -> int:
        features = 0
        for word in (0, 1):
            self.write(DEVICE_FEATURE_SELECT, word, 4)
            features |= self.read(DEVICE_FEATURE, 4) << (32 * word)
        return features

    def bring_up(self, wanted: int) -> int:
        """Reset, ACKNOWLEDGE, DRIVER, features (``wanted`` & offered), FEATURES_OK read back; the
        features accepted. Raises VirtioPciDriverError if the device refused them."""
        self.write(DEVICE_STATUS, 0, 1)
        if self.status() != 0:
            raise VirtioPciDriverError("the device did not reset")
        self.write(DEVICE_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE, 1)
        self.write(DEVICE_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER, 1)
        accepted = self.device_features() & wanted
        for word in (0, 1):
            self.write(DRIVER_FEATURE_SELECT, word, 4)
            self.write(DRIVER_FEATURE, (accepted >> (32 * word)) & 0xFFFF_FFFF, 4)
        self.write(DEVICE_STATUS, self.status() | VIRTIO_CONFIG_S_FEATURES_OK, 1)
        if not self.status() & VIRTIO_CONFIG_S_FEATURES_OK:
            raise VirtioPciDriverError(f"the device refused features {accepted:#x}")
        return accepted

    def use_eventfds(self, vectors: int) -> None:
        """An eventfd for each MSI-X vector, as QEMU sets them (SET_IRQS); closed by :meth:`close` (or the
        next call, which replaces them)."""
        self.close()
        self.eventfds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(vectors)]
        self.client.set_msix_eventfds(0, tuple(self.eventfds))

    def interrupts(self, vector: int) -> int:
        """Interrupts on ``vector`` since the last call."""
        try:
            return os.eventfd_read(self.eventfds[vector])
        except BlockingIOError:
            return 0

    def set_config_vector(self, vector: int) -> int:
        self.write(CONFIG_MSIX_VECTOR, vector, 2)
        return self.read(CONFIG_MSIX_VECTOR, 2)

    def setup_queue(
        self, index: int, queue: DriverQueue, device_address: Callable[[int], int], vector: int
    ) -> int:
        """Queue ``index`` at ``queue``'s rings (their device addresses), its vector; the vector read back."""
        self.write(QUEUE_SELECT, index, 2)
        if self.read(QUEUE_SIZE, 2) < queue.size:
            raise VirtioPciDriverError(f"queue {index} is smaller than {queue.size}")
        self.write(QUEUE_SIZE, queue.size, 2)
        self.write(QUEUE_MSIX_VECTOR, vector, 2)
        self.write64(QUEUE_DESC, device_address(queue.desc_gpa))
        self.write64(QUEUE_DRIVER, device_address(queue.avail_gpa))
        self.write64(QUEUE_DEVICE, device_address(queue.used_gpa))
        self.write(QUEUE_ENABLE, 1, 2)
        return self.read(QUEUE_MSIX_VECTOR, 2)

    def driver_ok(self) -> int:
        self.write(DEVICE_STATUS, self.status() | VIRTIO_CONFIG_S_DRIVER_OK, 1)
        return self.status()

    def notify(self, index: int) -> None:
        """Notify queue ``index`` and wait until the device has served the notification."""
        self.write(QUEUE_SELECT, index, 2)
        multiplier = self.capabilities[VIRTIO_PCI_CAP_NOTIFY_CFG].notify_multiplier
        offset = self.read(QUEUE_NOTIFY_OFF, 2) * multiplier
        self.write(offset, index, 2, VIRTIO_PCI_CAP_NOTIFY_CFG)
        self.status()

    def close(self) -> None:
        for fd in self.eventfds:
            os.close(fd)
        self.eventfds = []

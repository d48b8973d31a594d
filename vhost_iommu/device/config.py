"""The 40-byte virtio-iommu config space and its one writable field, ``bypass``."""

from __future__ import annotations

from vhost_iommu.device.layout import CONFIG, CONFIG_BYPASS, CONFIG_SIZE
from vhost_iommu.device.topology import Topology


class ConfigSpace:
    """struct virtio_iommu_config as the driver sees it.

    ``bypass`` starts from the topology's boot setting, survives device reset (the spec: it "SHOULD NOT
    change on device reset, but SHOULD be restored to its initial value on system reset"), and is the only
    field a driver may write, and only once BYPASS_CONFIG is negotiated.
    """

    size = CONFIG_SIZE

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self.boot_bypass = 1 if topology.boot_bypass else 0
        self.bypass = self.boot_bypass

    def system_reset(self) -> None:
        self.bypass = self.boot_bypass

    def encode(self) -> bytes:
        topology = self.topology
        return CONFIG.pack(
            topology.page_size_mask,
            topology.input_start,
            topology.input_end,
            topology.domain_start,
            topology.domain_end,
            topology.probe_size,
            self.bypass,
            bytes(3),
        )

    def read(self, offset: int, size: int) -> bytes:
        if offset < 0 or size < 0 or offset + size > self.size:
            raise ValueError(f"config read of {size} bytes at offset {offset} is outside the config")
        return self.encode()[offset : offset + size]

    def write(self, offset: int, data: bytes, *, bypass_config_negotiated: bool) -> None:
        """Apply a driver write; ValueError for any write the spec does not allow (nothing changes then)."""
        if offset < 0 or offset + len(data) > self.size:
            raise ValueError(f"config write of {len(data)} bytes at offset {offset} is outside the config")
        if offset != CONFIG_BYPASS or len(data) != 1:
            raise ValueError(
                f"config write of {len(data)} bytes at offset {offset}: only bypass (1 byte at offset "
                f"{CONFIG_BYPASS}) is writable"
            )
        if not bypass_config_negotiated:
            raise ValueError("config write to bypass without VIRTIO_IOMMU_F_BYPASS_CONFIG negotiated")
        if data[0] not in (0, 1):
            raise ValueError(f"config write of {data[0]:#x} to bypass: only 0 and 1 are allowed")
        self.bypass = data[0]

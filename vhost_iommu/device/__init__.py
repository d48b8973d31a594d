"""The virtio-iommu device core: sans-I/O, bytes in, bytes out; no sockets, no rings, no asyncio.

- `layout`: request/status codes, feature bits, packed layouts, request builders (driver side too)
- `topology`: the platform description (endpoints, reserved regions, ranges) from TOML
- `config`: the 40-byte config space and the sticky ``bypass`` field
- `domains`: ATTACH/DETACH policy and the per-domain arrays MAP/UNMAP read
- `mapping`: the protocol of the mapping table (`vhost_iommu.jit.tables.MappingTable`)
- `translation`: DMA translation and faults; `events`: the bounded fault-event queue
- `core`: `IommuDevice`, which puts them together
"""

from vhost_iommu.device.core import EndpointInfo, IommuDevice
from vhost_iommu.device.domains import DomainInfo
from vhost_iommu.device.layout import Access, FaultReason, RequestType, ResvMemType, Status
from vhost_iommu.device.topology import PciRange, ReservedRegion, Topology, TopologyError
from vhost_iommu.device.translation import Fault, Translation

__all__ = [
    "Access",
    "DomainInfo",
    "EndpointInfo",
    "Fault",
    "FaultReason",
    "IommuDevice",
    "PciRange",
    "RequestType",
    "ReservedRegion",
    "ResvMemType",
    "Status",
    "Topology",
    "TopologyError",
    "Translation",
]

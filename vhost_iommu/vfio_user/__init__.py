"""Sans-I/O vfio-user codec, server side: no sockets, no event loop.

``Decoder().feed(data, fds)`` returns the typed, immutable requests (:mod:`.messages`) the bytes complete;
:func:`encode_reply` / :func:`encode_error` and the ``*_reply`` payload builders produce the server's
bytes. Every size, count, flag, index and fd a client sends is validated; a violation is a
:class:`VfioUserProtocolError` (close the connection).
"""

from vhost_iommu.protocol import close_fds  # the one rule for closing fds on error paths
from vhost_iommu.vfio_user.codec import (
    COMMAND_SPECS,
    SERVER_CAPABILITIES,
    CommandSpec,
    Decoder,
    VfioUserProtocolError,
    command_name,
    device_info_reply,
    dma_unmap_reply,
    encode_error,
    encode_reply,
    encode_request,
    irq_info_reply,
    region_info_reply,
    region_read_reply,
    region_write_reply,
    version_reply,
)
from vhost_iommu.vfio_user.constants import Command
from vhost_iommu.vfio_user.messages import (
    UNSUPPORTED_COMMANDS,
    DeviceGetInfo,
    DeviceReset,
    DmaMap,
    DmaUnmap,
    GetIrqInfo,
    GetRegionInfo,
    GetRegionIoFds,
    MessageError,
    RegionRead,
    RegionWrite,
    Request,
    SetIrqs,
    Unsupported,
    Version,
)

__all__ = [
    "COMMAND_SPECS",
    "SERVER_CAPABILITIES",
    "UNSUPPORTED_COMMANDS",
    "Command",
    "CommandSpec",
    "Decoder",
    "DeviceGetInfo",
    "DeviceReset",
    "DmaMap",
    "DmaUnmap",
    "GetIrqInfo",
    "GetRegionInfo",
    "GetRegionIoFds",
    "MessageError",
    "RegionRead",
    "RegionWrite",
    "Request",
    "SetIrqs",
    "Unsupported",
    "Version",
    "VfioUserProtocolError",
    "close_fds",
    "command_name",
    "device_info_reply",
    "dma_unmap_reply",
    "encode_error",
    "encode_reply",
    "encode_request",
    "irq_info_reply",
    "region_info_reply",
    "region_read_reply",
    "region_write_reply",
    "version_reply",
]

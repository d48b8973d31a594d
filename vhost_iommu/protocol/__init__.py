"""Sans-I/O vhost-user codec: no sockets, no event loop.

``Decoder(Stream.FRONTEND_REQUESTS).feed(data, fds)`` then ``next_message()`` yields typed, immutable
:class:`Message` objects (a :class:`Framer` alone splits a stream into messages by the wire rules, for a
relay that does not read payloads); :func:`encode` / :func:`encode_reply` / :func:`encode_ack` produce
bytes. The same codec serves the back-end (server), the front-end (test harness) and the keeper, on the
main socket and on the back-end channel.
"""

from vhost_iommu.protocol.codec import (
    Decoder,
    Frame,
    Framer,
    FramingError,
    Message,
    ProtocolError,
    RequestRejected,
    Stream,
    close_fds,
    encode,
    encode_ack,
    encode_reply,
    request_has_own_reply,
)
from vhost_iommu.protocol.constants import (
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    HEADER_SIZE,
    MAX_CONFIG_SIZE,
    MAX_FDS_PER_MESSAGE,
    MAX_MEM_TABLE_REGIONS,
    MAX_PAYLOAD_SIZE,
    VERSION,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VIRTIO_CONFIG_S_NEEDS_RESET,
    BackendRequest,
    FrontendRequest,
    ProtocolFeature,
)
from vhost_iommu.protocol.messages import (
    U64,
    ConfigSpace,
    DeviceStateTransfer,
    Empty,
    MemoryRegion,
    MemoryTable,
    Payload,
    PayloadError,
    SingleMemoryRegion,
    VringAddress,
    VringFile,
    VringState,
)

__all__ = [
    "FLAG_NEED_REPLY",
    "FLAG_REPLY",
    "HEADER_SIZE",
    "MAX_CONFIG_SIZE",
    "MAX_FDS_PER_MESSAGE",
    "MAX_MEM_TABLE_REGIONS",
    "MAX_PAYLOAD_SIZE",
    "U64",
    "VERSION",
    "VHOST_USER_F_PROTOCOL_FEATURES",
    "VIRTIO_CONFIG_S_NEEDS_RESET",
    "BackendRequest",
    "ConfigSpace",
    "Decoder",
    "DeviceStateTransfer",
    "Empty",
    "Frame",
    "Framer",
    "FramingError",
    "FrontendRequest",
    "MemoryRegion",
    "MemoryTable",
    "Message",
    "Payload",
    "PayloadError",
    "ProtocolError",
    "ProtocolFeature",
    "RequestRejected",
    "SingleMemoryRegion",
    "Stream",
    "VringAddress",
    "VringFile",
    "VringState",
    "close_fds",
    "encode",
    "encode_ack",
    "encode_reply",
    "request_has_own_reply",
]

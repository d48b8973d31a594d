"""Numbers of the vhost-user protocol (QEMU ``docs/interop/vhost-user.rst``).

Only numbers live here: request codes of both channels, header flag bits, protocol feature bits and the
limits this implementation enforces on what a peer sends.
"""

from __future__ import annotations

import enum

# A virtio number (defined in the leaf of those), named here beside the protocol's own for its users.
from vhost_iommu.abi import VIRTIO_CONFIG_S_NEEDS_RESET as VIRTIO_CONFIG_S_NEEDS_RESET


class FrontendRequest(enum.IntEnum):
    """Requests the front-end sends on the main socket ("Front-end message types")."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43


class BackendRequest(enum.IntEnum):
    """Requests the back-end sends on the back-end channel ("Back-end message types")."""

    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3
    VRING_CALL = 4
    VRING_ERR = 5
    SHARED_OBJECT_ADD = 6
    SHARED_OBJECT_REMOVE = 7
    SHARED_OBJECT_LOOKUP = 8


class ProtocolFeature(enum.IntFlag):
    """``VHOST_USER_PROTOCOL_F_*`` as bit masks."""

    MQ = 1 << 0
    LOG_SHMFD = 1 << 1
    RARP = 1 << 2
    REPLY_ACK = 1 << 3
    MTU = 1 << 4
    BACKEND_REQ = 1 << 5
    CROSS_ENDIAN = 1 << 6
    CRYPTO_SESSION = 1 << 7
    PAGEFAULT = 1 << 8
    CONFIG = 1 << 9
    BACKEND_SEND_FD = 1 << 10
    HOST_NOTIFIER = 1 << 11
    INFLIGHT_SHMFD = 1 << 12
    RESET_DEVICE = 1 << 13
    INBAND_NOTIFICATIONS = 1 << 14
    CONFIGURE_MEM_SLOTS = 1 << 15
    STATUS = 1 << 16
    XEN_MMAP = 1 << 17
    SHARED_OBJECT = 1 << 18
    DEVICE_STATE = 1 << 19


# Header flags: bits 0-1 are the version, bit 2 marks a reply, bit 3 asks for a REPLY_ACK;
# the other bits are reserved.
VERSION = 0x1
VERSION_MASK = 0x3
FLAG_REPLY = 1 << 2
FLAG_NEED_REPLY = 1 << 3
KNOWN_FLAGS = VERSION_MASK | FLAG_REPLY | FLAG_NEED_REPLY

#: Virtio feature bit 30, reused by vhost-user to announce GET/SET_PROTOCOL_FEATURES.
VHOST_USER_F_PROTOCOL_FEATURES = 1 << 30

#: Payload u64 of SET_VRING_KICK/CALL/ERR: bits 0-7 the ring index, bit 8 "no fd attached".
VRING_INDEX_MASK = 0xFF
VRING_NOFD_MASK = 1 << 8

#: ``VHOST_VRING_F_LOG``: the only defined SET_VRING_ADDR flag.
VRING_F_LOG = 1 << 0

#: SET_DEVICE_STATE_FD parameters ("Device state transfer parameters"): the transfer direction, the only
#: migration phase defined (both VMs stopped, the device suspended), and the reply's bits: 0-7 zero on
#: success, bit 8 set when the back-end returns no fd of its own (the front-end's fd is used).
DEVICE_STATE_SAVE = 0
DEVICE_STATE_LOAD = 1
DEVICE_STATE_PHASE_STOPPED = 0
DEVICE_STATE_ERROR_MASK = 0xFF
DEVICE_STATE_NOFD = 1 << 8

#: SET_CONFIG flags: 0 is a driver write, 1 a live-migration write.
CONFIG_FLAG_WRITABLE = 0
CONFIG_FLAG_MIGRATION = 1

#: QEMU's ``VHOST_MEMORY_BASELINE_NREGIONS``: the most regions (and fds) one SET_MEM_TABLE carries.
MAX_MEM_TABLE_REGIONS = 8
#: QEMU's ``VHOST_USER_MAX_CONFIG_SIZE``.
MAX_CONFIG_SIZE = 256
#: The most fds any message may carry (SET_MEM_TABLE with every region); also the ancillary buffer size.
MAX_FDS_PER_MESSAGE = MAX_MEM_TABLE_REGIONS
#: Payloads larger than this are not buffered: the peer is not speaking vhost-user and framing is lost.
#: Every payload this implementation accepts is under 300 bytes; QEMU's largest union member
#: (a crypto session) is a little over 1 KiB.
MAX_PAYLOAD_SIZE = 4096

HEADER_SIZE = 12

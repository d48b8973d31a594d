"""Wire layouts of the virtio-iommu device (virtio 1.3, "IOMMU Device"): numbers, structs, encoders.

Everything here is pure data: request and status codes, feature bits, the packed little-endian layouts of
the requests, the config space, PROBE properties and fault events, and small encoders/decoders built on
them. The device core decodes with these; tests, the harness and tools build requests with them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum, IntFlag

from vhost_iommu import abi
from vhost_iommu.abi import (
    ATTACH_F_BYPASS,
    ATTACH_SIZE,
    CONFIG_BYPASS,
    CONFIG_DOMAIN_RANGE,
    CONFIG_INPUT_RANGE,
    CONFIG_PAGE_SIZE_MASK,
    CONFIG_PROBE_SIZE,
    CONFIG_SIZE,
    DETACH_SIZE,
    EVENT_QUEUE,
    F_BYPASS,
    F_BYPASS_CONFIG,
    F_DOMAIN_RANGE,
    F_INPUT_RANGE,
    F_MAP_UNMAP,
    F_MMIO,
    F_PROBE,
    FAULT_F_ADDRESS,
    FAULT_F_EXEC,
    FAULT_F_READ,
    FAULT_F_WRITE,
    FAULT_SIZE,
    MAP_F_MMIO,
    MAP_F_READ,
    MAP_F_WRITE,
    MAP_SIZE,
    PROBE_SIZE,
    PROBE_T_MASK,
    PROBE_T_NONE,
    PROBE_T_RESV_MEM,
    REQUEST_QUEUE,
    RESV_MEM_SIZE,
    TAIL_SIZE,
    U32_MAX,
    U64_MAX,
    UNMAP_SIZE,
)
from vhost_iommu.abi import VIRTIO_F_VERSION_1 as F_VERSION_1

__all__ = [
    "ATTACH",
    "ATTACH_F_BYPASS",
    "ATTACH_SIZE",
    "CONFIG",
    "CONFIG_BYPASS",
    "CONFIG_DOMAIN_RANGE",
    "CONFIG_INPUT_RANGE",
    "CONFIG_PAGE_SIZE_MASK",
    "CONFIG_PROBE_SIZE",
    "CONFIG_SIZE",
    "DETACH",
    "DETACH_SIZE",
    "EVENT_QUEUE",
    "FAULT",
    "FAULT_F_ADDRESS",
    "FAULT_F_EXEC",
    "FAULT_F_READ",
    "FAULT_F_WRITE",
    "FAULT_SIZE",
    "FEATURE_NAMES",
    "F_BYPASS",
    "F_BYPASS_CONFIG",
    "F_DOMAIN_RANGE",
    "F_INPUT_RANGE",
    "F_MAP_UNMAP",
    "F_MMIO",
    "F_PROBE",
    "F_VERSION_1",
    "HEAD",
    "MAP",
    "MAP_F_MMIO",
    "MAP_F_READ",
    "MAP_F_WRITE",
    "MAP_SIZE",
    "PROBE",
    "PROBE_SIZE",
    "PROBE_T_MASK",
    "PROBE_T_NONE",
    "PROBE_T_RESV_MEM",
    "PROPERTY_HEAD",
    "READABLE_SIZE",
    "REQUEST_QUEUE",
    "RESV_MEM",
    "RESV_MEM_SIZE",
    "TAIL",
    "TAIL_SIZE",
    "U32_MAX",
    "U64_MAX",
    "UNMAP",
    "UNMAP_SIZE",
    "Access",
    "ConfigFields",
    "FaultEvent",
    "FaultReason",
    "RequestType",
    "ResvMemProperty",
    "ResvMemType",
    "Status",
    "UnknownProperty",
    "decode_config",
    "decode_fault",
    "decode_properties",
    "decode_status",
    "encode_attach",
    "encode_detach",
    "encode_fault",
    "encode_map",
    "encode_probe",
    "encode_resv_mem",
    "encode_tail",
    "encode_unmap",
    "feature_names",
    "writable_size",
]

# -- numbers (defined in vhost_iommu.abi, named here as the device core and its tools use them) ----------

FEATURE_NAMES: dict[int, str] = {
    F_INPUT_RANGE: "INPUT_RANGE",
    F_DOMAIN_RANGE: "DOMAIN_RANGE",
    F_MAP_UNMAP: "MAP_UNMAP",
    F_BYPASS: "BYPASS",
    F_PROBE: "PROBE",
    F_MMIO: "MMIO",
    F_BYPASS_CONFIG: "BYPASS_CONFIG",
    F_VERSION_1: "VERSION_1",
}


class RequestType(IntEnum):
    ATTACH = abi.T_ATTACH
    DETACH = abi.T_DETACH
    MAP = abi.T_MAP
    UNMAP = abi.T_UNMAP
    PROBE = abi.T_PROBE


class Status(IntEnum):
    OK = abi.S_OK
    IOERR = abi.S_IOERR
    UNSUPP = abi.S_UNSUPP
    DEVERR = abi.S_DEVERR
    INVAL = abi.S_INVAL
    RANGE = abi.S_RANGE
    NOENT = abi.S_NOENT
    FAULT = abi.S_FAULT
    NOMEM = abi.S_NOMEM


class ResvMemType(IntEnum):
    RESERVED = abi.RESV_MEM_T_RESERVED
    MSI = abi.RESV_MEM_T_MSI


class FaultReason(IntEnum):
    UNKNOWN = abi.FAULT_R_UNKNOWN
    DOMAIN = abi.FAULT_R_DOMAIN
    MAPPING = abi.FAULT_R_MAPPING


class Access(IntFlag):
    """The kind of a DMA access given to `IommuDevice.translate` (same bits as the fault flags)."""

    READ = FAULT_F_READ
    WRITE = FAULT_F_WRITE
    EXEC = FAULT_F_EXEC


# -- packed layouts ----------------------------------------------------------------------------------------

HEAD = struct.Struct("<B3s")  # virtio_iommu_req_head: type, reserved[3]
TAIL = struct.Struct("<B3s")  # virtio_iommu_req_tail: status, reserved[3]
ATTACH = struct.Struct("<B3sIII4s")  # head, domain, endpoint, flags, reserved[4]
DETACH = struct.Struct("<B3sII8s")  # head, domain, endpoint, reserved[8]
MAP = struct.Struct("<B3sIQQQI")  # head, domain, virt_start, virt_end, phys_start, flags
UNMAP = struct.Struct("<B3sIQQ4s")  # head, domain, virt_start, virt_end, reserved[4]
PROBE = struct.Struct("<B3sI64s")  # head, endpoint, reserved[64]
CONFIG = struct.Struct("<QQQIIIB3s")  # page_size_mask, input_range, domain_range, probe_size, bypass, pad
PROPERTY_HEAD = struct.Struct("<HH")  # virtio_iommu_probe_property: type (12 bits) + reserved (4), length
RESV_MEM = struct.Struct("<HHB3sQQ")  # property head, subtype, reserved[3], start, end
FAULT = struct.Struct("<B3sIIIQ")  # reason, reserved[3], flags, endpoint, reserved1, address

# The device-readable size of each request: the whole struct without its tail.
READABLE_SIZE: dict[int, int] = {
    RequestType.ATTACH: ATTACH_SIZE,
    RequestType.DETACH: DETACH_SIZE,
    RequestType.MAP: MAP_SIZE,
    RequestType.UNMAP: UNMAP_SIZE,
    RequestType.PROBE: PROBE_SIZE,
}


# -- request builders (driver side) ------------------------------------------------------------------------


def writable_size(request_type: int, probe_size: int = 0) -> int:
    """The writable size a well-behaved driver gives a request: the tail, and for PROBE the properties too."""
    return probe_size + TAIL_SIZE if request_type == RequestType.PROBE else TAIL_SIZE


#: Each request's device-readable layout, whose sizes are READABLE_SIZE's (for tools that take requests
#: apart field by field: the requests fuzz target).
REQUEST_LAYOUT: dict[int, struct.Struct] = {
    RequestType.ATTACH: ATTACH,
    RequestType.DETACH: DETACH,
    RequestType.MAP: MAP,
    RequestType.UNMAP: UNMAP,
    RequestType.PROBE: PROBE,
}
assert {kind: layout.size for kind, layout in REQUEST_LAYOUT.items()} == READABLE_SIZE


def encode_attach(
    domain: int, endpoint: int, flags: int = 0, *, reserved: bytes = bytes(4), head_reserved: bytes = bytes(3)
) -> bytes:
    return ATTACH.pack(RequestType.ATTACH, head_reserved, domain, endpoint, flags, reserved)


def encode_detach(
    domain: int, endpoint: int, *, reserved: bytes = bytes(8), head_reserved: bytes = bytes(3)
) -> bytes:
    return DETACH.pack(RequestType.DETACH, head_reserved, domain, endpoint, reserved)


def encode_map(
    domain: int,
    virt_start: int,
    virt_end: int,
    phys_start: int,
    flags: int = MAP_F_READ | MAP_F_WRITE,
    *,
    head_reserved: bytes = bytes(3),
) -> bytes:
    return MAP.pack(RequestType.MAP, head_reserved, domain, virt_start, virt_end, phys_start, flags)


def encode_unmap(
    domain: int,
    virt_start: int,
    virt_end: int,
    *,
    reserved: bytes = bytes(4),
    head_reserved: bytes = bytes(3),
) -> bytes:
    return UNMAP.pack(RequestType.UNMAP, head_reserved, domain, virt_start, virt_end, reserved)


def encode_probe(endpoint: int, *, reserved: bytes = bytes(64), head_reserved: bytes = bytes(3)) -> bytes:
    return PROBE.pack(RequestType.PROBE, head_reserved, endpoint, reserved)


def encode_tail(status: int) -> bytes:
    return TAIL.pack(status, bytes(3))


def decode_status(response: bytes) -> int:
    """The status of a completed request: the tail is the last four bytes of the writable part."""
    if len(response) < TAIL_SIZE:
        raise ValueError(f"a response of {len(response)} bytes has no tail")
    return response[-TAIL_SIZE]


# -- PROBE properties --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ResvMemProperty:
    subtype: int
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class UnknownProperty:
    type: int
    value: bytes


def encode_resv_mem(subtype: int, start: int, end: int) -> bytes:
    return RESV_MEM.pack(PROBE_T_RESV_MEM, RESV_MEM_SIZE - PROPERTY_HEAD.size, subtype, bytes(3), start, end)


def decode_properties(properties: bytes) -> list[ResvMemProperty | UnknownProperty]:
    """Walk a PROBE properties buffer the way the spec tells a driver to (stop at type 0 or the end)."""
    found: list[ResvMemProperty | UnknownProperty] = []
    offset = 0
    while offset + PROPERTY_HEAD.size <= len(properties):
        raw_type, length = PROPERTY_HEAD.unpack_from(properties, offset)
        prop_type = raw_type & PROBE_T_MASK
        if prop_type == PROBE_T_NONE:
            break
        end = offset + PROPERTY_HEAD.size + length
        if end > len(properties):
            raise ValueError(f"property at offset {offset} runs past the end of the buffer")
        if prop_type == PROBE_T_RESV_MEM and length >= RESV_MEM_SIZE - PROPERTY_HEAD.size:
            _, _, subtype, _, start, last = RESV_MEM.unpack_from(properties, offset)
            found.append(ResvMemProperty(subtype, start, last))
        else:
            found.append(UnknownProperty(prop_type, bytes(properties[offset + PROPERTY_HEAD.size : end])))
        offset = end
    return found


# -- fault events ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FaultEvent:
    reason: int
    flags: int
    endpoint: int
    address: int
    reserved: bytes = bytes(3)
    reserved1: int = 0


def encode_fault(reason: int, flags: int, endpoint: int, address: int) -> bytes:
    return FAULT.pack(reason, bytes(3), flags, endpoint, 0, address)


def decode_fault(event: bytes) -> FaultEvent:
    reason, reserved, flags, endpoint, reserved1, address = FAULT.unpack_from(event)
    return FaultEvent(reason, flags, endpoint, address, reserved, reserved1)


# -- config space ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConfigFields:
    page_size_mask: int
    input_start: int
    input_end: int
    domain_start: int
    domain_end: int
    probe_size: int
    bypass: int
    reserved: bytes = bytes(3)


def decode_config(config: bytes) -> ConfigFields:
    mask, in_start, in_end, dom_start, dom_end, probe_size, bypass, reserved = CONFIG.unpack(config)
    return ConfigFields(mask, in_start, in_end, dom_start, dom_end, probe_size, bypass, reserved)


def feature_names(features: int) -> list[str]:
    """Readable names of the feature bits set in ``features`` (unknown bits as ``bit N``)."""
    names = []
    for bit in range(64):
        if features & (1 << bit):
            names.append(FEATURE_NAMES.get(1 << bit, f"bit {bit}"))
    return names

"""The device's MAP and UNMAP rules, written once for both request paths.

Each rule function is a plain Python function registered with numba (``register_jitable``): the
compiled request path (``vhost_iommu.jit.requests``) compiles it into its kernel, the device core
(``vhost_iommu.device.core.IommuDevice``) calls it as the Python it is (a call from Python into compiled
code would cost more than the checks, and numba types a Python int above 2**63 on a slow path). So every
function here must mean the same with Python's unbounded ints and with numba's u64 addresses: addresses
are subtracted only where the result cannot wrap, and the end of a range is masked rather than
incremented. The kernels that compile them key their cache on this file (``jit/caching.py``).

:data:`RULES` names every rule, with the spec's words and the status it gives, in the order the checks run
(a request that breaks several gets the status of the first); tests/test_conformance.py gives each one a
request that breaks it alone and checks both paths answer it alike, tests/test_device_rules.py runs each
function compiled and as Python on the same inputs around every boundary. The first rule of each request,
its size, is checked by each path's framing (``IommuDevice._serve``, ``serve_requests``: they frame every
request type, and a chain whose tail cannot be found gets no status at all); the others by the functions
below.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from numba.extending import register_jitable

from vhost_iommu.abi import (
    MAP_F_MMIO,
    MAP_F_READ,
    MAP_F_WRITE,
    S_DEVERR,
    S_INVAL,
    S_IOERR,
    S_NOENT,
    S_NOMEM,
    S_OK,
    S_RANGE,
    S_UNSUPP,
    U64_MAX,
)
from vhost_iommu.jit.tables import LIMIT, OK, OVERLAP, SPLIT

U64Array = npt.NDArray[np.uint64]
I64Array = npt.NDArray[np.int64]
I32Array = npt.NDArray[np.int32]
BoolArray = npt.NDArray[np.bool_]
Int = int | np.integer[Any]
"""A Python int in the device core, a numpy integer in the compiled path."""

_SECTION = "IOMMU Device / Device operations"


@dataclass(frozen=True, slots=True)
class Rule:
    """One rule a MAP or UNMAP is checked against: where the spec says it, its words, the status."""

    request: str
    section: str
    text: str
    status: int


#: Every MAP and UNMAP rule, by a stable name, in the order they are checked.
RULES: dict[str, Rule] = {
    "map-size": Rule(
        "MAP",
        _SECTION,
        "All requests are split in two parts: one device-readable, one device-writable. [A readable part "
        "that is not struct virtio_iommu_req_map's, while the tail is found: VIRTIO_IOMMU_S_IOERR, "
        "Virtio communication error.]",
        S_IOERR,
    ),
    "map-unnegotiated": Rule(
        "MAP",
        f"{_SECTION} / MAP request",
        "This request is only available when VIRTIO_IOMMU_F_MAP_UNMAP has been negotiated.",
        S_UNSUPP,
    ),
    "map-flags-unknown": Rule(
        "MAP",
        f"{_SECTION} / MAP request",
        "If the device doesn't recognize a flags bit, it MUST reject the request and set status to "
        "VIRTIO_IOMMU_S_INVAL. [VIRTIO_IOMMU_MAP_F_MMIO] is only available when the VIRTIO_IOMMU_F_MMIO "
        "feature has been negotiated.",
        S_INVAL,
    ),
    "map-domain-range": Rule(
        "MAP",
        _SECTION,
        "If the VIRTIO_IOMMU_F_DOMAIN_RANGE feature is offered, domain_range describes the values "
        "supported in a domain field. [Out-of-range parameters: VIRTIO_IOMMU_S_RANGE.]",
        S_RANGE,
    ),
    "map-domain-missing": Rule(
        "MAP",
        f"{_SECTION} / MAP request",
        "If domain does not exist, the device SHOULD reject the request and set status to "
        "VIRTIO_IOMMU_S_NOENT.",
        S_NOENT,
    ),
    "map-bypass-domain": Rule(
        "MAP",
        f"{_SECTION} / MAP request",
        "If the domain is a bypass domain, the device SHOULD reject the request and set status to "
        "VIRTIO_IOMMU_S_INVAL.",
        S_INVAL,
    ),
    "map-end-before-start": Rule(
        "MAP",
        f"{_SECTION} / MAP request",
        "virt_end MUST be strictly greater than virt_start. [A range that ends before it starts is an "
        "invalid parameter: VIRTIO_IOMMU_S_INVAL.]",
        S_INVAL,
    ),
    "map-granule": Rule(
        "MAP",
        f"{_SECTION} / MAP request",
        "If virt_start, phys_start or (virt_end + 1) is not aligned on the page granularity, the device "
        "SHOULD reject the request and set status to VIRTIO_IOMMU_S_RANGE.",
        S_RANGE,
    ),
    "map-input-range": Rule(
        "MAP",
        _SECTION,
        "If the VIRTIO_IOMMU_F_INPUT_RANGE feature is offered, input_range contains the virtual address "
        "range that the IOMMU is able to translate. Any mapping request to virtual addresses outside of "
        "this range fails. [VIRTIO_IOMMU_S_RANGE]",
        S_RANGE,
    ),
    "map-phys-wraps": Rule(
        "MAP",
        f"{_SECTION} / MAP request",
        "Given phys_end = phys_start + virt_end - virt_start, the range defined by phys_start and "
        "phys_end should be within the guest-physical address space. [It cannot pass 2^64 - 1.]",
        S_RANGE,
    ),
    "map-reserved-region": Rule(
        "MAP",
        f"{_SECTION} / PROBE properties / RESVMEM",
        "The device SHOULD reject a MAP request that overlaps a RESV_MEM region. [Of any endpoint attached "
        "to the domain: VIRTIO_IOMMU_S_RANGE.]",
        S_RANGE,
    ),
    "map-overlap": Rule(
        "MAP",
        f"{_SECTION} / MAP request",
        "If a mapping already exists in the requested range, the device SHOULD reject the request and set "
        "status to VIRTIO_IOMMU_S_INVAL.",
        S_INVAL,
    ),
    "map-table-full": Rule(
        "MAP",
        _SECTION,
        "VIRTIO_IOMMU_S_NOMEM: Insufficient resources. [The mapping table holds max_mappings.]",
        S_NOMEM,
    ),
    "unmap-size": Rule(
        "UNMAP",
        _SECTION,
        "All requests are split in two parts: one device-readable, one device-writable. [A readable part "
        "that is not struct virtio_iommu_req_unmap's, while the tail is found: VIRTIO_IOMMU_S_IOERR, "
        "Virtio communication error.]",
        S_IOERR,
    ),
    "unmap-unnegotiated": Rule(
        "UNMAP",
        f"{_SECTION} / UNMAP request",
        "This request is only available when VIRTIO_IOMMU_F_MAP_UNMAP has been negotiated.",
        S_UNSUPP,
    ),
    "unmap-reserved": Rule(
        "UNMAP",
        f"{_SECTION} / UNMAP request",
        "If the reserved field of an UNMAP request is not zero, the device MAY set the request status to "
        "VIRTIO_IOMMU_S_INVAL, in which case the device MAY perform the UNMAP operation. [It does not: a "
        "refused request changes nothing.]",
        S_INVAL,
    ),
    "unmap-domain-range": Rule(
        "UNMAP",
        _SECTION,
        "If the VIRTIO_IOMMU_F_DOMAIN_RANGE feature is offered, domain_range describes the values "
        "supported in a domain field. [Out-of-range parameters: VIRTIO_IOMMU_S_RANGE.]",
        S_RANGE,
    ),
    "unmap-domain-missing": Rule(
        "UNMAP",
        f"{_SECTION} / UNMAP request",
        "If domain does not exist, the device SHOULD set the request status to VIRTIO_IOMMU_S_NOENT.",
        S_NOENT,
    ),
    "unmap-bypass-domain": Rule(
        "UNMAP",
        f"{_SECTION} / UNMAP request",
        "If the domain is a bypass domain, the device SHOULD reject the request and set status to "
        "VIRTIO_IOMMU_S_INVAL.",
        S_INVAL,
    ),
    "unmap-end-before-start": Rule(
        "UNMAP",
        f"{_SECTION} / UNMAP request",
        "All mappings covered by the range [virt_start; virt_end] (inclusive) are removed. [A range that "
        "ends before it starts is an invalid parameter: VIRTIO_IOMMU_S_INVAL.]",
        S_INVAL,
    ),
    "unmap-split": Rule(
        "UNMAP",
        f"{_SECTION} / UNMAP request",
        "If a mapping affected by the range is not covered in its entirety by the range (the UNMAP request "
        "would split the mapping), then the device SHOULD set the request status to VIRTIO_IOMMU_S_RANGE, "
        "and SHOULD NOT remove any mapping.",
        S_RANGE,
    ),
}


@register_jitable
def domain_status(index: Int, exists: BoolArray, bypass: BoolArray) -> int:
    """The rules on a MAP's or UNMAP's domain (``index``: domain - domain_range.start, in the arrays of
    ``vhost_iommu.device.domains.Domains``): map-domain-range, map-domain-missing, map-bypass-domain."""
    if not 0 <= index < exists.shape[0]:
        return S_RANGE
    if not exists[index]:
        return S_NOENT
    if bypass[index]:
        return S_INVAL
    return S_OK


@register_jitable
def reserved_overlap(
    set_id: Int, start: Int, last: Int, starts: U64Array, ends: U64Array, offsets: I64Array
) -> bool:
    """Does [start, last] touch an interval of the `RegionSets` set ``set_id`` (its flat arrays)?"""
    for k in range(offsets[set_id], offsets[set_id + 1]):  # noqa: SIM110 (numba compiles loops, not any())
        if starts[k] <= last and start <= ends[k]:
            return True
    return False


@register_jitable
def map_status(
    map_unmap: bool | np.bool_,
    mmio: bool | np.bool_,
    index: Int,
    exists: BoolArray,
    bypass: BoolArray,
    resv_set: I32Array,
    resv_starts: U64Array,
    resv_ends: U64Array,
    resv_offsets: I64Array,
    virt_start: Int,
    virt_end: Int,
    phys_start: Int,
    flags: Int,
    granule: Int,
    input_start: Int,
    input_end: Int,
) -> int:
    """A MAP by every rule checked before the mapping table is asked: its status, S_OK to go on.

    ``map_unmap``, ``mmio``: whether those features were negotiated; ``index``: domain -
    domain_range.start; then the domain arrays of ``Domains`` and the flat arrays of its `RegionSets`;
    the request's fields; the device's granule and input range."""
    if not map_unmap:
        return S_UNSUPP
    known = MAP_F_READ | MAP_F_WRITE
    if mmio:
        known |= MAP_F_MMIO
    if flags & ~known:
        return S_INVAL
    status = domain_status(index, exists, bypass)
    if status != S_OK:
        return status
    if virt_end < virt_start:
        return S_INVAL
    mask = granule - 1
    if virt_start & mask or phys_start & mask or (virt_end & mask) != mask:
        return S_RANGE
    if virt_start < input_start or virt_end > input_end:
        return S_RANGE
    if phys_start > U64_MAX - (virt_end - virt_start):
        return S_RANGE
    if reserved_overlap(resv_set[index], virt_start, virt_end, resv_starts, resv_ends, resv_offsets):
        return S_RANGE
    return S_OK


@register_jitable
def mapped_status(table_status: Int) -> int:
    """The status of a MAP the table was asked to apply, from the table's answer (``tables.OK``...)."""
    if table_status == OK:
        return S_OK
    if table_status == OVERLAP:
        return S_INVAL
    if table_status == LIMIT:
        return S_NOMEM
    return S_DEVERR


@register_jitable
def unmap_status(
    map_unmap: bool | np.bool_,
    reserved: Int,
    index: Int,
    exists: BoolArray,
    bypass: BoolArray,
    virt_start: Int,
    virt_end: Int,
) -> int:
    """An UNMAP by every rule checked before the mapping table is asked: its status, S_OK to go on.

    ``reserved``: the request's reserved field as an int; the rest as for `map_status`."""
    if not map_unmap:
        return S_UNSUPP
    if reserved != 0:
        return S_INVAL
    status = domain_status(index, exists, bypass)
    if status != S_OK:
        return status
    if virt_end < virt_start:
        return S_INVAL
    return S_OK


@register_jitable
def unmapped_status(table_status: Int) -> int:
    """The status of an UNMAP the table was asked to apply, from the table's answer."""
    if table_status == OK:
        return S_OK
    if table_status == SPLIT:
        return S_RANGE
    return S_DEVERR

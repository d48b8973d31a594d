"""DMA translation through the device's state, and the faults it produces.

The rules below are written once, in ``vhost_iommu.jit.dma`` (compiled into the DMA kernels, called from
here as Python); this module walks an access with them over any `MappingStore`.

Order of decisions for one access by an endpoint (documented behaviour; see the spec's bypass rules):

1. An endpoint in bypass mode (unattached while config ``bypass`` is 1, or attached to a bypass domain)
   is translated by the identity function, whole access, reserved regions included: "All accesses from an
   endpoint in bypass mode are allowed and translated by the IOMMU using the identity function."
2. Otherwise each byte is looked at in address order:
   - inside one of the endpoint's MSI regions: identity (the doorbell is reached untranslated, attached or
     not, the way x86 delivers MSIs outside DMA remapping);
   - endpoint not attached: fault DOMAIN;
   - inside one of the endpoint's RESERVED regions: fault MAPPING;
   - inside a mapping of the domain whose flags allow the access (a write needs MAP_F_WRITE; a read or an
     instruction fetch needs MAP_F_READ): translated; else fault MAPPING.
3. An access spanning several adjacent mappings (or a mapping and an MSI region) is allowed when every
   byte is; the result lists one (guest-physical, length) segment per physically-contiguous run, the way a
   real IOMMU translates a burst crossing page boundaries piece by piece. A fault reports the first byte
   that cannot be translated.

A fault on an endpoint this IOMMU manages becomes a 24-byte virtio_iommu_fault for the eventq, with the
access kind (READ/WRITE/EXEC) and ADDRESS set. An endpoint the IOMMU does not manage is not reported (the
spec asks for a valid endpoint ID in every report): the Fault comes back with ``reported=False``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from vhost_iommu.device.domains import Domains
from vhost_iommu.device.layout import U64_MAX, Access, FaultReason, encode_fault
from vhost_iommu.jit import dma

if TYPE_CHECKING:
    from vhost_iommu.device.history import FaultExplanation


@dataclass(frozen=True, slots=True)
class Translation:
    """A successful translation of ``size`` bytes at ``iova``."""

    iova: int
    size: int
    segments: tuple[tuple[int, int], ...]  # (guest-physical address, length), in access order
    bypass: bool  # translated by the identity function because the endpoint is in bypass mode

    @property
    def phys(self) -> int:
        """Guest-physical address of the first byte."""
        return self.segments[0][0]

    @property
    def contiguous(self) -> bool:
        return len(self.segments) == 1


@dataclass(frozen=True, slots=True)
class Fault:
    reason: FaultReason
    flags: int  # FAULT_F_* bits as they appear in the event
    endpoint: int
    address: int
    reported: bool  # queued for the eventq (False: unmanaged endpoint, reporting off, or queue full)
    explanation: FaultExplanation | None = None  # from the mapping history, when a tool or a DmaPort asked

    def encode(self) -> bytes:
        return encode_fault(self.reason, self.flags, self.endpoint, self.address)


# A plain int: the complement of an IntFlag stays within the flag's own bits.
ACCESS_MASK = int(Access.READ | Access.WRITE | Access.EXEC)


def check_access(iova: int, size: int, access: int) -> int:
    """Validate the caller's arguments; returns the last byte's address."""
    access = int(access)  # plain int arithmetic: an IntFlag's operators are slow, and this is per access
    if size <= 0:
        raise ValueError(f"access size {size} must be positive")
    if not 0 <= iova <= U64_MAX or iova + size - 1 > U64_MAX:
        raise ValueError(f"access of {size} bytes at {iova:#x} is not within the 64-bit address space")
    if access == 0 or access & ~ACCESS_MASK:
        raise ValueError(f"access {access:#x} must be a non-empty combination of READ, WRITE and EXEC")
    return iova + size - 1


def append_segment(segments: list[tuple[int, int]], phys: int, length: int) -> None:
    if segments and segments[-1][0] + segments[-1][1] == phys:
        segments[-1] = (segments[-1][0], segments[-1][1] + length)
    else:
        segments.append((phys, length))


def translate(
    domains: Domains, global_bypass: bool, endpoint: int, iova: int, size: int, access: int
) -> Translation | Fault:
    """Translate one access; a Fault comes back unreported (the device decides about the eventq).

    The rules are ``vhost_iommu.jit.dma``'s, which the compiled DMA path runs too; this walk works with
    any `MappingStore`."""
    last = check_access(iova, size, access)
    flags = dma.fault_flags(int(access))
    slot = domains.slot(endpoint)
    if slot is None:
        return Fault(FaultReason.UNKNOWN, flags, endpoint, iova, reported=False)
    domain = int(domains.endpoint_domain[slot])
    if dma.endpoint_in_bypass(domain, global_bypass, domains.bypass, domains.first):
        return Translation(iova, size, ((iova, size),), bypass=True)

    attached = domain != dma.NO_DOMAIN
    begin, end = int(domains.region_offsets[slot]), int(domains.region_offsets[slot + 1])
    arrays = domains.region_starts, domains.region_ends, domains.region_kinds
    store = domains.store
    segments: list[tuple[int, int]] = []
    cursor = iova
    while True:
        decision, limit = dma.region_decision(*arrays, begin, end, attached, cursor)
        if decision == dma.DECIDE_IDENTITY:
            run_last = min(int(limit), last)
            append_segment(segments, cursor, run_last - cursor + 1)
        elif decision != dma.DECIDE_LOOKUP:
            return Fault(FaultReason(decision), flags, endpoint, cursor, reported=False)
        else:
            hit = store.translate(domain, cursor)
            if hit is None or not dma.allowed_by(hit.flags, access):
                return Fault(FaultReason.MAPPING, flags, endpoint, cursor, reported=False)
            run_last = min(hit.map_last, last, int(limit))
            append_segment(segments, hit.phys, run_last - cursor + 1)
        if run_last >= last:
            return Translation(iova, size, tuple(segments), bypass=False)
        cursor = run_last + 1

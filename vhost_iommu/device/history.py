"""A device's mapping history and the fault explanations read from it.

`MappingHistory` owns the bounded ring of ``jit/history.py``: every MAP and UNMAP applied (by the compiled
request path or the device core), every ATTACH that moves an endpoint, every DETACH and device reset,
with the cycle counter at the change. Nothing reads it on the request path; `explain` reads it when a
fault is explained, and says in words a driver developer can act on what happened to the faulting
address:

- ``permission``: the address is mapped, without the permission the access needs (a write through a
  read-only mapping), by the MAP named;
- ``use-after-unmap``: it was mapped (by the MAP named, if still in the history) and an UNMAP removed it,
  so long before the access;
- ``use-after-detach``: the endpoint was detached (or its domain went with its last endpoint) while the
  address was mapped there;
- ``moved``: an ATTACH moved the endpoint out of the domain where the address was mapped;
- ``after-reset``: a device reset dropped the mapping;
- ``never-mapped``: no MAP of the domain covered it, as far as the history goes back (``complete``: the
  history holds every change since the device started, so "never" is exact);
- ``unattached``: the endpoint is not attached (and was never, or was detached with the address
  unmapped);
- ``reserved``: the address is in one of the endpoint's reserved regions;
- ``unknown-endpoint``: the IOMMU does not manage the endpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from vhost_iommu.device.layout import FAULT_F_WRITE, FaultReason
from vhost_iommu.jit import history as layout
from vhost_iommu.jit.interpreted import kernel
from vhost_iommu.jit.requests import cycles, history_append, ticks_per_us

if TYPE_CHECKING:
    from vhost_iommu.device.core import IommuDevice
    from vhost_iommu.device.translation import Fault

_U64 = np.uint64
_MASK = 0xFFFF_FFFF_FFFF_FFFF  # int64 words read back as the u64 they hold


@dataclass(frozen=True, slots=True)
class HistoryRecord:
    """One change of the tables (``jit/history.py``'s words, decoded)."""

    sequence: int
    op: int
    domain: int
    start: int
    last: int
    value: int
    extra: int
    ticks: int

    @property
    def name(self) -> str:
        return layout.OP_NAMES.get(self.op, f"op {self.op}")

    def covers(self, address: int) -> bool:
        return self.start <= address <= self.last

    def to_json(self, before_ticks: int | None = None) -> dict[str, Any]:
        """The record for a tool; ``before_ticks``: the instant it is said to precede (``ns_before``)."""
        row: dict[str, Any] = {"seq": self.sequence, "op": self.name, "domain": self.domain}
        if self.op == layout.OP_MAP:
            row.update(start=self.start, last=self.last, phys=self.value, flags=self.extra)
        elif self.op == layout.OP_UNMAP:
            row.update(start=self.start, last=self.last, removed=self.value)
        elif self.op == layout.OP_ATTACH:
            row.update(endpoint=self.value, previous_domain=None if self.extra < 0 else self.extra)
        elif self.op == layout.OP_DETACH:
            row.update(endpoint=self.value, domain_removed=bool(self.extra))
        if before_ticks is not None:
            row["ns_before"] = ticks_to_ns(before_ticks - self.ticks)
        return row

    def describe(self, before_ticks: int) -> str:
        """ "UNMAP #12 [0x1000, 0x1fff] of domain 3, 2.5 ms before"."""
        if self.op == layout.OP_MAP:
            what = (
                f"[{self.start:#x}, {self.last:#x}] -> {self.value:#x} {flag_names(self.extra)} in domain "
                f"{self.domain}"
            )
        elif self.op == layout.OP_UNMAP:
            what = f"[{self.start:#x}, {self.last:#x}] of domain {self.domain}"
        elif self.op in (layout.OP_ATTACH, layout.OP_DETACH):
            direction = "to" if self.op == layout.OP_ATTACH else "from"
            what = f"of endpoint {self.value:#x} {direction} domain {self.domain}"
        else:
            what = "of the device"
        return (
            f"{self.name} #{self.sequence} {what}, {_duration(ticks_to_ns(before_ticks - self.ticks))} before"
        )


def ticks_to_ns(ticks: int) -> int:
    return round(max(ticks, 0) * 1000 / ticks_per_us())


def flag_names(flags: int) -> str:
    names = "".join(letter for bit, letter in ((1, "R"), (2, "W"), (4, "MMIO")) if flags & bit)
    return names or "no access"


def _duration(ns: int) -> str:
    if ns < 1000:
        return f"{ns} ns"
    if ns < 1_000_000:
        return f"{ns / 1000:.1f} us"
    if ns < 10_000_000_000:
        return f"{ns / 1_000_000:.1f} ms"
    return f"{ns / 1_000_000_000:.1f} s"


class MappingHistory:
    """The ring of one device (allocated once: its address is handed to the compiled request path)."""

    def __init__(self, capacity: int = layout.DEFAULT_CAPACITY) -> None:
        if capacity < 1 or capacity & (capacity - 1):
            raise ValueError(f"history capacity {capacity} is not a power of two")
        self.words: npt.NDArray[np.int64] = np.zeros(
            layout.HEADER_WORDS + capacity * layout.RECORD_WORDS, np.int64
        )
        self.words[layout.H_CAPACITY] = capacity
        #: Host address of the ring (``R_HISTORY``).
        self.address = int(self.words.ctypes.data)

    @property
    def capacity(self) -> int:
        return int(self.words[layout.H_CAPACITY])

    @property
    def appended(self) -> int:
        """Records appended since the device started."""
        return int(self.words[layout.H_NEXT])

    def append(
        self, op: int, domain: int = 0, start: int = 0, last: int = 0, value: int = 0, extra: int = 0
    ) -> None:
        """Append a record from Python (the compiled path appends its own); ``extra`` may be -1."""
        kernel(history_append)(
            _U64(self.address),
            _U64(op),
            _U64(domain),
            _U64(start),
            _U64(last),
            _U64(value),
            _U64(extra & _MASK),
            kernel(cycles)(),
        )

    def records(self, endpoint: int | None = None, address: int | None = None) -> list[HistoryRecord]:
        """The complete records the ring holds, oldest first (a consistent view while a writer appends).
        With ``endpoint`` and ``address``: only those that can explain a fault of that access (MAP and
        UNMAP covering the address, ATTACH and DETACH of the endpoint, DETACH that removed a domain,
        reset), selected with numpy: a full ring is not walked in Python."""
        end = int(self.words[layout.H_NEXT])
        copy = self.words.copy()
        capacity = int(copy[layout.H_CAPACITY])
        after = int(self.words[layout.H_NEXT])  # records appended during the copy overwrote the oldest
        first = max(0, end - capacity, after - capacity)
        if first >= end:
            return []
        sequences = np.arange(first, end, dtype=np.int64)
        rows = copy[layout.HEADER_WORDS :].reshape(capacity, layout.RECORD_WORDS)[sequences % capacity]
        keep = rows[:, layout.W_COMMIT] == sequences + 1  # not being written when copied
        if endpoint is not None and address is not None:
            op, words = rows[:, layout.W_OP], rows.view(np.uint64)
            ranged = (op == layout.OP_MAP) | (op == layout.OP_UNMAP)
            covers = (words[:, layout.W_START] <= _U64(address)) & (_U64(address) <= words[:, layout.W_LAST])
            theirs = ((op == layout.OP_ATTACH) | (op == layout.OP_DETACH)) & (
                rows[:, layout.W_VALUE] == endpoint
            )
            removed_domain = (op == layout.OP_DETACH) & (rows[:, layout.W_EXTRA] != 0)
            keep &= (ranged & covers) | theirs | removed_domain | (op == layout.OP_RESET)
        found = []
        for sequence, row in zip(sequences[keep].tolist(), rows[keep].tolist(), strict=True):
            found.append(
                HistoryRecord(
                    sequence,
                    row[layout.W_OP],
                    row[layout.W_DOMAIN],
                    row[layout.W_START] & _MASK,
                    row[layout.W_LAST] & _MASK,
                    row[layout.W_VALUE] & _MASK,
                    row[layout.W_EXTRA],
                    row[layout.W_TICKS] & _MASK,
                )
            )
        return found


@dataclass(frozen=True, slots=True)
class FaultExplanation:
    """Why an access faulted, from the device's state and its mapping history at the fault."""

    verdict: str
    text: str
    domain: int | None  # the endpoint's domain at the fault
    mapped_by: HistoryRecord | None
    removed_by: HistoryRecord | None  # the UNMAP, DETACH, ATTACH or RESET that took the mapping away
    at_ticks: int  # the access, on the history's clock
    records: int  # records the history held
    complete: bool  # the history goes back to the device's start

    @property
    def removed_ns_before(self) -> int | None:
        return None if self.removed_by is None else ticks_to_ns(self.at_ticks - self.removed_by.ticks)

    def to_json(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "text": self.text,
            "domain": self.domain,
            "mapped_by": None if self.mapped_by is None else self.mapped_by.to_json(self.at_ticks),
            "removed_by": None if self.removed_by is None else self.removed_by.to_json(self.at_ticks),
            "removed_ns_before": self.removed_ns_before,
            "history": {"records": self.records, "complete": self.complete},
        }


def _mapping_fate(
    records: list[HistoryRecord], domain: int, address: int, upto: int | None = None
) -> tuple[HistoryRecord | None, HistoryRecord | None]:
    """(the last MAP of ``domain`` covering ``address``, what removed it since or None) over the records
    before sequence ``upto``. A removal without its MAP in the history comes back with None first."""
    mapped: HistoryRecord | None = None
    removed: HistoryRecord | None = None
    for record in records:
        if upto is not None and record.sequence >= upto:
            break
        op = record.op
        if op == layout.OP_MAP and record.domain == domain and record.covers(address):
            mapped, removed = record, None
        elif removed is not None:
            continue
        elif op == layout.OP_UNMAP and record.domain == domain and record.covers(address) and record.value:
            removed = record
        elif op == layout.OP_DETACH and record.domain == domain and record.extra and mapped is not None:
            removed = record  # the domain, with its mappings, went with its last endpoint
        elif op == layout.OP_RESET and mapped is not None:
            removed = record
    return mapped, removed


def explain(device: IommuDevice, fault: Fault, at_ticks: int | None = None) -> FaultExplanation:
    """Explain ``fault`` (of an access just made, or made at ``at_ticks`` on the history's clock) from
    ``device``'s current state and history. Call it on the thread that drives the device, or while the
    requestq thread is parked; a concurrent writer only makes the newest record missing."""
    now = int(kernel(cycles)()) if at_ticks is None else at_ticks
    endpoint, address = fault.endpoint, fault.address
    records = device.history.records(endpoint, address)
    complete = device.history.appended <= device.history.capacity
    held = min(device.history.appended, device.history.capacity)
    with device.translation_guard.reading():  # the tables as they are, not in the middle of a change
        managed = device.topology.has_endpoint(endpoint)
        domain = device.domain_of(endpoint) if managed else None
        reserved = device.reserved_regions(endpoint) if managed else ()
        hit = device.store.translate(domain, address) if domain is not None else None
    access = "WRITE" if fault.flags & FAULT_F_WRITE else "READ"

    def result(
        verdict: str, text: str, mapped: HistoryRecord | None = None, removed: HistoryRecord | None = None
    ) -> FaultExplanation:
        return FaultExplanation(verdict, text, domain, mapped, removed, now, held, complete)

    def made(mapped: HistoryRecord | None) -> str:
        return (
            f"mapped by {mapped.describe(now)}" if mapped is not None else "mapped before the history begins"
        )

    subject = f"{access} of {address:#x} by endpoint {endpoint:#x}"
    if fault.reason == FaultReason.UNKNOWN or not managed:
        return result("unknown-endpoint", f"{subject}: this IOMMU does not manage the endpoint")
    if domain is None:
        detach = next(
            (r for r in reversed(records) if r.op == layout.OP_DETACH and r.value == endpoint),
            None,
        )
        if detach is None:
            return result(
                "unattached",
                f"{subject}: the endpoint is not attached to any domain"
                + ("" if complete else " (no DETACH of it in the history)"),
            )
        mapped, removed = _mapping_fate(records, detach.domain, address, upto=detach.sequence)
        if mapped is not None and removed is None:
            return result(
                "use-after-detach",
                f"{subject}: use after detach: the endpoint was detached by {detach.describe(now)}, "
                f"while the address was {made(mapped)}",
                mapped,
                detach,
            )
        return result(
            "unattached", f"{subject}: the endpoint was detached by {detach.describe(now)}", mapped, detach
        )
    for region in reserved:
        if region.start <= address <= region.end and region.kind.name == "RESERVED":
            return result(
                "reserved",
                f"{subject}: the address is in the endpoint's reserved region "
                f"[{region.start:#x}, {region.end:#x}]",
            )
    if hit is not None:
        mapped, _removed = _mapping_fate(records, domain, address)
        return result(
            "permission",
            f"{subject}: the mapping [{hit.map_start:#x}, {hit.map_last:#x}] -> "
            f"{hit.phys - (address - hit.map_start):#x} allows "
            f"{flag_names(hit.flags)} only; {made(mapped)}",
            mapped,
        )
    mapped, removed = _mapping_fate(records, domain, address)
    if removed is not None:
        verdict, words = {
            layout.OP_UNMAP: ("use-after-unmap", "use after unmap"),
            layout.OP_DETACH: ("use-after-detach", "use after detach"),
            layout.OP_RESET: ("after-reset", "used after a device reset"),
        }[removed.op]
        return result(
            verdict,
            f"{subject}: {words}: {made(mapped)}, removed by {removed.describe(now)}",
            mapped,
            removed,
        )
    # The endpoint may have come from another domain where the address was mapped.
    arrival = next(
        (
            r
            for r in reversed(records)
            if r.op == layout.OP_ATTACH and r.value == endpoint and r.domain == domain
        ),
        None,
    )
    if arrival is not None and arrival.extra >= 0:
        before, gone = _mapping_fate(records, arrival.extra, address, upto=arrival.sequence)
        if before is not None and gone is None:
            return result(
                "moved",
                f"{subject}: the address was {made(before)}, but {arrival.describe(now)} moved the endpoint "
                f"out of domain {arrival.extra}",
                before,
                arrival,
            )
    scope = "" if complete else f" in the last {held} changes of the tables"
    return result("never-mapped", f"{subject}: no MAP of domain {domain} ever covered the address{scope}")


def fault_json(fault: Fault) -> dict[str, Any]:
    """A fault and its explanation for tools (the control channel's last faults, the trace's records)."""
    return {
        "reason": FaultReason(fault.reason).name,
        "flags": fault.flags,
        "access": "WRITE" if fault.flags & FAULT_F_WRITE else "READ",
        "endpoint": fault.endpoint,
        "address": fault.address,
        "reported": fault.reported,
        "explanation": None if fault.explanation is None else fault.explanation.to_json(),
    }

"""What the device core needs from a mapping table, and how it gets the real one.

The mappings of every domain live in one `vhost_iommu.jit.tables.MappingTable` (flat numpy arrays worked
on by numba kernels). The device depends only on the small protocol below, so tests and tools can hand it
another implementation that answers with the same status numbers. The table checks overlap and split
atomically; everything else (granule, ranges, flags, reserved regions, bypass domains) is the device's job
before it calls the table.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from vhost_iommu.jit.tables import INVALID, LIMIT, OK, OVERLAP, SPLIT, MappingTable

__all__ = ["INVALID", "LIMIT", "OK", "OVERLAP", "SPLIT", "MappingHit", "MappingStore", "default_store"]


class MappingHit(Protocol):
    """The mapping that contains a looked-up address."""

    @property
    def phys(self) -> int:
        """Guest-physical address of the looked-up IOVA (not of the mapping's start)."""
        ...

    @property
    def flags(self) -> int: ...

    @property
    def map_start(self) -> int: ...

    @property
    def map_last(self) -> int: ...


class MappingStore(Protocol):
    """One table for the mappings of all domains; ranges are inclusive ``[start, last]``.

    Statuses: OK, OVERLAP (map: overlaps a mapping; nothing changed), SPLIT (unmap: would split a mapping;
    nothing removed), LIMIT (map: table full), INVALID (arguments no caller may pass).
    """

    def map(self, domain: int, start: int, last: int, phys: int, flags: int) -> int: ...

    def unmap(self, domain: int, start: int, last: int) -> tuple[int, int]:
        """(status, number of mappings removed)."""
        ...

    def translate(self, domain: int, iova: int) -> MappingHit | None: ...

    def remove_domain(self, domain: int) -> int: ...

    def count(self, domain: int | None = None) -> int: ...

    def mappings(
        self, domain: int, start: int = 0, limit: int | None = None
    ) -> Iterable[tuple[int, int, int, int]]:
        """(start, last, phys, flags) of the domain's mappings that end at or after ``start``, by
        address, at most ``limit``."""
        ...


def default_store(max_mappings: int) -> MappingStore:
    return MappingTable(limit=max_mappings)

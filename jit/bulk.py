"""Loading many sorted mappings into a `MappingTable` in one compiled loop (snapshot restore).

A restore of a million mappings through ``MappingTable.map`` would pay the Python call and argument
checks a million times; here one kernel call inserts every mapping of every domain, and returns to
Python only when the pools need to grow. The caller has already checked the arrays (sorted,
non-overlapping per domain, aligned phys, flags in range): the kernel still gets each status from
``table_map`` and stops at the first that is not OK, so bad input is reported, never half-applied
silently.
"""

from __future__ import annotations

from typing import Final

import numpy as np
from numba import njit

from vhost_iommu.jit import prefetch, tables
from vhost_iommu.jit.caching import cache_on_sources
from vhost_iommu.jit.interpreted import compiles, kernel
from vhost_iommu.jit.tables import NEED_SPACE, OK, I64Array, Int, MappingTable, U64Array, table_map

#: ``position``: [0] the domain being loaded (index into ``domains``), [1] the next mapping.
P_DOMAIN: Final = 0
P_NEXT: Final = 1


@njit(cache=True)
def table_load_sorted(
    leaves: U64Array,
    nodes: U64Array,
    directory: I64Array,
    meta: I64Array,
    domains: I64Array,
    offsets: I64Array,
    starts: U64Array,
    lasts: U64Array,
    phys: U64Array,
    flags: U64Array,
    position: I64Array,
) -> Int:
    """Map ``starts[offsets[d]:offsets[d + 1]]`` (and the same rows of the other columns) into domain
    ``domains[d]`` for every d, resuming at ``position`` and advancing it past every mapping applied.
    Returns OK when all are in, else the first other status of ``table_map`` (NEED_SPACE: grow and
    call again)."""
    while position[P_DOMAIN] < domains.shape[0]:
        domain = domains[position[P_DOMAIN]]
        end = offsets[position[P_DOMAIN] + 1]
        while position[P_NEXT] < end:
            index = position[P_NEXT]
            status = table_map(
                leaves, nodes, directory, meta, domain, starts[index], lasts[index], phys[index], flags[index]
            )
            if status != OK:
                return status
            position[P_NEXT] = index + 1
        position[P_DOMAIN] += 1
    return OK


def load_sorted(
    table: MappingTable,
    domains: I64Array,
    offsets: I64Array,
    starts: U64Array,
    lasts: U64Array,
    phys: U64Array,
    flags: U64Array,
) -> int:
    """Insert grouped, sorted mappings (see ``table_load_sorted``) into ``table``; returns OK or the first
    failing status (OVERLAP, LIMIT, INVALID) with the mappings before it applied."""
    table.reserve(len(starts))
    position = np.zeros(2, np.int64)
    position[P_NEXT] = offsets[0] if len(offsets) else 0
    while True:
        leaves, nodes, directory, meta = table.arrays
        status = int(
            kernel(table_load_sorted)(
                leaves, nodes, directory, meta, domains, offsets, starts, lasts, phys, flags, position
            )
        )
        if status != NEED_SPACE:
            return status
        table.grow()


@compiles
def warm_up() -> None:
    table = MappingTable(limit=1 << 10)
    page = np.arange(4, dtype=np.uint64) << np.uint64(12)
    load_sorted(
        table,
        np.array([1, 2], np.int64),
        np.array([0, 2, 4], np.int64),
        page,
        page | np.uint64(0xFFF),
        page,
        np.ones(4, np.uint64),
    )


# table_map (and prefetch's code in it) is compiled into the kernel.
cache_on_sources(globals(), tables, prefetch)

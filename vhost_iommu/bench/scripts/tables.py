"""Benchmark of the numba mapping tables (vhost_iommu.jit.tables).

For each size N and insertion order it builds one domain of N 4 KiB mappings (every other page, so
that map+unmap pairs have free pages to use) and measures, in compiled loops that call the kernels the
way a compiled request path would:

  map          N maps in the chosen order (growth of the arrays included)
  unmap        N single-mapping unmaps in random order (at the end, from the full table down to empty)
  map+unmap    pairs on free pages among the N mappings (table size stays N), random pages
  translate    one kernel call per query, random addresses
  py translate MappingTable.translate from Python (the cold path, dispatch included)
  batch rand   table_translate_batch over random addresses, batches of 4096
  ... N cores  MappingTable.translate_batch(workers=N) over the same addresses in one call (wall clock)
  batch sort   the same addresses sorted
  B/map        bytes of the arrays per mapping (allocated; live rows in brackets)

Rates are millions of operations per second, best of --repeat runs. Example:
    scripts/bench-tables --sizes 1e3,1e4,1e5,1e6 --orders sequential,random
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable

import numba
import numpy as np
from numba import njit
from rich.console import Console
from rich.table import Table

from vhost_iommu.jit import tables
from vhost_iommu.jit.tables import (
    NEED_SPACE,
    OK,
    MappingTable,
    table_map,
    table_translate,
    table_translate_batch,
    table_unmap,
)

PAGE = 4096
clock = time.perf_counter
DOMAIN = 7
BATCH = 4096
# numba runs a parallel kernel on one thread per core unless NUMBA_NUM_THREADS says otherwise.
CORES = numba.get_num_threads()


@njit  # not cached: numba keys its cache by file, and this script also gets imported under other names
def _map_run(leaves, nodes, directory, meta, domain, pages, begin):  # type: ignore[no-untyped-def]
    """Map pages[begin:] until done or the pools are full; returns where it stopped or -1 on error."""
    for i in range(begin, pages.shape[0]):
        start = np.uint64(pages[i]) << np.uint64(12)
        status = table_map(leaves, nodes, directory, meta, domain, start, start | np.uint64(0xFFF), start, 3)
        if status == NEED_SPACE:
            return i
        if status != OK:
            return -1 - i
    return pages.shape[0]


@njit  # not cached: numba keys its cache by file, and this script also gets imported under other names
def _unmap_run(leaves, nodes, directory, meta, domain, pages):  # type: ignore[no-untyped-def]
    removed = 0
    for i in range(pages.shape[0]):
        start = np.uint64(pages[i]) << np.uint64(12)
        _, n = table_unmap(leaves, nodes, directory, meta, domain, start, start | np.uint64(0xFFF))
        removed += n
    return removed


@njit  # not cached: numba keys its cache by file, and this script also gets imported under other names
def _pairs_run(leaves, nodes, directory, meta, domain, pages):  # type: ignore[no-untyped-def]
    """map then unmap each page; returns the pairs done before the pools ran short."""
    for i in range(pages.shape[0]):
        start = np.uint64(pages[i]) << np.uint64(12)
        if table_map(leaves, nodes, directory, meta, domain, start, start | np.uint64(0xFFF), start, 3) != OK:
            return i
        table_unmap(leaves, nodes, directory, meta, domain, start, start | np.uint64(0xFFF))
    return pages.shape[0]


@njit  # not cached: numba keys its cache by file, and this script also gets imported under other names
def _translate_run(leaves, nodes, directory, domain, iovas):  # type: ignore[no-untyped-def]
    hits = 0
    for i in range(iovas.shape[0]):
        hits += table_translate(leaves, nodes, directory, domain, iovas[i])[0]
    return hits


def _best(run: Callable[[], float], repeat: int) -> float:
    return min(run() for _ in range(repeat))


def _map_all(table: MappingTable, pages: np.ndarray) -> None:
    done = 0
    while done < len(pages):
        # No references to the arrays may outlive the call: grow() resizes in place only when it
        # holds the sole reference, and copies (hundreds of MB at 1e7) otherwise.
        done = _map_run(*table.arrays, DOMAIN, pages, done)
        if done < 0:
            sys.exit(f"bench-tables: map of page {-1 - done} failed")
        if done < len(pages):
            table.grow()


def measure(size: int, order: str, repeat: int, rng: np.random.Generator) -> dict[str, float]:
    # Mappings on even pages; odd pages stay free for the map+unmap pairs.
    pages = np.arange(size, dtype=np.uint64) * np.uint64(2)
    if order == "random":
        pages = rng.permutation(pages)
    elif order == "descending":
        pages = pages[::-1].copy()
    results: dict[str, float] = {}

    map_seconds = []
    table = MappingTable(limit=size + 1)
    for _ in range(repeat):
        table = MappingTable(limit=size + 1)
        began = clock()
        _map_all(table, pages)
        map_seconds.append(clock() - began)
    results["map"] = size / min(map_seconds) / 1e6
    results["bytes"] = table.nbytes / size
    results["live bytes"] = table.live_nbytes / size

    query_count = max(min(size * 4, 4_000_000), 1_000_000)
    mapped = rng.integers(0, size, query_count, dtype=np.uint64) * np.uint64(2)
    iovas = (mapped << np.uint64(12)) + rng.integers(0, PAGE, query_count, dtype=np.uint64)
    sorted_iovas = np.sort(iovas)
    domains = np.full(query_count, DOMAIN, np.uint32)
    out_phys = np.empty(query_count, np.uint64)
    out_flags = np.empty(query_count, np.int32)

    def single() -> float:
        began = clock()
        hits = _translate_run(*table.arrays[:3], DOMAIN, iovas)
        seconds = clock() - began
        assert hits == query_count
        return seconds

    results["translate"] = query_count / _best(single, repeat) / 1e6

    python_queries = [int(iova) for iova in iovas[:200_000]]

    def python_single() -> float:
        translate = table.translate
        began = clock()
        for iova in python_queries:
            translate(DOMAIN, iova)
        return clock() - began

    results["py translate"] = len(python_queries) / _best(python_single, 1) / 1e6

    def batched(queries: np.ndarray) -> Callable[[], float]:
        def run() -> float:
            leaves, nodes, directory, _meta = table.arrays
            began = clock()
            hits = 0
            for first in range(0, query_count, BATCH):
                hits += table_translate_batch(
                    leaves,
                    nodes,
                    directory,
                    domains[first : first + BATCH],
                    queries[first : first + BATCH],
                    out_phys[first : first + BATCH],
                    out_flags[first : first + BATCH],
                )
            seconds = clock() - began
            assert hits == query_count
            return seconds

        return run

    def batched_on_every_core(queries: np.ndarray) -> Callable[[], float]:
        # One call over the whole query set: its slices go to numba's threads, one per core.
        def run() -> float:
            began = time.perf_counter()  # wall clock: CPU time would add the threads up
            hits = table.translate_batch(domains, queries, out_phys, out_flags, workers=CORES)
            seconds = time.perf_counter() - began
            assert hits == query_count
            return seconds

        return run

    results["batch random"] = query_count / _best(batched(iovas), repeat) / 1e6
    results["batch all cores"] = query_count / _best(batched_on_every_core(iovas), repeat) / 1e6
    results["batch sorted"] = query_count / _best(batched(sorted_iovas), repeat) / 1e6

    pair_count = min(size, 1_000_000)
    free_pages = rng.integers(0, size, pair_count, dtype=np.uint64) * np.uint64(2) + np.uint64(1)

    def pairs() -> float:
        began = clock()
        done = 0
        while done < pair_count:
            done += _pairs_run(*table.arrays, DOMAIN, free_pages[done:])
            if done < pair_count:
                table.grow()
        return clock() - began

    results["pairs"] = pair_count / _best(pairs, repeat) / 1e6

    # Churn splits full leaves (a sequentially packed table ends up about half full): look again.
    results["batch churned"] = query_count / _best(batched(iovas), repeat) / 1e6
    results["churned bytes"] = table.live_nbytes / size

    unmap_order = rng.permutation(pages)
    began = clock()
    removed = _unmap_run(*table.arrays, DOMAIN, unmap_order)
    seconds = clock() - began
    assert removed == size and table.count() == 0
    results["unmap"] = size / seconds / 1e6
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="scripts/bench-tables", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="1e3,1e4,1e5,1e6,1e7", help="comma-separated mapping counts")
    parser.add_argument(
        "--orders", default="sequential,random", help="insertion orders: sequential, descending, random"
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure; the best is shown")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall: elapsed time; cpu: this process's CPU time (fairer on a machine shared with other jobs)",
    )
    args = parser.parse_args()
    global clock
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    sizes = [int(float(size)) for size in args.sizes.split(",")]
    orders = args.orders.split(",")
    for order in orders:
        if order not in ("sequential", "descending", "random"):
            parser.error(f"unknown order {order!r}")

    console = Console(width=160)
    began = clock()
    tables.warm_up()
    console.print(f"warm_up() (kernels compiled or loaded from numba's cache): {clock() - began:.2f} s")
    measure(2000, "random", 1, np.random.default_rng(0))  # compiles this script's own loops
    load = os.getloadavg()[0]
    report = Table(
        title=f"vhost_iommu.jit.tables: M ops/s, {args.clock} clock, load average {load:.1f} at start"
    )
    for column in (
        "mappings",
        "order",
        "map",
        "unmap",
        "pairs",
        "translate",
        "py translate",
        "batch random",
        f"batch random, {CORES} cores",
        "batch sorted",
        "B/map",
        "after pairs: batch",
        "B/map",
    ):
        report.add_column(column, justify="right")
    rng = np.random.default_rng(args.seed)
    for size in sizes:
        for order in orders:
            # The larger sizes dominate the run time; repeat them less.
            repeat = args.repeat if size <= 1_000_000 else 1
            r = measure(size, order, repeat, rng)
            report.add_row(
                f"{size:,}",
                order,
                f"{r['map']:.2f}",
                f"{r['unmap']:.2f}",
                f"{r['pairs']:.2f}",
                f"{r['translate']:.2f}",
                f"{r['py translate']:.2f}",
                f"{r['batch random']:.1f}",
                f"{r['batch all cores']:.1f}",
                f"{r['batch sorted']:.1f}",
                f"{r['bytes']:.1f} ({r['live bytes']:.1f})",
                f"{r['batch churned']:.1f}",
                f"({r['churned bytes']:.1f})",
            )
            console.print(f"  measured {size:,} {order}", style="dim")
    console.print(report)
    console.print(f"load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()

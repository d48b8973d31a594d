"""The numba mapping tables (vhost_iommu.jit.tables): every structural rule, the 64-bit edges, growth and
memory, and a hypothesis state machine against a plain sorted-list model.

The long property run: ``TABLES_LONG=1 pytest tests/test_tables.py -k state_machine``.
"""

from __future__ import annotations

import bisect
import os
import random
from dataclasses import dataclass, field

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from vhost_iommu.jit import tables
from vhost_iommu.jit.tables import (
    INVALID,
    LEAF_CAPACITY,
    LIMIT,
    MAX_ADDRESS,
    MAX_DOMAIN,
    MISS,
    MMIO,
    OK,
    OVERLAP,
    READ,
    SPLIT,
    WRITE,
    Mapping,
    MappingTable,
    Translation,
)

PAGE = 0x1000
TOP_PAGE = MAX_ADDRESS - PAGE + 1


def page(number: int) -> tuple[int, int]:
    """[start, last] of 4 KiB page ``number``."""
    return number * PAGE, number * PAGE + PAGE - 1


def map_pages(table: MappingTable, domain: int, numbers: list[int], flags: int = READ) -> None:
    for number in numbers:
        start, last = page(number)
        assert table.map(domain, start, last, start + 0x4000_0000, flags) == OK


@pytest.fixture
def table() -> MappingTable:
    return MappingTable()


# --- map and translate ----------------------------------------------------------------------------------


def test_translate_returns_offset_address_flags_and_bounds(table: MappingTable) -> None:
    assert table.map(1, 0x10000, 0x1FFFF, 0xABC000, READ | WRITE) == OK
    assert table.translate(1, 0x10000) == Translation(0xABC000, READ | WRITE, 0x10000, 0x1FFFF)
    assert table.translate(1, 0x1F123) == Translation(0xABC000 + 0xF123, READ | WRITE, 0x10000, 0x1FFFF)
    assert table.translate(1, 0xFFFF) is None
    assert table.translate(1, 0x20000) is None
    assert table.translate(2, 0x10000) is None


def test_flags_are_kept_per_mapping(table: MappingTable) -> None:
    for number, flags in enumerate([0, READ, WRITE, READ | WRITE, MMIO, READ | WRITE | MMIO]):
        start, last = page(number)
        assert table.map(3, start, last, 0x100000, flags) == OK
    assert [table.translate(3, page(number)[0]) for number in range(6)] == [
        Translation(0x100000, flags, *page(number))
        for number, flags in enumerate([0, READ, WRITE, READ | WRITE, MMIO, READ | WRITE | MMIO])
    ]


@pytest.mark.parametrize(
    ("start", "last"),
    [
        (0x10000, 0x1FFFF),  # identical
        (0x12000, 0x12FFF),  # inside
        (0x0F000, 0x20FFF),  # around
        (0x0F000, 0x10000),  # last touches the first byte
        (0x1FFFF, 0x20FFF),  # start touches the last byte
        (0x00000, 0x10FFF),  # overlapping the beginning
        (0x1F000, 0x2FFFF),  # overlapping the end
    ],
)
def test_map_refuses_any_overlap_and_changes_nothing(table: MappingTable, start: int, last: int) -> None:
    assert table.map(1, 0x10000, 0x1FFFF, 0x50000, READ) == OK
    assert table.map(1, start, last, 0x90000, WRITE) == OVERLAP
    assert table.count() == 1
    assert list(table.mappings(1)) == [Mapping(0x10000, 0x1FFFF, 0x50000, READ)]
    table.verify()


def test_adjacent_mappings_do_not_overlap(table: MappingTable) -> None:
    assert table.map(1, 0x10000, 0x1FFFF, 0, READ) == OK
    assert table.map(1, 0x0F000, 0x0FFFF, 0, READ) == OK
    assert table.map(1, 0x20000, 0x20FFF, 0, READ) == OK
    assert table.count(1) == 3


def test_overlap_is_found_across_leaf_boundaries(table: MappingTable) -> None:
    # Every second page of a range several leaves long; then every page again, including the free ones
    # at each leaf's edge: only the free pages may be mapped.
    numbers = list(range(0, 8 * LEAF_CAPACITY, 2))
    map_pages(table, 1, numbers)
    for number in range(8 * LEAF_CAPACITY):
        start, last = page(number)
        expected = OVERLAP if number % 2 == 0 else OK
        assert table.map(1, start, last, 0, READ) == expected
    # A range spanning many mappings is refused as a whole.
    assert table.map(1, 0x100 * PAGE - 1, 0x180 * PAGE, 0, READ) == OVERLAP
    table.verify()


def test_map_rejects_arguments_no_caller_may_pass(table: MappingTable) -> None:
    assert table.map(1, 0x2000, 0x1FFF, 0, READ) == INVALID  # start > last
    assert table.map(1, 0x2000, 0x2FFF, 0x800, READ) == INVALID  # phys not 4 KiB aligned
    assert table.map(1, 0x2000, 0x2FFF, 0, 0x1000) == INVALID  # flags beyond FLAGS_MASK
    assert table.map(1, 0x2000, 0x2FFF, 0, -1) == INVALID
    assert table.count() == 0


@pytest.mark.parametrize(
    "call",
    [
        lambda t: t.map(-1, 0, 0xFFF, 0, READ),
        lambda t: t.map(MAX_DOMAIN + 1, 0, 0xFFF, 0, READ),
        lambda t: t.map(1, -PAGE, 0xFFF, 0, READ),
        lambda t: t.map(1, 0, MAX_ADDRESS + 1, 0, READ),
        lambda t: t.map(1, 0, 0xFFF, 1 << 64, READ),
        lambda t: t.unmap(1, 0, 1 << 64),
        lambda t: t.translate(1, -1),
        lambda t: t.translate(1 << 32, 0),
        lambda t: t.remove_domain(-5),
        lambda t: t.count(1 << 40),
        lambda t: list(t.mappings(1, -1)),
    ],
)
def test_values_outside_u64_or_u32_raise_value_error(table: MappingTable, call: object) -> None:
    assert callable(call)
    with pytest.raises(ValueError):
        call(table)
    assert table.count() == 0


# --- unmap ----------------------------------------------------------------------------------------------


def three_mappings(table: MappingTable) -> None:
    assert table.map(1, 0x10000, 0x1FFFF, 0x100000, READ) == OK
    assert table.map(1, 0x30000, 0x3FFFF, 0x200000, READ) == OK
    assert table.map(1, 0x50000, 0x5FFFF, 0x300000, READ) == OK


def test_unmap_removes_mappings_wholly_inside_and_counts_them(table: MappingTable) -> None:
    three_mappings(table)
    assert table.unmap(1, 0x10000, 0x3FFFF) == (OK, 2)
    assert [m.start for m in table.mappings(1)] == [0x50000]
    assert table.translate(1, 0x10000) is None
    assert table.translate(1, 0x50000) is not None


def test_unmap_over_gaps_and_empty_ranges(table: MappingTable) -> None:
    three_mappings(table)
    assert table.unmap(1, 0x20000, 0x2FFFF) == (OK, 0)  # a pure gap
    assert table.unmap(7, 0, MAX_ADDRESS) == (OK, 0)  # a domain without mappings
    assert table.unmap(1, 0x0, 0x6FFFF) == (OK, 3)  # gaps on both sides and between
    assert table.count() == 0
    assert table.domains() == []


@pytest.mark.parametrize(
    ("start", "last", "edge"),
    [
        (0x18000, 0x3FFFF, "start inside the first mapping"),
        (0x10000, 0x37FFF, "last inside the second mapping"),
        (0x18000, 0x37FFF, "both"),
        (0x11000, 0x11FFF, "a range inside one mapping"),
        (0x1F000, 0x50FFF, "straddles at both ends with whole mappings between"),
    ],
)
def test_unmap_that_would_split_is_refused_atomically(
    table: MappingTable, start: int, last: int, edge: str
) -> None:
    three_mappings(table)
    before = list(table.mappings(1))
    assert table.unmap(1, start, last) == (SPLIT, 0), edge
    assert list(table.mappings(1)) == before
    table.verify()


def test_split_detection_when_the_range_spans_many_leaves(table: MappingTable) -> None:
    # Two-page mappings, so that a range ending on an odd page cuts one in two.
    for number in range(0, 20 * LEAF_CAPACITY, 2):
        assert table.map(1, number * PAGE, (number + 2) * PAGE - 1, 0, READ) == OK
    count = table.count()
    assert table.unmap(1, 0, (10 * LEAF_CAPACITY + 1) * PAGE - 1) == (SPLIT, 0)
    assert table.unmap(1, PAGE, 10 * LEAF_CAPACITY * PAGE - 1) == (SPLIT, 0)
    assert table.count() == count
    assert table.unmap(1, 0, 10 * LEAF_CAPACITY * PAGE - 1) == (OK, 5 * LEAF_CAPACITY)
    assert table.count() == count - 5 * LEAF_CAPACITY
    table.verify()


def test_unmap_rejects_start_after_last(table: MappingTable) -> None:
    three_mappings(table)
    assert table.unmap(1, 0x20000, 0x1FFFF) == (INVALID, 0)
    assert table.count() == 3


def test_unmapped_memory_returns_to_the_pools(table: MappingTable) -> None:
    empty = table.live_nbytes
    map_pages(table, 1, list(range(20_000)))
    assert table.live_nbytes > empty + 20_000 * 24
    assert table.unmap(1, 0, MAX_ADDRESS) == (OK, 20_000)
    assert table.live_nbytes == empty
    assert table.nbytes == MappingTable().nbytes  # an empty table lets its big arrays go
    # Piecewise unmaps leave no more than a sparse table's worth either.
    map_pages(table, 1, list(range(20_000)))
    for number in random.Random(5).sample(range(20_000), 19_900):
        assert table.unmap(1, *page(number)) == (OK, 1)
    assert table.live_nbytes - empty < 100 * 1600
    table.verify()


# --- domains --------------------------------------------------------------------------------------------


def test_domains_are_isolated(table: MappingTable) -> None:
    for domain in (0, 1, MAX_DOMAIN):
        assert table.map(domain, 0x10000, 0x1FFFF, domain * PAGE, READ) == OK
    assert table.unmap(1, 0, MAX_ADDRESS) == (OK, 1)
    assert table.translate(0, 0x10000) == Translation(0, READ, 0x10000, 0x1FFFF)
    assert table.translate(1, 0x10000) is None
    assert table.translate(MAX_DOMAIN, 0x10000) == Translation(MAX_DOMAIN * PAGE, READ, 0x10000, 0x1FFFF)
    assert table.count(0) == table.count(MAX_DOMAIN) == 1
    assert table.count(1) == 0


def test_remove_domain_removes_only_that_domain_and_frees_its_rows(table: MappingTable) -> None:
    map_pages(table, 5, list(range(3)))
    baseline = table.live_nbytes
    map_pages(table, 9, list(range(50_000)))
    assert table.remove_domain(9) == 50_000
    assert table.remove_domain(9) == 0
    assert table.count() == table.count(5) == 3
    assert table.live_nbytes == baseline
    assert table.domains() == [5]
    table.verify()


def test_many_domains_with_few_mappings(table: MappingTable) -> None:
    for domain in range(3000):
        map_pages(table, domain * 7919 % (MAX_DOMAIN + 1), [domain, domain + 10])
    assert table.count() == 6000
    for domain in range(0, 3000, 2):
        assert table.remove_domain(domain * 7919 % (MAX_DOMAIN + 1)) == 2
    for domain in range(3000):
        hit = table.translate(domain * 7919 % (MAX_DOMAIN + 1), page(domain)[0])
        assert (hit is None) == (domain % 2 == 0)
    assert table.count() == 3000
    table.verify()


def test_clear_forgets_everything_and_shrinks(table: MappingTable) -> None:
    small = table.nbytes
    map_pages(table, 1, list(range(10_000)))
    table.clear()
    assert table.count() == 0
    assert table.translate(1, 0) is None
    assert table.nbytes == small
    map_pages(table, 1, [3])
    assert table.count() == 1


# --- limit ----------------------------------------------------------------------------------------------


def test_limit_counts_every_domain_and_frees_up_on_unmap() -> None:
    table = MappingTable(limit=3)
    map_pages(table, 1, [0, 1])
    map_pages(table, 2, [0])
    assert table.map(3, 0, 0xFFF, 0, READ) == LIMIT
    assert table.map(1, *page(7), 0, READ) == LIMIT
    assert table.domains() == [1, 2]
    assert table.unmap(1, *page(0)) == (OK, 1)
    assert table.map(3, 0, 0xFFF, 0, READ) == OK
    table.verify()


def test_overlap_is_reported_before_limit() -> None:
    table = MappingTable(limit=1)
    map_pages(table, 1, [0])
    assert table.map(1, *page(0), 0, READ) == OVERLAP
    assert table.map(1, *page(1), 0, READ) == LIMIT


def test_limit_zero_refuses_everything_and_limits_are_range_checked() -> None:
    table = MappingTable(limit=0)
    assert table.map(1, 0, 0xFFF, 0, READ) == LIMIT
    assert table.count() == 0
    with pytest.raises(ValueError):
        MappingTable(limit=-1)
    with pytest.raises(ValueError):
        MappingTable(limit=1 << 64)


def test_reserve_never_goes_beyond_the_limit() -> None:
    table = MappingTable(limit=1000)
    table.reserve(10**15)  # would be petabytes if taken at its word
    assert table.nbytes < 1_000_000
    with pytest.raises(ValueError):
        table.reserve(-1)
    table.reserve(1000)
    before = table.nbytes
    map_pages(table, 1, list(range(1000)))
    assert table.nbytes == before  # ascending maps fit in what was reserved


def test_lowering_the_limit_refuses_new_maps_but_keeps_old_ones() -> None:
    table = MappingTable(limit=100)
    map_pages(table, 1, list(range(10)))
    table.limit = 5
    assert table.map(1, *page(20), 0, READ) == LIMIT
    assert table.count() == 10
    with pytest.raises(ValueError):
        table.limit = -1


# --- paging ---------------------------------------------------------------------------------------------


def test_mappings_are_listed_in_address_order_from_a_given_address(table: MappingTable) -> None:
    numbers = list(range(0, 5000, 3))
    shuffled = numbers.copy()
    random.Random(1).shuffle(shuffled)
    map_pages(table, 4, shuffled, READ | WRITE)
    listed = list(table.mappings(4))
    assert listed == [Mapping(*page(n), page(n)[0] + 0x4000_0000, READ | WRITE) for n in numbers]
    # From the middle of a mapping: that mapping comes first.
    assert next(table.mappings(4, page(300)[0] + 0x10)).start == page(300)[0]
    # From a gap: the next mapping comes first.
    assert next(table.mappings(4, page(301)[0])).start == page(303)[0]
    assert list(table.mappings(4, page(4999)[0] + 1)) == []
    assert [m.start for m in table.mappings(4, 0, limit=3)] == [page(n)[0] for n in (0, 3, 6)]
    assert list(table.mappings(4, limit=0)) == []


def test_paging_by_hand_visits_every_mapping_once(table: MappingTable) -> None:
    map_pages(table, 4, list(range(3000)))
    seen: list[int] = []
    cursor = 0
    while True:
        starts, lasts, _phys, _flags = table.mapping_arrays(4, cursor, limit=700)
        if len(starts) == 0:
            break
        seen.extend(int(s) for s in starts)
        cursor = int(lasts[-1]) + 1
    assert seen == [page(n)[0] for n in range(3000)]


def test_listing_survives_changes_between_pages(table: MappingTable) -> None:
    map_pages(table, 4, list(range(0, 6000, 2)))
    walk = table.mappings(4)
    first = [next(walk) for _ in range(10)]
    map_pages(table, 4, [1, 5999])  # one behind the walk, one ahead of it
    assert table.unmap(4, page(4000)[0], MAX_ADDRESS) == (OK, 1001)
    rest = list(walk)
    starts = [m.start for m in first + rest]
    assert starts == sorted(starts) and len(set(starts)) == len(starts)
    assert starts[-1] == page(3998)[0]


# --- 64-bit edges ---------------------------------------------------------------------------------------


def test_mapping_at_the_top_of_the_address_space(table: MappingTable) -> None:
    assert table.map(1, TOP_PAGE, MAX_ADDRESS, 0x7000, READ) == OK
    assert table.translate(1, MAX_ADDRESS) == Translation(0x7FFF, READ, TOP_PAGE, MAX_ADDRESS)
    assert table.map(1, MAX_ADDRESS, MAX_ADDRESS, 0, READ) == OVERLAP
    assert list(table.mappings(1, MAX_ADDRESS)) == [Mapping(TOP_PAGE, MAX_ADDRESS, 0x7000, READ)]
    assert table.unmap(1, TOP_PAGE + PAGE // 2, MAX_ADDRESS) == (SPLIT, 0)
    assert table.unmap(1, TOP_PAGE, MAX_ADDRESS) == (OK, 1)


def test_single_byte_mapping_at_the_very_last_address(table: MappingTable) -> None:
    map_pages(table, 1, list(range(3 * LEAF_CAPACITY)))
    assert table.map(1, MAX_ADDRESS, MAX_ADDRESS, 0x5000, WRITE) == OK
    assert table.translate(1, MAX_ADDRESS) == Translation(0x5000, WRITE, MAX_ADDRESS, MAX_ADDRESS)
    assert table.translate(1, MAX_ADDRESS - 1) is None
    domains = np.full(3, 1, np.uint32)
    iovas = np.array([MAX_ADDRESS, MAX_ADDRESS - 1, 5], np.uint64)
    out_phys = np.empty(3, np.uint64)
    out_flags = np.empty(3, np.int32)
    assert table.translate_batch(domains, iovas, out_phys, out_flags) == 2
    assert out_flags.tolist() == [WRITE, MISS, READ]
    assert out_phys.tolist() == [0x5000, 0, 0x4000_0005]
    table.verify()


def test_whole_address_space_in_one_mapping(table: MappingTable) -> None:
    assert table.map(2, 0, MAX_ADDRESS, 0, READ | WRITE) == OK
    assert table.translate(2, 0) == Translation(0, READ | WRITE, 0, MAX_ADDRESS)
    assert table.translate(2, MAX_ADDRESS) == Translation(
        MAX_ADDRESS & ~0xFFF | 0xFFF, READ | WRITE, 0, MAX_ADDRESS
    )
    assert table.map(2, 0x1000, 0x1FFF, 0, READ) == OVERLAP
    assert table.unmap(2, 0, MAX_ADDRESS - 1) == (SPLIT, 0)
    assert table.unmap(2, 1, MAX_ADDRESS) == (SPLIT, 0)
    assert table.unmap(2, 0, MAX_ADDRESS) == (OK, 1)


def test_mapping_at_address_zero(table: MappingTable) -> None:
    assert table.map(1, 0, 0xFFF, 0x3000, READ) == OK
    assert table.translate(1, 0) == Translation(0x3000, READ, 0, 0xFFF)
    assert table.map(1, 0, 0, 0, READ) == OVERLAP
    assert table.unmap(1, 0, 0) == (SPLIT, 0)
    assert table.unmap(1, 0, 0xFFF) == (OK, 1)


def test_phys_plus_offset_wraps_never_past_u64(table: MappingTable) -> None:
    # The device core refuses phys + size > 2**64; the table still computes in u64 without error.
    assert table.map(1, 0, 0xFFFF, MAX_ADDRESS - 0xFFF, READ) == OK
    assert table.translate(1, 0xFFF) == Translation(MAX_ADDRESS, READ, 0, 0xFFFF)


# --- batched translate ----------------------------------------------------------------------------------


def test_translate_batch_matches_single_translations_across_domains(table: MappingTable) -> None:
    rng = random.Random(3)
    for domain in (1, 2, 3):
        map_pages(table, domain, rng.sample(range(5000), 1500), READ if domain != 2 else WRITE)
    queries = 20_000
    domains = np.array([rng.choice((1, 2, 3, 4)) for _ in range(queries)], np.uint32)
    iovas = np.array([rng.randrange(5100 * PAGE) for _ in range(queries)], np.uint64)
    out_phys = np.empty(queries, np.uint64)
    out_flags = np.empty(queries, np.int32)
    hits = table.translate_batch(domains, iovas, out_phys, out_flags)
    expected_hits = 0
    for domain, iova, phys, flags in zip(
        domains.tolist(), iovas.tolist(), out_phys.tolist(), out_flags.tolist(), strict=True
    ):
        single = table.translate(domain, iova)
        if single is None:
            assert (phys, flags) == (0, MISS)
        else:
            expected_hits += 1
            assert (phys, flags) == (single.phys, single.flags)
    assert hits == expected_hits > 0


@pytest.mark.parametrize("workers", [2, 3, 64])
@pytest.mark.parametrize("queries", [0, 1, 5, 20_000])
def test_translate_batch_on_several_threads_gives_the_same_answers(
    table: MappingTable, workers: int, queries: int
) -> None:
    rng = random.Random(4)
    for domain in (1, 2):
        map_pages(table, domain, rng.sample(range(5000), 1500), READ if domain == 1 else WRITE)
    domains = np.array([rng.choice((1, 2, 3)) for _ in range(queries)], np.uint32)
    iovas = np.array([rng.randrange(5100 * PAGE) for _ in range(queries)], np.uint64)
    alone = (np.empty(queries, np.uint64), np.empty(queries, np.int32))
    shared = (np.empty(queries, np.uint64), np.empty(queries, np.int32))
    hits_alone = table.translate_batch(domains, iovas, *alone)
    hits_shared = table.translate_batch(domains, iovas, *shared, workers=workers)
    assert hits_shared == hits_alone
    assert np.array_equal(shared[0], alone[0]) and np.array_equal(shared[1], alone[1])
    with pytest.raises(ValueError):
        table.translate_batch(domains, iovas, *shared, workers=0)


def test_translate_batch_checks_dtypes_and_lengths(table: MappingTable) -> None:
    ok = (np.zeros(4, np.uint32), np.zeros(4, np.uint64), np.zeros(4, np.uint64), np.zeros(4, np.int32))
    assert table.translate_batch(*ok) == 0
    with pytest.raises(TypeError):
        table.translate_batch(np.zeros(4, np.int64), ok[1], ok[2], ok[3])
    with pytest.raises(TypeError):
        table.translate_batch(ok[0], ok[1].astype(np.int64), ok[2], ok[3])
    with pytest.raises(TypeError):
        table.translate_batch(ok[0], ok[1].reshape(2, 2), ok[2], ok[3])
    with pytest.raises(ValueError):
        table.translate_batch(ok[0], ok[1], ok[2][:3], ok[3])


# --- growth, memory, verification -----------------------------------------------------------------------


def test_growth_leaves_arrays_held_by_a_caller_intact(table: MappingTable) -> None:
    # A caller (a compiled request path, a snapshot writer) may hold the arrays while the table grows:
    # growth must then copy rather than resize those arrays under it.
    map_pages(table, 1, list(range(100)))
    held = table.arrays
    shapes = [array.shape for array in held]
    map_pages(table, 1, list(range(100, 20_000)))
    assert table.arrays.leaves.shape[0] > held.leaves.shape[0]
    assert [array.shape for array in held] == shapes
    assert int(held.meta[tables.M_TOTAL]) <= 20_000  # still readable memory
    assert table.count() == 20_000
    table.verify()


@pytest.mark.parametrize("order", ["ascending", "descending"])
def test_runs_of_pages_fill_leaves(order: str) -> None:
    # Linux hands out IOVAs top-down; both directions must pack leaves, not leave them half empty.
    table = MappingTable()
    numbers = list(range(50_000))
    map_pages(table, 1, numbers if order == "ascending" else numbers[::-1])
    assert table.live_nbytes / table.count() < 27
    table.verify()


def test_random_order_stays_within_the_memory_budget() -> None:
    table = MappingTable()
    numbers = list(range(50_000))
    random.Random(2).shuffle(numbers)
    map_pages(table, 1, numbers)
    assert table.live_nbytes / table.count() < 32
    table.verify()


def leaf_counts(table: MappingTable, domain: int) -> list[int]:
    """Entries per leaf of ``domain``, in address order (read from the arrays)."""
    arrays = table.arrays
    slot = tables.directory_find(arrays.directory, domain)
    row = int(arrays.directory[slot, tables.D_ROOT])
    for _ in range(int(arrays.directory[slot, tables.D_HEIGHT])):
        row = int(arrays.nodes[row, tables.N_CHILDREN])
    counts = []
    while row != tables.NIL:
        counts.append(int(arrays.leaves[row, tables.L_COUNT]))
        row = int(np.int64(arrays.leaves[row, tables.L_NEXT]))
    return counts


def test_inserting_between_full_leaves_spreads_two_leaves_over_three() -> None:
    table = MappingTable()
    map_pages(table, 1, list(range(0, 8 * LEAF_CAPACITY, 2)))
    assert leaf_counts(table, 1) == [LEAF_CAPACITY] * 4
    map_pages(table, 1, [2 * LEAF_CAPACITY + 1])  # the middle of the second leaf
    counts = leaf_counts(table, 1)
    # Splitting one leaf would leave two halves; spreading two full leaves over three leaves thirds.
    assert len(counts) == 5 and min(counts) >= (2 * LEAF_CAPACITY) // 3
    assert sum(counts) == 4 * LEAF_CAPACITY + 1
    table.verify()


def test_descending_runs_into_gaps_cannot_blow_up_memory() -> None:
    # Each new page lands just below the previous one, between two full leaves: an edge split that
    # ignored its neighbours would give every page a leaf of its own.
    table = MappingTable()
    map_pages(table, 1, list(range(0, 64 * LEAF_CAPACITY, 4)))
    for gap in range(1, 64 * LEAF_CAPACITY, 4 * LEAF_CAPACITY):
        map_pages(table, 1, [gap + 2, gap + 1, gap])
    for number in range(64 * LEAF_CAPACITY - 1, 0, -1):
        if table.translate(1, page(number)[0]) is None:
            map_pages(table, 1, [number])
    assert table.count() == 64 * LEAF_CAPACITY
    assert table.live_nbytes / table.count() < 40
    table.verify()


def test_verify_reports_corruption(table: MappingTable) -> None:
    map_pages(table, 1, list(range(5 * LEAF_CAPACITY)))
    table.verify()
    arrays = table.arrays
    slot = tables.directory_find(arrays.directory, 1)
    root = int(arrays.directory[slot, tables.D_ROOT])
    arrays.nodes[root, tables.N_KEYS + 1] += np.uint64(PAGE)  # a separator off by one page
    with pytest.raises(ValueError, match="separator"):
        table.verify()
    arrays.nodes[root, tables.N_KEYS + 1] -= np.uint64(PAGE)
    arrays.nodes[root, tables.N_CHILDREN + 1] = np.uint64(10**9)  # a child row far outside the pool
    with pytest.raises(ValueError, match="out of range"):
        table.verify()


def test_kernels_answer_need_space_without_changing_anything_and_succeed_after_grow() -> None:
    # The protocol of a compiled request path: call the kernel on the arrays; on NEED_SPACE, grow
    # through the owner, fetch the arrays again and retry.
    table = MappingTable()
    need_space_seen = 0
    for number in range(1500):
        start, last = page(number * 3)
        while True:
            arrays = table.arrays
            before = [array.copy() for array in arrays]
            status = tables.table_map(*arrays, 1, start, last, start, READ)
            if status != tables.NEED_SPACE:
                break
            need_space_seen += 1
            assert all(np.array_equal(old, new) for old, new in zip(before, arrays, strict=True))
            table.grow()
        assert status == OK
    assert need_space_seen > 0
    assert table.count() == 1500
    table.verify()


def test_kernels_called_with_ids_outside_u32_find_nothing_and_change_nothing() -> None:
    # Compiled callers skip the owner's checks; an empty directory row holds -1, which must not
    # match domain -1.
    table = MappingTable()
    map_pages(table, 1, [0, 1])
    leaves, nodes, directory, meta = table.arrays
    for domain in (-1, -2, MAX_DOMAIN + 1):
        wild = np.int64(domain)
        assert not tables.table_translate(leaves, nodes, directory, wild, np.uint64(0))[0]
        assert tables.table_remove_domain(leaves, nodes, directory, meta, wild) == 0
        assert tables.table_unmap(leaves, nodes, directory, meta, wild, np.uint64(0), np.uint64(PAGE)) == (
            INVALID,
            0,
        )
        assert (
            tables.table_map(
                leaves,
                nodes,
                directory,
                meta,
                wild,
                np.uint64(0),
                np.uint64(0xFFF),
                np.uint64(0),
                np.uint64(1),
            )
            == INVALID
        )
    assert table.count() == 2
    table.verify()


def copied(arrays: tables.TableArrays) -> tables.TableArrays:
    return tables.TableArrays(
        arrays.leaves.copy(), arrays.nodes.copy(), arrays.directory.copy(), arrays.meta.copy()
    )


def test_a_saved_table_comes_back_and_a_corrupt_one_is_refused(table: MappingTable) -> None:
    map_pages(table, 3, list(range(0, 4000, 3)))
    map_pages(table, 4, [7])
    saved = copied(table.arrays)
    restored = MappingTable.from_arrays(saved)
    assert list(restored.mappings(3)) == list(table.mappings(3))
    assert restored.count() == table.count() and restored.limit == table.limit
    assert restored.map(3, *page(1), 0, READ) == OK
    assert restored.map(3, *page(3), 0, READ) == OVERLAP
    corrupt = copied(table.arrays)
    corrupt.leaves[:, tables.L_NEXT] = np.uint64(3)  # every leaf links to leaf 3
    with pytest.raises(ValueError, match="links"):
        MappingTable.from_arrays(corrupt)
    with pytest.raises(ValueError, match="C-contiguous"):
        MappingTable.from_arrays(saved._replace(leaves=saved.leaves[:, ::2]))


def test_warm_up_compiles_every_entry_point() -> None:
    tables.warm_up()
    for kernel in (
        tables.table_map,
        tables.table_unmap,
        tables.table_translate,
        tables.table_translate_batch,
        tables.table_list,
        tables.table_count,
        tables.table_remove_domain,
        tables.directory_rebuild,
    ):
        assert kernel.signatures, kernel


# --- the state machine ----------------------------------------------------------------------------------


@dataclass
class ModelDomain:
    """A domain as a sorted list of starts and a dict of start -> (last, phys, flags)."""

    starts: list[int] = field(default_factory=list)
    entries: dict[int, tuple[int, int, int]] = field(default_factory=dict)

    def overlaps(self, start: int, last: int) -> bool:
        index = bisect.bisect_right(self.starts, last)
        return index > 0 and self.entries[self.starts[index - 1]][0] >= start

    def containing(self, address: int) -> int | None:
        index = bisect.bisect_right(self.starts, address)
        if index and self.entries[self.starts[index - 1]][0] >= address:
            return self.starts[index - 1]
        return None

    def add(self, start: int, last: int, phys: int, flags: int) -> None:
        bisect.insort(self.starts, start)
        self.entries[start] = (last, phys, flags)

    def unmap(self, start: int, last: int) -> tuple[int, int]:
        for edge in (start, last):
            holder = self.containing(edge)
            if holder is not None and (holder < start or self.entries[holder][0] > last):
                return SPLIT, 0
        low = bisect.bisect_left(self.starts, start)
        high = bisect.bisect_right(self.starts, last)
        for gone in self.starts[low:high]:
            del self.entries[gone]
        del self.starts[low:high]
        return OK, high - low


# Pages in a small window so that operations collide often; a few near the top of the address space.
PAGES = 12_000
page_numbers = st.one_of(
    st.integers(0, PAGES - 1), st.integers(MAX_ADDRESS // PAGE - 40, MAX_ADDRESS // PAGE)
)
domain_ids = st.sampled_from([0, 1, 2, MAX_DOMAIN])
flag_values = st.integers(0, 7)


class TableMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.table = MappingTable()
        self.model: dict[int, ModelDomain] = {}
        self.limit = self.table.limit

    def domain(self, domain: int) -> ModelDomain:
        return self.model.setdefault(domain, ModelDomain())

    def total(self) -> int:
        return sum(len(domain.starts) for domain in self.model.values())

    @initialize(limit=st.sampled_from([tables.DEFAULT_LIMIT, 3000, 50]))
    def set_limit(self, limit: int) -> None:
        self.table.limit = limit
        self.limit = limit

    def expect_map(self, domain: int, start: int, last: int, phys: int, flags: int) -> int:
        model = self.domain(domain)
        if model.overlaps(start, last):
            return OVERLAP
        if self.total() >= self.limit:
            return LIMIT
        model.add(start, last, phys, flags)
        return OK

    @rule(domain=domain_ids, first=page_numbers, pages=st.integers(1, 20), flags=flag_values)
    def map_range(self, domain: int, first: int, pages: int, flags: int) -> None:
        start = first * PAGE
        last = min(MAX_ADDRESS, (first + pages) * PAGE - 1)
        phys = (first * 7 % 1000) * PAGE
        expected = self.expect_map(domain, start, last, phys, flags)
        assert self.table.map(domain, start, last, phys, flags) == expected

    @rule(
        domain=domain_ids,
        first=st.integers(0, PAGES - 1),
        count=st.integers(1, 3000),
        order=st.sampled_from(["ascending", "descending", "shuffled"]),
        stride=st.integers(1, 3),
        seed=st.integers(0, 2**16),
    )
    def map_run(self, domain: int, first: int, count: int, order: str, stride: int, seed: int) -> None:
        """Many single pages at once: grows trees deep enough to split and merge internal nodes."""
        numbers = list(range(first, first + count * stride, stride))
        if order == "descending":
            numbers.reverse()
        elif order == "shuffled":
            random.Random(seed).shuffle(numbers)
        for number in numbers:
            start, last = page(number)
            expected = self.expect_map(domain, start, last, start, READ)
            assert self.table.map(domain, start, last, start, READ) == expected

    @rule(domain=domain_ids, first=page_numbers, pages=st.integers(1, 4000), inner=st.integers(0, PAGE - 1))
    def unmap_range(self, domain: int, first: int, pages: int, inner: int) -> None:
        # Mostly page-aligned ranges; sometimes cut inside a page to provoke SPLIT.
        start = first * PAGE + (inner if inner % 3 == 0 else 0)
        last = min(MAX_ADDRESS, (first + pages) * PAGE - 1 - (inner if inner % 5 == 0 else 0))
        if start > last:
            assert self.table.unmap(domain, start, last) == (INVALID, 0)
            return
        assert self.table.unmap(domain, start, last) == self.domain(domain).unmap(start, last)

    @rule(domain=domain_ids)
    def remove_domain(self, domain: int) -> None:
        assert self.table.remove_domain(domain) == len(self.domain(domain).starts)
        self.model[domain] = ModelDomain()

    @rule(domain=domain_ids, number=page_numbers, offset=st.integers(0, PAGE - 1))
    def translate(self, domain: int, number: int, offset: int) -> None:
        address = number * PAGE + offset
        model = self.domain(domain)
        holder = model.containing(address)
        if holder is None:
            assert self.table.translate(domain, address) is None
        else:
            last, phys, flags = model.entries[holder]
            assert self.table.translate(domain, address) == Translation(
                phys + address - holder, flags, holder, last
            )

    @precondition(lambda self: self.total() > 0)
    @rule(seed=st.integers(0, 2**16))
    def translate_batch(self, seed: int) -> None:
        rng = random.Random(seed)
        queries = []
        for _ in range(300):
            domain = rng.choice(list(self.model))
            starts = self.model[domain].starts
            if starts and rng.random() < 0.7:
                holder = rng.choice(starts)
                address = rng.randint(holder, self.model[domain].entries[holder][0])
            else:
                address = rng.choice([rng.randrange(PAGES * PAGE), MAX_ADDRESS, 0])
            queries.append((domain, address))
        domains = np.array([q[0] for q in queries], np.uint32)
        iovas = np.array([q[1] for q in queries], np.uint64)
        out_phys = np.empty(len(queries), np.uint64)
        out_flags = np.empty(len(queries), np.int32)
        hits = self.table.translate_batch(domains, iovas, out_phys, out_flags)
        expected_hits = 0
        for (domain, address), phys, flags in zip(
            queries, out_phys.tolist(), out_flags.tolist(), strict=True
        ):
            model = self.model[domain]
            map_start = model.containing(address)
            if map_start is None:
                assert (phys, flags) == (0, MISS)
            else:
                expected_hits += 1
                _last, map_phys, map_flags = model.entries[map_start]
                assert (phys, flags) == (map_phys + address - map_start, map_flags)
        assert hits == expected_hits

    @rule(domain=domain_ids, number=page_numbers, limit=st.integers(1, 2000))
    def list_page(self, domain: int, number: int, limit: int) -> None:
        start = number * PAGE + 1
        model = self.domain(domain)
        index = bisect.bisect_left(model.starts, start)
        if index and model.entries[model.starts[index - 1]][0] >= start:
            index -= 1
        expected = [Mapping(s, *model.entries[s]) for s in model.starts[index : index + limit]]
        assert list(self.table.mappings(domain, start, limit)) == expected

    @invariant()
    def counts_agree(self) -> None:
        assert self.table.count() == self.total()
        for domain, model in self.model.items():
            assert self.table.count(domain) == len(model.starts)
        assert self.table.domains() == sorted(d for d, m in self.model.items() if m.starts)

    @invariant()
    def structure_holds(self) -> None:
        self.table.verify()


# A quick run by default; TABLES_LONG=1 for a long one (about 100 times as many operations).
LONG_RUN = os.environ.get("TABLES_LONG") == "1"
TableMachine.TestCase.settings = settings(
    max_examples=1000 if LONG_RUN else 30,
    stateful_step_count=80 if LONG_RUN else 25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
test_table_state_machine = TableMachine.TestCase

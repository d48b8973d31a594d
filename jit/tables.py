"""The mapping tables of every domain of one virtio-iommu device: flat numpy arrays and numba kernels.

One table holds the mappings ``[start, last] -> phys`` (inclusive byte addresses, u64) of every domain
(u32 id). Each domain with at least one mapping owns one B+tree whose nodes all come from two shared
pools; a small open-addressing hash table (the directory) maps a domain id to its tree. All state is in
four numpy arrays, so a snapshot is four ``np.save`` calls and a compiled request path can run every
operation given only the arrays:

``leaves``    u64[n_leaves, LEAF_WORDS], one leaf per row::

                  [0]                    number of entries n (0..LEAF_CAPACITY)
                  [1]                    next leaf of the same domain in address order, or NIL
                  [2]                    domain id (for verification and inspection)
                  [3..7]                 reserved
                  [L_STARTS + i]         start of entry i, sorted; UNUSED_KEY in slots i >= n
                  [L_VALUES + 2*i]       last of entry i
                  [L_VALUES + 2*i + 1]   phys | flags of entry i (phys is 4 KiB aligned)

``nodes``     u64[n_nodes, NODE_WORDS], one internal node per row::

                  [0]                    number of children n (2..NODE_FANOUT)
                  [N_KEYS + i]           smallest start in child i's subtree, exact for i >= 1
                                         (slot 0 is never read); UNUSED_KEY in slots i >= n
                  [N_CHILDREN + i]       row of child i in ``nodes``, or in ``leaves`` one level up
                                         from the leaves

``directory`` i64[n_slots, 4], power-of-two rows ``(domain or EMPTY_SLOT, root row, height, count)``;
              height 0 means the root is a leaf. A domain without mappings has no row.

``meta``      i64[META_WORDS]: totals, the mapping limit, high-water marks and free lists of both pools.

Kernels never allocate pool rows they were not given: an operation that might need more rows than are
free returns NEED_SPACE before changing anything, and the owner (``MappingTable``) grows the arrays and
calls again. Statuses are plain ints; no kernel raises.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Final, NamedTuple

import numpy as np
import numpy.typing as npt
from numba import njit, prange

from vhost_iommu.abi import MAP_F_MMIO, MAP_F_READ, MAP_F_WRITE
from vhost_iommu.jit import prefetch as prefetch_module
from vhost_iommu.jit.caching import cache_on_sources
from vhost_iommu.jit.interpreted import compiles, kernel
from vhost_iommu.jit.prefetch import prefetch

# ----------------------------------------------------------------------------------------------------
# Public constants

OK: Final = 0
"""The operation was applied."""
OVERLAP: Final = 1
"""map: the new range overlaps an existing mapping of the domain; nothing changed."""
SPLIT: Final = 2
"""unmap: a mapping straddles the start or the end of the range; nothing removed."""
LIMIT: Final = 3
"""map: the table already holds its maximum number of mappings (the device answers NOMEM)."""
INVALID: Final = 4
"""Arguments no caller may pass: start > last, phys not 4 KiB aligned, flags outside FLAGS_MASK."""
NEED_SPACE: Final = 5
"""Kernel-level only: the pools lack free rows; grow the arrays and retry. ``MappingTable`` never
returns it."""

STATUS_NAMES: Final[dict[int, str]] = {
    OK: "OK",
    OVERLAP: "OVERLAP",
    SPLIT: "SPLIT",
    LIMIT: "LIMIT",
    INVALID: "INVALID",
    NEED_SPACE: "NEED_SPACE",
}

# A mapping's flags are the MAP request's (VIRTIO_IOMMU_MAP_F_*).
READ: Final = MAP_F_READ
WRITE: Final = MAP_F_WRITE
MMIO: Final = MAP_F_MMIO
FLAGS_MASK: Final = 0xFFF
"""Flag bits a mapping can carry. They share a word with phys, so phys must be 4 KiB aligned."""

MISS: Final = -1
"""``out_flags`` value of a query that hit no mapping in ``translate_batch``."""

MAX_ADDRESS: Final = 2**64 - 1
MAX_DOMAIN: Final = 2**32 - 1
DEFAULT_LIMIT: Final = 1 << 24
MAX_LIMIT: Final = 2**63 - 1

# ----------------------------------------------------------------------------------------------------
# Layout (compile-time constants of the kernels; changing one changes the persisted format)

LEAF_CAPACITY: Final = 64
NODE_FANOUT: Final = 64
LEAF_MIN: Final = LEAF_CAPACITY // 4
NODE_MIN: Final = NODE_FANOUT // 4
MAX_HEIGHT: Final = 24
"""Far above any reachable height (each level multiplies the entries by at least NODE_MIN = 16)."""

L_COUNT: Final = 0
L_NEXT: Final = 1
L_DOMAIN: Final = 2
L_STARTS: Final = 8
L_VALUES: Final = L_STARTS + LEAF_CAPACITY
LEAF_WORDS: Final = L_VALUES + 2 * LEAF_CAPACITY

N_COUNT: Final = 0
N_KEYS: Final = 8
N_CHILDREN: Final = N_KEYS + NODE_FANOUT
NODE_WORDS: Final = N_CHILDREN + NODE_FANOUT

D_DOMAIN: Final = 0
D_ROOT: Final = 1
D_HEIGHT: Final = 2
D_COUNT: Final = 3
DIRECTORY_WORDS: Final = 4
EMPTY_SLOT: Final = -1

M_TOTAL: Final = 0
M_LIMIT: Final = 1
M_LEAF_HIGH: Final = 2
M_LEAF_FREE_HEAD: Final = 3
M_LEAF_FREE_COUNT: Final = 4
M_NODE_HIGH: Final = 5
M_NODE_FREE_HEAD: Final = 6
M_NODE_FREE_COUNT: Final = 7
M_DIRECTORY_USED: Final = 8
M_LAYOUT: Final = 9
META_WORDS: Final = 16
LAYOUT_TAG: Final = (LEAF_CAPACITY << 16) | NODE_FANOUT

NIL: Final = -1
UNUSED_KEY: Final = np.uint64(MAX_ADDRESS)
NO_NEXT_LEAF: Final = np.uint64(MAX_ADDRESS)
"""``L_NEXT`` of a domain's last leaf: NIL as a u64 word."""
PHYS_MASK: Final = np.uint64(MAX_ADDRESS ^ FLAGS_MASK)
FLAG_BITS: Final = np.uint64(FLAGS_MASK)
HASH_MULTIPLIER: Final = np.uint64(0x9E3779B97F4A7C15)

LEAF_RESERVE: Final = 1
"""Free leaves a map needs at most (one split)."""
NODE_RESERVE: Final = MAX_HEIGHT + 1
"""Free internal nodes a map needs at most (a split on every level and a new root)."""
DIRECTORY_MAX_LOAD_NUM: Final = 1
DIRECTORY_MAX_LOAD_DEN: Final = 2
"""The directory stays at most half full, which keeps linear probes short."""

BATCH_GROUP: Final = 16
"""Queries that translate_batch walks down the trees in lockstep, so their cache misses overlap."""

Int = int | np.integer[Any]
"""Any integer a kernel takes or returns: numba compiles one specialisation per argument type, and the
kernels convert to int64 (rows, counts) or uint64 (addresses) before mixing them, since numba would
otherwise compute int64 op uint64 in float64."""
Address = int | np.uint64

U64Array = npt.NDArray[np.uint64]
I64Array = npt.NDArray[np.int64]
U32Array = npt.NDArray[np.uint32]
I32Array = npt.NDArray[np.int32]

_ZERO = np.uint64(0)
_SHIFT32 = np.uint64(32)


# ----------------------------------------------------------------------------------------------------
# Directory: domain id -> tree (linear probing, backward-shift deletion, no tombstones)


@njit(cache=True)
def _home_slot(domain: Int, mask: Int) -> Int:
    mixed = (np.uint64(domain) * HASH_MULTIPLIER) >> _SHIFT32
    return np.int64(mixed) & mask


@njit(cache=True)
def directory_find(directory: I64Array, domain: Int) -> Int:
    """Row of ``domain`` in the directory, or -1 if the domain has no mappings."""
    # Empty rows hold EMPTY_SLOT (-1): an id outside u32 must never match one.
    if domain < 0 or domain > MAX_DOMAIN:
        return -1
    mask = directory.shape[0] - 1
    slot = _home_slot(domain, mask)
    # Bounded so that a corrupt (full) directory cannot hang the caller.
    for _ in range(directory.shape[0]):
        held = directory[slot, D_DOMAIN]
        if held == domain:
            return slot
        if held == EMPTY_SLOT:
            return -1
        slot = (slot + 1) & mask
    return -1


@njit(cache=True)
def _directory_insert(directory: I64Array, meta: I64Array, domain: Int, root: Int) -> Int:
    mask = directory.shape[0] - 1
    slot = _home_slot(domain, mask)
    while directory[slot, D_DOMAIN] != EMPTY_SLOT:
        slot = (slot + 1) & mask
    directory[slot, D_DOMAIN] = domain
    directory[slot, D_ROOT] = root
    directory[slot, D_HEIGHT] = 0
    directory[slot, D_COUNT] = 0
    meta[M_DIRECTORY_USED] += 1
    return slot


@njit(cache=True)
def _directory_delete(directory: I64Array, meta: I64Array, slot: Int) -> None:
    mask = directory.shape[0] - 1
    hole = slot
    probe = slot
    while True:
        probe = (probe + 1) & mask
        held = directory[probe, D_DOMAIN]
        if held == EMPTY_SLOT:
            break
        home = _home_slot(held, mask)
        # The entry at `probe` may fill the hole only if its home is not cyclically in (hole, probe].
        stays = (hole < home <= probe) if hole <= probe else (home > hole or home <= probe)
        if not stays:
            for word in range(DIRECTORY_WORDS):
                directory[hole, word] = directory[probe, word]
            hole = probe
    directory[hole, D_DOMAIN] = EMPTY_SLOT
    directory[hole, D_ROOT] = NIL
    directory[hole, D_HEIGHT] = 0
    directory[hole, D_COUNT] = 0
    meta[M_DIRECTORY_USED] -= 1


@njit(cache=True)
def directory_rebuild(old: I64Array, new: I64Array) -> None:
    """Re-insert every row of ``old`` into ``new`` (a larger power of two, filled with EMPTY_SLOT)."""
    mask = new.shape[0] - 1
    for row in range(old.shape[0]):
        domain = old[row, D_DOMAIN]
        if domain == EMPTY_SLOT:
            continue
        slot = _home_slot(domain, mask)
        while new[slot, D_DOMAIN] != EMPTY_SLOT:
            slot = (slot + 1) & mask
        for word in range(DIRECTORY_WORDS):
            new[slot, word] = old[row, word]


# ----------------------------------------------------------------------------------------------------
# Pools


@njit(cache=True)
def free_leaves(leaves: U64Array, meta: I64Array) -> Int:
    """Leaf rows that can still be allocated without growing ``leaves``."""
    return np.int64(leaves.shape[0] - meta[M_LEAF_HIGH] + meta[M_LEAF_FREE_COUNT])


@njit(cache=True)
def free_nodes(nodes: U64Array, meta: I64Array) -> Int:
    """Internal-node rows that can still be allocated without growing ``nodes``."""
    return np.int64(nodes.shape[0] - meta[M_NODE_HIGH] + meta[M_NODE_FREE_COUNT])


@njit(cache=True)
def _alloc_leaf(leaves: U64Array, meta: I64Array, domain: Int) -> Int:
    if meta[M_LEAF_FREE_COUNT] > 0:
        leaf = meta[M_LEAF_FREE_HEAD]
        meta[M_LEAF_FREE_HEAD] = np.int64(leaves[leaf, L_NEXT])
        meta[M_LEAF_FREE_COUNT] -= 1
    else:
        leaf = meta[M_LEAF_HIGH]
        meta[M_LEAF_HIGH] += 1
    leaves[leaf, L_COUNT] = 0
    leaves[leaf, L_NEXT] = NO_NEXT_LEAF
    leaves[leaf, L_DOMAIN] = np.uint64(domain)
    for i in range(LEAF_CAPACITY):
        leaves[leaf, L_STARTS + i] = UNUSED_KEY
    return np.int64(leaf)


@njit(cache=True)
def _free_leaf(leaves: U64Array, meta: I64Array, leaf: Int) -> None:
    leaves[leaf, L_COUNT] = 0
    leaves[leaf, L_NEXT] = np.uint64(meta[M_LEAF_FREE_HEAD])
    meta[M_LEAF_FREE_HEAD] = leaf
    meta[M_LEAF_FREE_COUNT] += 1


@njit(cache=True)
def _alloc_node(nodes: U64Array, meta: I64Array) -> Int:
    if meta[M_NODE_FREE_COUNT] > 0:
        node = meta[M_NODE_FREE_HEAD]
        meta[M_NODE_FREE_HEAD] = np.int64(nodes[node, N_CHILDREN])
        meta[M_NODE_FREE_COUNT] -= 1
    else:
        node = meta[M_NODE_HIGH]
        meta[M_NODE_HIGH] += 1
    nodes[node, N_COUNT] = 0
    for i in range(NODE_FANOUT):
        nodes[node, N_KEYS + i] = UNUSED_KEY
    return np.int64(node)


@njit(cache=True)
def _free_node(nodes: U64Array, meta: I64Array, node: Int) -> None:
    nodes[node, N_COUNT] = 0
    nodes[node, N_CHILDREN] = np.uint64(meta[M_NODE_FREE_HEAD])
    meta[M_NODE_FREE_HEAD] = node
    meta[M_NODE_FREE_COUNT] += 1


# ----------------------------------------------------------------------------------------------------
# Searching


@njit(cache=True)
def _leaf_count(leaves: U64Array, leaf: Int) -> Int:
    return np.int64(leaves[leaf, L_COUNT])


@njit(cache=True)
def _node_count(nodes: U64Array, node: Int) -> Int:
    return np.int64(nodes[node, N_COUNT])


@njit(cache=True)
def _child(nodes: U64Array, node: Int, index: Int) -> Int:
    return np.int64(nodes[node, N_CHILDREN + index])


# Searches count the keys on the wrong side of the target over the whole fixed-size row instead of
# bisecting: unused slots hold UNUSED_KEY, the loop compiles to a handful of vector compares, and every
# cache line of the row is requested at once rather than one after another. At 64 keys this beats a
# binary search's chain of dependent loads and mispredicted branches.


@njit(cache=True)
def _leaf_upper_bound(leaves: U64Array, leaf: Int, count: Int, key: np.uint64) -> Int:
    """Number of entries of ``leaf`` whose start is <= key."""
    below = 0
    for i in range(LEAF_CAPACITY):
        below += leaves[leaf, L_STARTS + i] <= key
    # Unused slots compare <= only for the largest key.
    return min(below, count)


@njit(cache=True)
def _leaf_lower_bound(leaves: U64Array, leaf: Int, count: Int, key: np.uint64) -> Int:
    """Number of entries of ``leaf`` whose start is < key."""
    below = 0
    for i in range(LEAF_CAPACITY):
        below += leaves[leaf, L_STARTS + i] < key
    return below


@njit(cache=True)
def _route(nodes: U64Array, node: Int, count: Int, key: np.uint64) -> Int:
    """Child of ``node`` whose subtree holds ``key``: the last child whose separator is <= key, else 0."""
    # Counting all NODE_FANOUT slots keeps the loop a whole number of vectors; slot 0 (stale, never a
    # separator) is taken back out.
    below = 0
    for i in range(NODE_FANOUT):
        below += nodes[node, N_KEYS + i] <= key
    if nodes[node, N_KEYS] <= key:
        below -= 1
    return min(below, count - 1)


@njit(cache=True)
def _descend(
    nodes: U64Array, root: Int, height: Int, key: np.uint64, path_nodes: I64Array, path_index: I64Array
) -> Int:
    """Leaf whose range holds ``key``, recording the internal nodes and child indices on the way."""
    node = root
    for level in range(height):
        index = _route(nodes, node, _node_count(nodes, node), key)
        path_nodes[level] = node
        path_index[level] = index
        node = _child(nodes, node, index)
    return node


@njit(cache=True)
def _find_leaf(nodes: U64Array, root: Int, height: Int, key: np.uint64) -> Int:
    node = root
    for _ in range(height):
        node = _child(nodes, node, _route(nodes, node, _node_count(nodes, node), key))
    return node


@njit(cache=True)
def _predecessor(
    leaves: U64Array, nodes: U64Array, root: Int, height: Int, key: np.uint64
) -> tuple[Int, Int]:
    """(leaf, index) of the entry with the largest start <= key, or (-1, -1) if there is none."""
    leaf = _find_leaf(nodes, root, height, key)
    index = _leaf_upper_bound(leaves, leaf, _leaf_count(leaves, leaf), key) - 1
    # Separators are exact minima, so an empty prefix means the key lies below the whole domain.
    if index < 0:
        return -1, -1
    return leaf, index


# ----------------------------------------------------------------------------------------------------
# Moving entries and children


@njit(cache=True)
def _move_entries(leaves: U64Array, source: Int, source_at: Int, target: Int, target_at: Int, n: Int) -> None:
    """Copy n entries; correct when source and target rows are the same and the ranges overlap."""
    if source == target and target_at > source_at:
        for i in range(n - 1, -1, -1):
            leaves[target, L_STARTS + target_at + i] = leaves[source, L_STARTS + source_at + i]
            leaves[target, L_VALUES + 2 * (target_at + i)] = leaves[source, L_VALUES + 2 * (source_at + i)]
            leaves[target, L_VALUES + 2 * (target_at + i) + 1] = leaves[
                source, L_VALUES + 2 * (source_at + i) + 1
            ]
    else:
        for i in range(n):
            leaves[target, L_STARTS + target_at + i] = leaves[source, L_STARTS + source_at + i]
            leaves[target, L_VALUES + 2 * (target_at + i)] = leaves[source, L_VALUES + 2 * (source_at + i)]
            leaves[target, L_VALUES + 2 * (target_at + i) + 1] = leaves[
                source, L_VALUES + 2 * (source_at + i) + 1
            ]


@njit(cache=True)
def _clear_entries(leaves: U64Array, leaf: Int, begin: Int, end: Int) -> None:
    # Unused slots hold UNUSED_KEY so that fixed-length branch-free searches never stop in them.
    for i in range(begin, end):
        leaves[leaf, L_STARTS + i] = UNUSED_KEY


@njit(cache=True)
def _insert_entry(
    leaves: U64Array, leaf: Int, at: Int, start: np.uint64, last: np.uint64, phys_flags: np.uint64
) -> None:
    count = _leaf_count(leaves, leaf)
    _move_entries(leaves, leaf, at, leaf, at + 1, count - at)
    leaves[leaf, L_STARTS + at] = start
    leaves[leaf, L_VALUES + 2 * at] = last
    leaves[leaf, L_VALUES + 2 * at + 1] = phys_flags
    leaves[leaf, L_COUNT] = count + 1


@njit(cache=True)
def _move_children(nodes: U64Array, source: Int, source_at: Int, target: Int, target_at: Int, n: Int) -> None:
    if source == target and target_at > source_at:
        for i in range(n - 1, -1, -1):
            nodes[target, N_KEYS + target_at + i] = nodes[source, N_KEYS + source_at + i]
            nodes[target, N_CHILDREN + target_at + i] = nodes[source, N_CHILDREN + source_at + i]
    else:
        for i in range(n):
            nodes[target, N_KEYS + target_at + i] = nodes[source, N_KEYS + source_at + i]
            nodes[target, N_CHILDREN + target_at + i] = nodes[source, N_CHILDREN + source_at + i]


@njit(cache=True)
def _clear_children(nodes: U64Array, node: Int, begin: Int, end: Int) -> None:
    for i in range(begin, end):
        nodes[node, N_KEYS + i] = UNUSED_KEY


@njit(cache=True)
def _insert_child(nodes: U64Array, node: Int, at: Int, key: np.uint64, child: Int) -> None:
    count = _node_count(nodes, node)
    _move_children(nodes, node, at, node, at + 1, count - at)
    nodes[node, N_KEYS + at] = key
    nodes[node, N_CHILDREN + at] = np.uint64(child)
    nodes[node, N_COUNT] = count + 1


@njit(cache=True)
def _remove_child(nodes: U64Array, node: Int, at: Int) -> None:
    count = _node_count(nodes, node)
    _move_children(nodes, node, at + 1, node, at, count - at - 1)
    _clear_children(nodes, node, count - 1, count)
    nodes[node, N_COUNT] = count - 1


@njit(cache=True)
def _set_subtree_minimum(
    nodes: U64Array, path_nodes: I64Array, path_index: I64Array, level: Int, minimum: np.uint64
) -> None:
    """Record a new smallest start for the subtree hanging at path depth ``level``.

    The separator of a subtree lives in the nearest ancestor where the path does not take child 0.
    """
    for up in range(level - 1, -1, -1):
        index = path_index[up]
        if index > 0:
            nodes[path_nodes[up], N_KEYS + index] = minimum
            return


# ----------------------------------------------------------------------------------------------------
# map


@njit(cache=True)
def _insert_into_parents(
    nodes: U64Array,
    directory: I64Array,
    meta: I64Array,
    slot: Int,
    path_nodes: I64Array,
    path_index: I64Array,
    height: Int,
    separator: np.uint64,
    new_child: Int,
) -> None:
    """Hang ``new_child`` right of the path's child at the lowest level, splitting nodes upwards."""
    for level in range(height - 1, -1, -1):
        node = path_nodes[int(level)]
        at = path_index[level] + 1
        count = _node_count(nodes, node)
        if count < NODE_FANOUT:
            _insert_child(nodes, node, at, separator, new_child)
            return
        # Always split in the middle: nodes are a small share of the memory, and the deletion rules
        # rely on every non-root node keeping at least two children.
        sibling = _alloc_node(nodes, meta)
        middle = count // 2
        _move_children(nodes, node, middle, sibling, 0, count - middle)
        _clear_children(nodes, node, middle, count)
        nodes[node, N_COUNT] = middle
        nodes[sibling, N_COUNT] = count - middle
        if at <= middle:
            _insert_child(nodes, node, at, separator, new_child)
        else:
            _insert_child(nodes, sibling, at - middle, separator, new_child)
        separator = nodes[sibling, N_KEYS]
        new_child = sibling
    # The root itself split: grow the tree by one level.
    old_root = directory[slot, D_ROOT]
    root = _alloc_node(nodes, meta)
    nodes[root, N_KEYS] = _ZERO
    nodes[root, N_CHILDREN] = np.uint64(old_root)
    nodes[root, N_KEYS + 1] = separator
    nodes[root, N_CHILDREN + 1] = np.uint64(new_child)
    nodes[root, N_COUNT] = 2
    directory[slot, D_ROOT] = root
    directory[slot, D_HEIGHT] = height + 1


@njit(cache=True)
def _shift_into_sibling(
    leaves: U64Array,
    nodes: U64Array,
    path_nodes: I64Array,
    path_index: I64Array,
    height: Int,
    leaf: Int,
    at: Int,
    start: np.uint64,
    last: np.uint64,
    phys_flags: np.uint64,
) -> bool:
    """Make room in a full leaf by moving entries to a sibling under the same parent (B*-tree style,
    which keeps leaves fuller than plain splitting), then insert. False if both siblings are full."""
    parent = path_nodes[int(height) - 1]
    index = path_index[int(height) - 1]
    parent_count = _node_count(nodes, parent)
    count = _leaf_count(leaves, leaf)
    if index + 1 < parent_count:
        right = _child(nodes, parent, index + 1)
        right_count = _leaf_count(leaves, right)
        if right_count < LEAF_CAPACITY - 1:
            moved = (LEAF_CAPACITY - right_count + 1) // 2
            _move_entries(leaves, right, 0, right, moved, right_count)
            _move_entries(leaves, leaf, count - moved, right, 0, moved)
            _clear_entries(leaves, leaf, count - moved, count)
            leaves[leaf, L_COUNT] = count - moved
            leaves[right, L_COUNT] = right_count + moved
            nodes[parent, N_KEYS + index + 1] = leaves[right, L_STARTS]
            # A new entry landing exactly at the boundary stays left: the separator is right's first start.
            if at <= count - moved:
                _insert_entry(leaves, leaf, at, start, last, phys_flags)
            else:
                _insert_entry(leaves, right, at - (count - moved), start, last, phys_flags)
            return True
    if index > 0:
        left = _child(nodes, parent, index - 1)
        left_count = _leaf_count(leaves, left)
        if left_count < LEAF_CAPACITY - 1:
            moved = (LEAF_CAPACITY - left_count + 1) // 2
            _move_entries(leaves, leaf, 0, left, left_count, moved)
            _move_entries(leaves, leaf, moved, leaf, 0, count - moved)
            _clear_entries(leaves, leaf, count - moved, count)
            leaves[leaf, L_COUNT] = count - moved
            leaves[left, L_COUNT] = left_count + moved
            nodes[parent, N_KEYS + index] = leaves[leaf, L_STARTS]
            if at <= moved:
                _insert_entry(leaves, left, left_count + at, start, last, phys_flags)
            else:
                _insert_entry(leaves, leaf, at - moved, start, last, phys_flags)
            return True
    return False


@njit(cache=True)
def _split_two_into_three(
    leaves: U64Array,
    nodes: U64Array,
    directory: I64Array,
    meta: I64Array,
    slot: Int,
    path_nodes: I64Array,
    path_index: I64Array,
    height: Int,
    leaf: Int,
    domain: Int,
) -> None:
    """Spread ``leaf`` and a neighbour under the same parent (both nearly full) over three leaves, a
    new one in the middle, each about two thirds full."""
    parent = path_nodes[int(height) - 1]
    index = path_index[int(height) - 1]
    # (left, right) are the pair; the new leaf goes between them, at right's place in the parent.
    right_index = index + 1 if index + 1 < _node_count(nodes, parent) else index
    left = _child(nodes, parent, right_index - 1)
    right = _child(nodes, parent, right_index)
    left_count = _leaf_count(leaves, left)
    right_count = _leaf_count(leaves, right)
    third = (left_count + right_count) // 3
    from_left = left_count - third
    from_right = third - from_left
    middle = _alloc_leaf(leaves, meta, domain)
    _move_entries(leaves, left, third, middle, 0, from_left)
    _clear_entries(leaves, left, third, left_count)
    _move_entries(leaves, right, 0, middle, from_left, from_right)
    _move_entries(leaves, right, from_right, right, 0, right_count - from_right)
    _clear_entries(leaves, right, right_count - from_right, right_count)
    leaves[left, L_COUNT] = third
    leaves[middle, L_COUNT] = third
    leaves[right, L_COUNT] = right_count - from_right
    leaves[middle, L_NEXT] = np.uint64(right)
    leaves[left, L_NEXT] = np.uint64(middle)
    nodes[parent, N_KEYS + right_index] = leaves[right, L_STARTS]
    path_index[int(height) - 1] = right_index - 1
    _insert_into_parents(
        nodes, directory, meta, slot, path_nodes, path_index, height, leaves[middle, L_STARTS], middle
    )


@njit(cache=True)
def table_map(
    leaves: U64Array,
    nodes: U64Array,
    directory: I64Array,
    meta: I64Array,
    domain: Int,
    start: Address,
    last: Address,
    phys: Address,
    flags: Address,
) -> Int:
    """Add the mapping [start, last] -> phys with ``flags`` to ``domain``.

    Returns OK, OVERLAP (touches an existing mapping of the domain), LIMIT, INVALID or NEED_SPACE;
    on any status but OK nothing changed.
    """
    domain = np.int64(domain)
    start = np.uint64(start)
    last = np.uint64(last)
    phys = np.uint64(phys)
    flags = np.uint64(flags)
    if start > last or (phys & FLAG_BITS) != _ZERO or (flags & ~FLAG_BITS) != _ZERO:
        return INVALID
    if domain < 0 or domain > MAX_DOMAIN:
        return INVALID
    phys_flags = phys | flags
    slot = directory_find(directory, domain)
    if slot < 0:
        if meta[M_TOTAL] >= meta[M_LIMIT]:
            return LIMIT
        room = directory.shape[0] * DIRECTORY_MAX_LOAD_NUM // DIRECTORY_MAX_LOAD_DEN
        if meta[M_DIRECTORY_USED] + 1 > room or free_leaves(leaves, meta) < LEAF_RESERVE:
            return NEED_SPACE
        leaf = _alloc_leaf(leaves, meta, domain)
        slot = _directory_insert(directory, meta, domain, leaf)
        _insert_entry(leaves, leaf, 0, start, last, phys_flags)
        directory[slot, D_COUNT] = 1
        meta[M_TOTAL] += 1
        return OK

    root = directory[slot, D_ROOT]
    height = directory[slot, D_HEIGHT]
    path_nodes = np.empty(MAX_HEIGHT, np.int64)
    path_index = np.empty(MAX_HEIGHT, np.int64)
    leaf = _descend(nodes, root, height, start, path_nodes, path_index)
    count = _leaf_count(leaves, leaf)
    at = _leaf_upper_bound(leaves, leaf, count, start)
    # Exact separators mean at == 0 only in the domain's first leaf: no predecessor elsewhere.
    if at > 0 and leaves[leaf, L_VALUES + 2 * (at - 1)] >= start:
        return OVERLAP
    if at < count:
        if leaves[leaf, L_STARTS + at] <= last:
            return OVERLAP
    else:
        following = np.int64(leaves[leaf, L_NEXT])
        if following != NIL and leaves[following, L_STARTS] <= last:
            return OVERLAP
    if meta[M_TOTAL] >= meta[M_LIMIT]:
        return LIMIT

    if count == LEAF_CAPACITY:
        if free_leaves(leaves, meta) < LEAF_RESERVE or free_nodes(nodes, meta) < height + 1:
            return NEED_SPACE
        if height > 0:
            if _shift_into_sibling(
                leaves, nodes, path_nodes, path_index, height, leaf, at, start, last, phys_flags
            ):
                directory[slot, D_COUNT] += 1
                meta[M_TOTAL] += 1
                return OK
            if 0 < at < count:
                # Both neighbours are full too: spread this leaf and one neighbour over three leaves
                # (two thirds full each, where splitting one leaf would leave two halves), then insert
                # into whichever now holds the place.
                _split_two_into_three(
                    leaves, nodes, directory, meta, slot, path_nodes, path_index, height, leaf, domain
                )
                height = directory[slot, D_HEIGHT]
                leaf = _descend(nodes, directory[slot, D_ROOT], height, start, path_nodes, path_index)
                count = _leaf_count(leaves, leaf)
                at = _leaf_upper_bound(leaves, leaf, count, start)
    if count < LEAF_CAPACITY:
        _insert_entry(leaves, leaf, at, start, last, phys_flags)
    else:
        # Inserting at an edge of the leaf (ascending and descending runs: Linux allocates IOVAs
        # top-down), split right there so that runs fill leaves completely; a lone root leaf splits in
        # the middle otherwise. An edge split leaves a one-entry leaf, but only next to full ones, since
        # a neighbour with room would have taken entries above.
        sibling = _alloc_leaf(leaves, meta, domain)
        middle = at if at == 0 or at == count else count // 2
        _move_entries(leaves, leaf, middle, sibling, 0, count - middle)
        _clear_entries(leaves, leaf, middle, count)
        leaves[leaf, L_COUNT] = middle
        leaves[sibling, L_COUNT] = count - middle
        if at <= middle < count:
            _insert_entry(leaves, leaf, at, start, last, phys_flags)
        else:
            _insert_entry(leaves, sibling, at - middle, start, last, phys_flags)
        leaves[sibling, L_NEXT] = leaves[leaf, L_NEXT]
        leaves[leaf, L_NEXT] = np.uint64(sibling)
        _insert_into_parents(
            nodes,
            directory,
            meta,
            slot,
            path_nodes,
            path_index,
            height,
            leaves[sibling, L_STARTS],
            sibling,
        )
    directory[slot, D_COUNT] += 1
    meta[M_TOTAL] += 1
    return OK


# ----------------------------------------------------------------------------------------------------
# unmap


@njit(cache=True)
def _rebalance_nodes(
    nodes: U64Array,
    directory: I64Array,
    meta: I64Array,
    slot: Int,
    path_nodes: I64Array,
    path_index: I64Array,
    level: Int,
) -> None:
    """Restore the fill rule of internal node ``path_nodes[level]`` and of its ancestors."""
    while level >= 0:
        node = path_nodes[int(level)]
        count = _node_count(nodes, node)
        if level == 0:
            if count == 1:
                directory[slot, D_ROOT] = _child(nodes, node, 0)
                directory[slot, D_HEIGHT] -= 1
                _free_node(nodes, meta, node)
            return
        if count >= NODE_MIN:
            return
        parent = path_nodes[int(level) - 1]
        index = path_index[int(level) - 1]
        left_index = index - 1 if index > 0 else 0
        left = _child(nodes, parent, left_index)
        right = _child(nodes, parent, left_index + 1)
        left_count = _node_count(nodes, left)
        right_count = _node_count(nodes, right)
        separator = nodes[parent, N_KEYS + left_index + 1]
        if left_count + right_count <= NODE_FANOUT:
            # Right's slot 0 key is stale; the parent's separator is its exact value.
            _move_children(nodes, right, 0, left, left_count, right_count)
            nodes[left, N_KEYS + left_count] = separator
            nodes[left, N_COUNT] = left_count + right_count
            _free_node(nodes, meta, right)
            _remove_child(nodes, parent, left_index + 1)
            level -= 1
            continue
        if left_count < right_count:
            moved = (right_count - left_count) // 2
            _move_children(nodes, right, 0, left, left_count, moved)
            nodes[left, N_KEYS + left_count] = separator
            nodes[parent, N_KEYS + left_index + 1] = nodes[right, N_KEYS + moved]
            _move_children(nodes, right, moved, right, 0, right_count - moved)
            _clear_children(nodes, right, right_count - moved, right_count)
        else:
            moved = (left_count - right_count) // 2
            _move_children(nodes, right, 0, right, moved, right_count)
            nodes[right, N_KEYS + moved] = separator
            _move_children(nodes, left, left_count - moved, right, 0, moved)
            _clear_children(nodes, left, left_count - moved, left_count)
            nodes[parent, N_KEYS + left_index + 1] = nodes[right, N_KEYS]
            moved = -moved
        nodes[left, N_COUNT] = left_count + moved
        nodes[right, N_COUNT] = right_count - moved
        return


@njit(cache=True)
def _rebalance_leaf(
    leaves: U64Array,
    nodes: U64Array,
    directory: I64Array,
    meta: I64Array,
    slot: Int,
    path_nodes: I64Array,
    path_index: I64Array,
    height: Int,
    leaf: Int,
) -> None:
    """After entries left ``leaf``: free it if the domain is empty, else merge or refill it from a
    sibling if it fell below LEAF_MIN, so that unmapped memory returns to the pool."""
    count = _leaf_count(leaves, leaf)
    if height == 0:
        if count == 0:
            _free_leaf(leaves, meta, leaf)
            _directory_delete(directory, meta, slot)
        return
    if count >= LEAF_MIN:
        return
    parent = path_nodes[int(height) - 1]
    index = path_index[int(height) - 1]
    left_index = index - 1 if index > 0 else 0
    left = _child(nodes, parent, left_index)
    right = _child(nodes, parent, left_index + 1)
    left_count = _leaf_count(leaves, left)
    right_count = _leaf_count(leaves, right)
    if left_count + right_count <= LEAF_CAPACITY:
        _move_entries(leaves, right, 0, left, left_count, right_count)
        leaves[left, L_COUNT] = left_count + right_count
        leaves[left, L_NEXT] = leaves[right, L_NEXT]
        if left_count == 0:
            # `left` is the emptied leaf at child 0: its subtree minimum is now right's first start.
            _set_subtree_minimum(nodes, path_nodes, path_index, height, leaves[left, L_STARTS])
        _free_leaf(leaves, meta, right)
        _remove_child(nodes, parent, left_index + 1)
        _rebalance_nodes(nodes, directory, meta, slot, path_nodes, path_index, height - 1)
        return
    if left_count < right_count:
        moved = (right_count - left_count) // 2
        _move_entries(leaves, right, 0, left, left_count, moved)
        _move_entries(leaves, right, moved, right, 0, right_count - moved)
        _clear_entries(leaves, right, right_count - moved, right_count)
        leaves[left, L_COUNT] = left_count + moved
        leaves[right, L_COUNT] = right_count - moved
    else:
        moved = (left_count - right_count) // 2
        _move_entries(leaves, right, 0, right, moved, right_count)
        _move_entries(leaves, left, left_count - moved, right, 0, moved)
        _clear_entries(leaves, left, left_count - moved, left_count)
        leaves[left, L_COUNT] = left_count - moved
        leaves[right, L_COUNT] = right_count + moved
    nodes[parent, N_KEYS + left_index + 1] = leaves[right, L_STARTS]


@njit(cache=True)
def table_unmap(
    leaves: U64Array,
    nodes: U64Array,
    directory: I64Array,
    meta: I64Array,
    domain: Int,
    start: Address,
    last: Address,
) -> tuple[Int, Int]:
    """Remove every mapping of ``domain`` lying wholly inside [start, last].

    Returns (status, removed): (SPLIT, 0) if a mapping straddles start or last, and then nothing is
    removed; (INVALID, 0) if start > last; else (OK, removed), with removed == 0 for an empty range.
    """
    domain = np.int64(domain)
    start = np.uint64(start)
    last = np.uint64(last)
    if start > last or domain < 0 or domain > MAX_DOMAIN:
        return INVALID, 0
    slot = directory_find(directory, domain)
    if slot < 0:
        return OK, 0
    root = directory[slot, D_ROOT]
    height = directory[slot, D_HEIGHT]
    path_nodes = np.empty(MAX_HEIGHT, np.int64)
    path_index = np.empty(MAX_HEIGHT, np.int64)
    leaf = _descend(nodes, root, height, start, path_nodes, path_index)
    count = _leaf_count(leaves, leaf)
    # The mapping with the largest start <= start is in this leaf (exact separators), if anywhere.
    at_or_below = _leaf_upper_bound(leaves, leaf, count, start)
    if at_or_below > 0:
        index = at_or_below - 1
        if leaves[leaf, L_STARTS + index] < start and leaves[leaf, L_VALUES + 2 * index] >= start:
            return SPLIT, 0
    # The mapping with the largest start <= last: in this leaf too unless the range runs past it.
    within = _leaf_upper_bound(leaves, leaf, count, last)
    following = np.int64(leaves[leaf, L_NEXT])
    if within == count and following != NIL and leaves[following, L_STARTS] <= last:
        other, index = _predecessor(leaves, nodes, root, height, last)
    else:
        other, index = leaf, within - 1
    if index >= 0 and leaves[other, L_STARTS + index] >= start and leaves[other, L_VALUES + 2 * index] > last:
        return SPLIT, 0

    # Every mapping starting in [start, last] now also ends in it. Remove them a leaf-run at a time,
    # re-descending after each run but the first because rebalancing may have reshaped the path.
    removed = 0
    descended = True
    while True:
        if not descended:
            slot = directory_find(directory, domain)
            if slot < 0:
                break
            root = directory[slot, D_ROOT]
            height = directory[slot, D_HEIGHT]
            leaf = _descend(nodes, root, height, start, path_nodes, path_index)
            count = _leaf_count(leaves, leaf)
        descended = False
        begin = _leaf_lower_bound(leaves, leaf, count, start)
        if begin == count:
            following = np.int64(leaves[leaf, L_NEXT])
            if following == NIL or leaves[following, L_STARTS] > last:
                break
            leaf = _descend(nodes, root, height, leaves[following, L_STARTS], path_nodes, path_index)
            count = _leaf_count(leaves, leaf)
            begin = 0
        end = _leaf_upper_bound(leaves, leaf, count, last)
        if end <= begin:
            break
        run = end - begin
        _move_entries(leaves, leaf, end, leaf, begin, count - end)
        _clear_entries(leaves, leaf, count - run, count)
        leaves[leaf, L_COUNT] = count - run
        removed += run
        directory[slot, D_COUNT] -= run
        meta[M_TOTAL] -= run
        if begin == 0 and count - run > 0 and height > 0:
            _set_subtree_minimum(nodes, path_nodes, path_index, height, leaves[leaf, L_STARTS])
        _rebalance_leaf(leaves, nodes, directory, meta, slot, path_nodes, path_index, height, leaf)
        if end < count:
            break
    return OK, removed


# ----------------------------------------------------------------------------------------------------
# Lookups


@njit(cache=True)
def table_locate(
    leaves: U64Array, nodes: U64Array, directory: I64Array, domain: Int, iova: Address
) -> tuple[Int, Int]:
    """(leaf, index) of the mapping of ``domain`` that contains ``iova``, or (NIL, NIL)."""
    domain = np.int64(domain)
    iova = np.uint64(iova)
    slot = directory_find(directory, domain)
    if slot >= 0:
        leaf = _find_leaf(nodes, directory[slot, D_ROOT], directory[slot, D_HEIGHT], iova)
        index = _leaf_upper_bound(leaves, leaf, _leaf_count(leaves, leaf), iova) - 1
        if index >= 0 and iova <= leaves[leaf, L_VALUES + 2 * index]:
            return leaf, index
    return np.int64(NIL), np.int64(NIL)


@njit(cache=True)
def table_following(leaves: U64Array, leaf: Int, index: Int) -> tuple[Int, Int]:
    """(leaf, index) of the mapping after entry ``index`` of ``leaf`` in address order, same domain, or
    (NIL, NIL). A position is valid only until the table next changes."""
    index = np.int64(index) + 1
    if index < _leaf_count(leaves, leaf):
        return np.int64(leaf), index
    following = np.int64(leaves[leaf, L_NEXT])
    if following == NIL:
        return np.int64(NIL), np.int64(NIL)
    return following, np.int64(0)


@njit(cache=True)
def table_entry(leaves: U64Array, leaf: Int, index: Int) -> tuple[np.uint64, np.uint64, np.uint64, np.int64]:
    """(start, last, phys of the start, flags) of entry ``index`` of ``leaf``."""
    phys_flags = leaves[leaf, L_VALUES + 2 * index + 1]
    return (
        leaves[leaf, L_STARTS + index],
        leaves[leaf, L_VALUES + 2 * index],
        phys_flags & PHYS_MASK,
        np.int64(phys_flags & FLAG_BITS),
    )


@njit(cache=True)
def table_translate(
    leaves: U64Array, nodes: U64Array, directory: I64Array, domain: Int, iova: Address
) -> tuple[bool, np.uint64, np.int64, np.uint64, np.uint64]:
    """(hit, phys, flags, map_start, map_last) for one address; on a miss hit is False and the rest 0."""
    iova = np.uint64(iova)
    leaf, index = table_locate(leaves, nodes, directory, domain, iova)
    if leaf == NIL:
        return False, _ZERO, np.int64(0), _ZERO, _ZERO
    map_start, map_last, phys, flags = table_entry(leaves, leaf, index)
    return True, phys + (iova - map_start), flags, map_start, map_last


@njit(cache=True)
def table_translate_batch(
    leaves: U64Array,
    nodes: U64Array,
    directory: I64Array,
    domains: U32Array,
    iovas: U64Array,
    out_phys: U64Array,
    out_flags: I32Array,
) -> Int:
    """Translate ``iovas[i]`` in ``domains[i]`` for every i; returns the number of hits.

    Misses get out_phys 0 and out_flags MISS. At a million mappings the leaves outgrow the caches and a
    lookup is mostly waiting for memory, so queries go through in groups of BATCH_GROUP along a
    three-stage pipeline: while one group walks the (cached) internal nodes and prefetches the key lines
    of its leaves, the group before it searches its keys, already on their way, and prefetches its
    entries, and the group before that reads them.
    """
    total = min(domains.shape[0], iovas.shape[0], out_phys.shape[0], out_flags.shape[0])
    descending = np.empty(BATCH_GROUP, np.int64)
    searching = np.empty(BATCH_GROUP, np.int64)
    reading = np.empty(BATCH_GROUP, np.int64)
    found_index = np.empty(BATCH_GROUP, np.int64)
    levels = np.empty(BATCH_GROUP, np.int64)
    groups = (total + BATCH_GROUP - 1) // BATCH_GROUP
    hits = 0
    cached_domain = np.int64(-1)
    cached_root = np.int64(NIL)
    cached_height = np.int64(0)
    for step in range(groups + 2):
        # Stage 3, group step - 2: read the entries found, now in cache.
        if step >= 2:
            first = (step - 2) * BATCH_GROUP
            for q in range(min(BATCH_GROUP, total - first)):
                out = first + q
                iova = iovas[out]
                leaf = reading[q]
                index = found_index[q]
                if index >= 0 and iova <= leaves[leaf, L_VALUES + 2 * index]:
                    map_start = leaves[leaf, L_STARTS + index]
                    phys_flags = leaves[leaf, L_VALUES + 2 * index + 1]
                    out_phys[out] = (phys_flags & PHYS_MASK) + (iova - map_start)
                    out_flags[out] = np.int32(phys_flags & FLAG_BITS)
                    hits += 1
                else:
                    out_phys[out] = _ZERO
                    out_flags[out] = MISS
        # Stage 2, group step - 1: search the leaves' keys; ask for the entries' line.
        if 1 <= step <= groups:
            first = (step - 1) * BATCH_GROUP
            for q in range(min(BATCH_GROUP, total - first)):
                iova = iovas[first + q]
                leaf = searching[q]
                index = -1
                if leaf >= 0:
                    index = _leaf_upper_bound(leaves, leaf, LEAF_CAPACITY, iova) - 1
                    if iova == UNUSED_KEY:
                        index = _leaf_count(leaves, leaf) - 1
                    if index >= 0:
                        prefetch(leaves, leaf, L_VALUES + 2 * index)
                found_index[q] = index
        # Stage 1, group step: walk the internal nodes; ask for the leaves' key lines.
        if step < groups:
            first = step * BATCH_GROUP
            size = min(BATCH_GROUP, total - first)
            deepest = np.int64(0)
            for q in range(size):
                domain = np.int64(domains[first + q])
                # Batches are mostly one domain: skip the directory probe when it repeats.
                if domain != cached_domain:
                    slot = directory_find(directory, domain)
                    cached_domain = domain
                    cached_root = np.int64(directory[slot, D_ROOT] if slot >= 0 else NIL)
                    cached_height = np.int64(directory[slot, D_HEIGHT] if slot >= 0 else 0)
                descending[q] = cached_root
                levels[q] = cached_height
                if cached_height > deepest:
                    deepest = cached_height
            for level in range(deepest):
                for q in range(size):
                    if levels[q] > level:
                        node = descending[q]
                        iova = iovas[first + q]
                        index = _route(nodes, node, NODE_FANOUT, iova)
                        if iova == UNUSED_KEY:
                            index = _node_count(nodes, node) - 1
                        descending[q] = _child(nodes, node, index)
            for q in range(size):
                if descending[q] >= 0:
                    for line in range(0, LEAF_CAPACITY, 8):
                        prefetch(leaves, descending[q], L_STARTS + line)
        descending, searching, reading = reading, descending, searching
    return hits


@njit(cache=True, parallel=True)
def table_translate_batch_parallel(
    leaves: U64Array,
    nodes: U64Array,
    directory: I64Array,
    domains: U32Array,
    iovas: U64Array,
    out_phys: U64Array,
    out_flags: I32Array,
    workers: Int,
) -> Int:
    """:func:`table_translate_batch` with the queries cut into ``workers`` slices served on as many
    threads: at a million mappings one core waits on memory, and every core can wait at the same time."""
    total = min(domains.shape[0], iovas.shape[0], out_phys.shape[0], out_flags.shape[0])
    slices = max(1, min(workers, total // BATCH_GROUP + 1))
    length = (total + slices - 1) // slices
    hits = np.zeros(slices, np.int64)
    for slice_index in prange(slices):
        first = slice_index * length
        last = min(total, first + length)
        if first < last:
            hits[slice_index] = table_translate_batch(
                leaves,
                nodes,
                directory,
                domains[first:last],
                iovas[first:last],
                out_phys[first:last],
                out_flags[first:last],
            )
    return hits.sum()  # type: ignore[no-any-return]


@njit(cache=True)
def table_list(
    leaves: U64Array,
    nodes: U64Array,
    directory: I64Array,
    domain: Int,
    start: Address,
    out_starts: U64Array,
    out_lasts: U64Array,
    out_phys: U64Array,
    out_flags: I32Array,
) -> Int:
    """Copy the mappings of ``domain`` that end at or after ``start``, in address order, into the out
    arrays (as many as fit); returns how many were copied."""
    domain = np.int64(domain)
    start = np.uint64(start)
    room = min(out_starts.shape[0], out_lasts.shape[0], out_phys.shape[0], out_flags.shape[0])
    slot = directory_find(directory, domain)
    if slot < 0 or room == 0:
        return 0
    leaf = _find_leaf(nodes, directory[slot, D_ROOT], directory[slot, D_HEIGHT], start)
    index = _leaf_upper_bound(leaves, leaf, _leaf_count(leaves, leaf), start) - 1
    # Start from the mapping holding `start` if there is one, else from the first one above it.
    if index < 0 or leaves[leaf, L_VALUES + 2 * index] < start:
        index += 1
    copied = 0
    while leaf != NIL and copied < room:
        count = _leaf_count(leaves, leaf)
        while index < count and copied < room:
            phys_flags = leaves[leaf, L_VALUES + 2 * index + 1]
            out_starts[copied] = leaves[leaf, L_STARTS + index]
            out_lasts[copied] = leaves[leaf, L_VALUES + 2 * index]
            out_phys[copied] = phys_flags & PHYS_MASK
            out_flags[copied] = np.int32(phys_flags & FLAG_BITS)
            copied += 1
            index += 1
        leaf = np.int64(leaves[leaf, L_NEXT])
        index = 0
    return copied


@njit(cache=True)
def table_count(directory: I64Array, meta: I64Array, domain: Int) -> Int:
    """Mappings of ``domain``; of the whole table if domain < 0."""
    if domain < 0:
        return np.int64(meta[M_TOTAL])
    slot = directory_find(directory, np.int64(domain))
    return 0 if slot < 0 else directory[slot, D_COUNT]


@njit(cache=True)
def table_remove_domain(
    leaves: U64Array, nodes: U64Array, directory: I64Array, meta: I64Array, domain: Int
) -> Int:
    """Remove every mapping of ``domain`` and return its rows to the pools; returns how many."""
    domain = np.int64(domain)
    slot = directory_find(directory, domain)
    if slot < 0:
        return 0
    removed = directory[slot, D_COUNT]
    root = directory[slot, D_ROOT]
    height = directory[slot, D_HEIGHT]
    # Depth-first over the internal nodes with an explicit stack of (node, next child) per level.
    stack_nodes = np.empty(MAX_HEIGHT, np.int64)
    stack_next = np.empty(MAX_HEIGHT, np.int64)
    if height == 0:
        _free_leaf(leaves, meta, root)
    else:
        depth = 0
        stack_nodes[0] = root
        stack_next[0] = 0
        while depth >= 0:
            node = stack_nodes[depth]
            index = stack_next[depth]
            if index == _node_count(nodes, node):
                _free_node(nodes, meta, node)
                depth -= 1
                continue
            stack_next[depth] = index + 1
            child = _child(nodes, node, index)
            if depth + 1 == height:
                _free_leaf(leaves, meta, child)
            else:
                depth += 1
                stack_nodes[depth] = child
                stack_next[depth] = 0
    _directory_delete(directory, meta, slot)
    meta[M_TOTAL] -= removed
    return np.int64(removed)


# ----------------------------------------------------------------------------------------------------
# Packed entry points of the owner's single operations: scalars in (and results out) through one
# uint64 array, which Python hands to numba much faster than separate numpy scalars.

REQUEST_WORDS: Final = 8


@njit(cache=True)
def _map_request(
    leaves: U64Array, nodes: U64Array, directory: I64Array, meta: I64Array, request: U64Array
) -> Int:
    """request: (domain, start, last, phys, flags)."""
    return table_map(
        leaves, nodes, directory, meta, np.int64(request[0]), request[1], request[2], request[3], request[4]
    )


@njit(cache=True)
def _unmap_request(
    leaves: U64Array, nodes: U64Array, directory: I64Array, meta: I64Array, request: U64Array
) -> Int:
    """request: (domain, start, last) in, (removed) out; returns the status."""
    status, removed = table_unmap(
        leaves, nodes, directory, meta, np.int64(request[0]), request[1], request[2]
    )
    request[0] = removed
    return status


@njit(cache=True)
def _translate_request(leaves: U64Array, nodes: U64Array, directory: I64Array, request: U64Array) -> bool:
    """request: (domain, iova) in, (phys, flags, map_start, map_last) out on a hit."""
    hit, phys, flags, map_start, map_last = table_translate(
        leaves, nodes, directory, np.int64(request[0]), request[1]
    )
    request[0] = phys
    request[1] = flags
    request[2] = map_start
    request[3] = map_last
    return hit


# ----------------------------------------------------------------------------------------------------
# The owner


class Translation(NamedTuple):
    """A hit: the translated address, the mapping's flags and the mapping's bounds."""

    phys: int
    flags: int
    map_start: int
    map_last: int


class Mapping(NamedTuple):
    start: int
    last: int
    phys: int
    flags: int


class TableArrays(NamedTuple):
    """The whole state of a table; what a compiled request path passes to the kernels."""

    leaves: U64Array
    nodes: U64Array
    directory: I64Array
    meta: I64Array


GROWTH_NUM: Final = 17
GROWTH_DEN: Final = 16
"""Pools grow by a sixteenth: amortised O(1) per insert (and cheap, being in place: see _resize_leaves),
at most 6.25 % of the rows spare."""

_INITIAL_LEAVES: Final = 4
_INITIAL_NODES: Final = NODE_RESERVE + 1
_INITIAL_DIRECTORY: Final = 16
_LIST_PAGE: Final = 1024


def _check_u64(name: str, value: int) -> int:
    if not 0 <= value <= MAX_ADDRESS:
        raise ValueError(f"{name} {value:#x} is not a 64-bit unsigned value")
    return value


def _check_limit(limit: int) -> int:
    if not 0 <= limit <= MAX_LIMIT:
        raise ValueError(f"limit {limit} is outside 0..{MAX_LIMIT}")
    return limit


def _check_domain(domain: int) -> int:
    if not 0 <= domain <= MAX_DOMAIN:
        raise ValueError(f"domain {domain} is not a 32-bit unsigned value")
    return domain


def _empty_directory(slots: int) -> I64Array:
    directory = np.zeros((slots, DIRECTORY_WORDS), np.int64)
    directory[:, D_DOMAIN] = EMPTY_SLOT
    directory[:, D_ROOT] = NIL
    return directory


class MappingTable:
    """Every domain's mappings, for the cold paths of the device; hot paths call the kernels on
    ``arrays`` directly.

    Methods raise ValueError for values that are not u64 addresses / u32 domains (a caller bug);
    every rule about mappings is answered with a status.
    """

    def __init__(self, limit: int = DEFAULT_LIMIT) -> None:
        self._limit = _check_limit(limit)
        self.clear()

    # -- state ---------------------------------------------------------------------------------------

    def clear(self) -> None:
        """Remove every mapping and give the memory back."""
        self._leaves = np.empty((_INITIAL_LEAVES, LEAF_WORDS), np.uint64)
        self._nodes = np.empty((_INITIAL_NODES, NODE_WORDS), np.uint64)
        self._directory = _empty_directory(_INITIAL_DIRECTORY)
        self._meta = np.zeros(META_WORDS, np.int64)
        self._meta[M_LIMIT] = self._limit
        self._meta[M_LEAF_FREE_HEAD] = NIL
        self._meta[M_NODE_FREE_HEAD] = NIL
        self._meta[M_LAYOUT] = LAYOUT_TAG
        self._request = np.zeros(REQUEST_WORDS, np.uint64)

    @classmethod
    def from_arrays(cls, arrays: TableArrays) -> MappingTable:
        """A table over arrays saved from another one (a snapshot, a restarted back-end). They are
        checked from end to end first (``verify``), since the kernels index with what they hold and a
        corrupt snapshot must give a ValueError, not a crash. The arrays are adopted, not copied;
        the limit is the one they record."""
        for name, array in zip(TableArrays._fields, arrays, strict=True):
            if not isinstance(array, np.ndarray) or not array.flags.c_contiguous or not array.flags.writeable:
                raise ValueError(f"{name} must be a writeable C-contiguous numpy array")
        leaves, nodes, directory, meta = arrays
        _Verifier(leaves, nodes, directory, meta).run()
        table = cls(_check_limit(int(meta[M_LIMIT])))
        table._leaves, table._nodes, table._directory, table._meta = leaves, nodes, directory, meta
        return table

    @property
    def arrays(self) -> TableArrays:
        """The current arrays. Growth replaces them, so fetch again after any map."""
        return TableArrays(self._leaves, self._nodes, self._directory, self._meta)

    @property
    def limit(self) -> int:
        return self._limit

    @limit.setter
    def limit(self, value: int) -> None:
        """Lowering the limit below the current count refuses new maps; it removes nothing."""
        self._limit = _check_limit(value)
        self._meta[M_LIMIT] = value

    @property
    def nbytes(self) -> int:
        """Bytes held by the arrays, spare rows included."""
        return int(self._leaves.nbytes + self._nodes.nbytes + self._directory.nbytes + self._meta.nbytes)

    @property
    def live_nbytes(self) -> int:
        """Bytes of the rows in use (what ``nbytes`` would be with no spare rows)."""
        meta = self._meta
        live_leaves = int(meta[M_LEAF_HIGH] - meta[M_LEAF_FREE_COUNT])
        live_nodes = int(meta[M_NODE_HIGH] - meta[M_NODE_FREE_COUNT])
        return (
            live_leaves * LEAF_WORDS * 8
            + live_nodes * NODE_WORDS * 8
            + int(self._directory.nbytes + self._meta.nbytes)
        )

    def reserve(self, mappings: int) -> None:
        """Grow the pools ahead for ``mappings`` more mappings added in ascending or descending order
        (random order needs up to about a fifth more; growth on demand covers it). Never reserves
        beyond the limit, so a wild argument cannot exhaust memory."""
        if mappings < 0:
            raise ValueError(f"cannot reserve {mappings} mappings")
        mappings = min(mappings, max(0, self._limit - self.count()))
        leaves_needed = int(self._meta[M_LEAF_HIGH]) + -(-mappings // LEAF_CAPACITY) + LEAF_RESERVE
        if leaves_needed > self._leaves.shape[0]:
            self._resize_leaves(leaves_needed)
        nodes_needed = int(self._meta[M_NODE_HIGH]) + -(-leaves_needed // (NODE_FANOUT // 2)) + NODE_RESERVE
        if nodes_needed > self._nodes.shape[0]:
            self._resize_nodes(nodes_needed)

    # Resizing in place lets realloc move page tables rather than bytes, so growth stays cheap at any
    # size; numpy refuses (refcheck) when anyone else holds the array, and then a copy keeps the
    # holder's arrays valid.

    def _resize_leaves(self, rows: int) -> None:
        try:
            self._leaves.resize((rows, LEAF_WORDS), refcheck=True)
        except ValueError:
            bigger = np.empty((rows, LEAF_WORDS), np.uint64)
            bigger[: self._leaves.shape[0]] = self._leaves
            self._leaves = bigger

    def _resize_nodes(self, rows: int) -> None:
        try:
            self._nodes.resize((rows, NODE_WORDS), refcheck=True)
        except ValueError:
            bigger = np.empty((rows, NODE_WORDS), np.uint64)
            bigger[: self._nodes.shape[0]] = self._nodes
            self._nodes = bigger

    def grow(self) -> None:
        """Make room for one more map of any shape. Compiled callers of ``table_map`` call this when it
        answers NEED_SPACE, then fetch ``arrays`` again and retry."""
        meta = self._meta
        if free_leaves(self._leaves, meta) < LEAF_RESERVE + 1:
            rows = self._leaves.shape[0]
            self._resize_leaves(max(rows * GROWTH_NUM // GROWTH_DEN, rows + 4))
        if free_nodes(self._nodes, meta) < NODE_RESERVE + 1:
            rows = self._nodes.shape[0]
            self._resize_nodes(max(rows * GROWTH_NUM // GROWTH_DEN, rows + NODE_RESERVE))
        room = self._directory.shape[0] * DIRECTORY_MAX_LOAD_NUM // DIRECTORY_MAX_LOAD_DEN
        if int(meta[M_DIRECTORY_USED]) + 1 > room:
            bigger = _empty_directory(self._directory.shape[0] * 2)
            directory_rebuild(self._directory, bigger)
            self._directory = bigger

    # -- operations ----------------------------------------------------------------------------------

    # The single-operation methods pass their scalars through one small uint64 array: numba types an
    # array argument several times faster than five numpy scalars, and these calls are the device's
    # request path until it is compiled.

    def map(self, domain: int, start: int, last: int, phys: int, flags: int) -> int:
        """Add [start, last] -> phys to ``domain``: OK, OVERLAP, LIMIT or INVALID."""
        _check_domain(domain)
        _check_u64("start", start)
        _check_u64("last", last)
        _check_u64("phys", phys)
        if not 0 <= flags <= FLAGS_MASK:
            return INVALID
        request = self._request
        request[0] = domain
        request[1] = start
        request[2] = last
        request[3] = phys
        request[4] = flags
        for _ in range(3):
            status = int(
                kernel(_map_request)(self._leaves, self._nodes, self._directory, self._meta, request)
            )
            if status != NEED_SPACE:
                return status
            self.grow()
        raise RuntimeError("mapping table still short of space after growing")  # a bug, not an input

    def unmap(self, domain: int, start: int, last: int) -> tuple[int, int]:
        """Remove the mappings wholly inside [start, last]: (OK, removed), (SPLIT, 0) or (INVALID, 0)."""
        _check_domain(domain)
        _check_u64("start", start)
        _check_u64("last", last)
        request = self._request
        request[0] = domain
        request[1] = start
        request[2] = last
        status = int(kernel(_unmap_request)(self._leaves, self._nodes, self._directory, self._meta, request))
        removed = int(request[0])
        self._trim_if_empty()
        return status, removed

    def translate(self, domain: int, iova: int) -> Translation | None:
        _check_domain(domain)
        _check_u64("iova", iova)
        request = self._request
        request[0] = domain
        request[1] = iova
        if not kernel(_translate_request)(self._leaves, self._nodes, self._directory, request):
            return None
        return Translation(int(request[0]), int(request[1]), int(request[2]), int(request[3]))

    def translate_batch(
        self,
        domains: U32Array,
        iovas: U64Array,
        out_phys: U64Array,
        out_flags: I32Array,
        *,
        workers: int = 1,
    ) -> int:
        """Translate many (domain, iova) queries; misses get out_flags MISS. Returns the hits.

        ``workers`` > 1 serves slices of the batch on that many threads (numba's pool, at most
        ``numba.config.NUMBA_NUM_THREADS``); the results are the same."""
        for name, array, dtype in (
            ("domains", domains, np.uint32),
            ("iovas", iovas, np.uint64),
            ("out_phys", out_phys, np.uint64),
            ("out_flags", out_flags, np.int32),
        ):
            if not isinstance(array, np.ndarray) or array.dtype != dtype or array.ndim != 1:
                raise TypeError(f"{name} must be a 1-D numpy array of {np.dtype(dtype).name}")
        if not len(domains) == len(iovas) == len(out_phys) == len(out_flags):
            raise ValueError("domains, iovas, out_phys and out_flags must have the same length")
        if workers < 1:
            raise ValueError(f"workers must be at least 1, not {workers}")
        if workers > 1:
            return int(
                kernel(table_translate_batch_parallel)(
                    self._leaves, self._nodes, self._directory, domains, iovas, out_phys, out_flags, workers
                )
            )
        return int(
            kernel(table_translate_batch)(
                self._leaves, self._nodes, self._directory, domains, iovas, out_phys, out_flags
            )
        )

    def remove_domain(self, domain: int) -> int:
        """Remove every mapping of ``domain``; returns how many there were."""
        _check_domain(domain)
        remove = kernel(table_remove_domain)
        removed = int(remove(self._leaves, self._nodes, self._directory, self._meta, np.int64(domain)))
        self._trim_if_empty()
        return removed

    def _trim_if_empty(self) -> None:
        """Unmapped rows go back to the pools, not to the system; once the whole table is empty (the
        guest unmapped everything, or its domains went away), the big arrays are let go as well."""
        if self._meta[M_TOTAL] == 0 and self._leaves.shape[0] > _INITIAL_LEAVES:
            self.clear()

    def count(self, domain: int | None = None) -> int:
        """Mappings of ``domain``, or of every domain."""
        if domain is None:
            return int(self._meta[M_TOTAL])
        _check_domain(domain)
        return int(kernel(table_count)(self._directory, self._meta, np.int64(domain)))

    def domains(self) -> list[int]:
        """Ids of the domains that have mappings, ascending."""
        used = self._directory[:, D_DOMAIN]
        return sorted(int(domain) for domain in used[used != EMPTY_SLOT])

    def mapping_arrays(
        self, domain: int, start: int = 0, limit: int = _LIST_PAGE
    ) -> tuple[U64Array, U64Array, U64Array, I32Array]:
        """One page: (starts, lasts, phys, flags) of up to ``limit`` mappings ending at or after start."""
        _check_domain(domain)
        _check_u64("start", start)
        size = max(0, min(limit, self.count(domain)))
        starts = np.empty(size, np.uint64)
        lasts = np.empty(size, np.uint64)
        phys = np.empty(size, np.uint64)
        flags = np.empty(size, np.int32)
        copied = int(
            kernel(table_list)(
                self._leaves,
                self._nodes,
                self._directory,
                np.int64(domain),
                np.uint64(start),
                starts,
                lasts,
                phys,
                flags,
            )
        )
        return starts[:copied], lasts[:copied], phys[:copied], flags[:copied]

    def mappings(self, domain: int, start: int = 0, limit: int | None = None) -> Iterator[Mapping]:
        """The mappings of ``domain`` that end at or after ``start``, in address order, at most
        ``limit``. Fetched a page at a time, and each page resumes after the last mapping returned,
        so maps and unmaps between pages are seen (or not) but never break the walk."""
        _check_domain(domain)
        _check_u64("start", start)
        remaining = limit if limit is not None else MAX_ADDRESS
        cursor = start
        while remaining > 0:
            starts, lasts, phys, flags = self.mapping_arrays(domain, cursor, min(_LIST_PAGE, remaining))
            if len(starts) == 0:
                return
            for index in range(len(starts)):
                yield Mapping(int(starts[index]), int(lasts[index]), int(phys[index]), int(flags[index]))
            remaining -= len(starts)
            final = int(lasts[-1])
            if final == MAX_ADDRESS:
                return
            cursor = final + 1

    # -- verification --------------------------------------------------------------------------------

    def verify(self) -> None:
        """Check every structural invariant (slow, plain Python); raise ValueError naming the first
        broken one. For tests, and for tables loaded from untrusted snapshots."""
        _Verifier(self._leaves, self._nodes, self._directory, self._meta).run()


class _Verifier:
    """Walks every tree, free list and counter of a table, trusting nothing (the arrays may come from
    an untrusted snapshot): every row is range-checked and visited at most once, so corrupt arrays
    give a ValueError, never a crash or an endless walk."""

    def __init__(self, leaves: U64Array, nodes: U64Array, directory: I64Array, meta: I64Array) -> None:
        self.leaves = leaves
        self.nodes = nodes
        self.directory = directory
        self.meta = meta
        self.seen_leaves: set[int] = set()
        self.seen_nodes: set[int] = set()

    @staticmethod
    def fail(message: str) -> None:
        raise ValueError(f"mapping table corrupt: {message}")

    def run(self) -> None:
        leaves, nodes, directory, meta = self.leaves, self.nodes, self.directory, self.meta
        if leaves.dtype != np.uint64 or leaves.ndim != 2 or leaves.shape[1] != LEAF_WORDS:
            self.fail(f"leaves are {leaves.dtype} {leaves.shape}")
        if nodes.dtype != np.uint64 or nodes.ndim != 2 or nodes.shape[1] != NODE_WORDS:
            self.fail(f"nodes are {nodes.dtype} {nodes.shape}")
        if directory.dtype != np.int64 or directory.ndim != 2 or directory.shape[1] != DIRECTORY_WORDS:
            self.fail(f"directory is {directory.dtype} {directory.shape}")
        if meta.dtype != np.int64 or meta.shape != (META_WORDS,):
            self.fail(f"meta is {meta.dtype} {meta.shape}")
        if int(meta[M_LAYOUT]) != LAYOUT_TAG:
            self.fail(f"layout tag {int(meta[M_LAYOUT]):#x}, expected {LAYOUT_TAG:#x}")
        slots = directory.shape[0]
        if slots == 0 or slots & (slots - 1):
            self.fail(f"directory size {slots} is not a power of two")
        if not 0 <= int(meta[M_LEAF_HIGH]) <= leaves.shape[0]:
            self.fail(f"leaf high-water mark {int(meta[M_LEAF_HIGH])}")
        if not 0 <= int(meta[M_NODE_HIGH]) <= nodes.shape[0]:
            self.fail(f"node high-water mark {int(meta[M_NODE_HIGH])}")
        used = int(np.count_nonzero(directory[:, D_DOMAIN] != EMPTY_SLOT))
        if used != int(meta[M_DIRECTORY_USED]) or used * DIRECTORY_MAX_LOAD_DEN > slots:
            self.fail(f"directory holds {used} domains, counts {int(meta[M_DIRECTORY_USED])}, {slots} slots")
        total = 0
        for slot in range(slots):
            if int(directory[slot, D_DOMAIN]) != EMPTY_SLOT:
                total += self.domain(slot)
        if total != int(meta[M_TOTAL]):
            self.fail(f"total {int(meta[M_TOTAL])}, domains hold {total}")
        self.free_list(
            "leaf", leaves, L_NEXT, M_LEAF_HIGH, M_LEAF_FREE_HEAD, M_LEAF_FREE_COUNT, self.seen_leaves
        )
        self.free_list(
            "node", nodes, N_CHILDREN, M_NODE_HIGH, M_NODE_FREE_HEAD, M_NODE_FREE_COUNT, self.seen_nodes
        )

    def free_list(
        self, kind: str, pool: U64Array, link: int, high: int, head: int, length: int, live: set[int]
    ) -> None:
        meta = self.meta
        row = int(meta[head])
        free: set[int] = set()
        for _ in range(int(meta[length])):
            if not 0 <= row < int(meta[high]) or row in free or row in live:
                self.fail(f"{kind} free list reaches row {row}")
            free.add(row)
            row = int(np.int64(pool[row, link]))
        if len(free) + len(live) != int(meta[high]):
            self.fail(f"{len(live)} {kind}s in use and {len(free)} free, high-water mark {int(meta[high])}")

    def domain(self, slot: int) -> int:
        """Checks one domain's tree and leaf chain; returns its number of mappings."""
        directory = self.directory
        domain = int(directory[slot, D_DOMAIN])
        if not 0 <= domain <= MAX_DOMAIN or directory_find(directory, domain) != slot:
            self.fail(f"domain {domain} in slot {slot} is unreachable or out of range")
        height = int(directory[slot, D_HEIGHT])
        if not 0 <= height <= MAX_HEIGHT:
            self.fail(f"domain {domain} height {height}")
        in_order: list[int] = []
        self.subtree(domain, int(directory[slot, D_ROOT]), height, None, None, True, in_order)
        count = 0
        previous_last = -1
        for position, row in enumerate(in_order):
            expected = in_order[position + 1] if position + 1 < len(in_order) else NIL
            linked = int(np.int64(self.leaves[row, L_NEXT]))
            if linked != expected:
                self.fail(f"leaf {row} links to {linked}, expected {expected}")
            for i in range(int(self.leaves[row, L_COUNT])):
                start = int(self.leaves[row, L_STARTS + i])
                if start <= previous_last:
                    self.fail(f"domain {domain}: mapping at {start:#x} overlaps or precedes the one before")
                previous_last = int(self.leaves[row, L_VALUES + 2 * i])
                count += 1
        if count != int(directory[slot, D_COUNT]):
            self.fail(f"domain {domain} counts {int(directory[slot, D_COUNT])} mappings, holds {count}")
        return count

    def subtree(
        self,
        domain: int,
        row: int,
        levels_below: int,
        low: int | None,
        high: int | None,
        is_root: bool,
        in_order: list[int],
    ) -> int:
        """Checks the subtree at ``row`` and appends its leaves to ``in_order``; returns its smallest
        start. ``low`` and ``high`` bound its starts as the separators above promise."""
        leaves, nodes = self.leaves, self.nodes
        if levels_below == 0:
            if not 0 <= row < int(self.meta[M_LEAF_HIGH]) or row in self.seen_leaves:
                self.fail(f"leaf row {row} out of range or reached twice")
            self.seen_leaves.add(row)
            count = int(leaves[row, L_COUNT])
            # Inserts may leave short leaves (edge splits); only unmaps enforce LEAF_MIN.
            if not 1 <= count <= LEAF_CAPACITY:
                self.fail(f"leaf {row} holds {count} entries")
            if int(leaves[row, L_DOMAIN]) != domain:
                self.fail(f"leaf {row} tagged with domain {int(leaves[row, L_DOMAIN])}, in {domain}")
            starts = leaves[row, L_STARTS : L_STARTS + LEAF_CAPACITY]
            if np.any(starts[count:] != UNUSED_KEY):
                self.fail(f"leaf {row} has unused slots not set to UNUSED_KEY")
            for i in range(count):
                start = int(starts[i])
                if (low is not None and start < low) or (high is not None and start >= high):
                    self.fail(f"leaf {row} entry {start:#x} outside its separators")
                if int(leaves[row, L_VALUES + 2 * i]) < start:
                    self.fail(f"leaf {row} entry {start:#x} ends before it starts")
            in_order.append(row)
            return int(starts[0])
        if not 0 <= row < int(self.meta[M_NODE_HIGH]) or row in self.seen_nodes:
            self.fail(f"node row {row} out of range or reached twice")
        self.seen_nodes.add(row)
        count = int(nodes[row, N_COUNT])
        if not (2 if is_root else NODE_MIN) <= count <= NODE_FANOUT:
            self.fail(f"node {row} has {count} children")
        keys = nodes[row, N_KEYS : N_KEYS + NODE_FANOUT]
        if np.any(keys[count:] != UNUSED_KEY):
            self.fail(f"node {row} has unused slots not set to UNUSED_KEY")
        minimum = 0
        for i in range(count):
            child_low = int(keys[i]) if i > 0 else low
            child_high = int(keys[i + 1]) if i + 1 < count else high
            child = int(np.int64(nodes[row, N_CHILDREN + i]))
            child_min = self.subtree(domain, child, levels_below - 1, child_low, child_high, False, in_order)
            if i == 0:
                minimum = child_min
            elif child_min != int(keys[i]):
                self.fail(f"node {row} separator {i} is {int(keys[i]):#x}, subtree minimum {child_min:#x}")
        return minimum


# ----------------------------------------------------------------------------------------------------
# Start-up


@compiles
def warm_up() -> None:
    """Compile (or load from numba's cache) every kernel with the argument types the owner and the
    documented kernel API use: int64 domains, uint64 addresses."""
    table = MappingTable(limit=1 << 20)
    for page in range(3 * LEAF_CAPACITY):
        table.map(1, page << 12, (page << 12) | 0xFFF, page << 12, READ | WRITE)
    for extra in range(2, 2 + _INITIAL_DIRECTORY):  # enough domains to grow the directory
        table.map(extra, 0, 0xFFF, 0, READ)
    table.translate(1, 0x1234)
    domains = np.ones(4, np.uint32)
    iovas = np.arange(4, dtype=np.uint64) << np.uint64(12)
    table.translate_batch(domains, iovas, np.empty(4, np.uint64), np.empty(4, np.int32))
    table.translate_batch(domains, iovas, np.empty(4, np.uint64), np.empty(4, np.int32), workers=2)
    table.count(1)
    list(table.mappings(1, 0, 2))
    table.unmap(1, 0, 0x3FFF)
    table.unmap(1, 0x800, 0x1FFF)
    leaves, nodes, directory, meta = table.arrays
    domain = np.int64(3)
    address = np.uint64(0x5000)
    table_map(
        leaves, nodes, directory, meta, domain, address, address | np.uint64(0xFFF), address, np.uint64(1)
    )
    table_translate(leaves, nodes, directory, domain, address)
    table_unmap(leaves, nodes, directory, meta, domain, address, address)
    table_remove_domain(leaves, nodes, directory, meta, domain)
    table.clear()


# prefetch's code is compiled into the kernels.
cache_on_sources(globals(), prefetch_module)

"""Translated DMA: an endpoint's accesses through the device's translation state, compiled.

The rules of translation (``vhost_iommu.device.translation`` documents their order: bypass, MSI regions,
unattached endpoints, reserved regions, mappings and their permissions) are written once, below, as
``register_jitable`` functions: the kernels compile them in, the device core's Python ``translate`` calls
them as the Python they are. The kernels read the same arrays the request path changes: ``Domains``'
(``endpoint_domain``, ``bypass``, the flat ``region_*`` arrays) and ``MappingTable.arrays``.

``translate`` turns (endpoint, IOVA, length, access) into guest-physical segments. ``dma_transfer`` does
a whole DMA operation (COPY, FILL, COMPARE between IOVAs; READ into or WRITE from a host buffer) in address
order, one chunk of at most a page at a time: for each chunk it takes the device's translation guard
shared (``jit/guard.py``), translates the chunk's source and destination, checks every guest-physical
byte against the guest's RAM (``requests.M_*`` region table), and only then reads and writes, and
releases the guard. A chunk that cannot be translated (a fault) or that reaches outside guest RAM (an
error) is not touched at all, and the operation stops there: the bytes done are whole chunks.

The kernels are compiled without numba's reference counting (``_nrt=False``): they allocate nothing
(the caller passes every array, scratch space included) and keep no array beyond the call, and without
it the hot loop loses an atomic increment and decrement per array per helper call, which took more time
than the translation itself.

The only cache (``cache``, per direction of an operation) holds the last mapping used and its place in
the table, valid while the guard's epoch is the one it was read under: every MAP or UNMAP moves the epoch
while it holds the guard exclusively, before its used entry is published, so no cached translation
outlives its UNMAP. Beside it, the run of bytes the region rule last sent to the mappings, which changes
only with the regions. A change made by Python code (ATTACH, DETACH, reset, config, reserved regions,
table growth, a restore) may replace arrays: the kernel sees the guard's generation move and returns
``DMA_STALE`` with the bytes done so far, and the caller calls again with the new arrays from there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final, TypeVar, cast

import numpy as np
import numpy.typing as npt
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.core.dispatcher import Dispatcher
from numba.extending import intrinsic, register_jitable

from vhost_iommu import abi
from vhost_iommu.abi import (
    FAULT_F_ADDRESS,
    FAULT_F_EXEC,
    FAULT_F_READ,
    FAULT_F_WRITE,
    FAULT_R_UNKNOWN,
    MAP_F_READ,
    MAP_F_WRITE,
    RESV_MEM_T_MSI,
    U64_MAX,
)
from vhost_iommu.jit import guard as guard_module
from vhost_iommu.jit import native, requests, tables
from vhost_iommu.jit.caching import cache_on_sources
from vhost_iommu.jit.guard import G_EPOCH, G_GENERATION, read_hold, read_release
from vhost_iommu.jit.interpreted import stand_in
from vhost_iommu.jit.requests import (
    M_GPA_LAST,
    M_GPA_START,
    M_HOST,
    _load8,
    _load64,
    _region_of,
    _store8,
    _store64,
)
from vhost_iommu.jit.tables import NIL, table_entry, table_following, table_locate

U64Array = npt.NDArray[np.uint64]
I64Array = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

_Kernel = TypeVar("_Kernel", bound=Callable[..., Any])


def _without_refcounts(function: _Kernel) -> Dispatcher[_Kernel]:
    """``njit(cache=True, nogil=True)`` without reference counting (see the module's docstring)."""
    options: dict[str, Any] = {"cache": True, "nogil": True, "_nrt": False}  # _nrt: not in numba's stubs
    return cast("Dispatcher[_Kernel]", njit(**options)(function))


NO_DOMAIN: Final = -1
"""``endpoint_domain`` of an endpoint attached to no domain."""

# -- the rules (register_jitable: compiled into the kernels, called as Python by the device core) ---------

DECIDE_LOOKUP: Final = -1
"""The byte is translated by the domain's mappings."""
DECIDE_IDENTITY: Final = -2
"""The byte is in an MSI region: reached untranslated."""
# Any other decision is the fault reason (abi.FAULT_R_DOMAIN, abi.FAULT_R_MAPPING).
_UNDECIDED: Final = abi.FAULT_R_UNKNOWN
"""A walk's decision before its first byte (region_decision never answers it)."""

_ONE: Final = np.uint64(1)
_ZERO: Final = np.uint64(0)
_LAST_ADDRESS: Final = np.uint64(U64_MAX)


@register_jitable
def endpoint_in_bypass(domain: Any, global_bypass: Any, domain_bypass: BoolArray, domain_first: Any) -> bool:
    """Rule 1: an unattached endpoint while config.bypass is 1, or one attached to a bypass domain, is
    translated by the identity function (its whole access, reserved regions included)."""
    if domain == NO_DOMAIN:
        return bool(global_bypass)
    return bool(domain_bypass[domain - domain_first])


@register_jitable
def region_decision(
    starts: U64Array, ends: U64Array, kinds: I64Array, begin: Any, end: Any, attached: bool, cursor: Any
) -> tuple[int, Any]:
    """Rule 2 for the byte at ``cursor`` of an endpoint not in bypass, whose regions are rows
    ``begin..end`` (sorted): (decision, limit). In an MSI region: DECIDE_IDENTITY up to ``limit``, the
    region's last byte; not attached: FAULT_R_DOMAIN; in a reserved region: FAULT_R_MAPPING; else
    DECIDE_LOOKUP, and a mapping's run must stop at ``limit``, the last byte before the next region, so
    that region's first byte is judged by its region."""
    for i in range(begin, end):
        if starts[i] > cursor:
            break
        if cursor <= ends[i]:
            if kinds[i] == RESV_MEM_T_MSI:
                return DECIDE_IDENTITY, ends[i]
            if attached:
                return abi.FAULT_R_MAPPING, _ZERO
            return abi.FAULT_R_DOMAIN, _ZERO
    if not attached:
        return abi.FAULT_R_DOMAIN, _ZERO
    for i in range(begin, end):
        if starts[i] > cursor:
            return DECIDE_LOOKUP, starts[i] - _ONE
    return DECIDE_LOOKUP, _LAST_ADDRESS


@register_jitable
def allowed_by(map_flags: Any, access: Any) -> bool:
    """A write needs MAP_F_WRITE; a read or an instruction fetch needs MAP_F_READ."""
    if access & FAULT_F_WRITE and not map_flags & MAP_F_WRITE:
        return False
    return not (access & (FAULT_F_READ | FAULT_F_EXEC) and not map_flags & MAP_F_READ)


@register_jitable
def fault_flags(access: Any) -> int:
    """The fault event's flags for an access: its kind (the Access bits are the FAULT_F_ ones) and ADDRESS."""
    return int(access | FAULT_F_ADDRESS)


# -- results ------------------------------------------------------------------------------------------------

DMA_DONE: Final = 0
DMA_FAULT: Final = 1
"""A chunk could not be translated: ``O_FAULT_*``."""
DMA_NOT_GUEST_RAM: Final = 2
"""A chunk translated outside guest RAM: ``O_ERROR_ADDRESS``."""
DMA_MISMATCH: Final = 3
"""COMPARE found a differing byte: ``O_MISMATCH``."""
DMA_STALE: Final = 4
"""Python code changed the translation state's arrays: call again with new ones (from ``O_DONE``)."""
TRANSLATE_OVERFLOW: Final = -2
"""``translate``: more segments than the arrays given hold."""
TRANSLATE_STALE: Final = -3
"""``translate``: Python code changed the translation state's arrays: call again with new ones."""

# the ``out`` array (uint64) of translate and dma_transfer
O_DONE: Final = 0
"""In and out: bytes done (dma_transfer resumes from it)."""
O_FAULT_ADDRESS: Final = 1
O_FAULT_REASON: Final = 2
O_FAULT_FLAGS: Final = 3
O_ERROR_ADDRESS: Final = 4
"""Guest-physical address of the first byte outside guest RAM."""
O_MISMATCH: Final = 5
"""Offset of COMPARE's first differing byte."""
O_BYTES_READ: Final = 6
"""Cumulative: guest bytes read."""
O_BYTES_WRITTEN: Final = 7
"""Cumulative: guest bytes written."""
O_TRANSLATIONS: Final = 8
"""Cumulative: runs translated through a mapping (one per page over page-sized mappings)."""
O_BYPASSED: Final = 9
"""Cumulative: chunk accesses translated by bypass."""
OUT_WORDS: Final = 16

# operations
OP_COPY: Final = 1
"""src IOVA -> dst IOVA (the engine's numbers: docs/dma-engine.md)."""
OP_FILL: Final = 2
"""``pattern`` (8 bytes, byte i of the operation = byte i % 8) -> dst IOVA."""
OP_COMPARE: Final = 3
"""src IOVA with dst IOVA, nothing written."""
OP_READ: Final = 4
"""src IOVA -> the host buffer at ``host``."""
OP_WRITE: Final = 5
"""the host buffer at ``host`` -> dst IOVA."""

CHUNK: Final = 4096
"""Most bytes one chunk moves: a chunk never crosses a 4 KiB boundary of its source or destination."""

# the ``cache`` array (uint64): the last mapping used, per direction (source at 0, destination at C_WORDS)
C_EPOCH: Final = 0
"""1 + the guard epoch the entry was read under (0: empty)."""
C_DOMAIN: Final = 1
C_START: Final = 2
C_LAST: Final = 3
C_PHYS: Final = 4
"""Guest-physical address of the mapping's first byte."""
C_FLAGS: Final = 5
C_LEAF: Final = 6
"""Where the mapping is in the table (``tables.table_locate``): the next one is found from there."""
C_INDEX: Final = 7
C_RUN_GENERATION: Final = 8
"""1 + the guard generation of the run below (0: none): the regions' arrays it was decided on."""
C_RUN_FROM: Final = 9
"""A byte the region rule sent to the mappings (DECIDE_LOOKUP) ..."""
C_RUN_LIMIT: Final = 10
"""... and the last byte before the next region: every byte between is the mappings' too."""
C_WORDS: Final = 12
CACHE_WORDS: Final = 2 * C_WORDS

SCRATCH_ROWS: Final = 8
"""Rows of dma_transfer's ``scratch`` (each CHUNK words): a chunk's segments, guest-physical and host."""


def _memmove_typer(typingctx: Any, destination: Any, source: Any, length: Any) -> Any:
    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        pointer = ir.IntType(8).as_pointer()
        destination = builder.inttoptr(args[0], pointer)
        cgutils.raw_memmove(builder, destination, builder.inttoptr(args[1], pointer), args[2], 1)  # type: ignore[no-untyped-call]
        return context.get_dummy_value()

    return types.void(types.uint64, types.uint64, types.uint64), codegen


_memmove: Any = intrinsic(_memmove_typer)
stand_in(_memmove, native.memmove)


# -- translation ----------------------------------------------------------------------------------------


@njit(cache=True, nogil=True, inline="always")
def _lookup(
    leaves: U64Array,
    nodes: U64Array,
    directory: I64Array,
    domain: int,
    address: np.uint64,
    cache: U64Array,
    at: int,
    epoch: int,
) -> tuple[bool, np.uint64, np.int64, np.uint64]:
    """(hit, phys, flags, mapping's last byte) for ``address``, through the cache entry at ``at``: the
    mapping it holds, else the one after it in the table (a DMA moves up through its mappings), else a
    lookup from the root. The entry's table position is only used under the epoch it was read in."""
    leaf: Any = NIL
    index: Any = NIL
    if cache[at + C_EPOCH] == np.uint64(epoch + 1) and cache[at + C_DOMAIN] == np.uint64(domain):
        if cache[at + C_START] <= address <= cache[at + C_LAST]:
            phys = cache[at + C_PHYS] + (address - cache[at + C_START])
            return True, phys, np.int64(cache[at + C_FLAGS]), cache[at + C_LAST]
        if address > cache[at + C_LAST]:
            leaf, index = table_following(leaves, np.int64(cache[at + C_LEAF]), np.int64(cache[at + C_INDEX]))
            if leaf != NIL:
                start, last, _phys, _flags = table_entry(leaves, leaf, index)
                if not start <= address <= last:
                    leaf = NIL
    if leaf == NIL:
        leaf, index = table_locate(leaves, nodes, directory, domain, address)
        if leaf == NIL:
            return False, _ZERO, np.int64(0), _ZERO
    start, last, phys, flags = table_entry(leaves, leaf, index)
    cache[at + C_EPOCH] = np.uint64(epoch + 1)
    cache[at + C_DOMAIN] = np.uint64(domain)
    cache[at + C_START] = start
    cache[at + C_LAST] = last
    cache[at + C_PHYS] = phys
    cache[at + C_FLAGS] = np.uint64(flags)
    cache[at + C_LEAF] = np.uint64(leaf)
    cache[at + C_INDEX] = np.uint64(index)
    return True, phys + (address - start), flags, last


@njit(cache=True, nogil=True, inline="always")
def _translate_into(
    global_bypass: bool,
    slot: int,
    endpoint_domain: I64Array,
    domain_bypass: BoolArray,
    domain_first: int,
    region_starts: U64Array,
    region_ends: U64Array,
    region_kinds: I64Array,
    region_offsets: I64Array,
    leaves: U64Array,
    nodes: U64Array,
    directory: I64Array,
    generation: int,
    epoch: int,
    cache: U64Array,
    cache_at: int,
    iova: np.uint64,
    length: np.uint64,
    access: int,
    seg_phys: U64Array,
    seg_lengths: U64Array,
    out: U64Array,
) -> int:
    """Segments of [iova, iova + length) (length > 0, not wrapping) into ``seg_*``, adjacent ones merged:
    their count; -1 on a fault (``O_FAULT_*`` set); TRANSLATE_OVERFLOW when ``seg_*`` are too short."""
    last = iova + (length - _ONE)
    if slot < 0:
        out[O_FAULT_ADDRESS] = iova
        out[O_FAULT_REASON] = np.uint64(FAULT_R_UNKNOWN)
        out[O_FAULT_FLAGS] = np.uint64(fault_flags(access))
        return -1
    domain = endpoint_domain[slot]
    if endpoint_in_bypass(domain, global_bypass, domain_bypass, domain_first):
        seg_phys[0] = iova
        seg_lengths[0] = length
        out[O_BYPASSED] += _ONE
        return 1
    attached = domain != NO_DOMAIN
    begin = region_offsets[slot]
    end = region_offsets[slot + 1]
    capacity = seg_phys.shape[0]
    count = 0
    cursor = iova
    decision = _UNDECIDED
    limit = _ZERO
    run = cache_at + C_RUN_FROM
    if cache[cache_at + C_RUN_GENERATION] == np.uint64(generation + 1) and cache[run] <= iova:
        decision = DECIDE_LOOKUP  # the run an earlier chunk found, if iova is still in it (below)
        limit = cache[cache_at + C_RUN_LIMIT]
    while True:
        if decision != DECIDE_LOOKUP or cursor > limit:
            # From a byte the region rule sends to the mappings to the last byte before the next
            # region, every byte is the mappings' too (regions are sorted and disjoint, and change
            # only with the generation): the rule is asked again only past it.
            decision, limit = region_decision(
                region_starts, region_ends, region_kinds, begin, end, attached, cursor
            )
            if decision == DECIDE_LOOKUP:
                cache[cache_at + C_RUN_GENERATION] = np.uint64(generation + 1)
                cache[run] = cursor
                cache[cache_at + C_RUN_LIMIT] = limit
        if decision == DECIDE_IDENTITY:
            run_last = min(limit, last)
            phys = cursor
        elif decision == DECIDE_LOOKUP:
            hit, phys, flags, map_last = _lookup(
                leaves, nodes, directory, domain, cursor, cache, cache_at, epoch
            )
            if not hit or not allowed_by(flags, access):
                decision = abi.FAULT_R_MAPPING
            else:
                run_last = min(map_last, last, limit)
                out[O_TRANSLATIONS] += _ONE
        if decision != DECIDE_IDENTITY and decision != DECIDE_LOOKUP:
            out[O_FAULT_ADDRESS] = cursor
            out[O_FAULT_REASON] = np.uint64(decision)
            out[O_FAULT_FLAGS] = np.uint64(fault_flags(access))
            return -1
        run_length = run_last - cursor + _ONE
        if count and seg_phys[count - 1] + seg_lengths[count - 1] == phys:
            seg_lengths[count - 1] += run_length
        elif count == capacity:
            return TRANSLATE_OVERFLOW
        else:
            seg_phys[count] = phys
            seg_lengths[count] = run_length
            count += 1
        if run_last >= last:
            return count
        cursor = run_last + _ONE


@_without_refcounts
def translate(
    guard: I64Array,
    generation: int,
    global_bypass: bool,
    slot: int,
    endpoint_domain: I64Array,
    domain_bypass: BoolArray,
    domain_first: int,
    region_starts: U64Array,
    region_ends: U64Array,
    region_kinds: I64Array,
    region_offsets: I64Array,
    leaves: U64Array,
    nodes: U64Array,
    directory: I64Array,
    iova: np.uint64,
    length: np.uint64,
    access: int,
    seg_phys: U64Array,
    seg_lengths: U64Array,
    out: U64Array,
    cache: U64Array,
) -> int:
    """Translate one access of endpoint ``slot`` (-1: not managed: fault UNKNOWN) into guest-physical
    segments, holding the guard shared meanwhile: the segment count, -1 for a fault (``out``'s
    ``O_FAULT_*``), TRANSLATE_OVERFLOW if ``seg_*`` are too short, TRANSLATE_STALE when the guard's
    generation is not ``generation`` (the caller's arrays are old). ``cache`` (C_WORDS) is the
    walk's own (emptied first: nothing is kept from one call to the next)."""
    read_hold(guard)
    if guard[G_GENERATION] != generation:
        read_release(guard)
        return TRANSLATE_STALE
    cache[:] = 0  # no run, no mapping: nothing outlives the call
    count = _translate_into(
        global_bypass,
        slot,
        endpoint_domain,
        domain_bypass,
        domain_first,
        region_starts,
        region_ends,
        region_kinds,
        region_offsets,
        leaves,
        nodes,
        directory,
        generation,
        0,
        cache,
        0,
        np.uint64(iova),
        np.uint64(length),
        access,
        seg_phys,
        seg_lengths,
        out,
    )
    read_release(guard)
    return count


# -- guest memory ------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def _to_host(
    memory: U64Array,
    seg_phys: U64Array,
    seg_lengths: U64Array,
    count: int,
    hosts: U64Array,
    host_lengths: U64Array,
    out: U64Array,
) -> int:
    """Host segments of guest-physical segments (split where guest RAM regions meet): their count, or
    -1 with ``O_ERROR_ADDRESS`` the first byte outside guest RAM. ``hosts`` hold a chunk's bytes."""
    made = 0
    for s in range(count):
        position = seg_phys[s]
        last = position + (seg_lengths[s] - _ONE)
        while True:
            row = _region_of(memory, position)
            if row < 0:
                out[O_ERROR_ADDRESS] = position
                return -1
            take_last = min(last, memory[row, M_GPA_LAST])
            hosts[made] = memory[row, M_HOST] + (position - memory[row, M_GPA_START])
            host_lengths[made] = take_last - position + _ONE
            made += 1
            if take_last == last:
                break
            position = take_last + _ONE
    return made


@njit(cache=True, nogil=True)
def _copy(
    source: U64Array, source_lengths: U64Array, sources: int, target: U64Array, target_lengths: U64Array
) -> None:
    """Copy the bytes of the source segments, in order, over the target segments (same total)."""
    t = 0
    t_at = _ZERO
    for s in range(sources):
        s_at = _ZERO
        while s_at < source_lengths[s]:
            n = min(source_lengths[s] - s_at, target_lengths[t] - t_at)
            _memmove(target[t] + t_at, source[s] + s_at, n)
            s_at += n
            t_at += n
            if t_at == target_lengths[t]:
                t += 1
                t_at = _ZERO


@njit(cache=True, nogil=True)
def _compare(
    first: U64Array, first_lengths: U64Array, firsts: int, second: U64Array, second_lengths: U64Array
) -> np.int64:
    """Offset of the first byte where the two segment lists differ, or -1."""
    t = 0
    t_at = _ZERO
    offset = np.int64(0)
    for s in range(firsts):
        s_at = _ZERO
        while s_at < first_lengths[s]:
            n = min(first_lengths[s] - s_at, second_lengths[t] - t_at)
            a = first[s] + s_at
            b = second[t] + t_at
            k = _ZERO
            while k + np.uint64(8) <= n and _load64(a + k) == _load64(b + k):
                k += np.uint64(8)
            while k < n:
                if _load8(a + k) != _load8(b + k):
                    return offset + np.int64(k)
                k += _ONE
            offset += np.int64(n)
            s_at += n
            t_at += n
            if t_at == second_lengths[t]:
                t += 1
                t_at = _ZERO
    return np.int64(-1)


@njit(cache=True, nogil=True)
def _fill(hosts: U64Array, lengths: U64Array, count: int, pattern: np.uint64, phase: Any) -> None:
    """Write ``pattern`` over the segments; the first byte is byte ``phase`` (0..7) of the pattern."""
    for s in range(count):
        address = hosts[s]
        n = lengths[s]
        shift = np.uint64(8 * phase)
        word = (pattern >> shift) | (pattern << (np.uint64(64) - shift)) if phase else pattern
        k = _ZERO
        while k + np.uint64(8) <= n:
            _store64(address + k, word)
            k += np.uint64(8)
        while k < n:
            _store8(address + k, (word >> (np.uint64(8) * (k & np.uint64(7)))) & np.uint64(0xFF))
            k += _ONE
        phase = (phase + np.int64(n & np.uint64(7))) & 7


# -- the DMA kernel ----------------------------------------------------------------------------------------


@_without_refcounts
def dma_transfer(
    op: int,
    guard: I64Array,
    generation: int,
    global_bypass: bool,
    slot: int,
    endpoint_domain: I64Array,
    domain_bypass: BoolArray,
    domain_first: int,
    region_starts: U64Array,
    region_ends: U64Array,
    region_kinds: I64Array,
    region_offsets: I64Array,
    leaves: U64Array,
    nodes: U64Array,
    directory: I64Array,
    memory: U64Array,
    src: np.uint64,
    dst: np.uint64,
    length: np.uint64,
    pattern: np.uint64,
    host: np.uint64,
    out: U64Array,
    cache: U64Array,
    scratch: npt.NDArray[np.uint64],
) -> int:
    """Run DMA operation ``op`` (``OP_*``) of endpoint ``slot`` from byte ``out[O_DONE]`` to ``length``,
    a chunk at a time (see the module's docstring); ``memory`` is the guest's region table
    (``requests.M_*`` columns), ``host`` the host buffer of OP_READ / OP_WRITE (``length`` bytes), the
    caller's ranges checked not to wrap. Returns a ``DMA_*`` code; ``out`` has the details and counts,
    ``cache`` (CACHE_WORDS) carries the last mappings from one call to the next; ``scratch``
    (SCRATCH_ROWS x CHUNK) holds a chunk's segments."""
    uses_src = op != OP_FILL and op != OP_WRITE
    uses_dst = op != OP_READ
    dst_access = FAULT_F_READ if op == OP_COMPARE else FAULT_F_WRITE
    page_mask = np.uint64(CHUNK - 1)
    # A chunk has at most one segment per byte.
    src_phys = scratch[0]
    src_lengths = scratch[1]
    dst_phys = scratch[2]
    dst_lengths = scratch[3]
    src_hosts = scratch[4]
    src_host_lengths = scratch[5]
    dst_hosts = scratch[6]
    dst_host_lengths = scratch[7]
    offset = out[O_DONE]
    reason = DMA_DONE
    while offset < length:
        chunk = min(length - offset, np.uint64(CHUNK))
        if uses_src:
            chunk = min(chunk, np.uint64(CHUNK) - ((src + offset) & page_mask))
        if uses_dst:
            chunk = min(chunk, np.uint64(CHUNK) - ((dst + offset) & page_mask))
        read_hold(guard)
        if guard[G_GENERATION] != generation:
            read_release(guard)
            reason = DMA_STALE
            break
        epoch = guard[G_EPOCH]
        sources = 1
        targets = 1
        if uses_src:
            count = _translate_into(
                global_bypass, slot, endpoint_domain, domain_bypass, domain_first,
                region_starts, region_ends, region_kinds, region_offsets, leaves, nodes, directory,
                generation, epoch, cache, 0, src + offset, chunk, FAULT_F_READ, src_phys, src_lengths, out,
            )  # fmt: skip
            if count < 0:
                read_release(guard)
                reason = DMA_FAULT
                break
            sources = _to_host(memory, src_phys, src_lengths, count, src_hosts, src_host_lengths, out)
            if sources < 0:
                read_release(guard)
                reason = DMA_NOT_GUEST_RAM
                break
        else:
            src_hosts[0] = host + offset  # OP_WRITE's buffer (OP_FILL reads nothing)
            src_host_lengths[0] = chunk
        if uses_dst:
            count = _translate_into(
                global_bypass, slot, endpoint_domain, domain_bypass, domain_first,
                region_starts, region_ends, region_kinds, region_offsets, leaves, nodes, directory,
                generation, epoch, cache, C_WORDS, dst + offset, chunk, dst_access, dst_phys, dst_lengths,
                out,
            )  # fmt: skip
            if count < 0:
                read_release(guard)
                reason = DMA_FAULT
                break
            targets = _to_host(memory, dst_phys, dst_lengths, count, dst_hosts, dst_host_lengths, out)
            if targets < 0:
                read_release(guard)
                reason = DMA_NOT_GUEST_RAM
                break
        else:
            dst_hosts[0] = host + offset  # OP_READ's buffer
            dst_host_lengths[0] = chunk
        # Every byte of the chunk is translated and in guest RAM: now, and only now, the access.
        if op == OP_FILL:
            _fill(dst_hosts, dst_host_lengths, targets, pattern, np.int64(offset & np.uint64(7)))
        elif op == OP_COMPARE:
            differs = _compare(src_hosts, src_host_lengths, sources, dst_hosts, dst_host_lengths)
            if differs >= 0:
                read_release(guard)
                out[O_BYTES_READ] += np.uint64(2 * (differs + 1))
                out[O_MISMATCH] = offset + np.uint64(differs)
                offset += np.uint64(differs)
                reason = DMA_MISMATCH
                break
        else:
            _copy(src_hosts, src_host_lengths, sources, dst_hosts, dst_host_lengths)
        read_release(guard)
        if uses_src:
            out[O_BYTES_READ] += chunk
        if op == OP_COMPARE:
            out[O_BYTES_READ] += chunk
        elif uses_dst:
            out[O_BYTES_WRITTEN] += chunk
        offset += chunk
    out[O_DONE] = offset
    return reason


def region_table(gpa_starts: U64Array, gpa_lasts: U64Array, host_addresses: U64Array) -> U64Array:
    """The ``memory`` argument of the kernels (``requests.M_*`` columns) from ``FlatRegions``' arrays."""
    table = np.empty((len(gpa_starts), 3), np.uint64)
    table[:, M_GPA_START] = gpa_starts
    table[:, M_GPA_LAST] = gpa_lasts
    table[:, M_HOST] = host_addresses
    return table


def warm_up_state() -> tuple[Any, ...]:
    """Translation state arguments as ``DmaPort._state`` passes them (generation first), for an endpoint
    in bypass: what the warm-ups compile the kernels that take them with."""
    from vhost_iommu.jit.tables import MappingTable

    leaves, nodes, directory, _meta = MappingTable(limit=16).arrays
    empty_u64 = np.zeros(0, np.uint64)
    return (
        0,
        True,
        0,
        np.full(1, NO_DOMAIN, np.int64),
        np.zeros(1, np.bool_),
        1,
        empty_u64,
        empty_u64,
        np.zeros(0, np.int64),
        np.zeros(2, np.int64),
        leaves,
        nodes,
        directory,
    )


def warm_up() -> None:
    """Compile ``translate`` and ``dma_transfer`` with the argument types the device layer passes."""
    guard = np.zeros(guard_module.GUARD_WORDS, np.int64)
    state = warm_up_state()
    ram = np.zeros(2 * CHUNK, np.uint8)
    base = np.uint64(ram.ctypes.data)
    memory = region_table(
        np.zeros(1, np.uint64), np.full(1, 2 * CHUNK - 1, np.uint64), np.full(1, base, np.uint64)
    )
    out = np.zeros(OUT_WORDS, np.uint64)
    segments = np.zeros(4, np.uint64)
    query = (
        np.uint64(0),
        np.uint64(16),
        FAULT_F_READ,
        segments,
        segments.copy(),
        out,
        np.zeros(C_WORDS, np.uint64),
    )
    translate(*(guard, *state, *query))
    dma_transfer(*(
        OP_COPY, guard, *state, memory, np.uint64(0), np.uint64(CHUNK), np.uint64(16), _ZERO, _ZERO,
        out, np.zeros(CACHE_WORDS, np.uint64), np.zeros((SCRATCH_ROWS, CHUNK), np.uint64),
    ))  # fmt: skip
    del ram  # kept alive across the calls


# The rules of this module, the guard, the table lookups and abi's numbers are compiled into these kernels.
cache_on_sources(globals(), abi, requests, tables, guard_module)

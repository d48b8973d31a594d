"""The compiled request path: one kernel walks, validates and serves a batch of requestq chains.

``serve_requests`` pops chains from a split ring (the same validation as
:class:`vhost_iommu.virtqueue.SplitQueue`), decodes MAP and UNMAP requests, applies them to the domain
arrays of :class:`vhost_iommu.device.domains.Domains` and to the mapping table of
:mod:`vhost_iommu.jit.tables` (the same checks and statuses as :class:`vhost_iommu.device.IommuDevice`),
writes each status tail and used entry, and keeps ``avail_event`` up to date. It creates no Python object
per request.

It stops early, *without consuming the chain it stopped at*, when that chain is not one it serves:

``STOP_PYTHON``  a chain whose request it does not serve (ATTACH, DETACH, PROBE, unknown types, fewer
                 than 4 readable bytes): the walk stops as soon as the first readable byte (the type)
                 says so, so the caller's ``SplitQueue.pop`` is the one walk (and validation) of the
                 whole chain; it serves it through the device core, then calls again;
``STOP_BROKEN``  the ring or the chain breaks a rule: the caller pops it with ``SplitQueue.pop``, which
                 raises ``QueueError`` with the reason (the device goes to NEEDS_RESET). Letting the Python
                 walk find the reason keeps one wording of every error, and a driver that rewrote the chain
                 meanwhile gets the same treatment it would have had from the Python path;
``STOP_GROW``    a MAP needs more rows in the table's pools: the caller grows the table and calls again;
``STOP_BUDGET``  the call completed ``R_BUDGET`` chains and more are available: the caller lets other work
                 run before calling again (a driver that keeps the ring full must not hold the caller's
                 event loop, which other guests share);
``STOP_JOURNAL`` journaling is on and the journal is full: the caller snapshots, starts a new journal
                 and calls again.

Journaling (``RF_JOURNAL``, ``vhost_iommu.persist``): every chain served is recorded in the journal at
``R_JOURNAL`` (``RECORD_WORDS`` u64 per record, the layout of ``vhost_iommu.abi``'s J_* numbers) and the
record committed (its first word stored last, after a release fence) before the chain's used entry and
the used index are stored: whatever the guest can see completed is in the journal, so a worker killed at
any instant is replaced by one that neither loses nor repeats a request.

Rings and buffers are reached through raw host addresses of live numpy views: the ring views of the
``SplitQueue`` (their addresses are words of its ring-state record, ``SplitQueue.state``, which this
kernel reads and advances in place) and the regions of ``GuestMemory.flat_tables()``, all kept alive by
the caller for the call; a buffer's guest-physical range is checked against the region table before any
byte of it is touched, so no guest value makes the kernel read or write outside guest memory.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Final

import numpy as np
import numpy.typing as npt
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from vhost_iommu import abi
from vhost_iommu.abi import (
    DESC_SIZE,
    J_HEAD_SHIFT,
    J_NO_STATUS,
    J_REQUEST_BYTES,
    J_REQUEST_WORD,
    J_STATUS_SHIFT,
    J_USED_LENGTH_SHIFT,
    J_USED_POS_SHIFT,
    KIND_REQUEST,
    MAP_FLAGS,
    MAP_PHYS_START,
    MAP_SIZE,
    MAX_CHAIN_BYTES,
    RECORD_WORDS,
    REQ_DOMAIN,
    REQ_VIRT_END,
    REQ_VIRT_START,
    S_IOERR,
    S_OK,
    T_MAP,
    T_UNMAP,
    TAIL_SIZE,
    UNMAP_RESERVED,
    UNMAP_SIZE,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
)
from vhost_iommu.jit import barriers, guard, history, native, rules, tables
from vhost_iommu.jit.barriers import full_fence
from vhost_iommu.jit.caching import cache_on_sources
from vhost_iommu.jit.guard import GUARD_WORDS, write_hold, write_release
from vhost_iommu.jit.interpreted import kernel, stand_in
from vhost_iommu.jit.tables import NEED_SPACE, OK, table_map, table_unmap

U64Array = npt.NDArray[np.uint64]
I64Array = npt.NDArray[np.int64]
I32Array = npt.NDArray[np.int32]
BoolArray = npt.NDArray[np.bool_]

# -- why the kernel stopped ------------------------------------------------------------------------------

STOP_EMPTY: Final = 0
"""Every available chain was served."""
STOP_PYTHON: Final = 1
"""The next chain is not a MAP/UNMAP the kernel serves; pop it in Python (its walk validates it)."""
STOP_BROKEN: Final = 2
"""The ring or the next chain is broken; ``SplitQueue.pop`` raises the reason."""
STOP_GROW: Final = 3
"""The next chain is a MAP that needs room in the mapping table; grow it and call again."""
STOP_BUDGET: Final = 4
"""``R_BUDGET`` chains were completed and another is available; call again later."""

STOP_JOURNAL: Final = 5
"""Journaling is on and the journal has no free record: snapshot, start a new one, call again."""
STOP_TRAP: Final = 6
"""Test hook (``R_JOURNAL_TRAP``): the record was committed and the chain not published; the caller
kills its own process to test recovery from exactly that instant."""

STOP_NAMES: Final[dict[int, str]] = {
    STOP_EMPTY: "empty",
    STOP_PYTHON: "python",
    STOP_BROKEN: "broken",
    STOP_GROW: "grow",
    STOP_BUDGET: "budget",
    STOP_JOURNAL: "journal",
    STOP_TRAP: "trap",
}

# -- the queue's ring-state record (int64): owned by ``SplitQueue.state``, read and written in place -------
# One record per ring, shared by SplitQueue's Python methods, this kernel and the kick loop: no copy of the
# ring's position exists anywhere else.

Q_DESC: Final = 0
"""Host address of the descriptor table (SplitQueue sets it whenever it binds its views)."""
Q_AVAIL: Final = 1
"""Host address of the available ring."""
Q_USED: Final = 2
"""Host address of the used ring."""
Q_SIZE: Final = 3
Q_FLAGS: Final = 4
"""``QF_*`` bits, fixed for the life of the ring."""
Q_NEXT_AVAIL: Final = 5
"""The free-running u16 index of the next available entry (``SplitQueue.next_avail``)."""
Q_USED_IDX: Final = 6
"""Used entries pushed, counted without wrapping from the used index the ring started at: its low 16
bits are the free-running u16 used index (``SplitQueue.used_idx``)."""
Q_NOTIFY: Final = 7
"""1 while kicks are wanted (``SplitQueue.set_notification``): with EVENT_IDX, avail_event follows
next_avail."""
Q_SIGNALLED_USED: Final = 8
"""``Q_USED_IDX`` when the last notification decision was made (``SplitQueue.needs_notification``):
the difference is the chains pushed since."""
Q_SIGNALLED_VALID: Final = 9
"""1 once a notification decision was made on this ring (before it, with EVENT_IDX, always notify)."""
QUEUE_WORDS: Final = 12

QF_EVENT_IDX: Final = 1
QF_INDIRECT: Final = 2
QF_WEAK_ORDER: Final = 4
"""The CPU may reorder loads and stores visibly to another CPU (not x86): fence where SplitQueue does."""

# -- the request path's parameter array (uint64): the device's side, owned by the caller ----------------

R_FLAGS: Final = 0
"""``RF_*`` bits."""
R_DOMAIN_FIRST: Final = 1
R_GRANULE: Final = 2
R_INPUT_START: Final = 3
R_INPUT_END: Final = 4
R_POLL_TICKS: Final = 5
"""Poll window after a completion, in cycle-counter ticks (0: never poll)."""
R_POLL_LIMIT_TICKS: Final = 6
"""Longest a call keeps polling in total, in ticks: the event loop that called it waits meanwhile."""
R_BUDGET: Final = 7
"""Most chains one call completes; the call stops with STOP_BUDGET when it has and more are available."""
R_COMPLETED: Final = 8
"""Out: chains completed by this call."""
R_JOURNAL: Final = 9
"""With RF_JOURNAL: host address of the journal's first record."""
R_JOURNAL_SLOTS: Final = 10
"""Records the journal holds."""
R_JOURNAL_NEXT: Final = 11
"""In and out: the next free record."""
R_JOURNAL_TRAP: Final = 12
"""Test hook: 1 + the record after whose commit the call stops with STOP_TRAP (0: never)."""
R_HISTORY: Final = 13
"""Host address of the device's mapping history (``jit/history.py``): every MAP and UNMAP applied is
appended to it before its answer is published (0: none)."""
R_HISTORY_TICKS: Final = 14
"""The cycle counter when the call started or its last poll ended, the time of the history records it
appends: one counter read per batch, not per request (a read costs about as much as the record)."""
PARAM_WORDS: Final = 16

RF_MAP_UNMAP: Final = 8
RF_MMIO: Final = 16
RF_NO_WORK: Final = 64
"""Answer every well-formed MAP and UNMAP OK without checking or applying it: the benchmarks' floor."""
RF_JOURNAL: Final = 128
"""Record every chain served in the journal at R_JOURNAL before publishing it."""

# -- the ``counts`` array (int64): what the device counts, added to its own counters by the caller ------

C_REQUEST: Final = 0
"""counts[C_REQUEST + type] for type 1..5; counts[C_REQUEST] counts requests not served (tail not found)."""
C_STATUS: Final = 8
"""counts[C_STATUS + status]."""
COUNT_WORDS: Final = 24

# -- the guest memory table: uint64[n, 3] rows (gpa start, gpa last inclusive, host address) by gpa ------

M_GPA_START: Final = 0
M_GPA_LAST: Final = 1
M_HOST: Final = 2

_SCRATCH: Final = 64
"""Readable bytes gathered per chain: more than any request the kernel serves."""
_MAX_WRITABLE_SEGMENTS: Final = TAIL_SIZE
"""A 4-byte tail spans at most 4 segments (none is empty)."""

_ZERO: Final = np.uint64(0)
_ONE: Final = np.uint64(1)


# -- raw loads and stores at host addresses ---------------------------------------------------------------
# Guest structures are little-endian and need not be aligned (a request may start at any byte), so every
# access is an align-1 load or store; x86 and arm64 do those in one instruction.


def _pointer_codegen(width: int, store: bool) -> Any:
    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        pointer = builder.inttoptr(args[0], ir.IntType(width).as_pointer())
        if store:
            builder.store(builder.trunc(args[1], ir.IntType(width)), pointer, align=1)
            return context.get_dummy_value()
        value = builder.load(pointer, align=1)
        return builder.zext(value, ir.IntType(64)) if width < 64 else value

    return codegen


def _load8_typer(typingctx: Any, address: Any) -> Any:
    return types.uint64(types.uint64), _pointer_codegen(8, False)


def _load16_typer(typingctx: Any, address: Any) -> Any:
    return types.uint64(types.uint64), _pointer_codegen(16, False)


def _load32_typer(typingctx: Any, address: Any) -> Any:
    return types.uint64(types.uint64), _pointer_codegen(32, False)


def _load64_typer(typingctx: Any, address: Any) -> Any:
    return types.uint64(types.uint64), _pointer_codegen(64, False)


def _store8_typer(typingctx: Any, address: Any, value: Any) -> Any:
    return types.void(types.uint64, types.uint64), _pointer_codegen(8, True)


def _store16_typer(typingctx: Any, address: Any, value: Any) -> Any:
    return types.void(types.uint64, types.uint64), _pointer_codegen(16, True)


def _store64_typer(typingctx: Any, address: Any, value: Any) -> Any:
    return types.void(types.uint64, types.uint64), _pointer_codegen(64, True)


def _cycles_typer(typingctx: Any) -> Any:
    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        counter = builder.module.declare_intrinsic(
            "llvm.readcyclecounter", fnty=ir.FunctionType(ir.IntType(64), [])
        )
        return builder.call(counter, [])

    return types.uint64(), codegen


def _release_fence_typer(typingctx: Any) -> Any:
    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        builder.fence("release")
        return context.get_dummy_value()

    return types.void(), codegen


# Typed as Any: numba supplies the typing context argument, so the Python-level signatures mislead mypy.
_load8: Any = intrinsic(_load8_typer)
_load16: Any = intrinsic(_load16_typer)
_load32: Any = intrinsic(_load32_typer)
_load64: Any = intrinsic(_load64_typer)
_store8: Any = intrinsic(_store8_typer)
_store16: Any = intrinsic(_store16_typer)
_store64: Any = intrinsic(_store64_typer)
_cycles: Any = intrinsic(_cycles_typer)
"""The CPU's cycle counter (TSC on x86): a clock for poll windows that costs no system call."""
_release_fence: Any = intrinsic(_release_fence_typer)
for _intrinsic, _stand_in in (
    (_load8, native.loader(8)),
    (_load16, native.loader(16)),
    (_load32, native.loader(32)),
    (_load64, native.loader(64)),
    (_store8, native.storer(8)),
    (_store16, native.storer(16)),
    (_store64, native.storer(64)),
    (_cycles, native.cycles),
    (_release_fence, native.release_fence),
):
    stand_in(_intrinsic, _stand_in)
"""Orders every earlier store before every later one (no instruction on x86, a barrier on arm64); also
keeps the compiler from moving a journal record's stores after its commit word."""


@njit(cache=True, nogil=True)
def cycles() -> np.uint64:
    """The cycle counter, from Python (to calibrate poll windows, to time a fault)."""
    now: np.uint64 = _cycles()
    return now


@functools.cache
def ticks_per_us() -> float:
    """Cycle-counter ticks per microsecond, measured once over 5 ms."""
    now = kernel(cycles)  # the twin reads the same counter
    wall, ticks = time.perf_counter_ns(), int(now())
    time.sleep(0.005)
    return (int(now()) - ticks) / ((time.perf_counter_ns() - wall) / 1000)


# -- the mapping history (jit/history.py) -----------------------------------------------------------------


@njit(cache=True, nogil=True)
def history_append(
    address: np.uint64,
    op: np.uint64,
    domain: np.uint64,
    start: np.uint64,
    last: np.uint64,
    value: np.uint64,
    extra: np.uint64,
    ticks: np.uint64,
) -> None:
    """Append one record, made at ``ticks`` (the cycle counter), to the history at ``address`` (0: none
    kept). Every argument is a uint64 (one compiled signature for the kernel and for Python callers)."""
    if address == _ZERO:
        return
    sequence = _load64(address + np.uint64(8 * history.H_NEXT))
    capacity = _load64(address + np.uint64(8 * history.H_CAPACITY))
    slot = sequence & (capacity - _ONE)
    record = address + np.uint64(8) * (
        np.uint64(history.HEADER_WORDS) + np.uint64(history.RECORD_WORDS) * slot
    )
    _store64(record, _ZERO)  # a reader skips it until it is whole again
    _release_fence()
    _store64(record + np.uint64(8 * history.W_OP), op)
    _store64(record + np.uint64(8 * history.W_DOMAIN), domain)
    _store64(record + np.uint64(8 * history.W_START), start)
    _store64(record + np.uint64(8 * history.W_LAST), last)
    _store64(record + np.uint64(8 * history.W_VALUE), value)
    _store64(record + np.uint64(8 * history.W_EXTRA), extra)
    _store64(record + np.uint64(8 * history.W_TICKS), ticks)
    _release_fence()
    _store64(record, sequence + _ONE)
    _store64(address + np.uint64(8 * history.H_NEXT), sequence + _ONE)


# -- guest memory ----------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def _region_of(memory: U64Array, gpa: np.uint64) -> int:
    """Row of the region holding ``gpa``, or -1."""
    low = 0
    high = memory.shape[0]
    while low < high:  # the first region starting after gpa
        middle = (low + high) >> 1
        if memory[middle, M_GPA_START] <= gpa:
            low = middle + 1
        else:
            high = middle
    row = low - 1
    if row >= 0 and gpa <= memory[row, M_GPA_LAST]:
        return row
    return -1


@njit(cache=True, nogil=True)
def _host_address_in_one_region(memory: U64Array, gpa: np.uint64, length: np.uint64) -> np.uint64:
    """Host address of [gpa, gpa + length) if it lies inside one region (length > 0), else 0."""
    last = gpa + (length - _ONE)
    if last < gpa:
        return _ZERO
    row = _region_of(memory, gpa)
    if row < 0 or last > memory[row, M_GPA_LAST]:
        return _ZERO
    host: np.uint64 = memory[row, M_HOST] + (gpa - memory[row, M_GPA_START])
    return host


@njit(cache=True, nogil=True)
def _resolve(
    memory: U64Array,
    gpa: np.uint64,
    length: np.uint64,
    seg_hosts: U64Array,
    seg_lengths: U64Array,
) -> int:
    """Split [gpa, gpa + length) (length > 0) into host segments, one per region it crosses; regions
    must follow each other without a gap. Returns the number of segments, or -1 if any byte is outside
    guest memory. ``seg_*`` hold one entry per row of ``memory``, the most a range can cross."""
    last = gpa + (length - _ONE)
    if last < gpa:
        return -1
    row = _region_of(memory, gpa)
    if row < 0:
        return -1
    count = 0
    position = gpa
    while True:
        if row >= memory.shape[0] or not memory[row, M_GPA_START] <= position <= memory[row, M_GPA_LAST]:
            return -1
        region_last = memory[row, M_GPA_LAST]
        take_last = last if last < region_last else region_last
        seg_hosts[count] = memory[row, M_HOST] + (position - memory[row, M_GPA_START])
        seg_lengths[count] = take_last - position + _ONE
        count += 1
        if take_last == last:
            return count
        position = take_last + _ONE
        row += 1


# -- the device's rules (jit/rules.py, which the device core calls too) --------------------------------


@njit(cache=True, nogil=True)
def _map(
    request: npt.NDArray[np.uint8],
    params: U64Array,
    exists: BoolArray,
    bypass: BoolArray,
    mapping_count: I64Array,
    resv_set: I32Array,
    resv_starts: U64Array,
    resv_ends: U64Array,
    resv_offsets: I64Array,
    leaves: U64Array,
    nodes: U64Array,
    directory: I64Array,
    meta: I64Array,
) -> int:
    """Status of one MAP (as ``IommuDevice._map``), or -1 when the table needs room."""
    flags_word = params[R_FLAGS]
    domain = np.int64(_le(request, REQ_DOMAIN, 4))
    virt_start = _le(request, REQ_VIRT_START, 8)
    virt_end = _le(request, REQ_VIRT_END, 8)
    phys_start = _le(request, MAP_PHYS_START, 8)
    flags = _le(request, MAP_FLAGS, 4)
    index = domain - np.int64(params[R_DOMAIN_FIRST])
    status = rules.map_status(
        (flags_word & RF_MAP_UNMAP) != _ZERO,
        (flags_word & RF_MMIO) != _ZERO,
        index,
        exists,
        bypass,
        resv_set,
        resv_starts,
        resv_ends,
        resv_offsets,
        virt_start,
        virt_end,
        phys_start,
        np.int64(flags),
        params[R_GRANULE],
        params[R_INPUT_START],
        params[R_INPUT_END],
    )
    if status != S_OK:
        return status
    result = table_map(leaves, nodes, directory, meta, domain, virt_start, virt_end, phys_start, flags)
    if result == NEED_SPACE:
        return -1
    if result == OK:
        mapping_count[index] += 1
        history_append(
            params[R_HISTORY],
            np.uint64(history.OP_MAP),
            np.uint64(domain),
            virt_start,
            virt_end,
            phys_start,
            flags,
            params[R_HISTORY_TICKS],
        )
    return rules.mapped_status(result)


@njit(cache=True, nogil=True)
def _unmap(
    request: npt.NDArray[np.uint8],
    params: U64Array,
    exists: BoolArray,
    bypass: BoolArray,
    mapping_count: I64Array,
    leaves: U64Array,
    nodes: U64Array,
    directory: I64Array,
    meta: I64Array,
) -> int:
    """Status of one UNMAP (as ``IommuDevice._unmap``)."""
    domain = np.int64(_le(request, REQ_DOMAIN, 4))
    virt_start = _le(request, REQ_VIRT_START, 8)
    virt_end = _le(request, REQ_VIRT_END, 8)
    index = domain - np.int64(params[R_DOMAIN_FIRST])
    status = rules.unmap_status(
        (params[R_FLAGS] & RF_MAP_UNMAP) != _ZERO,
        np.int64(_le(request, UNMAP_RESERVED, 4)),
        index,
        exists,
        bypass,
        virt_start,
        virt_end,
    )
    if status != S_OK:
        return status
    result, removed = table_unmap(leaves, nodes, directory, meta, domain, virt_start, virt_end)
    if result == OK:
        mapping_count[index] -= removed
        history_append(
            params[R_HISTORY],
            np.uint64(history.OP_UNMAP),
            np.uint64(domain),
            virt_start,
            virt_end,
            np.uint64(removed),
            _ZERO,
            params[R_HISTORY_TICKS],
        )
    return rules.unmapped_status(result)


@njit(cache=True, nogil=True)
def _le(buffer: npt.NDArray[np.uint8], offset: int, width: int) -> np.uint64:
    value: np.uint64 = _ZERO
    for k in range(width - 1, -1, -1):
        value = (value << np.uint64(8)) | np.uint64(buffer[offset + k])
    return value


@njit(cache=True, nogil=True)
def _i64(value: Any) -> int:
    """``value`` as a signed 64-bit int: numba's int() keeps uint64, and mixing int64 with uint64 in
    numba arithmetic goes through float64."""
    return int(np.int64(value))


# -- the kernel ---------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def serve_requests(
    queue: I64Array,
    params: U64Array,
    memory: U64Array,
    exists: BoolArray,
    bypass: BoolArray,
    mapping_count: I64Array,
    resv_set: I32Array,
    resv_starts: U64Array,
    resv_ends: U64Array,
    resv_offsets: I64Array,
    leaves: U64Array,
    nodes: U64Array,
    directory: I64Array,
    meta: I64Array,
    counts: I64Array,
    guard: I64Array,
) -> int:
    """Serve the available chains of a requestq until it is empty or a chain needs the caller.

    ``queue`` is the ring's state record (``Q_*`` words, ``SplitQueue.state``): its addresses, and its
    indices, read and advanced in place; ``params`` (``R_*`` words) the device's side
    and the call's budget, with ``R_COMPLETED`` out; ``memory`` is the guest's region table (``M_*``
    columns, sorted by gpa); the domain arrays are ``Domains``' (indexed by domain - R_DOMAIN_FIRST)
    and its ``RegionSets`` arrays; the table arrays are ``MappingTable.arrays``. ``counts`` (``C_*``)
    accumulates request and status counts. Returns a ``STOP_*`` code; the chain it stopped at is left
    available.
    """
    desc = np.uint64(queue[Q_DESC])
    avail = np.uint64(queue[Q_AVAIL])
    used = np.uint64(queue[Q_USED])
    size = queue[Q_SIZE]
    mask = size - 1
    size64 = np.uint64(size)
    ring_flags = queue[Q_FLAGS]
    event_idx = (ring_flags & QF_EVENT_IDX) != 0
    indirect_allowed = (ring_flags & QF_INDIRECT) != 0
    weak_order = (ring_flags & QF_WEAK_ORDER) != 0
    keep_avail_event = event_idx and queue[Q_NOTIFY] != 0
    avail_event = used + np.uint64(4 + 8 * size)
    next_avail = queue[Q_NEXT_AVAIL]
    used_idx = queue[Q_USED_IDX]
    completed = 0
    flags_word = params[R_FLAGS]
    poll_ticks = params[R_POLL_TICKS]
    poll_limit = params[R_POLL_LIMIT_TICKS]
    poll_spent = _ZERO
    max_chains = _i64(params[R_BUDGET])
    journaling = (flags_word & RF_JOURNAL) != _ZERO
    journal = params[R_JOURNAL]
    journal_slots = _i64(params[R_JOURNAL_SLOTS])
    journal_next = _i64(params[R_JOURNAL_NEXT])
    journal_trap = _i64(params[R_JOURNAL_TRAP])
    if params[R_HISTORY] != _ZERO:
        params[R_HISTORY_TICKS] = _cycles()

    request = np.zeros(_SCRATCH, np.uint8)
    request_address = np.uint64(request.ctypes.data)  # the journal copies a request's bytes from here
    regions = memory.shape[0]
    seg_hosts = np.empty(max(regions, 1), np.uint64)
    seg_lengths = np.empty(max(regions, 1), np.uint64)
    tail_hosts = np.empty(_MAX_WRITABLE_SEGMENTS, np.uint64)
    tail_lengths = np.empty(_MAX_WRITABLE_SEGMENTS, np.uint64)

    reason = STOP_EMPTY
    while True:
        # -- is there a chain? (SplitQueue._pending) --
        pending = (_i64(_load16(avail + np.uint64(2))) - next_avail) & 0xFFFF
        if pending == 0 and completed and poll_ticks and poll_spent < poll_limit:
            # Adaptive polling: only right after serving something (never on an idle ring), for a bounded
            # window, so the next request of a driver that waits for each answer is caught without a
            # kick and a wake-up. Kicks are suppressed meanwhile: avail_event one behind next_avail
            # makes vring_need_event false for every new index.
            if keep_avail_event:
                _store16(avail_event, np.uint64((next_avail - 1) & 0xFFFF))
            began = _cycles()
            window = min(poll_ticks, poll_limit - poll_spent)
            while pending == 0 and _cycles() - began < window:
                pending = (_i64(_load16(avail + np.uint64(2))) - next_avail) & 0xFFFF
            ended = _cycles()
            poll_spent += ended - began
            params[R_HISTORY_TICKS] = ended  # what it serves next came meanwhile
        if pending == 0 and keep_avail_event:
            # Ask for a kick at the next entry, then look again: a driver that published an entry after
            # our first look read the old avail_event and will not kick.
            _store16(avail_event, np.uint64(next_avail))
            full_fence()
            pending = (_i64(_load16(avail + np.uint64(2))) - next_avail) & 0xFFFF
        if pending == 0:
            break
        if completed >= max_chains:
            reason = STOP_BUDGET
            break
        if journaling and journal_next >= journal_slots:
            reason = STOP_JOURNAL  # before the chain is touched: it is served after the rotation
            break
        if pending > size:
            reason = STOP_BROKEN
            break
        if weak_order:
            full_fence()  # the ring and descriptors only after the index that published them
        head = _i64(_load16(avail + np.uint64(4 + 2 * (next_avail & mask))))
        if head >= size:
            reason = STOP_BROKEN
            break

        # -- walk the chain (SplitQueue._walk) --
        table = desc
        table_entries = size
        budget = size
        in_indirect = False
        buffers = 0
        readable_len = 0
        writable_len = 0
        tail_segments = 0
        index = head
        broken = False
        not_ours = False  # the chain's request is the Python path's: it walks the chain, this walk stops
        while True:
            if budget == 0:
                broken = True
                break
            budget -= 1
            entry = table + np.uint64(DESC_SIZE * index)
            address = _load64(entry)
            length = _load32(entry + np.uint64(8))
            flags = _load16(entry + np.uint64(12))
            next_index = _i64(_load16(entry + np.uint64(14)))
            if flags & np.uint64(VIRTQ_DESC_F_INDIRECT):
                if (
                    in_indirect
                    or not indirect_allowed
                    or flags & np.uint64(VIRTQ_DESC_F_NEXT)
                    or length == _ZERO
                    or length % np.uint64(DESC_SIZE)
                    or length // np.uint64(DESC_SIZE) > size64
                ):
                    broken = True
                    break
                host = _host_address_in_one_region(memory, address, length)
                if host == _ZERO:
                    broken = True
                    break
                table = host
                table_entries = budget = _i64(length // np.uint64(DESC_SIZE))
                in_indirect = True
                index = 0
                continue
            if length == _ZERO:
                broken = True
                break
            buffers += 1
            if buffers > size:
                broken = True
                break
            segments = _resolve(memory, address, length, seg_hosts, seg_lengths)
            if segments < 0:
                broken = True
                break
            if flags & np.uint64(VIRTQ_DESC_F_WRITE):
                if readable_len == 0:
                    not_ours = True  # no request bytes at all
                    break
                for s in range(segments):
                    if tail_segments < _MAX_WRITABLE_SEGMENTS:
                        tail_hosts[tail_segments] = seg_hosts[s]
                        tail_lengths[tail_segments] = seg_lengths[s]
                    tail_segments += 1
                writable_len += _i64(length)
            else:
                if writable_len:
                    broken = True  # readable after writable
                    break
                for s in range(segments):
                    source = seg_hosts[s]
                    take = min(_i64(seg_lengths[s]), _SCRATCH - readable_len)
                    for k in range(max(take, 0)):
                        request[readable_len + k] = np.uint8(_load8(source + np.uint64(k)))
                    readable_len += _i64(seg_lengths[s])
                # readable_len counts every readable byte; only the first _SCRATCH were gathered.
                if request[0] != T_MAP and request[0] != T_UNMAP:
                    not_ours = True  # known from its first byte: the rest is walked once, by SplitQueue.pop
                    break
            if readable_len + writable_len > MAX_CHAIN_BYTES:
                broken = True
                break
            if not flags & np.uint64(VIRTQ_DESC_F_NEXT):
                break
            if next_index >= table_entries:
                broken = True
                break
            index = next_index
        if broken:
            reason = STOP_BROKEN
            break

        # -- serve it (IommuDevice.handle_request) --
        if not_ours or readable_len < 4:
            reason = STOP_PYTHON
            break
        request_type = _i64(request[0])
        expected = MAP_SIZE if request_type == T_MAP else UNMAP_SIZE
        status = J_NO_STATUS
        if writable_len != TAIL_SIZE:
            # The tail cannot be found: nothing is written, used length 0.
            counts[C_REQUEST] += 1
            used_length = 0
        else:
            if readable_len != expected:
                status = S_IOERR
            elif flags_word & RF_NO_WORK:
                status = S_OK
            elif request_type == T_MAP:
                write_hold(guard)
                status = _map(
                    request,
                    params,
                    exists,
                    bypass,
                    mapping_count,
                    resv_set,
                    resv_starts,
                    resv_ends,
                    resv_offsets,
                    leaves,
                    nodes,
                    directory,
                    meta,
                )
                write_release(guard, False)
                if status < 0:
                    reason = STOP_GROW
                    break
            else:
                write_hold(guard)  # released before the used entry below is published
                status = _unmap(
                    request, params, exists, bypass, mapping_count, leaves, nodes, directory, meta
                )
                write_release(guard, False)
            counts[C_REQUEST + request_type] += 1
            counts[C_STATUS + status] += 1
            # The tail {u8 status; u8 reserved[3]} scattered over the writable segments.
            written = 0
            for s in range(tail_segments):
                for k in range(_i64(tail_lengths[s])):
                    _store8(tail_hosts[s] + np.uint64(k), np.uint64(status if written == 0 else 0))
                    written += 1
            used_length = TAIL_SIZE

        if journaling:
            # -- journal it, committed before anything below makes it visible to the guest --
            record = journal + np.uint64(8 * RECORD_WORDS * journal_next)
            _store64(
                record + np.uint64(8),
                np.uint64(KIND_REQUEST)
                | (np.uint64(status) << np.uint64(J_STATUS_SHIFT))
                | (np.uint64(used_length) << np.uint64(J_USED_LENGTH_SHIFT)),
            )
            _store64(
                record + np.uint64(16),
                np.uint64(next_avail)
                | (np.uint64(used_idx & 0xFFFF) << np.uint64(J_USED_POS_SHIFT))
                | (np.uint64(head) << np.uint64(J_HEAD_SHIFT)),
            )
            for k in range(J_REQUEST_BYTES // 8):
                _store64(
                    record + np.uint64(8 * (J_REQUEST_WORD + k)), _load64(request_address + np.uint64(8 * k))
                )
            _release_fence()
            journal_next += 1
            _store64(record, np.uint64(journal_next))
            _release_fence()  # the commit ahead of the used entry and index
            if journal_next == journal_trap:
                reason = STOP_TRAP
                break

        # -- complete it (SplitQueue.pop's bookkeeping, then push_used) --
        next_avail = (next_avail + 1) & 0xFFFF
        if keep_avail_event:
            _store16(avail_event, np.uint64(next_avail))
        slot = used_idx & mask
        _store64(used + np.uint64(4 + 8 * slot), np.uint64(head) | (np.uint64(used_length) << np.uint64(32)))
        if weak_order:
            full_fence()  # the entry and the status ahead of the index
        used_idx += 1  # not wrapped (Q_USED_IDX); the store keeps its low 16 bits
        _store16(used + np.uint64(2), np.uint64(used_idx & 0xFFFF))
        completed += 1

    queue[Q_NEXT_AVAIL] = next_avail
    queue[Q_USED_IDX] = used_idx
    params[R_COMPLETED] = np.uint64(completed)
    params[R_JOURNAL_NEXT] = np.uint64(journal_next)
    return reason


@contextmanager
def warm_up_arguments() -> Iterator[tuple[Any, ...]]:
    """Arguments of ``serve_requests`` with the types the back-end passes: an empty ring of 8 (the memory
    they point to lives until the block ends). The kick loop's warm-up passes them on too."""
    from vhost_iommu.jit.tables import MappingTable

    ring_memory = np.zeros(4096, np.uint8)
    base = np.uint64(ring_memory.ctypes.data)
    queue = np.zeros(QUEUE_WORDS, np.int64)
    queue[Q_DESC] = base
    queue[Q_AVAIL] = base + np.uint64(1024)
    queue[Q_USED] = base + np.uint64(2048)
    queue[Q_SIZE] = 8
    queue[Q_FLAGS] = QF_EVENT_IDX
    queue[Q_NOTIFY] = 1
    params = np.zeros(PARAM_WORDS, np.uint64)
    params[R_GRANULE] = 4096
    params[R_BUDGET] = 8
    memory = np.zeros((1, 3), np.uint64)
    memory[0] = (0, 4095, base)
    leaves, nodes, directory, meta = MappingTable(limit=16).arrays
    yield (
        queue,
        params,
        memory,
        np.zeros(1, np.bool_),
        np.zeros(1, np.bool_),
        np.zeros(1, np.int64),
        np.zeros(1, np.int32),
        np.zeros(0, np.uint64),
        np.zeros(0, np.uint64),
        np.zeros(1, np.int64),
        leaves,
        nodes,
        directory,
        meta,
        np.zeros(COUNT_WORDS, np.int64),
        np.zeros(GUARD_WORDS, np.int64),
    )
    del ring_memory  # kept alive across the block


def warm_up() -> None:
    """Compile ``serve_requests`` with the argument types the back-end passes (an empty ring), and
    ``history_append`` and ``cycles`` as Python calls them."""
    with warm_up_arguments() as arguments:
        serve_requests(*arguments)
    history_append(*(np.uint64(0),) * 8)
    cycles()


# The rules, the table kernels and abi's numbers are compiled into these kernels.
cache_on_sources(globals(), abi, rules, tables, barriers, guard, history)

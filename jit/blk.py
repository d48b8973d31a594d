"""The virtio-blk request queue served by one kernel: walk, translate, read or write the image, complete.

``serve_blk`` is what :class:`vhost_iommu.endpoints.virtio_blk.VirtioBlock` runs when its queue is
notified and the kernels are compiled. For every available chain it does in one pass, without an object
per request, what the Python path does with ``SplitQueue.pop`` and ``VirtioBlock._serve_chain``:

- walks the chain as ``SplitQueue._walk`` does (direct and indirect descriptors), translating each buffer
  and the indirect table through the endpoint's IOMMU domain (``jit/dma._translate_into``, the DMA
  port's own walk, holding the translation guard shared while it translates and counting into the port's
  words) and its guest-physical segments into host addresses of the client's RAM;
- serves IN with one ``preadv`` into the writable buffers, OUT with one ``pwritev`` from the readable
  ones, FLUSH with ``fdatasync``, and writes the status byte;
- puts the chain in the used ring (and, with EVENT_IDX, moves avail_event), as ``push_used`` does.

It serves only the requests whose outcome is OK. Anything else leaves the chain available and returns
``BLK_PYTHON``: a chain the walk refuses (a loop, a bad indirect table, a buffer outside guest RAM), an
address the domain does not translate, a request of another type, out of range, not whole sectors, a
write to a read-only disk, a transfer that failed or came short. The Python path then serves that chain
from the start, with the messages, the fault event, NEEDS_RESET or IOERR it gives now: every error has
one home. (A transfer the kernel started and the Python path repeats moves the same bytes to the same
place.) ``BLK_STALE`` asks for the translation arrays again (``DmaPort._state``'s generation moved).

The ring-state record (``Q_*`` words, ``SplitQueue.state``) is read and advanced in place; the kernel
completes every chain it takes, so nothing stays in flight. The notification decision is the caller's
(``SplitQueue.needs_notification`` on the same words).
"""

from __future__ import annotations

from typing import Any, Final

import numpy as np
import numpy.typing as npt
from numba import njit

from vhost_iommu import abi
from vhost_iommu.abi import (
    DESC_SIZE,
    MAX_CHAIN_BYTES,
    VIRTIO_BLK_HEADER_SIZE,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_SECTOR_SIZE,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
)
from vhost_iommu.jit import barriers, dma, guard, libc, requests, tables
from vhost_iommu.jit.barriers import full_fence
from vhost_iommu.jit.caching import cache_on_sources
from vhost_iommu.jit.dma import O_BYPASSED, O_TRANSLATIONS, TRANSLATE_OVERFLOW, _translate_into
from vhost_iommu.jit.guard import G_GENERATION, read_hold, read_release
from vhost_iommu.jit.libc import fdatasync, preadv, pwritev
from vhost_iommu.jit.requests import (
    Q_AVAIL,
    Q_DESC,
    Q_FLAGS,
    Q_NEXT_AVAIL,
    Q_NOTIFY,
    Q_SIZE,
    Q_USED,
    Q_USED_IDX,
    QF_EVENT_IDX,
    QF_INDIRECT,
    QF_WEAK_ORDER,
    _i64,
    _load8,
    _load16,
    _load32,
    _load64,
    _resolve,
    _store8,
    _store16,
    _store64,
)

I64Array = npt.NDArray[np.int64]
U64Array = npt.NDArray[np.uint64]
BoolArray = npt.NDArray[np.bool_]

# -- the ``disk`` words (int64) --------------------------------------------------------------------------

D_FD: Final = 0
"""In: the image's fd (negative: closed, every data request is the Python path's)."""
D_SIZE: Final = 1
"""In: the image's size in bytes (what whole sectors of it the device offers)."""
D_READONLY: Final = 2
"""In: 1 if writes are refused."""
D_READS: Final = 3
"""Out, cumulative (as ``BlockCounters``): IN requests served, and below the rest of its counters."""
D_WRITES: Final = 4
D_FLUSHES: Final = 5
D_BYTES_READ: Final = 6
D_BYTES_WRITTEN: Final = 7
D_COMPLETED: Final = 8
"""Out: chains the last call completed."""
D_SERVED: Final = 9
"""Out, cumulative: chains completed by this kernel."""
DISK_WORDS: Final = 10

# -- scratch (the caller's arrays, so the kernel allocates nothing) ---------------------------------------

IOV_MAX: Final = 1024
"""Host segments a request's data may have (Linux's IOV_MAX: one preadv); more is the Python path's."""
TRANSLATED_SEGMENTS: Final = IOV_MAX
"""Guest-physical segments one buffer may translate to here: a 4 MiB buffer over scattered pages (with
the IOMMU, Linux maps a request's pages at one IOVA range: one descriptor, a segment per page)."""
SCRATCH_ROWS: Final = 6
"""``scratch`` is uint64[SCRATCH_ROWS, 2 * IOV_MAX]: the readable and the writable buffers' iovecs, one
buffer's translated segments, their host pieces, the indirect table's host range, the data's iovecs."""
_R_READ = 0
_R_WRITE = 1
_R_SEGMENTS = 2
_R_HOSTS = 3
_R_TABLE = 4
_R_DATA = 5
MAX_REGIONS: Final = IOV_MAX
"""Client RAM regions the kernel can split a range over (``_R_HOSTS``); more is the Python path's."""

# -- why it returned -----------------------------------------------------------------------------------------

BLK_EMPTY: Final = 0
"""Every available chain was served."""
BLK_PYTHON: Final = 1
"""The chain at next_avail is the Python path's (left available, untouched but for repeated transfers)."""
BLK_STALE: Final = 2
"""The translation arrays are old: fetch them again and call again."""

_ZERO = np.uint64(0)
_ONE = np.uint64(1)
_HEADER = np.uint64(VIRTIO_BLK_HEADER_SIZE)
_SECTOR = np.uint64(VIRTIO_BLK_SECTOR_SIZE)
_READ = abi.MAP_F_READ
_WRITE = abi.MAP_F_WRITE


@njit(cache=True, nogil=True)
def _append(iov: U64Array, count: int, host: np.uint64, length: np.uint64) -> int:
    """Add a host segment to an iovec row (merged with the last when adjacent); the new count, or -1 when
    the row is full."""
    if count and iov[2 * count - 2] + iov[2 * count - 1] == host:
        iov[2 * count - 1] += length
        return count
    if count == IOV_MAX:
        return -1
    iov[2 * count] = host
    iov[2 * count + 1] = length
    return count + 1


@njit(cache=True, nogil=True)
def _translate_buffer(
    state: Any,
    iova: np.uint64,
    length: np.uint64,
    access: int,
    memory: U64Array,
    scratch: U64Array,
    row: int,
    count: int,
    out: U64Array,
    cache: U64Array,
) -> int:
    """Append the host segments of a buffer to iovec ``row`` of ``scratch`` (``count`` there so far); the
    new count, or -1 if the domain or guest RAM refuses any byte, or the row is full."""
    if iova + (length - _ONE) < iova:
        return -1  # wraps the address space
    segments_phys = scratch[_R_SEGMENTS, :TRANSLATED_SEGMENTS]
    segments_lengths = scratch[_R_SEGMENTS, TRANSLATED_SEGMENTS : 2 * TRANSLATED_SEGMENTS]
    # ``state`` is the generation, then _translate_into's arguments up to the table arrays; epoch 0 and
    # the cache at 0, as DmaPort.translate's kernel (the caller empties the cache under each hold).
    segments = _translate_into(
        state[1], state[2], state[3], state[4], state[5], state[6], state[7], state[8], state[9],
        state[10], state[11], state[12],
        state[0], 0, cache, 0, iova, length, access, segments_phys, segments_lengths, out,
    )  # fmt: skip
    if segments < 0 or segments == TRANSLATE_OVERFLOW:
        return -1
    regions = memory.shape[0]
    hosts = scratch[_R_HOSTS, :regions]
    host_lengths = scratch[_R_HOSTS, regions : 2 * regions]
    iov = scratch[row]
    for s in range(segments):
        pieces = _resolve(memory, segments_phys[s], segments_lengths[s], hosts, host_lengths)
        if pieces < 0:
            return -1
        for p in range(pieces):
            count = _append(iov, count, hosts[p], host_lengths[p])
            if count < 0:
                return -1
    return count


@njit(cache=True, nogil=True)
def _gather(iov: U64Array, count: int, skip: np.uint64, length: np.uint64, into: U64Array) -> int:
    """The iovecs of ``length`` bytes of the ``count`` in ``iov`` from byte ``skip`` on, written to
    ``into`` (a row of the same shape); their count."""
    made = 0
    for k in range(count):
        base = iov[2 * k]
        size = iov[2 * k + 1]
        if skip >= size:
            skip -= size
            continue
        take = min(size - skip, length)
        into[2 * made] = base + skip
        into[2 * made + 1] = take
        made += 1
        length -= take
        skip = _ZERO
        if length == _ZERO:
            break
    return made


@njit(cache=True, nogil=True)
def _transfer(call: int, fd: int, iov: U64Array, count: int, offset: np.uint64, length: np.uint64) -> bool:
    """One preadv (``call`` 0) or pwritev of the iovecs; whether it moved every byte."""
    if length == _ZERO:
        return True
    address = np.uint64(iov.ctypes.data)
    if call == 0:
        moved = preadv(fd, address, count, np.int64(offset))
    else:
        moved = pwritev(fd, address, count, np.int64(offset))
    return bool(moved == np.int64(length))


@njit(cache=True, nogil=True)
def _header(iov: U64Array, count: int) -> tuple[np.uint64, np.uint64]:
    """(type, sector) of the request header at the start of the readable iovecs (at least 16 bytes)."""
    kind = _ZERO
    sector = _ZERO
    position = 0
    for k in range(count):
        base = iov[2 * k]
        size = iov[2 * k + 1]
        at = _ZERO
        while at < size and position < VIRTIO_BLK_HEADER_SIZE:
            byte = _load8(base + at)
            if position < 4:
                kind |= byte << np.uint64(8 * position)
            elif position >= 8:
                sector |= byte << np.uint64(8 * (position - 8))
            position += 1
            at += _ONE
        if position >= VIRTIO_BLK_HEADER_SIZE:
            break
    return kind, sector


@njit(cache=True, nogil=True)
def _in_image(sector: np.uint64, length: np.uint64, image_size: np.uint64) -> bool:
    """Whether ``length`` bytes at ``sector`` are whole sectors inside the image (VirtioBlock._range)."""
    if length % _SECTOR or sector > image_size // _SECTOR:
        return False
    return bool(length <= image_size - sector * _SECTOR)


@njit(cache=True, nogil=True)
def serve_blk(
    queue: I64Array,
    disk: I64Array,
    guard_words: I64Array,
    state: Any,
    out: U64Array,
    cache: U64Array,
    memory: U64Array,
    scratch: U64Array,
) -> int:
    """Serve the available chains of a virtio-blk queue until it is empty or a chain is the Python path's.

    ``queue`` is the ring-state record (its addresses are host addresses of the translated rings);
    ``disk`` the ``D_*`` words; ``guard_words`` and ``state`` the endpoint's translation guard and state
    (``DmaPort._state``'s tuple: generation first); ``out`` and ``cache`` the port's counter words and walk
    cache; ``memory`` the client's RAM (``M_*`` rows, at most MAX_REGIONS); ``scratch``
    uint64[SCRATCH_ROWS, 2 * IOV_MAX]. Returns ``BLK_*``; ``disk[D_COMPLETED]``: the chains it completed."""
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
    fd = disk[D_FD]
    image_size = np.uint64(max(disk[D_SIZE], 0))
    readonly = disk[D_READONLY] != 0
    generation = state[0]
    readable = scratch[_R_READ]
    writable = scratch[_R_WRITE]
    table_range = scratch[_R_TABLE]
    data = scratch[_R_DATA]
    completed = 0
    reason = BLK_EMPTY
    while True:
        # -- is there a chain? (SplitQueue._pending; kicks asked for again before the ring counts empty) --
        pending = (_i64(_load16(avail + np.uint64(2))) - next_avail) & 0xFFFF
        if pending == 0 and keep_avail_event:
            _store16(avail_event, np.uint64(next_avail))
            full_fence()
            pending = (_i64(_load16(avail + np.uint64(2))) - next_avail) & 0xFFFF
        if pending == 0:
            break
        if pending > size:
            reason = BLK_PYTHON
            break
        if weak_order:
            full_fence()  # the ring and descriptors only after the index that published them
        head = _i64(_load16(avail + np.uint64(4 + 2 * (next_avail & mask))))
        if head >= size:
            reason = BLK_PYTHON
            break

        # -- walk it, translating every buffer (SplitQueue._walk through TranslatedMemory) --
        translations = out[O_TRANSLATIONS]
        bypassed = out[O_BYPASSED]
        read_hold(guard_words)
        if guard_words[G_GENERATION] != generation:
            read_release(guard_words)
            reason = BLK_STALE
            break
        cache[:] = 0  # nothing of a walk outlives its hold
        table = desc
        table_entries = size
        budget = size
        in_indirect = False
        buffers = 0
        readable_count = 0
        writable_count = 0
        readable_len = _ZERO
        writable_len = _ZERO
        index = head
        refused = False
        while True:
            if budget == 0:
                refused = True  # a loop
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
                    refused = True
                    break
                # One host range (TranslatedMemory.gpa_view: contiguous in guest-physical memory, one region).
                pieces = _translate_buffer(
                    state, address, length, _READ, memory, scratch, _R_TABLE, 0, out, cache
                )
                if pieces != 1:
                    refused = True
                    break
                table = table_range[0]
                table_entries = budget = _i64(length // np.uint64(DESC_SIZE))
                in_indirect = True
                index = 0
                continue
            if length == _ZERO:
                refused = True
                break
            buffers += 1
            if buffers > size:
                refused = True
                break
            if flags & np.uint64(VIRTQ_DESC_F_WRITE):
                writable_count = _translate_buffer(
                    state, address, length, _WRITE, memory, scratch, _R_WRITE, writable_count, out, cache
                )
                if writable_count < 0:
                    refused = True
                    break
                writable_len += length
            else:
                if writable_len:
                    refused = True  # readable after writable
                    break
                readable_count = _translate_buffer(
                    state, address, length, _READ, memory, scratch, _R_READ, readable_count, out, cache
                )
                if readable_count < 0:
                    refused = True
                    break
                readable_len += length
            if readable_len + writable_len > np.uint64(MAX_CHAIN_BYTES):
                refused = True
                break
            if not flags & np.uint64(VIRTQ_DESC_F_NEXT):
                break
            if next_index >= table_entries:
                refused = True
                break
            index = next_index
        read_release(guard_words)

        # -- serve it (VirtioBlock._serve_chain, its OK outcomes) --
        served = bool(not refused and readable_len >= _HEADER and writable_len >= _ONE)
        used_length = _ONE
        if served and keep_avail_event:
            # Where pop() writes it: before the header is read and the data moved (a buffer may overlap it).
            _store16(avail_event, np.uint64((next_avail + 1) & 0xFFFF))
        if served:
            kind, sector = _header(readable, readable_count)
            data_in = writable_len - _ONE
            if kind == np.uint64(VIRTIO_BLK_T_IN):
                pieces = _gather(writable, writable_count, _ZERO, data_in, data)
                served = bool(
                    fd >= 0
                    and _in_image(sector, data_in, image_size)
                    and _transfer(0, fd, data, pieces, sector * _SECTOR, data_in)
                )
                if served:
                    disk[D_READS] += 1
                    disk[D_BYTES_READ] += np.int64(data_in)
                    used_length = data_in + _ONE
            elif kind == np.uint64(VIRTIO_BLK_T_OUT):
                data_out = readable_len - _HEADER
                pieces = _gather(readable, readable_count, _HEADER, data_out, data)
                served = bool(
                    fd >= 0
                    and not readonly
                    and _in_image(sector, data_out, image_size)
                    and _transfer(1, fd, data, pieces, sector * _SECTOR, data_out)
                )
                if served:
                    disk[D_WRITES] += 1
                    disk[D_BYTES_WRITTEN] += np.int64(data_out)
            elif kind == np.uint64(VIRTIO_BLK_T_FLUSH):
                served = bool(fd >= 0 and (readonly or fdatasync(fd) == 0))
                if served:
                    disk[D_FLUSHES] += 1
            else:
                served = False  # GET_ID, or a type the device does not know: the Python path answers it
        if not served:
            out[O_TRANSLATIONS] = translations  # the Python path translates the chain again
            out[O_BYPASSED] = bypassed
            reason = BLK_PYTHON
            break
        last = writable_count - 1
        _store8(writable[2 * last] + writable[2 * last + 1] - _ONE, np.uint64(VIRTIO_BLK_S_OK))

        # -- complete it (SplitQueue.pop's bookkeeping, then push_used) --
        next_avail = (next_avail + 1) & 0xFFFF
        slot = used_idx & mask
        _store64(used + np.uint64(4 + 8 * slot), np.uint64(head) | (used_length << np.uint64(32)))
        if weak_order:
            full_fence()  # the entry and the data ahead of the index
        used_idx += 1  # not wrapped (Q_USED_IDX); the store keeps its low 16 bits
        _store16(used + np.uint64(2), np.uint64(used_idx & 0xFFFF))
        completed += 1

    queue[Q_NEXT_AVAIL] = next_avail
    queue[Q_USED_IDX] = used_idx
    disk[D_COMPLETED] = completed
    disk[D_SERVED] += completed
    return reason


def warm_up() -> None:
    """Compile ``serve_blk`` with the argument types the device passes: an empty ring (it finds nothing
    available and returns BLK_EMPTY) under an identity translation state."""
    ring = np.zeros(4096, np.uint8)
    queue = np.zeros(requests.QUEUE_WORDS, np.int64)
    queue[Q_DESC] = ring.ctypes.data
    queue[Q_AVAIL] = ring.ctypes.data + 2048
    queue[Q_USED] = ring.ctypes.data + 3072
    queue[Q_SIZE] = 16
    disk = np.zeros(DISK_WORDS, np.int64)
    disk[D_FD] = -1
    state = dma.warm_up_state()
    scratch = np.zeros((SCRATCH_ROWS, 2 * IOV_MAX), np.uint64)
    reason = serve_blk(
        *(
            queue,
            disk,
            np.zeros(guard.GUARD_WORDS, np.int64),
            state,
            np.zeros(dma.OUT_WORDS, np.uint64),
            np.zeros(dma.C_WORDS, np.uint64),
            np.zeros((1, 3), np.uint64),
            scratch,
        )
    )
    assert reason == BLK_EMPTY, reason


cache_on_sources(globals(), abi, barriers, dma, guard, libc, requests, tables)

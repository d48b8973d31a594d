"""Split virtqueues (virtio 1.x, section "Split Virtqueues") over numpy views of guest memory.

The device side of one ring: :class:`SplitQueue` pops descriptor chains the driver made available,
validating them as it walks, and pushes used entries back. Nothing here knows about sockets, fds or
asyncio; the rings are numpy views of :class:`~vhost_iommu.memory.GuestMemory`.

Layouts (little-endian, virtio 1.x)::

    descriptor table  16 * size bytes, 16-aligned   {le64 addr; le32 len; le16 flags; le16 next}
    available ring     6 + 2 * size bytes, 2-aligned {le16 flags; le16 idx; le16 ring[size]; le16 used_event}
    used ring          6 + 8 * size bytes, 4-aligned {le16 flags; le16 idx; {le32 id; le32 len}[size];
                                                       le16 avail_event}

(the trailing event fields only count when VIRTIO_RING_F_EVENT_IDX was negotiated).

Ring addresses are front-end user addresses (vhost-user SET_VRING_ADDR); descriptor and indirect-table
addresses are guest-physical. That is :class:`~vhost_iommu.memory.GuestMemory`'s view; the queue only asks
its memory for the three things of :class:`QueueMemory`, so a device whose addresses are IOVAs (a virtio
device served over vfio-user with VIRTIO_F_ACCESS_PLATFORM) gives it a memory that translates them
(``vhost_iommu.endpoints.translated_memory``), and the ring code stays this one.

Everything the driver wrote is hostile. A broken ring raises :class:`QueueError`; the caller puts the device
in NEEDS_RESET. Each walk is bounded (at most ``size`` descriptors per table), so no input makes it spin.
A buffer that crosses from one memory region into the next one adjacent in guest-physical space is
split into two segments (the guest sees that memory as contiguous); a buffer with any byte outside guest
memory is refused. An indirect table must lie inside one region (it is viewed, never copied).

Memory ordering. The driver runs concurrently on another CPU. Where the protocol needs a store to be
visible before a later load (publishing avail_event or used.idx, then reading avail.idx or used_event)
a full fence is issued (a numba-compiled ``fence seq_cst``, ``lock or`` on x86). The other orderings
(load-load, store-store) are free on x86's TSO, and get the same fence on other architectures.
"""

from __future__ import annotations

import platform
import struct
from typing import Protocol

import numpy as np
import numpy.typing as npt

from vhost_iommu.abi import (
    DESC_SIZE,
    MAX_CHAIN_BYTES,
    MAX_QUEUE_SIZE,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
)
from vhost_iommu.jit.barriers import full_fence as _full_fence
from vhost_iommu.jit.interpreted import kernel
from vhost_iommu.jit.requests import (
    Q_AVAIL,
    Q_DESC,
    Q_FLAGS,
    Q_NEXT_AVAIL,
    Q_NOTIFY,
    Q_SIGNALLED_USED,
    Q_SIGNALLED_VALID,
    Q_SIZE,
    Q_USED,
    Q_USED_IDX,
    QF_EVENT_IDX,
    QF_INDIRECT,
    QF_WEAK_ORDER,
    QUEUE_WORDS,
)
from vhost_iommu.memory import ByteView, GuestMemoryError

__all__ = [
    "DESC_DTYPE",
    "DESC_SIZE",
    "DESC_STRUCT",
    "MAX_CHAIN_BYTES",
    "MAX_QUEUE_SIZE",
    "VIRTQ_AVAIL_F_NO_INTERRUPT",
    "VIRTQ_DESC_F_INDIRECT",
    "VIRTQ_DESC_F_NEXT",
    "VIRTQ_DESC_F_WRITE",
    "VIRTQ_USED_F_NO_NOTIFY",
    "DescriptorChain",
    "QueueError",
    "QueueMemory",
    "SplitQueue",
    "full_fence",
    "ring_sizes",
    "vring_need_event",
]

DESC_DTYPE = np.dtype([("addr", "<u8"), ("len", "<u4"), ("flags", "<u2"), ("next", "<u2")])
DESC_STRUCT = struct.Struct("<QIHH")
"""The same layout for ``struct`` users: addr, len, flags, next."""
assert DESC_DTYPE.itemsize == DESC_STRUCT.size == DESC_SIZE

_STRONGLY_ORDERED = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


def full_fence() -> None:
    """A full memory barrier (store-load included)."""
    kernel(_full_fence)()


def ring_sizes(size: int, event_idx: bool) -> tuple[int, int, int]:
    """Bytes of (descriptor table, available ring, used ring) for a queue of ``size`` entries."""
    tail = 2 if event_idx else 0
    return DESC_SIZE * size, 4 + 2 * size + tail, 4 + 8 * size + tail


def vring_need_event(event: int, new: int, old: int) -> bool:
    """True if moving an index from ``old`` to ``new`` (u16, wrapping) passes ``event``: the driver asked
    to be told once the entry at index ``event`` is written."""
    return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


class QueueError(Exception):
    """The driver broke the ring; the device must enter NEEDS_RESET."""


class QueueMemory(Protocol):
    """What a queue needs of guest memory: views of its rings, of indirect tables, and of the buffers it
    reads or (``device_writes`` nonzero: a writable descriptor's) writes; a buffer may come in several
    views. Each raises GuestMemoryError for an address it cannot give. (One method with a flag rather than
    two: the walk then pays no branch per descriptor for it, measured at 2-4% of a pop.)"""

    def uva_view(self, uva: int, size: int) -> ByteView: ...
    def gpa_view(self, gpa: int, size: int) -> ByteView: ...
    def gpa_segments(self, gpa: int, size: int, device_writes: int = 0) -> list[ByteView]: ...


class DescriptorChain:
    """One validated chain: its head, and views of its readable then writable buffers (no copies).

    ``readable`` and ``writable`` are lists of uint8 views of guest memory, in chain order.
    """

    __slots__ = ("head", "readable", "readable_len", "writable", "writable_len")

    def __init__(
        self,
        head: int,
        readable: list[ByteView],
        readable_len: int,
        writable: list[ByteView],
        writable_len: int,
    ) -> None:
        self.head = head
        self.readable = readable
        self.readable_len = readable_len
        self.writable = writable
        self.writable_len = writable_len

    def read(self) -> bytes:
        """The readable buffers gathered into one bytes object (a copy)."""
        if len(self.readable) == 1:
            return self.readable[0].tobytes()
        return b"".join(segment.tobytes() for segment in self.readable)

    def read_into(self, buffer: bytearray | memoryview | npt.NDArray[np.uint8]) -> int:
        """Copy the readable bytes into ``buffer`` (as many as fit); returns how many were copied."""
        destination = np.frombuffer(buffer, dtype=np.uint8)
        copied = 0
        for segment in self.readable:
            take = min(len(segment), len(destination) - copied)
            if take <= 0:
                break
            destination[copied : copied + take] = segment[:take]
            copied += take
        return copied

    def write(self, data: bytes | bytearray | memoryview, offset: int = 0) -> int:
        """Scatter ``data`` into the writable buffers starting ``offset`` bytes in.

        Writes as much as fits and returns how many bytes were written (less than ``len(data)`` when the
        driver's writable buffers are too short; the device decides what that means).
        """
        if offset < 0:
            raise ValueError(f"negative offset {offset}")
        # Slice assignment through ndarray.data (a memoryview) is several times cheaper than numpy's own
        # for the small copies of a response.
        source = memoryview(data)
        if source.format != "B" or source.ndim != 1:
            source = source.cast("B")
        writable = self.writable
        if offset == 0 and len(writable) == 1 and len(source) <= len(writable[0]):
            writable[0].data[: len(source)] = source
            return len(source)
        written = 0
        skip = offset
        for segment in writable:
            if written >= len(source):
                break
            if skip >= len(segment):
                skip -= len(segment)
                continue
            take = min(len(segment) - skip, len(source) - written)
            segment.data[skip : skip + take] = source[written : written + take]
            written += take
            skip = 0
        return written

    def __repr__(self) -> str:
        return (
            f"DescriptorChain(head={self.head}, readable_len={self.readable_len}, "
            f"writable_len={self.writable_len})"
        )


class SplitQueue:
    """The device side of one split virtqueue.

    Typical use (the device's kick handler)::

        while (chain := queue.pop()) is not None:
            response = handle(chain.read(), chain.writable_len)
            chain.write(response)
            queue.push_used(chain.head, len(response))
        if queue.needs_notification():
            signal_call_fd()

    ``next_avail`` is the free-running u16 index of the next available entry to pop (what
    GET_VRING_BASE reports); ``used_idx`` the free-running u16 index of the next used entry, read
    from the ring at construction like libvhost-user does.

    The ring's position lives in one place, ``state`` (int64 words, ``vhost_iommu.jit.requests.Q_*``):
    the ring views' addresses, next_avail, used_idx, whether kicks are wanted and the notification
    bookkeeping. The compiled request path and the kick loop pass that array to their kernels, which
    read and advance the same words in place; every method here reads them there too.
    """

    def __init__(
        self,
        memory: QueueMemory,
        size: int,
        desc_uva: int,
        avail_uva: int,
        used_uva: int,
        *,
        next_avail: int,
        event_idx: bool,
        indirect: bool,
    ) -> None:
        if not 1 <= size <= MAX_QUEUE_SIZE or size & (size - 1):
            raise QueueError(f"queue size {size} is not a power of 2 between 1 and {MAX_QUEUE_SIZE}")
        for name, address, alignment in (
            ("descriptor table", desc_uva, 16),
            ("available ring", avail_uva, 2),
            ("used ring", used_uva, 4),
        ):
            if address % alignment:
                raise QueueError(f"{name} address {address:#x} is not {alignment}-byte aligned")
        if not 0 <= next_avail <= 0xFFFF:
            raise QueueError(f"next available index {next_avail} is not a u16")
        self.size = size
        self.desc_uva = desc_uva
        self.avail_uva = avail_uva
        self.used_uva = used_uva
        self.event_idx = event_idx
        self.indirect = indirect
        self._state = np.zeros(QUEUE_WORDS, np.int64)
        # Python reads and writes the words through a memoryview: several times cheaper than numpy's
        # scalar indexing, on every pop and push.
        words = self._words = self._state.data
        words[Q_SIZE] = size
        words[Q_FLAGS] = (
            (QF_EVENT_IDX if event_idx else 0)
            | (QF_INDIRECT if indirect else 0)
            | (0 if _STRONGLY_ORDERED else QF_WEAK_ORDER)
        )
        words[Q_NEXT_AVAIL] = next_avail
        self._mask = size - 1
        self._bind(memory)
        words[Q_USED_IDX] = words[Q_SIGNALLED_USED] = self._used16.item(1)
        # Writable length of every chain popped and not yet pushed, by head; -1 when not in flight.
        self._in_flight = [-1] * size
        # Whatever a previous back-end left in used->flags or avail_event, ask for kicks from here on.
        self.set_notification(True)

    # --- binding to memory ------------------------------------------------------------------------

    def _bind(self, memory: QueueMemory) -> None:
        desc_bytes, avail_bytes, used_bytes = ring_sizes(self.size, self.event_idx)
        try:
            desc_view = memory.uva_view(self.desc_uva, desc_bytes)
            avail_view = memory.uva_view(self.avail_uva, avail_bytes)
            used_view = memory.uva_view(self.used_uva, used_bytes)
        except GuestMemoryError as exc:
            raise QueueError(f"ring of {self.size} entries is not in guest memory: {exc}") from None
        self._memory = memory
        table = desc_view.view(DESC_DTYPE)
        self._desc_table = table
        # avail: [flags, idx, ring[size], (used_event)]
        self._avail16 = avail_view.view("<u2")
        self._avail_ring = self._avail16[2 : 2 + self.size]
        self._used_event_slot = 2 + self.size
        # used: [flags, idx] then {id, len}[size] then (avail_event)
        self._used16 = used_view[:4].view("<u2")
        # One used element {le32 id; le32 len} as one little-endian u64: a single store per entry.
        self._used_ring = used_view[4 : 4 + 8 * self.size].view("<u8")
        self._avail_event = used_view[4 + 8 * self.size :].view("<u2")
        # The kernels reach the rings through these addresses, valid while this queue holds the views.
        words = self._words
        words[Q_DESC] = table.ctypes.data
        words[Q_AVAIL] = self._avail16.ctypes.data
        words[Q_USED] = used_view.ctypes.data

    def rebind(self, memory: QueueMemory) -> None:
        """The memory table changed: re-derive the ring views (indices are kept).

        Raises QueueError if a ring is no longer inside guest memory.
        """
        self._bind(memory)

    # --- the ring-state record --------------------------------------------------------------------

    @property
    def state(self) -> npt.NDArray[np.int64]:
        """The ring-state record (``Q_*`` words) the kernels take directly: the one copy of this ring's
        position. Only one thread at a time may use it (the kick thread while it is in its kernel, the
        event loop otherwise)."""
        return self._state

    @property
    def memory(self) -> QueueMemory:
        """What the rings and buffers are read through (bound now)."""
        return self._memory

    @property
    def next_avail(self) -> int:
        return self._words[Q_NEXT_AVAIL]

    @next_avail.setter
    def next_avail(self, value: int) -> None:
        self._words[Q_NEXT_AVAIL] = value

    @property
    def used_idx(self) -> int:
        return self._words[Q_USED_IDX] & 0xFFFF

    @property
    def notifications_enabled(self) -> bool:
        """Whether kicks are wanted (``set_notification``)."""
        return bool(self._words[Q_NOTIFY])

    @property
    def pushed_since_check(self) -> int:
        """Chains pushed (by this queue or a kernel) since ``needs_notification`` last decided."""
        words = self._words
        return words[Q_USED_IDX] - words[Q_SIGNALLED_USED]

    # --- available side ---------------------------------------------------------------------------

    def _pending(self, next_avail: int) -> int:
        """How many entries the driver has made available beyond ``next_avail`` (the caller's read of
        it: each method reads a word once)."""
        pending: int = (self._avail16.item(1) - next_avail) & 0xFFFF
        if pending == 0 and self.event_idx and self._words[Q_NOTIFY]:
            # Ask for a kick at the next entry, then look again: a driver that published an entry after
            # our first look read the old avail_event and will not kick, so we must see its entry now.
            self._avail_event[0] = next_avail
            full_fence()
            pending = (self._avail16.item(1) - next_avail) & 0xFFFF
        if pending > self.size:
            raise QueueError(
                f"available index {self._avail16.item(1)} is {pending} entries ahead of {next_avail}, "
                f"more than the queue size {self.size}"
            )
        if pending and not _STRONGLY_ORDERED:
            full_fence()  # read the ring and descriptors only after the index that published them
        return pending

    def has_available(self) -> bool:
        """True if the driver has made a chain available that ``pop`` has not returned yet."""
        return self._pending(self._words[Q_NEXT_AVAIL]) > 0

    def pop(self) -> DescriptorChain | None:
        """The next available chain, fully validated, or None if there is none.

        Raises QueueError (and leaves ``next_avail`` unchanged) if the driver broke the ring.
        """
        words = self._words
        next_avail = words[Q_NEXT_AVAIL]
        if not self._pending(next_avail):
            return None
        head = self._avail_ring.item(next_avail & self._mask)
        if head >= self.size:
            raise QueueError(
                f"available ring entry {next_avail} holds head {head}, queue size is {self.size}"
            )
        if self._in_flight[head] >= 0:
            raise QueueError(f"driver made head {head} available again while the device still holds it")
        chain = self._walk(head)
        self._in_flight[head] = chain.writable_len
        next_avail = words[Q_NEXT_AVAIL] = (next_avail + 1) & 0xFFFF
        if self.event_idx and words[Q_NOTIFY]:
            self._avail_event[0] = next_avail
        return chain

    def _walk(self, head: int) -> DescriptorChain:
        table = self._desc_table
        table_entries = self.size
        budget = self.size  # descriptors this table may still yield: more means a loop
        in_indirect = False
        buffers = 0
        readable: list[ByteView] = []
        writable: list[ByteView] = []
        readable_len = writable_len = 0
        index = head
        where = "descriptor"
        while True:
            if budget == 0:
                raise QueueError(
                    f"chain at head {head} loops: more than {table_entries} descriptors in a table"
                )
            budget -= 1
            # Each field is read once: the driver may change the table under us.
            address, length, flags, next_index = table.item(index)
            if flags & VIRTQ_DESC_F_INDIRECT:
                if in_indirect:
                    raise QueueError(f"chain at head {head}: INDIRECT descriptor inside an indirect table")
                if not self.indirect:
                    raise QueueError(
                        f"chain at head {head}: INDIRECT descriptor but VIRTIO_RING_F_INDIRECT_DESC "
                        "was not negotiated"
                    )
                if flags & VIRTQ_DESC_F_NEXT:
                    raise QueueError(f"chain at head {head}: descriptor {index} has both INDIRECT and NEXT")
                if length == 0 or length % DESC_SIZE:
                    raise QueueError(
                        f"chain at head {head}: indirect table length {length} "
                        "is not a positive multiple of 16"
                    )
                if length // DESC_SIZE > self.size:
                    raise QueueError(
                        f"chain at head {head}: indirect table of {length // DESC_SIZE} descriptors "
                        f"is longer than the queue size {self.size}"
                    )
                try:
                    indirect_table = self._memory.gpa_view(address, length).view(DESC_DTYPE)
                except GuestMemoryError as exc:
                    raise QueueError(f"chain at head {head}: indirect table: {exc}") from None
                table = indirect_table
                table_entries = budget = length // DESC_SIZE
                in_indirect = True
                where = "indirect descriptor"
                index = 0
                continue
            if length == 0:
                raise QueueError(f"chain at head {head}: {where} {index} has a zero-length buffer")
            buffers += 1
            if buffers > self.size:
                raise QueueError(f"chain at head {head} is longer than the queue size {self.size}")
            try:
                segments = self._memory.gpa_segments(address, length, flags & VIRTQ_DESC_F_WRITE)
            except GuestMemoryError as exc:
                raise QueueError(f"chain at head {head}: {where} {index}: {exc}") from None
            if flags & VIRTQ_DESC_F_WRITE:
                writable.extend(segments)
                writable_len += length
            else:
                if writable:
                    raise QueueError(f"chain at head {head}: readable {where} {index} after a writable one")
                readable.extend(segments)
                readable_len += length
            if readable_len + writable_len > MAX_CHAIN_BYTES:
                raise QueueError(f"chain at head {head} is longer than 2^32 bytes in total")
            if not flags & VIRTQ_DESC_F_NEXT:
                return DescriptorChain(head, readable, readable_len, writable, writable_len)
            if next_index >= table_entries:
                raise QueueError(
                    f"chain at head {head}: {where} {index} has next {next_index}, "
                    f"outside its table of {table_entries}"
                )
            index = next_index

    def give_back(self, chain: DescriptorChain) -> None:
        """Undo the pop of ``chain``, the last chain popped and not pushed: the device will not serve it
        now, so it stays available (``next_avail``, what GET_VRING_BASE reports, counts it so) and the
        next ``pop`` returns it again. Raises ValueError (a device bug) for any other chain."""
        previous = (self.next_avail - 1) & 0xFFFF
        if self._in_flight[chain.head] < 0 or self._avail_ring.item(previous & self._mask) != chain.head:
            raise ValueError(f"head {chain.head} is not the last chain popped and still in flight")
        self._in_flight[chain.head] = -1
        self.next_avail = previous

    # --- used side --------------------------------------------------------------------------------

    def push_used(self, head: int, length: int) -> None:
        """Return the chain at ``head`` to the driver, ``length`` bytes written into its writable buffers.

        Raises ValueError (a device bug, not the driver's) if ``head`` was not popped or is already
        pushed, or ``length`` exceeds the chain's writable length.
        """
        if not 0 <= head < self.size or self._in_flight[head] < 0:
            raise ValueError(f"head {head} is not a chain popped from this queue and still in flight")
        if not 0 <= length <= self._in_flight[head]:
            raise ValueError(f"used length {length} for head {head} exceeds its writable length")
        words = self._words
        pushed = words[Q_USED_IDX]  # counted without wrapping: the used index is its low 16 bits
        self._used_ring[pushed & self._mask] = head | length << 32
        self._in_flight[head] = -1
        if not _STRONGLY_ORDERED:
            full_fence()  # the entry (and the data written before it) ahead of the index
        pushed = words[Q_USED_IDX] = pushed + 1
        self._used16[1] = pushed & 0xFFFF

    def needs_notification(self) -> bool:
        """Whether the driver wants a used-buffer notification for what was pushed since the last call.

        Honours VIRTQ_AVAIL_F_NO_INTERRUPT, or with EVENT_IDX the driver's used_event. With EVENT_IDX
        the first decision of a new queue is always yes: what the driver saw before is unknown, and a
        spurious interrupt is harmless where a missing one hangs the driver.
        """
        words = self._words
        signalled = words[Q_SIGNALLED_USED]
        pushed_total = words[Q_SIGNALLED_USED] = words[Q_USED_IDX]
        pushed = pushed_total - signalled
        old, new = signalled & 0xFFFF, pushed_total & 0xFFFF
        if pushed == 0:
            return False
        # used.idx must be visible before we read the driver's suppression state, or a driver that
        # re-enabled interrupts and then checked used.idx could miss both our update and our interrupt.
        full_fence()
        if not self.event_idx:
            return not self._avail16.item(0) & VIRTQ_AVAIL_F_NO_INTERRUPT
        was_valid = words[Q_SIGNALLED_VALID]
        words[Q_SIGNALLED_VALID] = 1
        if not was_valid or pushed >= 0x10000:
            return True
        return vring_need_event(self._avail16.item(self._used_event_slot), new, old)

    def set_notification(self, enabled: bool) -> None:
        """Ask the driver for (or to stop sending) available-buffer notifications (kicks).

        After enabling, call ``pop``/``has_available`` again before sleeping: entries made available
        while kicks were off raise no kick.
        """
        self._words[Q_NOTIFY] = int(enabled)
        if self.event_idx:
            if enabled:
                self._avail_event[0] = self.next_avail
        else:
            self._used16[0] = 0 if enabled else VIRTQ_USED_F_NO_NOTIFY
        if enabled:
            full_fence()

    @property
    def in_flight(self) -> int:
        """Chains popped and not yet pushed."""
        return sum(1 for writable_len in self._in_flight if writable_len >= 0)

    def __repr__(self) -> str:
        return (
            f"SplitQueue(size={self.size}, next_avail={self.next_avail}, used_idx={self.used_idx}, "
            f"event_idx={self.event_idx}, indirect={self.indirect})"
        )

"""The driver side of a split virtqueue, playing the guest in tests and tools.

:class:`DriverQueue` lays out a descriptor table, an available ring and a used ring in a
:class:`~vhost_iommu.harness.guest_ram.GuestRam`, posts requests the way a guest driver does, and reads
back what the device returned. It also writes arbitrary (hostile) descriptors, indices and flags, so
tests can check how the device copes with a broken driver.

Publishing: :meth:`DriverQueue.post` makes its chain visible to the device at once (bumps
``avail.idx``) unless given ``publish=False``; then :meth:`DriverQueue.publish` exposes every staged
chain with one index update, like a driver batching requests before one kick.

Example (the device side built the way the server builds it)::

    with GuestRam(1 << 20, gpa_base=0x4000_0000) as ram:
        memory = ram.guest_memory()
        driver = DriverQueue(ram, 64, event_idx=True)
        device = driver.device_queue(memory)        # a SplitQueue over the same rings

        head = driver.post([b"request"], [16])
        chain = device.pop()
        assert chain.read() == b"request"
        chain.write(b"response")
        device.push_used(chain.head, 8)

        assert driver.used() == [(head, 8)]
        assert driver.written(head)[:8] == b"response"
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from vhost_iommu.harness.guest_ram import GuestRam
from vhost_iommu.memory import GuestMemory
from vhost_iommu.virtqueue import (
    DESC_DTYPE,
    DESC_SIZE,
    MAX_QUEUE_SIZE,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
    SplitQueue,
    full_fence,
    ring_sizes,
    vring_need_event,
)

__all__ = ["DriverQueue", "DriverQueueError"]


class DriverQueueError(Exception):
    """The driver side cannot do what was asked, or the device returned something impossible."""


@dataclass
class _Posted:
    """What the driver remembers of a chain it made available, until the device returns it."""

    descriptors: list[int]
    blocks: list[int]  # gpas to free: buffers and the indirect table
    writable: list[tuple[int, int]] = field(default_factory=list)  # (gpa, size)


class DriverQueue:
    """A split virtqueue of ``size`` entries in ``ram``, driven from the driver's side.

    Addresses of the three parts: ``desc_gpa``/``avail_gpa``/``used_gpa`` (guest-physical) and
    ``desc_uva``/``avail_uva``/``used_uva`` (front-end addresses, for SET_VRING_ADDR).
    """

    def __init__(
        self,
        ram: GuestRam,
        size: int,
        *,
        event_idx: bool = False,
        start_index: int = 0,
        auto_used_event: bool = True,
        device_address: Callable[[int], int] = lambda gpa: gpa,
    ) -> None:
        if not 1 <= size <= MAX_QUEUE_SIZE or size & (size - 1):
            raise DriverQueueError(f"queue size {size} is not a power of 2 between 1 and {MAX_QUEUE_SIZE}")
        if not 0 <= start_index <= 0xFFFF:
            raise DriverQueueError(f"start index {start_index} is not a u16")
        self.ram = ram
        self.size = size
        self.event_idx = event_idx
        # What the device is told for a guest-physical address (post's buffers and indirect tables): the
        # address itself, or the IOVA the test mapped it at when the device is behind an IOMMU.
        self.device_address = device_address
        desc_bytes, avail_bytes, used_bytes = ring_sizes(size, event_idx=True)  # room for both layouts
        self.desc_gpa = ram.alloc(desc_bytes, 16)
        self.avail_gpa = ram.alloc(avail_bytes, 2)
        self.used_gpa = ram.alloc(used_bytes, 4)
        table = ram.view(self.desc_gpa, desc_bytes).view(DESC_DTYPE)
        self._desc_addr = table["addr"]
        self._desc_len = table["len"]
        self._desc_flags = table["flags"]
        self._desc_next = table["next"]
        self._avail16 = ram.view(self.avail_gpa, avail_bytes).view("<u2")
        used = ram.view(self.used_gpa, used_bytes)
        self._used16 = used[:4].view("<u2")
        self._used_ring = used[4 : 4 + 8 * size].view("<u4")
        self._avail_event16 = used[4 + 8 * size :].view("<u2")

        self._free_descriptors = list(range(size - 1, -1, -1))  # a stack: pops 0, 1, 2, ...
        self._posted: dict[int, _Posted] = {}
        self._written: dict[int, bytes] = {}
        # Free-running (unbounded) counters; the rings hold them modulo 2**16. A non-zero start_index
        # stands for a ring already used that many times (as after a back-end restart), which is how
        # tests reach the u16 wraparound quickly.
        self.start_index = start_index
        self._avail_idx = start_index  # next avail index to fill (may run ahead of the published one)
        self._published_idx = start_index
        self._kick_checked_idx = start_index
        self._last_used = start_index
        self._avail16[1] = start_index
        self._used16[1] = start_index
        # Like Linux's virtqueue_get_buf/enable_cb: with EVENT_IDX, ask to be notified of the very next used
        # entry after each harvest. Tests of notification suppression turn this off and set used_event.
        self.auto_used_event = auto_used_event
        if event_idx and auto_used_event:
            self.used_event = start_index

    # --- addresses ----------------------------------------------------------------------------------

    @property
    def desc_uva(self) -> int:
        return self.ram.gpa_to_uva(self.desc_gpa)

    @property
    def avail_uva(self) -> int:
        return self.ram.gpa_to_uva(self.avail_gpa)

    @property
    def used_uva(self) -> int:
        return self.ram.gpa_to_uva(self.used_gpa)

    def device_queue(
        self, memory: GuestMemory, *, indirect: bool = True, next_avail: int | None = None
    ) -> SplitQueue:
        """The device side over these rings (what the server builds from SET_VRING_*); ``next_avail``
        defaults to the start index."""
        return SplitQueue(
            memory,
            self.size,
            self.desc_uva,
            self.avail_uva,
            self.used_uva,
            next_avail=self.start_index if next_avail is None else next_avail,
            event_idx=self.event_idx,
            indirect=indirect,
        )

    # --- posting ------------------------------------------------------------------------------------

    def post(
        self,
        readable: list[bytes],
        writable_sizes: list[int],
        *,
        indirect: bool = False,
        publish: bool = True,
    ) -> int:
        """Make a chain available: one buffer per ``readable`` item, then one writable buffer per size.

        Buffers are allocated in the RAM (and freed when the device returns the chain). With
        ``indirect`` the chain is one descriptor pointing at an indirect table. Returns the head.
        """
        count = len(readable) + len(writable_sizes)
        if count == 0:
            raise DriverQueueError("a chain needs at least one buffer")
        if any(len(data) == 0 for data in readable) or any(size <= 0 for size in writable_sizes):
            raise DriverQueueError("buffers must not be empty (use write_desc for hostile descriptors)")
        if count > self.size:
            raise DriverQueueError(
                f"{count} buffers: the spec forbids chains longer than the queue size {self.size}, "
                "indirect or not (use write_desc/write_indirect_table for hostile chains)"
            )
        needed = 1 if indirect else count
        if needed > len(self._free_descriptors):
            raise DriverQueueError(
                f"queue full: {needed} descriptors needed, {len(self._free_descriptors)} free"
            )
        if self._avail_idx - self._last_used >= self.size:
            raise DriverQueueError("queue full: every available ring entry is outstanding")

        blocks: list[int] = []
        writable: list[tuple[int, int]] = []
        buffers: list[tuple[int, int, int]] = []  # (gpa, len, flags)
        address = self.device_address
        for data in readable:
            gpa = self.ram.alloc(len(data))
            self.ram.write(gpa, data)
            blocks.append(gpa)
            buffers.append((address(gpa), len(data), 0))
        for size in writable_sizes:
            gpa = self.ram.alloc(size)
            blocks.append(gpa)
            writable.append((gpa, size))
            buffers.append((address(gpa), size, VIRTQ_DESC_F_WRITE))

        if indirect:
            table_gpa = self.ram.alloc(count * DESC_SIZE, 16)
            blocks.append(table_gpa)
            self.write_indirect_table(
                table_gpa,
                [
                    (
                        gpa,
                        length,
                        flags | (VIRTQ_DESC_F_NEXT if i + 1 < count else 0),
                        i + 1 if i + 1 < count else 0,
                    )
                    for i, (gpa, length, flags) in enumerate(buffers)
                ],
            )
            head = self._free_descriptors.pop()
            self.write_desc(head, address(table_gpa), count * DESC_SIZE, VIRTQ_DESC_F_INDIRECT, 0)
            descriptors = [head]
        else:
            descriptors = [self._free_descriptors.pop() for _ in range(count)]
            for i, (gpa, length, flags) in enumerate(buffers):
                last = i + 1 == count
                self.write_desc(
                    descriptors[i],
                    gpa,
                    length,
                    flags | (0 if last else VIRTQ_DESC_F_NEXT),
                    0 if last else descriptors[i + 1],
                )
            head = descriptors[0]
        self._posted[head] = _Posted(descriptors, blocks, writable)
        self.make_available(head, publish=publish)
        return head

    def publish(self) -> None:
        """Expose every chain made available so far (one store to ``avail.idx``)."""
        full_fence()  # ring entries and descriptors before the index
        self._avail16[1] = self._avail_idx & 0xFFFF
        self._published_idx = self._avail_idx

    def needs_kick(self) -> bool:
        """Whether the device wants a notification for the chains published since the last call
        (``VIRTQ_USED_F_NO_NOTIFY``, or with EVENT_IDX the device's ``avail_event``)."""
        old, new = self._kick_checked_idx, self._published_idx
        self._kick_checked_idx = new
        if old == new:
            return False
        full_fence()  # our avail.idx before the device's suppression state
        if self.event_idx:
            return vring_need_event(self.avail_event, new & 0xFFFF, old & 0xFFFF) or new - old >= 0x10000
        return not self.used_flags & VIRTQ_USED_F_NO_NOTIFY

    # --- completions --------------------------------------------------------------------------------

    def used(self) -> list[tuple[int, int]]:
        """New used entries as (head, length), oldest first.

        Each returned chain's descriptors and buffers are freed for reuse; its writable buffers'
        contents are kept for :meth:`written`. Raises DriverQueueError if the device returned a head the
        driver is not waiting for, or a length beyond the chain's writable size.
        """
        full_fence()  # used.idx before the entries it covers
        used_idx = int(self._used16[1])
        pending = (used_idx - self._last_used) & 0xFFFF
        if pending > self._avail_idx - self._last_used:
            raise DriverQueueError(f"used.idx {used_idx} moved {pending} entries, more than were outstanding")
        entries: list[tuple[int, int]] = []
        for _ in range(pending):
            slot = self._last_used & (self.size - 1)
            head, length = int(self._used_ring[2 * slot]), int(self._used_ring[2 * slot + 1])
            self._last_used += 1
            posted = self._posted.pop(head, None)
            if posted is None:
                raise DriverQueueError(f"device returned head {head}, which is not outstanding")
            contents = b"".join(self.ram.read(gpa, size) for gpa, size in posted.writable)
            if length > len(contents):
                raise DriverQueueError(
                    f"device returned head {head} with length {length} > its writable size {len(contents)}"
                )
            self._written[head] = contents
            self._free_descriptors.extend(reversed(posted.descriptors))
            for gpa in posted.blocks:
                self.ram.free(gpa)
            entries.append((head, length))
        if self.event_idx and self.auto_used_event and entries:
            self.used_event = self._last_used
        return entries

    def used_with_data(self) -> list[tuple[int, int, bytes]]:
        """Like :meth:`used`, with the first ``length`` bytes the device wrote: (head, length, data)."""
        return [(head, length, self._written[head][:length]) for head, length in self.used()]

    def written(self, head: int) -> bytes:
        """The whole writable area of the most recent completed chain at ``head``, as the device left it."""
        try:
            return self._written[head]
        except KeyError:
            raise DriverQueueError(f"no completed chain at head {head}") from None

    @property
    def outstanding(self) -> int:
        """Chains posted with :meth:`post` and not yet returned."""
        return len(self._posted)

    def writable_buffers(self, head: int) -> list[tuple[int, int]]:
        """(gpa, size) of each writable buffer of the outstanding chain at ``head``."""
        try:
            return list(self._posted[head].writable)
        except KeyError:
            raise DriverQueueError(f"no outstanding chain at head {head}") from None

    # --- notification fields ------------------------------------------------------------------------

    @property
    def avail_flags(self) -> int:
        return int(self._avail16[0])

    @avail_flags.setter
    def avail_flags(self, value: int) -> None:
        self._avail16[0] = value

    @property
    def used_event(self) -> int:
        """avail->used_event: with EVENT_IDX, interrupt me when used.idx passes this."""
        return int(self._avail16[2 + self.size])

    @used_event.setter
    def used_event(self, value: int) -> None:
        self._avail16[2 + self.size] = value & 0xFFFF
        full_fence()

    @property
    def avail_event(self) -> int:
        """used->avail_event, as the device last wrote it."""
        return int(self._avail_event16[0])

    @property
    def used_flags(self) -> int:
        return int(self._used16[0])

    @property
    def used_idx(self) -> int:
        """used->idx, as the device last wrote it."""
        return int(self._used16[1])

    @property
    def avail_idx(self) -> int:
        """avail->idx as published (u16)."""
        return int(self._avail16[1])

    # --- raw (hostile) access -----------------------------------------------------------------------

    def rewrite_used_idx(self, value: int) -> None:
        """Store ``value`` in used->idx, the device's field: a test's way to play a device that died
        before it stored the index."""
        self._used16[1] = value & 0xFFFF

    def write_desc(self, index: int, addr: int, length: int, flags: int, next_index: int) -> None:
        """Write descriptor ``index`` of the main table verbatim (no checks beyond the field widths)."""
        self._desc_addr[index] = addr
        self._desc_len[index] = length
        self._desc_flags[index] = flags
        self._desc_next[index] = next_index

    def read_desc(self, index: int) -> tuple[int, int, int, int]:
        """Descriptor ``index`` of the main table as (addr, len, flags, next)."""
        return (
            int(self._desc_addr[index]),
            int(self._desc_len[index]),
            int(self._desc_flags[index]),
            int(self._desc_next[index]),
        )

    def write_indirect_table(self, gpa: int, entries: list[tuple[int, int, int, int]]) -> None:
        """Write ``entries`` (addr, len, flags, next) verbatim as a descriptor table at ``gpa``."""
        table = self.ram.view(gpa, len(entries) * DESC_SIZE).view(DESC_DTYPE)
        for i, (addr, length, flags, next_index) in enumerate(entries):
            table[i] = (addr, length, flags, next_index)

    def make_available(self, head: int, *, publish: bool = True) -> None:
        """Put ``head`` (any u16, checked by nobody) in the next available ring entry."""
        self._avail16[2 + (self._avail_idx & (self.size - 1))] = head
        self._avail_idx += 1
        if publish:
            self.publish()

    def set_avail_idx(self, value: int) -> None:
        """Store ``value`` into avail->idx verbatim (the driver's own bookkeeping is not changed)."""
        full_fence()
        self._avail16[1] = value & 0xFFFF

    def alloc_buffer(self, data: bytes | int) -> int:
        """A buffer in the RAM holding ``data`` (or ``data`` zero bytes); for hand-made descriptors."""
        if isinstance(data, int):
            return self.ram.alloc(data)
        gpa = self.ram.alloc(len(data))
        self.ram.write(gpa, data)
        return gpa

    def __repr__(self) -> str:
        return (
            f"DriverQueue(size={self.size}, avail_idx={self._avail_idx & 0xFFFF}, "
            f"outstanding={len(self._posted)}, event_idx={self.event_idx})"
        )

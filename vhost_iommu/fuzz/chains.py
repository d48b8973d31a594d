"""Fuzz target ``chains``: random rings in guest RAM through :class:`SplitQueue` ``pop``/``push_used``.

Guest memory is two memfd regions adjacent in guest-physical space (so buffers can cross from one into
the other) at unrelated front-end addresses. One execution lays out a queue (size, EVENT_IDX, INDIRECT,
ring addresses: mostly valid, sometimes misaligned or outside memory, next_avail anywhere in the u16
space), fills the descriptor table, a few indirect tables and the available ring with hostile values
(lengths of zero or 2^32-1, addresses inside, across and outside the regions, loops, INDIRECT and NEXT
together, nested indirect tables), then pops and pushes in a random order while the "driver" rewrites
descriptors and indices between pops.

Checked:

* only :class:`QueueError` comes out of the driver-facing calls (``ValueError`` only from ``push_used`` given
  a head or length the device never had: a device bug, provoked on purpose), each call in bounded time;
* every chain agrees with a reference walk of the same memory written from the virtqueue rules (an error
  exactly when the reference finds one; the same readable/writable lengths and bytes otherwise);
* every view of a chain lies inside a region's mapping; the used ring holds exactly what was pushed.
"""

from __future__ import annotations

import struct
from collections.abc import Hashable, Iterable

import numpy as np

from vhost_iommu.fuzz.engine import Choices, FuzzFailure, FuzzTarget, Script, shape
from vhost_iommu.harness.guest_ram import GuestRam
from vhost_iommu.memory import GuestMemory
from vhost_iommu.virtqueue import (
    DESC_DTYPE,
    DESC_SIZE,
    DESC_STRUCT,
    MAX_CHAIN_BYTES,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    DescriptorChain,
    QueueError,
    SplitQueue,
    ring_sizes,
)

__all__ = ["ChainsTarget"]

GPA_BASE = 0x1_0000_0000
MAIN_SIZE = 64 * 1024
EXTRA_SIZE = 16 * 1024
BUFFERS = 16 * 1024  # offset in the main RAM where buffers and indirect tables go (rings go below)
_FLAG_CHOICES = (
    0,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE,
    VIRTQ_DESC_F_INDIRECT,
)


class _Reference:
    """The walk of one chain as the virtqueue rules describe it, over the driver's view of memory."""

    def __init__(self, regions: list[tuple[int, int, GuestRam]], size: int, indirect: bool) -> None:
        self.regions = regions  # (gpa start, gpa end, ram)
        self.size = size
        self.indirect = indirect

    def read(self, gpa: int, length: int) -> bytes | None:
        """The bytes at gpa..gpa+length, crossing adjacent regions; None if any byte is outside memory."""
        out = bytearray()
        position, end = gpa, gpa + length
        while position < end:
            for start, stop, ram in self.regions:
                if start <= position < stop:
                    take = min(end, stop) - position
                    out += ram.read(position, take)
                    position += take
                    break
            else:
                return None
        return bytes(out)

    def _inside_one(self, gpa: int, length: int) -> bool:
        return any(start <= gpa and gpa + length <= stop for start, stop, _ in self.regions)

    def walk(self, table: bytes, head: int) -> tuple[list[tuple[int, int]], int, int] | str:
        """(readable (gpa, length) buffers, readable length, writable length), or why the chain is broken."""
        entries, visited, buffers = self.size, 0, 0
        readable: list[tuple[int, int]] = []
        readable_len, writable_len = 0, 0
        index, nested = head, False
        while True:
            visited += 1
            if visited > entries:
                return "loop"
            address, length, flags, next_index = DESC_STRUCT.unpack_from(table, index * DESC_SIZE)
            if flags & VIRTQ_DESC_F_INDIRECT:
                if nested or not self.indirect or flags & VIRTQ_DESC_F_NEXT:
                    return "bad indirect"
                if length == 0 or length % DESC_SIZE or length // DESC_SIZE > self.size:
                    return "bad indirect length"
                if not self._inside_one(address, length):
                    return "indirect table outside memory"
                table = self.read(address, length) or b""
                entries, visited, nested, index = length // DESC_SIZE, 0, True, 0
                continue
            if length == 0:
                return "empty buffer"
            buffers += 1
            if buffers > self.size:
                return "too many buffers"
            if self.read(address, length) is None:
                return "buffer outside memory"
            if flags & VIRTQ_DESC_F_WRITE:
                writable_len += length
            else:
                if writable_len:
                    return "readable after writable"
                readable.append((address, length))
                readable_len += length
            if readable_len + writable_len > MAX_CHAIN_BYTES:
                return "chain too long"
            if not flags & VIRTQ_DESC_F_NEXT:
                return readable, readable_len, writable_len
            if next_index >= entries:
                return "next out of table"
            index = next_index


class ChainsTarget(FuzzTarget):
    name = "chains"
    description = (
        "hostile descriptor tables, indirect tables and ring indices through SplitQueue pop/push_used"
    )
    max_input = 2048

    def setup(self) -> None:
        self.main = GuestRam(MAIN_SIZE, gpa_base=GPA_BASE, name="fuzz-chains")
        self.extra = GuestRam(EXTRA_SIZE, gpa_base=GPA_BASE + MAIN_SIZE, name="fuzz-chains")
        self.memory = GuestMemory()
        for ram in (self.main, self.extra):
            self.memory.add_region(ram.region_desc(), ram.dup_fd())
        self.reference_regions = [
            (ram.gpa_base, ram.gpa_base + ram.size, ram) for ram in (self.main, self.extra)
        ]
        self.mappings = [(r.data.ctypes.data, r.data.ctypes.data + r.size) for r in self.memory.regions]

    def teardown(self) -> None:
        self.memory.close()
        self.main.close()
        self.extra.close()

    # -- building the rings ---------------------------------------------------------------------------------

    @staticmethod
    def _table(
        choices: Choices, count: int, entries: int, tables: list[tuple[int, int]], sane: bool = False
    ) -> bytes:
        """``count`` descriptors (of a table of ``entries``), built in one go from 24 input bytes each: 16
        raw descriptor bytes and 8 that decide how each field is bent. Addresses go in the buffers, across
        the boundary of the two regions, at the end of memory, on the rings, or anywhere; lengths are
        small, zero, up to a page or any u32; flags are the usual combinations or any u16; INDIRECT ones
        mostly point at one of ``tables``. ``sane`` descriptors (most, in some executions) hold a small
        buffer where buffers go, so that chains get long before something breaks them."""
        raw = np.frombuffer(choices.take(24 * count), dtype=np.uint8).reshape(count, 24)
        descs = np.ascontiguousarray(raw[:, :16]).view(DESC_DTYPE).reshape(count)
        control = raw[:, 16:].astype(np.int64)
        addr, length = descs["addr"], descs["len"].astype(np.uint64)
        flags, next_index = descs["flags"].astype(np.int64), descs["next"].astype(np.int64)
        end = GPA_BASE + MAIN_SIZE + EXTRA_SIZE
        in_buffers = np.uint64(GPA_BASE + BUFFERS) + addr % np.uint64(MAIN_SIZE - BUFFERS - 64)
        kind = control[:, 0] % 16
        addr = np.select(
            [kind < 9, kind < 11, kind < 13, kind == 13],
            [
                in_buffers,
                np.uint64(GPA_BASE + MAIN_SIZE - 1) - addr % np.uint64(64),
                np.uint64(end) - addr % np.uint64(65),
                np.uint64(GPA_BASE) + addr % np.uint64(BUFFERS),
            ],
            addr,
        )
        length_kind = control[:, 1] % 16
        small = np.uint64(1) + length % np.uint64(64)
        length = np.select(
            [length_kind < 12, length_kind == 12, length_kind == 13],
            [small, np.zeros_like(length), np.uint64(1) + length % np.uint64(4096)],
            length,
        )
        choices_of_flags = np.array(_FLAG_CHOICES, dtype=np.int64)
        flags = np.where(control[:, 2] < 240, choices_of_flags[control[:, 3] % len(_FLAG_CHOICES)], flags)
        if sane:
            usual = control[:, 7] < 240
            addr = np.where(usual, in_buffers, addr)
            length = np.where(usual, small, length)
            plain = choices_of_flags[control[:, 3] % 4]  # no INDIRECT, unless it points at a table
            flags = np.where(usual & ((control[:, 4] < 200) | (len(tables) == 0)), plain, flags)
        if tables:
            table_addr = np.array([gpa for gpa, _ in tables], dtype=np.uint64)
            table_len = np.array([DESC_SIZE * n for _, n in tables], dtype=np.uint64)
            which = control[:, 6] % len(tables)
            pointing = ((flags & VIRTQ_DESC_F_INDIRECT) != 0) & (control[:, 5] < 200)
            addr = np.where(pointing, table_addr[which], addr)
            length = np.where(pointing & (control[:, 4] < 220), table_len[which], length)
        next_index = np.where(control[:, 4] < 230, next_index % entries, next_index)
        out = np.empty(count, dtype=DESC_DTYPE)
        out["addr"], out["len"], out["flags"], out["next"] = addr, length, flags, next_index
        return out.tobytes()

    def seeds(self) -> list[bytes]:
        """A ring of 8 with each combination of EVENT_IDX and INDIRECT, its descriptors mostly sane, at
        the planned addresses (the rest is the input's own)."""
        seeds = [b""]
        for event_idx in (False, True):
            for indirect in (False, True):
                script = Script().chance(200, True).below(5, 3).chance(128, event_idx).chance(200, indirect)
                seeds.append(script.chance(128, True).chance(16, False).data)
        return seeds

    def run(self, choices: Choices) -> Iterable[Hashable]:
        self.main.data[:] = 0
        self.extra.data[:] = 0
        features: list[Hashable] = []
        size = 1 << (choices.below(5) if choices.chance(200) else choices.below(9))
        event_idx, indirect, sane = choices.chance(128), choices.chance(200), choices.chance(128)
        desc_bytes, avail_bytes, used_bytes = ring_sizes(size, event_idx)
        desc_gpa, avail_gpa, used_gpa = GPA_BASE, GPA_BASE + 0x1000, GPA_BASE + 0x2000
        if choices.chance(16):  # a hostile ring address
            which = choices.below(3)
            hostile = choices.pick(
                (
                    GPA_BASE + choices.between(1, 15),
                    GPA_BASE + MAIN_SIZE - choices.between(1, 64),
                    choices.u64(),
                )
            )
            desc_gpa, avail_gpa, used_gpa = (
                hostile if which == 0 else desc_gpa,
                hostile if which == 1 else avail_gpa,
                hostile if which == 2 else used_gpa,
            )
        # Indirect tables in the buffer area, written like the main table.
        tables: list[tuple[int, int]] = []
        for _ in range(choices.below(4)):
            count = (
                choices.between(1, min(2 * size, 16)) if choices.chance(224) else choices.between(1, 2 * size)
            )
            gpa = GPA_BASE + BUFFERS + DESC_SIZE * choices.below((MAIN_SIZE - BUFFERS) // DESC_SIZE - count)
            tables.append((gpa, count))
        for gpa, count in tables:
            self.main.write(gpa, self._table(choices, count, count, [], sane))
        if desc_gpa == GPA_BASE:
            self.main.write(desc_gpa, self._table(choices, size, size, tables, sane))
        next_avail = choices.pick((0, 0xFFFF, 0xFFFF - size // 2, choices.bits(16)))
        used_start = choices.pick((0, next_avail, choices.bits(16)))
        if avail_gpa == GPA_BASE + 0x1000:
            # Heads: mostly in range, a few any u16 (3 input bytes per entry: the value, whether to bend it).
            raw = np.frombuffer(choices.take(3 * size), dtype=np.uint8)
            heads = raw[: 2 * size].view("<u2")
            ring = np.where(raw[2 * size :] < 240, heads % size, heads).astype("<u2")
            pending = choices.between(0, size) if choices.chance(240) else choices.bits(16)
            self.main.write(
                avail_gpa, struct.pack("<HH", 0, (next_avail + pending) & 0xFFFF) + ring.tobytes()
            )
        if used_gpa == GPA_BASE + 0x2000:
            self.main.write(used_gpa, struct.pack("<HH", 0, used_start))

        uva = {gpa: self._uva(gpa) for gpa in (desc_gpa, avail_gpa, used_gpa)}
        expected_ok = (
            desc_gpa % 16 == 0
            and avail_gpa % 2 == 0
            and used_gpa % 4 == 0
            and all(
                self._uva_inside(uva[gpa], length)
                for gpa, length in ((desc_gpa, desc_bytes), (avail_gpa, avail_bytes), (used_gpa, used_bytes))
            )
        )
        try:
            queue = SplitQueue(
                self.memory,
                size,
                uva[desc_gpa],
                uva[avail_gpa],
                uva[used_gpa],
                next_avail=next_avail,
                event_idx=event_idx,
                indirect=indirect,
            )
        except QueueError as exc:
            if expected_ok:
                raise FuzzFailure(f"a valid ring layout was refused: {exc}") from None
            features.append(("layout refused", shape(str(exc))))
            return features
        if not expected_ok:
            raise FuzzFailure(f"rings at {desc_gpa:#x}/{avail_gpa:#x}/{used_gpa:#x} accepted")
        if (desc_gpa, avail_gpa, used_gpa) != (GPA_BASE, GPA_BASE + 0x1000, GPA_BASE + 0x2000):
            # Rings somewhere valid but unplanned (over the buffers): no reference, only "no crash".
            for _ in range(size + 1):
                try:
                    if queue.pop() is None:
                        break
                except QueueError:
                    break
            features.append("moved rings")
            return features
        self._drive(choices, queue, size, indirect, tables, features)
        return features

    def _uva(self, gpa: int) -> int:
        for ram in (self.main, self.extra):
            if ram.gpa_base <= gpa < ram.gpa_base + ram.size:
                return gpa - ram.gpa_base + ram.uva_base
        return gpa  # outside guest memory: any address the front-end could send

    def _uva_inside(self, uva: int, length: int) -> bool:
        return any(r.uva_base <= uva and uva + length <= r.uva_base + r.size for r in (self.main, self.extra))

    # -- popping and pushing --------------------------------------------------------------------------------

    def _drive(
        self,
        choices: Choices,
        queue: SplitQueue,
        size: int,
        indirect: bool,
        tables: list[tuple[int, int]],
        features: list[Hashable],
    ) -> None:
        reference = _Reference(self.reference_regions, size, indirect)
        held: dict[int, DescriptorChain] = {}
        used_start = queue.used_idx
        pushed: list[tuple[int, int]] = []
        for _ in range(choices.between(1, 2 * size + 4)):
            action = choices.below(16)
            if action < 9:
                expected = self._expect_pop(queue, reference, size, held)
                try:
                    chain = queue.pop()
                except QueueError as exc:
                    if not isinstance(expected, str) or expected == "none":
                        raise FuzzFailure(
                            f"pop refused a chain the reference walks to {expected}: {exc}"
                        ) from None
                    features.append(("broken", expected))
                    return  # the device would now be in NEEDS_RESET
                if chain is None:
                    if expected != "none":
                        raise FuzzFailure(f"pop found nothing, the reference finds {expected}")
                    features.append("empty")
                    continue
                if isinstance(expected, str):
                    raise FuzzFailure(f"pop returned {chain}, the reference says {expected}")
                self._check_chain(chain, expected, reference)
                held[chain.head] = chain
                features.append(("chain", min(chain.readable_len, 64), min(chain.writable_len, 64)))
            elif action < 13 and held:
                head = choices.pick(sorted(held))
                chain = held.pop(head)
                length = choices.between(0, chain.writable_len) if chain.writable_len < 1 << 20 else 0
                if length and self._outside_rings(chain):
                    # (A buffer over the used ring is the driver's own doing; writing into it would
                    # overwrite the entries the used-ring check below compares.)
                    chain.write(bytes(min(length, 64)))
                queue.push_used(head, length)
                pushed.append((head, length))
            elif action == 13:
                self._misuse_push(choices, queue, size, held, features)
            elif action == 14:
                self._driver_rewrites(choices, queue, size, tables)
            else:
                queue.set_notification(choices.chance(128))
                queue.needs_notification()
                queue.rebind(self.memory)
        self._check_used(queue, size, used_start, pushed)

    def _outside_rings(self, chain: DescriptorChain) -> bool:
        rings_start = self.memory.regions[0].data.ctypes.data  # the main RAM: rings first, then buffers
        rings_end = rings_start + BUFFERS
        return all(
            view.ctypes.data >= rings_end or view.ctypes.data + len(view) <= rings_start
            for view in chain.writable
        )

    def _expect_pop(
        self, queue: SplitQueue, reference: _Reference, size: int, held: dict[int, DescriptorChain]
    ) -> tuple[list[tuple[int, int]], int, int] | str:
        avail = self.main.read(GPA_BASE + 0x1000, 4 + 2 * size)
        avail_idx = struct.unpack_from("<H", avail, 2)[0]
        pending = (avail_idx - queue.next_avail) & 0xFFFF
        if pending == 0:
            return "none"
        if pending > size:
            return "index too far ahead"
        head = struct.unpack_from("<H", avail, 4 + 2 * (queue.next_avail & (size - 1)))[0]
        if head >= size:
            return "head out of range"
        if head in held:
            return "head in flight"
        return reference.walk(self.main.read(GPA_BASE, DESC_SIZE * size), head)

    def _check_chain(
        self, chain: DescriptorChain, expected: tuple[list[tuple[int, int]], int, int], reference: _Reference
    ) -> None:
        ranges, readable_len, writable_len = expected
        # Read now, not at the walk: pop itself may write into a buffer (avail_event, when a buffer
        # overlaps the used ring).
        readable = b"".join(reference.read(gpa, length) or b"" for gpa, length in ranges)
        if (chain.readable_len, chain.writable_len) != (readable_len, writable_len):
            raise FuzzFailure(
                f"chain {chain}: lengths {(chain.readable_len, chain.writable_len)}, "
                f"the reference finds {(readable_len, writable_len)}"
            )
        for views, total in ((chain.readable, chain.readable_len), (chain.writable, chain.writable_len)):
            if sum(len(view) for view in views) != total:
                raise FuzzFailure(f"chain {chain}: views add up to {sum(len(v) for v in views)}, not {total}")
            for view in views:
                start = view.ctypes.data
                if len(view) == 0 or not any(
                    lo <= start and start + len(view) <= hi for lo, hi in self.mappings
                ):
                    raise FuzzFailure(
                        f"chain {chain}: a view at {start:#x}+{len(view)} is outside guest memory"
                    )
        if chain.read() != readable:
            raise FuzzFailure(f"chain {chain}: readable bytes differ from the reference's")

    def _misuse_push(
        self,
        choices: Choices,
        queue: SplitQueue,
        size: int,
        held: dict[int, DescriptorChain],
        features: list[Hashable],
    ) -> None:
        """A device bug on purpose: push a head not held, or more bytes than the chain can take."""
        if held and choices.chance(128):
            head = choices.pick(sorted(held))
            length = held[head].writable_len + choices.between(1, 8)
        else:
            head = choices.pick((choices.below(size), size, -1, choices.bits(16)))
            if head in held:
                return
            length = 0
        before = (queue.used_idx, queue.in_flight)
        try:
            queue.push_used(head, length)
        except ValueError:
            if (queue.used_idx, queue.in_flight) != before:
                raise FuzzFailure(f"a refused push_used({head}, {length}) changed the queue") from None
            features.append("misuse refused")
            return
        raise FuzzFailure(f"push_used({head}, {length}) accepted for a chain the device does not hold")

    def _driver_rewrites(
        self, choices: Choices, queue: SplitQueue, size: int, tables: list[tuple[int, int]]
    ) -> None:
        """The driver runs concurrently: between two pops it may change anything it owns."""
        what = choices.below(4)
        if what == 0:
            index = choices.below(size)
            self.main.write(GPA_BASE + DESC_SIZE * index, self._table(choices, 1, size, tables))
        elif what == 1 and tables:
            gpa, count = choices.pick(tables)
            index = choices.below(count)
            self.main.write(gpa + DESC_SIZE * index, self._table(choices, 1, count, []))
        elif what == 2:
            slot = choices.below(size)
            self.main.write(GPA_BASE + 0x1000 + 4 + 2 * slot, struct.pack("<H", choices.below(size)))
        else:
            bump = choices.between(0, size) if choices.chance(230) else choices.bits(16)
            self.main.write(GPA_BASE + 0x1000 + 2, struct.pack("<H", (queue.next_avail + bump) & 0xFFFF))

    def _check_used(
        self, queue: SplitQueue, size: int, used_start: int, pushed: list[tuple[int, int]]
    ) -> None:
        used = self.main.read(GPA_BASE + 0x2000, 4 + 8 * size)
        used_idx = struct.unpack_from("<H", used, 2)[0]
        if used_idx != (used_start + len(pushed)) & 0xFFFF or queue.used_idx != used_idx:
            raise FuzzFailure(f"used.idx {used_idx} after {len(pushed)} pushes from {used_start}")
        for number, (head, length) in enumerate(pushed[-size:], start=max(0, len(pushed) - size)):
            slot = (used_start + number) & (size - 1)
            found = struct.unpack_from("<II", used, 4 + 8 * slot)
            if found != (head, length):
                raise FuzzFailure(f"used slot {slot} holds {found}, pushed {(head, length)}")

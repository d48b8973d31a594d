"""SplitQueue driven by DriverQueue over GuestRam: chains, notifications, and a hostile driver."""

from __future__ import annotations

import signal
import textwrap
from collections.abc import Iterator
from types import FrameType, ModuleType

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vhost_iommu import virtqueue
from vhost_iommu.harness import driver_queue as driver_queue_module
from vhost_iommu.harness import guest_ram as guest_ram_module
from vhost_iommu.harness.driver_queue import DriverQueue, DriverQueueError
from vhost_iommu.harness.guest_ram import GuestRam
from vhost_iommu.memory import GuestMemory, MemoryRegionDesc
from vhost_iommu.virtqueue import (
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
    DescriptorChain,
    QueueError,
    SplitQueue,
    vring_need_event,
)

GPA_BASE = 0x1_0000_0000  # guest-physical and front-end addresses differ, so a mix-up shows
RAM_SIZE = 4 << 20
NEXT, WRITE, INDIRECT = VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT


@pytest.fixture(autouse=True)
def watchdog() -> Iterator[None]:
    """Turn a spinning walk into a test failure instead of a hung test run."""

    def expire(signum: int, frame: FrameType | None) -> None:
        raise TimeoutError("the test did not finish in 20 s: something spins")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def ram() -> Iterator[GuestRam]:
    with GuestRam(RAM_SIZE, gpa_base=GPA_BASE) as guest_ram:
        yield guest_ram


@pytest.fixture
def memory(ram: GuestRam) -> Iterator[GuestMemory]:
    guest_memory = ram.guest_memory()
    yield guest_memory
    guest_memory.close()


def make_pair(
    ram: GuestRam, memory: GuestMemory, size: int = 16, *, event_idx: bool = False, start_index: int = 0
) -> tuple[DriverQueue, SplitQueue]:
    driver = DriverQueue(ram, size, event_idx=event_idx, start_index=start_index)
    return driver, driver.device_queue(memory)


def pop_one(device: SplitQueue) -> DescriptorChain:
    chain = device.pop()
    assert chain is not None
    return chain


# --- well-formed traffic ---------------------------------------------------------------------------------


def test_request_and_response_round_trip(ram: GuestRam, memory: GuestMemory) -> None:
    driver, device = make_pair(ram, memory)
    assert device.pop() is None
    assert not device.has_available()
    head = driver.post([b"hello ", b"world"], [4, 8])
    assert device.has_available()
    chain = pop_one(device)
    assert (chain.head, chain.readable_len, chain.writable_len) == (head, 11, 12)
    assert chain.read() == b"hello world"
    assert chain.write(b"0123456789") == 10  # scattered over the 4- and 8-byte buffers
    device.push_used(chain.head, 10)
    assert device.pop() is None
    assert driver.used_with_data() == [(head, 10, b"0123456789")]
    assert driver.written(head) == b"0123456789\0\0"
    assert driver.used() == []


def test_chain_gives_views_not_copies(ram: GuestRam, memory: GuestMemory) -> None:
    driver, device = make_pair(ram, memory)
    head = driver.post([b"abcd"], [4])
    chain = pop_one(device)
    chain.writable[0][:] = 0x5A
    device.push_used(chain.head, 4)
    driver.used()
    assert driver.written(head) == b"ZZZZ"


def test_write_at_offset_and_truncation(ram: GuestRam, memory: GuestMemory) -> None:
    driver, device = make_pair(ram, memory)
    head = driver.post([b"r"], [3, 3])
    chain = pop_one(device)
    assert chain.write(b"xy", offset=2) == 2  # crosses from the first buffer into the second
    assert chain.write(b"ABCDEFGH", offset=4) == 2  # only two bytes left
    assert chain.write(b"z", offset=6) == 0
    device.push_used(chain.head, 6)
    driver.used()
    assert driver.written(head) == b"\0\0xyAB"


def test_read_into_gathers_up_to_the_buffer_size(ram: GuestRam, memory: GuestMemory) -> None:
    driver, device = make_pair(ram, memory)
    driver.post([b"abc", b"defg"], [1])
    chain = pop_one(device)
    whole = bytearray(16)
    assert chain.read_into(whole) == 7
    assert bytes(whole[:7]) == b"abcdefg"
    small = bytearray(5)
    assert chain.read_into(small) == 5
    assert bytes(small) == b"abcde"


def test_indirect_chain(ram: GuestRam, memory: GuestMemory) -> None:
    driver, device = make_pair(ram, memory)
    head = driver.post([b"in", b"direct"], [5, 5], indirect=True)
    chain = pop_one(device)
    assert chain.read() == b"indirect"
    assert chain.writable_len == 10
    chain.write(b"0123456789")
    device.push_used(chain.head, 10)
    assert driver.used_with_data() == [(head, 10, b"0123456789")]


def test_direct_descriptors_followed_by_an_indirect_table(ram: GuestRam, memory: GuestMemory) -> None:
    # The spec: a device MUST handle zero or more chained descriptors followed by one INDIRECT one.
    driver, device = make_pair(ram, memory)
    first = driver.alloc_buffer(b"head-")
    table = ram.alloc(32, 16)
    driver.write_indirect_table(
        table, [(driver.alloc_buffer(b"tail"), 4, NEXT, 1), (driver.alloc_buffer(8), 8, WRITE, 0)]
    )
    driver.write_desc(3, first, 5, NEXT, 7)
    driver.write_desc(7, table, 32, INDIRECT | WRITE, 0)  # WRITE on the pointer must be ignored
    driver.make_available(3)
    chain = pop_one(device)
    assert chain.head == 3
    assert chain.read() == b"head-tail"
    assert chain.writable_len == 8


def test_buffer_crossing_adjacent_regions_is_split(ram: GuestRam) -> None:
    # The same memfd as two regions, contiguous in gpa space but not in the front-end's.
    half = RAM_SIZE // 2
    memory = GuestMemory()
    memory.add_region(MemoryRegionDesc(GPA_BASE, half, 0x5000_0000_0000, 0), ram.dup_fd())
    memory.add_region(MemoryRegionDesc(GPA_BASE + half, half, 0x6000_0000_0000, half), ram.dup_fd())
    try:
        driver = DriverQueue(ram, 8)
        assert driver.used_gpa < GPA_BASE + half  # the rings sit in the first region
        device = SplitQueue(
            memory,
            8,
            0x5000_0000_0000 + driver.desc_gpa - GPA_BASE,
            0x5000_0000_0000 + driver.avail_gpa - GPA_BASE,
            0x5000_0000_0000 + driver.used_gpa - GPA_BASE,
            next_avail=0,
            event_idx=False,
            indirect=True,
        )
        ram.write(GPA_BASE + half - 3, b"spanning")
        driver.write_desc(0, GPA_BASE + half - 3, 8, 0, 0)
        driver.make_available(0)
        chain = pop_one(device)
        assert [len(segment) for segment in chain.readable] == [3, 5]
        assert chain.read() == b"spanning"
    finally:
        memory.close()


def test_descriptors_and_buffers_are_reused(ram: GuestRam, memory: GuestMemory) -> None:
    driver, device = make_pair(ram, memory, size=8)
    free_before = ram.free_bytes
    for round_number in range(3000):  # far more than the ring or the RAM could hold without reuse
        payload = round_number.to_bytes(4, "little")
        heads = [driver.post([payload, b"x" * 700], [800], indirect=bool(i & 1)) for i in range(4)]
        for _ in heads:
            chain = pop_one(device)
            chain.write(chain.read()[:4])
            device.push_used(chain.head, 4)
        assert [(head, data) for head, _, data in driver.used_with_data()] == [(h, payload) for h in heads]
    assert ram.free_bytes == free_before
    assert device.next_avail == device.used_idx == (3000 * 4) & 0xFFFF


def test_indices_wrap_at_65536(ram: GuestRam, memory: GuestMemory) -> None:
    driver, device = make_pair(ram, memory, size=4, start_index=0xFFFD)
    assert (device.next_avail, device.used_idx) == (0xFFFD, 0xFFFD)  # used_idx is read from the ring
    for i in range(6):
        head = driver.post([bytes([i])], [1])
        chain = pop_one(device)
        assert chain.read() == bytes([i])
        device.push_used(chain.head, 1)
        assert driver.used() == [(head, 1)]
    assert (device.next_avail, device.used_idx, driver.avail_idx, driver.used_idx) == (3, 3, 3, 3)
    assert device.pushed_since_check == 6  # counted across the wrap: the notification decision sees all
    assert device.needs_notification() and device.pushed_since_check == 0


def test_restart_resumes_at_next_avail(ram: GuestRam, memory: GuestMemory) -> None:
    driver = DriverQueue(ram, 8)
    heads = [driver.post([bytes([i])], [1]) for i in range(3)]
    device = driver.device_queue(memory, next_avail=2)  # as after GET_VRING_BASE=2 / SET_VRING_BASE=2
    chain = pop_one(device)
    assert chain.head == heads[2]
    assert device.pop() is None


def test_rebind_follows_a_new_memory_table(ram: GuestRam, memory: GuestMemory) -> None:
    driver, device = make_pair(ram, memory)
    replacement = ram.guest_memory()
    try:
        memory.close()  # the old table is gone
        device.rebind(replacement)
        head = driver.post([b"after"], [2])
        chain = pop_one(device)
        assert chain.head == head and chain.read() == b"after"
    finally:
        replacement.close()


def test_rebind_fails_cleanly_when_the_ring_left_memory(ram: GuestRam, memory: GuestMemory) -> None:
    driver, device = make_pair(ram, memory)
    driver.post([b"early"], [2])
    chain = pop_one(device)
    elsewhere = GuestMemory()
    with pytest.raises(QueueError, match="not in guest memory"):
        device.rebind(elsewhere)
    memory.close()
    # The session is over: views taken before no longer see the guest's RAM but stay valid (zeros until
    # they die): no crash, no dangling pointer.
    assert chain.read() == bytes(len(b"early"))


# --- construction --------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 3, 24, 65536, -2])
def test_queue_size_must_be_a_power_of_two_up_to_32768(ram: GuestRam, memory: GuestMemory, size: int) -> None:
    driver = DriverQueue(ram, 16)
    with pytest.raises(QueueError, match="power of 2"):
        SplitQueue(
            memory,
            size,
            driver.desc_uva,
            driver.avail_uva,
            driver.used_uva,
            next_avail=0,
            event_idx=False,
            indirect=False,
        )


def test_misaligned_rings_are_refused(ram: GuestRam, memory: GuestMemory) -> None:
    d = DriverQueue(ram, 16)
    for desc, avail, used in [
        (d.desc_uva + 8, d.avail_uva, d.used_uva),
        (d.desc_uva, d.avail_uva + 1, d.used_uva),
        (d.desc_uva, d.avail_uva, d.used_uva + 2),
    ]:
        with pytest.raises(QueueError, match="aligned"):
            SplitQueue(memory, 16, desc, avail, used, next_avail=0, event_idx=False, indirect=False)


def test_rings_must_lie_in_memory_at_front_end_addresses(ram: GuestRam, memory: GuestMemory) -> None:
    d = DriverQueue(ram, 16)
    with pytest.raises(QueueError, match="not in guest memory"):  # guest-physical where a uva belongs
        SplitQueue(
            memory, 16, d.desc_gpa, d.avail_gpa, d.used_gpa, next_avail=0, event_idx=False, indirect=False
        )
    end = ram.uva_base + ram.size
    with pytest.raises(QueueError, match="not in guest memory"):  # used ring runs off the end
        SplitQueue(
            memory, 16, d.desc_uva, d.avail_uva, end - 100, next_avail=0, event_idx=False, indirect=False
        )
    with pytest.raises(QueueError, match="not in guest memory"):  # table too big for what is left
        SplitQueue(
            memory,
            32768,
            end - 16 * 1024,
            d.avail_uva,
            d.used_uva,
            next_avail=0,
            event_idx=False,
            indirect=False,
        )


def test_next_avail_must_be_a_u16(ram: GuestRam, memory: GuestMemory) -> None:
    d = DriverQueue(ram, 16)
    with pytest.raises(QueueError, match="u16"):
        SplitQueue(
            memory, 16, d.desc_uva, d.avail_uva, d.used_uva, next_avail=65536, event_idx=False, indirect=False
        )


# --- used-buffer notifications -----------------------------------------------------------------------------


def complete(driver: DriverQueue, device: SplitQueue, count: int) -> None:
    for _ in range(count):
        driver.post([b"q"], [1])
        chain = pop_one(device)
        device.push_used(chain.head, 1)
    driver.used()


@pytest.mark.parametrize(
    ("event", "new", "old", "expected"),
    [
        (0, 1, 0, True),  # the entry at index 0 was written
        (1, 1, 0, False),
        (5, 10, 0, True),
        (10, 10, 0, False),
        (0xFFFF, 0, 0xFFFE, True),  # across the wrap
        (0xFFFF, 0xFFFF, 0xFFFE, False),
        (0, 1, 0xFFFF, True),
        (1, 1, 0xFFFF, False),
        (0xFFFE, 3, 0xFFF0, True),
        (4, 3, 0xFFF0, False),
    ],
)
def test_vring_need_event(event: int, new: int, old: int, expected: bool) -> None:
    assert vring_need_event(event, new, old) is expected


def test_no_interrupt_flag_without_event_idx(ram: GuestRam, memory: GuestMemory) -> None:
    driver, device = make_pair(ram, memory)
    assert not device.needs_notification()  # nothing used yet
    complete(driver, device, 2)
    assert device.needs_notification()
    assert not device.needs_notification()  # nothing new since
    driver.avail_flags = VIRTQ_AVAIL_F_NO_INTERRUPT
    complete(driver, device, 1)
    assert not device.needs_notification()
    driver.avail_flags = 0
    complete(driver, device, 1)
    assert device.needs_notification()


def test_used_event_decides_with_event_idx(ram: GuestRam, memory: GuestMemory) -> None:
    driver, device = make_pair(ram, memory, event_idx=True)
    driver.auto_used_event = False  # this test moves used_event itself
    driver.avail_flags = VIRTQ_AVAIL_F_NO_INTERRUPT  # must be ignored with EVENT_IDX
    driver.used_event = 0
    complete(driver, device, 1)  # used.idx 0 -> 1 passes used_event 0
    assert device.needs_notification()
    driver.used_event = 3
    complete(driver, device, 2)  # 1 -> 3: entry 3 not written yet
    assert not device.needs_notification()
    complete(driver, device, 1)  # 3 -> 4 writes entry 3
    assert device.needs_notification()
    complete(driver, device, 3)  # 4 -> 7: used_event 3 already behind
    assert not device.needs_notification()
    driver.used_event = 7
    complete(driver, device, 5)  # a batch that passes used_event in its middle
    assert device.needs_notification()


def test_used_event_across_u16_wraparound(ram: GuestRam, memory: GuestMemory) -> None:
    driver, device = make_pair(ram, memory, event_idx=True, start_index=0xFFFC)
    driver.auto_used_event = False  # this test moves used_event itself
    driver.used_event = 0xFFFC
    complete(driver, device, 1)
    assert device.needs_notification()  # first decision: the entry at 0xFFFC was written
    driver.used_event = 0x0001
    complete(driver, device, 3)  # 0xFFFD -> 0x0000
    assert not device.needs_notification()
    complete(driver, device, 2)  # 0x0000 -> 0x0002 writes entry 1
    assert device.needs_notification()
    driver.used_event = 0xFFFF  # far behind now: no notification until the indices come round again
    complete(driver, device, 4)
    assert not device.needs_notification()


def test_first_decision_with_event_idx_notifies(ram: GuestRam, memory: GuestMemory) -> None:
    # Nothing is known about what the driver saw before this queue started: be safe, notify once.
    driver, device = make_pair(ram, memory, event_idx=True)
    driver.used_event = 100
    complete(driver, device, 1)
    assert device.needs_notification()
    complete(driver, device, 1)
    assert not device.needs_notification()


# --- available-buffer notifications (kicks) --------------------------------------------------------------


def test_avail_event_follows_pops(ram: GuestRam, memory: GuestMemory) -> None:
    driver, device = make_pair(ram, memory, event_idx=True, start_index=0xFFFE)
    for expected in (0xFFFF, 0x0000, 0x0001):
        driver.post([b"k"], [1])
        assert driver.needs_kick()  # the device asked for the entry just published
        pop_one(device)
        assert driver.avail_event == expected
    driver.post([b"k"], [1], publish=False)
    driver.post([b"k"], [1], publish=False)
    driver.publish()
    assert driver.needs_kick()  # a batch that covers avail_event
    pop_one(device)
    assert driver.avail_event == 0x0002  # one chain still waiting: the next kick is not needed
    driver.post([b"k"], [1])
    assert not driver.needs_kick()


def test_polling_mode_suppresses_kicks_with_event_idx(ram: GuestRam, memory: GuestMemory) -> None:
    driver, device = make_pair(ram, memory, event_idx=True)
    driver.post([b"a"], [1])
    pop_one(device)
    device.set_notification(False)
    for _ in range(3):
        driver.post([b"b"], [1])
        assert not driver.needs_kick() or driver.avail_event == 1  # at most the one already asked for
        pop_one(device)
    assert driver.avail_event == 1  # not advanced while polling
    assert device.pop() is None
    device.set_notification(True)
    assert driver.avail_event == device.next_avail == 4
    driver.post([b"c"], [1])
    assert driver.needs_kick()


def test_polling_mode_sets_no_notify_without_event_idx(ram: GuestRam, memory: GuestMemory) -> None:
    driver, device = make_pair(ram, memory)
    driver.post([b"a"], [1])
    assert driver.needs_kick()
    device.set_notification(False)
    assert driver.used_flags == VIRTQ_USED_F_NO_NOTIFY
    driver.post([b"b"], [1])
    assert not driver.needs_kick()
    device.set_notification(True)
    assert driver.used_flags == 0
    driver.post([b"c"], [1])
    assert driver.needs_kick()


def test_empty_ring_republishes_avail_event_then_looks_again(
    ram: GuestRam, memory: GuestMemory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race: the driver publishes a chain while the device, seeing an empty ring, asks for a kick.
    The driver read the old avail_event and will not kick, so the device must look at avail.idx again
    after publishing avail_event."""
    driver, device = make_pair(ram, memory, event_idx=True)
    device.set_notification(False)
    driver.post([b"x"], [1])
    pop_one(device)  # avail_event stays 0: kicks are off
    device.set_notification(True)  # writes avail_event 1
    # Make avail_event stale again, as if the device were about to publish it.
    ram.view(driver.used_gpa + 4 + 8 * driver.size, 2)[:] = 0
    posted: list[int] = []

    def driver_races_in() -> None:
        if not posted:
            assert driver.avail_event == 1  # avail_event is already published when the fence runs
            posted.append(driver.post([b"late"], [1]))

    monkeypatch.setattr(virtqueue, "full_fence", driver_races_in)
    chain = device.pop()
    assert posted, "the device never published avail_event on an empty ring"
    assert chain is not None and chain.read() == b"late"


# --- device-side misuse ------------------------------------------------------------------------------------


def test_push_used_refuses_what_was_not_popped(ram: GuestRam, memory: GuestMemory) -> None:
    driver, device = make_pair(ram, memory)
    driver.post([b"a"], [4])
    chain = pop_one(device)
    with pytest.raises(ValueError, match="writable length"):
        device.push_used(chain.head, 5)
    with pytest.raises(ValueError, match="not a chain popped"):
        device.push_used(chain.head + 1, 0)
    with pytest.raises(ValueError, match="not a chain popped"):
        device.push_used(16, 0)
    assert device.in_flight == 1
    device.push_used(chain.head, 4)
    with pytest.raises(ValueError, match="not a chain popped"):
        device.push_used(chain.head, 4)
    assert driver.used() == [(chain.head, 4)]


# --- hostile driver -----------------------------------------------------------------------------------------


def expect_broken(device: SplitQueue, match: str) -> None:
    next_avail = device.next_avail
    with pytest.raises(QueueError, match=match):
        device.pop()
    assert device.next_avail == next_avail  # nothing consumed: GET_VRING_BASE still tells the truth


def test_avail_idx_too_far_ahead(ram: GuestRam, memory: GuestMemory) -> None:
    driver, device = make_pair(ram, memory, size=8)
    driver.set_avail_idx(9)
    expect_broken(device, "more than the queue size")
    with pytest.raises(QueueError):
        device.has_available()
    driver.set_avail_idx(0xFFFF)  # "behind" by one is ahead by 65535
    expect_broken(device, "more than the queue size")


def test_head_out_of_range(ram: GuestRam, memory: GuestMemory) -> None:
    driver, device = make_pair(ram, memory)
    driver.make_available(16)
    expect_broken(device, "holds head 16")


def test_head_reused_while_in_flight(ram: GuestRam, memory: GuestMemory) -> None:
    driver, device = make_pair(ram, memory)
    head = driver.post([b"a"], [1])
    pop_one(device)
    driver.make_available(head)
    expect_broken(device, "still holds it")


def test_next_out_of_range(ram: GuestRam, memory: GuestMemory) -> None:
    driver, device = make_pair(ram, memory)
    driver.write_desc(0, driver.alloc_buffer(4), 4, NEXT, 16)
    driver.make_available(0)
    expect_broken(device, "outside its table of 16")


@pytest.mark.parametrize("size", [1, 16, 32768])
def test_descriptor_loops_are_caught(size: int) -> None:
    with GuestRam(1 << 20, gpa_base=GPA_BASE) as ram:
        memory = ram.guest_memory()
        try:
            driver, device = make_pair(ram, memory, size=size)
            buffer = driver.alloc_buffer(4)
            for index in range(size):  # every descriptor points at the next, the last at the first
                driver.write_desc(index, buffer, 4, NEXT, (index + 1) % size)
            driver.make_available(0)
            expect_broken(device, "loops")
        finally:
            memory.close()


def test_self_loop(ram: GuestRam, memory: GuestMemory) -> None:
    driver, device = make_pair(ram, memory)
    driver.write_desc(5, driver.alloc_buffer(4), 4, NEXT, 5)
    driver.make_available(5)
    expect_broken(device, "loops")


def test_direct_plus_indirect_longer_than_the_queue(ram: GuestRam, memory: GuestMemory) -> None:
    driver, device = make_pair(ram, memory, size=4)
    buffer = driver.alloc_buffer(4)
    table = ram.alloc(4 * 16, 16)
    driver.write_indirect_table(
        table, [(buffer, 4, NEXT, 1), (buffer, 4, NEXT, 2), (buffer, 4, NEXT, 3), (buffer, 4, 0, 0)]
    )
    driver.write_desc(0, buffer, 4, NEXT, 1)
    driver.write_desc(1, table, 64, INDIRECT, 0)
    driver.make_available(0)
    expect_broken(device, "longer than the queue size")


def test_indirect_without_the_feature(ram: GuestRam, memory: GuestMemory) -> None:
    driver = DriverQueue(ram, 16)
    device = driver.device_queue(memory, indirect=False)
    driver.post([b"a"], [1], indirect=True)
    expect_broken(device, "not negotiated")


@pytest.mark.parametrize(
    ("length", "message"),
    [
        (0, "positive multiple of 16"),
        (24, "positive multiple of 16"),
        (17 * 16, "longer than the queue size"),
    ],
)
def test_bad_indirect_table_length(ram: GuestRam, memory: GuestMemory, length: int, message: str) -> None:
    driver, device = make_pair(ram, memory)
    table = ram.alloc(17 * 16, 16)
    driver.write_indirect_table(table, [(driver.alloc_buffer(4), 4, 0, 0)] * 17)
    driver.write_desc(0, table, length, INDIRECT, 0)
    driver.make_available(0)
    expect_broken(device, message)


def test_nested_indirect(ram: GuestRam, memory: GuestMemory) -> None:
    driver, device = make_pair(ram, memory)
    inner = ram.alloc(16, 16)
    driver.write_indirect_table(inner, [(driver.alloc_buffer(4), 4, 0, 0)])
    outer = ram.alloc(16, 16)
    driver.write_indirect_table(outer, [(inner, 16, INDIRECT, 0)])
    driver.write_desc(0, outer, 16, INDIRECT, 0)
    driver.make_available(0)
    expect_broken(device, "inside an indirect table")


def test_indirect_with_next(ram: GuestRam, memory: GuestMemory) -> None:
    driver, device = make_pair(ram, memory)
    table = ram.alloc(16, 16)
    driver.write_indirect_table(table, [(driver.alloc_buffer(4), 4, 0, 0)])
    driver.write_desc(0, table, 16, INDIRECT | NEXT, 1)
    driver.write_desc(1, driver.alloc_buffer(4), 4, 0, 0)
    driver.make_available(0)
    expect_broken(device, "both INDIRECT and NEXT")


@pytest.mark.parametrize("where", ["outside", "past-the-end", "front-end-address"])
def test_indirect_table_outside_memory(ram: GuestRam, memory: GuestMemory, where: str) -> None:
    driver, device = make_pair(ram, memory)
    address = {
        "outside": GPA_BASE + RAM_SIZE + 4096,
        "past-the-end": GPA_BASE + RAM_SIZE - 32,
        "front-end-address": ram.gpa_to_uva(ram.alloc(64, 16)),
    }[where]
    driver.write_desc(0, address, 64, INDIRECT, 0)
    driver.make_available(0)
    expect_broken(device, "indirect table")


def test_loop_inside_an_indirect_table(ram: GuestRam, memory: GuestMemory) -> None:
    driver, device = make_pair(ram, memory)
    buffer = driver.alloc_buffer(4)
    table = ram.alloc(48, 16)
    driver.write_indirect_table(table, [(buffer, 4, NEXT, 1), (buffer, 4, NEXT, 2), (buffer, 4, NEXT, 0)])
    driver.write_desc(0, table, 48, INDIRECT, 0)
    driver.make_available(0)
    expect_broken(device, "loops")


def test_next_outside_an_indirect_table(ram: GuestRam, memory: GuestMemory) -> None:
    driver, device = make_pair(ram, memory)
    table = ram.alloc(32, 16)
    driver.write_indirect_table(
        table, [(driver.alloc_buffer(4), 4, NEXT, 2), (driver.alloc_buffer(4), 4, 0, 0)]
    )
    driver.write_desc(0, table, 32, INDIRECT, 0)
    driver.make_available(0)
    expect_broken(device, "outside its table of 2")


@pytest.mark.parametrize("where", ["outside", "crossing-the-end", "front-end-address", "wrapping"])
def test_buffer_outside_memory(ram: GuestRam, memory: GuestMemory, where: str) -> None:
    driver, device = make_pair(ram, memory)
    address, length = {
        "outside": (GPA_BASE - 4096, 16),
        "crossing-the-end": (GPA_BASE + RAM_SIZE - 8, 16),
        "front-end-address": (ram.gpa_to_uva(driver.alloc_buffer(16)), 16),
        "wrapping": ((1 << 64) - 8, 16),
    }[where]
    driver.write_desc(0, address, length, 0, 0)
    driver.make_available(0)
    expect_broken(device, "not in guest memory|bad guest-physical range")


def test_buffer_outside_memory_in_an_indirect_table(ram: GuestRam, memory: GuestMemory) -> None:
    driver, device = make_pair(ram, memory)
    table = ram.alloc(16, 16)
    driver.write_indirect_table(table, [(GPA_BASE + RAM_SIZE, 4, 0, 0)])
    driver.write_desc(0, table, 16, INDIRECT, 0)
    driver.make_available(0)
    expect_broken(device, "indirect descriptor 0")


def test_zero_length_buffer(ram: GuestRam, memory: GuestMemory) -> None:
    driver, device = make_pair(ram, memory)
    driver.write_desc(0, driver.alloc_buffer(4), 4, NEXT, 1)
    driver.write_desc(1, driver.alloc_buffer(4), 0, WRITE, 0)
    driver.make_available(0)
    expect_broken(device, "zero-length")


def test_zero_length_buffer_in_an_indirect_table(ram: GuestRam, memory: GuestMemory) -> None:
    driver, device = make_pair(ram, memory)
    table = ram.alloc(16, 16)
    driver.write_indirect_table(table, [(driver.alloc_buffer(4), 0, 0, 0)])
    driver.write_desc(0, table, 16, INDIRECT, 0)
    driver.make_available(0)
    expect_broken(device, "zero-length")


def test_readable_after_writable(ram: GuestRam, memory: GuestMemory) -> None:
    driver, device = make_pair(ram, memory)
    driver.write_desc(0, driver.alloc_buffer(4), 4, WRITE | NEXT, 1)
    driver.write_desc(1, driver.alloc_buffer(4), 4, 0, 0)
    driver.make_available(0)
    expect_broken(device, "after a writable one")


def test_readable_after_writable_across_the_indirect_boundary(ram: GuestRam, memory: GuestMemory) -> None:
    driver, device = make_pair(ram, memory)
    table = ram.alloc(16, 16)
    driver.write_indirect_table(table, [(driver.alloc_buffer(4), 4, 0, 0)])
    driver.write_desc(0, driver.alloc_buffer(4), 4, WRITE | NEXT, 1)
    driver.write_desc(1, table, 16, INDIRECT, 0)
    driver.make_available(0)
    expect_broken(device, "after a writable one")


def test_total_length_beyond_4_gib() -> None:
    # 2.5 GiB of sparse memfd: two descriptors over the same 2.5 GiB add up to more than 2**32 bytes.
    big = 5 << 29
    with GuestRam(big, gpa_base=GPA_BASE) as ram:
        memory = ram.guest_memory()
        try:
            driver, device = make_pair(ram, memory)
            driver.write_desc(0, GPA_BASE + (1 << 20), big - (2 << 20), NEXT, 1)
            driver.write_desc(1, GPA_BASE + (1 << 20), big - (2 << 20), WRITE, 0)
            driver.make_available(0)
            expect_broken(device, "2\\^32")
        finally:
            memory.close()


def test_driver_side_catches_a_device_returning_nonsense(ram: GuestRam, memory: GuestMemory) -> None:
    driver, _ = make_pair(ram, memory)
    driver.post([b"a"], [1])
    ram.view(driver.used_gpa + 4, 8).view("<u4")[:] = (9, 0)  # a used entry for a head never posted
    ram.view(driver.used_gpa + 2, 2).view("<u2")[0] = 1
    with pytest.raises(DriverQueueError, match="not outstanding"):
        driver.used()


def test_a_new_queue_asks_for_kicks_whatever_was_left_in_the_ring(ram: GuestRam, memory: GuestMemory) -> None:
    driver = DriverQueue(ram, 16, start_index=40)
    ram.view(driver.used_gpa, 2)[:] = (VIRTQ_USED_F_NO_NOTIFY, 0)  # a previous back-end was polling
    driver.device_queue(memory)
    assert driver.used_flags == 0
    event_driver = DriverQueue(ram, 16, event_idx=True, start_index=40)
    event_driver.device_queue(memory)
    assert event_driver.avail_event == 40
    event_driver.post([b"a"], [1])
    assert event_driver.needs_kick()


def test_driver_queue_refuses_to_overfill_the_ring(ram: GuestRam, memory: GuestMemory) -> None:
    driver, device = make_pair(ram, memory, size=4)
    driver.post([b"a", b"b"], [1])  # three of the four descriptors
    with pytest.raises(DriverQueueError, match="queue full"):
        driver.post([b"c"], [1])
    driver.post([b"c", b"d"], [1, 1], indirect=True)  # an indirect chain takes one descriptor
    with pytest.raises(DriverQueueError, match="queue full"):
        driver.post([b"e"], [1], indirect=True)
    while (chain := device.pop()) is not None:
        device.push_used(chain.head, 1)
    assert len(driver.used()) == 2
    assert driver.outstanding == 0
    driver.post([b"a"], [1, 1, 1])  # everything came back
    with pytest.raises(DriverQueueError, match="longer than the queue size"):
        driver.post([b"a"] * 5, [], indirect=True)


def test_driver_side_catches_a_device_overstating_the_length(ram: GuestRam, memory: GuestMemory) -> None:
    driver, _ = make_pair(ram, memory)
    head = driver.post([b"a"], [2])
    ram.view(driver.used_gpa + 4, 8).view("<u4")[:] = (head, 3)
    ram.view(driver.used_gpa + 2, 2).view("<u2")[0] = 1
    with pytest.raises(DriverQueueError, match="writable size"):
        driver.used()


# --- random drivers -----------------------------------------------------------------------------------------

FUZZ_QUEUE_SIZE = 8
FUZZ_TABLE_ENTRIES = 10

# Biased towards well-formed pieces, so that valid chains, and chains broken in one place only, are common.
addresses = st.one_of(
    st.integers(GPA_BASE, GPA_BASE + RAM_SIZE - 1),  # in memory (the rings live there too)
    st.integers(GPA_BASE, GPA_BASE + 4096),
    st.sampled_from([0, GPA_BASE - 1, GPA_BASE + RAM_SIZE, GPA_BASE + RAM_SIZE - 8, (1 << 64) - 16]),
    st.integers(0, (1 << 64) - 1),
)
lengths = st.one_of(st.integers(1, 64), st.sampled_from([0, 16, 32, 48, 160, 1 << 31, (1 << 32) - 1]))
flag_sets = st.sampled_from([0, 0, 0, 1, 1, 1, 1, 2, 2, 3, 3, 3, 4, 5, 6, 7])
descriptors = st.tuples(addresses, lengths, flag_sets, st.integers(0, FUZZ_TABLE_ENTRIES))


@settings(max_examples=150, deadline=None)
@given(
    table=st.lists(descriptors, min_size=FUZZ_QUEUE_SIZE, max_size=FUZZ_QUEUE_SIZE),
    indirect_table=st.lists(descriptors, min_size=FUZZ_TABLE_ENTRIES, max_size=FUZZ_TABLE_ENTRIES),
    pointer_to_table=st.lists(st.booleans(), min_size=FUZZ_QUEUE_SIZE, max_size=FUZZ_QUEUE_SIZE),
    heads=st.lists(st.integers(0, FUZZ_QUEUE_SIZE + 1), min_size=1, max_size=FUZZ_QUEUE_SIZE),
    published=st.one_of(st.none(), st.integers(0, 0xFFFF)),
    event_idx=st.booleans(),
)
def test_any_driver_input_gives_a_valid_chain_none_or_queue_error(
    table: list[tuple[int, int, int, int]],
    indirect_table: list[tuple[int, int, int, int]],
    pointer_to_table: list[bool],
    heads: list[int],
    published: int | None,
    event_idx: bool,
) -> None:
    with GuestRam(RAM_SIZE, gpa_base=GPA_BASE) as ram:
        memory = ram.guest_memory()
        try:
            driver, device = make_pair(ram, memory, size=FUZZ_QUEUE_SIZE, event_idx=event_idx)
            table_gpa = ram.alloc(FUZZ_TABLE_ENTRIES * 16, 16)
            driver.write_indirect_table(table_gpa, indirect_table)
            for index, (address, length, flags, next_index) in enumerate(table):
                if pointer_to_table[index]:  # sometimes aim at the (equally random) indirect table
                    address = table_gpa + 16 * (next_index % 3)
                driver.write_desc(index, address, length, flags, next_index)
            for head in heads:
                driver.make_available(head, publish=False)
            driver.set_avail_idx(len(heads) if published is None else published)
            for _ in range(FUZZ_QUEUE_SIZE + 1):
                try:
                    chain = device.pop()
                except QueueError:
                    break
                if chain is None:
                    break
                # Whatever came out is inside guest memory and adds up.
                region = memory.regions[0].data
                for segment in chain.readable + chain.writable:
                    assert len(segment) > 0 and np.shares_memory(segment, region)
                assert chain.readable_len == sum(len(s) for s in chain.readable)
                assert chain.writable_len == sum(len(s) for s in chain.writable)
                assert chain.readable_len + chain.writable_len <= 1 << 32
                assert 0 <= chain.head < FUZZ_QUEUE_SIZE
                device.push_used(chain.head, 0)
        finally:
            memory.close()


@pytest.mark.parametrize("module", [driver_queue_module, guest_ram_module])
def test_the_harness_examples_in_the_docs_run(module: ModuleType) -> None:
    doc = module.__doc__ or ""
    example = textwrap.dedent(doc.split("::\n", 1)[1])
    assert "with GuestRam(" in example
    exec(compile(example, f"{module.__name__} docstring", "exec"), dict(vars(module)))

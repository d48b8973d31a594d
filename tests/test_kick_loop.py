"""The kick loop kernel (``vhost_iommu.jit.kickloop.kick_loop``) called directly, on real eventfds, memfd
guest RAM and a driver-side ring: what it serves, when it notifies (EVENT_IDX and NO_INTERRUPT), what it
returns for, and how it treats fds that fail.

Each call here runs with ``K_PARK = PARK_SETTLED``: the loop serves what the kicks announced, notifies,
looks once more without blocking and returns LOOP_SETTLED, so a test calls it like a function. The
thread around it (parking, hand-overs, fd swaps) is tested through the server in test_kick_thread.py.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pytest

from vhost_iommu.control.instrument import Histogram
from vhost_iommu.device.layout import Status, encode_attach, encode_map, encode_probe, encode_unmap
from vhost_iommu.harness.driver_queue import DriverQueue
from vhost_iommu.harness.guest_ram import GuestRam
from vhost_iommu.jit import kickloop
from vhost_iommu.jit import requests as kernel
from vhost_iommu.memory import GuestMemory
from vhost_iommu.virtio_iommu import VIRTIO_RING_F_EVENT_IDX, CompiledRequestPath, VirtioIommuBackend
from vhost_iommu.virtqueue import VIRTQ_AVAIL_F_NO_INTERRUPT, VIRTQ_DESC_F_NEXT, QueueError, SplitQueue

EP = 0x20
PAGE = 0x1000

pytestmark = pytest.mark.usefixtures("fd_leak_check")


def eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def count(fd: int) -> int:
    """What an eventfd counted since it was last read (0 if nothing)."""
    try:
        return int.from_bytes(os.read(fd, 8), sys.byteorder)
    except BlockingIOError:
        return 0


@dataclass
class Loop:
    """One requestq and the kick loop's inputs, the way ``KickThread`` prepares them."""

    driver: DriverQueue
    ring: SplitQueue
    compiled: CompiledRequestPath
    memory: GuestMemory
    control: npt.NDArray[np.int64]
    kick_fd: int
    call_fd: int
    timing: npt.NDArray[np.int64]

    def kick(self) -> None:
        os.write(self.kick_fd, (1).to_bytes(8, sys.byteorder))

    def run(self) -> int:
        """One call of the loop (it returns once settled), on the SplitQueue's own ring-state record."""
        ring = self.ring
        arguments = self.compiled.kernel_arguments(ring, self.memory, ring.size)
        reason = int(kickloop.kick_loop(self.control, self.timing, self.compiled.counts, *arguments))
        self.compiled.finish_call(ring, reason)
        self.compiled.merge_counts()
        return reason

    def request(self, data: bytes) -> int:
        return self.driver.post([data], [4])


@pytest.fixture(params=[True, False], ids=["event-idx", "no-event-idx"])
def event_idx(request: pytest.FixtureRequest) -> bool:
    with_event_idx: bool = request.param
    return with_event_idx


@contextmanager
def loop_on(event_idx: bool) -> Iterator[Loop]:
    """A ring with domain 1 attached, and the loop's control words (inside a test's own frame, so that
    every view of guest memory is gone, and its fds closed, when the test ends)."""
    with ExitStack() as stack, GuestRam(1 << 20) as ram:
        memory = ram.guest_memory()
        stack.callback(memory.close)
        backend = VirtioIommuBackend()
        features = backend.device_features()
        backend.set_features(features if event_idx else features & ~VIRTIO_RING_F_EVENT_IDX)
        driver = DriverQueue(ram, 64, event_idx=event_idx)
        fds = [eventfd() for _ in range(3)]
        for fd in fds:
            stack.callback(os.close, fd)
        kick_fd, wake_fd, call_fd = fds
        control = np.zeros(kickloop.CONTROL_WORDS, np.int64)
        control[kickloop.K_KICK_FD] = kick_fd
        control[kickloop.K_WAKE_FD] = wake_fd
        control[kickloop.K_CALL_FD] = call_fd
        control[kickloop.K_SERVE] = 1
        control[kickloop.K_PARK] = kickloop.PARK_SETTLED
        assert backend.device.handle_request(encode_attach(1, EP), 4) == (bytes(4), 4)
        yield Loop(
            driver,
            driver.device_queue(memory),
            CompiledRequestPath(backend.device),
            memory,
            control,
            kick_fd,
            call_fd,
            np.zeros((kickloop.TIMING_ROWS, kickloop.TIMING_COLUMNS), np.int64),
        )


def test_a_kick_is_read_served_and_notified(event_idx: bool) -> None:
    with loop_on(event_idx) as loop:
        heads = [loop.request(encode_map(1, page * PAGE, page * PAGE + PAGE - 1, 0)) for page in range(10)]
        heads.append(loop.request(encode_unmap(1, 0, 4 * PAGE - 1)))
        loop.kick()
        assert loop.run() == kickloop.LOOP_SETTLED
        assert loop.driver.used() == [(head, 4) for head in heads]
        assert all(loop.driver.written(head)[0] == Status.OK for head in heads)
        assert loop.compiled.device.mappings(1) == [
            (page * PAGE, page * PAGE + PAGE - 1, 0, 3) for page in range(4, 10)
        ]
        assert loop.compiled.device.request_counters()["MAP"] == 10
        assert count(loop.call_fd) == 1  # one notification for the batch: the first decision is always yes
        assert loop.control[kickloop.K_KICKS] == 1
        assert loop.control[kickloop.K_NOTIFIED] == 1
        # Nothing announced, nothing pending: the loop settles at once, serves nothing and notifies nothing.
        assert loop.run() == kickloop.LOOP_SETTLED
        assert count(loop.call_fd) == 0


def test_notifications_follow_used_event_and_no_interrupt(event_idx: bool) -> None:
    with loop_on(event_idx) as loop:
        driver = loop.driver
        driver.auto_used_event = False  # used_event is this test's to set

        def one(page: int) -> int:
            loop.request(encode_map(1, page * PAGE, page * PAGE + PAGE - 1, 0))
            loop.kick()
            assert loop.run() == kickloop.LOOP_SETTLED
            driver.used()
            return count(loop.call_fd)

        assert one(0) == 1  # the first decision of a ring: always
        if driver.event_idx:
            driver.used_event = driver.used_idx + 5  # interrupt me once used.idx passes index 6
            assert [one(page) for page in range(1, 7)] == [0, 0, 0, 0, 0, 1]
            driver.used_event = driver.used_idx  # the next one
            assert one(7) == 1
            # Two chains in one batch crossing used_event notify once; a batch before it not at all.
            driver.used_event = driver.used_idx + 1
            for page in (8, 9):
                loop.request(encode_map(1, page * PAGE, page * PAGE + PAGE - 1, 0))
            loop.kick()
            assert loop.run() == kickloop.LOOP_SETTLED
            assert count(loop.call_fd) == 1
            driver.used_event = driver.used_idx + 100
            assert one(10) == 0
            # EVENT_IDX negotiated: the NO_INTERRUPT flag is not the rule any more.
            driver.avail_flags = VIRTQ_AVAIL_F_NO_INTERRUPT
            driver.used_event = driver.used_idx
            assert one(11) == 1
        else:
            driver.avail_flags = VIRTQ_AVAIL_F_NO_INTERRUPT
            assert [one(page) for page in range(1, 4)] == [0, 0, 0]
            driver.avail_flags = 0
            assert one(4) == 1
        assert loop.control[kickloop.K_NOTIFIED] == loop.control[kickloop.K_KICKS] - (
            6 if driver.event_idx else 3
        )


def test_a_chain_it_does_not_serve_is_left_for_python(event_idx: bool) -> None:
    with loop_on(event_idx) as loop:
        first = loop.request(encode_map(1, 0, PAGE - 1, 0))
        loop.request(encode_probe(EP))  # PROBE: the device core's
        loop.request(encode_map(1, PAGE, 2 * PAGE - 1, 0))
        loop.kick()
        assert loop.run() == kernel.STOP_PYTHON
        assert loop.driver.used() == [(first, 4)]
        assert loop.ring.next_avail == 1  # the PROBE is still available
        # The notification is left to whoever serves the rest: decided once, when the ring is empty.
        assert count(loop.call_fd) == 0 and loop.ring.pushed_since_check == 1


def test_batches_are_timed_per_type_as_the_control_layer_times_them(event_idx: bool) -> None:
    with loop_on(event_idx) as loop:
        timing = loop.timing
        loop.request(encode_map(1, 0, PAGE - 1, 0))
        loop.kick()
        loop.run()
        assert not timing.any()  # K_TICKS_PER_MS 0: not timed
        loop.control[kickloop.K_TICKS_PER_MS] = 1_000_000  # any rate: the test looks at counts and order
        for page in range(1, 4):
            loop.request(encode_map(1, page * PAGE, page * PAGE + PAGE - 1, 0))
        loop.kick()
        loop.run()
        # Rows by request counter slot (RequestType values: MAP 3, UNMAP 4), then MIXED and whole batches.
        map_row, unmap_row, batches = timing[3], timing[4], timing[kickloop.T_BATCHES]
        assert batches[kickloop.T_COUNT] == 1 and map_row[kickloop.T_COUNT] == 3
        assert map_row[: kickloop.TIMING_BUCKETS].sum() == 3 and batches[: kickloop.TIMING_BUCKETS].sum() == 1
        assert 0 < map_row[kickloop.T_MIN_NS] <= map_row[kickloop.T_MAX_NS]
        assert map_row[kickloop.T_TOTAL_NS] <= batches[kickloop.T_TOTAL_NS]  # the mean, times three
        # Two types in one batch: MIXED; an empty serve (nothing announced) is no batch.
        loop.request(encode_map(1, 8 * PAGE, 9 * PAGE - 1, 0))
        loop.request(encode_unmap(1, 0, PAGE - 1))
        loop.kick()
        loop.run()
        loop.run()
        assert timing[kickloop.T_MIXED, kickloop.T_COUNT] == 2 and batches[kickloop.T_COUNT] == 2
        assert (
            unmap_row[kickloop.T_COUNT] == 0 and timing[: kickloop.TIMING_KINDS, kickloop.T_COUNT].sum() == 3
        )
        # What the kernel served before a chain it hands over is a batch of its own.
        loop.request(encode_unmap(1, 8 * PAGE, 9 * PAGE - 1))
        loop.request(encode_probe(EP))
        loop.kick()
        assert loop.run() == kernel.STOP_PYTHON
        assert unmap_row[kickloop.T_COUNT] == 1 and batches[kickloop.T_COUNT] == 3


def test_the_control_layers_histogram_absorbs_the_kernels_rows() -> None:
    samples = [(0, 1), (1, 1), (3, 2), (1500, 1), (1 << 41, 1), (999, 4)]
    expected = Histogram()
    timing = np.zeros((kickloop.TIMING_ROWS, kickloop.TIMING_COLUMNS), np.int64)
    for ns, served in samples:
        expected.add(ns, served)
        before = np.zeros(kickloop.TIMING_KINDS, np.int64)
        after = before.copy()
        after[2] = served  # DETACH
        kickloop.record_batch(timing, ns * served, before, after)
    absorbed = Histogram()
    absorbed.absorb(timing[2])
    assert absorbed == expected
    absorbed.absorb(timing[2])  # a second hand-over adds to it
    expected.buckets = [2 * count for count in expected.buckets]
    expected.count *= 2
    expected.total_ns *= 2
    assert absorbed == expected
    assert absorbed.summary()["count"] == 2 * sum(served for _ns, served in samples)


def test_a_broken_chain_stops_the_loop_without_consuming_it(event_idx: bool) -> None:
    with loop_on(event_idx) as loop:
        buffer = loop.driver.alloc_buffer(encode_map(1, 0, PAGE - 1, 0)[:4])  # a MAP: the kernel's to walk
        loop.driver.write_desc(0, buffer, 4, VIRTQ_DESC_F_NEXT, 0)  # a descriptor chained to itself
        loop.driver.make_available(0)
        loop.kick()
        assert loop.run() == kernel.STOP_BROKEN
        assert loop.ring.next_avail == 0 and loop.driver.used_idx == 0
        assert count(loop.call_fd) == 0


def test_a_chain_of_another_type_is_left_to_the_python_walk_after_its_first_byte(event_idx: bool) -> None:
    """The kernel stops walking an ATTACH as soon as its type is read: a loop further down its chain is
    not the kernel's to find (SplitQueue.pop walks the chain, once, and refuses it)."""
    with loop_on(event_idx) as loop:
        attach = loop.driver.alloc_buffer(encode_attach(1, EP + 1))
        loop.driver.write_desc(0, attach, len(encode_attach(1, EP + 1)), VIRTQ_DESC_F_NEXT, 1)
        loop.driver.write_desc(1, attach, 4, VIRTQ_DESC_F_NEXT, 1)  # chained to itself
        loop.driver.make_available(0)
        loop.kick()
        assert loop.run() == kernel.STOP_PYTHON
        assert loop.ring.next_avail == 0 and loop.driver.used_idx == 0
        with pytest.raises(QueueError, match="loops"):
            loop.ring.pop()


def test_park_now_returns_at_the_first_batch_boundary_and_not_serving_only_waits(event_idx: bool) -> None:
    with loop_on(event_idx) as loop:
        head = loop.request(encode_map(1, 0, PAGE - 1, 0))
        loop.control[kickloop.K_PARK] = kickloop.PARK_NOW
        assert loop.run() == kickloop.LOOP_PARKED  # served what was there, then parked without blocking
        assert loop.driver.used() == [(head, 4)]
        loop.control[kickloop.K_PARK] = kickloop.PARK_NO
        loop.control[kickloop.K_SERVE] = 0
        loop.request(encode_map(1, PAGE, 2 * PAGE - 1, 0))
        loop.kick()
        assert loop.run() == kickloop.LOOP_KICKED  # read the kick, touched nothing
        assert loop.driver.used() == [] and loop.ring.next_avail == 1
        assert loop.control[kickloop.K_KICKS] == 1


def test_a_kick_fd_at_end_of_file_is_reported_and_then_ignored(event_idx: bool) -> None:
    with loop_on(event_idx) as loop:
        read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        os.close(write_end)
        try:
            loop.control[kickloop.K_KICK_FD] = read_end
            assert loop.run() == kickloop.LOOP_KICK_FAILED
            assert loop.control[kickloop.K_ERRNO] == 0  # end of file
            loop.control[kickloop.K_KICK_FD] = -1  # what the thread does: poll(2) skips a negative fd
            assert loop.run() == kickloop.LOOP_SETTLED
        finally:
            os.close(read_end)


def test_a_call_fd_that_cannot_be_written_is_reported(event_idx: bool) -> None:
    with loop_on(event_idx) as loop:
        read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            loop.control[kickloop.K_CALL_FD] = read_end  # not writable: EBADF
            head = loop.request(encode_map(1, 0, PAGE - 1, 0))
            loop.kick()
            assert loop.run() == kickloop.LOOP_CALL_FAILED
            assert loop.control[kickloop.K_ERRNO] == 9  # EBADF
            assert loop.driver.used() == [(head, 4)]  # served all the same
            # No call fd at all: the notification is dropped, nothing fails.
            loop.control[kickloop.K_CALL_FD] = -1
            loop.request(encode_map(1, PAGE, 2 * PAGE - 1, 0))
            loop.driver.used_event = loop.driver.used_idx
            loop.kick()
            assert loop.run() == kickloop.LOOP_SETTLED
            assert loop.control[kickloop.K_NOTIFIED] == 0
        finally:
            os.close(read_end)
            os.close(write_end)


def test_a_full_call_eventfd_is_not_an_error(event_idx: bool) -> None:
    with loop_on(event_idx) as loop:
        os.write(loop.call_fd, (0xFFFF_FFFF_FFFF_FFFE).to_bytes(8, sys.byteorder))  # the most it holds
        loop.request(encode_map(1, 0, PAGE - 1, 0))
        loop.kick()
        assert loop.run() == kickloop.LOOP_SETTLED  # EAGAIN: a notification is pending anyway
        assert count(loop.call_fd) == 0xFFFF_FFFF_FFFF_FFFE


def test_a_window_that_just_missed_the_guest_s_next_request_grows_to_catch_the_one_after() -> None:
    """The learned window (the default thread's): a request that comes a little after the window ended
    grows the next window to cover that gap, so the next request after the same gap is caught without a
    kick; one that comes after more than the limit halves it. The gaps are the guest's idle time, the
    subject of the test (each answer is waited for by its used entry)."""
    ticks_per_ms = kernel.ticks_per_us() * 1000
    with loop_on(event_idx=True) as loop:
        control = loop.control
        control[kickloop.K_POLL_TICKS] = int(0.05 * ticks_per_ms)
        control[kickloop.K_POLL_LIMIT_TICKS] = int(200 * ticks_per_ms)
        control[kickloop.K_PARK] = kickloop.PARK_NO
        reasons: list[int] = []
        thread = threading.Thread(target=lambda: reasons.append(loop.run()))
        thread.start()
        try:

            def answered(head: int) -> None:
                deadline = time.monotonic() + 10
                while not (used := loop.driver.used()):
                    assert time.monotonic() < deadline, "no answer"
                assert used == [(head, 4)]

            def window_ms() -> float:
                return float(control[kickloop.K_POLL_WINDOW_TICKS]) / ticks_per_ms

            answered_head = loop.request(encode_map(1, 0, PAGE - 1, 0))
            loop.kick()
            answered(answered_head)
            time.sleep(0.02)  # the window (50 us) misses the next request by about 20 ms
            head = loop.request(encode_map(1, PAGE, 2 * PAGE - 1, 0))
            loop.kick()
            answered(head)
            assert 20 <= window_ms() <= 200
            hits = control[kickloop.K_POLL_HITS]
            time.sleep(0.005)  # inside the learned window: no kick needed
            head = loop.request(encode_map(1, 2 * PAGE, 3 * PAGE - 1, 0))
            answered(head)
            assert control[kickloop.K_POLL_HITS] == hits + 1
            learned = window_ms()
            time.sleep(0.3)  # beyond the limit: a far miss
            head = loop.request(encode_map(1, 3 * PAGE, 4 * PAGE - 1, 0))
            loop.kick()
            answered(head)
            assert window_ms() == pytest.approx(learned / 2, rel=0.01)
        finally:
            control[kickloop.K_PARK] = kickloop.PARK_NOW
            os.write(int(control[kickloop.K_WAKE_FD]), (1).to_bytes(8, sys.byteorder))
            thread.join()
        assert reasons == [kickloop.LOOP_PARKED]
        assert control[kickloop.K_POLL_EXTRA_TICKS] > 0  # what the learned windows cost is counted


def test_a_fixed_window_never_grows() -> None:
    ticks_per_ms = kernel.ticks_per_us() * 1000
    with loop_on(event_idx=True) as loop:
        control = loop.control
        control[kickloop.K_POLL_TICKS] = control[kickloop.K_POLL_LIMIT_TICKS] = int(0.05 * ticks_per_ms)
        control[kickloop.K_PARK] = kickloop.PARK_NO
        reasons: list[int] = []
        thread = threading.Thread(target=lambda: reasons.append(loop.run()))
        thread.start()
        try:
            for page in range(3):
                head = loop.request(encode_map(1, page * PAGE, page * PAGE + PAGE - 1, 0))
                loop.kick()
                deadline = time.monotonic() + 10
                while not loop.driver.used():
                    assert time.monotonic() < deadline, "no answer"
                time.sleep(0.005)
                assert control[kickloop.K_POLL_WINDOW_TICKS] == control[kickloop.K_POLL_TICKS], head
        finally:
            control[kickloop.K_PARK] = kickloop.PARK_NOW
            os.write(int(control[kickloop.K_WAKE_FD]), (1).to_bytes(8, sys.byteorder))
            thread.join()
        assert reasons == [kickloop.LOOP_PARKED]
        assert control[kickloop.K_POLL_EXTRA_TICKS] == 0

"""The compiled request path against the Python one: the same rings and requests give the same guest
memory, the same device state, the same counters and the same NEEDS_RESET decisions.

Each case runs twice on fresh guest RAM (allocations are deterministic, so both runs lay the rings and
buffers out identically): once with ``request_path="python"``, once with ``"compiled"``; the whole RAM is
then compared byte for byte (statuses, used entries, avail_event) along with the device's state.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from types import FrameType
from typing import Literal, TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vhost_iommu.device import IommuDevice
from vhost_iommu.device.layout import (
    ATTACH_F_BYPASS,
    F_MMIO,
    MAP_F_MMIO,
    MAP_F_READ,
    MAP_F_WRITE,
    RequestType,
    Status,
    encode_attach,
    encode_detach,
    encode_map,
    encode_probe,
    encode_unmap,
)
from vhost_iommu.device.observers import DeviceObserver
from vhost_iommu.harness.driver_queue import DriverQueue
from vhost_iommu.harness.guest_ram import GuestRam
from vhost_iommu.jit import requests as kernel
from vhost_iommu.memory import GuestMemory, MemoryRegionDesc
from vhost_iommu.virtio_iommu import VIRTIO_RING_F_INDIRECT_DESC, VirtioIommuBackend
from vhost_iommu.virtqueue import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, SplitQueue

GPA_BASE = 0x1_0000_0000
RAM_SIZE = 4 << 20
NEXT, WRITE, INDIRECT = VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT
EP = 0x20  # an endpoint of the default topology
PAGE = 0x1000
MSI = 0xFEE0_0000
Path = Literal["python", "compiled"]


@pytest.fixture(autouse=True)
def watchdog() -> Iterator[None]:
    """Turn a spinning kernel into a test failure instead of a hung test run."""

    def expire(signum: int, frame: FrameType | None) -> None:
        raise TimeoutError("the test did not finish in 60 s: something spins")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


class Context:
    """The server's side of the seam, reduced to what the back-end asks of it."""

    session_key: str | None = None  # served without a keeper

    def __init__(self, memory: GuestMemory, queues: list[SplitQueue]) -> None:
        self.memory = memory
        self.queues = queues
        self.broken: str | None = None
        self.signals = [0, 0]
        #: reschedule calls not yet answered with queue_kicked (the test plays the event loop).
        self.rescheduled = [0, 0]

    def queue(self, index: int) -> SplitQueue | None:
        return None if self.broken is not None else self.queues[index]

    def signal_used(self, index: int) -> None:
        self.signals[index] += 1

    def reschedule(self, index: int) -> None:
        self.rescheduled[index] += 1

    def config_changed(self) -> None:
        pass

    def offer_kick_fds(self) -> None:
        pass

    def device_broken(self, reason: str) -> None:
        self.broken = reason


@dataclass
class Rig:
    ram: GuestRam
    driver: DriverQueue
    backend: VirtioIommuBackend
    context: Context
    #: With the kick thread: the event loop (run by a thread of the test), the kick and call eventfds.
    loop: asyncio.AbstractEventLoop | None = None
    kick_fd: int | None = None
    call_fd: int | None = None

    def kick(self) -> None:
        if self.kick_fd is None:
            self.backend.queue_kicked(0)
            return
        # What the driver does, and then what the server would do: nothing but wait.
        os.write(self.kick_fd, (1).to_bytes(8, sys.byteorder))
        thread = self.backend._kick_thread
        assert thread is not None
        assert thread.settle(timeout=30)

    def on_loop(self, function: Callable[[], T]) -> T:
        if self.loop is None:
            return function()

        async def call() -> T:
            return function()

        return asyncio.run_coroutine_threadsafe(call(), self.loop).result(30)

    def take_kick_fd(self) -> None:
        """What the handler does when the ring is served (and again after a memory change)."""
        if self.kick_fd is not None:
            kick_fd, call_fd = self.kick_fd, self.call_fd
            assert self.on_loop(lambda: self.backend.takes_kick_fd(0, kick_fd, call_fd))

    def release_kick_fd(self) -> None:
        if self.kick_fd is not None:
            self.on_loop(lambda: self.backend.release_kick_fd(0))
            self.count_thread_signals()

    def count_thread_signals(self) -> None:
        """Add the notifications the thread wrote to the call eventfd to the context's count."""
        if self.call_fd is not None:
            with contextlib.suppress(BlockingIOError):
                self.context.signals[0] += int.from_bytes(os.read(self.call_fd, 8), sys.byteorder)

    def post(self, request: bytes, writable: int = 4, *, indirect: bool = False) -> int:
        return self.driver.post([request], [writable], indirect=indirect)


Scenario = Callable[[Rig], None]
T = TypeVar("T")


@contextmanager
def event_loop_thread() -> Iterator[asyncio.AbstractEventLoop]:
    """An event loop run by a thread: the kick thread hands chains back to it."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="test loop")
    thread.start()
    try:
        yield loop
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()


def run(
    scenario: Scenario,
    path: Path,
    *,
    size: int = 64,
    event_idx: bool = True,
    features: int | None = None,
    device: Callable[[], IommuDevice] | None = None,
    split_memory: bool = False,
    poll_us: float = 0,
    kick_thread: bool = False,
) -> tuple[object, ...]:
    """Run ``scenario`` on fresh RAM through ``path``; what a driver and a tool could observe.

    With ``kick_thread`` the requestq is served by the back-end's thread, woken by an eventfd the rig
    writes for each kick, with an event loop on another thread to hand chains back to."""
    with ExitStack() as stack, GuestRam(RAM_SIZE, gpa_base=GPA_BASE) as ram:
        if split_memory:
            # The same memfd as two regions adjacent in gpa space (buffers may cross between them).
            half = RAM_SIZE // 2
            memory = GuestMemory()
            memory.add_region(MemoryRegionDesc(GPA_BASE, half, ram.gpa_to_uva(GPA_BASE), 0), ram.dup_fd())
            memory.add_region(
                MemoryRegionDesc(GPA_BASE + half, half, ram.gpa_to_uva(GPA_BASE + half), half), ram.dup_fd()
            )
        else:
            memory = ram.guest_memory()
        try:
            requests = DriverQueue(ram, size, event_idx=event_idx)
            events = DriverQueue(ram, 8, event_idx=event_idx)
            backend = VirtioIommuBackend(
                device=device() if device else None,
                request_path=path,
                poll_us=poll_us if path == "compiled" else 0,
                kick_thread=kick_thread,
            )
            offered = backend.device_features()
            backend.set_features(offered if features is None else features)
            queues = [q.device_queue(memory, indirect=backend.indirect_desc) for q in (requests, events)]
            context = Context(memory, queues)
            backend.attach(context)
            rig = Rig(ram, requests, backend, context)
            if kick_thread:
                rig.loop = stack.enter_context(event_loop_thread())
                rig.kick_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
                stack.callback(os.close, rig.kick_fd)
                rig.call_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
                stack.callback(os.close, rig.call_fd)
                stack.callback(rig.release_kick_fd)  # before the loop stops (callbacks run last first)
                rig.take_kick_fd()
            scenario(rig)
            rig.release_kick_fd()
            dev = backend.device
            state = (
                hashlib.sha256(ram.read(GPA_BASE, RAM_SIZE)).hexdigest(),
                context.broken is not None,
                tuple(context.signals),
                queues[0].next_avail,
                queues[0].used_idx,
                dev.request_counters(),
                dev.status_counters(),
                [(d.domain, d.bypass, d.endpoints, d.mapping_count) for d in dev.domains()],
                {d.domain: dev.mappings(d.domain) for d in dev.domains()},
                dev.store.count(),
            )
            return state
        finally:
            memory.close()


def same(scenario: Scenario, *, kick_thread: bool = True, **options: object) -> tuple[object, ...]:
    """The scenario through the Python path, the compiled path and (unless told not to) the compiled
    path served by the kick thread: all three must agree."""
    python = run(scenario, "python", **options)  # type: ignore[arg-type]
    compiled = run(scenario, "compiled", **options)  # type: ignore[arg-type]
    assert compiled == python
    if kick_thread:
        threaded = run(scenario, "compiled", kick_thread=True, **options)  # type: ignore[arg-type]
        assert threaded == python
    return compiled


# -- well-formed MAP/UNMAP traffic and every status ---------------------------------------------------------


def attach(rig: Rig, domain: int = 1, endpoint: int = EP, flags: int = 0) -> None:
    rig.post(encode_attach(domain, endpoint, flags))
    rig.kick()


def test_map_and_unmap_statuses_match() -> None:
    def scenario(rig: Rig) -> None:
        attach(rig, 1)
        attach(rig, 7, EP + 1, ATTACH_F_BYPASS)
        for request in [
            encode_map(1, 0, PAGE - 1, 0x10_0000),  # OK
            encode_map(1, 0, PAGE - 1, 0x20_0000),  # overlap -> INVAL
            encode_map(1, PAGE, 2 * PAGE - 1, 0x10_0001),  # phys unaligned -> RANGE
            encode_map(1, PAGE + 1, 2 * PAGE - 1, 0),  # start unaligned -> RANGE
            encode_map(1, PAGE, 2 * PAGE - 2, 0),  # end unaligned -> RANGE
            encode_map(1, 2 * PAGE, PAGE, 0),  # end < start -> INVAL
            encode_map(1, 1 << 48, (1 << 48) + PAGE - 1, 0),  # beyond the input range -> RANGE
            encode_map(1, PAGE, 2 * PAGE - 1, (1 << 64) - PAGE),  # phys wraps -> RANGE
            encode_map(1, MSI, MSI + PAGE - 1, 0),  # reserved MSI window -> RANGE
            encode_map(1, PAGE, 2 * PAGE - 1, 0, flags=8),  # unknown flag -> INVAL
            encode_map(1, PAGE, 2 * PAGE - 1, 0, flags=MAP_F_MMIO),  # MMIO (offered) -> OK
            encode_map(2, 0, PAGE - 1, 0),  # no such domain -> NOENT
            encode_map(0xFFFF_FFFF, 0, PAGE - 1, 0),  # beyond the domain range? (or NOENT)
            encode_map(7, 0, PAGE - 1, 0),  # bypass domain -> INVAL
            encode_map(1, 4 * PAGE, 8 * PAGE - 1, 0x40_0000, MAP_F_READ),  # OK, 4 pages
            encode_unmap(1, 5 * PAGE, 6 * PAGE - 1),  # splits a mapping -> RANGE
            encode_unmap(1, 0, PAGE - 1, reserved=b"\x01\0\0\0"),  # reserved -> INVAL
            encode_unmap(7, 0, PAGE - 1),  # bypass -> INVAL
            encode_unmap(9, 0, PAGE - 1),  # NOENT
            encode_unmap(1, PAGE, 0),  # end < start -> INVAL
            encode_unmap(1, 0, (1 << 64) - 1),  # everything -> OK, 3 removed
            encode_unmap(1, 0, PAGE - 1),  # nothing there -> OK
            encode_map(1, 0, PAGE - 1, 0, MAP_F_READ | MAP_F_WRITE, head_reserved=b"\xff\xff\xff"),
            encode_map(1, 0, PAGE - 1, 0)[:-1],  # one byte short -> IOERR
            encode_unmap(1, 0, PAGE - 1) + b"\0",  # one byte long -> IOERR
        ]:
            rig.post(request)
        rig.kick()

    state = same(scenario)
    assert not state[1]


def test_tail_rules_match() -> None:
    def scenario(rig: Rig) -> None:
        attach(rig, 1)
        rig.post(encode_map(1, 0, PAGE - 1, 0), writable=8)  # tail not found: used length 0
        rig.post(encode_unmap(1, 0, PAGE - 1), writable=2)
        rig.driver.post([encode_map(1, PAGE, 2 * PAGE - 1, 0)], [1, 3])  # tail over two buffers
        rig.driver.post([encode_map(1, 2 * PAGE, 3 * PAGE - 1, 0)], [2, 1, 1])
        # the request over three readable buffers, then indirect
        request = encode_map(1, 3 * PAGE, 4 * PAGE - 1, 0)
        rig.driver.post([request[:1], request[1:20], request[20:]], [4])
        rig.post(encode_map(1, 4 * PAGE, 5 * PAGE - 1, 0), indirect=True)
        rig.driver.post([request[:10], request[10:]], [4], indirect=True)
        rig.driver.post([b"\x03\0"], [4])  # 2 readable bytes: no head
        rig.kick()

    same(scenario)


def test_requests_the_kernel_leaves_to_python_interleave() -> None:
    def scenario(rig: Rig) -> None:
        rig.post(encode_attach(3, EP))
        rig.post(encode_map(3, 0, PAGE - 1, 0))
        rig.post(encode_probe(EP), writable=512 + 4)
        rig.post(encode_map(3, PAGE, 2 * PAGE - 1, 0))
        rig.post(bytes([99]) + bytes(20))  # unknown type
        rig.post(encode_detach(3, EP))
        rig.post(encode_map(3, 2 * PAGE, 3 * PAGE - 1, 0))  # the domain is gone -> NOENT
        rig.post(encode_attach(4, EP + 2))
        rig.post(encode_unmap(4, 0, PAGE - 1))
        rig.kick()

    same(scenario)


def test_without_map_unmap_or_mmio_negotiated() -> None:
    def scenario(rig: Rig) -> None:
        attach(rig, 1)
        rig.post(encode_map(1, 0, PAGE - 1, 0, MAP_F_MMIO))
        rig.post(encode_unmap(1, 0, PAGE - 1))
        rig.kick()

    backend = VirtioIommuBackend()
    everything = backend.device_features()
    same(scenario, features=everything & ~F_MMIO)
    same(scenario, features=everything & ~(1 << 2))  # no MAP_UNMAP: UNSUPP


def test_mapping_limit_answers_nomem() -> None:
    def scenario(rig: Rig) -> None:
        attach(rig, 1)
        for page in range(12):
            rig.post(encode_map(1, page * PAGE, page * PAGE + PAGE - 1, 0))
        rig.kick()

    state = same(scenario, device=lambda: IommuDevice(max_mappings=10))
    assert state[6]["NOMEM"] == 2  # type: ignore[index]


def test_table_growth_in_the_middle_of_a_batch() -> None:
    def scenario(rig: Rig) -> None:
        attach(rig, 1)
        rig.driver.used()
        for round_ in range(8):
            for page in range(250):
                iova = (round_ * 250 + page) * 2 * PAGE  # every other page: no merging
                rig.post(encode_map(1, iova, iova + PAGE - 1, iova), indirect=True)
            rig.kick()
            rig.driver.used()
        rig.post(encode_unmap(1, 0, (1 << 48) - 1))
        rig.kick()

    state = same(scenario, size=256)
    assert state[6]["OK"] == 2001 + 1  # type: ignore[index]


def test_without_event_idx_and_with_buffers_across_regions() -> None:
    def scenario(rig: Rig) -> None:
        attach(rig, 1)
        half = GPA_BASE + RAM_SIZE // 2
        request = encode_map(1, 0, PAGE - 1, 0)
        rig.ram.write(half - 7, request)
        rig.ram.write(half + 29, bytes(4))
        rig.driver.write_desc(40, half - 7, len(request), NEXT, 41)
        rig.driver.write_desc(41, half + 29, 4, WRITE, 0)  # writable right after, across the boundary
        rig.driver.make_available(40)
        rig.driver.write_desc(42, half - 2, 4, WRITE, 0)  # a tail split over the two regions
        rig.driver.write_desc(43, half - 40, 28, NEXT, 42)
        rig.ram.write(half - 40, encode_unmap(1, 0, PAGE - 1))
        rig.driver.make_available(43)
        rig.kick()

    same(scenario, event_idx=False, split_memory=True)


def _shrink_memory_to_the_first_half(rig: Rig) -> None:
    """A new memory table (SET_MEM_TABLE) without the RAM's second half; the rings stay in the first."""
    memory = rig.context.memory
    half = RAM_SIZE // 2
    assert rig.driver.used_gpa < GPA_BASE + half
    rig.release_kick_fd()  # as the handler does around a memory change
    memory.replace([(MemoryRegionDesc(GPA_BASE, half, rig.ram.gpa_to_uva(GPA_BASE), 0), rig.ram.dup_fd())])
    for queue in rig.context.queues:
        queue.rebind(memory)
    rig.take_kick_fd()


def test_a_new_memory_table_is_followed() -> None:
    def scenario(rig: Rig) -> None:
        attach(rig, 1)
        rig.post(encode_map(1, 0, PAGE - 1, 0))
        rig.kick()
        _shrink_memory_to_the_first_half(rig)
        rig.post(encode_map(1, PAGE, 2 * PAGE - 1, 0))  # buffers from the allocator: in the first half
        rig.kick()
        # A buffer in the half that is no longer guest memory: the device must not touch it.
        far = GPA_BASE + RAM_SIZE - 64
        rig.ram.write(far, encode_unmap(1, 0, PAGE - 1))
        rig.driver.write_desc(50, far, 28, NEXT, 51)
        rig.driver.write_desc(51, _buffer(rig), 4, WRITE, 0)
        rig.driver.make_available(50)
        rig.kick()

    state = same(scenario)
    assert state[1], "a buffer outside the new memory table breaks the device"
    assert state[6]["OK"] == 3  # type: ignore[index]  # ATTACH and the two MAPs


def test_injected_answers_go_through_the_device_core() -> None:
    def scenario(rig: Rig) -> None:
        attach(rig, 1)
        with rig.backend.quiesced():  # what a tool changing the device does (the kick thread re-checks)
            rig.backend.device.inject(RequestType.MAP, Status.DEVERR)
        rig.post(encode_map(1, 0, PAGE - 1, 0))
        rig.post(encode_map(1, PAGE, 2 * PAGE - 1, 0))
        rig.kick()

    same(scenario)


def test_the_kernel_serves_map_and_unmap_itself() -> None:
    stops: list[list[int]] = []

    def scenario(rig: Rig) -> None:
        attach(rig, 1)
        compiled = rig.backend._compiled
        if compiled is not None:
            compiled.stops = [0] * len(compiled.stops)
        for page in range(20):
            rig.post(encode_map(1, page * PAGE, page * PAGE + PAGE - 1, 0))
        rig.post(encode_unmap(1, 0, 20 * PAGE - 1))
        rig.kick()
        if compiled is not None:
            stops.append(compiled.stops)

    assert run(scenario, "compiled") == run(scenario, "python")
    assert stops == [[1] + [0] * (len(kernel.STOP_NAMES) - 1)]  # one kernel call, which emptied the ring


def test_an_observer_sees_every_request() -> None:
    # Tools (the control layer's traces and checks) attach an observer to the device; the compiled path
    # then leaves every request to the device core, so the observer misses none.
    seen: list[int] = []

    class Watching(DeviceObserver):
        def request(self, request: bytes | memoryview, writable_size: int) -> None:
            seen.append(request[0])

    def scenario(rig: Rig) -> None:
        rig.backend.device.observers.append(Watching())
        attach(rig, 1)
        rig.post(encode_map(1, 0, PAGE - 1, 0))
        rig.post(encode_unmap(1, 0, PAGE - 1))
        rig.kick()

    same(scenario)
    assert seen == [1, 3, 4] * 3  # Python path, compiled path, kick thread


# -- hostile rings: the same NEEDS_RESET, the good chains before the bad one served -----------------------


def _good_then(bad: Callable[[Rig], None]) -> Scenario:
    def scenario(rig: Rig) -> None:
        attach(rig, 1)
        rig.post(encode_map(1, 0, PAGE - 1, 0))
        if bad is _avail_too_far:
            bad(rig)  # a later publish would overwrite the index
        else:
            bad(rig)
            rig.post(encode_map(1, PAGE, 2 * PAGE - 1, 0))  # after the bad chain: never served
        rig.kick()

    return scenario


def _buffer(rig: Rig, data: bytes | int = 4) -> int:
    return rig.driver.alloc_buffer(data)


def _table(rig: Rig, entries: list[tuple[int, int, int, int]]) -> int:
    gpa = rig.ram.alloc(max(len(entries), 1) * 16, 16)
    rig.driver.write_indirect_table(gpa, entries)
    return gpa


def _head_out_of_range(rig: Rig) -> None:
    rig.driver.make_available(64)


def _avail_too_far(rig: Rig) -> None:
    # The device has served up to the ATTACH; 65 more entries than that is one more than the ring holds.
    rig.driver.set_avail_idx(rig.driver.avail_idx + 64)


def _next_out_of_range(rig: Rig) -> None:
    rig.driver.write_desc(60, _buffer(rig), 4, NEXT, 64)
    rig.driver.make_available(60)


def _self_loop(rig: Rig) -> None:
    rig.driver.write_desc(60, _buffer(rig), 4, NEXT, 60)
    rig.driver.make_available(60)


def _zero_length(rig: Rig) -> None:
    rig.driver.write_desc(60, _buffer(rig, encode_map(1, 0, PAGE - 1, 0)), 36, NEXT, 61)
    rig.driver.write_desc(61, _buffer(rig), 0, WRITE, 0)
    rig.driver.make_available(60)


def _readable_after_writable(rig: Rig) -> None:
    rig.driver.write_desc(60, _buffer(rig), 4, WRITE | NEXT, 61)
    rig.driver.write_desc(61, _buffer(rig, encode_map(1, 0, PAGE - 1, 0)), 36, 0, 0)
    rig.driver.make_available(60)


def _outside_memory(where: int, length: int = 16) -> Callable[[Rig], None]:
    def bad(rig: Rig) -> None:
        rig.driver.write_desc(60, where, length, 0, 0)
        rig.driver.make_available(60)

    return bad


def _nested_indirect(rig: Rig) -> None:
    inner = _table(rig, [(_buffer(rig), 4, 0, 0)])
    outer = _table(rig, [(inner, 16, INDIRECT, 0)])
    rig.driver.write_desc(60, outer, 16, INDIRECT, 0)
    rig.driver.make_available(60)


def _indirect_with_next(rig: Rig) -> None:
    table = _table(rig, [(_buffer(rig), 4, 0, 0)])
    rig.driver.write_desc(60, table, 16, INDIRECT | NEXT, 61)
    rig.driver.write_desc(61, _buffer(rig), 4, WRITE, 0)
    rig.driver.make_available(60)


def _indirect_length(length: int) -> Callable[[Rig], None]:
    def bad(rig: Rig) -> None:
        table = _table(rig, [(_buffer(rig), 4, 0, 0)] * 65)
        rig.driver.write_desc(60, table, length, INDIRECT, 0)
        rig.driver.make_available(60)

    return bad


def _indirect_outside(rig: Rig) -> None:
    rig.driver.write_desc(60, GPA_BASE + RAM_SIZE - 32, 64, INDIRECT, 0)
    rig.driver.make_available(60)


def _loop_in_indirect(rig: Rig) -> None:
    buffer = _buffer(rig)
    table = _table(rig, [(buffer, 4, NEXT, 1), (buffer, 4, NEXT, 2), (buffer, 4, NEXT, 0)])
    rig.driver.write_desc(60, table, 48, INDIRECT, 0)
    rig.driver.make_available(60)


def _next_outside_indirect(rig: Rig) -> None:
    table = _table(rig, [(_buffer(rig), 4, NEXT, 2), (_buffer(rig), 4, 0, 0)])
    rig.driver.write_desc(60, table, 32, INDIRECT, 0)
    rig.driver.make_available(60)


def _chain_longer_than_queue(rig: Rig) -> None:
    buffer = _buffer(rig)
    table = _table(rig, [(buffer, 4, NEXT, i + 1) for i in range(63)] + [(buffer, 4, 0, 0)])
    rig.driver.write_desc(59, buffer, 4, NEXT, 60)
    rig.driver.write_desc(60, table, 64 * 16, INDIRECT, 0)
    rig.driver.make_available(59)


HOSTILE: dict[str, Callable[[Rig], None]] = {
    "head out of range": _head_out_of_range,
    "avail index too far ahead": _avail_too_far,
    "next out of range": _next_out_of_range,
    "self loop": _self_loop,
    "zero-length buffer": _zero_length,
    "readable after writable": _readable_after_writable,
    "buffer below memory": _outside_memory(GPA_BASE - 4096),
    "buffer across the end": _outside_memory(GPA_BASE + RAM_SIZE - 8),
    "buffer wrapping 2**64": _outside_memory((1 << 64) - 8),
    "nested indirect": _nested_indirect,
    "indirect with next": _indirect_with_next,
    "indirect length 0": _indirect_length(0),
    "indirect length 24": _indirect_length(24),
    "indirect longer than the queue": _indirect_length(65 * 16),
    "indirect table outside memory": _indirect_outside,
    "loop in an indirect table": _loop_in_indirect,
    "next outside an indirect table": _next_outside_indirect,
    "direct plus indirect longer than the queue": _chain_longer_than_queue,
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_rings_break_the_device_the_same_way(case: str) -> None:
    state = same(_good_then(HOSTILE[case]))
    assert state[1], "the device should need a reset"


def test_indirect_without_the_feature_breaks_the_device() -> None:
    def bad(rig: Rig) -> None:
        rig.post(encode_map(1, PAGE, 2 * PAGE - 1, 0), indirect=True)

    everything = VirtioIommuBackend().device_features()
    state = same(_good_then(bad), features=everything & ~VIRTIO_RING_F_INDIRECT_DESC)
    assert state[1]


def test_the_kernel_stops_at_a_broken_chain_without_consuming_it() -> None:
    with GuestRam(RAM_SIZE, gpa_base=GPA_BASE) as ram:
        memory = ram.guest_memory()
        try:
            driver = DriverQueue(ram, 16, event_idx=True)
            backend = VirtioIommuBackend()
            backend.set_features(backend.device_features())
            ring = driver.device_queue(memory)
            context = Context(memory, [ring, ring])
            backend.attach(context)
            driver.post([encode_unmap(1, 0, PAGE - 1)], [4])
            driver.make_available(16)
            backend.queue_kicked(0)
            assert context.broken is not None and "holds head 16" in context.broken
            assert ring.next_avail == 1 and ring.used_idx == 1  # the good one was served, nothing more
            assert backend._compiled is not None
            assert backend._compiled.stops[kernel.STOP_BROKEN] == 1
        finally:
            memory.close()


# -- random request streams ----------------------------------------------------------------------------------

_domains = st.sampled_from([1, 2, 5])
_pages = st.integers(0, 12)
U64_MAX = (1 << 64) - 1
_edges = st.one_of(
    st.builds(lambda page: page * PAGE, _pages),
    st.sampled_from([1, PAGE + 1, MSI, MSI - PAGE, 1 << 48, (1 << 48) - PAGE, U64_MAX - PAGE + 1]),
)
_request = st.one_of(
    st.builds(
        lambda d, p, n, phys, flags: encode_map(d, p * PAGE, (p + n) * PAGE - 1, phys * PAGE, flags),
        _domains,
        _pages,
        st.integers(1, 4),
        st.integers(0, 8),
        st.sampled_from([MAP_F_READ, MAP_F_WRITE, MAP_F_READ | MAP_F_WRITE, MAP_F_MMIO, 0, 9]),
    ),
    st.builds(
        lambda d, p, n: encode_unmap(d, p * PAGE, (p + n) * PAGE - 1), _domains, _pages, st.integers(1, 6)
    ),
    st.builds(lambda d, e: encode_attach(d, EP + e), _domains, st.integers(0, 2)),
    st.builds(lambda d, e: encode_detach(d, EP + e), _domains, st.integers(0, 2)),
    # Every rule of jit/rules.RULES within reach: bypass domains, a domain outside the range, unaligned
    # or reserved or out-of-range addresses, a wrapping phys, an UNMAP with its reserved word set.
    st.builds(lambda d, e: encode_attach(d, EP + e, ATTACH_F_BYPASS), _domains, st.integers(0, 2)),
    st.builds(
        lambda d, v, n, p, flags: encode_map(d, v, min(v + n - 1, U64_MAX), p, flags),
        st.sampled_from([1, 2, 5, 0]),
        _edges,
        st.sampled_from([PAGE, 2 * PAGE, PAGE - 1, 1]),
        _edges,
        st.sampled_from([MAP_F_READ | MAP_F_WRITE, MAP_F_MMIO, 8]),
    ),
    st.builds(
        lambda d, p, n, reserved: encode_unmap(d, p * PAGE, (p + n) * PAGE - 1, reserved=reserved),
        _domains,
        _pages,
        st.integers(1, 6),
        st.sampled_from([b"\0\0\0\1", b"\xff\xff\xff\xff"]),
    ),
)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(_request, min_size=1, max_size=20), min_size=1, max_size=4))
def test_random_request_streams_match(batches: list[list[bytes]]) -> None:
    def scenario(rig: Rig) -> None:
        for batch in batches:
            for request in batch:
                rig.post(request)
            rig.kick()
            rig.driver.used()

    same(scenario)


def test_polling_catches_a_request_posted_during_the_poll_without_a_kick() -> None:
    with GuestRam(RAM_SIZE, gpa_base=GPA_BASE) as ram:
        memory = ram.guest_memory()
        try:
            driver = DriverQueue(ram, 16, event_idx=True)
            backend = VirtioIommuBackend(poll_us=10_000)
            backend.set_features(backend.device_features())
            ring = driver.device_queue(memory)
            context = Context(memory, [ring, ring])
            backend.attach(context)
            driver.post([encode_attach(1, EP)], [4])
            backend.queue_kicked(0)
            driver.used()
            driver.post([encode_map(1, 0, PAGE - 1, 0)], [4])
            assert driver.needs_kick()
            kicks_wanted: list[bool] = []

            def second_request() -> None:
                # The kernel announces its poll by setting avail_event one behind the next index (no kicks
                # wanted); post the next request only then, as a driver would between two requests.
                while driver.avail_event != 1:
                    pass
                driver.post([encode_unmap(1, 0, PAGE - 1)], [4])
                kicks_wanted.append(driver.needs_kick())

            poster = threading.Thread(target=second_request)
            poster.start()
            backend.queue_kicked(0)  # one kick, two requests
            poster.join()
            assert kicks_wanted == [False]
            assert ring.used_idx == 3
            assert [driver.written(head)[0] for head, _ in driver.used()] == [Status.OK, Status.OK]
            assert driver.avail_event == 3  # kicks asked for again once the poll ended
        finally:
            memory.close()


def test_polling_gives_the_same_answers() -> None:
    def scenario(rig: Rig) -> None:
        attach(rig, 1)
        for page in range(10):
            rig.post(encode_map(1, page * PAGE, page * PAGE + PAGE - 1, 0))
        rig.kick()

    assert run(scenario, "compiled", poll_us=50) == run(scenario, "python")
    with pytest.raises(ValueError, match="poll_us"):
        VirtioIommuBackend(poll_us=-1)


def test_compiled_is_the_default_and_python_stays_available() -> None:
    assert VirtioIommuBackend().request_path == "compiled"
    assert VirtioIommuBackend(request_path="python")._compiled is None
    with pytest.raises(ValueError, match="neither"):
        VirtioIommuBackend(request_path="fast")  # type: ignore[arg-type]


# -- fairness: one call serves at most a ring's worth --------------------------------------------------------


def test_a_driver_that_reposts_at_once_gets_a_ring_per_call_then_a_reschedule() -> None:
    rounds = 3

    def scenario(rig: Rig) -> None:
        # The driver answers every completion with a new request straight away (from inside the device's
        # serve, the fastest a driver could be), for three rings' worth: without a bound, one kick would
        # serve all four rings in one call.
        reposts = 0
        serve_one = rig.backend._serve_one

        def serve_and_repost(ring: SplitQueue) -> bool:
            nonlocal reposts
            served = serve_one(ring)
            if served and reposts < rounds * rig.driver.size:
                rig.driver.used()
                rig.post(encode_attach(1, EP), indirect=True)  # one descriptor each: a full ring fits
                reposts += 1
            return served

        rig.backend._serve_one = serve_and_repost  # type: ignore[method-assign]
        for _ in range(rig.driver.size):
            rig.post(encode_attach(1, EP), indirect=True)
        calls = 1
        rig.kick()
        # The test plays the event loop: each reschedule is answered with another call.
        while rig.context.rescheduled[0]:
            rig.context.rescheduled[0] -= 1
            assert rig.context.queues[0].next_avail == calls * rig.driver.size
            calls += 1
            rig.backend.queue_kicked(0)
        assert calls == rounds + 1
        assert rig.context.queues[0].next_avail == (rounds + 1) * rig.driver.size

    same(scenario, kick_thread=False)  # the bound is the loop's: the thread has the ring to itself


def test_the_kernel_stops_at_its_budget_without_consuming_the_next_chain() -> None:
    def scenario(rig: Rig) -> None:
        attach(rig, 1)
        for i in range(5):
            rig.post(encode_map(1, i * PAGE, i * PAGE + PAGE - 1, 0x10_0000))
        compiled = rig.backend._compiled
        assert compiled is not None
        ring = rig.context.queues[0]
        serve_one = rig.backend._serve_one
        assert compiled.serve(ring, rig.context.memory, serve_one, 3) == (3, True)
        assert compiled.stops[kernel.STOP_BUDGET] == 1
        assert ring.next_avail == 4  # the ATTACH and three MAPs
        assert compiled.serve(ring, rig.context.memory, serve_one, 3) == (2, False)
        assert compiled.serve(ring, rig.context.memory, serve_one, 3) == (0, False)
        assert len(rig.backend.device.mappings(1)) == 5

    run(scenario, "compiled")

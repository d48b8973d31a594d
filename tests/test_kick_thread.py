"""The requestq served from the back-end's own thread (``VirtioIommuBackend(kick_thread=True)``), through
the real server: the thread takes the kick fd while the ring is served and is gone (joined, its fd
closed) whenever the ring, the memory, the notifiers or the device change, and at disconnect."""

from __future__ import annotations

import asyncio
import errno
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from vhost_iommu import thread_priority
from vhost_iommu.abi import VIRTIO_CONFIG_S_NEEDS_RESET
from vhost_iommu.backend import VhostUserBackend
from vhost_iommu.device.layout import RequestType, Status, encode_attach, encode_map, encode_unmap
from vhost_iommu.device.observers import DeviceObserver
from vhost_iommu.harness.background import RunningServer, running_server
from vhost_iommu.harness.driver_queue import DriverQueue
from vhost_iommu.harness.guest_ram import GuestRam
from vhost_iommu.harness.iommu_driver import IommuDriver
from vhost_iommu.jit import requests as kernel
from vhost_iommu.jit.tables import MappingTable
from vhost_iommu.kick_thread import KickThread
from vhost_iommu.memory import GuestMemory
from vhost_iommu.thread_priority import (
    BUSY_TO_RAISE,
    DEFAULT_PRIORITY,
    IdleSampler,
    LoadGovernor,
    ThreadPriority,
    cpu_times,
)
from vhost_iommu.virtio_iommu import THREAD_POLL_US, VirtioIommuBackend, poll_windows
from vhost_iommu.virtqueue import VIRTQ_DESC_F_NEXT, SplitQueue

EP = 0x20
PAGE = 0x1000
THREAD_NAME = "virtio-iommu requestq"


def kick_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == THREAD_NAME]


@pytest.fixture(autouse=True)
def no_thread_left() -> Iterator[None]:
    assert not kick_threads()
    yield
    assert not kick_threads(), "a kick thread outlived its server"


pytestmark = pytest.mark.usefixtures("fd_leak_check")


@pytest.fixture
def backend_factory() -> Callable[[], VhostUserBackend]:
    return lambda: VirtioIommuBackend(kick_thread=True)


def backend_of(server: RunningServer) -> VirtioIommuBackend:
    backend = server.backends[-1]
    assert isinstance(backend, VirtioIommuBackend)
    return backend


def taken(server: RunningServer) -> bool:
    """Whether the back-end's thread serves the requestq now (asked on the server's loop)."""
    backend = backend_of(server)
    return server.call(lambda: backend._kick_thread is not None)


def map_page(page: int) -> bytes:
    return encode_map(1, page * PAGE, page * PAGE + PAGE - 1, 0)


def test_the_thread_serves_the_requestq_and_the_kernel_runs_there(
    vhost_server: RunningServer, iommu_driver: IommuDriver
) -> None:
    assert taken(vhost_server)
    assert len(kick_threads()) == 1
    assert iommu_driver.attach(1, EP) == Status.OK  # handed to the loop
    for page in range(8):
        assert iommu_driver.status(map_page(page)) == Status.OK
    # A batch mixing what the thread serves and what it hands over, in one kick.
    queue, frontend = iommu_driver.requests, iommu_driver.frontend
    heads = [
        queue.post([encode_unmap(1, 0, PAGE - 1)], [4]),
        queue.post([encode_attach(2, EP + 1)], [4]),
        queue.post([encode_map(2, 0, PAGE - 1, 0)], [4]),
    ]
    frontend.kick(0)
    assert [head for head, _length in iommu_driver.harvest(len(heads))] == heads
    assert [queue.written(head)[0] for head in heads] == [0, 0, 0]
    compiled = backend_of(vhost_server)._compiled
    assert compiled is not None
    assert vhost_server.call(lambda: compiled.stops[kernel.STOP_PYTHON]) >= 2
    device = backend_of(vhost_server).device
    assert vhost_server.call(lambda: len(device.mappings(1))) == 7
    assert vhost_server.call(lambda: len(device.mappings(2))) == 1


def test_an_attach_is_handed_over_once_and_the_thread_grows_the_table_itself(
    vhost_server: RunningServer, iommu_driver: IommuDriver
) -> None:
    """The kernel stops at an ATTACH once, and the event loop's path pops it straight away (the chain's
    one full walk) rather than calling the kernel on it again. A table filled past several growths is
    grown by the thread, with no hand-over."""
    mappings = 2000
    backend = backend_of(vhost_server)
    compiled = backend._compiled
    assert compiled is not None
    store = backend.device.store
    assert isinstance(store, MappingTable)
    leaves_before = vhost_server.call(lambda: store.arrays.leaves.shape[0])
    assert iommu_driver.attach(1, EP) == Status.OK  # the one hand-over
    assert vhost_server.call(lambda: compiled.stops[kernel.STOP_PYTHON]) == 1
    statuses: list[Status] = []
    for first in range(0, mappings, 30):  # a chain takes two of the 64 descriptors
        pages = range(first, min(first + 30, mappings))
        # Every other page: no merging, a new row each.
        statuses += iommu_driver.statuses(
            [encode_map(1, 2 * p * PAGE, 2 * p * PAGE + PAGE - 1, 0) for p in pages]
        )
    assert statuses == [Status.OK] * mappings
    assert vhost_server.call(lambda: store.count(1)) == mappings
    assert vhost_server.call(lambda: store.arrays.leaves.shape[0]) > leaves_before
    assert vhost_server.call(lambda: compiled.stops[kernel.STOP_GROW]) >= 3
    counters = vhost_server.call(backend.kick_thread_counters)
    assert counters is not None and counters["handovers"] == 1


def test_a_pause_joins_the_thread_and_a_resume_starts_another(
    vhost_server: RunningServer, attached_driver: IommuDriver
) -> None:
    driver = attached_driver
    assert driver.status(map_page(0)) == Status.OK
    for _ in range(3):
        bases = driver.frontend.stop_device(2, reset_status=False)
        assert bases[0] == driver.requests.used_idx
        assert not kick_threads()
        assert not taken(vhost_server)
        driver.restart(bases)
        assert taken(vhost_server)
        assert driver.status(map_page(1)) == Status.OK
        assert driver.status(encode_unmap(1, PAGE, 2 * PAGE - 1)) == Status.OK
    device = backend_of(vhost_server).device
    assert vhost_server.call(lambda: device.domain_of(EP)) == 1


def test_disable_reset_and_reset_device_take_the_fd_back(
    vhost_server: RunningServer, iommu_driver: IommuDriver
) -> None:
    frontend, queue = iommu_driver.frontend, iommu_driver.requests
    frontend.set_vring_enable(0, False)
    assert not taken(vhost_server) and not kick_threads()
    # A kick while disabled is held by the server and delivered on enable.
    head = queue.post([encode_attach(1, EP)], [4])
    frontend.kick(0)
    frontend.set_vring_enable(0, True)
    assert taken(vhost_server)
    assert frontend.wait_used(0, timeout=30)
    assert queue.used() == [(head, 4)]
    frontend.reset_device()
    assert not taken(vhost_server) and not kick_threads()
    fresh = [
        DriverQueue(iommu_driver.ram, 64, event_idx=True),
        DriverQueue(iommu_driver.ram, 64, event_idx=True),
    ]
    frontend.start_rings(
        iommu_driver.ram, fresh, driver_features=frontend.get_features() & ~(1 << 30), use_mem_slots=False
    )
    iommu_driver.queues[:] = fresh
    assert taken(vhost_server)
    assert iommu_driver.attach(1, EP) == Status.OK


def test_a_memory_change_restarts_the_thread_and_a_call_fd_change_keeps_it(
    vhost_server: RunningServer, attached_driver: IommuDriver
) -> None:
    driver, frontend = attached_driver, attached_driver.frontend
    with GuestRam(1 << 20, gpa_base=1 << 30) as more:
        threads_before = kick_threads()
        frontend.add_mem_reg(more)
        assert taken(vhost_server)
        assert kick_threads() != threads_before  # the old thread was joined, a new one serves
        assert driver.status(map_page(0)) == Status.OK
        frontend.rem_mem_reg(more)
        assert driver.status(map_page(1)) == Status.OK
        # A new call fd: the thread keeps serving (its loop is parked while the fd word is swapped) and
        # signals the next answers on the new fd only.
        threads_before = kick_threads()
        old_call = frontend.call_fds.pop(0)
        frontend.set_vring_call(0)
        assert frontend.call_fds[0] != old_call
        assert taken(vhost_server) and kick_threads() == threads_before
        assert driver.status(encode_unmap(1, 0, 2 * PAGE - 1)) == Status.OK
        assert driver.status(map_page(0)) == Status.OK
        with pytest.raises(BlockingIOError):
            os.read(old_call, 8)  # nothing was written to the old fd after the swap
        os.close(old_call)


def test_a_broken_ring_stops_the_thread_and_needs_reset(
    vhost_server: RunningServer, iommu_driver: IommuDriver
) -> None:
    queue, frontend = iommu_driver.requests, iommu_driver.frontend
    buffer = queue.alloc_buffer(b"loop")
    queue.write_desc(0, buffer, 4, VIRTQ_DESC_F_NEXT, 0)  # a descriptor chained to itself
    queue.make_available(0)
    frontend.kick(0)
    assert frontend.wait_error(0, timeout=30)
    assert frontend.get_status() & VIRTIO_CONFIG_S_NEEDS_RESET
    assert not taken(vhost_server) and not kick_threads()


def test_a_disconnect_while_requests_flow_leaves_no_thread(vhost_server: RunningServer) -> None:
    with IommuDriver(vhost_server.connect(), event_idx=True, own_frontend=True) as driver:
        assert driver.attach(1, EP) == Status.OK
        for page in range(16):
            driver.requests.post([map_page(page)], [4])
        driver.frontend.kick(0)
        driver.frontend.close()
    vhost_server.wait_all_closed()
    assert not kick_threads()


def test_the_python_path_and_a_back_end_without_event_loop_take_no_fd() -> None:
    assert VirtioIommuBackend().kick_thread  # the default, with the compiled path
    assert not VirtioIommuBackend(request_path="python").kick_thread
    assert VirtioIommuBackend(request_path="python").takes_kick_fd(0, -1, None) is False
    with pytest.raises(ValueError, match="compiled"):
        VirtioIommuBackend(request_path="python", kick_thread=True)
    # Without a running event loop there is nothing to hand chains back to.
    assert VirtioIommuBackend(kick_thread=True).takes_kick_fd(0, -1, None) is False


class Context:
    """The server's side of the seam, as much of it as taking a kick fd needs."""

    session_key: str | None = None  # served without a keeper

    def __init__(self, memory: GuestMemory, ring: SplitQueue) -> None:
        self.memory = memory
        self.ring = ring

    def queue(self, index: int) -> SplitQueue | None:
        return self.ring if index == 0 else None

    def signal_used(self, index: int) -> None:
        pass

    def reschedule(self, index: int) -> None:
        pass

    def config_changed(self) -> None:
        pass

    def offer_kick_fds(self) -> None:
        pass

    def device_broken(self, reason: str) -> None:
        pass


def test_a_backend_whose_kicks_are_served_otherwise_keeps_the_loop() -> None:
    class AnswersKicksItself(VirtioIommuBackend):
        def queue_kicked(self, index: int) -> None:
            pass

    with GuestRam(1 << 20) as ram:
        memory = ram.guest_memory()
        kick_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            for backend, takes in [
                (VirtioIommuBackend(kick_thread=True), True),
                (AnswersKicksItself(kick_thread=True), False),
            ]:
                backend.attach(Context(memory, DriverQueue(ram, 8).device_queue(memory)))

                async def offer(backend: VirtioIommuBackend = backend) -> bool:
                    taken = backend.takes_kick_fd(0, kick_fd, None)
                    backend.release_kick_fd(0)
                    return taken

                assert asyncio.run(offer()) is takes
        finally:
            os.close(kick_fd)
            memory.close()


@pytest.fixture
def one_page_mapped(attached_driver: IommuDriver) -> IommuDriver:
    """The device started, domain 1 attached to EP and its first page mapped."""
    assert attached_driver.status(map_page(0)) == Status.OK
    return attached_driver


def test_quiesced_holds_the_thread_out_of_the_device(
    vhost_server: RunningServer, one_page_mapped: IommuDriver
) -> None:
    queue, frontend = one_page_mapped.requests, one_page_mapped.frontend
    backend = backend_of(vhost_server)
    with backend.quiesced():
        # Parked at a batch boundary with its counts merged: the device shows the thread's MAP.
        assert backend.device.request_counters()["MAP"] == 1
        head = queue.post([map_page(1)], [4])
        frontend.kick(0)
        assert not frontend.wait_used(0, timeout=0.5)  # the kick waits for the thread
        assert backend.device.mappings(1) == [(0, PAGE - 1, 0, 3)]
    assert frontend.wait_used(0, timeout=30)
    assert queue.used() == [(head, 4)]
    assert vhost_server.call(lambda: len(backend.device.mappings(1))) == 2


def test_an_observer_attached_while_the_thread_serves_sees_every_request(
    vhost_server: RunningServer, one_page_mapped: IommuDriver
) -> None:
    class Seen(DeviceObserver):
        def __init__(self) -> None:
            self.types: list[int] = []

        def request(self, request: bytes | memoryview, writable_size: int) -> None:
            self.types.append(request[0])

    driver = one_page_mapped
    backend = backend_of(vhost_server)
    seen = Seen()

    def attach() -> None:
        with backend.quiesced():  # as the control channel attaches its observers
            backend.device.observers.append(seen)

    vhost_server.call(attach)
    assert taken(vhost_server)  # the thread still runs, and hands every kick to the loop
    for page in range(1, 5):
        assert driver.status(map_page(page)) == Status.OK
    assert (
        driver.statuses([encode_unmap(1, page * PAGE, page * PAGE + PAGE - 1) for page in (1, 2)])
        == [Status.OK] * 2
    )
    assert seen.types == [RequestType.MAP] * 4 + [RequestType.UNMAP] * 2
    vhost_server.call(lambda: backend.device.observers.remove(seen))
    assert driver.status(map_page(8)) == Status.OK
    assert len(seen.types) == 6  # detached: the kernel serves again, unseen
    assert vhost_server.call(lambda: len(backend.device.mappings(1))) == 4


@contextmanager
def attached_requestq(
    poll_us: float | None, priority: ThreadPriority = DEFAULT_PRIORITY
) -> Iterator[tuple[RunningServer, IommuDriver]]:
    """A served device with the kick thread polling ``poll_us`` at ``priority``, endpoint EP attached to
    domain 1; yields the server and the driver (EVENT_IDX: kicks only when asked)."""
    with (
        running_server(
            lambda: VirtioIommuBackend(kick_thread=True, poll_us=poll_us, kick_thread_priority=priority)
        ) as server,
        IommuDriver(server.connect(), event_idx=True, own_frontend=True) as driver,
    ):
        assert driver.attach(1, EP) == Status.OK
        yield server, driver


def answer_one_asking_for_kicks(driver: IommuDriver, request: bytes) -> None:
    """Post ``request``, kick only if the device asks for it (as Linux does), and check its answer."""
    queue = driver.requests
    head = queue.post([request], [4])
    if queue.needs_kick():
        driver.frontend.kick(0)
    assert driver.frontend.wait_used(0, timeout=30), f"{request.hex()} never answered"
    assert queue.used() == [(head, 4)] and queue.written(head)[0] == Status.OK


def test_a_poll_window_catches_requests_and_asks_for_kicks_again_when_it_ends() -> None:
    """With ``poll_us`` the loop watches the ring after each answer with kicks suppressed; when the window
    ends it must ask for kicks again, or a driver that kicks only when asked (as Linux does) would wait
    forever. This driver kicks only when ``needs_kick`` says so."""
    with attached_requestq(poll_us=200) as (server, driver):
        backend = backend_of(server)
        answered = 0
        for page in range(40):
            if page % 2:
                # The window ends first on odd pages: settle() returns once the thread has served to
                # empty with nothing pending, its window over (cut short) and kicks asked for again.
                # Even pages come at once, inside the window, which must catch them as well.
                thread = backend._kick_thread
                assert thread is not None and thread.settle(timeout=30)
            answer_one_asking_for_kicks(driver, map_page(page))
            answered += 1
        counters = backend.kick_thread_counters()
        assert counters is not None and counters["kicks"] + counters["poll_hits"] >= answered
        assert counters["kicks"] >= 1  # some windows ended before the next request


def test_poll_windows_that_catch_nothing_are_skipped_for_a_while() -> None:
    """A busy host: the guest's next request comes after the window. After POLL_MISSES empty windows the
    loop serves the next batches without one (and every request is still answered: the driver kicks only
    when asked). This driver posts each request once the thread is done with the previous batch, its
    window over (or skipped) and kicks asked for again, so every window is empty whatever the load."""
    with attached_requestq(poll_us=200) as (server, driver):
        thread = backend_of(server)._kick_thread
        assert thread is not None
        before = thread.counters()
        for batch in range(1, 21):
            answer_one_asking_for_kicks(driver, map_page(batch))
            wait_until_the_thread_is_past_its_window(thread, driver.requests, before, batch)
        counters = thread.counters()
        assert counters["poll_hits"] == before["poll_hits"], counters
        # Two empty windows, then one batch without; two more, then two without...
        assert counters["poll_backoffs"] - before["poll_backoffs"] >= 2, counters
        assert counters["poll_skips"] - before["poll_skips"] >= 3, counters


def wait_until_the_thread_is_past_its_window(
    thread: KickThread, queue: DriverQueue, before: dict[str, int], batches: int
) -> None:
    """Until the thread has watched (or skipped) the window of ``batches`` batches since ``before`` and
    asked for kicks again (avail_event at avail.idx): a chain posted now cannot fall in a window."""
    deadline = time.monotonic() + 30
    while True:
        counters = thread.counters()
        ended = (
            counters["poll_windows"] + counters["poll_skips"] - before["poll_windows"] - before["poll_skips"]
        )
        if ended >= batches and queue.avail_event == queue.avail_idx:
            assert ended == batches, counters  # one window, or one skip, per batch
            return
        assert time.monotonic() < deadline, f"the thread never ended batch {batches}'s window: {counters}"
        os.sched_yield()


@pytest.mark.parametrize(
    ("priority", "policy", "nice", "scheduling"),
    [
        (ThreadPriority.REALTIME, os.SCHED_FIFO, None, "SCHED_FIFO 1"),
        (ThreadPriority.HIGH, os.SCHED_OTHER, -10, "nice -10"),
        (ThreadPriority.NORMAL, os.SCHED_OTHER, None, "normal"),
    ],
)
def test_the_kick_thread_runs_at_the_priority_asked_for_and_only_it(
    priority: ThreadPriority, policy: int, nice: int | None, scheduling: str
) -> None:
    """The priority is the thread's alone: the event loop and the rest of the process keep theirs (``nice``
    None: the process's own nice value). These tests run as root, which may take either."""
    if os.geteuid() != 0:
        pytest.skip("needs CAP_SYS_NICE for the raised priorities")
    process_nice = os.getpriority(os.PRIO_PROCESS, 0)
    with attached_requestq(poll_us=None, priority=priority) as (server, driver):
        backend = backend_of(server)
        thread = backend._kick_thread
        assert thread is not None and thread.settle(timeout=30)
        answer_one_asking_for_kicks(driver, map_page(1))
        assert backend.kick_thread_scheduling() == scheduling
        assert thread.native_id is not None
        assert os.sched_getscheduler(thread.native_id) == policy
        assert os.getpriority(os.PRIO_PROCESS, thread.native_id) == (process_nice if nice is None else nice)
        assert os.sched_getscheduler(threading.get_native_id()) == os.SCHED_OTHER
        assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == process_nice


def test_the_default_priority_follows_the_host() -> None:
    assert DEFAULT_PRIORITY is ThreadPriority.ADAPTIVE
    assert VirtioIommuBackend().kick_thread_priority is ThreadPriority.ADAPTIVE


def test_an_adaptive_kick_thread_is_governed_while_it_serves() -> None:
    """The default: the thread starts in the ordinary class and its loop's governor owns its class (SCHED_FIFO
    only while the host is busy); the scheduling says which, and the thread is let go when it stops."""
    with attached_requestq(poll_us=None, priority=ThreadPriority.ADAPTIVE) as (server, driver):
        answer_one_asking_for_kicks(driver, map_page(1))
        backend = backend_of(server)
        thread = backend._kick_thread
        assert thread is not None and thread.native_id is not None
        governor = thread._governor
        assert governor is not None
        scheduling = backend.kick_thread_scheduling()
        expected = os.SCHED_FIFO if governor.busy else os.SCHED_OTHER
        assert scheduling is not None and scheduling.startswith("adaptive, host "), scheduling
        assert os.sched_getscheduler(thread.native_id) == expected
    assert not governor._threads and governor._timer is None  # let go: nothing ticks for a gone guest


def test_a_priority_the_process_may_not_take_falls_back_to_normal_and_says_so_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An unprivileged back-end: the thread still serves, at normal priority, and the log says why once
    per process (not once per guest)."""

    def refuse(*_: object) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "sched_setscheduler", refuse)
    monkeypatch.setattr(thread_priority, "_warned", set())
    for _ in range(2):
        with attached_requestq(poll_us=None, priority=ThreadPriority.REALTIME) as (server, driver):
            answer_one_asking_for_kicks(driver, map_page(1))
            scheduling = backend_of(server).kick_thread_scheduling()
            assert scheduling == "normal (SCHED_FIFO 1 not permitted)"
    warnings = [r for r in caplog.records if "SCHED_FIFO 1 not permitted" in r.getMessage()]
    assert len(warnings) == 1 and "CAP_SYS_NICE" in warnings[0].getMessage()


def test_the_governor_raises_its_threads_while_the_host_is_busy_and_lowers_them_after() -> None:
    """Five busy looks of the last eight raise every governed thread to SCHED_FIFO; two or fewer bring them
    back to the ordinary class (hysteresis: one busy moment does not flap the threads)."""
    if os.geteuid() != 0:
        pytest.skip("needs CAP_SYS_NICE for SCHED_FIFO")
    parked = threading.Event()
    worker = threading.Thread(target=parked.wait)
    worker.start()
    looks: list[bool] = []

    async def scenario() -> None:
        governor = LoadGovernor(asyncio.get_running_loop(), sample=lambda spare: looks.pop())
        assert worker.native_id is not None
        governor.register(worker.native_id)
        for look in range(1, 6):
            looks.append(True)
            governor.tick()
            expected = os.SCHED_FIFO if look >= BUSY_TO_RAISE else os.SCHED_OTHER
            assert os.sched_getscheduler(worker.native_id) == expected, look
        assert governor.busy and governor.scheduling == "SCHED_FIFO 1"
        for look in range(1, 7):
            looks.append(False)
            governor.tick()
            # The window holds 5 busy looks; each quiet one pushes an old look out, busy ones first once
            # the three quiet looks before them are gone.
            assert governor.busy == (look < 6), look
        assert os.sched_getscheduler(worker.native_id) == os.SCHED_OTHER
        assert governor.changes == 2
        governor.unregister(worker.native_id)
        assert governor._timer is None

    try:
        asyncio.run(scenario())
    finally:
        parked.set()
        worker.join()


def test_the_host_is_busy_while_less_than_a_quarter_of_a_cpu_was_idle() -> None:
    readings = iter([(0, 0), (10, 100), (60, 200), (60, 200), (85, 300)])
    looks = IdleSampler(lambda: next(readings), cpus=2)
    assert looks() is True  # 0.2 CPUs idle of 2
    assert looks() is False  # 1.0 CPU idle
    assert looks() is False  # no tick went by
    assert looks() is False  # 0.5 CPUs idle


def test_time_the_threads_spent_in_learned_windows_counts_as_idle() -> None:
    """A polling thread's spinning beyond its fixed window is time it gives up to anyone: it must not make
    the host look busy (the governor would then raise the very thread that spins)."""
    readings = iter([(0, 0), (10, 100), (20, 200)])
    seconds = iter([0.0, 1.0, 2.0])
    looks = IdleSampler(lambda: next(readings), cpus=2, clock=lambda: next(seconds))
    assert looks(0.0) is True  # 0.2 CPUs idle of 2
    assert looks(0.5) is False  # and half a CPU spent watching the ring

    class Spinner:
        spent = 0.0

        def spare_seconds(self) -> float:
            return self.spent

    asked: list[float] = []

    async def scenario() -> None:
        governor = LoadGovernor(asyncio.get_running_loop(), sample=lambda spare: asked.append(spare) or False)
        spinner = Spinner()
        spinner.spent = 3.0  # before the thread was governed: not this governor's to count
        governor.register(threading.get_native_id(), spinner)
        spinner.spent = 3.25
        governor.tick()
        spinner.spent = 3.5
        governor.tick()
        governor.unregister(threading.get_native_id())

    asyncio.run(scenario())
    assert asked == [0.25, 0.25]


def test_the_host_s_cpu_times_are_read_from_proc() -> None:
    idle, total = cpu_times()
    assert 0 <= idle <= total


def test_by_default_only_the_kick_thread_polls() -> None:
    loop_window, thread_window = poll_windows(None)
    assert loop_window == 0 and thread_window == THREAD_POLL_US > 0
    assert poll_windows(0) == (0, 0) and poll_windows(20) == (20, 20)
    with pytest.raises(ValueError):
        poll_windows(-1)


def test_without_a_thread_to_be_had_the_event_loop_keeps_serving(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(thread: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    backend = VirtioIommuBackend(kick_thread=True, poll_us=50)
    with GuestRam(1 << 20) as ram:
        memory = ram.guest_memory()
        kick_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            backend.attach(Context(memory, DriverQueue(ram, 8).device_queue(memory)))

            async def offer() -> bool:
                return backend.takes_kick_fd(0, kick_fd, None)

            monkeypatch.setattr(threading.Thread, "start", refuse)
            assert asyncio.run(offer()) is False  # and its wake eventfd closed (fd_leak_check)
            monkeypatch.undo()
            compiled = backend._compiled
            assert compiled is not None and compiled.params[kernel.R_POLL_TICKS] > 0  # loop polls
        finally:
            os.close(kick_fd)
            memory.close()

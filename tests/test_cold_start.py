"""A cold start (issue 14, item 4): while the kernels compile in the background every request is answered
by the Python path through the kernels' interpreted twins, the compiled path takes over between batches,
and the control channel says which path serves. The compile step is the test's (a seam of
``cold_start.BackgroundCompile``), so the test decides when it ends."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from vhost_iommu import cold_start
from vhost_iommu.control import ControlClient
from vhost_iommu.control.service import ControlService
from vhost_iommu.device import Status
from vhost_iommu.device.layout import encode_attach, encode_map, encode_unmap
from vhost_iommu.harness.background import RunningServer, running_server
from vhost_iommu.harness.iommu_driver import IommuDriver
from vhost_iommu.jit import interpreted, tables, warm_up
from vhost_iommu.virtio_iommu import VirtioIommuBackend

pytestmark = pytest.mark.usefixtures("fd_leak_check")

ENDPOINT = 0x20
DOMAIN = 3
WAIT = 30.0  # interpreted kernels on a loaded 2-core machine: generous, never a synchronisation
PAGE = 0x1000


@dataclass
class ColdServer:
    server: RunningServer
    control_path: str
    compile_may_end: threading.Event
    background: cold_start.BackgroundCompile

    def queues(self) -> Any:
        with ControlClient(self.control_path) as client:
            return client.call("queues")

    @property
    def backend(self) -> VirtioIommuBackend:
        (backend,) = self.server.backends
        assert isinstance(backend, VirtioIommuBackend)
        return backend


@pytest.fixture
def cold() -> Iterator[ColdServer]:
    # The kernels are compiled in this process already: what the test controls is when the back-end is
    # told so. Until then every Python caller gets the interpreted twins, as after an empty cache.
    warm_up()
    compile_may_end = threading.Event()
    service = ControlService()
    try:
        with running_server(service.track(lambda: VirtioIommuBackend(None))) as server:
            background = cold_start.BackgroundCompile(server.loop, lambda: compile_may_end.wait(WAIT))
            background.start()
            try:
                with server.control_channel(service, WAIT) as path:
                    yield ColdServer(server, path, compile_may_end, background)
            finally:
                compile_may_end.set()
                background.join(WAIT)
    finally:
        interpreted.set_interpreting(False)


def maps(first_page: int, count: int) -> list[bytes]:
    return [
        encode_map(DOMAIN, (first_page + n) * PAGE, (first_page + n + 1) * PAGE - 1, (0x100 + n) * PAGE)
        for n in range(count)
    ]


def test_the_python_path_answers_until_the_compile_ends_then_the_compiled_path_takes_over(
    cold: ColdServer,
) -> None:
    frontend = cold.server.connect()
    with IommuDriver(frontend, ram_size=4 << 20, queue_size=64, timeout=WAIT, own_frontend=True) as guest:
        assert interpreted.kernel(tables._map_request) is not tables._map_request  # the twin is called
        assert guest.status(encode_attach(DOMAIN, ENDPOINT)) == Status.OK
        assert guest.statuses(maps(0, 8)) == [Status.OK] * 8
        assert guest.status(maps(4, 1)[0]) == Status.INVAL  # overlaps: the table's own answer
        assert guest.status(encode_unmap(DOMAIN, 6 * PAGE, 8 * PAGE - 1)) == Status.OK
        requestq, eventq = cold.queues()
        assert (requestq["path"], requestq["served_by"]) == ("python (compiling)", "event-loop")
        assert eventq["path"] == "python"
        backend = cold.backend
        device = backend.device
        assert cold.server.call(lambda: backend.kick_thread_counters()) is None  # no thread yet

        # The compile ends in the middle of a batch: every request of that batch is still served by the
        # Python path (device core), and the compiled path serves the next one.
        served_in_python: list[bytes] = []
        handle_request = device.handle_request

        def python_path(request: bytes | memoryview, writable_size: int, **keywords: Any) -> Any:
            served_in_python.append(bytes(request))
            if len(served_in_python) == 1:
                cold.compile_may_end.set()
                cold.background.join(WAIT)  # the switch is queued on the loop, behind this batch
            return handle_request(request, writable_size, **keywords)

        device.handle_request = python_path  # type: ignore[method-assign]
        batch = maps(16, 6)
        assert guest.statuses(batch) == [Status.OK] * 6
        assert served_in_python == batch
        assert cold.background.switched.wait(WAIT)
        assert not interpreted.interpreting()

        # The next batch: the compiled kernel on the requestq thread, over the same tables.
        assert guest.statuses(maps(32, 4)) == [Status.OK] * 4
        assert guest.status(encode_unmap(DOMAIN, 0, 6 * PAGE - 1)) == Status.OK  # mapped by the Python path
        assert served_in_python == batch  # MAP and UNMAP went through the kernel
        requestq, _eventq = cold.queues()
        assert (requestq["path"], requestq["served_by"]) == ("compiled", "thread")
        counters = cold.server.call(lambda: backend.kick_thread_counters())
        assert counters is not None
        mapped = cold.server.call(lambda: [start for start, *_ in device.store.mappings(DOMAIN)])
        assert mapped == [page * PAGE for page in (16, 17, 18, 19, 20, 21, 32, 33, 34, 35)]
        assert cold.background.seconds is not None


def test_a_warm_cache_starts_no_thread_and_serves_compiled_from_the_first_request() -> None:
    warm_up()  # this process's cache: every kernel is on disk now
    assert cold_start.kernels_cached()
    loaded_on: list[threading.Thread] = []
    loop = asyncio.new_event_loop()
    try:
        background = cold_start.begin(loop, compile=lambda: loaded_on.append(threading.current_thread()))
        assert background is None
        assert loaded_on == [threading.current_thread()]  # loaded before serving, on the serving thread
        assert not interpreted.interpreting()
    finally:
        loop.close()


def test_an_empty_cache_is_cold(tmp_path: Path) -> None:
    # numba picks a kernel's cache place when the kernel is made: a process of its own, with an empty one.
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    check = "from vhost_iommu import cold_start; print(cold_start.kernels_cached())"
    command = [sys.executable, "-c", check]
    answer = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    assert answer.stdout.strip() == "False"

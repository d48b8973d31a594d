"""The IOMMU device's state across device-worker deaths under the real keeper (``serve --state-dir``).

The real program, the front-end harness playing QEMU: a guest attaches an endpoint and maps pages; the
device worker is SIGKILLed between requests and in the middle of batches; each new worker must hold every
mapping (a MAP of a mapped page is refused with INVAL, an UNMAP of it then succeeds) and answer every
request of a killed batch exactly once (each MAP of a fresh page answered OK: one executed twice would be
answered INVAL). tests/test_persist_crash.py kills at chosen instants without the keeper.

And whatever the control channel's injections made the device do is journaled like any other request, so
the next worker holds it (issue 15's scenario: a MAP answered after a per-type ``delay`` was published
without a journal record, and the next worker refused the session, closing QEMU's connection).
"""

from __future__ import annotations

import os
import random
import tempfile
from collections.abc import Callable, Iterator

import pytest

from vhost_iommu.control.client import ControlClient
from vhost_iommu.device import Status
from vhost_iommu.device.layout import MAP_F_READ, MAP_F_WRITE, encode_attach, encode_map, encode_unmap
from vhost_iommu.harness.iommu_driver import IommuDriver
from vhost_iommu.harness.keeper_process import KeeperProcess

pytestmark = pytest.mark.usefixtures("fd_leak_check")
#: A fresh interpreter (numpy, numba's cache for the IOMMU device) on a loaded 2-core machine.
TIMEOUT = 60.0
EP = 0x20
PAGE = 0x1000
RW = MAP_F_READ | MAP_F_WRITE


@pytest.fixture
def keeper() -> Iterator[KeeperProcess]:
    with tempfile.TemporaryDirectory(prefix="vhost-pk-") as directory:  # short: socket paths <= 108 bytes
        program = KeeperProcess(directory, backend="iommu", timeout=TIMEOUT)
        try:
            yield program
        finally:
            program.close()


def map_page(page: int) -> bytes:
    return encode_map(1, page * PAGE, page * PAGE + PAGE - 1, 0x100_0000 + page * PAGE, RW)


def test_mappings_survive_worker_kills_and_killed_batches_are_answered_once(keeper: KeeperProcess) -> None:
    rng = random.Random(11)
    guest = IommuDriver.connect(
        keeper.socket, ram_size=4 << 20, queue_size=256, event_queue_size=8, event_idx=True, timeout=TIMEOUT
    )
    try:
        assert guest.statuses([encode_attach(1, EP)]) == [Status.OK]
        mapped: list[int] = []
        next_page = 0
        for kill in range(1, 5):
            # A batch in flight when the worker dies: fresh pages, so every MAP must be answered OK once.
            batch = list(range(next_page, next_page + rng.randint(20, 120)))
            next_page = batch[-1] + 1
            heads = guest.post([map_page(page) for page in batch])
            keeper.kill_worker()
            keeper.wait_for("session taken over", kill)
            assert guest.answer_statuses(heads) == [Status.OK] * len(heads)
            mapped += batch
            # Every mapping of before is still there: mapping it again is refused as an overlap.
            probe = rng.sample(mapped, 10)
            assert guest.statuses([map_page(page) for page in probe]) == [Status.INVAL] * len(probe)
        # And they can be removed one by one, each exactly once.
        statuses = guest.statuses([encode_unmap(1, p * PAGE, p * PAGE + PAGE - 1) for p in mapped[:50]])
        assert statuses == [Status.OK] * 50
        assert guest.statuses([map_page(page) for page in mapped[:50]]) == [Status.OK] * 50
        assert len(os.listdir(keeper.state)) == 1  # the connection's own subdirectory
    finally:
        guest.close()
    keeper.wait_for("state restored in", 4)
    assert keeper.terminate() == 0
    assert os.listdir(keeper.state) == []  # the session ended for good: its state went with it


def test_a_request_a_stopped_worker_was_kicked_for_is_answered_once_by_the_next(
    keeper: KeeperProcess,
) -> None:
    # The e2e test's "kill with a request in flight", without a guest: on the ring, notified, never read.
    with IommuDriver.connect(keeper.socket, event_idx=True, timeout=TIMEOUT) as guest:
        assert guest.attach(1, EP) == Status.OK
        stopped = keeper.stop_worker()
        assert not stopped.kicked()
        heads = guest.post([map_page(0)])
        assert stopped.wait_kicked(TIMEOUT)
        stopped.kill()
        keeper.wait_for("session taken over")
        assert guest.answer_statuses(heads) == [Status.OK]
        assert guest.status(map_page(0)) == Status.INVAL  # the mapping is there


def control(keeper: KeeperProcess, command: str, **arguments: object) -> object:
    with ControlClient(keeper.control, timeout=TIMEOUT) as client:
        return client.call(command, **arguments)


def per_type_delay(keeper: KeeperProcess, guest: IommuDriver) -> None:
    control(keeper, "delay", us=2000, type="MAP")
    assert guest.status(map_page(1)) == Status.OK  # answered after the delay
    control(keeper, "delay", us=0, type="MAP")


def batch_delay(keeper: KeeperProcess, guest: IommuDriver) -> None:
    control(keeper, "delay", us=2000)
    assert guest.status(map_page(1)) == Status.OK
    control(keeper, "delay", us=0)


def forced_answer(keeper: KeeperProcess, guest: IommuDriver) -> None:
    control(keeper, "inject", type="MAP", status="NOMEM", times=1)
    assert guest.status(map_page(7)) == Status.NOMEM  # forced: page 7 stays unmapped
    assert guest.status(map_page(1)) == Status.OK


def forced_rate(keeper: KeeperProcess, guest: IommuDriver) -> None:
    control(keeper, "inject-rate", type="UNMAP", status="DEVERR", rate=1.0, seed=1)
    assert guest.status(encode_unmap(1, 0, PAGE - 1)) == Status.DEVERR  # page 0 stays mapped
    control(keeper, "inject-rate", type="UNMAP", status="DEVERR", rate=0)
    assert guest.status(map_page(1)) == Status.OK


def conformance_checker(keeper: KeeperProcess, guest: IommuDriver) -> None:
    control(keeper, "conformance-start")
    assert guest.status(map_page(1)) == Status.OK  # served through the device core, watched
    assert control(keeper, "conformance-stop")["total"] == 0  # type: ignore[index]


INJECTIONS: dict[str, Callable[[KeeperProcess, IommuDriver], None]] = {
    "delay --type MAP": per_type_delay,
    "delay": batch_delay,
    "inject": forced_answer,
    "inject-rate": forced_rate,
    "conformance-start": conformance_checker,
}


@pytest.mark.parametrize("injection", INJECTIONS)
def test_what_an_injection_made_the_device_do_survives_a_worker_kill(
    keeper: KeeperProcess, injection: str
) -> None:
    with IommuDriver.connect(keeper.socket, ram_size=4 << 20, timeout=TIMEOUT) as guest:
        assert guest.status(encode_attach(1, EP)) == Status.OK
        assert guest.status(map_page(0)) == Status.OK
        INJECTIONS[injection](keeper, guest)
        keeper.kill_worker(wait_takeover=True)
        # The front-end's connection was kept, and the next worker holds both mappings (mapping a mapped
        # page again is refused as an overlap) and nothing a forced answer refused.
        assert guest.status(map_page(0)) == Status.INVAL
        assert guest.status(map_page(1)) == Status.INVAL
        if injection == "inject":
            assert guest.status(map_page(7)) == Status.OK
        assert "cannot be taken over" not in keeper.log
    assert keeper.terminate() == 0

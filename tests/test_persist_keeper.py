"""The IOMMU device's state across device-worker deaths under the real keeper (``serve --state-dir``).

The real program, the front-end harness playing QEMU: a guest attaches an endpoint and maps pages; the
device worker is SIGKILLed between requests and in the middle of batches; each new worker must hold every
mapping (a MAP of a mapped page is refused with INVAL, an UNMAP of it then succeeds) and answer every
request of a killed batch exactly once (each MAP of a fresh page answered OK: one executed twice would be
answered INVAL). tests/test_persist_crash.py kills at chosen instants without the keeper.
"""

from __future__ import annotations

import os
import random
import tempfile
from collections.abc import Iterator

import pytest

from vhost_iommu.device import Status
from vhost_iommu.device.layout import MAP_F_READ, MAP_F_WRITE, encode_attach, encode_map, encode_unmap
from vhost_iommu.harness.driver_queue import DriverQueue
from vhost_iommu.harness.frontend import Frontend
from vhost_iommu.harness.guest_ram import GuestRam
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


class Guest:
    def __init__(self, path: str) -> None:
        self.frontend = Frontend.connect(path, timeout=TIMEOUT)
        self.ram = GuestRam(4 << 20)
        self.requests = DriverQueue(self.ram, 256, event_idx=True)
        self.events = DriverQueue(self.ram, 8, event_idx=True)
        self.frontend.start_device(self.ram, [self.requests, self.events])

    def send(self, requests: list[bytes]) -> list[int]:
        """Post every request, kick once; the statuses, in posting order, once all are answered."""
        heads = [self.requests.post([request], [4]) for request in requests]
        self.frontend.kick(0)
        answered: dict[int, int] = {}
        while len(answered) < len(heads):
            assert self.frontend.wait_used(0, timeout=TIMEOUT), f"{len(answered)} of {len(heads)} answered"
            for head, length in self.requests.used():
                assert head not in answered, f"head {head} answered twice"
                assert length == 4
                answered[head] = self.requests.written(head)[0]
        return [answered[head] for head in heads]

    def close(self) -> None:
        self.frontend.close()
        self.ram.close()


def map_page(page: int) -> bytes:
    return encode_map(1, page * PAGE, page * PAGE + PAGE - 1, 0x100_0000 + page * PAGE, RW)


def test_mappings_survive_worker_kills_and_killed_batches_are_answered_once(keeper: KeeperProcess) -> None:
    rng = random.Random(11)
    guest = Guest(keeper.socket)
    try:
        assert guest.send([encode_attach(1, EP)]) == [Status.OK]
        mapped: list[int] = []
        next_page = 0
        for kill in range(1, 5):
            # A batch in flight when the worker dies: fresh pages, so every MAP must be answered OK once.
            batch = list(range(next_page, next_page + rng.randint(20, 120)))
            next_page = batch[-1] + 1
            heads = [guest.requests.post([map_page(page)], [4]) for page in batch]
            guest.frontend.kick(0)
            keeper.kill_worker()
            keeper.wait_for("session taken over", kill)
            answered: dict[int, int] = {}
            while len(answered) < len(heads):
                assert guest.frontend.wait_used(0, timeout=TIMEOUT), "a request of the killed batch is lost"
                for head, _length in guest.requests.used():
                    assert head not in answered
                    answered[head] = guest.requests.written(head)[0]
            assert [answered[head] for head in heads] == [Status.OK] * len(heads)
            mapped += batch
            # Every mapping of before is still there: mapping it again is refused as an overlap.
            probe = rng.sample(mapped, 10)
            assert guest.send([map_page(page) for page in probe]) == [Status.INVAL] * len(probe)
        # And they can be removed one by one, each exactly once.
        statuses = guest.send([encode_unmap(1, p * PAGE, p * PAGE + PAGE - 1) for p in mapped[:50]])
        assert statuses == [Status.OK] * 50
        assert guest.send([map_page(page) for page in mapped[:50]]) == [Status.OK] * 50
        assert len(os.listdir(keeper.state)) == 1  # the connection's own subdirectory
    finally:
        guest.close()
    keeper.wait_for("state restored in", 4)
    assert keeper.terminate() == 0
    assert os.listdir(keeper.state) == []  # the session ended for good: its state went with it

"""Requests in flight when the device worker is SIGKILLed are completed exactly once, and the state is
whole afterwards.

The worker is a real child process (tests/persist_child.py) with a state directory, serving a requestq
over memfd guest RAM that this test drives with DriverQueue. Each round posts a random batch (MAP and
UNMAP of random pages, requests that fail, ATTACH, PROBE), kicks, and kills the worker at a random
moment: after a random delay (before, during or after the batch), or exactly between a journal commit
and the publication of that chain (the worker's ``trap`` hook). A respawned worker restores the state
and serves what is left. A model predicts every status from the order the driver posted the requests:
a request executed twice (a MAP answered INVAL for its own mapping), lost (never used) or answered
twice (a head returned twice) fails the test, and so does a table that differs from the model's.

``VHOST_IOMMU_CRASH_ROUNDS`` sets the rounds per path (default 12) for longer campaigns.
"""

from __future__ import annotations

import json
import os
import random
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from vhost_iommu.device import Status
from vhost_iommu.device.layout import (
    MAP_F_READ,
    MAP_F_WRITE,
    encode_attach,
    encode_map,
    encode_probe,
    encode_unmap,
)
from vhost_iommu.harness.context import StandaloneContext
from vhost_iommu.harness.driver_queue import DriverQueue
from vhost_iommu.harness.guest_ram import GuestRam
from vhost_iommu.persist import StateDir
from vhost_iommu.virtio_iommu import VirtioIommuBackend

GPA_BASE = 0x1_0000_0000
RAM_SIZE = 2 << 20
EP = 0x20
PAGE = 0x1000
PAGES = 48
RW = MAP_F_READ | MAP_F_WRITE
CHILD = Path(__file__).with_name("persist_child.py")
ROUNDS = int(os.environ.get("VHOST_IOMMU_CRASH_ROUNDS", "12"))
TIMEOUT = 120.0


@dataclass
class Model:
    """What the device must do, request by request, in ring order."""

    mapped: dict[int, tuple[int, int]] = field(default_factory=dict)  # page -> (phys, flags)

    def apply(self, kind: str, args: tuple[int, ...]) -> int:
        if kind == "map":
            page, phys = args
            if page in self.mapped:
                return Status.INVAL
            self.mapped[page] = (phys, RW)
            return Status.OK
        if kind == "unmap":
            first, last = args
            for page in range(first, last + 1):
                self.mapped.pop(page, None)
            return Status.OK
        if kind == "bad-map":
            return Status.RANGE
        if kind == "noent-map":
            return Status.NOENT
        return Status.OK  # attach (again), probe


def random_request(rng: random.Random) -> tuple[str, tuple[int, ...], bytes, int]:
    """(kind, model arguments, request bytes, writable size)."""
    roll = rng.random()
    if roll < 0.5:
        page = rng.randrange(PAGES)
        phys = rng.randrange(1 << 20) * PAGE
        return "map", (page, phys), encode_map(1, page * PAGE, page * PAGE + PAGE - 1, phys, RW), 4
    if roll < 0.8:
        first = rng.randrange(PAGES)
        last = min(PAGES - 1, first + rng.choice((0, 0, 1, 3, 7)))
        return "unmap", (first, last), encode_unmap(1, first * PAGE, last * PAGE + PAGE - 1), 4
    if roll < 0.86:
        return "bad-map", (), encode_map(1, 0x800, 0x17FF, 0, RW), 4  # unaligned: RANGE, nothing changes
    if roll < 0.9:
        return "noent-map", (), encode_map(7, 0, PAGE - 1, 0, RW), 4  # no such domain
    if roll < 0.95:
        return "attach", (), encode_attach(1, EP), 4  # already attached there: OK, no change
    return "probe", (), encode_probe(EP), 4 + 512


@dataclass
class Worker:
    process: subprocess.Popen[bytes]
    kick: int
    call: int
    thread: bool
    died: int = field(init=False)
    """A pidfd: readable once the worker is gone (an eventfd gives no end of file)."""

    def __post_init__(self) -> None:
        self.died = os.pidfd_open(self.process.pid)

    def kick_it(self) -> None:
        os.write(self.kick, (1).to_bytes(8, sys.byteorder) if self.thread else b"k")

    def close(self) -> None:
        for fd in (self.kick, self.call, self.died):
            os.close(fd)
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(TIMEOUT)
        assert self.process.stdout is not None
        self.process.stdout.close()


@contextmanager
def rig(tmp_path: Path) -> Iterator[tuple[GuestRam, DriverQueue, DriverQueue, Path]]:
    with GuestRam(RAM_SIZE, gpa_base=GPA_BASE) as ram:
        yield ram, DriverQueue(ram, 64, event_idx=True), DriverQueue(ram, 8, event_idx=True), tmp_path / "s"


def spawn(
    ram: GuestRam, queues: list[DriverQueue], state: Path, path: str, *, restoring: bool, trap: int
) -> Worker:
    thread = path == "thread"
    if thread:  # the kick loop reads and writes eventfds; the parent keeps the same fds
        kick_read = kick_write = os.eventfd(0, os.EFD_CLOEXEC)
        call_read = call_write = os.eventfd(0, os.EFD_CLOEXEC)
    else:
        kick_read, kick_write = os.pipe()
        call_read, call_write = os.pipe()
    ram_fd = ram.dup_fd()
    config = {
        "ram_fd": ram_fd,
        "kick_fd": kick_read,
        "call_fd": call_write,
        "gpa_base": GPA_BASE,
        "ram_size": RAM_SIZE,
        "uva_base": ram.uva_base,
        "state": str(state),
        "slots": 64,  # small journals: rotations happen all along the run
        "path": "compiled" if thread else path,
        "thread": thread,
        "restoring": restoring,
        "trap": trap,
        "rings": [
            # A respawned worker's rings come up at the used index (what the keeper can read); the
            # back-end moves next_avail where its journal says.
            {
                "size": q.size,
                "desc": q.desc_uva,
                "avail": q.avail_uva,
                "used": q.used_uva,
                "next_avail": q.used_idx,
            }
            for q in queues
        ],
    }
    fds = (ram_fd, kick_read, call_write)
    try:
        process = subprocess.Popen(
            [sys.executable, str(CHILD), json.dumps(config)], pass_fds=fds, stdout=subprocess.PIPE
        )
    finally:
        for fd in fds:
            if not thread:
                os.close(fd)
        if thread:
            os.close(ram_fd)
    worker = Worker(process, kick_write, call_read, thread)
    assert process.stdout is not None
    line = process.stdout.readline()
    if line != b"ready\n":
        worker.close()
        raise AssertionError(f"worker did not start: {line!r}, exit {process.returncode}")
    return worker


def wait_call(worker: Worker, requests: DriverQueue) -> bool:
    """True once the worker answered everything posted; False if it died first."""
    while requests.used_idx != requests.avail_idx:
        readable, _, _ = select.select([worker.call, worker.died], [], [], TIMEOUT)
        assert readable, "the worker neither answered nor died"
        if worker.call in readable and os.read(worker.call, 8):
            continue
        return False  # the pidfd, or the end of the call pipe
    return True


def kill(worker: Worker) -> None:
    if worker.process.poll() is None:
        worker.process.send_signal(signal.SIGKILL)
    worker.close()


@pytest.mark.parametrize("path", ["compiled", "python", "thread"])
def test_sigkill_at_random_moments_completes_every_request_exactly_once(path: str, tmp_path: Path) -> None:
    rng = random.Random(f"persist-crash-{path}")
    model = Model()
    kills = {"delay": 0, "trap": 0, "after": 0}
    with rig(tmp_path) as (ram, requests, events, state):
        queues = [requests, events]
        worker = spawn(ram, queues, state, path, restoring=False, trap=rng.randrange(0, 12))
        try:
            posted = [("attach", (), requests.post([encode_attach(1, EP)], [4]), 4)]
            for _round in range(ROUNDS):
                for _ in range(rng.randrange(1, 24)):
                    kind, args, request, writable = random_request(rng)
                    posted.append((kind, args, requests.post([request], [writable]), writable))
                worker.kick_it()
                if rng.random() < 0.5:
                    time.sleep(rng.random() * 0.004)  # a random instant to kill at (fault injection)
                    mode = "delay"
                else:
                    mode = "after" if wait_call(worker, requests) else "trap"
                kills[mode] += 1  # "trap": it killed itself between a commit and its publication
                kill(worker)
                worker = spawn(ram, queues, state, path, restoring=True, trap=-1)
                worker.kick_it()
                assert wait_call(worker, requests)
                # The next round's worker may carry a trap: respawned once more after this check.
                check(requests, posted, model)
                posted = []
                if rng.random() < 0.5:
                    kill(worker)
                    worker = spawn(ram, queues, state, path, restoring=True, trap=rng.randrange(0, 12))
        finally:
            kill(worker)
        # The state directory alone gives the model's table.
        restored = restore_in_process(ram, queues, state)
        assert {
            start // PAGE: (phys, flags) for start, _last, phys, flags in restored.device.mappings(1)
        } == model.mapped
        assert sum(kills.values()) == ROUNDS
        assert kills["trap"] and kills["delay"], kills  # both ways of dying were exercised
        print(f"{path}: {ROUNDS} rounds, kills {kills}, {len(model.mapped)} pages mapped at the end")


def check(requests: DriverQueue, posted: list[tuple[str, tuple[int, ...], int, int]], model: Model) -> None:
    used = dict(requests.used())  # raises on a head returned twice or one not outstanding
    assert requests.outstanding == 0, "a request was never completed"
    for kind, args, head, writable in posted:
        expected = model.apply(kind, args)
        assert used[head] == writable, (kind, args)
        status = requests.written(head)[writable - 4]
        assert status == expected, f"{kind} {args}: status {status}, the model says {expected}"


def restore_in_process(ram: GuestRam, queues: list[DriverQueue], state: Path) -> VirtioIommuBackend:
    memory = ram.guest_memory()
    backend = VirtioIommuBackend(state_dir=StateDir(str(state)))
    rings = [q.device_queue(memory, next_avail=q.used_idx) for q in queues]
    backend.attach(StandaloneContext(memory, rings, session_key="guest0"))
    backend.set_features(backend.device_features())
    backend.session_restored()
    backend.queue_restored(0)
    backend.queue_restored(1)
    return backend

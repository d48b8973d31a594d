"""What persistence costs: the journal per request on the request paths, and a restart's recovery time.

In-process (no sockets): a back-end over memfd guest RAM and a DriverQueue, the ring filled with
``--depth`` MAP (then UNMAP) requests per kick; only the back-end's ``queue_kicked`` is timed (the
driver side's Python posting is not), with and without a state directory, alternating runs so that
machine load hits both alike. Then recovery: a state of ``--mappings`` single-page mappings restored
into a fresh back-end (``session_restored``), once from a snapshot and once from journal records only.
Last, the device state on its own (the format of snapshots and migration): ``snapshot.save`` and
``snapshot.restore`` (every check, the bulk load into a fresh table) of ``--snapshot-mappings`` mappings.

Example:
    scripts/bench-persist                      # compiled path, depth 256, 100000 mappings
    scripts/bench-persist --path python --rounds 20
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from vhost_iommu.device import snapshot as device_snapshot
from vhost_iommu.device.core import IommuDevice
from vhost_iommu.device.layout import MAP_F_READ, MAP_F_WRITE, encode_attach, encode_map, encode_unmap
from vhost_iommu.harness.context import StandaloneContext
from vhost_iommu.harness.driver_queue import DriverQueue
from vhost_iommu.harness.guest_ram import GuestRam
from vhost_iommu.harness.mappings import add_mappings
from vhost_iommu.jit import warm_up
from vhost_iommu.persist import StateDir
from vhost_iommu.persist.journal import DEFAULT_SLOTS
from vhost_iommu.virtio_iommu import VirtioIommuBackend

PAGE = 0x1000
EP = 0x20
RW = MAP_F_READ | MAP_F_WRITE


class Rig:
    def __init__(self, ram: GuestRam, path: str, state: Path | None, size: int, *, restoring: bool = False):
        self.memory = ram.guest_memory()
        self.requests = DriverQueue(ram, size, event_idx=True)
        self.events = DriverQueue(ram, 8, event_idx=True)
        self.state = state
        self.slots = DEFAULT_SLOTS
        self.backend = self.start(path, restoring=restoring)

    def start(self, path: str, *, restoring: bool) -> VirtioIommuBackend:
        state_dir = StateDir(str(self.state)) if self.state else None
        backend = VirtioIommuBackend(request_path=path, state_dir=state_dir, journal_slots=self.slots)  # type: ignore[arg-type]
        queues = [q.device_queue(self.memory, next_avail=q.used_idx) for q in (self.requests, self.events)]
        backend.attach(StandaloneContext(self.memory, queues, session_key="bench"))
        backend.set_features(backend.device_features())
        if restoring:
            backend.session_restored()
            backend.queue_restored(0)
            backend.queue_restored(1)
        backend.queue_started(0)
        backend.queue_started(1)
        return backend

    def serve(self, requests: list[bytes]) -> float:
        """Post, kick; seconds spent in the back-end."""
        for request in requests:
            self.requests.post([request], [4])
        began = time.perf_counter()
        self.backend.queue_kicked(0)
        spent = time.perf_counter() - began
        used = self.requests.used()
        assert len(used) == len(requests), "not everything was served"
        return spent


def overhead(path: str, depth: int, rounds: int, where: str | None) -> tuple[float, float]:
    """ns per request (MAP and UNMAP alike) without and with a state directory, medians of rounds."""
    results: dict[bool, list[float]] = {False: [], True: []}
    for _round in range(rounds):
        for journaled in (False, True):
            with tempfile.TemporaryDirectory(dir=where) as scratch, GuestRam(16 << 20) as ram:
                rig = Rig(ram, path, Path(scratch) / "s" if journaled else None, 2 * depth)
                rig.serve([encode_attach(1, EP)])
                spent = 0.0
                for batch in range(8):
                    base = batch * depth
                    pages = range(base, base + depth)
                    spent += rig.serve(
                        [encode_map(1, p * PAGE, p * PAGE + PAGE - 1, p * PAGE, RW) for p in pages]
                    )
                    spent += rig.serve([encode_unmap(1, p * PAGE, p * PAGE + PAGE - 1) for p in pages[::2]])
                results[journaled].append(spent / (8 * (depth + depth // 2)) * 1e9)
                rig.memory.close()
    return statistics.median(results[False]), statistics.median(results[True])


def recovery(path: str, mappings: int, *, snapshot: bool, where: str | None) -> tuple[float, int]:
    """Seconds ``session_restored`` + ``queue_restored`` take for ``mappings`` mappings."""
    with tempfile.TemporaryDirectory(dir=where) as scratch, GuestRam(64 << 20) as ram:
        state = Path(scratch) / "s"
        rig = Rig(ram, path, state, 1024)
        if not snapshot:  # every mapping in the journal: make it long enough (a new session)
            rig.slots = mappings + 4096
            rig.backend = rig.start(path, restoring=False)
        rig.serve([encode_attach(1, EP)])
        for base in range(0, mappings, 512):
            pages = range(base, min(mappings, base + 512))
            rig.serve([encode_map(1, p * PAGE, p * PAGE + PAGE - 1, p * PAGE, RW) for p in pages])
        if snapshot:  # everything so far into a snapshot, as a full journal does
            session = rig.backend._session
            assert session is not None
            session.rotate()
        began = time.perf_counter()
        restored = rig.start(path, restoring=True)
        spent = time.perf_counter() - began
        assert restored.device.store.count() == mappings
        rig.memory.close()
        return spent, mappings


def snapshot_times(mappings: int, rounds: int) -> tuple[float, float, int]:
    """Seconds ``snapshot.save`` and ``snapshot.restore`` take for a device of ``mappings`` one-page mappings
    in two domains (bests of ``rounds``), and the state's size in bytes."""
    device = IommuDevice()
    device.set_features(device.device_features())
    for domain, endpoint in ((3, 0x20), (5, 0x22)):
        device.handle_request(encode_attach(domain, endpoint), 4)
    add_mappings(device, 3, 1 << 32, mappings // 2)
    add_mappings(device, 5, (1 << 32) + mappings * PAGE, mappings - mappings // 2)
    saves, restores = [], []
    for _round in range(rounds):
        began = time.perf_counter()
        state = device_snapshot.save(device)
        saves.append(time.perf_counter() - began)
        restored = IommuDevice()
        began = time.perf_counter()
        device_snapshot.restore(restored, state)
        restores.append(time.perf_counter() - began)
        assert restored.store.count() == mappings
    return min(saves), min(restores), len(state)


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/bench-persist",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--path", choices=("compiled", "python"), default="compiled")
    parser.add_argument("--depth", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--mappings", type=int, default=100_000)
    parser.add_argument("--snapshot-mappings", type=int, default=1_000_000)
    parser.add_argument(
        "--dir", help="where the state directories go (default: the system's temporary directory)"
    )
    args = parser.parse_args()
    warm_up()
    off, on = overhead(args.path, args.depth, args.rounds, args.dir)
    print(
        f"{args.path} path, depth {args.depth}: {off:.0f} ns/request without a state dir, {on:.0f} with "
        f"(journal: {on - off:+.0f} ns/request), medians of {args.rounds} rounds"
    )
    for snapshot in (True, False):
        spent, count = recovery(args.path, args.mappings, snapshot=snapshot, where=args.dir)
        source = "a snapshot" if snapshot else "journal records"
        print(f"recovery of {count} mappings from {source}: {spent:.3f} s")
    save, restore, size = snapshot_times(args.snapshot_mappings, args.rounds)
    print(
        f"device state of {args.snapshot_mappings} mappings ({size / 1e6:.1f} MB): "
        f"snapshot.save {save:.3f} s, snapshot.restore {restore:.3f} s, bests of {args.rounds} rounds"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

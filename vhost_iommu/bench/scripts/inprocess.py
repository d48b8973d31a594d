"""Requests per second and back-end CPU time per request, through the vhost-user front-end harness.

The back-end runs as its own process pinned to one CPU: the real program (``vhost-iommu --socket-path``,
whose request path is the compiled one) or, with ``--path python``, the same server with
``VirtioIommuBackend(request_path="python")``. The front-end (this process, pinned to another CPU) is
the harness's ``Frontend`` with ``GuestRam`` and ``DriverQueue``, but it builds its descriptor chains
once and afterwards only rewrites request bytes and avail ring entries with numpy, so that its own Python
cost per request is small and, being on another CPU, is not what is measured. One call notification per
batch (EVENT_IDX ``used_event`` at the batch's last entry), one kick per batch.

Figures per workload (batches of ``--depth`` requests, the queue depth):
  req/s       requests completed per second of wall time (front-end and back-end in turn: a batch is
              posted, then served, then checked)
  CPU us/req  the back-end's CPU time (all its threads, /proc/PID/task/*/schedstat) per request
  cap req/s   1 / (CPU per request): what one CPU running only the back-end would serve
  front-end CPU us/req   this process's CPU time per request (what bounds req/s when it is close to
              1 / req/s)
  rtt us      depth 1: one request posted, kicked, served, notified (p50 and p99 of the round trips)

Workloads: MAP (single pages, every other page, so none merge), UNMAP (of those pages, one request each),
MIX (half MAP of new pages, half UNMAP of the previous batch's), RTT (MAP then UNMAP of one page, depth 1).

Example:
    scripts/bench-inprocess                       # compiled path, 2000 batches of 256
    scripts/bench-inprocess --path python --batches 200
    scripts/bench-inprocess --control             # with a control socket, as `vhost-iommu run` serves;
                                                  # prints which path served and the latency it recorded
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from vhost_iommu.control import ControlClient
from vhost_iommu.device.layout import MAP, UNMAP, encode_attach
from vhost_iommu.harness.driver_queue import DriverQueue
from vhost_iommu.harness.frontend import Frontend
from vhost_iommu.harness.guest_ram import GuestRam
from vhost_iommu.virtqueue import (
    DESC_DTYPE,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    full_fence,
    vring_need_event,
)

PAGE = 0x1000
DOMAIN = 1
ENDPOINT = 0x20
RAM_BYTES = 64 << 20

_PYTHON_SERVER = """
import asyncio, sys
from vhost_iommu.jit import warm_up
from vhost_iommu.server import VhostUserServer, bind_unix_socket, new_event_loop
from vhost_iommu.virtio_iommu import VirtioIommuBackend
warm_up()
loop = new_event_loop()
asyncio.set_event_loop(loop)
server = VhostUserServer(lambda: VirtioIommuBackend(request_path=sys.argv[2], kick_thread=False))
loop.run_until_complete(server.serve_socket(bind_unix_socket(sys.argv[1])))
"""


def cpu_ns(pid: int) -> int:
    """CPU time of every thread of ``pid`` in ns (first field of each task's schedstat)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError, IndexError, ValueError):  # a thread that just exited
            total += int((task / "schedstat").read_text().split()[0])
    return total


@contextmanager
def backend_process(
    path: str, cpu: int, extra: list[str]
) -> Iterator[tuple[subprocess.Popen[bytes], str, float]]:
    """The back-end, pinned to ``cpu``; yields (process, socket path, seconds from launch to connectable).
    ``extra`` may name ``{scratch}``, the back-end's private directory (for a control socket)."""
    scratch = tempfile.mkdtemp(prefix="bench-inprocess-")
    extra = [argument.format(scratch=scratch) for argument in extra]
    socket_path = os.path.join(scratch, "viommu.sock")
    taskset = shutil.which("taskset")
    pin = [taskset, "-c", str(cpu)] if taskset else []
    if path == "compiled":
        # The program of this interpreter's environment first: another one on PATH may be another tree's.
        beside = Path(sys.executable).parent / "vhost-iommu"
        program = str(beside) if beside.exists() else shutil.which("vhost-iommu") or str(beside)
        argv = [*pin, program, "--socket-path", socket_path, *extra]
    else:
        argv = [*pin, sys.executable, "-c", _PYTHON_SERVER, socket_path, path]
    started = time.monotonic()
    process = subprocess.Popen(argv)
    try:
        while True:
            if process.poll() is not None:
                raise SystemExit(f"the back-end exited with status {process.returncode}")
            try:
                Frontend.connect(socket_path, timeout=1.0).close()
                break
            except OSError:
                time.sleep(0.005)  # polling for a socket another process creates; not a test
        yield process, socket_path, time.monotonic() - started
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(scratch, ignore_errors=True)


class Driver:
    """A requestq of ``2 * depth`` descriptors holding ``depth`` fixed two-descriptor chains."""

    def __init__(self, frontend: Frontend, ram: GuestRam, depth: int) -> None:
        self.frontend = frontend
        self.depth = depth
        size = 1 << max(1, (2 * depth - 1).bit_length())
        self.queue = DriverQueue(ram, size, event_idx=True)
        events = DriverQueue(ram, 8, event_idx=True)
        frontend.start_device(ram, [self.queue, events])
        self.requests_gpa = ram.alloc(depth * 40, 8)
        self.tails_gpa = ram.alloc(depth * 4, 4)
        self.request_bytes = ram.view(self.requests_gpa, depth * 40)
        self.tails = ram.view(self.tails_gpa, depth * 4)
        for chain in range(depth):
            self.queue.write_desc(
                2 * chain, self.requests_gpa + 40 * chain, MAP.size, VIRTQ_DESC_F_NEXT, 2 * chain + 1
            )
            self.queue.write_desc(2 * chain + 1, self.tails_gpa + 4 * chain, 4, VIRTQ_DESC_F_WRITE, 0)
        avail = ram.view(self.queue.avail_gpa, 4 + 2 * size + 2).view("<u2")
        self.avail_idx_slot = avail[1:2]
        self.avail_ring = avail[2 : 2 + size]
        used = ram.view(self.queue.used_gpa, 4 + 8 * size + 2)
        self.used_idx_slot = used[:4].view("<u2")[1:2]
        self.used_event_slot = avail[2 + size : 3 + size]
        self.avail_event_slot = used[4 + 8 * size :].view("<u2")
        self.desc_len = ram.view(self.queue.desc_gpa, 16 * size).view(DESC_DTYPE)["len"]
        self.size = size
        self.next = 0  # free-running avail index
        self.heads = np.arange(depth, dtype=np.uint16) * 2
        # Both request layouts as numpy records over the request buffers (40-byte stride).
        self.maps = np.ndarray(
            (depth,),
            dtype=np.dtype(
                {
                    "names": ["type", "domain", "start", "end", "phys", "flags"],
                    "formats": ["u1", "<u4", "<u8", "<u8", "<u8", "<u4"],
                    "offsets": [0, 4, 8, 16, 24, 32],
                    "itemsize": 40,
                }
            ),
            buffer=self.request_bytes,
        )

    def attach(self) -> None:
        self.request_bytes[:36] = 0
        self.request_bytes[: len(encode_attach(DOMAIN, ENDPOINT))] = np.frombuffer(
            encode_attach(DOMAIN, ENDPOINT), np.uint8
        )
        self.queue.write_desc(
            0, self.requests_gpa, len(encode_attach(DOMAIN, ENDPOINT)), VIRTQ_DESC_F_NEXT, 1
        )
        self.submit(1)
        self.queue.write_desc(0, self.requests_gpa, MAP.size, VIRTQ_DESC_F_NEXT, 1)
        assert self.tails[0] == 0, "ATTACH failed"

    def fill(self, kinds: np.ndarray, pages: np.ndarray, first: int = 0) -> None:
        """Requests in chains ``first``...: kinds[i] is 3 (MAP) or 4 (UNMAP) of page pages[i]."""
        n = len(kinds)
        records = self.maps[first : first + n]
        records["type"] = kinds
        records["domain"] = DOMAIN
        starts = pages.astype(np.uint64) * np.uint64(2 * PAGE)
        records["start"] = starts
        records["end"] = starts + np.uint64(PAGE - 1)
        records["phys"] = np.where(kinds == 3, starts, 0)  # UNMAP: the reserved word must be zero
        records["flags"] = np.where(kinds == 3, 3, 0)
        # The readable length follows the type.
        self.desc_len[2 * first : 2 * (first + n) : 2] = np.where(kinds == 3, MAP.size, UNMAP.size)

    def post(self, first: int, n: int) -> int:
        """Make chains first..first+n-1 available and kick if the device asks for it (EVENT_IDX
        avail_event); returns the avail index that completes them."""
        old = self.next
        slots = (old + np.arange(n)) & (self.size - 1)
        self.avail_ring[slots] = self.heads[first : first + n]
        self.next = new = (old + n) & 0xFFFF
        full_fence()  # entries before the index
        self.avail_idx_slot[0] = new
        full_fence()  # our index before the device's avail_event
        if vring_need_event(int(self.avail_event_slot[0]), new, old):
            self.frontend.kick(0)
        return new

    def wait(self, target: int) -> None:
        """Until the chain before avail index ``target`` is used; one notification for it."""
        self.used_event_slot[0] = (target - 1) & 0xFFFF
        full_fence()  # used_event before we look at used.idx, or the notification could be lost
        while 0 < (target - int(self.used_idx_slot[0])) & 0xFFFF < 0x8000:  # not reached yet
            if not self.frontend.wait_used(0, timeout=30):
                raise SystemExit(
                    f"no used notification: used.idx {int(self.used_idx_slot[0])}, want {target}"
                )

    def submit(self, n: int) -> None:
        """Chains 0..n-1: post them and wait until all are used."""
        self.wait(self.post(0, n))

    def statuses(self, n: int, first: int = 0) -> np.ndarray:
        return self.tails[4 * first : 4 * (first + n) : 4]


@dataclass
class Result:
    name: str
    requests: int
    wall: float
    cpu: float
    front_cpu: float
    rtt: list[float] | None = None


def run_phase(
    name: str, driver: Driver, pid: int, batches: int, make: Callable[[int], tuple[np.ndarray, np.ndarray]]
) -> Result:
    """``batches`` half-depth batches, two in flight: the front-end fills one while the back-end serves
    the other, so neither waits for the other's whole turn."""
    half = driver.depth // 2
    in_flight: list[tuple[int, int, int]] = []  # (target, first chain, batch)
    requests = 0
    cpu_before = cpu_ns(pid)
    front_before = time.process_time()
    started = time.perf_counter()

    def retire() -> None:
        target, first, batch = in_flight.pop(0)
        driver.wait(target)
        if driver.statuses(half, first).any():
            raise SystemExit(f"{name}: batch {batch} has failed requests: {driver.statuses(half, first)}")

    for batch in range(batches):
        first = (batch % 2) * half
        if len(in_flight) == 2:
            retire()  # the oldest batch used these chains
        kinds, pages = make(batch)
        driver.fill(kinds, pages, first)
        in_flight.append((driver.post(first, half), first, batch))
        requests += half
    while in_flight:
        retire()
    wall = time.perf_counter() - started
    cpu = (cpu_ns(pid) - cpu_before) / 1e9
    return Result(name, requests, wall, cpu, time.process_time() - front_before)


def run_rtt(driver: Driver, pid: int, rounds: int) -> Result:
    samples = []
    cpu_before = cpu_ns(pid)
    front_before = time.process_time()
    started = time.perf_counter()
    base = 1 << 30  # far from the other phases' pages
    for round_ in range(rounds):
        for kind in (3, 4):
            driver.fill(np.array([kind]), np.array([base + round_]))
            begin = time.perf_counter()
            driver.submit(1)
            samples.append(time.perf_counter() - begin)
    wall = time.perf_counter() - started
    cpu = (cpu_ns(pid) - cpu_before) / 1e9
    return Result("RTT (depth 1)", 2 * rounds, wall, cpu, time.process_time() - front_before, samples)


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/bench-inprocess",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--path", choices=["compiled", "python"], default="compiled")
    parser.add_argument(
        "--depth", type=int, default=256, help="requests in flight (queue depth): two batches of half as many"
    )
    parser.add_argument("--batches", type=int, default=2000, help="batches (of depth / 2) per workload")
    parser.add_argument("--rtt", type=int, default=2000, help="depth-1 MAP+UNMAP round trips")
    parser.add_argument("--backend-cpu", type=int, default=1)
    parser.add_argument("--frontend-cpu", type=int, default=0)
    parser.add_argument(
        "--kick-thread",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="compiled path: serve the requestq from the kick thread or (--no-kick-thread) the event loop "
        "(default: the program's default)",
    )
    parser.add_argument("--poll-us", type=float, default=0.0, help="compiled path: the program's --poll-us")
    parser.add_argument(
        "--control",
        action="store_true",
        help="compiled path: the program serves a control socket (its latency histograms are kept)",
    )
    args = parser.parse_args()
    if args.control and args.path != "compiled":
        parser.error("--control needs the compiled path (the program)")
    extra = [] if args.kick_thread is None else ["--kick-thread" if args.kick_thread else "--no-kick-thread"]
    if args.poll_us:
        extra.append(f"--poll-us={args.poll_us}")
    if args.control:
        extra.append("--control-socket={scratch}/viommu.ctl")
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {args.frontend_cpu})
    depth, batches = args.depth, args.batches
    console = Console(width=max(120, shutil.get_terminal_size().columns))
    with (
        backend_process(args.path, args.backend_cpu, extra) as (process, socket_path, ready),
        GuestRam(RAM_BYTES) as ram,
        Frontend.connect(socket_path) as frontend,
    ):
        driver = Driver(frontend, ram, depth)
        driver.attach()
        half = depth // 2
        pages = np.arange(half)
        results = [
            run_phase("MAP", driver, process.pid, batches, lambda b: (np.full(half, 3), b * half + pages)),
            run_phase("UNMAP", driver, process.pid, batches, lambda b: (np.full(half, 4), b * half + pages)),
        ]
        quarter = half // 2
        mixed_kinds = np.concatenate([np.full(quarter, 3), np.full(half - quarter, 4)])

        def mix(batch: int) -> tuple[np.ndarray, np.ndarray]:
            # Map this batch's pages, unmap the previous batch's (nothing to unmap in the first); the ring
            # keeps them in order even while the previous batch is still in flight.
            return mixed_kinds, np.concatenate(
                [batch * quarter + pages[:quarter], (batch - 1) * quarter + pages[: half - quarter]]
            )

        results.append(run_phase("MIX", driver, process.pid, batches, mix))
        results.append(run_rtt(driver, process.pid, args.rtt))
        ok = int(np.count_nonzero(driver.statuses(1) == 0))
        assert ok == 1, "the last request failed"
        if args.control:
            with ControlClient(os.path.join(os.path.dirname(socket_path), "viommu.ctl")) as control:
                served_by = control.call("queues")[0]["served_by"]
                counters = control.call("counters")
            latency = counters["latency"].get("MAP", {})
            console.print(
                f"control: requestq served by {served_by}; {counters['batches']['count']} batches timed, "
                f"MAP {latency.get('count', 0)} requests, p50 {latency.get('p50_us')} us per request"
            )
    table = Table(
        title=f"vhost-iommu in-process benchmark: {args.path} request path {' '.join(extra)}, depth {depth}, "
        f"back-end on CPU {args.backend_cpu}"
    )
    columns = ("workload", "requests", "req/s", "CPU us/req", "cap req/s", "front-end CPU us/req")
    for column in (*columns, "rtt p50 us", "rtt p99 us"):
        table.add_column(column, justify="right")
    for result in results:
        rtt = sorted(result.rtt) if result.rtt else None
        table.add_row(
            result.name,
            f"{result.requests}",
            f"{result.requests / result.wall:,.0f}",
            f"{result.cpu / result.requests * 1e6:.3f}",
            f"{result.requests / result.cpu:,.0f}" if result.cpu else "-",
            f"{result.front_cpu / result.requests * 1e6:.3f}",
            f"{statistics.median(rtt) * 1e6:.1f}" if rtt else "",
            f"{rtt[int(len(rtt) * 0.99)] * 1e6:.1f}" if rtt else "",
        )
    console.print(table)
    console.print(f"back-end accepted connections {ready * 1000:.0f} ms after launch")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Running a soak: a vhost-iommu back-end process, one guest under QEMU looping its workloads, the control
channel exercised, and the back-end sampled from /proc (docs/soak.md).

The back-end runs as its own process (``vhost-iommu serve``), so the figures are its own and not the
driver's. Both children are killed and reaped on every way out of :func:`run_soak`: the end, an error,
Ctrl-C (KeyboardInterrupt) or a SystemExit raised from a signal handler.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from vhost_iommu.control.client import ControlClient
from vhost_iommu.control.protocol import ControlError
from vhost_iommu.device import Topology
from vhost_iommu.provision.boot import GuestSession, GuestTimeout
from vhost_iommu.provision.errors import ProvisionError
from vhost_iommu.qemu import (
    CommandError,
    IommuKind,
    PciTestDevice,
    QemuSetup,
    VirtioBlockDevice,
    build_command,
)
from vhost_iommu.soak.measure import (
    Findings,
    Growth,
    GuestProgress,
    Limits,
    Sample,
    backend_problems,
    growth,
    guest_errors,
    kernel_trouble,
    needs_reset,
    parse_round,
    process_changes,
    read_backend,
    verdict,
    warmup_seconds,
)
from vhost_iommu.viot import viot_from_topology, viot_topology_from

# One round of the guest's soak job (guest/init, vhost_iommu.soak=): every vfio-dma workload, the disk, a
# rebind. Sized so that a round takes a few seconds under TCG on a loaded machine: progress is smooth and a
# "stop" is obeyed soon.
DEFAULT_PLAN = "pairs:500,bulk:4096,mixed:200,scatter:4096,blk,rebind"
VFIO_ENDPOINT = 0x20  # pci-testdev at 00:04.0: endpoint ID = BDF in the default topology
VFIO_SLOT = 4
DISK_SLOT = 5
DISK_BYTES = 64 << 20
SHUTDOWN_TIMEOUT = 30.0
KILL_AFTER = 5.0  # seconds a back-end gets to stop on SIGTERM when the soak is interrupted
STARTUP_TIMEOUT = 120.0  # a fresh numba cache compiles for a minute on a loaded machine
# How long an injection stays on at most (it ends earlier once the guest has sent what exercises it).
WINDOW_SECONDS = 2.0


@dataclass(frozen=True)
class SoakConfig:
    minutes: float = 30.0
    interval: float = 5.0  # seconds between samples
    warmup: float | None = None  # seconds left out of the growth figures (default: warmup_seconds())
    plan: str = DEFAULT_PLAN
    blk_mb: int = 4
    disk: bool = True
    vq_size: int = 256  # the requestq size, as the benchmarks (QEMU's built-in device has 256)
    memory_mib: int = 1024
    boot_timeout: float = 300.0
    stall_timeout: float = 300.0  # seconds without a completed round that end the soak as failed
    limits: Limits = field(default_factory=Limits)
    # serve --state-dir: a keeper process holds QEMU's connection, a device worker under it serves (both
    # sampled, added up). None: the plain server.
    state_dir: Path | None = None
    backend_args: Sequence[str] = ()  # more `vhost-iommu serve` options

    @property
    def duration(self) -> float:
        return self.minutes * 60.0

    @property
    def warmup_seconds(self) -> float:
        return self.warmup if self.warmup is not None else warmup_seconds(self.duration)


@dataclass
class SoakResult:
    config: SoakConfig
    started: str = ""
    samples: list[Sample] = field(default_factory=list)
    findings: Findings = field(default_factory=Findings)
    growth: Growth | None = None
    reasons: list[str] = field(default_factory=list)
    backend_pid: int | None = None
    qemu_pid: int | None = None
    backend_exit: int | None = None
    job_rc: int | None = None
    final: GuestProgress = field(default_factory=GuestProgress)
    mappings_left: int | None = None
    device_requests: dict[str, int] = field(default_factory=dict)
    actions: dict[str, int] = field(default_factory=dict)  # control-channel actions done, by name
    load_start: tuple[float, float, float] = (0.0, 0.0, 0.0)
    load_end: tuple[float, float, float] = (0.0, 0.0, 0.0)
    wall_seconds: float = 0.0
    interrupted: bool = False

    @property
    def passed(self) -> bool:
        return not self.reasons


class Reporter:
    """What the soak tells its user as it goes (the command line shows it with rich)."""

    def event(self, text: str) -> None:
        """Something happened (a process started, the guest booted, a problem)."""

    def sample(self, sample: Sample, result: SoakResult) -> None:
        """A tick's sample was taken."""


# -- the back-end process ------------------------------------------------------------------------------------


class BackendProcess:
    """``vhost-iommu serve`` in its own session; its log is written to a file and kept for the verdict."""

    def __init__(self, argv: Sequence[str], log: Path) -> None:
        self.lines: list[str] = []
        self.left_behind: list[int] = []
        self._listening = False
        self._news = threading.Event()
        self._log = log.open("w")
        try:
            # Its own session: a Ctrl-C on the terminal reaches the soak only, which stops it in order.
            self._process = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
        except OSError:
            self._log.close()
            raise
        self._reader = threading.Thread(target=self._read, name="backend-log", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._process.stderr is not None
        for raw in self._process.stderr:
            line = raw.rstrip("\n")
            self.lines.append(line)
            self._log.write(raw)
            self._log.flush()
            if "listening on" in line:
                self._listening = True
                self._news.set()
        self._news.set()  # end of the log: the process is ending

    @property
    def pid(self) -> int:
        return self._process.pid

    def running(self) -> bool:
        return self._process.poll() is None

    def wait_listening(self, timeout: float) -> None:
        """Return once the back-end says it listens; ProvisionError if it ends or takes too long."""
        self._news.wait(timeout)
        if not self._listening:
            tail = "\n".join(self.lines[-20:])
            raise ProvisionError(f"the back-end did not start listening within {timeout:.0f} s:\n{tail}")

    def stop(self, timeout: float = SHUTDOWN_TIMEOUT) -> int:
        """SIGTERM, and its exit status; killed (and the status negative) if it does not end in time.
        Processes of its group still there once it has ended (a keeper's device worker) are killed and
        listed in :attr:`left_behind`."""
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(timeout)
        status = self.close()
        self.left_behind = self._group_members()
        for pid in self.left_behind:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return status

    def close(self) -> int:
        """Kill it and everything in its process group if it still runs, reap it, finish its log; safe to
        call twice."""
        if self._process.poll() is None:
            # Asked first: a keeper then stops and reaps its worker itself.
            self._process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(KILL_AFTER)
        if self._process.poll() is None:
            # The group is the session it leads (start_new_session): a keeper's worker goes with it.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._process.pid, signal.SIGKILL)
        status = self._process.wait()
        self._reader.join(timeout=10)
        if self._process.stderr is not None:
            self._process.stderr.close()
        self._log.close()
        return status

    def _group_members(self) -> list[int]:
        """Live processes of the back-end's process group (its pid is the group's id)."""
        members = []
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                stat = Path(f"/proc/{name}/stat").read_text()
            except OSError:
                continue
            state, _parent, group = stat[stat.rindex(")") + 2 :].split()[:3]
            if int(group) == self._process.pid and state != "Z":
                members.append(int(name))
        return members

    def __enter__(self) -> BackendProcess:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()


def trace_directory(scratch: Path) -> Path:
    return scratch / "traces"


def backend_command(socket_path: Path, control_path: Path, extra: Sequence[str] = ()) -> list[str]:
    return [
        sys.executable,
        "-m",
        "vhost_iommu",
        "serve",
        "-v",
        f"--socket-path={socket_path}",
        f"--control-socket={control_path}",
        *extra,
    ]


# -- the control channel's share of the load -------------------------------------------------------------


class ControlExerciser:
    """One control connection per tick: the connections row (for NEEDS_RESET and the request count) and one
    action from a rotation of inspections and injections. Every injection is undone before the tick ends,
    so samples (taken before a tick's connection opens) see no trace file or client socket of ours."""

    def __init__(self, path: Path, scratch: Path) -> None:
        self.path = str(path)
        # The back-end records traces only in its --trace-dir, each to a new name (trace_directory below).
        self._traces = trace_directory(scratch)
        self._trace_windows = 0
        self.actions: list[tuple[str, Callable[[ControlClient], None]]] = [
            ("inspect", self._inspect),
            ("mappings", self._mappings),
            ("fault", self._fault),
            ("translate", self._translate),
            ("inject", self._inject),
            ("delay", self._delay),
            ("trace", self._trace_window),
            ("bypass", self._bypass),
            ("latency-reset", self._latency_reset),
        ]

    def tick(self, index: int) -> tuple[list[dict[str, Any]], str, list[str]]:
        """The connections rows, the name of the action done, and what failed (one line each)."""
        name, action = self.actions[index % len(self.actions)]
        errors: list[str] = []
        rows: list[dict[str, Any]] = []
        try:
            with ControlClient(self.path) as client:
                rows = client.call("connections")
                try:
                    action(client)
                except ControlError as error:
                    errors.append(f"{name}: {error.code}: {error.message}")
                    # Whatever the action left on is turned off, so the next samples are not disturbed.
                    self._undo(client)
        except ControlError as error:
            errors.append(f"connections: {error.code}: {error.message}")
        return rows, name, errors

    @staticmethod
    def _undo(client: ControlClient) -> None:
        for command in ("inject-clear", "trace-stop"):
            with contextlib.suppress(ControlError):
                client.call(command)

    @staticmethod
    def _requests(client: ControlClient) -> tuple[int, int]:
        counters = client.call("counters")
        return sum(counters["requests"].values()), int(counters["injected"])

    def _while_guest_works(self, client: ControlClient, done: Callable[[int, int], bool]) -> None:
        """Hold an injection until ``done(more requests, more injected)`` or WINDOW_SECONDS."""
        requests, injected = self._requests(client)
        deadline = time.monotonic() + WINDOW_SECONDS
        while time.monotonic() < deadline:
            time.sleep(0.1)  # the guest works meanwhile; this only paces the polling
            now_requests, now_injected = self._requests(client)
            if done(now_requests - requests, now_injected - injected):
                return

    @staticmethod
    def _inspect(client: ControlClient) -> None:
        for command in ("endpoints", "domains", "queues", "config", "features", "events", "conformance"):
            client.call(command)

    @staticmethod
    def _mappings(client: ControlClient) -> None:
        after = None
        for _page in range(10):
            page = client.call("mappings", limit=100, after=after)
            after = page["next"]
            if after is None:
                break

    @staticmethod
    def _fault(client: ControlClient) -> None:
        # Delivered to the eventq buffers the driver posted; the guest logs them (not a kernel problem).
        client.call("fault", endpoint=VFIO_ENDPOINT, reason="MAPPING", address=0xDEAD000, access="w", count=2)
        client.call("events")

    @staticmethod
    def _translate(client: ControlClient) -> None:
        client.call("translate", endpoint=VFIO_ENDPOINT, iova=0x1_0000_0000, size=0x1000, access="r")

    def _inject(self, client: ControlClient) -> None:
        # The Linux driver does not look at MAP statuses, so a forced NOMEM only leaves a mapping out of the
        # table (a later UNMAP of it finds nothing, which is fine): harmless to the guest, and it moves every
        # request to the Python path while pending.
        client.call("inject", type="MAP", status="NOMEM", times=3)
        self._while_guest_works(client, lambda requests, injected: injected >= 3)
        client.call("inject-clear")

    def _delay(self, client: ControlClient) -> None:
        client.call("delay", us=200)
        self._while_guest_works(client, lambda requests, injected: requests >= 200)
        client.call("delay", us=0)

    def _trace_window(self, client: ControlClient) -> None:
        self._trace_windows += 1
        name = f"trace-{self._trace_windows}.jsonl"
        client.call("trace-start", name=name, max_bytes=1 << 20, keep=1)
        self._while_guest_works(client, lambda requests, injected: requests >= 200)
        client.call("trace-stop")
        for part in (name, f"{name}.1"):
            (self._traces / part).unlink(missing_ok=True)

    @staticmethod
    def _bypass(client: ControlClient) -> None:
        # Config changes with CONFIG_CHANGE_MSG; bypass only concerns endpoints in no domain, and the
        # endpoints here always have one (VFIO's, or the identity default domain).
        client.call("bypass", value=0)
        client.call("bypass", boot=True)

    @staticmethod
    def _latency_reset(client: ControlClient) -> None:
        client.call("counters")
        client.call("latency-reset")


# -- the soak ------------------------------------------------------------------------------------------------


def _guest_command(config: SoakConfig, scratch: Path, socket_path: Path) -> list[str]:
    from vhost_iommu.provision.guest import ensure_guest
    from vhost_iommu.provision.qemu_build import ensure_qemu

    topology = Topology.default()
    viot = scratch / "viot.bin"
    viot.write_bytes(viot_from_topology(topology))
    endpoints: list[PciTestDevice | VirtioBlockDevice] = [PciTestDevice(slot=VFIO_SLOT)]
    if config.disk:
        disk = scratch / "disk.img"
        with disk.open("wb") as file:
            file.truncate(DISK_BYTES)
        # The disk does real DMA, done by QEMU with guest-physical addresses: it needs an identity domain,
        # which build_command asks for (iommu.passthrough=1); VFIO still gets its own paging domain.
        endpoints.append(VirtioBlockDevice(slot=DISK_SLOT, image=disk))
    image = ensure_guest()
    setup = QemuSetup(
        qemu=ensure_qemu(),
        kernel=image.kernel,
        initrd=image.initrd,
        kernel_args=[
            "vhost_iommu.job=soak",
            f"vhost_iommu.soak={config.plan}",
            f"vhost_iommu.blk_mb={config.blk_mb}",
            "vhost_iommu.hold=1",
        ],
        iommu=IommuKind.VHOST_USER,
        socket_path=socket_path,
        viot_path=viot,
        topology=viot_topology_from(topology),
        endpoints=endpoints,
        memory_mib=config.memory_mib,
        # -global reaches the vhost-user-test-device inside the -pci proxy (as the benchmarks do).
        extra_args=("-global", f"vhost-user-test-device.vq_size={config.vq_size}") if config.vq_size else (),
    )
    return build_command(setup).argv


class _Soak:
    """The steps of one soak over a started back-end and guest; problems land in ``result.findings``."""

    def __init__(
        self,
        config: SoakConfig,
        result: SoakResult,
        backend: BackendProcess,
        guest: GuestSession,
        control: ControlExerciser,
        reporter: Reporter,
    ) -> None:
        self.config = config
        self.result = result
        self.backend = backend
        self.guest = guest
        self.control = control
        self.reporter = reporter
        self.progress = GuestProgress()
        self.last_round = time.monotonic()
        self._seen = 0  # console lines already looked at
        self._done = False  # the guest's soak loop has ended

    def _pump(self, timeout: float) -> None:
        """Read the console for up to ``timeout`` seconds (at least one line's wait) and take its news."""
        with contextlib.suppress(GuestTimeout):
            self.guest.expect("", max(timeout, 0.01))
        lines = self.guest.run.lines
        for line in lines[self._seen :]:
            progress = parse_round(line)
            if progress is not None:
                self.progress = progress
                self.last_round = time.monotonic()
            if "VHOST_IOMMU_SOAK_DONE" in line or "VHOST_IOMMU_JOB_DONE" in line:
                self._done = True
        self._seen = len(lines)

    def boot(self) -> bool:
        self.reporter.event(f"booting the guest (QEMU pid {self.guest.pid})")
        try:
            self.guest.expect(r"VHOST_IOMMU_SOAK_START|VHOST_IOMMU_JOB_DONE", self.config.boot_timeout)
        except GuestTimeout as error:
            self.result.findings.run.append(
                f"the guest's soak job did not start: {str(error).splitlines()[0]}"
            )
            return False
        self._pump(0)
        if self._done:
            self.result.findings.run.append("the guest's job ended before its soak loop started")
            return False
        self.last_round = time.monotonic()
        return True

    def run(self) -> None:
        config = self.config
        started = time.monotonic()
        self.reporter.event(
            f"guest workload started; soaking {config.duration / 60:g} min, "
            f"warm-up {config.warmup_seconds:.0f} s, a sample every {config.interval:g} s"
        )
        index = 0
        while True:
            elapsed = time.monotonic() - started
            if not self._tick(index, elapsed):
                return
            index += 1
            if elapsed >= config.duration:
                return
            # The next multiple of the interval (a tick that overran on a loaded machine skips those it
            # overran), and the last tick at the end of the duration.
            after = int((time.monotonic() - started) / config.interval) + 1
            next_tick = started + min(after * config.interval, config.duration)
            while time.monotonic() < next_tick:
                self._pump(next_tick - time.monotonic())
                if self._stopped():
                    return

    def _stopped(self) -> bool:
        """Whether the soak must end early (recorded as a finding)."""
        run = self.result.findings.run
        if self.guest.console_closed:
            run.append("QEMU exited during the soak")
            return True
        if self._done:
            run.append("the guest's soak loop ended before it was told to stop")
            return True
        if not self.backend.running():
            run.append("the back-end exited during the soak")
            return True
        silent = time.monotonic() - self.last_round
        if silent > self.config.stall_timeout:
            run.append(f"the guest completed no round for {silent:.0f} s")
            return True
        return False

    def _tick(self, index: int, elapsed: float) -> bool:
        try:
            process, pids = read_backend(self.backend.pid)
        except OSError:
            self.result.findings.run.append("the back-end's process is gone")
            return False
        rows, action, errors = self.control.tick(index)
        self.result.actions[action] = self.result.actions.get(action, 0) + 1
        self.result.findings.control += [f"at {elapsed:.0f} s: {error}" for error in errors]
        for reason in needs_reset(rows):
            if reason not in self.result.findings.needs_reset:
                self.result.findings.needs_reset.append(reason)
        if len(rows) != 1 and not any("connections:" in error for error in errors):
            self.result.findings.run.append(f"at {elapsed:.0f} s: {len(rows)} front-end connections, not 1")
        requests = int(rows[0]["requests"]) if len(rows) == 1 else -1
        sample = Sample(elapsed, process, self.progress, requests, os.getloadavg(), pids)
        self.result.samples.append(sample)
        self.reporter.sample(sample, self.result)
        return True

    def finish(self) -> None:
        """Tell the guest to stop, check what the device holds once VFIO has closed, let the guest end."""
        result = self.result
        if self.guest.console_closed:
            return
        try:
            self.guest.send("stop")
            self.guest.expect(r"VHOST_IOMMU_SOAK_DONE", self.config.stall_timeout)
            self.guest.expect(r"VHOST_IOMMU_HOLD", 60)
            # VFIO has closed its container: its domain is gone, and the identity domains hold no mappings.
            with ControlClient(self.control.path) as client:
                domains = client.call("domains")
                result.mappings_left = sum(int(row["mappings"]) for row in domains)
                result.device_requests = client.call("counters")["requests"]
                for reason in needs_reset(client.call("connections")):
                    if reason not in result.findings.needs_reset:
                        result.findings.needs_reset.append(reason)
            if result.mappings_left:
                result.findings.run.append(f"{result.mappings_left} mappings left after VFIO closed")
            self.guest.send("")
            run = self.guest.wait(60)
            result.job_rc = run.job_rc
        except (GuestTimeout, ProvisionError, ControlError) as error:
            result.findings.run.append(f"the guest did not finish cleanly: {str(error).splitlines()[0]}")
        self._pump(0)
        result.final = self.progress


def run_soak(config: SoakConfig, output: Path, reporter: Reporter | None = None) -> SoakResult:
    """Run one soak, writing console.log and backend.log into ``output``; the result holds the verdict."""
    reporter = reporter or Reporter()
    output.mkdir(parents=True, exist_ok=True)
    result = SoakResult(
        config=config,
        started=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        load_start=os.getloadavg(),
    )
    began = time.monotonic()
    try:
        with contextlib.ExitStack() as stack:
            # A short directory: unix socket paths are limited to 108 bytes.
            scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="vhost-soak-")))
            socket_path, control_path = scratch / "viommu.sock", scratch / "control.sock"
            argv = _guest_command(config, scratch, socket_path)
            options = [f"--trace-dir={trace_directory(scratch)}", *config.backend_args]
            if config.state_dir is not None:
                # The keeper cannot keep vfio-user endpoints across a worker restart: the IOMMU alone.
                options += [f"--state-dir={config.state_dir}", "--no-devices"]
            command = backend_command(socket_path, control_path, options)
            backend = stack.enter_context(BackendProcess(command, output / "backend.log"))
            result.backend_pid = backend.pid
            reporter.event(f"back-end pid {backend.pid}: vhost-iommu {' '.join(command[3:])}")
            backend.wait_listening(STARTUP_TIMEOUT)
            guest = stack.enter_context(GuestSession(argv, log=output / "console.log"))
            result.qemu_pid = guest.pid
            soak = _Soak(config, result, backend, guest, ControlExerciser(control_path, scratch), reporter)
            if soak.boot():
                soak.run()
                soak.finish()
            guest.close()
            result.backend_exit = backend.stop()
            if backend.left_behind:
                result.findings.run.append(f"processes left after the back-end exited: {backend.left_behind}")
            if result.backend_exit != 0:
                result.findings.run.append(
                    f"the back-end exited with status {result.backend_exit} on SIGTERM"
                )
    except (ProvisionError, CommandError, OSError) as error:
        result.findings.run.append(f"{type(error).__name__}: {error}")
    except KeyboardInterrupt:
        # Ctrl-C (or SIGTERM, which the command line turns into the same): the children are gone by now
        # (the exit stack), and what was measured so far is still worth a report.
        result.interrupted = True
        result.findings.run.append("interrupted")
    finally:
        result.wall_seconds = time.monotonic() - began
        result.load_end = os.getloadavg()
    _judge(result, output)
    return result


def _judge(result: SoakResult, output: Path) -> None:
    console = output / "console.log"
    lines = console.read_text(errors="replace").splitlines() if console.exists() else []
    findings = result.findings
    findings.kernel = kernel_trouble(lines)
    findings.guest_errors = guest_errors(lines)
    log = output / "backend.log"
    findings.backend_log = backend_problems(
        log.read_text(errors="replace").splitlines() if log.exists() else []
    )
    if result.job_rc not in (0, None) and not findings.guest_errors:
        findings.run.append(f"the guest's job ended with rc={result.job_rc}")
    findings.run += process_changes(result.samples)
    result.growth = growth(result.samples, result.config.warmup_seconds)
    result.reasons = verdict(result.growth, findings, result.config.limits)

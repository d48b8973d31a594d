"""Booting the test guest under QEMU and talking to its serial console, for tests and for people.

:class:`GuestSession` runs one QEMU, reads its console line by line on a thread, and lets the caller wait
for a line matching a pattern (:meth:`GuestSession.expect`) and type lines (:meth:`GuestSession.send`):
the guest's ``vfio-steps`` job waits for a line after each step, so a host test can look at the back-end
between steps. Every wait has a deadline; QEMU is killed when the session ends, whatever happened.

``python -m vhost_iommu.provision.boot --help`` boots one job and prints timings.
"""

from __future__ import annotations

import argparse
import contextlib
import queue
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from vhost_iommu.provision.errors import ProvisionError

JOB_DONE = re.compile(r"VHOST_IOMMU_JOB_DONE rc=(?P<rc>\d+)")
MARKERS = ("VHOST_IOMMU_BOOTED", "VHOST_IOMMU_JOB_START", "VHOST_IOMMU_JOB_DONE")
_FIELD = re.compile(r'(\w+)=("[^"]*"|\S*)')
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1bc")


class GuestTimeout(ProvisionError):
    """The guest did not print what was expected in time; the message ends with the console's tail."""


def parse_fields(line: str) -> dict[str, str]:
    """``key=value`` pairs of a marker line (quotes around a value are dropped)."""
    return {key: value.strip('"') for key, value in _FIELD.findall(line)}


@dataclass
class GuestRun:
    """What one boot printed and how long it took (seconds since QEMU started)."""

    argv: list[str]
    lines: list[str] = field(default_factory=list)
    marks: dict[str, float] = field(default_factory=dict)
    returncode: int | None = None
    job_rc: int | None = None
    elapsed: float = 0.0

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def marker_lines(self, prefix: str) -> list[str]:
        """Lines whose text starts with ``prefix`` (kernel messages can precede it on the same line)."""
        return [line[line.index(prefix) :] for line in self.lines if prefix in line]

    def records(self, prefix: str) -> list[dict[str, str]]:
        """The ``key=value`` fields of every ``prefix`` line."""
        return [parse_fields(line) for line in self.marker_lines(prefix)]


class GuestSession:
    """One running QEMU whose console can be read and written; a context manager that always kills it."""

    def __init__(self, argv: Sequence[str], *, log: Path | None = None, echo: bool = False) -> None:
        self.run = GuestRun(list(argv))
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._started = time.monotonic()
        self._echo = echo
        self._console_closed = False
        self._log = log.open("w") if log is not None else None
        try:
            self._process = subprocess.Popen(
                list(argv),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                bufsize=0,
            )
        except OSError as error:
            if self._log is not None:
                self._log.close()
            raise ProvisionError(f"cannot start {argv[0]}: {error}") from error
        self._reader = threading.Thread(target=self._read, name="guest-console", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._process.stdout is not None
        for raw in self._process.stdout:
            line = _ANSI.sub("", raw.decode(errors="replace")).rstrip("\r\n")
            self._lines.put(line)
        self._lines.put(None)

    def _take(self, line: str) -> None:
        now = time.monotonic() - self._started
        self.run.lines.append(line)
        for marker in MARKERS:
            if marker in line and marker not in self.run.marks:
                self.run.marks[marker] = now
        done = JOB_DONE.search(line)
        if done:
            self.run.job_rc = int(done["rc"])
        if self._log is not None:
            self._log.write(line + "\n")
            self._log.flush()
        if self._echo:
            print(line, flush=True)

    def expect(self, pattern: str | re.Pattern[str], timeout: float) -> re.Match[str]:
        """Consume console lines until one matches ``pattern``; raise :class:`GuestTimeout` on the deadline
        or when QEMU exits first."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise GuestTimeout(
                    f"no line matching {regex.pattern!r} within {timeout:.0f} s\n{self._tail()}"
                )
            try:
                line = self._lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                self._console_closed = True
                self._lines.put(None)  # keep the end visible to later calls
                raise GuestTimeout(f"QEMU exited before a line matched {regex.pattern!r}\n{self._tail()}")
            self._take(line)
            match = regex.search(line)
            if match:
                return match

    @property
    def pid(self) -> int:
        """QEMU's process ID."""
        return self._process.pid

    @property
    def console_closed(self) -> bool:
        """Whether :meth:`expect` has met the end of QEMU's console (QEMU has exited or is exiting)."""
        return self._console_closed

    def send(self, line: str) -> None:
        """Type ``line`` (and Enter) on the guest's console."""
        # Once the console has closed QEMU is exiting, though it may not be reaped yet (poll() says running).
        if self._process.stdin is None or self._console_closed or self._process.poll() is not None:
            raise ProvisionError("the guest is not running")
        try:
            self._process.stdin.write(line.encode() + b"\n")
            self._process.stdin.flush()
        except BrokenPipeError as error:
            raise ProvisionError(f"the guest exited before reading {line!r}\n{self._tail()}") from error

    def wait(self, timeout: float) -> GuestRun:
        """Read to the end of the job (or QEMU's exit) and return the run; :class:`GuestTimeout` if late."""
        try:
            self.expect(JOB_DONE, timeout)
        except GuestTimeout:
            if not self._console_closed:
                raise
            # QEMU exited before the job's end (it printed why): that is an answer, a hang is not. Its
            # console closes a moment before it can be reaped.
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.run.returncode = self._process.wait(timeout=10)
            return self.run
        self._drain(deadline=time.monotonic() + 30)
        return self.run

    def _drain(self, deadline: float) -> None:
        # After JOB_DONE the guest powers off; collect what it prints until QEMU exits.
        while time.monotonic() < deadline:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                self._lines.put(None)
                break
            self._take(line)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.run.returncode = self._process.wait(timeout=max(0.1, deadline - time.monotonic()))

    def _tail(self, count: int = 30) -> str:
        return "--- last console lines ---\n" + "\n".join(self.run.lines[-count:])

    def close(self) -> None:
        if self._process.poll() is None:
            self._process.kill()
        self._process.wait()
        self.run.returncode = self._process.returncode
        self.run.elapsed = time.monotonic() - self._started
        # QEMU is gone, so the reader meets the end of its output; let it finish before closing the pipe.
        self._reader.join(timeout=5)
        for stream in (self._process.stdin, self._process.stdout):
            if stream is not None:
                stream.close()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> GuestSession:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()


def run_job(argv: Sequence[str], *, timeout: float, log: Path | None = None, echo: bool = False) -> GuestRun:
    """Boot, run the job named on the kernel command line to its end, power off; returns the run."""
    with GuestSession(argv, log=log, echo=echo) as session:
        session.wait(timeout)
    return session.run


def main(argv: list[str] | None = None) -> int:
    """Boot the guest once with a chosen IOMMU and job; print the console and the timings."""
    from vhost_iommu.qemu import CommandError, IommuKind

    parser = argparse.ArgumentParser(prog="python -m vhost_iommu.provision.boot", description=main.__doc__)
    parser.add_argument("--iommu", choices=[kind.value for kind in IommuKind], default="builtin")
    parser.add_argument("--socket-path", type=Path, help="the back-end's socket (--iommu vhost-user)")
    parser.add_argument(
        "--viot", type=Path, help="where to write the VIOT (--iommu vhost-user; default: a temp file)"
    )
    parser.add_argument(
        "--job", default="probe", help="probe, vfio-bench, vfio-steps, vfio-info, blk-io, shell"
    )
    parser.add_argument("--param", action="append", default=[], help="vhost_iommu.NAME=VALUE, as NAME=VALUE")
    parser.add_argument("--kernel-arg", action="append", default=[], help="another kernel argument")
    parser.add_argument("--testdev-slot", type=lambda text: int(text, 0), default=4, help="pci-testdev slot")
    parser.add_argument(
        "--blk-image", type=Path, help="attach a virtio-blk disk with this raw image (slot 5)"
    )
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--print-command", action="store_true", help="print the command as a script and stop")
    args = parser.parse_args(argv)
    try:
        with tempfile.TemporaryDirectory(prefix="vhost-iommu-boot-") as scratch:
            return _boot(args, Path(scratch))
    except (ProvisionError, CommandError, OSError) as error:
        print(f"boot: {error}", file=sys.stderr)
        return 2


def _boot(args: argparse.Namespace, scratch: Path) -> int:
    from vhost_iommu.provision.guest import ensure_guest
    from vhost_iommu.provision.qemu_build import ensure_qemu
    from vhost_iommu.qemu import IommuKind, PciTestDevice, QemuSetup, VirtioBlockDevice, build_command
    from vhost_iommu.viot import default_topology, write_viot

    endpoints: list[PciTestDevice | VirtioBlockDevice] = [PciTestDevice(args.testdev_slot)]
    if args.blk_image:
        endpoints.append(VirtioBlockDevice(5, args.blk_image))
    kind = IommuKind(args.iommu)
    viot = None
    if kind is IommuKind.VHOST_USER:
        viot = write_viot(default_topology(), args.viot or scratch / "viot.bin")
    image = ensure_guest()
    setup = QemuSetup(
        qemu=ensure_qemu(),
        kernel=image.kernel,
        initrd=image.initrd,
        kernel_args=[
            f"vhost_iommu.job={args.job}",
            *(f"vhost_iommu.{parameter}" for parameter in args.param),
            *args.kernel_arg,
        ],
        iommu=kind,
        socket_path=args.socket_path,
        viot_path=viot,
        endpoints=endpoints,
    )
    command = build_command(setup)
    if args.print_command:
        print(command.shell_script())
        return 0
    if args.job == "shell":
        return subprocess.call(command.argv)
    run = run_job(command.argv, timeout=args.timeout, echo=True)
    marks = ", ".join(
        f"{name.removeprefix('VHOST_IOMMU_').lower()} {when:.1f} s" for name, when in run.marks.items()
    )
    print(
        f"# wall clock from QEMU start: {marks}; QEMU exit {run.returncode}; job rc {run.job_rc}",
        file=sys.stderr,
    )
    return 0 if run.job_rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

"""A real guest doing VFIO work one step at a time against ``vhost-iommu --state-dir`` (the keeper and its
device worker), whose worker is killed and upgraded under it.

Shared by tests/test_e2e_worker_restart.py, which asserts what must hold (every step completes, QEMU
never sees a disconnect), and scripts/bench-restart, which prints the guest-visible pause of each restart.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Sequence
from pathlib import Path

from vhost_iommu.device import Topology
from vhost_iommu.harness.keeper_process import KeeperProcess
from vhost_iommu.machine import Arch
from vhost_iommu.provision.arch import guest_arch
from vhost_iommu.provision.boot import GuestRun, GuestSession, parse_fields
from vhost_iommu.provision.devicetree import describe_topology
from vhost_iommu.provision.guest import ensure_guest
from vhost_iommu.provision.klog import KLOG_PREFIX, kernel_trouble
from vhost_iommu.provision.paths import repo_root
from vhost_iommu.provision.qemu_build import ensure_qemu
from vhost_iommu.qemu import IommuKind, PciTestDevice, QemuSetup, build_command

BOOT_TIMEOUT = 240.0
STEP_TIMEOUT = 90.0
GUEST_MEMORY_MIB = 512

NO_RESTART = "no restart (a step's own time)"
KILL_BETWEEN = "kill between requests"
KILL_IN_FLIGHT = "kill with a request in flight"
UPGRADE = "upgrade"
EVENTS = (NO_RESTART, KILL_BETWEEN, KILL_IN_FLIGHT, UPGRADE)
"""What :func:`restarts_under_steps` times, in its order."""


def keeper_options() -> tuple[str, ...]:
    """The back-end options that make the keeper's workers serve the default topology of the machine
    :func:`boot` boots ($VHOST_IOMMU_GUEST_ARCH): none on x86_64 (the back-end's own default); on arm64 the
    shipped arm-virt preset, its vfio-user devices left out (a keeper serves none)."""
    if guest_arch().machine is Arch.X86_64:
        return ()
    return ("--topology", str(repo_root() / "qemu-configs" / "topologies" / "arm-virt.toml"), "--no-devices")


def boot(directory: Path, socket_path: str, job: str, **params: str) -> GuestSession:
    """The guest's ``job`` (with ``vhost_iommu.<name>=<value>`` for ``params``), its IOMMU the vhost-user
    device on ``socket_path`` and pci-testdev at 00:04.0 for VFIO; held at the end (``vhost_iommu.hold``)."""
    arch = guest_arch()  # $VHOST_IOMMU_GUEST_ARCH; the back-end must serve that machine's default topology
    qemu, image = ensure_qemu(arch), ensure_guest(arch=arch)
    setup = QemuSetup(
        qemu=qemu,
        kernel=image.kernel,
        initrd=image.initrd,
        kernel_args=[f"vhost_iommu.job={job}", "vhost_iommu.hold=1"]
        + [f"vhost_iommu.{name}={value}" for name, value in params.items()],
        iommu=IommuKind.VHOST_USER,
        socket_path=Path(socket_path),
        endpoints=(PciTestDevice(slot=4),),
        memory_mib=GUEST_MEMORY_MIB,
    )
    setup = describe_topology(setup, Topology.default(arch.machine), directory)
    return GuestSession(build_command(setup).argv, log=directory / f"console-{job}.log")


def finish_job(guest: GuestSession) -> GuestRun:
    """Let a held guest (``boot``'s) finish; check its job's exit status and its kernel log since the
    job began (VHOST_IOMMU_KLOG lines, levels 0-4): no soft lockup, stall, oops or warning, and no
    virtio_iommu message at all. The run, for more checks."""
    guest.send("")
    run = guest.wait(STEP_TIMEOUT)
    assert run.job_rc == 0, run.output[-3000:]
    klog = run.marker_lines(KLOG_PREFIX)
    bad = kernel_trouble(klog) + [line for line in klog if "virtio_iommu" in line or "WARNING:" in line]
    assert not bad, bad
    return run


class VfioSteps:
    """The guest's ``vfio-steps`` job (guest/vfio-dma.c): one command typed on the console, one VFIO_STEP
    line and a VFIO_STEP_READY back. Waits for the job's first READY."""

    def __init__(self, guest: GuestSession) -> None:
        self.guest = guest
        self.sequence = 0
        guest.expect(r"VFIO_STEP_READY seq=0", BOOT_TIMEOUT)

    def begin(self, command: str) -> None:
        """Type the next command; :meth:`end` waits for its result."""
        self.sequence += 1
        self.guest.send(command)

    def end(self) -> dict[str, str]:
        """The fields of the current command's VFIO_STEP line, once the job is ready again; it must have
        succeeded."""
        line = self.guest.expect(rf"VFIO_STEP seq={self.sequence} .*", STEP_TIMEOUT)[0]
        fields = parse_fields(line)
        self.guest.expect(rf"VFIO_STEP_READY seq={self.sequence}", STEP_TIMEOUT)
        assert fields["rc"] == "0", fields
        return fields

    def step(self, command: str) -> dict[str, str]:
        self.begin(command)
        return self.end()


def kill_in_flight(keeper: KeeperProcess, steps: VfioSteps, command: str) -> None:
    """Stop the worker, type ``command`` (its request reaches the ring and the guest's driver waits), kill
    the worker once the guest has notified the device; :meth:`VfioSteps.end` then waits for the result,
    which the next worker serves."""
    stopped = keeper.stop_worker()
    steps.begin(command)
    assert stopped.wait_kicked(STEP_TIMEOUT), "the guest's request never reached the stopped worker"
    stopped.kill()


def restarts_under_steps(keeper: KeeperProcess, steps: VfioSteps, iovas: Sequence[int]) -> dict[str, float]:
    """Map 64 KiB at each of six ``iovas``, one step at a time, with the worker killed between requests,
    killed with a request in flight, and upgraded (SIGHUP); each restart must bring another worker. With
    ``--spare-worker`` each kill waits for the spare to be loaded first. Returns the guest-visible pause
    of each of EVENTS in seconds: from the kill (or the upgrade's hand-over) to the next step's result,
    which includes the step itself and the console's round trip."""
    spare = "--spare-worker" in keeper.command
    pauses: dict[str, float] = {}

    def timed(event: str, command: str) -> None:
        started = time.monotonic()
        steps.step(command)
        pauses[event] = time.monotonic() - started

    def spare_ready(count: int) -> None:
        # Kills closer together than a worker's start-up fall back to a fresh process, as without a spare.
        if spare:
            keeper.wait_for("ready as the spare", count)

    for iova in iovas[:2]:
        steps.step(f"map {iova:#x} 0x10000 rw")
    timed(NO_RESTART, f"map {iovas[2]:#x} 0x10000 rw")
    spare_ready(1)

    # Between requests: the guest is idle while the worker dies; its next MAP is served by the next.
    first = keeper.kill_worker()
    timed(KILL_BETWEEN, f"map {iovas[3]:#x} 0x10000 rw")
    assert keeper.worker() != first

    # With a request in flight: on the ring, the guest's driver waiting for it, when the worker dies.
    spare_ready(2)
    kill_in_flight(keeper, steps, f"map {iovas[4]:#x} 0x2000 r")
    started = time.monotonic()
    steps.end()
    pauses[KILL_IN_FLIGHT] = time.monotonic() - started
    keeper.wait_for("session taken over", 2)

    # An upgrade: the new worker loads while the old one serves; the hand-over is the pause.
    old = keeper.worker()
    keeper.process.send_signal(signal.SIGHUP)
    keeper.wait_for("suspended for the upgrade")
    timed(UPGRADE, f"map {iovas[5]:#x} 0x10000 rw")
    assert keeper.worker() != old
    return pauses

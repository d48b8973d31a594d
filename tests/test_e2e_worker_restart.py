"""End to end: the device worker is SIGKILLed (and upgraded) under a real QEMU guest doing VFIO work.

``vhost-iommu serve --state-dir`` runs as its own process: the keeper holds QEMU's vhost-user connection,
the device worker serves it. The guest binds 00:04.0 to vfio-pci and maps and unmaps IOVAs (vfio-steps,
one command at a time; vfio-bench, a stream of single-page map+unmap pairs) while the test kills the
worker between requests, with a request in flight, under a stream of them, and asks for an upgrade
(SIGHUP). What must hold: QEMU never sees a disconnect (it keeps running and says nothing of vhost-user),
every guest operation completes, and the guest finishes its job with no soft lockup, RCU stall, oops or
warning in its kernel log. (scripts/bench-restart measures the guest-visible pause of each restart on the
same scenario.) ``-m "not e2e"`` leaves it out.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vhost_iommu.bench.restart import (
    BOOT_TIMEOUT,
    STEP_TIMEOUT,
    VfioSteps,
    boot,
    finish_job,
    keeper_options,
    kill_in_flight,
    restarts_under_steps,
)
from vhost_iommu.control.client import ControlClient
from vhost_iommu.control.protocol import ControlError
from vhost_iommu.harness.keeper_process import KeeperProcess, poll_until
from vhost_iommu.provision.boot import GuestSession

pytestmark = pytest.mark.e2e


@pytest.fixture
def directory() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="vhost-wr-") as path:  # short: socket paths <= 108 bytes
        yield Path(path)


@pytest.fixture(params=[False, True], ids=["fresh-worker", "spare-worker"])
def keeper(directory: Path, request: pytest.FixtureRequest) -> Iterator[KeeperProcess]:
    """The program with --state-dir; a worker that dies is replaced by a process started then, or (with
    --spare-worker) by one loaded ahead and waiting."""
    spare = ("--spare-worker",) if request.param else ()
    program = KeeperProcess(str(directory), *spare, *keeper_options(), backend="iommu", timeout=STEP_TIMEOUT)
    try:
        yield program
    finally:
        program.close()
        print("--- the keeper's log ---\n" + program.log[-6000:])  # shown when the test fails


def requests_served(control: str) -> int:
    """Requests the current worker's device served (0 while no worker answers the control channel)."""
    try:
        with ControlClient(control) as client:
            return sum(row["requests"] for row in client.call("connections"))
    except (OSError, ControlError):
        return 0


def finish(guest: GuestSession, keeper: KeeperProcess) -> None:
    """Let the guest finish; check its job, its kernel log, QEMU's silence about vhost-user, and that the
    keeper still holds the connection QEMU made at boot."""
    assert keeper.process.poll() is None
    run = finish_job(guest)
    # QEMU prefixes what it reports with its program name ("...: Failed to read msg header", "vhost lost
    # connection to the backend", an assertion before an abort).
    qemu_said = [line for line in run.lines if line.startswith("qemu-system")]
    assert not qemu_said, qemu_said
    assert "connection 1 on" in keeper.log and "connection 2 on" not in keeper.log  # never reconnected


@pytest.mark.every_kernel
@pytest.mark.every_arch
def test_worker_killed_between_and_during_vfio_steps_and_upgraded(
    directory: Path, keeper: KeeperProcess
) -> None:
    with boot(directory, keeper.socket, "vfio-steps") as guest:
        steps = VfioSteps(guest)
        iovas = [0x1_0000_0000 + index * 0x10_0000 for index in range(6)]
        # Each step must succeed and each restart bring another worker; the pauses are the benchmark's.
        restarts_under_steps(keeper, steps, iovas)
        for iova in iovas:
            steps.step(f"unmap {iova:#x} 0x10000")
        guest.send("quit")
        guest.expect(r"VFIO_STEPS_DONE .*failures=0", STEP_TIMEOUT)
        guest.expect(r"VHOST_IOMMU_HOLD rc=0", STEP_TIMEOUT)
        assert requests_served(keeper.control) > 0  # the last worker serves the control channel too
        finish(guest, keeper)


def test_worker_killed_twice_under_a_stream_of_vfio_requests(directory: Path, keeper: KeeperProcess) -> None:
    with boot(directory, keeper.socket, "vfio-bench", bench="pairs,bulk:2048", count="30000") as guest:
        guest.expect(r"VFIO_OPEN", BOOT_TIMEOUT)
        deadline = time.monotonic() + STEP_TIMEOUT
        # Kill each worker once it has served some of the stream (its own counters start at zero). Polled:
        # the count is the control channel's answer when asked, and the guest prints nothing until the end.
        for killed in (1, 2):
            served = poll_until(
                lambda: requests_served(keeper.control) >= 400, deadline - time.monotonic(), 0.05
            )
            assert served, keeper.log[-2000:]
            keeper.kill_worker()
            keeper.wait_for("session taken over", killed)
        guest.expect(r"VFIO_BULK_UNMAP n=2048", STEP_TIMEOUT * 2)
        guest.expect(r"VHOST_IOMMU_HOLD rc=0", STEP_TIMEOUT)
        finish(guest, keeper)
        assert os.path.exists(keeper.socket)


def device_mappings(control: str) -> list[tuple[int, int, int]]:
    """(IOVA start, IOVA end, flags) of 00:04.0's domain's mappings, as the serving worker holds them."""
    with ControlClient(control, timeout=STEP_TIMEOUT) as client:
        rows = client.call("mappings", endpoint=0x20, limit=1000)["mappings"]
    return sorted((row["iova_start"], row["iova_end"], row["flags"]) for row in rows)


def test_every_mapping_survives_worker_kills(directory: Path) -> None:
    """The device state half (RestorableBackend: the persisted domains and mappings): after each kill,
    the next worker holds exactly the mappings the guest made, a MAP in flight at the kill included once."""
    from vhost_iommu.backend import RestorableBackend
    from vhost_iommu.virtio_iommu import VirtioIommuBackend

    if not isinstance(VirtioIommuBackend(), RestorableBackend):
        pytest.skip("VirtioIommuBackend does not restore its device state yet (RestorableBackend)")
    program = KeeperProcess(str(directory), "--spare-worker", backend="iommu", timeout=STEP_TIMEOUT)
    try:
        with boot(directory, program.socket, "vfio-steps") as guest:
            steps = VfioSteps(guest)
            iovas = [0x1_0000_0000 + index * 0x10_0000 for index in range(4)]
            for iova in iovas[:3]:
                steps.step(f"map {iova:#x} 0x10000 rw")
            before = device_mappings(program.control)
            assert {start for start, _end, _flags in before} >= set(iovas[:3])
            program.kill_worker(wait_takeover=True)
            assert device_mappings(program.control) == before

            # A MAP on the ring, not served, when the worker dies: served once by the next one.
            kill_in_flight(program, steps, f"map {iovas[3]:#x} 0x10000 rw")
            steps.end()
            after = device_mappings(program.control)
            assert [m for m in after if m not in before] and all(m in after for m in before)
            assert {start for start, _end, _flags in after} >= set(iovas)

            for iova in iovas:
                steps.step(f"unmap {iova:#x} 0x10000")
            assert [m for m in device_mappings(program.control) if m[0] in iovas] == []
            guest.send("quit")
            guest.expect(r"VHOST_IOMMU_HOLD rc=0", STEP_TIMEOUT)
            finish(guest, program)
    finally:
        program.close()
        print("--- the keeper's log ---\n" + program.log[-6000:])

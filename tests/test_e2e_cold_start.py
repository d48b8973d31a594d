"""End to end: the real program started from an empty numba cache serves a real Linux guest from its boot.

``vhost-iommu --socket-path`` with ``NUMBA_CACHE_DIR`` pointing at an empty directory: the socket listens
at once, the guest's driver probes, attaches and maps through the Python path (the kernels' interpreted
twins) while the kernels compile in the background, the compiled path takes over, and the guest's VFIO
steps keep succeeding on both sides of the switch with nothing in its kernel log. ``-m "not e2e"``
leaves it out.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from vhost_iommu.bench.restart import STEP_TIMEOUT, VfioSteps, boot, finish_job
from vhost_iommu.control.client import ControlClient
from vhost_iommu.harness.keeper_process import ProgramProcess

pytestmark = pytest.mark.e2e

COMPILING_LINE = "compiling the request kernels in the background"
COMPILED_LINE = "the compiled path serves from now on"
COMPILE_TIMEOUT = 900.0  # a full compile on a loaded 2-core machine, beside a TCG guest


@pytest.fixture
def directory() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="vhost-cold-") as path:  # short: socket paths <= 108 bytes
        yield Path(path)


def requestq_path(control: Path) -> str:
    with ControlClient(str(control)) as client:
        path: str = client.call("queues")[0]["path"]
    return path


def test_a_guest_is_served_from_its_boot_while_the_kernels_compile(directory: Path) -> None:
    sock, control = directory / "s", directory / "ctl"
    program = ProgramProcess(
        [sys.executable, "-m", "vhost_iommu", f"--socket-path={sock}", f"--control-socket={control}"],
        timeout=STEP_TIMEOUT,
        env={**os.environ, "NUMBA_CACHE_DIR": str(directory / "numba-cache")},
    )
    try:
        program.wait_for(COMPILING_LINE)
        with boot(directory, str(sock), "vfio-steps") as guest:
            steps = VfioSteps(guest)  # the driver probed and attached; the job holds 00:04.0 through VFIO
            paths = [requestq_path(control)]
            iovas = [0x1_0000_0000 + index * 0x10_0000 for index in range(4)]
            for iova in iovas[:2]:
                steps.step(f"map {iova:#x} 0x10000 rw")
            program.timeout = COMPILE_TIMEOUT
            program.wait_for(COMPILED_LINE)
            paths.append(requestq_path(control))
            for iova in iovas[2:]:
                steps.step(f"map {iova:#x} 0x10000 rw")
            for iova in iovas:  # two mapped by each path, unmapped by the compiled one
                steps.step(f"unmap {iova:#x} 0x10000")
            guest.send("quit")
            guest.expect(r"VFIO_STEPS_DONE .*failures=0", STEP_TIMEOUT)
            guest.expect(r"VHOST_IOMMU_HOLD rc=0", STEP_TIMEOUT)
            finish_job(guest)
        print(f"\nthe requestq's path at the first VFIO step, then after the switch: {paths}")
        assert paths[-1] == "compiled"
        assert program.log.count(COMPILING_LINE) == 1 and program.log.count(COMPILED_LINE) == 1
        assert program.terminate() == 0
    finally:
        program.close()
        print("--- the program's log ---\n" + program.log[-4000:])

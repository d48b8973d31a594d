"""End to end: every mapping a real guest made is intact after the device worker is SIGKILLed.

``vhost-iommu serve --state-dir`` under a real QEMU guest doing VFIO (vfio-steps, one command at a time;
the boot and guest checks of tests/test_e2e_worker_restart.py). Before and after each kill (between
requests, and with a MAP in flight) the device's whole mapping table, read through the control channel
from the worker serving at that moment, must be what it was plus exactly what the guest mapped since:
same IOVA ranges, same guest-physical addresses, same flags. A MAP executed twice would not show (the
device refuses the overlap and the driver does not check MAP statuses), but a lost one would, and so
would a replay that rebuilt the table wrongly. ``-m "not e2e"`` leaves it out.
"""

from __future__ import annotations

import itertools
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_e2e_worker_restart import BOOT_TIMEOUT, STEP_TIMEOUT, boot, directory, finish

from vhost_iommu.control.client import ControlClient
from vhost_iommu.harness.keeper_process import KeeperProcess
from vhost_iommu.provision.boot import parse_fields

pytestmark = pytest.mark.e2e
__all__ = ["directory"]  # the fixture, shared with test_e2e_worker_restart.py
EP = 0x20  # 00:04.0, bound to vfio-pci by the guest
Row = tuple[int, int, int, int]


@pytest.fixture
def keeper(directory: Path) -> Iterator[KeeperProcess]:
    program = KeeperProcess(str(directory), backend="iommu", timeout=STEP_TIMEOUT)
    try:
        yield program
    finally:
        program.close()
        print("--- the keeper's log ---\n" + program.log[-6000:])  # shown when the test fails


def table(keeper: KeeperProcess) -> set[Row]:
    """(iova_start, iova_end, phys, flags) of every mapping of the endpoint's domain, as the serving
    worker's device holds them."""
    rows: set[Row] = set()
    after = None
    with ControlClient(keeper.control) as client:
        while True:
            page = client.call("mappings", endpoint=EP, limit=1000, after=after)
            rows |= {(m["iova_start"], m["iova_end"], m["phys"], m["flags"]) for m in page["mappings"]}
            after = page["next"]
            if after is None:
                return rows


def new_rows(before: set[Row], after: set[Row], iova: int, size: int, flags: int) -> None:
    """``after`` is ``before`` plus mappings covering exactly [iova, iova + size) with ``flags``."""
    assert before <= after, f"mappings lost: {sorted(before - after)}"
    added = sorted(after - before)
    assert added, f"the MAP of {iova:#x} is not in the table"
    assert added[0][0] == iova and added[-1][1] == iova + size - 1, added
    assert all(row[3] & 3 == flags for row in added), added
    assert all(a[1] + 1 == b[0] for a, b in itertools.pairwise(added)), added


def test_every_mapping_is_intact_after_worker_kills(directory: Path, keeper: KeeperProcess) -> None:
    with boot(directory, keeper.socket, "vfio-steps") as guest:
        guest.expect(r"VFIO_STEP_READY seq=0", BOOT_TIMEOUT)
        sequence = 0

        def step(command: str) -> None:
            nonlocal sequence
            sequence += 1
            guest.send(command)
            fields = parse_fields(guest.expect(rf"VFIO_STEP seq={sequence} .*", STEP_TIMEOUT)[0])
            guest.expect(rf"VFIO_STEP_READY seq={sequence}", STEP_TIMEOUT)
            assert fields["rc"] == "0", fields

        iovas = [0x1_0000_0000 + index * 0x10_0000 for index in range(5)]
        current = table(keeper)
        for iova in iovas[:3]:
            step(f"map {iova:#x} 0x10000 rw")
            before, current = current, table(keeper)
            new_rows(before, current, iova, 0x10000, 3)

        # Between requests: the next worker must hold the same table, and serve the next MAP.
        keeper.kill_worker()
        keeper.wait_for("session taken over", 1)
        assert table(keeper) == current
        step(f"map {iovas[3]:#x} 0x10000 rw")
        before, current = current, table(keeper)
        new_rows(before, current, iovas[3], 0x10000, 3)

        # With a MAP in flight: it is answered by the next worker, and in the table once.
        worker = keeper.worker()
        os.kill(worker, signal.SIGSTOP)
        guest.send(f"map {iovas[4]:#x} 0x2000 r")
        time.sleep(1.0)  # for the guest to post it; if it has not, this is one more kill between requests
        os.kill(worker, signal.SIGKILL)
        sequence += 1
        assert parse_fields(guest.expect(rf"VFIO_STEP seq={sequence} .*", STEP_TIMEOUT)[0])["rc"] == "0"
        guest.expect(rf"VFIO_STEP_READY seq={sequence}", STEP_TIMEOUT)
        keeper.wait_for("session taken over", 2)
        before, current = current, table(keeper)
        new_rows(before, current, iovas[4], 0x2000, 1)

        for iova in iovas:
            step(f"unmap {iova:#x} 0x10000")
        assert table(keeper) == set()
        guest.send("quit")
        guest.expect(r"VFIO_STEPS_DONE .*failures=0", STEP_TIMEOUT)
        guest.expect(r"VHOST_IOMMU_HOLD rc=0", STEP_TIMEOUT)
        finish(guest, keeper)
        restored = [line for line in keeper.log.splitlines() if "state restored in" in line]
        assert len(restored) == 2, restored
        print("\n".join(restored))

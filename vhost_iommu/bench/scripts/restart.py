"""Guest-visible pause of a device-worker restart under a real guest doing VFIO work (docs/restart.md).

``vhost-iommu --state-dir`` (the keeper and its device worker) serves a TCG guest whose ``vfio-steps`` job
maps 64 KiB per command, one command at a time; the worker is SIGKILLed between requests, SIGKILLed with
a MAP in flight, and upgraded (SIGHUP), without and with ``--spare-worker``
(vhost_iommu.bench.restart, the scenario tests/test_e2e_worker_restart.py checks). A pause runs from the
kill (or the upgrade's hand-over) to the guest's next step done, the step and the console's round trip
included; "no restart" is a step's own time. Printed: min-max over ``--rounds`` boots per column.

Example (one boot per column, a few minutes under TCG):
    scripts/bench-restart --rounds 1
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from vhost_iommu.bench.restart import (
    EVENTS,
    STEP_TIMEOUT,
    VfioSteps,
    boot,
    keeper_options,
    restarts_under_steps,
)
from vhost_iommu.harness.keeper_process import KeeperProcess
from vhost_iommu.jit import warm_up


def pauses_of_one_boot(spare: bool) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="vhost-br-") as path:  # short: socket paths <= 108 bytes
        directory = Path(path)
        options = ("--spare-worker",) if spare else ()
        keeper = KeeperProcess(
            str(directory), *options, *keeper_options(), backend="iommu", timeout=STEP_TIMEOUT
        )
        try:
            with boot(directory, keeper.socket, "vfio-steps") as guest:
                iovas = [0x1_0000_0000 + index * 0x10_0000 for index in range(6)]
                return restarts_under_steps(keeper, VfioSteps(guest), iovas)
        finally:
            keeper.close()


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/bench-restart",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--rounds", type=int, default=3, help="guest boots per column (default 3)")
    args = parser.parse_args()
    warm_up()  # the workers load numba's cache; this process compiles nothing
    columns = {"without spare": False, "with --spare-worker": True}
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in columns}
    for round_number in range(1, args.rounds + 1):
        for name, spare in columns.items():
            runs[name].append(pauses_of_one_boot(spare))
            print(f"round {round_number}, {name}: done", flush=True)
    print(f"\n| event | {' | '.join(columns)} |")
    print(f"| --- |{' --- |' * len(columns)}")
    for event in EVENTS:
        cells = []
        for name in columns:
            values = [pauses[event] for pauses in runs[name]]
            cells.append(f"{min(values):.3f}-{max(values):.3f} s")
        print(f"| {event} | {' | '.join(cells)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

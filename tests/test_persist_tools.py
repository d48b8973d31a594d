"""The control channel's injections under ``serve --state-dir``: whatever a tool made the device do is
journaled like any other request, so the next device worker holds it after a SIGKILL.

The scenario of issue 15: a MAP answered after a per-type ``delay`` was published without a journal record
(the control layer had a serve loop of its own), and the next worker refused the session, closing QEMU's
connection. Every request now goes through the back-end's one serve loop, which journals before it
publishes; each test here applies one injection, kills the worker, and checks that the session was taken
over (the front-end's connection kept) with every mapping it made.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator

import pytest

from vhost_iommu.control.client import ControlClient
from vhost_iommu.device import Status
from vhost_iommu.device.layout import MAP_F_READ, MAP_F_WRITE, encode_attach, encode_map, encode_unmap
from vhost_iommu.harness.iommu_driver import IommuDriver
from vhost_iommu.harness.keeper_process import KeeperProcess

pytestmark = pytest.mark.usefixtures("fd_leak_check")
#: A fresh interpreter (numpy, numba's cache for the IOMMU device) on a loaded 2-core machine.
TIMEOUT = 60.0
EP = 0x20
PAGE = 0x1000
RW = MAP_F_READ | MAP_F_WRITE


@pytest.fixture
def keeper() -> Iterator[KeeperProcess]:
    with tempfile.TemporaryDirectory(prefix="vhost-pt-") as directory:  # short: socket paths <= 108 bytes
        program = KeeperProcess(directory, backend="iommu", timeout=TIMEOUT)
        try:
            yield program
        finally:
            program.close()


def map_page(page: int) -> bytes:
    return encode_map(1, page * PAGE, page * PAGE + PAGE - 1, 0x100_0000 + page * PAGE, RW)


def control(keeper: KeeperProcess, command: str, **arguments: object) -> object:
    with ControlClient(keeper.control, timeout=TIMEOUT) as client:
        return client.call(command, **arguments)


def per_type_delay(keeper: KeeperProcess, guest: IommuDriver) -> None:
    control(keeper, "delay", us=2000, type="MAP")
    assert guest.status(map_page(1)) == Status.OK  # answered after the delay
    control(keeper, "delay", us=0, type="MAP")


def batch_delay(keeper: KeeperProcess, guest: IommuDriver) -> None:
    control(keeper, "delay", us=2000)
    assert guest.status(map_page(1)) == Status.OK
    control(keeper, "delay", us=0)


def forced_answer(keeper: KeeperProcess, guest: IommuDriver) -> None:
    control(keeper, "inject", type="MAP", status="NOMEM", times=1)
    assert guest.status(map_page(7)) == Status.NOMEM  # forced: page 7 stays unmapped
    assert guest.status(map_page(1)) == Status.OK


def forced_rate(keeper: KeeperProcess, guest: IommuDriver) -> None:
    control(keeper, "inject-rate", type="UNMAP", status="DEVERR", rate=1.0, seed=1)
    assert guest.status(encode_unmap(1, 0, PAGE - 1)) == Status.DEVERR  # page 0 stays mapped
    control(keeper, "inject-rate", type="UNMAP", status="DEVERR", rate=0)
    assert guest.status(map_page(1)) == Status.OK


def conformance_checker(keeper: KeeperProcess, guest: IommuDriver) -> None:
    control(keeper, "conformance-start")
    assert guest.status(map_page(1)) == Status.OK  # served through the device core, watched
    assert control(keeper, "conformance-stop")["total"] == 0  # type: ignore[index]


INJECTIONS: dict[str, Callable[[KeeperProcess, IommuDriver], None]] = {
    "delay --type MAP": per_type_delay,
    "delay": batch_delay,
    "inject": forced_answer,
    "inject-rate": forced_rate,
    "conformance-start": conformance_checker,
}


@pytest.mark.parametrize("injection", INJECTIONS)
def test_what_an_injection_made_the_device_do_survives_a_worker_kill(
    keeper: KeeperProcess, injection: str
) -> None:
    with IommuDriver.connect(keeper.socket, ram_size=4 << 20, timeout=TIMEOUT) as guest:
        assert guest.status(encode_attach(1, EP)) == Status.OK
        assert guest.status(map_page(0)) == Status.OK
        INJECTIONS[injection](keeper, guest)
        keeper.kill_worker(wait_takeover=True)
        # The front-end's connection was kept, and the next worker holds both mappings (mapping a mapped
        # page again is refused as an overlap) and nothing a forced answer refused.
        assert guest.status(map_page(0)) == Status.INVAL
        assert guest.status(map_page(1)) == Status.INVAL
        if injection == "inject":
            assert guest.status(map_page(7)) == Status.OK
        assert "cannot be taken over" not in keeper.log
    assert keeper.terminate() == 0

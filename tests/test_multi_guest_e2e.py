"""End to end: two real QEMU guests served by one ``vhost-iommu --socket-count=2`` process.

Each guest binds its 00:04.0 to vfio-pci and maps its own IOVAs; the back-end's control channel shows one
device per socket holding only that guest's mappings, and one guest powering off leaves the other served.
``-m "not e2e"`` leaves it out.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from vhost_iommu.control.client import ControlClient
from vhost_iommu.device import Topology
from vhost_iommu.provision.boot import GuestSession, parse_fields
from vhost_iommu.provision.guest import ensure_guest
from vhost_iommu.provision.qemu_build import ensure_qemu
from vhost_iommu.qemu import IommuKind, PciTestDevice, QemuSetup, build_command
from vhost_iommu.viot import viot_from_topology, viot_topology_from

pytestmark = pytest.mark.e2e

BOOT_TIMEOUT = 240.0
STEP_TIMEOUT = 60.0
STARTUP_TIMEOUT = 60.0
GUEST_MEMORY_MIB = 512


@pytest.fixture
def directory() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="vhost-mge-") as path:  # short: socket paths <= 108 bytes
        yield Path(path)


def start_backend(directory: Path) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vhost_iommu",
            "-v",
            f"--socket-path={directory}/viommu.sock",
            "--socket-count=2",
            f"--control-socket={directory}/ctl",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stderr is not None
    seen = b""
    while b"listening on" not in seen:
        ready, _, _ = select.select([process.stderr.fileno()], [], [], STARTUP_TIMEOUT)
        assert ready, f"the back-end did not start: {seen!r}"
        chunk = os.read(process.stderr.fileno(), 4096)
        assert chunk, f"the back-end ended: {seen!r}"
        seen += chunk
    return process


def boot(directory: Path, index: int) -> GuestSession:
    qemu, image = ensure_qemu(), ensure_guest()
    topology = Topology.default()
    viot = directory / "viot.bin"
    if not viot.exists():
        viot.write_bytes(viot_from_topology(topology))
    setup = QemuSetup(
        qemu=qemu,
        kernel=image.kernel,
        initrd=image.initrd,
        kernel_args=["vhost_iommu.job=vfio-steps", "vhost_iommu.hold=1"],
        iommu=IommuKind.VHOST_USER,
        socket_path=directory / f"viommu.sock{index}",
        viot_path=viot,
        topology=viot_topology_from(topology),
        endpoints=(PciTestDevice(slot=4),),
        memory_mib=GUEST_MEMORY_MIB,
    )
    return GuestSession(build_command(setup).argv)


def step(guest: GuestSession, sequence: int, line: str) -> dict[str, str]:
    guest.send(line)
    result = parse_fields(guest.expect(rf"VFIO_STEP seq={sequence} .*", STEP_TIMEOUT)[0])
    guest.expect(rf"VFIO_STEP_READY seq={sequence}", STEP_TIMEOUT)
    return result


def iova_starts(client: ControlClient, connection: object) -> set[int]:
    return {row["iova_start"] for row in client.call("mappings", connection=connection)["mappings"]}


@pytest.mark.every_kernel
def test_two_guests_on_one_process_each_have_their_own_device(directory: Path) -> None:
    backend = start_backend(directory)
    guests: list[GuestSession] = []
    try:
        guests = [boot(directory, 0), boot(directory, 1)]
        for guest in guests:
            guest.expect(r"VFIO_STEP_READY seq=0", BOOT_TIMEOUT)
        assert step(guests[0], 1, "map 0x100000000 0x1000 rw")["rc"] == "0"
        assert step(guests[1], 1, "map 0x200000000 0x2000 rw")["rc"] == "0"

        with ControlClient(str(directory / "ctl")) as client:
            rows = {str(row["name"]).rsplit(" on ", 1)[1]: row for row in client.call("connections")}
            assert sorted(rows) == [f"{directory}/viommu.sock0", f"{directory}/viommu.sock1"]
            first, second = (rows[f"{directory}/viommu.sock{index}"]["connection"] for index in range(2))
            assert all(row["attached_endpoints"] == 1 for row in rows.values())
            assert 0x100000000 in iova_starts(client, first) and 0x200000000 not in iova_starts(client, first)
            assert 0x200000000 in iova_starts(client, second) and 0x100000000 not in iova_starts(
                client, second
            )

            # The first guest powers off; the second keeps being served.
            guests[0].send("quit")
            guests[0].expect(r"VHOST_IOMMU_HOLD", STEP_TIMEOUT)
            guests[0].send("")
            assert guests[0].wait(STEP_TIMEOUT).job_rc == 0
            assert step(guests[1], 2, "map 0x300000000 0x1000 r")["rc"] == "0"
            assert 0x300000000 in iova_starts(client, second)
        guests[1].send("quit")
        guests[1].expect(r"VHOST_IOMMU_HOLD", STEP_TIMEOUT)
        guests[1].send("")
        assert guests[1].wait(STEP_TIMEOUT).job_rc == 0

        backend.send_signal(signal.SIGTERM)
        assert backend.wait(timeout=10) == 0
        assert sorted(os.listdir(directory)) == ["viot.bin"]  # both sockets and the control socket gone
    finally:
        for guest in guests:
            guest.close()
        if backend.poll() is None:
            backend.kill()
        backend.wait()
        assert backend.stderr is not None
        backend.stderr.close()

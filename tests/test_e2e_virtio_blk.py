"""End to end: Linux's own virtio_pci and virtio_blk drive the virtio-blk device vhost-iommu serves over
vfio-user, behind the vIOMMU: the guest's blk-io job writes random data to the disk and reads it back,
comparing md5 sums, while every ring and buffer address it gives is translated by vhost-iommu.

One boot per IOMMU mode and guest kernel (trixie's 6.12 and Debian's newest): DMA domains with strict
invalidation (iommu.strict=1) and lazy invalidation (iommu.strict=0), and the identity domain
(iommu.passthrough=1). The guest holds after its job while the back-end's counters are read.
"""

from __future__ import annotations

import dataclasses
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from vhost_iommu.abi import VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_NEEDS_RESET
from vhost_iommu.device import Topology
from vhost_iommu.device.topology import ServedDevice
from vhost_iommu.endpoints.virtio_pci import VirtioPciFunction
from vhost_iommu.lab import Lab, LabConfig
from vhost_iommu.machine import Arch
from vhost_iommu.provision.boot import GuestRun
from vhost_iommu.qemu import PciTestDevice

pytestmark = [pytest.mark.e2e, pytest.mark.every_kernel]

BLK_BDF = 0x28  # 00:05.0
MEGABYTES = 64
IMAGE_BYTES = 96 << 20
JOB_TIMEOUT = 900.0
MODES = {
    "strict": ["iommu.strict=1"],
    "lazy": ["iommu.strict=0"],
    "identity": ["iommu.passthrough=1"],
}


@dataclass
class BlockRun:
    mode: str
    run: GuestRun
    io: dict[str, str]  # the blk-io job's VHOST_IOMMU_BLK line
    disk: dict[str, str]  # its VHOST_IOMMU_BLK_DISK line
    port: dict[str, int]  # the endpoint's translation counters in the IOMMU (its DmaPort)
    block: dict[str, Any]  # the block device's counters
    status: int  # the device status when the guest held
    needs_reset_reason: str | None


@pytest.fixture(scope="module", params=list(MODES))
def block_run(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, guest_arch: str
) -> Iterator[BlockRun]:  # one guest per mode and kernel
    mode: str = request.param
    image = tmp_path_factory.mktemp(f"blk-{mode}") / "disk.img"
    with image.open("wb") as file:
        file.truncate(IMAGE_BYTES)
    device = ServedDevice("virtio-blk", 0, BLK_BDF, "virtio-blk.sock", {"image": str(image)})
    config = LabConfig(
        job="blk-io",
        params={"blk_mb": str(MEGABYTES), "hold": "1"},
        kernel_args=MODES[mode],
        # The machine's own default topology (on arm64: the ITS doorbell as MSI region), the disk at 00:05.0.
        topology=dataclasses.replace(Topology.default(Arch(guest_arch)), devices=(device,)),
        endpoints=[PciTestDevice(4)],
        serve_devices=True,
    )
    with Lab(config) as lab:
        lab.guest.expect(r"VHOST_IOMMU_HOLD", JOB_TIMEOUT)
        assert lab.endpoints is not None
        [served] = lab.endpoints.endpoints

        def counters() -> tuple[dict[str, int], dict[str, Any], int, str | None]:
            port, function = served.port, served.device
            assert isinstance(function, VirtioPciFunction) and served.block is not None
            port_counters = {} if port is None else dict(port.counters())
            return (
                port_counters,
                vars(served.block.counters).copy(),
                function.status,
                function.needs_reset_reason,
            )

        port, block, status, reason = lab.call(counters)
        lab.guest.send("")
        run = lab.guest.wait(JOB_TIMEOUT)
    io = run.records("VHOST_IOMMU_BLK ")
    disk = run.records("VHOST_IOMMU_BLK_DISK")
    assert io and disk, run.output[-3000:]
    yield BlockRun(mode, run, io[0], disk[0], port, block, status, reason)


@pytest.mark.every_arch
def test_the_guest_reads_back_what_it_wrote(block_run: BlockRun) -> None:
    assert block_run.io["match"] == "1", block_run.io
    assert block_run.io["mb"] == str(MEGABYTES)
    assert block_run.run.job_rc == 0
    assert block_run.block["bytes_written"] >= MEGABYTES << 20
    assert block_run.block["bytes_read"] >= MEGABYTES << 20
    # Linux's reads and writes all complete OK: the kernel (jit/blk.py) served them, and the Python path at
    # most the probe's GET_ID and what came before the kernels were compiled.
    served = block_run.block["reads"] + block_run.block["writes"] + block_run.block["flushes"]
    assert block_run.block["compiled"] >= served * 0.99, block_run.block
    assert block_run.status & VIRTIO_CONFIG_S_DRIVER_OK
    assert not block_run.status & VIRTIO_CONFIG_S_NEEDS_RESET, block_run.needs_reset_reason
    assert block_run.port["faults"] == 0


@pytest.mark.every_arch
def test_the_dma_went_through_the_mode_s_domain(block_run: BlockRun) -> None:
    domain = block_run.disk["domain"]
    if block_run.mode == "identity":
        assert domain == "identity"
        assert block_run.port["page_translations"] == 0
        assert block_run.port["bypassed_accesses"] > 0
    else:
        assert domain.startswith("DMA"), domain  # DMA (strict) or DMA-FQ (lazy)
        assert block_run.port["page_translations"] > 0
        assert block_run.port["bypassed_accesses"] == 0


@pytest.mark.parametrize("mode", ["strict", "identity"])
def test_a_file_system_made_mounted_and_filled_reads_back(
    mode: str, tmp_path: Path, guest_suite: str
) -> None:
    """The blk-fs job: mke2fs, mount, copy files, unmount, mount again, md5 of every file."""
    image = tmp_path / "disk.img"
    with image.open("wb") as file:
        file.truncate(IMAGE_BYTES)
    device = ServedDevice("virtio-blk", 0, BLK_BDF, "virtio-blk.sock", {"image": str(image)})
    config = LabConfig(
        job="blk-fs",
        params={"blk_mb": "16"},
        kernel_args=MODES[mode],
        topology=dataclasses.replace(Topology.default(), devices=(device,)),
        endpoints=[PciTestDevice(4)],
        serve_devices=True,
    )
    with Lab(config) as lab:
        run = lab.guest.wait(JOB_TIMEOUT)
    records = run.records("VHOST_IOMMU_BLK_FS")
    assert records, run.output[-3000:]
    [fs] = records
    assert (fs["match"], fs["files"]) == ("1", "2"), run.output[-3000:]
    assert run.job_rc == 0


def test_the_readme_command_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the README shows: the program with the virtio-blk topology (disk.img beside its socket) and
    qemu-configs/q35-virtio-blk-translated.sh."""
    from vhost_iommu.provision.boot import run_job
    from vhost_iommu.provision.configs import configs_dir
    from vhost_iommu.provision.guest import ensure_guest
    from vhost_iommu.provision.qemu_build import ensure_qemu
    from vhost_iommu.viot import build_viot, default_topology

    image = ensure_guest()
    sock = tmp_path / "vhost-iommu.sock"
    with (tmp_path / "disk.img").open("wb") as disk:
        disk.truncate(32 << 20)
    (tmp_path / "viot.bin").write_bytes(build_viot(default_topology()))
    for name, value in {
        "QEMU": str(ensure_qemu()),
        "KERNEL": str(image.kernel),
        "INITRD": str(image.initrd),
        "SOCK": str(sock),
        "VIOT": str(tmp_path / "viot.bin"),
        "BLK_MB": "16",
    }.items():
        monkeypatch.setenv(name, value)
    topology = configs_dir() / "topologies" / "virtio-blk.toml"
    backend = subprocess.Popen(
        [sys.executable, "-m", "vhost_iommu", "-v", f"--socket-path={sock}", f"--topology={topology}"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert backend.stderr is not None
        for line in backend.stderr:  # "listening" comes after every socket, the disk's included
            if "INFO: listening on" in line:
                break
        else:
            pytest.fail("the program ended before it listened")
        log: list[str] = []  # the rest of its log, read as it comes so the pipe never fills
        reader = threading.Thread(target=log.extend, args=(backend.stderr,), daemon=True)
        reader.start()
        run = run_job(["bash", str(configs_dir() / "q35-virtio-blk-translated.sh")], timeout=300)
    finally:
        backend.send_signal(signal.SIGTERM)
        backend.wait(timeout=60)
    reader.join(timeout=10)
    assert not any("NEEDS_RESET" in line for line in log), log
    [io] = run.records("VHOST_IOMMU_BLK ")
    [disk] = run.records("VHOST_IOMMU_BLK_DISK")
    assert (io["match"], io["mb"]) == ("1", "16")
    assert disk["pci"] == "0000:00:05.0" and disk["domain"].startswith("DMA")
    assert run.job_rc == 0
    assert backend.returncode == 0

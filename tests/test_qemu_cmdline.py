"""QEMU command lines: what each setup asks QEMU for, what is refused, and a shell form that runs the same."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from vhost_iommu.qemu import (
    CommandError,
    IommuKind,
    PciTestDevice,
    QemuSetup,
    VirtioBlockDevice,
    build_command,
)
from vhost_iommu.viot import PciRange, ViotTopology

SOCKET = Path("/run/viommu.sock")
VIOT = Path("/tmp/viot.bin")


def setup(**overrides: object) -> QemuSetup:
    values: dict[str, object] = {
        "qemu": Path("/opt/qemu/bin/qemu-system-x86_64"),
        "kernel": Path("/boot/vmlinuz"),
        "initrd": Path("/boot/initrd.gz"),
        "socket_path": SOCKET,
        "viot_path": VIOT,
    }
    values.update(overrides)
    return QemuSetup(**values)  # type: ignore[arg-type]


def option_values(argv: list[str], option: str) -> list[str]:
    return [argv[index + 1] for index, arg in enumerate(argv[:-1]) if arg == option]


def test_vhost_user_iommu_command_has_every_part() -> None:
    argv = build_command(setup(kernel_args=["vhost_iommu.job=probe"], endpoints=[PciTestDevice(4)])).argv

    assert argv[0] == "/opt/qemu/bin/qemu-system-x86_64"
    assert option_values(argv, "-M") == ["q35,accel=tcg,memory-backend=mem"]
    # The back-end maps guest RAM: it must be a shared memfd as large as -m.
    assert option_values(argv, "-object") == ["memory-backend-memfd,id=mem,size=1024M,share=on"]
    assert option_values(argv, "-m") == ["1024M"]
    assert option_values(argv, "-chardev") == [f"socket,id=viommu,path={SOCKET}"]
    assert option_values(argv, "-device") == [
        "vhost-user-test-device-pci,chardev=viommu,virtio-id=23,num_vqs=2,config_size=40,addr=0x3",
        "pci-testdev,addr=0x4",
    ]
    assert option_values(argv, "-acpitable") == [f"file={VIOT}"]
    for flag in ("-nographic", "-no-reboot"):
        assert flag in argv
    assert option_values(argv, "-vga") == ["none"] and option_values(argv, "-nic") == ["none"]
    assert option_values(argv, "-L") == ["/usr/share/qemu", "/usr/share/seabios"]
    assert option_values(argv, "-bios") == ["/usr/share/qemu/qboot.rom"]
    assert option_values(argv, "-kernel") == ["/boot/vmlinuz"]
    assert option_values(argv, "-initrd") == ["/boot/initrd.gz"]
    assert option_values(argv, "-append") == ["console=ttyS0 panic=-1 vhost_iommu.job=probe"]


def test_no_reconnect_option_on_the_chardev() -> None:
    """With reconnect-ms QEMU 10.2's generic vhost-user device fails to realize."""
    argv = build_command(setup()).argv
    assert not any("reconnect" in arg for arg in argv)


def test_memory_size_follows_the_setup() -> None:
    argv = build_command(setup(memory_mib=2048, cpus=2)).argv
    assert option_values(argv, "-object") == ["memory-backend-memfd,id=mem,size=2048M,share=on"]
    assert option_values(argv, "-m") == ["2048M"]
    assert option_values(argv, "-smp") == ["2"]


def test_iommu_address_comes_from_the_topology() -> None:
    topology = ViotTopology(0, (5 << 3) | 2, (PciRange(0, 0x30, 0x3F, 0x30),))
    argv = build_command(setup(topology=topology, endpoints=[PciTestDevice(6, 1)])).argv
    devices = option_values(argv, "-device")
    assert devices[0].endswith(",addr=0x5.2")
    assert devices[1] == "pci-testdev,addr=0x6.1"


def test_builtin_variant_uses_qemus_own_device_and_no_viot() -> None:
    argv = build_command(setup(iommu=IommuKind.BUILTIN, socket_path=None, viot_path=None)).argv
    assert option_values(argv, "-device") == ["virtio-iommu-pci,addr=0x3"]
    assert "-acpitable" not in argv and "-chardev" not in argv
    # Same machine otherwise: comparisons must only differ by the IOMMU.
    vhost = build_command(setup()).argv
    assert option_values(argv, "-object") == option_values(vhost, "-object")


def test_block_endpoint_gets_an_identity_domain_behind_vhost_user() -> None:
    disk = Path("/var/tmp/disk.img")
    argv = build_command(setup(endpoints=[VirtioBlockDevice(5, disk)])).argv
    assert option_values(argv, "-drive") == [f"file={disk},format=raw,if=none,id=blk0,cache=unsafe"]
    assert (
        option_values(argv, "-device")[1]
        == "virtio-blk-pci,drive=blk0,addr=0x5,disable-legacy=on,iommu_platform=on"
    )
    assert option_values(argv, "-append")[0].split().count("iommu.passthrough=1") == 1


def test_identity_domain_not_forced_where_qemu_translates_or_the_user_chose() -> None:
    disk = Path("/var/tmp/disk.img")
    builtin = build_command(
        setup(
            iommu=IommuKind.BUILTIN, socket_path=None, viot_path=None, endpoints=[VirtioBlockDevice(5, disk)]
        )
    ).argv
    assert "iommu.passthrough" not in option_values(builtin, "-append")[0]
    chosen = build_command(
        setup(endpoints=[VirtioBlockDevice(5, disk)], kernel_args=["iommu.passthrough=0"])
    ).argv
    assert option_values(chosen, "-append")[0].split()[-1] == "iommu.passthrough=0"
    assert "iommu.passthrough=1" not in option_values(chosen, "-append")[0]


def test_read_only_legacy_block_device() -> None:
    argv = build_command(
        setup(endpoints=[VirtioBlockDevice(5, Path("/d.img"), read_only=True, iommu_platform=False)])
    ).argv
    assert option_values(argv, "-drive")[0].endswith(",readonly=on")
    assert option_values(argv, "-device")[1] == "virtio-blk-pci,drive=blk0,addr=0x5"


def test_seabios_when_asked_and_qmp_and_extra_arguments() -> None:
    argv = build_command(
        setup(bios=None, qmp_socket=Path("/run/qmp.sock"), extra_args=["-d", "guest_errors"])
    ).argv
    assert "-bios" not in argv
    assert option_values(argv, "-qmp") == ["unix:/run/qmp.sock,server=on,wait=off"]
    assert argv[-2:] == ["-d", "guest_errors"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"socket_path": None}, "socket_path"),
        ({"viot_path": None}, "viot_path"),
        ({"endpoints": [PciTestDevice(3)]}, "taken by the IOMMU"),
        ({"endpoints": [PciTestDevice(4), PciTestDevice(4)]}, "taken by endpoint 0"),
        ({"endpoints": [PciTestDevice(0x1F)]}, "outside the IOMMU's PCI ranges"),
        ({"endpoints": [PciTestDevice(0x20)]}, "not a valid device"),
        ({"endpoints": [PciTestDevice(4, 8)]}, "not a valid device"),
        ({"memory_mib": 0}, "must be positive"),
        ({"cpus": 0}, "must be positive"),
        ({"topology": ViotTopology(0, 0x118, (PciRange(0, 0x20, 0x27, 0x20),))}, "not on the q35 root bus"),
        ({"topology": ViotTopology(1, 0x18, (PciRange(0, 0x20, 0x27, 0x20),))}, "not on the q35 root bus"),
    ],
)
def test_setups_that_cannot_work_are_refused(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(CommandError, match=message):
        build_command(setup(**overrides))


def test_endpoint_outside_ranges_is_fine_without_our_iommu() -> None:
    argv = build_command(setup(iommu=IommuKind.NONE, socket_path=None, endpoints=[PciTestDevice(0x1E)])).argv
    assert option_values(argv, "-device") == ["pci-testdev,addr=0x1e"]


def test_shell_form_runs_exactly_the_same_command(tmp_path: Path) -> None:
    """The commented script in qemu-configs/ must pass QEMU the very same arguments, quoting included."""
    recorder = tmp_path / "fake-qemu"
    recorded = tmp_path / "args"
    recorder.write_text(f'#!/bin/sh\nfor arg in "$@"; do printf "%s\\0" "$arg"; done > {recorded}\n')
    recorder.chmod(0o755)
    command = build_command(
        setup(
            qemu=recorder,
            kernel=tmp_path / "a kernel with spaces",
            kernel_args=["vhost_iommu.job=probe", "quote='x'"],
            endpoints=[PciTestDevice(4), VirtioBlockDevice(5, tmp_path / "disk $HOME.img")],
        )
    )
    script = tmp_path / "run.sh"
    script.write_text(command.shell_script("a title\nover two lines"))
    subprocess.run(["bash", str(script)], check=True, env={"PATH": os.environ["PATH"]}, timeout=30)
    assert recorded.read_bytes().split(b"\0")[:-1] == [arg.encode() for arg in command.argv[1:]]
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n# a title\n# over two lines\n")
    assert "    # the virtio-iommu (ID 23" in text


def test_qemu_configs_are_what_the_code_builds() -> None:
    """qemu-configs/ is generated; a hand edit or a code change without regenerating shows up here."""
    from vhost_iommu.provision.configs import config_files, configs_dir, render

    for config in config_files():
        path = configs_dir() / config.name
        assert path.read_text() == render(config), (
            f"regenerate: python -m vhost_iommu.provision.configs ({path})"
        )
        assert os.access(path, os.X_OK)


def test_a_config_script_expands_its_variables(tmp_path: Path) -> None:
    from vhost_iommu.provision.configs import configs_dir

    recorder = tmp_path / "fake-qemu"
    recorded = tmp_path / "args"
    recorder.write_text(f'#!/bin/sh\nfor arg in "$@"; do printf "%s\\0" "$arg"; done > {recorded}\n')
    recorder.chmod(0o755)
    environment = {
        "PATH": os.environ["PATH"],
        "QEMU": str(recorder),
        "KERNEL": "/k/vmlinuz",
        "INITRD": "/k/initrd.gz",
        "SOCK": "/run/my sock",
        "VIOT": "/t/viot.bin",
        "DISK": "/d/disk.img",
        "MEM": "512",
    }
    subprocess.run(
        ["bash", str(configs_dir() / "q35-virtio-blk-identity.sh"), "-d", "guest_errors"],
        check=True,
        env=environment,
        timeout=30,
    )
    argv = recorded.read_bytes().decode().split("\0")[:-1]
    assert option_values(argv, "-object") == ["memory-backend-memfd,id=mem,size=512M,share=on"]
    assert option_values(argv, "-m") == ["512M"]
    assert option_values(argv, "-chardev") == ["socket,id=viommu,path=/run/my sock"]
    assert option_values(argv, "-acpitable") == ["file=/t/viot.bin"]
    assert option_values(argv, "-drive")[0].startswith("file=/d/disk.img,")
    assert option_values(argv, "-kernel") == ["/k/vmlinuz"]
    assert "iommu.passthrough=1" in option_values(argv, "-append")[0].split()
    assert argv[-2:] == ["-d", "guest_errors"]
    missing = subprocess.run(
        ["bash", str(configs_dir() / "q35-vhost-iommu.sh")],
        env={"PATH": os.environ["PATH"]},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert missing.returncode != 0 and "set KERNEL" in missing.stderr


@pytest.mark.e2e
def test_vfio_config_script_against_the_vhost_iommu_program(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The path qemu-configs/README.md documents: the vhost-iommu program on a socket, its VIOT, a script."""
    import signal
    import socket
    import sys

    from vhost_iommu.provision.boot import run_job
    from vhost_iommu.provision.configs import configs_dir
    from vhost_iommu.provision.guest import ensure_guest
    from vhost_iommu.provision.qemu_build import ensure_qemu
    from vhost_iommu.viot import build_viot, default_topology

    image = ensure_guest()
    monkeypatch.setenv("QEMU", str(ensure_qemu()))
    monkeypatch.setenv("KERNEL", str(image.kernel))
    monkeypatch.setenv("INITRD", str(image.initrd))
    monkeypatch.setenv("SOCK", str(tmp_path / "viommu.sock"))
    monkeypatch.setenv("VIOT", str(tmp_path / "viot.bin"))
    monkeypatch.setenv("COUNT", "200")
    monkeypatch.setenv("BENCH", "pairs,bulk")
    (tmp_path / "viot.bin").write_bytes(build_viot(default_topology()))
    # Listening before the back-end starts: QEMU's connection waits in the backlog, no start-up race.
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "viommu.sock"))
    listener.listen(1)
    backend = subprocess.Popen(
        [sys.executable, "-m", "vhost_iommu", f"--fd={listener.fileno()}"], pass_fds=[listener.fileno()]
    )
    listener.close()
    try:
        run = run_job(["bash", str(configs_dir() / "q35-vfio-testdev.sh")], timeout=240)
    finally:
        backend.send_signal(signal.SIGTERM)
        backend.wait(timeout=60)
    (pairs,) = run.records("VFIO_PAIRS")
    (unmap,) = run.records("VFIO_BULK_UNMAP")
    assert "virtio_iommu virtio0: input address: 48 bits" in run.output
    assert pairs["n"] == "200" and int(pairs["mean_ns"]) > 0
    assert unmap["bytes"] == str(200 * 4096)
    assert run.job_rc == 0
    assert backend.returncode == 0


# -- arm64: QEMU's virt machine, described by a device tree ----------------------------------------------

DTB = Path("/tmp/virt.dtb")


def arm_setup(preset: str = "arm-virt.toml", **overrides: object) -> QemuSetup:
    from vhost_iommu.device.topology import Topology
    from vhost_iommu.machine import Arch
    from vhost_iommu.provision.configs import configs_dir
    from vhost_iommu.qemu import placement_from

    loaded = Topology.load(configs_dir() / "topologies" / preset)
    values: dict[str, object] = {
        "qemu": Path("/opt/qemu/bin/qemu-system-aarch64"),
        "arch": Arch.ARM64,
        "topology": placement_from(loaded),
        "viot_path": None,
        "dtb_path": DTB,
        "endpoints": [PciTestDevice(4)],
        "kernel_args": ["vhost_iommu.job=probe"],
    }
    values.update(overrides)
    return setup(**values)


def test_virt_command_for_the_pci_transport() -> None:
    argv = build_command(arm_setup()).argv

    assert option_values(argv, "-M") == ["virt,gic-version=3,accel=tcg,memory-backend=mem"]
    assert option_values(argv, "-cpu") == ["cortex-a57"]
    assert option_values(argv, "-object") == ["memory-backend-memfd,id=mem,size=1024M,share=on"]
    assert option_values(argv, "-device") == [
        "vhost-user-test-device-pci,chardev=viommu,virtio-id=23,num_vqs=2,config_size=40,addr=0x3",
        "pci-testdev,addr=0x4",
    ]
    assert option_values(argv, "-dtb") == [str(DTB)]
    assert option_values(argv, "-append")[0].split()[:2] == ["console=ttyAMA0", "panic=-1"]
    # No x86 firmware and no ACPI: virt boots -kernel directly and takes no -acpitable.
    for option in ("-acpitable", "-bios", "-L", "-vga", "-global"):
        assert option not in argv


def test_virt_command_for_the_mmio_transport() -> None:
    argv = build_command(arm_setup("arm-virt-mmio.toml")).argv

    # The transport at 0x0a003e00 is bus 31; no PCI function for the IOMMU.
    assert option_values(argv, "-device") == [
        "vhost-user-test-device,chardev=viommu,virtio-id=23,num_vqs=2,config_size=40,bus=virtio-mmio-bus.31",
        "pci-testdev,addr=0x4",
    ]
    assert option_values(argv, "-global") == ["virtio-mmio.force-legacy=false"]
    assert option_values(argv, "-dtb") == [str(DTB)]


def test_dump_command_uses_the_same_machine_and_no_devices() -> None:
    from vhost_iommu.qemu import dtb_dump_command

    machine = arm_setup(memory_mib=512, cpus=2)
    dump = dtb_dump_command(machine, Path("/tmp/dump.dtb")).argv
    booted = build_command(machine).argv
    assert dump[0] == booted[0]
    for option in ("-M", "-cpu", "-m", "-smp", "-object"):
        assert option_values(dump, option) == option_values(booted, option)
    assert option_values(dump, "-machine") == ["dumpdtb=/tmp/dump.dtb"]
    assert "-device" not in dump and "-chardev" not in dump
    with pytest.raises(CommandError, match="device tree"):
        dtb_dump_command(setup(), Path("/tmp/dump.dtb"))


def test_virt_setups_that_cannot_work_are_refused() -> None:
    from vhost_iommu.machine import Arch

    with pytest.raises(CommandError, match="dtb_path"):
        build_command(arm_setup(dtb_path=None))
    with pytest.raises(CommandError, match="virt machine"):
        build_command(arm_setup("arm-virt-mmio.toml", arch=Arch.X86_64))
    with pytest.raises(CommandError, match="built-in virtio-iommu is a PCI function"):
        build_command(arm_setup("arm-virt-mmio.toml", iommu=IommuKind.BUILTIN))
    with pytest.raises(CommandError, match="not on the virt root bus"):
        build_command(arm_setup(topology=ViotTopology(0, 0x100, (PciRange(0, 0x20, 0x27, 0x20),))))


def test_qemu_args_for_an_arm_topology(capsys: pytest.CaptureFixture[str]) -> None:
    from vhost_iommu.cli import main
    from vhost_iommu.provision.configs import configs_dir

    topology = configs_dir() / "topologies" / "arm-virt.toml"
    assert main(["qemu-args", "--topology", str(topology), "--socket-path", "/run/v/viommu.sock"]) == 0
    script = capsys.readouterr().out
    assert 'exec qemu-system-aarch64 "${args[@]}" "$@"' in script
    assert "    -dtb virt.dtb\n" in script and "-acpitable" not in script
    # The topology's DMA engine (item 6 of issue 16): a vfio-user-pci at 00:05.0, inside the iommu-map.
    assert (
        '"driver":"vfio-user-pci","socket":{"type":"unix","path":"/run/v/dma-engine.sock"},"addr":"0x5"'
        in script
    )

"""Provisioning: the private apt state, the QEMU search order, the initramfs pieces, and (e2e) real boots
of the guest behind QEMU's built-in virtio-iommu, the reference the back-end is compared with."""

from __future__ import annotations

import gzip
import lzma
import stat
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from vhost_iommu.provision import apt, qemu_build
from vhost_iommu.provision.apt import Mirror, PrivateApt, SourceLine
from vhost_iommu.provision.arch import ARCH_VARIABLE, ARM64, X86_64, GuestArch, guest_arch
from vhost_iommu.provision.boot import GuestSession, parse_fields, run_job
from vhost_iommu.provision.errors import ProvisionError
from vhost_iommu.provision.guest import (
    CpioEntry,
    GuestImage,
    cpio_newc,
    decompress_module,
    ensure_guest,
    load_order,
    modinfo_depends,
    module_name,
)
from vhost_iommu.qemu import IommuKind, PciTestDevice, QemuSetup, VirtioBlockDevice, build_command

HOST_SOURCES = """\
Types: deb
# http://snapshot.example/archive/debian/20250520T000000Z
URIs: http://mirror.example/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://mirror.example/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"""


# --- the mirror and the private apt state ---


def test_mirror_is_the_main_archive_of_the_hosts_sources() -> None:
    mirror = apt.parse_debian_mirror(HOST_SOURCES)
    assert mirror == Mirror("http://mirror.example/debian", "/usr/share/keyrings/debian-archive-keyring.gpg")


def test_disabled_and_security_stanzas_are_not_mirrors() -> None:
    text = (
        "Types: deb\nURIs: http://a.example/debian\nSuites: x\nEnabled: no\n\n"
        + HOST_SOURCES.split("\n\n")[1]
    )
    with pytest.raises(ProvisionError, match="no Debian archive"):
        apt.parse_debian_mirror(text)


def test_one_line_sources_list() -> None:
    text = "# comment\ndeb http://s.example/debian-security bookworm-security main\n" + (
        "deb [arch=amd64 signed-by=/k.gpg] http://m.example/debian/ bookworm main\n"
    )
    assert apt.parse_one_line_mirror(text) == Mirror("http://m.example/debian", "/k.gpg")
    assert apt.parse_one_line_mirror("# nothing\n") is None


def test_private_state_diverts_every_piece_of_apt_state(tmp_path: Path) -> None:
    state = PrivateApt(
        tmp_path, [SourceLine("deb-src", "sid")], mirror=Mirror("http://m.example/debian", "/k.gpg")
    )
    options = state.options()
    pairs = dict(option.split("=", 1) for option in options[1::2])
    assert pairs["Dir::Etc::sourcelist"] == str(tmp_path / "sources.list")
    assert pairs["Dir::Etc::sourceparts"] == "-"
    assert pairs["Dir::State::Lists"] == str(tmp_path / "lists")
    assert pairs["Dir::Cache"] == str(tmp_path / "cache")
    assert all(flag == "-o" for flag in options[0::2])
    state._prepare()
    assert state.sources_file.read_text() == "deb-src [signed-by=/k.gpg] http://m.example/debian sid main\n"
    assert (tmp_path / "lists" / "partial").is_dir()


def test_versions_sort_the_way_debian_does() -> None:
    assert apt.newest_first(["1:10.2.2+ds-1", "1:11.1.2+ds-3", "1:11.1.3+ds-1", "1:10.2.2+ds-1"]) == [
        "1:11.1.3+ds-1", "1:11.1.2+ds-3", "1:10.2.2+ds-1",
    ]  # fmt: skip
    assert apt.newest_first(["10.2~rc1", "10.2", "9.9"]) == ["10.2", "10.2~rc1", "9.9"]
    assert apt.compare_debian_versions("1:7.2", "10.2") == 1  # the epoch wins


def test_showsrc_versions_of_one_package_only() -> None:
    text = (
        "Package: qemu\nVersion: 1:10.2.2+ds-1\n\n"
        "Package: qemu-web\nVersion: 5\n\n"
        "Package: qemu\nVersion: 1:11.1\n"
    )
    assert apt.parse_showsrc_versions(text, "qemu") == ["1:10.2.2+ds-1", "1:11.1"]


def test_versions_the_pool_lacks_are_skipped_newest_first(tmp_path: Path) -> None:
    state = PrivateApt(tmp_path, [], mirror=Mirror("http://m.example/debian", None))
    tried: list[str] = []

    def fetch(version: str) -> None:
        tried.append(version)
        if version != "10.2":
            raise ProvisionError(f"404 for {version}")

    assert state.first_fetchable(["11.1.3", "11.1.2", "10.2", "9.0"], fetch) == "10.2"
    assert tried == ["11.1.3", "11.1.2", "10.2"]
    with pytest.raises(ProvisionError, match=r"11\.1\.3: 404 for 11\.1\.3"):
        state.first_fetchable(["11.1.3"], fetch)


# --- where QEMU comes from ---


def fake_qemu(path: Path, *, new_enough: bool) -> Path:
    device = '"vhost-user-test-device-pci"' if new_enough else '"vhost-user-blk-pci"'
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\necho 'name {device}, bus PCI'\n")
    path.chmod(0o755)
    return path


@pytest.fixture
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("VHOST_IOMMU_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", str(tmp_path / "bin") + ":/usr/bin:/bin")
    monkeypatch.delenv("QEMU", raising=False)
    monkeypatch.delenv("QEMU_AARCH64", raising=False)
    monkeypatch.delenv(ARCH_VARIABLE, raising=False)
    return tmp_path


def test_qemu_from_the_environment_wins_when_new_enough(
    isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_qemu(isolated / "bin" / "qemu-system-x86_64", new_enough=True)
    chosen = fake_qemu(isolated / "env-qemu", new_enough=True)
    monkeypatch.setenv("QEMU", str(chosen))
    assert qemu_build.find_qemu() == chosen


def test_too_old_qemu_is_passed_over_for_the_next(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QEMU", str(fake_qemu(isolated / "old", new_enough=False)))
    fake_qemu(isolated / "bin" / "qemu-system-x86_64", new_enough=False)
    cached = fake_qemu(isolated / "cache" / "qemu" / "x" / "qemu-system-x86_64", new_enough=True)
    link = qemu_build.cached_binary_link()
    link.parent.mkdir(parents=True)
    link.symlink_to(cached)
    assert qemu_build.find_qemu() == cached


def test_no_qemu_names_the_script_to_run(isolated: Path) -> None:
    fake_qemu(isolated / "bin" / "qemu-system-x86_64", new_enough=False)
    with pytest.raises(ProvisionError, match="scripts/get-qemu") as raised:
        qemu_build.find_qemu()
    assert "QEMU < 10.2" in str(raised.value)


def test_qemu_that_cannot_run_is_not_new_enough(tmp_path: Path) -> None:
    broken = tmp_path / "qemu"
    broken.write_text("#!/bin/sh\nexit 1\n")
    broken.chmod(0o755)
    assert not qemu_build.has_generic_device(broken)
    assert not qemu_build.has_generic_device(tmp_path / "missing")


def test_ensure_qemu_refuses_a_source_override_that_is_no_source_tree(
    isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(qemu_build, "ensure_firmware", lambda: None)
    monkeypatch.setenv("QEMU_SRC", str(isolated))
    with pytest.raises(ProvisionError, match="not a QEMU source tree"):
        qemu_build.ensure_qemu()


def test_each_architecture_has_its_own_qemu(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    x86 = fake_qemu(isolated / "bin" / "qemu-system-x86_64", new_enough=True)
    monkeypatch.setenv("QEMU", str(x86))  # $QEMU names an x86 binary: never taken for an Arm guest
    with pytest.raises(ProvisionError, match=r"(?s)no qemu-system-aarch64 .*get-qemu --arch arm64") as raised:
        qemu_build.find_qemu(ARM64)
    assert "$QEMU_AARCH64" in str(raised.value)
    on_path = fake_qemu(isolated / "bin" / "qemu-system-aarch64", new_enough=True)
    assert qemu_build.find_qemu(ARM64) == on_path
    chosen = fake_qemu(isolated / "env-qemu-aarch64", new_enough=True)
    monkeypatch.setenv("QEMU_AARCH64", str(chosen))
    assert qemu_build.find_qemu(ARM64) == chosen
    assert qemu_build.find_qemu(X86_64) == x86
    # With no architecture named, $VHOST_IOMMU_GUEST_ARCH decides, as for the guest.
    monkeypatch.setenv(ARCH_VARIABLE, "arm64")
    assert qemu_build.find_qemu() == chosen


def test_the_cached_arm_build_is_found_beside_the_x86_one(isolated: Path) -> None:
    cache = isolated / "cache" / "qemu"
    assert qemu_build.cached_binary_link() == cache / "bin" / "qemu-system-x86_64"  # as before
    assert qemu_build.cached_binary_link(ARM64) == cache / "bin" / "qemu-system-aarch64"
    built = fake_qemu(cache / "debian-x" / "build-aarch64" / "qemu-system-aarch64", new_enough=True)
    qemu_build.cached_binary_link(ARM64).parent.mkdir(parents=True)
    qemu_build.cached_binary_link(ARM64).symlink_to(built)
    assert qemu_build.find_qemu(ARM64) == built
    with pytest.raises(ProvisionError, match="no qemu-system-x86_64"):
        qemu_build.find_qemu(X86_64)


def test_get_qemu_arch_option_prints_that_architectures_binary(
    isolated: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    arm = fake_qemu(isolated / "bin" / "qemu-system-aarch64", new_enough=True)
    assert qemu_build.main(["--arch", "arm64", "--check"]) == 0
    assert capsys.readouterr().out == f"{arm}\n"
    assert qemu_build.main(["--check"]) == 1  # the default is still x86_64, and there is none


def test_each_target_builds_in_its_own_directory_with_the_same_options(tmp_path: Path) -> None:
    work = tmp_path / "debian-1_10.2.2+ds-1"
    assert qemu_build.build_directory(work, X86_64) == work / "build"  # existing x86 builds still count
    assert qemu_build.build_directory(work, ARM64) == work / "build-aarch64"
    x86, arm = qemu_build.configure_options(X86_64), qemu_build.configure_options(ARM64)
    assert x86[0] == "--target-list=x86_64-softmmu" and arm[0] == "--target-list=aarch64-softmmu"
    assert x86[1:] == arm[1:] and "--enable-vhost-user" in arm


def test_guest_architecture_comes_from_the_caller_then_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(ARCH_VARIABLE, raising=False)
    assert guest_arch() == X86_64
    monkeypatch.setenv(ARCH_VARIABLE, "arm64")
    assert guest_arch() == ARM64
    assert guest_arch("x86_64") == X86_64
    assert (ARM64.qemu_binary, ARM64.kernel_meta_package) == ("qemu-system-aarch64", "linux-image-arm64")
    assert (X86_64.qemu_binary, X86_64.kernel_meta_package) == ("qemu-system-x86_64", "linux-image-amd64")
    monkeypatch.setenv(ARCH_VARIABLE, "riscv64")
    with pytest.raises(ProvisionError, match="no guest architecture 'riscv64'"):
        guest_arch()


def test_a_private_state_of_another_architecture_lists_that_architecture_alone(tmp_path: Path) -> None:
    mirror = Mirror("http://m.example/debian", "/k.gpg")
    state = PrivateApt(tmp_path, [SourceLine("deb", "trixie")], mirror=mirror, architecture="arm64")
    options = state.options()
    pairs = dict(option.split("=", 1) for option in options[1::2])
    assert (pairs["APT::Architecture"], pairs["APT::Architectures"]) == ("arm64", "arm64")
    state._prepare()
    assert (
        state.sources_file.read_text()
        == "deb [arch=arm64 signed-by=/k.gpg] http://m.example/debian trixie main\n"
    )
    host = PrivateApt(tmp_path / "host", [SourceLine("deb", "trixie")], mirror=mirror)
    assert not any(option.startswith("APT::Architecture") for option in host.options())


def test_arm_kernels_have_their_own_apt_state_and_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vhost_iommu.provision import debian, guest

    monkeypatch.setenv("VHOST_IOMMU_CACHE", str(tmp_path))
    monkeypatch.setattr(apt, "host_mirror", lambda: Mirror("http://m.example/debian", None))
    # x86_64 keeps the states and directories earlier caches hold.
    assert debian.kernel_apt("trixie").state_dir == debian.project_apt().state_dir == tmp_path / "apt"
    assert debian.kernel_apt("sid").state_dir == tmp_path / "apt-kernel" / "sid"
    assert debian.kernel_apt("sid").architecture is None
    assert guest.suite_kernels("trixie") == tmp_path / "guest" / "kernels" / "trixie"
    arm_trixie = debian.kernel_apt("trixie", ARM64)
    assert arm_trixie.state_dir == tmp_path / "apt-kernel" / "arm64" / "trixie"
    assert arm_trixie.architecture == "arm64"
    assert guest.suite_kernels("trixie", ARM64) == tmp_path / "guest" / "kernels" / "arm64" / "trixie"


def test_arm_guest_loads_virtio_mmio_first_and_builds_with_its_own_tools() -> None:
    from vhost_iommu.provision import guest

    assert guest.wanted_modules(X86_64) == guest.REQUIRED_MODULES
    assert guest.wanted_modules(ARM64) == ("virtio_mmio", *guest.REQUIRED_MODULES)
    # As Debian's kernels are: irqbypass a module on x86 (vfio_pci_core's modinfo names it), built in on
    # arm64 (nothing names it), and 7.x packages ship no modules.builtin to say so.
    x86 = {**DEPENDENCIES, "vfio_iommu_type1": ["vfio"]}
    arm = {**x86, "virtio_mmio": [], "vfio_pci_core": ["vfio"]}
    del arm["irqbypass"]
    assert load_order(guest.wanted_modules(X86_64), [], x86.get, set()) == [
        "virtio_iommu", "vfio", "vfio_iommu_type1", "irqbypass", "vfio_pci_core", "vfio_pci",
    ]  # fmt: skip
    assert load_order(guest.wanted_modules(ARM64), [], arm.get, set()) == [
        "virtio_mmio", "virtio_iommu", "vfio", "vfio_iommu_type1", "vfio_pci_core", "vfio_pci",
    ]  # fmt: skip
    assert ARM64.compiler == "aarch64-linux-gnu-gcc"
    assert set(ARM64.compiler_packages) == {"gcc-aarch64-linux-gnu", "libc6-dev-arm64-cross"}
    assert X86_64.compiler == "gcc"


def test_arm_busybox_is_the_unpacked_arm_package_not_the_hosts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vhost_iommu.provision import guest

    monkeypatch.setenv("VHOST_IOMMU_CACHE", str(tmp_path))
    assert guest.cached_busybox(X86_64) == guest.HOST_BUSYBOX
    assert guest.cached_busybox(ARM64) is None
    for version in ("1:1.36.1-9", "1:1.37.0-6+b9", "1:1.37.0-6"):
        unpacked = guest.busybox_packages(ARM64) / f"busybox-static_{version}"
        (unpacked / "root" / "usr" / "bin").mkdir(parents=True)
        (unpacked / "root" / "usr" / "bin" / "busybox").write_bytes(b"arm")
        (unpacked / ".complete").touch()
    expected = (
        guest.busybox_packages(ARM64) / "busybox-static_1:1.37.0-6+b9" / "root" / "usr" / "bin" / "busybox"
    )
    assert guest.cached_busybox(ARM64) == expected


def test_image_key_follows_the_architecture(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vhost_iommu.provision import guest

    sources = tmp_path / "guest"
    sources.mkdir()
    (sources / "init").write_text("#!/bin/sh\n")
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"kernel")
    busybox = tmp_path / "busybox"
    busybox.write_bytes(b"busybox")
    monkeypatch.setattr(guest, "guest_sources", lambda: sources)
    tree = guest.KernelTree(kernel, tmp_path, "test")
    assert guest.image_key(tree, X86_64, busybox) != guest.image_key(tree, ARM64, busybox)


# --- the initramfs ---


def test_module_names_normalise_paths_and_dashes() -> None:
    assert module_name("kernel/drivers/vfio/pci/vfio-pci.ko.xz") == "vfio_pci"
    assert module_name("virtio_iommu.ko") == "virtio_iommu"


def test_dependencies_come_from_modinfo() -> None:
    elf = b"\x7fELF...\0license=GPL\0depends=vfio,irqbypass\0vermagic=6.12\0"
    assert modinfo_depends(elf) == ["vfio", "irqbypass"]
    assert modinfo_depends(b"\0depends=\0name=x\0") == []
    assert modinfo_depends(b"no modinfo at all") == []


DEPENDENCIES = {
    "vfio_pci": ["vfio_pci_core", "vfio"],
    "vfio_pci_core": ["vfio", "irqbypass"],
    "vfio": [],
    "irqbypass": [],
    "virtio_iommu": [],
    "virtio_blk": [],
}


def test_load_order_puts_dependencies_first_and_skips_built_ins() -> None:
    order = load_order(
        ["virtio_iommu", "vfio_pci"], ["virtio_blk", "absent"], DEPENDENCIES.get, {"irqbypass"}
    )
    assert order == ["virtio_iommu", "vfio", "vfio_pci_core", "vfio_pci", "virtio_blk"]
    assert load_order(["vfio_pci"], [], DEPENDENCIES.get, {"vfio_pci"}) == []


def test_load_order_reports_missing_modules_and_cycles() -> None:
    with pytest.raises(ProvisionError, match=r"vfio .*needed by vfio_pci"):
        load_order(["vfio_pci"], [], {"vfio_pci": ["vfio"]}.get, set())
    with pytest.raises(ProvisionError, match="cycle"):
        load_order(["a"], [], {"a": ["b"], "b": ["a"]}.get, set())


def read_cpio(archive: bytes) -> list[tuple[str, int, bytes, tuple[int, int]]]:
    """A minimal newc reader, independent of the writer: (name, mode, data, rdev) per entry."""
    entries: list[tuple[str, int, bytes, tuple[int, int]]] = []
    offset = 0
    while True:
        assert archive[offset : offset + 6] == b"070701"
        fields = [int(archive[offset + 6 + 8 * i : offset + 14 + 8 * i], 16) for i in range(13)]
        name_size, file_size = fields[11], fields[6]
        name_start = offset + 110
        name = archive[name_start : name_start + name_size - 1].decode()
        data_start = (name_start + name_size + 3) & ~3
        data = archive[data_start : data_start + file_size]
        offset = (data_start + file_size + 3) & ~3
        if name == "TRAILER!!!":
            assert offset == len(archive)
            return entries
        entries.append((name, fields[1], data, (fields[9], fields[10])))


def test_cpio_archive_holds_files_directories_and_device_nodes() -> None:
    entries = [
        CpioEntry("dev", stat.S_IFDIR | 0o755),
        CpioEntry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)),
        CpioEntry("init", stat.S_IFREG | 0o755, b"#!/bin/sh\necho odd length\n"),
        CpioEntry("bin/x", stat.S_IFREG | 0o644, b"12345"),
    ]
    archive = cpio_newc(entries)
    assert len(archive) % 4 == 0
    assert read_cpio(archive) == [(e.name, e.mode, e.data, e.rdev) for e in entries]
    assert cpio_newc(entries) == archive  # reproducible: no timestamps, no host owners


def test_compressed_modules_are_decompressed(tmp_path: Path) -> None:
    elf = b"\x7fELF" + bytes(100)
    (tmp_path / "a.ko.xz").write_bytes(lzma.compress(elf, format=lzma.FORMAT_XZ))
    (tmp_path / "b.ko.gz").write_bytes(gzip.compress(elf))
    (tmp_path / "c.ko").write_bytes(elf)
    for name in ("a.ko.xz", "b.ko.gz", "c.ko"):
        assert decompress_module(tmp_path / name) == elf


def test_guest_init_is_a_valid_shell_script() -> None:
    import subprocess

    init = Path(__file__).resolve().parents[1] / "guest" / "init"
    subprocess.run(["sh", "-n", str(init)], check=True, timeout=10)
    text = init.read_text()
    for job in ("probe", "shell", "vfio-steps", "vfio-bench", "blk-io"):
        assert f"    {job})" in text, f"/init has no {job} job"


def test_parse_fields_of_a_marker_line() -> None:
    fields = parse_fields('VFIO_STEP seq=3 op=map iova=0x1000 rc=-1 errno=17 msg="File exists"')
    assert fields == {
        "seq": "3",
        "op": "map",
        "iova": "0x1000",
        "rc": "-1",
        "errno": "17",
        "msg": "File exists",
    }


def test_session_times_out_on_silence_and_reports_an_early_exit(tmp_path: Path) -> None:
    from vhost_iommu.provision.boot import GuestTimeout

    with GuestSession(["sh", "-c", "echo hello; read line; echo got:$line; exit 3"]) as session:
        session.expect("hello", 10)
        with pytest.raises(GuestTimeout, match="within 0 s"):
            session.expect("never", 0.2)
        session.send("42")
        assert session.expect(r"got:(\d+)", 10).group(1) == "42"
        with pytest.raises(GuestTimeout, match="exited"):
            session.expect("never", 10)
        with pytest.raises(ProvisionError, match=r"not running|exited"):
            session.send("too late")
    assert session.run.returncode == 3


# --- e2e: the guest behind QEMU's built-in virtio-iommu (the comparison baseline) ---

BOOT_TIMEOUT = 240.0


@pytest.fixture(scope="module")
def tools() -> Iterator[tuple[Path, GuestImage]]:
    yield qemu_build.ensure_qemu(), ensure_guest()


def builtin_setup(qemu: Path, image: GuestImage, job: str, *extra: str, **overrides: object) -> QemuSetup:
    values: dict[str, object] = {
        "qemu": qemu,
        "kernel": image.kernel,
        "initrd": image.initrd,
        "kernel_args": [f"vhost_iommu.job={job}", *extra],
        "iommu": IommuKind.BUILTIN,
        "endpoints": [PciTestDevice(4)],
    }
    values.update(overrides)
    return QemuSetup(**values)  # type: ignore[arg-type]


@pytest.mark.e2e
def test_builtin_iommu_vfio_steps(tools: tuple[Path, GuestImage]) -> None:
    qemu, image = tools
    argv = build_command(builtin_setup(qemu, image, "vfio-steps")).argv
    with GuestSession(argv) as session:
        session.expect(r"VFIO_STEP_READY seq=0", BOOT_TIMEOUT)
        results = []
        for sequence, command in enumerate(
            [
                "map 0x100000000 0x4000 rw",
                "map 0x100002000 0x1000 r",
                "unmap 0x100000000 0x4000",
                "map 1 2 x",
            ],
            start=1,
        ):
            session.send(command)
            results.append(parse_fields(session.expect(rf"VFIO_STEP seq={sequence} .*", 60)[0]))
            session.expect(rf"VFIO_STEP_READY seq={sequence}", 60)
        session.send("quit")
        run = session.wait(60)
    assert "virtio_iommu virtio0: input address" in run.output
    assert [(r["rc"], r["errno"]) for r in results] == [("0", "0"), ("-1", "17"), ("0", "0"), ("-1", "22")]
    assert results[0]["perm"] == "rw" and results[2]["unmapped"] == "0x4000"
    assert run.marker_lines("VHOST_IOMMU_VFIO_BOUND dev=0000:00:04.0")
    assert run.job_rc == 1  # two steps failed on purpose
    assert run.marker_lines("VHOST_IOMMU_KLOG_END")


@pytest.mark.e2e
def test_builtin_iommu_translates_virtio_blk_dma(tools: tuple[Path, GuestImage], tmp_path: Path) -> None:
    qemu, image = tools
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(16 << 20))
    endpoints = [PciTestDevice(4), VirtioBlockDevice(5, disk)]
    run = run_job(
        build_command(builtin_setup(qemu, image, "blk-io", "vhost_iommu.blk_mb=4", endpoints=endpoints)).argv,
        timeout=BOOT_TIMEOUT,
    )
    (disk_info,) = run.records("VHOST_IOMMU_BLK_DISK")
    (io,) = run.records("VHOST_IOMMU_BLK ")
    assert disk_info["pci"] == "0000:00:05.0"
    assert disk_info["domain"].startswith("DMA"), "QEMU's own IOMMU translates: the disk gets a DMA domain"
    assert io["match"] == "1"
    assert run.job_rc == 0
    # What was written is on the host's image: the DMA went through the IOMMU to the right pages.
    assert disk.read_bytes()[: 4 << 20] != bytes(4 << 20)


@pytest.mark.e2e
def test_probe_reports_the_table_the_guest_was_given(tools: tuple[Path, GuestImage]) -> None:
    qemu, image = tools
    run = run_job(build_command(builtin_setup(qemu, image, "probe")).argv, timeout=BOOT_TIMEOUT)
    (viot,) = run.records("VHOST_IOMMU_VIOT")
    table = bytes.fromhex(viot["hex"])
    assert table[:4] == b"VIOT" and struct.unpack_from("<H", table, 54)[0] == 0x18
    assert run.records("VHOST_IOMMU_IOMMU")[0]["name"] == "0000:00:03.0"
    assert run.job_rc == 0


def test_image_key_follows_every_guest_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vhost_iommu.provision import guest

    sources = tmp_path / "guest"
    sources.mkdir()
    (sources / "init").write_text("#!/bin/sh\n")
    (sources / "vfio-dma.c").write_text("int main(void) { return 0; }\n")
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"kernel")
    monkeypatch.setattr(guest, "guest_sources", lambda: sources)
    tree = guest.KernelTree(kernel, tmp_path, "test")
    first = guest.image_key(tree)
    assert guest.image_key(tree) == first
    (sources / "vfio-dma.c").write_text("int main(void) { return 1; }\n")
    second = guest.image_key(tree)
    assert second != first
    (sources / "helper.c").write_text("")
    assert guest.image_key(tree) not in (first, second)


def test_a_given_kernel_needs_its_modules_directory(tmp_path: Path) -> None:
    from vhost_iommu.provision.guest import kernel_tree_from

    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k")
    with pytest.raises(ProvisionError, match="no such file"):
        kernel_tree_from(tmp_path / "missing", tmp_path)
    with pytest.raises(ProvisionError, match="not a lib/modules"):
        kernel_tree_from(kernel, tmp_path)
    (tmp_path / "modules.order").write_text("kernel/drivers/iommu/virtio-iommu.ko\n")
    assert kernel_tree_from(kernel, tmp_path).modules_dir == tmp_path.resolve()


def test_a_given_modules_directory_needs_no_modules_order(tmp_path: Path) -> None:
    """Debian's 7.x packages ship no modules.order and no modules.builtin: the kernel/ tree is enough."""
    from vhost_iommu.provision.guest import kernel_tree_from

    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k")
    modules = tmp_path / "7.3.4+deb13-amd64"
    (modules / "kernel" / "drivers" / "iommu").mkdir(parents=True)
    assert kernel_tree_from(kernel, modules).version == "7.3.4+deb13-amd64"


# `apt-cache show` of Debian's kernel packages, trimmed to what matters: 6.12 has one image package,
# 7.x splits it into an image (meta), a binary (the vmlinuz) and a modules package.
SHOWN = {
    "linux-image-amd64=6.12.117-1": "Package: linux-image-amd64\nDepends: linux-image-6.12.117+deb13-amd64 "
    "(= 6.12.117-1)\n",
    "linux-image-6.12.117+deb13-amd64=6.12.117-1": "Package: linux-image-6.12.117+deb13-amd64\nDepends: "
    "kmod, linux-base (>= 4.12~), initramfs-tools (>= 0.120+deb8u2) | linux-initramfs-tool\n",
    "linux-image-amd64=7.3.4-1~bpo13+1": "Package: linux-image-amd64\nDepends: linux-base-amd64 "
    "(= 7.3.4-1~bpo13+1), linux-image-7.3.4+deb13-amd64 (= 7.3.4-1~bpo13+1), linux-modules-amd64 "
    "(= 7.3.4-1~bpo13+1)\n",
    "linux-image-7.3.4+deb13-amd64=7.3.4-1~bpo13+1": "Package: linux-image-7.3.4+deb13-amd64\nDepends: "
    "dracut | initramfs-tools (>= 0.120+deb8u2) | linux-initramfs-tool, linux-base-7.3.4+deb13-amd64 "
    "(= 7.3.4-1~bpo13+1), linux-binary-7.3.4+deb13-amd64 (= 7.3.4-1~bpo13+1), "
    "linux-modules-7.3.4+deb13-amd64 (= 7.3.4-1~bpo13+1)\nRecommends: apparmor\n",
}


@pytest.mark.parametrize(
    ("meta_version", "expected"),
    [
        ("6.12.117-1", [("linux-image-6.12.117+deb13-amd64", "6.12.117-1")]),
        (
            "7.3.4-1~bpo13+1",
            [
                ("linux-image-7.3.4+deb13-amd64", "7.3.4-1~bpo13+1"),
                ("linux-binary-7.3.4+deb13-amd64", "7.3.4-1~bpo13+1"),
                ("linux-modules-7.3.4+deb13-amd64", "7.3.4-1~bpo13+1"),
            ],
        ),
    ],
    ids=["6.12-one-package", "7.x-split"],
)
def test_the_packages_of_a_kernel_follow_its_dependencies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, meta_version: str, expected: list[tuple[str, str]]
) -> None:
    from vhost_iommu.provision.guest import kernel_packages

    state = PrivateApt(tmp_path, [], mirror=Mirror("http://m.example/debian", None))
    monkeypatch.setattr(state, "query", lambda command, spec: SHOWN[spec])
    assert kernel_packages(state, meta_version) == expected


def test_an_unpacked_7x_kernel_has_its_image_beside_its_modules(tmp_path: Path) -> None:
    from vhost_iommu.provision.guest import _kernel_tree_in

    modules = tmp_path / "usr" / "lib" / "modules" / "7.3.4+deb13-amd64"
    (modules / "kernel").mkdir(parents=True)
    (modules / "vmlinuz").write_bytes(b"k")
    tree = _kernel_tree_in(tmp_path, "test")
    assert (tree.image, tree.version) == (modules / "vmlinuz", "7.3.4+deb13-amd64")
    (tmp_path / "boot").mkdir()
    (tmp_path / "boot" / "vmlinuz-6.12").write_bytes(b"k")  # two kernels in one tree: which one?
    with pytest.raises(ProvisionError, match="expected one kernel image"):
        _kernel_tree_in(tmp_path, "test")


def test_newest_is_the_suite_that_lists_the_highest_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    from vhost_iommu.provision import guest

    listed = {
        ("trixie", "linux-image-amd64"): ["6.12.117-1"],
        ("trixie-backports", "linux-image-amd64"): ["7.3.4-1~bpo13+1"],
        ("sid", "linux-image-amd64"): ["7.2.13-1"],
        ("trixie", "linux-image-arm64"): ["6.12.117-1"],
        ("sid", "linux-image-arm64"): ["7.2.13-1"],
    }

    class Listing:
        def __init__(self, suite: str, arch: GuestArch = X86_64) -> None:
            self.suite, self.arch = suite, arch

        def update(self) -> bool:
            return False

        def binary_versions(self, package: str) -> list[str]:
            assert package == self.arch.kernel_meta_package  # each architecture's index, its own kernel
            return listed.get((self.suite, package), [])

    monkeypatch.setattr(guest, "kernel_apt", Listing)
    assert guest.resolve_suite("newest") == "trixie-backports"
    assert guest.resolve_suite("newest", ARM64) == "sid"
    assert guest.resolve_suite("sid") == "sid"
    with pytest.raises(ProvisionError, match="no guest kernel suite 'buster'"):
        guest.resolve_suite("buster")


def test_stale_indexes_are_fetched_again_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Indexes from an earlier run list only versions the pool dropped; a refresh lists the new one."""
    state = PrivateApt(tmp_path, [], mirror=Mirror("http://m.example/debian", None))
    updates: list[bool] = []
    index = {"versions": ["1.0"]}

    def update(*, force: bool = False) -> bool:
        updates.append(force)
        if force:
            index["versions"] = ["2.0", "1.0"]
        return force  # without force: the indexes on disk are kept

    def fetch(version: str) -> None:
        if version != "2.0":
            raise ProvisionError(f"404 for {version}")

    monkeypatch.setattr(state, "update", update)
    assert state.fetch_listed(lambda: index["versions"], fetch) == "2.0"
    assert updates == [False, True]


def test_fresh_indexes_are_not_fetched_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = PrivateApt(tmp_path, [], mirror=Mirror("http://m.example/debian", None))
    updates: list[bool] = []

    def update(*, force: bool = False) -> bool:
        updates.append(force)
        return True  # fetched just now

    def fetch(version: str) -> None:
        raise ProvisionError("404")

    monkeypatch.setattr(state, "update", update)
    with pytest.raises(ProvisionError, match="no listed version"):
        state.fetch_listed(lambda: ["1.0"], fetch)
    assert updates == [False]


def test_qemu_10_2_series_is_tried_before_newer_ones(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    state = PrivateApt(tmp_path, [], mirror=Mirror("http://m.example/debian", None))
    listed = ["1:11.1.3+ds-1", "1:10.2.2+ds-1", "1:9.2.0+ds-1", "1:10.2.1+ds-2", "1:10.2~rc3+ds-1"]
    monkeypatch.setattr(state, "source_versions", lambda package: apt.newest_first(listed))
    assert qemu_build.qemu_source_versions(state) == [
        "1:10.2.2+ds-1", "1:10.2.1+ds-2", "1:10.2~rc3+ds-1", "1:11.1.3+ds-1",
    ]  # fmt: skip


def test_wait_returns_when_qemu_exits_early_and_raises_on_a_hang() -> None:
    from vhost_iommu.provision.boot import GuestTimeout

    with GuestSession(["sh", "-c", "echo 'qemu: cannot open the disk'; exit 1"]) as early:
        run = early.wait(30)
    assert run.job_rc is None and run.returncode == 1
    assert run.marker_lines("qemu: cannot open") == ["qemu: cannot open the disk"]
    with GuestSession(["sh", "-c", "echo booting; exec sleep 60"]) as hung, pytest.raises(GuestTimeout):
        hung.wait(0.5)


def test_wait_collects_the_job_result() -> None:
    script = "echo 'VHOST_IOMMU_BOOTED uptime_ms=1'; echo 'VHOST_IOMMU_JOB_DONE rc=4 uptime_ms=2'; echo bye"
    run = run_job(["sh", "-c", script], timeout=30)
    assert run.job_rc == 4 and run.returncode == 0
    assert run.lines[-1] == "bye"
    assert set(run.marks) == {"VHOST_IOMMU_BOOTED", "VHOST_IOMMU_JOB_DONE"}


def test_every_machine_a_topology_names_is_provisioned() -> None:
    from vhost_iommu.machine import Arch
    from vhost_iommu.provision.arch import provisioning_for

    for machine in Arch:
        assert provisioning_for(machine).name == machine.value

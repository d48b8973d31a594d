"""Finding or building a QEMU that has the generic vhost-user device (QEMU >= 10.2).

One QEMU per guest architecture (:mod:`.arch`): ``qemu-system-x86_64`` or ``qemu-system-aarch64``.
Search order (:func:`find_qemu`): the architecture's variable (``$QEMU``, ``$QEMU_AARCH64``) when new
enough, then the binary on PATH when new enough, then this project's cached build. :func:`ensure_qemu`
builds when none is found: from ``$QEMU_SRC`` (a QEMU source tree) when set, else from Debian's ``qemu``
source package of sid/forky fetched through a private apt state. Only the one softmmu target is built,
with the few features the tests need, in the cache (never in the repository); both targets share the
source tree, each has its own build directory.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from vhost_iommu.provision.apt import PrivateApt, compare_debian_versions
from vhost_iommu.provision.arch import ARCH_VARIABLE, ARCHES, X86_64, GuestArch, guest_arch
from vhost_iommu.provision.debian import project_apt
from vhost_iommu.provision.errors import ProvisionError
from vhost_iommu.provision.host import ensure_packages
from vhost_iommu.provision.paths import cache_root
from vhost_iommu.provision.progress import console, phase, run_logged

GENERIC_DEVICE = "vhost-user-test-device-pci"
QEMU_SRC_ENV = "QEMU_SRC"

# Debian's versions carry an epoch; anything from 10.2 on has the user-creatable generic device.
MINIMUM_DEBIAN_VERSION = "1:10.2~"
NEXT_SERIES_VERSION = "1:10.3~"

# x86's BIOS and option ROMs; an Arm virt guest boots its kernel directly and needs no firmware file.
FIRMWARE_PACKAGES = ("seabios", "qemu-system-data")
FIRMWARE_DIRS = (Path("/usr/share/qemu"), Path("/usr/share/seabios"))
FIRMWARE_FILES = (Path("/usr/share/qemu/qboot.rom"), Path("/usr/share/seabios/bios-256k.bin"))

BUILD_PACKAGES = (
    "build-essential", "ninja-build", "libglib2.0-dev", "libpixman-1-dev", "libfdt-dev", "flex", "bison",
    "pkg-config", "libslirp-dev", "python3-venv", "device-tree-compiler", "dpkg-dev", "xz-utils",
)  # fmt: skip

# The build system's own Python tools, pinned: these versions built QEMU 10.2 here. They live in a venv of
# the cache, never in the project's environment.
BUILD_PYTHON_TOOLS = ("meson==1.5.0", "pycotap==1.3.1")

# Besides --target-list, the same for every target.
CONFIGURE_OPTIONS = (
    "--disable-docs", "--disable-werror", "--enable-vhost-user", "--disable-install-blobs",
    "--disable-rust", "--disable-tools", "--disable-guest-agent",
    "--disable-gtk", "--disable-sdl", "--disable-vnc", "--disable-opengl", "--disable-spice",
    "--disable-curses", "--disable-xen",
)  # fmt: skip


def qemu_cache() -> Path:
    return cache_root() / "qemu"


def qemu_variable(arch: GuestArch) -> str:
    """The environment variable naming a QEMU binary for ``arch``: ``$QEMU`` for x86_64 (as it always
    was), ``$QEMU_AARCH64`` and so on for the others, so that one names no binary of the wrong target."""
    return "QEMU" if arch == X86_64 else f"QEMU_{arch.qemu_target.upper()}"


def cached_binary_link(arch: GuestArch = X86_64) -> Path:
    """A symlink to the last successful build, so later runs find it without rebuilding."""
    return qemu_cache() / "bin" / arch.qemu_binary


def build_directory(work: Path, arch: GuestArch) -> Path:
    """Where ``arch``'s target is configured and built inside ``work`` (one source's cache directory);
    x86_64 keeps the directory it always had, so existing builds still count."""
    return work / ("build" if arch == X86_64 else f"build-{arch.qemu_target}")


def firmware_args() -> list[str]:
    """``-L`` options for the BIOS and option ROMs of Debian's ``seabios`` and ``qemu-system-data``."""
    args: list[str] = []
    for directory in FIRMWARE_DIRS:
        args += ["-L", str(directory)]
    return args


def has_generic_device(binary: Path) -> bool:
    """Whether ``binary`` runs and lists the generic vhost-user device as creatable."""
    try:
        completed = subprocess.run(
            [str(binary), "-device", "help"], check=False, capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return completed.returncode == 0 and f'"{GENERIC_DEVICE}"' in completed.stdout


@dataclass(frozen=True)
class Candidate:
    """A place a QEMU binary may come from, and whether it is good enough."""

    origin: str
    path: Path | None
    usable: bool
    note: str


def candidates(arch: GuestArch = X86_64) -> Iterator[Candidate]:
    """Each place :func:`find_qemu` looks for ``arch``'s QEMU, in order, with the verdict for each (stops at
    the first usable)."""
    variable = qemu_variable(arch)
    from_env = os.environ.get(variable)
    if from_env:
        path = Path(from_env)
        usable = has_generic_device(path)
        yield Candidate(f"${variable}", path, usable, "" if usable else f"lacks -device {GENERIC_DEVICE}")
        if usable:
            return
    on_path = shutil.which(arch.qemu_binary)
    if on_path:
        path = Path(on_path)
        usable = has_generic_device(path)
        yield Candidate(
            "PATH", path, usable, "" if usable else f"lacks -device {GENERIC_DEVICE} (QEMU < 10.2)"
        )
        if usable:
            return
    link = cached_binary_link(arch)
    if link.exists():
        usable = has_generic_device(link)
        yield Candidate("cache", link.resolve(), usable, "" if usable else "cached build does not run")
    else:
        yield Candidate("cache", None, False, f"no build in {qemu_cache()}")


def find_qemu(arch: GuestArch | None = None) -> Path:
    """A QEMU binary for ``arch`` (None: :func:`.arch.guest_arch`'s default) with the generic vhost-user
    device; raises :class:`ProvisionError` naming the fix."""
    arch = arch or guest_arch()
    verdicts: list[str] = []
    for candidate in candidates(arch):
        if candidate.usable and candidate.path is not None:
            for passed_over in verdicts:
                # Someone who set $QEMU or has a QEMU on PATH wants to know why another one runs.
                console.print(f"[yellow]passed over[/yellow] {passed_over}")
            return candidate.path
        where = f" ({candidate.path})" if candidate.path else ""
        verdicts.append(f"{candidate.origin}{where}: {candidate.note}")
    raise ProvisionError(
        f"no {arch.qemu_binary} >= 10.2 found:\n  " + "\n  ".join(verdicts) + f"\n{get_qemu_hint(arch)}"
    )


def get_qemu_hint(arch: GuestArch) -> str:
    """What to run (or set) when no QEMU for ``arch`` is found."""
    command = "scripts/get-qemu" if arch == X86_64 else f"scripts/get-qemu --arch {arch.name}"
    variable = qemu_variable(arch)
    return f"run {command} (it builds QEMU >= 10.2 into the cache), or set ${variable} to such a binary"


def ensure_firmware() -> None:
    """Install the BIOS and option ROM packages QEMU needs at run time when they are missing (x86 only)."""
    ensure_packages(FIRMWARE_PACKAGES, why="running QEMU (BIOS and option ROMs)")
    missing = [str(path) for path in FIRMWARE_FILES if not path.is_file()]
    if missing:
        raise ProvisionError(
            f"firmware missing after installing {' '.join(FIRMWARE_PACKAGES)}: {' '.join(missing)}"
        )


def ensure_qemu(arch: GuestArch | None = None) -> Path:
    """:func:`find_qemu`, building into the cache when nothing usable exists; x86's firmware installed too."""
    arch = arch or guest_arch()
    if arch == X86_64:
        ensure_firmware()
    try:
        return find_qemu(arch)
    except ProvisionError:
        pass
    with _cache_lock():
        # Another process may have finished a build while this one waited for the lock.
        try:
            return find_qemu(arch)
        except ProvisionError:
            pass
        source_override = os.environ.get(QEMU_SRC_ENV)
        if source_override:
            source = Path(source_override).resolve()
            if not (source / "configure").is_file():
                raise ProvisionError(
                    f"${QEMU_SRC_ENV}={source_override} is not a QEMU source tree (no configure)"
                )
            label = "src-" + hashlib.sha256(str(source).encode()).hexdigest()[:12]
        else:
            source, label = fetch_debian_source(project_apt())
        binary = build_qemu(source, qemu_cache() / label, arch)
    return binary


@contextmanager
def _cache_lock() -> Iterator[None]:
    qemu_cache().mkdir(parents=True, exist_ok=True)
    with (qemu_cache() / ".lock").open("w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def qemu_source_versions(apt: PrivateApt) -> list[str]:
    """Listed versions of Debian's ``qemu`` source package from 10.2 on: 10.2.x first (the series this
    project was verified with), newest first, then later series, newest first."""
    listed = apt.source_versions("qemu")
    usable = [version for version in listed if compare_debian_versions(version, MINIMUM_DEBIAN_VERSION) >= 0]
    preferred = [version for version in usable if compare_debian_versions(version, NEXT_SERIES_VERSION) < 0]
    return preferred + [version for version in usable if version not in preferred]


UNPACKED_TREE = "qemu-src"


def _unpacked_tree(directory: Path) -> Path | None:
    """The complete source tree in ``directory``; it only gets its name once fully unpacked."""
    tree = directory / UNPACKED_TREE
    return tree if (tree / "configure").is_file() else None


def fetch_debian_source(apt: PrivateApt) -> tuple[Path, str]:
    """Download and unpack the newest obtainable qemu >= 10.2 source; returns (tree, cache label)."""
    ensure_packages(("dpkg-dev", "xz-utils"), why="unpacking a Debian source package")

    def listed() -> list[str]:
        versions = qemu_source_versions(apt)
        if not versions:
            raise ProvisionError(
                "the sid/forky indexes list no qemu source >= 10.2; is the mirror reachable?"
            )
        console.print(f"qemu source versions listed, in the order tried: {', '.join(versions)}")
        return versions

    def download(version: str) -> None:
        target = qemu_cache() / _label_for(version) / "source"
        if _unpacked_tree(target) is None:
            apt.download_source("qemu", version, target)

    version = apt.fetch_listed(listed, download)
    directory = qemu_cache() / _label_for(version) / "source"
    tree = _unpacked_tree(directory)
    if tree is None:
        dsc = sorted(directory.glob("qemu_*.dsc"))
        if not dsc:
            raise ProvisionError(f"no .dsc downloaded into {directory}")
        partial = directory / (UNPACKED_TREE + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        run_logged(
            ["dpkg-source", "-x", dsc[-1].name, partial.name],
            title=f"unpacking qemu {version}",
            log=directory / "unpack.log",
            cwd=directory,
        )
        tree = partial.rename(directory / UNPACKED_TREE)
    return tree, _label_for(version)


def _label_for(version: str) -> str:
    return "debian-" + re.sub(r"[^A-Za-z0-9.+-]", "_", version)


def configure_options(arch: GuestArch) -> list[str]:
    """``configure``'s options for ``arch``'s one softmmu target."""
    return [f"--target-list={arch.qemu_target}-softmmu", *CONFIGURE_OPTIONS]


def build_python(work: Path) -> Path:
    """A venv of the cache holding the build system's Python tools; returns its interpreter."""
    venv = work / "venv"
    python = venv / "bin" / "python3"
    stamp = venv / ".tools"
    wanted = "\n".join(BUILD_PYTHON_TOOLS)
    if python.is_file() and stamp.is_file() and stamp.read_text() == wanted:
        return python
    base_python = shutil.which("python3", path="/usr/bin:/bin") or sys.executable
    log = work / "build.log"
    run_logged([base_python, "-m", "venv", "--clear", venv], title="build: creating the build venv", log=log)
    run_logged(
        [python, "-m", "pip", "install", "--disable-pip-version-check", *BUILD_PYTHON_TOOLS],
        title=f"build: installing {' '.join(BUILD_PYTHON_TOOLS)} into it",
        log=log,
    )
    stamp.write_text(wanted)
    return python


def build_qemu(source: Path, work: Path, arch: GuestArch = X86_64) -> Path:
    """Configure and build ``arch``'s QEMU binary from ``source`` in ``work``; link it as the cached build.

    Only that one ninja target is built, so the firmware blobs Debian's ``+ds`` tarball lacks (edk2) are
    never needed and the source tree is used as it is.
    """
    ensure_packages(BUILD_PACKAGES, why="building QEMU")
    work.mkdir(parents=True, exist_ok=True)
    build_dir = build_directory(work, arch)
    log = build_dir.with_name(build_dir.name + ".log")
    console.print(f"building {arch.qemu_binary} from {source} in {build_dir} (log: {log})")
    python = build_python(work)
    env = dict(os.environ, PATH=f"{python.parent}:{os.environ.get('PATH', '/usr/bin:/bin')}")
    if not (build_dir / "build.ninja").is_file():
        build_dir.mkdir(parents=True, exist_ok=True)
        run_logged(
            [source / "configure", f"--python={python}", *configure_options(arch)],
            title=f"build: configure ({arch.qemu_target}-softmmu, minimal features)",
            log=log,
            cwd=build_dir,
            env=env,
        )
    jobs = str(os.cpu_count() or 1)
    run_logged(
        ["ninja", "-j", jobs, arch.qemu_binary],
        title=f"build: ninja {arch.qemu_binary}",
        log=log,
        cwd=build_dir,
        env=env,
    )
    binary = build_dir / arch.qemu_binary
    with phase(f"checking that the build has -device {GENERIC_DEVICE}"):
        if not has_generic_device(binary):
            raise ProvisionError(
                f"{binary} was built but lacks -device {GENERIC_DEVICE}; is the source >= 10.2?"
            )
    link = cached_binary_link(arch)
    link.parent.mkdir(parents=True, exist_ok=True)
    temporary = link.with_name(link.name + ".new")
    temporary.unlink(missing_ok=True)
    temporary.symlink_to(binary)
    temporary.replace(link)
    return binary


def main(argv: list[str] | None = None) -> int:
    """``scripts/get-qemu``: find or build QEMU, install firmware, print the binary's path on stdout."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="get-qemu",
        description=f"Find or build a QEMU >= 10.2 (with -device {GENERIC_DEVICE}) and print its path.",
        epilog="Order: $QEMU ($QEMU_AARCH64 for arm64), qemu-system-x86_64 (qemu-system-aarch64) on PATH, "
        f"the cache ({qemu_cache()}), a build from ${QEMU_SRC_ENV}, a build from Debian's qemu source "
        "package. $VHOST_IOMMU_CACHE moves the cache.",
    )
    parser.add_argument(
        "--arch",
        choices=tuple(ARCHES),
        help=f"the guest architecture the QEMU emulates (default ${ARCH_VARIABLE}, else {X86_64.name})",
    )
    parser.add_argument(
        "--check", action="store_true", help="only look; never build or install (exit 1 if none)"
    )
    args = parser.parse_args(argv)
    try:
        arch = guest_arch(args.arch)
        binary = find_qemu(arch) if args.check else ensure_qemu(arch)
    except ProvisionError as error:
        console.print(f"[red]get-qemu:[/red] {error}")
        return 1
    except OSError as error:  # an unwritable cache, a full disk...
        console.print(
            f"[red]get-qemu:[/red] {error} (the cache is {cache_root()}; $VHOST_IOMMU_CACHE moves it)"
        )
        return 1
    print(binary)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The test guest: a Debian kernel and a busybox initramfs with the IOMMU/VFIO modules and guest programs.

The guest is x86_64 unless ``--arch`` (or ``$VHOST_IOMMU_GUEST_ARCH``) says arm64 (:mod:`.arch`). The kernel
is a Debian suite's ``linux-image-amd64`` (``linux-image-arm64``): trixie's (6.12: VIRTIO_IOMMU=m, VFIO=m,
VFIO_PCI=m; ACPI_VIOT=y on x86, OF_IOMMU=y on arm64) unless ``--suite`` (or ``$VHOST_IOMMU_GUEST_SUITE``)
names trixie-backports, sid or ``newest`` (whichever suite lists the highest version), downloaded through
a private apt state of that architecture and unpacked with ``dpkg-deb`` (never installed on the host); or
a kernel and modules directory the user gives. Since 7.x
Debian splits the image into a meta package, ``linux-binary-*`` (the vmlinuz, under
``usr/lib/modules/<version>/``) and ``linux-modules-*``, and ships no ``modules.order``; both shapes work.

The initramfs (cpio newc, gzip) holds busybox-static (the host's for x86_64; for arm64 the arm64 package,
downloaded and unpacked), the modules the jobs need with their dependencies (decompressed: busybox
``insmod`` reads plain ``.ko``), ``guest/init`` and the programs of ``GUEST_PROGRAMS`` (``guest/NAME.c``,
which may include the headers beside them) compiled with ``gcc -static`` (for arm64 the cross compiler).

Everything lands in ``<cache>/guest/<key>/``, ``key`` a digest of every input (the architecture included),
so editing ``guest/`` rebuilds and nothing else does. x86_64 kernels are unpacked under
``<cache>/guest/kernels/<suite>/``, other architectures' under ``<cache>/guest/kernels/<arch>/<suite>/``.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from vhost_iommu.provision.apt import PrivateApt, newest_first
from vhost_iommu.provision.arch import ARCH_VARIABLE, ARCHES, X86_64, GuestArch, guest_arch
from vhost_iommu.provision.debian import KERNEL_SUITES, kernel_apt
from vhost_iommu.provision.errors import ProvisionError
from vhost_iommu.provision.host import ensure_packages
from vhost_iommu.provision.paths import cache_root, repo_root
from vhost_iommu.provision.progress import console, phase, run_logged

DEFAULT_SUITE = "trixie"
#: Not a suite: whichever of KERNEL_SUITES lists the highest kernel version.
NEWEST = "newest"
#: Names the suite of every guest this process boots when no caller names one (the e2e tests set it).
SUITE_VARIABLE = "VHOST_IOMMU_GUEST_SUITE"
# Bump when the layout of the image changes in a way the inputs' digest cannot see.
IMAGE_FORMAT = 1

# Loaded in this order after their dependencies (after the architecture's own first_modules); a module the
# kernel has built in is skipped. Only what the jobs use directly: a dependency such as irqbypass (a module
# on x86, built in on arm64) comes from its users' modinfo, which is right whether or not the kernel ships
# the modules.builtin that would say it is built in (Debian's 7.x packages do not).
REQUIRED_MODULES = ("virtio_iommu", "vfio", "vfio_iommu_type1", "vfio_pci_core", "vfio_pci")
# ext4 mounts the ext2 file system the blk-fs job makes (Debian builds no ext2 driver of its own); it asks
# the crypto API for "crc32c" at mount time, which no module dependency names (crc32c_generic gives it;
# kernels whose ext4 calls the crc32c library directly have no such module, and an absent one is skipped).
OPTIONAL_MODULES = ("virtio_blk", "crc32c_generic", "ext4")
# virtio-iommu on x86 offers no interrupt remapping; without this VFIO_SET_IOMMU fails with EPERM. An Arm
# guest with a GICv3 ITS needs no such leave, and the parameter is harmless there.
MODULE_PARAMETERS = {"vfio_iommu_type1": "allow_unsafe_interrupts=1"}

# vfio-dma: VFIO MAP/UNMAP traffic with no device DMA; dma-engine: drives the DMA test engine endpoint;
# blk-bench: block I/O timing of a virtio-blk disk (scripts/bench-blk).
GUEST_PROGRAMS = ("vfio-dma", "dma-engine", "blk-bench")
HOST_PACKAGES = ("zstd",)  # for kernels with .ko.zst modules; each architecture adds its compiler's
# An architecture the host runs natively takes the host's own busybox-static; another one the package of
# its own architecture, unpacked into the cache.
BUSYBOX_PACKAGE = "busybox-static"
HOST_BUSYBOX = Path("/bin/busybox")


@dataclass(frozen=True)
class GuestImage:
    """A bootable guest: pass ``-kernel kernel -initrd initrd`` to ``arch``'s QEMU."""

    kernel: Path
    initrd: Path
    kernel_version: str
    arch: GuestArch = X86_64


@dataclass(frozen=True)
class KernelTree:
    """A kernel image and the ``lib/modules/<version>`` directory that goes with it."""

    image: Path
    modules_dir: Path
    origin: str

    @property
    def version(self) -> str:
        return self.modules_dir.name


def guest_cache() -> Path:
    return cache_root() / "guest"


def default_suite() -> str:
    """The suite of the guest kernel when the caller names none: ``$VHOST_IOMMU_GUEST_SUITE``, else trixie."""
    return checked_suite(os.environ.get(SUITE_VARIABLE) or DEFAULT_SUITE)


def checked_suite(suite: str) -> str:
    if suite not in (*KERNEL_SUITES, NEWEST):
        choices = ", ".join((*KERNEL_SUITES, NEWEST))
        raise ProvisionError(f"no guest kernel suite {suite!r}: choose one of {choices}")
    return suite


def resolve_suite(suite: str, arch: GuestArch = X86_64) -> str:
    """``newest``: the suite whose index lists the highest kernel for ``arch``; any other suite itself."""
    if checked_suite(suite) != NEWEST:
        return suite
    listed: list[tuple[str, str]] = []
    for candidate in KERNEL_SUITES:
        apt = kernel_apt(candidate, arch)
        apt.update()
        versions = apt.binary_versions(arch.kernel_meta_package)
        if versions:
            listed.append((versions[0], candidate))
    if not listed:
        raise ProvisionError(f"no suite lists {arch.kernel_meta_package}; is the mirror reachable?")
    newest_version = newest_first([version for version, _ in listed])[0]
    return next(candidate for version, candidate in listed if version == newest_version)


def guest_sources() -> Path:
    return repo_root() / "guest"


# --- modules and their dependencies ---
# Debian's package ships no modules.dep (depmod writes it at install time), so dependencies come from each
# module's own .modinfo "depends=" entry, read only for the modules the guest needs.


def module_name(path: str) -> str:
    """``kernel/drivers/vfio/pci/vfio-pci.ko.xz`` -> ``vfio_pci`` (the kernel treats - and _ alike)."""
    base = path.rsplit("/", 1)[-1]
    base = re.sub(r"\.ko(\.(xz|zst|gz))?$", "", base)
    return base.replace("-", "_")


def module_index(modules_dir: Path) -> dict[str, Path]:
    """Every loadable module under ``modules_dir`` by name."""
    index: dict[str, Path] = {}
    for directory, _, files in os.walk(modules_dir):
        for file in files:
            if re.search(r"\.ko(\.(xz|zst|gz))?$", file):
                index[module_name(file)] = Path(directory) / file
    return index


def parse_modules_builtin(text: str) -> set[str]:
    return {module_name(line.strip()) for line in text.splitlines() if line.strip()}


_DEPENDS = re.compile(rb"(?:^|\0)depends=([^\0]*)\0")


def modinfo_depends(elf: bytes) -> list[str]:
    """The names in a module's ``depends=`` modinfo entry (empty when it depends on nothing)."""
    match = _DEPENDS.search(elf)
    if not match:
        return []
    return [module_name(name) for name in match.group(1).decode(errors="replace").split(",") if name]


def load_order(
    wanted: Sequence[str],
    optional: Sequence[str],
    depends_of: Callable[[str], list[str] | None],
    builtin: set[str],
) -> list[str]:
    """Modules to insmod, each after everything it depends on; built-in ones left out.

    ``depends_of(name)`` gives a module's dependencies, or None when the kernel has no such module. A
    wanted module that is neither a module nor built in is an error; an optional one is skipped.
    """
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in order or name in builtin:
            return
        if name in visiting:
            raise ProvisionError(f"module dependency cycle: {' -> '.join((*chain, name))}")
        dependencies = depends_of(name)
        if dependencies is None:
            needed_by = " -> ".join(chain) or "the guest"
            raise ProvisionError(f"module {name} (needed by {needed_by}) is not in this kernel")
        visiting.add(name)
        for dependency in dependencies:
            visit(dependency, (*chain, name))
        visiting.discard(name)
        order.append(name)

    for name in wanted:
        visit(name, ())
    for name in optional:
        if name not in builtin and depends_of(name) is not None:
            visit(name, ())
    return order


# --- the kernel ---


def looks_like_modules_dir(directory: Path) -> bool:
    """A ``lib/modules/<version>`` tree: what ``make modules_install`` and Debian's packages leave. Debian's
    7.x packages ship neither modules.order nor modules.builtin, so the ``kernel/`` tree counts too."""
    return any((directory / name).exists() for name in ("modules.order", "modules.builtin", "kernel"))


def kernel_tree_from(kernel: Path, modules: Path) -> KernelTree:
    """A user-given kernel image and modules directory (``/lib/modules/<version>``), checked."""
    if not kernel.is_file():
        raise ProvisionError(f"--kernel {kernel}: no such file")
    if not modules.is_dir() or not looks_like_modules_dir(modules):
        raise ProvisionError(
            f"--modules {modules}: not a lib/modules/<version> directory "
            "(none of modules.order, modules.builtin or kernel/ in it)"
        )
    return KernelTree(kernel.resolve(), modules.resolve(), f"given: {kernel}")


def _depends_of(apt: PrivateApt, package: str, version: str) -> dict[str, str | None]:
    """``package=version``'s Depends: each package name (first of an alternative) with its pinned
    ``(= VERSION)`` when it has one."""
    shown = apt.query("show", f"{package}={version}")
    match = re.search(r"^Depends:(.*)$", shown, re.MULTILINE)
    depends: dict[str, str | None] = {}
    for item in match.group(1).split(",") if match else []:
        first = item.split("|")[0].strip()
        named = re.match(r"([^\s(]+)(?:\s*\(\s*=\s*([^)\s]+)\s*\))?", first)
        if named:
            depends[named.group(1)] = named.group(2)
    return depends


def kernel_packages(
    apt: PrivateApt, meta_version: str, meta_package: str = X86_64.kernel_meta_package
) -> list[tuple[str, str]]:
    """The packages, with their versions, that make up the kernel ``meta_package=meta_version`` (such as
    ``linux-image-amd64``) installs: its versioned image package, plus for 7.x the ``linux-binary-*`` and
    ``linux-modules-*`` of the same kernel version that the image package depends on."""
    depends = _depends_of(apt, meta_package, meta_version)
    images = [name for name in depends if name.startswith("linux-image-")]
    if not images:
        raise ProvisionError(f"{meta_package} {meta_version} names no linux-image package in Depends")
    image = images[0]
    kernel_version = image.removeprefix("linux-image-")

    def version_of(package: str, pinned: str | None) -> str:
        if pinned:
            return pinned
        versions = apt.binary_versions(package)
        if not versions:
            raise ProvisionError(f"{package} is not in the index")
        return versions[0]

    packages = [(image, version_of(image, depends[image]))]
    for part, pinned in _depends_of(apt, *packages[0]).items():
        if part in (f"linux-binary-{kernel_version}", f"linux-modules-{kernel_version}"):
            packages.append((part, version_of(part, pinned)))
    return packages


def suite_kernels(suite: str, arch: GuestArch = X86_64) -> Path:
    """Where ``suite``'s kernels for ``arch`` are unpacked; x86_64's where they always were."""
    kernels = guest_cache() / "kernels"
    return kernels / suite if arch == X86_64 else kernels / arch.name / suite


def unpack_packages(apt: PrivateApt, packages: Sequence[tuple[str, str]], unpacked: Path) -> Path:
    """Download ``packages`` (name, version) and unpack them all into ``unpacked/root`` (once: a complete
    unpacking is marked, an incomplete one is redone); returns that root."""
    root = unpacked / "root"
    if not (unpacked / ".complete").is_file():
        downloads = guest_cache() / "downloads"
        shutil.rmtree(unpacked, ignore_errors=True)
        root.mkdir(parents=True)
        for package, version in packages:
            deb = apt.download_binary(package, version, downloads)
            run_logged(
                ["dpkg-deb", "-x", deb, root], title=f"unpacking {deb.name}", log=guest_cache() / "build.log"
            )
            deb.unlink()
        (unpacked / ".complete").touch()
    return root


def fetch_debian_kernel(suite: str, arch: GuestArch = X86_64) -> KernelTree:
    """``suite``'s current kernel for ``arch`` (newest listed first, falling back to older ones the pool
    still has), downloaded and unpacked into the cache (once)."""
    apt = kernel_apt(suite, arch)
    chosen: dict[str, KernelTree] = {}

    def listed() -> list[str]:
        versions = apt.binary_versions(arch.kernel_meta_package)
        if not versions:
            raise ProvisionError(
                f"the {suite} index lists no {arch.kernel_meta_package}: {suite} has no {arch.name} kernel, "
                "or the mirror is unreachable"
            )
        return versions

    def fetch(meta_version: str) -> None:
        packages = kernel_packages(apt, meta_version, arch.kernel_meta_package)
        image, image_version = packages[0]
        root = unpack_packages(apt, packages, suite_kernels(suite, arch) / f"{image}_{image_version}")
        chosen["tree"] = _kernel_tree_in(root, f"{image} {image_version} ({suite})")

    apt.fetch_listed(listed, fetch)
    return chosen["tree"]


# --- busybox ---


def busybox_packages(arch: GuestArch) -> Path:
    """Where ``arch``'s busybox-static packages are unpacked (architectures the host does not run)."""
    return guest_cache() / "busybox" / arch.name


def cached_busybox(arch: GuestArch) -> Path | None:
    """``arch``'s busybox binary when it is at hand (the host's, or one unpacked earlier), else None."""
    if arch.native:
        return HOST_BUSYBOX if HOST_BUSYBOX.is_file() else None
    unpacked = {
        marker.parent.name.rsplit("_", 1)[-1]: marker.parent
        for marker in busybox_packages(arch).glob("*/.complete")
    }
    if not unpacked:
        return None
    return _busybox_in(unpacked[newest_first(list(unpacked))[0]] / "root")


def _busybox_in(root: Path) -> Path:
    """The busybox binary of a busybox-static package unpacked at ``root`` (trixie's is under usr/)."""
    for place in ("usr/bin/busybox", "bin/busybox"):
        if (root / place).is_file():
            return root / place
    raise ProvisionError(f"no bin/busybox or usr/bin/busybox in {root}")


def ensure_busybox(arch: GuestArch) -> Path:
    """``arch``'s static busybox: the host's package for a native architecture, else trixie's package of
    that architecture from the private apt state, unpacked into the cache (once)."""
    if arch.native:
        ensure_packages((BUSYBOX_PACKAGE,), why="building the guest initramfs")
        return HOST_BUSYBOX
    apt = kernel_apt(DEFAULT_SUITE, arch)
    chosen: dict[str, Path] = {}

    def listed() -> list[str]:
        versions = apt.binary_versions(BUSYBOX_PACKAGE)
        if not versions:
            raise ProvisionError(f"the {DEFAULT_SUITE} {arch.debian_arch} index lists no {BUSYBOX_PACKAGE}")
        return versions

    def fetch(version: str) -> None:
        directory = busybox_packages(arch) / f"{BUSYBOX_PACKAGE}_{version}"
        chosen["busybox"] = _busybox_in(unpack_packages(apt, [(BUSYBOX_PACKAGE, version)], directory))

    apt.fetch_listed(listed, fetch)
    return chosen["busybox"]


def _kernel_tree_in(root: Path, origin: str) -> KernelTree:
    """The one kernel unpacked under ``root``: 6.12 puts its image in boot/, 7.x beside its modules."""
    module_dirs = sorted(
        directory
        for parent in (root / "lib" / "modules", root / "usr" / "lib" / "modules")
        if parent.is_dir() and not parent.is_symlink()
        for directory in parent.iterdir()
        if directory.is_dir() and looks_like_modules_dir(directory)
    )
    images = sorted((root / "boot").glob("vmlinuz-*"))
    images += [directory / "vmlinuz" for directory in module_dirs if (directory / "vmlinuz").is_file()]
    if len(images) != 1 or len(module_dirs) != 1:
        raise ProvisionError(
            f"{root}: expected one kernel image (boot/vmlinuz-* or lib/modules/<version>/vmlinuz) and one "
            f"lib/modules/<version> directory; found {len(images)} and {len(module_dirs)}"
        )
    return KernelTree(images[0], module_dirs[0], origin)


# --- the initramfs ---


@dataclass(frozen=True)
class CpioEntry:
    name: str  # path inside the archive, no leading slash
    mode: int  # st_mode, type bits included
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def cpio_newc(entries: Iterable[CpioEntry]) -> bytes:
    """A cpio archive in the "newc" format the kernel unpacks; owner root, mtime 0 (reproducible)."""
    out = bytearray()

    def pad() -> None:
        out.extend(b"\0" * (-len(out) % 4))

    def record(inode: int, entry: CpioEntry) -> None:
        name = entry.name.encode() + b"\0"
        fields = (
            inode, entry.mode, 0, 0, 2 if stat.S_ISDIR(entry.mode) else 1, 0, len(entry.data),
            0, 0, entry.rdev[0], entry.rdev[1], len(name), 0,
        )  # fmt: skip
        out.extend(b"070701" + b"".join(f"{value:08X}".encode() for value in fields))
        out.extend(name)
        pad()
        out.extend(entry.data)
        pad()

    inode = 0
    for inode, entry in enumerate(entries, start=1):
        record(inode, entry)
    record(inode + 1, CpioEntry("TRAILER!!!", 0))
    return bytes(out)


def decompress_module(path: Path) -> bytes:
    """A module's plain ELF bytes, whatever Debian compressed it with."""
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    if path.name.endswith(".zst"):
        completed = subprocess.run(["zstd", "-dc", str(path)], check=False, capture_output=True)
        if completed.returncode != 0:
            raise ProvisionError(f"cannot decompress {path}: {completed.stderr.decode(errors='replace')}")
        return completed.stdout
    return data


def compile_programs(out_dir: Path, log: Path, arch: GuestArch = X86_64) -> dict[str, Path]:
    """``gcc -static`` every guest program for ``arch``; returns {name: binary}."""
    binaries: dict[str, Path] = {}
    for name in GUEST_PROGRAMS:
        source = guest_sources() / f"{name}.c"
        binary = out_dir / name
        run_logged(
            [arch.compiler, "-static", "-O2", "-Wall", "-Wextra", "-Werror", "-o", binary, source],
            title=f"compiling guest/{name}.c ({arch.compiler} -static)",
            log=log,
        )
        binaries[name] = binary
    return binaries


def _digest_of(paths: Iterable[Path], extra: Iterable[str]) -> str:
    digest = hashlib.sha256()
    for text in extra:
        digest.update(text.encode() + b"\0")
    for path in sorted(paths):
        digest.update(path.name.encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


def _tool_version(argv: Sequence[str]) -> str:
    try:
        completed = subprocess.run(list(argv), check=False, capture_output=True, text=True)
    except OSError:
        return "missing"
    return (
        (completed.stdout or completed.stderr).splitlines()[0]
        if (completed.stdout or completed.stderr)
        else ""
    )


def wanted_modules(arch: GuestArch) -> tuple[str, ...]:
    """The modules ``arch``'s guest must load, in order: its own transports' first, then the common ones."""
    return (*arch.first_modules, *REQUIRED_MODULES)


def image_key(tree: KernelTree, arch: GuestArch = X86_64, busybox: Path = HOST_BUSYBOX) -> str:
    """A digest of every input of the image: architecture, guest sources, kernel, busybox, compiler and
    format."""
    sources = [path for path in guest_sources().iterdir() if path.is_file()]
    extra = [
        f"format={IMAGE_FORMAT}",
        f"arch={arch.name}",
        f"kernel={tree.image}:{tree.image.stat().st_size}:{tree.image.stat().st_mtime_ns}",
        f"modules={tree.modules_dir}",
        f"required={','.join(wanted_modules(arch))} optional={','.join(OPTIONAL_MODULES)}",
        f"params={MODULE_PARAMETERS}",
        f"busybox={busybox}:{busybox.stat().st_size}:{busybox.stat().st_mtime_ns}",
        f"gcc={_tool_version([arch.compiler, '--version'])}",
    ]
    return _digest_of(sources, extra)


def build_initramfs(
    tree: KernelTree, work: Path, arch: GuestArch = X86_64, busybox: Path = HOST_BUSYBOX
) -> Path:
    """Assemble ``initrd.gz`` in ``work`` for ``tree``'s modules, ``arch``'s programs and ``busybox``."""
    log = work / "build.log"
    index = module_index(tree.modules_dir)
    builtin_file = tree.modules_dir / "modules.builtin"
    builtin = parse_modules_builtin(builtin_file.read_text()) if builtin_file.is_file() else set()
    elves: dict[str, bytes] = {}

    def depends_of(name: str) -> list[str] | None:
        if name not in index:
            return None
        if name not in elves:
            elves[name] = decompress_module(index[name])
        return modinfo_depends(elves[name])

    order = load_order(wanted_modules(arch), OPTIONAL_MODULES, depends_of, builtin)
    console.print(f"guest modules, in load order: {' '.join(order) or '(all built in)'}")

    entries = [CpioEntry(name, stat.S_IFDIR | 0o755) for name in ("bin", "dev", "etc", "lib", "lib/modules",
                                                                   "proc", "sys", "tmp", "root")]  # fmt: skip
    # The kernel opens /dev/console for init before devtmpfs is mounted: it must exist in the archive.
    entries.append(CpioEntry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)))
    entries.append(CpioEntry("dev/null", stat.S_IFCHR | 0o666, rdev=(1, 3)))
    entries.append(CpioEntry("bin/busybox", stat.S_IFREG | 0o755, busybox.read_bytes()))
    entries.append(CpioEntry("init", stat.S_IFREG | 0o755, (guest_sources() / "init").read_bytes()))
    with tempfile.TemporaryDirectory(dir=work) as scratch:
        for name, binary in compile_programs(Path(scratch), log, arch).items():
            entries.append(CpioEntry(f"bin/{name}", stat.S_IFREG | 0o755, binary.read_bytes()))
    load_lines = []
    for name in order:
        entries.append(CpioEntry(f"lib/modules/{name}.ko", stat.S_IFREG | 0o644, elves[name]))
        load_lines.append(f"{name}.ko {MODULE_PARAMETERS.get(name, '')}".rstrip())
    entries.append(
        CpioEntry("etc/modules.load", stat.S_IFREG | 0o644, ("\n".join(load_lines) + "\n").encode())
    )

    initrd = work / "initrd.gz"
    temporary = initrd.with_suffix(".tmp")
    with (
        temporary.open("wb") as raw,
        gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6, mtime=0) as packed,
    ):
        packed.write(cpio_newc(entries))
    temporary.replace(initrd)
    return initrd


def find_guest(
    kernel: Path | None = None,
    modules: Path | None = None,
    *,
    suite: str | None = None,
    arch: GuestArch | None = None,
) -> GuestImage | None:
    """The cached image for these inputs, or None (nothing is downloaded or built; ``newest`` is the newest
    kernel in the cache; ``arch`` None: :func:`.arch.guest_arch`'s default)."""
    arch = arch or guest_arch()
    tree = _tree_without_download(kernel, modules, suite or default_suite(), arch)
    busybox = cached_busybox(arch)
    if tree is None or busybox is None:
        return None
    return _cached_image(tree, arch, busybox)


def _cached_kernels(suites: Sequence[str], arch: GuestArch) -> list[tuple[str, Path]]:
    """(version, unpacked directory) of every complete kernel of ``suites`` for ``arch`` in the cache."""
    return [
        (directory.name.rsplit("_", 1)[-1], directory)
        for suite in suites
        for directory in (marker.parent for marker in suite_kernels(suite, arch).glob("*/.complete"))
    ]


def _tree_without_download(
    kernel: Path | None, modules: Path | None, suite: str, arch: GuestArch
) -> KernelTree | None:
    if kernel is not None or modules is not None:
        if kernel is None or modules is None:
            raise ProvisionError("give both --kernel and --modules, or neither")
        return kernel_tree_from(kernel, modules)
    cached = _cached_kernels(KERNEL_SUITES if suite == NEWEST else (suite,), arch)
    if not cached:
        return None
    newest_version = newest_first([version for version, _ in cached])[0]
    directory = next(directory for version, directory in cached if version == newest_version)
    return _kernel_tree_in(directory / "root", f"{directory.name} ({directory.parent.name})")


def _cached_image(tree: KernelTree, arch: GuestArch, busybox: Path) -> GuestImage | None:
    work = guest_cache() / image_key(tree, arch, busybox)
    manifest = work / "manifest.json"
    if not manifest.is_file() or not (work / "initrd.gz").is_file():
        return None
    return GuestImage(tree.image, work / "initrd.gz", tree.version, arch)


def ensure_guest(
    kernel: Path | None = None,
    modules: Path | None = None,
    *,
    suite: str | None = None,
    arch: GuestArch | None = None,
    rebuild: bool = False,
) -> GuestImage:
    """The guest image for these inputs (``suite``: see :func:`default_suite`; ``arch`` None:
    :func:`.arch.guest_arch`'s default), downloading the kernel and busybox and building the initramfs
    when needed."""
    arch = arch or guest_arch()
    ensure_packages((*HOST_PACKAGES, *arch.compiler_packages), why="building the guest initramfs")
    busybox = cached_busybox(arch) or ensure_busybox(arch)
    if kernel is not None or modules is not None:
        tree = _tree_without_download(kernel, modules, DEFAULT_SUITE, arch)
        assert tree is not None
    else:
        # A named suite is looked up in the cache first; ``newest`` asks the indexes which suite it is.
        concrete = resolve_suite(suite or default_suite(), arch)
        tree = _tree_without_download(None, None, concrete, arch) or fetch_debian_kernel(concrete, arch)
    if not rebuild:
        cached = _cached_image(tree, arch, busybox)
        if cached is not None:
            return cached
    work = guest_cache() / image_key(tree, arch, busybox)
    work.mkdir(parents=True, exist_ok=True)
    with phase(f"building the {arch.name} initramfs for {tree.version}"):
        initrd = build_initramfs(tree, work, arch, busybox)
    manifest = {
        "arch": arch.name,
        "kernel": str(tree.image),
        "kernel_version": tree.version,
        "kernel_origin": tree.origin,
        "initrd": str(initrd),
        "key": work.name,
    }
    (work / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return GuestImage(tree.image, initrd, tree.version, arch)


def main(argv: list[str] | None = None) -> int:
    """``scripts/build-guest``: print ``KERNEL=PATH`` and ``INITRD=PATH`` of a ready guest image."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="build-guest",
        description="Build (or find in the cache) the test guest: a Debian kernel (trixie's unless --suite "
        "says otherwise) and a busybox initramfs with the virtio-iommu/VFIO modules and the programs of "
        "guest/.",
    )
    parser.add_argument(
        "--arch",
        choices=tuple(ARCHES),
        help=f"the guest's architecture (default ${ARCH_VARIABLE}, else {X86_64.name})",
    )
    parser.add_argument(
        "--suite",
        choices=(*KERNEL_SUITES, NEWEST),
        help=f"the Debian suite whose linux-image-amd64 (linux-image-arm64) to use (default "
        f"${SUITE_VARIABLE}, else {DEFAULT_SUITE}); {NEWEST}: whichever suite lists the highest version",
    )
    parser.add_argument("--kernel", type=Path, help="a kernel image to use instead of Debian's")
    parser.add_argument("--modules", type=Path, help="its lib/modules/<version> directory")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the initramfs even if cached")
    parser.add_argument("--check", action="store_true", help="only look in the cache (exit 1 if not there)")
    args = parser.parse_args(argv)
    try:
        arch = guest_arch(args.arch)
        image = (
            find_guest(args.kernel, args.modules, suite=args.suite, arch=arch)
            if args.check
            else ensure_guest(args.kernel, args.modules, suite=args.suite, arch=arch, rebuild=args.rebuild)
        )
    except ProvisionError as error:
        console.print(f"[red]build-guest:[/red] {error}")
        return 1
    except OSError as error:  # an unwritable cache, a full disk...
        console.print(
            f"[red]build-guest:[/red] {error} (the cache is {cache_root()}; $VHOST_IOMMU_CACHE moves it)"
        )
        return 1
    if image is None:
        console.print(f"[red]build-guest:[/red] no cached {arch.name} guest image; run scripts/build-guest")
        return 1
    # Shell assignments, so that `eval "$(scripts/build-guest)"` sets KERNEL and INITRD.
    print(f"KERNEL={shlex.quote(str(image.kernel))}")
    print(f"INITRD={shlex.quote(str(image.initrd))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

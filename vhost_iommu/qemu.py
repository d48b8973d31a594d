"""QEMU command lines for a guest behind vhost-iommu (or behind QEMU's built-in virtio-iommu, to compare).

:func:`build_command` turns a :class:`QemuSetup` into a :class:`QemuCommand`: argument groups, each with a
comment saying why it is there. ``QemuCommand.argv`` is the list for ``subprocess``; ``shell_script()`` is
the same command as a commented bash script (the form kept in ``qemu-configs/``).

What the choices are for:

- q35 + TCG: ``/dev/kvm`` on these machines (a PVM flavour) cannot run an ordinary kernel. Guest RAM is a
  shared memfd because a vhost-user back-end maps guest memory itself.
- The IOMMU is QEMU's generic vhost-user device with virtio ID 23. QEMU builds an ACPI VIOT only for its own
  ``virtio-iommu-pci``, so the topology reaches the guest as a whole table (``-acpitable file=``). No
  ``reconnect-ms`` on the chardev: with it the generic device fails to realize (the socket is not yet
  connected when the device is realized).
- QEMU does the DMA of the devices it emulates without asking a vhost-user device for translations, so an
  endpoint that must DMA needs an identity domain in the guest (``iommu.passthrough=1``).
- arm64 (``QemuSetup.arch``): virt with a GICv3 (under TCG virt would otherwise pick GICv2m, whose doorbell
  is not the one the Arm topologies report) and a Cortex-A57; no firmware (``-kernel`` boots directly), the
  PL011 console. virt has no ``-acpitable``: the topology reaches the guest in a device tree made from QEMU's
  own dump (:func:`dtb_dump_command`, then :func:`vhost_iommu.dtb.add_iommu`) and passed with ``-dtb``. The
  IOMMU is a PCI function or, with :class:`MmioIommu`, one of virt's virtio-mmio transports.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from vhost_iommu.abi import CONFIG_SIZE, QUEUE_COUNT, VIRTIO_ID_IOMMU
from vhost_iommu.machine import Arch, IommuFacts, IommuTransport, virt_mmio_bus
from vhost_iommu.viot import PciRange, ViotTopology, default_topology, format_bdf, ranges_endpoint_id

DEFAULT_MEMORY_MIB = 1024
DEFAULT_FIRMWARE_DIRS = (Path("/usr/share/qemu"), Path("/usr/share/seabios"))
# qboot (Debian's qemu-system-data) boots -kernel directly. Measured here under TCG: SeaBIOS 1.16.2 spends
# about 32 s between its banner and "Booting from ROM"; with qboot a whole boot-to-job-done takes 5-8 s.
QBOOT = Path("/usr/share/qemu/qboot.rom")
DEFAULT_CHARDEV_ID = "viommu"

# The guest's serial console on stdio; panic=-1 reboots at once on a panic, which -no-reboot turns into exit.
BASE_KERNEL_ARGS = ("console=ttyS0", "panic=-1")
# virt's serial port is a PL011, ttyAMA0 to Linux.
ARM64_BASE_KERNEL_ARGS = ("console=ttyAMA0", "panic=-1")
MACHINE_NAMES = {Arch.X86_64: "q35", Arch.ARM64: "virt"}


class CommandError(ValueError):
    """A setup that cannot work (clashing PCI slots, an endpoint outside the IOMMU's ranges...)."""


class IommuKind(Enum):
    VHOST_USER = "vhost-user"  # our back-end, through -device vhost-user-test-device-pci
    BUILTIN = "builtin"  # QEMU's own -device virtio-iommu-pci (for comparisons)
    NONE = "none"


@dataclass(frozen=True)
class PciTestDevice:
    """QEMU's ``pci-testdev``: BARs, no DMA; a harmless device for guest VFIO to own."""

    slot: int
    function: int = 0


@dataclass(frozen=True)
class VirtioBlockDevice:
    """A virtio-blk-pci disk backed by a raw ``image``; it does real DMA (identity domain needed)."""

    slot: int
    image: Path
    function: int = 0
    read_only: bool = False
    # With ACCESS_PLATFORM the guest driver goes through the DMA API (and so through the IOMMU's domain);
    # without it, virtio bypasses the IOMMU entirely in the guest.
    iommu_platform: bool = True


@dataclass(frozen=True)
class VfioUserEndpoint:
    """A PCI function vhost-iommu serves over vfio-user (a topology ``[[devices]]`` entry, e.g. the DMA
    engine): QEMU's ``vfio-user-pci`` connects to ``socket`` at start-up and never reconnects."""

    slot: int
    socket: Path
    kind: str = "dma-engine"
    function: int = 0


Endpoint = PciTestDevice | VirtioBlockDevice | VfioUserEndpoint

_SERVED_ENDPOINT_COMMENTS = {
    "dma-engine": "{kind}: served by vhost-iommu over vfio-user; its every DMA access is\n"
    "translated by vhost-iommu's IOMMU (QEMU wants the JSON form for the socket)",
    "virtio-blk": "{kind}: a disk served by vhost-iommu over vfio-user; the guest's virtio_blk puts IOVAs\n"
    "in its rings and buffers and vhost-iommu translates every one (QEMU wants the JSON form for the socket)",
}
"""The comment above a ``vfio-user-pci`` device, by the served device's kind."""


@dataclass(frozen=True)
class MmioIommu:
    """An IOMMU on one of virt's virtio-mmio transports (base ``address``): no PCI function; the PCI
    ``ranges`` it translates are those of the topology (the device tree's ``iommu-map``)."""

    address: int
    ranges: tuple[PciRange, ...]

    def endpoint_id(self, segment: int, requester_id: int) -> int | None:
        return ranges_endpoint_id(self.ranges, segment, requester_id)


IommuPlacement = ViotTopology | MmioIommu


def placement_from(topology: IommuFacts) -> IommuPlacement:
    """Where a device topology puts the IOMMU and which PCI functions it translates, for a command line."""
    ranges = tuple(PciRange(*entry) for entry in topology.viot_ranges())
    if topology.iommu_transport is IommuTransport.MMIO:
        assert topology.iommu_mmio_address is not None  # the topology checks it
        return MmioIommu(topology.iommu_mmio_address, ranges)
    return ViotTopology(topology.iommu_segment, topology.iommu_bdf, ranges)


@dataclass(frozen=True)
class QemuSetup:
    """Everything that varies between the command lines this project runs."""

    qemu: Path
    kernel: Path
    initrd: Path
    kernel_args: Sequence[str] = ()
    iommu: IommuKind = IommuKind.VHOST_USER
    socket_path: Path | None = None  # the back-end's listening socket (VHOST_USER only)
    viot_path: Path | None = None  # the table from vhost_iommu.viot (VHOST_USER on x86_64 only)
    dtb_path: Path | None = None  # the tree from vhost_iommu.dtb (VHOST_USER on arm64 only)
    topology: IommuPlacement = field(default_factory=default_topology)
    arch: Arch = Arch.X86_64
    endpoints: Sequence[Endpoint] = ()
    memory_mib: int = DEFAULT_MEMORY_MIB
    cpus: int = 1
    firmware_dirs: Sequence[Path] = DEFAULT_FIRMWARE_DIRS
    bios: Path | None = QBOOT  # None: QEMU's default, SeaBIOS
    qmp_socket: Path | None = None
    chardev_id: str = DEFAULT_CHARDEV_ID
    extra_args: Sequence[str] = ()


@dataclass(frozen=True)
class ArgGroup:
    """Arguments that belong together, and why they are there."""

    comment: str
    args: tuple[str, ...]


@dataclass(frozen=True)
class QemuCommand:
    binary: str
    groups: tuple[ArgGroup, ...]

    @property
    def argv(self) -> list[str]:
        return [self.binary, *(arg for group in self.groups for arg in group.args)]

    def shell_script(self, title: str = "", variables: Mapping[str, str] | None = None) -> str:
        """This command as a bash script, each group under its comment (bash allows comments in arrays).

        ``variables`` maps NAME to the line that gives it a value (``: "${NAME:=default}"``); every
        ``@NAME@`` in an argument (or the binary) becomes ``${NAME}`` in the script, so one script serves
        any paths.
        """
        variables = variables or {}
        lines = ["#!/usr/bin/env bash"]
        if title:
            lines += [f"# {line}" if line else "#" for line in title.splitlines()]
        lines += ["set -euo pipefail", *variables.values(), "args=("]
        for group in self.groups:
            lines += [f"    # {line}" for line in group.comment.splitlines()]
            lines += _wrap_args([_shell_word(arg, variables) for arg in group.args])
        lines += [")", f'exec {_shell_word(self.binary, variables)} "${{args[@]}}" "$@"', ""]
        return "\n".join(lines)


_PLACEHOLDER = re.compile(r"@([A-Z][A-Z0-9_]*)@")


def _shell_word(arg: str, variables: Mapping[str, str]) -> str:
    """``arg`` quoted for bash; ``@NAME@`` of a known variable expands to ``${NAME}``."""
    names = [name for name in _PLACEHOLDER.findall(arg) if name in variables]
    if not names:
        return shlex.quote(arg)
    pieces = _PLACEHOLDER.split(arg)
    quoted = []
    for index, piece in enumerate(pieces):
        if index % 2:
            quoted.append(f"${{{piece}}}" if piece in variables else f"@{piece}@")
        else:
            quoted.append(re.sub(r'([$`"\\])', r"\\\1", piece))
    return '"' + "".join(quoted) + '"'


def _wrap_args(words: Sequence[str]) -> list[str]:
    """Options with their values on one line (``-device X`` stays together); words are already quoted."""
    lines: list[str] = []
    index = 0
    while index < len(words):
        option = words[index]
        if option.startswith("-") and index + 1 < len(words) and not words[index + 1].startswith("-"):
            lines.append(f"    {option} {words[index + 1]}")
            index += 2
        else:
            lines.append(f"    {option}")
            index += 1
    return lines


def _pci_address(slot: int, function: int) -> str:
    if not (0 <= slot <= 0x1F and 0 <= function <= 7):
        raise CommandError(f"PCI slot {slot:#x}.{function} is not a valid device/function on the root bus")
    return f"addr={slot:#x}.{function}" if function else f"addr={slot:#x}"


def _requester_id(slot: int, function: int) -> int:
    return (slot << 3) | function


def iommu_slot(topology: IommuPlacement, arch: Arch = Arch.X86_64) -> tuple[int, int] | None:
    """(slot, function) of the IOMMU on the root bus (bus 0, segment 0: all q35 and virt have); None for
    an IOMMU that is no PCI function."""
    if isinstance(topology, MmioIommu):
        return None
    if topology.iommu_segment != 0 or topology.iommu_bdf >> 8 != 0:
        raise CommandError(
            f"the IOMMU at {format_bdf(topology.iommu_segment, topology.iommu_bdf)} is not on the "
            f"{MACHINE_NAMES[arch]} root bus (segment 0, bus 0), the only place these command lines put "
            "devices"
        )
    return (topology.iommu_bdf >> 3) & 0x1F, topology.iommu_bdf & 7


def machine_group(setup: QemuSetup) -> list[ArgGroup]:
    if setup.memory_mib <= 0 or setup.cpus <= 0:
        raise CommandError(f"memory ({setup.memory_mib} MiB) and cpus ({setup.cpus}) must be positive")
    if setup.arch is Arch.ARM64:
        return _virt_machine_group(setup)
    return [
        ArgGroup(
            "q35 under TCG; guest RAM is a shared memfd so a vhost-user back-end can map it",
            ("-M", "q35,accel=tcg,memory-backend=mem", *_memory_args(setup)),
        ),
        ArgGroup(
            "serial console on stdio, no display, no NIC (its option ROM is not shipped), exit on reboot",
            ("-nographic", "-vga", "none", "-nic", "none", "-no-reboot"),
        ),
        ArgGroup(
            "BIOS and option ROMs from Debian's seabios and qemu-system-data",
            tuple(arg for directory in setup.firmware_dirs for arg in ("-L", str(directory))),
        ),
        *(
            [
                ArgGroup(
                    "qboot: boots the kernel at once (SeaBIOS takes ~30 s to get there under TCG)",
                    ("-bios", str(setup.bios)),
                )
            ]
            if setup.bios is not None
            else []
        ),
    ]


def _memory_args(setup: QemuSetup) -> tuple[str, ...]:
    size = f"{setup.memory_mib}M"
    return (
        "-object", f"memory-backend-memfd,id=mem,size={size},share=on", "-m", size, "-smp", str(setup.cpus),
    )  # fmt: skip


def _virt_machine_group(setup: QemuSetup) -> list[ArgGroup]:
    return [
        ArgGroup(
            "virt with a GICv3 (its ITS doorbell is the topology's MSI region; TCG would pick GICv2m) under\n"
            "TCG; guest RAM is a shared memfd so a vhost-user back-end can map it",
            (
                "-M",
                "virt,gic-version=3,accel=tcg,memory-backend=mem",
                "-cpu",
                "cortex-a57",
                *_memory_args(setup),
            ),
        ),
        ArgGroup(
            "PL011 serial console on stdio, no display, no NIC, exit on reboot (-kernel needs no firmware)",
            ("-nographic", "-nic", "none", "-no-reboot"),
        ),
    ]


def dtb_dump_command(setup: QemuSetup, output: Path) -> QemuCommand:
    """QEMU writing the device tree it builds for ``setup``'s machine to ``output`` and exiting: the same
    machine options (-nic none included: virt's default NIC wants an option ROM that is not shipped), no
    devices (a vhost-user device would want its back-end before the dump)."""
    if setup.arch is not Arch.ARM64:
        raise CommandError("only virt (arch arm64) boots from a device tree")
    return QemuCommand(
        str(setup.qemu),
        (
            *machine_group(setup),
            ArgGroup("dump the device tree and exit", ("-machine", f"dumpdtb={output}")),
        ),
    )


def _description_group(setup: QemuSetup) -> ArgGroup:
    """How the guest learns the topology: the ACPI VIOT on q35, the device tree on virt."""
    if setup.arch is Arch.ARM64:
        if setup.dtb_path is None:
            raise CommandError("a vhost-user IOMMU on virt needs dtb_path (the tree from vhost-iommu dtb)")
        return ArgGroup(
            "the device tree with the IOMMU's node and the PCIe host's iommu-map (vhost-iommu dtb):\n"
            "QEMU's virt describes only its own virtio-iommu-pci",
            ("-dtb", str(setup.dtb_path)),
        )
    if setup.viot_path is None:
        raise CommandError("a vhost-user IOMMU on q35 needs viot_path (the table from vhost-iommu viot)")
    return ArgGroup(
        "the ACPI VIOT telling the guest which endpoints the IOMMU manages (QEMU builds none for it)",
        ("-acpitable", f"file={setup.viot_path}"),
    )


def iommu_group(setup: QemuSetup) -> list[ArgGroup]:
    slot = iommu_slot(setup.topology, setup.arch)
    if isinstance(setup.topology, MmioIommu) and setup.arch is not Arch.ARM64:
        raise CommandError("an IOMMU on virtio-mmio needs the virt machine (arch arm64)")
    if setup.iommu is IommuKind.VHOST_USER:
        if setup.socket_path is None:
            raise CommandError("a vhost-user IOMMU needs socket_path (the back-end's socket)")
        device = (
            f"chardev={setup.chardev_id},virtio-id={VIRTIO_ID_IOMMU},num_vqs={QUEUE_COUNT},"
            f"config_size={CONFIG_SIZE}"
        )
        if isinstance(setup.topology, MmioIommu):
            try:
                bus = virt_mmio_bus(setup.topology.address)
            except ValueError as error:
                raise CommandError(str(error)) from None
            transport = ArgGroup(
                f"the virtio-iommu on virt's virtio-mmio transport at {setup.topology.address:#x}, served\n"
                "by vhost-iommu; modern virtio-mmio (the device offers VERSION_1 only)",
                (
                    "-chardev", f"socket,id={setup.chardev_id},path={setup.socket_path}",
                    "-device", f"vhost-user-test-device,{device},bus={bus}",
                    "-global", "virtio-mmio.force-legacy=false",
                ),
            )  # fmt: skip
        else:
            assert slot is not None
            transport = ArgGroup(
                "the virtio-iommu (ID 23, requestq + eventq, 40-byte config) served by vhost-iommu;\n"
                "no reconnect-ms: with it the generic device fails to realize",
                (
                    "-chardev",
                    f"socket,id={setup.chardev_id},path={setup.socket_path}",
                    "-device",
                    f"vhost-user-test-device-pci,{device},{_pci_address(*slot)}",
                ),
            )
        return [transport, _description_group(setup)]
    if setup.iommu is IommuKind.BUILTIN:
        if slot is None:
            raise CommandError("QEMU's built-in virtio-iommu is a PCI function: give it a PCI topology")
        return [
            ArgGroup(
                "QEMU's built-in virtio-iommu, for comparison; QEMU writes its own VIOT (whole root bus)",
                ("-device", f"virtio-iommu-pci,{_pci_address(*slot)}"),
            )
        ]
    return []


def endpoint_groups(setup: QemuSetup) -> list[ArgGroup]:
    iommu_address = iommu_slot(setup.topology, setup.arch) if setup.iommu is not IommuKind.NONE else None
    taken: dict[tuple[int, int], str] = {}
    if iommu_address is not None:
        taken[iommu_address] = "the IOMMU"
    groups: list[ArgGroup] = []
    for index, endpoint in enumerate(setup.endpoints):
        where = (endpoint.slot, endpoint.function)
        address = _pci_address(*where)
        if where in taken:
            raise CommandError(
                f"endpoint {index} wants slot {where[0]:#x}.{where[1]}, taken by {taken[where]}"
            )
        taken[where] = f"endpoint {index}"
        if (
            setup.iommu is IommuKind.VHOST_USER
            and setup.topology.endpoint_id(0, _requester_id(*where)) is None
        ):
            raise CommandError(
                f"endpoint {index} at {format_bdf(0, _requester_id(*where))} lies outside the IOMMU's "
                "PCI ranges"
            )
        if isinstance(endpoint, VfioUserEndpoint):
            device = {
                "driver": "vfio-user-pci",
                "socket": {"type": "unix", "path": str(endpoint.socket)},
                "addr": address.removeprefix("addr="),
            }
            groups.append(
                ArgGroup(
                    _SERVED_ENDPOINT_COMMENTS.get(
                        endpoint.kind, _SERVED_ENDPOINT_COMMENTS["dma-engine"]
                    ).format(kind=endpoint.kind),
                    ("-device", json.dumps(device, separators=(",", ":"))),
                )
            )
        elif isinstance(endpoint, PciTestDevice):
            groups.append(
                ArgGroup(
                    "pci-testdev: BARs and no DMA, for guest VFIO (real MAP/UNMAP traffic, no device DMA)",
                    ("-device", f"pci-testdev,{address}"),
                )
            )
        else:
            drive = f"blk{index}"
            read_only = ",readonly=on" if endpoint.read_only else ""
            # ACCESS_PLATFORM needs a modern-only device (QEMU refuses it on a transitional one).
            platform = ",disable-legacy=on,iommu_platform=on" if endpoint.iommu_platform else ""
            groups.append(
                ArgGroup(
                    "virtio-blk: real DMA, done by QEMU itself with guest-physical addresses,\n"
                    "so the guest must give it an identity domain (iommu.passthrough=1)",
                    (
                        "-drive", f"file={endpoint.image},format=raw,if=none,id={drive},cache=unsafe"
                        + read_only,
                        "-device", f"virtio-blk-pci,drive={drive},{address}{platform}",
                    ),
                )
            )  # fmt: skip
    return groups


def kernel_group(setup: QemuSetup) -> list[ArgGroup]:
    needs_identity = any(isinstance(endpoint, VirtioBlockDevice) for endpoint in setup.endpoints)
    kernel_args = list(ARM64_BASE_KERNEL_ARGS if setup.arch is Arch.ARM64 else BASE_KERNEL_ARGS)
    if (
        needs_identity
        and setup.iommu is IommuKind.VHOST_USER
        and not any(arg.startswith("iommu.passthrough=") for arg in setup.kernel_args)
    ):
        kernel_args.append("iommu.passthrough=1")
    kernel_args += list(setup.kernel_args)
    return [
        ArgGroup(
            "the guest: kernel, busybox initramfs, and its command line (the job to run is vhost_iommu.job=)",
            ("-kernel", str(setup.kernel), "-initrd", str(setup.initrd), "-append", " ".join(kernel_args)),
        )
    ]


def build_command(setup: QemuSetup) -> QemuCommand:
    """The complete QEMU command line for ``setup``; :class:`CommandError` for a setup that cannot work."""
    groups = machine_group(setup) + iommu_group(setup) + endpoint_groups(setup) + kernel_group(setup)
    if setup.qmp_socket is not None:
        groups.append(
            ArgGroup(
                "QMP, for scripts (quit, query-pci...)",
                ("-qmp", f"unix:{setup.qmp_socket},server=on,wait=off"),
            )
        )
    if setup.extra_args:
        groups.append(ArgGroup("extra arguments", tuple(setup.extra_args)))
    return QemuCommand(str(setup.qemu), tuple(groups))

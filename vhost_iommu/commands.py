"""The ``vhost-iommu`` sub-commands beyond serving: ``warm-up``, ``viot``, ``dtb``, ``qemu-args``, ``run``,
``replay``, ``ctl``.

``run`` is the project's main job: it boots the default guest under QEMU against an in-process back-end and
shows, from the back-end's own state, the driver's requests, the endpoints attached and a VFIO mapping
made by a guest program. The heavy imports (numba, the provisioning code) happen inside the commands.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vhost_iommu.cli import CliError, Command, load_topology_argument, register_command

# Light: the client side only (no numba), so `vhost-iommu ctl` answers at once.
from vhost_iommu.control.ctl import CTL

if TYPE_CHECKING:
    from vhost_iommu.device import IommuDevice, Topology
    from vhost_iommu.lab import Lab
    from vhost_iommu.qemu import QemuSetup


def _topology_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--topology", metavar="FILE", help="the IOMMU's topology (default: x86 q35)")


# -- warm-up ------------------------------------------------------------------------------------------------


def warm_up(args: argparse.Namespace) -> int:
    """Compile every numba kernel into numba's cache, so the back-end serves compiled from its first
    request (without it, a first start serves with the Python path while it compiles in the background)."""
    from vhost_iommu.jit import warm_up as warm_up_kernels

    started = time.monotonic()
    warm_up_kernels()
    print(f"numba kernels ready in {time.monotonic() - started:.1f} s")
    return 0


register_command(Command("warm-up", warm_up.__doc__ or "", lambda parser: None, warm_up))


# -- viot ---------------------------------------------------------------------------------------------------


def _configure_viot(parser: argparse.ArgumentParser) -> None:
    _topology_argument(parser)
    parser.add_argument("-o", "--output", metavar="FILE", required=True, help="where to write the table")


def viot(args: argparse.Namespace) -> int:
    """Write the ACPI VIOT table of the topology, for QEMU's ``-acpitable file=...``."""
    from vhost_iommu.machine import IommuTransport
    from vhost_iommu.viot import describe_viot, viot_from_topology

    topology = load_topology_argument(args.topology)
    if topology.iommu_transport is not IommuTransport.PCI:
        raise CliError("--topology: the IOMMU is on virtio-mmio; a VIOT here describes PCI IOMMUs only")
    table = viot_from_topology(topology)
    try:
        Path(args.output).write_bytes(table)
    except OSError as exc:
        raise CliError(f"--output: {args.output}: {exc.strerror or exc}") from None
    print(describe_viot(table))
    return 0


register_command(Command("viot", viot.__doc__ or "", _configure_viot, viot))


# -- dtb ----------------------------------------------------------------------------------------------------


def _machine_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that shape the guest machine: the dumped device tree must come from the same ones."""
    parser.add_argument(
        "--qemu",
        metavar="BINARY",
        help="QEMU (default: qemu-system-x86_64, or -aarch64 for an arm64 topology)",
    )
    parser.add_argument("--memory", type=int, default=1024, metavar="MIB", help="guest RAM in MiB")


def _configure_dtb(parser: argparse.ArgumentParser) -> None:
    _topology_argument(parser)
    parser.add_argument("-o", "--output", metavar="FILE", required=True, help="where to write the tree")
    parser.add_argument(
        "--dump",
        metavar="FILE",
        help="QEMU's dumped tree (-machine dumpdtb) to start from, instead of running QEMU",
    )
    _machine_arguments(parser)


def dtb(args: argparse.Namespace) -> int:
    """Write the device tree of an arm64 topology, for QEMU's ``-dtb``: QEMU's own tree for the virt machine
    (dumped with the machine options qemu-args uses, or --dump) with the IOMMU and iommu-map added."""
    from vhost_iommu.dtb import DtbError, add_iommu, describe
    from vhost_iommu.machine import Arch
    from vhost_iommu.provision.devicetree import dump_machine_dtb
    from vhost_iommu.provision.errors import ProvisionError

    topology = load_topology_argument(args.topology)
    if topology.arch is not Arch.ARM64:
        raise CliError(f'--topology: arch is {topology.arch.value}; a device tree is for arch = "arm64"')
    try:
        if args.dump is not None:
            dumped = Path(args.dump).read_bytes()
        else:
            dumped = dump_machine_dtb(_qemu_setup(args, topology))
        blob = add_iommu(dumped, topology)
        Path(args.output).write_bytes(blob)
    except OSError as exc:
        raise CliError(f"{exc.filename or args.output}: {exc.strerror or exc}") from None
    except (DtbError, ProvisionError) as exc:
        raise CliError(str(exc)) from None
    print(describe(blob))
    return 0


register_command(Command("dtb", dtb.__doc__ or "", _configure_dtb, dtb))


# -- qemu-args ----------------------------------------------------------------------------------------------


def _configure_qemu_args(parser: argparse.ArgumentParser) -> None:
    _topology_argument(parser)
    parser.add_argument("--socket-path", metavar="PATH", required=True, help="the back-end's socket")
    parser.add_argument(
        "--viot", metavar="FILE", default="viot.bin", help="the VIOT table (vhost-iommu viot; x86_64)"
    )
    parser.add_argument(
        "--dtb", metavar="FILE", default="virt.dtb", help="the device tree (vhost-iommu dtb; arm64)"
    )
    parser.add_argument("--kernel", metavar="FILE", default="vmlinuz")
    parser.add_argument("--initrd", metavar="FILE", default="initrd.gz")
    _machine_arguments(parser)
    parser.add_argument("--append", action="append", default=[], metavar="ARG", help="a kernel argument")
    parser.add_argument(
        "--no-devices", action="store_true", help="leave out the topology's [[devices]] (vfio-user endpoints)"
    )


def _qemu_setup(args: argparse.Namespace, topology: Topology, **fields: Any) -> QemuSetup:
    """The QemuSetup of ``topology``'s machine with the command's --qemu and --memory."""
    from vhost_iommu.provision.arch import provisioning_for
    from vhost_iommu.qemu import QemuSetup, placement_from

    qemu = args.qemu or provisioning_for(topology.arch).qemu_binary
    values: dict[str, Any] = {"kernel": Path("vmlinuz"), "initrd": Path("initrd.gz"), **fields}
    return QemuSetup(
        qemu=Path(qemu),
        topology=placement_from(topology),
        arch=topology.arch,
        memory_mib=args.memory,
        **values,
    )


def qemu_args(args: argparse.Namespace) -> int:
    """Print a complete, commented QEMU command line for a guest behind this back-end."""
    from vhost_iommu.qemu import CommandError, IommuKind, VfioUserEndpoint, build_command

    topology = load_topology_argument(args.topology)
    socket_dir = os.path.dirname(os.path.abspath(args.socket_path))
    endpoints = [
        VfioUserEndpoint(
            slot=(device.bdf >> 3) & 0x1F,
            function=device.bdf & 7,
            socket=Path(device.socket_path(socket_dir) or device.socket),
            kind=device.kind,
        )
        for device in topology.devices
        if not args.no_devices
    ]
    try:
        setup = _qemu_setup(
            args,
            topology,
            kernel=Path(args.kernel),
            initrd=Path(args.initrd),
            kernel_args=args.append,
            iommu=IommuKind.VHOST_USER,
            socket_path=Path(args.socket_path),
            viot_path=Path(args.viot),
            dtb_path=Path(args.dtb),
            endpoints=endpoints,
        )
        command = build_command(setup)
    except CommandError as exc:
        raise CliError(str(exc)) from None
    sys.stdout.write(
        command.shell_script("QEMU for a guest behind vhost-iommu (made by vhost-iommu qemu-args)")
    )
    return 0


register_command(Command("qemu-args", qemu_args.__doc__ or "", _configure_qemu_args, qemu_args))


# -- run: the main job --------------------------------------------------------------------------------------

# What the demo asks the guest's VFIO program to map, then unmap: 64 KiB read-write and 8 KiB read-only.
DEMO_MAPPINGS = ((0x1_0000_0000, 0x1_0000, "rw"), (0x1_0010_0000, 0x2000, "r"))


def _configure_run(parser: argparse.ArgumentParser) -> None:
    _topology_argument(parser)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds allowed for the guest to boot")
    parser.add_argument("--console", action="store_true", help="show the guest's console as it runs")


def _state_tables(lab: Lab, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    def snapshot(device: IommuDevice) -> tuple[list[tuple[int, int, bool, int, int]], dict[str, int]]:
        attached = [
            (info.domain, endpoint.endpoint, info.bypass, info.mapping_count, endpoint.bdf)
            for info in device.domains()
            for endpoint in device.endpoints()
            if endpoint.domain == info.domain
        ]
        return attached, device.request_counters()

    attached, counters = lab.inspect(snapshot)
    console = Console()
    table = Table(title=f"{title}: the back-end's own state")
    for column in ("endpoint", "PCI", "domain", "kind", "mappings"):
        table.add_column(column)
    for domain, endpoint, bypass, mappings, bdf in attached:
        pci = f"00:{bdf >> 3 & 0x1F:02x}.{bdf & 7}"
        table.add_row(
            f"{endpoint:#x}", pci, str(domain), "identity (bypass)" if bypass else "paging", str(mappings)
        )
    if not attached:
        table.add_row("-", "-", "-", "no endpoint attached", "-")
    console.print(table)
    console.print("requests served: " + ", ".join(f"{name} {count}" for name, count in counters.items()))


def _show_mappings(lab: Lab, endpoint: int) -> None:
    from rich.console import Console
    from rich.table import Table

    def mappings(device: IommuDevice) -> list[tuple[int, int, int, int]]:
        domain = device.domain_of(endpoint)
        return [] if domain is None else device.mappings(domain)

    table = Table(title=f"mappings of endpoint {endpoint:#x}'s domain, as the back-end holds them")
    for column in ("IOVA start", "IOVA end", "guest-physical", "flags"):
        table.add_column(column)
    for start, last, phys, flags in lab.inspect(mappings):
        names = "".join(name for bit, name in ((1, "R"), (2, "W"), (4, "M")) if flags & bit)
        table.add_row(f"{start:#x}", f"{last:#x}", f"{phys:#x}", names)
    Console().print(table)


def run(args: argparse.Namespace) -> int:
    """Boot the default guest under QEMU (TCG) against vhost-iommu; show the driver bound and endpoints
    attached, and a guest VFIO program's mappings, from the back-end's own state."""
    from vhost_iommu.lab import Lab, LabConfig
    from vhost_iommu.provision.boot import GuestTimeout, parse_fields
    from vhost_iommu.provision.errors import ProvisionError

    config = LabConfig(job="vfio-steps", params={"hold": "1"}, topology=load_topology_argument(args.topology))
    testdev = 0x20
    started = time.monotonic()
    try:
        with Lab(config, echo=args.console) as lab:
            lab.guest.expect(r"VFIO_STEP_READY seq=0", args.timeout)
            booted = time.monotonic() - started
            print(f"guest booted and bound 00:04.0 to vfio-pci in {booted:.1f} s")
            for line in lab.guest.run.lines:
                if "virtio_iommu" in line:
                    print("  guest:", line.strip())
            _state_tables(lab, "after boot")
            for sequence, (iova, size, permissions) in enumerate(DEMO_MAPPINGS, start=1):
                lab.guest.send(f"map {iova:#x} {size:#x} {permissions}")
                step = parse_fields(lab.guest.expect(rf"VFIO_STEP seq={sequence} .*", 60)[0])
                lab.guest.expect(rf"VFIO_STEP_READY seq={sequence}", 60)
                print(f"  guest: VFIO MAP_DMA iova={iova:#x} size={size:#x} {permissions}: rc={step['rc']}")
            _show_mappings(lab, testdev)
            lab.guest.send("quit")
            lab.guest.expect(r"VHOST_IOMMU_HOLD", 60)
            _state_tables(lab, "after the VFIO program exited")
            lab.guest.send("")
            result = lab.guest.wait(60)
    except (GuestTimeout, ProvisionError) as exc:
        raise CliError(str(exc)) from None
    print(f"guest job finished with rc={result.job_rc} in {time.monotonic() - started:.1f} s")
    engine_rc = _engine_demo(args) if load_topology_argument(args.topology).devices else 0
    return 0 if result.job_rc == 0 and engine_rc == 0 else 1


def _engine_demo(args: argparse.Namespace) -> int:
    """Second act: the topology's DMA engine, served over vfio-user, driven by the guest's VFIO; a
    translated copy and a blocked use after unmap, seen from the back-end's own counters."""
    from rich.console import Console
    from rich.table import Table

    from vhost_iommu.lab import Lab, LabConfig
    from vhost_iommu.provision.boot import GuestTimeout
    from vhost_iommu.provision.dma_engine_report import parse_dma_engine
    from vhost_iommu.provision.errors import ProvisionError

    topology = load_topology_argument(args.topology)
    engine = next((device for device in topology.devices if device.kind == "dma-engine"), None)
    if engine is None:
        return 0
    bdf = f"0000:{engine.bdf >> 8:02x}:{engine.bdf >> 3 & 0x1F:02x}.{engine.bdf & 7}"
    config = LabConfig(
        job="dma-engine",
        params={"dev": bdf, "dma": "copy,uaf", "hold": "1"},
        topology=topology,
        serve_devices=True,
    )
    started = time.monotonic()
    try:
        with Lab(config, echo=args.console) as lab:
            lab.guest.expect(r"VHOST_IOMMU_HOLD", args.timeout)
            assert lab.endpoints is not None
            served = next(s for s in lab.endpoints.endpoints if s.spec == engine)

            def counters() -> tuple[dict[str, int], list[str]]:
                port = served.port
                if port is None:
                    return {}, []
                faults = [
                    f"{fault.reason.name} {'W' if fault.flags & 2 else 'R'} at {fault.address:#x}"
                    + (f"\n    why: {fault.explanation.text}" if fault.explanation is not None else "")
                    for fault in port.last_faults
                ]
                return dict(port.counters()), faults

            port_counters, faults = lab.call(counters)
            lab.guest.send("")
            result = lab.guest.wait(60)
    except (GuestTimeout, ProvisionError) as exc:
        raise CliError(str(exc)) from None
    report = parse_dma_engine(result.lines)
    console = Console()
    console.print(
        f"\nDMA engine {engine.kind} at {bdf} (endpoint {served.endpoint:#x}), served over vfio-user, "
        f"driven by the guest's VFIO ({time.monotonic() - started:.1f} s):"
    )
    table = Table(title="what the guest asked and what the engine did, every access translated")
    for column in ("guest test", "step", "engine status", "bytes done", "fault"):
        table.add_column(column)
    for name in ("copy", "uaf"):
        for op in report[name].ops:
            fault = f"{op.fault_reason.name} at {op.fault_address:#x}" if op.fault_reason else "-"
            status = "|".join(bit.name or "" for bit in type(op.status) if bit in op.status)
            table.add_row(name, op.step, status, str(op.done_bytes), fault)
    console.print(table)
    for line in result.lines:
        if "page fault from EP" in line:
            console.print("  guest:", line.strip())
    console.print(
        "back-end counters of the endpoint: "
        + ", ".join(f"{name} {value}" for name, value in port_counters.items())
    )
    for fault in faults:
        console.print(f"  fault recorded by the IOMMU: {fault}")
    passed = all(report[name].rc == 0 and not report[name].failed_checks for name in ("copy", "uaf"))
    console.print(f"guest's own checks: {'all passed' if passed else 'FAILED'}")
    return 0 if passed and result.job_rc == 0 else 1


register_command(Command("run", run.__doc__ or "", _configure_run, run))


# -- replay -------------------------------------------------------------------------------------------------


REPLAY_TROUBLE = 2


def _configure_replay(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("trace", metavar="TRACE", help="a trace recorded with ctl trace-start (part 0)")
    parser.add_argument(
        "--topology", metavar="FILE", help="replay on this topology instead of the one the trace recorded"
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--show", type=int, default=20, metavar="N", help="differences listed (default 20)")
    parser.add_argument(
        "--conformance",
        action="store_true",
        help="also check the recorded driver against the spec's driver-normative statements",
    )


def replay(args: argparse.Namespace) -> int:
    """Run a recorded trace against a fresh device core; exit 1 if any status differs from the recording,
    2 if the trace cannot be read."""
    import json

    from vhost_iommu.conformance import ConformanceChecker
    from vhost_iommu.trace import TraceError
    from vhost_iommu.trace import replay as replay_trace

    # Exit statuses as diff(1)'s: 0 the same, 1 different, 2 trouble (so a script can tell a regression
    # from a trace it could not read).
    try:
        topology = load_topology_argument(args.topology) if args.topology is not None else None
        if args.show < 0:
            raise CliError("--show: must not be negative")
        # Kernels loaded (or compiled) before the clock starts: the timings are the device core's.
        from vhost_iommu.jit import warm_up as warm_up_kernels

        warm_up_kernels()
        started = time.monotonic()
        result = replay_trace(
            args.trace,
            topology=topology,
            keep_differences=args.show,
            checker=ConformanceChecker if args.conformance else None,
        )
    except (CliError, TraceError) as exc:
        print(f"vhost-iommu replay: error: {exc}", file=sys.stderr)
        return REPLAY_TROUBLE
    elapsed = time.monotonic() - started
    timing = {
        name: {
            "count": count,
            "replay_mean_us": round(total / count / 1000, 3),
            "recorded_mean_us": round(result.recorded_ns[name][1] / count / 1000, 3),
        }
        for name, (count, total) in sorted(result.replay_ns.items())
    }
    if args.json:
        document = {
            "requests": result.requests,
            "events": result.events,
            "differences": result.difference_count,
            "shown": [difference.describe() for difference in result.differences],
            "timing": timing,
            "seconds": round(elapsed, 3),
            "conformance": result.conformance,
        }
        print(json.dumps(document, indent=2))
    else:
        print(f"{args.trace}: {result.requests} requests, {result.events} events replayed in {elapsed:.2f} s")
        for name, row in timing.items():
            print(
                f"  {name:<8} {row['count']:>8}  device core {row['replay_mean_us']:>9.3f} us/request  "
                f"(recorded, served path: {row['recorded_mean_us']:.3f})"
            )
        for difference in result.differences:
            print("  DIFFERENT " + difference.describe())
        if result.difference_count > len(result.differences):
            print(f"  ... and {result.difference_count - len(result.differences)} more")
        if result.conformance is not None:
            counts = result.conformance["counts"]
            first = result.conformance["first"]
            assert isinstance(counts, dict) and isinstance(first, dict)
            print(f"driver conformance: {result.conformance['total']} violation(s)")
            for statement, count in counts.items():
                print(f"  {statement} x{count}: {first.get(statement, '')}")
        print(
            f"{result.difference_count} difference(s)"
            if result.difference_count
            else "every status as recorded"
        )
    return 0 if result.ok else 1


register_command(Command("replay", replay.__doc__ or "", _configure_replay, replay))


# -- ctl ----------------------------------------------------------------------------------------------------

register_command(CTL)

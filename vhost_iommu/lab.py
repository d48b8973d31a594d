"""A Linux guest under QEMU whose IOMMU is a vhost-iommu back-end served from this process.

:class:`Lab` puts the pieces together for the main job, the end-to-end tests and the benchmarks: it serves
the back-end on a private socket (its event loop on a thread), writes the topology's ACPI VIOT table (or, for
an arm64 topology, the device tree made from QEMU's dump of the same machine: provision.devicetree's
describe_topology), starts QEMU with the guest
and a job, and hands out both sides: the guest's console
(:class:`~vhost_iommu.provision.boot.GuestSession`) and the device the guest is talking to, inspected on the
server's own loop so no state is read while a request is half applied. It also serves the back-end's control
channel (docs/control.md) at :attr:`Lab.control_path`, for ``vhost-iommu ctl`` and tests. Everything it starts
is stopped when the ``with`` block ends, whatever happened.

With ``iommu=IommuKind.BUILTIN`` the same guest runs behind QEMU's own virtio-iommu-pci (for comparisons)
and no back-end is served.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import threading
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TypeVar

from vhost_iommu.control.server import ControlServer
from vhost_iommu.control.service import ControlService
from vhost_iommu.device import IommuDevice, Topology
from vhost_iommu.endpoint_server import EndpointServer
from vhost_iommu.harness.background import RunningServer
from vhost_iommu.jit import warm_up
from vhost_iommu.machine import Arch
from vhost_iommu.provision.arch import guest_arch, provisioning_for
from vhost_iommu.provision.boot import GuestSession
from vhost_iommu.provision.devicetree import describe_topology
from vhost_iommu.provision.guest import GuestImage, ensure_guest
from vhost_iommu.provision.qemu_build import ensure_qemu
from vhost_iommu.qemu import (
    Endpoint,
    IommuKind,
    PciTestDevice,
    QemuCommand,
    QemuSetup,
    VfioUserEndpoint,
    build_command,
    placement_from,
)
from vhost_iommu.virtio_iommu import VirtioIommuBackend

T = TypeVar("T")

# The first endpoint slot of the default topology (00:04.0): where the VFIO jobs look for their device.
DEFAULT_ENDPOINTS: tuple[Endpoint, ...] = (PciTestDevice(slot=4),)
#: That pci-testdev as the guest names it, and its endpoint ID (its BDF, in the default topology).
TESTDEV = "0000:00:04.0"
TESTDEV_ENDPOINT = 0x20


class LabError(RuntimeError):
    """The lab could not be set up or the back-end never saw QEMU connect."""


def provisioned_qemu(arch: Arch) -> Path:
    """The QEMU for ``arch``'s guests, built into the cache when missing (``scripts/get-qemu --arch``)."""
    return ensure_qemu(provisioning_for(arch))


def provisioned_guest(arch: Arch) -> GuestImage:
    """The guest kernel and initramfs for ``arch`` (the suite: ``$VHOST_IOMMU_GUEST_SUITE``), built into
    the cache when missing (``scripts/build-guest --arch``)."""
    return ensure_guest(arch=provisioning_for(arch))


@dataclass(frozen=True)
class LabConfig:
    """What varies between guest runs."""

    job: str = "probe"
    # vhost_iommu.NAME=VALUE parameters of the guest's /init (count, bench, dev, blk_mb...).
    params: Mapping[str, str] = field(default_factory=dict)
    kernel_args: Sequence[str] = ()
    # The default topology of the architecture this process boots ($VHOST_IOMMU_GUEST_ARCH, else x86_64).
    topology: Topology = field(default_factory=lambda: Topology.default(guest_arch().machine))
    endpoints: Sequence[Endpoint] = DEFAULT_ENDPOINTS
    iommu: IommuKind = IommuKind.VHOST_USER
    memory_mib: int = 1024
    extra_qemu_args: Sequence[str] = ()
    # Serve the control channel at Lab.control_path. It times every requestq kick (about 2.5 us of Python
    # per kick measured on this project's machines): benchmarks that want none of it turn it off.
    control: bool = True
    # Check the driver against the spec's driver-normative statements from its first message (needs
    # `control`; read through the control channel's `conformance`, docs/toolkit.md). Every request then
    # takes the device core's Python path.
    conformance: bool = False
    # Record every request and its answer from the first one to this file (needs `control`; a later
    # connection records to FILE-N.EXT). `vhost-iommu replay FILE` runs it again offline.
    trace: Path | None = None
    # Serve the topology's [[devices]] (vfio-user endpoints such as the DMA engine) from the back-end's
    # loop and give QEMU their vfio-user-pci devices (docs/dma-engine.md).
    serve_devices: bool = False
    # Build the back-end for one connection; the default is the virtio-iommu device on `topology`.
    backend_factory: Callable[[Topology], VirtioIommuBackend] | None = None


class Lab:
    """One guest and, for a vhost-user IOMMU, the back-end it talks to. Use it as a context manager."""

    def __init__(
        self,
        config: LabConfig,
        *,
        qemu: Path | None = None,
        guest: GuestImage | None = None,
        log: Path | None = None,
        echo: bool = False,
    ) -> None:
        self.config = config
        self._qemu = qemu
        self._guest = guest
        self._log = log
        self._echo = echo
        self._scratch: tempfile.TemporaryDirectory[str] | None = None
        self._server: RunningServer | None = None
        self._connected = threading.Event()
        self._backends: list[VirtioIommuBackend] = []
        self._control: ControlServer | None = None
        self._service: ControlService | None = None
        #: The back-end's control socket (docs/control.md), for `vhost-iommu ctl` and ControlClient.
        self.control_path: Path | None = None
        self.session: GuestSession | None = None
        self.command: QemuCommand | None = None

    # -- lifetime ---------------------------------------------------------------------------------------

    def __enter__(self) -> Lab:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def start(self) -> None:
        config = self.config
        arch = config.topology.arch
        qemu = self._qemu or provisioned_qemu(arch)
        guest = self._guest or provisioned_guest(arch)
        # A short directory: unix socket paths are limited to 108 bytes.
        self._scratch = tempfile.TemporaryDirectory(prefix="vhost-iommu-lab-")
        scratch = Path(self._scratch.name)
        socket_path = None
        if config.iommu is IommuKind.VHOST_USER:
            # Compile (or load from numba's cache) every kernel before QEMU starts: a first MAP that had to
            # compile would stall the guest's synchronous request for seconds.
            warm_up()
            socket_path = scratch / "viommu.sock"
            if config.control:
                service = ControlService(
                    conformance=config.conformance,
                    trace_path=str(config.trace) if config.trace is not None else None,
                )
                self._service = service
                self._server = RunningServer(service.track(self._new_backend), str(socket_path))
                service.server = self._server.server
                self.control_path = scratch / "control.sock"
                self._control = self._on_server_loop(self._start_control(service, str(self.control_path)))
            else:
                if config.conformance or config.trace is not None:
                    raise LabError("conformance checks and traces are control-channel tools: keep control on")
                self._server = RunningServer(self._new_backend, str(socket_path))
        endpoints = list(config.endpoints)
        if config.serve_devices and config.iommu is IommuKind.VHOST_USER:
            endpoints += self._serve_devices(scratch)
        setup = QemuSetup(
            qemu=qemu,
            kernel=guest.kernel,
            initrd=guest.initrd,
            kernel_args=[
                f"vhost_iommu.job={config.job}",
                *(f"vhost_iommu.{name}={value}" for name, value in config.params.items()),
                *config.kernel_args,
            ],
            iommu=config.iommu,
            socket_path=socket_path,
            topology=placement_from(config.topology),
            arch=arch,
            endpoints=endpoints,
            memory_mib=config.memory_mib,
            extra_args=config.extra_qemu_args,
        )
        if config.iommu is IommuKind.VHOST_USER:
            setup = describe_topology(setup, config.topology, scratch)
        self.command = build_command(setup)
        self.session = GuestSession(self.command.argv, log=self._log, echo=self._echo)

    def close(self) -> None:
        """Stop QEMU, then the back-end; remove the scratch files. Safe to call twice."""
        if self.session is not None:
            self.session.close()
        if self._control is not None and self._server is not None:
            self._on_server_loop(self._control.close())
            self._control = None
        if self._service is not None and self._server is not None:
            # Traces are closed on the loop that writes them, so their files are complete afterwards.
            self._server.call(self._service.close, 10.0)
            self._service = None
        if self._server is not None:
            self._server.stop()
            self._server = None
        if self._scratch is not None:
            self._scratch.cleanup()
            self._scratch = None

    def _serve_devices(self, scratch: Path) -> list[Endpoint]:
        """Serve each of the topology's devices (sockets in ``scratch``); their QEMU devices."""
        assert self._server is not None
        server = self._server.serve_devices(self.config.topology, str(scratch))
        if self._service is not None:
            self._service.endpoint_server = server
        return [
            VfioUserEndpoint(
                slot=(served.spec.bdf >> 3) & 0x1F,
                function=served.spec.bdf & 7,
                socket=Path(served.path),
                kind=served.spec.kind,
            )
            for served in server.endpoints
        ]

    @staticmethod
    async def _start_control(service: ControlService, path: str) -> ControlServer:
        control = ControlServer(service, path)
        await control.start()
        return control

    def _on_server_loop(self, coroutine: Coroutine[None, None, T], timeout: float = 10.0) -> T:
        assert self._server is not None
        return asyncio.run_coroutine_threadsafe(coroutine, self._server.loop).result(timeout)

    def _new_backend(self) -> VirtioIommuBackend:
        factory = self.config.backend_factory or (lambda topology: VirtioIommuBackend(topology))
        backend = factory(self.config.topology)
        self._backends.append(backend)
        self._connected.set()
        return backend

    # -- the two sides ----------------------------------------------------------------------------------

    @property
    def endpoints(self) -> EndpointServer | None:
        """The vfio-user endpoints served beside the IOMMU (LabConfig.serve_devices)."""
        return None if self._server is None else self._server.endpoints

    @property
    def guest(self) -> GuestSession:
        if self.session is None:
            raise LabError("the lab is not started")
        return self.session

    def backend(self, timeout: float = 30.0) -> VirtioIommuBackend:
        """The back-end of QEMU's connection (waits for QEMU to connect)."""
        if self._server is None:
            raise LabError("this lab serves no back-end (the IOMMU is QEMU's own)")
        if not self._connected.wait(timeout):
            raise LabError(f"QEMU did not connect to the back-end within {timeout:.0f} s")
        return self._backends[-1]

    def call(self, function: Callable[[], T], timeout: float = 10.0) -> T:
        """Run ``function`` on the back-end's event loop (where the servers' state lives) and return its
        result."""
        if self._server is None:
            raise LabError("this lab serves no back-end (the IOMMU is QEMU's own)")
        return self._server.call(function, timeout)

    def spurious_kick(self, queue: int) -> int:
        """Write queue ``queue``'s kick eventfd of every live connection with nothing new on its ring, as a
        front-end may (the driver-changes e2e tests break it on purpose); how many kicks were written."""
        if self._server is None:
            raise LabError("this lab serves no back-end (the IOMMU is QEMU's own)")
        server = self._server.server

        def kick() -> int:
            written = 0
            for connection in server.connections:
                slots = connection.handler.slots
                fd = slots[queue].kick_fd if 0 <= queue < len(slots) else None
                if fd is not None:
                    os.eventfd_write(fd, 1)
                    written += 1
            return written

        return self._server.call(kick)

    def inspect(self, query: Callable[[IommuDevice], T], timeout: float = 10.0) -> T:
        """Run ``query`` on the device, on the server's loop, between two requests."""
        backend = self.backend()
        assert self._server is not None

        def quiesced() -> T:
            with backend.quiesced():  # the requestq thread, if one serves, stays out of the device
                return query(backend.device)

        return self._server.call(quiesced, timeout)

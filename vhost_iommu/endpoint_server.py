"""The topology's ``[[devices]]``: PCI endpoints served to QEMU over vfio-user, their DMA translated by the
virtio-iommu of the guest they belong to.

QEMU's vfio-user client tells the server nothing about which VM or which PCI address it is: the
endpoint ID comes from the topology (the device's BDF), and the guest is the one whose vhost-user
connection mapped the same guest-RAM file as this client's DMA_MAP (``fstat`` device and inode, compared
at each operation, so a guest that reconnects or changes its memory table is followed). A client whose RAM
no vhost-iommu guest shares gets no IOMMU: its DMA is refused (the engine reports NO_IOMMU) and the log
says why once per connection. Nothing else of the guest is touched: a device's DMA reaches only the
RAM its own client mapped.

One socket serves one client at a time (QEMU connects once per device at start-up and never
reconnects); the device model outlives its clients, as the vfio-user spec asks of a server.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import logging
import socket
from dataclasses import dataclass

from vhost_iommu.device.dma import DmaPort
from vhost_iommu.device.layout import Access
from vhost_iommu.device.topology import ServedDevice, Topology, format_bdf
from vhost_iommu.device.translation import Fault, Translation
from vhost_iommu.endpoints.dma_engine import DmaEngine, DmaOutcome
from vhost_iommu.endpoints.translated_memory import TranslatedMemory
from vhost_iommu.endpoints.virtio_blk import VirtioBlock
from vhost_iommu.endpoints.virtio_pci import VirtioPciFunction
from vhost_iommu.memory import FlatRegions
from vhost_iommu.server.listener import VhostUserServer
from vhost_iommu.vfio_server.connection import VfioUserConnection
from vhost_iommu.vfio_server.handler import VfioUserHandler

log = logging.getLogger(__name__)


@dataclass
class _Pairing:
    """The guest an endpoint's client belongs to, valid while that vhost-user connection lives."""

    connection: object
    port: DmaPort
    backend: object  # vhost_iommu.virtio_iommu.VirtioIommuBackend


class ServedEndpoint:
    """One ``[[devices]]`` entry: its device model, its endpoint ID, its current client."""

    def __init__(self, spec: ServedDevice, endpoint: int, guests: VhostUserServer, path: str) -> None:
        self.spec = spec
        self.endpoint = endpoint
        self.path = path
        self.name = f"{spec.kind} {format_bdf(spec.bdf)}"
        self._guests = guests
        self.handler: VfioUserHandler | None = None
        self.connection: VfioUserConnection | None = None
        self._pairing: _Pairing | None = None
        self._unpaired_said = False
        self._tables: tuple[int, FlatRegions] | None = None
        self._queue_memory: tuple[int, _Pairing, TranslatedMemory] | None = None
        self.block: VirtioBlock | None = None
        self.device: DmaEngine | VirtioPciFunction
        if spec.kind == "virtio-blk":
            readonly = bool(spec.options.get("readonly", False))
            self.block = VirtioBlock(spec.options["image"], readonly=readonly)
            self.device = VirtioPciFunction(self.block, self._translated_memory, self._interrupt)
        else:
            self.device = DmaEngine(self._dma_target, self._interrupt)

    # -- the device's callbacks -----------------------------------------------------------------------------

    def _interrupt(self, vector: int) -> None:
        if self.handler is not None:
            self.handler.interrupt(vector)

    def _session(self) -> tuple[VfioUserHandler, _Pairing] | None:
        """The client's session and the guest it is paired with, or None (no client, no RAM, no guest)."""
        handler = self.handler
        if handler is None or not len(handler.memory):
            return None
        pairing = self._pair(handler)
        return None if pairing is None else (handler, pairing)

    def _dma_target(self) -> TranslatedDma | None:
        session = self._session()
        if session is None:
            return None
        handler, pairing = session
        generation = handler.memory.generation
        if self._tables is None or self._tables[0] != generation:
            self._tables = (generation, handler.memory.flat_tables())
        return TranslatedDma(pairing.port, self._tables[1], pairing.backend)

    def _translated_memory(self) -> TranslatedMemory | None:
        """A virtio device's memory: the client's RAM through the endpoint's domain (the same object while
        neither the RAM nor the pairing changes, so its queues know when to rebind)."""
        session = self._session()
        if session is None:
            return None
        handler, pairing = session
        generation = handler.memory.generation
        cached = self._queue_memory
        if cached is None or cached[0] != generation or cached[1] is not pairing:
            port, backend = pairing.port, pairing.backend

            def translate(iova: int, length: int, access: Access) -> Translation | Fault:
                return port.translate(iova, length, access, record=True)

            memory = TranslatedMemory(translate, handler.memory, backend.deliver_events, port)  # type: ignore[attr-defined]
            cached = self._queue_memory = (generation, pairing, memory)
        return cached[2]

    def _pair(self, handler: VfioUserHandler) -> _Pairing | None:
        pairing = self._pairing
        if pairing is not None and pairing.connection in self._guests.connections:
            return pairing
        self._pairing = None
        ours = handler.memory.file_ids()
        for connection in list(self._guests.connections):
            guest_handler = connection.handler
            if ours & guest_handler.memory.file_ids():
                backend = guest_handler.backend
                device = getattr(backend, "device", None)
                if device is None:
                    continue
                self._pairing = _Pairing(connection, DmaPort(device, self.endpoint), backend)
                self._unpaired_said = False
                log.info("%s: paired with %s (endpoint %#x)", self.name, connection.name, self.endpoint)
                return self._pairing
        if not self._unpaired_said:
            self._unpaired_said = True
            log.error(
                "%s: no vhost-iommu guest shares this VM's RAM: its DMA is refused (is the vhost-user "
                "device of the same VM connected, with share=on memory?)",
                self.name,
            )
        return None

    def pairing(self) -> tuple[object | None, str | None]:
        """The vhost-user connection (guest) this endpoint's client is paired with now, or None and why
        not (for tools: the same rule the DMA follows)."""
        handler = self.handler
        if handler is None:
            return None, "no vfio-user client is connected"
        if not len(handler.memory):
            return None, "the client has mapped no guest RAM yet (no DMA_MAP)"
        pairing = self._pair(handler)
        if pairing is None:
            return None, "no vhost-iommu guest shares this client's RAM (the same memory file)"
        return pairing.connection, None

    @property
    def paired_connection(self) -> object | None:
        return None if self._pairing is None else self._pairing.connection

    @property
    def port(self) -> DmaPort | None:
        """The endpoint's DMA port in its guest's IOMMU (None while unpaired)."""
        return None if self._pairing is None else self._pairing.port

    # -- clients --------------------------------------------------------------------------------------------

    def accept(self, sock: socket.socket, loop: asyncio.AbstractEventLoop, number: int) -> VfioUserConnection:
        if self.block is not None:
            self.block.open()  # OSError: the client is refused (EndpointServer.serve logs why)
        try:
            handler = VfioUserHandler(self.device, name=f"{self.name} client {number}")
            connection = VfioUserConnection(sock, handler, loop)
        except BaseException:
            self._end_client()
            raise
        self.handler, self.connection = handler, connection
        self._forget_client()

        def forget(_future: object) -> None:
            if self.connection is connection:
                self.handler = self.connection = None
                self._forget_client()
                self._end_client()

        connection.done.add_done_callback(forget)
        return connection

    def _end_client(self) -> None:
        """A virtio device's client went: the device is reset (its queues held views of that client's
        RAM; QEMU never reconnects, a new client starts from reset) and its image closed."""
        if self.block is not None:
            self.device.reset()
            self.block.close()

    def _forget_client(self) -> None:
        """Drop what was derived from a client's session (its pairing and views of its RAM)."""
        self._pairing = None
        self._tables = None
        self._queue_memory = None


def device_problem(spec: ServedDevice) -> str | None:
    """Why ``spec`` (its paths resolved) cannot be served, found before any client comes, or None: a
    virtio-blk's image that cannot be opened as the device will open it."""
    if spec.kind != "virtio-blk":
        return None
    block = VirtioBlock(spec.options["image"], readonly=bool(spec.options.get("readonly", False)))
    try:
        block.open()
    except OSError as exc:
        return f"image {spec.options['image']}: {exc.strerror}"
    block.close()
    return None


class TranslatedDma:
    """The engine's DMA for one operation: the endpoint's port over its client's RAM; fault events go to
    the guest's eventq at once."""

    def __init__(self, port: object, memory: FlatRegions, backend: object) -> None:
        self._port = port
        self._memory = memory
        self._backend = backend

    def _done(self, outcome: DmaOutcome) -> DmaOutcome:
        if outcome.fault is not None:
            self._backend.deliver_events()  # type: ignore[attr-defined]
        return outcome

    def copy(self, src: int, dst: int, length: int) -> DmaOutcome:
        return self._done(self._port.copy(self._memory, src, dst, length))  # type: ignore[attr-defined]

    def fill(self, dst: int, length: int, pattern: int) -> DmaOutcome:
        return self._done(self._port.fill(self._memory, dst, length, pattern))  # type: ignore[attr-defined]

    def compare(self, a: int, b: int, length: int) -> DmaOutcome:
        return self._done(self._port.compare(self._memory, a, b, length))  # type: ignore[attr-defined]


class EndpointServer:
    """Accepts vfio-user clients for every device of a topology, beside ``guests`` (the vhost-user server)."""

    def __init__(self, topology: Topology, guests: VhostUserServer) -> None:
        self.topology = topology
        self.guests = guests
        self.endpoints: list[ServedEndpoint] = []
        self._counter = itertools.count(1)
        self._closing = False

    def add(self, spec: ServedDevice, path: str) -> ServedEndpoint:
        endpoint = self.topology.endpoint_for(spec.segment, spec.bdf)
        assert endpoint is not None  # the topology checked it
        served = ServedEndpoint(spec, endpoint, self.guests, path)
        self.endpoints.append(served)
        return served

    async def serve(self, served: ServedEndpoint, listener: socket.socket) -> None:
        """Accept clients for ``served`` on ``listener`` until :meth:`close` (one client at a time)."""
        loop = asyncio.get_running_loop()
        listener.setblocking(False)
        while not self._closing:
            try:
                sock, _ = await loop.sock_accept(listener)
            except OSError as exc:
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
                    continue
                raise
            current = served.connection
            if current is not None and not current.done.done():
                log.warning("%s: refused a second vfio-user client (one client per device)", served.name)
                sock.close()
                continue
            try:
                served.accept(sock, loop, next(self._counter))
            except OSError as exc:  # a virtio-blk's image that cannot be opened: said in one line
                sock.close()
                log.error("%s: refused a vfio-user client: %s", served.name, exc)
            except Exception:
                sock.close()
                log.exception("%s: could not start serving a vfio-user client", served.name)

    def close(self) -> None:
        self._closing = True
        for served in self.endpoints:
            if served.connection is not None:
                served.connection.close()

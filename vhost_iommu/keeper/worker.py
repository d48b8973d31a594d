"""The device worker: the whole back-end, serving connections the keeper relays.

Started by the keeper as ``python -m vhost_iommu <the keeper's own options> --keeper-fd=N`` (so new code on
disk is what runs). It never sees QEMU's sockets: each vhost-user message arrives as one datagram from the
keeper with its fds and fd ids, is handled by the ordinary :class:`~vhost_iommu.server.ConnectionHandler`,
and is answered by one datagram carrying the reply and the session after it (``done``). A session the
keeper hands over (``restore``) is rebuilt with ``ConnectionHandler.restore_session``.

The worker dies with the keeper: PR_SET_PDEATHSIG, and the end of the channel.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import functools
import logging
import os
import signal
import socket
import sys
from typing import TYPE_CHECKING, Any

from vhost_iommu import cold_start
from vhost_iommu.keeper import wire
from vhost_iommu.keeper.keeper import raise_fd_limit
from vhost_iommu.memory import MemoryRegionDesc
from vhost_iommu.protocol import (
    HEADER_SIZE,
    Decoder,
    FrontendRequest,
    MemoryTable,
    PayloadError,
    SingleMemoryRegion,
    Stream,
)
from vhost_iommu.server import Connection, ConnectionHandler, VhostUserServer, new_event_loop
from vhost_iommu.server.listener import BackendFactory
from vhost_iommu.server.session import MAX_SESSION_REGIONS, SessionError, SessionState

if TYPE_CHECKING:
    from vhost_iommu.control.server import ControlServer
    from vhost_iommu.control.service import ControlService, TraceSettings, TrackedFactory

log = logging.getLogger("vhost_iommu.worker")

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """SIGKILL this process when the keeper (its parent) dies, whatever the way."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_PDEATHSIG) failed: %s", os.strerror(ctypes.get_errno()))
    if os.getppid() == 1:
        os._exit(1)  # the keeper died before the prctl took effect


def _region_key(desc: MemoryRegionDesc) -> tuple[int, int, int, int]:
    return (desc.guest_phys_addr, desc.memory_size, desc.userspace_addr, desc.mmap_offset)


class RelayedConnection(Connection):
    """A :class:`Connection` whose bytes come from the keeper, not from a socket of its own.

    ``Connection.__init__`` is deliberately not called: there is no socket to read or write; the decoder,
    the handler and ``done`` are the same, so the control channel sees it as any other connection.
    """

    def __init__(
        self,
        channel: socket.socket,
        ident: int,
        backend_factory: BackendFactory,
        loop: asyncio.AbstractEventLoop,
        name: str,
    ) -> None:
        self.name = name
        self.ident = ident
        self._channel = channel
        self._loop = loop
        self._decoder = Decoder(Stream.FRONTEND_REQUESTS)
        self._replies: list[bytes] = []
        self.done = loop.create_future()
        #: fd number in this process -> the keeper's id for it (every fd that arrived with a message).
        self._fd_ids: dict[int, int] = {}
        #: memory region -> the keeper's id of the fd it was mapped from (the mapping keeps no fd).
        self._region_ids: dict[tuple[int, int, int, int], int] = {}
        self.handler = ConnectionHandler(
            backend_factory(),
            loop,
            self._replies.append,
            name=name,
            on_fatal=self._device_fatal,
            session_key=f"conn-{ident}",
        )
        # The next worker gets every region's fd in one datagram with the rings' (SCM_MAX_FD).
        self.handler.memory.max_regions = MAX_SESSION_REGIONS

    # -- from the keeper ------------------------------------------------------------------------------------

    def restore(self, payload: bytes, fd_ids: list[int], fds: list[int]) -> None:
        """Take over the session a previous worker exported (raises SessionError; fds are owned)."""
        try:
            state = SessionState.decode(payload)
            if len(fd_ids) != len(fds):
                raise SessionError(f"{len(fds)} fds for {len(fd_ids)} ids")
        except SessionError:
            wire.close_all(fds)
            raise
        by_id = dict(zip(fd_ids, fds, strict=True))
        for region in state.regions:
            key = (region.guest_phys_addr, region.memory_size, region.userspace_addr, region.mmap_offset)
            self._region_ids[key] = region.fd
        for fd_id, fd in by_id.items():
            self._fd_ids[fd] = fd_id
        self.handler.restore_session(state, by_id)

    def deliver(self, seq: int, raw: bytes, fd_ids: list[int], fds: list[int]) -> None:
        """Handle one relayed message and acknowledge it with its reply and the session after it."""
        if len(fd_ids) != len(fds):
            wire.close_all(fds)
            raise wire.WireError(f"message {seq}: {len(fds)} fds for {len(fd_ids)} ids")
        for fd, fd_id in zip(fds, fd_ids, strict=True):
            self._fd_ids[fd] = fd_id
        self._note_regions(raw, fd_ids)
        self._decoder.feed(raw, fds)
        try:
            self._process()
            if not self._decoder.at_boundary:
                raise wire.WireError(f"message {seq} is not one whole vhost-user message")
        except Exception as exc:
            self._fatal(exc)
        reply = b"".join(self._replies)
        self._replies.clear()
        if self.done.done():
            self._tell_keeper(
                {"op": "done", "conn": self.ident, "seq": seq, "reply": len(reply), "close": True}, reply
            )
            return
        try:
            state = self.handler.export_session(self._fd_ids.get, self._region_id)
        except SessionError as exc:
            self._fatal(exc)
            self._tell_keeper(
                {"op": "done", "conn": self.ident, "seq": seq, "reply": len(reply), "close": True}, reply
            )
            return
        self._forget_unreferenced(state)
        head = {"op": "done", "conn": self.ident, "seq": seq, "reply": len(reply), "refs": state.fd_ids()}
        self._tell_keeper(head, reply + state.encode())

    def _note_regions(self, raw: bytes, fd_ids: list[int]) -> None:
        """Remember which fd id each region of a memory message comes from (matched after handling)."""
        code = int.from_bytes(raw[:4], sys.byteorder)
        body = raw[HEADER_SIZE:]
        try:
            if code == FrontendRequest.SET_MEM_TABLE:
                regions = MemoryTable.unpack(body).regions
            elif code == FrontendRequest.ADD_MEM_REG:
                regions = (SingleMemoryRegion.unpack(body).region,)
            else:
                return
        except PayloadError:
            return  # the decoder refuses it too
        for region, fd_id in zip(regions, fd_ids, strict=False):
            key = (region.guest_phys_addr, region.memory_size, region.userspace_addr, region.mmap_offset)
            self._region_ids[key] = fd_id

    def _region_id(self, desc: MemoryRegionDesc) -> int | None:
        return self._region_ids.get(_region_key(desc))

    def _forget_unreferenced(self, state: SessionState) -> None:
        live = {_region_key(region.desc) for region in self.handler.memory.regions}
        self._region_ids = {key: i for key, i in self._region_ids.items() if key in live}
        referenced = set(state.fd_ids())
        # Numbers of fds closed since (the kernel reuses them) must not keep a stale id.
        self._fd_ids = {fd: i for fd, i in self._fd_ids.items() if i in referenced}

    def _tell_keeper(self, head: dict[str, Any], payload: bytes = b"") -> None:
        try:
            wire.send(self._channel, head, payload)
        except (OSError, wire.WireError) as exc:
            # The keeper is gone (or this worker is broken): nothing can be answered any more.
            log.error("%s: cannot reach the keeper (%s); exiting", self.name, exc)
            os._exit(1)

    # -- ending ---------------------------------------------------------------------------------------------

    def close(self) -> None:
        """The session ends (QEMU left, the device gave up on it, or the keeper stops)."""
        if self.done.done():
            return
        self.done.set_result(None)
        try:
            self.handler.close()
        except Exception:
            log.exception("%s: the back-end failed while being reset at disconnect", self.name)
        finally:
            self._decoder.close()

    def _device_fatal(self, exc: BaseException) -> None:
        log.error("%s: unexpected error in the device, closing the connection", self.name, exc_info=exc)
        self.end()

    def end(self) -> None:
        """The device ended the connection on its own (a fatal error outside any message): tell the keeper."""
        if not self.done.done():
            self.close()
            self._tell_keeper({"op": "closed", "conn": self.ident})

    def suspend(self) -> None:
        """Hand the session over (an upgrade): stop serving, keep the device state, reset nothing."""
        if not self.done.done():
            self.done.set_result(None)
            self.handler.suspend()


class Worker:
    """The worker's event loop side: the channel to the keeper and the connections it relays."""

    def __init__(
        self,
        channel: socket.socket,
        factory: BackendFactory,
        control_path: str | None,
        tools: dict[str, Any] | None = None,
    ) -> None:
        self._channel = channel
        self._factory = factory
        self._control_path = control_path
        self._tools = tools
        self._connections: dict[int, RelayedConnection] = {}
        self._finished: asyncio.Future[int] | None = None
        self._control: ControlServer | None = None
        self._service: ControlService | None = None
        self._tracked: TrackedFactory | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.server = VhostUserServer(factory)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self._finished = loop.create_future()
        self._loop = loop
        if self._control_path is not None or self._tools is not None:
            from vhost_iommu.control.service import ControlService

            self._service = ControlService(**(self._tools or {}))
            self._tracked = self._service.track(self._factory)
            self._service.server = self.server
            self._service.upgrade_hook = self._ask_upgrade
            self._service.violation_hook = self._tell_violation
            self._service.trace_hook = self._tell_trace
        # SIGTERM/SIGINT are the keeper's to act on (it sends "stop"); a terminal's Ctrl-C reaches the
        # whole group, and the worker must not end its sessions before the keeper says so.
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(signum, lambda: None)
        self._channel.setblocking(True)
        wire.send(self._channel, {"op": "ready", "pid": os.getpid()})
        self._channel.setblocking(False)
        loop.add_reader(self._channel.fileno(), self._on_channel)
        try:
            return await self._finished
        finally:
            loop.remove_reader(self._channel.fileno())
            if self._control is not None:
                await self._control.close()
            if self._service is not None:
                self._service.close()  # traces complete on disk
                if self._service.trace_dir is not None:
                    self._service.trace_dir.close()

    def _ask_upgrade(self) -> None:
        # The keeper does the rest (ctl upgrade): a new worker, then "suspend" to this one.
        try:
            wire.send(self._channel, {"op": "upgrade"})
        except (OSError, wire.WireError) as exc:
            log.error("cannot ask the keeper for an upgrade: %s", exc)

    def _tell_violation(self, statement: str, description: str) -> None:
        # The keeper outlives this worker: the program's exit status (--conformance=strict) is its.
        try:
            wire.send(self._channel, {"op": "violation", "statement": statement, "first": description})
        except (OSError, wire.WireError) as exc:
            log.error("cannot tell the keeper of a conformance violation: %s", exc)

    def _tell_trace(self, number: int, settings: TraceSettings | None) -> None:
        trace = None if settings is None else settings.to_json()
        try:
            wire.send(self._channel, {"op": "trace", "conn": number, "trace": trace})
        except (OSError, wire.WireError) as exc:
            log.error("cannot tell the keeper of connection %d's trace: %s", number, exc)

    def _finish(self, status: int) -> None:
        if self._finished is not None and not self._finished.done():
            self._finished.set_result(status)

    def _on_channel(self) -> None:
        for _ in range(64):
            try:
                datagram = wire.receive(self._channel)
            except (BlockingIOError, InterruptedError):
                return
            except (OSError, wire.WireError) as exc:
                log.error("keeper channel: %s; exiting", exc)
                os._exit(1)
            if datagram is None:
                log.error("the keeper is gone; exiting")
                os._exit(1)  # QEMU's connections went with it; nothing is left to hand over
            head, payload, fds = datagram
            self._channel.setblocking(True)  # replies go out whole, in order
            try:
                self._dispatch(head, payload, fds)
            except wire.WireError as exc:
                wire.close_all(fds)
                log.error("keeper channel: %s; exiting", exc)
                os._exit(1)
            finally:
                if self._channel.fileno() >= 0:
                    self._channel.setblocking(False)
            if self._finished is not None and self._finished.done():
                return

    def _dispatch(self, head: dict[str, Any], payload: bytes, fds: list[int]) -> None:
        op = head["op"]
        if op == "init":
            self._init(head, fds)
        elif op in ("open", "restore"):
            self._open(head, payload, fds)
        elif op == "msg":
            connection = self._connections.get(wire.int_field(head, "conn"))
            if connection is None or connection.done.done():
                wire.close_all(fds)
                raise wire.WireError(f"message for unknown connection {head.get('conn')}")
            connection.deliver(wire.int_field(head, "seq"), payload, wire.int_list(head, "fd_ids"), fds)
        elif op == "ping":
            wire.close_all(fds)
            wire.send(self._channel, {"op": "pong"})
        elif op == "close":
            wire.close_all(fds)
            connection = self._connections.get(wire.int_field(head, "conn"))
            if connection is not None:
                log.info("%s: front-end disconnected", connection.name)
                connection.close()
        elif op == "suspend":
            wire.close_all(fds)
            for connection in self._connections.values():
                connection.suspend()
            if self._service is not None:
                self._service.close()  # traces complete on disk
            wire.send(self._channel, {"op": "suspended"})
            # The next worker serves from now on: nothing here may touch a ring or an fd again, and an
            # interpreter's orderly exit (numba loaded) takes longer than the hand-over itself.
            logging.shutdown()
            os._exit(0)
        elif op == "stop":
            wire.close_all(fds)
            for connection in list(self._connections.values()):
                connection.close()
            self._finish(0)
        else:
            wire.close_all(fds)
            raise wire.WireError(f"unknown op {op!r}")

    def _init(self, head: dict[str, Any], fds: list[int]) -> None:
        if head.get("control") and len(fds) == 1 and self._service is not None and self._control is None:
            from vhost_iommu.control.server import ControlServer

            assert self._control_path is not None and self._loop is not None
            listener = socket.socket(fileno=fds[0])
            self._control = ControlServer(self._service, self._control_path, listener=listener)
            self._control_start = self._loop.create_task(self._control.start())
        else:
            wire.close_all(fds)

    def _open(self, head: dict[str, Any], payload: bytes, fds: list[int]) -> None:
        ident = wire.int_field(head, "conn")
        origin = head.get("origin")
        if ident in self._connections or not isinstance(origin, str):
            wire.close_all(fds)
            raise wire.WireError(f"connection {ident} opened twice or without an origin")
        name = f"connection {ident} on {origin}"
        assert self._loop is not None
        factory = self._factory
        tracked = self._tracked
        trace = None
        # A session a previous worker served (restored, or opened with a trace it recorded): the tools'
        # checker and trace wait for the restore, then go on (ControlService.took_over).
        taking_over = head["op"] == "restore" or head.get("trace") is not None
        if tracked is not None:
            from vhost_iommu.control.service import TraceSettings

            try:
                trace = TraceSettings.from_json(head["trace"]) if head.get("trace") is not None else None
            except ValueError as exc:
                wire.close_all(fds)
                raise wire.WireError(f"connection {ident}: {exc}") from None
            factory = functools.partial(tracked, ident, taking_over=taking_over, trace=trace)
        connection = RelayedConnection(self._channel, ident, factory, self._loop, name)
        self._connections[ident] = connection
        self.server.connections.add(connection)
        self.server.origins[connection] = origin

        def forget(_future: object) -> None:
            self.server.connections.discard(connection)
            self.server.origins.pop(connection, None)
            if self._connections.get(ident) is connection:
                del self._connections[ident]

        connection.done.add_done_callback(forget)
        if head["op"] == "open":
            wire.close_all(fds)
            log.info("%s: connected", name)
        else:
            try:
                connection.restore(payload, wire.int_list(head, "fd_ids"), fds)
            except (SessionError, OSError, ValueError) as exc:
                log.error("%s: the session cannot be taken over (%s); ending it", name, exc)
                connection.end()
                return
            log.warning("%s: session taken over", name)
        if head["op"] == "open":
            if taking_over and self._service is not None:
                self._service.took_over(ident, trace)  # no session to rebuild: nothing to wait for
            return
        wire.send(self._channel, {"op": "restored", "conn": ident})


def run_worker(args: argparse.Namespace, factory: BackendFactory, tools: dict[str, Any] | None = None) -> int:
    """Serve the keeper on --keeper-fd until it says stop or suspend (or disappears)."""
    die_with_parent()
    raise_fd_limit()
    channel = socket.socket(fileno=args.keeper_fd)
    os.set_inheritable(channel.fileno(), False)
    if channel.type != socket.SOCK_SEQPACKET:
        raise SystemExit(f"--keeper-fd={args.keeper_fd} is not the keeper's channel")
    worker = Worker(channel, factory, args.control_socket, tools)
    loop = new_event_loop()
    if args.backend == "iommu":
        # Before saying ready, the kernels are loaded from a warm numba cache (the keeper measures a
        # restart up to the first request served); from a cold one (a first start, an upgrade that
        # changed a kernel) the worker is ready at once and the Python path serves while they compile.
        cold_start.begin(loop)
    try:
        return loop.run_until_complete(worker.run())
    finally:
        with contextlib.suppress(Exception):
            loop.close()
        channel.close()

"""The keeper process: owns the sockets and QEMU's connections, relays messages, restarts the worker.

One thread, one ``selectors`` loop, stdlib and the sans-I/O codec only (no numpy, numba or asyncio: the
keeper is never upgraded, so it must be small enough to be right). It frames what QEMU sends with the
codec's :class:`~vhost_iommu.protocol.Framer`, the wire rules the worker's decoder applies too, and reads
no payload.

What it keeps, per QEMU connection (:class:`Relay`):

* the connected socket, and the framing of what QEMU sends (header, payload, the fds of each message:
  ``Relay.framer``);
* every fd QEMU sent, under an *fd id* (a per-connection counter), while the worker's last exported
  session or a message not yet acknowledged references it; the rest is closed;
* the session the worker exported with its answer to the last acknowledged message (opaque bytes: the
  keeper only reads the list of fd ids that come with it);
* the messages relayed but not acknowledged yet (at most :data:`MAX_PENDING`; past it QEMU is not read
  until the worker catches up), re-delivered in order to the next worker when one dies.

A message is acknowledged by one datagram carrying its reply (if any) and the session after it, so from
the keeper's view a message is either fully handled or not at all.
"""

from __future__ import annotations

import argparse
import array
import collections
import contextlib
import errno
import logging
import os
import resource
import select
import selectors
import signal
import socket
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from vhost_iommu.keeper import wire
from vhost_iommu.protocol.codec import Framer, FramingError
from vhost_iommu.protocol.constants import FLAG_REPLY, MAX_FDS_PER_MESSAGE
from vhost_iommu.sockfile import SocketFile

log = logging.getLogger("vhost_iommu.keeper")

#: Messages relayed to the worker and not yet acknowledged, per connection; past it QEMU is not read.
MAX_PENDING = 64
#: Replies buffered for a QEMU that does not read them (as the in-process server allows).
MAX_OUTPUT = 1 << 20
#: Connections served at once (one per socket, as the in-process server; each holds a handful of fds and a
#: session). As many as serve takes sockets.
MAX_CONNECTIONS = 256
#: Worker restarts: the first at once, then doubling delays up to the cap; a worker that served this
#: long resets the count.
FIRST_DELAY = 0.0
MIN_DELAY = 0.25
MAX_DELAY = 30.0
STABLE_AFTER = 60.0
#: How long a worker gets to finish on SIGTERM, and the keeper waits for a worker's channel to drain.
STOP_GRACE = 10.0
SEND_TIMEOUT = 5.0
#: A new spare starts this long after a worker began serving: a process loading numpy and numba next to
#: a worker restoring its sessions would slow the very take-over the spare exists to make short.
SPARE_DELAY = 2.0
#: The serving worker is asked for a sign of life this often; one that gives none for --worker-timeout
#: seconds (a deadlock, a stop) is killed and replaced like a dead one.
PING_INTERVAL = 1.0
DEFAULT_WORKER_TIMEOUT = 20.0

_FD_SIZE = array.array("i").itemsize
_ANCILLARY = socket.CMSG_SPACE(MAX_FDS_PER_MESSAGE * _FD_SIZE)


class KeeperError(Exception):
    """The keeper cannot start (reported as one line and exit status 1)."""


@dataclass
class Pending:
    seq: int
    raw: bytes
    fd_ids: list[int]


def _request_header(code: int, flags: int, _size: int) -> str | None:
    """The relay's own header rule: a reply on QEMU's request stream is not vhost-user, and a relay that
    forwarded it could not tell what to answer; the connection is closed."""
    if flags & FLAG_REPLY:
        return f"request {code} has the reply flag set (flags {flags:#x})"
    return None


@dataclass
class Relay:
    """One QEMU connection held by the keeper."""

    ident: int
    sock: socket.socket
    origin: str
    fds: dict[int, int] = field(default_factory=dict)
    next_fd_id: int = 1
    next_seq: int = 1
    pending: collections.deque[Pending] = field(default_factory=collections.deque)
    #: How many of ``pending`` (from the left) the current worker has been sent.
    forwarded: int = 0
    session: bytes | None = None
    refs: list[int] = field(default_factory=list)
    #: The framing of what QEMU sends: the wire rules of the codec, plus the relay's own (_request_header).
    framer: Framer = field(default_factory=lambda: Framer("front-end requests", _request_header))
    output: bytearray = field(default_factory=bytearray)
    reading: bool = True
    closing: bool = False
    ends_program: bool = False
    #: The events the selector watches for this connection's socket (0: not registered).
    events: int = 0
    #: The settings of the trace a worker records for this connection (continued by the next worker).
    trace: dict[str, Any] | None = None

    def referenced(self) -> set[int]:
        ids = set(self.refs)
        for message in self.pending:
            ids.update(message.fd_ids)
        return ids

    def release_unreferenced(self) -> None:
        keep = self.referenced()
        for fd_id in [i for i in self.fds if i not in keep]:
            with contextlib.suppress(OSError):
                os.close(self.fds.pop(fd_id))

    def close(self) -> None:
        for fd in self.fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()
        self.framer.close()
        self.pending.clear()
        self.sock.close()


@dataclass
class Worker:
    process: subprocess.Popen[bytes]
    channel: socket.socket
    started: float
    ready: bool = False
    #: ``suspend`` was sent: nothing more is forwarded to it; it answers ``suspended`` and exits.
    suspending: bool = False
    ready_at: float | None = None
    #: When it last answered a ping (or became ready).
    alive_at: float = 0.0


class Keeper:
    """Runs until SIGTERM/SIGINT; see the module docstring."""

    def __init__(
        self,
        worker_arguments: list[str],
        listeners: list[tuple[socket.socket, str]],
        control: socket.socket | None,
        files: list[SocketFile],
        *,
        spare: bool = False,
        worker_timeout: float = DEFAULT_WORKER_TIMEOUT,
    ) -> None:
        self._arguments = worker_arguments
        self._listeners = listeners
        self._control = control
        self._files = files
        self._selector = selectors.DefaultSelector()
        self._relays: dict[int, Relay] = {}
        self._next_relay = 1
        self.worker: Worker | None = None
        #: A worker started for an upgrade, loading its code while the current one serves.
        self.standby: Worker | None = None
        #: With ``spare``: a loaded worker waiting to take over at once when the current one dies.
        self._spare_wanted = spare
        self.spare: Worker | None = None
        self._spare_at: float | None = None
        self._worker_timeout = worker_timeout
        self._ping_at = time.monotonic() + PING_INTERVAL
        self._restart_at: float | None = None
        self._failures = 0
        self._ever_ready = False
        #: Conformance statements a worker's checker saw broken (statement -> the first, described): they
        #: outlive the worker that saw them, for the program's exit status (--conformance=strict).
        self.violations: dict[str, str] = {}
        self._stopping = False
        self._upgrade_requested = False
        self.restarts = 0
        #: monotonic time of the last kill/upgrade request, until the next worker serves (for the log).
        self._gap_started: float | None = None
        self._wakeup_r, self._wakeup_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    # -- life -----------------------------------------------------------------------------------------------

    def run(self) -> int:
        previous = signal.set_wakeup_fd(self._wakeup_w, warn_on_full_buffer=False)
        handlers = {}
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            handlers[signum] = signal.signal(signum, lambda *_: None)
        try:
            self._selector.register(self._wakeup_r, selectors.EVENT_READ, ("signal", None))
            for sock, origin in self._listeners:
                sock.setblocking(False)
                if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                    self._selector.register(sock, selectors.EVENT_READ, ("listener", origin))
                else:
                    # A connected --fd: that one front-end, whose leaving ends the program (as without
                    # the keeper).
                    self._adopt(sock, origin).ends_program = True
            self.worker = self._spawn()
            log.info("listening on %s", ", ".join(origin for _sock, origin in self._listeners))
            while not self._stopping:
                self._once()
            return 0 if self._ever_ready else 1
        finally:
            self._shutdown()
            signal.set_wakeup_fd(previous)
            for signum, handler in handlers.items():
                signal.signal(signum, signal.SIG_IGN if signum != signal.SIGCHLD else handler)

    def _once(self) -> None:
        timeout = None
        due = [at for at in (self._restart_at, self._spare_at, self._ping_at) if at is not None]
        if due:
            timeout = max(0.0, min(due) - time.monotonic())
        for key, _events in self._selector.select(timeout):
            kind, what = key.data
            if kind == "signal":
                self._on_signal()
            elif kind == "listener":
                self._accept(key.fileobj, what)  # type: ignore[arg-type]
            elif kind == "relay":
                if _events & selectors.EVENT_WRITE:
                    self._flush(what)
                if _events & selectors.EVENT_READ:
                    self._on_relay(what)
            elif kind == "worker":
                self._on_worker(what)
            if self._stopping:
                return
        if self._restart_at is not None and time.monotonic() >= self._restart_at:
            self._restart_at = None
            if self.worker is None:
                self.worker = self._spawn()
        if self._spare_at is not None and time.monotonic() >= self._spare_at:
            self._spare_at = None
            self._ensure_spare()
        if time.monotonic() >= self._ping_at:
            self._ping_at = time.monotonic() + PING_INTERVAL
            self._watch_worker()

    def _watch_worker(self) -> None:
        """Ping the serving worker; kill it if it has not answered for the worker timeout (one that hangs
        while it suspends for an upgrade too: its death hands over to the new one)."""
        worker = self.worker
        if worker is None or not worker.ready:
            return
        silent = time.monotonic() - worker.alive_at
        if silent > self._worker_timeout:
            log.error(
                "device worker %d has not answered for %.1f s (hung or stopped); killing it",
                worker.process.pid,
                silent,
            )
            self._kill(worker)
            return
        self._send(worker, {"op": "ping"})

    def _on_signal(self) -> None:
        try:
            received = os.read(self._wakeup_r, 64)
        except BlockingIOError:
            return
        for signum in received:
            if signum in (signal.SIGTERM, signal.SIGINT):
                log.info("signal %d received; shutting down", signum)
                self._stopping = True
            elif signum == signal.SIGHUP:
                self.request_upgrade("SIGHUP")
            elif signum == signal.SIGCHLD:
                self._reap()

    def _reap(self) -> None:
        for worker in (self.worker, self.standby, self.spare):
            if worker is not None:
                worker.process.poll()

    # -- workers --------------------------------------------------------------------------------------------

    def _spawn(self) -> Worker:
        ours, theirs = wire.channel_pair()
        command = [
            sys.executable,
            "-m",
            "vhost_iommu",
            *self._arguments,
            f"--keeper-fd={theirs.fileno()}",
        ]
        try:
            process = subprocess.Popen(command, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL)
        except OSError as exc:
            ours.close()
            theirs.close()
            raise KeeperError(f"cannot start the device worker: {exc}") from None
        theirs.close()
        ours.setblocking(False)
        worker = Worker(process, ours, time.monotonic())
        self._selector.register(ours, selectors.EVENT_READ, ("worker", worker))
        log.info("device worker %d started", process.pid)
        return worker

    def request_upgrade(self, why: str) -> None:
        """Start a new worker with the code on disk; the current one hands over once it is ready."""
        if self.standby is not None or self.worker is None or not self.worker.ready:
            log.warning("upgrade (%s) ignored: a worker is already starting", why)
            return
        log.warning("upgrade requested (%s): starting a new device worker", why)
        if self.spare is not None:
            spare, self.spare = self.spare, None
            self._kill(spare)  # it runs the old code; a new spare follows the upgrade
        self.standby = self._spawn()

    def _send(
        self, worker: Worker, head: dict[str, Any], payload: bytes = b"", fds: list[int] | None = None
    ) -> bool:
        """Send to a worker; a worker that cannot take a datagram for SEND_TIMEOUT is killed."""
        try:
            _send_waiting(worker.channel, head, payload, fds or ())
        except (OSError, wire.WireError) as exc:
            log.error("device worker %d: channel send failed (%s); killing it", worker.process.pid, exc)
            self._kill(worker)
            return False
        return True

    def _kill(self, worker: Worker) -> None:
        with contextlib.suppress(ProcessLookupError):
            worker.process.kill()

    def _on_worker(self, worker: Worker) -> None:
        for _ in range(64):
            try:
                datagram = wire.receive(worker.channel)
            except (BlockingIOError, TimeoutError):
                return
            except (OSError, wire.WireError) as exc:
                log.error("device worker %d: bad datagram (%s); killing it", worker.process.pid, exc)
                self._kill(worker)
                datagram = None
            if datagram is None:
                self._worker_gone(worker)
                return
            head, payload, fds = datagram
            try:
                self._from_worker(worker, head, payload, fds)
            except wire.WireError as exc:
                wire.close_all(fds)
                log.error("device worker %d: %s; killing it", worker.process.pid, exc)
                self._kill(worker)
            if worker.channel.fileno() < 0:
                return

    def _from_worker(self, worker: Worker, head: dict[str, Any], payload: bytes, fds: list[int]) -> None:
        wire.close_all(fds)  # workers send no fds
        op = head["op"]
        if op == "ready":
            worker.ready = True
            worker.ready_at = worker.alive_at = time.monotonic()
            if worker is self.spare:
                log.info("device worker %d ready as the spare", worker.process.pid)
            elif worker is self.standby:
                self._hand_over()
            else:
                self._start_serving(worker)
            return
        if op == "pong":
            worker.alive_at = time.monotonic()
            return
        if op == "upgrade":
            self.request_upgrade("control channel")
            return
        if op == "violation":
            statement, first = head.get("statement"), head.get("first")
            if not isinstance(statement, str) or not isinstance(first, str):
                raise wire.WireError("violation without a statement")
            self.violations.setdefault(statement, first)
            return
        if op == "suspended":
            log.info("device worker %d suspended for the upgrade", worker.process.pid)
            if worker is self.worker and worker.suspending and self.standby is not None:
                # It touches nothing any more: no need to wait for its exit (its EOF is then ignored).
                self._promote()
            return
        relay = self._relays.get(wire.int_field(head, "conn"))
        if relay is None:
            return  # a connection closed meanwhile
        if op == "done":
            self._done(worker, relay, head, payload)
        elif op == "closed":
            log.info("connection %d: the device closed it", relay.ident)
            self._close_relay(relay, notify=False)
        elif op == "restored":
            pass
        elif op == "trace":
            trace = head.get("trace")
            if trace is not None and not isinstance(trace, dict):
                raise wire.WireError("trace settings that are not an object")
            relay.trace = trace
        else:
            raise wire.WireError(f"unknown op {op!r}")

    def _start_serving(self, worker: Worker) -> None:
        """A ready worker becomes the one serving: every connection restored or opened, pending re-sent."""
        worker.alive_at = time.monotonic()  # a spare may have waited long: its silence starts now
        if self._gap_started is not None:
            log.warning(
                "device worker %d serving %.3f s after the previous one stopped",
                worker.process.pid,
                time.monotonic() - self._gap_started,
            )
            self._gap_started = None
        self._ever_ready = True
        init_fds = [self._control.fileno()] if self._control is not None else []
        if not self._send(worker, {"op": "init", "control": self._control is not None}, b"", init_fds):
            return
        for relay in list(self._relays.values()):
            if not self._introduce(worker, relay):
                return
        if self._spare_wanted:
            self._spare_at = time.monotonic() + SPARE_DELAY

    def _ensure_spare(self) -> None:
        if self._spare_wanted and self.spare is None and self.standby is None and not self._stopping:
            self.spare = self._spawn()

    def _introduce(self, worker: Worker, relay: Relay) -> bool:
        relay.forwarded = 0
        if relay.session is None:
            head = {"op": "open", "conn": relay.ident, "origin": relay.origin, "trace": relay.trace}
            sent = self._send(worker, head)
        else:
            ids = [i for i in relay.refs if i in relay.fds]
            head = {"op": "restore", "conn": relay.ident, "origin": relay.origin, "fd_ids": ids}
            head["trace"] = relay.trace
            sent = self._send(worker, head, relay.session, [relay.fds[i] for i in ids])
        if not sent:
            return False
        return self._forward(worker, relay)

    def _forward(self, worker: Worker, relay: Relay) -> bool:
        while relay.forwarded < len(relay.pending):
            message = relay.pending[relay.forwarded]
            head = {"op": "msg", "conn": relay.ident, "seq": message.seq, "fd_ids": message.fd_ids}
            if not self._send(worker, head, message.raw, [relay.fds[i] for i in message.fd_ids]):
                return False
            relay.forwarded += 1
        return True

    def _hand_over(self) -> None:
        """The standby is ready: ask the current worker to stop at a quiescent point."""
        current = self.worker
        if current is None or not current.ready:
            # Nothing is serving (it died meanwhile, its successor still loading): the standby takes
            # over at once, and a successor that is not ready yet is not needed any more.
            if current is not None:
                self._kill(current)
            self._promote()
            return
        current.suspending = True
        self._gap_started = time.monotonic()
        self._send(current, {"op": "suspend"})

    def _promote(self) -> None:
        assert self.standby is not None
        self.worker, self.standby = self.standby, None
        self._restart_at = None  # a restart that was due is this worker
        self.restarts += 1
        self._start_serving(self.worker)

    def _worker_gone(self, worker: Worker) -> None:
        self._selector.unregister(worker.channel)
        worker.channel.close()
        try:
            # Its channel is closed: it exited or is exiting (a worker never closes it otherwise).
            status = worker.process.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            self._kill(worker)
            status = worker.process.wait()
        if worker is self.spare:
            self.spare = None
            if not worker.ready:
                log.error("the spare device worker exited (%s) before it was ready; no spare", status)
                self._spare_wanted = False
            else:
                log.warning(
                    "the spare device worker %d exited (%s); starting another", worker.process.pid, status
                )
                self._ensure_spare()
            return
        if worker is self.standby:
            self.standby = None
            log.error(
                "the new device worker %d exited (%s) before taking over; upgrade abandoned",
                worker.process.pid,
                status,
            )
            return
        if worker is not self.worker:
            return
        self.worker = None
        if self._stopping:
            return
        if worker.suspending and self.standby is not None and self.standby.ready:
            self._promote()
            return
        if self._gap_started is None:
            self._gap_started = time.monotonic()
        if not self._ever_ready:
            log.error("the device worker exited (status %s) before it was ready; giving up", status)
            self._stopping = True
            return
        if self.standby is not None and self.standby.ready:
            self._promote()
            return
        if self.spare is not None and self.spare.ready:
            log.warning("device worker %d died (status %s); the spare takes over", worker.process.pid, status)
            self.worker, self.spare = self.spare, None
            self._restart_at = None
            self.restarts += 1
            self._start_serving(self.worker)
            return
        served = time.monotonic() - worker.started
        if served >= STABLE_AFTER:
            self._failures = 0
        self._failures += 1
        delay = FIRST_DELAY if self._failures == 1 else min(MAX_DELAY, MIN_DELAY * 2 ** (self._failures - 2))
        level = logging.WARNING if self._failures < 5 else logging.ERROR
        log.log(
            level,
            "device worker %d died (status %s, failure %d in a row); a new one in %.2f s "
            "(QEMU's connections are kept meanwhile)",
            worker.process.pid,
            status,
            self._failures,
            delay,
        )
        if self.standby is not None:
            return  # it is loading already: it takes over when ready
        if self.spare is not None:
            # Loading, but not ready: it becomes the next worker (no second one is started meanwhile).
            self.worker, self.spare = self.spare, None
            return
        self._restart_at = time.monotonic() + delay

    # -- QEMU's side ----------------------------------------------------------------------------------------

    def _accept(self, listener: socket.socket, origin: str) -> None:
        try:
            sock, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            if exc.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
                return
            log.error("accept on %s failed: %s", origin, exc)
            return
        if len(self._relays) >= MAX_CONNECTIONS:
            log.warning("%s: already %d connections; refusing one", origin, MAX_CONNECTIONS)
            sock.close()
            return
        # One front-end per socket (QEMU connects once per device). One that hung up but is not seen yet
        # may be this one coming back: its connection ends now (its device goes at the end either way).
        for other in [r for r in self._relays.values() if r.origin == origin and _hung_up(r.sock)]:
            log.info("connection %d: front-end disconnected", other.ident)
            self._close_relay(other)
        holder = next((r for r in self._relays.values() if r.origin == origin), None)
        if holder is not None:
            log.warning(
                "%s: refused a second front-end while connection %d is connected (one front-end per socket)",
                origin,
                holder.ident,
            )
            sock.close()
            return
        self._adopt(sock, origin)

    def _adopt(self, sock: socket.socket, origin: str) -> Relay:
        sock.setblocking(False)
        relay = Relay(self._next_relay, sock, origin)
        self._next_relay += 1
        self._relays[relay.ident] = relay
        self._update_events(relay)
        log.info("connection %d on %s", relay.ident, origin)
        worker = self._serving()
        if worker is not None:
            self._introduce(worker, relay)
        return relay

    def _serving(self) -> Worker | None:
        worker = self.worker
        if worker is None or not worker.ready or worker.suspending:
            return None
        return worker

    def _on_relay(self, relay: Relay) -> None:
        for _ in range(16):
            if relay.closing or not relay.reading:
                return
            try:
                data, ancillary, flags, _ = relay.sock.recvmsg(
                    relay.framer.bytes_needed(), _ANCILLARY, socket.MSG_CMSG_CLOEXEC
                )
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.info("connection %d: read failed (%s)", relay.ident, exc)
                self._close_relay(relay)
                return
            received: list[int] = []
            for level, kind, item in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    received.extend(array.array("i", item[: len(item) - len(item) % _FD_SIZE]))
            try:
                relay.framer.feed(data, received)  # the framer owns those fds from here
                if flags & socket.MSG_CTRUNC:
                    relay.framer.fail(f"a message carried more than {MAX_FDS_PER_MESSAGE} fds")
            except FramingError as exc:
                log.warning("connection %d: %s; closing", relay.ident, exc)
                self._close_relay(relay)
                return
            if not data:
                log.info("connection %d: front-end disconnected", relay.ident)
                self._close_relay(relay)
                return
            if not self._frame(relay):
                return

    def _frame(self, relay: Relay) -> bool:
        """Check the header as soon as it is complete; relay a complete message. False: closed."""
        try:
            frame = relay.framer.next_frame()
        except FramingError as exc:
            log.warning("connection %d: %s; closing", relay.ident, exc)
            self._close_relay(relay)
            return False
        if frame is None:
            return True
        ids = []
        for fd in frame.fds:
            relay.fds[relay.next_fd_id] = fd
            ids.append(relay.next_fd_id)
            relay.next_fd_id += 1
        relay.pending.append(Pending(relay.next_seq, frame.data, ids))
        relay.next_seq += 1
        if len(relay.pending) >= MAX_PENDING:
            self._pause(relay)
        worker = self._serving()
        if worker is not None:
            self._forward(worker, relay)
        return True

    def _pause(self, relay: Relay) -> None:
        if relay.reading:
            relay.reading = False
            self._update_events(relay)

    def _update_events(self, relay: Relay) -> None:
        events = (selectors.EVENT_READ if relay.reading else 0) | (
            selectors.EVENT_WRITE if relay.output else 0
        )
        if relay.closing or events == relay.events:
            return
        if relay.events == 0:
            self._selector.register(relay.sock, events, ("relay", relay))
        elif events == 0:
            self._selector.unregister(relay.sock)
        else:
            self._selector.modify(relay.sock, events, ("relay", relay))
        relay.events = events

    def _done(self, worker: Worker, relay: Relay, head: dict[str, Any], payload: bytes) -> None:
        seq = wire.int_field(head, "seq")
        if not relay.pending or relay.pending[0].seq != seq or relay.forwarded == 0:
            raise wire.WireError(f"connection {relay.ident}: acknowledgement of message {seq} out of order")
        reply_size = wire.int_field(head, "reply", MAX_OUTPUT)
        if reply_size > len(payload):
            raise wire.WireError("reply longer than the datagram")
        relay.pending.popleft()
        relay.forwarded -= 1
        if head.get("close"):
            self._write(relay, payload[:reply_size])
            log.warning("connection %d: the device ended it", relay.ident)
            self._close_relay(relay, notify=False, flush=True)
            return
        relay.session = payload[reply_size:]
        relay.refs = wire.int_list(head, "refs")
        relay.release_unreferenced()
        self._write(relay, payload[:reply_size])
        if not relay.reading and len(relay.pending) < MAX_PENDING // 2 and not relay.closing:
            relay.reading = True
            self._update_events(relay)

    def _write(self, relay: Relay, data: bytes) -> None:
        if not data or (relay.closing and relay.sock.fileno() < 0):
            return
        if not relay.output:
            try:
                sent = relay.sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                log.info("connection %d: write failed (%s)", relay.ident, exc)
                self._close_relay(relay)
                return
            data = data[sent:]
        if data:
            if len(relay.output) + len(data) > MAX_OUTPUT:
                log.warning("connection %d: the front-end is not reading its replies; closing", relay.ident)
                self._close_relay(relay)
                return
            relay.output += data
            self._update_events(relay)

    def _flush(self, relay: Relay) -> None:
        try:
            sent = relay.sock.send(relay.output)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.info("connection %d: write failed (%s)", relay.ident, exc)
            self._close_relay(relay)
            return
        del relay.output[:sent]
        self._update_events(relay)

    def _close_relay(self, relay: Relay, *, notify: bool = True, flush: bool = False) -> None:
        if self._relays.pop(relay.ident, None) is None:
            return
        if relay.events:
            self._selector.unregister(relay.sock)
            relay.events = 0
        relay.closing = True
        if flush and relay.output:
            # The device's last reply (a failure) before the end; best effort, never blocking.
            with contextlib.suppress(OSError):
                relay.sock.send(relay.output)
        worker = self._serving()
        if notify and worker is not None:
            self._send(worker, {"op": "close", "conn": relay.ident})
        relay.close()
        if relay.ends_program:
            log.info("the front-end of %s is gone; stopping", relay.origin)
            self._stopping = True

    # -- the end --------------------------------------------------------------------------------------------

    def _shutdown(self) -> None:
        workers = [worker for worker in (self.spare, self.standby, self.worker) if worker is not None]
        for worker in workers:
            with contextlib.suppress(OSError, wire.WireError):
                wire.send(worker.channel, {"op": "stop"})
        for worker in workers:
            try:
                worker.process.wait(timeout=STOP_GRACE)
            except subprocess.TimeoutExpired:
                log.error("device worker %d did not stop; killing it", worker.process.pid)
                self._kill(worker)
                worker.process.wait()
            worker.channel.close()
        self.worker = self.standby = self.spare = None
        for relay in list(self._relays.values()):
            relay.close()
        self._relays.clear()
        for sock, _origin in self._listeners:
            sock.close()
        if self._control is not None:
            self._control.close()
        for created in self._files:
            created.remove()
        self._selector.close()
        os.close(self._wakeup_r)
        os.close(self._wakeup_w)


def raise_fd_limit() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit: the keeper (and each worker) holds every guest's fds."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _send_waiting(
    sock: socket.socket, head: dict[str, Any], payload: bytes, fds: list[int] | tuple[()]
) -> None:
    """wire.send on a non-blocking socket, waiting up to SEND_TIMEOUT for room (a datagram goes whole)."""
    deadline = time.monotonic() + SEND_TIMEOUT
    while True:
        try:
            wire.send(sock, head, payload, fds)
            return
        except BlockingIOError:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([], [sock], [], remaining)[1]:
                raise TimeoutError("the worker has not read its channel for a while") from None


# -- start-up ---------------------------------------------------------------------------------------------


def check_state_dir(path: str) -> str:
    """Create ``path`` 0700 if missing; refuse one not ours or writable by others. Returns it absolute."""
    path = os.path.abspath(path)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise KeeperError(f"--state-dir: cannot create {path}: {exc.strerror or exc}") from None
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise KeeperError(f"--state-dir: {path} is not a directory")
    if info.st_uid != os.getuid():
        raise KeeperError(f"--state-dir: {path} belongs to uid {info.st_uid}, not to this user")
    if info.st_mode & 0o022:
        raise KeeperError(
            f"--state-dir: {path} is writable by group or others (mode {info.st_mode & 0o777:o})"
        )
    return path


def worker_arguments(arguments: list[str]) -> list[str]:
    """The worker's command line: the keeper's own, but for options the worker must not act on."""
    return [argument for argument in arguments if not argument.startswith("--keeper-fd")]


def run_keeper(
    args: argparse.Namespace,
    arguments: list[str],
    listeners: list[tuple[socket.socket, str]],
    files: list[SocketFile],
    control: socket.socket | None,
    *,
    violations_status: int | None = None,
) -> int:
    """Run the keeper over already-created listeners (the caller made them; the keeper closes them).
    ``violations_status``: the exit status when a worker's conformance checker saw a driver break a
    statement (--conformance=strict), if the keeper otherwise ended well."""
    raise_fd_limit()
    spare = bool(getattr(args, "spare_worker", False))
    timeout = float(getattr(args, "worker_timeout", DEFAULT_WORKER_TIMEOUT))
    keeper = Keeper(
        worker_arguments(arguments), listeners, control, files, spare=spare, worker_timeout=timeout
    )
    status = keeper.run()
    if status == 0 and violations_status is not None and keeper.violations:
        for first in keeper.violations.values():
            log.error("the driver broke %s", first)
        return violations_status
    return status


def _hung_up(sock: socket.socket) -> bool:
    """Whether the peer of ``sock`` has closed (or shut down writing), without reading."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLRDHUP | select.POLLHUP)
    return bool(poller.poll(0))

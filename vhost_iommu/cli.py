"""The ``vhost-iommu`` command: a vhost-user back-end program (vhost-user.rst "Backend program conventions").

``vhost-iommu --socket-path=PATH`` (or ``--fd=N``) serves the virtio-iommu device until SIGTERM or SIGINT;
several ``--socket-path``, or ``--socket-count=N`` with one path as a prefix (as rust-vmm's vhost-device
back-ends do), serve a guest per socket from one process, each connection with its own device and limits;
``vhost-iommu --print-capabilities`` prints the back-end's capabilities as JSON and exits. The program never
daemonises itself.

Sub-commands: ``vhost-iommu NAME ...`` runs a registered :class:`Command`; anything else is the ``serve``
command. Other modules add commands with :func:`register_command`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import logging
import os
import signal
import socket
import stat
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

from vhost_iommu import __version__
from vhost_iommu.control import options as control_options

if TYPE_CHECKING:
    from vhost_iommu.device import Topology
    from vhost_iommu.device.topology import ServedDevice
    from vhost_iommu.server import BackendFactory
    from vhost_iommu.sockfile import SocketFile

# The server (and numba, through the rings) is imported only by the commands that need it, so that
# --print-capabilities and argument errors answer at once.

log = logging.getLogger("vhost_iommu")

PROGRAM = "vhost-iommu"

#: ``--print-capabilities`` output. vhost-user.json's VHostUserBackendType has no member for an IOMMU
#: device (its list stops at the device types QEMU had back-ends for); "iommu" is the virtio device's own
#: name, and there is no capability union branch for it, so no other key is printed.
CAPABILITIES: dict[str, object] = {"type": "iommu"}


class CliError(Exception):
    """A problem with the command line or the environment, reported as one line and exit status 1."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line on stderr (no usage dump) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


@dataclass(frozen=True)
class Command:
    """A sub-command: ``configure`` adds its arguments, ``run`` does the work and returns the exit status."""

    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {}


def register_command(command: Command) -> None:
    """Make ``vhost-iommu NAME`` run ``command``."""
    if command.name in COMMANDS:
        raise ValueError(f"command {command.name!r} is already registered")
    COMMANDS[command.name] = command


# -- serve --------------------------------------------------------------------------------------------------


def _socket_mode(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an octal mode such as 0600") from None
    if not 0 <= mode <= 0o777:
        raise argparse.ArgumentTypeError(f"{text!r} is not a permission mode between 0 and 0777")
    return mode


def _fd_number(text: str) -> int:
    try:
        fd = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a file descriptor number") from None
    if fd < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a file descriptor number")
    return fd


#: More sockets than this from one process is a typo, not a deployment (each costs an fd and a task).
MAX_SOCKETS = 256


def _bounded_int(low: int, high: int, what: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text, 0)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what} between {low} and {high}")
        return value

    return parse


def configure_serve(parser: argparse.ArgumentParser) -> None:
    """The ``serve`` arguments (also the program's default command)."""
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--socket-path",
        metavar="PATH",
        action="append",
        help="listen for a front-end on this unix socket; repeat it to serve one guest per socket "
        "(with --socket-count: the prefix of the socket names)",
    )
    where.add_argument(
        "--fd", type=_fd_number, metavar="FDNUM", help="use this inherited socket (listening or connected)"
    )
    parser.add_argument(
        "--socket-count",
        type=_bounded_int(1, MAX_SOCKETS, "a socket count"),
        metavar="N",
        help="serve N guests from one process on the sockets PATH0 .. PATH<N-1> (the --socket-path PATH "
        "suffixed by 0, 1, ...; the convention of rust-vmm's vhost-device back-ends)",
    )
    parser.add_argument(
        "--socket-mode",
        type=_socket_mode,
        default=0o600,
        metavar="MODE",
        help="permissions of the sockets created by --socket-path (octal, default 0600)",
    )
    parser.add_argument(
        "--max-domains",
        type=_bounded_int(1, 2**32, "a number of domains"),
        metavar="N",
        help="per guest: at most N domains at once; an ATTACH that needs one more is answered NOMEM "
        "(default: every ID of the topology's domain range)",
    )
    parser.add_argument(
        "--max-mappings",
        type=_bounded_int(0, 2**40, "a number of mappings"),
        metavar="N",
        help="per guest: at most N mappings at once, all domains together; a MAP past it is answered NOMEM "
        "(default 4194304)",
    )
    parser.add_argument(
        "--topology",
        metavar="FILE",
        help="endpoints and reserved regions of the IOMMU (a regular TOML file; it names no other file)",
    )
    parser.add_argument(
        "--no-devices",
        action="store_true",
        help="do not serve the topology's [[devices]] (the vfio-user endpoints, docs/dma-engine.md): the "
        "IOMMU alone",
    )
    parser.add_argument(
        "--control-socket",
        metavar="PATH",
        help="serve the control channel (vhost-iommu ctl, docs/control.md) on this unix socket (mode 0600)",
    )
    control_options.add_arguments(parser)  # --trace-dir, --trace, --conformance
    parser.add_argument(
        "--request-path",
        choices=("compiled", "python"),
        default="compiled",
        help="how the requestq is served: MAP and UNMAP by a compiled kernel (compiled, the default) or "
        "every request by the Python device core (python); the answers are the same",
    )
    parser.add_argument(
        "--poll-us",
        type=_poll_us,
        default=None,
        metavar="N",
        help="compiled path: after answering, watch the ring N microseconds for the next request before "
        "waiting for a kick (default: the requestq thread only, 60 us, and only while its windows catch "
        "requests; 0: never; docs/performance.md)",
    )
    parser.add_argument(
        "--kick-thread",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="compiled path: serve each guest's requestq from a thread that waits on its kick eventfd "
        "(an all-numba loop; the default) or (--no-kick-thread) from the event loop (docs/performance.md)",
    )
    parser.add_argument(
        "--kick-thread-priority",
        choices=("adaptive", "realtime", "high", "normal"),
        default=None,
        help="the requestq thread's scheduling: adaptive (the default: SCHED_FIFO 1 while the host has no "
        "idle CPU, so that the thread runs as soon as the guest kicks, the ordinary class otherwise), "
        "realtime (SCHED_FIFO 1 always), high (nice -10) or normal; without the privilege "
        "(CAP_SYS_NICE, or RLIMIT_RTPRIO/RLIMIT_NICE) it runs at normal priority and says so once",
    )
    parser.add_argument(
        "--print-capabilities",
        action="store_true",
        help="print the back-end capabilities as JSON and exit",
    )
    parser.add_argument(
        "--state-dir",
        metavar="DIR",
        help="keep QEMU's connections in a small keeper process and serve them from a device worker that "
        "may crash, be killed or be upgraded (SIGHUP) without QEMU seeing it; the device's state is kept "
        "under DIR (created 0700; docs/restart.md)",
    )
    parser.add_argument(
        "--spare-worker",
        action="store_true",
        help="with --state-dir: keep a second device worker loaded and waiting, so that a worker that dies "
        "is replaced in milliseconds instead of a process start (costs the memory of one more worker)",
    )
    parser.add_argument(
        "--worker-timeout",
        type=_bounded_int(1, 3600, "a number of seconds"),
        default=20,
        metavar="SECONDS",
        help="with --state-dir: a device worker that answers no sign-of-life request for this long (hung, "
        "stopped) is killed and replaced (default 20, the guest's soft-lockup threshold)",
    )
    # The keeper's channel, given to the device worker it starts (serve --state-dir); not for people.
    parser.add_argument("--keeper-fd", type=_fd_number, help=argparse.SUPPRESS)
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (repeatable)")
    # Test device for exercising the vhost-user machinery without the IOMMU; deliberately undocumented.
    parser.add_argument("--backend", choices=("iommu", "echo"), default="iommu", help=argparse.SUPPRESS)


def _poll_us(text: str) -> float:
    from vhost_iommu.virtio_iommu import MAX_POLL_US

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of microseconds") from None
    if not 0 <= value <= MAX_POLL_US:  # also refuses nan
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number of microseconds between 0 and {MAX_POLL_US:g}"
        )
    return value


def check_backend_options(args: argparse.Namespace) -> None:
    """Raise CliError for back-end options that mean nothing together (cheap: imports nothing)."""
    # getattr: namespaces built by other commands (and older callers) need not carry these options.
    request_path: str = getattr(args, "request_path", "compiled")
    poll_us: float | None = getattr(args, "poll_us", None)
    kick_thread: bool | None = getattr(args, "kick_thread", None)  # None: the back-end's default
    priority: str | None = getattr(args, "kick_thread_priority", None)
    tuned = request_path != "compiled" or any(x is not None for x in (poll_us, kick_thread, priority))
    if args.backend == "echo" and tuned:
        raise CliError(
            "--request-path, --poll-us, --kick-thread and --kick-thread-priority apply to the IOMMU device, "
            "not to --backend=echo"
        )
    if request_path == "python" and (poll_us or kick_thread or priority):
        raise CliError("--poll-us, --kick-thread and --kick-thread-priority apply to --request-path=compiled")
    if kick_thread is False and priority is not None:
        raise CliError("--kick-thread-priority applies to the kick thread; --no-kick-thread has none")
    if args.backend == "echo" and args.topology:
        raise CliError("--topology applies to the IOMMU device, not to --backend=echo")


def make_backend_factory(args: argparse.Namespace) -> BackendFactory:
    """The per-connection back-end factory the arguments ask for; raises CliError if it cannot be built."""
    check_backend_options(args)
    request_path: str = getattr(args, "request_path", "compiled")
    poll_us: float | None = getattr(args, "poll_us", None)
    kick_thread: bool | None = getattr(args, "kick_thread", None)
    priority_name: str | None = getattr(args, "kick_thread_priority", None)
    if args.backend == "echo":
        from vhost_iommu.harness.echo import EchoBackend

        return EchoBackend
    try:
        from vhost_iommu.virtio_iommu import VirtioIommuBackend
    except ImportError as exc:
        raise CliError(f"the virtio-iommu device cannot be loaded: {exc}") from None
    from vhost_iommu.device import IommuDevice
    from vhost_iommu.thread_priority import DEFAULT_PRIORITY, ThreadPriority

    priority = DEFAULT_PRIORITY if priority_name is None else ThreadPriority(priority_name)
    topology = load_topology_argument(args.topology)
    max_domains: int | None = getattr(args, "max_domains", None)
    max_mappings: int | None = getattr(args, "max_mappings", None)
    state_dir = None
    if getattr(args, "state_dir", None) is not None:
        # The device worker under a keeper: each connection's state in the subdirectory of its session
        # key (docs/persistence.md). Opened once: every back-end reaches it through the same fd.
        from vhost_iommu.persist import StateDir, StateError

        try:
            state_dir = StateDir(args.state_dir)
        except StateError as exc:
            raise CliError(f"--state-dir: {exc}") from None

    def factory() -> VirtioIommuBackend:
        # A device per connection, so the limits are counted per guest.
        if max_mappings is None:
            device = IommuDevice(topology, max_domains=max_domains)
        else:
            device = IommuDevice(topology, max_domains=max_domains, max_mappings=max_mappings)
        return VirtioIommuBackend(
            topology,
            device=device,
            request_path="python" if request_path == "python" else "compiled",
            poll_us=poll_us,
            kick_thread=kick_thread,
            kick_thread_priority=priority,
            state_dir=state_dir,
        )

    return factory


def load_topology_argument(path: str | None) -> Topology:
    """The ``--topology`` of any command: the default q35 topology without one; otherwise the file, read
    only if it is a regular file of sane size. Raises CliError naming the file and the field."""
    from vhost_iommu.device import Topology

    if not path:
        return Topology.default()
    try:
        return Topology.loads(_read_regular_file(path), source=os.path.basename(path))
    except OSError as exc:
        raise CliError(f"--topology: {path}: {exc.strerror or exc}") from None
    except ValueError as exc:  # TopologyError names the file and the problem
        raise CliError(f"--topology: {exc}") from None


#: A topology file is a few kilobytes; more is not a topology (and must not be read into memory whole).
MAX_TOPOLOGY_BYTES = 1 << 20


def _read_regular_file(path: str) -> str:
    """The text of ``path`` if it is a regular file; a FIFO, device or directory is refused unread.

    Opened non-blocking so that a FIFO cannot hang the start-up before the check sees it."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CliError(f"--topology: {path} is not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as handle:
            data = handle.read(MAX_TOPOLOGY_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_TOPOLOGY_BYTES:
        raise CliError(f"--topology: {path} is larger than {MAX_TOPOLOGY_BYTES} bytes")
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise CliError(f"--topology: {path} is not UTF-8 text") from None


def _inherited_socket(fd: int) -> socket.socket:
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise CliError(f"--fd={fd}: {exc.strerror or exc}") from None
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise CliError(f"--fd={fd} is not a unix stream socket")
    return sock


#: The topology's devices being served: (device, listening socket, its path).
DeviceListeners = Sequence[tuple["ServedDevice", socket.socket, str]]


def format_bdf(bdf: int) -> str:
    from vhost_iommu.device.topology import format_bdf as topology_format_bdf

    return topology_format_bdf(bdf)


async def _serve_until_signal(
    listeners: Sequence[tuple[socket.socket, str]],
    factory: BackendFactory,
    control_path: str | None = None,
    tools: dict[str, Any] | None = None,
    devices: DeviceListeners = (),
    topology: Topology | None = None,
) -> int:
    """Serve until a signal; 0, or EXIT_VIOLATIONS when ``tools`` asked for strict conformance and a
    driver broke a statement. ``tools``: ControlService options (control_options.service_options)."""
    from vhost_iommu.server import SocketPathError, VhostUserServer

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    control = service = None
    strict = False
    if control_path is None and tools is None:
        server = VhostUserServer(factory)
    else:
        from vhost_iommu.control.server import ControlServer
        from vhost_iommu.control.service import ControlService

        options = dict(tools or {})
        strict = bool(options.pop("strict", False))
        service = ControlService(**options)
        server = VhostUserServer(service.track(factory))
        service.server = server
    if control_path is not None and service is not None:
        try:
            control = ControlServer(service, control_path)
        except SocketPathError as exc:
            raise CliError(f"--control-socket: {exc}") from None
        await control.start()
        log.info("control channel on %s", control_path)
    # One server for every socket: each accepted front-end gets its own device whichever socket it used.
    serving = {asyncio.create_task(server.serve_socket(sock, where)) for sock, where in listeners}
    endpoints = None
    if devices and topology is not None:
        from vhost_iommu.endpoint_server import EndpointServer

        endpoints = EndpointServer(topology, server)
        if service is not None:
            service.endpoint_server = endpoints
        for spec, sock, path in devices:
            served = endpoints.add(spec, path)
            serving.add(asyncio.create_task(endpoints.serve(served, sock)))
            log.info("serving %s for endpoint %#x over vfio-user on %s", served.name, served.endpoint, path)
    # Said only now that a signal would be handled: a supervisor may act on this line.
    log.info("listening on %s", ", ".join(where for _sock, where in listeners))
    stopping = asyncio.create_task(stop.wait())
    try:
        # Any serving task ending ends the program: a listener failing for good, or a connected --fd
        # front-end leaving.
        done, _ = await asyncio.wait({*serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if stop.is_set():
            log.info("signal received; shutting down")
        for task in done - {stopping}:
            if task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
    finally:
        if endpoints is not None:
            endpoints.close()
        server.close()
        for task in (*serving, stopping):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if control is not None:
            await control.close()
        if service is not None:
            service.close()  # traces complete on disk
            if service.trace_dir is not None:
                service.trace_dir.close()
    if service is not None and strict:
        broken = service.violations()
        for number, report in broken.items():
            log.error("connection %d: the driver broke %s", number, report["first"])
        if broken:
            return control_options.EXIT_VIOLATIONS
    return 0
    # The signal handlers stay until the loop is closed: a second SIGTERM during clean-up must not
    # kill the process before it has removed its socket.


def socket_paths(args: argparse.Namespace) -> list[str]:
    """The vhost-user socket paths the arguments ask for (empty with --fd); raises CliError."""
    paths: list[str] = list(args.socket_path or [])
    if args.socket_count is not None:
        if args.fd is not None:
            raise CliError("--socket-count applies to --socket-path, not to --fd")
        if len(paths) != 1:
            raise CliError("--socket-count takes exactly one --socket-path (the prefix of the names)")
        # rust-vmm's vhost-device back-ends: the path suffixed by 0 .. N-1, even for N = 1.
        paths = [f"{paths[0]}{index}" for index in range(args.socket_count)]
    if len(paths) > MAX_SOCKETS:
        raise CliError(f"at most {MAX_SOCKETS} sockets")
    resolved = [os.path.abspath(path) for path in paths]
    if len(set(resolved)) != len(resolved):
        raise CliError("a socket path is given twice")
    if args.control_socket is not None and os.path.abspath(args.control_socket) in resolved:
        raise CliError("--control-socket is also a --socket-path")
    return paths


def serve(args: argparse.Namespace) -> int:
    """Serve front-ends until SIGTERM/SIGINT (or, with a connected --fd, until it disconnects)."""
    if args.socket_path is None and args.fd is None:
        raise CliError("one of --socket-path or --fd is required")
    if args.backend == "echo" and (args.max_domains is not None or args.max_mappings is not None):
        raise CliError("--max-domains and --max-mappings apply to the IOMMU device, not to --backend=echo")
    paths = socket_paths(args)
    if getattr(args, "keeper_fd", None) is not None:
        return _serve_as_worker(args)
    if getattr(args, "state_dir", None) is not None:
        _refuse_devices_with_state_dir(args)
        return _serve_with_keeper(args, paths)
    check_backend_options(args)
    listeners: list[tuple[socket.socket, str]] = []
    files: list[SocketFile] = []
    devices: list[tuple[ServedDevice, socket.socket, str]] = []
    loop: asyncio.AbstractEventLoop | None = None
    status = 0
    try:
        # The sockets listen before the device stack is imported (numpy, numba: most of a start-up):
        # a front-end's connection is accepted at once and its first message waits for the loop.
        _open_listeners(args, paths, listeners, files)  # on failure, those made are removed below
        from vhost_iommu.server import new_event_loop

        factory = make_backend_factory(args)
        topology = None if args.backend == "echo" else load_topology_argument(args.topology)
        if topology is not None and not args.no_devices:
            _open_device_listeners(args, topology, paths, devices, files)
        try:
            tools = control_options.service_options(args)
        except ValueError as exc:
            raise CliError(str(exc)) from None
        loop = new_event_loop()
        if args.backend == "iommu":
            # The sockets listen already; from an empty numba cache the kernels compile in the
            # background while the Python path serves (vhost_iommu.cold_start; `vhost-iommu warm-up`
            # fills the cache ahead of time).
            from vhost_iommu import cold_start

            cold_start.begin(loop)
        status = loop.run_until_complete(
            _serve_until_signal(listeners, factory, args.control_socket, tools, devices, topology)
        )
    finally:
        for sock, _where in listeners:
            sock.close()
        for _spec, sock, _path in devices:
            sock.close()
        for created in files:
            created.remove()  # only if the path still holds our socket
        if loop is not None:
            # Closing the loop restores the default handlers; a repeated SIGTERM from a supervisor
            # between here and exit must not turn a clean shutdown into death by signal.
            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, signal.SIG_IGN)
            loop.close()
    return status


def _open_listeners(
    args: argparse.Namespace,
    paths: list[str],
    listeners: list[tuple[socket.socket, str]],
    files: list[SocketFile],
) -> None:
    """Add the --fd socket and a listener per path to ``listeners`` and ``files`` (the caller closes and
    removes what was added if this raises CliError)."""
    from vhost_iommu.sockfile import SocketPathError, create_unix_listener

    if args.fd is not None:
        listeners.append((_inherited_socket(args.fd), f"fd {args.fd}"))
    for path in paths:
        try:
            sock, created = create_unix_listener(path, args.socket_mode)
        except SocketPathError as exc:
            raise CliError(str(exc)) from None
        listeners.append((sock, path))
        files.append(created)


def _refuse_devices_with_state_dir(args: argparse.Namespace) -> None:
    """QEMU's vfio-user client never reconnects and the keeper does not hold vfio-user connections, so
    a worker restart would kill every served endpoint for the VM's life: refused before anything starts."""
    if args.backend == "echo" or args.no_devices:
        return
    topology = load_topology_argument(args.topology)
    if topology.devices:
        names = ", ".join(f"{d.kind} at {format_bdf(d.bdf)}" for d in topology.devices)
        raise CliError(
            f"--state-dir cannot keep vfio-user endpoints across a device worker restart (QEMU's "
            f"vfio-user client never reconnects), and the topology serves {names}: give --no-devices "
            "to serve the IOMMU alone, or a --topology without [[devices]]"
        )


def _open_device_listeners(
    args: argparse.Namespace,
    topology: Topology,
    paths: list[str],
    devices: list[tuple[ServedDevice, socket.socket, str]],
    files: list[SocketFile],
) -> None:
    """A listener for each of the topology's devices (relative sockets and paths beside the first
    --socket-path); a device that cannot be served (a virtio-blk's image missing) stops the program."""
    from vhost_iommu.endpoint_server import device_problem
    from vhost_iommu.sockfile import SocketPathError, create_unix_listener

    socket_dir = os.path.dirname(os.path.abspath(paths[0])) if paths else None
    taken = {os.path.abspath(path) for path in paths}
    if args.control_socket is not None:
        taken.add(os.path.abspath(args.control_socket))
    for spec in topology.devices:
        path = spec.socket_path(socket_dir)
        if path is None:
            log.warning(
                "%s at %s is not served: its socket %r is relative and --fd gives no directory for it "
                "(give an absolute path in the topology, or --no-devices)",
                spec.kind,
                format_bdf(spec.bdf),
                spec.socket,
            )
            continue
        if os.path.abspath(path) in taken:
            raise CliError(
                f"the socket of {spec.kind} at {format_bdf(spec.bdf)}, {path}, is also another socket"
            )
        served = spec.with_paths_in(socket_dir)
        problem = device_problem(served)
        if problem is not None:
            raise CliError(f"{spec.kind} at {format_bdf(spec.bdf)}: {problem}")
        try:
            sock, created = create_unix_listener(path, args.socket_mode)
        except SocketPathError as exc:
            raise CliError(f"{spec.kind} at {format_bdf(spec.bdf)}: {exc}") from None
        devices.append((served, sock, path))
        files.append(created)


def _serve_with_keeper(args: argparse.Namespace, paths: list[str]) -> int:
    """serve --state-dir: this process becomes the keeper (light: no numba, no numpy, no asyncio)."""
    from vhost_iommu.keeper.keeper import KeeperError, check_state_dir, run_keeper
    from vhost_iommu.sockfile import SocketPathError, create_unix_listener

    arguments: list[str] | None = getattr(args, "command_arguments", None)
    if arguments is None:
        raise CliError("--state-dir needs the command line it was given (run through main())")
    # A strict exit status is the program's: workers tell the keeper what their checkers saw.
    strict = getattr(args, "conformance", "off") == "strict"
    try:
        control_options.check_new_trace(args)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    try:
        check_state_dir(args.state_dir)
    except KeeperError as exc:
        raise CliError(str(exc)) from None
    listeners: list[tuple[socket.socket, str]] = []
    files: list[SocketFile] = []
    control: socket.socket | None = None
    try:
        _open_listeners(args, paths, listeners, files)
        if args.control_socket is not None:
            try:
                control, created = create_unix_listener(args.control_socket, 0o600)
            except SocketPathError as exc:
                raise CliError(f"--control-socket: {exc}") from None
            files.append(created)
    except BaseException:
        for sock, _where in listeners:
            sock.close()
        if control is not None:
            control.close()
        for made in files:
            made.remove()
        raise
    try:
        return run_keeper(
            args,
            arguments,
            listeners,
            files,
            control,
            violations_status=control_options.EXIT_VIOLATIONS if strict else None,
        )
    except KeeperError as exc:
        raise CliError(str(exc)) from None


def _serve_as_worker(args: argparse.Namespace) -> int:
    """The device worker a keeper started (--keeper-fd): the whole back-end, fed by the keeper."""
    factory = make_backend_factory(args)
    try:
        tools = control_options.service_options(args, worker=True)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    if tools is not None:
        # The program's exit status, not the service's: the keeper's (the worker tells it what it saw).
        tools.pop("strict", None)
    from vhost_iommu.keeper.worker import run_worker

    return run_worker(args, factory, tools)


SERVE = Command("serve", "serve the virtio-iommu device (the default command)", configure_serve, serve)
register_command(SERVE)


# -- entry point --------------------------------------------------------------------------------------------


def _setup_logging(verbosity: int) -> None:
    level = logging.WARNING - 10 * verbosity
    logging.basicConfig(level=max(level, logging.DEBUG), format=f"{PROGRAM}: %(levelname)s: %(message)s")


#: Modules that register sub-commands when imported (kept light: heavy imports go inside the commands).
COMMAND_MODULES = ("vhost_iommu.commands",)


def _load_command_modules() -> None:
    for name in COMMAND_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise  # the module exists but something it imports does not: a real error


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if "--print-capabilities" in arguments:
        # The convention: print, exit successfully, ignore every other option.
        print(json.dumps(CAPABILITIES))
        return 0
    _load_command_modules()
    command = SERVE
    if arguments and arguments[0] in COMMANDS:
        command = COMMANDS[arguments.pop(0)]
        prog = f"{PROGRAM} {command.name}"
    else:
        prog = PROGRAM
    parser = _Parser(prog=prog, description=command.help)
    parser.add_argument("--version", action="version", version=f"{PROGRAM} {__version__}")
    command.configure(parser)
    args = parser.parse_args(arguments)
    # serve --state-dir starts its device worker with the very options it was given.
    args.command_arguments = list(arguments)
    _setup_logging(getattr(args, "verbose", 0))
    try:
        return command.run(args)
    except CliError as exc:
        print(f"{PROGRAM}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130

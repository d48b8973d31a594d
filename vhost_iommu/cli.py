"""The ``vhost-iommu`` command: a vhost-user back-end program (vhost-user.rst "Backend program conventions").

``vhost-iommu --socket-path=PATH`` (or ``--fd=N``) serves the virtio-iommu device until SIGTERM or SIGINT;
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
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NoReturn

from vhost_iommu import __version__

if TYPE_CHECKING:
    from vhost_iommu.server import BackendFactory

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


def configure_serve(parser: argparse.ArgumentParser) -> None:
    """The ``serve`` arguments (also the program's default command)."""
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--socket-path", metavar="PATH", help="listen for the front-end on this unix socket")
    where.add_argument(
        "--fd", type=_fd_number, metavar="FDNUM", help="use this inherited socket (listening or connected)"
    )
    parser.add_argument(
        "--socket-mode",
        type=_socket_mode,
        default=0o600,
        metavar="MODE",
        help="permissions of the socket created by --socket-path (octal, default 0600)",
    )
    parser.add_argument("--topology", metavar="FILE", help="endpoints and reserved regions of the IOMMU")
    parser.add_argument(
        "--control-socket",
        metavar="PATH",
        help="serve the control channel (vhost-iommu ctl, docs/control.md) on this unix socket (mode 0600)",
    )
    parser.add_argument(
        "--print-capabilities",
        action="store_true",
        help="print the back-end capabilities as JSON and exit",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (repeatable)")
    # Test device for exercising the vhost-user machinery without the IOMMU; deliberately undocumented.
    parser.add_argument("--backend", choices=("iommu", "echo"), default="iommu", help=argparse.SUPPRESS)


def make_backend_factory(args: argparse.Namespace) -> BackendFactory:
    """The per-connection back-end factory the arguments ask for; raises CliError if it cannot be built."""
    if args.backend == "echo":
        if args.topology:
            raise CliError("--topology applies to the IOMMU device, not to --backend=echo")
        from vhost_iommu.harness.echo import EchoBackend

        return EchoBackend
    try:
        from vhost_iommu.device import Topology
        from vhost_iommu.virtio_iommu import VirtioIommuBackend
    except ImportError as exc:
        raise CliError(f"the virtio-iommu device cannot be loaded: {exc}") from None
    topology = None
    if args.topology:
        try:
            topology = Topology.load(args.topology)
        except OSError as exc:
            raise CliError(f"--topology: {args.topology}: {exc.strerror or exc}") from None
        except ValueError as exc:  # TopologyError names the file and the problem
            raise CliError(f"--topology: {exc}") from None

    def factory() -> VirtioIommuBackend:
        return VirtioIommuBackend(topology)

    return factory


def _inherited_socket(fd: int) -> socket.socket:
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise CliError(f"--fd={fd}: {exc.strerror or exc}") from None
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise CliError(f"--fd={fd} is not a unix stream socket")
    return sock


async def _serve_until_signal(
    sock: socket.socket, factory: BackendFactory, where: str, control_path: str | None = None
) -> None:
    from vhost_iommu.server import SocketPathError, VhostUserServer

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    control = None
    if control_path is None:
        server = VhostUserServer(factory)
    else:
        from vhost_iommu.control.server import ControlServer
        from vhost_iommu.control.service import ControlService

        service = ControlService()
        server = VhostUserServer(service.track(factory))
        service.server = server
        try:
            control = ControlServer(service, control_path)
        except SocketPathError as exc:
            raise CliError(f"--control-socket: {exc}") from None
        await control.start()
        log.info("control channel on %s", control_path)
    # Said only now that a signal would be handled: a supervisor may act on this line.
    log.info("listening on %s", where)
    serving = asyncio.create_task(server.serve_socket(sock))
    stopping = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if stop.is_set():
            log.info("signal received; shutting down")
        elif serving.exception() is not None:
            raise serving.exception()  # type: ignore[misc]
    finally:
        server.close()
        for task in (serving, stopping):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if control is not None:
            await control.close()
        # The signal handlers stay until the loop is closed: a second SIGTERM during clean-up must not
        # kill the process before it has removed its socket.


def serve(args: argparse.Namespace) -> int:
    """Serve front-ends until SIGTERM/SIGINT (or, with a connected --fd, until it disconnects)."""
    if args.socket_path is None and args.fd is None:
        raise CliError("one of --socket-path or --fd is required")
    from vhost_iommu.server import SocketPathError, bind_unix_socket, new_event_loop

    factory = make_backend_factory(args)
    if args.backend == "iommu":
        # Before the socket exists: a front-end must never wait for numba to compile a kernel (a warm
        # cache makes this a fraction of a second; `vhost-iommu warm-up` fills it ahead of time).
        from vhost_iommu.jit import warm_up

        warm_up()
    if args.fd is not None:
        sock = _inherited_socket(args.fd)
        path = None
        where = f"fd {args.fd}"
    else:
        path = args.socket_path
        try:
            sock = bind_unix_socket(path, args.socket_mode)
        except SocketPathError as exc:
            raise CliError(str(exc)) from None
        where = path
    loop = new_event_loop()
    try:
        loop.run_until_complete(_serve_until_signal(sock, factory, where, args.control_socket))
    finally:
        sock.close()
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        # Closing the loop restores the default handlers; a repeated SIGTERM from a supervisor between
        # here and exit must not turn a clean shutdown into death by signal.
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, signal.SIG_IGN)
        loop.close()
    return 0


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
    _setup_logging(getattr(args, "verbose", 0))
    try:
        return command.run(args)
    except CliError as exc:
        print(f"{PROGRAM}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130

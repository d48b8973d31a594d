"""Socket files: listening unix sockets created safely, and removed only while still ours.

Stdlib only (the keeper, which must not import the server, makes its sockets with it). Created with their
final mode inside a private directory and linked into place, so nobody reaches a socket more open than
asked, and nothing already at the path but a stale socket is ever replaced; removed only if the path still
holds the socket this process made.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
import tempfile
from dataclasses import dataclass

log = logging.getLogger(__name__)


class SocketPathError(Exception):
    """The socket path cannot be used (not a socket, in use by a live server, or not creatable)."""


@dataclass(frozen=True)
class SocketFile:
    """The socket file a listener was bound to: its path and the inode this process created there."""

    path: str
    device: int
    inode: int

    def remove(self) -> bool:
        """Unlink :attr:`path` if it still is our socket; True if it was removed.

        Whatever else stands there now (put by someone with write access to the directory after we bound)
        is left alone: a program cleaning up must not delete a file it did not make."""
        try:
            current = os.lstat(self.path)
        except FileNotFoundError:
            return False
        if (current.st_dev, current.st_ino) != (self.device, self.inode):
            log.warning("%s is no longer the socket this process created; leaving it", self.path)
            return False
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        return True


def bind_unix_socket(path: str, mode: int = 0o600) -> socket.socket:
    """A listening unix socket at ``path`` with permissions ``mode`` (see :func:`create_unix_listener`)."""
    listener, _ = create_unix_listener(path, mode)
    return listener


def create_unix_listener(path: str, mode: int = 0o600) -> tuple[socket.socket, SocketFile]:
    """A listening unix socket at ``path`` with permissions ``mode``, and the file it made.

    An existing path that is not a socket (a regular file, a directory, a symlink, a FIFO) is refused; a
    socket nobody accepts on (stale, left by a dead server) is replaced; a live one is refused. The socket
    is bound inside a fresh 0700 directory of ours next to ``path``, chmod'ed there (nobody else can
    reach or swap it), then hard-linked to ``path``: a link never overwrites, so a file that appears at
    ``path`` meanwhile is refused rather than replaced, and the socket is never reachable with a wider
    mode than ``mode``.
    """
    existing = _lstat(path)
    if existing is not None:
        if not stat.S_ISSOCK(existing.st_mode):
            raise SocketPathError(f"{path} exists and is not a socket; refusing to replace it")
        if _socket_is_live(path):
            raise SocketPathError(f"{path} is in use by a running server")
        log.info("replacing stale socket %s", path)
        # Only the stale socket we just looked at; if something else takes its place before the link
        # below, the link fails and nothing is overwritten.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    directory = os.path.dirname(os.path.abspath(path))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    private: str | None = None
    try:
        # Short names: a path near the 108-byte limit of unix socket addresses should still fit.
        private = tempfile.mkdtemp(prefix=".", dir=directory)
        temporary = os.path.join(private, "s")
        # Linux gives the new socket file the socket inode's mode less the umask: never wider than mode.
        os.fchmod(listener.fileno(), mode)
        listener.bind(temporary)
        os.chmod(temporary, mode)  # exactly mode, whatever the umask took away; safe in our 0700 directory
        listener.listen(8)
        os.link(temporary, path)
        created = os.lstat(path)
    except OSError as exc:
        listener.close()
        if isinstance(exc, FileExistsError):
            message = f"{path} appeared while the socket was being created; not replacing it"
            raise SocketPathError(message) from None
        raise SocketPathError(f"cannot create socket {path}: {exc.strerror or exc}") from None
    finally:
        if private is not None:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(private, "s"))
            with contextlib.suppress(OSError):
                os.rmdir(private)
    return listener, SocketFile(path, created.st_dev, created.st_ino)


def _lstat(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise SocketPathError(f"cannot use {path}: {exc.strerror or exc}") from None


def _socket_is_live(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError as exc:
        raise SocketPathError(f"cannot tell whether {path} is in use: {exc.strerror or exc}") from None
    finally:
        probe.close()
    return True


__all__ = ["SocketFile", "SocketPathError", "bind_unix_socket", "create_unix_listener"]

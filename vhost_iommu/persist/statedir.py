"""The state directory: one subdirectory per guest (vhost-user socket), files 0600, nothing followed.

Everything is reached through directory fds (``openat`` semantics via ``dir_fd``) with ``O_NOFOLLOW``,
so a symlink planted in the directory, or a directory swapped for a symlink after the check, is refused
rather than followed. Files this module does not know are refused by name: a state directory holds what
the back-end wrote and nothing else, and a stray file is a sign of a mix-up (two back-ends, a wrong
path) better reported than ignored.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
from typing import Final

__all__ = ["GuestDir", "StateDir", "StateError"]


class StateError(Exception):
    """The state directory or a file in it cannot be used; the message names the file and the reason."""


_GUEST_NAME: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
"""A guest's subdirectory name: no separator, no leading dot (so never ``.`` or ``..``)."""

_DIR_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _check_dir(fd: int, what: str, refused_bits: int) -> None:
    info = os.fstat(fd)
    if not stat.S_ISDIR(info.st_mode):
        raise StateError(f"{what} is not a directory")
    if info.st_uid != os.geteuid():
        raise StateError(f"{what} belongs to uid {info.st_uid}, not to this process's uid {os.geteuid()}")
    if info.st_mode & refused_bits:
        raise StateError(f"{what} is open to other users (mode {stat.S_IMODE(info.st_mode):o})")


class StateDir:
    """The directory given with ``--state-dir``: created 0700 if missing, refused if it is a symlink,
    not ours, or writable by others. Its guests' subdirectories must be 0700."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        except OSError as exc:
            raise StateError(f"state directory {path}: {exc.strerror or exc}") from None
        try:
            self._fd = os.open(path, _DIR_FLAGS)
        except OSError as exc:
            raise StateError(
                f"state directory {path}: {exc.strerror or exc} (a symlink is refused)"
            ) from None
        try:
            # As the keeper checks it: others may not write it (the files in it are 0600 anyway).
            _check_dir(self._fd, f"state directory {path}", 0o022)
        except BaseException:
            os.close(self._fd)
            raise

    def guest(self, name: str) -> GuestDir:
        """The subdirectory of one guest (created 0700 if missing)."""
        if not _GUEST_NAME.fullmatch(name):
            raise StateError(f"guest name {name!r} is not a plain file name")
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o700, dir_fd=self._fd)
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=self._fd)
        except OSError as exc:
            raise StateError(
                f"state directory {self.path}/{name}: {exc.strerror or exc} (a symlink is refused)"
            ) from None
        try:
            _check_dir(fd, f"state directory {self.path}/{name}", 0o077)
        except BaseException:
            os.close(fd)
            raise
        return GuestDir(f"{self.path}/{name}", fd)

    def remove_guest(self, name: str) -> None:
        """Remove a guest's subdirectory and the files of ours in it (a session that ended for good)."""
        guest = self.guest(name)
        try:
            for entry in guest.names():
                guest.remove(entry)
        finally:
            guest.close()
        with contextlib.suppress(OSError):  # something not ours stayed in it: left for a person to see
            os.rmdir(name, dir_fd=self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class GuestDir:
    """One guest's directory; owns ``fd``."""

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self.fd = fd

    def names(self) -> list[str]:
        return sorted(os.listdir(self.fd))

    def open_new(self, name: str) -> int:
        """A new file, 0600; refused if anything (a symlink included) exists under ``name``."""
        try:
            return os.open(
                name,
                os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
                dir_fd=self.fd,
            )
        except OSError as exc:
            raise StateError(f"{self.path}/{name}: cannot create: {exc.strerror or exc}") from None

    def open_existing(self, name: str, *, writable: bool) -> tuple[int, int]:
        """(fd, size) of an existing regular file of ours; symlinks, FIFOs, devices, files of another
        user or open to others are refused (opened O_NONBLOCK so that a FIFO cannot block the check)."""
        flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        try:
            fd = os.open(name, flags, dir_fd=self.fd)
        except OSError as exc:
            raise StateError(f"{self.path}/{name}: {exc.strerror or exc} (a symlink is refused)") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise StateError(f"{self.path}/{name} is not a regular file")
            if info.st_uid != os.geteuid() or info.st_mode & 0o077:
                raise StateError(f"{self.path}/{name} is not a 0600 file of this process's user")
        except BaseException:
            os.close(fd)
            raise
        return fd, info.st_size

    def replace(self, source: str, target: str) -> None:
        os.rename(source, target, src_dir_fd=self.fd, dst_dir_fd=self.fd)

    def remove(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

"""Small rules for the fds a front-end hands the server (kick, call, err, transfer fds)."""

from __future__ import annotations

import fcntl
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from vhost_iommu.protocol import close_fds

log = logging.getLogger(__name__)

_EVENTFD_ONE = (1).to_bytes(8, sys.byteorder)


def set_nonblocking(fd: int) -> None:
    # The fd's open file description is shared with the front-end; eventfds from QEMU are already
    # non-blocking, and for anything else blocking would let a front-end hang our event loop.
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)


@contextmanager
def closed_on_error(fds: Sequence[int]) -> Iterator[None]:
    """Close ``fds`` if the block raises: until a handler has handed an fd on, it must not leak."""
    try:
        yield
    except BaseException:
        close_fds(fds)
        raise


def write_eventfd(fd: int, name: str, what: str) -> None:
    """Add one to an eventfd (a call, err or kick fd) of connection ``name``; a failure is logged."""
    try:
        os.write(fd, _EVENTFD_ONE)
    except BlockingIOError:
        pass  # the counter is saturated: the front-end has a notification pending anyway
    except OSError as exc:
        log.warning("%s: writing the %s failed: %s", name, what, exc)


__all__ = ["closed_on_error", "set_nonblocking", "write_eventfd"]

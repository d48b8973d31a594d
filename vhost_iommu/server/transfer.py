"""One device-state transfer (VHOST_USER_SET_DEVICE_STATE_FD) on the event loop.

The front-end hands the back-end one end of a pipe (or socket). Saving, the back-end writes the whole
state into it and closes it: the front-end reads until end of file. Loading, the front-end writes the
state and closes its end; the back-end reads until end of file and then loads what it read. Either way
the front-end then asks CHECK_DEVICE_STATE whether it all worked.

The fd is non-blocking and watched by the event loop, a chunk at a time, so a transfer of tens of
megabytes (a million mappings) never holds up the other connections of the process, and a front-end
that stops reading or writing stalls only its own transfer. A load reads at most ``limit`` bytes (what
the device could possibly restore): a front-end cannot make the back-end buffer without end.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable

from vhost_iommu.protocol import close_fds

log = logging.getLogger(__name__)

#: Bytes moved per read or write; a pipe holds 64 KiB by default.
CHUNK = 1 << 16
#: Reads or writes per wake-up before yielding to the rest of the loop.
_CHUNKS_PER_WAKEUP = 16


class StateTransfer:
    """Moves one state through ``fd`` (which it owns from now on, and closes when it ends).

    ``error`` is None while it runs and after success; ``done`` says whether it ended.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int, name: str, *, loading: bool) -> None:
        self._loop = loop
        self._fd: int | None = fd
        self.name = name
        self.loading = loading
        self.done = False
        self.error: str | None = None
        self.size = 0

    # -- the two directions -----------------------------------------------------------------------------

    @classmethod
    def save(cls, loop: asyncio.AbstractEventLoop, fd: int, data: bytes, name: str) -> StateTransfer:
        """Write ``data`` into ``fd``, then close it (the front-end's end of file)."""
        transfer = cls(loop, fd, name, loading=False)
        transfer._outgoing = memoryview(data)
        transfer.size = len(data)
        loop.add_writer(fd, transfer._on_writable)
        return transfer

    @classmethod
    def load(
        cls,
        loop: asyncio.AbstractEventLoop,
        fd: int,
        name: str,
        *,
        limit: int,
        apply: Callable[[bytes], None],
    ) -> StateTransfer:
        """Read ``fd`` to its end (at most ``limit`` bytes), then ``apply`` what came; ``apply`` raises
        ValueError naming what is wrong with the state."""
        transfer = cls(loop, fd, name, loading=True)
        transfer._incoming = bytearray()
        transfer._limit = limit
        transfer._apply = apply
        loop.add_reader(fd, transfer._on_readable)
        return transfer

    _outgoing: memoryview
    _incoming: bytearray
    _limit: int
    _apply: Callable[[bytes], None]

    # -- progress ---------------------------------------------------------------------------------------

    def _on_writable(self) -> None:
        fd = self._fd
        if fd is None:
            return
        for _ in range(_CHUNKS_PER_WAKEUP):
            try:
                written = os.write(fd, self._outgoing[:CHUNK])
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EPIPE: the front-end closed its end before reading everything
                self._end(f"writing the state failed after {self.size - len(self._outgoing)} bytes: {exc}")
                return
            self._outgoing = self._outgoing[written:]
            if not self._outgoing:
                self._end(None)
                return

    def _on_readable(self) -> None:
        for _ in range(_CHUNKS_PER_WAKEUP):
            if self._read_once() is not True:
                return

    def _read_once(self) -> bool | None:
        """One read: True if data came, False at end of file (the state is applied), None when the fd
        has nothing now or the transfer ended."""
        fd = self._fd
        if fd is None:
            return None
        try:
            chunk = os.read(fd, CHUNK)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:
            self._end(f"reading the state failed after {len(self._incoming)} bytes: {exc}")
            return None
        if not chunk:
            self._complete_load()
            return False
        if len(self._incoming) + len(chunk) > self._limit:
            self._end(f"the front-end sent more than {self._limit} bytes, more than any state of this device")
            return None
        self._incoming += chunk
        self.size = len(self._incoming)
        return True

    def _complete_load(self) -> None:
        data = bytes(self._incoming)
        self._incoming = bytearray()
        try:
            self._apply(data)
        except ValueError as exc:
            self._end(f"the state ({len(data)} bytes) was refused: {exc}")
            return
        except Exception as exc:
            log.exception("%s: loading the device state failed", self.name)
            self._end(f"loading the state failed: {exc!r}")
            return
        self._end(None)

    # -- ending -----------------------------------------------------------------------------------------

    def finish_now(self) -> None:
        """The front-end asks for the result (CHECK_DEVICE_STATE): it has finished its side, so whatever
        the fd still holds is read now; a transfer that cannot end now fails."""
        if self.done:
            return
        if self.loading:
            while (progress := self._read_once()) is True:
                pass
            if progress is False or self.done:
                return
            self._end("the front-end asked for the result before closing its end of the transfer fd")
            return
        self._end("the front-end asked for the result before reading the whole state")

    def cancel(self, reason: str) -> None:
        if not self.done:
            self._end(reason)

    def _end(self, error: str | None) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            self._loop.remove_reader(fd)
            self._loop.remove_writer(fd)
            close_fds([fd])
        self.done = True
        self.error = error
        if error is None:
            log.info("%s: device state transfer done (%d bytes)", self.name, self.size)
        else:
            log.warning("%s: device state transfer failed: %s", self.name, error)

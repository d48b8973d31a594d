"""Who watches a ring's kick fd: the event loop, or a back-end's own thread (``KickFdTaker``).

The event loop watches every started ring's kick fd. A back-end that can serve a ring from its own thread
is offered the kick fd (with the call fd) while the ring is served, and takes it or declines; the loop
stops watching a taken fd. Before anything changes what that thread touches (the ring, guest memory, the
kick or call fd, the device) the fd is taken back: when ``reclaim`` returns the thread has let go of the
ring, the loop watches the fd again, and the ring is looked at again for kicks the thread read but did
not act on (a held kick, ``server/rings.py``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from vhost_iommu.backend import KickFdTaker, VhostUserBackend
from vhost_iommu.server.vring import VringSlot


class KickCustody:
    """The kick fds of one connection's rings: watched on ``loop`` (``on_kick(index)`` when readable) or
    lent to ``backend`` when it is a KickFdTaker."""

    def __init__(
        self,
        backend: VhostUserBackend,
        loop: asyncio.AbstractEventLoop,
        on_kick: Callable[[int], None],
    ) -> None:
        self._backend = backend
        self._loop = loop
        self._on_kick = on_kick

    def watch(self, fd: int, index: int) -> None:
        """Have the loop watch ``fd`` as ring ``index``'s kick fd (raises OSError/ValueError if it cannot)."""
        self._loop.add_reader(fd, self._on_kick, index)

    def unwatch(self, fd: int) -> None:
        self._loop.remove_reader(fd)

    def offer(self, slot: VringSlot) -> None:
        """Let a back-end that can (KickFdTaker) watch the kick fd of a served ring itself."""
        fd = slot.kick_fd
        if slot.kick_taken or fd is None or not isinstance(self._backend, KickFdTaker):
            return
        if self._backend.takes_kick_fd(slot.index, fd, slot.call_fd):
            self._loop.remove_reader(fd)
            slot.kick_taken = True

    def reclaim(self, slot: VringSlot) -> None:
        """Take a kick fd back from the back-end (it has stopped touching the ring when this returns)."""
        if not slot.kick_taken:
            return
        slot.kick_taken = False
        assert isinstance(self._backend, KickFdTaker)
        self._backend.release_kick_fd(slot.index)
        if slot.kick_fd is not None:
            self.watch(slot.kick_fd, slot.index)
            # Kicks the back-end read but did not act on are not lost: the ring is looked at again.
            slot.phases.hold_kick()

    def replace_call_fd(self, slot: VringSlot, fd: int | None) -> None:
        """A new call fd for ``slot`` (before the old one is closed)."""
        if slot.kick_taken:
            # A back-end serving the ring from its own thread signals the call fd from there: it lets go
            # of the old fd before it is closed, and keeps its thread.
            assert isinstance(self._backend, KickFdTaker)
            self._backend.replace_call_fd(slot.index, fd)

    @contextmanager
    def released(self, slots: Sequence[VringSlot], refresh: Callable[[VringSlot], None]) -> Iterator[None]:
        """No back-end thread touches these rings, the memory or their notifiers inside the block;
        ``refresh`` offers the fds again (to the rings still served) after it."""
        for slot in slots:
            self.reclaim(slot)
        try:
            yield
        finally:
            for slot in slots:
                refresh(slot)


__all__ = ["KickCustody"]

"""The device-state requests of one connection: SET_DEVICE_STATE_FD and CHECK_DEVICE_STATE (migration).

Offered (VHOST_USER_PROTOCOL_F_DEVICE_STATE) only to back-ends that are ``MigratableBackend``s. State moves
only while every ring is stopped, through the front-end's fd (a pipe or socket, never one of ours), on the
event loop a chunk at a time (:class:`~vhost_iommu.server.transfer.StateTransfer`); a load is applied when
the fd reaches its end, refused if a ring started meanwhile, and CHECK_DEVICE_STATE reports the last
transfer (reading what is left of a load first). A new SET_DEVICE_STATE_FD, a device reset, the disconnect
or a move to another device worker abandons a running transfer (:meth:`DeviceStateRequests.drop`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
from collections.abc import Callable

from vhost_iommu.backend import MigratableBackend, VhostUserBackend
from vhost_iommu.protocol import U64, DeviceStateTransfer, Message, Payload
from vhost_iommu.protocol.constants import DEVICE_STATE_NOFD, DEVICE_STATE_SAVE
from vhost_iommu.server.errors import RequestFailed
from vhost_iommu.server.fds import closed_on_error, set_nonblocking
from vhost_iommu.server.transfer import StateTransfer

log = logging.getLogger(__name__)


class DeviceStateRequests:
    """The last device-state transfer of a connection and the two requests that drive it.

    ``running_rings()`` names the started rings (none may be, for a transfer to start or a load to apply).
    """

    def __init__(
        self,
        backend: VhostUserBackend,
        loop: asyncio.AbstractEventLoop,
        name: str,
        running_rings: Callable[[], list[int]],
    ) -> None:
        self._backend = backend
        self._loop = loop
        self._name = name
        self._running_rings = running_rings
        #: The last device-state transfer (SET_DEVICE_STATE_FD), running or ended.
        self.transfer: StateTransfer | None = None

    def drop(self, reason: str) -> None:
        """Abandon the last transfer (a running one is cancelled): CHECK_DEVICE_STATE has none to report."""
        if self.transfer is not None:
            self.transfer.cancel(reason)
            self.transfer = None

    def _migratable(self, what: str, negotiated: bool) -> MigratableBackend:
        if not negotiated:
            raise RequestFailed(f"{what} without VHOST_USER_PROTOCOL_F_DEVICE_STATE negotiated")
        assert isinstance(self._backend, MigratableBackend)  # only offered to such back-ends
        return self._backend

    def set_fd(self, message: Message, negotiated: bool) -> Payload:
        """SET_DEVICE_STATE_FD (``negotiated``: DEVICE_STATE was); the message's fd is owned from here."""
        with closed_on_error(message.fds):
            assert isinstance(message.payload, DeviceStateTransfer)
            # A new transfer replaces the last one, whatever becomes of it: CHECK_DEVICE_STATE answers
            # for this one only.
            self.drop("replaced by a new SET_DEVICE_STATE_FD")
            backend = self._migratable("SET_DEVICE_STATE_FD", negotiated)
            running = self._running_rings()
            if running:
                # vhost-user.rst: the only phase is "stopped", the device suspended. A state saved while
                # the guest is still served would not be the state it ends up in.
                raise RequestFailed(
                    f"SET_DEVICE_STATE_FD while ring(s) {running} run: stop every ring (GET_VRING_BASE) first"
                )
            fd = message.fds[0]
            kind = stat.S_IFMT(os.fstat(fd).st_mode)
            if kind not in (stat.S_IFIFO, stat.S_IFSOCK):
                raise RequestFailed("SET_DEVICE_STATE_FD: the transfer fd must be a pipe or a socket")
            set_nonblocking(fd)
            name = self._name
            try:
                if message.payload.direction == DEVICE_STATE_SAVE:
                    try:
                        data = backend.save_state()
                    except ValueError as exc:
                        raise RequestFailed(
                            f"SET_DEVICE_STATE_FD: the state cannot be saved: {exc}"
                        ) from None
                    self.transfer = StateTransfer.save(self._loop, fd, data, name)
                else:
                    self.transfer = StateTransfer.load(
                        self._loop, fd, name, limit=backend.max_state_size(), apply=self._load_state
                    )
            except (OSError, ValueError) as exc:  # the loop cannot watch this fd
                raise RequestFailed(
                    f"SET_DEVICE_STATE_FD: the transfer fd cannot be watched: {exc}"
                ) from None
        log.info(
            "%s: device state transfer started (%s)",
            self._name,
            "save" if message.payload.direction == DEVICE_STATE_SAVE else "load",
        )
        return U64(DEVICE_STATE_NOFD)  # success, and the front-end's own fd is the channel

    def _load_state(self, data: bytes) -> None:
        running = self._running_rings()
        if running:
            raise ValueError(f"ring(s) {running} were started during the transfer")
        assert isinstance(self._backend, MigratableBackend)  # the transfer began through _migratable
        self._backend.load_state(data)

    def check(self, negotiated: bool) -> Payload:
        """CHECK_DEVICE_STATE: the last transfer's result (a load still reading is read to its end first)."""
        self._migratable("CHECK_DEVICE_STATE", negotiated)
        transfer = self.transfer
        if transfer is None:
            raise RequestFailed("CHECK_DEVICE_STATE: no device state transfer to check")
        transfer.finish_now()
        if transfer.error is not None:
            raise RequestFailed(f"CHECK_DEVICE_STATE: the transfer failed: {transfer.error}")
        return U64(0)


__all__ = ["DeviceStateRequests"]

"""The seam between the vhost-user machinery and a device.

The server (``vhost_iommu.server``) owns sockets, fds, the protocol state machine, guest memory and the
ring state of every queue. A device implements :class:`VhostUserBackend` and never touches sockets; it
talks back to the server only through the :class:`BackendContext` it is given.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from vhost_iommu.memory import GuestMemory
    from vhost_iommu.virtqueue import SplitQueue


class BackendContext(Protocol):
    """What the server lends a back-end for the life of one connection."""

    @property
    def memory(self) -> GuestMemory:
        """The guest memory as the front-end last described it."""
        ...

    def queue(self, index: int) -> SplitQueue | None:
        """The ring of queue ``index`` while it is started, else None."""
        ...

    def signal_used(self, index: int) -> None:
        """Write queue ``index``'s call eventfd (the caller has decided a notification is due)."""
        ...

    def reschedule(self, index: int) -> None:
        """Call ``queue_kicked(index)`` again soon, after the event loop has served every other ready
        connection, if the queue is still served then. A back-end bounds the work of one call with it
        (the loop is shared by every connection) instead of looping until its ring is empty. Repeated
        calls before the loop gets there give one call."""
        ...

    def config_changed(self) -> None:
        """Tell the front-end that the config space changed (VHOST_USER_BACKEND_CONFIG_CHANGE_MSG)."""
        ...

    def device_broken(self, reason: str) -> None:
        """Enter NEEDS_RESET: set the status bit, signal the error fds, stop serving the queues."""
        ...

    def offer_kick_fds(self) -> None:
        """Offer a `KickFdTaker` the kick fds of the served queues again (it declined one it can
        take now); nothing for a back-end that is not one."""
        ...

    @property
    def session_key(self) -> str | None:
        """A name of this vhost-user connection that stays the same when a new device worker takes it
        over (``serve --state-dir``: a file-name-safe token such as ``conn-3``, unique within the keeper's
        life); None when the connection is served without a keeper and nothing outlives the process."""
        ...


class VhostUserBackend(Protocol):
    """A device served over vhost-user. Methods are called from the event loop, one at a time."""

    num_queues: int
    max_queue_size: int

    def device_features(self) -> int:
        """Virtio feature bits offered (device and ring bits; the server adds PROTOCOL_FEATURES)."""
        ...

    def set_features(self, acked: int) -> None:
        """The driver's accepted feature bits (PROTOCOL_FEATURES bit stripped)."""
        ...

    @property
    def config_size(self) -> int: ...

    def get_config(self, offset: int, size: int) -> bytes:
        """Read ``size`` bytes of config space at ``offset``; raises ValueError when out of range."""
        ...

    def set_config(self, offset: int, data: bytes) -> None:
        """Write config space; raises ValueError for a write the device refuses."""
        ...

    def attach(self, context: BackendContext) -> None:
        """Called once per connection before any other call but the feature queries."""
        ...

    def detach(self) -> None:
        """The connection has ended (called once, last, after the final ``reset``): drop the context and
        anything else of the connection's, which is released by then (rings, guest memory, fds)."""
        ...

    def memory_changed(self) -> None:
        """The memory table changed (SET_MEM_TABLE, ADD/REM_MEM_REG)."""
        ...

    def queue_started(self, index: int) -> None:
        """Queue ``index`` is started and enabled: buffers may already be waiting."""
        ...

    def queue_stopped(self, index: int) -> None:
        """Queue ``index`` is being stopped (GET_VRING_BASE) or disabled. Called while ``context.queue``
        still returns the ring, so that held chains can be returned; after it, the ring is not touched."""
        ...

    def queue_kicked(self, index: int) -> None:
        """The driver made buffers available on a started, enabled queue."""
        ...

    def reset(self) -> None:
        """Device reset: back to the initial state. Called for RESET_DEVICE, SET_STATUS 0, and when the
        rings restart at a new layout after a stop (how a guest reset shows with QEMU's generic device).
        RESET_OWNER only disables the rings (vhost-user.rst); a disconnect drops the whole back-end."""
        ...


@runtime_checkable
class MigratableBackend(Protocol):
    """An optional capability of a back-end: its device state can travel with a migration
    (VHOST_USER_PROTOCOL_F_DEVICE_STATE, offered only by back-ends that have it).

    The server calls these only while every ring is stopped, from the event loop, and does the
    transfer itself (the fd, the pipe I/O, CHECK_DEVICE_STATE): the back-end only turns its state into
    bytes and back.
    """

    def save_state(self) -> bytes:
        """The whole device state, in a form ``load_state`` of the same back-end type takes."""
        ...

    def load_state(self, data: bytes) -> None:
        """Replace the device state with a saved one. ``data`` comes from the front-end: raise ValueError
        naming what is wrong with it, and leave the state exactly as it was."""
        ...

    def max_state_size(self) -> int:
        """Bytes past which a state being loaded cannot be valid (the server stops reading there)."""
        ...


@runtime_checkable
class KickFdTaker(Protocol):
    """An optional capability of a back-end: serving a queue from its own thread, woken by the queue's
    kick fd directly instead of by the event loop, and signalling the queue's call fd from there.

    The server offers the kick fd (with the call fd) of a queue while the queue is served (started,
    enabled, device not broken); a back-end that takes it must stop watching it, and stop touching that
    queue's ring, guest memory and the queue's call fd, before ``release_kick_fd`` returns. The server
    releases a taken fd before it stops or disables the queue, changes the memory table, replaces the
    queue's kick fd, resets the device, and at disconnect, and offers it again afterwards where the queue
    is still served. A new call fd is handed over with ``replace_call_fd`` instead. Between the two,
    ``queue_kicked`` for that queue may still be called (a held kick, a reschedule): the back-end hands
    it to its thread. The fds stay the server's: the back-end never closes them.
    """

    def takes_kick_fd(self, index: int, fd: int, call_fd: int | None) -> bool:
        """Whether the back-end watches ``fd`` itself from now on (False: the server keeps watching),
        notifying through ``call_fd`` (None: the front-end set none)."""
        ...

    def release_kick_fd(self, index: int) -> None:
        """Stop watching the fd taken for queue ``index``; returns when nothing of the back-end's
        touches the queue any more (its thread has been joined)."""
        ...

    def replace_call_fd(self, index: int, fd: int | None) -> None:
        """Notify queue ``index`` through ``fd`` from now on (None: not at all); when this returns the
        back-end no longer writes the previous call fd, which the server then closes."""
        ...


@runtime_checkable
class RestorableBackend(Protocol):
    """An optional capability of a back-end: taking over a live connection after a device-worker restart.

    With ``serve --state-dir`` the vhost-user connection outlives the device worker (vhost_iommu.keeper).
    A new worker rebuilds the server's side of the session (features, memory, every ring at its
    addresses) from what the keeper kept, without writing anything the guest sees, then, before any kick
    is served: ``attach``, ``set_features`` (the acked features), the SET_CONFIG writes of the session
    replayed through ``set_config``, ``memory_changed``, then ``session_restored()``, then
    ``queue_restored(index)`` for each started ring, then ``queue_started`` for the served ones and one
    ``queue_kicked`` each (kicks sent meanwhile wait in the eventfd counters). A back-end without this
    capability gets the same calls but these two: it starts from its initial state, as after a reset.
    """

    def session_restored(self) -> None:
        """Restore the device state persisted for ``context.session_key`` (domains, mappings, ...)."""
        ...

    def queue_restored(self, index: int) -> None:
        """Queue ``index`` was started when the previous worker died; ``context.queue(index)`` is its
        ring with ``next_avail`` set to the used ring's index as found in guest memory (every chain the
        device had not completed is served again). A back-end that knows better (a journal of requests
        applied but not yet completed) sets ``next_avail`` and completes those chains here, exactly once.
        """
        ...


@runtime_checkable
class SessionLifecycle(Protocol):
    """An optional capability of a back-end served by a keeper (``serve --state-dir``)."""

    def session_suspended(self) -> None:
        """The worker hands the connection to a new worker (an upgrade) at a quiescent point: no message
        or batch is being handled and none will be; persist what the next worker must find. Neither
        ``reset`` nor ``queue_stopped`` follows: the device keeps running in the next worker."""
        ...

    def session_ended(self) -> None:
        """The front-end disconnected for good (called before the final ``reset``): what was persisted
        for this session will never be restored."""
        ...

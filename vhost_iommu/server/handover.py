"""A connection's session handed from one device worker to the next (``serve --state-dir``).

:func:`export_session` turns a handler's protocol session into :class:`~vhost_iommu.server.session.
SessionState` (data, fds named by the keeper's ids) after every message it handles; :func:`restore_session`
rebuilds that state in a fresh handler of the next worker; :func:`suspend` stops a worker serving a session
it hands on (an upgrade) without ending it. ``server/session.py`` is the session's encoded form.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from vhost_iommu.backend import RestorableBackend, SessionLifecycle
from vhost_iommu.memory import GuestMemoryError, MemoryRegionDesc
from vhost_iommu.protocol import (
    VHOST_USER_F_PROTOCOL_FEATURES,
    ProtocolFeature,
    VringAddress,
    close_fds,
)
from vhost_iommu.server.backend_channel import BackendChannel
from vhost_iommu.server.errors import RequestFailed
from vhost_iommu.server.fds import set_nonblocking, write_eventfd
from vhost_iommu.server.rings import RingEvent
from vhost_iommu.server.session import RegionState, RingState, SessionError, SessionState
from vhost_iommu.server.vring import VringSlot
from vhost_iommu.virtqueue import QueueError

if TYPE_CHECKING:
    from vhost_iommu.server.handler import ConnectionHandler

log = logging.getLogger(__name__)


def export_session(
    handler: ConnectionHandler,
    fd_id: Callable[[int], int | None],
    region_fd_id: Callable[[MemoryRegionDesc], int | None],
) -> SessionState:
    """The protocol session as data, fds named by the keeper's ids (``fd_id`` of a local fd number,
    ``region_fd_id`` of a memory region). Raises SessionError for an fd the keeper never numbered."""

    def named(fd: int | None, what: str) -> int | None:
        if fd is None:
            return None
        found = fd_id(fd)
        if found is None:
            raise SessionError(f"{what}: fd {fd} has no keeper id")
        return found

    regions = []
    for region in handler.memory.regions:
        desc = region.desc
        found = region_fd_id(desc)
        if found is None:
            raise SessionError(f"memory region {desc}: no keeper id for its fd")
        regions.append(
            RegionState(desc.guest_phys_addr, desc.memory_size, desc.userspace_addr, desc.mmap_offset, found)
        )
    rings = []
    for slot in handler.slots:
        stopped = slot.stopped_layout
        rings.append(
            RingState(
                size=slot.size,
                address=_address_tuple(slot.address),
                base=slot.base,
                enabled=slot.enabled,
                started=slot.started,
                kick=named(slot.kick_fd, f"kick fd of ring {slot.index}"),
                call=named(slot.call_fd, f"call fd of ring {slot.index}"),
                err=named(slot.err_fd, f"err fd of ring {slot.index}"),
                stopped_layout=None
                if stopped is None
                else (stopped[0], stopped[1], _address_tuple(stopped[2])),
            )
        )
    channel = handler.channel.fileno() if handler.channel is not None and handler.channel.open else None
    return SessionState(
        acked_features=handler.acked_features,
        protocol_features=int(handler.protocol_features),
        owner=handler.owner,
        status=handler.status,
        broken_reason=handler.broken_reason,
        config_change_pending=handler.config_change_pending,
        config_writes=tuple(handler.config_writes),
        regions=tuple(regions),
        channel=named(channel, "back-end channel"),
        rings=tuple(rings),
    )


def restore_session(handler: ConnectionHandler, state: SessionState, fds: Mapping[int, int]) -> None:
    """Take over a session a previous worker exported; ``fds`` maps its fd ids to fds of this process,
    all of which this call owns (installed or closed, whatever happens).

    Nothing the guest sees is written but what any ring start writes (notifications re-enabled): each
    started ring is rebuilt at its addresses with ``next_avail`` = the used ring's index in guest memory,
    then the back-end is told (see :class:`~vhost_iommu.backend.RestorableBackend`) and each served ring
    is served once, for the kicks that arrived while no worker was there.
    Raises SessionError if the session does not fit this device.
    """
    backend = handler.backend
    used: set[int] = set()
    try:
        if len(state.rings) != len(handler.slots):
            raise SessionError(f"session has {len(state.rings)} rings, the device {len(handler.slots)}")
        unknown = state.protocol_features & ~int(handler.offered_protocol_features())
        if unknown or state.acked_features & ~handler.offered_features():
            raise SessionError("session negotiated features this device does not offer")
        handler.owner = state.owner
        handler.acked_features = state.acked_features  # the rings are built with its EVENT_IDX
        handler.protocol_features = ProtocolFeature(state.protocol_features)
        handler.status = state.status
        handler.config_change_pending = state.config_change_pending

        def take(fd_id: int) -> int:
            if fd_id not in fds or fd_id in used:
                raise SessionError(f"session references fd id {fd_id}, which was not handed over")
            used.add(fd_id)
            return fds[fd_id]

        regions = [
            (
                MemoryRegionDesc(r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset),
                take(r.fd),
            )
            for r in state.regions
        ]
        handler.memory.replace(regions)  # closes those fds whatever happens
        if state.channel is not None:
            sock = socket.socket(fileno=take(state.channel))
            handler.channel = BackendChannel(sock, handler.loop, handler.name)
        for slot, ring in zip(handler.slots, state.rings, strict=True):
            _restore_ring(handler, slot, ring, take)
    finally:
        close_fds(fd for fd_id, fd in fds.items() if fd_id not in used)
    backend.set_features(handler.acked_features & ~VHOST_USER_F_PROTOCOL_FEATURES)
    for offset, data in state.config_writes:
        try:
            backend.set_config(offset, data)
        except ValueError as exc:
            log.warning("%s: a SET_CONFIG of the session is refused now: %s", handler.name, exc)
            continue
        handler.remember_config_write(offset, data)
    backend.memory_changed()
    handler.broken_reason = state.broken_reason
    if isinstance(backend, RestorableBackend):
        backend.session_restored()
        for slot in handler.slots:
            if slot.queue is not None:
                handler.call_backend(backend.queue_restored, slot.index)
    for slot in handler.slots:
        handler.refresh(slot)
    for slot in handler.slots:
        if handler.serving(slot) and not slot.kick_taken:
            handler.call_backend(backend.queue_kicked, slot.index)
        elif handler.serving(slot):
            # A back-end serving the ring from its thread is woken through its kick fd.
            assert slot.kick_fd is not None
            write_eventfd(slot.kick_fd, handler.name, f"kick fd of ring {slot.index}")


def _restore_ring(
    handler: ConnectionHandler, slot: VringSlot, ring: RingState, take: Callable[[int], int]
) -> None:
    slot.size = ring.size
    slot.address = None if ring.address is None else VringAddress(slot.index, *ring.address)
    slot.base = ring.base
    slot.phases.apply(RingEvent.ENABLE if ring.enabled else RingEvent.DISABLE)
    if ring.stopped_layout is not None:
        size, base, address = ring.stopped_layout
        at = None if address is None else VringAddress(slot.index, *address)
        slot.stopped_layout = (size, base, at)
    for which in ("call", "err"):
        fd_id = getattr(ring, which)
        if fd_id is not None:
            fd = take(fd_id)
            slot.replace_fd(which, fd)
            set_nonblocking(fd)
    if not ring.started or ring.kick is None:
        return
    kick = take(ring.kick)
    slot.replace_fd("kick", kick)
    set_nonblocking(kick)
    handler.kicks.watch(kick, slot.index)
    try:
        queue = handler.make_queue(slot)
    except (RequestFailed, QueueError, GuestMemoryError) as exc:
        handler.device_broken(f"ring {slot.index} cannot be taken over: {exc}")
        return
    # What the device completed is what the used ring says; everything after it is served again
    # (a RestorableBackend moves this where its journal knows better: queue_restored).
    queue.next_avail = queue.used_idx
    slot.queue = queue
    slot.phases.apply(RingEvent.START)


def suspend(handler: ConnectionHandler) -> None:
    """Stop serving without ending the session (an upgrade hands it to a new worker): kick threads
    joined, no fd watched, the back-end told (SessionLifecycle.session_suspended); no reset, no
    queue_stopped: the device goes on in the next worker."""
    if handler.closed:
        return
    handler.closed = True
    # A device-state transfer does not move to the next worker: it ends here, and the front-end's
    # CHECK_DEVICE_STATE (answered by the next worker, which has none) fails.
    handler.device_state.drop("the connection moved to another device worker")
    for slot in handler.slots:
        handler.kicks.reclaim(slot)
        slot.rescheduled = False
        if slot.kick_fd is not None:
            handler.kicks.unwatch(slot.kick_fd)
    if handler.channel is not None:
        handler.channel.close()
        handler.channel = None
    if isinstance(handler.backend, SessionLifecycle):
        handler.backend.session_suspended()


def _address_tuple(address: VringAddress | None) -> tuple[int, int, int, int, int] | None:
    if address is None:
        return None
    return (address.flags, address.descriptor, address.used, address.available, address.log)


__all__ = ["export_session", "restore_session", "suspend"]

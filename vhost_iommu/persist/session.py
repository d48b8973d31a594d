"""A back-end's journaling under ``serve --state-dir`` (docs/persistence.md): what goes into the journal,
when a new generation starts behind a snapshot, and how a worker that takes a session over rebuilds it.

`SessionJournal` is the one owner of a connection's persisted state in a device worker. The back-end
(`vhost_iommu.virtio_iommu.VirtioIommuBackend`) calls it at each event that changes the device (features,
config writes, resets, ring starts, tools' changes) and for every request it serves, before the request
is published; the compiled kernel appends to the same journal (``JournalHost.journal_changed`` hands it
over). It reaches the back-end only through the small `JournalHost` interface.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import AbstractContextManager
from typing import Protocol

from vhost_iommu.abi import EVENT_QUEUE, J_NO_STATUS, J_QUEUE_SHIFT, REQUEST_QUEUE, T_PROBE
from vhost_iommu.device import IommuDevice, ReservedRegion
from vhost_iommu.persist.image import RingPosition, capture
from vhost_iommu.persist.journal import F_FORCED, KIND_BYPASS, KIND_FEATURES, Journal, request_words
from vhost_iommu.persist.persistence import Persistence
from vhost_iommu.persist.replay import Recovered, recover
from vhost_iommu.persist.statedir import StateDir, StateError
from vhost_iommu.virtqueue import SplitQueue

log = logging.getLogger(__name__)


class JournalHost(Protocol):
    """What a `SessionJournal` needs of its back-end."""

    device: IommuDevice
    acked_features: int

    def ring(self, index: int) -> SplitQueue | None:
        """The ring of queue ``index`` while it is started."""
        ...

    def journal_writers_parked(self) -> AbstractContextManager[None]:
        """Inside the block nothing else appends to the journal (the requestq thread is parked)."""
        ...

    def journal_changed(self, journal: Journal | None) -> None:
        """The journal every served request goes into from now on (the compiled kernel's too)."""
        ...

    def apply_features(self, acked: int) -> None: ...

    def reset_device(self) -> None: ...

    def signal(self, index: int) -> None:
        """Notify the driver of used buffers on queue ``index``."""
        ...


class SessionJournal:
    """The persisted state of one connection's device, in ``state_dir``'s subdirectory for its session."""

    def __init__(self, host: JournalHost, state_dir: StateDir, session_key: str, slots: int) -> None:
        self._host = host
        self._state_dir = state_dir
        self.persistence: Persistence | None = Persistence(state_dir.guest(session_key), slots=slots)
        #: Until a live-session event or ``restore`` decides it, nothing is journaled: the calls a
        #: restoring worker gets first (set_features, set_config) come in a new session too.
        self._decided = False
        self._journaled_bypass = -1
        self._journaled_regions: list[tuple[ReservedRegion, ...]] = []
        self._recovered: Recovered | None = None

    @property
    def live(self) -> bool:
        """Whether this session journals (a new one started, or a taken-over one restored)."""
        return self.persistence is not None and self._decided

    # -- the live session -------------------------------------------------------------------------------

    def _start(self) -> None:
        assert self.persistence is not None
        self._decided = True
        self._host.journal_changed(self.persistence.start_fresh())
        if self._host.acked_features:
            self.log(KIND_FEATURES, self._host.acked_features)
        self._journaled_bypass = -1
        self.log_bypass()
        self._journaled_regions = list(self._host.device.domain_table.endpoint_regions)
        if self._journaled_regions != self._topology_regions():
            self.rotate()  # overrides set before the first request: only a snapshot holds them

    def _topology_regions(self) -> list[tuple[ReservedRegion, ...]]:
        device = self._host.device
        return [device.topology.reserved_regions(int(e)) for e in device.domain_table.endpoint_ids]

    def with_room(self, *, live: bool = True) -> Journal | None:
        """The journal with a free record, or None when nothing is journaled. ``live``: the caller's event
        happens only in a live session, so an undecided session starts a new one (erasing its
        subdirectory); otherwise an undecided session journals nothing."""
        persistence = self.persistence
        if persistence is None:
            return None
        if not self._decided:
            if not live:
                return None
            self._start()
        assert persistence.journal is not None
        if persistence.journal.full:
            self.rotate()
        return persistence.journal

    def log(self, kind: int, value: int, *, queue: int = 0, live: bool = True) -> None:
        """Journal a state change (``KIND_*``): rare events (features, config writes, ring starts)."""
        # The journal has one writer at a time: a requestq thread in its kernel appends too.
        with self._host.journal_writers_parked():
            journal = self.with_room(live=live)
            if journal is not None:
                journal.append(kind | queue << J_QUEUE_SHIFT, value)

    def log_request(
        self,
        journal: Journal,
        ring: SplitQueue,
        head: int,
        request: bytes,
        response: bytes,
        used_length: int,
        *,
        forced: bool,
    ) -> None:
        """Commit a request served through the device core, before its used entry is pushed: what the
        guest sees completed is in the journal."""
        word1, word2 = request_words(
            response[used_length - 4] if used_length >= 4 else J_NO_STATUS,
            used_length,
            (ring.next_avail - 1) & 0xFFFF,
            ring.used_idx,
            head,
            F_FORCED if forced else 0,
        )
        journal.append(word1, word2, request)

    def log_tool_changes(self) -> None:
        """Journal what a tool (the control channel) changed: tools change the device on the event loop,
        with the requestq thread parked, and the back-end calls this on the way out (and before every
        serve from the loop). Reserved-region overrides are not records: a snapshot holds them, so a
        change starts a new generation. A first serve starts an undecided session here."""
        self.log_bypass()
        regions = self._host.device.domain_table.endpoint_regions
        if regions != self._journaled_regions and self.with_room() is not None:
            self.rotate()

    def log_bypass(self, *, live: bool = True) -> None:
        bypass = self._host.device.config.bypass
        if bypass != self._journaled_bypass and self.with_room(live=live) is not None:
            self.log(KIND_BYPASS, bypass)
            self._journaled_bypass = bypass

    def _ring_position(self, index: int) -> RingPosition | None:
        ring = self._host.ring(index)
        return None if ring is None else RingPosition(ring.next_avail, ring.used_idx)

    def rotate(self) -> None:
        """The journal is full (or a snapshot must hold a change): snapshot the state it leads to and
        continue in a new one. Called between chains, when everything served has been published."""
        persistence = self.persistence
        assert persistence is not None
        image = capture(
            self._host.device,
            self._host.acked_features,
            (self._ring_position(REQUEST_QUEUE), self._ring_position(EVENT_QUEUE)),
            persistence.generation + 1,
        )
        self._host.journal_changed(persistence.rotate(image))
        self._journaled_regions = list(self._host.device.domain_table.endpoint_regions)

    # -- a session taken over ---------------------------------------------------------------------------

    def restore(self) -> None:
        """Rebuild the device from the subdirectory (snapshot, then the journal's records). Raises
        StateError, naming the file and record, when the state cannot be trusted or does not fit."""
        persistence = self.persistence
        if persistence is None:
            return
        if self._decided:
            raise StateError(f"{persistence.directory.path}: session_restored after the session went live")
        self._decided = True
        began = time.perf_counter()
        try:
            loaded = persistence.load()
        except StateError:
            if persistence.directory.names():
                raise
            # The previous worker died before it journaled anything: there is nothing to restore.
            log.warning("%s: no persisted state; starting empty", persistence.directory.path)
            self._start()
            self._recovered = None
            return
        device = self._host.device
        self._recovered = recover(device, loaded, self._host.apply_features, self._host.reset_device)
        self._journaled_bypass = device.config.bypass
        self._journaled_regions = list(device.domain_table.endpoint_regions)
        self._host.journal_changed(persistence.journal)
        log.info(
            "%s: state restored in %.3f s (%d records, %d replayed, %d mappings)",
            persistence.directory.path,
            time.perf_counter() - began,
            len(loaded.records),
            self._recovered.replayed,
            device.store.count(),
        )

    def queue_restored(self, index: int) -> None:
        """Ring ``index`` of a taken-over session is set up again: put its indices where the journal says,
        and complete from their records the requests that were served but not yet published (their used
        entries never reached the guest); they are not executed again."""
        recovered = self._recovered
        ring = self._host.ring(index)
        if ring is None or recovered is None or index in recovered.restored:
            return
        recovered.restored.add(index)
        position = recovered.rings[index]
        if position is None:
            log.warning("queue %d restored with no journaled position: serving from its used index", index)
            ring.next_avail = ring.used_idx
            return
        published = ring.used_idx  # what the guest has seen: the used index in guest memory
        if index == EVENT_QUEUE:
            # Buffers popped and not used were lost with the worker: pop them again.
            ring.next_avail = (published + position.next_avail - position.used_idx) & 0xFFFF
            return
        unpublished = (position.used_idx - published) & 0xFFFF
        pending = recovered.requests
        if unpublished > min(len(pending), ring.size):
            raise StateError(
                f"requestq: the guest's used index {published} is {unpublished} entries behind the journal's "
                f"{position.used_idx}, more than the {len(pending)} journaled requests"
            )
        records = list(pending)[len(pending) - unpublished :]
        ring.next_avail = records[0].avail_pos if records else position.next_avail
        for record in records:
            chain = ring.pop()
            if chain is None or chain.head != record.head or ring.used_idx != record.used_pos:
                raise StateError(
                    f"requestq: the chain at ring position {record.avail_pos} is not the journaled one "
                    f"(head {record.head})"
                )
            if record.request[0] == T_PROBE and record.used_length:  # PROBE changes nothing: answer again
                response, used_length = self._host.device.handle_request(
                    chain.read(), chain.writable_len, observed=False
                )
                chain.write(response)
            elif record.used_length:
                used_length = record.used_length
                chain.write(bytes((record.status, 0, 0, 0)), used_length - 4)
            else:
                used_length = 0
            ring.push_used(chain.head, used_length)
        if records and ring.needs_notification():
            self._host.signal(REQUEST_QUEUE)

    def ended(self) -> None:
        """The front-end is gone for good: its state will never be restored; the subdirectory goes."""
        persistence, self.persistence = self.persistence, None
        if persistence is not None:
            name = os.path.basename(persistence.directory.path)
            persistence.close()
            self._state_dir.remove_guest(name)
        self._host.journal_changed(None)

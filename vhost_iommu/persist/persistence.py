"""One guest's persisted state: which files exist, how a journal is rotated, how the state is loaded.

Files of a guest directory (``G`` a generation, 16 hex digits):

``snapshot-G``      the state every record of ``journal-G`` applies to (absent for generation 0: the
                    initial state)
``journal-G``       the records since that snapshot
``snapshot-G.tmp``  a snapshot being written (left by a kill: removed unread)

Rotation when ``journal-G`` is full: ``snapshot-(G+1)`` is written to its ``.tmp`` name and renamed into
place, then ``journal-(G+1)`` is created, then generation G's files are removed. Whatever instant the
worker dies at, the newest snapshot and its journal (or none yet: an empty one) describe the state.
Renames are not fsynced: this survives a worker's death, not the machine's (docs/persistence.md).
"""

from __future__ import annotations

import logging
import os
import re
import weakref
from typing import Final

from vhost_iommu.persist import image as images
from vhost_iommu.persist.journal import DEFAULT_SLOTS, MAX_SLOTS, Journal, Record, journal_name
from vhost_iommu.persist.statedir import GuestDir, StateError

__all__ = ["Loaded", "Persistence"]

log = logging.getLogger(__name__)

_FILE: Final = re.compile(r"(snapshot|journal)-([0-9a-f]{16})(\.tmp)?")
MAX_SNAPSHOT_BYTES: Final = 1 << 36
"""64 GiB: far above any table a guest may build (the mapping limit bounds it), far below what
reading a hostile size would do to the process."""


def snapshot_name(generation: int) -> str:
    return f"snapshot-{generation:016x}"


class Loaded:
    """What a state directory held: the snapshot (None: the initial state) and the journal's records."""

    def __init__(
        self, snapshot: images.DeviceImage | None, records: list[Record], where: str, snapshot_where: str
    ) -> None:
        self.snapshot = snapshot
        self.records = records
        self.where = where
        self.snapshot_where = snapshot_where


class Persistence:
    """The files of one guest's directory, and its open journal once ``start_fresh`` or ``load`` ran."""

    def __init__(self, directory: GuestDir, *, slots: int = DEFAULT_SLOTS) -> None:
        self.directory = directory
        self.slots = slots
        self.journal: Journal | None = None
        self.generation = 0
        self._finalizer = weakref.finalize(self, directory.close)

    def close(self) -> None:
        if self.journal is not None:
            self.journal.close()
            self.journal = None
        self._finalizer()

    def _scan(self) -> dict[tuple[str, bool], list[int]]:
        found: dict[tuple[str, bool], list[int]] = {}
        for name in self.directory.names():
            match = _FILE.fullmatch(name)
            if match is None:
                raise StateError(
                    f"{self.directory.path}: unexpected file {name!r} (not written by vhost-iommu)"
                )
            found.setdefault((match[1], bool(match[3])), []).append(int(match[2], 16))
        return found

    def start_fresh(self) -> Journal:
        """A new session: whatever an earlier one left is removed, journal 0 starts empty."""
        found = self._scan()
        if self.journal is not None:
            self.journal.close()
            self.journal = None
        for (kind, tmp), generations in found.items():
            for generation in generations:
                name = (snapshot_name if kind == "snapshot" else journal_name)(generation)
                self.directory.remove(name + (".tmp" if tmp else ""))
        self.generation = 0
        self.journal = Journal.create(self.directory, 0, self.slots)
        return self.journal

    def load(self) -> Loaded:
        """The newest snapshot and the committed records of its journal; the journal stays open for
        appending after them. StateError when there is no state or it cannot be trusted."""
        found = self._scan()
        for generation in found.get(("snapshot", True), []):
            self.directory.remove(snapshot_name(generation) + ".tmp")
        snapshots = sorted(found.get(("snapshot", False), []))
        journals = sorted(found.get(("journal", False), []))
        if found.get(("journal", True)):
            raise StateError(
                f"{self.directory.path}: a journal .tmp file is not something vhost-iommu writes"
            )
        if not snapshots and not journals:
            raise StateError(f"{self.directory.path}: no persisted state to restore")
        generation = snapshots[-1] if snapshots else 0
        snapshot = None
        if snapshots:
            snapshot = self._read_snapshot(generation)
        elif 0 not in journals:
            raise StateError(f"{self.directory.path}: journals {journals} without a snapshot to start from")
        if any(g > generation for g in journals):
            raise StateError(f"{self.directory.path}: a journal newer than the newest snapshot")
        if generation in journals:
            journal = Journal.open(self.directory, generation)
        else:
            journal = Journal.create(self.directory, generation, self.slots)  # killed before creating it
        self.journal = journal
        self.generation = generation
        for old in snapshots[:-1]:
            self.directory.remove(snapshot_name(old))
        for old in journals:
            if old < generation:
                self.directory.remove(journal_name(old))
        return Loaded(
            snapshot,
            journal.read(),
            f"{self.directory.path}/{journal.name}",
            f"{self.directory.path}/{snapshot_name(generation)}",
        )

    def _read_snapshot(self, generation: int) -> images.DeviceImage:
        name = snapshot_name(generation)
        where = f"{self.directory.path}/{name}"
        fd, size = self.directory.open_existing(name, writable=False)
        try:
            if size > MAX_SNAPSHOT_BYTES:
                raise StateError(f"{where}: {size} bytes, more than a snapshot can be")
            chunks = []
            remaining = size
            while remaining:
                chunk = os.read(fd, min(remaining, 1 << 24))
                if not chunk:
                    break
                chunks.append(chunk)
                remaining -= len(chunk)
        finally:
            os.close(fd)
        image = images.decode(b"".join(chunks), where)
        if image.generation != generation:
            raise StateError(f"{where}: its header names generation {image.generation}")
        return image

    def rotate(self, image: images.DeviceImage) -> Journal:
        """Snapshot ``image`` (the state after every record of the current journal) as the next
        generation and start its journal; the current generation's files go."""
        old = self.journal
        generation = self.generation + 1
        if image.generation != generation:
            raise ValueError(f"image of generation {image.generation}, rotating to {generation}")
        name = snapshot_name(generation)
        self.directory.remove(name + ".tmp")
        fd = self.directory.open_new(name + ".tmp")
        try:
            data = memoryview(images.encode(image))
            while data:
                data = data[os.write(fd, data) :]
        finally:
            os.close(fd)
        self.directory.replace(name + ".tmp", name)
        # A journal at least twice as long as the snapshot is large keeps the cost of snapshots per
        # request bounded (a constant share of a mapping's copy) however many mappings the guest holds.
        slots = min(MAX_SLOTS, max(self.slots, 1 << (2 * image.mappings).bit_length()))
        self.journal = Journal.create(self.directory, generation, slots)
        self.generation = generation
        if old is not None:
            old.close()
            self.directory.remove(old.name)
        self.directory.remove(snapshot_name(generation - 1))
        log.info("%s: snapshot %d written (%d mappings)", self.directory.path, generation, image.mappings)
        return self.journal

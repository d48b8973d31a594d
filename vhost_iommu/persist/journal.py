"""The journal: a fixed-size file of fixed-size records, mmap'd MAP_SHARED, each committed by a word
written last.

A SIGKILLed process's stores to a MAP_SHARED mapping are in the page cache and survive it, so a record
is durable against a worker crash once its commit word is stored; nothing is fsynced (a machine crash
may lose the tail, docs/persistence.md). The file is created zero-filled and written front to back, so
record ``i`` is committed exactly when its commit word holds ``i + 1``; the first slot that does not is
the end (a record torn by the kill has its commit word still 0). A non-zero commit word after the end
is not something this writer leaves: the file is refused as corrupt.

File layout: a 4096-byte header of u64 words (``H_*``), then ``slots`` records of ``RECORD_WORDS`` u64:

``[0]`` commit: slot index + 1, stored last (after a release fence in compiled code)
``[1]`` kind (bits 0-7), status (8-15), queue (16-23), flags (24-31: ``F_*``), used length (32-63)
``[2]`` REQUEST: ring position of the chain (bits 0-15), used-ring position (16-31), head (32-47);
        RING: next_avail (0-15), used_idx (16-31); FEATURES: the acked features; BYPASS: the value
``[3..7]`` REQUEST: the first 40 readable bytes of the request (zero-padded)

The record's numbers (kinds, flags, field positions) are ``vhost_iommu.abi``'s, which the compiled request
path (``vhost_iommu.jit.requests``) writes REQUEST records with, through raw addresses.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import signal
import struct
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from vhost_iommu.abi import (
    F_FORCED,
    J_FLAGS_SHIFT,
    J_HEAD_SHIFT,
    J_QUEUE_SHIFT,
    J_REQUEST_BYTES,
    J_REQUEST_WORD,
    J_STATUS_SHIFT,
    J_USED_LENGTH_SHIFT,
    J_USED_POS_SHIFT,
    KIND_BYPASS,
    KIND_FEATURES,
    KIND_REQUEST,
    KIND_RESET,
    KIND_RING,
    RECORD_WORDS,
)
from vhost_iommu.jit.barriers import full_fence
from vhost_iommu.jit.interpreted import kernel
from vhost_iommu.persist.statedir import GuestDir, StateError

__all__ = [
    "F_FORCED",
    "KIND_BYPASS",
    "KIND_FEATURES",
    "KIND_REQUEST",
    "KIND_RESET",
    "KIND_RING",
    "RECORD_BYTES",
    "Journal",
    "Record",
]

_KINDS: Final = (KIND_REQUEST, KIND_FEATURES, KIND_BYPASS, KIND_RESET, KIND_RING)

RECORD_BYTES: Final = RECORD_WORDS * 8
HEADER_BYTES: Final = 4096
MAGIC: Final = int.from_bytes(b"VIOMJRNL", "little")
VERSION: Final = 1
H_MAGIC: Final = 0
H_VERSION: Final = 1
H_RECORD_BYTES: Final = 2
H_SLOTS: Final = 3
H_GENERATION: Final = 4
MAX_SLOTS: Final = 1 << 24
"""1 GiB of records: a bound on what a header may claim before the file is mapped."""
DEFAULT_SLOTS: Final = 1 << 16

_BODY: Final = struct.Struct(f"<QQ{J_REQUEST_BYTES}s")  # words 1, 2 and the request
assert 8 + _BODY.size == 8 * J_REQUEST_WORD + J_REQUEST_BYTES == 8 * RECORD_WORDS  # after the commit word
_COMMIT: Final = struct.Struct("<Q")
_POPULATE: Final = getattr(mmap, "MAP_POPULATE", 0)
_WEAK_ORDER: Final = os.uname().machine.lower() not in ("x86_64", "amd64", "i386", "i686")


@dataclass(frozen=True, slots=True)
class Record:
    """One committed record, decoded (recovery only: the hot paths never build these)."""

    kind: int
    status: int
    queue: int
    flags: int
    used_length: int
    avail_pos: int
    used_pos: int
    head: int
    value: int
    request: bytes


def journal_name(generation: int) -> str:
    return f"journal-{generation:016x}"


class Journal:
    """One journal file, mapped for appending (``create``) or for reading and then appending
    (``open``)."""

    def __init__(self, directory: GuestDir, name: str, fd: int, slots: int, generation: int) -> None:
        self.directory = directory
        self.name = name
        self.generation = generation
        self.slots = slots
        try:
            # Populated up front: a page fault per 64 records, taken inside the request path, would cost
            # more than the records themselves.
            self._mmap = mmap.mmap(fd, HEADER_BYTES + slots * RECORD_BYTES, mmap.MAP_SHARED | _POPULATE)
        finally:
            os.close(fd)
        self.records: npt.NDArray[np.uint64] = np.frombuffer(
            self._mmap, np.uint64, slots * RECORD_WORDS, HEADER_BYTES
        ).reshape(slots, RECORD_WORDS)
        #: The next free slot (in and out of the compiled path through its parameter words).
        self.next = 0
        #: Test hook: the Python path SIGKILLs its own process right after committing this slot, before
        #: publishing the chain (-1: never). The compiled path takes it through ``R_JOURNAL_TRAP``.
        self.trap = -1

    @property
    def address(self) -> int:
        """Host address of slot 0 (for the compiled path; valid while this object lives)."""
        return int(self.records.ctypes.data)

    @classmethod
    def create(cls, directory: GuestDir, generation: int, slots: int = DEFAULT_SLOTS) -> Journal:
        if not 1 <= slots <= MAX_SLOTS:
            raise ValueError(f"journal slots {slots} outside 1..{MAX_SLOTS}")
        name = journal_name(generation)
        fd = directory.open_new(name)
        try:
            os.ftruncate(fd, HEADER_BYTES + slots * RECORD_BYTES)
            # Zeros written rather than left as a hole: the file system allocates the pages now, not at
            # the first store through the mapping (in the middle of serving a batch).
            zeros = bytes(1 << 20)
            for offset in range(HEADER_BYTES, HEADER_BYTES + slots * RECORD_BYTES, len(zeros)):
                os.pwrite(fd, zeros[: HEADER_BYTES + slots * RECORD_BYTES - offset], offset)
            header = np.zeros(HEADER_BYTES // 8, np.uint64)
            header[[H_MAGIC, H_VERSION, H_RECORD_BYTES, H_SLOTS, H_GENERATION]] = (
                MAGIC,
                VERSION,
                RECORD_BYTES,
                slots,
                generation,
            )
            os.pwrite(fd, header.tobytes(), 0)
        except BaseException:
            os.close(fd)
            raise
        return cls(directory, name, fd, slots, generation)

    @classmethod
    def open(cls, directory: GuestDir, generation: int) -> Journal:
        """An existing journal, its header checked against the file before it is mapped; ``next`` is
        set past the last committed record. Raises StateError."""
        name = journal_name(generation)
        fd, size = directory.open_existing(name, writable=True)
        try:
            where = f"{directory.path}/{name}"
            if size < HEADER_BYTES:
                raise StateError(f"{where}: {size} bytes, shorter than its header")
            header = np.frombuffer(os.pread(fd, HEADER_BYTES, 0), np.uint64)
            if int(header[H_MAGIC]) != MAGIC or int(header[H_VERSION]) != VERSION:
                raise StateError(f"{where}: not a journal of this version (magic or version)")
            if int(header[H_RECORD_BYTES]) != RECORD_BYTES:
                raise StateError(
                    f"{where}: records of {int(header[H_RECORD_BYTES])} bytes, not {RECORD_BYTES}"
                )
            slots = int(header[H_SLOTS])
            if not 1 <= slots <= MAX_SLOTS or size != HEADER_BYTES + slots * RECORD_BYTES:
                raise StateError(f"{where}: header says {slots} records, the file has {size} bytes")
            if int(header[H_GENERATION]) != generation:
                raise StateError(f"{where}: header names generation {int(header[H_GENERATION])}")
        except BaseException:
            os.close(fd)
            raise
        journal = cls(directory, name, fd, slots, generation)
        try:
            journal.next = journal._committed()
        except BaseException:
            journal.close()
            raise
        return journal

    def _committed(self) -> int:
        commits = self.records[:, 0].copy()  # no view outlives a close on the error path
        expected = np.arange(1, self.slots + 1, dtype=np.uint64)
        wrong = np.flatnonzero(commits != expected)
        end = int(wrong[0]) if len(wrong) else self.slots
        if np.any(commits[end:] != 0):
            stray = end + int(np.flatnonzero(commits[end:])[0])
            raise StateError(
                f"{self.directory.path}/{self.name}: record {stray} is committed after the end of the "
                f"journal at record {end}: the file is corrupt"
            )
        return end

    @property
    def full(self) -> bool:
        return self.next >= self.slots

    def append(self, word1: int, word2: int, request: bytes = b"") -> int:
        """Commit one record (the caller checked ``full``); returns its slot."""
        slot = self.next
        offset = HEADER_BYTES + slot * RECORD_BYTES
        # struct straight into the mapping: a numpy element store costs more than the whole record.
        # "40s" pads a shorter request with zeros and cuts a longer one.
        _BODY.pack_into(self._mmap, offset + 8, word1, word2, request)
        if _WEAK_ORDER:
            kernel(full_fence)()  # the record ahead of its commit word
        _COMMIT.pack_into(self._mmap, offset, slot + 1)
        self.next = slot + 1
        if slot == self.trap:
            os.kill(os.getpid(), signal.SIGKILL)
        return slot

    def read(self) -> list[Record]:
        """The committed records, decoded; an unknown kind is corruption (StateError)."""
        rows = self.records[: self.next]
        found = []
        for slot, row in enumerate(rows.tolist()):
            word1, word2 = row[1], row[2]
            kind = word1 & 0xFF
            if kind not in _KINDS:
                raise StateError(f"{self.directory.path}/{self.name}: record {slot} has unknown kind {kind}")
            found.append(
                Record(
                    kind=kind,
                    status=(word1 >> J_STATUS_SHIFT) & 0xFF,
                    queue=(word1 >> J_QUEUE_SHIFT) & 0xFF,
                    flags=(word1 >> J_FLAGS_SHIFT) & 0xFF,
                    used_length=word1 >> J_USED_LENGTH_SHIFT,
                    avail_pos=word2 & 0xFFFF,
                    used_pos=(word2 >> J_USED_POS_SHIFT) & 0xFFFF,
                    head=(word2 >> J_HEAD_SHIFT) & 0xFFFF,
                    value=word2,
                    request=np.array(row[J_REQUEST_WORD:], np.uint64).tobytes(),
                )
            )
        return found

    def close(self) -> None:
        if hasattr(self, "records"):
            del self.records
        # A view may still be held somewhere (a caller's traceback): then it is unmapped when that goes.
        with contextlib.suppress(BufferError):
            self._mmap.close()


def request_words(
    status: int, used_length: int, avail_pos: int, used_pos: int, head: int, flags: int = 0
) -> tuple[int, int]:
    """Words 1 and 2 of a REQUEST record of the requestq."""
    return (
        KIND_REQUEST
        | (status & 0xFF) << J_STATUS_SHIFT
        | flags << J_FLAGS_SHIFT
        | used_length << J_USED_LENGTH_SHIFT,
        avail_pos | used_pos << J_USED_POS_SHIFT | head << J_HEAD_SHIFT,
    )

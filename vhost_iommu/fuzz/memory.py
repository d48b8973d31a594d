"""Fuzz target ``memory``: memory-table changes with hostile region descriptions over real memfds.

One execution makes a few memfds (sizes around a page; their bytes are a known pattern of the file
offset) and a few fds that are not regular files, then applies a random sequence of SET_MEM_TABLE
(:meth:`GuestMemory.replace`), ADD_MEM_REG (``add_region``) and REM_MEM_REG (``remove_region``) with
descriptions built around the files' sizes and the regions already there (zero sizes, offsets past the end,
overlaps in either address space, sums that wrap 2^64), interleaved with uva/gpa view queries near
region edges.

Checked against a model written from the spec (not from :mod:`vhost_iommu.memory`, but for its limit on
the number of regions, ``GuestMemory.max_regions``):

* only :class:`GuestMemoryError` is raised, and exactly when the model says the change or the query is
  invalid; a refused change leaves the table as it was;
* a view has exactly the size asked, lies inside a region's mapping, and shows the file bytes the
  description points at (first and last byte compared with the pattern);
* every fd given to ``GuestMemory`` is closed when the call returns, whatever happened;
* once the table is closed and the views dropped, every mapping object is gone (each execution) and no
  mapping of the fuzz memfds is left in ``/proc/self/maps`` (every ``leak_every`` executions).
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Hashable, Iterable
from dataclasses import dataclass

import numpy as np

from vhost_iommu.fuzz.engine import Choices, FuzzFailure, FuzzTarget, Script, fd_is_open, shape
from vhost_iommu.memory import PAGE_SIZE, ByteView, GuestMemory, GuestMemoryError, MemoryRegionDesc

__all__ = ["MemoryTarget"]

U64_LIMIT = 1 << 64
MEMFD_NAME = "vhost-iommu-fuzz"
_MAX_FILE = 16 * PAGE_SIZE
# The byte at file offset o: varies within a page and across pages, so an offset mistake shows.
_PATTERN = (
    (np.arange(_MAX_FILE, dtype=np.uint64) * 131 + (np.arange(_MAX_FILE, dtype=np.uint64) >> 12)) & 0xFF
).astype(np.uint8)
_PATTERN_BYTES = _PATTERN.tobytes()
_OPERATIONS = 8  # replace, add, remove, then queries (_run_ops)
_FILE_SIZES = (0, 1, PAGE_SIZE - 1, PAGE_SIZE, PAGE_SIZE + 1, 2 * PAGE_SIZE, 3 * PAGE_SIZE + 5, _MAX_FILE)


@dataclass(frozen=True)
class _File:
    fd: int
    size: int  # -1: not a regular file


@dataclass(frozen=True)
class _Region:
    desc: MemoryRegionDesc
    file: _File


def _valid(desc: MemoryRegionDesc, file: _File) -> bool:
    """The spec's conditions for one region, on its own."""
    fields = (desc.guest_phys_addr, desc.memory_size, desc.userspace_addr, desc.mmap_offset)
    if not all(0 <= value < U64_LIMIT for value in fields) or desc.memory_size == 0:
        return False
    if any(start + desc.memory_size > U64_LIMIT for start in (fields[0], fields[2], fields[3])):
        return False
    return file.size >= 0 and desc.mmap_offset + desc.memory_size <= file.size


def _fields(desc: MemoryRegionDesc) -> tuple[int, int, int, int]:
    return (desc.guest_phys_addr, desc.memory_size, desc.userspace_addr, desc.mmap_offset)


def _disjoint(descs: list[MemoryRegionDesc]) -> bool:
    for i, a in enumerate(descs):
        for b in descs[i + 1 :]:
            if a.guest_phys_addr < b.gpa_end and b.guest_phys_addr < a.gpa_end:
                return False
            if a.userspace_addr < b.uva_end and b.userspace_addr < a.uva_end:
                return False
    return True


class MemoryTarget(FuzzTarget):
    name = "memory"
    description = "SET_MEM_TABLE/ADD_MEM_REG/REM_MEM_REG with hostile regions over memfds, then view queries"
    max_input = 1024

    def __init__(self) -> None:
        self._mappings: list[weakref.ref[object]] = []

    def run(self, choices: Choices) -> Iterable[Hashable]:
        features: list[Hashable] = []
        files: list[_File] = []
        try:
            for _ in range(choices.between(1, 3)):
                fd = os.memfd_create(MEMFD_NAME, os.MFD_CLOEXEC)
                size = choices.pick(_FILE_SIZES)
                files.append(_File(fd, size))
                os.ftruncate(fd, size)
                os.pwrite(fd, _PATTERN_BYTES[:size], 0)
            kind = choices.below(12)
            if kind == 1:
                files.append(_File(os.eventfd(0, os.EFD_CLOEXEC), -1))
            elif kind == 2:
                read_end, write_end = os.pipe2(os.O_CLOEXEC)
                os.close(write_end)
                files.append(_File(read_end, -1))
            elif kind == 3:
                files.append(_File(os.open("/dev/zero", os.O_RDWR | os.O_CLOEXEC), -1))
            self._run_ops(choices, files, features)
        finally:
            for file in files:
                os.close(file.fd)
        alive = [ref for ref in self._mappings if ref() is not None]
        self._mappings.clear()
        if alive:
            raise FuzzFailure(f"{len(alive)} region mappings still alive after close() and the views dropped")
        return features

    def seeds(self) -> list[bytes]:
        """Each operation once, first on a file of two pages (its values are the input's own):
        SET_MEM_TABLE, ADD_MEM_REG, REM_MEM_REG and the three kinds of query."""
        seeds = [b""]
        for operation in range(_OPERATIONS):
            script = Script().between(1, 3, 1).pick(_FILE_SIZES, 2 * PAGE_SIZE).below(12, 0).between(1, 12, 1)
            if operation == 0:
                script.chance(220, True)
            else:
                script.chance(220, False).below(_OPERATIONS, operation)
            seeds.append(script.data)
        return seeds

    def _run_ops(self, choices: Choices, files: list[_File], features: list[Hashable]) -> None:
        memory = GuestMemory()
        model: list[_Region] = []
        try:
            for step in range(choices.between(1, 12)):
                # Mostly start with a table, or every query only meets empty memory.
                operation = 0 if step == 0 and choices.chance(220) else choices.below(_OPERATIONS)
                if operation == 0:
                    model = self._replace(choices, memory, model, files, features)
                elif operation == 1:
                    model = self._add(choices, memory, model, files, features)
                elif operation == 2:
                    model = self._remove(choices, memory, model, features)
                else:
                    self._query(choices, memory, model, features)
                self._compare(memory, model)
        finally:
            memory.close()
            del memory

    # -- changes -------------------------------------------------------------------------------------------

    def _desc(self, choices: Choices, model: list[_Region], file: _File) -> MemoryRegionDesc:
        if choices.chance(224):
            return self._plausible_desc(choices, model, file)
        size_anchors = [max(file.size, 0), PAGE_SIZE, 1, U64_LIMIT - 1]
        size = choices.near(size_anchors, spread=2) if choices.chance(220) else choices.u64()
        ends = [0, U64_LIMIT - size, 1 << 32, 1 << 48]
        for region in model:
            ends += [region.desc.gpa_end, region.desc.guest_phys_addr, region.desc.guest_phys_addr - size]
        uva_ends = [0x7F00_0000_0000, U64_LIMIT - size]
        for region in model:
            uva_ends += [region.desc.uva_end, region.desc.userspace_addr, region.desc.userspace_addr - size]
        gpa = choices.near(ends, spread=PAGE_SIZE // 2)
        uva = choices.near(uva_ends, spread=PAGE_SIZE // 2)
        offset = choices.near([0, PAGE_SIZE, max(file.size - size, 0), file.size], spread=3)
        return MemoryRegionDesc(gpa, size, uva, offset)

    @staticmethod
    def _plausible_desc(choices: Choices, model: list[_Region], file: _File) -> MemoryRegionDesc:
        """A region that fits its file, placed next to (or on) the regions already there: what a real
        front-end sends, give or take a byte, so that tables actually get built and queried."""
        file_size = max(file.size, 1)
        size = (
            choices.between(1, file_size)
            if choices.chance(96)
            else min(file_size, PAGE_SIZE * choices.between(1, 4))
        )
        offset = choices.between(0, file_size - size) if choices.chance(128) else 0
        gpas = [0, 1 << 32, U64_LIMIT - size]
        uvas = [0x7F00_0000_0000, U64_LIMIT - size]
        for region in model:
            gpas.append(region.desc.gpa_end)
            uvas.append(region.desc.uva_end)
        # Mostly right after a region already there (next to it: adjacent, not overlapping).
        gpa = (
            choices.pick(gpas[3:]) if len(gpas) > 3 and choices.chance(200) else choices.pick(gpas)
        ) % U64_LIMIT
        uva = (
            choices.pick(uvas[2:]) if len(uvas) > 2 and choices.chance(200) else choices.pick(uvas)
        ) % U64_LIMIT
        if choices.chance(24):
            gpa = (gpa + choices.between(-2, 2)) % U64_LIMIT
        if choices.chance(24):
            uva = (uva + choices.between(-2, 2)) % U64_LIMIT
        return MemoryRegionDesc(gpa, size, uva, offset)

    def _replace(
        self,
        choices: Choices,
        memory: GuestMemory,
        model: list[_Region],
        files: list[_File],
        features: list[Hashable],
    ) -> list[_Region]:
        wanted: list[_Region] = []
        for _ in range(choices.below(10) if choices.chance(32) else choices.between(1, 4)):
            file = choices.pick(files)
            wanted.append(_Region(self._desc(choices, wanted, file), file))
        dups = [os.dup(region.file.fd) for region in wanted]
        expected = (
            all(_valid(r.desc, r.file) for r in wanted)
            and _disjoint([r.desc for r in wanted])
            and len(wanted) <= memory.max_regions
        )
        try:
            memory.replace([(region.desc, fd) for region, fd in zip(wanted, dups, strict=True)])
        except GuestMemoryError as exc:
            self._refused("replace", expected, exc, features)
            return model
        finally:
            self._fds_closed("replace", dups)
        self._accepted("replace", expected, wanted)
        features.append(("replace", len(wanted)))
        self._track(memory)
        return wanted

    def _add(
        self,
        choices: Choices,
        memory: GuestMemory,
        model: list[_Region],
        files: list[_File],
        features: list[Hashable],
    ) -> list[_Region]:
        file = choices.pick(files)
        region = _Region(self._desc(choices, model, file), file)
        dup = os.dup(file.fd)
        expected = (
            _valid(region.desc, file)
            and _disjoint([*(r.desc for r in model), region.desc])
            and len(model) < memory.max_regions
        )
        try:
            memory.add_region(region.desc, dup)
        except GuestMemoryError as exc:
            self._refused("add", expected, exc, features)
            return model
        finally:
            self._fds_closed("add_region", [dup])
        self._accepted("add", expected, [region])
        features.append(("add", len(model) + 1))
        self._track(memory)
        return [*model, region]

    def _remove(
        self, choices: Choices, memory: GuestMemory, model: list[_Region], features: list[Hashable]
    ) -> list[_Region]:
        if model and choices.chance(200):
            known = choices.pick(model).desc
            # REM_MEM_REG matches on gpa, size and uva; the offset it carries does not count.
            offset = known.mmap_offset if choices.chance(128) else choices.u64()
            desc = MemoryRegionDesc(known.guest_phys_addr, known.memory_size, known.userspace_addr, offset)
        else:
            desc = MemoryRegionDesc(choices.u64(), choices.u64(), choices.u64(), choices.u64())
        key = (desc.guest_phys_addr, desc.memory_size, desc.userspace_addr)
        matches = [
            r for r in model if (r.desc.guest_phys_addr, r.desc.memory_size, r.desc.userspace_addr) == key
        ]
        try:
            memory.remove_region(desc)
        except GuestMemoryError as exc:
            self._refused("remove", bool(matches), exc, features)
            return model
        if not matches:
            raise FuzzFailure(f"remove_region({desc}) succeeded but no such region exists")
        features.append(("remove", len(model) - 1))
        return [r for r in model if r is not matches[0]]

    @staticmethod
    def _refused(what: str, expected: bool, exc: GuestMemoryError, features: list[Hashable]) -> None:
        if expected:
            raise FuzzFailure(f"{what} refused a valid change: {exc}")
        features.append((what, "refused", shape(str(exc).rpartition("]")[2])))

    @staticmethod
    def _accepted(what: str, expected: bool, regions: list[_Region]) -> None:
        if not expected:
            raise FuzzFailure(f"{what} accepted an invalid change: {[str(r.desc) for r in regions]}")

    @staticmethod
    def _fds_closed(what: str, fds: list[int]) -> None:
        # Nothing else opens fds while the call runs, so a number still open is the one given.
        still = [fd for fd in fds if fd_is_open(fd)]
        if still:
            for fd in still:
                os.close(fd)
            raise FuzzFailure(f"{what} left fds {still} open")

    def _track(self, memory: GuestMemory) -> None:
        for region in memory.regions:
            base: object = region.data.base
            while base is not None and isinstance(base, np.ndarray):
                base = base.base
            if base is not None:
                self._mappings.append(weakref.ref(base))

    @staticmethod
    def _compare(memory: GuestMemory, model: list[_Region]) -> None:
        have = sorted(_fields(region.desc) for region in memory.regions)
        want = sorted(_fields(region.desc) for region in model)
        if have != want:
            raise FuzzFailure(f"table {have} differs from the model {want}")

    # -- queries -------------------------------------------------------------------------------------------

    def _query(
        self, choices: Choices, memory: GuestMemory, model: list[_Region], features: list[Hashable]
    ) -> None:
        space = choices.below(3)  # uva_view, gpa_view, gpa_segments
        uva = space == 0
        if model and choices.chance(200):
            chosen = choices.pick(model).desc
            start = chosen.userspace_addr if uva else chosen.guest_phys_addr
            address = start + choices.between(-1, chosen.memory_size)
            size = choices.between(0, chosen.memory_size + 2) if choices.chance(200) else choices.u64()
            address %= U64_LIMIT
        else:
            address, size = choices.u64(), choices.u64()
        expected = self._pieces(model, address, size, uva=uva, adjacent=space == 2)
        try:
            if space == 0:
                views = [memory.uva_view(address, size)]
            elif space == 1:
                views = [memory.gpa_view(address, size)]
            else:
                views = memory.gpa_segments(address, size)
        except GuestMemoryError:
            if expected is not None:
                raise FuzzFailure(
                    f"query {space} {address:#x}+{size:#x} refused, the model finds {expected}"
                ) from None
            features.append(("query", space, "refused"))
            return
        if expected is None:
            raise FuzzFailure(f"query {space} {address:#x}+{size:#x} answered, the model says outside memory")
        if len(views) != len(expected):
            raise FuzzFailure(
                f"query {space} {address:#x}+{size:#x}: {len(views)} views, expected {len(expected)}"
            )
        for view, (region, offset, length) in zip(views, expected, strict=True):
            self._check_view(memory, view, region, offset, length)
        features.append(("query", space, len(views)))

    @staticmethod
    def _pieces(
        model: list[_Region], address: int, size: int, *, uva: bool, adjacent: bool
    ) -> list[tuple[_Region, int, int]] | None:
        """(region, offset in it, length) covering the range, or None if it is not in memory."""
        if size <= 0:
            return None
        pieces = []
        position, end = address, address + size
        while position < end:
            for region in model:
                start = region.desc.userspace_addr if uva else region.desc.guest_phys_addr
                if start <= position < start + region.desc.memory_size:
                    length = min(end, start + region.desc.memory_size) - position
                    pieces.append((region, position - start, length))
                    position += length
                    break
            else:
                return None
            if position < end and not adjacent:
                return None
        return pieces

    @staticmethod
    def _check_view(memory: GuestMemory, view: ByteView, region: _Region, offset: int, length: int) -> None:
        if view.shape != (length,) or view.dtype != np.uint8:
            raise FuzzFailure(f"view of {view.shape} {view.dtype}, expected ({length},) uint8")
        address = view.ctypes.data
        inside = any(
            r.data.ctypes.data <= address and address + length <= r.data.ctypes.data + r.size
            for r in memory.regions
        )
        if not inside:
            raise FuzzFailure(f"view at {address:#x}+{length:#x} is not inside any region's mapping")
        file_offset = region.desc.mmap_offset + offset
        for at in (0, length - 1):
            if view[at] != _PATTERN[file_offset + at]:
                raise FuzzFailure(
                    f"view byte {at} is {view[at]}, the file holds {_PATTERN[file_offset + at]} at "
                    f"{file_offset + at:#x} (region {region.desc}, offset {offset:#x})"
                )

    def check_leaks(self) -> str | None:
        with open("/proc/self/maps") as maps:
            lines = [line.strip() for line in maps if f"memfd:{MEMFD_NAME}" in line]
        return f"{len(lines)} mappings of fuzz memfds left: {lines[:3]}" if lines else None

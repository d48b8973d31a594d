"""Guest memory as the vhost-user front-end describes it: mmap'd regions and address translation.

A region arrives as (guest-physical address, size, front-end user address, mmap offset) plus an fd
(SET_MEM_TABLE, ADD_MEM_REG). Two address spaces point into the same mappings:

* front-end user addresses (``uva``): what SET_VRING_ADDR gives for the rings;
* guest-physical addresses (``gpa``): what the descriptors hold for the buffers.

Views are numpy ``uint8`` arrays straight over the mapping: no copies.

Lifetime of a mapping. A numpy view keeps its mapping's address range alive, so a region is never
unmapped under a view (and compiled code that was given a view's raw address never meets unmapped
memory while the view lives): removing a region drops this object's references, and the ``munmap``
happens when the last view of the region dies (immediately if there is none). A view that outlives its
region therefore still reads and writes the old memory (harmless to this process, never a crash); users
such as ``SplitQueue`` re-derive their views on ``memory_changed``. :meth:`GuestMemory.close` (the
session is over) does not wait for stray views: it unmaps every region that no view holds and cuts the
others off the guest's file at once, their range becoming private zero pages until the last view dies, so
an ended session never pins guest RAM, however long something keeps a view. The file descriptors are
never kept: every fd passed in is closed before the call returns, success or failure.

Hostile input. Every field is an unsigned 64-bit value from the front-end; sizes of zero, 64-bit
wraparound, overlaps (in gpa or in uva space), offsets past the end of the file and non-regular files
are refused with :class:`GuestMemoryError` before anything is mapped.

Known limit: if the front-end later shrinks the file under a mapping, touching the lost pages raises
SIGBUS in this process; QEMU does not do that to guest RAM, and nothing cheap detects it.
"""

from __future__ import annotations

import bisect
import ctypes
import ctypes.util
import errno
import itertools
import logging
import mmap
import os
import stat
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

log = logging.getLogger(__name__)

__all__ = [
    "MAX_MEM_SLOTS",
    "FlatRegions",
    "GuestMemory",
    "GuestMemoryError",
    "MemoryRegion",
    "MemoryRegionDesc",
]

U64_LIMIT = 1 << 64
PAGE_SIZE = mmap.PAGESIZE

# QEMU's vhost-user front-end never uses more RAM slots than its own VHOST_USER_MAX_RAM_SLOTS (512 in
# current QEMU) and clamps whatever GET_MAX_MEM_SLOTS says to that. Lookup is a bisect, each region is
# one mapping and holds no fd, so offering QEMU's maximum costs nothing and never limits DIMM or
# virtio-mem hotplug on the QEMU side.
MAX_MEM_SLOTS = 512

ByteView = npt.NDArray[np.uint8]


class GuestMemoryError(Exception):
    """The front-end described memory we cannot use, or an address is not in guest memory."""


@dataclass(frozen=True)
class MemoryRegionDesc:
    """One region as a vhost-user memory message describes it (all fields unsigned 64-bit)."""

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int

    @property
    def gpa_end(self) -> int:
        """One past the last guest-physical address of the region."""
        return self.guest_phys_addr + self.memory_size

    @property
    def uva_end(self) -> int:
        """One past the last front-end user address of the region."""
        return self.userspace_addr + self.memory_size

    def validate(self) -> None:
        """Raise GuestMemoryError unless the fields describe a non-empty region that does not wrap."""
        for name in ("guest_phys_addr", "memory_size", "userspace_addr", "mmap_offset"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 <= value < U64_LIMIT:
                raise GuestMemoryError(f"memory region {name}={value!r} is not an unsigned 64-bit value")
        if self.memory_size == 0:
            raise GuestMemoryError(f"memory region at gpa {self.guest_phys_addr:#x} has size 0")
        for name, start in (
            ("guest_phys_addr", self.guest_phys_addr),
            ("userspace_addr", self.userspace_addr),
            ("mmap_offset", self.mmap_offset),
        ):
            if start + self.memory_size > U64_LIMIT:
                raise GuestMemoryError(
                    f"memory region {name}={start:#x} + memory_size={self.memory_size:#x} wraps past 2**64"
                )

    def __str__(self) -> str:
        return (
            f"[gpa {self.guest_phys_addr:#x}+{self.memory_size:#x}, uva {self.userspace_addr:#x}, "
            f"offset {self.mmap_offset:#x}]"
        )


# --- raw mmap(2) through libc -------------------------------------------------------------------------
# Python's mmap module keeps a dup of the fd for the life of the mapping (3.11 has no trackfd=False),
# and mmap.close() raises BufferError while numpy views exist. Calling mmap(2) directly holds no fd, and a
# finaliser on the buffer owner unmaps exactly when the last view is gone.

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int64,
]
_libc.munmap.restype = ctypes.c_int
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value


def _munmap(address: int, length: int) -> None:
    _libc.munmap(address, length)


# Private zero pages in place of a released mapping: reads see zeros, writes touch nothing shared, and
# nothing is reserved against the commit limit for a range that is only waiting for its views to die.
# The mmap module does not export MAP_FIXED (0x10 on every Linux), nor MAP_NORESERVE before 3.12 (0x4000
# on x86 and arm; an unknown flag is ignored for a private mapping elsewhere).
_MAP_FIXED = 0x10
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)
_RELEASED_FLAGS = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_FIXED | _MAP_NORESERVE


class _Mapping:
    """Owns one mmap(2); numpy arrays made from it keep it alive, and it unmaps when collected."""

    __slots__ = ("__array_interface__", "__weakref__", "address", "length")

    def __init__(self, fd: int, length: int, offset: int) -> None:
        address = _libc.mmap(None, length, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, fd, offset)
        if address is None or address == _MAP_FAILED:
            err = ctypes.get_errno()
            raise GuestMemoryError(
                f"mmap of {length:#x} bytes at offset {offset:#x} failed: {os.strerror(err)}"
            )
        self.address: int = address
        self.length = length
        self.__array_interface__: dict[str, Any] = {
            "data": (address, False),
            "shape": (length,),
            "typestr": "|u1",
            "version": 3,
        }
        weakref.finalize(self, _munmap, address, length)

    def release(self) -> None:
        """Stop mapping the file now, while views may still be alive: the range is replaced in place (one
        mmap(2) with MAP_FIXED, so no other mapping can slip into it) by private zero pages, which the
        views read and write harmlessly until the last of them dies and the range is unmapped. Raises
        GuestMemoryError if the kernel refuses (the file stays mapped until the views die then)."""
        address = _libc.mmap(
            self.address, self.length, mmap.PROT_READ | mmap.PROT_WRITE, _RELEASED_FLAGS, -1, 0
        )
        if address != self.address:
            err = ctypes.get_errno()
            raise GuestMemoryError(f"releasing the mapping at {self.address:#x} failed: {os.strerror(err)}")


class MemoryRegion:
    """One mapped region. ``data`` is a uint8 view of exactly the region's ``memory_size`` bytes."""

    __slots__ = ("_mapping", "data", "desc", "file_id")

    def __init__(
        self, desc: MemoryRegionDesc, data: ByteView, mapping: _Mapping, file_id: tuple[int, int] = (0, 0)
    ) -> None:
        self.desc = desc
        self.data = data
        self._mapping = mapping
        #: (st_dev, st_ino) of the file mapped: two connections of one VM share guest RAM's memfd.
        self.file_id = file_id

    @property
    def gpa_start(self) -> int:
        return self.desc.guest_phys_addr

    @property
    def uva_start(self) -> int:
        return self.desc.userspace_addr

    @property
    def size(self) -> int:
        return self.desc.memory_size

    def __repr__(self) -> str:
        return f"MemoryRegion({self.desc})"


def _close_fds(fds: Iterable[int]) -> None:
    # Each distinct number once: closing a number twice could close an fd opened meanwhile by someone else.
    for fd in set(fds):
        try:
            os.close(fd)
        except OSError as exc:
            if exc.errno != errno.EBADF:
                raise


def _map_region(desc: MemoryRegionDesc, fd: int) -> MemoryRegion:
    """Map ``desc`` from ``fd`` (which the caller closes). Raises GuestMemoryError."""
    try:
        st = os.fstat(fd)
    except OSError as exc:
        raise GuestMemoryError(f"memory region {desc}: fd {fd} is not usable: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        # Past the end of anything but a regular file (memfd, tmpfs, hugetlbfs) the size is unknown and
        # an access could SIGBUS: refuse rather than guess.
        raise GuestMemoryError(f"memory region {desc}: fd {fd} is not a regular file or memfd")
    if desc.mmap_offset + desc.memory_size > st.st_size:
        raise GuestMemoryError(
            f"memory region {desc}: mmap_offset + memory_size = {desc.mmap_offset + desc.memory_size:#x} "
            f"is beyond the end of the file ({st.st_size:#x} bytes)"
        )
    # mmap wants an offset aligned to the file's page size (the huge page size on hugetlbfs, which
    # st_blksize reports): map the aligned superset and start the view inside it.
    granule = (
        st.st_blksize if st.st_blksize > PAGE_SIZE and not st.st_blksize & (st.st_blksize - 1) else PAGE_SIZE
    )
    lead = desc.mmap_offset % granule
    length = -(-(desc.memory_size + lead) // granule) * granule  # hugetlbfs wants whole pages to unmap
    mapping = _Mapping(fd, length, desc.mmap_offset - lead)
    whole: ByteView = np.asarray(mapping, dtype=np.uint8)
    return MemoryRegion(desc, whole[lead : lead + desc.memory_size], mapping, (st.st_dev, st.st_ino))


def _check_no_overlap(descs: Sequence[MemoryRegionDesc]) -> None:
    """Raise GuestMemoryError if two regions overlap in gpa space or in uva space."""
    spaces: tuple[tuple[str, Callable[[MemoryRegionDesc], int], Callable[[MemoryRegionDesc], int]], ...] = (
        ("guest-physical", attrgetter("guest_phys_addr"), attrgetter("gpa_end")),
        ("front-end virtual", attrgetter("userspace_addr"), attrgetter("uva_end")),
    )
    for space, start_of, end_of in spaces:
        ordered = sorted(descs, key=start_of)
        for before, after in itertools.pairwise(ordered):
            if start_of(after) < end_of(before):
                raise GuestMemoryError(f"memory regions {before} and {after} overlap in {space} space")


class FlatRegions(NamedTuple):
    """Guest-physical layout as plain arrays (what a numba kernel can take)."""

    gpa_starts: npt.NDArray[np.uint64]
    gpa_lasts: npt.NDArray[np.uint64]  # inclusive: a region may end exactly at 2**64, which no u64 holds
    host_addresses: npt.NDArray[np.uint64]  # where each region's first byte is mapped in this process
    arrays: tuple[ByteView, ...]


class GuestMemory:
    """The guest's memory regions, their mappings, and translation of uva and gpa to numpy views.

    Example::

        memory = GuestMemory()
        memory.add_region(MemoryRegionDesc(0, 1 << 20, 0x7F0000000000, 0), os.dup(memfd))
        ring = memory.uva_view(0x7F0000001000, 4096)   # uint8 view, shares the guest's memory
        memory.close()
    """

    max_regions: int = MAX_MEM_SLOTS

    def __init__(self) -> None:
        self._by_gpa: list[MemoryRegion] = []
        self._gpa_starts: list[int] = []
        self._gpa_ends: list[int] = []
        self._gpa_data: list[ByteView] = []
        self._by_uva: list[MemoryRegion] = []
        self._uva_starts: list[int] = []
        self._uva_ends: list[int] = []
        self._uva_data: list[ByteView] = []
        self.generation = 0
        """Bumped on every change of the region set, so holders of views can tell theirs are stale."""

    # --- changes -----------------------------------------------------------------------------------

    def add_region(self, desc: MemoryRegionDesc, fd: int) -> None:
        """Map one region (ADD_MEM_REG / one entry of SET_MEM_TABLE). Closes ``fd`` in every case."""
        try:
            desc.validate()
            if len(self._by_gpa) >= self.max_regions:
                raise GuestMemoryError(f"memory region {desc}: already {self.max_regions} regions")
            _check_no_overlap([*(r.desc for r in self._by_gpa), desc])
            region = _map_region(desc, fd)
        finally:
            _close_fds([fd])
        self._install([*self._by_gpa, region])

    def remove_region(self, desc: MemoryRegionDesc) -> None:
        """Forget the region with the same gpa, size and uva (REM_MEM_REG; the mmap offset is not compared).

        Its mapping goes away when the last view of it dies.
        """
        for index, region in enumerate(self._by_gpa):
            known = region.desc
            if (known.guest_phys_addr, known.memory_size, known.userspace_addr) == (
                desc.guest_phys_addr,
                desc.memory_size,
                desc.userspace_addr,
            ):
                self._install(self._by_gpa[:index] + self._by_gpa[index + 1 :])
                return
        raise GuestMemoryError(f"no memory region {desc} to remove")

    def replace(self, regions: list[tuple[MemoryRegionDesc, int]]) -> None:
        """Replace the whole table (SET_MEM_TABLE): all regions are mapped, or none and the old table stays.

        Closes every fd in every case.
        """
        fds = [fd for _, fd in regions]
        try:
            descs = [desc for desc, _ in regions]
            for desc in descs:
                desc.validate()
            if len(descs) > self.max_regions:
                raise GuestMemoryError(f"{len(descs)} memory regions, at most {self.max_regions} supported")
            _check_no_overlap(descs)
            # A failure part-way drops the regions mapped so far; their finalisers unmap them.
            mapped = [_map_region(desc, fd) for desc, fd in regions]
        finally:
            _close_fds(fds)
        self._install(mapped)

    def close(self) -> None:
        """Forget every region and release its mapping now (the session is over): unmapped if no view is
        left, else cut off the guest's file (see the module's "Lifetime of a mapping")."""
        mappings = [weakref.ref(region._mapping) for region in self._by_gpa]
        self._install([])
        for reference in mappings:
            mapping = reference()
            if mapping is not None:  # a view is still alive somewhere
                try:
                    mapping.release()
                except GuestMemoryError as exc:
                    log.warning("%s; it stays mapped until its last view dies", exc)

    def _install(self, regions: list[MemoryRegion]) -> None:
        # Parallel lists of plain ints and arrays: the lookups below are on the per-descriptor path.
        self._by_gpa = sorted(regions, key=lambda r: r.gpa_start)
        self._gpa_starts = [r.gpa_start for r in self._by_gpa]
        self._gpa_ends = [r.gpa_start + r.size for r in self._by_gpa]
        self._gpa_data = [r.data for r in self._by_gpa]
        self._by_uva = sorted(regions, key=lambda r: r.uva_start)
        self._uva_starts = [r.uva_start for r in self._by_uva]
        self._uva_ends = [r.uva_start + r.size for r in self._by_uva]
        self._uva_data = [r.data for r in self._by_uva]
        self.generation += 1

    # --- inspection --------------------------------------------------------------------------------

    @property
    def regions(self) -> Sequence[MemoryRegion]:
        """The regions sorted by guest-physical address (a read-only snapshot)."""
        return tuple(self._by_gpa)

    def __len__(self) -> int:
        return len(self._by_gpa)

    def file_ids(self) -> frozenset[tuple[int, int]]:
        """(st_dev, st_ino) of every file mapped: the same VM's RAM has the same ids in every connection."""
        return frozenset(region.file_id for region in self.regions)

    def flat_tables(self) -> FlatRegions:
        """The regions as flat arrays for compiled code, sorted by gpa (a kernel bisects ``gpa_starts``
        and indexes ``arrays``, or builds its own view from ``host_addresses``). Valid until the next
        change of the region set (see ``generation``); the arrays keep their mappings alive."""
        return FlatRegions(
            gpa_starts=np.array(self._gpa_starts, dtype=np.uint64),
            gpa_lasts=np.array([end - 1 for end in self._gpa_ends], dtype=np.uint64),
            host_addresses=np.array([data.ctypes.data for data in self._gpa_data], dtype=np.uint64),
            arrays=tuple(self._gpa_data),
        )

    # --- translation -------------------------------------------------------------------------------

    def uva_view(self, uva: int, size: int) -> ByteView:
        """A uint8 view of ``size`` bytes at front-end user address ``uva`` (rings); no copy.

        Raises GuestMemoryError unless the range lies wholly inside one region.
        """
        index = bisect.bisect_right(self._uva_starts, uva) - 1
        if index >= 0 and size > 0 and uva + size <= self._uva_ends[index]:
            offset = uva - self._uva_starts[index]
            return self._uva_data[index][offset : offset + size]
        raise GuestMemoryError(f"front-end address range {uva:#x}+{size:#x} is not inside one memory region")

    def gpa_view(self, gpa: int, size: int) -> ByteView:
        """A uint8 view of ``size`` bytes at guest-physical address ``gpa`` (buffers); no copy.

        Raises GuestMemoryError unless the range lies wholly inside one region.
        """
        index = bisect.bisect_right(self._gpa_starts, gpa) - 1
        if index >= 0 and size > 0 and gpa + size <= self._gpa_ends[index]:
            offset = gpa - self._gpa_starts[index]
            return self._gpa_data[index][offset : offset + size]
        raise GuestMemoryError(f"guest-physical range {gpa:#x}+{size:#x} is not inside one memory region")

    def gpa_segments(self, gpa: int, size: int, device_writes: int = 0) -> list[ByteView]:
        """Views covering ``size`` bytes at ``gpa``, split where the range crosses from one region into
        the next one adjacent to it in guest-physical space (the guest sees such memory as contiguous).
        ``device_writes`` (nonzero: the device will write the buffer) matters only to a memory that
        translates addresses and checks the access (``virtqueue.QueueMemory``); here every byte of guest
        memory may be read and written.

        Raises GuestMemoryError if any byte of the range is outside guest memory.
        """
        starts, ends = self._gpa_starts, self._gpa_ends
        index = bisect.bisect_right(starts, gpa) - 1
        if index >= 0 and size > 0 and gpa + size <= ends[index]:  # the usual case: one region
            offset = gpa - starts[index]
            return [self._gpa_data[index][offset : offset + size]]
        if size <= 0:
            raise GuestMemoryError(f"empty guest-physical range at {gpa:#x}")
        segments: list[ByteView] = []
        position, end = gpa, gpa + size
        while position < end:
            # Regions do not overlap, so the next region can only continue the range if it starts
            # exactly where the previous one ended.
            if index < 0 or index >= len(starts) or not starts[index] <= position < ends[index]:
                raise GuestMemoryError(f"guest-physical range {gpa:#x}+{size:#x} is not in guest memory")
            take_end = min(end, ends[index])
            offset = position - starts[index]
            segments.append(self._gpa_data[index][offset : offset + take_end - position])
            position = take_end
            index += 1
        return segments

"""Fake guest RAM for tests and tools: a memfd mapped in this process, with a small allocator.

It plays the part of QEMU's ``memory-backend-memfd``: the fd goes to the back-end (in a vhost-user
memory message, or straight into a :class:`~vhost_iommu.memory.GuestMemory`), and this process reads
and writes the same pages as the guest would.

Two address spaces, deliberately different so that a test catches any mix-up:

* guest-physical addresses (``gpa``), from ``gpa_base``: what descriptors hold;
* front-end user addresses (``uva``), from ``uva_base``: what SET_VRING_ADDR and the memory table's
  ``userspace_addr`` hold (QEMU's own virtual addresses in real life).

Example::

    with GuestRam(1 << 20, gpa_base=0x1_0000_0000) as ram:
        memory = ram.guest_memory()                  # what the server builds from SET_MEM_TABLE
        gpa = ram.alloc(64)
        ram.write(gpa, b"hello")
        assert bytes(memory.gpa_view(gpa, 5)) == b"hello"
        memory.close()
"""

from __future__ import annotations

import bisect
import contextlib
import mmap
import os
import weakref
from types import TracebackType
from typing import ClassVar

import numpy as np

from vhost_iommu.memory import ByteView, GuestMemory, MemoryRegionDesc

__all__ = ["GuestRam", "GuestRamError"]

DEFAULT_UVA_BASE = 0x7F00_0000_0000
UVA_STRIDE = 1 << 30


def _release(key: int, fd: int) -> None:
    GuestRam._live_uva_ranges.pop(key, None)
    os.close(fd)


class GuestRamError(Exception):
    """Misuse of the fake RAM (out of range, out of memory, double free)."""


class GuestRam:
    """``size`` bytes of shared memory at guest-physical ``gpa_base`` and front-end address ``uva_base``
    (by default the lowest range from 0x7f00_0000_0000 up that overlaps no other open GuestRam's).

    ``fd`` stays open (and owned by this object) until :meth:`close`; give :meth:`dup_fd` to anything
    that takes ownership of an fd.
    """

    # Front-end address ranges of the RAMs not yet closed, for choosing a default uva_base.
    _live_uva_ranges: ClassVar[dict[int, tuple[int, int]]] = {}

    def __init__(
        self, size: int, *, gpa_base: int = 0, uva_base: int | None = None, name: str = "guest-ram"
    ) -> None:
        if size <= 0:
            raise GuestRamError(f"RAM size must be positive, not {size}")
        if uva_base is None:
            uva_base = self._free_uva_base(size)
        if gpa_base < 0 or uva_base < 0 or gpa_base + size > 1 << 64 or uva_base + size > 1 << 64:
            raise GuestRamError("RAM does not fit in a 64-bit address space")
        self.size = size
        self.gpa_base = gpa_base
        self.uva_base = uva_base
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, size)
            self._mmap = mmap.mmap(self.fd, size)
        except BaseException:
            os.close(self.fd)
            raise
        self.data: ByteView = np.frombuffer(self._mmap, dtype=np.uint8)
        # First-fit allocator over offsets: free blocks sorted by start, allocated block sizes by start.
        self._free_starts: list[int] = [0]
        self._free_sizes: list[int] = [size]
        self._allocated: dict[int, int] = {}
        self.closed = False
        GuestRam._live_uva_ranges[id(self)] = (uva_base, uva_base + size)
        # Runs once: at close(), or when a RAM dropped without close() is collected.
        self._release = weakref.finalize(self, _release, id(self), self.fd)

    @staticmethod
    def _free_uva_base(size: int) -> int:
        """The lowest 1 GiB-aligned front-end address from 0x7f00_0000_0000 up whose range (plus a gap)
        overlaps no open RAM's, so that RAMs open together can share a memory table."""
        candidate = DEFAULT_UVA_BASE
        for start, end in sorted(GuestRam._live_uva_ranges.values()):
            if candidate + size + UVA_STRIDE <= start:
                break
            candidate = max(candidate, -(-end // UVA_STRIDE) * UVA_STRIDE + UVA_STRIDE)
        return candidate

    # --- description for the back-end ---------------------------------------------------------------

    def region_desc(self) -> MemoryRegionDesc:
        """This RAM as one vhost-user memory region (mmap offset 0)."""
        return MemoryRegionDesc(
            guest_phys_addr=self.gpa_base, memory_size=self.size, userspace_addr=self.uva_base, mmap_offset=0
        )

    def dup_fd(self) -> int:
        """A new fd for the memfd, for a receiver that closes what it is given."""
        return os.dup(self.fd)

    def guest_memory(self) -> GuestMemory:
        """A GuestMemory holding this RAM as its only region, built the way the server builds it."""
        memory = GuestMemory()
        memory.add_region(self.region_desc(), self.dup_fd())
        return memory

    # --- addresses ------------------------------------------------------------------------------------

    def gpa_to_uva(self, gpa: int) -> int:
        """The front-end user address of guest-physical ``gpa``."""
        self._offset(gpa, 0)
        return gpa - self.gpa_base + self.uva_base

    def uva_to_gpa(self, uva: int) -> int:
        """The guest-physical address of front-end user address ``uva``."""
        gpa = uva - self.uva_base + self.gpa_base
        self._offset(gpa, 0)
        return gpa

    def _offset(self, gpa: int, size: int) -> int:
        offset = gpa - self.gpa_base
        if size < 0 or offset < 0 or offset + size > self.size:
            raise GuestRamError(f"gpa range {gpa:#x}+{size:#x} is outside the RAM")
        return offset

    # --- access ---------------------------------------------------------------------------------------

    def view(self, gpa: int, size: int) -> ByteView:
        """A writable uint8 view of ``size`` bytes at ``gpa``."""
        offset = self._offset(gpa, size)
        return self.data[offset : offset + size]

    def read(self, gpa: int, size: int) -> bytes:
        """A copy of ``size`` bytes at ``gpa``."""
        return self.view(gpa, size).tobytes()

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        """Copy ``data`` to ``gpa``."""
        self.view(gpa, len(data))[:] = np.frombuffer(data, dtype=np.uint8)

    # --- allocation -----------------------------------------------------------------------------------

    def alloc(self, size: int, align: int = 8) -> int:
        """Reserve ``size`` zeroed bytes aligned to ``align`` (a power of 2); returns their gpa."""
        if size <= 0:
            raise GuestRamError(f"cannot allocate {size} bytes")
        if align <= 0 or align & (align - 1):
            raise GuestRamError(f"alignment {align} is not a power of 2")
        for slot, (start, length) in enumerate(zip(self._free_starts, self._free_sizes, strict=True)):
            # Alignment applies to the guest-physical address, not just to the offset.
            aligned = -(-(self.gpa_base + start) // align) * align - self.gpa_base
            waste = aligned - start
            if waste + size > length:
                continue
            del self._free_starts[slot], self._free_sizes[slot]
            if waste:
                self._insert_free(start, waste)
            if waste + size < length:
                self._insert_free(aligned + size, length - waste - size)
            self._allocated[aligned] = size
            self.data[aligned : aligned + size] = 0
            return self.gpa_base + aligned
        raise GuestRamError(f"out of guest RAM: no free block of {size} bytes aligned to {align}")

    def free(self, gpa: int) -> None:
        """Give back a block from :meth:`alloc`."""
        offset = gpa - self.gpa_base
        size = self._allocated.pop(offset, None)
        if size is None:
            raise GuestRamError(f"gpa {gpa:#x} is not an allocated block")
        self._insert_free(offset, size)

    @property
    def free_bytes(self) -> int:
        """Bytes not allocated (possibly fragmented)."""
        return sum(self._free_sizes)

    def _insert_free(self, start: int, length: int) -> None:
        slot = bisect.bisect_left(self._free_starts, start)
        # Coalesce with the following and the preceding free blocks.
        if slot < len(self._free_starts) and start + length == self._free_starts[slot]:
            length += self._free_sizes[slot]
            del self._free_starts[slot], self._free_sizes[slot]
        if slot > 0 and self._free_starts[slot - 1] + self._free_sizes[slot - 1] == start:
            self._free_sizes[slot - 1] += length
            return
        self._free_starts.insert(slot, start)
        self._free_sizes.insert(slot, length)

    # --- lifetime -------------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the memfd and drop this process's mapping (it lingers until views of it are gone)."""
        if self.closed:
            return
        self.closed = True
        self._release()
        del self.data
        # While views are alive close() raises BufferError; the mapping then goes with the last of them.
        with contextlib.suppress(BufferError):
            self._mmap.close()

    def __enter__(self) -> GuestRam:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"GuestRam(size={self.size:#x}, gpa_base={self.gpa_base:#x}, uva_base={self.uva_base:#x})"

"""A device's view of guest memory through its IOMMU domain: what :class:`~vhost_iommu.virtqueue.SplitQueue`
reads and writes when the device negotiated VIRTIO_F_ACCESS_PLATFORM.

The split ring code asks its memory for ring views (``uva_view``), indirect tables (``gpa_view``) and
buffers (``gpa_segments``, told whether the device reads or writes the buffer); here
every such address is an IOVA. Each is translated for the endpoint (``translate``: a recording
:meth:`~vhost_iommu.device.dma.DmaPort.translate`, so the port counts it and a fault is queued for the
guest's eventq) with the access the device will make, and the guest-physical segments become views of
the client's DMA-mapped RAM (:class:`~vhost_iommu.memory.GuestMemory`, keyed by guest-physical address).

A fault raises :class:`TranslationFault` after ``on_fault`` (the guest's back-end moves the event into
the driver's eventq buffers); the ring code turns it into a ``QueueError`` and the device into
NEEDS_RESET. A translation outside the client's RAM raises :class:`~vhost_iommu.memory.GuestMemoryError`.

When translation happens: a ring when the queue is bound (DRIVER_OK, or the client's RAM changed), a
buffer or indirect table when its chain is walked (``pop``); the device then accesses the views. The
driver owns a buffer's mapping until the device returns it, and Linux keeps a ring mapped while the device
is live, so an UNMAP the driver makes of a ring, or of a buffer in flight, is not noticed (unlike the DMA
engine's accesses, these do not hold the translation guard across the access).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from vhost_iommu.device.dma import DmaPort
from vhost_iommu.device.layout import U64_MAX, Access
from vhost_iommu.device.translation import Fault, Translation
from vhost_iommu.jit import blk as blk_kernel
from vhost_iommu.jit import dma as dma_kernel
from vhost_iommu.jit import interpreted
from vhost_iommu.memory import ByteView, FlatRegions, GuestMemory, GuestMemoryError

Translate = Callable[[int, int, Access], "Translation | Fault"]

RING_ACCESS = Access.READ | Access.WRITE
"""Rings are read and written by the device (the used ring written, the others read; Linux maps all three
in one coherent, read-write allocation)."""


class TranslationFault(GuestMemoryError):
    """An IOVA the endpoint's domain does not translate (the fault is recorded and queued)."""

    def __init__(self, what: str, fault: Fault) -> None:
        super().__init__(
            f"{what} at IOVA {fault.address:#x}: IOMMU fault "
            f"(reason {fault.reason.name}, flags {fault.flags:#x})"
        )
        self.fault = fault


class TranslatedMemory:
    """``memory`` (the client's RAM by guest-physical address) seen through ``translate``; with ``port``
    (the endpoint's DmaPort, whose recording translate ``translate`` is) a compiled device model may walk
    its rings in a kernel too (:meth:`kernel_arguments`)."""

    def __init__(
        self,
        translate: Translate,
        memory: GuestMemory,
        on_fault: Callable[[], None],
        port: DmaPort | None = None,
    ) -> None:
        self._translate = translate
        self._memory = memory
        self._on_fault = on_fault
        self._port = port
        self._flat: FlatRegions | None = None  # kept with the table: the views keep the mappings alive
        self._memory_table = np.zeros((0, 3), np.uint64)

    def kernel_arguments(self) -> tuple[Any, ...] | None:
        """What ``jit/blk.serve_blk`` takes between the disk words and its scratch: the port's guard,
        translation state, counter words and walk cache, and the client's RAM as a region table; None while
        only the Python path can serve (no port, the kernels still compiling, more RAM regions than the
        kernel splits a range over). The memory's region set is fixed for this object's life (the endpoint
        makes a new one when it changes)."""
        port = self._port
        if port is None or interpreted.interpreting():
            return None
        if self._flat is None:
            flat = self._memory.flat_tables()
            if len(flat.gpa_starts) > blk_kernel.MAX_REGIONS:
                return None
            self._memory_table = dma_kernel.region_table(flat.gpa_starts, flat.gpa_lasts, flat.host_addresses)
            self._flat = flat
        return port.kernel_arguments(self._memory_table)

    def _segments(self, iova: int, size: int, access: Access, what: str) -> tuple[tuple[int, int], ...]:
        if size <= 0:
            raise GuestMemoryError(f"{what}: empty range at IOVA {iova:#x}")
        if iova + size - 1 > U64_MAX:
            raise GuestMemoryError(f"{what}: {size} bytes at IOVA {iova:#x} wrap the 64-bit address space")
        result = self._translate(iova, size, access)
        if isinstance(result, Fault):
            self._on_fault()
            raise TranslationFault(what, result)
        return result.segments

    def _contiguous(self, iova: int, size: int, access: Access, what: str) -> ByteView:
        """One view of a range that must be contiguous in guest-physical memory (a ring, a table)."""
        segments = self._segments(iova, size, access, what)
        start, _length = segments[0]
        position = start
        for physical, length in segments:
            if physical != position:
                raise GuestMemoryError(
                    f"{what} at IOVA {iova:#x}+{size:#x} is not contiguous in guest-physical memory"
                )
            position += length
        return self._memory.gpa_view(start, size)

    def uva_view(self, iova: int, size: int) -> ByteView:
        """A ring (SplitQueue calls ring addresses front-end addresses; here they are IOVAs)."""
        return self._contiguous(iova, size, RING_ACCESS, "ring")

    def gpa_view(self, iova: int, size: int) -> ByteView:
        """An indirect descriptor table (read by the device)."""
        return self._contiguous(iova, size, Access.READ, "indirect table")

    def gpa_segments(self, iova: int, size: int, device_writes: int = 0) -> list[ByteView]:
        """A buffer the device reads, or with ``device_writes`` writes."""
        if device_writes:
            return self._views(self._segments(iova, size, Access.WRITE, "writable buffer"))
        return self._views(self._segments(iova, size, Access.READ, "buffer"))

    def _views(self, segments: tuple[tuple[int, int], ...]) -> list[ByteView]:
        if len(segments) == 1:
            return self._memory.gpa_segments(*segments[0])
        views: list[ByteView] = []
        for physical, length in segments:
            views.extend(self._memory.gpa_segments(physical, length))
        return views

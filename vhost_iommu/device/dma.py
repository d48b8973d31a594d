"""`DmaPort`: one endpoint's DMA through one `IommuDevice`, translated by the compiled kernels.

An endpoint model (the DMA engine served over vfio-user, a test) does its accesses through a port: every
byte goes through the device's translation state as `vhost_iommu.device.translation` defines it, in
address order, a chunk of at most a page at a time (`vhost_iommu.jit.dma.dma_transfer`). A chunk that
cannot be translated is not touched and ends the operation; its fault is recorded as
`IommuDevice.translate` records one (fault counters; the 24-byte event queued for the eventq when the
IOMMU manages the endpoint; the back-end moves queued events into the driver's eventq buffers,
`VirtioIommuBackend.deliver_events`). A chunk translated outside the guest's RAM ends it with
``NOT_GUEST_RAM``, also untouched.

Ordering with the request path: each chunk holds the device's translation guard (``jit/guard.py``) shared
from its translation to the end of its access, and every change of the translation state holds it
exclusively before its answer is published, so once the driver sees an UNMAP, DETACH or ATTACH completed,
no access through the old translation is running or will run (docs/architecture.md).

A port may be used from any thread (the kernels run without the interpreter lock), one operation at a
time per port; the guest memory passed in must stay mapped for the call (``GuestMemory.flat_tables()``
holds its regions' views).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, replace
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from vhost_iommu.device.core import IommuDevice
from vhost_iommu.device.layout import U64_MAX, Access, FaultReason
from vhost_iommu.device.translation import Fault, Translation, check_access
from vhost_iommu.jit import dma as kernel
from vhost_iommu.jit import interpreted
from vhost_iommu.jit import requests as requests_kernel
from vhost_iommu.jit.tables import MappingTable
from vhost_iommu.memory import FlatRegions

NOT_GUEST_RAM: Final = 5
"""``DmaResult.error``: an access translated to a guest-physical address outside the guest's RAM (the
DMA engine's ERROR register value, docs/dma-engine.md)."""
LAST_FAULTS: Final = 16
"""Faults a port keeps (the newest)."""
RECORDED_SEGMENTS: Final = 68
"""Segments a recorded translation finds room for in the port's own arrays (a 256 KiB buffer's pages and
the spare the sizing rule adds); a longer access gets arrays of its own."""

ByteArray = npt.NDArray[np.uint8]

_COUNTER_WORDS: Final = {
    "bytes_read": kernel.O_BYTES_READ,
    "bytes_written": kernel.O_BYTES_WRITTEN,
    "page_translations": kernel.O_TRANSLATIONS,
    "bypassed_accesses": kernel.O_BYPASSED,
}
"""``counters()``' names of the kernel's cumulative ``out`` words."""


@dataclass(frozen=True, slots=True)
class DmaResult:
    """How a DMA operation ended: ``done_bytes`` whole chunks done, then at most one of a fault, an
    error (``NOT_GUEST_RAM`` at ``error_address``, guest-physical) or COMPARE's first mismatch."""

    done_bytes: int
    fault: Fault | None
    error: int  # 0 or NOT_GUEST_RAM
    mismatch_offset: int | None
    error_address: int | None = None

    @property
    def ok(self) -> bool:
        """Ran to its end: no fault, no error (a COMPARE may still have found a mismatch)."""
        return self.fault is None and not self.error


class DmaPort:
    """DMA of ``endpoint`` through ``device``. Counters (``counters()``) are the port's own, over its life:
    guest bytes read and written, page translations (runs translated through a mapping), bypassed
    accesses (chunk accesses translated by bypass), faults; ``last_faults`` keeps the newest faults, each
    with its explanation from the device's mapping history (``Fault.explanation``)."""

    def __init__(self, device: IommuDevice, endpoint: int) -> None:
        self.device = device
        self.endpoint = endpoint
        self.faults = 0
        self.last_faults: deque[Fault] = deque(maxlen=LAST_FAULTS)
        # The kernel's ``out`` words: its counts accumulate here over the port's life.
        self._out = np.zeros(kernel.OUT_WORDS, np.uint64)
        self._cache = np.zeros(kernel.CACHE_WORDS, np.uint64)
        self._walk = np.zeros(kernel.C_WORDS, np.uint64)  # translate()'s own cache
        self._segments = (np.empty(RECORDED_SEGMENTS, np.uint64), np.empty(RECORDED_SEGMENTS, np.uint64))
        self._state_key: tuple[int, bool] | None = None  # what _state_args was fetched under
        self._state_args: tuple[Any, ...] = ()
        self._scratch = np.zeros((kernel.SCRATCH_ROWS, kernel.CHUNK), np.uint64)
        # The last guest memory given and its region table (kept until another is given: building the
        # table costs more than a small transfer).
        self._memory: FlatRegions | None = None
        self._memory_table = np.zeros((0, 3), np.uint64)

    # -- operations ----------------------------------------------------------------------------------

    def copy(self, memory: FlatRegions, src_iova: int, dst_iova: int, length: int) -> DmaResult:
        """Copy ``length`` bytes from ``src_iova`` to ``dst_iova`` (both translated)."""
        return self._run(kernel.OP_COPY, memory, src_iova, dst_iova, length)

    def fill(self, memory: FlatRegions, dst_iova: int, length: int, pattern: int) -> DmaResult:
        """Write ``pattern`` (8 bytes, little-endian: byte i of the operation is byte i % 8 of it)."""
        if not 0 <= pattern <= U64_MAX:
            raise ValueError(f"pattern {pattern:#x} is not 8 bytes")
        return self._run(kernel.OP_FILL, memory, 0, dst_iova, length, pattern=pattern)

    def compare(self, memory: FlatRegions, a_iova: int, b_iova: int, length: int) -> DmaResult:
        """Compare two ranges (both read); ``mismatch_offset`` is the first differing byte's offset."""
        return self._run(kernel.OP_COMPARE, memory, a_iova, b_iova, length)

    def read(self, memory: FlatRegions, iova: int, out: ByteArray) -> DmaResult:
        """Read ``len(out)`` bytes at ``iova`` into ``out`` (a writeable contiguous uint8 array)."""
        _check_buffer(out, writeable=True)
        return self._run(kernel.OP_READ, memory, iova, 0, out.size, buffer=out)

    def write(self, memory: FlatRegions, iova: int, data: ByteArray) -> DmaResult:
        """Write the bytes of ``data`` (a contiguous uint8 array) at ``iova``."""
        _check_buffer(data, writeable=False)
        return self._run(kernel.OP_WRITE, memory, 0, iova, data.size, buffer=data)

    def translate(
        self, iova: int, length: int, access: Access, *, record: bool = False
    ) -> Translation | Fault:
        """What the kernels make of one access, without doing it. By default nothing is recorded (for
        tools: the same answer as ``IommuDevice.translate(..., report=False)``); with ``record`` (a device
        model that will access the segments itself, such as virtio-blk's rings and buffers) the page
        translations and bypassed accesses are counted in the port's counters and a fault is recorded as
        an operation's is (counters, last faults, the event queued for the eventq)."""
        check_access(iova, length, access)
        capacity = min(length, 1 << 16) // 4096 + 4
        # A device model's own translations (record) are the hot path: one at a time per port, so they
        # count straight into the port's words and use the port's segment arrays; a tool's get their own.
        if record and capacity <= len(self._segments[0]):
            phys, lengths = self._segments
            out = self._out
        else:
            phys, lengths = np.empty(capacity, np.uint64), np.empty(capacity, np.uint64)
            out = np.zeros(kernel.OUT_WORDS, np.uint64)
        translations = out[kernel.O_TRANSLATIONS]
        bypassed = out[kernel.O_BYPASSED]
        translate = interpreted.kernel(kernel.translate)
        query = (np.uint64(iova), np.uint64(length), int(access))
        while True:
            guard = self.device.translation_guard.words
            count = translate(*(guard, *self._state(), *query, phys, lengths, out, self._walk))
            if count == kernel.TRANSLATE_OVERFLOW or count == kernel.TRANSLATE_STALE:
                out[kernel.O_TRANSLATIONS] = translations  # counted again by the next try
                out[kernel.O_BYPASSED] = bypassed
                if count == kernel.TRANSLATE_OVERFLOW:
                    capacity *= 4
                    phys, lengths = np.empty(capacity, np.uint64), np.empty(capacity, np.uint64)
                continue
            break
        if count < 0:
            return self._record(self._fault(out)) if record else self._fault(out)
        segments = tuple(zip(phys[:count].tolist(), lengths[:count].tolist(), strict=True))
        return Translation(iova, length, segments, bypass=bool(out[kernel.O_BYPASSED] != bypassed))

    def kernel_arguments(self, memory_table: Any) -> tuple[Any, ...]:
        """A device model's own kernel's arguments for translating through this port, as ``translate`` with
        ``record`` does: the guard, the translation state (one tuple, generation first), the port's
        counter words and walk cache, then ``memory_table`` (``jit/blk.serve_blk``'s order). One caller at
        a time."""
        return (self.device.translation_guard.words, self._state(), self._out, self._walk, memory_table)

    # -- counters ------------------------------------------------------------------------------------

    def counters(self) -> dict[str, int]:
        counters = {name: int(self._out[word]) for name, word in _COUNTER_WORDS.items()}
        counters["faults"] = self.faults
        return counters

    def forget_memory(self) -> None:
        """Drop the guest memory kept from the last operation (its session ended)."""
        self._memory = None
        self._memory_table = np.zeros((0, 3), np.uint64)

    # -- internals -----------------------------------------------------------------------------------

    def _state(self) -> tuple[Any, ...]:
        """The kernels' arguments after the guard: the generation first, read before any array, so a
        change made while they are fetched is seen by the kernel (it returns for new ones). Kept while the
        generation and the global bypass stay: arrays are replaced only under a new generation."""
        device = self.device
        generation = device.translation_guard.generation
        key = (generation, device.bypass)
        if key != self._state_key:
            self._state_args = self._fetch_state(generation)
            self._state_key = key
        return self._state_args

    def _fetch_state(self, generation: int) -> tuple[Any, ...]:
        device = self.device
        store = device.store
        if not isinstance(store, MappingTable):
            raise TypeError("DMA needs the device's compiled mapping table (a MappingTable store)")
        domains = device.domain_table
        leaves, nodes, directory, _meta = store.arrays
        slot = domains.slot(self.endpoint)
        return (
            generation,
            device.bypass,
            -1 if slot is None else slot,
            domains.endpoint_domain,
            domains.bypass,
            int(domains.first),
            domains.region_starts,
            domains.region_ends,
            domains.region_kinds,
            domains.region_offsets,
            leaves,
            nodes,
            directory,
        )

    def _run(
        self,
        op: int,
        memory: FlatRegions,
        src: int,
        dst: int,
        length: int,
        *,
        pattern: int = 0,
        buffer: ByteArray | None = None,
    ) -> DmaResult:
        if length < 0:
            raise ValueError(f"length {length} is negative")
        if length == 0:
            return DmaResult(0, None, 0, None)
        for address in (src, dst):
            if not 0 <= address <= U64_MAX - (length - 1):
                raise ValueError(f"{length} bytes at {address:#x} are not within the 64-bit address space")
        if memory is not self._memory:
            self._memory_table = kernel.region_table(
                memory.gpa_starts, memory.gpa_lasts, memory.host_addresses
            )
            self._memory = memory
        host = np.uint64(0 if buffer is None else buffer.ctypes.data)
        out = self._out
        out[kernel.O_DONE] = 0
        guard = self.device.translation_guard.words
        operation = (
            self._memory_table,
            np.uint64(src),
            np.uint64(dst),
            np.uint64(length),
            np.uint64(pattern),
            host,
        )
        while True:
            arguments = (op, guard, *self._state(), *operation, out, self._cache, self._scratch)
            reason = interpreted.kernel(kernel.dma_transfer)(*arguments)
            if reason != kernel.DMA_STALE:
                break  # stale: Python code replaced arrays; go on from out[O_DONE] with the new ones
        done = int(out[kernel.O_DONE])
        if reason == kernel.DMA_FAULT:
            return DmaResult(done, self._record(self._fault(out)), 0, None)
        if reason == kernel.DMA_NOT_GUEST_RAM:
            return DmaResult(done, None, NOT_GUEST_RAM, None, int(out[kernel.O_ERROR_ADDRESS]))
        if reason == kernel.DMA_MISMATCH:
            return DmaResult(done, None, 0, int(out[kernel.O_MISMATCH]))
        return DmaResult(done, None, 0, None)

    def _record(self, fault: Fault) -> Fault:
        """Explain ``fault`` from the mapping history and record it in the device and the port."""
        at = int(interpreted.kernel(requests_kernel.cycles)())
        fault = self.device.record_fault(replace(fault, explanation=self.device.explain(fault, at)))
        self.faults += 1
        self.last_faults.append(fault)
        return fault

    def _fault(self, out: npt.NDArray[np.uint64]) -> Fault:
        return Fault(
            FaultReason(int(out[kernel.O_FAULT_REASON])),
            int(out[kernel.O_FAULT_FLAGS]),
            self.endpoint,
            int(out[kernel.O_FAULT_ADDRESS]),
            reported=False,
        )


def _check_buffer(buffer: ByteArray, *, writeable: bool) -> None:
    if not isinstance(buffer, np.ndarray) or buffer.dtype != np.uint8 or not buffer.flags.c_contiguous:
        raise ValueError("the host buffer must be a contiguous numpy uint8 array")
    if writeable and not buffer.flags.writeable:
        raise ValueError("the host buffer must be writeable")

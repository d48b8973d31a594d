"""The translation guard: no DMA access through a translation its UNMAP, DETACH or ATTACH already removed.

One small int64 array per device (``IommuDevice.translation_guard.words``) is shared by every thread that
reads or changes the translation state (domain arrays, reserved regions, the mapping table):

``G_LOCK``        a reader-writer spin lock, taken with atomic compare-and-swap: bit 0 is the writer,
                  each reader adds ``READER``. A DMA operation holds it shared across the translation
                  and the access of one chunk (at most a page); whoever changes the state holds it
                  exclusively from before the change until after it, and only then publishes the used
                  entry. So when the driver can see an UNMAP completed, every access translated through
                  the old state has ended (it held the lock before the change could start), and every
                  later one translates through the new state. A writer sets its bit first and then waits
                  for the readers to drain, and no reader enters while the bit is set: a DMA that runs
                  for long cannot starve the request path (it waits for one chunk at most).
``G_EPOCH``       counts exclusive holds: a translation cached by a DMA operation (its last mapping) is
                  valid only while the epoch is the one it was cached under, read under the shared hold.
``G_GENERATION``  counts exclusive holds by Python code, which may replace arrays (table growth, new
                  reserved regions, a restored snapshot): a DMA kernel given the old arrays sees the
                  generation move under its hold and returns to its caller for the new ones.
``G_UNGUARDED``   test only: 1 makes readers skip the lock (tests/test_dma_race.py proves the race test
                  fails without the guard). Never set outside tests.

The lock word is changed only by the atomic operations below; the others are plain words written under
the exclusive hold and read under a hold. Spinning yields the CPU (sched_yield) after a short while, since
the holder may be a thread the scheduler has to run first (this machine may have fewer cores than threads).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from typing import Any, Final

import numpy as np
import numpy.typing as npt
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from vhost_iommu.jit import native
from vhost_iommu.jit.interpreted import compiles, kernel, stand_in

I64Array = npt.NDArray[np.int64]

G_LOCK: Final = 0
G_EPOCH: Final = 1
G_GENERATION: Final = 2
G_UNGUARDED: Final = 3
G_WRITE_HOLDS: Final = 4
"""Exclusive holds taken (statistics, with the two below)."""
G_WRITE_WAITS: Final = 5
"""Exclusive holds that found the lock taken and had to spin."""
G_READ_WAITS: Final = 6
"""Shared holds that found a writer and had to spin (not counted exactly: several readers add at once)."""
GUARD_WORDS: Final = 8

WRITER: Final = 1
READER: Final = 2

SPINS_BEFORE_YIELD: Final = 64

_I64 = ir.IntType(64)


def _pointer(builder: Any, address: Any) -> Any:
    return builder.inttoptr(address, _I64.as_pointer())


def _compare_and_swap_typer(typingctx: Any, address: Any, expected: Any, desired: Any) -> Any:
    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        # acquire on success: what the previous holder did before its release is seen after this.
        pair = builder.cmpxchg(_pointer(builder, args[0]), args[1], args[2], "acq_rel", "monotonic")
        return builder.extract_value(pair, 0)

    return types.int64(types.uint64, types.int64, types.int64), codegen


def _fetch_add_release_typer(typingctx: Any, address: Any, value: Any) -> Any:
    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.atomic_rmw("add", _pointer(builder, args[0]), args[1], "release")

    return types.int64(types.uint64, types.int64), codegen


def _load_acquire_typer(typingctx: Any, address: Any) -> Any:
    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.load_atomic(_pointer(builder, args[0]), "acquire", 8)

    return types.int64(types.uint64), codegen


def _store_release_typer(typingctx: Any, address: Any, value: Any) -> Any:
    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        builder.store_atomic(args[1], _pointer(builder, args[0]), "release", 8)
        return context.get_dummy_value()

    return types.void(types.uint64, types.int64), codegen


def _sched_yield_typer(typingctx: Any) -> Any:
    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        prototype = ir.FunctionType(ir.IntType(32), [])
        function = cgutils.get_or_insert_function(builder.module, prototype, "sched_yield")  # type: ignore[no-untyped-call]
        builder.call(function, [])
        return context.get_dummy_value()

    return types.void(), codegen


# Typed as Any: numba supplies the typing context argument, so the Python-level signatures mislead mypy.
_compare_and_swap: Any = intrinsic(_compare_and_swap_typer)
_fetch_add_release: Any = intrinsic(_fetch_add_release_typer)
_load_acquire: Any = intrinsic(_load_acquire_typer)
_store_release: Any = intrinsic(_store_release_typer)
_sched_yield: Any = intrinsic(_sched_yield_typer)
stand_in(_compare_and_swap, native.compare_and_swap)
stand_in(_fetch_add_release, native.fetch_add_release)
stand_in(_load_acquire, native.load_acquire)
stand_in(_store_release, native.store_release)
stand_in(_sched_yield, os.sched_yield)


@njit(cache=True, nogil=True)
def _lock_address(guard: I64Array) -> np.uint64:
    return np.uint64(guard.ctypes.data) + np.uint64(8 * G_LOCK)


@njit(cache=True, nogil=True)
def _pause(spins: int) -> int:
    """One spin; every SPINS_BEFORE_YIELD spins give the CPU away. Returns the new spin count."""
    spins += 1
    if spins >= SPINS_BEFORE_YIELD:
        _sched_yield()
        return 0
    return spins


@njit(cache=True, nogil=True)
def read_hold(guard: I64Array) -> None:
    """Take the guard shared (a DMA chunk: translate, then access). Skipped under ``G_UNGUARDED``."""
    if guard[G_UNGUARDED]:
        return
    address = _lock_address(guard)
    spins = 0
    waited = False
    while True:
        word = _load_acquire(address)
        if word & WRITER == 0 and _compare_and_swap(address, word, word + READER) == word:
            break
        if word & WRITER:
            waited = True
        spins = _pause(spins)
    if waited:
        guard[G_READ_WAITS] += 1  # under the hold, but other readers add too: statistics only


@njit(cache=True, nogil=True)
def read_release(guard: I64Array) -> None:
    if guard[G_UNGUARDED]:
        return
    _fetch_add_release(_lock_address(guard), -READER)


@njit(cache=True, nogil=True)
def write_hold(guard: I64Array) -> None:
    """Take the guard exclusively (a change of the translation state): set the writer bit, which keeps
    new readers out, then wait for the readers inside to leave (each is inside one chunk at most)."""
    address = _lock_address(guard)
    spins = 0
    waited = False
    while True:
        word = _load_acquire(address)
        if word & WRITER == 0 and _compare_and_swap(address, word, word | WRITER) == word:
            break
        waited = True
        spins = _pause(spins)
    while _load_acquire(address) != WRITER:
        waited = True
        spins = _pause(spins)
    guard[G_WRITE_HOLDS] += 1
    if waited:
        guard[G_WRITE_WAITS] += 1


@njit(cache=True, nogil=True)
def write_release(guard: I64Array, arrays_replaced: bool) -> None:
    """End an exclusive hold: cached translations die (epoch), and with ``arrays_replaced`` a DMA kernel
    holding the old arrays returns for the new ones (generation). Publish the used entry after this."""
    guard[G_EPOCH] += 1
    if arrays_replaced:
        guard[G_GENERATION] += 1
    _store_release(_lock_address(guard), 0)


class TranslationGuard:
    """The device's guard words, and the exclusive hold Python code takes around every change of the
    translation state (``changing``). Re-entrant on the thread that holds it (a device reset inside a
    restore); the compiled request path takes and releases it itself, per request."""

    def __init__(self) -> None:
        self.words: I64Array = np.zeros(GUARD_WORDS, np.int64)
        self._owner: int | None = None
        self._depth = 0

    @contextlib.contextmanager
    def changing(self) -> Iterator[None]:
        """Hold the guard exclusively for the block; releasing it moves the generation (Python code may
        have replaced arrays). Publish what the change answers after the block."""
        me = threading.get_ident()
        if self._owner == me:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        kernel(write_hold)(self.words)  # nogil: a DMA thread inside a chunk finishes it meanwhile
        self._owner = me
        try:
            yield
        finally:
            self._owner = None
            kernel(write_release)(self.words, True)

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        """Hold the guard shared for the block: Python code reading the translation state on a thread
        other than the one changing it (a fault explained on a DMA thread)."""
        if self._owner == threading.get_ident():
            yield
            return
        kernel(read_hold)(self.words)
        try:
            yield
        finally:
            kernel(read_release)(self.words)

    @property
    def epoch(self) -> int:
        return int(self.words[G_EPOCH])

    @property
    def generation(self) -> int:
        return int(self.words[G_GENERATION])

    def counters(self) -> dict[str, int]:
        words = self.words
        return {
            "write_holds": int(words[G_WRITE_HOLDS]),
            "write_waits": int(words[G_WRITE_WAITS]),
            "read_waits": int(words[G_READ_WAITS]),
        }


@compiles
def warm_up() -> None:
    guard = TranslationGuard()
    with guard.changing():
        pass
    read_hold(guard.words)
    read_release(guard.words)

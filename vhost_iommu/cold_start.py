"""A cold start: serve from the first request while numba compiles the kernels in the background.

From an empty numba cache the kernels take half a minute to compile on a small machine. ``begin`` (serve,
once its sockets listen) looks at numba's cache first: when every kernel is there nothing changes (they
are loaded from it before the first message is read, well under a second, and no thread is started).
Otherwise every Python caller of a kernel gets its interpreted twin (``vhost_iommu.jit.interpreted``: the
kernel's own code run by the interpreter, the same answers over the same arrays), every requestq is
served by the Python path, and a thread compiles the kernels (``vhost_iommu.jit.warm_up``, which also
fills numba's cache for the next start). When it is done, a callback on the event loop, which runs only
between batches, hands every caller the compiled kernels and tells each waiting back-end
(``kernels_compiled``): its next batch takes the compiled path, and its requestq thread starts. No
request ever waits for the compiler.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, Protocol

from vhost_iommu.jit import interpreted

log = logging.getLogger(__name__)


class WaitsForKernels(Protocol):
    def kernels_compiled(self) -> None:
        """The compiled kernels serve from now on (called on the event loop, between batches)."""


_waiting: weakref.WeakSet[Any] = weakref.WeakSet()


def when_compiled(backend: WaitsForKernels) -> None:
    """Call ``backend.kernels_compiled()`` once the background compile is done (held weakly: a
    session that ends first is forgotten)."""
    _waiting.add(backend)


def _kernels() -> list[Any]:
    """Every kernel of the package (numba dispatchers of the ``vhost_iommu.jit`` modules)."""
    from numba.core.dispatcher import Dispatcher

    from vhost_iommu.jit import barriers, blk, bulk, dma, guard, kickloop, requests, tables

    found = []
    for module in (barriers, guard, tables, bulk, requests, kickloop, dma, blk):
        for value in vars(module).values():
            if isinstance(value, Dispatcher) and value.py_func.__module__ == module.__name__:
                found.append(value)
    return found


def kernels_cached() -> bool:
    """Whether numba's on-disk cache is warm: some kernel has an index file, and every index file holds
    an entry whose key, recomputed from today's sources, is still the one it was stored under (numba
    keeps no index for a kernel only ever compiled into others). Reads only the small index files: a few
    milliseconds. An edited kernel source makes its index stale: cold again."""
    indexed = 0
    try:
        for kernel in _kernels():
            cache = kernel._cache
            cache_file = getattr(cache, "_cache_file", None)
            if cache_file is None:
                return False  # numba found no place to cache in: every start compiles
            if not os.path.exists(cache_file._index_path):
                continue
            codegen = kernel.targetctx.codegen()
            if not any(key == cache._index_key(key[0], codegen) for key in cache_file._load_index()):
                return False
            indexed += 1
    except (AttributeError, TypeError, OSError) as exc:  # numba's internals moved: assume cold (safe)
        log.debug("cannot read numba's cache index: %s", exc)
        return False
    return indexed > 0


class BackgroundCompile:
    """The thread that compiles the kernels, and the switch to them on the event loop when it is done.
    ``compile`` is the work (``vhost_iommu.jit.warm_up``; a test passes one it controls)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, compile: Callable[[], None]) -> None:
        self._loop = loop
        self._compile = compile
        self.started = time.monotonic()
        #: Seconds from the start to the switch (None until the compiled kernels serve).
        self.seconds: float | None = None
        self.error: BaseException | None = None
        self.switched = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vhost-iommu compile", daemon=True)

    def start(self) -> None:
        interpreted.set_interpreting(True)
        log.warning(
            "compiling the request kernels in the background (numba's cache lacks them: a first start, or "
            "a kernel changed); serving with the Python path meanwhile"
        )
        self._thread.start()

    def _run(self) -> None:
        try:
            with interpreted.compiling():
                self._compile()
        except BaseException as exc:  # the Python path keeps serving: correct, only slower
            self.error = exc
        with contextlib.suppress(RuntimeError):  # the loop closed first: the program is ending
            self._loop.call_soon_threadsafe(self._switch)

    def _switch(self) -> None:
        """On the event loop, so between batches: from here on every caller gets compiled kernels."""
        if self.error is not None:
            log.error("compiling the kernels failed (%s): the Python path keeps serving", self.error)
            return
        interpreted.set_interpreting(False)
        self.seconds = time.monotonic() - self.started
        log.warning("request kernels compiled in %.1f s: the compiled path serves from now on", self.seconds)
        for backend in list(_waiting):
            backend.kernels_compiled()
        _waiting.clear()
        self.switched.set()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)


def begin(
    loop: asyncio.AbstractEventLoop, compile: Callable[[], None] | None = None
) -> BackgroundCompile | None:
    """At serve, before ``loop`` serves and once the sockets listen: with numba's cache warm, load every
    kernel from it now (``compile``, by default ``jit.warm_up``: well under a second, before the first
    message is read) and return None; else serve interpreted and compile in the background (returned)."""
    if compile is None:
        from vhost_iommu.jit import warm_up

        compile = warm_up
    if kernels_cached():
        compile()
        return None
    background = BackgroundCompile(loop, compile)
    background.start()
    return background

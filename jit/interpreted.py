"""Kernels run by the interpreter while numba compiles them: a cold start serves from the first request.

Compiling every kernel from an empty numba cache takes half a minute on a small machine; a back-end that
waited for it would leave QEMU without a socket. Until the background warm-up has compiled them
(``vhost_iommu.warm``), Python callers get each kernel's *interpreted twin*: the kernel's own Python
function run by the interpreter, with the kernels it calls replaced by their twins and each intrinsic by
the stand-in registered beside it (``stand_in``). So the answers are the kernels' own, from the same
source, over the same arrays: when the compiled kernels take over nothing is converted.

Python callers of kernels (the tables' owner, the guard, the mapping history, the rings' fences, a DMA
port) call ``kernel(dispatcher)(...)``: the dispatcher itself unless twins are in use. A thread that
compiles (the warm-up) marks itself with ``compiling()`` and always gets the dispatchers.

While twins are in use nothing compiled runs: the requestq thread starts only with the compiled path,
so every twin runs on the event loop's thread (or a test's), one at a time under the interpreter lock.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import types
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import numpy as np
from numba.core.dispatcher import Dispatcher

K = TypeVar("K")

_interpreting = False
_compiling = threading.local()
_stand_ins: dict[int, Callable[..., Any]] = {}
_namespaces: dict[str, dict[str, Any]] = {}
_twins: dict[int, Callable[..., Any]] = {}
_twins_lock = threading.Lock()
_PACKAGE = "vhost_iommu.jit."


def stand_in(intrinsic: Any, function: Callable[..., Any]) -> None:
    """Register ``function`` as what an interpreted twin calls where its kernel calls ``intrinsic``."""
    _stand_ins[id(intrinsic)] = function


def kernel(dispatcher: K) -> K:
    """``dispatcher`` as a Python caller should call it now: compiled, or its interpreted twin."""
    if not _interpreting or getattr(_compiling, "active", False):
        return dispatcher
    return twin(dispatcher)  # type: ignore[return-value]


def interpreting() -> bool:
    """Whether Python callers get interpreted twins (a cold start whose kernels are not compiled yet)."""
    return _interpreting


def set_interpreting(value: bool) -> None:
    """Switch every Python caller to the twins (True) or to the compiled kernels (False). Switch only
    where no kernel call is under way (the serving thread, between batches)."""
    global _interpreting
    _interpreting = value


@contextlib.contextmanager
def compiling() -> Iterator[None]:
    """Inside the block this thread calls the dispatchers themselves (and so compiles them)."""
    _compiling.active = True
    try:
        yield
    finally:
        _compiling.active = False


F = TypeVar("F", bound=Callable[..., Any])


def compiles(warm_up: F) -> F:
    """Decorate a module's ``warm_up``: it compiles, whatever the process's Python callers get."""

    def compiling_warm_up(*arguments: Any, **keywords: Any) -> Any:
        with compiling():
            return warm_up(*arguments, **keywords)

    return compiling_warm_up  # type: ignore[return-value]


def twin(dispatcher: Any) -> Callable[..., Any]:
    """The interpreted twin of the kernel ``dispatcher`` (made once)."""
    found = _twins.get(id(dispatcher))
    if found is not None:
        return found
    with _twins_lock:
        return _twin_locked(dispatcher)


def _twin_locked(dispatcher: Any) -> Callable[..., Any]:
    found = _twins.get(id(dispatcher))
    if found is not None:
        return found
    function = dispatcher.py_func
    rebound = _rebound(function)

    def interpreted(*arguments: Any) -> Any:
        # numba wraps integer arithmetic silently; numpy scalars would warn about the same wrap.
        with np.errstate(over="ignore"):
            return rebound(*arguments)

    interpreted.__name__ = f"{function.__name__} (interpreted)"
    _twins[id(dispatcher)] = interpreted
    return interpreted


def _rebound(function: types.FunctionType) -> types.FunctionType:
    """``function`` with its module's twin namespace as its globals."""
    rebound = types.FunctionType(
        function.__code__,
        _namespace(function.__module__),
        function.__name__,
        function.__defaults__,
        function.__closure__,
    )
    rebound.__kwdefaults__ = function.__kwdefaults__
    return rebound


def _namespace(module_name: str) -> dict[str, Any]:
    """A copy of a kernel module's globals in which kernels are twins and intrinsics stand-ins: what
    the twins of its kernels see as globals (the module itself is left as it is: numba compiles from
    it meanwhile). Names are replaced, not module attributes: a kernel calls what it imported by name."""
    namespace = _namespaces.get(module_name)
    if namespace is not None:
        return namespace
    namespace = dict(sys.modules[module_name].__dict__)
    _namespaces[module_name] = namespace  # before the loop: kernels of one module call each other
    for name, value in list(namespace.items()):
        if isinstance(value, Dispatcher):
            namespace[name] = _twin_locked(value)
        elif id(value) in _stand_ins:
            namespace[name] = _stand_ins[id(value)]
        elif isinstance(value, types.FunctionType) and value.__module__.startswith(_PACKAGE):
            # A plain function the kernels compile in (register_jitable) may call kernels and
            # intrinsics too: it sees the twins' names as well.
            namespace[name] = _rebound(value)
    if "prange" in namespace:
        namespace["prange"] = range
    return namespace

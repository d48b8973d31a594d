"""numba's on-disk cache, keyed on every source a kernel is compiled from.

numba keys a function's cache entry on its own file only. A kernel that calls kernels of other modules
compiles them into itself, and every int global it reads (the numbers of ``vhost_iommu.abi``) is frozen
into its code: an edit of any of those files must invalidate its entry too, or it would run old code.
Every kernel of a module is keyed alike, since one compiled into another is loaded from its own entry.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import ModuleType
from typing import Any

from numba.core.caching import FunctionCache
from numba.core.dispatcher import Dispatcher


class _CacheWithDependencies(FunctionCache):
    def __init__(self, py_func: Any, dependencies: str) -> None:
        super().__init__(py_func)  # type: ignore[no-untyped-call]
        self._dependencies = dependencies

    def _index_key(self, sig: Any, codegen: Any) -> Any:
        return (*super()._index_key(sig, codegen), self._dependencies)  # type: ignore[no-untyped-call]


def cache_on_sources(namespace: dict[str, Any], *modules: ModuleType) -> None:
    """Key the cache entries of every ``njit(cache=True)`` kernel defined in the module whose globals are
    ``namespace`` on the sources of ``modules`` as well as its own. Call it at the end of that module,
    before any of its kernels is compiled."""
    digest = hashlib.sha256()
    for module in modules:
        digest.update(Path(str(module.__file__)).read_bytes())
    dependencies = digest.hexdigest()
    for value in namespace.values():
        if (
            isinstance(value, Dispatcher)
            and value.py_func.__module__ == namespace["__name__"]
            and isinstance(value._cache, FunctionCache)  # type: ignore[attr-defined]
        ):
            value._cache = _CacheWithDependencies(value.py_func, dependencies)  # type: ignore[attr-defined]

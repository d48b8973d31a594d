"""numba's on-disk cache, keyed on every source a kernel is compiled from.

numba keys a function's cache entry on its own file only. A kernel that calls kernels of other modules
compiles them into itself, and every int global it reads (the numbers of ``vhost_iommu.abi``) is frozen
into its code: an edit of any of those files must invalidate its entry too, or it would run old code.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import ModuleType
from typing import Any

from numba.core.caching import FunctionCache


class _CacheWithDependencies(FunctionCache):
    def __init__(self, py_func: Any, sources: list[str]) -> None:
        super().__init__(py_func)  # type: ignore[no-untyped-call]
        digest = hashlib.sha256()
        for source in sources:
            digest.update(Path(source).read_bytes())
        self._dependencies = digest.hexdigest()

    def _index_key(self, sig: Any, codegen: Any) -> Any:
        return (*super()._index_key(sig, codegen), self._dependencies)  # type: ignore[no-untyped-call]


def cache_depends_on(kernel: Any, *modules: ModuleType) -> None:
    """Key ``kernel``'s cache entries (an ``njit(cache=True)`` dispatcher not yet compiled) on the sources
    of ``modules`` as well as its own."""
    kernel._cache = _CacheWithDependencies(kernel.py_func, [str(module.__file__) for module in modules])

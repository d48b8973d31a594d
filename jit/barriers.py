"""Memory barriers for code that shares rings with another process through guest memory.

Python has no fence of its own; the virtqueue code needs a full (store-load) barrier where it publishes an
index and then reads the other side's, and numba exposes LLVM's ``fence seq_cst`` (``lock or`` on x86).
"""

from __future__ import annotations

from typing import Any

from numba import njit, types
from numba.extending import intrinsic

from vhost_iommu.jit import native
from vhost_iommu.jit.interpreted import stand_in


@intrinsic
def _fence_intrinsic(typingctx: Any) -> Any:
    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        builder.fence("seq_cst")
        return context.get_dummy_value()

    return types.void(), codegen


stand_in(_fence_intrinsic, native.full_fence)


@njit(cache=True)
def full_fence() -> None:
    """A full memory barrier, callable from Python and from numba code."""
    _fence_intrinsic()  # type: ignore[call-arg]  # numba supplies typingctx


def warm_up() -> None:
    full_fence()

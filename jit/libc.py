"""libc calls from numba kernels, without ctypes function pointers.

Each function is declared as an external symbol in the kernel's LLVM module (``numba.extending.intrinsic``)
and resolved by the JIT linker in the running process. A ctypes function pointer would work in nopython
mode too, but numba refuses to cache a function that holds one ("uses dynamic globals"), and compiling
the kernels that use these at every start would cost seconds. Addresses are passed as uint64 (numpy's
``ctypes.data``), results widened to int64; -1 means look at :data:`errno`.
"""

from __future__ import annotations

from typing import Any, Final

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

EINTR: Final = 4
EAGAIN: Final = 11


def _libc_call(name: str, result: ir.IntType, arguments: list[ir.Type]) -> Any:
    """Codegen of a call to the libc function ``name``; int64/uint64 arguments are narrowed or turned into
    pointers to fit its C prototype, and its result is widened to int64."""

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        prototype = ir.FunctionType(result, arguments)
        function = cgutils.get_or_insert_function(builder.module, prototype, name)  # type: ignore[no-untyped-call]
        converted = []
        for value, kind in zip(args, arguments, strict=True):
            if isinstance(kind, ir.PointerType):
                converted.append(builder.inttoptr(value, kind))
            elif kind.width < 64:
                converted.append(builder.trunc(value, kind))
            else:
                converted.append(value)
        returned = builder.call(function, converted)
        return builder.sext(returned, ir.IntType(64)) if result.width < 64 else returned

    return codegen


_BYTES = ir.IntType(8).as_pointer()
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)


def _poll_typer(typingctx: Any, fds: Any, count: Any, timeout: Any) -> Any:
    return types.int64(types.uint64, types.int64, types.int64), _libc_call("poll", _I32, [_BYTES, _I64, _I32])


def _read_typer(typingctx: Any, fd: Any, address: Any, length: Any) -> Any:
    return types.int64(types.int64, types.uint64, types.int64), _libc_call("read", _I64, [_I32, _BYTES, _I64])


def _write_typer(typingctx: Any, fd: Any, address: Any, length: Any) -> Any:
    return types.int64(types.int64, types.uint64, types.int64), _libc_call(
        "write", _I64, [_I32, _BYTES, _I64]
    )


def _preadv_typer(typingctx: Any, fd: Any, iovecs: Any, count: Any, offset: Any) -> Any:
    # ssize_t preadv(int fd, const struct iovec *iov, int iovcnt, off_t offset): iovecs are (base, length)
    # pairs of uint64, struct iovec's layout on every 64-bit Linux.
    return types.int64(types.int64, types.uint64, types.int64, types.int64), _libc_call(
        "preadv", _I64, [_I32, _BYTES, _I32, _I64]
    )


def _pwritev_typer(typingctx: Any, fd: Any, iovecs: Any, count: Any, offset: Any) -> Any:
    return types.int64(types.int64, types.uint64, types.int64, types.int64), _libc_call(
        "pwritev", _I64, [_I32, _BYTES, _I32, _I64]
    )


def _fdatasync_typer(typingctx: Any, fd: Any) -> Any:
    return types.int64(types.int64), _libc_call("fdatasync", _I32, [_I32])


def _errno_typer(typingctx: Any) -> Any:
    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        prototype = ir.FunctionType(_I32.as_pointer(), [])
        location = cgutils.get_or_insert_function(builder.module, prototype, "__errno_location")  # type: ignore[no-untyped-call]
        return builder.sext(builder.load(builder.call(location, [])), _I64)

    return types.int64(), codegen


# Typed as Any: numba supplies the typing context argument, so the Python-level signatures mislead mypy.
poll: Any = intrinsic(_poll_typer)
read: Any = intrinsic(_read_typer)
write: Any = intrinsic(_write_typer)
preadv: Any = intrinsic(_preadv_typer)
pwritev: Any = intrinsic(_pwritev_typer)
fdatasync: Any = intrinsic(_fdatasync_typer)
errno: Any = intrinsic(_errno_typer)

"""The few instructions Python cannot issue, for the kernels' interpreted twins (``jit/interpreted.py``).

Fences, the cycle counter and atomic read-modify-writes are LLVM instructions in the kernels (intrinsics);
their twins call these instead: the same instructions, built with llvmlite (numba's own code generator)
into one small module the first time a twin needs one (about 50 ms, no numba compilation) and called
through ctypes. Plain loads, stores and copies at host addresses need no instruction of their own.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Any

import numpy as np
from llvmlite import binding, ir

_I64 = ir.IntType(64)
_POINTER = _I64.as_pointer()


@functools.cache
def _library() -> tuple[Any, dict[str, Any]]:
    module = ir.Module(name="vhost_iommu_native")
    module.triple = binding.get_process_triple()

    def define(name: str, returns: ir.Type, *arguments: ir.Type) -> tuple[ir.IRBuilder, list[Any]]:
        function = ir.Function(module, ir.FunctionType(returns, arguments), name)
        return ir.IRBuilder(function.append_basic_block()), list(function.args)

    builder, _ = define("full_fence", ir.VoidType())
    builder.fence("seq_cst")
    builder.ret_void()
    builder, _ = define("release_fence", ir.VoidType())
    builder.fence("release")
    builder.ret_void()
    builder, _ = define("cycles", _I64)
    counter = module.declare_intrinsic("llvm.readcyclecounter", fnty=ir.FunctionType(_I64, []))
    builder.ret(builder.call(counter, []))
    builder, (address, expected, desired) = define("compare_and_swap", _I64, _I64, _I64, _I64)
    pair = builder.cmpxchg(builder.inttoptr(address, _POINTER), expected, desired, "acq_rel", "monotonic")
    builder.ret(builder.extract_value(pair, 0))
    builder, (address, value) = define("fetch_add_release", _I64, _I64, _I64)
    builder.ret(builder.atomic_rmw("add", builder.inttoptr(address, _POINTER), value, "release"))
    builder, (address,) = define("load_acquire", _I64, _I64)
    builder.ret(builder.load_atomic(builder.inttoptr(address, _POINTER), "acquire", 8))
    builder, (address, value) = define("store_release", ir.VoidType(), _I64, _I64)
    builder.store_atomic(value, builder.inttoptr(address, _POINTER), "release", 8)
    builder.ret_void()

    binding.initialize_native_target()
    binding.initialize_native_asmprinter()
    parsed = binding.parse_assembly(str(module))
    machine = binding.Target.from_default_triple().create_target_machine()
    engine = binding.create_mcjit_compiler(parsed, machine)
    engine.finalize_object()
    i64 = ctypes.c_int64
    prototypes = {
        "full_fence": ctypes.CFUNCTYPE(None),
        "release_fence": ctypes.CFUNCTYPE(None),
        "cycles": ctypes.CFUNCTYPE(ctypes.c_uint64),
        "compare_and_swap": ctypes.CFUNCTYPE(i64, i64, i64, i64),
        "fetch_add_release": ctypes.CFUNCTYPE(i64, i64, i64),
        "load_acquire": ctypes.CFUNCTYPE(i64, i64),
        "store_release": ctypes.CFUNCTYPE(None, i64, i64),
    }
    functions = {name: kind(engine.get_function_address(name)) for name, kind in prototypes.items()}
    return engine, functions  # the engine owns the code: kept alive with the functions


def _call(name: str, *arguments: Any) -> Any:
    return _library()[1][name](*(int(argument) for argument in arguments))


def _signed(address: Any) -> int:
    """A host address as ctypes' int64 argument (the same bits)."""
    return int(np.uint64(address).view(np.int64))


def full_fence() -> None:
    _call("full_fence")


def release_fence() -> None:
    _call("release_fence")


def cycles() -> np.uint64:
    return np.uint64(_call("cycles"))


def compare_and_swap(address: Any, expected: Any, desired: Any) -> np.int64:
    return np.int64(_call("compare_and_swap", _signed(address), expected, desired))


def fetch_add_release(address: Any, value: Any) -> np.int64:
    return np.int64(_call("fetch_add_release", _signed(address), value))


def load_acquire(address: Any) -> np.int64:
    return np.int64(_call("load_acquire", _signed(address)))


def store_release(address: Any, value: Any) -> None:
    _call("store_release", _signed(address), value)


_UNSIGNED = {8: ctypes.c_uint8, 16: ctypes.c_uint16, 32: ctypes.c_uint32, 64: ctypes.c_uint64}


def loader(width: int) -> Any:
    """A twin's unaligned little-endian load of ``width`` bits at a host address, zero-extended."""
    kind = _UNSIGNED[width]

    def load(address: Any) -> np.uint64:
        value = kind()
        ctypes.memmove(ctypes.addressof(value), int(address), width // 8)
        return np.uint64(value.value)

    return load


def storer(width: int) -> Any:
    """A twin's unaligned store of the low ``width`` bits of a value at a host address."""
    kind = _UNSIGNED[width]
    mask = (1 << width) - 1

    def store(address: Any, value: Any) -> None:
        word = kind(int(value) & mask)
        ctypes.memmove(int(address), ctypes.addressof(word), width // 8)

    return store


def memmove(destination: Any, source: Any, length: Any) -> None:
    ctypes.memmove(int(destination), int(source), int(length))

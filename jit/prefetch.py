"""A software prefetch hint for numba kernels.

Random lookups in a table larger than the caches wait on memory. A kernel that knows which rows it will
read next can ask for them early (``prefetch(array, row, column)``) and do other work meanwhile; the hint
never faults and never changes results, even for an address outside the array.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

from llvmlite import ir
from numba import types
from numba.core import cgutils as _cgutils
from numba.extending import intrinsic

from vhost_iommu.jit.interpreted import stand_in

# numba's code-generation helpers carry no annotations.
cgutils: Any = _cgutils

_READ = 0
_KEEP_IN_ALL_CACHE_LEVELS = 3
_DATA = 1


@intrinsic
def _prefetch(typing_context: Any, array: Any, row: Any, column: Any) -> Any:
    if not (isinstance(array, types.Array) and array.ndim == 2):
        return None
    if not (isinstance(row, types.Integer) and isinstance(column, types.Integer)):
        return None
    signature = types.void(array, row, column)

    def codegen(context: Any, builder: Any, signature: Any, arguments: Any) -> Any:
        array_type, row_type, column_type = signature.args
        array_value = context.make_array(array_type)(context, builder, arguments[0])
        indices = [
            context.cast(builder, arguments[1], row_type, types.intp),
            context.cast(builder, arguments[2], column_type, types.intp),
        ]
        # No wraparound or bounds check: a prefetch of a bad address is harmless by definition.
        pointer = cgutils.get_item_pointer2(
            context,
            builder,
            data=array_value.data,
            shape=cgutils.unpack_tuple(builder, array_value.shape),
            strides=cgutils.unpack_tuple(builder, array_value.strides),
            layout=array_type.layout,
            inds=indices,
            wraparound=False,
        )
        byte_pointer = ir.IntType(8).as_pointer()
        int32 = ir.IntType(32)
        function_type = ir.FunctionType(ir.VoidType(), [byte_pointer, int32, int32, int32])
        function = cgutils.get_or_insert_function(builder.module, function_type, "llvm.prefetch.p0i8")
        builder.call(
            function,
            [
                builder.bitcast(pointer, byte_pointer),
                ir.Constant(int32, _READ),
                ir.Constant(int32, _KEEP_IN_ALL_CACHE_LEVELS),
                ir.Constant(int32, _DATA),
            ],
        )
        return context.get_dummy_value()

    return signature, codegen


stand_in(_prefetch, lambda array, row, column: None)  # a hint: nothing to do in the interpreter

prefetch = cast(Callable[[Any, Any, Any], None], _prefetch)
"""``prefetch(array, row, column)`` in a kernel: hint that ``array[row, column]`` (a 2-D array) will be
read soon."""

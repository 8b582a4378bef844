"""What a C kernel gets from its vector types and atomics (csrc/simd.h, csrc/threads.h), for
numba, which has neither: a register tile on the stack, one fused multiply-add over a vector,
a vectorisable ldexp, bfloat16 rounding, acquire/release counters and a yield of the core. Each
is a few lines of LLVM IR; the loops that use them are plain numba (products.py, activations.py,
threads.py).
"""
import sys

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

VECTOR_BYTES = 64  # one AVX-512 register, a cache line (LLVM splits it on narrower CPUs)


def _element_type(dtype):  # numba's type for `array.dtype` as an argument of an intrinsic
    return dtype.dtype if isinstance(dtype, types.DType) else dtype.instance_type


@intrinsic
def lanes(typingctx, dtype):
    """The elements of `dtype` in one vector register: a constant in the compiled code."""
    count = VECTOR_BYTES // _element_type(dtype).bitwidth * 8

    def codegen(context, builder, signature, arguments):
        return context.get_constant(types.intp, count)
    return types.intp(dtype), codegen


@intrinsic
def stack_tile(typingctx, rows, vectors, dtype):
    """An uninitialised (rows, vectors · lanes) array on the stack: no allocation, and LLVM keeps
    it in registers through a loop that uses it at fixed places only (the tile's sums)."""
    if not isinstance(rows, types.IntegerLiteral) or not isinstance(vectors, types.IntegerLiteral):
        return None  # numba retries with the literal values
    element = _element_type(dtype)
    shape = (rows.literal_value, vectors.literal_value * VECTOR_BYTES * 8 // element.bitwidth)
    array_type = types.Array(element, 2, "C")

    def codegen(context, builder, signature, arguments):
        item = context.get_value_type(element)
        with builder.goto_entry_block():  # once per function, not per loop iteration
            data = builder.alloca(ir.ArrayType(item, shape[0] * shape[1]))
            data.align = VECTOR_BYTES
        intp, itemsize = context.get_value_type(types.intp), context.get_abi_sizeof(item)
        array = context.make_array(array_type)(context, builder)
        context.populate_array(array, data=builder.bitcast(data, item.as_pointer()),
                               shape=[intp(n) for n in shape],
                               strides=[intp(shape[1] * itemsize), intp(itemsize)],
                               itemsize=intp(itemsize), meminfo=None)
        return array._getvalue()
    return array_type(rows, vectors, dtype), codegen


def _vector_type(element):
    return ir.VectorType(ir.FloatType() if element.bitwidth == 32 else ir.DoubleType(),
                         VECTOR_BYTES * 8 // element.bitwidth)


def _element_pointer(context, builder, array_type, array, *indices):
    array = context.make_array(array_type)(context, builder, array)
    return cgutils.get_item_pointer(context, builder, array_type, array, list(indices))


def _load_vector(context, builder, array_type, array, indices):
    """(pointer, value) of the vector starting at array[indices]."""
    vector = _vector_type(array_type.dtype)
    pointer = builder.bitcast(_element_pointer(context, builder, array_type, array, *indices),
                              vector.as_pointer())
    return pointer, builder.load(pointer, align=array_type.dtype.bitwidth // 8)


@intrinsic
def add_scaled(typingctx, tile, r, i, s, w, p, k):
    """tile[r, i:i+L] += s · w[p, k, i:i+L] over one vector register of L lanes, as one fused
    multiply-add where the CPU has it (llvm.fmuladd: what the ``contract`` flag allows)."""
    vector = _vector_type(tile.dtype)

    def codegen(context, builder, signature, arguments):
        tile_, r_, i_, s_, w_, p_, k_ = arguments
        pointer, sums = _load_vector(context, builder, signature.args[0], tile_, (r_, i_))
        _, row = _load_vector(context, builder, signature.args[4], w_, (p_, k_, i_))
        scalar = context.cast(builder, s_, signature.args[3], tile.dtype)
        zeros = ir.Constant(ir.VectorType(ir.IntType(32), vector.count), [0] * vector.count)
        broadcast = builder.shuffle_vector(
            builder.insert_element(ir.Constant(vector, ir.Undefined), scalar, ir.IntType(32)(0)),
            ir.Constant(vector, ir.Undefined), zeros)
        fmuladd = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(vector, [vector] * 3),
            f"llvm.fmuladd.v{vector.count}f{tile.dtype.bitwidth}")
        builder.store(builder.call(fmuladd, [broadcast, row, sums]), pointer,
                      align=tile.dtype.bitwidth // 8)
        return context.get_dummy_value()
    return types.void(tile, r, i, s, w, p, k), codegen


@intrinsic
def times_power_of_two(typingctx, value, n):
    """value · 2^n for a float32 `value` and an integral float32 n in [-126, 127]: n goes into
    the exponent bits of a float32 (the vectorisable ldexp)."""
    def codegen(context, builder, signature, arguments):
        value_, n_ = arguments
        exponent = builder.add(builder.fptosi(n_, ir.IntType(32)), ir.IntType(32)(127))
        power = builder.bitcast(builder.shl(exponent, ir.IntType(32)(23)), ir.FloatType())
        return builder.fmul(value_, power)
    return types.float32(types.float32, types.float32), codegen


@intrinsic
def round_to_bf16(typingctx, value):
    """float32 `value` rounded to the nearest bfloat16 (ties to even; NaN kept, quiet), as
    float32: pyrnn.reference.round_to_bf16's integer arithmetic on the bits (vectorisable)."""
    def codegen(context, builder, signature, arguments):
        (value_,) = arguments
        i32 = ir.IntType(32)
        bits = builder.bitcast(value_, i32)
        lowest_kept = builder.and_(builder.lshr(bits, i32(16)), i32(1))
        rounded = builder.and_(builder.add(builder.add(bits, i32(0x7FFF)), lowest_kept), i32(0xFFFF0000))
        quiet_nan = builder.or_(builder.and_(bits, i32(0xFFFF0000)), i32(0x00400000))
        is_nan = builder.fcmp_unordered("uno", value_, value_)
        return builder.bitcast(builder.select(is_nan, quiet_nan, rounded), ir.FloatType())
    return types.float32(types.float32), codegen


@intrinsic
def load_acquire(typingctx, counters, i):
    """counters[i], read atomically with acquire ordering (never hoisted out of a spin loop)."""
    def codegen(context, builder, signature, arguments):
        pointer = _element_pointer(context, builder, signature.args[0], *arguments)
        return builder.load_atomic(pointer, "acquire", align=8)
    return counters.dtype(counters, i), codegen


@intrinsic
def store_release(typingctx, counters, i, value):
    """counters[i] = value, written atomically with release ordering."""
    def codegen(context, builder, signature, arguments):
        pointer = _element_pointer(context, builder, signature.args[0], *arguments[:2])
        builder.store_atomic(arguments[2], pointer, "release", align=8)
        return context.get_dummy_value()
    return types.void(counters, i, counters.dtype), codegen


# The system call that lets another thread have this core (both return an int).
_YIELD_FUNCTION = "SwitchToThread" if sys.platform == "win32" else "sched_yield"


@intrinsic
def yield_core(typingctx):
    """Let another thread have this core (sched_yield; SwitchToThread on Windows)."""
    def codegen(context, builder, signature, arguments):
        function_type = ir.FunctionType(ir.IntType(32), [])
        function = cgutils.get_or_insert_function(builder.module, function_type, _YIELD_FUNCTION)
        builder.call(function, [])
        return context.get_dummy_value()
    return types.void(), codegen

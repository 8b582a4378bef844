"""The ``numba`` backend: the reference (pyrnn/reference.py) with its time loops compiled.

What it is for: the fast path when the native module is not built. The time steps run inside
one compiled loop with no Python and no allocation; the products over all T·B rows at once
(the weight gradients; the input term and grad_x too when weight_ih is big) stay NumPy matrix
products, i.e. BLAS (design.md §3).

Why the compiled step is fast (measured against NumPy's BLAS on the same per-step products):
- ``_matmul_columns``, the per-step product, is a BLAS micro-kernel: a tile of 4 rows by 64
  float32 (32 float64) columns of the result is summed in 16 vector registers, over a copy of
  the weight packed in panels of 64 columns that it reads with unit stride; each weight row is
  loaded once per tile and each left-hand number broadcast once, so every load feeds 4 fused
  multiply-adds, and no sum ever needs a horizontal add. Every element is one
  sum over k in order (llvm.fmuladd, i.e. ``contract``: the multiply and the add may be one
  fused operation; no other fastmath flag). It beats NumPy's BLAS here, so while weight_ih
  stays in cache the products with it (the input term x_t · weight_ihᵀ for all steps before
  the time loop, grad_x_t in it) are computed in the compiled code too (_weight_ih_in_loop).
- ``_tanh`` is plain arithmetic that LLVM vectorises; numba's ``np.tanh`` is one libm call per
  element (16 ns each here), which would cost more than the products themselves at small H.
- ``error_model="numpy"``: a float division is not checked for zero, so loops with one vectorise.

Threads (as the native kernel, design.md §3.4): from _SPLIT_MIN_WORK multiply-adds per step,
set_num_threads(n) threads share each time loop, each owning whole panels of the hidden units
(_column_bounds) and all of them meeting at one barrier per step (``_barrier``: a counter per
thread, written with release and read with acquire ordering). The caller's thread is one of
them, the others are kept worker threads (``_on_threads``); compiled code releases the GIL
(``nogil``).
NumPy's BLAS runs single-threaded meanwhile, each thread calling it on its own share, so no idle
BLAS worker spins on the cores the barrier waits for. Results do not depend on the thread count
beyond roundoff (float32: ~1e-6 relative): the time loops compute every element on one thread in
the same order whatever n is (bitwise identical output and h_n when the input term is computed
in the loop), but BLAS may round its products over column slices differently, and each weight
gradient is summed in n parts.

What it deliberately does not do: compile the big products over all T·B rows (BLAS does those
better), or compile anything at import (each function compiles on its first call per dtype and
is cached on disk, ``cache=True``).
"""
import contextlib
import math
import os
import queue
import sys
import threading

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from . import _threads
from .reference import valid_steps, weight_gradients

# The per-step products are written as a BLAS micro-kernel is (csrc/gemm.h): out[b, j] =
# Σ_k a[b, k] · w[k, j], with w (a weight, transposed where the math has weightᵀ) copied once
# per call into panels of _PANEL_VECTORS vectors of columns, k-major (_pack), so that the kernel
# reads it with unit stride (large forward: 50 ms, against 94 reading the rows of a
# row-major copy). A tile of the result, _TILE_ROWS rows by one panel, is summed in registers:
# for each k, the panel's row k is loaded once and multiplied with every a[b, k], broadcast.
# No horizontal sums, and every element is one sum over k in order, whatever tile it falls in
# or thread owns its column. Numba has no SIMD types, so three intrinsics give these loops what
# a C kernel gets from its vector types (csrc/simd.h): a tile on the stack (_stack_tile), its
# width in elements (_lanes) and one fused multiply-add over a vector (_add_scaled). Measured
# per forward at 1 thread (min of 7), with _tanh32, against the previous row-by-row dot
# products with a horizontal sum per element: tiny 15 us instead of 33, small 0.56 ms instead
# of 0.99, medium 9.2 instead of 12.9, large 50 instead of 71. (Tried: 8-row tiles of 2
# vectors, with one-row tiles summing k in 2 or 4 interleaved parts: large as fast, tiny 30%
# slower.)
_VECTOR_BYTES = 64  # one AVX-512 register, a cache line (LLVM splits it on narrower CPUs)
_PANEL_VECTORS = 4  # 64 float32 or 32 float64 columns
_TILE_ROWS = 4  # 4 x 4 registers of sums: half of AVX-512's 32, the rest for w and a[b, k]


def _element_type(dtype):  # numba's type for `array.dtype` as an argument of an intrinsic
    return dtype.dtype if isinstance(dtype, types.DType) else dtype.instance_type


@intrinsic
def _lanes(typingctx, dtype):
    """The elements of `dtype` in one vector register: a constant in the compiled code."""
    lanes = _VECTOR_BYTES // _element_type(dtype).bitwidth * 8

    def codegen(context, builder, signature, arguments):
        return context.get_constant(types.intp, lanes)
    return types.intp(dtype), codegen


@intrinsic
def _stack_tile(typingctx, rows, vectors, dtype):
    """An uninitialised (rows, vectors · lanes) array on the stack: no allocation, and LLVM keeps
    it in registers through a loop that uses it at fixed places only (the tile's sums)."""
    if not isinstance(rows, types.IntegerLiteral) or not isinstance(vectors, types.IntegerLiteral):
        return None  # numba retries with the literal values
    element = _element_type(dtype)
    shape = (rows.literal_value, vectors.literal_value * _VECTOR_BYTES * 8 // element.bitwidth)
    array_type = types.Array(element, 2, "C")

    def codegen(context, builder, signature, arguments):
        item = context.get_value_type(element)
        with builder.goto_entry_block():  # once per function, not per loop iteration
            data = builder.alloca(ir.ArrayType(item, shape[0] * shape[1]))
            data.align = _VECTOR_BYTES
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
                         _VECTOR_BYTES * 8 // element.bitwidth)


def _load_vector(context, builder, array_type, array, indices):
    """(pointer, value) of the vector starting at array[indices]."""
    vector = _vector_type(array_type.dtype)
    pointer = builder.bitcast(_element_pointer(context, builder, array_type, array, *indices),
                              vector.as_pointer())
    return pointer, builder.load(pointer, align=array_type.dtype.bitwidth // 8)


@intrinsic
def _add_scaled(typingctx, tile, r, i, s, w, p, k):
    """tile[r, i:i+L] += s · w[p, k, i:i+L] over one vector register of L lanes, as one fused
    multiply-add where the CPU has it (llvm.fmuladd: what the ``contract`` flag allows)."""
    vector = _vector_type(tile.dtype)

    def codegen(context, builder, signature, arguments):
        tile_, r_, i_, s_, w_, p_, k_ = arguments
        pointer, sums = _load_vector(context, builder, signature.args[0], tile_, (r_, i_))
        _, row = _load_vector(context, builder, signature.args[4], w_, (p_, k_, i_))
        scalar = context.cast(builder, s_, signature.args[3], tile.dtype)
        lanes = ir.Constant(ir.VectorType(ir.IntType(32), vector.count), [0] * vector.count)
        broadcast = builder.shuffle_vector(
            builder.insert_element(ir.Constant(vector, ir.Undefined), scalar, ir.IntType(32)(0)),
            ir.Constant(vector, ir.Undefined), lanes)
        fmuladd = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(vector, [vector] * 3),
            f"llvm.fmuladd.v{vector.count}f{tile.dtype.bitwidth}")
        builder.store(builder.call(fmuladd, [broadcast, row, sums]), pointer,
                      align=tile.dtype.bitwidth // 8)
        return context.get_dummy_value()
    return types.void(tile, r, i, s, w, p, k), codegen


@njit(inline="always")
def _product_tile(tile, a, b0, w, p):
    """tile[r] = a[b0 + r] · panel p of w, for each row r of the tile."""
    lanes = _lanes(tile.dtype)
    tile[:] = 0.0
    for k in range(a.shape[1]):
        for r in range(tile.shape[0]):
            s = a[b0 + r, k]
            for i in range(0, tile.shape[1], lanes):
                _add_scaled(tile, r, i, s, w, p, k)


@njit(inline="always")
def _store_tile(tile, out, b0, j0, j1):
    for r in range(tile.shape[0]):
        row = out[b0 + r, j0:j1]  # a row slice, so that the loop starts at 0: see _step_tile
        for j in range(row.shape[0]):
            row[j] = tile[r, j]


@njit(cache=True, nogil=True)
def _matmul_columns(a, w, out, j0, j1):
    """out[:, j0:j1] = a · w[:, j0:j1].   a (B, K), out (B, J), w the panels of a (K, J) weight
    (_pack); j0 is one of the _column_bounds."""
    B, width = a.shape[0], _panel_width(a.dtype)
    tile = _stack_tile(_TILE_ROWS, _PANEL_VECTORS, a.dtype)
    row = _stack_tile(1, _PANEL_VECTORS, a.dtype)
    for p in range(j0 // width, -(-j1 // width)):
        c0, c1 = p * width, min(p * width + width, j1)
        for b0 in range(0, B - _TILE_ROWS + 1, _TILE_ROWS):
            _product_tile(tile, a, b0, w, p)
            _store_tile(tile, out, b0, c0, c1)
        for b in range(B - B % _TILE_ROWS, B):  # the rows left over (all of them when B < 4)
            _product_tile(row, a, b, w, p)
            _store_tile(row, out, b, c0, c1)


@njit(inline="always")
def _panel_width(dtype):  # a constant in the compiled code (packed.shape[2] is not)
    return _PANEL_VECTORS * _lanes(dtype)


@njit(inline="always")
def _empty_packed(K, J, dtype):
    """Room for a (K, J) weight in panels of _PANEL_VECTORS vectors of columns, each k-major:
    (panels, K, panel width), filled by _pack. Each thread allocates its own in its compiled
    time loop and fills and reads only its own panels (the pages of the others are never
    touched): from Python, two of them took 1.2 us of a 16 us tiny forward."""
    width = _panel_width(dtype)
    return np.empty((-(-J // width), K, width), dtype)


# Each thread packs the panels of its own columns (a tile never reads past its panel) from its
# compiled time loop: tiny's two weights in 1.8 us, where packing them from Python took 3.7 (a
# call and a returned array each). Not inlined: inlined into the time loop it took 3.1.
@njit(cache=True, nogil=True)
def _pack(w, packed, j0, j1):
    """The panels of packed that hold columns j0:j1 of w (K, J), any layout; zeros past J."""
    K, J = w.shape
    width = _panel_width(packed.dtype)
    for p in range(j0 // width, -(-j1 // width)):
        columns = min(width, J - p * width)
        for k in range(K):
            for j in range(columns):
                packed[p, k, j] = w[k, p * width + j]
            for j in range(columns, width):
                packed[p, k, j] = 0.0


def _tanh(x):
    """tanh of a float32 or float64 in its own precision (_tanh32, _tanh64), vectorisable. For
    compiled code only: there numba compiles what _tanh_of_type picks for the argument's type,
    and this Python body never runs."""
    raise NotImplementedError("pyrnn.numba_kernel._tanh is for compiled code; use np.tanh")


@overload(_tanh)
def _tanh_of_type(x):
    return (lambda x: _tanh32(x)) if x == types.float32 else (lambda x: _tanh64(np.float64(x)))


# float64: tanh(x) = u / (u + 2) with u = expm1(2|x|), sign restored. expm1 of a small argument
# is its Taylor series; expm1(2z) = expm1(z)·(expm1(z) + 2) then doubles the argument back
# exactly (no cancellation: every term is positive). With 2|x| ≤ 40 split 256 ways, z ≤ 0.16 and
# the series to z¹¹ is exact to 1e-17. Measured against NumPy on 2.2M points over [-25, 25] and
# geometric grids down to 1e-300: ≤ 7 ulp (1e-15 relative). Straight-line arithmetic, so LLVM
# vectorises it.
_DOUBLINGS = 8
_SATURATION = 20.0  # tanh(20) rounds to 1 in float64 (1 - tanh(20) = 8e-18)
_LINEAR_BELOW = 1e-9
_EXPM1_TAYLOR = tuple(1.0 / math.factorial(n) for n in range(11, 0, -1))  # 1/11!, ..., 1/1!


@njit(error_model="numpy", inline="always")
def _tanh64(x):
    """tanh of a float64; NaN in, NaN out; ±inf -> ±1; -0.0 -> -0.0."""
    ax = abs(x)
    z = (ax if ax < _SATURATION else _SATURATION) * (2.0 / 2.0**_DOUBLINGS)
    u = 0.0
    for c in _EXPM1_TAYLOR:
        u = (u + c) * z  # Horner: ends as z·(1 + z·(1/2 + z·(1/6 + ...)))
    for _ in range(_DOUBLINGS):
        u = u * (u + 2.0)
    t = math.copysign(u / (u + 2.0), x)
    # Below 1e-9, tanh(x) = x - x³/3 rounds to x, and x itself stays exact down to subnormals
    # (where x / 128 above would lose bits); NaN passes through as itself.
    return t if ax >= _LINEAR_BELOW else x


# float32, in float32 arithmetic, as the native kernel's (csrc/tanh.h): 16 lanes a vector instead
# of 8, and half the operations of _tanh64 (the forward time loop, min of 7: tiny 8.8 us instead
# of 14.3 with _tanh64, small 0.54 ms instead of 0.69).
#   |x| <  0.35: x + x³·P(x²), the Taylor series to x¹³ (remainder < 6e-10 relative);
#   |x| >= 0.35: (1 - e) / (1 + e) with e = exp(-2|x|) = 2^n·exp(r), n = round(-2|x| / ln 2),
#                r = -2|x| - n·ln 2 (ln 2 in two parts, |r| ≤ 0.347), exp(r) to r⁷.
# Measured on every float32 in [0, 12]: within 2 ulp of the correctly rounded tanh
# (tests/test_numba_kernel.py checks every 37th).
_F32 = np.float32
_TANH_TAYLOR_32 = tuple(_F32(c) for c in (3.59212804e-3, -8.86323553e-3, 2.18694885e-2,
                                          -5.39682540e-2, 1.33333333e-1, -3.33333333e-1))
_EXP_TAYLOR_32 = tuple(_F32(1.0 / math.factorial(n)) for n in range(7, -1, -1))  # 1/7!, ..., 1
_LN2_HI_32, _LN2_LO_32, _LOG2_E_32 = _F32(0.693359375), _F32(-2.12194440e-4), _F32(1.44269504)
_ROUNDING_32 = _F32(1.5 * 2**23)  # x + 1.5·2^23 - 1.5·2^23 is x rounded to an integer
_LINEAR_BELOW_32, _SERIES_BELOW_32, _EXP_ABOVE_32 = _F32(1e-4), _F32(0.35), _F32(-80)
_ONE_32, _TWO_32 = _F32(1), _F32(2)


@intrinsic
def _times_power_of_two(typingctx, value, n):
    """value · 2^n for a float32 `value` and an integral float32 n in [-126, 127]: n goes into
    the exponent bits of a float32 (the vectorisable ldexp)."""
    def codegen(context, builder, signature, arguments):
        value_, n_ = arguments
        exponent = builder.add(builder.fptosi(n_, ir.IntType(32)), ir.IntType(32)(127))
        power = builder.bitcast(builder.shl(exponent, ir.IntType(32)(23)), ir.FloatType())
        return builder.fmul(value_, power)
    return types.float32(types.float32, types.float32), codegen


@njit(error_model="numpy", inline="always")
def _tanh32(x):
    """tanh of a float32; NaN in, NaN out; ±inf -> ±1; -0.0 -> -0.0."""
    ax = abs(x)
    x2 = ax * ax
    p = _F32(0)
    for c in _TANH_TAYLOR_32:
        p = p * x2 + c
    series = ax + ax * (x2 * p)
    y = -_TWO_32 * ax
    y = y if y > _EXP_ABOVE_32 else _EXP_ABOVE_32  # keeps 2^n normal; tanh is 1 long before
    n = (y * _LOG2_E_32 + _ROUNDING_32) - _ROUNDING_32
    r = (y - n * _LN2_HI_32) - n * _LN2_LO_32
    e = _F32(0)
    for c in _EXP_TAYLOR_32:
        e = e * r + c
    e = _times_power_of_two(e, n)
    t = series if ax < _SERIES_BELOW_32 else (_ONE_32 - e) / (_ONE_32 + e)
    t = t if x >= 0 else -t
    # Below 1e-4, tanh(x) = x - x³/3 rounds to x; x also keeps -0.0 and NaN as they are.
    return t if ax >= _LINEAR_BELOW_32 else x


# Threads share a time loop by splitting the hidden units (columns) between them and meeting at
# one barrier per step, as the native kernel does (design.md §3.4). The barrier is a counter per
# thread: the steps it has finished, written with release and read with acquire ordering, so the
# columns a thread wrote before its counter moved are visible to the others once they see it.

@intrinsic
def _load_acquire(typingctx, counters, i):
    """counters[i], read atomically with acquire ordering (never hoisted out of a spin loop)."""
    def codegen(context, builder, signature, arguments):
        pointer = _element_pointer(context, builder, signature.args[0], *arguments)
        return builder.load_atomic(pointer, "acquire", align=8)
    return counters.dtype(counters, i), codegen


@intrinsic
def _store_release(typingctx, counters, i, value):
    """counters[i] = value, written atomically with release ordering."""
    def codegen(context, builder, signature, arguments):
        pointer = _element_pointer(context, builder, signature.args[0], *arguments[:2])
        builder.store_atomic(arguments[2], pointer, "release", align=8)
        return context.get_dummy_value()
    return types.void(counters, i, counters.dtype), codegen


def _element_pointer(context, builder, array_type, array, *indices):
    array = context.make_array(array_type)(context, builder, array)
    return cgutils.get_item_pointer(context, builder, array_type, array, list(indices))


# The system call that lets another thread have this core (both return an int).
_YIELD_FUNCTION = "SwitchToThread" if sys.platform == "win32" else "sched_yield"


@intrinsic
def _yield_core(typingctx):
    """Let another thread have this core (sched_yield; SwitchToThread on Windows)."""
    def codegen(context, builder, signature, arguments):
        function_type = ir.FunctionType(ir.IntType(32), [])
        function = cgutils.get_or_insert_function(builder.module, function_type, _YIELD_FUNCTION)
        builder.call(function, [])
        return context.get_dummy_value()
    return types.void(), codegen


# A waiting thread spins (a few us) and then yields its core at every check: when the machine
# has more runnable threads than cores (other processes, BLAS workers), the thread it waits for
# may be the one that needs the core. Measured on medium at 2 threads right after a NumPy
# product (whose BLAS workers spin ~0.1 s): 18 ms per forward with yielding, 50 without.
_SPINS_BEFORE_YIELD = 1 << 12


@njit(inline="always")
def _barrier(steps_done, thread, step):
    """Thread `thread` has finished `step`; wait until every thread has."""
    _store_release(steps_done, thread, step)
    for other in range(steps_done.shape[0]):
        spins = 0
        while _load_acquire(steps_done, other) < step:
            spins += 1
            if spins > _SPINS_BEFORE_YIELD:
                _yield_core()


@njit(error_model="numpy", inline="always")
def _step_tile(tile, t, b0, p, j0, j1, output, state, packed_hh, bias, lengths):
    """h_t = tanh(output[t] + h_{t-1} · weight_hhᵀ + bias) for rows b0.. (as many as the tile
    has) and hidden units j0:j1 (panel p), where output[t] holds the input term x_t · weight_ihᵀ;
    padding rows: 0, state carried."""
    h_prev, h_next = state[t % 2], state[(t + 1) % 2]
    _product_tile(tile, h_prev, b0, packed_hh, p)
    b_j = bias[j0:j1]
    for r in range(tile.shape[0]):
        b = b0 + r
        # Row slices, so that the loops below start at 0: numba then knows no index is negative
        # (no wraparound check) and LLVM vectorises them.
        out, new = output[t, b, j0:j1], h_next[b, j0:j1]
        if t < lengths[b]:
            for j in range(out.shape[0]):
                h_j = _tanh(out[j] + tile[r, j] + b_j[j])
                out[j] = h_j
                new[j] = h_j
        else:  # padding: output 0, state carried
            out[:] = 0.0
            new[:] = h_prev[b, j0:j1]


@njit(error_model="numpy", cache=True, nogil=True)
def _forward_columns(x, weight_ih, weight_hh, bias, lengths, output, state, input_in_loop,
                     steps_done, thread, j0, j1):
    """The forward time loop for hidden units j0:j1 (all of them with one thread).
    output (T, B, H) gets h_t (0 on padding); state (2, B, H): h_{t-1} in state[t % 2] (h0 in
    state[0] on entry), h_t goes to state[(t + 1) % 2]. The input term
    x_t · weight_ihᵀ is computed here, for every step before the first, if input_in_loop, else
    it is in output on entry."""
    T, B, I = x.shape
    H = output.shape[2]
    packed_hh = _empty_packed(H, H, x.dtype)  # weight_hhᵀ
    _pack(weight_hh.T, packed_hh, j0, j1)
    if input_in_loop:
        packed_ih = _empty_packed(I, H, x.dtype)  # weight_ihᵀ
        _pack(weight_ih.T, packed_ih, j0, j1)
        _matmul_columns(x.reshape(T * B, I), packed_ih, output.reshape(T * B, H), j0, j1)
    tile = _stack_tile(_TILE_ROWS, _PANEL_VECTORS, x.dtype)
    row = _stack_tile(1, _PANEL_VECTORS, x.dtype)
    width = _panel_width(x.dtype)
    for t in range(T):
        for p in range(j0 // width, -(-j1 // width)):
            c0, c1 = p * width, min(p * width + width, j1)
            for b0 in range(0, B - _TILE_ROWS + 1, _TILE_ROWS):
                _step_tile(tile, t, b0, p, c0, c1, output, state, packed_hh, bias, lengths)
            for b in range(B - B % _TILE_ROWS, B):  # the rows left over (all of them when B < 4)
                _step_tile(row, t, b, p, c0, c1, output, state, packed_hh, bias, lengths)
        _barrier(steps_done, thread, t + 1)


@njit(error_model="numpy", cache=True, nogil=True)
def _grad_a_columns(t, grad_output, output, g, lengths, grad_a, k0, k1):
    """grad_a[t][:, k0:k1] = (g + grad_output[t]) · (1 - h_t²) on valid rows, 0 on padding."""
    one = output.dtype.type(1)  # not the int 1, which would promote float32 to float64
    for b in range(output.shape[1]):
        da = grad_a[t, b, k0:k1]  # row slices: see _step_tile
        if t < lengths[b]:
            g_b, go, h = g[b, k0:k1], grad_output[t, b, k0:k1], output[t, b, k0:k1]
            for k in range(da.shape[0]):
                da[k] = (g_b[k] + go[k]) * (one - h[k] * h[k])
        else:
            da[:] = 0.0


@njit(error_model="numpy", cache=True, nogil=True)
def _backward_columns(grad_output, weight_hh, weight_ih, output, lengths, g, grad_a, grad_x,
                      product, grad_x_in_loop, steps_done, thread, k0, k1, i0, i1):
    """The BPTT chain for hidden units k0:k1 (all of them with one thread), and, if
    grad_x_in_loop, grad_x[t] = grad_a[t] · weight_ih for inputs i0:i1 as soon as grad_a[t] is
    complete. g (B, H): dL/dh_T on entry (grad_h_n), dL/dh0 on exit; grad_a (T, B, H) gets
    dL/da_t; product (B, H) is scratch."""
    packed_hh = _empty_packed(weight_hh.shape[0], weight_hh.shape[1], weight_hh.dtype)
    _pack(weight_hh, packed_hh, k0, k1)
    packed_ih = _empty_packed(weight_ih.shape[0] if grad_x_in_loop else 0, weight_ih.shape[1],
                              weight_ih.dtype)
    if grad_x_in_loop:
        _pack(weight_ih, packed_ih, i0, i1)
    T = output.shape[0]
    if T > 0:
        _grad_a_columns(T - 1, grad_output, output, g, lengths, grad_a, k0, k1)
        _barrier(steps_done, thread, 1)
    for t in range(T - 1, -1, -1):  # here grad_a[t] is complete
        _matmul_columns(grad_a[t], packed_hh, product, k0, k1)
        if grad_x_in_loop:
            _matmul_columns(grad_a[t], packed_ih, grad_x[t], i0, i1)
        for b in range(output.shape[1]):
            if t < lengths[b]:  # padding rows pass g through
                g[b, k0:k1] = product[b, k0:k1]
        if t > 0:
            _grad_a_columns(t - 1, grad_output, output, g, lengths, grad_a, k0, k1)
        _barrier(steps_done, thread, T - t + 1)


# Per-step multiply-adds from which a time loop is split between threads; below it a second
# thread costs more at the barrier than it takes off the step.
_SPLIT_MIN_WORK = 1 << 20


def _thread_count(J, work, panel):
    """Threads for a time loop over J columns with `work` multiply-adds per step: as many as
    set_num_threads allows and the work pays for, each with at least one panel of columns."""
    return max(1, min(_threads.get_num_threads(), work // _SPLIT_MIN_WORK, J // panel))


def _column_bounds(J, n, panel):
    """n + 1 bounds splitting J columns into n slices of whole panels (_pack), which start at
    a cache line in each row of an array that starts at one (_empty)."""
    if n == 1:
        return 0, J  # without building the list: 0.9 us of a 18 us tiny forward
    panels = -(-J // panel)
    return [min(J, panel * (panels * i // n)) for i in range(n + 1)]


_blas_pools = None  # threadpoolctl's handle on NumPy's BLAS, made on first use


@contextlib.contextmanager
def _one_blas_thread():
    """A context in which NumPy's BLAS computes on the calling thread only. Its own pool would
    wake worker threads that keep spinning ~0.1 s after the call, on the cores where our time
    loop's threads wait for each other at every step (measured: a 2-thread forward on medium
    takes 18 ms, median, instead of 9.6 right after a 2-thread NumPy product). Entered only
    under _workers_lock, by one split call at a time."""
    global _blas_pools
    if _blas_pools is None:
        from threadpoolctl import ThreadpoolController

        _blas_pools = ThreadpoolController().select(user_api="blas")
    limit = _blas_pools.limit(limits=1)
    try:
        yield
    finally:
        limit.restore_original_limits()


# Worker threads, started when first needed and kept: a thread started per call shares its
# creator's core until the scheduler moves it, which can take longer than the call (measured:
# 2-thread forwards on medium as slow as 1-thread ones). For the same reason a worker spins
# ~1 ms after each task before it sleeps: woken from sleep it may again be placed on the
# waking thread's core, while a spinning one keeps its own for back-to-back calls.
_workers = []  # (task queue, doorbell) per worker thread; doorbell[0] = 1: a task is queued
_workers_lock = threading.Lock()  # one split call at a time: its threads must all run at once
_WORKER_SPINS = 1 << 22  # checks of the doorbell: ~1 ms on the development machine


@njit(cache=True, nogil=True)
def _spin_until_rung(doorbell, spins):
    for _ in range(spins):
        if _load_acquire(doorbell, 0):
            return


def _work(tasks, doorbell):
    while True:
        _spin_until_rung(doorbell, _WORKER_SPINS)
        task = tasks.get()  # sleeps here if no task came while spinning
        doorbell[0] = 0
        task()


def _forget_workers():  # a forked child has none of its parent's threads
    global _workers_lock
    _workers.clear()
    _workers_lock = threading.Lock()


if hasattr(os, "register_at_fork"):  # POSIX; Windows has no fork
    os.register_at_fork(after_in_child=_forget_workers)


def _on_threads(n, task, steps_done):
    """[task(0), ..., task(n - 1)]: task(0) on this thread, the others on worker threads, where
    NumPy's BLAS then runs single-threaded, so that n threads compute in all. steps_done: the
    tasks' barrier counters (_barrier)."""
    if n == 1:
        return [task(0)]
    results, errors, finished = [None] * n, [], threading.Semaphore(0)

    def run(i):
        try:
            results[i] = task(i)
        except BaseException as error:  # re-raised below, on the calling thread
            # Marked past every step, so that the tasks waiting for it at a barrier finish
            # instead of waiting forever (it may fail anywhere: BLAS, an allocation, compiled code).
            steps_done[i] = np.iinfo(steps_done.dtype).max
            errors.append(error)
        if i:
            finished.release()

    with _workers_lock, _one_blas_thread():
        while len(_workers) < n - 1:
            _workers.append((queue.SimpleQueue(), np.zeros(1, np.int64)))
            threading.Thread(target=_work, args=_workers[-1], daemon=True).start()
        for i in range(1, n):
            tasks, doorbell = _workers[i - 1]
            tasks.put(lambda i=i: run(i))
            doorbell[0] = 1
        run(0)
        for _ in range(1, n):
            finished.acquire()
    if errors:
        raise errors[0]
    return results


def _no_float_warnings():
    """NaN and inf are values that propagate, not warnings, in the NumPy products here too
    (reference.without_float_warnings). np.errstate holds for the thread that enters it only, so
    each thread enters its own: the compiled loops need none (tiny forward: 0.7 us saved)."""
    return np.errstate(all="ignore")


def _empty(shape, dtype, threads):
    """np.empty(shape, dtype), starting at a 64-byte boundary, a cache line, if several threads
    write it. They write neighbouring column slices, which start at multiples of 64 bytes within
    each row: with aligned rows no cache line is written by two threads (NumPy aligns to 16
    bytes only). Measured at 2 threads, forward / backward: medium 11.0 / 22.6 ms aligned,
    12.5 / 23.6 ms 16 bytes past a line; large 44.6 / 104 against 47.3 / 108."""
    if threads == 1:
        return np.empty(shape, dtype)
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    buffer = np.empty(nbytes + 64, np.uint8)
    start = -buffer.ctypes.data % 64
    return buffer[start:start + nbytes].view(dtype).reshape(shape)


def _full_lengths(lengths, T, B):
    if lengths is None:
        lengths = np.empty(B, np.int64)
        lengths.fill(T)  # 0.3 us; np.full takes 0.7
    return lengths


# The products with weight_ih (forward the input term x_t · weight_ihᵀ, backward grad_x_t =
# grad_a_t · weight_ih) are computed by _matmul_columns in the compiled time loop (forward: over
# all steps before the first), which is faster than NumPy's BLAS on the same product over all
# T·B rows at once while a panel of weight_ih stays in cache. Measured at 1 thread (min of 7),
# compiled against BLAS, forward: tiny 14 / 17 us, small 0.54 / 0.64 ms, medium 8.8 / 12.7,
# large 48 / 63, deepbench (weight_ih 12 MB) 96 / 134; backward: large 148 / 161, deepbench
# 298 / 309. Larger weights (longer panels) were not measured: BLAS, which blocks its sums.
_IN_LOOP_MAX_WEIGHT_IH_BYTES = 16 << 20


def _weight_ih_in_loop(weight_ih):
    return weight_ih.nbytes <= _IN_LOOP_MAX_WEIGHT_IH_BYTES


def forward(x, weight_ih, weight_hh, bias, h0, lengths):
    T, B, I = x.shape
    H = weight_hh.shape[0]
    panel = _PANEL_VECTORS * _VECTOR_BYTES // x.itemsize
    n = _thread_count(H, B * H * (H + I), panel)
    output = _empty((T, B, H), x.dtype, n)
    state = _empty((2, B, H), x.dtype, n)  # h_{t-1} and h_t, taking turns
    state[0] = h0
    input_in_loop = _weight_ih_in_loop(weight_ih)
    arguments = (x, weight_ih, weight_hh, bias, _full_lengths(lengths, T, B), output, state,
                 input_in_loop)
    bounds, steps_done = _column_bounds(H, n, panel), np.zeros(n, np.int64)

    def columns(i):
        j0, j1 = bounds[i], bounds[i + 1]
        if not input_in_loop:
            with _no_float_warnings():
                input_term = output.reshape(T * B, H)[:, j0:j1]
                np.matmul(x.reshape(T * B, I), weight_ih[j0:j1].T, out=input_term)
        _forward_columns(*arguments, steps_done, i, j0, j1)

    _on_threads(n, columns, steps_done)
    return output, state[T % 2]  # h_n: a view that keeps the (2, B, H) buffer, not a copy


def backward(grad_output, x, weight_ih, weight_hh, output, h0, grad_h_n, lengths):
    T, B, I = x.shape
    H = weight_hh.shape[0]
    panel = _PANEL_VECTORS * _VECTOR_BYTES // x.itemsize
    n = _thread_count(H, B * H * (H + I), panel)
    grad_a, grad_x = _empty(output.shape, x.dtype, n), _empty(x.shape, x.dtype, n)
    g = _empty((B, H), x.dtype, n)
    g[:] = grad_h_n
    grad_x_in_loop = _weight_ih_in_loop(weight_ih)
    hidden, inputs = _column_bounds(H, n, panel), _column_bounds(I, n, panel)
    arguments = (grad_output, weight_hh, weight_ih, output, _full_lengths(lengths, T, B), g,
                 grad_a, grad_x, _empty((B, H), x.dtype, n), grad_x_in_loop)
    valid = valid_steps(lengths, T, B)[:, :, None]
    steps_done = np.zeros(n, np.int64)

    def chain_then_products(i):
        """The chain over thread i's columns, then, once every thread is through it, the
        products over the rows of time steps i·T/n .. (i+1)·T/n: grad_x (unless the chain
        computed it), and those steps' share of the weight gradients (the sums over rows of
        reference.weight_gradients, split in n parts)."""
        _backward_columns(*arguments, steps_done, i, hidden[i], hidden[i + 1], inputs[i],
                          inputs[i + 1])
        t0, t1 = T * i // n, T * (i + 1) // n
        with _no_float_warnings():
            if not grad_x_in_loop:
                np.matmul(grad_a[t0:t1].reshape(-1, H), weight_ih,
                          out=grad_x[t0:t1].reshape(-1, I))
            h_before = h0 if t0 == 0 else output[t0 - 1]  # h_{t0-1}; masked where it is padding
            return weight_gradients(grad_a[t0:t1], x[t0:t1], output[t0:t1], h_before,
                                    valid[t0:t1])

    weight_grads, *other_parts = _on_threads(n, chain_then_products, steps_done)
    with _no_float_warnings():
        for part in other_parts:
            for total, term in zip(weight_grads, part):
                total += term
    return (grad_x, g) + weight_grads

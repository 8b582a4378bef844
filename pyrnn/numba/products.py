"""The per-step products, written as a BLAS micro-kernel is (csrc/gemm.h): out[b, j] =
Σ_k a[b, k] · w[k, j], with w (a weight, transposed where the math has weightᵀ) copied once
per call into panels of PANEL_VECTORS vectors of columns, k-major (pack), so that the kernel
reads it with unit stride (large forward: 50 ms, against 94 reading the rows of a row-major
copy). A tile of the result, TILE_ROWS rows by one panel, is summed in registers: for each k,
the panel's row k is loaded once and multiplied with every a[b, k], broadcast, so every load
feeds 4 fused multiply-adds. No horizontal sums, and every element is one sum over k in order
(llvm.fmuladd, i.e. ``contract``: the multiply and the add may be one fused operation; no other
fastmath flag), whatever tile it falls in or thread owns its column.

Measured per forward at 1 thread (min of 7), against the previous row-by-row dot products with
a horizontal sum per element: tiny 15 us instead of 33, small 0.56 ms instead of 0.99, medium
9.2 instead of 12.9, large 50 instead of 71. (Tried: 8-row tiles of 2 vectors, with one-row
tiles summing k in 2 or 4 interleaved parts: large as fast, tiny 30% slower.)
"""
import numpy as np
from numba import njit, types
from numba.extending import overload

from .intrinsics import VECTOR_BYTES, add_scaled, lanes, round_to_bf16, stack_tile

# Precision "bf16" (docs/design.md §1) is a code, like the activation's: the operands of every
# product are rounded to bfloat16 (weights and x once per call, in kernel.py; h_{t-1} and dL/da
# as the time loop makes them, by `operand`) and the products summed in float32, as here. For
# agreement with the reference, not for speed: the products themselves are the float32 ones.
FP32, BF16 = 0, 1
PRECISIONS = {"fp32": FP32, "bf16": BF16}  # pyrnn.forward's precision -> code


def operand(precision, value):
    """For compiled code only: what the products read of `value`, a float the time loop makes."""
    raise NotImplementedError("pyrnn.numba.products.operand is for compiled code")


@overload(operand)
def _operand_of_type(precision, value):
    if value != types.float32:  # bf16 exists for float32 only (pyrnn.forward refuses float64)
        return lambda precision, value: value
    return lambda precision, value: round_to_bf16(value) if precision == BF16 else value


PANEL_VECTORS = 4  # 64 float32 or 32 float64 columns
TILE_ROWS = 4  # 4 x 4 registers of sums: half of AVX-512's 32, the rest for w and a[b, k]


def panel_columns(itemsize):
    """The columns of one panel for elements of `itemsize` bytes (from Python)."""
    return PANEL_VECTORS * VECTOR_BYTES // itemsize


@njit(inline="always")
def panel_width(dtype):  # a constant in the compiled code (packed.shape[2] is not)
    return PANEL_VECTORS * lanes(dtype)


@njit(inline="always")
def product_tile(tile, a, b0, w, p):
    """tile[r] = a[b0 + r] · panel p of w, for each row r of the tile."""
    step = lanes(tile.dtype)
    tile[:] = 0.0
    for k in range(a.shape[1]):
        for r in range(tile.shape[0]):
            s = a[b0 + r, k]
            for i in range(0, tile.shape[1], step):
                add_scaled(tile, r, i, s, w, p, k)


@njit(inline="always")
def _store_tile(tile, out, b0, j0, j1):
    for r in range(tile.shape[0]):
        row = out[b0 + r, j0:j1]  # a row slice, so that the loop starts at 0 (kernel.step_tile)
        for j in range(row.shape[0]):
            row[j] = tile[r, j]


@njit(cache=True, nogil=True)
def matmul_columns(a, w, out, j0, j1):
    """out[:, j0:j1] = a · w[:, j0:j1].   a (B, K), out (B, J), w the panels of a (K, J) weight
    (pack); j0 is one of the threads' column bounds (threads.column_bounds)."""
    B, width = a.shape[0], panel_width(a.dtype)
    tile = stack_tile(TILE_ROWS, PANEL_VECTORS, a.dtype)
    row = stack_tile(1, PANEL_VECTORS, a.dtype)
    for p in range(j0 // width, -(-j1 // width)):
        c0, c1 = p * width, min(p * width + width, j1)
        for b0 in range(0, B - TILE_ROWS + 1, TILE_ROWS):
            product_tile(tile, a, b0, w, p)
            _store_tile(tile, out, b0, c0, c1)
        for b in range(B - B % TILE_ROWS, B):  # the rows left over (all of them when B < 4)
            product_tile(row, a, b, w, p)
            _store_tile(row, out, b, c0, c1)


@njit(inline="always")
def empty_packed(K, J, dtype):
    """Room for a (K, J) weight in panels of PANEL_VECTORS vectors of columns, each k-major:
    (panels, K, panel width), filled by pack. Each thread allocates its own in its compiled
    time loop and fills and reads only its own panels (the pages of the others are never
    touched): from Python, two of them took 1.2 us of a 16 us tiny forward."""
    width = panel_width(dtype)
    return np.empty((-(-J // width), K, width), dtype)


# Each thread packs the panels of its own columns (a tile never reads past its panel) from its
# compiled time loop: tiny's two weights in 1.8 us, where packing them from Python took 3.7 (a
# call and a returned array each). Not inlined: inlined into the time loop it took 3.1.
@njit(cache=True, nogil=True)
def pack(w, packed, j0, j1):
    """The panels of packed that hold columns j0:j1 of w (K, J), any layout; zeros past J."""
    K, J = w.shape
    width = panel_width(packed.dtype)
    for p in range(j0 // width, -(-j1 // width)):
        columns = min(width, J - p * width)
        for k in range(K):
            for j in range(columns):
                packed[p, k, j] = w[k, p * width + j]
            for j in range(columns, width):
                packed[p, k, j] = 0.0

"""The ``numba`` backend: the reference (pyrnn/reference.py) with its time loops compiled.

What it is for: the fast path when the native module is not built. Only the recurrence is
sequential, so only it is compiled (design.md §3): the products over all T·B rows at once (the
input term, the weight gradients, grad_x) stay NumPy matrix products, i.e. BLAS, and the time
steps run inside one compiled loop with no Python, no call into BLAS and no allocation (except
big steps with several threads, see Threads below).

Why the compiled step is fast (measured against NumPy's BLAS on the same per-step products):
- ``_matmul_wt_columns``, the per-step product, computes 4 rows x 4 columns of the result at once, so
  every number loaded from memory is used 4 times, and walks 16 rows of the weight at a time so
  they stay in cache while all batch rows go past. Its sums may be reordered (fastmath
  ``reassoc``/``contract`` only, nothing that changes NaN, inf or rounding of single operations),
  which is what lets LLVM keep the 16 sums in vector registers, as any BLAS does.
- ``_tanh`` is plain arithmetic that LLVM vectorises; numba's ``np.tanh`` is one libm call per
  element (16 ns each here), which would cost more than the products themselves at small H.
- ``error_model="numpy"``: a float division is not checked for zero, so loops with one vectorise.
- Threads: with several, big steps (see _BLAS_STEP_MIN_WORK) hand their product to NumPy's
  threaded BLAS; otherwise threads speed up the BLAS products around the loop only, and results
  do not depend on the thread count.

What it deliberately does not do: compile the big products over all T·B rows (BLAS does those
better), or compile anything at import (each function compiles on its first call per dtype and
is cached on disk, ``cache=True``).
"""
import math

import numpy as np
from numba import njit

from . import _threads
from .reference import valid_steps, weight_gradients

# Sums in any order (and a*b+c as one fused operation): the freedom every BLAS takes.
_SUMS_IN_ANY_ORDER = {"reassoc", "contract"}
_TILE = 4  # result rows and columns per register tile: 16 sums
_COLUMN_BLOCK = 16  # weight rows kept in cache while every row of the left operand goes past
# Per-step multiply-adds (B·H·H) from which, with several threads, each step's product goes to
# NumPy's threaded BLAS from a Python loop (a few us per step) instead of the compiled loop (one
# thread). Splitting the compiled steps over numba's threads instead (prange, one parallel
# region per step) was measured 1.5-10x slower than one thread on the 2-core development machine
# under load: waking the pool every step costs more than the step. Threaded BLAS is robust there;
# it beats the 1-thread compiled loop from large (B·H·H = 67M) on, not yet at medium (4.2M).
_BLAS_STEP_MIN_WORK = 1 << 24


@njit(fastmath=_SUMS_IN_ANY_ORDER, cache=True)
def _matmul_wt_columns(a, w, out, j0, j1):
    """out[:, j0:j1] = a · w[j0:j1]ᵀ.   a (B, K), w (J, K), out (B, J): rows of both are contiguous."""
    for block_start in range(j0, j1, _COLUMN_BLOCK):
        _matmul_wt_block(a, w, out, block_start, min(block_start + _COLUMN_BLOCK, j1))


@njit(fastmath=_SUMS_IN_ANY_ORDER, cache=True)
def _matmul_wt_block(a, w, out, j0, j1):
    """out[:, j0:j1] = a · w[j0:j1]ᵀ for one block of columns, small enough to stay in cache."""
    B, K = a.shape
    zero = a.dtype.type(0)
    for b in range(0, B - _TILE + 1, _TILE):
        j = j0
        while j + _TILE <= j1:
            s00 = s01 = s02 = s03 = s10 = s11 = s12 = s13 = zero
            s20 = s21 = s22 = s23 = s30 = s31 = s32 = s33 = zero
            for k in range(K):
                w0, w1, w2, w3 = w[j, k], w[j + 1, k], w[j + 2, k], w[j + 3, k]
                a0, a1, a2, a3 = a[b, k], a[b + 1, k], a[b + 2, k], a[b + 3, k]
                s00 += a0 * w0; s01 += a0 * w1; s02 += a0 * w2; s03 += a0 * w3  # noqa: E702
                s10 += a1 * w0; s11 += a1 * w1; s12 += a1 * w2; s13 += a1 * w3  # noqa: E702
                s20 += a2 * w0; s21 += a2 * w1; s22 += a2 * w2; s23 += a2 * w3  # noqa: E702
                s30 += a3 * w0; s31 += a3 * w1; s32 += a3 * w2; s33 += a3 * w3  # noqa: E702
            out[b, j], out[b, j + 1], out[b, j + 2], out[b, j + 3] = s00, s01, s02, s03
            out[b + 1, j], out[b + 1, j + 1], out[b + 1, j + 2], out[b + 1, j + 3] = s10, s11, s12, s13
            out[b + 2, j], out[b + 2, j + 1], out[b + 2, j + 2], out[b + 2, j + 3] = s20, s21, s22, s23
            out[b + 3, j], out[b + 3, j + 1], out[b + 3, j + 2], out[b + 3, j + 3] = s30, s31, s32, s33
            j += _TILE
        for r in range(b, b + _TILE):  # the last j1 - j columns
            for jj in range(j, j1):
                out[r, jj] = _dot(a, r, w, jj)
    for b in range(B - B % _TILE, B):  # the last rows (all of them when B < 4, e.g. B = 1)
        j = j0
        while j + _TILE <= j1:  # one row against 4 weight rows: a matrix-vector product
            s0 = s1 = s2 = s3 = zero
            for k in range(K):
                a0 = a[b, k]
                s0 += a0 * w[j, k]; s1 += a0 * w[j + 1, k]  # noqa: E702
                s2 += a0 * w[j + 2, k]; s3 += a0 * w[j + 3, k]  # noqa: E702
            out[b, j], out[b, j + 1], out[b, j + 2], out[b, j + 3] = s0, s1, s2, s3
            j += _TILE
        for jj in range(j, j1):
            out[b, jj] = _dot(a, b, w, jj)


@njit(fastmath=_SUMS_IN_ANY_ORDER, cache=True)
def _dot(a, b, w, j):
    """a[b] · w[j]"""
    s = a.dtype.type(0)
    for k in range(a.shape[1]):
        s += a[b, k] * w[j, k]
    return s


# tanh(x) = u / (u + 2) with u = expm1(2|x|), sign restored. expm1 of a small argument is its
# Taylor series; expm1(2z) = expm1(z)·(expm1(z) + 2) then doubles the argument back exactly
# (no cancellation: every term is positive). With 2|x| ≤ 40 split 256 ways, z ≤ 0.16 and the
# series to z¹¹ is exact to 1e-17. Measured against NumPy on 2.2M points over [-25, 25] and
# geometric grids down to 1e-300: float64 ≤ 7 ulp (1e-15 relative); float32 (computed in float64,
# then rounded) correctly rounded. Straight-line arithmetic, so LLVM vectorises it.
_DOUBLINGS = 8
_SATURATION = 20.0  # tanh(20) rounds to 1 in float64 (1 - tanh(20) = 8e-18)
_LINEAR_BELOW = 1e-9
_EXPM1_TAYLOR = tuple(1.0 / math.factorial(n) for n in range(11, 0, -1))  # 1/11!, ..., 1/1!


@njit(error_model="numpy", inline="always")  # inlined where it is used, so loops over it vectorise
def _tanh(x):
    """tanh of a float64, vectorisable; NaN in, NaN out; ±inf -> ±1; -0.0 -> -0.0."""
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


@njit(error_model="numpy", cache=True)
def _forward_columns(t, output, weight_hh, state, recurrent, lengths, j0, j1):
    """Step t for hidden units j0:j1.   output (T, B, H): the input term on entry, h_t on exit
    (0 on padding); state (2, B, H): h_{t-1} in state[t % 2], h_t goes to state[(t + 1) % 2]
    (carried on padding rows); recurrent (B, H): scratch for h_{t-1} · weight_hhᵀ."""
    _matmul_wt_columns(state[t % 2], weight_hh, recurrent, j0, j1)
    _forward_epilogue(t, output, state, recurrent, lengths, j0, j1)


@njit(error_model="numpy", cache=True, nogil=True)
def _forward_epilogue(t, output, state, recurrent, lengths, j0, j1):
    """h_t = tanh(input term + recurrent) for hidden units j0:j1, recurrent = h_{t-1} · weight_hhᵀ."""
    h_prev, h_next = state[t % 2], state[(t + 1) % 2]
    for b in range(output.shape[1]):
        # Row slices, so that the loops below start at 0: numba then knows no index is negative
        # (no wraparound check) and LLVM vectorises them.
        out, rec, new = output[t, b, j0:j1], recurrent[b, j0:j1], h_next[b, j0:j1]
        if t < lengths[b]:
            for j in range(out.shape[0]):
                h_j = _tanh(np.float64(out[j] + rec[j]))
                out[j] = h_j
                new[j] = h_j
        else:  # padding: output 0, state carried
            out[:] = 0.0
            new[:] = h_prev[b, j0:j1]


@njit(error_model="numpy", cache=True, nogil=True)
def _grad_a_columns(t, grad_output, output, g, lengths, grad_a, k0, k1):
    """grad_a[t][:, k0:k1] = (g + grad_output[t]) · (1 - h_t²) on valid rows (left 0 on padding)."""
    one = output.dtype.type(1)  # not the int 1, which would promote float32 to float64
    for b in range(output.shape[1]):
        if t < lengths[b]:
            da, g_b = grad_a[t, b, k0:k1], g[b, k0:k1]  # row slices: see _forward_epilogue
            go, h = grad_output[t, b, k0:k1], output[t, b, k0:k1]
            for k in range(da.shape[0]):
                da[k] = (g_b[k] + go[k]) * (one - h[k] * h[k])


@njit(error_model="numpy", cache=True)
def _backward_columns(t, grad_output, weight_hh_t, output, g, lengths, grad_a, product, k0, k1):
    """Step t for hidden units k0:k1, once grad_a[t] is complete.   weight_hh_t (H, H) is
    weight_hhᵀ, contiguous; product (B, H) is scratch for grad_a[t] · weight_hh."""
    _matmul_wt_columns(grad_a[t], weight_hh_t, product, k0, k1)
    _backward_epilogue(t, grad_output, output, g, lengths, grad_a, product, k0, k1)


@njit(error_model="numpy", cache=True, nogil=True)
def _backward_epilogue(t, grad_output, output, g, lengths, grad_a, product, k0, k1):
    """Given product = grad_a[t] · weight_hh: g[:, k0:k1] becomes the gradient reaching h_{t-1}
    (product on valid rows, passed through on padding), and grad_a[t - 1][:, k0:k1] follows from
    it, column by column, so no other column is waited for."""
    for b in range(output.shape[1]):
        if t < lengths[b]:
            g[b, k0:k1] = product[b, k0:k1]
    if t > 0:
        _grad_a_columns(t - 1, grad_output, output, g, lengths, grad_a, k0, k1)


# The time loops: compiled whole, or, for big steps with several threads, a Python loop whose
# products are NumPy's BLAS calls (threaded) and whose element-wise rest is compiled.

@njit(cache=True, nogil=True)
def _forward_steps(output, weight_hh, state, lengths):
    T, B, H = output.shape
    recurrent = np.empty((B, H), output.dtype)
    for t in range(T):
        _forward_columns(t, output, weight_hh, state, recurrent, lengths, 0, H)


def _forward_steps_blas(output, weight_hh, state, lengths):
    T, B, H = output.shape
    recurrent = np.empty((B, H), output.dtype)
    for t in range(T):
        np.matmul(state[t % 2], weight_hh.T, out=recurrent)
        _forward_epilogue(t, output, state, recurrent, lengths, 0, H)


@njit(cache=True, nogil=True)
def _backward_steps(grad_output, weight_hh_t, output, g, lengths, grad_a):
    T, B, H = output.shape
    product = np.empty((B, H), output.dtype)
    if T > 0:
        _grad_a_columns(T - 1, grad_output, output, g, lengths, grad_a, 0, H)
    for t in range(T - 1, -1, -1):
        _backward_columns(t, grad_output, weight_hh_t, output, g, lengths, grad_a, product, 0, H)


def _backward_steps_blas(grad_output, weight_hh_t, output, g, lengths, grad_a):
    T, B, H = output.shape
    product = np.empty((B, H), output.dtype)
    if T > 0:
        _grad_a_columns(T - 1, grad_output, output, g, lengths, grad_a, 0, H)
    for t in range(T - 1, -1, -1):
        np.matmul(grad_a[t], weight_hh_t.T, out=product)
        _backward_epilogue(t, grad_output, output, g, lengths, grad_a, product, 0, H)


def _full_lengths(lengths, T, B):
    return np.full(B, T, dtype=np.int64) if lengths is None else lengths


def _threaded_blas_pays(B, H):
    """Whether to hand each step's product to NumPy's BLAS: only with several threads, big steps."""
    return _threads.get_num_threads() > 1 and B * H * H >= _BLAS_STEP_MIN_WORK


def forward(x, weight_ih, weight_hh, bias, h0, lengths):
    T, B, I = x.shape
    H = weight_hh.shape[0]
    output = (x.reshape(T * B, I) @ weight_ih.T + bias).reshape(T, B, H)
    state = np.empty((2, B, H), x.dtype)  # h_{t-1} and h_t, taking turns
    state[0] = h0
    arguments = (output, weight_hh, state, _full_lengths(lengths, T, B))
    (_forward_steps_blas if _threaded_blas_pays(B, H) else _forward_steps)(*arguments)
    return output, state[T % 2].copy()


def backward(grad_output, x, weight_ih, weight_hh, output, h0, grad_h_n, lengths):
    T, B, I = x.shape
    H = weight_hh.shape[0]
    grad_a = np.zeros_like(output)
    g = grad_h_n.copy()
    weight_hh_t = np.ascontiguousarray(weight_hh.T)  # so that g · weight_hh reads contiguous rows
    arguments = (grad_output, weight_hh_t, output, g, _full_lengths(lengths, T, B), grad_a)
    (_backward_steps_blas if _threaded_blas_pays(B, H) else _backward_steps)(*arguments)
    grad_x = (grad_a.reshape(T * B, H) @ weight_ih).reshape(T, B, I)
    valid = valid_steps(lengths, T, B)[:, :, None]
    return (grad_x, g) + weight_gradients(grad_a, x, output, h0, valid)

"""The ``numba`` backend: the reference (pyrnn/reference.py) with its time loops compiled.

What it is for: the fast path when the native module is not built. The time steps run inside
one compiled loop with no Python and no allocation; the products over all T·B rows at once
(the weight gradients; the input term and grad_x too when weight_ih is big or B < 4) stay
NumPy matrix products, i.e. BLAS (design.md §3).

Why the compiled step is fast (measured against NumPy's BLAS on the same per-step products):
- ``_matmul_wt_columns``, the per-step product, computes 4 rows x 4 columns of the result at once, so
  every number loaded from memory is used 4 times, and walks 16 rows of the weight at a time so
  they stay in cache while all batch rows go past. Its sums may be reordered (fastmath
  ``reassoc``/``contract`` only, nothing that changes NaN, inf or rounding of single operations),
  which is what lets LLVM keep the 16 sums in vector registers, as any BLAS does. It beats
  NumPy's BLAS here (150 against 100 GFLOP/s at medium), so while weight_ih stays in cache the
  products with it (the input term x_t · weight_ihᵀ, grad_x_t) are computed in the loop too
  (_weight_ih_in_loop).
- ``_tanh`` is plain arithmetic that LLVM vectorises; numba's ``np.tanh`` is one libm call per
  element (16 ns each here), which would cost more than the products themselves at small H.
- ``error_model="numpy"``: a float division is not checked for zero, so loops with one vectorise.

Threads (as the native kernel, design.md §3.4): from _SPLIT_MIN_WORK multiply-adds per step,
set_num_threads(n) threads share each time loop, each owning a block-aligned slice of the hidden
units and all of them meeting at one barrier per step (``_barrier``: a counter per thread,
written with release and read with acquire ordering). The caller's thread is one of them, the
others are kept worker threads (``_on_threads``); compiled code releases the GIL (``nogil``).
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
from numba.extending import intrinsic

from . import _threads
from .reference import valid_steps, weight_gradients

# Sums in any order (and a*b+c as one fused operation): the freedom every BLAS takes.
_SUMS_IN_ANY_ORDER = {"reassoc", "contract"}
_TILE = 4  # result rows and columns per register tile: 16 sums
_COLUMN_BLOCK = 16  # weight rows kept in cache while every row of the left operand goes past


@njit(fastmath=_SUMS_IN_ANY_ORDER, cache=True)
def _matmul_wt_columns(a, w, out, j0, j1):
    """out[:, j0:j1] = a · w[j0:j1]ᵀ.   a (B, K), w (J, K), out (B, J): rows of both are contiguous."""
    for block_start in range(j0, j1, _COLUMN_BLOCK):
        _matmul_wt_block(a, w, out, block_start, min(block_start + _COLUMN_BLOCK, j1))


# Inlined into _matmul_wt_columns (a call per 16 columns): measured 20% faster at B = 1, 3% at 16.
@njit(fastmath=_SUMS_IN_ANY_ORDER, cache=True, inline="always")
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


def _element_pointer(context, builder, array_type, array, i):
    array = context.make_array(array_type)(context, builder, array)
    return cgutils.get_item_pointer(context, builder, array_type, array, [i])


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


@njit(error_model="numpy", cache=True, nogil=True)
def _forward_epilogue(t, output, state, recurrent, bias, lengths, j0, j1):
    """h_t = tanh(output[t] + recurrent + bias) for hidden units j0:j1, where output[t] holds the
    input term x_t · weight_ihᵀ and recurrent h_{t-1} · weight_hhᵀ; padding rows: 0, state
    carried."""
    h_prev, h_next = state[t % 2], state[(t + 1) % 2]
    b_j = bias[j0:j1]
    for b in range(output.shape[1]):
        # Row slices, so that the loops below start at 0: numba then knows no index is negative
        # (no wraparound check) and LLVM vectorises them.
        out, rec, new = output[t, b, j0:j1], recurrent[b, j0:j1], h_next[b, j0:j1]
        if t < lengths[b]:
            for j in range(out.shape[0]):
                h_j = _tanh(np.float64(out[j] + rec[j] + b_j[j]))
                out[j] = h_j
                new[j] = h_j
        else:  # padding: output 0, state carried
            out[:] = 0.0
            new[:] = h_prev[b, j0:j1]


@njit(error_model="numpy", cache=True, nogil=True)
def _forward_columns(x, weight_ih, weight_hh, bias, lengths, output, state, recurrent,
                     input_in_loop, steps_done, thread, j0, j1):
    """The forward time loop for hidden units j0:j1 (all of them with one thread).
    output (T, B, H) gets h_t (0 on padding); state (2, B, H): h_{t-1} in state[t % 2] (h0 in
    state[0] on entry), h_t goes to state[(t + 1) % 2]; recurrent (B, H) is scratch. The input
    term x_t · weight_ihᵀ is computed here if input_in_loop, else it is in output on entry."""
    for t in range(x.shape[0]):
        if input_in_loop:
            _matmul_wt_columns(x[t], weight_ih, output[t], j0, j1)
        _matmul_wt_columns(state[t % 2], weight_hh, recurrent, j0, j1)
        _forward_epilogue(t, output, state, recurrent, bias, lengths, j0, j1)
        _barrier(steps_done, thread, t + 1)


@njit(error_model="numpy", cache=True, nogil=True)
def _grad_a_columns(t, grad_output, output, g, lengths, grad_a, k0, k1):
    """grad_a[t][:, k0:k1] = (g + grad_output[t]) · (1 - h_t²) on valid rows, 0 on padding."""
    one = output.dtype.type(1)  # not the int 1, which would promote float32 to float64
    for b in range(output.shape[1]):
        da = grad_a[t, b, k0:k1]  # row slices: see _forward_epilogue
        if t < lengths[b]:
            g_b, go, h = g[b, k0:k1], grad_output[t, b, k0:k1], output[t, b, k0:k1]
            for k in range(da.shape[0]):
                da[k] = (g_b[k] + go[k]) * (one - h[k] * h[k])
        else:
            da[:] = 0.0


@njit(error_model="numpy", cache=True, nogil=True)
def _backward_columns(grad_output, weight_hh_t, weight_ih_t, output, lengths, g, grad_a, grad_x,
                      product, grad_x_in_loop, steps_done, thread, k0, k1, i0, i1):
    """The BPTT chain for hidden units k0:k1 (all of them with one thread), and, if
    grad_x_in_loop, grad_x[t] = grad_a[t] · weight_ih for inputs i0:i1 as soon as grad_a[t] is
    complete. g (B, H): dL/dh_T on entry (grad_h_n), dL/dh0 on exit; grad_a (T, B, H) gets
    dL/da_t; weight_hh_t (H, H) and weight_ih_t (I, H) are weight_hhᵀ and weight_ihᵀ,
    contiguous; product (B, H) is scratch."""
    T = output.shape[0]
    if T > 0:
        _grad_a_columns(T - 1, grad_output, output, g, lengths, grad_a, k0, k1)
        _barrier(steps_done, thread, 1)
    for t in range(T - 1, -1, -1):  # here grad_a[t] is complete
        _matmul_wt_columns(grad_a[t], weight_hh_t, product, k0, k1)
        if grad_x_in_loop:
            _matmul_wt_columns(grad_a[t], weight_ih_t, grad_x[t], i0, i1)
        for b in range(output.shape[1]):
            if t < lengths[b]:  # padding rows pass g through
                g[b, k0:k1] = product[b, k0:k1]
        if t > 0:
            _grad_a_columns(t - 1, grad_output, output, g, lengths, grad_a, k0, k1)
        _barrier(steps_done, thread, T - t + 1)


# Per-step multiply-adds from which a time loop is split between threads; below it a second
# thread costs more at the barrier than it takes off the step.
_SPLIT_MIN_WORK = 1 << 20


def _thread_count(J, work):
    """Threads for a time loop over J columns with `work` multiply-adds per step: as many as
    set_num_threads allows and the work pays for, each with at least one column block."""
    return max(1, min(_threads.get_num_threads(), work // _SPLIT_MIN_WORK, J // _COLUMN_BLOCK))


def _column_bounds(J, n):
    """n + 1 bounds splitting J columns into n slices that start at multiples of _COLUMN_BLOCK, so
    that _matmul_wt_columns sums every element in the same order whatever n is."""
    blocks = -(-J // _COLUMN_BLOCK)
    return [min(J, _COLUMN_BLOCK * (blocks * i // n)) for i in range(n)] + [J]


_blas_pools = None  # threadpoolctl's handle on NumPy's BLAS, made on first use
_blas_lock = threading.Lock()
_blas_users = 0  # calls inside _one_blas_thread: the first limits the pool, the last restores it
_blas_limit = None


@contextlib.contextmanager
def _one_blas_thread():
    """A context in which NumPy's BLAS computes on the calling thread only. Its own pool would
    wake worker threads that keep spinning ~0.1 s after the call, on the cores where our time
    loop's threads wait for each other at every step (measured: a 2-thread forward on medium
    takes 18 ms, median, instead of 9.6 right after a 2-thread NumPy product)."""
    global _blas_pools, _blas_users, _blas_limit
    with _blas_lock:
        if _blas_users == 0:
            if _blas_pools is None:
                from threadpoolctl import ThreadpoolController

                _blas_pools = ThreadpoolController().select(user_api="blas")
            _blas_limit = _blas_pools.limit(limits=1)
        _blas_users += 1
    try:
        yield
    finally:
        with _blas_lock:
            _blas_users -= 1
            if _blas_users == 0:
                _blas_limit.restore_original_limits()


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


def _on_threads(n, task):
    """[task(0), ..., task(n - 1)]: task(0) on this thread, the others on worker threads, where
    NumPy's BLAS then runs single-threaded, so that n threads compute in all."""
    if n == 1:
        return [task(0)]
    results, errors, finished = [None] * n, [], threading.Semaphore(0)

    def run(i):
        try:
            results[i] = task(i)
        except BaseException as error:  # re-raised below, on the calling thread
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


@contextlib.contextmanager
def _never_waited_for_if_failing(steps_done, thread):
    """If the block raises, `thread` is marked as past every step before the error propagates,
    so that the threads waiting for it at a barrier finish (the call then raises) instead of
    waiting forever."""
    try:
        yield
    except BaseException:
        steps_done[thread] = np.iinfo(steps_done.dtype).max
        raise


def _empty_aligned(shape, dtype):
    """np.empty(shape, dtype) starting at a 64-byte boundary, a cache line. Threads write
    neighbouring column slices of these arrays, which start at multiples of 64 bytes within
    each row: with aligned rows no cache line is written by two threads (NumPy aligns to 16
    bytes only). Measured at 2 threads, forward / backward: medium 11.0 / 22.6 ms aligned,
    12.5 / 23.6 ms 16 bytes past a line; large 44.6 / 104 against 47.3 / 108."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    buffer = np.empty(nbytes + 64, np.uint8)
    start = -buffer.ctypes.data % 64
    return buffer[start:start + nbytes].view(dtype).reshape(shape)


def _full_lengths(lengths, T, B):
    return np.full(B, T, dtype=np.int64) if lengths is None else lengths


# The products with weight_ih (forward the input term x_t · weight_ihᵀ, backward grad_x_t =
# grad_a_t · weight_ih) are computed step by step inside the time loop, by the per-step product,
# which is faster than NumPy's BLAS on the same product over all T·B rows at once as long as
# weight_ih stays in cache between steps and the step has whole 4-row tiles. Measured per
# forward at 1 thread: in the loop 13.3 ms instead of 15.7 at medium (weight_ih 256 KB), 82
# instead of 90 at large (2 MB); one product 196 ms instead of 208 at deepbench (12 MB), 34 us
# instead of 39 at tiny (B = 1).
_IN_LOOP_MAX_WEIGHT_IH_BYTES = 4 << 20


def _weight_ih_in_loop(weight_ih, B):
    return B >= _TILE and weight_ih.nbytes <= _IN_LOOP_MAX_WEIGHT_IH_BYTES


def forward(x, weight_ih, weight_hh, bias, h0, lengths):
    T, B, I = x.shape
    H = weight_hh.shape[0]
    output = _empty_aligned((T, B, H), x.dtype)
    state = _empty_aligned((2, B, H), x.dtype)  # h_{t-1} and h_t, taking turns
    state[0] = h0
    recurrent = _empty_aligned((B, H), x.dtype)
    input_in_loop = _weight_ih_in_loop(weight_ih, B)
    arguments = (x, weight_ih, weight_hh, bias, _full_lengths(lengths, T, B), output, state,
                 recurrent, input_in_loop)
    n = _thread_count(H, B * H * (H + I))
    bounds, steps_done = _column_bounds(H, n), np.zeros(n, np.int64)

    def columns(i):
        j0, j1 = bounds[i], bounds[i + 1]
        if not input_in_loop:
            with _never_waited_for_if_failing(steps_done, i):
                input_term = output.reshape(T * B, H)[:, j0:j1]
                np.matmul(x.reshape(T * B, I), weight_ih[j0:j1].T, out=input_term)
        _forward_columns(*arguments, steps_done, i, j0, j1)

    _on_threads(n, columns)
    return output, state[T % 2].copy()


def backward(grad_output, x, weight_ih, weight_hh, output, h0, grad_h_n, lengths):
    T, B, I = x.shape
    H = weight_hh.shape[0]
    grad_a, grad_x = _empty_aligned(output.shape, x.dtype), _empty_aligned(x.shape, x.dtype)
    g = _empty_aligned((B, H), x.dtype)
    g[:] = grad_h_n
    grad_x_in_loop = _weight_ih_in_loop(weight_ih, B)
    # Transposed copies, so that the per-step products read contiguous rows.
    weight_hh_t = np.ascontiguousarray(weight_hh.T)
    weight_ih_t = np.ascontiguousarray(weight_ih.T) if grad_x_in_loop else weight_ih
    arguments = (grad_output, weight_hh_t, weight_ih_t, output, _full_lengths(lengths, T, B), g,
                 grad_a, grad_x, _empty_aligned((B, H), x.dtype), grad_x_in_loop)
    valid = valid_steps(lengths, T, B)[:, :, None]
    n = _thread_count(H, B * H * (H + I))
    hidden, inputs, steps_done = _column_bounds(H, n), _column_bounds(I, n), np.zeros(n, np.int64)

    def chain_then_products(i):
        """The chain over thread i's columns, then, once every thread is through it, the
        products over the rows of time steps i·T/n .. (i+1)·T/n: grad_x (unless the chain
        computed it), and those steps' share of the weight gradients (the sums over rows of
        reference.weight_gradients, split in n parts)."""
        _backward_columns(*arguments, steps_done, i, hidden[i], hidden[i + 1], inputs[i],
                          inputs[i + 1])
        t0, t1 = T * i // n, T * (i + 1) // n
        if not grad_x_in_loop:
            np.matmul(grad_a[t0:t1].reshape(-1, H), weight_ih, out=grad_x[t0:t1].reshape(-1, I))
        h_before = h0 if t0 == 0 else output[t0 - 1]  # h_{t0-1}; masked where it is padding
        return weight_gradients(grad_a[t0:t1], x[t0:t1], output[t0:t1], h_before, valid[t0:t1])

    weight_grads, *other_parts = _on_threads(n, chain_then_products)
    for part in other_parts:
        for total, term in zip(weight_grads, part):
            total += term
    return (grad_x, g) + weight_grads

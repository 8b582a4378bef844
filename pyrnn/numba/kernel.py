"""The time loops of the numba backend, forward and backward, and the calls that run them.

The time steps run inside one compiled loop per thread with no Python and no allocation: each
step is a register-tiled product with the packed weight_hh (products.py) whose epilogue adds
the input term and the bias and applies φ (activations.py), as the native kernel's does
(docs/design.md §3.2). The products over all T·B rows at once (the weight gradients; the input
term and grad_x too when weight_ih is big) stay NumPy matrix products, i.e. BLAS.

The activation reaches the loops as a code (activations.NONLINEARITIES), an argument like the
arrays: one compiled loop serves every activation.
``error_model="numpy"``: a float division is not checked for zero, so loops with one vectorise.
"""
import numpy as np
from numba import njit

from ..reference import PRODUCTS, round_to_bf16, valid_steps, weight_gradients
from .activations import NONLINEARITIES, apply, gradient
from .intrinsics import stack_tile
from .products import (PANEL_VECTORS, PRECISIONS, TILE_ROWS, empty_packed, matmul_columns, operand,
                       pack, panel_columns, panel_width, product_tile)
from .threads import (NEVER, barrier, column_bounds, empty, no_float_warnings, on_threads_interruptibly,
                      stopping, thread_count)


@njit(error_model="numpy", inline="always")
def _step_tile(activation, precision, tile, t, b0, p, j0, j1, output, state, state_operand,
               packed_hh, bias, lengths):
    """h_t = φ(output[t] + h_{t-1} · weight_hhᵀ + bias) for rows b0.. (as many as the tile
    has) and hidden units j0:j1 (panel p), where output[t] holds the input term x_t · weight_ihᵀ;
    padding rows: 0, state carried. The product reads state_operand (state itself, or the
    states rounded to bf16), which gets operand(h_t)."""
    h_prev, h_next = state[t % 2], state[(t + 1) % 2]
    product_tile(tile, state_operand[t % 2], b0, packed_hh, p)
    b_j = bias[j0:j1]
    for r in range(tile.shape[0]):
        b = b0 + r
        # Row slices, so that the loops below start at 0: numba then knows no index is negative
        # (no wraparound check) and LLVM vectorises them.
        out, new = output[t, b, j0:j1], h_next[b, j0:j1]
        new_operand = state_operand[(t + 1) % 2, b, j0:j1]
        if t < lengths[b]:
            for j in range(out.shape[0]):
                h_j = apply(activation, out[j] + tile[r, j] + b_j[j])
                out[j] = h_j
                new[j] = h_j
                new_operand[j] = operand(precision, h_j)
        else:  # padding: output 0, state carried
            out[:] = 0.0
            new[:] = h_prev[b, j0:j1]
            new_operand[:] = state_operand[t % 2, b, j0:j1]


@njit(error_model="numpy", cache=True, nogil=True)
def forward_columns(activation, precision, x, weight_ih, weight_hh, bias, lengths, output, state,
                    state_operand, input_in_loop, stop, steps_done, thread, j0, j1):
    """The forward time loop for hidden units j0:j1 (all of them with one thread).
    output (T, B, H) gets h_t (0 on padding); state (2, B, H): h_{t-1} in state[t % 2] (h0 in
    state[0] on entry), h_t goes to state[(t + 1) % 2]; state_operand: what the products read
    of state (the same array, or for bf16 its rounded copy, with operand(h0) on entry). The
    input term
    x_t · weight_ihᵀ is computed here, for every step before the first, if input_in_loop, else
    it is in output on entry."""
    T, B, I = x.shape
    H = output.shape[2]
    packed_hh = empty_packed(H, H, x.dtype)  # weight_hhᵀ
    pack(weight_hh.T, packed_hh, j0, j1)
    if input_in_loop:
        packed_ih = empty_packed(I, H, x.dtype)  # weight_ihᵀ
        pack(weight_ih.T, packed_ih, j0, j1)
        matmul_columns(x.reshape(T * B, I), packed_ih, output.reshape(T * B, H), j0, j1)
    tile = stack_tile(TILE_ROWS, PANEL_VECTORS, x.dtype)
    row = stack_tile(1, PANEL_VECTORS, x.dtype)
    width = panel_width(x.dtype)
    for t in range(T):
        if stopping(stop, steps_done, thread):
            return
        for p in range(j0 // width, -(-j1 // width)):
            c0, c1 = p * width, min(p * width + width, j1)
            for b0 in range(0, B - TILE_ROWS + 1, TILE_ROWS):
                _step_tile(activation, precision, tile, t, b0, p, c0, c1, output, state,
                           state_operand, packed_hh, bias, lengths)
            for b in range(B - B % TILE_ROWS, B):  # the rows left over (all of them when B < 4)
                _step_tile(activation, precision, row, t, b, p, c0, c1, output, state,
                           state_operand, packed_hh, bias, lengths)
        barrier(steps_done, thread, t + 1)


@njit(error_model="numpy", cache=True, nogil=True)
def _grad_a_columns(activation, precision, t, grad_output, output, g, lengths, grad_a,
                    grad_a_operand, k0, k1):
    """grad_a[t][:, k0:k1] = (g + grad_output[t]) · φ'(a_t) on valid rows, 0 on padding;
    grad_a_operand (grad_a itself, or its bf16 copy) gets operand(that)."""
    for b in range(output.shape[1]):
        da, da_operand = grad_a[t, b, k0:k1], grad_a_operand[t, b, k0:k1]  # row slices: see _step_tile
        if t < lengths[b]:
            g_b, go, h = g[b, k0:k1], grad_output[t, b, k0:k1], output[t, b, k0:k1]
            for k in range(da.shape[0]):
                da[k] = gradient(activation, g_b[k] + go[k], h[k])
                da_operand[k] = operand(precision, da[k])
        else:
            da[:] = 0.0
            da_operand[:] = 0.0


@njit(error_model="numpy", cache=True, nogil=True)
def backward_columns(activation, precision, grad_output, weight_hh, weight_ih, output, lengths, g,
                     grad_a, grad_a_operand, grad_x, product, grad_x_in_loop, stop, steps_done, thread,
                     k0, k1, i0, i1):
    """The BPTT chain for hidden units k0:k1 (all of them with one thread), and, if
    grad_x_in_loop, grad_x[t] = grad_a[t] · weight_ih for inputs i0:i1 as soon as grad_a[t] is
    complete. g (B, H): dL/dh_T on entry (grad_h_n), dL/dh0 on exit; grad_a (T, B, H) gets
    dL/da_t, grad_a_operand what the products read of it (see _grad_a_columns); product (B, H)
    is scratch."""
    packed_hh = empty_packed(weight_hh.shape[0], weight_hh.shape[1], weight_hh.dtype)
    pack(weight_hh, packed_hh, k0, k1)
    packed_ih = empty_packed(weight_ih.shape[0] if grad_x_in_loop else 0, weight_ih.shape[1],
                             weight_ih.dtype)
    if grad_x_in_loop:
        pack(weight_ih, packed_ih, i0, i1)
    T = output.shape[0]
    if T > 0:
        _grad_a_columns(activation, precision, T - 1, grad_output, output, g, lengths, grad_a,
                        grad_a_operand, k0, k1)
        barrier(steps_done, thread, 1)
    for t in range(T - 1, -1, -1):  # here grad_a[t] is complete
        if stopping(stop, steps_done, thread):
            return
        matmul_columns(grad_a_operand[t], packed_hh, product, k0, k1)
        if grad_x_in_loop:
            matmul_columns(grad_a_operand[t], packed_ih, grad_x[t], i0, i1)
        for b in range(output.shape[1]):
            if t < lengths[b]:  # padding rows pass g through
                g[b, k0:k1] = product[b, k0:k1]
        if t > 0:
            _grad_a_columns(activation, precision, t - 1, grad_output, output, g, lengths, grad_a,
                            grad_a_operand, k0, k1)
        barrier(steps_done, thread, T - t + 1)


def _full_lengths(lengths, T, B):
    if lengths is None:
        lengths = np.empty(B, np.int64)
        lengths.fill(T)  # 0.3 us; np.full takes 0.7
    return lengths


# The products with weight_ih (forward the input term x_t · weight_ihᵀ, backward grad_x_t =
# grad_a_t · weight_ih) are computed by matmul_columns in the compiled time loop (forward: over
# all steps before the first), which is faster than NumPy's BLAS on the same product over all
# T·B rows at once while a panel of weight_ih stays in cache. Measured at 1 thread (min of 7),
# compiled against BLAS, forward: tiny 14 / 17 us, small 0.54 / 0.64 ms, medium 8.8 / 12.7,
# large 48 / 63, deepbench (weight_ih 12 MB) 96 / 134; backward: large 148 / 161, deepbench
# 298 / 309. Larger weights (longer panels) were not measured: BLAS, which blocks its sums.
IN_LOOP_MAX_WEIGHT_IH_BYTES = 16 << 20


def _weight_ih_in_loop(weight_ih):
    return weight_ih.nbytes <= IN_LOOP_MAX_WEIGHT_IH_BYTES


def _rounded_if_bf16(precision, *arrays):
    """The arrays, rounded to bf16 (as float32) for precision "bf16": the operands of the
    products that are rounded once per call (weights, x)."""
    return tuple(round_to_bf16(a) for a in arrays) if precision == "bf16" else arrays


def _operand_buffer(precision, own, n):
    """What the products read of a buffer the time loop fills: itself, or for bf16 a copy of its
    shape that the loop fills with the rounded values."""
    return own if precision == "fp32" else empty(own.shape, own.dtype, n)


def forward(x, weight_ih, weight_hh, bias, h0, lengths, nonlinearity="tanh", precision="fp32"):
    T, B, I = x.shape
    H = weight_hh.shape[0]
    panel = panel_columns(x.itemsize)
    n = thread_count(H, B * H * (H + I), panel)
    x, weight_ih, weight_hh = _rounded_if_bf16(precision, x, weight_ih, weight_hh)
    output = empty((T, B, H), x.dtype, n)
    state = empty((2, B, H), x.dtype, n)  # h_{t-1} and h_t, taking turns
    state[0] = h0
    state_operand = _operand_buffer(precision, state, n)
    if precision == "bf16":
        state_operand[0] = round_to_bf16(h0)
    input_in_loop = _weight_ih_in_loop(weight_ih)
    arguments = (NONLINEARITIES[nonlinearity], PRECISIONS[precision], x, weight_ih, weight_hh, bias,
                 _full_lengths(lengths, T, B), output, state, state_operand, input_in_loop)
    bounds, steps_done = column_bounds(H, n, panel), np.zeros(n, np.int64)

    def columns(i, stop=NEVER):
        j0, j1 = bounds[i], bounds[i + 1]
        if not input_in_loop:
            with no_float_warnings():
                input_term = output.reshape(T * B, H)[:, j0:j1]
                np.matmul(x.reshape(T * B, I), weight_ih[j0:j1].T, out=input_term)
        forward_columns(*arguments, stop, steps_done, i, j0, j1)

    on_threads_interruptibly(T * B * H * (H + I), n, columns, steps_done)
    return output, state[T % 2]  # h_n: a view that keeps the (2, B, H) buffer, not a copy


def backward(grad_output, x, weight_ih, weight_hh, output, h0, grad_h_n, lengths,
             nonlinearity="tanh", precision="fp32"):
    T, B, I = x.shape
    H = weight_hh.shape[0]
    panel = panel_columns(x.itemsize)
    n = thread_count(H, B * H * (H + I), panel)
    weight_ih, weight_hh = _rounded_if_bf16(precision, weight_ih, weight_hh)
    grad_a, grad_x = empty(output.shape, x.dtype, n), empty(x.shape, x.dtype, n)
    grad_a_operand = _operand_buffer(precision, grad_a, n)
    g = empty((B, H), x.dtype, n)
    g[:] = grad_h_n
    grad_x_in_loop = _weight_ih_in_loop(weight_ih)
    hidden, inputs = column_bounds(H, n, panel), column_bounds(I, n, panel)
    arguments = (NONLINEARITIES[nonlinearity], PRECISIONS[precision], grad_output, weight_hh,
                 weight_ih, output, _full_lengths(lengths, T, B), g, grad_a, grad_a_operand, grad_x,
                 empty((B, H), x.dtype, n), grad_x_in_loop)
    valid = valid_steps(lengths, T, B)[:, :, None]
    steps_done = np.zeros(n, np.int64)

    def chain_then_products(i, stop=NEVER):
        """The chain over thread i's columns, then, once every thread is through it, the
        products over the rows of time steps i·T/n .. (i+1)·T/n: grad_x (unless the chain
        computed it), and those steps' share of the weight gradients (the sums over rows of
        reference.weight_gradients, split in n parts)."""
        backward_columns(*arguments, stop, steps_done, i, hidden[i], hidden[i + 1], inputs[i],
                         inputs[i + 1])
        if stop[0]:
            return None  # interrupted: the caller raises
        t0, t1 = T * i // n, T * (i + 1) // n
        with no_float_warnings():
            if not grad_x_in_loop:
                np.matmul(grad_a_operand[t0:t1].reshape(-1, H), weight_ih,
                          out=grad_x[t0:t1].reshape(-1, I))
            h_before = h0 if t0 == 0 else output[t0 - 1]  # h_{t0-1}; masked where it is padding
            return weight_gradients(grad_a[t0:t1], x[t0:t1], output[t0:t1], h_before,
                                    valid[t0:t1], PRODUCTS[precision])

    weight_grads, *other_parts = on_threads_interruptibly(2 * T * B * H * (H + I), n, chain_then_products,
                                                          steps_done)
    with no_float_warnings():
        for part in other_parts:
            for total, term in zip(weight_grads, part):
                total += term
    return (grad_x, g) + weight_grads

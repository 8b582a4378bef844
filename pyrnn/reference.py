"""The NumPy reference: the executable specification of pyrnn (design.md §1).

Written to be read, not tuned: each line is a line of the math, and the other backends
(``cpp``, ``numba``) compute exactly this and are tested against it.

Every function takes clean arrays, as pyrnn.forward/backward hand them over: C-contiguous,
time-major, one float dtype, ``h0``/``bias``/``grad_h_n`` present, ``lengths`` int64 or None.

    x (T, B, I)   h0 (B, H)   weight_ih (H, I)   weight_hh (H, H)   bias (H,)   lengths (B,)
"""
import functools

import numpy as np


def without_float_warnings(function):
    """NaN and inf in the inputs are values that propagate to the results, as in the compiled
    backends, not NumPy warnings (overflow, invalid) raised on the way."""
    @functools.wraps(function)
    def quietly(*arrays):
        with np.errstate(all="ignore"):
            return function(*arrays)
    return quietly


def valid_steps(lengths, T, B):
    """(T, B) bool: True where row b takes part in step t, False on padding (t >= lengths[b])."""
    if lengths is None:
        return np.ones((T, B), dtype=bool)
    return np.arange(T)[:, None] < lengths[None, :]


@without_float_warnings
def forward(x, weight_ih, weight_hh, bias, h0, lengths):
    """h_t = tanh(x_t · weight_ihᵀ + h_{t-1} · weight_hhᵀ + bias) -> (output (T, B, H), h_n (B, H))."""
    T, B, _ = x.shape
    valid = valid_steps(lengths, T, B)[:, :, None]
    input_term = x @ weight_ih.T + bias  # does not depend on h: all steps in one product
    output = np.zeros(input_term.shape, dtype=x.dtype)
    h = h0.copy()
    for t in range(T):
        h_new = np.tanh(input_term[t] + h @ weight_hh.T)
        output[t] = np.where(valid[t], h_new, 0)  # padding outputs are 0 ...
        h = np.where(valid[t], h_new, h)  # ... and padding rows carry their state
    return output, h


@without_float_warnings
def backward(grad_output, x, weight_ih, weight_hh, output, h0, grad_h_n, lengths):
    """BPTT: -> (grad_x, grad_h0, grad_weight_ih, grad_weight_hh, grad_bias)."""
    T, B, _ = x.shape
    valid = valid_steps(lengths, T, B)[:, :, None]
    grad_a = np.zeros_like(output)  # dL/da_t, 0 on padding
    g = grad_h_n.copy()  # dL/dh flowing back from the future
    for t in reversed(range(T)):
        da = (g + grad_output[t]) * (1 - output[t] ** 2)  # tanh' = 1 - h_t²
        grad_a[t] = np.where(valid[t], da, 0)
        g = np.where(valid[t], da @ weight_hh, g)  # padding rows pass g through
    return (grad_a @ weight_ih, g) + weight_gradients(grad_a, x, output, h0, valid)


def weight_gradients(grad_a, x, output, h0, valid):
    """(grad_weight_ih, grad_weight_hh, grad_bias) from dL/da_t of every step.

    Nothing here is sequential: each is one sum over all T·B rows. Padding rows are masked
    out of the inputs as well, so that a NaN or inf sitting in padding cannot leak in (0·inf).
    """
    T, B, I = x.shape
    H = grad_a.shape[2]
    h_prev = np.concatenate([h0[None], output])[: len(output)]  # h_{t-1} for every t
    rows_a = grad_a.reshape(T * B, H)  # (not -1: ambiguous when a dimension is 0)
    rows_x = np.where(valid, x, 0).reshape(T * B, I)
    rows_h = np.where(valid, h_prev, 0).reshape(T * B, H)
    return rows_a.T @ rows_x, rows_a.T @ rows_h, rows_a.sum(axis=0)

"""The ``numba`` backend: the reference (pyrnn/reference.py) with its time loops compiled.

Only the recurrence is sequential, so only it is compiled (``@njit``, no object mode, cached
on disk); the products over all T·B rows at once (the input term, the weight gradients) stay
NumPy matrix products, i.e. BLAS. Inner loops run along H over contiguous memory
(y += a·x), which LLVM vectorises without reassociating any sum.
"""
import numpy as np
from numba import njit

from .reference import valid_steps, weight_gradients


@njit(cache=True)
def _forward_steps(output, weight_hh_t, h, lengths):
    """In place: output holds the input term on entry and h_t (0 on padding) on exit; h the state."""
    T, B, H = output.shape
    for t in range(T):
        for b in range(B):
            a = output[t, b]
            if t >= lengths[b]:
                a[:] = 0.0
                continue
            for k in range(H):
                h_k = h[b, k]
                w = weight_hh_t[k]
                for j in range(H):
                    a[j] += h_k * w[j]
            for j in range(H):
                a[j] = np.tanh(a[j])
                h[b, j] = a[j]


@njit(cache=True)
def _backward_steps(grad_output, weight_hh, output, g, lengths, grad_a):
    """In place: g holds grad_h_n on entry and grad_h0 on exit; grad_a receives dL/da_t."""
    T, B, H = output.shape
    for t in range(T - 1, -1, -1):
        for b in range(B):
            if t >= lengths[b]:
                continue
            da = grad_a[t, b]
            for j in range(H):
                h_j = output[t, b, j]
                da[j] = (g[b, j] + grad_output[t, b, j]) * (1.0 - h_j * h_j)
            g[b, :] = 0.0
            for j in range(H):
                da_j = da[j]
                w = weight_hh[j]
                for k in range(H):
                    g[b, k] += da_j * w[k]


def _full_lengths(lengths, T, B):
    return np.full(B, T, dtype=np.int64) if lengths is None else lengths


def forward(x, weight_ih, weight_hh, bias, h0, lengths):
    (T, B, I), H = x.shape, weight_hh.shape[0]
    output = (x.reshape(T * B, I) @ weight_ih.T + bias).reshape(T, B, H)
    h_n = h0.copy()
    _forward_steps(output, np.ascontiguousarray(weight_hh.T), h_n, _full_lengths(lengths, T, B))
    return output, h_n


def backward(grad_output, x, weight_ih, weight_hh, output, h0, grad_h_n, lengths):
    T, B, I = x.shape
    grad_a = np.zeros_like(output)
    g = grad_h_n.copy()
    _backward_steps(grad_output, weight_hh, output, g, _full_lengths(lengths, T, B), grad_a)
    grad_x = (grad_a.reshape(T * B, weight_hh.shape[0]) @ weight_ih).reshape(T, B, I)
    valid = valid_steps(lengths, T, B)[:, :, None]
    return (grad_x, g) + weight_gradients(grad_a, x, output, h0, valid)

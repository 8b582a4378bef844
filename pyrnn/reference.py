"""The NumPy reference: the executable specification of pyrnn (docs/design.md §1).

Written to be read, not tuned: each line is a line of the math, and the other backends
(``cpp``, ``numba``) compute exactly this and are tested against it.

Every function takes clean arrays, as pyrnn.forward/backward hand them over: C-contiguous,
time-major, one float dtype, ``h0``/``bias``/``grad_h_n`` present, ``lengths`` int64 or None.

    x (T, B, I)   h0 (B, H)   weight_ih (H, I)   weight_hh (H, H)   bias (H,)   lengths (B,)

``nonlinearity`` names φ in h_t = φ(a_t): a key of ACTIVATIONS. ``precision`` names the
arithmetic of the products: a key of PRODUCTS ("bf16" for float32 arrays only).

A stack of L layers × D directions (stack_forward, stack_backward; docs/design.md §1) is composed
of single-layer calls; the numba backend composes its own single-layer calls with the same two
functions.

    layers[l·D + d] = (weight_ih, weight_hh, bias)   h0, h_n (L·D, B, H)
    layer_outputs (L, T, B, D·H)   dropout_masks (L - 1, T, B, D·H) or None
"""
import functools

import numpy as np

# φ, and dL/da from dL/dh through it, written with the output h = φ(a), so that backward needs
# only the saved outputs, never the pre-activations.
ACTIVATIONS = {
    "tanh": (np.tanh, lambda grad_h, h: grad_h * (1 - h**2)),  # tanh' = 1 - h²
    # relu passes the gradient where h > 0 and gives 0 elsewhere (0 at the kink), as torch's
    # threshold_backward: a select, not grad_h · [h > 0], which is NaN where grad_h is inf or NaN
    # on a row that relu cut off; NaN h (from NaN a) passes it, as in torch (NaN <= 0 is false).
    "relu": (lambda a: np.maximum(a, 0), lambda grad_h, h: np.where(h <= 0, 0, grad_h)),
}


def round_to_bf16(a):
    """float32 `a` rounded to the nearest bfloat16, ties to even, as float32 (docs/design.md §1).

    A bfloat16 is the upper half of a float32: sign, the same 8-bit exponent, 7 of the 23
    mantissa bits. Rounding adds half a unit of the kept bits (minus one when the lowest kept bit
    is 0: ties go to even) to the bit pattern and clears the lower half; a carry out of the
    mantissa steps the exponent, which is the right rounding up to and including overflow to inf.
    NaN stays NaN: its lower half is cleared with the quiet bit set, so that a NaN whose payload
    sat only in the cleared bits does not become inf.
    """
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    lowest_kept = (bits >> 16) & 1
    rounded = (bits + np.uint32(0x7FFF) + lowest_kept) & np.uint32(0xFFFF0000)
    quiet_nan = (bits & np.uint32(0xFFFF0000)) | np.uint32(0x00400000)
    return np.where(np.isnan(bits.view(np.float32)), quiet_nan, rounded).view(np.float32)


def bf16_product(a, b):
    """a @ b in precision "bf16" (float32 arrays): both operands rounded to bfloat16, their
    products (exact: 8-bit by 8-bit significands) summed in float64, the sum rounded to float32
    once. This is the exact accumulation the fast backends approximate in float32."""
    return (round_to_bf16(a).astype(np.float64) @ round_to_bf16(b).astype(np.float64)).astype(np.float32)


# The matrix product of each precision. Every product of the RNN goes through one of these;
# everything else (bias, φ, φ', the saved outputs, the gradients returned) stays in the arrays'
# own dtype.
PRODUCTS = {"fp32": np.matmul, "bf16": bf16_product}


def without_float_warnings(function):
    """NaN and inf in the inputs are values that propagate to the results, as in the compiled
    backends, not NumPy warnings (overflow, invalid) raised on the way."""
    @functools.wraps(function)
    def quietly(*arguments, **keywords):
        with np.errstate(all="ignore"):
            return function(*arguments, **keywords)
    return quietly


def valid_steps(lengths, T, B):
    """(T, B) bool: True where row b takes part in step t, False on padding (t >= lengths[b])."""
    if lengths is None:
        return np.ones((T, B), dtype=bool)
    return np.arange(T)[:, None] < lengths[None, :]


@without_float_warnings
def forward(x, weight_ih, weight_hh, bias, h0, lengths, nonlinearity="tanh", precision="fp32"):
    """h_t = φ(x_t · weight_ihᵀ + h_{t-1} · weight_hhᵀ + bias) -> (output (T, B, H), h_n (B, H))."""
    phi, _ = ACTIVATIONS[nonlinearity]
    product = PRODUCTS[precision]
    T, B, _ = x.shape
    valid = valid_steps(lengths, T, B)[:, :, None]
    input_term = product(x, weight_ih.T) + bias  # does not depend on h: all steps in one product
    output = np.zeros(input_term.shape, dtype=x.dtype)
    h = h0.copy()
    for t in range(T):
        h_new = phi(input_term[t] + product(h, weight_hh.T))
        output[t] = np.where(valid[t], h_new, 0)  # padding outputs are 0 ...
        h = np.where(valid[t], h_new, h)  # ... and padding rows carry their state
    return output, h


@without_float_warnings
def backward(grad_output, x, weight_ih, weight_hh, output, h0, grad_h_n, lengths,
             nonlinearity="tanh", precision="fp32"):
    """BPTT: -> (grad_x, grad_h0, grad_weight_ih, grad_weight_hh, grad_bias)."""
    _, through_phi = ACTIVATIONS[nonlinearity]
    product = PRODUCTS[precision]
    T, B, _ = x.shape
    valid = valid_steps(lengths, T, B)[:, :, None]
    grad_a = np.zeros_like(output)  # dL/da_t, 0 on padding
    g = grad_h_n.copy()  # dL/dh flowing back from the future
    for t in reversed(range(T)):
        da = through_phi(g + grad_output[t], output[t])  # dL/dh_t · φ'(a_t), from h_t
        grad_a[t] = np.where(valid[t], da, 0)
        g = np.where(valid[t], product(da, weight_hh), g)  # padding rows pass g through
    return (product(grad_a, weight_ih), g) + weight_gradients(grad_a, x, output, h0, valid, product)


def weight_gradients(grad_a, x, output, h0, valid, product=np.matmul):
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
    return product(rows_a.T, rows_x), product(rows_a.T, rows_h), rows_a.sum(axis=0)


def reverse_within_lengths(x, lengths):
    """x (T, B, ...) with each row's first lengths[b] steps in reverse order; padding stays in place.

    This is how the reverse direction reads a padded batch (torch's packed sequences): row b's
    last valid step comes first. It is its own inverse, so it also maps the reverse direction's
    outputs and gradients back to the original time order. The result is a new C-contiguous
    array, as every backend expects.
    """
    if lengths is None:
        return np.ascontiguousarray(x[::-1])
    T, B = x.shape[:2]
    t = np.arange(T)[:, None]
    source = np.where(t < lengths, lengths - 1 - t, t)  # (T, B): step read at (t, b)
    return x[source, np.arange(B)]


def _direction_sequence(sequence, direction, lengths):
    """A (T, B, F) sequence as direction 0 (forward) or 1 (reverse) reads it, C-contiguous."""
    if direction == 1:
        return reverse_within_lengths(sequence, lengths)
    return np.ascontiguousarray(sequence)


def _layer_input(x, layer_outputs, dropout_masks, l):
    """What layer l reads: x for l = 0, else layer l - 1's output times its dropout mask."""
    if l == 0:
        return x
    if dropout_masks is None:
        return layer_outputs[l - 1]
    return layer_outputs[l - 1] * dropout_masks[l - 1]


@without_float_warnings
def stack_forward(x, layers, h0, lengths, dropout_masks, bidirectional, nonlinearity,
                  precision="fp32", layer_forward=forward):
    """L layers × D directions -> (layer_outputs (L, T, B, D·H), h_n (L·D, B, H)) (docs/design.md §1).

    Layer 0 reads x; layer l > 0 reads layer_outputs[l - 1] (both directions, forward first)
    times dropout_masks[l - 1]. The reverse direction runs the same recurrence on each row
    reversed within its length and its outputs are written back in original time order.
    layer_forward is the single-layer forward of the backend being composed.
    """
    D = 2 if bidirectional else 1
    L, H = len(layers) // D, h0.shape[2]
    T, B, _ = x.shape
    layer_outputs = np.empty((L, T, B, D * H), dtype=x.dtype)
    h_n = np.empty_like(h0)
    for l in range(L):
        layer_input = _layer_input(x, layer_outputs, dropout_masks, l)
        for d in range(D):
            k = l * D + d
            weight_ih, weight_hh, bias = layers[k]
            sequence = _direction_sequence(layer_input, d, lengths)
            output, h_n[k] = layer_forward(sequence, weight_ih, weight_hh, bias, h0[k], lengths,
                                           nonlinearity, precision)
            layer_outputs[l, :, :, d * H:(d + 1) * H] = _direction_sequence(output, d, lengths)
    return layer_outputs, h_n


@without_float_warnings
def stack_backward(grad_output, x, layers, layer_outputs, h0, grad_h_n, lengths, dropout_masks,
                   bidirectional, nonlinearity, precision="fp32", layer_backward=backward):
    """BPTT through stack_forward -> (grad_x, grad_h0, [(grad_weight_ih, grad_weight_hh,
    grad_bias) per layer and direction]).

    The layers are walked top down: each direction's single-layer backward gets its slice of
    dL/d(layer output) (in its own time order) and its share of grad_h_n; the gradients into
    the layer's input from both directions add up, and pass through the dropout mask below.
    """
    D = 2 if bidirectional else 1
    L, H = len(layers) // D, h0.shape[2]
    grad_layers = [None] * len(layers)
    grad_h0 = np.empty_like(h0)
    grad = grad_output  # dL/d(layer_outputs[l]), (T, B, D·H)
    for l in reversed(range(L)):
        layer_input = _layer_input(x, layer_outputs, dropout_masks, l)
        grad_input = 0
        for d in range(D):
            k = l * D + d
            weight_ih, weight_hh, _ = layers[k]
            columns = slice(d * H, (d + 1) * H)
            grads = layer_backward(_direction_sequence(grad[:, :, columns], d, lengths),
                                   _direction_sequence(layer_input, d, lengths), weight_ih, weight_hh,
                                   _direction_sequence(layer_outputs[l, :, :, columns], d, lengths),
                                   h0[k], grad_h_n[k], lengths, nonlinearity, precision)
            grad_input = grad_input + _direction_sequence(grads[0], d, lengths)
            grad_h0[k] = grads[1]
            grad_layers[k] = tuple(grads[2:])
        grad = grad_input if l == 0 or dropout_masks is None else grad_input * dropout_masks[l - 1]
    return grad, grad_h0, grad_layers

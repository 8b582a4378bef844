"""Layers on the kernel: a multi-layer, bidirectional ``RNN`` with torch.nn.RNN's conventions and a
``Linear`` output head, as NumPy forward/backward pairs.

A layer's ``forward`` caches what its ``backward`` needs; ``backward`` returns the gradient with
respect to the layer's input and writes the parameter gradients into ``.grads`` (same keys and
shapes as ``.params``). Each backward overwrites ``.grads`` (it does not accumulate), and the
arrays in ``.params``/``.grads`` keep their identity for the layer's lifetime, so an optimizer can
hold on to them. Every recurrence runs through pyrnn.forward/pyrnn.backward on whichever backend
is selected; nothing here depends on which one.

    RNN:    x (T, B, I) [batch_first: (B, T, I)]   h0, h_n (num_layers·D, B, H)   output (T, B, D·H)
    Linear: x (..., in_features) -> (..., out_features)
"""
from numbers import Integral

import numpy as np

from . import _api
from ._api import _FLOAT_DTYPES


def _float_dtype(dtype):
    dtype = np.dtype(dtype)
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32 or float64, got {dtype}")
    return dtype


def _positive_int(name, value):
    if not isinstance(value, Integral) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _as_array(name, value, dtype, shape, dims):
    """value as an ndarray of the layer's dtype and the expected shape (dims names it, e.g. "T, B, I").

    A float array of the other precision is an error rather than a silent cast, as in torch.
    """
    if isinstance(value, np.ndarray) and value.dtype.kind == "f" and value.dtype != dtype:
        raise TypeError(f"{name} has dtype {value.dtype} but the layer is {dtype}")
    try:
        array = np.asarray(value, dtype=dtype)
    except (TypeError, ValueError) as error:
        raise TypeError(f"{name} must be an array of floats, got {type(value).__name__}") from error
    if array.ndim != len(shape) or any(want is not None and got != want
                                       for got, want in zip(array.shape, shape)):
        expected = ", ".join("?" if d is None else str(d) for d in shape)
        raise ValueError(f"{name} has shape {array.shape}, expected ({expected}) = ({dims})")
    return array


def reverse_within_lengths(x, lengths):
    """x (T, B, ...) with each row's first lengths[b] steps in reverse order; padding stays in place.

    This is how the reverse direction reads a padded batch (torch's packed sequences): row b's
    last valid step comes first. It is its own inverse, so it also maps the reverse direction's
    outputs and gradients back to the original time order.
    """
    if lengths is None:
        return x[::-1]
    T, B = x.shape[:2]
    t = np.arange(T)[:, None]
    source = np.where(t < lengths, lengths - 1 - t, t)  # (T, B): step read at (t, b)
    return x[source, np.arange(B)]


def select_last(output, lengths=None, batch_first=False):
    """output (T, B, F) -> (B, F): each row's last valid step (step lengths[b] - 1; T - 1 without
    lengths). This is the many-to-one read-out."""
    output = np.asarray(output)
    time_major = output.swapaxes(0, 1) if batch_first else output
    T, B = time_major.shape[:2]
    last = _last_steps(lengths, T, B)
    return time_major[last, np.arange(B)]


def select_last_backward(grad_last, lengths, T, batch_first=False):
    """Gradient of select_last: grad_last (B, F) placed at each row's last valid step of a
    zero (T, B, F) array ((B, T, F) with batch_first)."""
    grad_last = np.asarray(grad_last)
    B = grad_last.shape[0]
    grad = np.zeros((T,) + grad_last.shape, dtype=grad_last.dtype)
    grad[_last_steps(lengths, T, B), np.arange(B)] = grad_last
    return grad.swapaxes(0, 1) if batch_first else grad


def _last_steps(lengths, T, B):
    if lengths is None:
        return np.full(B, T - 1)
    lengths = _api._lengths(lengths, T, B)
    if B and lengths.min() < 1:
        raise ValueError(f"lengths[{int(np.argmin(lengths))}] = 0: a row with no steps has no last step")
    return lengths - 1


class RNN:
    """Multi-layer, optionally bidirectional Elman (tanh) RNN, with torch.nn.RNN's conventions.

    Parameters are named and shaped as torch's (``weight_ih_l0`` (H, I), ``weight_hh_l0`` (H, H),
    ``bias_ih_l0``/``bias_hh_l0`` (H,), and ``..._reverse`` for the second direction; layer k > 0
    reads D·H inputs) and drawn from U(-1/√H, 1/√H) as torch does. ``seed`` is an int or a
    numpy Generator; the same seed gives the same parameters.

    The two biases only ever enter as their sum, so the kernel gets ``bias_ih + bias_hh`` and both
    receive the same gradient. Layer k > 0 reads the concatenated outputs of both directions of
    layer k - 1. The reverse direction reads each row reversed within its own length.
    ``precision="bf16"`` (float32 only) runs every product in bfloat16 (pyrnn.forward's precision).
    """

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                 bidirectional=False, dtype=np.float32, backend=None, seed=None, precision="fp32"):
        self.input_size = _positive_int("input_size", input_size)
        self.hidden_size = _positive_int("hidden_size", hidden_size)
        self.num_layers = _positive_int("num_layers", num_layers)
        self.bias = bool(bias)
        self.batch_first = bool(batch_first)
        self.bidirectional = bool(bidirectional)
        self.num_directions = 2 if bidirectional else 1
        self.dtype = _float_dtype(dtype)
        self.backend = backend
        _api._check_precision(precision)
        _api._check_precision_dtype(precision, self.dtype)
        self.precision = precision
        self._suffixes = ("", "_reverse")[: self.num_directions]

        H = self.hidden_size
        bound = 1 / np.sqrt(H)
        rng = np.random.default_rng(seed)
        self.params = {}
        for layer in range(self.num_layers):  # torch's order: per layer, per direction
            layer_inputs = self.input_size if layer == 0 else self.num_directions * H
            for suffix in self._suffixes:
                shapes = {f"weight_ih_l{layer}{suffix}": (H, layer_inputs),
                          f"weight_hh_l{layer}{suffix}": (H, H)}
                if self.bias:
                    shapes.update({f"bias_ih_l{layer}{suffix}": (H,), f"bias_hh_l{layer}{suffix}": (H,)})
                for name, shape in shapes.items():
                    self.params[name] = rng.uniform(-bound, bound, shape).astype(self.dtype)
        self.grads = {name: np.zeros_like(value) for name, value in self.params.items()}
        self.grad_h0 = None  # (num_layers·D, B, H) after backward
        self._cache = None

    def state_dict(self):
        """{name: copy of the parameter}, keyed as torch.nn.RNN's state_dict."""
        return {name: value.copy() for name, value in self.params.items()}

    def load_state_dict(self, state):
        """Copy the arrays of ``state`` (e.g. a torch.nn.RNN state dict as NumPy arrays) into the
        parameters, in place. The keys must be exactly this layer's parameter names."""
        missing = sorted(set(self.params) - set(state))
        unexpected = sorted(set(state) - set(self.params))
        if missing or unexpected:
            raise KeyError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
        arrays = {}
        for name, value in state.items():
            array = np.asarray(value)
            if array.shape != self.params[name].shape:
                raise ValueError(f"{name} has shape {array.shape}, expected {self.params[name].shape}")
            arrays[name] = array
        for name, array in arrays.items():  # only once everything has been checked
            self.params[name][...] = array

    def _direction(self, layer, direction):
        """(weight_ih, weight_hh, bias or None) of one layer and direction."""
        suffix = f"_l{layer}{self._suffixes[direction]}"
        bias = (self.params["bias_ih" + suffix] + self.params["bias_hh" + suffix]) if self.bias else None
        return self.params["weight_ih" + suffix], self.params["weight_hh" + suffix], bias

    def _states(self, name, value, B):
        shape = (self.num_layers * self.num_directions, B, self.hidden_size)
        if value is None:
            return np.zeros(shape, dtype=self.dtype)
        return _as_array(name, value, self.dtype, shape, "num_layers·directions, B, H")

    def forward(self, x, h0=None, lengths=None):
        """x (T, B, I) ((B, T, I) with batch_first); h0 (num_layers·D, B, H) or None (zeros);
        lengths: B integers in [0, T] or None. Steps past a row's length are padding: output 0,
        state carried (torch's packed sequences). Returns (output (T, B, D·H) ((B, T, D·H) with
        batch_first), h_n (num_layers·D, B, H))."""
        dims = "B, T, I" if self.batch_first else "T, B, I"
        x = _as_array("x", x, self.dtype, (None, None, self.input_size), dims)
        if self.batch_first:
            x = x.swapaxes(0, 1)
        T, B = x.shape[:2]
        lengths = _api._lengths(lengths, T, B)
        h0 = self._states("h0", h0, B)

        h_n = np.empty_like(h0)
        steps = []  # (kernel input, kernel output) per layer and direction, for backward
        layer_input = x
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(self.num_directions):
                k = layer * self.num_directions + direction
                sequence = layer_input if direction == 0 else reverse_within_lengths(layer_input, lengths)
                output, h_n[k] = _api.forward(sequence, *self._direction(layer, direction), h0[k],
                                              lengths=lengths, backend=self.backend,
                                              precision=self.precision)
                steps.append((sequence, output))
                outputs.append(output if direction == 0 else reverse_within_lengths(output, lengths))
            layer_input = np.concatenate(outputs, axis=2) if len(outputs) > 1 else outputs[0]
        self._cache = (steps, h0, lengths)
        output = layer_input
        return (output.swapaxes(0, 1) if self.batch_first else output), h_n

    __call__ = forward

    def backward(self, grad_output, grad_h_n=None):
        """BPTT through the last forward. grad_output: dL/doutput, shaped as output; grad_h_n:
        dL/dh_n (num_layers·D, B, H) or None. Returns dL/dx shaped as x; fills .grads and
        .grad_h0 (dL/dh0)."""
        if self._cache is None:
            raise RuntimeError("RNN.backward called before RNN.forward")
        steps, h0, lengths = self._cache
        B, H, D = h0.shape[1], self.hidden_size, self.num_directions
        T = steps[0][0].shape[0]
        dims = "B, T, D·H" if self.batch_first else "T, B, D·H"
        shape = (B, T, D * H) if self.batch_first else (T, B, D * H)
        grad = _as_array("grad_output", grad_output, self.dtype, shape, dims)
        if self.batch_first:
            grad = grad.swapaxes(0, 1)
        grad_h_n = self._states("grad_h_n", grad_h_n, B)

        grad_h0 = np.empty_like(h0)
        for layer in reversed(range(self.num_layers)):
            grad_input = 0
            for direction in range(D):
                k = layer * D + direction
                sequence, output = steps[k]
                grad_direction = grad[:, :, direction * H:(direction + 1) * H]
                if direction == 1:
                    grad_direction = reverse_within_lengths(grad_direction, lengths)
                weight_ih, weight_hh, _ = self._direction(layer, direction)
                grads = _api.backward(grad_direction, sequence, weight_ih, weight_hh, output, h0[k],
                                      grad_h_n=grad_h_n[k], lengths=lengths, backend=self.backend,
                                      precision=self.precision)
                grad_input = grad_input + (grads.x if direction == 0
                                           else reverse_within_lengths(grads.x, lengths))
                grad_h0[k] = grads.h0
                suffix = f"_l{layer}{self._suffixes[direction]}"
                self.grads["weight_ih" + suffix][...] = grads.weight_ih
                self.grads["weight_hh" + suffix][...] = grads.weight_hh
                if self.bias:  # bias_ih and bias_hh enter as one sum: the same gradient
                    self.grads["bias_ih" + suffix][...] = grads.bias
                    self.grads["bias_hh" + suffix][...] = grads.bias
            grad = grad_input
        self.grad_h0 = grad_h0
        return grad.swapaxes(0, 1) if self.batch_first else grad

    def __repr__(self):
        return (f"RNN({self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, "
                f"bias={self.bias}, batch_first={self.batch_first}, "
                f"bidirectional={self.bidirectional}, dtype={self.dtype.name}"
                + (f", precision={self.precision!r})" if self.precision != "fp32" else ")"))


class Linear:
    """y = x · weightᵀ + bias over the last axis: the output head y_t = W_y h_t + b_y.

    weight (out_features, in_features) and bias (out_features,) are drawn from
    U(-1/√in_features, 1/√in_features), as torch.nn.Linear does.
    """

    def __init__(self, in_features, out_features, bias=True, dtype=np.float32, seed=None):
        self.in_features = _positive_int("in_features", in_features)
        self.out_features = _positive_int("out_features", out_features)
        self.dtype = _float_dtype(dtype)
        bound = 1 / np.sqrt(self.in_features)
        rng = np.random.default_rng(seed)
        self.params = {"weight": rng.uniform(-bound, bound, (self.out_features, self.in_features))
                       .astype(self.dtype)}
        if bias:
            self.params["bias"] = rng.uniform(-bound, bound, self.out_features).astype(self.dtype)
        self.grads = {name: np.zeros_like(value) for name, value in self.params.items()}
        self._x = None

    def forward(self, x):
        """x (..., in_features) -> (..., out_features)."""
        x = _as_array("x", x, self.dtype, (None,) * (np.ndim(x) - 1) + (self.in_features,),
                      "..., in_features")
        self._x = x
        # One 2-D product over all leading positions: a stacked (3-D) matmul against the
        # transposed weight would run as many small products, some outside BLAS.
        y = (x.reshape(-1, self.in_features) @ self.params["weight"].T).reshape(x.shape[:-1] + (-1,))
        return y + self.params["bias"] if "bias" in self.params else y

    __call__ = forward

    def backward(self, grad_y):
        """grad_y (..., out_features) -> dL/dx (..., in_features); fills .grads."""
        if self._x is None:
            raise RuntimeError("Linear.backward called before Linear.forward")
        x = self._x
        grad_y = _as_array("grad_y", grad_y, self.dtype, x.shape[:-1] + (self.out_features,),
                           "..., out_features")
        rows_y = grad_y.reshape(-1, self.out_features)  # every leading position is one row
        self.grads["weight"][...] = rows_y.T @ x.reshape(-1, self.in_features)
        if "bias" in self.params:
            self.grads["bias"][...] = rows_y.sum(axis=0)
        return (rows_y @ self.params["weight"]).reshape(x.shape)

    def __repr__(self):
        return (f"Linear({self.in_features}, {self.out_features}, bias={'bias' in self.params}, "
                f"dtype={self.dtype.name})")

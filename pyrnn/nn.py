"""Layers on the kernel: a multi-layer, bidirectional ``RNN`` with torch.nn.RNN's conventions and a
``Linear`` output head, as NumPy forward/backward pairs.

A layer's ``forward`` caches what its ``backward`` needs; ``backward`` returns the gradient with
respect to the layer's input and writes the parameter gradients into ``.grads`` (same keys and
shapes as ``.params``). Each backward overwrites ``.grads`` (it does not accumulate), and the
arrays in ``.params``/``.grads`` keep their identity for the layer's lifetime, so an optimizer can
hold on to them. The recurrence runs as one pyrnn.stack_forward/stack_backward call on whichever
backend is selected; nothing here depends on which one.

    RNN:    x (T, B, I) [batch_first: (B, T, I)]   h0, h_n (num_layers·D, B, H)   output (T, B, D·H)
    Linear: x (..., in_features) -> (..., out_features)
"""
import warnings
from numbers import Integral, Real

import numpy as np

from . import _api, _stack
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
    """Multi-layer, optionally bidirectional Elman RNN (tanh or relu), with torch.nn.RNN's conventions.

    Parameters are named and shaped as torch's (``weight_ih_l0`` (H, I), ``weight_hh_l0`` (H, H),
    ``bias_ih_l0``/``bias_hh_l0`` (H,), and ``..._reverse`` for the second direction; layer k > 0
    reads D·H inputs) and drawn from U(-1/√H, 1/√H) as torch does. ``seed`` is an int or a
    numpy Generator; the same seed gives the same parameters and the same dropout masks.

    The whole stack runs as one pyrnn.stack_forward / stack_backward call. The two biases only
    ever enter as their sum, so the kernel gets ``bias_ih + bias_hh`` and both receive the same
    gradient. ``dropout`` is torch's: in training mode (``train()``, the default; ``eval()``
    turns it off) each layer's output but the last is multiplied by a mask of {0, 1/(1 - p)},
    drawn from this layer's generator at each forward. ``precision="bf16"`` (float32 only) runs
    every product in bfloat16 (pyrnn.forward's precision).
    """

    def __init__(self, input_size, hidden_size, num_layers=1, nonlinearity="tanh", bias=True,
                 batch_first=False, dropout=0.0, bidirectional=False, dtype=np.float32,
                 backend=None, seed=None, precision="fp32"):
        self.input_size = _positive_int("input_size", input_size)
        self.hidden_size = _positive_int("hidden_size", hidden_size)
        self.num_layers = _positive_int("num_layers", num_layers)
        _api._check_nonlinearity(nonlinearity)
        self.nonlinearity = nonlinearity
        self.bias = bool(bias)
        self.batch_first = bool(batch_first)
        if isinstance(dropout, bool) or not isinstance(dropout, Real) or not 0 <= dropout <= 1:
            raise ValueError(f"dropout must be a number in [0, 1], got {dropout!r}")
        if dropout > 0 and num_layers == 1:  # as torch: dropout acts between layers only
            warnings.warn(f"dropout={dropout} has no effect with num_layers=1: it applies to "
                          "every layer's output but the last", UserWarning, stacklevel=2)
        self.dropout = float(dropout)
        self.bidirectional = bool(bidirectional)
        self.num_directions = 2 if bidirectional else 1
        self.dtype = _float_dtype(dtype)
        self.backend = backend
        _api._check_precision(precision)
        _api._check_precision_dtype(precision, self.dtype)
        self.precision = precision
        self.training = True
        # parameter names per layer and direction (the stack's order, torch's): ``weight_ih_l0``,
        # ``weight_hh_l0``, ``bias_ih_l0``, ``bias_hh_l0``, then ``..._l0_reverse`` and so on
        self._keys = [tuple(f"{kind}_l{layer}{suffix}" for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
                      for layer in range(self.num_layers) for suffix in ("", "_reverse")[: self.num_directions]]

        H = self.hidden_size
        bound = 1 / np.sqrt(H)
        self.generator = np.random.default_rng(seed)  # the parameters, then the dropout masks
        self.params = {}
        for k, names in enumerate(self._keys):  # torch's order: per layer, per direction
            shapes = (H, self.input_size if k < self.num_directions else self.num_directions * H), (H, H), (H,), (H,)
            for name, shape in list(zip(names, shapes))[: 4 if self.bias else 2]:
                self.params[name] = self.generator.uniform(-bound, bound, shape).astype(self.dtype)
        self.grads = {name: np.zeros_like(value) for name, value in self.params.items()}
        self.grad_h0 = None  # (num_layers·D, B, H) after backward
        self._cache = None

    def train(self, mode=True):
        """Training mode (dropout on) or, with mode=False, evaluation mode; returns self."""
        self.training = bool(mode)
        return self

    def eval(self):
        """Evaluation mode: no dropout. Returns self."""
        return self.train(False)

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

    def _layers(self):
        """[(weight_ih, weight_hh, bias or None)] per layer and direction, the stack's order."""
        p = self.params
        if not self.bias:
            return [(p[weight_ih], p[weight_hh], None) for weight_ih, weight_hh, _, _ in self._keys]
        return [(p[weight_ih], p[weight_hh], p[bias_ih] + p[bias_hh])
                for weight_ih, weight_hh, bias_ih, bias_hh in self._keys]

    def _dropout_masks(self, T, B):
        """(L - 1, T, B, D·H) masks of {0, 1/(1 - p)} ((L - 1, B, T, D·H) with batch_first), or None
        when no dropout applies."""
        if not self.training or self.dropout == 0 or self.num_layers == 1:
            return None
        shape = ((self.num_layers - 1,) + ((B, T) if self.batch_first else (T, B))
                 + (self.num_directions * self.hidden_size,))
        if self.dropout == 1:
            return np.zeros(shape, dtype=self.dtype)
        keep = self.generator.random(shape) >= self.dropout
        return keep.astype(self.dtype) / self.dtype.type(1 - self.dropout)

    def _states(self, name, value, B):
        """value as an (num_layers·D, B, H) array of the layer's dtype, or None (zeros)."""
        if value is None:
            return None
        shape = (self.num_layers * self.num_directions, B, self.hidden_size)
        return _as_array(name, value, self.dtype, shape, "num_layers·directions, B, H")

    def forward(self, x, h0=None, lengths=None):
        """x (T, B, I) ((B, T, I) with batch_first); h0 (num_layers·D, B, H) or None (zeros);
        lengths: B integers in [0, T] or None. Steps past a row's length are padding: output 0,
        state carried (torch's packed sequences). Returns (output (T, B, D·H) ((B, T, D·H) with
        batch_first), h_n (num_layers·D, B, H))."""
        if type(x) is not np.ndarray or x.dtype is not self.dtype or x.ndim != 3 or x.shape[2] != self.input_size:
            dims = "B, T, I" if self.batch_first else "T, B, I"  # convert, or raise naming x
            x = _as_array("x", x, self.dtype, (None, None, self.input_size), dims)
        T, B = x.shape[1::-1] if self.batch_first else x.shape[:2]
        lengths = _api._lengths(lengths, T, B)
        h0 = self._states("h0", h0, B)
        layers, masks = self._layers(), self._dropout_masks(T, B)
        output, h_n, layer_outputs = _stack.stack_forward(
            x, layers, h0, lengths=lengths, batch_first=self.batch_first,
            bidirectional=self.bidirectional, dropout_masks=masks, nonlinearity=self.nonlinearity,
            backend=self.backend, precision=self.precision)
        self._cache = (x, B, layers, layer_outputs, h0, lengths, masks)
        return output, h_n

    __call__ = forward

    def backward(self, grad_output, grad_h_n=None):
        """BPTT through the last forward. grad_output: dL/doutput, shaped as output; grad_h_n:
        dL/dh_n (num_layers·D, B, H) or None. Returns dL/dx shaped as x; fills .grads and
        .grad_h0 (dL/dh0)."""
        if self._cache is None:
            raise RuntimeError("RNN.backward called before RNN.forward")
        x, B, layers, layer_outputs, h0, lengths, masks = self._cache
        dims = "B, T, D·H" if self.batch_first else "T, B, D·H"
        grad = _as_array("grad_output", grad_output, self.dtype, layer_outputs.shape[1:], dims)
        grad_h_n = self._states("grad_h_n", grad_h_n, B)
        grads = _stack.stack_backward(
            grad, x, layers, layer_outputs, h0, grad_h_n=grad_h_n, lengths=lengths,
            batch_first=self.batch_first, bidirectional=self.bidirectional, dropout_masks=masks,
            nonlinearity=self.nonlinearity, backend=self.backend, precision=self.precision)
        for (weight_ih, weight_hh, bias_ih, bias_hh), layer_grads in zip(self._keys, grads.layers):
            self.grads[weight_ih][...] = layer_grads.weight_ih
            self.grads[weight_hh][...] = layer_grads.weight_hh
            if self.bias:  # bias_ih and bias_hh enter as one sum: the same gradient
                self.grads[bias_ih][...] = layer_grads.bias
                self.grads[bias_hh][...] = layer_grads.bias
        self.grad_h0 = grads.h0
        return grads.x

    def __repr__(self):
        return (f"RNN({self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, "
                f"nonlinearity={self.nonlinearity!r}, bias={self.bias}, "
                f"batch_first={self.batch_first}, dropout={self.dropout}, "
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

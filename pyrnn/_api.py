"""pyrnn.forward and pyrnn.backward: validate and normalise once, then hand clean arrays to a backend.

Everything the backends may assume (docs/design.md §2) is established here: C-contiguous time-major
arrays of one float dtype, ``h0``/``bias``/``grad_h_n`` materialised, ``lengths`` int64 in
[0, T]. Inputs are never modified: backends only read them. The checks are cheap on purpose:
for the smallest shapes this file's overhead is a visible part of a call.
"""
import functools
from numbers import Integral
from typing import NamedTuple

import numpy as np

from . import _backends, reference

class Grads(NamedTuple):
    """Gradients of the loss with respect to each input of pyrnn.forward, shaped as that input."""

    x: np.ndarray
    h0: np.ndarray
    weight_ih: np.ndarray
    weight_hh: np.ndarray
    bias: np.ndarray


_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
NONLINEARITIES = tuple(reference.ACTIVATIONS)  # ("tanh", "relu")
PRECISIONS = tuple(reference.PRODUCTS)  # ("fp32", "bf16")


def _check_nonlinearity(nonlinearity):
    if not isinstance(nonlinearity, str) or nonlinearity not in NONLINEARITIES:
        raise ValueError(f"nonlinearity must be one of {', '.join(map(repr, NONLINEARITIES))}, "
                         f"got {nonlinearity!r}")


def _check_precision(precision):
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(map(repr, PRECISIONS))}, got {precision!r}")


def _check_precision_dtype(precision, dtype):
    if precision == "bf16" and dtype != np.float32:
        raise TypeError(f"precision='bf16' needs float32 arrays, got {dtype}: bf16 products "
                        "round float32 operands (use precision='fp32' for float64)")


def _shape_str(shape):
    return "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


_DIMENSIONS = {"x": "T, B, I", "weight_ih": "H, I", "weight_hh": "H, H", "bias": "H", "h0": "B, H",
               "grad_h_n": "B, H", "output": "T, B, H", "grad_output": "T, B, H"}


def _shape_error(name, array, expected, batch_first):
    dims = _DIMENSIONS[name]
    if batch_first and len(expected) == 3:
        dims = "B, T" + dims[4:]
    raise ValueError(f"{name} has shape {_shape_str(array.shape)}, expected "
                     f"{_shape_str(expected)} = ({dims})")


def _dtype_error(name, array):
    if array.dtype.kind == "c":
        raise TypeError(f"{name} is complex ({array.dtype}); expected float32 or float64")
    raise TypeError(f"{name} has dtype {array.dtype}; expected float32 or float64")


def _has_array_interface(value):  # a torch tensor, an xarray, ...: it has a dtype of its own
    return not isinstance(value, np.ndarray) and hasattr(value, "__array__")


def _as_ndarray(name, value):
    try:
        return np.asarray(value)
    except Exception as error:  # e.g. a torch tensor that requires grad
        raise TypeError(f"{name} cannot be converted to a NumPy array: {error}") from error


def _float_arrays(arrays):
    """({name: ndarray or None}, dtype): every argument as an array of one float dtype.

    Arrays (NumPy's, and anything with ``__array__``: a torch tensor keeps its float32) decide
    the dtype and must all share it; Python sequences take that dtype (float64 when no argument
    is an array).
    """
    if any(_has_array_interface(value) for value in arrays.values()):
        arrays = {name: _as_ndarray(name, value) if _has_array_interface(value) else value
                  for name, value in arrays.items()}
    dtype = first = None
    sequences = []
    for name, value in arrays.items():
        if isinstance(value, np.ndarray):
            if value.dtype not in _FLOAT_DTYPES:
                _dtype_error(name, value)
            if dtype is None:
                dtype, first = value.dtype, name
            elif value.dtype != dtype:
                raise TypeError(f"{name} has dtype {value.dtype} but {first} has {dtype}; "
                                "all arrays of a call must share one dtype")
        elif value is not None:
            sequences.append(name)
    dtype = dtype or np.dtype(np.float64)
    if sequences:
        arrays = dict(arrays)
    for name in sequences:
        value = arrays[name]
        try:
            array = np.asarray(value)
        except Exception as error:
            raise TypeError(f"{name} must be an array of floats, got {type(value).__name__}") from error
        if array.dtype.kind not in "fiu":
            raise TypeError(f"{name} must be an array of floats, got {type(value).__name__} "
                            f"of dtype {array.dtype}")
        arrays[name] = array.astype(dtype)
    return arrays, dtype


def _check_ndim(name, array, ndim, layout):
    if array.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D {layout}, got shape {_shape_str(array.shape)}")


def _lengths(lengths, T, B):
    if lengths is None:
        return None
    if isinstance(lengths, np.ndarray) or hasattr(lengths, "__len__"):
        array = np.asarray(lengths)
    else:
        raise TypeError(f"lengths must be a sequence of B integers, got {type(lengths).__name__}")
    if array.dtype.kind not in "iu" and not (array.dtype.kind == "O" and all(
            isinstance(v, Integral) and not isinstance(v, bool) for v in array.ravel())):
        raise TypeError(f"lengths must hold integers, got dtype {array.dtype}")
    if array.ndim != 1 or array.shape[0] != B:
        raise ValueError(f"lengths has shape {_shape_str(array.shape)}, expected ({B},) = (B,): "
                         "one length per batch row")
    array = array.astype(np.int64)
    if B and (array.min() < 0 or array.max() > T):
        bad = int(np.flatnonzero((array < 0) | (array > T))[0])
        raise ValueError(f"lengths[{bad}] = {array[bad]} is outside [0, T] = [0, {T}]")
    return array


# The native module (csrc/bindings.cpp) accepts exactly the arrays _normalise would pass on
# unchanged: one float dtype, C-contiguous, time-major, the right shapes, lengths int64 in [0, T],
# None for bias/h0/grad_h_n meaning zeros. So the public functions hand it the caller's arguments
# first, and normalise only when it raises one of these (before any computing; cheaply, with no
# array printed): tiny forward 6.7 us instead of 8.2 through _normalise. The error the caller
# sees is _normalise's.
_NATIVE_ERRORS = (TypeError, ValueError)


def _time_major(array, batch_first):
    return array.swapaxes(0, 1) if batch_first else array


def _normalise(arrays, batch_first):
    """Validate x, weight_ih, weight_hh and whichever of bias, h0, output, grad_output, grad_h_n
    are given; return them clean and time-major (absent optional ones as zeros) and (T, B, I, H)."""
    if batch_first is False:
        clean = _as_given_if_clean(arrays)
        if clean is not None:
            return clean
    if not isinstance(batch_first, (bool, np.bool_)):
        raise TypeError(f"batch_first must be a bool, got {type(batch_first).__name__}")
    arrays, dtype = _float_arrays(arrays)
    for name in ("x", "weight_ih", "weight_hh"):
        if arrays[name] is None:
            raise TypeError(f"{name} must be an array, got None")
    x, weight_hh = arrays["x"], arrays["weight_hh"]
    _check_ndim("x", x, 3, "(B, T, I) with batch_first" if batch_first else "(T, B, I)")
    _check_ndim("weight_hh", weight_hh, 2, "(H, H)")
    T, B, I = _time_major(x, batch_first).shape
    H = weight_hh.shape[0]
    expected = _expected_shapes(T, B, I, H, batch_first)
    clean = {}
    for name, array in arrays.items():
        shape = expected[name]
        if array is None:  # optional: no bias, zero initial state, no gradient into h_n
            array = np.zeros(shape, dtype=dtype)
        elif array.shape != shape:
            _shape_error(name, array, shape, batch_first)
        if batch_first and len(shape) == 3:
            array = array.swapaxes(0, 1)
        # Backends only read their inputs (tests/test_agreement.py checks it), so a C-contiguous,
        # aligned array is passed as it is, and anything else as a copy that is.
        clean[name] = array if _contiguous_and_aligned(array) else np.array(array, order="C")
    return clean, (T, B, I, H)


def _as_given_if_clean(arrays):
    """(arrays, (T, B, I, H)) if every argument is already what _normalise would make of it (a
    NumPy array of the dtype of x, float32 or float64, C-contiguous, of its time-major shape;
    none absent), else None: the usual call, checked in one pass (~0.7 us against 1.8)."""
    x, weight_hh = arrays["x"], arrays["weight_hh"]
    if (type(x) is not np.ndarray or type(weight_hh) is not np.ndarray or x.ndim != 3
            or weight_hh.ndim != 2 or x.dtype not in _FLOAT_DTYPES):
        return None
    dtype, (T, B, I), H = x.dtype, x.shape, weight_hh.shape[0]
    expected = _expected_shapes(T, B, I, H, False)
    for name, array in arrays.items():  # _contiguous_and_aligned inlined (this is per call)
        if (type(array) is not np.ndarray or array.dtype != dtype or array.shape != expected[name]
                or not ((flags := array.flags).c_contiguous and flags.aligned)):
            return None
    return arrays, (T, B, I, H)


def _contiguous_and_aligned(array):
    """Whether the backends can read `array` as it is: C order, and aligned to its dtype (a view
    into a byte buffer at an odd offset is not; compiled code must not read such a view)."""
    flags = array.flags
    return flags.c_contiguous and flags.aligned


@functools.lru_cache(maxsize=64)  # a model calls with the same few shapes again and again
def _expected_shapes(T, B, I, H, batch_first):
    """{name: shape} of every array argument, as the caller lays it out."""
    sequence = (B, T, H) if batch_first else (T, B, H)
    return {"x": (B, T, I) if batch_first else (T, B, I), "weight_ih": (H, I), "weight_hh": (H, H),
            "bias": (H,), "h0": (B, H), "grad_h_n": (B, H), "output": sequence,
            "grad_output": sequence}


def forward(x, weight_ih, weight_hh, bias=None, h0=None, *, lengths=None, batch_first=False,
            backend=None, nonlinearity="tanh", precision="fp32"):
    """Run the RNN over a whole sequence: h_t = φ(x_t·weight_ihᵀ + h_{t-1}·weight_hhᵀ + bias).

    x: (T, B, I), or (B, T, I) with batch_first. weight_ih: (H, I). weight_hh: (H, H).
    bias: (H,) or None (no bias). h0: (B, H) or None (zeros). lengths: B integers in [0, T] or
    None; steps past a row's length are padding (output 0, state carried, as torch's packed
    sequences). backend: "cpp", "numba", "numpy" or None (``$PYRNN_BACKEND``, else the fastest).
    nonlinearity: φ, "tanh" or "relu" (torch.nn.RNN's). precision: "fp32" (the arrays' own
    arithmetic) or "bf16" (float32 arrays only): every operand of every product rounded to
    bfloat16, summed in float32; bias, φ, the outputs and the gradients stay float32
    (docs/precision.md says what that costs in accuracy).

    Returns (output, h_n): output (T, B, H) (batch_first: (B, T, H)) and h_n (B, H), the state
    after each row's last valid step.
    """
    _check_nonlinearity(nonlinearity)
    _check_precision(precision)
    name, impl = _backends.resolve(backend)
    if name == "cpp" and batch_first is False:
        try:  # arrays that are already clean run as they are: see _NATIVE_ERRORS
            return impl.forward(x, weight_ih, weight_hh, bias, h0, lengths, nonlinearity, precision)
        except _NATIVE_ERRORS:
            pass
    a, (T, B, I, H) = _normalise(
        {"x": x, "weight_ih": weight_ih, "weight_hh": weight_hh, "bias": bias, "h0": h0},
        batch_first)
    _check_precision_dtype(precision, a["x"].dtype)
    output, h_n = impl.forward(a["x"], a["weight_ih"], a["weight_hh"], a["bias"], a["h0"],
                               _lengths(lengths, T, B), nonlinearity, precision)
    return _time_major(output, batch_first), h_n


def backward(grad_output, x, weight_ih, weight_hh, output, h0=None, *, grad_h_n=None,
             lengths=None, batch_first=False, backend=None, nonlinearity="tanh", precision="fp32"):
    """Backpropagation through time for pyrnn.forward.

    grad_output: dL/doutput, shaped as output. output: what forward returned for these inputs.
    grad_h_n: dL/dh_n (B, H) or None (zeros). Other arguments as for forward (the bias is not
    needed; nonlinearity and precision must be forward's). Returns Grads(x, h0, weight_ih,
    weight_hh, bias), each shaped as that input (grads.bias is (H,) and grads.h0 is (B, H) even
    when they were None in forward).
    """
    _check_nonlinearity(nonlinearity)
    _check_precision(precision)
    name, impl = _backends.resolve(backend)
    if name == "cpp" and batch_first is False:
        try:  # arrays that are already clean run as they are: see _NATIVE_ERRORS
            return Grads(*impl.backward(grad_output, x, weight_ih, weight_hh, output, h0,
                                        grad_h_n, lengths, nonlinearity, precision))
        except _NATIVE_ERRORS:
            pass
    a, (T, B, I, H) = _normalise(
        {"x": x, "weight_ih": weight_ih, "weight_hh": weight_hh, "h0": h0, "output": output,
         "grad_output": grad_output, "grad_h_n": grad_h_n}, batch_first)
    _check_precision_dtype(precision, a["x"].dtype)
    grad_x, grad_h0, grad_weight_ih, grad_weight_hh, grad_bias = impl.backward(
        a["grad_output"], a["x"], a["weight_ih"], a["weight_hh"], a["output"], a["h0"],
        a["grad_h_n"], _lengths(lengths, T, B), nonlinearity, precision)
    return Grads(_time_major(grad_x, batch_first), grad_h0, grad_weight_ih, grad_weight_hh,
                 grad_bias)

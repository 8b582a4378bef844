"""pyrnn.stack_forward and pyrnn.stack_backward: L layers × D directions (torch.nn.RNN's
``num_layers`` and ``bidirectional``) in one call, validated and normalised once, then handed to
the backend's stack functions (docs/design.md §1 gives the semantics, pyrnn.reference the
composition that specifies them).

    x (T, B, I)   h0, h_n (L·D, B, H)   output (T, B, D·H)   layer_outputs (L, T, B, D·H)
    layers[l·D + d] = (weight_ih (H, I) for l = 0 else (H, D·H), weight_hh (H, H), bias (H,) or None)
    dropout_masks (L - 1, T, B, D·H) or None
With batch_first, T and B swap places in x, output, grad_output, layer_outputs and dropout_masks.
"""
from collections import namedtuple

import numpy as np

from . import _api, _backends

StackOutput = namedtuple("StackOutput", ["output", "h_n", "layer_outputs"])
StackOutput.__doc__ = ("What pyrnn.stack_forward returns: output (the last layer's, a view of "
                       "layer_outputs), h_n (L·D, B, H) and every layer's output before dropout.")
StackGrads = namedtuple("StackGrads", ["x", "h0", "layers"])
StackGrads.__doc__ = ("Gradients from pyrnn.stack_backward: x, h0 (L·D, B, H) and layers, one "
                      "LayerGrads per entry of the forward's layers, in the same order.")
LayerGrads = namedtuple("LayerGrads", ["weight_ih", "weight_hh", "bias"])
LayerGrads.__doc__ = "Gradients of one layer and direction's parameters (bias: (H,) even if it was None)."


def _bool(name, value):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


def _layer_arrays(layers, D):
    """{"layers[k].weight_ih": array, ...} of every layer's three arrays, once the list is a
    positive multiple of D entries of (weight_ih, weight_hh, bias)."""
    if isinstance(layers, (str, bytes, np.ndarray)) or not hasattr(layers, "__len__"):
        raise TypeError("layers must be a list of (weight_ih, weight_hh, bias) tuples, got "
                        f"{type(layers).__name__}")
    if len(layers) == 0 or len(layers) % D:
        layout = "layers[l·2 + d] for layer l and direction d" if D == 2 else "one per layer"
        raise ValueError(f"layers has {len(layers)} entries, expected a positive multiple of {D} "
                         f"({layout}, bidirectional={D == 2})")
    arrays = {}
    for k, layer in enumerate(layers):
        if isinstance(layer, (str, bytes, np.ndarray)) or not hasattr(layer, "__len__") or len(layer) != 3:
            raise TypeError(f"layers[{k}] must be a (weight_ih, weight_hh, bias) tuple, got "
                            f"{type(layer).__name__}" + (f" of {len(layer)}" if hasattr(layer, "__len__") else ""))
        for name, array in zip(("weight_ih", "weight_hh", "bias"), layer):
            arrays[f"layers[{k}].{name}"] = array
    return arrays


def _check_shape(name, array, shape, dims, why=""):
    if array.shape != shape:
        raise ValueError(f"{name} has shape {_api._shape_str(array.shape)}, expected "
                         f"{_api._shape_str(shape)} = ({dims}){why}")


def _normalise(arrays, layers, batch_first, bidirectional):
    """Validate x, the layers and whichever of h0, dropout_masks, grad_output, layer_outputs,
    grad_h_n are given (None: absent); return (arrays clean and time-major, with h0, grad_h_n
    and every bias materialised as zeros when absent, the layers as a list of triples,
    (T, B, I, H, L, D))."""
    if batch_first is False and (bidirectional is False or bidirectional is True):
        clean = _as_given_if_clean(arrays, layers, bidirectional)
        if clean is not None:
            return clean
    batch_first = _bool("batch_first", batch_first)
    D = 2 if _bool("bidirectional", bidirectional) else 1
    named_layers = _layer_arrays(layers, D)
    arrays, dtype = _api._float_arrays({**arrays, **named_layers})
    for name in ("x", "layers[0].weight_hh"):
        if arrays[name] is None:
            raise TypeError(f"{name} must be an array, got None")
    x = arrays["x"]
    _api._check_ndim("x", x, 3, "(B, T, I) with batch_first" if batch_first else "(T, B, I)")
    _api._check_ndim("layers[0].weight_hh", arrays["layers[0].weight_hh"], 2, "(H, H)")
    T, B, I = _api._time_major(x, batch_first).shape
    H, L = arrays["layers[0].weight_hh"].shape[0], len(layers) // D
    sequence = "B, T" if batch_first else "T, B"
    expected = {"x": ((B, T, I) if batch_first else (T, B, I), f"{sequence}, I"),
                "h0": ((L * D, B, H), "L·D, B, H"), "grad_h_n": ((L * D, B, H), "L·D, B, H"),
                "grad_output": ((B, T, D * H) if batch_first else (T, B, D * H), f"{sequence}, D·H"),
                "layer_outputs": ((L, B, T, D * H) if batch_first else (L, T, B, D * H), f"L, {sequence}, D·H"),
                "dropout_masks": ((L - 1, B, T, D * H) if batch_first else (L - 1, T, B, D * H),
                                  f"L - 1, {sequence}, D·H")}
    for k in range(L * D):
        inputs = (I, "H, I") if k < D else (D * H, "H, D·H")
        why = f": layer {k // D} reads layer {k // D - 1}'s {D}·H outputs" if k >= D else ""
        expected[f"layers[{k}].weight_ih"] = ((H, inputs[0]), inputs[1], why)
        expected[f"layers[{k}].weight_hh"] = ((H, H), "H, H")
        expected[f"layers[{k}].bias"] = ((H,), "H")
    clean = {}
    for name, array in arrays.items():
        shape, dims, *why = expected[name]
        if array is None:
            if name == "dropout_masks":
                clean[name] = None
                continue
            array = np.zeros(shape, dtype=dtype)  # no bias, zero initial state, no gradient into h_n
        _check_shape(name, array, shape, dims, *why)
        if batch_first and array.ndim >= 3 and not name.startswith(("h0", "grad_h_n")):
            array = array.swapaxes(-3, -2)  # (.., B, T, F) -> (.., T, B, F)
        clean[name] = array if array.flags["C_CONTIGUOUS"] else np.ascontiguousarray(array)
    clean_layers = [tuple(clean[f"layers[{k}].{name}"] for name in ("weight_ih", "weight_hh", "bias"))
                    for k in range(L * D)]
    return clean, clean_layers, (T, B, I, H, L, D)


def _as_given_if_clean(arrays, layers, bidirectional):
    """_normalise's result if every array is already clean (NumPy, the dtype of x, float32 or
    float64, C-contiguous, time-major, of its shape; a bias or None), else None: the usual call
    (pyrnn.RNN's), checked in one pass. The tiny stack's two layers compute in ~10 us, so
    each microsecond here shows (this pass: ~1.5 us for them, against ~10 for _normalise)."""
    x = arrays["x"]
    if type(x) is not np.ndarray or x.ndim != 3 or not x.flags.c_contiguous:
        return None
    dtype = x.dtype
    if (dtype != np.float32 and dtype != np.float64) or (type(layers) is not list and type(layers) is not tuple):
        return None
    T, B, I = x.shape
    D = 2 if bidirectional else 1
    L = len(layers) // D
    if L == 0 or L * D != len(layers):
        return None
    H = -1
    clean_layers = layers
    for k, layer in enumerate(layers):
        if type(layer) is not tuple or len(layer) != 3:
            return None
        weight_ih, weight_hh, bias = layer
        if H < 0:
            if type(weight_hh) is not np.ndarray or weight_hh.ndim != 2:
                return None
            H = weight_hh.shape[0]
        if bias is None:  # no bias: zeros, in a list of our own
            bias = np.zeros(H, dtype)
            if clean_layers is layers:
                clean_layers = list(layers)
            clean_layers[k] = (weight_ih, weight_hh, bias)
        # `is`: NumPy's float32 and float64 dtypes are singletons; any other instance (e.g. a
        # byte-swapped float32) takes _normalise's path
        for array, shape in ((weight_ih, (H, I if k < D else D * H)), (weight_hh, (H, H)), (bias, (H,))):
            if (type(array) is not np.ndarray or array.dtype is not dtype or array.shape != shape
                    or not array.flags.c_contiguous):
                return None
    clean = {}
    for name, array in arrays.items():
        if name == "x":
            shape = (T, B, I)
        elif name == "h0" or name == "grad_h_n":
            shape = (L * D, B, H)
        elif name == "grad_output":
            shape = (T, B, D * H)
        else:  # layer_outputs, dropout_masks
            shape = (L - (name == "dropout_masks"), T, B, D * H)
        if array is None:
            if name != "dropout_masks":
                array = np.zeros(shape, dtype)
        elif (type(array) is not np.ndarray or array.dtype is not dtype or array.shape != shape
              or not array.flags.c_contiguous):
            return None
        clean[name] = array
    return clean, clean_layers, (T, B, I, H, L, D)


def stack_forward(x, layers, h0=None, *, lengths=None, batch_first=False, bidirectional=False,
                  dropout_masks=None, nonlinearity="tanh", backend=None, precision="fp32"):
    """Run L layers × D directions of the Elman RNN over a whole sequence, torch.nn.RNN's stack.

    layers: L·D tuples (weight_ih, weight_hh, bias), ``layers[l·D + d]`` for layer l and direction
    d (0 forward, 1 reverse); weight_ih is (H, I) in layer 0 and (H, D·H) above, weight_hh
    (H, H), bias (H,) or None. Layer l > 0 reads both directions of layer l - 1 concatenated
    (forward first), multiplied by ``dropout_masks[l - 1]`` if given ((L - 1, T, B, D·H), e.g.
    values in {0, 1/(1 - p)}: the caller draws them). The reverse direction reads each row
    reversed within its own length. h0: (L·D, B, H) or None (zeros). Other arguments as for
    pyrnn.forward.

    Returns StackOutput(output (T, B, D·H), h_n (L·D, B, H), layer_outputs (L, T, B, D·H)), with T
    and B swapped in output and layer_outputs under batch_first; keep layer_outputs for
    stack_backward.
    """
    name, impl = _backends.resolve(backend)
    _api._check_nonlinearity(nonlinearity)
    _api._check_precision(precision)
    if name == "cpp" and batch_first is False:
        try:  # arrays that are already clean run as they are: see _api._NATIVE_ERRORS
            layer_outputs, h_n = impl.stack_forward(x, layers, h0, lengths, dropout_masks,
                                                    bidirectional, nonlinearity, precision)
        except _api._NATIVE_ERRORS:
            pass
        else:
            return StackOutput(layer_outputs[-1], h_n, layer_outputs)
    a, clean_layers, (T, B, I, H, L, D) = _normalise(
        {"x": x, "h0": h0, "dropout_masks": dropout_masks}, layers, batch_first, bidirectional)
    _api._check_precision_dtype(precision, a["x"].dtype)
    layer_outputs, h_n = impl.stack_forward(a["x"], clean_layers, a["h0"], _api._lengths(lengths, T, B),
                                            a["dropout_masks"], D == 2, nonlinearity, precision)
    if batch_first:
        layer_outputs = layer_outputs.swapaxes(1, 2)
    return StackOutput(layer_outputs[L - 1], h_n, layer_outputs)


def stack_backward(grad_output, x, layers, layer_outputs, h0=None, *, grad_h_n=None, lengths=None,
                   batch_first=False, bidirectional=False, dropout_masks=None, nonlinearity="tanh",
                   backend=None, precision="fp32"):
    """Backpropagation through time for pyrnn.stack_forward.

    grad_output: dL/doutput (T, B, D·H); layer_outputs: what stack_forward returned for these
    inputs; grad_h_n: dL/dh_n (L·D, B, H) or None (zeros). Other arguments exactly as given to
    stack_forward (the biases are not needed and may be None). Returns StackGrads(x, h0, layers)
    with one LayerGrads(weight_ih, weight_hh, bias) per entry of layers.
    """
    name, impl = _backends.resolve(backend)
    _api._check_nonlinearity(nonlinearity)
    _api._check_precision(precision)
    for required, value in (("grad_output", grad_output), ("layer_outputs", layer_outputs)):
        if value is None:
            raise TypeError(f"{required} must be an array, got None")
    if name == "cpp" and batch_first is False:
        try:  # arrays that are already clean run as they are: see _api._NATIVE_ERRORS
            grad_x, grad_h0, grad_layers = impl.stack_backward(
                grad_output, x, layers, layer_outputs, h0, grad_h_n, lengths, dropout_masks,
                bidirectional, nonlinearity, precision)
        except _api._NATIVE_ERRORS:
            pass
        else:
            return StackGrads(grad_x, grad_h0, [LayerGrads(*grads) for grads in grad_layers])
    a, clean_layers, (T, B, I, H, L, D) = _normalise(
        {"grad_output": grad_output, "x": x, "layer_outputs": layer_outputs, "h0": h0,
         "grad_h_n": grad_h_n, "dropout_masks": dropout_masks}, layers, batch_first, bidirectional)
    _api._check_precision_dtype(precision, a["x"].dtype)
    grad_x, grad_h0, grad_layers = impl.stack_backward(
        a["grad_output"], a["x"], clean_layers, a["layer_outputs"], a["h0"], a["grad_h_n"],
        _api._lengths(lengths, T, B), a["dropout_masks"], D == 2, nonlinearity, precision)
    return StackGrads(_api._time_major(grad_x, batch_first), grad_h0,
                      [LayerGrads(*grads) for grads in grad_layers])

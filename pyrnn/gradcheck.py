"""Gradient checking: backward against central finite differences of forward, in float64."""
import numpy as np

from . import _api, _stack, reference

_CHECKED = ("x", "h0", "weight_ih", "weight_hh", "bias")


class GradcheckError(AssertionError):
    """A gradient from backward disagrees with finite differences of forward."""


def numerical_gradient(f, array, eps=1e-6):
    """dL/darray by central differences, where L = f() is a float that reads array.

    Each element is moved by ±eps in place (and restored), costing two calls of f per element:
    use small float64 arrays. Shared by gradcheck and the layer tests (pyrnn.nn, pyrnn.losses).
    """
    numerical = np.zeros(array.shape, dtype=np.float64)
    for index in np.ndindex(array.shape):
        original = array[index]
        array[index] = original + eps
        loss_plus = f()
        array[index] = original - eps
        loss_minus = f()
        array[index] = original
        numerical[index] = (loss_plus - loss_minus) / (2 * eps)
    return numerical


def gradcheck(x, weight_ih, weight_hh, bias=None, h0=None, *, lengths=None, batch_first=False,
              backend=None, nonlinearity="tanh", eps=1e-6, atol=1e-6, rtol=1e-5, seed=0,
              raise_on_failure=True):
    """Check pyrnn.backward against central differences of pyrnn.forward for one backend.

    Arguments as for pyrnn.forward; they are copied to float64 (an absent bias or h0 becomes
    zeros, so that its gradient is checked too). The loss is L = Σ output·R + Σ h_n·S with fixed
    random R and S, so every output and the final state enter with their own weight. Each
    element of x, h0, weight_ih, weight_hh and bias is moved by ±eps; the analytic gradient must
    satisfy |analytic - numerical| <= atol + rtol·|numerical| everywhere. That costs two forward
    passes per element: use small shapes. With relu, keep every pre-activation farther than eps
    from 0 (the kink, where the derivative jumps).

    Returns {name: largest |analytic - numerical|}; raises GradcheckError on a mismatch unless
    raise_on_failure is False.
    """
    inputs = {"x": x, "weight_ih": weight_ih, "weight_hh": weight_hh, "bias": bias, "h0": h0}
    # Validate and materialise once through the public path, then work on float64 copies.
    clean, (T, B, I, H) = _api._normalise(inputs, batch_first)
    params = {name: np.array(clean[name], dtype=np.float64) for name in _CHECKED}
    if batch_first:
        params["x"] = np.ascontiguousarray(params["x"].swapaxes(0, 1))

    rng = np.random.default_rng(seed)
    out_shape = (B, T, H) if batch_first else (T, B, H)
    weight_output, weight_h_n = rng.standard_normal(out_shape), rng.standard_normal((B, H))
    options = dict(lengths=lengths, batch_first=batch_first, backend=backend,
                   nonlinearity=nonlinearity)

    def loss():
        output, h_n = _api.forward(params["x"], params["weight_ih"], params["weight_hh"],
                                   params["bias"], params["h0"], **options)
        return np.sum(output * weight_output) + np.sum(h_n * weight_h_n), output

    _, output = loss()
    analytic = _api.backward(weight_output, params["x"], params["weight_ih"], params["weight_hh"],
                             output, params["h0"], grad_h_n=weight_h_n, **options)._asdict()
    checked = {name: (params[name], analytic[name]) for name in _CHECKED}
    return _compare(checked, lambda: loss()[0], eps, atol, rtol, backend, raise_on_failure)


def stack_gradcheck(x, layers, h0=None, *, lengths=None, bidirectional=False, dropout_masks=None,
                    backend=None, nonlinearity="tanh", eps=1e-6, atol=1e-6, rtol=1e-5, seed=0,
                    raise_on_failure=True):
    """gradcheck for a stack: pyrnn.stack_backward against central differences of
    pyrnn.stack_forward, arguments as theirs (time-major).

    Every input is checked: x, h0 and each layer's weight_ih, weight_hh and bias (an absent bias
    or h0 becomes zeros), reported as "x", "h0", "layers[k].weight_ih", ...; dropout_masks, if
    given, are constants. The loss is Σ output·R + Σ h_n·S with fixed random R and S. With relu,
    keep every layer's pre-activations farther than eps from 0 (pre_activations gives them).
    """
    clean, clean_layers, (T, B, I, H, L, D) = _stack._normalise(
        {"x": x, "h0": h0, "dropout_masks": dropout_masks}, layers, False, bidirectional)
    float64 = {name: None if a is None else np.array(a, dtype=np.float64) for name, a in clean.items()}
    units = [tuple(np.array(a, dtype=np.float64) for a in unit) for unit in clean_layers]
    rng = np.random.default_rng(seed)
    weight_output, weight_h_n = rng.standard_normal((T, B, D * H)), rng.standard_normal((L * D, B, H))
    options = dict(lengths=lengths, bidirectional=bidirectional, dropout_masks=float64["dropout_masks"],
                   backend=backend, nonlinearity=nonlinearity)

    def loss():
        result = _stack.stack_forward(float64["x"], units, float64["h0"], **options)
        return np.sum(result.output * weight_output) + np.sum(result.h_n * weight_h_n), result

    _, result = loss()
    grads = _stack.stack_backward(weight_output, float64["x"], units, result.layer_outputs, float64["h0"],
                                  grad_h_n=weight_h_n, **options)
    checked = {"x": (float64["x"], grads.x), "h0": (float64["h0"], grads.h0)}
    for k, (unit, unit_grads) in enumerate(zip(units, grads.layers)):
        for name, array, grad in zip(unit_grads._fields, unit, unit_grads):
            checked[f"layers[{k}].{name}"] = (array, grad)
    return _compare(checked, lambda: loss()[0], eps, atol, rtol, backend, raise_on_failure)


def pre_activations(x, layers, h0, lengths=None, dropout_masks=None, bidirectional=False,
                    nonlinearity="tanh"):
    """a_t = input_t · weight_ihᵀ + h_{t-1} · weight_hhᵀ + bias of every layer, direction and
    valid step of a float64 stack (arguments as the reference's stack_forward), one flat array:
    relu's derivative jumps where one is 0, and finite differences across it measure neither side."""
    layer_outputs, _ = reference.stack_forward(x, layers, h0, lengths, dropout_masks, bidirectional,
                                               nonlinearity)
    D = 2 if bidirectional else 1
    H = h0.shape[2]
    valid = reference.valid_steps(lengths, *x.shape[:2])
    found = []
    for k, (weight_ih, weight_hh, bias) in enumerate(layers):
        l, d = divmod(k, D)
        inputs = reference._direction_sequence(reference._layer_input(x, layer_outputs, dropout_masks, l),
                                               d, lengths)
        output = reference._direction_sequence(layer_outputs[l, :, :, d * H:(d + 1) * H], d, lengths)
        h_prev = np.concatenate([h0[k][None], output[:-1]])  # h_{t-1} on every valid step
        found.append((inputs @ weight_ih.T + h_prev @ weight_hh.T + bias)[valid].ravel())
    return np.concatenate(found)


def _compare(checked, loss, eps, atol, rtol, backend, raise_on_failure):
    """{name: largest |analytic - numerical|} for checked {name: (array loss reads, analytic
    gradient)}; GradcheckError if one is beyond atol + rtol·|numerical| (unless not raising)."""
    errors, failures = {}, []
    for name, (array, analytic) in checked.items():
        numerical = numerical_gradient(loss, array, eps)
        difference = np.abs(analytic - numerical)
        errors[name] = float(difference.max(initial=0.0))
        if np.any(~(difference <= atol + rtol * np.abs(numerical))):  # NaN fails too
            worst = np.unravel_index(np.nanargmax(difference), difference.shape) if difference.size else ()
            failures.append(f"grad {name}{list(worst)}: backward {analytic[worst]!r}, "
                            f"finite differences {numerical[worst]!r}")
    if failures and raise_on_failure:
        raise GradcheckError(f"gradcheck failed (backend {backend or 'default'}):\n  " +
                             "\n  ".join(failures))
    return errors

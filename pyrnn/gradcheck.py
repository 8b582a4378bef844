"""Gradient checking: backward against central finite differences of forward, in float64."""
import numpy as np

from . import _api

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

    errors, failures = {}, []
    for name in _CHECKED:
        numerical = numerical_gradient(lambda: loss()[0], params[name], eps)
        difference = np.abs(analytic[name] - numerical)
        errors[name] = float(difference.max(initial=0.0))
        if np.any(~(difference <= atol + rtol * np.abs(numerical))):  # NaN fails too
            worst = np.unravel_index(np.nanargmax(difference), difference.shape) if difference.size else ()
            failures.append(f"grad {name}{list(worst)}: backward {analytic[name][worst]!r}, "
                            f"finite differences {numerical[worst]!r}")
    if failures and raise_on_failure:
        raise GradcheckError(f"gradcheck failed (backend {backend or 'default'}):\n  " +
                             "\n  ".join(failures))
    return errors

"""pyrnn.stack_forward / stack_backward: L layers × D directions in one call.

The reference composition (pyrnn.reference.stack_forward) is checked against a stack computed
here row by row from single-layer calls, its gradients against finite differences; every
backend is checked against it over random stacks; malformed stacks raise naming the argument.
"""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pyrnn
from pyrnn import _threads
from pyrnn.testing import accumulated_terms, relative_error, tolerance

from problems import random_lengths

NONLINEARITIES = ("tanh", "relu")


def make_stack(rng, T, B, I, H, L, D, dtype=np.float64, bias=True, masks=False, p=0.4):
    """Keyword arguments of stack_forward for a random stack: x, layers, h0, bidirectional and
    dropout masks of {0, 1/(1 - p)} (or None)."""
    bound = 1 / np.sqrt(H)
    layers = []
    for k in range(L * D):
        inputs = I if k < D else D * H
        weight_ih, weight_hh = (rng.uniform(-bound, bound, shape).astype(dtype)
                                for shape in ((H, inputs), (H, H)))
        layers.append((weight_ih, weight_hh, rng.uniform(-bound, bound, H).astype(dtype) if bias else None))
    dropout_masks = None
    if masks:
        dropout_masks = ((rng.random((L - 1, T, B, D * H)) >= p) / (1 - p)).astype(dtype)
    return dict(x=rng.standard_normal((T, B, I)).astype(dtype), layers=layers,
                h0=rng.standard_normal((L * D, B, H)).astype(dtype), bidirectional=D == 2,
                dropout_masks=dropout_masks)


def row_by_row(stack, lengths, nonlinearity):
    """(output, h_n) of the stack computed one batch row at a time, each row cut to its length
    and the reverse direction reading the cut row backwards, with single-layer reference calls:
    docs/design.md §1 written out independently of the composition under test."""
    x, layers, h0, masks = stack["x"], stack["layers"], stack["h0"], stack["dropout_masks"]
    T, B, _ = x.shape
    D = 2 if stack["bidirectional"] else 1
    L, H = len(layers) // D, h0.shape[2]
    output, h_n = np.zeros((T, B, D * H)), np.empty(h0.shape)
    for b in range(B):
        n = T if lengths is None else lengths[b]
        layer_input = x[:n, b:b + 1]
        for l in range(L):
            if l > 0 and masks is not None:
                layer_input = layer_input * masks[l - 1, :n, b:b + 1]
            outputs = []
            for d in range(D):
                k = l * D + d
                sequence = layer_input if d == 0 else layer_input[::-1]
                out, h_n[k, b:b + 1] = pyrnn.forward(sequence, *layers[k], h0[k, b:b + 1],
                                                     nonlinearity=nonlinearity, backend="numpy")
                outputs.append(out if d == 0 else out[::-1])
            layer_input = np.concatenate(outputs, axis=2)
        output[:n, b] = layer_input[:, 0]
    return output, h_n


def forward_and_backward(stack, lengths, nonlinearity, backend, grad_output, grad_h_n, batch_first=False):
    """(StackOutput, StackGrads) of one backend."""
    options = dict(lengths=lengths, batch_first=batch_first, bidirectional=stack["bidirectional"],
                   dropout_masks=stack["dropout_masks"], nonlinearity=nonlinearity, backend=backend)
    result = pyrnn.stack_forward(stack["x"], stack["layers"], stack["h0"], **options)
    grads = pyrnn.stack_backward(grad_output, stack["x"], stack["layers"], result.layer_outputs,
                                 stack["h0"], grad_h_n=grad_h_n, **options)
    return result, grads


def flat_results(result, grads):
    """{name: array} of every output and gradient of a stack."""
    flat = {"output": result.output, "h_n": result.h_n, "layer_outputs": result.layer_outputs,
            "grad x": grads.x, "grad h0": grads.h0}
    for k, layer in enumerate(grads.layers):
        flat.update({f"grad layers[{k}].{name}": value for name, value in layer._asdict().items()})
    return flat


@settings(deadline=None, max_examples=40)
@given(T=st.integers(0, 6), B=st.integers(1, 4), I=st.integers(1, 4), H=st.integers(1, 5),
       L=st.integers(1, 3), D=st.sampled_from([1, 2]), masks=st.booleans(), bias=st.booleans(),
       with_lengths=st.booleans(), nonlinearity=st.sampled_from(NONLINEARITIES),
       seed=st.integers(0, 2**32 - 1))
def test_reference_composition_is_the_stack_row_by_row(T, B, I, H, L, D, masks, bias, with_lengths,
                                                        nonlinearity, seed):
    rng = np.random.default_rng(seed)
    stack = make_stack(rng, T, B, I, H, L, D, bias=bias, masks=masks and L > 1)
    lengths = random_lengths(rng, T, B) if with_lengths else None
    result = pyrnn.stack_forward(**stack, lengths=lengths, nonlinearity=nonlinearity, backend="numpy")
    expected_output, expected_h_n = row_by_row(stack, lengths, nonlinearity)
    np.testing.assert_allclose(result.output, expected_output, rtol=0, atol=1e-12)
    np.testing.assert_allclose(result.h_n, expected_h_n, rtol=0, atol=1e-12)
    assert result.layer_outputs.shape == (L, T, B, D * H)
    assert result.output.size == 0 or np.shares_memory(result.output, result.layer_outputs[L - 1])  # a view


@pytest.mark.parametrize("nonlinearity", NONLINEARITIES)
@pytest.mark.parametrize("batch_first", [False, True], ids=["time-major", "batch-first"])
def test_gradients_match_finite_differences(backend, nonlinearity, batch_first):
    """Every gradient of a 2-layer bidirectional stack with lengths (a zero among them) and
    dropout masks, against central differences of stack_forward in float64. relu's kink is
    met with probability ~eps per element: random pre-activations are O(1)."""
    rng = np.random.default_rng(7)
    T, B, L, D, H = 4, 3, 2, 2, 3
    stack = make_stack(rng, T, B, 2, H, L, D, masks=True)
    lengths = np.array([4, 0, 2])
    if batch_first:
        stack["x"] = stack["x"].swapaxes(0, 1)  # a non-contiguous view, as a caller may pass
        stack["dropout_masks"] = stack["dropout_masks"].swapaxes(1, 2)
    sequence = (B, T) if batch_first else (T, B)
    weight_output, weight_h_n = rng.standard_normal(sequence + (D * H,)), rng.standard_normal((L * D, B, H))
    options = dict(lengths=lengths, batch_first=batch_first, bidirectional=True,
                   dropout_masks=stack["dropout_masks"], nonlinearity=nonlinearity, backend=backend)
    x, h0, layers = stack["x"].copy(), stack["h0"], stack["layers"]

    def loss():
        output, h_n, _ = pyrnn.stack_forward(x, layers, h0, **options)
        return np.sum(output * weight_output) + np.sum(h_n * weight_h_n)

    result = pyrnn.stack_forward(x, layers, h0, **options)
    grads = pyrnn.stack_backward(weight_output, x, layers, result.layer_outputs, h0,
                                 grad_h_n=weight_h_n, **options)
    checked = {"x": (x, grads.x), "h0": (h0, grads.h0)}
    for k, (layer, layer_grads) in enumerate(zip(layers, grads.layers)):
        for name, array, grad in zip(layer_grads._fields, layer, layer_grads):
            checked[f"layers[{k}].{name}"] = (array, grad)
    for name, (array, analytic) in checked.items():
        numerical = pyrnn.numerical_gradient(loss, array)
        np.testing.assert_allclose(analytic, numerical, rtol=1e-5, atol=1e-7, err_msg=name)
    padding = ~pyrnn.losses.sequence_mask(lengths, T, batch_first=batch_first)
    assert np.all(result.output[padding] == 0) and np.all(grads.x[padding] == 0)
    np.testing.assert_array_equal(result.h_n[:, 1], h0[:, 1])  # the empty row keeps h0


def assert_matches_reference(backend, stack, lengths, nonlinearity, batch_first, seed):
    """One backend in the stack's dtype against the reference composition in float64."""
    rng = np.random.default_rng(seed)
    T, B, I = stack["x"].shape
    D = 2 if stack["bidirectional"] else 1
    L, H = len(stack["layers"]) // D, stack["h0"].shape[2]
    dtype = stack["x"].dtype
    grad_output, grad_h_n = rng.standard_normal((T, B, D * H)), rng.standard_normal((L * D, B, H))
    as64 = dict(stack, x=stack["x"].astype(np.float64), h0=stack["h0"].astype(np.float64),
                layers=[tuple(None if a is None else a.astype(np.float64) for a in layer)
                        for layer in stack["layers"]],
                dropout_masks=None if stack["dropout_masks"] is None else stack["dropout_masks"].astype(np.float64))
    expected = flat_results(*forward_and_backward(as64, lengths, nonlinearity, "numpy", grad_output, grad_h_n))
    if batch_first:
        stack = dict(stack, x=np.ascontiguousarray(stack["x"].swapaxes(0, 1)),
                     dropout_masks=None if stack["dropout_masks"] is None
                     else np.ascontiguousarray(stack["dropout_masks"].swapaxes(1, 2)))
        grad_output = np.ascontiguousarray(grad_output.swapaxes(0, 1))
    actual = flat_results(*forward_and_backward(stack, lengths, nonlinearity, backend,
                                                grad_output.astype(dtype), grad_h_n.astype(dtype),
                                                batch_first))
    if batch_first:  # compare in time-major order
        for name in ("output", "grad x"):
            actual[name] = actual[name].swapaxes(0, 1)
        actual["layer_outputs"] = actual["layer_outputs"].swapaxes(1, 2)
    # Each layer adds its own rounding to the errors of its input: L times one layer's bound,
    # for the longest sums of any layer (those above the first read D·H inputs).
    forward_terms, backward_terms = accumulated_terms(T, B, max(I, D * H), H)
    assert actual.keys() == expected.keys()
    for name, want in expected.items():
        got = actual[name]
        assert got.dtype == dtype and got.shape == want.shape, (name, got.dtype, got.shape)
        bound = L * tolerance(dtype, forward_terms if not name.startswith("grad") else backward_terms)
        error = relative_error(got, want)
        assert error <= bound, (f"{backend} {name} differs from the reference composition by "
                                f"{error:.3g} (> {bound:.3g}); first values {np.ravel(got)[:4]} vs "
                                f"{np.ravel(want)[:4]}")


@settings(deadline=None, max_examples=40)
@given(T=st.integers(0, 7), B=st.integers(1, 5), I=st.integers(1, 6), H=st.integers(1, 9),
       L=st.integers(1, 3), D=st.sampled_from([1, 2]), masks=st.booleans(), bias=st.booleans(),
       with_lengths=st.booleans(), batch_first=st.booleans(),
       dtype=st.sampled_from([np.float32, np.float64]), nonlinearity=st.sampled_from(NONLINEARITIES),
       seed=st.integers(0, 2**32 - 1))
def test_random_stacks_match_reference_composition(backend, T, B, I, H, L, D, masks, bias,
                                                   with_lengths, batch_first, dtype, nonlinearity, seed):
    rng = np.random.default_rng(seed)
    stack = make_stack(rng, T, B, I, H, L, D, dtype, bias=bias, masks=masks and L > 1)
    lengths = random_lengths(rng, T, B) if with_lengths else None
    assert_matches_reference(backend, stack, lengths, nonlinearity, batch_first, seed)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("nonlinearity", NONLINEARITIES)
@pytest.mark.parametrize("shape", [(50, 1, 32, 64, 2, 1), (9, 16, 24, 128, 2, 2), (6, 8, 16, 64, 4, 1)],
                         ids=lambda s: "T{}-B{}-I{}-H{}-L{}xD{}".format(*s))
def test_benchmark_like_stacks_match_reference_composition(backend, threads, nonlinearity, shape):
    """Wider stacks, on one and two threads (the fast backends split such layers)."""
    T, B, I, H, L, D = shape
    rng = np.random.default_rng(sum(shape))
    stack = make_stack(rng, T, B, I, H, L, D, np.float32, masks=True)
    lengths = rng.integers(0, T + 1, size=B)
    with _threads.limited_to(threads):
        assert_matches_reference(backend, stack, lengths, nonlinearity, False, 0)


def test_results_do_not_depend_on_the_thread_count():
    """The native stack gives bitwise identical results on one and two threads, with layers
    wide enough (>= 2 MFLOP a step) for its threads to split them."""
    if "cpp" not in pyrnn.available_backends():
        pytest.skip(f"the native module is not available: {pyrnn.unavailable_backends()['cpp']}")
    rng = np.random.default_rng(3)
    stack = make_stack(rng, 5, 16, 256, 256, 2, 2, np.float32, masks=True)
    lengths = np.array([5, 0, 3] + [5] * 13)
    grad_output, grad_h_n = rng.standard_normal((5, 16, 512)).astype(np.float32), None
    runs = []
    for threads in (1, 2):
        with _threads.limited_to(threads):
            runs.append(flat_results(*forward_and_backward(stack, lengths, "tanh", "cpp", grad_output, grad_h_n)))
    for name, one_thread in runs[0].items():
        np.testing.assert_array_equal(runs[1][name], one_thread, err_msg=name)


def test_inputs_are_not_modified(backend):
    rng = np.random.default_rng(4)
    stack = make_stack(rng, 5, 4, 3, 4, 2, 2, np.float32, masks=True)
    copies = {"x": stack["x"].copy(), "h0": stack["h0"].copy(),
              "dropout_masks": stack["dropout_masks"].copy(),
              "layers": [tuple(a.copy() for a in layer) for layer in stack["layers"]]}
    grad_output, grad_h_n = np.ones((5, 4, 8), np.float32), np.ones((4, 4, 4), np.float32)
    result, _ = forward_and_backward(stack, np.array([5, 0, 2, 5]), "tanh", backend, grad_output, grad_h_n)
    layer_outputs = result.layer_outputs.copy()
    pyrnn.stack_backward(grad_output, stack["x"], stack["layers"], result.layer_outputs, stack["h0"],
                         grad_h_n=grad_h_n, lengths=[5, 0, 2, 5], bidirectional=True,
                         dropout_masks=stack["dropout_masks"], backend=backend)
    for name in ("x", "h0", "dropout_masks"):
        np.testing.assert_array_equal(stack[name], copies[name], err_msg=name)
    for layer, copy in zip(stack["layers"], copies["layers"]):
        for array, original in zip(layer, copy):
            np.testing.assert_array_equal(array, original)
    np.testing.assert_array_equal(result.layer_outputs, layer_outputs)
    assert np.all(grad_output == 1) and np.all(grad_h_n == 1)


def test_defaults_and_one_layer(backend):
    """h0=None is zeros, bias None is zeros, and a one-layer stack is pyrnn.forward."""
    rng = np.random.default_rng(5)
    stack = make_stack(rng, 4, 3, 2, 5, 1, 1, bias=False)
    weight_ih, weight_hh, _ = stack["layers"][0]
    output, h_n, layer_outputs = pyrnn.stack_forward(stack["x"], stack["layers"], backend=backend)
    expected = pyrnn.forward(stack["x"], weight_ih, weight_hh, backend=backend)
    np.testing.assert_array_equal(output, expected[0])
    np.testing.assert_array_equal(h_n[0], expected[1])
    explicit = [(weight_ih, weight_hh, np.zeros(5))]
    np.testing.assert_array_equal(
        pyrnn.stack_forward(stack["x"], explicit, np.zeros((1, 3, 5)), backend=backend).output, output)
    grads = pyrnn.stack_backward(np.ones_like(output), stack["x"], stack["layers"], layer_outputs,
                                 backend=backend)
    assert grads.h0.shape == (1, 3, 5) and grads.layers[0].bias.shape == (5,)


def _malformed(stack, case):
    """stack_forward's keyword arguments with one thing wrong (x (4, 3, 2), L = 2, D = 2, H = 5)."""
    layers = list(stack["layers"])
    weight_ih, weight_hh, bias = layers[2]
    changes = {
        "three entries for two directions": dict(layers=layers[:3]),
        "no layers": dict(layers=[]),
        "layers not a list": dict(layers=np.zeros((4, 5, 5))),
        "layer not a triple": dict(layers=[layers[0][:2]] + layers[1:]),
        "layer 1 reading one direction": dict(layers=layers[:2] + [(weight_ih[:, :5], weight_hh, bias)] + layers[3:]),
        "layer 0 reading the wrong width": dict(layers=[(layers[0][0][:, :1],) + layers[0][1:]] + layers[1:]),
        "weight_hh of another H": dict(layers=layers[:3] + [(layers[3][0], np.zeros((4, 4)), layers[3][2])]),
        "bias of another H": dict(layers=layers[:1] + [layers[1][:2] + (np.zeros(6),)] + layers[2:]),
        "layers of another dtype": dict(layers=layers[:3] + [tuple(a.astype(np.float32) for a in layers[3])]),
        "h0 of one layer": dict(h0=stack["h0"][:2]),
        "masks for every layer": dict(dropout_masks=np.ones((2, 4, 3, 10))),
        "masks of one direction": dict(dropout_masks=np.ones((1, 4, 3, 5))),
        "masks batch-first": dict(dropout_masks=np.ones((1, 3, 4, 10))),
        "bidirectional not a bool": dict(bidirectional="yes"),
        "batch_first not a bool": dict(batch_first=1),
        "unknown nonlinearity": dict(nonlinearity="sigmoid"),
        "x 2-D": dict(x=np.zeros((4, 2))),
        "lengths past T": dict(lengths=[5, 1, 1]),
    }
    return dict(stack, **changes[case])


MALFORMED = {
    "three entries for two directions": (ValueError, r"layers has 3 entries, expected a positive multiple of 2"),
    "no layers": (ValueError, "layers has 0 entries"),
    "layers not a list": (TypeError, "layers must be a list of .weight_ih, weight_hh, bias. tuples"),
    "layer not a triple": (TypeError, r"layers\[0\] must be a \(weight_ih, weight_hh, bias\) tuple"),
    "layer 1 reading one direction": (ValueError, r"layers\[2\].weight_ih has shape \(5, 5\), expected "
                                                  r"\(5, 10\) = \(H, D·H\): layer 1 reads layer 0's 2·H outputs"),
    "layer 0 reading the wrong width": (ValueError, r"layers\[0\].weight_ih has shape \(5, 1\), "
                                                    r"expected \(5, 2\) = \(H, I\)"),
    "weight_hh of another H": (ValueError, r"layers\[3\].weight_hh has shape \(4, 4\), expected \(5, 5\)"),
    "bias of another H": (ValueError, r"layers\[1\].bias has shape \(6,\), expected \(5,\) = \(H\)"),
    "layers of another dtype": (TypeError, r"layers\[3\].weight_ih has dtype float32 but x has float64"),
    "h0 of one layer": (ValueError, r"h0 has shape \(2, 3, 5\), expected \(4, 3, 5\) = \(L·D, B, H\)"),
    "masks for every layer": (ValueError, r"dropout_masks has shape \(2, 4, 3, 10\), "
                                          r"expected \(1, 4, 3, 10\) = \(L - 1, T, B, D·H\)"),
    "masks of one direction": (ValueError, r"dropout_masks has shape \(1, 4, 3, 5\)"),
    "masks batch-first": (ValueError, r"dropout_masks has shape \(1, 3, 4, 10\)"),
    "bidirectional not a bool": (TypeError, "bidirectional must be a bool"),
    "batch_first not a bool": (TypeError, "batch_first must be a bool"),
    "unknown nonlinearity": (ValueError, "nonlinearity must be one of .*'sigmoid'"),
    "x 2-D": (ValueError, r"x must be 3-D \(T, B, I\)"),
    "lengths past T": (ValueError, r"lengths\[0\] = 5 is outside \[0, T\] = \[0, 4\]"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_stacks_raise_naming_the_argument(backend, case):
    stack = make_stack(np.random.default_rng(6), 4, 3, 2, 5, 2, 2, masks=True)
    error, message = MALFORMED[case]
    with pytest.raises(error, match=message):
        pyrnn.stack_forward(**_malformed(stack, case), backend=backend)


def test_malformed_backward_arguments_raise_naming_them(backend):
    stack = make_stack(np.random.default_rng(6), 4, 3, 2, 5, 2, 2)
    result = pyrnn.stack_forward(**stack, backend=backend)
    arguments = dict(grad_output=np.ones((4, 3, 10)), x=stack["x"], layers=stack["layers"],
                     layer_outputs=result.layer_outputs, h0=stack["h0"], bidirectional=True,
                     backend=backend)
    cases = {"grad_output": (np.ones((4, 3, 5)), r"grad_output has shape \(4, 3, 5\), "
                                                 r"expected \(4, 3, 10\) = \(T, B, D·H\)"),
             "layer_outputs": (result.layer_outputs[:1], r"layer_outputs has shape \(1, 4, 3, 10\), "
                                                         r"expected \(2, 4, 3, 10\) = \(L, T, B, D·H\)"),
             "grad_h_n": (np.ones((4, 3, 4)), r"grad_h_n has shape \(4, 3, 4\), expected \(4, 3, 5\) = \(L·D, B, H\)")}
    for name, (value, message) in cases.items():
        with pytest.raises(ValueError, match=message):
            pyrnn.stack_backward(**dict(arguments, **{name: value}))
    for name in ("grad_output", "layer_outputs"):
        with pytest.raises(TypeError, match=f"{name} must be an array, got None"):
            pyrnn.stack_backward(**dict(arguments, **{name: None}))
    pyrnn.stack_backward(**arguments)  # the well-formed call runs


def test_any_layout_gives_the_same_result(backend):
    """Nested lists, Fortran-ordered and strided arrays and lists as layer entries give the same
    results as clean arrays (the backends only ever see clean arrays); no bias is zeros."""
    stack = make_stack(np.random.default_rng(8), 4, 3, 2, 5, 2, 2, bias=False, masks=True)
    expected = pyrnn.stack_forward(**stack, backend=backend)
    changed = dict(stack, x=stack["x"].tolist(), h0=np.asfortranarray(stack["h0"]),
                   dropout_masks=np.repeat(stack["dropout_masks"], 2, axis=3)[..., ::2],
                   layers=[[np.asfortranarray(weight_ih), weight_hh.tolist(), None]
                           for weight_ih, weight_hh, _ in stack["layers"]])
    for got, want in zip(pyrnn.stack_forward(**changed, backend=backend), expected):
        np.testing.assert_array_equal(got, want)
    with_zero_biases = dict(stack, layers=[(a, b, np.zeros(5)) for a, b, _ in stack["layers"]])
    for got, want in zip(pyrnn.stack_forward(**with_zero_biases, backend=backend), expected):
        np.testing.assert_array_equal(got, want)


def test_every_backend_runs_its_own_stack(backend):
    """Each backend module has the stack functions of the contract, and the native one is one
    compiled call (not a composition in Python that would pass as the fast path)."""
    module = pyrnn._backends.resolve(backend)[1]
    assert callable(module.stack_forward) and callable(module.stack_backward)
    if backend == "cpp":
        assert type(module.stack_forward).__name__ == "builtin_function_or_method"
        assert type(module.stack_backward).__name__ == "builtin_function_or_method"


def test_bf16_needs_float32(backend):
    stack = make_stack(np.random.default_rng(9), 3, 2, 2, 4, 2, 1)
    with pytest.raises((TypeError, ValueError), match="bf16"):
        pyrnn.stack_forward(**stack, precision="bf16", backend=backend)

"""The native stack (pyrnn._cpp.stack_forward/stack_backward: L layers × D directions in one call)
against the reference composition of single-layer calls (pyrnn.reference.stack_forward/backward,
the specification), and its guarantees: bitwise identical across thread counts, inputs untouched,
bad arguments named.

Tolerances as in test_native_kernel.py (pyrnn.testing); a layer's sums are at most
accumulated_terms of its own shape, with D·H inputs above layer 0.
"""
import numpy as np
import pytest

import pyrnn
from pyrnn import reference
from pyrnn.testing import BF16_AGREEMENT, accumulated_terms, bf16_accuracy, relative_error, tolerance

_cpp = pytest.importorskip("pyrnn._cpp", reason=str(pyrnn.unavailable_backends().get("cpp")))

STACK_RESULT_NAMES = ("layer_outputs", "h_n", "grad_x", "grad_h0")


def make_stack(L, D, T, B, I, H, dtype=np.float64, seed=0, lengths=None, masks=False):
    """A contracting stack with random data, as the clean arrays backends get."""
    rng = np.random.default_rng(seed)
    layers = []
    for unit in range(L * D):
        width = I if unit < D else D * H
        layers.append(tuple(np.ascontiguousarray(a, dtype) for a in (
            rng.standard_normal((H, width)) / np.sqrt(max(width, 1)),
            0.9 * rng.standard_normal((H, H)) / np.sqrt(max(H, 1)),
            0.1 * rng.standard_normal(H))))
    p = dict(
        x=rng.standard_normal((T, B, I)).astype(dtype), layers=layers,
        h0=(0.5 * rng.standard_normal((L * D, B, H))).astype(dtype),
        lengths=None if lengths is None else np.asarray(lengths, np.int64),
        dropout_masks=((rng.random((L - 1, T, B, D * H)) > 0.3) / 0.7).astype(dtype) if masks else None,
        bidirectional=D == 2, nonlinearity="tanh", precision="fp32",
        grad_output=rng.standard_normal((T, B, D * H)).astype(dtype),
        grad_h_n=rng.standard_normal((L * D, B, H)).astype(dtype))
    return p


def run(module, p, layer_outputs=None):
    """{name: result} of a backend's stack forward and backward (fed `layer_outputs`, else its own);
    the gradients of unit u's weights as grad_weight_ih[u], grad_weight_hh[u], grad_bias[u]."""
    outputs, h_n = module.stack_forward(p["x"], p["layers"], p["h0"], p["lengths"], p["dropout_masks"],
                                        p["bidirectional"], p["nonlinearity"], p["precision"])
    grad_x, grad_h0, grads = module.stack_backward(
        p["grad_output"], p["x"], p["layers"], outputs if layer_outputs is None else layer_outputs,
        p["h0"], p["grad_h_n"], p["lengths"], p["dropout_masks"], p["bidirectional"], p["nonlinearity"],
        p["precision"])
    results = dict(zip(STACK_RESULT_NAMES, (outputs, h_n, grad_x, grad_h0)))
    for u, unit in enumerate(grads):
        for name, g in zip(("weight_ih", "weight_hh", "bias"), unit):
            results[f"grad_{name}[{u}]"] = g
    return results


def as64(p):
    return {k: (v.astype(np.float64) if isinstance(v, np.ndarray) and v.dtype.kind == "f" else
                [tuple(a.astype(np.float64) for a in layer) for layer in v] if k == "layers" else v)
            for k, v in p.items()}


def assert_close_to_reference(p):
    """cpp against the float64 reference composition; both backwards are fed the reference's
    layer_outputs, so each gradient is checked on its own."""
    expected = run(reference, as64(p))
    got = run(_cpp, p, layer_outputs=expected["layer_outputs"].astype(p["x"].dtype))
    T, B, I = p["x"].shape
    H = p["h0"].shape[2]
    D = 2 if p["bidirectional"] else 1
    terms_forward, terms_backward = accumulated_terms(T, B, max(I, D * H), H)
    assert got.keys() == expected.keys()
    for name, e in expected.items():
        g = got[name]
        assert g.dtype == p["x"].dtype and g.shape == e.shape, name
        tol = tolerance(g.dtype, terms_forward if name in ("layer_outputs", "h_n") else terms_backward)
        err = relative_error(g, e)
        assert err <= tol, f"{name}: error {err:.2e} > {tol:.1e}; first values got {g.ravel()[:4]}, " \
                           f"expected {e.ravel()[:4]}"


@pytest.fixture
def threads():
    """Sets the kernel's thread budget for a test and restores the one before it."""
    before = _cpp.get_num_threads()
    yield _cpp.set_num_threads
    _cpp.set_num_threads(before)


# (L, D, T, B, I, H, lengths). The last ones are big enough (>= 4M multiply-adds per layer) for the
# stack to put its units on different threads: with D = 2 one thread per direction, with D = 1
# successive layers as a wavefront in chunks of ceil(96 / B) steps (here 6 and 96: one chunk).
STACKS = [
    (1, 1, 5, 3, 4, 6, None), (2, 1, 7, 3, 4, 6, [7, 0, 3]), (1, 2, 6, 4, 5, 7, [6, 0, 3, 1]),
    (3, 2, 6, 4, 5, 7, [6, 0, 3, 1]), (2, 2, 1, 1, 1, 1, None), (4, 1, 300, 2, 3, 5, [300, 17]),
    (3, 1, 40, 16, 24, 80, [40, 39, 1, 0] + [40] * 8 + [6, 7, 12, 13]),
    (2, 2, 40, 16, 24, 80, [40, 39, 1, 0] + [40] * 8 + [6, 7, 12, 13]),
    (3, 1, 200, 1, 30, 200, None),
]


@pytest.mark.parametrize("masks", [False, True], ids=["no masks", "masks"])
@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("stack", STACKS, ids=lambda s: "L{}D{}T{}B{}I{}H{}".format(*s[:6]))
def test_matches_the_reference_composition(stack, n_threads, masks, threads):
    L, D, T, B, I, H, lengths = stack
    threads(n_threads)
    assert_close_to_reference(make_stack(L, D, T, B, I, H, lengths=lengths, masks=masks and L > 1))


@pytest.mark.parametrize("stack", [(2, 2, 9, 5, 6, 33, [9, 2, 0, 9, 5]), (3, 1, 40, 16, 24, 80, None)],
                         ids=lambda s: "L{}D{}".format(*s[:2]))
def test_relu_stack_matches_the_reference_composition(stack):
    L, D, T, B, I, H, lengths = stack
    p = make_stack(L, D, T, B, I, H, lengths=lengths, masks=True)
    p["nonlinearity"] = "relu"
    assert_close_to_reference(p)


@pytest.mark.parametrize("D", [1, 2])
def test_float32_stack_matches_the_reference_composition(D):
    assert_close_to_reference(make_stack(3, D, 30, 16, 24, 80, np.float32, lengths=[30, 0, 29] + [15] * 13,
                                         masks=True))


@pytest.mark.parametrize("D", [1, 2])
def test_bf16_stack_agrees_with_the_bf16_reference_and_float64(D, threads):
    """precision bf16 reaches every layer. Layer 0 reads the same x in both, so its outputs agree
    with the bf16 reference composition within BF16_AGREEMENT (test_bf16.py: one layer); above it,
    each backend's own rounding of the layer below's output differs by a bf16 ulp here and there,
    so the whole stack is held to bf16's accuracy against float64 instead (pyrnn.testing)."""
    p = make_stack(3, D, 30, 16, 24, 80, np.float32, lengths=[30, 0, 29] + [15] * 13, masks=True)
    p["precision"] = "bf16"
    threads(2)
    got = run(_cpp, p)
    layer_0 = run(reference, p)["layer_outputs"][0]
    assert relative_error(got["layer_outputs"][0], layer_0) <= BF16_AGREEMENT
    exact = run(reference, dict(as64(p), precision="fp32"))
    for name, e in exact.items():
        error, bound = bf16_accuracy("output" if name in ("layer_outputs", "h_n") else name, got[name], e)
        assert got[name].dtype == np.float32 and error <= bound, f"{name}: {error:.2e} > {bound:.1e}"
    fp32 = run(_cpp, dict(p, precision="fp32"))
    # really bf16: far from float32 math (test_bf16.py's bound for one layer)
    assert relative_error(got["layer_outputs"][0], fp32["layer_outputs"][0]) > 2**-12


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("stack", [(3, 1, 50, 16, 32, 96), (2, 2, 50, 16, 32, 96), (1, 1, 50, 64, 32, 256)],
                         ids=lambda s: "L{}D{}".format(*s[:2]))
def test_bitwise_identical_across_thread_counts(stack, dtype, threads):
    p = make_stack(*stack, dtype, lengths=[50, 49, 0, 1] + [50] * (stack[3] - 4), masks=stack[0] > 1)
    results = []
    for n in (1, 2, 3, 4, 1, 2):  # 4: each unit has a sub-team of 2 from the pool
        threads(n)
        results.append(run(_cpp, p))
    for other in results[1:]:
        for name, a in results[0].items():
            assert np.array_equal(a.view(np.uint8), other[name].view(np.uint8)), name


def test_inputs_are_not_modified():
    p = make_stack(2, 2, 6, 4, 5, 7, np.float32, lengths=[6, 0, 3, 1], masks=True)
    arrays = {k: v for k, v in p.items() if isinstance(v, np.ndarray)}
    arrays.update({f"layers[{u}][{i}]": a for u, layer in enumerate(p["layers"]) for i, a in enumerate(layer)})
    before = {k: v.copy() for k, v in arrays.items()}
    run(_cpp, p)
    for k, v in before.items():
        np.testing.assert_array_equal(arrays[k], v, err_msg=k)


@pytest.mark.parametrize("T, B, I, H", [(0, 2, 3, 4), (3, 0, 3, 4), (3, 2, 0, 4), (3, 2, 3, 0)])
def test_empty_dimensions_do_not_crash(T, B, I, H):
    for D in (1, 2):
        p = make_stack(2, D, T, B, I, H)
        got = run(_cpp, p)
        assert got["layer_outputs"].shape == (2, T, B, D * H) and got["grad_x"].shape == (T, B, I)
        assert got["grad_weight_ih[0]"].shape == (H, I) and got[f"grad_weight_ih[{D}]"].shape == (H, D * H)


def test_batch_first_through_the_public_function():
    p = make_stack(2, 2, 7, 5, 4, 6, lengths=[7, 0, 3, 1, 6], masks=True)
    swap = {name: np.ascontiguousarray(p[name].swapaxes(-3, -2))
            for name in ("x", "grad_output", "dropout_masks")}
    results = {}
    for backend in ("cpp", "numpy"):
        options = dict(lengths=p["lengths"], batch_first=True, bidirectional=True,
                       dropout_masks=swap["dropout_masks"], backend=backend)
        out = pyrnn.stack_forward(swap["x"], p["layers"], p["h0"], **options)
        grads = pyrnn.stack_backward(swap["grad_output"], swap["x"], p["layers"], out.layer_outputs, p["h0"],
                                     grad_h_n=p["grad_h_n"], **options)
        results[backend] = [out.output, out.h_n, grads.x, grads.h0] + [g for layer in grads.layers for g in layer]
    for got, expected in zip(results["cpp"], results["numpy"]):
        assert got.shape == expected.shape
        assert relative_error(got, expected) <= 1e-10


# Malformed stacks: the binding names the argument (it is reachable from Python on its own).
def bad_stack(change):
    p = make_stack(2, 2, 3, 2, 4, 5)
    change(p)
    return p


@pytest.mark.parametrize("change, error, message", [
    (lambda p: p.update(layers=p["layers"][:3]), ValueError, r"layers has 3 entries, expected num_layers × 2"),
    (lambda p: p.update(layers=[]), ValueError, "layers has 0 entries"),
    (lambda p: p.update(layers=[p["layers"][0][0]] * 4), TypeError,
     r"layers\[0\] must be a \(weight_ih, weight_hh, bias\)"),
    (lambda p: p.update(layers=None), TypeError, "layers must be a list"),
    (lambda p: p["layers"].__setitem__(2, (np.zeros((5, 5)),) + p["layers"][2][1:]), ValueError,
     r"layers\[2\].weight_ih has shape \(5, 5\), expected \(5, 10\)"),
    (lambda p: p["layers"].__setitem__(1, (np.zeros((5, 5)),) + p["layers"][1][1:]), ValueError,
     r"layers\[1\].weight_ih has shape \(5, 5\), expected \(5, 4\)"),
    (lambda p: p["layers"].__setitem__(3, p["layers"][3][:1] + (np.zeros((6, 6)), p["layers"][3][2])), ValueError,
     r"layers\[3\].weight_hh has shape \(6, 6\), expected \(5, 5\)"),
    (lambda p: p["layers"].__setitem__(1, p["layers"][1][:2] + (np.zeros(4),)), ValueError,
     r"layers\[1\].bias has shape \(4,\), expected \(5,\)"),
    (lambda p: p["layers"].__setitem__(0, p["layers"][0][:2] + (np.zeros(5, np.float32),)), TypeError,
     r"layers\[0\].bias must be a C-contiguous float64"),
    (lambda p: p.update(h0=np.zeros((2, 2, 5))), ValueError, r"h0 has shape \(2, 2, 5\), expected \(4, 2, 5\)"),
    (lambda p: p.update(dropout_masks=np.ones((2, 3, 2, 10))), ValueError,
     r"dropout_masks has shape \(2, 3, 2, 10\), expected \(1, 3, 2, 10\)"),
    (lambda p: p.update(dropout_masks=np.ones((1, 3, 2, 5))), ValueError, "dropout_masks has shape"),
    (lambda p: p.update(dropout_masks=np.ones((1, 3, 2, 10), np.float32)), TypeError, "dropout_masks must be"),
    (lambda p: p.update(bidirectional=1), TypeError, "bidirectional must be True or False"),
    (lambda p: p.update(nonlinearity="gelu"), ValueError, "nonlinearity must be 'tanh' or 'relu', got 'gelu'"),
    (lambda p: p.update(precision="fp16"), ValueError, "precision must be 'fp32' or 'bf16', got 'fp16'"),
    (lambda p: p.update(precision="bf16"), TypeError, "precision='bf16' needs float32 arrays"),
    (lambda p: p.update(lengths=np.array([4, 0])), ValueError, r"lengths\[0\] = 4 is outside \[0, T=3\]"),
    (lambda p: p.update(x=p["x"][0]), ValueError, "x must be 3-D"),
])
def test_malformed_stacks_raise_naming_the_argument(change, error, message):
    p = bad_stack(change)
    with pytest.raises(error, match=message):
        _cpp.stack_forward(p["x"], p["layers"], p["h0"], p["lengths"], p["dropout_masks"], p["bidirectional"],
                           p["nonlinearity"], p["precision"])


@pytest.mark.parametrize("position, name", [(0, "grad_output"), (3, "layer_outputs"), (5, "grad_h_n")])
def test_malformed_stack_backward_raises_naming_the_argument(position, name):
    p = make_stack(2, 1, 3, 2, 4, 5)
    outputs, _ = _cpp.stack_forward(p["x"], p["layers"], p["h0"], None, None, False, "tanh")
    arguments = [p["grad_output"], p["x"], p["layers"], outputs, p["h0"], p["grad_h_n"], None, None, False, "tanh"]
    arguments[position] = np.zeros((1,) + arguments[position].shape)
    with pytest.raises(ValueError, match=f"{name} has shape"):
        _cpp.stack_backward(*arguments)


def test_concurrent_stacks_from_python_threads_agree(threads):
    """Concurrent calls each claim whatever workers are idle (csrc/pool.cpp), down to none: the
    results are the same however many each got."""
    from concurrent.futures import ThreadPoolExecutor

    p = make_stack(2, 2, 30, 16, 24, 96, np.float32, masks=True)
    threads(2)
    expected = run(_cpp, p)
    with ThreadPoolExecutor(4) as executor:
        results = list(executor.map(lambda _: run(_cpp, p), range(8)))
    for got in results:
        for name, e in expected.items():
            np.testing.assert_array_equal(got[name], e, err_msg=name)

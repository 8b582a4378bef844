"""Every backend against the NumPy reference (pyrnn.reference), forward and backward.

float64 backends must match the float64 reference to 1e-10 (relative to each tensor's scale);
float32 backends must match the float64 reference on the same inputs within
pyrnn.testing.tolerance (8·sqrt(K)·eps32; the reasoning is in that module).
"""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pyrnn
from pyrnn.testing import RESULT_NAMES, accumulated_terms, relative_error, tolerance

import problems
from problems import make_problem, random_lengths



NONLINEARITIES = ("tanh", "relu")


def run(backend, problem, grad_output, grad_h_n, lengths=None, batch_first=False,
        nonlinearity="tanh"):
    """{name: result} of one backend's forward and backward (pyrnn.testing.RESULT_NAMES)."""
    options = dict(lengths=lengths, batch_first=batch_first, backend=backend,
                   nonlinearity=nonlinearity)
    output, h_n = pyrnn.forward(**problem, **options)
    grads = pyrnn.backward(grad_output, problem["x"], problem["weight_ih"], problem["weight_hh"],
                           output, problem["h0"], grad_h_n=grad_h_n, **options)
    return dict(output=output, h_n=h_n, **{f"grad_{name}": g for name, g in grads._asdict().items()})


def assert_matches_reference(backend, problem, lengths=None, batch_first=False, seed=0,
                             nonlinearity="tanh"):
    """Run `backend` in the problem's dtype and the reference in float64; compare all 7 results."""
    rng = np.random.default_rng(seed)
    dtype = problem["x"].dtype
    x = problem["x"]
    T, B = (x.shape[1], x.shape[0]) if batch_first else x.shape[:2]
    I, H = x.shape[2], problem["weight_hh"].shape[0]
    out_shape = (B, T, H) if batch_first else (T, B, H)
    grad_output, grad_h_n = rng.standard_normal(out_shape), rng.standard_normal((B, H))

    as64 = {k: None if v is None else np.asarray(v, np.float64) for k, v in problem.items()}
    expected = run("numpy", as64, grad_output, grad_h_n, lengths, batch_first, nonlinearity)
    actual = run(backend, problem, grad_output.astype(dtype), grad_h_n.astype(dtype), lengths,
                 batch_first, nonlinearity)

    forward_terms, backward_terms = accumulated_terms(T, B, I, H)
    assert set(actual) == set(RESULT_NAMES)
    for name in RESULT_NAMES:
        got, want = actual[name], expected[name]
        assert got.dtype == dtype, f"{name} has dtype {got.dtype}, expected {dtype}"
        assert got.shape == want.shape, f"{name} has shape {got.shape}, expected {want.shape}"
        bound = tolerance(dtype, forward_terms if name in ("output", "h_n") else backward_terms)
        error = relative_error(got, want)
        if dtype == np.float64 and backend != "numpy":
            key = (backend, name)
            problems.float64_discrepancies[key] = max(error, problems.float64_discrepancies.get(key, 0))
        assert error <= bound, (
            f"{backend} {name} differs from the reference by {error:.3g} (> {bound:.3g}) "
            f"for T={T} B={B} I={I} H={H} {dtype} {nonlinearity}; first values {np.ravel(got)[:4]} vs "
            f"{np.ravel(want)[:4]}")


@settings(deadline=None, max_examples=60)
@given(T=st.integers(0, 9), B=st.integers(1, 5), I=st.integers(1, 6), H=st.integers(1, 9),
       dtype=st.sampled_from([np.float32, np.float64]), bias=st.booleans(), h0=st.booleans(),
       with_lengths=st.booleans(), batch_first=st.booleans(), seed=st.integers(0, 2**32 - 1),
       nonlinearity=st.sampled_from(NONLINEARITIES))
def test_random_shapes_match_reference(backend, T, B, I, H, dtype, bias, h0, with_lengths,
                                       batch_first, seed, nonlinearity):
    rng = np.random.default_rng(seed)
    problem = make_problem(rng, T, B, I, H, dtype, bias=bias, h0=h0)
    lengths = random_lengths(rng, T, B) if with_lengths else None
    if batch_first:
        problem["x"] = np.ascontiguousarray(problem["x"].swapaxes(0, 1))
    assert_matches_reference(backend, problem, lengths, batch_first, seed, nonlinearity)


@pytest.mark.parametrize("nonlinearity", NONLINEARITIES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (1, 3, 5, 7), (7, 1, 1, 1), (5, 2, 1, 3),
                                   (3, 2, 4, 1), (30, 7, 33, 65), (13, 17, 63, 17), (40, 3, 3, 64)],
                         ids=lambda s: "T{}-B{}-I{}-H{}".format(*s))
@pytest.mark.parametrize("with_lengths", [False, True], ids=["full", "lengths"])
def test_edge_shapes_match_reference(backend, shape, dtype, with_lengths, nonlinearity):
    rng = np.random.default_rng(1)
    T, B, I, H = shape
    problem = make_problem(rng, T, B, I, H, dtype)
    lengths = random_lengths(rng, T, B) if with_lengths else None
    assert_matches_reference(backend, problem, lengths, nonlinearity=nonlinearity)


@pytest.mark.parametrize("nonlinearity", NONLINEARITIES)
def test_long_sequence_float32_stays_within_tolerance(backend, nonlinearity):
    """relu has no saturation to damp old errors, but torch's initialisation keeps
    |weight_hh| < 1 per unit, so they do not grow either."""
    rng = np.random.default_rng(2)
    problem = make_problem(rng, 2000, 2, 8, 16, np.float32)
    assert_matches_reference(backend, problem, lengths=np.array([2000, 1234]),
                             nonlinearity=nonlinearity)


@pytest.mark.parametrize("layout", ["fortran", "strided", "readonly", "lists"])
def test_any_layout_gives_the_same_result(backend, layout):
    rng = np.random.default_rng(3)
    problem = make_problem(rng, 4, 3, 5, 6)
    expected = pyrnn.forward(**problem, backend=backend)
    if layout == "fortran":
        changed = {k: np.asfortranarray(v) for k, v in problem.items()}
    elif layout == "strided":  # every other element of arrays twice as large
        changed = {}
        for k, v in problem.items():
            big = np.zeros(tuple(2 * n for n in v.shape))
            big[tuple(slice(None, None, 2) for _ in v.shape)] = v
            changed[k] = big[tuple(slice(None, None, 2) for _ in v.shape)]
            assert not changed[k].flags.c_contiguous or v.ndim == 0
    elif layout == "readonly":
        changed = {k: v.copy() for k, v in problem.items()}
        for v in changed.values():
            v.flags.writeable = False
    else:
        changed = {k: v.tolist() for k, v in problem.items()}
    actual = pyrnn.forward(**changed, backend=backend)
    for got, want in zip(actual, expected):
        np.testing.assert_array_equal(got, want)


def test_inputs_are_never_modified(backend):
    rng = np.random.default_rng(4)
    for dtype in (np.float32, np.float64):
        problem = make_problem(rng, 5, 3, 4, 6, dtype)
        lengths = np.array([5, 0, 2])
        output, _ = pyrnn.forward(**problem, lengths=lengths, backend=backend)
        grad_output = rng.standard_normal(output.shape).astype(dtype)
        grad_h_n = rng.standard_normal((3, 6)).astype(dtype)
        inputs = dict(problem, output=output, grad_output=grad_output, grad_h_n=grad_h_n,
                      lengths=lengths)
        before = {k: v.copy() for k, v in inputs.items()}
        pyrnn.forward(**problem, lengths=lengths, backend=backend)
        pyrnn.backward(grad_output, problem["x"], problem["weight_ih"], problem["weight_hh"],
                       output, problem["h0"], grad_h_n=grad_h_n, lengths=lengths, backend=backend)
        for name, value in inputs.items():
            np.testing.assert_array_equal(value, before[name], err_msg=f"{name} was modified")


def test_results_do_not_alias_inputs(backend):
    rng = np.random.default_rng(5)
    problem = make_problem(rng, 0, 2, 3, 4)
    output, h_n = pyrnn.forward(**problem, backend=backend)
    assert output.shape == (0, 2, 4)
    np.testing.assert_array_equal(h_n, problem["h0"])
    assert not np.shares_memory(h_n, problem["h0"])


@pytest.mark.parametrize("nonlinearity", NONLINEARITIES)
def test_batch_first_is_time_major_transposed(backend, nonlinearity):
    rng = np.random.default_rng(6)
    problem = make_problem(rng, 6, 4, 3, 5)
    lengths = np.array([6, 2, 0, 3])
    options = dict(lengths=lengths, backend=backend, nonlinearity=nonlinearity)
    output, h_n = pyrnn.forward(**problem, **options)
    batch_major = dict(problem, x=problem["x"].swapaxes(0, 1))
    output_bf, h_n_bf = pyrnn.forward(**batch_major, batch_first=True, **options)
    assert output_bf.shape == (4, 6, 5) and h_n_bf.shape == (4, 5)
    np.testing.assert_array_equal(output_bf, output.swapaxes(0, 1))
    np.testing.assert_array_equal(h_n_bf, h_n)
    grad_output = rng.standard_normal(output.shape)
    grads = pyrnn.backward(grad_output, problem["x"], problem["weight_ih"], problem["weight_hh"],
                           output, problem["h0"], **options)
    grads_bf = pyrnn.backward(grad_output.swapaxes(0, 1), batch_major["x"], problem["weight_ih"],
                              problem["weight_hh"], output_bf, problem["h0"], batch_first=True,
                              **options)
    np.testing.assert_array_equal(grads_bf.x, grads.x.swapaxes(0, 1))
    for name in ("h0", "weight_ih", "weight_hh", "bias"):
        np.testing.assert_array_equal(getattr(grads_bf, name), getattr(grads, name))


@pytest.mark.parametrize("nonlinearity", NONLINEARITIES)
def test_lengths_equal_running_each_row_alone(backend, nonlinearity):
    """Padding semantics (docs/design.md §1): a row of length L behaves as a sequence of L steps."""
    rng = np.random.default_rng(7)
    T, B, I, H = 7, 5, 3, 4
    problem = make_problem(rng, T, B, I, H)
    lengths = np.array([7, 0, 3, 1, 3])
    output, h_n = pyrnn.forward(**problem, lengths=lengths, backend=backend,
                                nonlinearity=nonlinearity)
    grad_output = rng.standard_normal(output.shape)
    grad_h_n = rng.standard_normal((B, H))
    grads = pyrnn.backward(grad_output, problem["x"], problem["weight_ih"], problem["weight_hh"],
                           output, problem["h0"], grad_h_n=grad_h_n, lengths=lengths,
                           backend=backend, nonlinearity=nonlinearity)
    assert not np.any(grads.x[lengths[None, :] <= np.arange(T)[:, None]])
    for b, L in enumerate(lengths):
        row = dict(problem, x=problem["x"][:L, b:b + 1], h0=problem["h0"][b:b + 1])
        row_output, row_h_n = pyrnn.forward(**row, backend=backend, nonlinearity=nonlinearity)
        np.testing.assert_allclose(output[:L, b:b + 1], row_output, rtol=0, atol=1e-14)
        assert not np.any(output[L:, b]), "padding outputs must be 0"
        np.testing.assert_allclose(h_n[b:b + 1], row_h_n, rtol=0, atol=1e-14)
        row_grads = pyrnn.backward(grad_output[:L, b:b + 1], row["x"], row["weight_ih"],
                                   row["weight_hh"], row_output, row["h0"],
                                   grad_h_n=grad_h_n[b:b + 1], backend=backend,
                                   nonlinearity=nonlinearity)
        np.testing.assert_allclose(grads.x[:L, b:b + 1], row_grads.x, rtol=0, atol=1e-13)
        np.testing.assert_allclose(grads.h0[b:b + 1], row_grads.h0, rtol=0, atol=1e-13)


@pytest.mark.parametrize("nonlinearity", NONLINEARITIES)
def test_nan_in_padding_does_not_leak(backend, nonlinearity):
    rng = np.random.default_rng(8)
    problem = make_problem(rng, 5, 2, 3, 4)
    options = dict(lengths=np.array([5, 2]), backend=backend, nonlinearity=nonlinearity)
    clean_output, clean_h_n = pyrnn.forward(**problem, **options)
    problem["x"][2:, 1] = np.nan
    problem["x"][3, 1, 0] = np.inf
    output, h_n = pyrnn.forward(**problem, **options)
    np.testing.assert_array_equal(output, clean_output)
    np.testing.assert_array_equal(h_n, clean_h_n)
    grads = pyrnn.backward(np.ones_like(output), problem["x"], problem["weight_ih"],
                           problem["weight_hh"], output, problem["h0"], **options)
    for name, grad in grads._asdict().items():
        assert np.all(np.isfinite(grad)), f"grad {name} is not finite"


@pytest.mark.parametrize("nonlinearity", NONLINEARITIES)
def test_nan_propagates(backend, nonlinearity):
    """NaN in, NaN out, relu included (max(NaN, 0) is NaN, as torch.relu's)."""
    rng = np.random.default_rng(9)
    problem = make_problem(rng, 5, 3, 2, 4)
    problem["x"][2, 1, 0] = np.nan
    output, h_n = pyrnn.forward(**problem, backend=backend, nonlinearity=nonlinearity)
    assert np.all(np.isnan(output[2:, 1])) and np.all(np.isnan(h_n[1]))
    assert np.all(np.isfinite(output[:2])) and np.all(np.isfinite(output[:, [0, 2]]))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_huge_inputs_saturate(backend, dtype):
    rng = np.random.default_rng(10)
    problem = make_problem(rng, 4, 3, 5, 6, dtype)
    problem["x"] *= dtype(1e30)
    output, h_n = pyrnn.forward(**problem, backend=backend)
    expected = np.sign(np.asarray(pyrnn.forward(**problem, backend="numpy")[0]))
    assert np.all(np.abs(output) == 1)
    np.testing.assert_array_equal(output, expected)
    problem["x"][1, 1, 1] = np.inf
    output, _ = pyrnn.forward(**problem, backend=backend)
    assert np.all(np.abs(output) == 1)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_relu_is_exactly_zero_below_the_kink_and_passes_no_gradient_there(backend, dtype):
    """relu(a) = 0 for a <= 0 and relu' = [h > 0]: a unit whose pre-activation is negative at
    every step has output 0 exactly and sends no gradient to its weights (docs/design.md §1)."""
    rng = np.random.default_rng(13)
    problem = make_problem(rng, 6, 3, 4, 5, dtype)
    problem["bias"][2] = -100  # unit 2 is below the kink everywhere
    output, _ = pyrnn.forward(**problem, backend=backend, nonlinearity="relu")
    assert np.all(output[:, :, 2] == 0) and np.all(output >= 0)
    grads = pyrnn.backward(np.ones_like(output), problem["x"], problem["weight_ih"],
                           problem["weight_hh"], output, problem["h0"], backend=backend,
                           nonlinearity="relu")
    assert np.all(grads.weight_ih[2] == 0) and np.all(grads.weight_hh[2] == 0)
    assert grads.bias[2] == 0


def test_defaults_are_zero_bias_and_zero_state(backend):
    rng = np.random.default_rng(11)
    problem = make_problem(rng, 3, 2, 2, 3, bias=False, h0=False)
    explicit = dict(problem, bias=np.zeros(3), h0=np.zeros((2, 3)))
    for got, want in zip(pyrnn.forward(**problem, backend=backend),
                         pyrnn.forward(**explicit, backend=backend)):
        np.testing.assert_array_equal(got, want)


def test_repeated_calls_are_bitwise_identical(backend):
    rng = np.random.default_rng(12)
    problem = make_problem(rng, 20, 9, 17, 33, np.float32)
    first = run(backend, problem, np.ones((20, 9, 33), np.float32), None)
    second = run(backend, problem, np.ones((20, 9, 33), np.float32), None)
    for name in RESULT_NAMES:
        np.testing.assert_array_equal(first[name], second[name], err_msg=name)

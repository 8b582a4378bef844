"""The numba backend's own parts, tested against NumPy: the per-step product (every tile and
remainder path), the vectorisable tanh, the step loops that use NumPy's BLAS (equal to the
compiled ones), lazy compilation and the on-disk cache. Agreement of the whole backend with the reference is
tested for every backend in test_agreement.py.
"""
import subprocess
import sys

import numpy as np
import pytest

numba = pytest.importorskip("numba", reason="numba is not installed")
from pyrnn import numba_kernel  # noqa: E402

from problems import make_problem, random_lengths  # noqa: E402

import pyrnn  # noqa: E402


# B and H around the 4x4 tile and the 16-column block: full tiles, leftover rows (B % 4, and
# B < 4 where only the one-row path runs), leftover columns, several column blocks.
@pytest.mark.parametrize("B", [1, 3, 4, 5, 8, 13])
@pytest.mark.parametrize("J", [1, 4, 6, 16, 17, 35])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_product_matches_numpy(B, J, dtype):
    rng = np.random.default_rng(B * 100 + J)
    K = 23
    a = rng.standard_normal((B, K)).astype(dtype)
    w = rng.standard_normal((J, K)).astype(dtype)
    out = np.full((B, J), np.nan, dtype)
    numba_kernel._matmul_wt_columns(a, w, out, 0, J)
    expected = a.astype(np.float64) @ w.T.astype(np.float64)
    # Sums of K products in another order: a few roundoffs of the terms' size (~sqrt(K)).
    tolerance = 1e-13 if dtype == np.float64 else 8 * np.sqrt(K) * np.finfo(np.float32).eps
    np.testing.assert_allclose(out, expected, rtol=0, atol=tolerance * np.abs(expected).max())


def test_product_writes_only_its_columns():
    rng = np.random.default_rng(0)
    a, w = rng.standard_normal((6, 9)), rng.standard_normal((40, 9))
    out = np.full((6, 40), 7.0)
    numba_kernel._matmul_wt_columns(a, w, out, 5, 27)
    np.testing.assert_allclose(out[:, 5:27], a @ w[5:27].T, rtol=1e-13)
    assert (out[:, :5] == 7.0).all() and (out[:, 27:] == 7.0).all()


@numba.njit
def _tanh_all(x, out):
    for i in range(x.size):
        out[i] = numba_kernel._tanh(np.float64(x[i]))


def _tanh_grid():
    tiny = np.geomspace(1e-300, 30, 20_000)
    return np.concatenate([np.linspace(-30, 30, 200_001), tiny, -tiny])


def test_tanh_float64_within_a_few_ulp_of_numpy():
    x = _tanh_grid()
    out = np.empty_like(x)
    _tanh_all(x, out)
    expected = np.tanh(x)
    ulps = np.abs(out - expected) / np.spacing(np.abs(expected))
    assert ulps.max() <= 8, f"max {ulps.max():.1f} ulp at x = {x[np.argmax(ulps)]!r}"


def test_tanh_float32_is_rounded_from_float64():
    """The float32 path computes in float64 and rounds once: within 1 ulp of the true tanh."""
    x = _tanh_grid().astype(np.float32)
    out = np.empty_like(x)
    _tanh_all(x, out)
    expected = np.tanh(x.astype(np.float64))
    ulps = np.abs(out - expected) / np.spacing(np.abs(expected).astype(np.float32))
    assert ulps.max() <= 1


def test_tanh_special_values():
    x = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 20.0, -20.0, 1e300, -1e-320])
    out = np.empty_like(x)
    _tanh_all(x, out)
    np.testing.assert_array_equal(out[:4], [0.0, -0.0, 1.0, -1.0])
    assert np.signbit(out[1]) and not np.signbit(out[0])
    assert np.isnan(out[4])
    np.testing.assert_array_equal(out[5:8], [1.0, -1.0, 1.0])  # exact saturation
    assert out[8] == -1e-320  # tanh(x) = x below roundoff, subnormals included


def _loops(loops, p, lengths, grad_output):
    """(output, h_n, grad_h0, grad_a) from a pair of step loops, forward then backward."""
    forward_steps, backward_steps = loops
    T, B, I = p["x"].shape
    H = p["weight_hh"].shape[0]
    output = (p["x"].reshape(T * B, I) @ p["weight_ih"].T + p["bias"]).reshape(T, B, H)
    state = np.stack([p["h0"], p["h0"]])
    forward_steps(output, p["weight_hh"], state, lengths)
    g, grad_a = p["h0"].copy(), np.zeros_like(output)
    backward_steps(grad_output, np.ascontiguousarray(p["weight_hh"].T), output, g, lengths, grad_a)
    return output, state[T % 2], g, grad_a


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("with_lengths", [False, True], ids=["full", "lengths"])
def test_blas_step_loops_match_compiled_loops(dtype, with_lengths):
    """The loops that hand each step's product to NumPy's BLAS compute the same thing."""
    rng = np.random.default_rng(1)
    T, B, I, H = 6, 9, 5, 37
    p = make_problem(rng, T, B, I, H, dtype)
    lengths = random_lengths(rng, T, B) if with_lengths else np.full(B, T, np.int64)
    grad_output = rng.standard_normal((T, B, H)).astype(dtype)
    k = numba_kernel
    compiled = _loops((k._forward_steps, k._backward_steps), p, lengths, grad_output)
    blas = _loops((k._forward_steps_blas, k._backward_steps_blas), p, lengths, grad_output)
    tolerance = 1e-13 if dtype == np.float64 else 1e-5
    for a, b in zip(compiled, blas):
        np.testing.assert_allclose(a, b, rtol=0, atol=tolerance)


def test_public_call_takes_the_blas_step_loops_with_two_threads(monkeypatch):
    """Through pyrnn.forward/backward with 2 threads and the threshold lowered: the BLAS loops run
    and agree with the compiled ones that 1 thread uses."""
    rng = np.random.default_rng(5)
    T, B, I, H = 4, 6, 3, 21
    p = make_problem(rng, T, B, I, H)
    grad_output = rng.standard_normal((T, B, H))
    monkeypatch.setattr(numba_kernel, "_BLAS_STEP_MIN_WORK", 1)
    calls = []
    for name in ("_forward_steps_blas", "_backward_steps_blas"):
        loop = getattr(numba_kernel, name)
        monkeypatch.setattr(numba_kernel, name, lambda *arguments, loop=loop: calls.append(loop(*arguments)))
    results = {}
    before = pyrnn.get_num_threads()
    try:
        for n in (1, 2):
            pyrnn.set_num_threads(n)
            output, h_n = pyrnn.forward(**p, backend="numba")
            grads = pyrnn.backward(grad_output, p["x"], p["weight_ih"], p["weight_hh"], output, p["h0"],
                                   backend="numba")
            results[n] = (output, h_n) + tuple(grads)
    finally:
        pyrnn.set_num_threads(before)
    assert len(calls) == 2  # forward and backward of the 2-thread run; 1 thread compiled loops
    for a, b in zip(results[1], results[2]):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-13)


def _run(code):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          timeout=600).stdout


def test_import_compiles_nothing():
    out = _run("import sys, pyrnn; print('numba' in sys.modules); "
               "from pyrnn import numba_kernel as k; "
               "steps = (k._forward_steps, k._backward_steps, k._matmul_wt_columns); "
               "print(sum(len(f.signatures) for f in steps))")
    assert out.split() == ["False", "0"]


def test_second_process_loads_compiled_code_from_the_cache():
    code = ("import numpy as np, pyrnn; from pyrnn import numba_kernel as k; "
            "x = np.ones((3, 2, 4)); out, h = pyrnn.forward(x, np.ones((5, 4)), np.eye(5), backend='numba'); "
            "pyrnn.backward(out, x, np.ones((5, 4)), np.eye(5), out, backend='numba'); "
            "print(sum(f.stats.cache_misses[s] for f in (k._forward_steps, k._backward_steps) "
            "for s in f.stats.cache_misses))")
    _run(code)  # compiles, unless an earlier run did
    assert _run(code).split() == ["0"]

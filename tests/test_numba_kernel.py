"""The numba backend's own parts, tested against NumPy: the per-step product (every tile and
remainder path), the vectorisable tanh, the time loops split between threads (equal to one
thread's, within the thread budget, BLAS kept single-threaded meanwhile, errors and forks
handled), lazy compilation and the on-disk cache. Agreement of the whole backend with the
reference is tested for every backend in test_agreement.py.
"""
import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

numba = pytest.importorskip("numba", reason="numba is not installed")
from pyrnn.numba import activations, kernel, products, threads  # noqa: E402

from forking import forked_child_agrees  # noqa: E402
from tanh_accuracy import assert_within_stated_bound, float32_sweep  # noqa: E402
from problems import make_problem, random_lengths  # noqa: E402

import pyrnn  # noqa: E402
from pyrnn import _threads  # noqa: E402
from pyrnn.testing import accumulated_terms, relative_error, tolerance  # noqa: E402


def _packed(w):
    """w (K, J) in the panels products.matmul_columns reads."""
    packed = products.empty_packed(*w.shape, w.dtype)
    _pack_all(w, packed)
    return packed


@numba.njit
def _pack_all(w, packed):
    products.pack(w, packed, 0, w.shape[1])


# B and J around the tile (4 rows by a panel of 64 float32 or 32 float64 columns): full tiles,
# leftover rows (B % 4, and B < 4 where only the one-row tiles run), partial vectors and panels,
# several panels.
@pytest.mark.parametrize("B", [1, 3, 4, 5, 8, 13])
@pytest.mark.parametrize("J", [1, 3, 6, 16, 17, 35, 63, 65, 129])
@pytest.mark.parametrize("K", [1, 6, 23])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_product_matches_numpy(B, J, K, dtype):
    rng = np.random.default_rng(B * 1000 + J * 10 + K)
    a = rng.standard_normal((B, K)).astype(dtype)
    w = rng.standard_normal((J, K)).astype(dtype)
    out = np.full((B, J), np.nan, dtype)
    products.matmul_columns(a, _packed(w.T), out, 0, J)
    expected = a.astype(np.float64) @ w.T.astype(np.float64)
    # Sums of K products in another order: a few roundoffs of the terms' size (~sqrt(K)).
    tolerance = 1e-13 if dtype == np.float64 else 8 * np.sqrt(K) * np.finfo(np.float32).eps
    np.testing.assert_allclose(out, expected, rtol=0, atol=tolerance * np.abs(expected).max())


def test_product_writes_only_its_columns():
    rng = np.random.default_rng(0)
    a, w = rng.standard_normal((9, 7)), rng.standard_normal((7, 100))
    out = np.full((9, 100), 7.0)
    products.matmul_columns(a, _packed(w), out, 32, 80)  # panels 1 and 2
    np.testing.assert_allclose(out[:, 32:80], a @ w[:, 32:80], rtol=1e-13)
    assert (out[:, :32] == 7.0).all() and (out[:, 80:] == 7.0).all()


def test_packed_copies_any_layout_into_zero_padded_panels():
    w = np.arange(120.0).reshape(3, 40)
    for source in (w, w.T, w[:, ::3]):
        packed = _packed(source)
        K, J = source.shape
        assert packed.flags.c_contiguous and packed.shape == (-(-J // 32), K, 32)  # float64
        columns = np.concatenate(list(packed), axis=1)  # the panels side by side: (K, 32·P)
        np.testing.assert_array_equal(columns[:, :J], source)
        assert (columns[:, J:] == 0).all()


@pytest.mark.parametrize("H", [1, 3, 17, 63, 65])
@pytest.mark.parametrize("B", [1, 9])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_time_loops_at_sizes_around_the_tile_match_the_reference(H, B, dtype):
    """Forward and backward at hidden sizes that leave partial vectors and panels, one row (the
    one-row tiles only) and 9 (full tiles and a row left over), with padding rows."""
    rng = np.random.default_rng(H * 10 + B)
    T, I = 6, 5
    p = make_problem(rng, T, B, I, H, dtype)
    lengths = random_lengths(rng, T, B)
    grad_output = rng.standard_normal((T, B, H)).astype(dtype)
    got = _run_numba(p, grad_output, lengths, 1)
    as64 = {name: value.astype(np.float64) for name, value in p.items()}
    output, h_n = pyrnn.forward(**as64, lengths=lengths, backend="numpy")
    grads = pyrnn.backward(grad_output.astype(np.float64), as64["x"], as64["weight_ih"],
                           as64["weight_hh"], output, as64["h0"], lengths=lengths,
                           backend="numpy")
    forward_terms, backward_terms = accumulated_terms(T, B, I, H)
    for i, (a, b) in enumerate(zip(got, (output, h_n) + tuple(grads))):
        assert relative_error(a, b) <= tolerance(dtype, forward_terms if i < 2 else backward_terms)


@numba.njit
def _tanh_all(x, out):
    for i in range(x.size):
        out[i] = activations.tanh(x[i])  # in x's own precision


def _tanh(x):
    out = np.empty_like(x)
    _tanh_all(x, out)
    return out


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_tanh_within_the_stated_bound(dtype):
    assert_within_stated_bound(_tanh, dtype)


def test_tanh_float32_is_odd_bitwise():
    x = float32_sweep(stride=1009)
    np.testing.assert_array_equal(_tanh(-x).view(np.int32), (-_tanh(x)).view(np.int32))


def _native_float32_tanh_constants():
    """{name: value} of TanhConstants<float> and the constants of tanh() in csrc/tanh.h."""
    source = (Path(__file__).parents[1] / "csrc" / "tanh.h").read_text()
    block = re.search(r"struct TanhConstants<float> \{(.*?)\n\};", source, re.S).group(1)
    body = source[source.index("static inline Vec<F> tanh("):]

    def number(pattern, text):
        return float(re.search(pattern, text).group(1).rstrip("f"))

    series = re.search(r"series\[\d+\] = \{(.*?)\}", block, re.S).group(1)
    return {
        "series": [float(c.strip().rstrip("f")) for c in series.split(",")],
        "ln2_hi": number(r"ln2_hi = ([-\d.e]+f)", block),
        "ln2_lo": number(r"ln2_lo = ([-\d.e]+f)", block),
        "round_shift": number(r"round_shift = ([\d.e]+f)", block),
        "exp_degree": int(number(r"exp_degree = (\d+)", block)),
        "log2_e": number(r"y \* F\(([\d.]+)\)", body),
        "series_below": number(r"ax < F\(([\d.]+)\)", body),
        "exp_above": number(r"y < F\((-[\d.]+)\)", body),
    }


def test_float32_tanh_has_the_native_kernels_constants():
    """numba's tanh32 is csrc/tanh.h's algorithm by hand: the same numbers, read from the header
    (each compared as the float32 both compute with)."""
    native = _native_float32_tanh_constants()
    ours = {"series": activations.TANH_SERIES_32, "ln2_hi": activations.LN2_HI_32,
            "ln2_lo": activations.LN2_LO_32, "round_shift": activations.ROUNDING_32,
            "exp_degree": activations.EXP_DEGREE_32, "log2_e": activations.LOG2_E_32,
            "series_below": activations.SERIES_BELOW_32, "exp_above": activations.EXP_ABOVE_32}
    for name, value in native.items():
        np.testing.assert_array_equal(np.float32(ours[name]), np.float32(value), err_msg=name)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_tanh_special_values(dtype):
    tiny = np.finfo(dtype).smallest_subnormal
    x = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 20.0, -20.0, np.finfo(dtype).max, -tiny],
                 dtype)
    out = np.empty_like(x)
    _tanh_all(x, out)
    np.testing.assert_array_equal(out[:4], [0.0, -0.0, 1.0, -1.0])
    assert np.signbit(out[1]) and not np.signbit(out[0])
    assert np.isnan(out[4])
    np.testing.assert_array_equal(out[5:8], [1.0, -1.0, 1.0])  # exact saturation
    assert out[8] == -tiny  # tanh(x) = x below roundoff, subnormals included


def _run_numba(problem, grad_output, lengths, threads):
    """(output, h_n, *grads) of the numba backend with set_num_threads(threads)."""
    with _threads.limited_to(threads):
        output, h_n = pyrnn.forward(**problem, lengths=lengths, backend="numba")
        grads = pyrnn.backward(grad_output, problem["x"], problem["weight_ih"],
                               problem["weight_hh"], output, problem["h0"], lengths=lengths,
                               backend="numba")
    return (output, h_n) + tuple(grads)


@pytest.fixture
def split_always(monkeypatch):
    """Split every time loop between threads, whatever its size; record which threads ran which
    columns: {loop name: [(thread index, first column, end column, OS thread id)]}."""
    monkeypatch.setattr(threads, "SPLIT_MIN_WORK", 1)
    calls = {}
    for name in ("forward_columns", "backward_columns"):
        loop = getattr(kernel, name)

        def recording(*arguments, loop=loop, name=name):
            # (..., thread, j0, j1) forward, (..., thread, k0, k1, i0, i1) backward
            thread, j0, j1 = arguments[-3:] if name == "forward_columns" else arguments[-5:-2]
            calls.setdefault(name, []).append((thread, j0, j1, threading.get_ident()))
            return loop(*arguments)

        monkeypatch.setattr(kernel, name, recording)
    return calls


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("with_lengths", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize("weight_ih_in_loop", [False, True], ids=["hoisted", "in_loop"])
@pytest.mark.parametrize("threads", [2, 3])
def test_threads_split_the_columns_and_agree_with_one_thread(
        split_always, monkeypatch, dtype, with_lengths, weight_ih_in_loop, threads):
    """Each thread runs the time loop over its own block-aligned columns, on a thread of its own
    (3 threads on 2 cores too: the barrier yields), with the products with weight_ih in the loop
    or over all rows at once. Results agree with one thread's within roundoff, bitwise for the
    forward pass when it computes the input term itself."""
    limit = 1 << 40 if weight_ih_in_loop else 0
    monkeypatch.setattr(kernel, "IN_LOOP_MAX_WEIGHT_IH_BYTES", limit)
    rng = np.random.default_rng(threads)
    T, B, I, H = 7, 5, 37, 200  # 1 and 4 panels of float32, 2 and 7 of float64, the last partial
    p = make_problem(rng, T, B, I, H, dtype)
    lengths = random_lengths(rng, T, B) if with_lengths else None
    grad_output = rng.standard_normal((T, B, H)).astype(dtype)
    one = _run_numba(p, grad_output, lengths, 1)
    split_always.clear()
    several = _run_numba(p, grad_output, lengths, threads)
    for name, calls in split_always.items():
        assert len({ident for *_, ident in calls}) == threads, name
        bounds = [j0 for _, j0, _, _ in sorted(calls)] + [H]  # each thread's columns j0:j1
        assert [j1 for _, _, j1, _ in sorted(calls)] == bounds[1:], name
        assert bounds[0] == 0
        panel = 256 // np.dtype(dtype).itemsize  # threads start at whole panels
        assert all(j0 % panel == 0 and j0 < j1 for j0, j1 in zip(bounds, bounds[1:])), name
    tolerance = 1e-13 if dtype == np.float64 else 1e-5
    for i, (a, b) in enumerate(zip(one, several)):
        if i < 2 and weight_ih_in_loop:  # forward: every element summed in the same order
            np.testing.assert_array_equal(a, b)
        else:  # BLAS on column slices may round otherwise; weight gradients summed in parts
            np.testing.assert_allclose(a, b, rtol=0, atol=tolerance * max(1, np.abs(a).max()))


@pytest.mark.parametrize("threads", [1, 2])
def test_nan_and_inf_raise_no_warning_on_any_thread(split_always, monkeypatch, threads):
    """The NumPy products (input term, grad_x, weight gradients) run on every thread, and
    np.errstate holds only for the thread that entered it: a worker thread's warning would be
    an error here (filterwarnings = error) re-raised on the caller."""
    monkeypatch.setattr(kernel, "IN_LOOP_MAX_WEIGHT_IH_BYTES", 0)  # products by BLAS
    rng = np.random.default_rng(6)
    p = make_problem(rng, 5, 4, 6, 64)
    p["x"][1, 2, :2] = np.inf, -np.inf  # inf - inf in the input term: an "invalid" warning
    p["weight_ih"][7, 1] = np.nan
    grad_output = rng.standard_normal((5, 4, 64))
    grad_output[3, 1, 5:7] = np.inf, -np.inf
    results = _run_numba(p, grad_output, None, threads)
    assert len({ident for *_, ident in split_always["forward_columns"]}) == threads
    output, h_n = pyrnn.forward(**p, backend="numpy")
    expected = (output, h_n) + tuple(pyrnn.backward(grad_output, p["x"], p["weight_ih"],
                                                    p["weight_hh"], output, p["h0"],
                                                    backend="numpy"))
    assert np.isnan(results[0]).any() and np.isnan(results[-1]).any()  # it did propagate
    for got, want in zip(results, expected):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12, equal_nan=True)


def test_threads_never_exceed_set_num_threads(split_always):
    rng = np.random.default_rng(3)
    p = make_problem(rng, 4, 6, 3, 100)
    grad_output = rng.standard_normal((4, 6, 100))
    for count in (1, 2):
        split_always.clear()
        _run_numba(p, grad_output, None, count)
        for calls in split_always.values():
            assert len({ident for *_, ident in calls}) == len(calls) == count


def test_small_steps_stay_on_one_thread():
    """Below _SPLIT_MIN_WORK multiply-adds per step, a second thread would only wait."""
    assert threads.thread_count(128, 16 * 128 * 192, 64) == 1  # small: 0.4M per step
    medium = threads.thread_count(256, 64 * 256 * 512, 64)  # 8.4M per step
    assert medium == min(2, pyrnn.get_num_threads())


def _blas_threads():
    from threadpoolctl import threadpool_info

    return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]


def test_blas_runs_on_one_thread_inside_split_calls_and_is_restored_after(split_always):
    """Inside a split call NumPy's BLAS is limited to the calling thread; leaving it restores
    set_num_threads' count, also when the call raised."""
    with _threads.limited_to(2):
        seen = threads.on_threads(2, lambda i: _blas_threads(), np.zeros(2, np.int64))
        assert all(counts and set(counts) == {1} for counts in seen)
        assert set(_blas_threads()) == {2}

        def failing(i):
            raise RuntimeError("task failed")

        with pytest.raises(RuntimeError, match="task failed"):
            threads.on_threads(2, failing, np.zeros(2, np.int64))
        assert set(_blas_threads()) == {2}
        rng = np.random.default_rng(4)
        p = make_problem(rng, 3, 5, 2, 64)  # 2 panels of float64 columns: one per thread
        _run_numba(p, rng.standard_normal((3, 5, 64)), None, 2)
        assert set(_blas_threads()) == {2}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_arrays_threads_write_start_at_a_cache_line(dtype):
    for shape in [(3, 5, 7), (1,), (2, 64, 256)]:  # (an empty array has nothing to share)
        array = threads.empty(shape, dtype, 2)
        assert array.shape == shape and array.dtype == dtype and array.flags.c_contiguous
        assert array.ctypes.data % 64 == 0


def test_an_error_on_a_worker_thread_is_raised_on_the_caller():
    def task(i):
        if i == 1:
            raise RuntimeError("worker failed")
        return i

    with pytest.raises(RuntimeError, match="worker failed"):
        threads.on_threads(2, task, np.zeros(2, np.int64))
    assert threads.on_threads(3, lambda i: i * i, np.zeros(3, np.int64)) == [0, 1, 4]


def test_a_thread_failing_before_its_time_loop_does_not_leave_the_others_waiting(
        split_always, monkeypatch):
    """The hoisted input term is a NumPy product on each thread; if one of them raises, the
    threads already in the time loop must not wait for that thread at the barrier forever."""
    monkeypatch.setattr(kernel, "IN_LOOP_MAX_WEIGHT_IH_BYTES", 0)  # the input term by BLAS
    rng = np.random.default_rng(5)
    p = make_problem(rng, 6, 5, 4, 64)  # 2 panels of float64 columns: one per thread
    matmul = np.matmul

    def failing_on_a_worker(*arguments, **keywords):
        if threading.current_thread() is not threading.main_thread():
            raise MemoryError("no memory for the input term")
        return matmul(*arguments, **keywords)

    with _threads.limited_to(2):
        monkeypatch.setattr(np, "matmul", failing_on_a_worker)
        with pytest.raises(MemoryError, match="input term"):
            pyrnn.forward(**p, backend="numba")
        monkeypatch.setattr(np, "matmul", matmul)
        _run_numba(p, rng.standard_normal((6, 5, 64)), None, 2)  # the workers are fine after it


def test_a_thread_failing_in_its_time_loop_does_not_leave_the_others_waiting(
        split_always, monkeypatch):
    """Each thread's compiled time loop allocates its packed weights; if that fails on one
    thread, the others, already at the barrier, must finish and the call raise."""
    rng = np.random.default_rng(7)
    p = make_problem(rng, 6, 5, 4, 64)
    loop = kernel.forward_columns

    def failing_on_a_worker(*arguments):
        if threading.current_thread() is not threading.main_thread():
            raise MemoryError("no memory for the packed weights")
        return loop(*arguments)

    with _threads.limited_to(2):
        monkeypatch.setattr(kernel, "forward_columns", failing_on_a_worker)
        with pytest.raises(MemoryError, match="packed weights"):
            pyrnn.forward(**p, backend="numba")


def test_a_forked_child_starts_its_own_workers(tmp_path):
    setup = """
import pyrnn
from pyrnn.numba import threads
threads.SPLIT_MIN_WORK = 1
pyrnn.set_num_threads(2)
rng = np.random.default_rng(0)
arguments = (rng.standard_normal((4, 5, 3)), rng.standard_normal((64, 3)),
             0.2 * rng.standard_normal((64, 64)))"""
    assert forked_child_agrees(setup, 'pyrnn.forward(*arguments, backend="numba")[0]', tmp_path)


def _run(code):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          timeout=600).stdout


def test_import_compiles_nothing():
    out = _run("import sys, pyrnn; print('numba' in sys.modules); "
               "from pyrnn.numba import kernel as k, products as p; "
               "steps = (k.forward_columns, k.backward_columns, p.matmul_columns); "
               "print(sum(len(f.signatures) for f in steps))")
    assert out.split() == ["False", "0"]


def test_second_process_loads_compiled_code_from_the_cache():
    code = ("import numpy as np, pyrnn; from pyrnn.numba import kernel as k; "
            "x = np.ones((3, 2, 4)); out, h = pyrnn.forward(x, np.ones((5, 4)), np.eye(5), backend='numba'); "
            "pyrnn.backward(out, x, np.ones((5, 4)), np.eye(5), out, backend='numba'); "
            "print(sum(f.stats.cache_misses[s] for f in (k.forward_columns, k.backward_columns) "
            "for s in f.stats.cache_misses))")
    _run(code)  # compiles, unless an earlier run did
    assert _run(code).split() == ["0"]

"""The fast native kernel (csrc/) against the NumPy reference, on the edges its blocking creates.

Tolerances are pyrnn.testing's (float64 1e-10, float32 8·sqrt(K)·eps32 relative to each result's
scale, against the float64 reference on the same inputs). Observed with the AVX-512 kernel:
float64 ~1e-14; float32 at most 0.11 of the bound. The kernel sums in another order than NumPy, with FMAs,
and its tanh is within 2 ulp (test_native_tanh.py); errors carried in h_{t-1} are damped at every
step by |weight_hh|·tanh' < 1 in these contracting problems, so they do not grow with T
(test_long_sequence_does_not_drift).
"""
import os
import subprocess
import sys

import numpy as np
import pytest

import pyrnn
from pyrnn import _threads, reference
from pyrnn.testing import RESULT_NAMES, accumulated_terms, relative_error, tolerance

# Skipped only where pyrnn was installed without it on purpose: test_backends.py fails otherwise.
_cpp = pytest.importorskip("pyrnn._cpp", reason=str(pyrnn.unavailable_backends().get("cpp")))


def make_problem(T, B, I, H, dtype, seed=0, lengths=None, nonlinearity="tanh"):
    """A contracting RNN (|weight_hh| < 1) with random data, as the clean arrays backends get."""
    rng = np.random.default_rng(seed)
    arrays = dict(
        x=rng.standard_normal((T, B, I)),
        weight_ih=rng.standard_normal((H, I)) / np.sqrt(max(I, 1)),
        weight_hh=0.9 * rng.standard_normal((H, H)) / np.sqrt(H),
        bias=0.1 * rng.standard_normal(H),
        h0=0.5 * rng.standard_normal((B, H)),
        grad_output=rng.standard_normal((T, B, H)),
        grad_h_n=rng.standard_normal((B, H)),
    )
    arrays = {k: np.ascontiguousarray(v, dtype=dtype) for k, v in arrays.items()}
    arrays["lengths"] = None if lengths is None else np.asarray(lengths, dtype=np.int64)
    arrays["nonlinearity"] = nonlinearity
    return arrays


def run(module, p, output=None):
    """{name: result} of one backend's forward and backward (the latter fed `output`, else its own)."""
    out, h_n = module.forward(p["x"], p["weight_ih"], p["weight_hh"], p["bias"], p["h0"], p["lengths"],
                              p["nonlinearity"])
    grads = module.backward(p["grad_output"], p["x"], p["weight_ih"], p["weight_hh"],
                            out if output is None else output, p["h0"], p["grad_h_n"], p["lengths"],
                            p["nonlinearity"])
    return dict(zip(RESULT_NAMES, (out, h_n) + tuple(grads)))


def as64(p):
    return {k: (v.astype(np.float64) if isinstance(v, np.ndarray) and v.dtype != np.int64 else v)
            for k, v in p.items()}


def assert_close_to_reference(p):
    """cpp on p against the float64 reference on the same values; the backward of both is fed the
    reference's output, so each gradient is checked on its own."""
    expected = run(reference, as64(p))
    got = run(_cpp, p, output=expected["output"].astype(p["x"].dtype))
    T, B, I = p["x"].shape
    terms_forward, terms_backward = accumulated_terms(T, B, I, p["weight_hh"].shape[0])
    for name in RESULT_NAMES:
        g, e = got[name], expected[name]
        assert g.dtype == p["x"].dtype and g.shape == e.shape, name
        tol = tolerance(g.dtype, terms_forward if name in ("output", "h_n") else terms_backward)
        err = relative_error(g, e)
        assert err <= tol, f"{name}: error {err:.2e} > {tol:.1e}; first values got {g.ravel()[:4]}, " \
                           f"expected {e.ravel()[:4]}"


# Sizes that do not divide the vector width (4/8/16 lanes), the NR = 2 vectors column panels or
# the MR = 6 or 12 row tiles.
ODD_SHAPES = [(1, 1, 1, 1), (5, 1, 3, 1), (3, 3, 17, 63), (4, 17, 65, 65), (2, 13, 1, 3),
              (3, 63, 5, 17), (2, 65, 300, 33), (3, 2, 7, 130), (2, 1, 257, 520), (0, 2, 3, 4),
              (3, 0, 3, 4)]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", ODD_SHAPES, ids=lambda s: "T{}B{}I{}H{}".format(*s))
def test_matches_reference_on_odd_shapes(shape, dtype):
    assert_close_to_reference(make_problem(*shape, dtype))


# Each side of every cache block of csrc/gemm.h (KC = 512 along k, MC = 8·MR = 96 (AVX-512) or
# 48 rows, NC = 1024 columns), in every product that blocks: the input product (M = T·B, K = I,
# N = H), grad_x (M = T·B, K = H, N = I) and the weight gradients (K = T·B, N = I or H); the
# recurrence's micro-kernel runs over K = H unblocked. Below, at and above each boundary.
BLOCK_SHAPES = [
    (2, 3, 511, 9), (2, 3, 512, 9), (2, 3, 513, 9), (1, 2, 1025, 5),   # K = I across KC, N = I across NC
    (2, 3, 5, 511), (2, 3, 5, 512), (2, 3, 5, 513),                    # K = H across KC
    (1, 2, 3, 1023), (1, 2, 3, 1024), (1, 2, 3, 1025),                 # N = H across NC
    (1, 47, 4, 9), (1, 48, 4, 9), (1, 95, 4, 9), (1, 96, 4, 9), (3, 65, 4, 9),  # M = T·B across MC
    (1, 511, 3, 5), (1, 512, 3, 5), (3, 171, 3, 5), (5, 205, 2, 3),    # K = T·B across KC (1025)
]


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("shape", BLOCK_SHAPES, ids=lambda s: "T{}B{}I{}H{}".format(*s))
def test_matches_reference_across_cache_blocks(shape, nonlinearity):
    assert_close_to_reference(make_problem(*shape, np.float64, nonlinearity=nonlinearity))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", [(4, 17, 65, 65), (3, 2, 7, 130)], ids=lambda s: "T{}B{}I{}H{}".format(*s))
def test_relu_matches_reference(shape, dtype):
    p = make_problem(*shape, dtype, lengths=[shape[0], 0] + [1] * (shape[1] - 2), nonlinearity="relu")
    assert_close_to_reference(p)


def test_relu_keeps_nan_and_passes_no_gradient_where_it_is_zero():
    """relu(NaN) = NaN as torch.relu; where h_t = 0 (a ≤ 0, the kink included) relu' = 0."""
    p = make_problem(1, 1, 1, 3, np.float64, nonlinearity="relu")
    p["x"][:] = np.nan
    assert np.isnan(run(_cpp, p)["output"]).all()
    # a = w - |w| for weight_ih = w: exactly 0 (the kink) where w > 0, negative elsewhere
    p["x"][:], p["h0"][:], p["bias"][:] = 1.0, 0.0, -np.abs(p["weight_ih"][:, 0])
    assert (p["weight_ih"] > 0).any() and (p["weight_ih"] < 0).any()
    got = run(_cpp, p)
    assert (got["output"] == 0).all()
    for name in ("grad_x", "grad_h0", "grad_weight_ih", "grad_weight_hh", "grad_bias"):
        assert (got[name] == 0).all(), name


def test_unknown_nonlinearity_is_a_value_error_naming_it():
    p = make_problem(2, 1, 3, 4, np.float32)
    with pytest.raises(ValueError, match="nonlinearity must be 'tanh' or 'relu', got 'sigmoid'"):
        _cpp.forward(p["x"], p["weight_ih"], p["weight_hh"], None, None, None, "sigmoid")
    with pytest.raises(ValueError, match="nonlinearity must be 'tanh' or 'relu', got None"):
        _cpp.backward(p["grad_output"], p["x"], p["weight_ih"], p["weight_hh"], p["grad_output"],
                      None, None, None, None)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_matches_reference_on_a_grid_shape(dtype):
    assert_close_to_reference(make_problem(20, 64, 256, 256, dtype))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_matches_reference_with_lengths(dtype):
    assert_close_to_reference(make_problem(6, 14, 5, 33, dtype, lengths=[6, 0, 3, 1, 6, 2, 5, 4, 6, 0, 1, 3, 2, 6]))


def test_nan_in_padding_does_not_leak():
    p = make_problem(5, 3, 4, 8, np.float64, lengths=[5, 2, 0])
    p["x"][2:, 1] = np.nan
    p["x"][:, 2] = np.inf
    p["grad_output"][2:, 1] = np.nan
    got = run(_cpp, p)
    assert all(np.isfinite(got[name]).all()
               for name in ("h_n", "grad_h0", "grad_weight_ih", "grad_weight_hh", "grad_bias"))
    assert np.isfinite(got["output"][:, :2][np.arange(5)[:, None] < [5, 2]]).all()


def test_scratch_kept_from_an_earlier_call_does_not_leak():
    """The kernel keeps its scratch memory between calls (csrc/scratch.h): a call must write
    every scratch element it reads, so NaN left there by a previous call cannot reach it."""
    for shape in [(6, 5, 7, 40), (30, 16, 64, 128)]:
        full = [shape[0]] * shape[1]
        poisoned = make_problem(*shape, np.float32, lengths=full)
        for name in ("x", "weight_ih", "weight_hh", "grad_output"):
            poisoned[name] = np.full_like(poisoned[name], np.nan)
        run(_cpp, poisoned)
        assert_close_to_reference(make_problem(*shape, np.float32, lengths=full))


def test_inputs_are_not_modified():
    p = make_problem(4, 5, 6, 7, np.float32, lengths=[4, 1, 0, 3, 2])
    before = {k: v.copy() for k, v in p.items() if isinstance(v, np.ndarray)}
    run(_cpp, p)
    for k, v in before.items():
        np.testing.assert_array_equal(p[k], v, err_msg=k)


def test_long_sequence_does_not_drift():
    """T = 10 000 in float32: the error stays at the level of a single step's."""
    assert_close_to_reference(make_problem(10_000, 2, 8, 16, np.float32, seed=1))


@pytest.fixture
def restore_threads():
    before = _cpp.get_num_threads()
    yield
    _cpp.set_num_threads(before)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("T, B, I, H, lengths", [
    # a step big enough (2·B·H² flops) for the kernel to share the steps between threads
    (7, 9, 70, 200, [7, 3, 7, 0, 5, 7, 1, 7, 6]),
    # shared at B = 2, where each thread visits its panels in alternate orders (rnn_kernel.cpp)
    (3, 2, 5, 1024, [3, 2]),
    # small steps (thread 0 runs them alone) but products over T·B rows big enough to share
    (80, 5, 33, 100, [80, 0, 41, 80, 79]),
], ids=["steps shared", "steps shared at B = 2", "products shared"])
def test_bitwise_identical_across_calls_and_thread_counts(dtype, T, B, I, H, lengths, restore_threads):
    p = make_problem(T, B, I, H, dtype, lengths=lengths)
    results = []
    for n in (1, 2, 3, 1, 2):
        _cpp.set_num_threads(n)
        results.append(run(_cpp, p))
    for other in results[1:]:
        for name in RESULT_NAMES:
            assert np.array_equal(results[0][name].view(np.uint8), other[name].view(np.uint8)), name
    assert_close_to_reference(p)  # on 2 threads, the last count set


def test_thread_budget(restore_threads):
    _cpp.set_num_threads(3)
    assert _cpp.get_num_threads() == 3
    assert "cpp" in pyrnn.available_backends()  # loaded, so pyrnn.set_num_threads reaches it
    with _threads.limited_to(1):
        assert _cpp.get_num_threads() == 1
    with pytest.raises(ValueError):
        _cpp.set_num_threads(0)


def test_bad_arrays_raise_instead_of_crashing():
    p = make_problem(3, 2, 4, 5, np.float32)
    with pytest.raises(TypeError):
        _cpp.forward(p["x"].astype(np.float64), p["weight_ih"], p["weight_hh"], p["bias"], p["h0"])
    with pytest.raises(ValueError, match="weight_ih"):
        _cpp.forward(p["x"], p["weight_ih"][:, :3].copy(), p["weight_hh"], p["bias"], p["h0"])
    with pytest.raises(ValueError, match="lengths"):
        _cpp.forward(p["x"], p["weight_ih"], p["weight_hh"], p["bias"], p["h0"], np.array([4, 0]))


# --- instruction sets ------------------------------------------------------------------------

def test_uses_the_best_instruction_set_unless_told_otherwise():
    assert _cpp.isa() in ("avx512amx", "avx512bf16", "avx512", "avx2", "baseline")
    if not os.environ.get("PYRNN_ISA"):
        if not os.path.exists("/proc/cpuinfo"):
            return
        with open("/proc/cpuinfo") as cpuinfo:
            flags = set(next(line for line in cpuinfo if line.startswith("flags")).split(":")[1].split())
        # every feature csrc/kernels.h requires of each ISA (its compiler flags in CMakeLists.txt)
        avx512 = {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx2", "fma"}
        if avx512 | {"avx512_bf16", "amx_tile", "amx_bf16"} <= flags:  # (and Linux allows AMX)
            assert _cpp.isa() == "avx512amx"
        elif avx512 | {"avx512_bf16"} <= flags:
            assert _cpp.isa() == "avx512bf16"
        elif avx512 <= flags:
            assert _cpp.isa() == "avx512"
        elif {"avx2", "fma"} <= flags:
            assert _cpp.isa() == "avx2"
        else:
            assert _cpp.isa() == "baseline"


ISAS = ["avx512amx", "avx512bf16", "avx512", "avx2", "baseline"]  # best first
LOWER_ISAS = ISAS[ISAS.index(_cpp.isa()) + 1:]


TESTS = os.path.dirname(os.path.abspath(__file__))


def run_python(args, isa):
    """python args with $PYRNN_ISA=isa, from tests/ so that the installed pyrnn is imported, and
    $PYRNN_BACKEND=cpp: backend-parametrised tests run on the native kernel only."""
    return subprocess.run([sys.executable] + args, env=dict(os.environ, PYRNN_ISA=isa, PYRNN_BACKEND="cpp"),
                          cwd=TESTS, capture_output=True, text=True)


@pytest.mark.parametrize("isa", LOWER_ISAS)
def test_lower_instruction_set_paths(isa):
    """The same checks (reference, tanh bound, determinism, bf16 against its reference, stacks) on
    the copy of the kernel for `isa` (below avx512bf16, bf16 products are emulated)."""
    result = run_python(["-m", "pytest", "-q", "-p", "no:cacheprovider", "-k",
                         "not lower_instruction_set and not best_instruction_set and not unknown_instruction_set",
                         "test_native_kernel.py", "test_native_tanh.py", "test_bf16.py", "test_native_stack.py"], isa)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert run_python(["-c", "from pyrnn import _cpp; print(_cpp.isa())"], isa).stdout.strip() == isa


def test_unknown_instruction_set_fails_the_import_with_a_reason():
    result = run_python(["-c", "import pyrnn._cpp"], "sse9")
    assert result.returncode != 0 and "PYRNN_ISA=sse9" in result.stderr

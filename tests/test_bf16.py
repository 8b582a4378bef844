"""precision="bf16" (docs/design.md §1): the rounding the reference defines it with, every
backend against the bf16 reference, and what bf16 costs against float64 (pyrnn/testing.py
states the bounds and why)."""
import os
import subprocess
import sys

import numpy as np
import pytest

import pyrnn
from problems import make_problem, random_lengths
from pyrnn import reference
from pyrnn.reference import round_to_bf16
from pyrnn.testing import (BF16_AGREEMENT, BF16_GRADIENT_ACCURACY, BF16_OUTPUT_ACCURACY, bf16_accuracy,
                           relative_error, tolerance)

try:
    from pyrnn import _cpp
except ImportError:  # installed without the native module: its tests skip
    _cpp = None

# Lower halves of a float32 that decide its rounding to bfloat16: exact, just above and below
# half a unit, the tie, the extremes, and a few others.
LOWER_HALVES = np.array([0x0000, 0x0001, 0x3FFF, 0x7FFF, 0x8000, 0x8001, 0xBFFF, 0xFFFF, 0x1234, 0xC3A5],
                        np.uint32)


def nearest_bf16_by_arithmetic(x):
    """The oracle: finite x (float32) rounded to the nearest bfloat16 by comparing distances in
    float64 (exact here) to the two bfloat16 neighbours, ties to the one with an even last bit;
    the value one unit above the largest finite bfloat16 is 2^128, which becomes inf as float32."""
    bits = x.view(np.uint32)
    upper = bits >> 16
    below = (upper << 16).view(np.float32).astype(np.float64)  # x with its lower half cleared
    exponent = ((upper >> 7) & 0xFF).astype(np.int64)
    unit = np.ldexp(1.0, np.maximum(exponent, 1) - 127 - 7)  # spacing of bfloat16s at |below|
    above = below + np.copysign(unit, below)
    value = x.astype(np.float64)
    down, up = np.abs(value - below), np.abs(above - value)
    nearest = np.where((down < up) | ((down == up) & (upper % 2 == 0)), below, above)
    with np.errstate(over="ignore"):  # 2^128 -> inf is the point
        return nearest.astype(np.float32)


def test_round_to_bf16_on_every_bfloat16_and_every_kind_of_remainder():
    """All 2^16 sign/exponent/mantissa patterns of a bfloat16, each with every lower half in
    LOWER_HALVES: normal, subnormal, zero, the largest finite values (which round up to inf),
    inf and NaN."""
    upper = np.arange(1 << 16, dtype=np.uint32)
    x = ((upper[:, None] << 16) | LOWER_HALVES[None, :]).ravel().view(np.float32)
    rounded = round_to_bf16(x)
    assert rounded.dtype == np.float32 and rounded.shape == x.shape
    assert not (rounded.view(np.uint32) & 0xFFFF).any(), "every result is a bfloat16"
    nan = np.isnan(x)
    assert np.array_equal(np.isnan(rounded), nan), "NaN stays NaN, nothing else becomes NaN"
    assert np.array_equal(np.signbit(rounded[nan]), np.signbit(x[nan]))
    infinite = np.isinf(x)
    assert np.array_equal(rounded[infinite], x[infinite])
    finite = ~nan & ~infinite
    expected = nearest_bf16_by_arithmetic(x[finite])
    assert np.array_equal(rounded[finite].view(np.uint32), expected.view(np.uint32))


def test_round_to_bf16_examples():
    x = np.array([1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-8 + 2**-20, -(1 + 2**-9), 3.4e38, np.inf, -0.0],
                 np.float32)
    expected = np.array([1, 1 + 2**-6, 1 + 2**-7, -1, np.inf, np.inf, -0.0], np.float32)
    assert np.array_equal(round_to_bf16(x).view(np.uint32), expected.view(np.uint32))


def test_round_to_bf16_keeps_shape_and_leaves_its_input_alone():
    x = np.linspace(-3, 3, 24, dtype=np.float32).reshape(2, 3, 4)[:, ::2]  # not contiguous
    before = x.copy()
    rounded = round_to_bf16(x)
    assert rounded.shape == x.shape and np.array_equal(x, before)
    assert np.array_equal(rounded, round_to_bf16(np.ascontiguousarray(x)))


# --- the backends against the bf16 reference ---------------------------------------------------

RESULTS = ("output", "h_n", "grad_x", "grad_h0", "grad_weight_ih", "grad_weight_hh", "grad_bias")


def float32_problem(rng, T, B, I, H):
    """A problem's inputs, grad_output and grad_h_n in float32, as torch.nn.RNN initialises."""
    p = make_problem(rng, T, B, I, H, np.float32)
    p["grad_output"] = rng.standard_normal((T, B, H)).astype(np.float32)
    p["grad_h_n"] = rng.standard_normal((B, H)).astype(np.float32)
    return p


def run(p, backend, precision="bf16", lengths=None, nonlinearity="tanh", **options):
    """{name: result} of pyrnn.forward then pyrnn.backward on problem p."""
    output, h_n = pyrnn.forward(p["x"], p["weight_ih"], p["weight_hh"], p["bias"], p["h0"],
                                lengths=lengths, backend=backend, nonlinearity=nonlinearity,
                                precision=precision, **options)
    grads = pyrnn.backward(p["grad_output"], p["x"], p["weight_ih"], p["weight_hh"], output, p["h0"],
                           grad_h_n=p["grad_h_n"], lengths=lengths, backend=backend,
                           nonlinearity=nonlinearity, precision=precision, **options)
    return dict(zip(RESULTS, (output, h_n) + tuple(grads)))


def assert_close(actual, expected, bound, label):
    for name in RESULTS:
        assert actual[name].dtype == np.float32, (label, name)
        error = relative_error(actual[name], expected[name])
        assert error <= bound, f"{label}: {name} off by {error:.2e} > {bound:.2e}"


@pytest.mark.parametrize("T, B, I, H", [(1, 1, 1, 1), (7, 3, 5, 9), (4, 13, 33, 40), (6, 12, 64, 96),
                                        (3, 2, 1, 65), (2, 17, 130, 3), (4, 64, 96, 128), (3, 32, 64, 64),
                                        (2, 48, 33, 64), (37, 15, 70, 80)])
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("with_lengths", [False, True])
def test_bf16_matches_the_bf16_reference(backend, T, B, I, H, nonlinearity, with_lengths):
    """Within BF16_AGREEMENT (pyrnn/testing.py says why): the same operands rounded the same
    way, summed in float32 in the backend's own order. Odd sizes: the k-pairs' last half; 16, 32,
    48 and 64 rows with K a multiple of 32: AMX tiles where the CPU has them; T·B = 555: the
    weight gradients' packed grad_aᵀ over two k blocks (gemm.h: KC), the last one odd."""
    rng = np.random.default_rng(T * 1000 + H)
    p = float32_problem(rng, T, B, I, H)
    lengths = random_lengths(rng, T, B) if with_lengths else None
    expected = run(p, "numpy", lengths=lengths, nonlinearity=nonlinearity)
    assert_close(run(p, backend, lengths=lengths, nonlinearity=nonlinearity), expected, BF16_AGREEMENT,
                 f"{backend} {(T, B, I, H)}")


def test_bf16_batch_first_and_non_contiguous_inputs(backend):
    rng = np.random.default_rng(5)
    p = float32_problem(rng, 5, 3, 8, 16)
    expected = run(p, "numpy")
    q = dict(p, x=np.ascontiguousarray(p["x"].swapaxes(0, 1)),
             grad_output=np.ascontiguousarray(p["grad_output"].swapaxes(0, 1)),
             weight_hh=np.asfortranarray(p["weight_hh"]))
    got = run(q, backend, batch_first=True)
    for name in ("output", "grad_x"):
        got[name] = got[name].swapaxes(0, 1)
    assert_close(got, expected, BF16_AGREEMENT, backend)


@pytest.mark.parametrize("B, I, H", [(1, 1, 1), (5, 7, 9), (16, 64, 96), (32, 96, 64), (64, 32, 160)])
def test_bf16_first_step_is_exactly_the_reference_rounding(backend, B, I, H):
    """At T = 1 every rounded operand of the forward is an input (x, weight_ih, h0, weight_hh),
    so a backend and the reference round exactly the same values and differ only by float32
    summation: the float32 tolerance, far below anything a wrong or missing rounding moves."""
    rng = np.random.default_rng(B + I + H)
    p = float32_problem(rng, 1, B, I, H)
    bound = tolerance(np.float32, I + H + 1)
    output, h_n = pyrnn.forward(p["x"], p["weight_ih"], p["weight_hh"], p["bias"], p["h0"],
                                backend=backend, precision="bf16")
    expected, _ = reference.forward(p["x"], p["weight_ih"], p["weight_hh"], p["bias"], p["h0"], None,
                                    "tanh", "bf16")
    assert relative_error(output, expected) <= bound
    # ... and leaving one operand (here h0) unrounded would be seen many times over
    rounded = {name: round_to_bf16(p[name]) for name in ("x", "weight_ih", "weight_hh")}
    unrounded_h0, _ = reference.forward(rounded["x"], rounded["weight_ih"], rounded["weight_hh"],
                                        p["bias"], p["h0"], None, "tanh", "fp32")
    if H * B > 1:
        assert relative_error(unrounded_h0, expected) > 10 * bound


def test_bf16_is_not_float32(backend):
    """bf16 is really used: its results differ from float32 math on the same inputs by about
    bf16's roundoff, 2^-8, far more than float32 backends differ among themselves."""
    p = float32_problem(np.random.default_rng(2), 10, 4, 32, 48)
    bf16, fp32 = run(p, backend), run(p, backend, precision="fp32")
    for name in RESULTS:
        assert relative_error(bf16[name], fp32[name]) > 2**-12, name


def test_bf16_accuracy_against_float64():
    """What bf16 costs against exact float64 math on the same float32 inputs (a shape between
    small and medium, torch's initialisation, O(1) data): output within BF16_OUTPUT_ACCURACY
    absolute, every gradient within BF16_GRADIENT_ACCURACY of its own largest magnitude. The
    reference defines bf16, so this is every backend's accuracy (they agree with it far closer)."""
    p = float32_problem(np.random.default_rng(3), 50, 16, 128, 128)
    got = run(p, "numpy")
    exact = run({name: a.astype(np.float64) for name, a in p.items()}, "numpy", precision="fp32")
    for name in RESULTS:
        error, bound = bf16_accuracy(name, got[name], exact[name])
        assert error <= bound, (name, error)
    assert bf16_accuracy("output", got["output"], exact["output"])[1] == BF16_OUTPUT_ACCURACY == 2e-2
    assert bf16_accuracy("grad_x", got["grad_x"], exact["grad_x"])[1] == BF16_GRADIENT_ACCURACY == 5e-2


def test_bf16_needs_float32(backend):
    p = make_problem(np.random.default_rng(4), 3, 2, 4, 5, np.float64)
    with pytest.raises(TypeError, match="precision='bf16' needs float32"):
        pyrnn.forward(p["x"], p["weight_ih"], p["weight_hh"], backend=backend, precision="bf16")
    output = np.zeros((3, 2, 5))
    with pytest.raises(TypeError, match="precision='bf16' needs float32"):
        pyrnn.backward(output, p["x"], p["weight_ih"], p["weight_hh"], output, backend=backend,
                       precision="bf16")
    for bad in ("fp16", "BF16", None, 16):
        with pytest.raises(ValueError, match="precision must be one of 'fp32', 'bf16'"):
            pyrnn.forward(p["x"], p["weight_ih"], p["weight_hh"], backend=backend, precision=bad)


def test_rnn_layer_takes_precision():
    rnn = pyrnn.RNN(8, 16, num_layers=2, precision="bf16", seed=0, backend="numpy")
    x = np.random.default_rng(0).standard_normal((5, 3, 8)).astype(np.float32)
    output, _ = rnn(x)
    fp32 = pyrnn.RNN(8, 16, num_layers=2, seed=0, backend="numpy")
    assert 2**-12 < relative_error(output, fp32(x)[0]) < BF16_OUTPUT_ACCURACY
    assert "precision='bf16'" in repr(rnn)
    with pytest.raises(TypeError, match="needs float32"):
        pyrnn.RNN(8, 16, dtype=np.float64, precision="bf16")


# --- the native kernel's bf16 paths --------------------------------------------------------------

needs_cpp = pytest.mark.skipif(_cpp is None, reason="the native module is not built")


@needs_cpp
def test_cpp_bf16_is_bitwise_identical_across_thread_counts():
    """Shape large enough that the recurrence is shared between threads (rnn_kernel.cpp)."""
    p = float32_problem(np.random.default_rng(6), 4, 32, 40, 200)
    results = []
    try:
        for n in (1, 2, 3):
            pyrnn.set_num_threads(n)
            results.append(run(p, "cpp"))
    finally:
        pyrnn.set_num_threads(os.cpu_count() or 1)
    for other in results[1:]:
        for name in RESULTS:
            assert np.array_equal(other[name], results[0][name]), name


@needs_cpp
@pytest.mark.skipif(_cpp is None or _cpp.isa() not in ("avx512bf16", "avx512amx"),
                    reason="needs a CPU with AVX512-BF16 (the native vdpbf16ps path)")
def test_native_and_emulated_bf16_agree(tmp_path):
    """$PYRNN_ISA=avx512 runs the same bf16 products emulated (two FMAs per k-pair instead of
    vdpbf16ps or AMX tiles): the same operands, summed in another order. A single step, so that
    no operand made by the time loop can round differently (pyrnn/testing.py): float32 roundoff
    apart."""
    problem = "t.float32_problem(np.random.default_rng(7), 1, 32, 64, 96)"
    out = tmp_path / "emulated.npz"
    tests = os.path.dirname(os.path.abspath(__file__))
    script = f"import numpy as np, test_bf16 as t; np.savez({str(out)!r}, **t.run({problem}, 'cpp'))"
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tests, timeout=300,
                   env=dict(os.environ, PYRNN_ISA="avx512", PYTHONPATH=tests))
    emulated = dict(np.load(out))
    native = run(float32_problem(np.random.default_rng(7), 1, 32, 64, 96), "cpp")
    for name in ("output", "h_n"):  # the backward's dL/da is made by the step: rounded apart, rarely
        assert relative_error(native[name], emulated[name]) <= tolerance(np.float32, 64 + 96 + 1), name
    assert_close(native, emulated, BF16_AGREEMENT, "native against emulated")


@needs_cpp
def test_bf16_products_run_after_the_peak_loop_released_the_tiles():
    """The bf16 peak loop (AMX) releases its tiles on the pool's threads; bf16 products there
    afterwards must still run (each loads its tile configuration). In a child process: an
    illegal instruction would end it, not this test run."""
    tests = os.path.dirname(os.path.abspath(__file__))
    script = ("import numpy as np, pyrnn, test_bf16 as t; pyrnn.set_num_threads(2); "
              "pyrnn._cpp.peak_loop('bf16', 2, 10); p = t.float32_problem(np.random.default_rng(8), 3, 32, 64, 256); "
              "t.run(p, 'cpp'); print('ok')")
    result = subprocess.run([sys.executable, "-c", script], cwd=tests, capture_output=True, text=True,
                            timeout=300, env=dict(os.environ, PYTHONPATH=tests))
    assert result.returncode == 0 and result.stdout.split() == ["ok"], result.stderr[-2000:]

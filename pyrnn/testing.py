"""How closely a backend must agree with the reference; shared by the tests and `pyrnn bench`.

float64: every backend computes the reference's sums in another order, which moves a result by
a few units of roundoff (~1e-16 relative); 1e-10 relative to the tensor's scale leaves room for
long sums and still catches any real mistake, which shows at 1e-3 or worse.

float32: a float32 backend is compared with the float64 reference on the same inputs. Each
element is a sum of K rounded products (K = I + H + 1 per forward step; backward adds the sums
over T·B rows), and rounding errors of a sum grow like sqrt(K)·eps for random data. With
eps32 = 1.2e-7 we allow 8·sqrt(K)·eps32 relative to the tensor's scale: 1.3e-5 for the
(100, 16, 64, 128) shape, where the float32 NumPy reference itself is off by at most 1.3e-6.
tanh' ≤ 1 and torch's initialisation keep older steps' errors from growing through time.

The scale is max(1, max|reference|): rounding errors are relative to the size of the terms
summed, not of the sum, which can cancel to almost nothing (a gradient of size 1e-3 made of O(1)
terms). With O(1) data, as in the tests and the benchmarks, 1 is the size of the terms.
"""
import numpy as np

FLOAT64_TOLERANCE = 1e-10

# The seven results of one forward and backward, by the names the tests and `pyrnn bench` report.
RESULT_NAMES = ("output", "h_n", "grad_x", "grad_h0", "grad_weight_ih", "grad_weight_hh", "grad_bias")

# The accuracy of the compiled backends' vectorised tanh (csrc/tanh.h, pyrnn/numba/activations.py),
# in units in the last place: float32 against the correctly rounded tanh, float64 against
# NumPy's (glibc's, itself within 1 ulp). Stated here only, asserted over dense sweeps of inputs
# by tests/test_native_tanh.py and tests/test_numba_kernel.py. Measured: float32 2 ulp for both;
# float64 3 ulp native, 7 numba (its expm1 doublings round 8 times).
TANH_MAX_ULP = {np.dtype(np.float32): 2, np.dtype(np.float64): 8}


def make_problem(rng, T, B, I, H, dtype=np.float64, bias=True, h0=True, gradients=False):
    """Random inputs of pyrnn.forward (x, weight_ih, weight_hh, bias, h0; None for an absent bias or
    h0) drawn as torch.nn.RNN initialises its weights, uniform in ±1/sqrt(H), with O(1) data and
    state, so that tanh neither saturates nor stays linear; with gradients, also the grad_output
    and grad_h_n of a backward. Shared by the tests and `pyrnn bench`."""
    bound = 1 / np.sqrt(H)

    def uniform(*shape):
        return rng.uniform(-bound, bound, size=shape).astype(dtype)

    problem = dict(
        x=rng.standard_normal((T, B, I)).astype(dtype),
        weight_ih=uniform(H, I),
        weight_hh=uniform(H, H),
        bias=uniform(H) if bias else None,
        h0=rng.standard_normal((B, H)).astype(dtype) if h0 else None,
    )
    if gradients:
        problem.update(grad_output=rng.standard_normal((T, B, H)).astype(dtype),
                       grad_h_n=rng.standard_normal((B, H)).astype(dtype))
    return problem


def tolerance(dtype, accumulated):
    """Largest acceptable max|actual - reference| / max|reference| for sums of `accumulated` terms."""
    if np.dtype(dtype) == np.float64:
        return FLOAT64_TOLERANCE
    return 8 * np.sqrt(max(accumulated, 1)) * np.finfo(np.float32).eps


# Precision "bf16" (docs/design.md §1), in two kinds of comparison.
#
# A fast backend against the bf16 reference: both round exactly the same operands with the same
# rounding (round to nearest even, in integer arithmetic), so they differ only where the sums
# differ: float32 in the backend's order against the reference's near-exact float64, within the
# float32 tolerance above. Where no rounded operand depends on an earlier sum (the forward's
# first step: x, weight_ih, h0, weight_hh are inputs) that is the whole difference, and the tests
# hold the backends to it. Later, an operand made by the time loop (h_{t-1}, dL/da) is rounded
# from a sum that the backend and the reference got a few float32 units apart; where that straddles
# a bf16 rounding boundary (about once in 10^5 roundings) the two round it to neighbouring
# bf16s, one bf16 unit (2u relative, u = 2^-8 the unit roundoff of bf16) apart, and every later
# sum it enters moves by ~2u·|weight|. Such flips are as likely in the reference with float32 sums
# (measured: up to 2e-3 apart from itself with float64 sums), so whole sequences agree within
# BF16_AGREEMENT = u, relative to the scale as above.
#
# bf16 against exact float64 math on the same float32 inputs (what a user gives up): issue 14's
# bounds, output within 2e-2 absolute, every gradient within 5e-2 of its own largest magnitude.
BF16_UNIT_ROUNDOFF = 2.0**-8
BF16_AGREEMENT = BF16_UNIT_ROUNDOFF
BF16_OUTPUT_ACCURACY = 2e-2  # absolute, output and h_n
BF16_GRADIENT_ACCURACY = 5e-2  # relative to the gradient's largest magnitude


def bf16_accuracy(name, actual, expected):
    """(error, bound) of a bf16 result `name` against exact float64 math on the same inputs:
    the largest absolute difference for "output" and "h_n", relative to the gradient's largest
    magnitude for the gradients (NaN where they disagree on NaN is infinitely wrong)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    if not np.array_equal(np.isnan(actual), np.isnan(expected)):
        return float("inf"), BF16_OUTPUT_ACCURACY
    finite = ~np.isnan(expected)
    error = float(np.abs(actual[finite] - expected[finite]).max(initial=0.0))
    if name in ("output", "h_n"):
        return error, BF16_OUTPUT_ACCURACY
    largest = float(np.abs(expected[finite]).max(initial=0.0))
    return (error / largest if largest > 0 else error), BF16_GRADIENT_ACCURACY


def relative_error(actual, expected):
    """max|actual - expected| / max(1, max|expected|); NaN where they disagree on NaN."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    if actual.shape != expected.shape:
        raise ValueError(f"shapes differ: {actual.shape} vs {expected.shape}")
    if actual.size == 0:
        return 0.0
    if not np.array_equal(np.isnan(actual), np.isnan(expected)):
        return float("nan")
    finite = ~np.isnan(expected)
    difference = np.abs(actual[finite] - expected[finite])
    scale = np.abs(expected[finite]).max(initial=1.0)
    return float(difference.max(initial=0.0) / scale)


def accumulated_terms(T, B, I, H):
    """(forward, backward): the longest sums that enter the outputs and the gradients."""
    return I + H + 1, T * B + I + H

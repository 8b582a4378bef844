"""The nonlinearity φ of h_t = φ(a_t) as a policy the compiled time loops take (docs/design.md
§1): ``apply(activation, a)`` in the forward step, ``gradient(activation, grad_h, h)`` (dL/da from
dL/dh and the saved output h) in the backward one, ``activation`` being one of the codes in
NONLINEARITIES. Adding one: its two functions, a code, and a case in apply and gradient.

The code is an argument of the compiled loops, not a compile-time constant: one compiled loop
serves every activation, so the first call compiles as long as with tanh alone (a loop per
activation, chosen once per call, doubled the forward's ~4 s; a constant that comes from Python
makes numba recompile on every call, and loops taking a compiled function as an argument
cannot be cached on disk).

tanh is plain arithmetic that LLVM vectorises, in the argument's own precision (tanh32,
tanh64); numba's ``np.tanh`` is one libm call per element (16 ns each here), which would cost
more than the products themselves at small H. Its accuracy is stated once, in
pyrnn/testing.py (TANH_MAX_ULP), for this tanh and the native one.
"""
import math

import numpy as np
from numba import njit, types
from numba.extending import overload
from numba.np.numpy_support import as_dtype

from .intrinsics import times_power_of_two

TANH, RELU = 0, 1
NONLINEARITIES = {"tanh": TANH, "relu": RELU}  # pyrnn.forward's nonlinearity -> code


def _compiled_only(name):
    def stub(*arguments):
        """For compiled code only: numba compiles the overload for the arguments' types."""
        raise NotImplementedError(f"pyrnn.numba.activations.{name} is for compiled code")
    stub.__name__ = stub.__qualname__ = name
    return stub


def _zero_and_one(numba_type):  # in the argument's own precision (an int would promote float32)
    dtype = as_dtype(numba_type)
    return dtype.type(0), dtype.type(1)


# float64: tanh(x) = u / (u + 2) with u = expm1(2|x|), sign restored. expm1 of a small argument
# is its Taylor series; expm1(2z) = expm1(z)·(expm1(z) + 2) then doubles the argument back
# exactly (no cancellation: every term is positive). With 2|x| ≤ 40 split 256 ways, z ≤ 0.16 and
# the series to z¹¹ is exact to 1e-17. Straight-line arithmetic, so LLVM vectorises it.
_DOUBLINGS = 8
_SATURATION = 20.0  # tanh(20) rounds to 1 in float64 (1 - tanh(20) = 8e-18)
_LINEAR_BELOW = 1e-9
_EXPM1_TAYLOR = tuple(1.0 / math.factorial(n) for n in range(11, 0, -1))  # 1/11!, ..., 1/1!


@njit(error_model="numpy", inline="always")
def tanh64(x):
    """tanh of a float64; NaN in, NaN out; ±inf -> ±1; -0.0 -> -0.0."""
    ax = abs(x)
    z = (ax if ax < _SATURATION else _SATURATION) * (2.0 / 2.0**_DOUBLINGS)
    u = 0.0
    for c in _EXPM1_TAYLOR:
        u = (u + c) * z  # Horner: ends as z·(1 + z·(1/2 + z·(1/6 + ...)))
    for _ in range(_DOUBLINGS):
        u = u * (u + 2.0)
    t = math.copysign(u / (u + 2.0), x)
    # Below 1e-9, tanh(x) = x - x³/3 rounds to x, and x itself stays exact down to subnormals
    # (where x / 128 above would lose bits); NaN passes through as itself.
    return t if ax >= _LINEAR_BELOW else x


# float32, in float32 arithmetic, with the native kernel's algorithm and constants (csrc/tanh.h;
# tests/test_numba_kernel.py checks they are the same numbers): 16 lanes a vector instead of 8, and
# half the operations of tanh64 (the forward time loop, min of 7: tiny 8.8 us instead of 14.3
# with tanh64, small 0.54 ms instead of 0.69).
#   |x| <  0.35: x + x³·P(x²), the Taylor series to x¹³ (remainder < 6e-10 relative);
#   |x| >= 0.35: (1 - e) / (1 + e) with e = exp(-2|x|) = 2^n·exp(r), n = round(-2|x| / ln 2),
#                r = -2|x| - n·ln 2 (ln 2 in two parts, |r| ≤ 0.347), exp(r) to r⁷.
_F32 = np.float32
TANH_SERIES_32 = tuple(_F32(c) for c in (-3.33333333e-1, 1.33333333e-1, -5.39682540e-2,
                                         2.18694885e-2, -8.86323553e-3, 3.59212804e-3))
EXP_DEGREE_32 = 7
_TANH_HORNER_32 = TANH_SERIES_32[::-1]  # highest power first
_EXP_TAYLOR_32 = tuple(_F32(1.0 / math.factorial(n)) for n in range(EXP_DEGREE_32, -1, -1))
LN2_HI_32, LN2_LO_32, LOG2_E_32 = _F32(0.693359375), _F32(-2.12194440e-4), _F32(1.44269504)
ROUNDING_32 = _F32(1.5 * 2**23)  # x + 1.5·2^23 - 1.5·2^23 is x rounded to an integer
SERIES_BELOW_32, EXP_ABOVE_32 = _F32(0.35), _F32(-80)
_LINEAR_BELOW_32 = _F32(1e-4)
_ONE_32, _TWO_32 = _F32(1), _F32(2)


@njit(error_model="numpy", inline="always")
def tanh32(x):
    """tanh of a float32; NaN in, NaN out; ±inf -> ±1; -0.0 -> -0.0."""
    ax = abs(x)
    x2 = ax * ax
    p = _F32(0)
    for c in _TANH_HORNER_32:
        p = p * x2 + c
    series = ax + ax * (x2 * p)
    y = -_TWO_32 * ax
    y = y if y > EXP_ABOVE_32 else EXP_ABOVE_32  # keeps 2^n normal; tanh is 1 long before
    n = (y * LOG2_E_32 + ROUNDING_32) - ROUNDING_32
    r = (y - n * LN2_HI_32) - n * LN2_LO_32
    e = _F32(0)
    for c in _EXP_TAYLOR_32:
        e = e * r + c
    e = times_power_of_two(e, n)
    t = series if ax < SERIES_BELOW_32 else (_ONE_32 - e) / (_ONE_32 + e)
    t = t if x >= 0 else -t
    # Below 1e-4, tanh(x) = x - x³/3 rounds to x; x also keeps -0.0 and NaN as they are.
    return t if ax >= _LINEAR_BELOW_32 else x


tanh = _compiled_only("tanh")


@overload(tanh)
def _tanh_of_type(x):
    """tanh in x's own precision (tanh32, tanh64), vectorisable."""
    return (lambda x: tanh32(x)) if x == types.float32 else (lambda x: tanh64(np.float64(x)))


tanh_gradient = _compiled_only("tanh_gradient")


@overload(tanh_gradient)
def _tanh_gradient_of_type(grad_h, h):
    _, one = _zero_and_one(h)
    return lambda grad_h, h: grad_h * (one - h * h)  # tanh' = 1 - h_t²


relu = _compiled_only("relu")


@overload(relu)
def _relu_of_type(a):
    zero, _ = _zero_and_one(a)
    return lambda a: zero if a < zero else a  # max(a, 0); NaN stays NaN (NaN < 0 is false)


relu_gradient = _compiled_only("relu_gradient")


@overload(relu_gradient)
def _relu_gradient_of_type(grad_h, h):
    zero, _ = _zero_and_one(h)
    # grad_h where h_t > 0, else 0 (0 at the kink): a select, as torch's threshold_backward, not
    # grad_h · [h_t > 0], which is NaN for an inf or NaN grad_h where relu cut h_t off
    return lambda grad_h, h: zero if h <= zero else grad_h


@njit(inline="always")
def apply(activation, a):
    """φ(a) for the activation code `activation` (a loop invariant: LLVM takes the branch out
    of the loop or selects per lane; the tanh loops measured as fast as without it)."""
    if activation == RELU:
        return relu(a)
    return tanh(a)


@njit(inline="always")
def gradient(activation, grad_h, h):
    """dL/da = dL/dh · φ'(a), written with the output h = φ(a), for the activation code `activation`."""
    if activation == RELU:
        return relu_gradient(grad_h, h)
    return tanh_gradient(grad_h, h)

"""Accuracy of the native kernel's vectorised tanh (csrc/tanh.h), on the instruction set in use.

The stated bound: float32 within 2 ulp of the correctly rounded tanh (measured: 2, i.e. < 2.4 ulp
from the exact value), over a dense sweep of float32 inputs; float64 within 1e-15 relative.
tests/test_native_kernel.py reruns this file under every lower instruction set.
"""
import numpy as np
import pytest

import pyrnn

# Skipped only where pyrnn was installed without it on purpose: test_backends.py fails otherwise.
_cpp = pytest.importorskip("pyrnn._cpp", reason=str(pyrnn.unavailable_backends().get("cpp")))

FLOAT32_MAX_ULP = 2


def float32_sweep(stride):
    """Every `stride`-th float32 in [0, 12] (past 9.01 tanh rounds to 1), as bit patterns go."""
    top = np.float32(12).view(np.int32)
    return np.arange(0, top, stride, dtype=np.int32).view(np.float32)


def ulp_distance(a, b):
    """|a - b| in units in the last place, for float32 arrays of one sign."""
    return np.abs(a.view(np.int32).astype(np.int64) - b.view(np.int32).astype(np.int64))


def test_float32_within_stated_ulp_of_correctly_rounded():
    x = float32_sweep(stride=37)  # ~29 million inputs, every binade down to the subnormals
    correctly_rounded = np.tanh(x.astype(np.float64)).astype(np.float32)
    got = _cpp.tanh(x)
    dist = ulp_distance(got, correctly_rounded)
    worst = int(dist.argmax())
    assert dist.max() <= FLOAT32_MAX_ULP, (
        f"tanh({x[worst]!r}) = {got[worst]!r}, correctly rounded {correctly_rounded[worst]!r}: "
        f"{dist.max()} ulp")


def test_float32_is_odd_bitwise():
    x = float32_sweep(stride=1009)
    assert np.array_equal(_cpp.tanh(-x).view(np.int32), (-_cpp.tanh(x)).view(np.int32))


def test_float64_relative_error():
    x = np.concatenate([np.linspace(-25, 25, 1_000_001), np.geomspace(1e-300, 30, 100_000)])
    expected = np.tanh(x)  # glibc's tanh: within 1 ulp
    rel = np.abs(_cpp.tanh(x) - expected) / np.maximum(np.abs(expected), np.finfo(np.float64).tiny)
    assert rel.max() <= 1e-15


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_special_values(dtype):
    x = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e3, -1e3, 20.0, -20.0], dtype)
    y = _cpp.tanh(x)
    assert np.isnan(y[0])
    assert y[1:].tolist() == [1, -1, 0, 0, 1, -1, 1, -1]  # saturation is exact
    assert np.signbit(y[4]) and not np.signbit(y[3])  # tanh(-0.0) = -0.0, like np.tanh


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_tiny_inputs_are_returned_unchanged(dtype):
    tiny = np.finfo(dtype).tiny
    x = np.array([tiny, -tiny, tiny / 8, 1e-20, -1e-20], dtype)  # tanh(x) = x to working precision
    np.testing.assert_array_equal(_cpp.tanh(x), x)


@pytest.mark.parametrize("n", [0, 1, 3, 15, 16, 17, 63, 65])
def test_any_length_and_no_input_modification(n):
    x = np.linspace(-4, 4, n, dtype=np.float32)
    before = x.copy()
    y = _cpp.tanh(x)
    np.testing.assert_array_equal(x, before)
    assert ulp_distance(np.abs(y), np.abs(np.tanh(x.astype(np.float64)).astype(np.float32))).max(initial=0) <= FLOAT32_MAX_ULP

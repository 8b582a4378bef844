"""Accuracy of the native kernel's vectorised tanh (csrc/tanh.h), on the instruction set in use.

The bound is pyrnn.testing.TANH_MAX_ULP (float32: 2 ulp of the correctly rounded tanh, over a
dense sweep of float32 inputs; float64: 8 ulp of NumPy's, measured 3).
tests/test_native_kernel.py reruns this file under every lower instruction set.
"""
import numpy as np
import pytest

import pyrnn
from pyrnn.testing import TANH_MAX_ULP

from tanh_accuracy import assert_within_stated_bound, float32_sweep, ulp_distance

# Skipped only where pyrnn was installed without it on purpose: test_backends.py fails otherwise.
_cpp = pytest.importorskip("pyrnn._cpp", reason=str(pyrnn.unavailable_backends().get("cpp")))

FLOAT32_MAX_ULP = TANH_MAX_ULP[np.dtype(np.float32)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_within_the_stated_bound(dtype):
    assert_within_stated_bound(_cpp.tanh, dtype)


def test_float32_is_odd_bitwise():
    x = float32_sweep(stride=1009)
    assert np.array_equal(_cpp.tanh(-x).view(np.int32), (-_cpp.tanh(x)).view(np.int32))


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
    correctly_rounded = np.tanh(x.astype(np.float64)).astype(np.float32)
    assert ulp_distance(np.abs(y), np.abs(correctly_rounded)).max(initial=0) <= FLOAT32_MAX_ULP

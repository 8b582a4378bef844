"""The sweeps that check a vectorised tanh against pyrnn.testing.TANH_MAX_ULP (the one stated
bound), shared by the native (test_native_tanh.py) and numba (test_numba_kernel.py) tests."""
import numpy as np

from pyrnn.testing import TANH_MAX_ULP


def float32_sweep(stride):
    """Every `stride`-th float32 in [0, 12] (past 9.01 tanh rounds to 1), as bit patterns go:
    every binade down to the subnormals."""
    top = np.float32(12).view(np.int32)
    return np.arange(0, top, stride, dtype=np.int32).view(np.float32)


def float64_grid():
    tiny = np.geomspace(1e-300, 30, 100_000)
    return np.concatenate([np.linspace(-25, 25, 1_000_001), tiny, -tiny])


def ulp_distance(a, b):
    """|a - b| in units in the last place, for float32 arrays of one sign."""
    return np.abs(a.view(np.int32).astype(np.int64) - b.view(np.int32).astype(np.int64))


def assert_within_stated_bound(tanh, dtype, stride=37):
    """tanh (array -> array of its dtype) within TANH_MAX_ULP[dtype]: float32 of the correctly
    rounded value on every `stride`-th float32 in [0, 12] (37: ~29 million), float64 of NumPy's
    on float64_grid()."""
    dtype = np.dtype(dtype)
    if dtype == np.float32:
        x = float32_sweep(stride)
        expected = np.tanh(x.astype(np.float64)).astype(np.float32)
        got = tanh(x)
        ulps = ulp_distance(got, expected)
    else:
        x = float64_grid()
        expected = np.tanh(x)
        got = tanh(x)
        ulps = np.abs(got - expected) / np.spacing(np.abs(expected))
    worst = int(np.argmax(ulps))
    assert ulps.max() <= TANH_MAX_ULP[dtype], (
        f"tanh({x[worst]!r}) = {got[worst]!r}, expected {expected[worst]!r}: {ulps.max()} ulp "
        f"> {TANH_MAX_ULP[dtype]}")

"""precision="bf16" (design.md §1): the rounding the reference defines it with."""
import numpy as np

from pyrnn.reference import round_to_bf16

# Lower halves of a float32 that decide its rounding to bfloat16: exact, just above and below
# half a unit, the tie, the extremes, and a few others.
LOWER_HALVES = np.array([0x0000, 0x0001, 0x3FFF, 0x7FFF, 0x8000, 0x8001, 0xBFFF, 0xFFFF, 0x1234, 0xC3A5],
                        np.uint32)


def nearest_bf16_by_arithmetic(x):
    """The oracle: finite x (float32) rounded to the nearest bfloat16 by comparing distances in float64
    (exact here) to the two bfloat16 neighbours, ties to the one with an even last bit; the value
    one unit above the largest finite bfloat16 is 2^128, which becomes inf as float32."""
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

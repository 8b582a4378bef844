"""Hypothesis drives the native module directly, past pyrnn.forward's validation: whatever it is
given (shapes, strides, dtypes, alignment, missing arguments, lengths out of range, NaN and inf,
zero sizes, dimensions whose byte counts overflow), a call returns the reference's result or
raises TypeError, ValueError or MemoryError naming what is wrong; it never crashes. .ci/run also
runs this file on the ASan + UBSan build, which turns any out-of-bounds access into a failure.

The contract checked (csrc/bindings.cpp): x decides the dtype (float32 or float64); every array is
an ndarray of that dtype, C-contiguous and aligned as NumPy's flags say, of its shape; bias, h0,
grad_h_n may be None (zeros); lengths is None or an aligned C-contiguous int64 (B,) in [0, T].
"""
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyrnn import reference
from pyrnn.testing import accumulated_terms, relative_error, tolerance

_cpp = pytest.importorskip("pyrnn._cpp")

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FLOATS = (np.float32, np.float64)
OTHER_DTYPES = (np.float16, np.int64, np.int32, np.complex128, np.bool_, np.dtype(">f8"), object)

# How an argument is passed, and whether the contract accepts it (given the right shape and dtype).
# "strided", "transposed" and "unaligned" are accepted where NumPy's flags say the view is
# C-contiguous and aligned anyway (an axis of length <= 1 has a stride that is never used; a
# 0-byte array is aligned anywhere): the kernel must then read it right.
GOOD_FORMS = ("contiguous", "read-only")
BAD_FORMS = ("strided", "transposed", "unaligned", "wrong dtype", "wrong shape", "list", "scalar")


def values(rng, shape, special, scale=0.5):
    """Moderate random values (no overflow in any summation order), with NaN/inf sprinkled in."""
    a = np.asarray(scale * rng.standard_normal(shape))
    if special and a.size:
        flat = a.reshape(-1)
        spots = rng.integers(0, a.size, size=max(1, a.size // 8))
        flat[spots] = rng.choice([np.nan, np.inf, -np.inf], size=len(spots))
    return a


def unaligned_copy(a):
    """A C-contiguous copy of `a` at an odd address (NumPy flags it not aligned)."""
    buffer = np.zeros(a.nbytes + 1, np.uint8)
    view = buffer[1:].view(a.dtype).reshape(a.shape)
    view[...] = a
    return view


def passed_as(form, a, dtype, rng):
    """`a` (float64 values of the right shape) passed in `form`: (object, accepted?)."""
    a = a.astype(dtype)
    if form == "contiguous":
        return a, True
    if form == "read-only":
        a.flags.writeable = False
        return a, True
    if form == "strided":  # every other element along one axis
        axis = int(rng.integers(a.ndim))
        wide = np.repeat(a, 2, axis=axis)
        view = wide[(slice(None),) * axis + (slice(None, None, 2),)]
        return view, bool(view.flags.c_contiguous)
    if form == "transposed":
        view = np.ascontiguousarray(a.T).T  # Fortran order
        return view, bool(view.flags.c_contiguous)
    if form == "unaligned":
        view = unaligned_copy(a)
        return view, bool(view.flags.aligned)
    if form == "wrong dtype":
        other = OTHER_DTYPES[int(rng.integers(len(OTHER_DTYPES)))]
        return np.zeros(a.shape, other), False
    if form == "wrong shape":
        shape = list(a.shape) or [1]
        shape[int(rng.integers(len(shape)))] += 1
        return np.zeros(shape, dtype), False
    if form == "list":
        return a.tolist(), False
    if form == "scalar":
        return 1.0, False
    raise AssertionError(form)


@st.composite
def arguments(draw, names_shapes, optional=()):
    """[(name, object, accepted, values)] for each name, plus the dtype of the call; values are
    what an accepted object holds, in float64 (zeros for None).

    x and weight_hh, which define T, B, I, H, are never given a wrong shape of the same rank
    (the others would then be wrong instead); they get a wrong rank among the bad forms."""
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    dtype = draw(st.sampled_from(FLOATS))
    special = draw(st.booleans())
    args = []
    for name, shape in names_shapes:
        a = values(rng, shape, special)
        forms = GOOD_FORMS + BAD_FORMS + (("None",) if name in optional else ())
        form = draw(st.sampled_from(forms) if draw(st.integers(0, 3)) == 0 else st.just("contiguous"))
        if form == "None":
            args.append((name, None, True, np.zeros(shape)))
            continue
        if form == "wrong shape" and name in ("x", "weight_hh"):
            obj, ok = np.zeros(shape[:-1], dtype), False
        else:
            obj, ok = passed_as(form, a, dtype, rng)
        args.append((name, obj, ok, np.asarray(obj, np.float64) if ok else None))
    return args, dtype


@st.composite
def lengths_argument(draw, T, B):
    """(object, accepted, int64 values or None)."""
    form = draw(st.sampled_from(["None", "valid", "valid", "negative", "past T", "int32", "shape",
                                 "strided", "unaligned", "list", "float"]))
    good = np.array(draw(st.lists(st.integers(0, T), min_size=B, max_size=B)), np.int64)
    if form == "None":
        return None, True, None
    if form == "valid":
        return good, True, good
    if form in ("negative", "past T"):
        if B == 0:
            return good, True, good
        bad = good.copy()
        bad[draw(st.integers(0, B - 1))] = -1 if form == "negative" else T + 1
        return bad, False, None
    if form == "int32":
        return good.astype(np.int32), False, None
    if form == "shape":
        return np.zeros(B + 1, np.int64), False, None
    if form == "strided":
        view = np.repeat(good, 2)[::2]
        return view, bool(view.flags.c_contiguous), good
    if form == "unaligned":
        view = unaligned_copy(good)
        return view, bool(view.flags.aligned), good
    if form == "list":
        return good.tolist(), False, None
    return good.astype(np.float64), False, None


DIMENSIONS = st.tuples(st.integers(0, 5), st.integers(0, 5), st.integers(0, 5), st.integers(0, 9))


def assert_raises_naming(call, bad_names):
    """call() raises TypeError/ValueError whose message names one of bad_names, briefly."""
    with pytest.raises((TypeError, ValueError)) as info:
        call()
    message = str(info.value)
    assert any(re.search(rf"\b{name}\b", message) for name in bad_names), (bad_names, message)
    assert len(message) < 300 and "array(" not in message, message


def assert_matches(got, expected, dtype, terms):
    """Same shapes and dtype, NaN and inf where the reference has them, the rest within tolerance."""
    for g, e in zip(got, expected):
        assert g.dtype == dtype and g.shape == e.shape
        g = g.astype(np.float64)
        assert np.array_equal(np.isnan(g), np.isnan(e)), (g, e)
        assert np.array_equal(g[np.isinf(e)], e[np.isinf(e)]), (g, e)
        finite = np.isfinite(e)
        error = relative_error(g[finite], e[finite])
        assert error <= tolerance(dtype, terms), (error, g, e)


@FUZZ
@given(DIMENSIONS.flatmap(lambda d: st.tuples(
    st.just(d),
    arguments([("x", (d[0], d[1], d[2])), ("weight_ih", (d[3], d[2])), ("weight_hh", (d[3], d[3])),
               ("bias", (d[3],)), ("h0", (d[1], d[3]))], optional=("bias", "h0")),
    lengths_argument(d[0], d[1]))))
def test_forward_returns_the_reference_or_raises(case):
    returns_the_reference_or_raises(_cpp.forward, reference.forward, case, terms=0)


def returns_the_reference_or_raises(native, reference_function, case, terms):
    """native(*arguments, lengths) against reference_function on the same values, or an error
    naming one of the arguments that break the contract; terms: 0 forward, 1 backward."""
    (T, B, I, H), (args, dtype), (lengths, lengths_ok, lengths_values) = case
    objects = [obj for _, obj, _, _ in args]
    bad = [name for name, _, ok, _ in args if not ok] + ([] if lengths_ok else ["lengths"])
    if bad:
        return assert_raises_naming(lambda: native(*objects, lengths), bad)
    got = native(*objects, lengths)
    expected = reference_function(*[v for _, _, _, v in args], lengths_values)
    assert_matches(got, expected, dtype, accumulated_terms(T, B, I, H)[terms])


@FUZZ
@given(DIMENSIONS.flatmap(lambda d: st.tuples(
    st.just(d),
    arguments([("grad_output", (d[0], d[1], d[3])), ("x", (d[0], d[1], d[2])),
               ("weight_ih", (d[3], d[2])), ("weight_hh", (d[3], d[3])),
               ("output", (d[0], d[1], d[3])), ("h0", (d[1], d[3])), ("grad_h_n", (d[1], d[3]))],
              optional=("h0", "grad_h_n")),
    lengths_argument(d[0], d[1]))))
def test_backward_returns_the_reference_or_raises(case):
    # the reference's output is its own input here: the kernel reads output only as h_t
    returns_the_reference_or_raises(_cpp.backward, reference.backward, case, terms=1)


@FUZZ
@given(st.lists(st.integers(0, 40), min_size=1, max_size=3),
       st.sampled_from([form for form in GOOD_FORMS + BAD_FORMS if form != "wrong shape"]),
       st.sampled_from(FLOATS), st.integers(0, 2**32 - 1))
def test_tanh_returns_numpy_s_or_raises(shape, form, dtype, seed):
    rng = np.random.default_rng(seed)
    a = values(rng, tuple(shape), special=True, scale=8)
    obj, ok = passed_as(form, a, dtype, rng)
    if not ok:
        return assert_raises_naming(lambda: _cpp.tanh(obj), ["x"])
    got = _cpp.tanh(obj)
    expected = np.tanh(np.asarray(obj, np.float64))
    assert got.shape == expected.shape and relative_error(got, expected) <= 4 * np.finfo(dtype).eps


def test_missing_and_extra_arguments_raise_type_errors():
    x, wi, wh = np.zeros((2, 1, 3)), np.zeros((4, 3)), np.zeros((4, 4))
    for call in (lambda: _cpp.forward(x, wi), lambda: _cpp.forward(),
                 lambda: _cpp.forward(x, wi, wh, None, None, None, None, None, None),
                 lambda: _cpp.backward(x, x, wi), lambda: _cpp.forward(x, wi, wh, bogus=1),
                 lambda: _cpp.tanh()):
        with pytest.raises(TypeError):
            call()


# Zero-byte arrays can have any dimensions NumPy accepts (the product of the others times the
# itemsize below 2**63), so the results' byte counts may overflow (NumPy's ValueError "array is
# too big"), exceed any memory (MemoryError), or be 0 with 2**58 steps to count (no step has
# any work: returned at once).
HUGE = [  # T, B, I, H; backward is called too where its inputs hold 0 bytes
    (2**58, 0, 1, 3), (2**58, 1, 0, 0), (1, 2**58, 0, 0),  # empty results, no step has work
    (0, 2**40, 4, 4), (0, 2**59, 1, 4),  # h0 = None means zeros (B, H): 32 TiB, 2**64 bytes
    (2**40, 2**17, 0, 8), (2**30, 1, 0, 1024),  # output: 2**62 or 2**63, 2**42 or 2**43 bytes
]


def raises_or_empty(call, shapes):
    """call() returns 0-filled results of these shapes if their byte counts are small, else raises."""
    if all(np.prod(shape, dtype=object) * 8 < 2**30 for shape in shapes):
        results = call()
        assert [r.shape for r in results] == shapes and all(not r.any() for r in results)
        return
    with pytest.raises((MemoryError, ValueError)) as info:
        call()
    assert isinstance(info.value, MemoryError) or "too big" in str(info.value)


@pytest.mark.parametrize("T, B, I, H", HUGE)
@pytest.mark.parametrize("dtype", FLOATS)
def test_huge_dimensions_raise_or_return_at_once(T, B, I, H, dtype):
    x, weight_ih, weight_hh = np.zeros((T, B, I), dtype), np.zeros((H, I), dtype), np.zeros((H, H), dtype)
    raises_or_empty(lambda: _cpp.forward(x, weight_ih, weight_hh), [(T, B, H), (B, H)])
    if T * B * H == 0 and np.prod([d for d in (T, B, H) if d], dtype=object) * x.itemsize < 2**63:
        sequence = np.zeros((T, B, H), dtype)  # grad_output and output, 0 bytes
        raises_or_empty(lambda: _cpp.backward(sequence, x, weight_ih, weight_hh, sequence),
                        [(T, B, I), (B, H), (H, I), (H, H), (H,)])

"""Hypothesis drives the native module directly, past pyrnn.forward's validation: whatever it is
given (shapes, strides, dtypes, alignment, missing arguments, lengths out of range, NaN and inf,
zero sizes, dimensions whose byte counts overflow), a call returns the reference's result or
raises TypeError, ValueError or MemoryError naming what is wrong; it never crashes. .ci/run also
runs this file on the ASan + UBSan build, which turns any out-of-bounds access into a failure.

The contract checked (csrc/bindings.cpp): x decides the dtype (float32 or float64); every array is
an ndarray of that dtype, C-contiguous and aligned as NumPy's flags say, of its shape; bias, h0,
grad_h_n may be None (zeros); lengths is None or an aligned C-contiguous int64 (B,) in [0, T];
nonlinearity is "tanh" or "relu", precision "fp32" or "bf16" (float32 only). The stacks take
layers, a list or tuple of L·D (weight_ih, weight_hh, bias) whose shapes follow x and
layers[0].weight_hh, h0 (L·D, B, H), dropout_masks (L - 1, T, B, D·H) and bidirectional, a bool.
"""
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyrnn import reference
from pyrnn.testing import BF16_AGREEMENT, accumulated_terms, relative_error, tolerance

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
def arguments(draw, names_shapes, optional=(), breaking=True):
    """[(name, object, accepted, values)] for each name, plus the dtype of the call; values are
    what an accepted object holds, in float64 (zeros for None).

    x and weight_hh (a stack's layers[0].weight_hh), which define T, B, I, H, are never given a
    wrong shape of the same rank
    (the others would then be wrong instead); they get a wrong rank among the bad forms."""
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    dtype = draw(st.sampled_from(FLOATS))
    special = draw(st.booleans())
    args = []
    for name, shape in names_shapes:
        a = values(rng, shape, special)
        forms = GOOD_FORMS + (BAD_FORMS if breaking else ()) + (("None",) if name in optional else ())
        form = draw(st.sampled_from(forms) if draw(st.integers(0, 3)) == 0 else st.just("contiguous"))
        if form == "None":
            args.append((name, None, True, np.zeros(shape)))
            continue
        if form == "wrong shape" and name in ("x", "weight_hh", "layers[0].weight_hh"):
            obj, ok = np.zeros(shape[:-1], dtype), False
        else:
            obj, ok = passed_as(form, a, dtype, rng)
        args.append((name, obj, ok, np.asarray(obj, np.float64) if ok else None))
    return args, dtype


@st.composite
def lengths_argument(draw, T, B, breaking=True):
    """(object, accepted, int64 values or None)."""
    form = draw(st.sampled_from(["None", "valid"] if not breaking else
                                ["None", "valid", "valid", "negative", "past T", "int32", "shape",
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


@st.composite
def options_argument(draw, breaking=True):
    """[(name, object, accepted)] for nonlinearity and precision, mostly valid."""
    def one(name, valid, invalid):
        if not breaking or draw(st.integers(0, 5)):
            return name, draw(st.sampled_from(valid)), True
        return name, draw(st.sampled_from(invalid)), False
    return [one("nonlinearity", ["tanh", "relu"], ["sigmoid", "", b"tanh", 1, None]),
            one("precision", ["fp32", "bf16"], ["fp16", "BF16", b"bf16", 16, None])]


DIMENSIONS = st.tuples(st.integers(0, 5), st.integers(0, 5), st.integers(0, 5), st.integers(0, 9))


def assert_raises_naming(call, bad_names):
    """call() raises TypeError/ValueError whose message names one of bad_names, briefly."""
    with pytest.raises((TypeError, ValueError)) as info:
        call()
    message = str(info.value)
    assert any(re.search(rf"\b{name}\b", message) for name in bad_names), (bad_names, message)
    assert len(message) < 300 and "array(" not in message, message


def bad_options(options, dtype):
    """The names of the options the contract rejects (bf16 with float64 arrays among them)."""
    values = dict((name, obj) for name, obj, _ in options)
    bad = [name for name, _, ok in options if not ok]
    if values["precision"] == "bf16" and dtype == np.float64:
        bad.append("precision")
    return bad


def reference_precision(dtype, options, values):
    """(cast, tol): what the reference computes on (float64 values, or float32 ones for bf16: it
    rounds float32 operands, pyrnn.testing) and tol(terms, layers=1), the tolerance for sums of
    that many terms through that many layers (each adds its own errors: L layers are allowed L
    times one layer's, L² times its terms in float32). bf16: pyrnn.testing's BF16_AGREEMENT
    covers an operand the time loop makes (h, dL/da) rounded to the neighbouring bf16 (2u apart)
    with torch's small weights; the values here are O(1), so such a rounding moves a later sum by
    up to 2u·max|value|."""
    if dict((name, obj) for name, obj, _ in options)["precision"] == "bf16":
        largest = max([np.abs(v[np.isfinite(v)]).max(initial=0) for v in values if v is not None])
        bound = BF16_AGREEMENT * max(1, 2 * largest)
        return (lambda a: a.astype(np.float32)), lambda terms, layers=1: max(
            layers * bound, tolerance(dtype, layers**2 * terms))
    return (lambda a: a), lambda terms, layers=1: tolerance(dtype, layers**2 * terms)


def assert_matches(got, expected, dtype, tol):
    """Same shapes and dtype, NaN and inf where the reference has them, the rest within tol."""
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        e = np.asarray(e, np.float64)
        assert g.dtype == dtype and g.shape == e.shape
        g = g.astype(np.float64)
        assert np.array_equal(np.isnan(g), np.isnan(e)), (g, e)
        assert np.array_equal(g[np.isinf(e)], e[np.isinf(e)]), (g, e)
        finite = np.isfinite(e)
        error = relative_error(g[finite], e[finite])
        assert error <= tol, (error, g, e)


def layer_case(names_shapes, optional):
    """(dimensions, arguments, lengths, options) of a single-layer call; names_shapes(T, B, I, H).
    Half the cases break something, the others are all valid (else few would be)."""
    def case(d, breaking):
        return st.tuples(st.just(d), arguments(names_shapes(*d), optional, breaking),
                         lengths_argument(d[0], d[1], breaking), options_argument(breaking))
    return st.tuples(DIMENSIONS, st.booleans()).flatmap(lambda c: case(*c))


@FUZZ
@given(layer_case(lambda T, B, I, H: [("x", (T, B, I)), ("weight_ih", (H, I)), ("weight_hh", (H, H)),
                                      ("bias", (H,)), ("h0", (B, H))], optional=("bias", "h0")))
def test_forward_returns_the_reference_or_raises(case):
    returns_the_reference_or_raises(_cpp.forward, reference.forward, case, terms=0)


def returns_the_reference_or_raises(native, reference_function, case, terms):
    """native(*arguments, lengths, nonlinearity, precision) against reference_function on the same
    values, or an error naming one of the arguments that break the contract; terms: 0 forward,
    1 backward."""
    (T, B, I, H), (args, dtype), (lengths, lengths_ok, lengths_values), options = case
    objects = [obj for _, obj, _, _ in args] + [lengths] + [obj for _, obj, _ in options]
    bad = ([name for name, _, ok, _ in args if not ok] + ([] if lengths_ok else ["lengths"]) +
           bad_options(options, dtype))
    if bad:
        return assert_raises_naming(lambda: native(*objects), bad)
    got = native(*objects)
    cast, tol = reference_precision(dtype, options, [v for _, _, _, v in args])
    expected = reference_function(*[cast(v) for _, _, _, v in args], lengths_values,
                                  *[obj for _, obj, _ in options])
    assert_matches(got, expected, dtype, tol(accumulated_terms(T, B, I, H)[terms]))


@FUZZ
@given(layer_case(lambda T, B, I, H: [("grad_output", (T, B, H)), ("x", (T, B, I)), ("weight_ih", (H, I)),
                                      ("weight_hh", (H, H)), ("output", (T, B, H)), ("h0", (B, H)),
                                      ("grad_h_n", (B, H))], optional=("h0", "grad_h_n")))
def test_backward_returns_the_reference_or_raises(case):
    # the reference's output is its own input here: the kernel reads output only as h_t
    returns_the_reference_or_raises(_cpp.backward, reference.backward, case, terms=1)


# ---- Stacks: L layers × D directions (_cpp.stack_forward, _cpp.stack_backward) ----

STACK_DIMENSIONS = st.tuples(st.integers(1, 3), st.integers(1, 2), st.integers(0, 4), st.integers(0, 4),
                             st.integers(0, 4), st.integers(0, 6))  # L, D, T, B, I, H
LAYERS_FORMS = ("list", "list", "list", "tuple", "entries as lists",  # accepted
                "not a sequence", "wrong count", "entry not a triple", "another H above")


def layer_names_shapes(L, D, I, H):
    return [(f"layers[{k}].{name}", shape) for k in range(L * D)
            for name, shape in (("weight_ih", (H, I if k < D else D * H)), ("weight_hh", (H, H)),
                                ("bias", (H,)))]


@st.composite
def stack_case(draw, backward):
    """(dimensions, the binding's arguments, [names that break the contract], the reference's
    arguments as float64 values (dropout_masks None if absent; the options as given), dtype)."""
    L, D, T, B, I, H = dims = draw(STACK_DIMENSIONS)
    breaking = draw(st.booleans())  # as in layer_case
    names_shapes = [("grad_output", (T, B, D * H))] if backward else []
    names_shapes += [("x", (T, B, I))] + layer_names_shapes(L, D, I, H)
    names_shapes += [("layer_outputs", (L, T, B, D * H))] if backward else []
    names_shapes += [("h0", (L * D, B, H))] + ([("grad_h_n", (L * D, B, H))] if backward else [])
    names_shapes += [("dropout_masks", (L - 1, T, B, D * H))]
    optional = [name for name, _ in names_shapes
                if name.endswith(".bias") or name in ("h0", "grad_h_n", "dropout_masks")]
    args, dtype = draw(arguments(names_shapes, optional, breaking))
    objects = {name: obj for name, obj, _, _ in args}
    values = {name: v for name, _, _, v in args}
    bad = ["layers" if name.startswith("layers[") else name for name, _, ok, _ in args if not ok]

    def units(arrays):
        return [tuple(arrays[f"layers[{k}].{name}"] for name in ("weight_ih", "weight_hh", "bias"))
                for k in range(L * D)]

    entries = units(objects)
    form = draw(st.sampled_from(LAYERS_FORMS if breaking else LAYERS_FORMS[:5]))
    layers = entries
    if form == "tuple":
        layers = tuple(entries)
    elif form == "entries as lists":
        layers = [list(entry) for entry in entries]
    elif form == "not a sequence":
        layers = draw(st.sampled_from([None, np.zeros(3), {0: entries[0]}, iter(entries)]))
    elif form == "wrong count":  # no multiple of D but 0
        layers = entries[:-1] if D == 2 else []
    elif form == "entry not a triple":
        k = draw(st.integers(0, L * D - 1))
        layers = entries[:k] + [entries[k][:2]] + entries[k + 1:]
    elif form == "another H above" and L * D > 1:  # unit k's three arrays agree with each other only
        k = draw(st.integers(1, L * D - 1))
        other = [np.zeros(shape, dtype) for _, shape in layer_names_shapes(L, D, I, H + 1)[3 * k:3 * k + 3]]
        layers = entries[:k] + [tuple(other)] + entries[k + 1:]
    bad += ["layers"] if form in LAYERS_FORMS[5:] and layers is not entries else []

    bidirectional, ok = draw(st.sampled_from([(D == 2, True)] * 5 + [(1, False), (None, False)] * breaking))
    bad += [] if ok else ["bidirectional"]
    lengths, ok, lengths_values = draw(lengths_argument(T, B, breaking))
    bad += [] if ok else ["lengths"]
    options = draw(options_argument(breaking))
    bad += bad_options(options, dtype)

    head = ["grad_output", "x", "layers", "layer_outputs", "h0", "grad_h_n"] if backward else ["x", "layers", "h0"]
    given = {**objects, "layers": layers}
    call = [given[name] for name in head] + [lengths, objects["dropout_masks"], bidirectional]
    call += [obj for _, obj, _ in options]
    reference_values = {**values, "layers": units(values),
                        "dropout_masks": None if objects["dropout_masks"] is None else values["dropout_masks"]}
    return dims, call, bad, (head, reference_values, lengths_values, D == 2, options), dtype


def stack_returns_the_reference_or_raises(native, reference_function, case, terms):
    """As returns_the_reference_or_raises, for a stack; results flattened (grad_x, grad_h0, then
    each unit's gradients), L layers' tolerance."""
    (L, D, T, B, I, H), call, bad, (head, values, lengths, bidirectional, options), dtype = case
    if bad:
        return assert_raises_naming(lambda: native(*call), bad)
    masks = values["dropout_masks"]
    cast, tol = reference_precision(dtype, options, [values[name] for name in head if name != "layers"] +
                                    [a for unit in values["layers"] for a in unit] + [masks])
    arguments = [[tuple(map(cast, unit)) for unit in values["layers"]] if name == "layers" else cast(values[name])
                 for name in head]
    expected = reference_function(*arguments, lengths, None if masks is None else cast(masks), bidirectional,
                                  *[obj for _, obj, _ in options])
    got = native(*call)
    if terms == 1:
        got, expected = ([*results[:2], *[a for unit in results[2] for a in unit]] for results in (got, expected))
    assert_matches(got, expected, dtype, tol(accumulated_terms(T, B, max(I, D * H), H)[terms], L))


@FUZZ
@given(stack_case(backward=False))
def test_stack_forward_returns_the_reference_or_raises(case):
    stack_returns_the_reference_or_raises(_cpp.stack_forward, reference.stack_forward, case, terms=0)


@FUZZ
@given(stack_case(backward=True))
def test_stack_backward_returns_the_reference_or_raises(case):
    stack_returns_the_reference_or_raises(_cpp.stack_backward, reference.stack_backward, case, terms=1)


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


def raises_or_empty(call, shapes, itemsize):
    """call() returns 0-filled results of these shapes if their byte counts are small (and NumPy
    can make them: their nonzero dimensions' product too), else raises."""
    if all(np.prod(shape, dtype=object) * itemsize < 2**30 and
           np.prod([d for d in shape if d], dtype=object) * itemsize < 2**63 for shape in shapes):
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
    raises_or_empty(lambda: _cpp.forward(x, weight_ih, weight_hh), [(T, B, H), (B, H)], x.itemsize)
    if T * B * H == 0 and np.prod([d for d in (T, B, H) if d], dtype=object) * x.itemsize < 2**63:
        sequence = np.zeros((T, B, H), dtype)  # grad_output and output, 0 bytes
        raises_or_empty(lambda: _cpp.backward(sequence, x, weight_ih, weight_hh, sequence),
                        [(T, B, I), (B, H), (H, I), (H, H), (H,)], x.itemsize)


@pytest.mark.parametrize("T, B, I, H", HUGE)
@pytest.mark.parametrize("L, D", [(1, 1), (2, 2)])
def test_huge_stacks_raise_or_return_at_once(T, B, I, H, L, D):
    dtype = np.float32
    x = np.zeros((T, B, I), dtype)
    layers = [(np.zeros((H, I if k < D else D * H), dtype), np.zeros((H, H), dtype), None) for k in range(L * D)]
    sequences = (L, T, B, D * H)  # layer_outputs
    raises_or_empty(lambda: _cpp.stack_forward(x, layers, None, None, None, D == 2),
                    [sequences, (L * D, B, H)], x.itemsize)
    if T * B * H == 0 and np.prod([d for d in sequences if d], dtype=object) * x.itemsize < 2**63:
        layer_outputs, grad_output = np.zeros(sequences, dtype), np.zeros(sequences[1:], dtype)  # 0 bytes
        shapes = [(T, B, I), (L * D, B, H)] + [shape for k in range(L * D) for shape in
                                               ((H, I if k < D else D * H), (H, H), (H,))]

        def flat_backward():
            grad_x, grad_h0, units = _cpp.stack_backward(grad_output, x, layers, layer_outputs, None, None,
                                                         None, None, D == 2)
            return [grad_x, grad_h0] + [g for unit in units for g in unit]
        raises_or_empty(flat_backward, shapes, x.itemsize)

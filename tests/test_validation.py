"""Malformed input: the right exception type, and a message that names the argument."""
import numpy as np
import pytest

import pyrnn

from problems import make_problem

T, B, I, H = 4, 3, 2, 5


@pytest.fixture
def problem():
    return make_problem(np.random.default_rng(0), T, B, I, H)


FORWARD_CASES = {
    "x 2-D": (dict(x=np.zeros((T, I))), ValueError, r"x must be 3-D \(T, B, I\)"),
    "x 4-D": (dict(x=np.zeros((T, B, I, 1))), ValueError, "x must be 3-D"),
    "weight_ih columns": (dict(weight_ih=np.zeros((H, I + 1))), ValueError,
                          r"weight_ih has shape \(5, 3\), expected \(5, 2\) = \(H, I\)"),
    "weight_ih rows": (dict(weight_ih=np.zeros((H + 1, I))), ValueError, "weight_ih has shape"),
    "weight_ih 1-D": (dict(weight_ih=np.zeros(H)), ValueError, "weight_ih has shape"),
    "weight_hh not square": (dict(weight_hh=np.zeros((H, H + 1))), ValueError,
                             r"weight_hh has shape \(5, 6\), expected \(5, 5\) = \(H, H\)"),
    "weight_hh 1-D": (dict(weight_hh=np.zeros(H)), ValueError, "weight_hh must be 2-D"),
    "bias length": (dict(bias=np.zeros(H + 1)), ValueError,
                    r"bias has shape \(6,\), expected \(5,\) = \(H\)"),
    "bias 2-D": (dict(bias=np.zeros((1, H))), ValueError, "bias has shape"),
    "h0 rows": (dict(h0=np.zeros((B + 1, H))), ValueError, r"h0 has shape \(4, 5\), expected \(3, 5\)"),
    "h0 torch-style 3-D": (dict(h0=np.zeros((1, B, H))), ValueError, r"h0 has shape \(1, 3, 5\)"),
    "x integer": (dict(x=np.zeros((T, B, I), dtype=np.int64)), TypeError, "x has dtype int64"),
    "x bool": (dict(x=np.zeros((T, B, I), dtype=bool)), TypeError, "x has dtype bool"),
    "x float16": (dict(x=np.zeros((T, B, I), dtype=np.float16)), TypeError, "x has dtype float16"),
    "x complex": (dict(x=np.zeros((T, B, I), dtype=complex)), TypeError, "x is complex"),
    "mixed dtypes": (dict(weight_hh=np.zeros((H, H), dtype=np.float32)), TypeError,
                     "weight_hh has dtype float32 but x has float64"),
    "x string": (dict(x="hello"), TypeError, "x must be an array of floats"),
    "x None": (dict(x=None), TypeError, "x must be an array"),
    "x object": (dict(x=object()), TypeError, "x must be an array of floats"),
    "x ragged list": (dict(x=[[[1.0]], [[1.0, 2.0]]]), TypeError, "x must be an array of floats"),
    "bias strings": (dict(bias=["a"] * H), TypeError, "bias must be an array of floats"),
    "lengths floats": (dict(lengths=np.array([1.0, 2.0, 3.0])), TypeError, "lengths must hold integers"),
    "lengths bools": (dict(lengths=[True, False, True]), TypeError, "lengths must hold integers"),
    "lengths scalar": (dict(lengths=3), TypeError, "lengths must be a sequence"),
    "lengths negative": (dict(lengths=[1, -1, 2]), ValueError, r"lengths\[1\] = -1 is outside \[0, T\]"),
    "lengths too long": (dict(lengths=[1, 2, T + 1]), ValueError, r"lengths\[2\] = 5 is outside \[0, T\] = \[0, 4\]"),
    "lengths count": (dict(lengths=[1, 2]), ValueError, r"lengths has shape \(2,\), expected \(3,\) = \(B,\)"),
    "lengths 2-D": (dict(lengths=[[1, 2, 3]]), ValueError, "lengths has shape"),
    "unknown backend": (dict(backend="cuda"), ValueError, r"backend='cuda' is not a backend; choose one of"),
    "backend not a string": (dict(backend=1), TypeError, "backend must be a string"),
    "batch_first not a bool": (dict(batch_first="yes"), TypeError, "batch_first must be a bool"),
    "unknown nonlinearity": (dict(nonlinearity="sigmoid"), ValueError,
                             "nonlinearity must be one of 'tanh', 'relu', got 'sigmoid'"),
    "nonlinearity not a string": (dict(nonlinearity=None), ValueError,
                                  "nonlinearity must be one of 'tanh', 'relu', got None"),
    "nonlinearity torch's capitalised": (dict(nonlinearity="Tanh"), ValueError,
                                         "nonlinearity must be one of"),
}


@pytest.mark.parametrize("case", FORWARD_CASES, ids=str)
def test_forward_rejects(problem, case, backend):
    change, error, message = FORWARD_CASES[case]
    arguments = dict(problem, backend=backend)
    arguments.update(change)
    with pytest.raises(error, match=message):
        pyrnn.forward(**arguments)


def test_batch_first_messages_use_the_callers_layout(problem):
    x = np.zeros((B, T, I))
    with pytest.raises(ValueError, match=r"output has shape \(4, 3, 5\), expected \(3, 4, 5\) = \(B, T, H\)"):
        pyrnn.backward(np.zeros((B, T, H)), x, problem["weight_ih"], problem["weight_hh"],
                       np.zeros((T, B, H)), batch_first=True)


BACKWARD_CASES = {
    "grad_output shape": (dict(grad_output=np.zeros((T, B, H + 1))), ValueError,
                          r"grad_output has shape \(4, 3, 6\), expected \(4, 3, 5\) = \(T, B, H\)"),
    "output shape": (dict(output=np.zeros((T + 1, B, H))), ValueError, "output has shape"),
    "output 2-D": (dict(output=np.zeros((T, B))), ValueError, "output has shape"),
    "grad_h_n shape": (dict(grad_h_n=np.zeros((B, H, 1))), ValueError, "grad_h_n has shape"),
    "grad_output dtype": (dict(grad_output=np.zeros((T, B, H), np.float32)), TypeError,
                          "grad_output has dtype float32"),
    "lengths too long": (dict(lengths=[T + 1, 0, 0]), ValueError, r"lengths\[0\]"),
    "unknown nonlinearity": (dict(nonlinearity="gelu"), ValueError,
                             "nonlinearity must be one of 'tanh', 'relu', got 'gelu'"),
}


@pytest.mark.parametrize("case", BACKWARD_CASES, ids=str)
def test_backward_rejects(problem, case, backend):
    change, error, message = BACKWARD_CASES[case]
    output, _ = pyrnn.forward(**problem)
    arguments = dict(grad_output=np.ones_like(output), x=problem["x"],
                     weight_ih=problem["weight_ih"], weight_hh=problem["weight_hh"],
                     output=output, h0=problem["h0"], backend=backend)
    arguments.update(change)
    with pytest.raises(error, match=message):
        pyrnn.backward(**arguments)


@pytest.mark.parametrize("count", [0, -2, 1.5, True, "2"])
def test_set_num_threads_rejects_non_positive_integers(count):
    with pytest.raises(ValueError, match="n must be a positive integer"):
        pyrnn.set_num_threads(count)


class Float32ArrayLike:
    """Not an ndarray, but convertible to one that is float32 (as a torch tensor is)."""

    def __init__(self, array):
        self.array = array

    def __array__(self, dtype=None, copy=None):
        return self.array if dtype is None else self.array.astype(dtype)


def test_array_likes_keep_their_float32(backend):
    problem = make_problem(np.random.default_rng(1), T, B, I, H, np.float32)
    output, h_n = pyrnn.forward(**{k: Float32ArrayLike(v) for k, v in problem.items()},
                                backend=backend)
    assert output.dtype == h_n.dtype == np.float32
    expected = pyrnn.forward(**problem, backend=backend)
    np.testing.assert_array_equal(output, expected[0])
    grads = pyrnn.backward(Float32ArrayLike(np.ones_like(output)), Float32ArrayLike(problem["x"]),
                           problem["weight_ih"], problem["weight_hh"], output, backend=backend)
    assert all(g.dtype == np.float32 for g in grads)


def test_nested_lists_are_float64_and_take_an_arrays_dtype(backend):
    problem = make_problem(np.random.default_rng(2), T, B, I, H, np.float32)
    as_lists = {k: v.tolist() for k, v in problem.items()}
    assert pyrnn.forward(**as_lists, backend=backend)[0].dtype == np.float64
    beside_an_array = dict(as_lists, weight_hh=problem["weight_hh"])
    assert pyrnn.forward(**beside_an_array, backend=backend)[0].dtype == np.float32


def test_array_likes_of_different_dtypes_are_rejected(problem):
    with pytest.raises(TypeError, match="weight_hh has dtype float32 but x has float64"):
        pyrnn.forward(problem["x"], problem["weight_ih"],
                      Float32ArrayLike(problem["weight_hh"].astype(np.float32)))


def test_unaligned_arrays_are_copied_not_read_as_they_are(backend):
    """A C-contiguous view at an odd address (NumPy: not aligned) must not reach compiled code,
    whose typed reads of it are undefined behaviour: pyrnn copies it."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 2, 4))
    unaligned = np.zeros(x.nbytes + 1, np.uint8)[1:].view(np.float64).reshape(x.shape)
    unaligned[...] = x
    weight_ih, weight_hh = rng.standard_normal((5, 4)), 0.3 * rng.standard_normal((5, 5))
    assert not unaligned.flags.aligned and unaligned.flags.c_contiguous
    for got, want in zip(pyrnn.forward(unaligned, weight_ih, weight_hh, backend=backend),
                         pyrnn.forward(x, weight_ih, weight_hh, backend="numpy")):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)

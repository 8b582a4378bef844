"""The native module is reachable from Python on its own: it must raise, never crash, whatever it is given."""
import numpy as np
import pytest

import pyrnn

# Skipped only where pyrnn was installed without it on purpose: test_backends.py fails otherwise.
_cpp = pytest.importorskip("pyrnn._cpp", reason=str(pyrnn.unavailable_backends().get("cpp")))

from forking import forked_child_agrees  # noqa: E402

T, B, I, H = 3, 2, 4, 5


def arrays(dtype=np.float64):
    return [np.zeros(shape, dtype) for shape in [(T, B, I), (H, I), (H, H), (H,), (B, H)]]


def test_direct_call_matches_the_public_function():
    import pyrnn

    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal(a.shape) for a in arrays()]
    for got, want in zip(_cpp.forward(*inputs), pyrnn.forward(*inputs, backend="numpy")):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-14)


@pytest.mark.parametrize("position, bad, error, message", [
    (0, np.zeros((T, B)), ValueError, "x must be 3-D"),
    (1, np.zeros((H, I + 1)), ValueError, r"weight_ih has shape \(5, 5\), expected \(5, 4\)"),
    (2, np.zeros((H, H + 1)), ValueError, "weight_hh has shape"),
    (2, np.zeros(H), ValueError, "weight_hh must be 2-D"),
    (3, np.zeros(H + 2), ValueError, "bias has shape"),
    (4, np.zeros((B + 1, H)), ValueError, "h0 has shape"),
    (0, np.zeros((T, B, I), np.float32), TypeError, "weight_hh must be a C-contiguous float32"),
    (2, np.zeros((H, H), np.float32), TypeError, "weight_hh must be a C-contiguous float64"),
    (3, np.zeros(H, np.float32), TypeError, "bias must be a C-contiguous float64"),
    (0, np.zeros((I, B, T)).T, TypeError, "x must be a C-contiguous float32 or float64 array"),
    (1, np.zeros((I, H)).T, TypeError, "weight_ih must be a C-contiguous float64"),
    (0, [[[0.0] * I] * B] * T, TypeError, "x must be a C-contiguous float32 or float64 array"),
    (0, np.zeros((T, B, I), np.int64), TypeError, "x must be a C-contiguous float32 or float64"),
    (1, None, TypeError, "weight_ih must be a C-contiguous float64"),
])
def test_forward_raises(position, bad, error, message):
    inputs = arrays()
    inputs[position] = bad
    with pytest.raises(error, match=message):
        _cpp.forward(*inputs)


@pytest.mark.parametrize("lengths, error, message", [
    (np.array([1, T + 1]), ValueError, r"lengths\[1\] = 4 is outside \[0, T=3\]"),
    (np.array([-1, 0]), ValueError, r"lengths\[0\] = -1"),
    (np.array([1, 2, 3]), ValueError, "lengths has shape"),
    (np.array([1, 2], dtype=np.int32), TypeError, "lengths must be None or a C-contiguous int64"),
    ([1, 2], TypeError, "lengths must be None or a C-contiguous int64"),
])
def test_bad_lengths_raise(lengths, error, message):
    with pytest.raises(error, match=message):
        _cpp.forward(*arrays(), lengths)


def test_none_means_zeros_as_in_the_public_function():
    rng = np.random.default_rng(1)
    x, weight_ih, weight_hh, bias, h0 = [rng.standard_normal(a.shape) for a in arrays()]
    for got, want in zip(_cpp.forward(x, weight_ih, weight_hh),
                         _cpp.forward(x, weight_ih, weight_hh, np.zeros(H), np.zeros((B, H)))):
        np.testing.assert_array_equal(got, want)
    output, _ = _cpp.forward(x, weight_ih, weight_hh, bias, h0)
    for got, want in zip(_cpp.backward(output, x, weight_ih, weight_hh, output),
                         _cpp.backward(output, x, weight_ih, weight_hh, output, np.zeros((B, H)),
                                       np.zeros((B, H)))):
        np.testing.assert_array_equal(got, want)


def test_a_mismatch_is_cheap_to_raise():
    """pyrnn.forward tries the native module first with the caller's arrays: an array it must
    normalise (here Fortran-ordered) costs one quick exception, not a printout of every array
    (pybind11's overload mismatch message, 1.6 ms at this size)."""
    x, weight_ih, weight_hh, bias, h0 = [np.zeros(s, np.float32)
                                         for s in [(50, 16, 64), (128, 64), (128, 128), (128,), (16, 128)]]
    x = np.asfortranarray(x)
    with pytest.raises(TypeError) as info:
        _cpp.forward(x, weight_ih, weight_hh, bias, h0)
    assert "array(" not in str(info.value) and len(str(info.value)) < 200


def test_backward_checks_every_shape():
    x, weight_ih, weight_hh, _, h0 = arrays()
    output = np.zeros((T, B, H))
    good = [output, x, weight_ih, weight_hh, output, h0, h0]
    for position, name in enumerate(["grad_output", "x", "weight_ih", "weight_hh", "output",
                                     "h0", "grad_h_n"]):
        bad = list(good)
        bad[position] = np.zeros((7, 7, 7) if good[position].ndim == 3 else (7, 8))
        with pytest.raises(ValueError, match=name):
            _cpp.backward(*bad)


def test_empty_dimensions_do_not_crash():
    for T_, B_, I_, H_ in [(0, 2, 3, 4), (3, 0, 3, 4), (3, 2, 0, 4), (3, 2, 3, 0)]:
        inputs = [np.zeros(s) for s in [(T_, B_, I_), (H_, I_), (H_, H_), (H_,), (B_, H_)]]
        output, h_n = _cpp.forward(*inputs)
        assert output.shape == (T_, B_, H_) and h_n.shape == (B_, H_)
        grads = _cpp.backward(output, inputs[0], inputs[1], inputs[2], output, inputs[4], h_n)
        assert [g.shape for g in grads] == [(T_, B_, I_), (B_, H_), (H_, I_), (H_, H_), (H_,)]


def test_the_native_module_loads_no_openmp_runtime(tmp_path):
    """A libgomp.so.1 loaded by us would serve torch too (same soname) and slow it down ~25×
    at 2 threads (csrc/threads.h): the module must not bring one."""
    import subprocess
    import sys

    maps = subprocess.run([sys.executable, "-c", "import pyrnn._cpp; print(open('/proc/self/maps').read())"],
                          capture_output=True, text=True, check=True, cwd=tmp_path).stdout
    assert "libgomp" not in maps and "libomp" not in maps


def medium_problem(seed=2):
    rng = np.random.default_rng(seed)
    shapes = [(20, 64, 96), (256, 96), (256, 256), (256,), (64, 256)]  # a step large enough to share
    return [(rng.standard_normal(s) * 0.1).astype(np.float32) for s in shapes]


def test_concurrent_calls_from_python_threads_agree():
    """The GIL is released, so calls can overlap; one of them then runs without the worker pool,
    which changes nothing in the results (they do not depend on the thread count)."""
    from concurrent.futures import ThreadPoolExecutor

    inputs = medium_problem()
    _cpp.set_num_threads(2)
    expected = _cpp.forward(*inputs)
    with ThreadPoolExecutor(4) as executor:
        results = list(executor.map(lambda _: _cpp.forward(*inputs), range(16)))
    for output, h_n in results:
        np.testing.assert_array_equal(output, expected[0])
        np.testing.assert_array_equal(h_n, expected[1])


def test_a_forked_child_can_use_threads(tmp_path):
    setup = ("import pyrnn._cpp as cpp\nfrom test_native_bindings import medium_problem\n"
             "cpp.set_num_threads(2)\ninputs = medium_problem()")
    assert forked_child_agrees(setup, "cpp.forward(*inputs)[0]", tmp_path)


def test_the_stub_matches_the_module():
    """pyrnn/_cpp.pyi declares exactly the module's functions, with the parameters pybind11 reports."""
    import ast
    import pathlib
    import re

    import pyrnn

    stub = ast.parse(pathlib.Path(pyrnn.__file__).with_name("_cpp.pyi").read_text())
    declared = {f.name: f.args for f in stub.body if isinstance(f, ast.FunctionDef)}
    assert set(declared) == {name for name in dir(_cpp) if not name.startswith("_")}
    for name, arguments in declared.items():
        # pybind11's docstring: "name(a: type, b: type = default) -> ..." (numbered when overloaded)
        doc = getattr(_cpp, name).__doc__
        signature = re.search(rf"^(?:\d+\. )?{name}\((\w.*?)?\) ->", doc, re.MULTILINE).group(1) or ""
        assert re.findall(r"(?:^|, )(\w+):", signature) == [a.arg for a in arguments.args], (name, signature)
        assert signature.count(" = ") == len(arguments.defaults), (name, signature)

"""pyrnn.gradcheck: every backend's backward against central differences of its forward, float64."""
import numpy as np
import pytest

import pyrnn
import pyrnn.reference

from problems import make_problem, make_problem_away_from_relus_kink, random_lengths


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (4, 3, 2, 5), (6, 2, 3, 1), (3, 1, 4, 3)],
                         ids=lambda s: "T{}-B{}-I{}-H{}".format(*s))
@pytest.mark.parametrize("with_lengths", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_gradcheck_passes(backend, shape, with_lengths, nonlinearity):
    rng = np.random.default_rng(sum(shape))
    T, B, I, H = shape
    lengths = random_lengths(rng, T, B) if with_lengths else None
    if nonlinearity == "relu":
        problem = make_problem_away_from_relus_kink(rng, T, B, I, H, lengths)
    else:
        problem = make_problem(rng, T, B, I, H)
    errors = pyrnn.gradcheck(**problem, lengths=lengths, backend=backend,
                             nonlinearity=nonlinearity)
    assert set(errors) == {"x", "h0", "weight_ih", "weight_hh", "bias"}
    assert max(errors.values()) < 1e-6


def test_gradcheck_batch_first_without_bias_or_h0(backend):
    rng = np.random.default_rng(1)
    problem = make_problem(rng, 4, 3, 2, 3, bias=False, h0=False)
    problem["x"] = np.ascontiguousarray(problem["x"].swapaxes(0, 1))
    pyrnn.gradcheck(**problem, lengths=[4, 1, 0], batch_first=True, backend=backend)


def test_gradcheck_works_from_float32_inputs(backend):
    rng = np.random.default_rng(2)
    pyrnn.gradcheck(**make_problem(rng, 3, 2, 2, 3, np.float32), backend=backend)


def test_gradcheck_catches_a_wrong_gradient(monkeypatch):
    """A check that cannot fail proves nothing: break one gradient and expect a GradcheckError."""
    correct_backward = pyrnn.reference.backward

    def backward_with_wrong_bias(*args):
        grad_x, grad_h0, grad_weight_ih, grad_weight_hh, grad_bias = correct_backward(*args)
        return grad_x, grad_h0, grad_weight_ih, grad_weight_hh, grad_bias * 1.001

    monkeypatch.setattr(pyrnn.reference, "backward", backward_with_wrong_bias)
    rng = np.random.default_rng(3)
    with pytest.raises(pyrnn.GradcheckError, match="grad bias"):
        pyrnn.gradcheck(**make_problem(rng, 3, 2, 2, 3), backend="numpy")
    errors = pyrnn.gradcheck(**make_problem(rng, 3, 2, 2, 3), backend="numpy",
                             raise_on_failure=False)
    assert errors["bias"] > 1e-5 and errors["x"] < 1e-8


def test_gradcheck_command_runs(capsys):
    from pyrnn.__main__ import main

    assert main(["gradcheck", "--backends", "numpy"]) == 0
    assert "ok   numpy" in capsys.readouterr().out


def test_gradcheck_command_checks_relu_stacks(capsys):
    from pyrnn.__main__ import main

    assert main(["gradcheck", "--backends", "numpy", "--nonlinearity", "relu", "--layers", "2",
                 "--bidirectional"]) == 0
    out = capsys.readouterr().out
    assert out.count("ok   numpy  relu L=2 D=2") == 6 and "FAIL" not in out


def test_gradcheck_command_fails_on_a_wrong_stack_gradient(monkeypatch, capsys):
    """A check that cannot fail proves nothing: one layer's weight_hh gradient off by 0.1%."""
    from pyrnn.__main__ import main

    correct = pyrnn.reference.stack_backward

    def wrong_weight_hh_of_layer_1(*args, **kwargs):
        grad_x, grad_h0, units = correct(*args, **kwargs)
        units[1] = (units[1][0], units[1][1] * 1.001, units[1][2])
        return grad_x, grad_h0, units

    monkeypatch.setattr(pyrnn.reference, "stack_backward", wrong_weight_hh_of_layer_1)
    assert main(["gradcheck", "--backends", "numpy", "--layers", "2"]) == 1
    assert "grad layers[1].weight_hh" in capsys.readouterr().out


def test_stack_gradcheck_checks_every_input(backend):
    rng = np.random.default_rng(5)
    T, B, I, H, L, D = 3, 2, 2, 3, 2, 2
    layers = [(0.5 * rng.standard_normal((H, I if k < D else D * H)), 0.5 * rng.standard_normal((H, H)), None)
              for k in range(L * D)]
    errors = pyrnn.stack_gradcheck(rng.standard_normal((T, B, I)), layers, lengths=[3, 1], bidirectional=True,
                                   dropout_masks=(rng.random((L - 1, T, B, D * H)) > 0.3) / 0.7, backend=backend)
    assert set(errors) == {"x", "h0"} | {f"layers[{k}].{name}" for k in range(L * D)
                                         for name in ("weight_ih", "weight_hh", "bias")}
    assert max(errors.values()) < 1e-6

"""The reference against torch.nn.RNN (nonlinearity "tanh" and "relu"): same weights (torch's two biases sum
to ours), packed sequences for lengths, autograd for the gradients. Skipped without torch."""
import numpy as np
import pytest

import pyrnn

from problems import make_problem, random_lengths

torch = pytest.importorskip("torch")
pack_padded_sequence = torch.nn.utils.rnn.pack_padded_sequence
pad_packed_sequence = torch.nn.utils.rnn.pad_packed_sequence


def torch_rnn(problem, bias_ih, bias_hh, lengths, batch_first, nonlinearity):
    """(output, h_n, grads) from torch, with the loss Σ output·R + Σ h_n·S."""
    T, B = problem["x"].shape[:2] if not batch_first else problem["x"].shape[1::-1]
    H, I = problem["weight_ih"].shape
    rnn = torch.nn.RNN(I, H, nonlinearity=nonlinearity, batch_first=batch_first,
                       dtype=torch.float64)
    with torch.no_grad():
        rnn.weight_ih_l0.copy_(torch.from_numpy(problem["weight_ih"]))
        rnn.weight_hh_l0.copy_(torch.from_numpy(problem["weight_hh"]))
        rnn.bias_ih_l0.copy_(torch.from_numpy(bias_ih))
        rnn.bias_hh_l0.copy_(torch.from_numpy(bias_hh))
    x = torch.from_numpy(problem["x"]).requires_grad_()
    h0 = torch.from_numpy(problem["h0"]).requires_grad_()
    if lengths is None:
        output, h_n = rnn(x, h0[None])
    else:
        packed = pack_padded_sequence(x, torch.from_numpy(lengths), batch_first=batch_first,
                                      enforce_sorted=False)
        packed_output, h_n = rnn(packed, h0[None])
        output, _ = pad_packed_sequence(packed_output, batch_first=batch_first, total_length=T)
    rng = np.random.default_rng(0)
    weight_output = torch.from_numpy(rng.standard_normal(output.shape))
    weight_h_n = torch.from_numpy(rng.standard_normal((B, H)))
    ((output * weight_output).sum() + (h_n[0] * weight_h_n).sum()).backward()
    grads = (x.grad, h0.grad, rnn.weight_ih_l0.grad, rnn.weight_hh_l0.grad, rnn.bias_ih_l0.grad)
    return (output.detach().numpy(), h_n[0].detach().numpy(), [g.numpy() for g in grads],
            weight_output.numpy(), weight_h_n.numpy())


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["time-major", "batch-first"])
@pytest.mark.parametrize("with_lengths", [False, True], ids=["full", "packed"])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (5, 4, 3, 6), (9, 6, 2, 4)],
                         ids=lambda s: "T{}-B{}-I{}-H{}".format(*s))
def test_reference_matches_torch(shape, with_lengths, batch_first, nonlinearity):
    rng = np.random.default_rng(sum(shape))
    T, B, I, H = shape
    problem = make_problem(rng, T, B, I, H)
    bias_ih, bias_hh = problem["bias"], rng.uniform(-0.3, 0.3, H)
    problem["bias"] = bias_ih + bias_hh
    lengths = random_lengths(rng, T, B) if with_lengths else None
    if lengths is not None:
        lengths[np.argmax(lengths)] = T  # pad_packed_sequence pads up to total_length anyway
        lengths = np.maximum(lengths, 1)  # torch packs no empty sequence; length 0 is tested below
    if batch_first:
        problem["x"] = np.ascontiguousarray(problem["x"].swapaxes(0, 1))
    options = dict(lengths=lengths, batch_first=batch_first, backend="numpy",
                   nonlinearity=nonlinearity)

    output_torch, h_n_torch, grads_torch, weight_output, weight_h_n = torch_rnn(
        problem, bias_ih, bias_hh, lengths, batch_first, nonlinearity)
    output, h_n = pyrnn.forward(**problem, **options)
    np.testing.assert_allclose(output, output_torch, rtol=0, atol=1e-12)
    np.testing.assert_allclose(h_n, h_n_torch, rtol=0, atol=1e-12)
    grads = pyrnn.backward(weight_output, problem["x"], problem["weight_ih"],
                           problem["weight_hh"], output, problem["h0"], grad_h_n=weight_h_n,
                           **options)
    for name, ours, theirs in zip(grads._fields, grads, grads_torch):
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-11, err_msg=f"grad {name}")


def test_length_zero_keeps_h0_like_a_torch_rnn_that_never_ran():
    rng = np.random.default_rng(4)
    problem = make_problem(rng, 3, 2, 2, 3)
    output, h_n = pyrnn.forward(**problem, lengths=[0, 3], backend="numpy")
    np.testing.assert_array_equal(h_n[0], problem["h0"][0])
    assert not output[:, 0].any()


def test_float32_tensors_are_computed_in_float32(backend):
    """A torch tensor is an array with a dtype of its own: float32 stays float32."""
    torch.manual_seed(0)
    x, weight_ih, weight_hh = torch.randn(5, 2, 3), torch.randn(4, 3), torch.randn(4, 4)
    output, h_n = pyrnn.forward(x, weight_ih, weight_hh, backend=backend)
    assert output.dtype == h_n.dtype == np.float32
    expected, _ = pyrnn.forward(x.numpy(), weight_ih.numpy(), weight_hh.numpy(), backend=backend)
    np.testing.assert_array_equal(output, expected)


def test_relu_stops_an_inf_or_nan_gradient_at_a_unit_it_cut_off(backend):
    """torch's relu backward is a select (0 where h <= 0, its threshold_backward), so an inf or
    NaN gradient reaching a unit that relu cut off stops there, and every gradient stays finite;
    a product with [h > 0] would make it 0 · inf = NaN (docs/design.md §1)."""
    rng = np.random.default_rng(7)
    T, B, I, H = 4, 3, 2, 5
    problem = make_problem(rng, T, B, I, H)
    output, h_n = pyrnn.forward(**problem, nonlinearity="relu", backend="numpy")
    cut = output == 0
    assert cut.any() and (~cut).any() and (h_n == 0).any()
    grad_output = rng.standard_normal(output.shape)
    grad_output[cut] = rng.choice([np.inf, -np.inf, np.nan], size=int(cut.sum()))
    grad_h_n = rng.standard_normal(h_n.shape)
    grad_h_n[h_n == 0] = np.nan

    rnn = torch.nn.RNN(I, H, nonlinearity="relu", dtype=torch.float64)
    with torch.no_grad():
        for name, value in (("weight_ih_l0", problem["weight_ih"]), ("weight_hh_l0", problem["weight_hh"]),
                            ("bias_ih_l0", problem["bias"]), ("bias_hh_l0", np.zeros(H))):
            getattr(rnn, name).copy_(torch.from_numpy(value))
    x, h0 = (torch.from_numpy(problem[name]).requires_grad_() for name in ("x", "h0"))
    output_torch, h_n_torch = rnn(x, h0[None])
    torch.autograd.backward([output_torch, h_n_torch], [torch.from_numpy(grad_output),
                                                        torch.from_numpy(grad_h_n[None])])
    expected = [g.numpy() for g in (x.grad, h0.grad, rnn.weight_ih_l0.grad, rnn.weight_hh_l0.grad,
                                    rnn.bias_ih_l0.grad)]
    grads = pyrnn.backward(grad_output, problem["x"], problem["weight_ih"], problem["weight_hh"], output,
                           problem["h0"], grad_h_n=grad_h_n, nonlinearity="relu", backend=backend)
    np.testing.assert_allclose(output, output_torch.detach().numpy(), rtol=0, atol=1e-12)
    for name, ours, theirs in zip(grads._fields, grads, expected):
        assert np.isfinite(theirs).all(), name
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-11, err_msg=f"grad {name}")

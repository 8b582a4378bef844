"""pyrnn.optim: clipping, SGD with momentum and Adam (by hand and against torch.optim), truncated BPTT."""
import numpy as np
import pytest

from pyrnn.losses import mse
from pyrnn.nn import Linear, RNN
from pyrnn.optim import adam, clip_grad_norm, clip_grad_value, global_norm, parameters, sgd, truncated_bptt


def make_grads():
    return {"a": np.array([3.0, 0.0]), "b": np.array([[4.0]])}  # global norm 5


def test_clip_grad_norm():
    grads = make_grads()
    assert clip_grad_norm(grads, 1.0) == pytest.approx(5.0)  # reports the norm before clipping
    assert global_norm(grads) == pytest.approx(1.0, rel=1e-6)
    np.testing.assert_allclose(grads["a"], [0.6, 0.0], rtol=1e-6)  # direction kept
    grads = make_grads()
    assert clip_grad_norm(grads, 10.0) == pytest.approx(5.0)
    np.testing.assert_array_equal(grads["b"], [[4.0]])  # under the limit: untouched
    with pytest.raises(ValueError, match="max_norm"):
        clip_grad_norm(grads, 0)


def test_clip_grad_value():
    grads = make_grads()
    assert clip_grad_value(grads, 3.5) == pytest.approx(5.0)
    np.testing.assert_array_equal(grads["a"], [3.0, 0.0])
    np.testing.assert_array_equal(grads["b"], [[3.5]])
    with pytest.raises(ValueError, match="clip_value"):
        clip_grad_value(grads, -1)


def test_sgd_with_momentum_by_hand():
    params, state = {"w": np.array([1.0])}, {}
    sgd(params, {"w": np.array([2.0])}, state, lr=0.1, momentum=0.5)  # v = 2
    assert params["w"][0] == pytest.approx(0.8)
    sgd(params, {"w": np.array([1.0])}, state, lr=0.1, momentum=0.5)  # v = 0.5·2 + 1 = 2
    assert params["w"][0] == pytest.approx(0.6)
    sgd(params, {"w": np.array([1.0])}, {}, lr=0.1)  # plain SGD
    assert params["w"][0] == pytest.approx(0.5)
    with pytest.raises(KeyError, match="only in grads"):
        sgd(params, {"w": np.array([1.0]), "v": np.array([1.0])}, {}, lr=0.1)


def test_adam_first_step_moves_each_parameter_by_lr():
    params = {"w": np.array([1.0, 1.0, 1.0])}
    adam(params, {"w": np.array([1e-3, -5.0, 0.0])}, {}, lr=0.01)
    np.testing.assert_allclose(params["w"], [0.99, 1.01, 1.0], rtol=1e-5)  # m̂/√v̂ = sign(g)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_optimizers_match_torch(optimizer):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    params = {"w": rng.standard_normal((3, 2)), "b": rng.standard_normal(3)}
    torch_params = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    if optimizer == "sgd":
        torch_optimizer = torch.optim.SGD(torch_params.values(), lr=0.1, momentum=0.9)
        step = lambda grads, state: sgd(params, grads, state, lr=0.1, momentum=0.9)  # noqa: E731
    else:
        torch_optimizer = torch.optim.Adam(torch_params.values(), lr=0.01, betas=(0.8, 0.99), eps=1e-6)
        step = lambda grads, state: adam(params, grads, state, lr=0.01, betas=(0.8, 0.99), eps=1e-6)  # noqa: E731
    state = {}
    for _ in range(5):
        grads = {k: rng.standard_normal(v.shape) for k, v in params.items()}
        for k, p in torch_params.items():
            p.grad = torch.tensor(grads[k])
        torch_optimizer.step()
        step(grads, state)
    for k in params:
        np.testing.assert_allclose(params[k], torch_params[k].detach().numpy(), rtol=1e-12, atol=1e-14)


def test_truncated_bptt_chunks():
    chunks = list(truncated_bptt(7, 3, lengths=np.array([7, 4, 0])))
    assert [c[0] for c in chunks] == [slice(0, 3), slice(3, 6), slice(6, 7)]
    np.testing.assert_array_equal(np.stack([c[1] for c in chunks]), [[3, 3, 0], [3, 1, 0], [1, 0, 0]])
    assert [c[1] for c in truncated_bptt(4, 5)] == [None]
    with pytest.raises(ValueError, match="chunk_length"):
        list(truncated_bptt(4, 0))


def test_truncated_bptt_carries_the_state_and_stops_the_gradient():
    rng = np.random.default_rng(1)
    T, B = 9, 3
    rnn = RNN(2, 4, num_layers=2, dtype=np.float64, seed=0)
    x, lengths = rng.standard_normal((T, B, 2)), np.array([9, 5, 2])
    full_output, full_h_n = rnn(x, lengths=lengths)

    h, outputs = None, []
    for steps, chunk_lengths in truncated_bptt(T, 4, lengths):
        output, h = rnn(x[steps], h, chunk_lengths)
        outputs.append(output)
        rnn.backward(np.ones_like(output))
        last_grads = {k: g.copy() for k, g in rnn.grads.items()}
    np.testing.assert_allclose(np.concatenate(outputs), full_output, atol=1e-14)  # state carried exactly
    np.testing.assert_allclose(h, full_h_n, atol=1e-14)

    # The last chunk's gradient is that of a fresh run on the chunk from the carried state (a
    # constant), not the full BPTT gradient of the same loss through the earlier chunks.
    _, h8 = rnn(x[:8], lengths=np.minimum(lengths, 8))
    rnn(x[8:], h8, np.clip(lengths - 8, 0, 1))
    rnn.backward(np.ones((1, B, 4)))
    for k in last_grads:
        np.testing.assert_allclose(last_grads[k], rnn.grads[k], atol=1e-14)
    rnn(x, lengths=lengths)
    rnn.backward(np.concatenate([np.zeros((8, B, 4)), np.ones((1, B, 4))]))
    assert not np.allclose(last_grads["weight_hh_l0"], rnn.grads["weight_hh_l0"])


def train_a_little(seed):
    """A few Adam steps of RNN + Linear on random data, everything drawn from one seed."""
    rng = np.random.default_rng(seed)
    rnn, head = RNN(2, 5, seed=rng), Linear(5, 1, seed=rng)
    params, grads = parameters(rnn=rnn, head=head)
    assert list(params) == [f"rnn.{k}" for k in rnn.params] + ["head.weight", "head.bias"]
    assert params["head.weight"] is head.params["weight"] and grads["rnn.weight_hh_l0"] is rnn.grads["weight_hh_l0"]
    x = rng.standard_normal((6, 4, 2)).astype(np.float32)
    target = np.cumsum(x[..., :1], axis=0)
    state, losses = {}, []
    for _ in range(20):
        output, _ = rnn(x)
        loss, grad_prediction = mse(head(output), target)
        rnn.backward(head.backward(grad_prediction))
        clip_grad_norm(grads, 1.0)
        adam(params, grads, state, lr=0.02)
        losses.append(loss)
    return losses


def test_training_is_reproducible_from_a_seed():
    losses = train_a_little(seed=3)
    assert losses[-1] < 0.8 * losses[0]
    assert train_a_little(seed=3) == losses
    assert train_a_little(seed=4) != losses

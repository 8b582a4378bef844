"""pyrnn.losses: values, gradients by finite differences, numerical stability, masks, and whole
many-to-many / many-to-one models (RNN -> Linear -> loss) gradient-checked end to end."""
import numpy as np
import pytest

import pyrnn
from pyrnn.losses import bce_with_logits, mse, sequence_mask, softmax, softmax_cross_entropy
from pyrnn.nn import Linear, RNN, select_last, select_last_backward


def check_loss_gradient(loss_function, inputs, *args, **kwargs):
    loss, grad = loss_function(inputs, *args, **kwargs)
    numerical = pyrnn.numerical_gradient(lambda: loss_function(inputs, *args, **kwargs)[0], inputs)
    np.testing.assert_allclose(grad, numerical, rtol=1e-6, atol=1e-9)
    return loss, grad


def test_sequence_mask_and_softmax():
    np.testing.assert_array_equal(sequence_mask([2, 0, 3], 3),
                                  [[True, False, True], [True, False, True], [False, False, True]])
    np.testing.assert_array_equal(sequence_mask([2, 0, 3], 3, batch_first=True), sequence_mask([2, 0, 3], 3).T)
    with pytest.raises(ValueError, match="outside"):
        sequence_mask([4], 3)
    probabilities = softmax(np.array([[1000.0, 1000.0, -1000.0], [0.0, np.log(3), 0.0]]))
    np.testing.assert_allclose(probabilities, [[0.5, 0.5, 0], [0.2, 0.6, 0.2]])


def test_softmax_cross_entropy():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((4, 3, 5))
    targets = rng.integers(0, 5, size=(4, 3))
    loss, grad = check_loss_gradient(softmax_cross_entropy, logits, targets)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = -np.mean(np.take_along_axis(log_probs, targets[..., None], -1))
    assert loss == pytest.approx(expected, rel=1e-12)

    mask = sequence_mask([4, 1, 0], 4)
    padded = np.where(mask, targets, -1)  # padding targets may be anything
    loss, grad = check_loss_gradient(softmax_cross_entropy, logits, padded, mask)
    assert loss == pytest.approx(-np.mean(np.take_along_axis(log_probs, targets[..., None], -1)[mask]), rel=1e-12)
    assert np.all(grad[~mask] == 0)
    assert softmax_cross_entropy(logits, targets, np.zeros((4, 3), bool))[0] == 0

    huge = np.array([[1e4, -1e4, 0.0]])  # exp would overflow without the shift
    loss, grad = softmax_cross_entropy(huge, np.array([1]))
    assert loss == pytest.approx(2e4) and np.all(np.isfinite(grad))
    loss32, grad32 = softmax_cross_entropy(logits.astype(np.float32), targets)
    assert grad32.dtype == np.float32 and loss32 == pytest.approx(
        softmax_cross_entropy(logits, targets)[0], rel=1e-6)

    with pytest.raises(ValueError, match=r"outside \[0, C\) = \[0, 5\)"):
        softmax_cross_entropy(logits, np.where(mask, targets, 7))
    with pytest.raises(ValueError, match="targets has shape"):
        softmax_cross_entropy(logits, targets[:2])
    with pytest.raises(TypeError, match="integer"):
        softmax_cross_entropy(logits, targets.astype(float))


def test_mse():
    rng = np.random.default_rng(1)
    prediction, target = rng.standard_normal((5, 3, 2)), rng.standard_normal((5, 3, 2))
    loss, _ = check_loss_gradient(mse, prediction, target)
    assert loss == pytest.approx(np.mean((prediction - target) ** 2), rel=1e-12)
    mask = sequence_mask([5, 2, 0], 5)[:, :, None]  # (T, B, 1) broadcasts over the features
    loss, grad = check_loss_gradient(mse, prediction, target, mask)
    kept = np.broadcast_to(mask, prediction.shape)
    assert loss == pytest.approx(np.mean((prediction - target)[kept] ** 2), rel=1e-12)
    assert np.all(grad[~kept] == 0)
    with pytest.raises(ValueError, match="target has shape"):
        mse(prediction, target[:, :2])
    with pytest.raises(TypeError, match="mask must be a bool"):
        mse(prediction, target, mask.astype(int))


def test_bce_with_logits():
    rng = np.random.default_rng(2)
    logits, targets = 3 * rng.standard_normal((6, 4)), rng.uniform(size=(6, 4))
    loss, _ = check_loss_gradient(bce_with_logits, logits, targets)
    p = 1 / (1 + np.exp(-logits))
    assert loss == pytest.approx(np.mean(-targets * np.log(p) - (1 - targets) * np.log(1 - p)), rel=1e-10)
    mask = rng.uniform(size=(6, 4)) < 0.5
    check_loss_gradient(bce_with_logits, logits, targets, mask)
    # Far in the tails, where log(sigmoid(z)) would be log(0) = -inf:
    loss, grad = bce_with_logits(np.array([1000.0, -1000.0]), np.array([0.0, 0.0]))
    assert loss == pytest.approx(500.0) and np.allclose(grad, [0.5, 0.0])


@pytest.mark.parametrize("loss_function", [softmax_cross_entropy, mse, bce_with_logits])
def test_inputs_are_not_modified(loss_function):
    rng = np.random.default_rng(6)
    logits = rng.standard_normal((4, 3))
    targets = rng.integers(0, 3, size=4) if loss_function is softmax_cross_entropy else rng.uniform(size=(4, 3))
    mask = np.ones(targets.shape, dtype=bool)
    copies = [logits.copy(), targets.copy(), mask.copy()]
    loss_function(logits, targets, mask)
    for before, after in zip(copies, [logits, targets, mask]):
        np.testing.assert_array_equal(before, after)


def test_losses_match_torch():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(3)
    logits, targets = rng.standard_normal((7, 5)), rng.integers(0, 5, size=7)
    targets[[1, 4]] = -100
    loss, grad = softmax_cross_entropy(logits, targets, targets != -100)
    logits_t = torch.tensor(logits, requires_grad=True)
    loss_t = F.cross_entropy(logits_t, torch.tensor(targets), ignore_index=-100)
    loss_t.backward()
    assert loss == pytest.approx(loss_t.item(), rel=1e-12)
    np.testing.assert_allclose(grad, logits_t.grad.numpy(), atol=1e-15)

    probabilities = rng.uniform(size=(7, 5))
    loss, grad = bce_with_logits(logits, probabilities)
    logits_t.grad = None
    loss_t = F.binary_cross_entropy_with_logits(logits_t, torch.tensor(probabilities))
    loss_t.backward()
    assert loss == pytest.approx(loss_t.item(), rel=1e-12)
    np.testing.assert_allclose(grad, logits_t.grad.numpy(), atol=1e-15)


def check_model_gradients(loss, layers):
    """loss() runs forward and backward of the whole model, returning the loss; compare every
    parameter's gradient (and the inputs') with finite differences."""
    loss()
    analytic = {f"{i}.{k}": g.copy() for i, layer in enumerate(layers) for k, g in layer.grads.items()}
    arrays = {f"{i}.{k}": p for i, layer in enumerate(layers) for k, p in layer.params.items()}
    for name, array in arrays.items():
        np.testing.assert_allclose(analytic[name], pyrnn.numerical_gradient(loss, array),
                                   rtol=1e-5, atol=1e-8, err_msg=name)


def test_many_to_many_model_gradients(backend):
    """Character-LM shape: a softmax cross-entropy at every valid step of a 2-layer RNN."""
    rng = np.random.default_rng(4)
    T, B, I, H, C = 5, 3, 4, 3, 4
    rnn = RNN(I, H, num_layers=2, dtype=np.float64, backend=backend, seed=0)
    head = Linear(H, C, dtype=np.float64, seed=1)
    x, lengths = rng.standard_normal((T, B, I)), np.array([5, 3, 1])
    targets = rng.integers(0, C, size=(T, B))
    mask = sequence_mask(lengths, T)

    def loss():
        output, _ = rnn(x, lengths=lengths)
        value, grad_logits = softmax_cross_entropy(head(output), targets, mask)
        rnn.backward(head.backward(grad_logits))
        return value

    check_model_gradients(loss, [rnn, head])


def test_many_to_one_model_gradients(backend):
    """Classifier shape: a bidirectional RNN read at each row's last valid step, BCE on top."""
    rng = np.random.default_rng(5)
    T, B, I, H = 6, 4, 2, 3
    rnn = RNN(I, H, bidirectional=True, batch_first=True, dtype=np.float64, backend=backend, seed=0)
    head = Linear(2 * H, 1, dtype=np.float64, seed=1)
    x, lengths = rng.standard_normal((B, T, I)), np.array([6, 2, 1, 4])
    labels = rng.integers(0, 2, size=(B, 1)).astype(float)

    def loss():
        output, _ = rnn(x, lengths=lengths)
        value, grad_logits = bce_with_logits(head(select_last(output, lengths, batch_first=True)), labels)
        rnn.backward(select_last_backward(head.backward(grad_logits), lengths, T, batch_first=True))
        return value

    check_model_gradients(loss, [rnn, head])

"""pyrnn.nn: RNN and Linear against finite differences (float64) and against torch (when importable)."""
import copy

import numpy as np
import pytest

import pyrnn
from pyrnn.nn import Linear, RNN, select_last, select_last_backward
from pyrnn.reference import reverse_within_lengths
from pyrnn.testing import accumulated_terms, relative_error, tolerance

# (num_layers, bidirectional, bias, batch_first, with lengths, nonlinearity)
CONFIGS = [
    (1, False, True, False, False, "tanh"),
    (2, False, True, False, True, "tanh"),
    (1, True, True, True, True, "tanh"),
    (2, True, True, False, True, "tanh"),
    (2, True, False, True, False, "tanh"),
    (1, False, True, False, True, "relu"),
    (3, True, True, True, True, "relu"),
]


def config_id(config):
    layers, bidirectional, bias, batch_first, lengths, nonlinearity = config
    return (f"L{layers}" + ("-bi" if bidirectional else "") + ("" if bias else "-nobias")
            + ("-bf" if batch_first else "") + ("-lengths" if lengths else "") + f"-{nonlinearity}")


def make_rnn(config, backend, dtype=np.float64, seed=0, I=3, H=4, **options):
    layers, bidirectional, bias, batch_first, _, nonlinearity = config
    return RNN(I, H, layers, nonlinearity=nonlinearity, bias=bias, batch_first=batch_first,
               bidirectional=bidirectional, dtype=dtype, backend=backend, seed=seed, **options)


def make_inputs(rnn, rng, T=5, B=4, with_lengths=True, shortest=0):
    shape = (B, T, rnn.input_size) if rnn.batch_first else (T, B, rnn.input_size)
    x = rng.standard_normal(shape).astype(rnn.dtype)
    h0 = rng.standard_normal((rnn.num_layers * rnn.num_directions, B, rnn.hidden_size)).astype(rnn.dtype)
    lengths = np.array([T, 2, shortest, 3][:B]) if with_lengths else None
    return x, h0, lengths


def test_parameter_names_shapes_and_initialisation():
    rnn = RNN(3, 4, num_layers=2, bidirectional=True, seed=1)
    suffixes = ["_l0", "_l0_reverse", "_l1", "_l1_reverse"]
    assert list(rnn.params) == [f"{kind}{s}" for s in suffixes
                                for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
    assert rnn.params["weight_ih_l0"].shape == (4, 3)
    assert rnn.params["weight_ih_l1_reverse"].shape == (4, 8)  # both directions of layer 0
    assert rnn.params["weight_hh_l1"].shape == (4, 4) and rnn.params["bias_hh_l1"].shape == (4,)
    values = np.concatenate([p.ravel() for p in rnn.params.values()])
    assert values.dtype == np.float32
    assert np.abs(values).max() <= 0.5 and np.abs(values).max() > 0.4  # U(-1/sqrt(4), 1/sqrt(4))
    assert all(np.array_equal(p, q) for p, q in zip(rnn.params.values(),
                                                    RNN(3, 4, 2, bidirectional=True, seed=1).params.values()))
    other = RNN(3, 4, 2, bidirectional=True, seed=2)
    assert not np.array_equal(rnn.params["weight_hh_l0"], other.params["weight_hh_l0"])
    assert list(RNN(3, 4, bias=False).params) == ["weight_ih_l0", "weight_hh_l0"]


def test_single_layer_is_the_kernel(backend):
    rng = np.random.default_rng(0)
    rnn = RNN(3, 4, dtype=np.float64, backend=backend, seed=0)
    x, h0, lengths = make_inputs(rnn, rng)
    output, h_n = rnn(x, h0, lengths)
    p = rnn.params
    expected, expected_h_n = pyrnn.forward(x, p["weight_ih_l0"], p["weight_hh_l0"],
                                           p["bias_ih_l0"] + p["bias_hh_l0"], h0[0], lengths=lengths,
                                           backend="numpy")
    np.testing.assert_allclose(output, expected, atol=1e-12)
    np.testing.assert_allclose(h_n[0], expected_h_n, atol=1e-12)


@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_rnn_gradients_match_finite_differences(backend, config):
    rng = np.random.default_rng(1)
    rnn = make_rnn(config, backend)
    x, h0, lengths = make_inputs(rnn, rng, with_lengths=config[4])
    output, h_n = rnn(x, h0, lengths)
    weight_output, weight_h_n = rng.standard_normal(output.shape), rng.standard_normal(h_n.shape)

    def loss():  # every output and final state enters with its own weight
        output, h_n = rnn.forward(x, h0, lengths)
        return np.sum(output * weight_output) + np.sum(h_n * weight_h_n)

    loss()
    grad_x = rnn.backward(weight_output, weight_h_n)
    analytic = {"x": grad_x, "h0": rnn.grad_h0, **{k: g.copy() for k, g in rnn.grads.items()}}
    for name, array in {"x": x, "h0": h0, **rnn.params}.items():
        numerical = pyrnn.numerical_gradient(loss, array)
        np.testing.assert_allclose(analytic[name], numerical, rtol=1e-5, atol=1e-7, err_msg=name)
    if lengths is not None:  # padding steps neither produce output nor receive gradient
        padding = ~pyrnn.losses.sequence_mask(lengths, 5, batch_first=rnn.batch_first)
        assert np.all(output[padding] == 0) and np.all(grad_x[padding] == 0)
        np.testing.assert_array_equal(h_n[:, lengths == 0], h0[:, lengths == 0])  # empty rows keep h0


def test_reverse_within_lengths():
    x = np.arange(8).reshape(4, 2)  # (T, B), values t*2 + b
    reversed_x = reverse_within_lengths(x, np.array([3, 4]))
    np.testing.assert_array_equal(reversed_x[:, 0], [4, 2, 0, 6])  # padding step 3 stays
    np.testing.assert_array_equal(reversed_x[:, 1], [7, 5, 3, 1])
    np.testing.assert_array_equal(reverse_within_lengths(reversed_x, np.array([3, 4])), x)
    np.testing.assert_array_equal(reverse_within_lengths(x, None), x[::-1])


def test_select_last_and_its_gradient():
    rng = np.random.default_rng(2)
    output = rng.standard_normal((5, 3, 2))
    lengths = np.array([5, 1, 3])
    np.testing.assert_array_equal(select_last(output, lengths), output[[4, 0, 2], [0, 1, 2]])
    np.testing.assert_array_equal(select_last(output), output[-1])
    np.testing.assert_array_equal(select_last(output.swapaxes(0, 1), lengths, batch_first=True),
                                  select_last(output, lengths))
    weight = rng.standard_normal((3, 2))
    numerical = pyrnn.numerical_gradient(lambda: np.sum(select_last(output, lengths) * weight), output)
    np.testing.assert_allclose(select_last_backward(weight, lengths, 5), numerical, atol=1e-9)
    np.testing.assert_array_equal(select_last_backward(weight, lengths, 5, batch_first=True),
                                  select_last_backward(weight, lengths, 5).swapaxes(0, 1))
    with pytest.raises(ValueError, match="no last step"):
        select_last(output, np.array([5, 0, 3]))


def test_linear_gradients_and_shapes():
    rng = np.random.default_rng(3)
    layer = Linear(4, 3, dtype=np.float64, seed=0)
    assert layer.params["weight"].shape == (3, 4) and layer.params["bias"].shape == (3,)
    assert np.abs(layer.params["weight"]).max() <= 0.5
    x = rng.standard_normal((5, 2, 4))
    y = layer(x)
    assert y.shape == (5, 2, 3)
    np.testing.assert_allclose(y, x @ layer.params["weight"].T + layer.params["bias"])
    weight = rng.standard_normal(y.shape)

    def loss():
        return np.sum(layer.forward(x) * weight)

    loss()
    grad_x = layer.backward(weight)
    analytic = {"x": grad_x, **{k: g.copy() for k, g in layer.grads.items()}}
    for name, array in {"x": x, **layer.params}.items():
        np.testing.assert_allclose(analytic[name], pyrnn.numerical_gradient(loss, array),
                                   rtol=1e-6, atol=1e-8, err_msg=name)
    assert list(Linear(4, 3, bias=False).params) == ["weight"]
    with pytest.raises(ValueError, match=r"x has shape \(5, 2\), expected \(\?, 4\) = \(\.\.\., in_features\)"):
        layer(np.zeros((5, 2)))
    with pytest.raises(ValueError, match=r"grad_y has shape \(5, 2, 4\), expected \(5, 2, 3\)"):
        layer.backward(np.zeros((5, 2, 4)))


def test_state_dict_round_trip_and_errors():
    rnn = RNN(3, 4, num_layers=2, seed=0)
    other = RNN(3, 4, num_layers=2, seed=1)
    weight_before = other.params["weight_hh_l1"]
    other.load_state_dict(rnn.state_dict())
    assert other.params["weight_hh_l1"] is weight_before  # loaded in place: optimizers keep valid references
    assert all(np.array_equal(rnn.params[k], other.params[k]) for k in rnn.params)
    state = rnn.state_dict()
    state["weight_hh_l0"] += 1  # a copy, not the parameter
    assert not np.array_equal(state["weight_hh_l0"], rnn.params["weight_hh_l0"])
    with pytest.raises(KeyError, match="missing.*bias_hh_l1"):
        other.load_state_dict({k: v for k, v in state.items() if k != "bias_hh_l1"})
    with pytest.raises(ValueError, match="weight_ih_l1 has shape"):
        other.load_state_dict({**state, "weight_ih_l1": np.zeros((4, 3))})
    assert np.array_equal(other.params["weight_hh_l0"], rnn.params["weight_hh_l0"])  # nothing half-loaded


def test_bad_inputs_are_named():
    rnn = RNN(3, 4, num_layers=2, bidirectional=True)
    x = np.zeros((5, 2, 3), dtype=np.float32)
    with pytest.raises(ValueError, match=r"x has shape \(5, 2, 2\), expected \(\?, \?, 3\) = \(T, B, I\)"):
        rnn(np.zeros((5, 2, 2), dtype=np.float32))
    with pytest.raises(ValueError, match=r"h0 has shape .* expected \(4, 2, 4\)"):
        rnn(x, h0=np.zeros((2, 2, 4), dtype=np.float32))
    with pytest.raises(TypeError, match="x has dtype float64 but the layer is float32"):
        rnn(x.astype(np.float64))
    with pytest.raises(ValueError, match="lengths"):
        rnn(x, lengths=[6, 1])
    with pytest.raises(RuntimeError, match="before"):
        RNN(3, 4).backward(np.zeros((5, 2, 4), dtype=np.float32))
    rnn(x)
    with pytest.raises(ValueError, match=r"grad_output has shape \(5, 2, 4\), expected \(5, 2, 8\)"):
        rnn.backward(np.zeros((5, 2, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="hidden_size"):
        RNN(3, 0)
    with pytest.raises(TypeError, match="dtype"):
        RNN(3, 4, dtype=np.int32)


def test_inputs_are_not_modified(backend):
    rng = np.random.default_rng(4)
    rnn = make_rnn(CONFIGS[3], backend, dtype=np.float32)
    x, h0, lengths = make_inputs(rnn, rng)
    copies = [x.copy(), h0.copy(), lengths.copy()]
    output, h_n = rnn(x, h0, lengths)
    grad_output, grad_h_n = np.ones_like(output), np.ones_like(h_n)
    rnn.backward(grad_output, grad_h_n)
    for before, after in zip(copies, [x, h0, lengths]):
        np.testing.assert_array_equal(before, after)
    assert np.all(grad_output == 1) and np.all(grad_h_n == 1)


# dropout in evaluation mode is none, in torch as here; it applies between layers only
TORCH_CASES = [(config, 0.0) for config in CONFIGS] + [(config, 0.5) for config in CONFIGS if config[0] > 1]


@pytest.mark.parametrize("config,dropout", TORCH_CASES,
                         ids=lambda v: config_id(v) if isinstance(v, tuple) else f"dropout{v}")
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_matches_torch(backend, config, dtype, dropout):
    """A torch.nn.RNN state dict loaded into pyrnn.RNN gives torch's outputs and gradients,
    lengths handled as torch's packed sequences; with dropout, both in evaluation mode."""
    torch = pytest.importorskip("torch")
    layers, bidirectional, bias, batch_first, with_lengths, nonlinearity = config
    torch.manual_seed(0)
    reference = torch.nn.RNN(3, 4, layers, nonlinearity=nonlinearity, bias=bias, batch_first=batch_first,
                             dropout=dropout, bidirectional=bidirectional).to(torch.float64)
    rnn = make_rnn(config, backend, dtype=dtype, dropout=dropout)
    if dropout:
        reference.eval()
        rnn.eval()
    rnn.load_state_dict({k: v.detach().numpy() for k, v in reference.state_dict().items()})
    rng = np.random.default_rng(5)
    # torch's packed sequences refuse empty rows (pyrnn gives them h_n = h0, tested above)
    x, h0, lengths = make_inputs(rnn, rng, T=6, with_lengths=with_lengths, shortest=1)

    x_t = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    h0_t = torch.tensor(h0, dtype=torch.float64, requires_grad=True)
    if with_lengths:
        packed = torch.nn.utils.rnn.pack_padded_sequence(x_t, torch.tensor(lengths), batch_first=batch_first,
                                                         enforce_sorted=False)
        packed_output, h_n_t = reference(packed, h0_t)
        output_t, _ = torch.nn.utils.rnn.pad_packed_sequence(packed_output, batch_first=batch_first,
                                                             total_length=6)
    else:
        output_t, h_n_t = reference(x_t, h0_t)

    output, h_n = rnn(x, h0, lengths)
    weight_output = rng.standard_normal(output.shape).astype(dtype)
    weight_h_n = rng.standard_normal(h_n.shape).astype(dtype)
    ((output_t * torch.tensor(weight_output, dtype=torch.float64)).sum()
     + (h_n_t * torch.tensor(weight_h_n, dtype=torch.float64)).sum()).backward()
    grad_x = rnn.backward(weight_output, weight_h_n)

    # float32 against torch in float64, with the tolerance the kernel itself is held to, for the
    # longest sum that enters a gradient (over T·B rows; a layer above the first reads D·H inputs).
    allowed = tolerance(dtype, accumulated_terms(6, 4, rnn.num_directions * 4, 4)[1])
    expected = {"output": output_t, "h_n": h_n_t, "grad x": x_t.grad, "grad h0": h0_t.grad,
                **{f"grad {k}": p.grad for k, p in reference.named_parameters()}}
    actual = {"output": output, "h_n": h_n, "grad x": grad_x, "grad h0": rnn.grad_h0,
              **{f"grad {k}": g for k, g in rnn.grads.items()}}
    assert expected.keys() == actual.keys()
    errors = {name: relative_error(actual[name], expected[name].detach().numpy()) for name in expected}
    assert max(errors.values()) <= allowed, (errors, allowed)


def test_dropout_in_training_uses_the_generators_masks(backend):
    """In training mode each forward draws (L - 1, T, B, D·H) masks of {0, 1/(1 - p)} from the
    layer's generator and runs the stack with them, forward and backward; eval() turns it off."""
    rng = np.random.default_rng(6)
    p = 0.3
    rnn = RNN(3, 4, 3, bidirectional=True, batch_first=True, dropout=p, dtype=np.float64,
              backend=backend, seed=np.random.default_rng(9))
    x, h0, lengths = make_inputs(rnn, rng)
    generator = copy.deepcopy(rnn.generator)  # what the next forward will draw from
    output, h_n = rnn(x, h0, lengths)
    masks = (generator.random((2, 4, 5, 8)) >= p) / (1 - p)  # (L - 1, B, T, D·H): batch_first
    layers = [(rnn.params[f"weight_ih{s}"], rnn.params[f"weight_hh{s}"],
               rnn.params[f"bias_ih{s}"] + rnn.params[f"bias_hh{s}"])
              for s in ("_l0", "_l0_reverse", "_l1", "_l1_reverse", "_l2", "_l2_reverse")]
    options = dict(lengths=lengths, batch_first=True, bidirectional=True, dropout_masks=masks,
                   backend="numpy")
    expected = pyrnn.stack_forward(x, layers, h0, **options)
    np.testing.assert_allclose(output, expected.output, rtol=0, atol=1e-12)
    np.testing.assert_allclose(h_n, expected.h_n, rtol=0, atol=1e-12)
    grad_output, grad_h_n = rng.standard_normal(output.shape), rng.standard_normal(h_n.shape)
    grad_x = rnn.backward(grad_output, grad_h_n)
    grads = pyrnn.stack_backward(grad_output, x, layers, expected.layer_outputs, h0,
                                 grad_h_n=grad_h_n, **options)
    np.testing.assert_allclose(grad_x, grads.x, rtol=0, atol=1e-12)
    np.testing.assert_allclose(rnn.grads["weight_ih_l2_reverse"], grads.layers[5].weight_ih, rtol=0, atol=1e-12)
    np.testing.assert_allclose(rnn.grads["bias_hh_l1"], grads.layers[2].bias, rtol=0, atol=1e-12)

    assert not np.array_equal(rnn(x, h0, lengths)[0], output)  # new masks at every forward
    evaluated = rnn.eval()(x, h0, lengths)
    no_dropout = pyrnn.stack_forward(x, layers, h0, **dict(options, dropout_masks=None))
    np.testing.assert_allclose(evaluated[0], no_dropout.output, rtol=0, atol=1e-12)
    assert rnn.train().training and not rnn.eval().training


def test_dropout_masks_are_torchs():
    """Masks keep each value with probability 1 - p, scaled by 1/(1 - p) (torch.nn.Dropout);
    the same seed draws the same masks; p = 1 drops everything."""
    rnn = RNN(2, 50, 3, bidirectional=True, dropout=0.25, seed=1)
    masks = rnn._dropout_masks(40, 20)
    assert masks.shape == (2, 40, 20, 100) and masks.dtype == np.float32
    assert set(np.unique(masks)) == {0, np.float32(1 / 0.75)}
    assert abs(np.mean(masks == 0) - 0.25) < 0.01  # 160000 draws: the standard error is 0.001
    np.testing.assert_array_equal(masks, RNN(2, 50, 3, bidirectional=True, dropout=0.25, seed=1)._dropout_masks(40, 20))
    assert not RNN(2, 3, 2, dropout=1.0)._dropout_masks(4, 2).any()
    assert RNN(2, 3, 2, dropout=0.5).eval()._dropout_masks(4, 2) is None
    assert RNN(2, 3, 2)._dropout_masks(4, 2) is None


def test_relu_rnn_is_relu():
    """nonlinearity="relu": outputs are max(a, 0), so with negative biases and zero input every
    output is 0; tanh's would be negative."""
    x = np.zeros((3, 2, 2))
    for nonlinearity, check in (("relu", lambda out: np.all(out == 0)), ("tanh", lambda out: np.all(out < 0))):
        rnn = RNN(2, 3, 2, nonlinearity=nonlinearity, dtype=np.float64, seed=0)
        for name in rnn.params:
            if name.startswith("bias"):
                rnn.params[name][...] = -0.5
        assert check(rnn(x)[0]), nonlinearity


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="nonlinearity must be one of 'tanh', 'relu', got 'gelu'"):
        RNN(3, 4, nonlinearity="gelu")
    for dropout in (-0.1, 1.5, "0.5", True):
        with pytest.raises(ValueError, match=r"dropout must be a number in \[0, 1\]"):
            RNN(3, 4, 2, dropout=dropout)
    with pytest.warns(UserWarning, match="dropout=0.5 has no effect with num_layers=1"):
        RNN(3, 4, dropout=0.5)


def test_params_and_grads_keep_their_identity(backend):
    """An optimizer holds the arrays of .params and .grads: forward and backward on the stack
    write into them in place, never replace them."""
    rng = np.random.default_rng(7)
    rnn = make_rnn(CONFIGS[3], backend)
    params, grads = dict(rnn.params), dict(rnn.grads)
    x, h0, lengths = make_inputs(rnn, rng)
    for _ in range(2):
        output, h_n = rnn(x, h0, lengths)
        rnn.backward(rng.standard_normal(output.shape), rng.standard_normal(h_n.shape))
        assert all(rnn.params[k] is v for k, v in params.items())
        assert all(rnn.grads[k] is v for k, v in grads.items())
    assert all(np.any(g != 0) for g in rnn.grads.values())

"""pyrnn.torch against torch.nn.RNN / torch.nn.RNNCell on the kernel: parity over randomised
configurations (outputs, h_n and every gradient), the biases' gradients, parameters and state
dicts, convert(), dropout, gradcheck of both routes, torch's errors, no copies at the boundary.
These depend on the backend the kernel runs on ($PYRNN_BACKEND); tests/test_torch_integration.py
has the rest (operators, compile, export, fallbacks, threads, DDP).

Parity is measured against torch in float64 on the same (float32-representable) values: float64
must agree to 1e-10, float32 to pyrnn.testing's tolerance for the longest sum involved.
"""
import random

import numpy as np
import pytest

import pyrnn
from pyrnn import testing

torch = pytest.importorskip("torch", reason="torch is optional (pip install torch); CI installs it")
pt = pytest.importorskip("pyrnn.torch")
from torch.nn.utils.rnn import pack_padded_sequence  # noqa: E402


def random_config(seed):
    """A configuration of every constructor option and input kind, drawn from the seed; seeds
    0-5 pin the corners (sizes of 1, packed unsorted, unbatched, no bias, three layers)."""
    rng = random.Random(seed)
    config = dict(num_layers=rng.choice([1, 1, 2, 3]), bidirectional=rng.random() < 0.5,
                  bias=rng.random() < 0.7, batch_first=rng.random() < 0.4,
                  nonlinearity=rng.choice(["tanh", "relu"]), dtype=rng.choice(["float32", "float64"]),
                  input=rng.choice(["padded", "packed", "packed sorted", "unbatched"]),
                  h0=rng.random() < 0.6, T=rng.randint(1, 7), B=rng.randint(1, 5),
                  I=rng.randint(1, 6), H=rng.randint(1, 8))
    corners = [dict(T=1, B=1, I=1, H=1, input="padded"), dict(input="packed", B=5, h0=True),
               dict(input="unbatched", h0=True, bidirectional=True), dict(bias=False, num_layers=2),
               dict(num_layers=3, bidirectional=True, batch_first=True, input="packed", B=4),
               dict(T=1, input="unbatched", h0=False)]
    if seed < len(corners):
        config.update(corners[seed])
    return config


CONFIGS = [random_config(seed) for seed in range(40)]


def config_id(c):
    return (f"L{c['num_layers']}{'-bi' if c['bidirectional'] else ''}{'' if c['bias'] else '-nobias'}"
            f"{'-bf' if c['batch_first'] else ''}-{c['nonlinearity']}-{c['dtype']}-{c['input'].replace(' ', '-')}"
            f"{'-h0' if c['h0'] else ''}-T{c['T']}B{c['B']}I{c['I']}H{c['H']}")


def module_pair(c, dtype):
    """(torch.nn.RNN in float64, pyrnn.torch.RNN in dtype) holding the same float32 values."""
    options = dict(num_layers=c["num_layers"], nonlinearity=c["nonlinearity"], bias=c["bias"],
                   batch_first=c["batch_first"], bidirectional=c["bidirectional"])
    reference = torch.nn.RNN(c["I"], c["H"], **options).double()
    with torch.no_grad():
        for p in reference.parameters():
            p.copy_(p.float().double())
    ours = pt.RNN(c["I"], c["H"], **options, dtype=dtype)
    ours.load_state_dict(reference.state_dict())
    return reference, ours


def make_inputs(c, seed):
    """(input, h0 or None, lengths or None) in float64 with float32-representable values."""
    g = torch.Generator().manual_seed(seed)
    T, B = c["T"], c["B"]
    D = 2 if c["bidirectional"] else 1
    shape = (T, c["I"]) if c["input"] == "unbatched" else (B, T, c["I"]) if c["batch_first"] else (T, B, c["I"])
    x = torch.randn(shape, generator=g).float().double()
    h0_shape = (c["num_layers"] * D, c["H"]) if c["input"] == "unbatched" else (c["num_layers"] * D, B, c["H"])
    h0 = torch.randn(h0_shape, generator=g).float().double() if c["h0"] else None
    lengths = None
    if c["input"].startswith("packed"):
        lengths = torch.randint(1, T + 1, (B,), generator=g)
        if c["input"] == "packed sorted":
            lengths = lengths.sort(descending=True).values
    return x, h0, lengths


def run(module, c, x, h0, lengths, dtype, seed):
    """Outputs and gradients (of Σ output·R + Σ h_n·S) as float64 tensors, by name."""
    x = x.to(dtype, copy=True).requires_grad_()
    h0 = None if h0 is None else h0.to(dtype, copy=True).requires_grad_()
    module.zero_grad()
    if lengths is None:
        output, h_n = module(x, h0)
        data = output
    else:
        packed = pack_padded_sequence(x, lengths, batch_first=c["batch_first"],
                                      enforce_sorted=c["input"] == "packed sorted")
        output, h_n = module(packed, h0)
        assert isinstance(output, torch.nn.utils.rnn.PackedSequence)
        for name in ("batch_sizes", "sorted_indices", "unsorted_indices"):
            mine, theirs = getattr(output, name), getattr(packed, name)
            assert (mine is None and theirs is None) or torch.equal(mine, theirs), name
        data = output.data
    g = torch.Generator().manual_seed(seed + 1)
    weight_output, weight_h_n = torch.randn(data.shape, generator=g), torch.randn(h_n.shape, generator=g)
    ((data * weight_output.to(dtype)).sum() + (h_n * weight_h_n.to(dtype)).sum()).backward()
    results = {"output": data, "h_n": h_n, "grad input": x.grad}
    if h0 is not None:
        results["grad h0"] = h0.grad
    results.update({f"grad {name}": p.grad for name, p in module.named_parameters()})
    return {name: value.detach().double() for name, value in results.items()}


def tolerance(c, dtype):
    D = 2 if c["bidirectional"] else 1
    _, backward = testing.accumulated_terms(c["T"], c["B"], max(c["I"], D * c["H"]), c["H"])
    return testing.tolerance(np.float32 if dtype == torch.float32 else np.float64,
                             backward * c["num_layers"])


@pytest.mark.parametrize("c", CONFIGS, ids=config_id)
def test_matches_torch_rnn(c, kernel_calls):
    dtype = getattr(torch, c["dtype"])
    reference, ours = module_pair(c, dtype)
    x, h0, lengths = make_inputs(c, seed=CONFIGS.index(c))
    expected = run(reference, c, x, h0, lengths, torch.float64, seed=3)
    actual = run(ours, c, x, h0, lengths, dtype, seed=3)
    assert actual.keys() == expected.keys()
    tol = tolerance(c, dtype)
    for name in expected:
        error = testing.relative_error(actual[name].numpy(), expected[name].numpy())
        assert error <= tol, f"{name}: {error:.2e} > {tol:.2e}"
    assert len(kernel_calls) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
@pytest.mark.parametrize("with_hx", [True, False], ids=["hx", "no-hx"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_cell_matches_torch_rnn_cell(dtype, batched, with_hx, bias, nonlinearity, kernel_calls):
    torch.manual_seed(0)
    reference = torch.nn.RNNCell(4, 6, bias=bias, nonlinearity=nonlinearity, dtype=dtype)
    ours = pt.RNNCell(4, 6, bias=bias, nonlinearity=nonlinearity, dtype=dtype)
    ours.load_state_dict(reference.state_dict())
    x = torch.randn((3, 4) if batched else (4,), dtype=dtype)
    hx = torch.randn((3, 6) if batched else (6,), dtype=dtype) if with_hx else None
    results = []
    for module in (reference, ours):
        inputs = [x.clone().requires_grad_()] + ([hx.clone().requires_grad_()] if with_hx else [])
        h = module(*inputs)
        h = module(inputs[0] * 0.5, h)  # two steps: the second one's hx is the first one's output
        (h * torch.arange(h.numel(), dtype=dtype).reshape(h.shape)).sum().backward()
        results.append([h] + [t.grad for t in inputs] + [p.grad for p in module.parameters()])
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    for theirs, mine in zip(*results):
        assert mine.shape == theirs.shape
        torch.testing.assert_close(mine, theirs, rtol=0, atol=tol)
    assert len(kernel_calls) == 2


def test_the_two_biases_get_their_own_equal_gradients():
    rnn = pt.RNN(3, 4, num_layers=2, bidirectional=True)
    output, h_n = rnn(torch.randn(5, 2, 3))
    (output.sum() + h_n.sum()).backward()
    for suffix in ("_l0", "_l0_reverse", "_l1", "_l1_reverse"):
        bias_ih, bias_hh = getattr(rnn, "bias_ih" + suffix), getattr(rnn, "bias_hh" + suffix)
        assert bias_ih.grad is not bias_hh.grad and torch.equal(bias_ih.grad, bias_hh.grad)
    output, h_n = rnn(torch.randn(5, 2, 3))  # a second backward accumulates into each
    before = rnn.bias_hh_l0.grad.clone()
    (output.sum() + h_n.sum()).backward()
    assert torch.equal(rnn.bias_ih_l0.grad, rnn.bias_hh_l0.grad) and not torch.equal(before, rnn.bias_hh_l0.grad)


def test_parameters_and_initialisation_are_torch_rnns():
    options = dict(num_layers=2, nonlinearity="relu", bias=True, batch_first=True, dropout=0.25,
                   bidirectional=True)
    torch.manual_seed(7)
    reference = torch.nn.RNN(3, 5, **options)
    torch.manual_seed(7)
    ours = pt.RNN(3, 5, **options)
    assert [(n, p.shape) for n, p in ours.named_parameters()] == [
        (n, p.shape) for n, p in reference.named_parameters()]
    for (name, mine), theirs in zip(ours.named_parameters(), reference.parameters()):
        assert isinstance(mine, torch.nn.Parameter) and torch.equal(mine, theirs), name
    assert repr(ours) == repr(reference)
    assert pt.RNN(3, 5, 2, "relu").nonlinearity == "relu"  # positional, as nn.RNN's signature
    with pytest.raises(ValueError, match="Unknown nonlinearity 'gelu'"):
        pt.RNN(3, 5, nonlinearity="gelu")


def test_state_dicts_load_both_ways():
    reference = torch.nn.RNN(3, 4, num_layers=2, bidirectional=True)
    ours = pt.RNN(3, 4, num_layers=2, bidirectional=True)
    ours.load_state_dict(reference.state_dict())
    x = torch.randn(6, 2, 3)
    torch.testing.assert_close(ours(x), reference(x))
    back = torch.nn.RNN(3, 4, num_layers=2, bidirectional=True)
    back.load_state_dict(pt.RNN(3, 4, num_layers=2, bidirectional=True).state_dict())
    assert back.state_dict().keys() == ours.state_dict().keys()


class Doubled(torch.nn.Module):
    """A parametrization: the weight is twice the stored one, computed at each access."""

    def forward(self, weight):
        return 2 * weight


@pytest.mark.parametrize("module", ["RNN", "RNNCell"])
def test_swapped_and_parametrized_weights_are_the_ones_run(module, kernel_calls):
    """The kernel runs on the parameters as the module holds them at the call: swapped in by
    torch.func.functional_call, or computed by a parametrization (the weight then is a property,
    no longer among the module's _parameters)."""
    torch.manual_seed(0)
    reference = getattr(torch.nn, module)(3, 4)
    ours = getattr(pt, module)(3, 4)
    ours.load_state_dict(reference.state_dict())
    x = torch.randn(5, 2, 3) if module == "RNN" else torch.randn(2, 3)
    swapped = {name: torch.randn_like(p) for name, p in reference.named_parameters()}
    torch.testing.assert_close(torch.func.functional_call(ours, swapped, (x,)),
                               torch.func.functional_call(reference, swapped, (x,)))
    weight_hh = "weight_hh_l0" if module == "RNN" else "weight_hh"
    for m in (reference, ours):
        torch.nn.utils.parametrize.register_parametrization(m, weight_hh, Doubled())
    assert weight_hh not in ours._parameters
    torch.testing.assert_close(ours(x), reference(x))
    assert len(kernel_calls) == 2


class Mixed(torch.nn.Module):
    """A model mixing Embedding, RNN, RNNCell and Linear."""

    def __init__(self):
        super().__init__()
        self.embedding = torch.nn.Embedding(10, 4)
        self.encoder = torch.nn.Sequential(torch.nn.RNN(4, 6, num_layers=2, batch_first=True))
        self.decoder = torch.nn.RNNCell(6, 6)
        self.head = torch.nn.Linear(6, 10)

    def forward(self, ids):
        output, h_n = self.encoder[0](self.embedding(ids))
        h = self.decoder(output[:, -1], h_n[-1])
        return self.head(h)


def test_convert_swaps_modules_and_keeps_the_parameter_objects(kernel_calls):
    torch.manual_seed(0)
    model = Mixed()
    ids = torch.randint(0, 10, (3, 5))
    expected = model(ids)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    parameters = list(model.parameters())
    assert pt.convert(model) is model
    assert type(model.encoder[0]) is pt.RNN and type(model.decoder) is pt.RNNCell
    assert all(a is b for a, b in zip(model.parameters(), parameters))
    logits = model(ids)
    assert len(kernel_calls) == 2
    torch.testing.assert_close(logits, expected)
    logits.sum().backward()
    before = model.encoder[0].weight_hh_l1.detach().clone()
    optimizer.step()  # the optimizer built before convert() updates the converted model
    assert not torch.equal(model.encoder[0].weight_hh_l1, before)
    rnn = torch.nn.RNN(2, 3)
    assert type(pt.convert(rnn)) is pt.RNN and pt.convert(rnn).weight_ih_l0 is rnn.weight_ih_l0


def test_dropout_eval_equals_torch_and_train_follows_the_seed():
    torch.manual_seed(0)
    reference = torch.nn.RNN(3, 8, num_layers=3, dropout=0.5, bidirectional=True)
    ours = pt.RNN(3, 8, num_layers=3, dropout=0.5, bidirectional=True)
    ours.load_state_dict(reference.state_dict())
    x = torch.randn(7, 4, 3)
    reference.eval(), ours.eval()
    torch.testing.assert_close(ours(x), reference(x))
    ours.train()
    torch.manual_seed(1)
    first = ours(x)[0]
    torch.manual_seed(1)
    assert torch.equal(ours(x)[0], first)
    torch.manual_seed(2)
    assert not torch.equal(ours(x)[0], first)
    assert not torch.allclose(first, reference(x)[0])


def test_dropout_of_one_zeroes_what_the_next_layer_reads():
    """p = 1: layer 1 reads zeros, so the output is a one-layer RNN's over a zero input."""
    stack = pt.RNN(3, 4, num_layers=2, dropout=1.0)
    top = torch.nn.RNN(4, 4)
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(top, name + "_l0").copy_(getattr(stack, name + "_l1"))
    output, _ = stack(torch.randn(5, 2, 3))
    torch.testing.assert_close(output, top(torch.zeros(5, 2, 4))[0])


def test_gradcheck_through_both_routes_in_float64():
    torch.manual_seed(0)
    T, B, I, H, L = 4, 3, 2, 3, 2
    x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2 * L, B, H, dtype=torch.float64, requires_grad=True)
    weights = [w.detach().double().requires_grad_()
               for w in pt.RNN(I, H, num_layers=L, bidirectional=True)._flat_weights]
    lengths = torch.tensor([4, 1, 3])
    masks = torch.empty(L - 1, T, B, 2 * H, dtype=torch.float64).bernoulli_(0.7) / 0.7

    def eager(x, h0, *weights):
        return pt._Stack.apply(x, h0, lengths, masks, (L, True, "tanh", "fp32"), *weights)

    def operator(x, h0, *weights):
        return pt.rnn_forward(x, list(weights), h0, lengths, masks, L, True, "tanh", "fp32")[:2]

    for function in (eager, operator):
        assert torch.autograd.gradcheck(function, (x, h0, *weights))


# --- errors: torch's, for the same malformed input

MALFORMED = {
    "wrong feature size": lambda: ((torch.randn(5, 2, 4),), {}),
    "rank 4": lambda: ((torch.randn(5, 2, 3, 1),), {}),
    "rank 1": lambda: ((torch.randn(5),), {}),
    "h0 batch": lambda: ((torch.randn(5, 2, 3), torch.randn(1, 3, 6)), {}),
    "h0 rank": lambda: ((torch.randn(5, 2, 3), torch.randn(2, 6)), {}),
    "unbatched h0 rank": lambda: ((torch.randn(5, 3), torch.randn(1, 1, 6)), {}),
    "h0 layers": lambda: ((torch.randn(5, 2, 3), torch.randn(2, 2, 6)), {}),
    "integer input": lambda: ((torch.ones(5, 2, 3, dtype=torch.int64),), {}),
    "float64 input, float32 weights": lambda: ((torch.randn(5, 2, 3, dtype=torch.float64),), {}),
    "packed h0 batch": lambda: ((pack_padded_sequence(torch.randn(5, 2, 3), torch.tensor([5, 2])),
                                 torch.randn(1, 3, 6)), {}),
}


def raised(call):
    with pytest.raises(Exception) as info:
        call()
    return type(info.value), str(info.value)


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_input_raises_torchs_error(case):
    reference, ours = torch.nn.RNN(3, 6), pt.RNN(3, 6)
    args, kwargs = MALFORMED[case]()
    kind, message = raised(lambda: reference(*args, **kwargs))
    assert raised(lambda: ours(*args, **kwargs)) == (kind, message)
    assert issubclass(kind, (ValueError, TypeError, RuntimeError))


CELL_MALFORMED = {
    "wrong feature size": lambda: (torch.randn(2, 4),),
    "rank 3": lambda: (torch.randn(1, 2, 3),),
    "hx batch": lambda: (torch.randn(2, 3), torch.randn(3, 6)),
    "hx size": lambda: (torch.randn(2, 3), torch.randn(2, 5)),
    "hx rank": lambda: (torch.randn(3), torch.randn(1, 6)),
    "integer input": lambda: (torch.ones(2, 3, dtype=torch.int64),),
}


@pytest.mark.parametrize("case", sorted(CELL_MALFORMED))
def test_cell_malformed_input_raises_torchs_error(case):
    reference, ours = torch.nn.RNNCell(3, 6), pt.RNNCell(3, 6)
    args = CELL_MALFORMED[case]()
    assert raised(lambda: ours(*args)) == raised(lambda: reference(*args))


def test_tensors_reach_the_kernel_without_copies(monkeypatch):
    """A contiguous CPU input and the parameters reach pyrnn.stack_forward as views of their
    memory, and the output tensor is the kernel's array."""
    model = pt.RNN(3, 4, num_layers=2)
    x, h0 = torch.randn(5, 2, 3), torch.randn(2, 2, 4)
    seen = {}
    stack_forward = pyrnn.stack_forward

    def spying(x, layers, h0, **options):
        seen.update(x=x, layers=layers, h0=h0, result=stack_forward(x, layers, h0, **options))
        return seen["result"]

    monkeypatch.setattr(pyrnn, "stack_forward", spying)
    output, h_n = model(x, h0)
    assert seen["x"].ctypes.data == x.data_ptr() and seen["h0"].ctypes.data == h0.data_ptr()
    for k, (weight_ih, weight_hh, _) in enumerate(seen["layers"]):
        assert weight_ih.ctypes.data == getattr(model, f"weight_ih_l{k}").data_ptr()
        assert weight_hh.ctypes.data == getattr(model, f"weight_hh_l{k}").data_ptr()
    assert output.data_ptr() == seen["result"].output.ctypes.data
    assert h_n.data_ptr() == seen["result"].h_n.ctypes.data



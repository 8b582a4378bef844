"""pyrnn.torch against torch.nn.RNN / torch.nn.RNNCell: parity over randomised configurations
(outputs, h_n and every gradient), state dicts, convert(), dropout, the operators (opcheck,
gradcheck, torch.compile, torch.export), each fallback to torch, errors and threads.

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
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence  # noqa: E402

# Inductor's compilation and forward-mode AD's decompositions use torch.jit.script internally,
# which warns of its own deprecation.
TORCH_JIT_DEPRECATED = pytest.mark.filterwarnings("ignore:`torch.jit.script.*` is deprecated")


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


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the calls that reach pyrnn's kernel (pyrnn.stack_forward): a fallback makes none."""
    calls = []
    stack_forward = pyrnn.stack_forward

    def counting(x, *args, **kwargs):
        calls.append(x.shape)
        return stack_forward(x, *args, **kwargs)

    monkeypatch.setattr(pyrnn, "stack_forward", counting)
    return calls


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
        return pt._Stack.apply(x, h0, lengths, masks, (L, True, "tanh"), *weights)

    def operator(x, h0, *weights):
        return pt.rnn_forward(x, list(weights), h0, lengths, masks, L, True, "tanh")[:2]

    for function in (eager, operator):
        assert torch.autograd.gradcheck(function, (x, h0, *weights))


def operator_samples():
    torch.manual_seed(0)

    def sample(T, B, I, H, L, bidirectional, bias, h0, lengths, dropout):
        D = 2 if bidirectional else 1
        weights = [w.detach().requires_grad_() for w in
                   pt.RNN(I, H, num_layers=L, bias=bias, bidirectional=bidirectional)._flat_weights]
        masks = (torch.empty(L - 1, T, B, D * H).bernoulli_(0.5) * 2) if dropout else None
        return (torch.randn(T, B, I, requires_grad=True), weights,
                torch.randn(L * D, B, H, requires_grad=True) if h0 else None,
                lengths, masks, L, bidirectional, "tanh")

    return [sample(5, 3, 4, 6, 1, False, True, True, None, False),
            sample(5, 3, 4, 6, 2, True, False, False, torch.tensor([5, 2, 1]), True),
            sample(1, 1, 1, 1, 3, False, True, True, None, False)]


@pytest.mark.parametrize("index", range(3))
def test_opcheck_forward_and_backward(index):
    args = operator_samples()[index]
    torch.library.opcheck(pt.rnn_forward, args)
    output, h_n, lower_outputs = (t.detach() for t in pt.rnn_forward(*args))
    x, weights, h0, lengths, masks, L, bidirectional, nonlinearity = args
    torch.library.opcheck(pt.rnn_backward, (torch.randn_like(output), torch.randn_like(h_n), x.detach(),
                                            [w.detach() for w in weights], output, lower_outputs,
                                            None if h0 is None else h0.detach(), lengths, masks, L,
                                            bidirectional, nonlinearity))


def grads_of(model, x):
    model.zero_grad()
    x = x.clone().requires_grad_()
    output, h_n = model(x)
    (output.square().sum() + h_n.sum()).backward()
    return [output, h_n, x.grad] + [p.grad.clone() for p in model.parameters()]


@TORCH_JIT_DEPRECATED
def test_compile_fullgraph_equals_eager():
    torch.manual_seed(0)
    model = pt.RNN(3, 5, num_layers=2, bidirectional=True, batch_first=True)
    x = torch.randn(2, 6, 3)
    compiled = torch.compile(model, fullgraph=True)
    # Compiled here, not read from the caches a previous version of the operator may have filled.
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        results = grads_of(compiled, x)
    for eager, fast in zip(grads_of(model, x), results):
        torch.testing.assert_close(fast, eager, rtol=0, atol=0)


def test_export_runs_the_operator():
    torch.manual_seed(0)
    model = pt.RNN(3, 5, num_layers=2, bidirectional=True)
    x = torch.randn(6, 2, 3)
    program = torch.export.export(model, (x,))
    assert "torch.ops.pyrnn.rnn_forward" in program.graph_module.code
    torch.testing.assert_close(program.module()(x), model(x), rtol=0, atol=0)


# --- fallbacks: torch's own computation, on the same parameters


def test_meta_tensors_fall_back(kernel_calls):
    model = pt.RNN(3, 5, num_layers=2, bidirectional=True, device="meta")
    output, h_n = model(torch.empty(6, 2, 3, device="meta"))
    assert output.device.type == "meta" and output.shape == (6, 2, 10) and h_n.shape == (4, 2, 5)
    assert pt.RNNCell(3, 5, device="meta")(torch.empty(2, 3, device="meta")).shape == (2, 5)
    assert kernel_calls == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_cuda_tensors_fall_back(kernel_calls):
    model = pt.RNN(3, 5).cuda()
    reference = torch.nn.RNN(3, 5).cuda()
    reference.load_state_dict(model.state_dict())
    x = torch.randn(6, 2, 3, device="cuda")
    torch.testing.assert_close(model(x), reference(x))
    assert kernel_calls == []


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_tensors_fall_back(dtype, kernel_calls):
    reference = torch.nn.RNN(3, 5, num_layers=2, dtype=dtype)
    ours = pt.RNN(3, 5, num_layers=2, dtype=dtype)
    ours.load_state_dict(reference.state_dict())
    x = torch.randn(6, 2, 3, dtype=dtype)
    assert all(torch.equal(a, b) for a, b in zip(ours(x), reference(x)))
    cell = pt.RNNCell(3, 5, dtype=dtype)
    assert cell(x[0]).dtype == dtype
    assert kernel_calls == []


def test_autocast_falls_back(kernel_calls):
    reference = torch.nn.RNN(3, 5)
    ours = pt.RNN(3, 5)
    ours.load_state_dict(reference.state_dict())
    x = torch.randn(6, 2, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert all(torch.equal(a, b) for a, b in zip(ours(x), reference(x)))
    assert kernel_calls == []


def test_double_backward_recomputes_through_torch():
    """A gradient penalty: the backward of a backward (create_graph=True)."""
    torch.manual_seed(0)
    reference = torch.nn.RNN(3, 4, num_layers=2, bidirectional=True, dtype=torch.float64)
    ours = pt.RNN(3, 4, num_layers=2, bidirectional=True, dtype=torch.float64)
    ours.load_state_dict(reference.state_dict())
    x0 = torch.randn(5, 2, 3, dtype=torch.float64)
    lengths = torch.tensor([5, 3])
    results = []
    for model in (reference, ours):
        x = x0.clone().requires_grad_()
        output, h_n = model(pack_padded_sequence(x, lengths))
        padded, _ = pad_packed_sequence(output)
        (grad_x,) = torch.autograd.grad(padded.tanh().sum() + h_n.sum(), x, create_graph=True)
        grad_x.square().sum().backward()
        results.append([grad_x] + [p.grad for p in model.parameters()])
    for mine, theirs in zip(*results):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-10)


def test_functorch_transforms_fall_back(kernel_calls):
    torch.manual_seed(0)
    model = pt.RNN(3, 4, dtype=torch.float64)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    params = dict(model.named_parameters())

    def loss(params):
        output, _ = torch.func.functional_call(model, params, (x,))
        return output.sum()

    grads = torch.func.grad(loss)(params)
    assert kernel_calls == []
    model(x)[0].sum().backward()  # the kernel, through autograd
    assert len(kernel_calls) == 1
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=0, atol=1e-12)


@TORCH_JIT_DEPRECATED
def test_forward_mode_ad_falls_back(kernel_calls):
    import torch.autograd.forward_ad as fwAD

    reference = torch.nn.RNN(3, 4, dtype=torch.float64)
    ours = pt.RNN(3, 4, dtype=torch.float64)
    ours.load_state_dict(reference.state_dict())
    x, tangent = torch.randn(2, 5, 2, 3, dtype=torch.float64)
    jvps = []
    with fwAD.dual_level():
        for model in (reference, ours):
            output, _ = model(fwAD.make_dual(x, tangent))
            jvps.append(fwAD.unpack_dual(output).tangent)
    assert kernel_calls == []
    torch.testing.assert_close(*jvps, rtol=0, atol=0)


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


# --- threads and the boundary


@pytest.mark.skipif("cpp" not in pyrnn.available_backends(), reason="the native module is not built")
def test_pyrnn_set_num_threads_governs_the_kernel_inside_torch(monkeypatch):
    import pyrnn._cpp

    if pyrnn.resolve_backend() != "cpp":
        pytest.skip(f"the drop-in runs on {pyrnn.resolve_backend()} here ($PYRNN_BACKEND)")
    seen = []
    stack_forward = pyrnn.stack_forward

    def spying(*args, **kwargs):
        seen.append(pyrnn._cpp.get_num_threads())  # what the native kernel will use
        return stack_forward(*args, **kwargs)

    monkeypatch.setattr(pyrnn, "stack_forward", spying)
    torch.manual_seed(0)
    model = pt.RNN(256, 256)  # large enough for the kernel to split its work between threads
    x = torch.randn(20, 64, 256)
    previous = pyrnn.get_num_threads(), torch.get_num_threads()
    try:
        outputs = []
        for n in (1, 2):
            pyrnn.set_num_threads(n)
            torch.set_num_threads(3 - n)  # torch's own setting does not reach the kernel
            outputs.append(model(x)[0])
        assert seen == [1, 2]
        assert torch.equal(*outputs)  # and the kernel's results do not depend on it
    finally:
        pyrnn.set_num_threads(previous[0])
        torch.set_num_threads(previous[1])


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


# --- distributed


def test_ddp_on_two_processes_ends_where_one_process_does(tmp_path):
    """DistributedDataParallel (gloo, 2 processes on 127.0.0.1), each on half of the batch, ends
    with the parameters of one process trained on the whole batch."""
    import socket

    import ddp_training

    if not torch.distributed.is_available():
        pytest.skip("this torch was built without torch.distributed")
    with socket.socket() as s:  # a free port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = tmp_path / "parameters.pt"
    torch.multiprocessing.spawn(ddp_training.worker, args=(2, f"tcp://127.0.0.1:{port}", str(result)),
                                nprocs=2, join=True)
    distributed = torch.load(result)
    expected = ddp_training.one_process()
    initial = dict(ddp_training.model().named_parameters())
    assert distributed.keys() == expected.keys()
    for name, value in expected.items():
        assert not torch.equal(value, initial[name]), name  # trained
        torch.testing.assert_close(distributed[name], value, rtol=0, atol=1e-12)

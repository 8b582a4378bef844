"""pyrnn's kernel as a drop-in for torch.nn.RNN and torch.nn.RNNCell.

    from pyrnn.torch import RNN            # instead of torch.nn.RNN: same constructor, parameters,
    rnn = RNN(32, 64, num_layers=2)        # initialisation, state dict and forward contract
    model = pyrnn.torch.convert(model)     # or: every nn.RNN / nn.RNNCell inside a model, in place

What runs where:
- A float32 or float64 CPU computation runs on pyrnn's kernel: one call for the whole stack of
  layers forward and one backward, the tensors handed over as NumPy views of their memory (no
  copy where the layout allows; a batch_first or otherwise strided input is made contiguous once),
  the results handed back the same way.
- The kernel is registered with torch as two operators, ``torch.ops.pyrnn.rnn_forward`` and
  ``torch.ops.pyrnn.rnn_backward`` (torch.library.custom_op, with register_fake and
  register_autograd), which is what torch.compile(fullgraph=True) and torch.export see. In eager
  mode the modules call the same two functions through a torch.autograd.Function instead: on
  the tiny shape the dispatcher's route took 2.7x the Function's time for forward + backward
  (355 against 131 us of CPU time, 1 thread, loaded machine), more than the kernel's own.
- Under torch.autocast("cpu", dtype=torch.bfloat16), float32 parameters run on the kernel in bf16
  products (pyrnn's precision="bf16") and the results are bfloat16, as nn.RNN's are there.
- Anything else (other devices, float16/bfloat16 parameters, other autocasts, functorch
  transforms, forward-mode AD) runs torch's own nn.RNN / nn.RNNCell computation on the same
  parameters, and a backward with create_graph=True recomputes the step through torch's
  kernels, so double backward works too.

The kernel's threads are pyrnn's: pyrnn.set_num_threads(n) governs them; torch.set_num_threads
governs torch's own operations around them (docs/torch.md).

Shapes (docs/design.md §1): x (T, B, I); h0, h_n (L·D, B, H); layer_outputs (L, T, B, D·H), every
layer's output before dropout; weights flat in nn.RNN's order, per layer and direction
weight_ih, weight_hh[, bias_ih, bias_hh].
"""
import numpy as np
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import pyrnn

__all__ = ["RNN", "RNNCell", "convert"]

KERNEL_DTYPES = (torch.float32, torch.float64)


# ---------------------------------------------------------------------------------------------
# The stack on NumPy arrays: pyrnn's stack API, one call forward and one backward, on the
# backend named (pyrnn.resolve_backend(), once per forward: its backward runs on the same).


def _stack_forward(backend, x, layers, h0, lengths, dropout_masks, bidirectional, nonlinearity, precision):
    """-> (layer_outputs (L, T, B, D·H), h_n (L·D, B, H)) of pyrnn.stack_forward."""
    _, h_n, layer_outputs = pyrnn.stack_forward(x, layers, h0, lengths=lengths, bidirectional=bidirectional,
                                                dropout_masks=dropout_masks, nonlinearity=nonlinearity,
                                                backend=backend, precision=precision)
    return layer_outputs, h_n


def _stack_backward(backend, grad_output, x, layers, layer_outputs, h0, grad_h_n, lengths,
                    dropout_masks, bidirectional, nonlinearity, precision):
    """-> (grad_x, grad_h0, [(grad_weight_ih, grad_weight_hh, grad_bias) per layer·direction])
    of pyrnn.stack_backward; grad_output (T, B, D·H) is dL/d(the last layer's output)."""
    return pyrnn.stack_backward(grad_output, x, layers, layer_outputs, h0, grad_h_n=grad_h_n,
                                lengths=lengths, bidirectional=bidirectional,
                                dropout_masks=dropout_masks, nonlinearity=nonlinearity,
                                backend=backend, precision=precision)


# ---------------------------------------------------------------------------------------------
# Tensors in and out: NumPy views of CPU tensors, tensors over the kernel's arrays.


def _array(tensor):
    return None if tensor is None else tensor.numpy(force=True)


def _arrays(x, weights, h0, lengths, dropout_masks, num_layers, bidirectional):
    """The kernel's inputs as NumPy views of the tensors: (x, layers, h0, lengths, dropout_masks),
    layers as pyrnn's (weight_ih, weight_hh, bias or None) per layer·direction from nn.RNN's flat
    list; torch's two biases only ever enter as their sum."""
    w = [weight.numpy(force=True) for weight in weights]
    per = len(w) // (num_layers * (2 if bidirectional else 1))
    layers = [(w[i], w[i + 1], w[i + 2] + w[i + 3]) if per == 4 else (w[i], w[i + 1], None)
              for i in range(0, len(w), per)]
    return x.numpy(force=True), layers, _array(h0), _array(lengths), _array(dropout_masks)


def _tensor(array):
    """A tensor over the kernel's array (C-contiguous, as the operators' fake kernels promise)."""
    return torch.from_numpy(np.ascontiguousarray(array))


def _grad_weights(layer_grads, has_bias):
    """Gradient arrays in nn.RNN's flat order: one for both biases, as two arrays (a tensor may
    be accumulated into in place, and an operator's outputs may not alias)."""
    flat = []
    for grad_weight_ih, grad_weight_hh, grad_bias in layer_grads:
        flat += [grad_weight_ih, grad_weight_hh] + ([grad_bias, grad_bias.copy()] if has_bias else [])
    return flat


# ---------------------------------------------------------------------------------------------
# The operators: what torch.compile and torch.export see. The forward returns the last layer's
# output, h_n and the lower layers' outputs (which backward needs; not differentiable), as
# disjoint parts of the kernel's one (L, T, B, D·H) array.


@torch.library.custom_op("pyrnn::rnn_forward", mutates_args=(), device_types="cpu")
def rnn_forward(x: torch.Tensor, weights: list[torch.Tensor], h0: torch.Tensor | None,
                lengths: torch.Tensor | None, dropout_masks: torch.Tensor | None, num_layers: int,
                bidirectional: bool, nonlinearity: str, precision: str
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The whole stack forward -> (output (T, B, D·H), h_n (L·D, B, H),
    lower_outputs (L - 1, T, B, D·H))."""
    arrays = _arrays(x, weights, h0, lengths, dropout_masks, num_layers, bidirectional)
    layer_outputs, h_n = _stack_forward(pyrnn.resolve_backend(), *arrays, bidirectional, nonlinearity, precision)
    return _tensor(layer_outputs[-1]), _tensor(h_n), _tensor(layer_outputs[:-1])


@rnn_forward.register_fake
def _(x, weights, h0, lengths, dropout_masks, num_layers, bidirectional, nonlinearity, precision):
    T, B, _ = x.shape
    H, D = weights[1].shape[0], 2 if bidirectional else 1
    return (x.new_empty((T, B, D * H)), x.new_empty((num_layers * D, B, H)),
            x.new_empty((num_layers - 1, T, B, D * H)))


@torch.library.custom_op("pyrnn::rnn_backward", mutates_args=(), device_types="cpu")
def rnn_backward(grad_output: torch.Tensor, grad_h_n: torch.Tensor, x: torch.Tensor,
                 weights: list[torch.Tensor], output: torch.Tensor, lower_outputs: torch.Tensor,
                 h0: torch.Tensor | None, lengths: torch.Tensor | None,
                 dropout_masks: torch.Tensor | None, num_layers: int, bidirectional: bool,
                 nonlinearity: str, precision: str) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """BPTT through the stack -> (grad_x, grad_h0, [gradient of each weight, nn.RNN's order])."""
    x, layers, h0, lengths, dropout_masks = _arrays(x, weights, h0, lengths, dropout_masks,
                                                    num_layers, bidirectional)
    output = output.numpy()[None]
    # The layers' outputs in one array again: a copy when there are layers below the last one.
    layer_outputs = output if num_layers == 1 else np.concatenate((lower_outputs.numpy(), output))
    grad_x, grad_h0, layer_grads = _stack_backward(
        pyrnn.resolve_backend(), grad_output.numpy(), x, layers, layer_outputs, h0, grad_h_n.numpy(),
        lengths, dropout_masks, bidirectional, nonlinearity, precision)
    return (_tensor(grad_x), _tensor(grad_h0),
            [_tensor(g) for g in _grad_weights(layer_grads, len(weights) == 4 * len(layers))])


@rnn_backward.register_fake
def _(grad_output, grad_h_n, x, weights, output, lower_outputs, h0, lengths, dropout_masks,
      num_layers, bidirectional, nonlinearity, precision):
    return x.new_empty(x.shape), x.new_empty(grad_h_n.shape), [w.new_empty(w.shape) for w in weights]


def _setup_context(ctx, inputs, output):
    x, weights, h0, lengths, dropout_masks, *options = inputs
    ctx.mark_non_differentiable(output[2])
    ctx.save_for_backward(x, h0, lengths, dropout_masks, output[0], output[2], *weights)
    ctx.options = options  # num_layers, bidirectional, nonlinearity, precision


def _operator_backward(ctx, grad_output, grad_h_n, _):
    x, h0, lengths, dropout_masks, output, lower_outputs, *weights = ctx.saved_tensors
    grad_x, grad_h0, grad_weights = rnn_backward(
        grad_output.contiguous(), grad_h_n.contiguous(), x, weights, output, lower_outputs, h0,
        lengths, dropout_masks, *ctx.options)
    return grad_x, grad_weights, (None if h0 is None else grad_h0), None, None, None, None, None, None


rnn_forward.register_autograd(_operator_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# The eager route: the same two functions, without the dispatcher.


class _Stack(torch.autograd.Function):
    """_stack_forward and _stack_backward on NumPy views made once, in forward. The caller's
    tensors are saved too, so that torch's check for in-place changes before backward holds
    (lengths and dropout masks are the module's own, made for this call)."""

    @staticmethod
    def forward(ctx, x, h0, lengths, dropout_masks, options, *weights):
        num_layers, bidirectional, nonlinearity, precision = options
        arrays = _arrays(x, weights, h0, lengths, dropout_masks, num_layers, bidirectional)
        backend = pyrnn.resolve_backend()
        layer_outputs, h_n = _stack_forward(backend, *arrays, bidirectional, nonlinearity, precision)
        ctx.save_for_backward(x, h0, *weights)
        ctx.backend, ctx.arrays, ctx.layer_outputs, ctx.options = backend, arrays, layer_outputs, options
        ctx.lengths, ctx.dropout_masks = lengths, dropout_masks
        return torch.from_numpy(layer_outputs[-1]), torch.from_numpy(h_n)

    @staticmethod
    def backward(ctx, grad_output, grad_h_n):
        if torch.is_grad_enabled():  # create_graph=True: the gradient must itself be differentiable
            return _differentiable_backward(ctx, grad_output, grad_h_n)
        x, h0, *_ = ctx.saved_tensors  # (checks that nothing saved was changed in place)
        x_array, layers, h0_array, lengths, dropout_masks = ctx.arrays
        _, bidirectional, nonlinearity, precision = ctx.options
        grad_x, grad_h0, layer_grads = _stack_backward(
            ctx.backend, grad_output.numpy(), x_array, layers, ctx.layer_outputs, h0_array, grad_h_n.numpy(),
            lengths, dropout_masks, bidirectional, nonlinearity, precision)
        return (torch.from_numpy(grad_x), None if h0 is None else torch.from_numpy(grad_h0), None,
                None, None, *map(torch.from_numpy, _grad_weights(layer_grads, layers[0][2] is not None)))


def _differentiable_backward(ctx, grad_output, grad_h_n):
    """The backward as torch operations (for double backward): the stack recomputed by torch's own
    kernels from the saved inputs (in the inputs' dtype, also after a forward in bf16 products),
    and differentiated with create_graph=True."""
    x, h0, *weights = ctx.saved_tensors
    wrt = [(i, t) for i, t in enumerate([x, h0, *weights]) if t is not None and t.requires_grad]
    output, h_n = _torch_stack(x, weights, h0, ctx.lengths, ctx.dropout_masks, *ctx.options[:3])
    grads = torch.autograd.grad((output, h_n), [t for _, t in wrt], (grad_output, grad_h_n),
                                create_graph=True, allow_unused=True)
    result = [None] * (2 + len(weights))
    for (i, _), grad in zip(wrt, grads):
        result[i] = grad
    return (result[0], result[1], None, None, None, *result[2:])


def _torch_stack(x, weights, h0, lengths, dropout_masks, num_layers, bidirectional, nonlinearity):
    """(output, h_n) of the stack by torch's own RNN kernel, one layer at a time (so that the
    given dropout masks apply between layers), packed where rows have lengths."""
    run = torch._VF.rnn_tanh if nonlinearity == "tanh" else torch._VF.rnn_relu
    D = 2 if bidirectional else 1
    per = len(weights) // (num_layers * D)
    T, B, _ = x.shape
    if h0 is None:
        h0 = x.new_zeros((num_layers * D, B, weights[1].shape[0]))
    output, states = x, []
    for layer in range(num_layers):
        if layer > 0 and dropout_masks is not None:
            output = output * dropout_masks[layer - 1]
        params = weights[layer * D * per:(layer + 1) * D * per]
        hx = h0[layer * D:(layer + 1) * D]
        if lengths is None:
            output, h_n = run(output, hx, params, per == 4, 1, 0.0, False, bidirectional, False)
        else:
            packed = pack_padded_sequence(output, lengths, enforce_sorted=False)
            data, h_n = run(packed.data, packed.batch_sizes, hx.index_select(1, packed.sorted_indices),
                            params, per == 4, 1, 0.0, False, bidirectional)
            output, _ = pad_packed_sequence(packed._replace(data=data), total_length=T)
            h_n = h_n.index_select(1, packed.unsorted_indices)
        states.append(h_n)
    return output, torch.cat(states)


def _run_stack(x, weights, h0, lengths, dropout_masks, num_layers, bidirectional, nonlinearity,
               precision):
    """(output, h_n) on the kernel: through the operator when compiling or exporting, else
    through the autograd.Function (same functions, less overhead). In bf16 products (autocast)
    the inputs enter as float32 (exact: the kernel rounds every operand to bf16 itself) and the
    results leave as bfloat16, the dtype torch.nn.RNN returns under autocast."""
    if precision == "bf16":
        x, h0 = x.float(), None if h0 is None else h0.float()
    if torch.compiler.is_compiling():
        output, h_n, _ = rnn_forward(x, list(weights), h0, lengths, dropout_masks, num_layers,
                                     bidirectional, nonlinearity, precision)
    else:
        output, h_n = _Stack.apply(x, h0, lengths, dropout_masks,
                                   (num_layers, bidirectional, nonlinearity, precision), *weights)
    if precision == "bf16":
        return output.to(torch.bfloat16), h_n.to(torch.bfloat16)
    return output, h_n


def _parameters(module, names):
    """[getattr(module, name) for name in names], without Module.__getattr__'s cost (~0.5 us a
    name) for what its _parameters hold (a parametrized weight is a property: getattr)."""
    params = module._parameters
    return [params[name] if name in params else getattr(module, name) for name in names]


_CELL_WEIGHTS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")


def _kernel_precision(data, hx, weights):
    """The precision the kernel computes these tensors in: "fp32" (the tensors' own dtype,
    float32 or float64, which the parameters decide and data and hx must share), "bf16" for
    float32 parameters under torch.autocast("cpu", dtype=torch.bfloat16) (data and hx may then
    be bfloat16 too, as autocast's own outputs are), or None: torch's own computation runs."""
    dtype = weights[0].dtype
    if dtype not in KERNEL_DTYPES:
        return None
    # Autocast: float32 parameters and CPU bf16 autocast mean bf16 products; float64 is not
    # autocast's to cast (torch runs it as it is). Any other autocast (float16, another
    # device's) is torch's business.
    precision = "fp32"
    if torch._C._is_any_autocast_enabled():
        if not (torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16):
            return None
        if dtype == torch.float32:
            precision = "bf16"
    inputs_may_be = (dtype, torch.bfloat16) if precision == "bf16" else (dtype,)
    for tensor in (data, hx):
        if tensor is not None and (tensor.dtype not in inputs_may_be or not tensor.is_cpu
                                   or tensor.layout != torch.strided):
            return None
    for weight in weights:
        if weight.dtype != dtype or not weight.is_cpu or weight.layout != torch.strided:
            return None
    if torch.compiler.is_compiling():
        return precision
    # functorch transforms (vmap, grad, ...) and forward-mode AD need formulas the kernel does not have.
    if torch._C._are_functorch_transforms_active() or torch.autograd.forward_ad._current_level >= 0:
        return None
    return precision


# ---------------------------------------------------------------------------------------------
# The modules


class RNN(torch.nn.RNNBase):
    """torch.nn.RNN on pyrnn's kernel: the same constructor, parameters (names, shapes,
    initialisation), state dict and forward contract (batched or unbatched Tensor or PackedSequence
    input, hx optional, nn.RNN's shapes and errors); dropout between layers from torch's generator.

    It subclasses torch.nn.RNNBase rather than torch.nn.RNN, whose instances torch.compile
    refuses to trace ("Attempted to wrap RNN, GRU, or LSTM"): isinstance(m, torch.nn.RNN) is False.
    """

    def __init__(self, input_size, hidden_size, num_layers=1, nonlinearity="tanh", bias=True,
                 batch_first=False, dropout=0.0, bidirectional=False, device=None, dtype=None):
        if nonlinearity not in ("tanh", "relu"):  # nn.RNN's check and message
            raise ValueError(f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or 'relu'.")
        self.nonlinearity = nonlinearity
        super().__init__("RNN_TANH" if nonlinearity == "tanh" else "RNN_RELU", input_size,
                         hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         device=device, dtype=dtype)

    def forward(self, input, hx=None):
        # The parameters as they are now (torch.func.functional_call and torch.export swap them):
        # nn.RNN's _flat_weights, read afresh rather than reassigned as nn.RNN does.
        weights = _parameters(self, self._flat_weights_names)
        packed = isinstance(input, PackedSequence)
        data = input.data if packed else input
        precision = (_kernel_precision(data, hx, weights)
                     if isinstance(data, torch.Tensor) and (hx is None or isinstance(hx, torch.Tensor)) else None)
        if precision is None:
            return torch.nn.RNN.forward(self, input, hx)  # torch's computation (and its errors)
        if packed:
            return self._forward_packed(input, hx, weights, precision)
        if input.dim() not in (2, 3):
            raise ValueError(f"RNN: Expected input to be 2D or 3D, got {input.dim()}D tensor instead")
        batched = input.dim() == 3
        if batched and hx is not None and hx.dim() != 3:
            raise RuntimeError(f"For batched 3-D input, hx should also be 3-D but got {hx.dim()}-D tensor")
        if not batched:
            if hx is not None and hx.dim() != 2:
                raise RuntimeError(f"For unbatched 2-D input, hx should also be 2-D but got {hx.dim()}-D tensor")
            input = input.unsqueeze(0 if self.batch_first else 1)
            hx = None if hx is None else hx.unsqueeze(1)
        x = input.transpose(0, 1) if self.batch_first else input
        if not self._shapes_fit(x, hx):  # nn.RNN's checks raise their errors
            self.check_input(input, None) if hx is None else self.check_forward_args(input, hx, None)
        output, h_n = self._stack(x, hx, None, weights, precision)
        if self.batch_first:
            output = output.transpose(0, 1)
        if not batched:
            return output.squeeze(0 if self.batch_first else 1), h_n.squeeze(1)
        return output, h_n

    def _shapes_fit(self, x, hx):
        """Whether time-major 3-D x and hx pass nn.RNN's check_forward_args (its dtype check
        passed in _kernel_precision), in a fraction of its time."""
        _, B, I = x.shape
        D = 2 if self.bidirectional else 1
        return I == self.input_size and (hx is None or hx.shape == (self.num_layers * D, B, self.hidden_size))

    def _forward_packed(self, input, hx, weights, precision):
        """A PackedSequence in, one out: the kernel runs on the padded batch in the packed order
        (rows sorted by length), as torch permutes hx to that order and back."""
        self.check_input(input.data, input.batch_sizes)
        if hx is not None:
            self.check_hidden_size(hx, self.get_expected_hidden_size(input.data, input.batch_sizes))
            hx = self.permute_hidden(hx, input.sorted_indices)
        x, lengths = pad_packed_sequence(PackedSequence(input.data, input.batch_sizes))
        output, h_n = self._stack(x, hx, lengths, weights, precision)
        data = pack_padded_sequence(output, lengths).data
        return (PackedSequence(data, input.batch_sizes, input.sorted_indices, input.unsorted_indices),
                self.permute_hidden(h_n, input.unsorted_indices))

    def _stack(self, x, hx, lengths, weights, precision):
        """(output (T, B, D·H), h_n) of the whole stack for time-major x, on the kernel."""
        D = 2 if self.bidirectional else 1
        dropout_masks = None
        if self.training and self.dropout > 0 and self.num_layers > 1:
            T, B, _ = x.shape
            keep = 1 - self.dropout
            dropout_masks = weights[0].new_empty((self.num_layers - 1, T, B, D * self.hidden_size))
            if keep > 0:  # torch's dropout: {0, 1/keep} from torch's generator
                dropout_masks.bernoulli_(keep).div_(keep)
            else:
                dropout_masks.zero_()
        return _run_stack(x, weights, hx, lengths, dropout_masks, self.num_layers,
                          self.bidirectional, self.nonlinearity, precision)


class RNNCell(torch.nn.RNNCell):
    """torch.nn.RNNCell on pyrnn's kernel (one step, T = 1): the same constructor, parameters and
    forward contract (batched or unbatched input, hx optional)."""

    def forward(self, input, hx=None):
        weights = _parameters(self, _CELL_WEIGHTS if self.bias else _CELL_WEIGHTS[:2])
        precision = (_kernel_precision(input, hx, weights)
                     if isinstance(input, torch.Tensor) and (hx is None or isinstance(hx, torch.Tensor))
                     and self._shapes_fit(input, hx) else None)
        if precision is None:
            return torch.nn.RNNCell.forward(self, input, hx)  # torch's computation (and its errors)
        batched = input.dim() == 2
        x = input[None] if batched else input[None, None]
        h0 = None if hx is None else (hx[None] if batched else hx[None, None])
        output, _ = _run_stack(x, weights, h0, None, None, 1, False, self.nonlinearity, precision)
        return output.view(input.shape[:-1] + (self.hidden_size,))

    def _shapes_fit(self, input, hx):
        """Whether input and hx are shaped as nn.RNNCell accepts; if not, torch raises its error."""
        if input.dim() not in (1, 2) or input.shape[-1] != self.input_size:
            return False
        return hx is None or hx.shape == input.shape[:-1] + (self.hidden_size,)


def convert(model):
    """Replace every torch.nn.RNN and torch.nn.RNNCell inside model (model itself included) by
    pyrnn's, in place, keeping the very same Parameter objects (an optimizer built before goes on
    working), training mode and hooks. Returns the model (the new module if model itself was one)."""
    replacements = {torch.nn.RNN: RNN, torch.nn.RNNCell: RNNCell}
    if type(model) in replacements:
        return _converted(model, replacements[type(model)])
    for name, child in list(model.named_children()):
        setattr(model, name, convert(child))
    return model


def _converted(module, cls):
    """A cls sharing module's state: the same Parameter objects, buffers, hooks and settings."""
    new = cls.__new__(cls)
    new.__dict__.update(module.__dict__)
    new._parameters = module._parameters.copy()  # its own dicts, the same Parameter objects
    new._buffers, new._modules = module._buffers.copy(), module._modules.copy()
    if cls is RNN:
        new._init_flat_weights()  # its own list of the same Parameters
    return new

"""Training utilities over dicts of NumPy arrays: gradient clipping, SGD with momentum, Adam, and
the chunks of truncated BPTT.

``params`` and ``grads`` are dicts with the same keys (e.g. a layer's ``.params`` and ``.grads``,
or several layers' merged under prefixes). Clipping rescales ``grads`` in place; the optimizers
update ``params`` in place, keeping their state (momentum, moments, step count) in a dict the
caller owns and passes to every step (start from ``{}``). The update formulas are torch.optim's,
so a run can be compared with torch step by step.

Reproducibility: every random choice in pyrnn takes a ``seed`` (an int or a numpy Generator):
pass one Generator to the layers and the batching of a run and the run repeats exactly (for a
given backend and thread count).
"""
import numpy as np


def parameters(**layers):
    """(params, grads) of several layers merged into two dicts keyed "layer.name" (e.g.
    parameters(rnn=rnn, head=head) gives "rnn.weight_hh_l0", ..., "head.bias"), the form that
    clipping and the optimizers take. The arrays are the layers' own, so an update reaches the
    layers, and every backward's gradients are seen without merging again."""
    params, grads = {}, {}
    for prefix, layer in layers.items():
        for name in layer.params:
            params[f"{prefix}.{name}"] = layer.params[name]
            grads[f"{prefix}.{name}"] = layer.grads[name]
    return params, grads


def global_norm(grads):
    """√(Σ g²) over every array of grads, accumulated in float64."""
    return float(np.sqrt(sum(np.sum(np.square(g, dtype=np.float64)) for g in grads.values())))


def clip_grad_norm(grads, max_norm):
    """Scale all of grads in place so that their global norm is at most max_norm (as
    torch.nn.utils.clip_grad_norm_). Returns the norm before clipping, to log: a norm that
    keeps hitting the limit says the learning rate or the limit is wrong."""
    if not max_norm > 0:
        raise ValueError(f"max_norm must be positive, got {max_norm!r}")
    norm = global_norm(grads)
    scale = max_norm / (norm + 1e-6)  # torch's epsilon: a zero gradient stays zero
    if scale < 1:
        for g in grads.values():
            g *= scale
    return norm


def clip_grad_value(grads, clip_value):
    """Clamp every gradient element to [-clip_value, clip_value] in place. Returns the global
    norm before clipping."""
    if not clip_value > 0:
        raise ValueError(f"clip_value must be positive, got {clip_value!r}")
    norm = global_norm(grads)
    for g in grads.values():
        np.clip(g, -clip_value, clip_value, out=g)
    return norm


def _check_keys(params, grads):
    if params.keys() != grads.keys():
        raise KeyError(f"params and grads must have the same keys; only in params: "
                       f"{sorted(params.keys() - grads.keys())}, only in grads: "
                       f"{sorted(grads.keys() - params.keys())}")


def sgd(params, grads, state, *, lr, momentum=0.0):
    """One step of SGD with (heavy-ball) momentum, as torch.optim.SGD without dampening:
    v = momentum·v + g (v = g on the first step), p -= lr·v."""
    _check_keys(params, grads)
    if momentum == 0:
        for name, p in params.items():
            p -= lr * grads[name]
        return
    velocity = state.setdefault("velocity", {})
    for name, p in params.items():
        if name in velocity:
            velocity[name] *= momentum
            velocity[name] += grads[name]
        else:
            velocity[name] = grads[name].copy()
        p -= lr * velocity[name]


def adam(params, grads, state, *, lr=1e-3, betas=(0.9, 0.999), eps=1e-8):
    """One step of Adam, as torch.optim.Adam: bias-corrected running means of g and g²,
    p -= lr / (1 - β1^t) · m / (√v / √(1 - β2^t) + eps)."""
    _check_keys(params, grads)
    beta1, beta2 = betas
    state["step"] = step = state.get("step", 0) + 1
    first, second = state.setdefault("m", {}), state.setdefault("v", {})
    correction1, correction2 = 1 - beta1 ** step, 1 - beta2 ** step
    for name, p in params.items():
        g = grads[name]
        m = first.setdefault(name, np.zeros_like(p))
        v = second.setdefault(name, np.zeros_like(p))
        m *= beta1
        m += (1 - beta1) * g
        v *= beta2
        v += (1 - beta2) * g * g
        p -= (lr / correction1) * m / (np.sqrt(v) / np.sqrt(correction2) + eps)


def truncated_bptt(T, chunk_length, lengths=None):
    """Yield (time slice, lengths within the chunk or None) covering steps 0..T-1 in chunks of
    chunk_length: truncated BPTT.

    Run each chunk with h0 = the previous chunk's h_n and backpropagate within the chunk only:
    the state is carried forward exactly, the gradient stops at the chunk boundary (in NumPy
    there is no graph to detach; h0 of a chunk is simply a constant). With lengths, a row that
    has ended gets length 0 in later chunks, so its state is carried through unchanged.
    """
    if chunk_length < 1:
        raise ValueError(f"chunk_length must be a positive integer, got {chunk_length!r}")
    for start in range(0, T, chunk_length):
        stop = min(start + chunk_length, T)
        chunk_lengths = None if lengths is None else np.clip(np.asarray(lengths) - start, 0, stop - start)
        yield slice(start, stop), chunk_lengths

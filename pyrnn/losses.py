"""Losses for the heads on top of an RNN, each returning ``(loss, gradient)``.

Every loss is the mean over the positions it scores, and takes an optional boolean ``mask`` (True =
scored) to leave out padding: with ``mask = sequence_mask(lengths, T)`` a many-to-many loss
scores only each row's valid steps. Many-to-one losses are the same functions applied to
``pyrnn.nn.select_last(output, lengths)``. A call with nothing to score returns 0 and a zero
gradient. The loss is a Python float (computed in float64); the gradient has the input's dtype.

    softmax_cross_entropy: logits (..., C), targets (...) integers in [0, C)
    mse:                   prediction (...), target (...)
    bce_with_logits:       logits (...), targets (...) in [0, 1]
"""
import numpy as np

from . import _api
from .reference import valid_steps


def sequence_mask(lengths, T, batch_first=False):
    """(T, B) bool ((B, T) with batch_first): True on each row's first lengths[b] steps."""
    if np.ndim(lengths) != 1:
        raise ValueError(f"lengths must be 1-D (B,), got shape {np.shape(lengths)}")
    B = len(lengths)
    mask = valid_steps(_api._lengths(lengths, T, B), T, B)
    return mask.T if batch_first else mask


def softmax(logits, axis=-1):
    """exp(logits) / Σ exp(logits) along axis, shifted by the maximum so exp cannot overflow."""
    logits = np.asarray(logits)
    shifted = np.exp(logits - logits.max(axis=axis, keepdims=True))
    return shifted / shifted.sum(axis=axis, keepdims=True)


def _float(value):
    """value as a float array: float32/float64 kept, anything else as float64."""
    array = np.asarray(value)
    if array.dtype.kind != "f":
        array = array.astype(np.float64)
    return array


def _scored(mask, shape):
    """(bool array of the given shape: where the loss scores, how many positions that is)."""
    if mask is None:
        return np.ones(shape, dtype=bool), int(np.prod(shape))
    mask = np.asarray(mask)
    if mask.dtype != bool:
        raise TypeError(f"mask must be a bool array (True = scored), got dtype {mask.dtype}")
    try:
        mask = np.broadcast_to(mask, shape)
    except ValueError as error:
        raise ValueError(f"mask has shape {mask.shape}, expected {shape} or a shape that "
                         "broadcasts to it") from error
    return mask, int(mask.sum())


def _same_shape(name, array, other_name, other):
    if array.shape != other.shape:
        raise ValueError(f"{name} has shape {array.shape}, expected {other.shape} (the shape of {other_name})")


def _elementwise(name, value, target_name, target, mask):
    """An elementwise loss's inputs: (value as floats, target in its dtype and shape, scored, count)."""
    value = _float(value)
    target = np.asarray(target, dtype=value.dtype)
    _same_shape(target_name, target, name, value)
    return (value, target) + _scored(mask, value.shape)


def softmax_cross_entropy(logits, targets, mask=None):
    """Mean of -log softmax(logits)[target] over the scored positions.

    logits (..., C); targets (...) integers in [0, C) (anything where mask is False, e.g. -1
    padding); mask (...) bool or None. Returns (loss, dL/dlogits): the gradient is
    (softmax(logits) - onehot(target)) / count on scored positions, 0 elsewhere.
    """
    logits = _float(logits)
    targets = np.asarray(targets)
    if targets.dtype.kind not in "iu":
        raise TypeError(f"targets must be integer class indices, got dtype {targets.dtype}")
    if logits.ndim < 1 or targets.shape != logits.shape[:-1]:
        raise ValueError(f"targets has shape {targets.shape}, expected {logits.shape[:-1]} "
                         "(logits' shape without the class axis)")
    scored, count = _scored(mask, targets.shape)
    C = logits.shape[-1]
    out_of_range = scored & ((targets < 0) | (targets >= C))
    if np.any(out_of_range):
        raise ValueError(f"targets hold {targets[out_of_range][0]}, outside [0, C) = [0, {C})")
    if count == 0:
        return 0.0, np.zeros_like(logits)

    shifted = logits - logits.max(axis=-1, keepdims=True)  # log-sum-exp without overflow
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    safe_targets = np.where(scored, targets, 0)[..., None]  # padding targets may be anything
    picked = np.take_along_axis(log_probs, safe_targets, axis=-1)[..., 0]
    loss = -np.sum(picked, where=scored, dtype=np.float64) / count

    grad = np.exp(log_probs)
    np.put_along_axis(grad, safe_targets, np.take_along_axis(grad, safe_targets, axis=-1) - 1, axis=-1)
    grad *= scored[..., None] / count
    return float(loss), grad.astype(logits.dtype, copy=False)


def mse(prediction, target, mask=None):
    """Mean of (prediction - target)² over the scored elements -> (loss, dL/dprediction).

    mask: bool, shaped as prediction or broadcasting to it (e.g. (T, B, 1) for (T, B, F))."""
    prediction, target, scored, count = _elementwise("prediction", prediction, "target", target, mask)
    if count == 0:
        return 0.0, np.zeros_like(prediction)
    error = np.where(scored, prediction - target, 0)
    loss = np.sum(error.astype(np.float64) ** 2) / count
    return float(loss), (2 / count * error).astype(prediction.dtype, copy=False)


def bce_with_logits(logits, targets, mask=None):
    """Mean binary cross-entropy of sigmoid(logits) against targets in [0, 1] -> (loss, dL/dlogits).

    Written as max(z, 0) - z·y + log(1 + exp(-|z|)), which neither overflows nor loses the
    small probabilities that log(sigmoid(z)) would round to log(0). The gradient is
    (sigmoid(z) - y) / count.
    """
    logits, targets, scored, count = _elementwise("logits", logits, "targets", targets, mask)
    if count == 0:
        return 0.0, np.zeros_like(logits)
    z = logits.astype(np.float64)
    per_element = np.maximum(z, 0) - z * targets + np.log1p(np.exp(-np.abs(z)))
    loss = np.sum(per_element, where=scored) / count
    sigmoid = np.exp(-np.logaddexp(0, -z))  # 1 / (1 + exp(-z)) without overflow
    grad = np.where(scored, sigmoid - targets, 0) / count
    return float(loss), grad.astype(logits.dtype)

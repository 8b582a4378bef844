"""Stub of the native module pyrnn._cpp (csrc/bindings.cpp): the `cpp` backend.

Every array must already be C-contiguous with the dtype of x (float32 or float64), else a
TypeError; nothing is copied. bias, h0 and grad_h_n may be None (zeros); lengths is None or an
int64 array (B,) of values in [0, T]. Arguments are positional (keyword parsing costs on tiny
shapes). The GIL is released while the kernel runs.
"""
from typing import List, Literal, Optional, Sequence, Tuple

import numpy as np

Nonlinearity = Literal["tanh", "relu"]
Precision = Literal["fp32", "bf16"]  # bf16: float32 arrays only (else a TypeError)

def forward(x: np.ndarray, weight_ih: np.ndarray, weight_hh: np.ndarray,
            bias: Optional[np.ndarray] = None, h0: Optional[np.ndarray] = None,
            lengths: Optional[np.ndarray] = None,
            nonlinearity: Nonlinearity = "tanh",
            precision: Precision = "fp32") -> Tuple[np.ndarray, np.ndarray]:
    """(output (T, B, H), h_n (B, H)); see pyrnn.forward."""

def backward(grad_output: np.ndarray, x: np.ndarray, weight_ih: np.ndarray, weight_hh: np.ndarray,
             output: np.ndarray, h0: Optional[np.ndarray] = None,
             grad_h_n: Optional[np.ndarray] = None, lengths: Optional[np.ndarray] = None,
             nonlinearity: Nonlinearity = "tanh", precision: Precision = "fp32",
             ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(grad_x, grad_h0, grad_weight_ih, grad_weight_hh, grad_bias) by BPTT; see pyrnn.backward."""

def tanh(x: np.ndarray) -> np.ndarray:
    """Elementwise tanh by the kernel's vectorised approximation (float32 or float64, no conversion)."""

def isa() -> Literal["avx512amx", "avx512bf16", "avx512", "avx2", "baseline"]:
    """The instruction set of the kernel in use ($PYRNN_ISA forces a lower one); below
    avx512bf16, bf16 products are emulated (the same results within float32 roundoff)."""

def set_num_threads(n: int) -> None:
    """Use at most n >= 1 threads (pyrnn.set_num_threads calls this)."""

def get_num_threads() -> int:
    """The kernel's thread budget."""

def peak_loop(precision: Precision, threads: int, iterations: int) -> int:
    """Run `iterations` of the peak loop on each of up to `threads` pool threads; -> FLOP done."""

def peak_instruction(precision: Precision) -> str:
    """The instruction peak_loop(precision, ...) runs on this CPU, e.g. 'vdpbf16ps zmm'."""

Layer = Tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]  # (weight_ih, weight_hh, bias)

def stack_forward(x: np.ndarray, layers: Sequence[Layer], h0: Optional[np.ndarray] = None,
                  lengths: Optional[np.ndarray] = None, dropout_masks: Optional[np.ndarray] = None,
                  bidirectional: bool = False, nonlinearity: Nonlinearity = "tanh",
                  precision: Precision = "fp32") -> Tuple[np.ndarray, np.ndarray]:
    """(layer_outputs (L, T, B, D·H), h_n (L·D, B, H)) of L layers × D directions in one call;
    layers[l·D + d] is layer l's direction d; see pyrnn.stack_forward."""

def stack_backward(grad_output: np.ndarray, x: np.ndarray, layers: Sequence[Layer],
                   layer_outputs: np.ndarray, h0: Optional[np.ndarray] = None,
                   grad_h_n: Optional[np.ndarray] = None, lengths: Optional[np.ndarray] = None,
                   dropout_masks: Optional[np.ndarray] = None, bidirectional: bool = False,
                   nonlinearity: Nonlinearity = "tanh", precision: Precision = "fp32",
                   ) -> Tuple[np.ndarray, np.ndarray, List[Tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    """(grad_x, grad_h0, [(grad_weight_ih, grad_weight_hh, grad_bias) per layer and direction]);
    see pyrnn.stack_backward."""

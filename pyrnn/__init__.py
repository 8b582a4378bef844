"""pyrnn: the Elman RNN (tanh or relu) over whole sequences, forward and BPTT, on the CPU.

    output, h_n = pyrnn.forward(x, weight_ih, weight_hh, bias, h0, lengths=..., nonlinearity=...)
    grads = pyrnn.backward(grad_output, x, weight_ih, weight_hh, output, h0, grad_h_n=...)
    output, h_n, layer_outputs = pyrnn.stack_forward(x, layers, h0, bidirectional=..., ...)

Three backends compute the same thing: "cpp" (native), "numba" (JIT) and "numpy" (the reference,
pyrnn.reference). backend=None uses $PYRNN_BACKEND if set, else the fastest available.

On top of the kernel, in NumPy: pyrnn.RNN (multi-layer, bidirectional, torch.nn.RNN's conventions)
and pyrnn.Linear (pyrnn.nn), losses (pyrnn.losses), clipping and optimizers (pyrnn.optim).
"""
from ._api import Grads, backward, forward
from ._stack import StackGrads, StackOutput, stack_backward, stack_forward
from ._backends import available_backends, resolve_backend, unavailable_backends
from ._threads import get_num_threads, set_num_threads
from .gradcheck import GradcheckError, gradcheck, numerical_gradient, stack_gradcheck
from . import losses, nn, optim
from .nn import RNN, Linear

__version__ = "0.1.0"

__all__ = ["forward", "backward", "Grads", "stack_forward", "stack_backward", "StackOutput", "StackGrads",
           "available_backends", "unavailable_backends", "resolve_backend",
           "gradcheck", "stack_gradcheck", "GradcheckError", "numerical_gradient", "set_num_threads", "get_num_threads",
           "RNN", "Linear", "nn", "losses", "optim"]

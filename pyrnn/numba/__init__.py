"""The ``numba`` backend: the reference (pyrnn/reference.py) with its time loops compiled.

What it is for: the fast path when the native module is not built. The time steps run inside
one compiled loop with no Python and no allocation; the products over all T·B rows at once
(the weight gradients; the input term and grad_x too when weight_ih is big) stay NumPy matrix
products, i.e. BLAS (docs/design.md §3). One module per concern:

    intrinsics.py   what numba lacks: a register tile, a vector FMA, atomics, yielding the core
    products.py     the per-step product: a BLAS micro-kernel over packed weight panels
    activations.py  φ and φ' as a policy (tanh, relu); the vectorisable tanh32/tanh64
    threads.py      the step barrier, the worker threads, BLAS kept on one thread meanwhile
    kernel.py       the time loops, forward and backward, and the calls that run them

Why the compiled step is fast (measured against NumPy's BLAS on the same per-step products):
the product is a register-tiled micro-kernel over weights packed once per call (products.py),
fast enough that while weight_ih stays in cache the products with it are computed in the
compiled code too (kernel.IN_LOOP_MAX_WEIGHT_IH_BYTES); tanh is plain arithmetic that LLVM
vectorises (activations.py).

Results do not depend on the thread count beyond roundoff (float32: ~1e-6 relative): the time
loops compute every element on one thread in the same order whatever n is (bitwise identical
output and h_n when the input term is computed in the loop), but BLAS may round its products
over column slices differently, and each weight gradient is summed in n parts.

What it deliberately does not do: compile the big products over all T·B rows (BLAS does those
better), or compile anything at import (each function compiles on its first call per dtype and
activation and is cached on disk, ``cache=True``).
"""
import functools

from .. import reference
from .kernel import backward, forward

# A stack is the reference composition (pyrnn.reference.stack_forward) of this backend's layers.
stack_forward = functools.partial(reference.stack_forward, layer_forward=forward)
stack_backward = functools.partial(reference.stack_backward, layer_backward=backward)

__all__ = ["forward", "backward", "stack_forward", "stack_backward"]

"""`pyrnn bench`: every backend against torch.nn.RNN, side by side, in one process.

What it measures and how (docs/design.md §4):
- The problems are the shape grid below, with torch.nn.RNN's initialisation, no lengths; one
  layer by default, or a stack of layers × directions (--layers, --bidirectional), where pyrnn's
  contestant is pyrnn.RNN (one stack call per forward or backward) against a torch.nn.RNN of
  the same configuration and weights.
- "forward" times pyrnn.forward; "train" times forward followed by backward (all gradients,
  including those of x and h0, as torch's autograd gives for inputs that require grad).
- Before anything is timed, every contestant's output and gradients are compared with the
  float64 NumPy reference on the same inputs (tolerances from pyrnn.testing). A contestant that
  disagrees, or raises, is reported as such and never timed.
- The first call of each mode is timed on its own (it includes numba's JIT compilation when a
  backend meets a dtype for the first time in the process) and never mixed into the samples.
- Contestants are timed interleaved, A B C A B C ..., so that drift on a busy machine hits
  all alike. A sample is the mean of enough back-to-back calls to last ~10 ms; a figure is the
  median of the samples.
- The CPU's arithmetic limit (the native module's peak loop: independent FMAs, or vdpbf16ps for
  bf16, on the kernel's threads) is timed as one more contestant in every round, and the limit at
  a thread count is its best sample; GFLOP/s is read as a fraction of the limit of the precision
  in use (float64: half the float32 FMA rate, the same instructions on half the lanes). NumPy's
  GEMM is timed the same way as a peer, not as the limit: in this environment OpenBLAS may run
  its AVX2 kernels on an AVX-512 CPU ($OPENBLAS_CORETYPE). Without the native module there is no
  limit and %peak is not shown.
- Thread counts bound every pool: pyrnn.set_num_threads (native kernel, numba, NumPy's BLAS),
  torch.set_num_threads and every OpenMP runtime; what each pool then reports is recorded.

This module is also the benchmark suite's toolbox (benchmarks/): problems, runners, the gate.
"""
import gc
import json
import math
import os
import platform
import statistics
import sys
import textwrap
import time
from collections import namedtuple

import numpy as np
from tqdm import tqdm

import pyrnn

from . import _backends, reference, testing

Shape = namedtuple("Shape", ["T", "B", "I", "H"])
Stack = namedtuple("Stack", ["layers", "directions"])
ONE_LAYER = Stack(1, 1)

# docs/design.md §4; deepbench is a vanilla-RNN training shape of Baidu's DeepBench.
SHAPES = {
    "tiny": Shape(50, 1, 32, 64),
    "small": Shape(100, 16, 64, 128),
    "medium": Shape(100, 64, 256, 256),
    "large": Shape(50, 64, 512, 1024),
    "deepbench": Shape(50, 32, 1760, 1760),
}
DEFAULT_SHAPES = ("tiny", "small", "medium")  # the default run must finish in 2 minutes on 2 cores
MODES = ("forward", "train")
PEER = "torch"
RESULT_NAMES = testing.RESULT_NAMES
SAMPLE_SECONDS = 0.01  # a sample repeats a call until it lasts about this long
# With more than one thread, a pause before each sample lets the previous contestant's idle
# workers park: OpenBLAS's spin for ~2^28 cycles (~0.1 s) after a call, OpenMP runtimes spin too,
# and on 2 cores they would take the cores from whoever runs next (measured here: cpp's large
# train at 2 threads, 164 ms right after a 2-thread NumPy matmul, 85 ms 0.1 s later). Each
# contestant then runs as it would alone in a process, after untimed calls that wake its own
# parked threads (in a training loop they would still be running from the previous call). One
# such call is not enough on this VM: after the pause a core that was idle runs slow for a few
# milliseconds (measured: a 2-thread small 2x2 stack forward, 3.3 ms back to back, took 4.7 ms
# median, up to 7.3, in the 3 calls after a 0.15 s pause and one call; 3.4-3.8 ms after 30 ms of
# calls).
SETTLE_SECONDS = 0.15
WARM_SECONDS = 0.03  # of untimed calls after the pause
MAX_ROUNDS = 1000  # a cap on samples per contestant however large the time budget
PEAK_N = 1024  # the GEMM peer is an n×n×n matmul: large enough for OpenBLAS to reach its peak
PEAK_FLOP = 2 * PEAK_N**3
GEMM = "numpy gemm"  # the GEMM peer's name among the timed calls
LIMIT = "cpu limit {}"  # the CPU's limit of a precision, among the timed calls
LIMIT_ITERATIONS = 100_000  # of the peak loop per call: ~0.1-1 ms
TITLE_POINTS = 12  # the plot's title font size


def flops(shape, mode, stack=ONE_LAYER):
    """Floating-point operations of one call: forward 2·T·B·H·(I+H) per layer and direction
    (I = D·H above the first layer), forward+backward 3× that."""
    T, B, I, H = shape
    L, D = stack
    forward = D * 2 * T * B * H * ((I + H) + (L - 1) * (D * H + H))
    return forward if mode == "forward" else 3 * forward


def torch_or_none():
    """The torch module, or None when it cannot be imported (torch is only an optional peer)."""
    try:
        import torch
    except ImportError:
        return None
    return torch


def contestants():
    """The backends this installation can run, plus torch when importable."""
    return pyrnn.available_backends() + ((PEER,) if torch_or_none() else ())


BF16 = " bf16"  # the suffix of a contestant in precision bf16: "cpp bf16"; torch's is its autocast


def with_bf16(names):
    """Each contestant followed by its bf16 twin, side by side: cpp, cpp bf16, torch, torch bf16."""
    return [twin for name in names for twin in (name, name + BF16)]


def split_name(name, dtype):
    """(backend, precision) of a contestant's name: "cpp bf16" -> ("cpp", "bf16")."""
    if name.endswith(BF16):
        return name[: -len(BF16)], "bf16"
    return name, precision_of(dtype)


# ---------------------------------------------------------------------------------------------
# Problems, runners and the correctness gate


def make_problem(shape, dtype=np.float32, seed=0):
    """Inputs of one forward+backward of `shape`, in `dtype` (pyrnn.testing.make_problem)."""
    return testing.make_problem(np.random.default_rng(seed), *shape, dtype, gradients=True)


def reference_results(problem):
    """{name: float64 array} of RESULT_NAMES: the NumPy reference in float64 on the same inputs."""
    p = {name: array.astype(np.float64) for name, array in problem.items()}
    output, h_n = reference.forward(p["x"], p["weight_ih"], p["weight_hh"], p["bias"], p["h0"], None)
    grads = reference.backward(p["grad_output"], p["x"], p["weight_ih"], p["weight_hh"], output,
                               p["h0"], p["grad_h_n"], None)
    return dict(zip(RESULT_NAMES, (output, h_n) + tuple(grads)))


class PyrnnRunner:
    """One pyrnn backend on one problem, through the public API (as users call it)."""

    def __init__(self, backend, problem, precision="fp32"):
        self.backend, self.p, self.precision = backend, problem, precision

    def forward(self):
        p = self.p
        return pyrnn.forward(p["x"], p["weight_ih"], p["weight_hh"], p["bias"], p["h0"],
                             backend=self.backend, precision=self.precision)

    def train(self):
        p = self.p
        output, h_n = self.forward()
        grads = pyrnn.backward(p["grad_output"], p["x"], p["weight_ih"], p["weight_hh"], output,
                               p["h0"], grad_h_n=p["grad_h_n"], backend=self.backend,
                               precision=self.precision)
        return output, h_n, grads

    @staticmethod
    def results(trained):
        """{name: ndarray} of RESULT_NAMES from what train() returned."""
        output, h_n, grads = trained
        return dict(zip(RESULT_NAMES, (output, h_n) + tuple(grads)))


class TorchRunner:
    """torch.nn.RNN (tanh, one layer, CPU) holding the same weights, as a peer.

    torch has two biases; bias_ih holds ours and bias_hh is zero. In "train", x and h0 require
    grad, so autograd computes every gradient pyrnn.backward returns; torch.autograd.grad
    returns them without accumulating into .grad, like pyrnn.backward. With autocast, the calls
    run under torch.autocast("cpu", dtype=torch.bfloat16), torch's own bf16 path (its outputs
    come back in bf16, its parameters' gradients in float32).
    """

    def __init__(self, problem, autocast=False):
        torch = self.torch = torch_or_none()
        T, B, I = problem["x"].shape
        H = problem["weight_hh"].shape[0]
        tensor = {name: torch.from_numpy(array.copy()) for name, array in problem.items()}
        self.rnn = torch.nn.RNN(I, H, nonlinearity="tanh", dtype=tensor["x"].dtype)
        with torch.no_grad():
            self.rnn.weight_ih_l0.copy_(tensor["weight_ih"])
            self.rnn.weight_hh_l0.copy_(tensor["weight_hh"])
            self.rnn.bias_ih_l0.copy_(tensor["bias"])
            self.rnn.bias_hh_l0.zero_()
        self.x = tensor["x"].requires_grad_()
        self.h0 = tensor["h0"][None].requires_grad_()  # torch wants (layers, B, H)
        self.grad_output, self.grad_h_n = tensor["grad_output"], tensor["grad_h_n"][None]
        self.wrt = (self.x, self.h0, self.rnn.weight_ih_l0, self.rnn.weight_hh_l0, self.rnn.bias_ih_l0)
        self._use_autocast(autocast)

    def _use_autocast(self, autocast):
        self.autocast = autocast
        if autocast:  # autograd wants the gradients of outputs in the outputs' dtype
            self.grad_output, self.grad_h_n = (g.to(self.torch.bfloat16) for g in (self.grad_output, self.grad_h_n))

    def _context(self):
        import contextlib

        return self.torch.autocast("cpu", dtype=self.torch.bfloat16) if self.autocast else contextlib.nullcontext()

    def forward(self):
        with self.torch.inference_mode(), self._context():
            return self.rnn(self.x, self.h0)

    def train(self):
        with self._context():
            output, h_n = self.rnn(self.x, self.h0)
        grads = self.torch.autograd.grad((output, h_n), self.wrt, (self.grad_output, self.grad_h_n))
        return output, h_n, grads

    @staticmethod
    def results(trained):
        output, h_n, (grad_x, grad_h0, grad_weight_ih, grad_weight_hh, grad_bias) = trained
        values = (output, h_n[0], grad_x, grad_h0[0], grad_weight_ih, grad_weight_hh, grad_bias)
        return {name: value.detach().float().numpy() for name, value in zip(RESULT_NAMES, values)}


# ---------------------------------------------------------------------------------------------
# Stacks: pyrnn.RNN against torch.nn.RNN with num_layers and bidirectional


def stack_of(problem):
    """The Stack of a problem: ONE_LAYER for make_problem's, else what make_stack_problem built."""
    if "weight_ih_l0" not in problem:
        return ONE_LAYER
    D = 2 if "weight_ih_l0_reverse" in problem else 1
    return Stack(problem["h0"].shape[0] // D, D)


def make_stack_problem(shape, stack, dtype=np.float32, seed=0):
    """make_problem for a stack: x, h0 (L·D, B, H), grad_output (T, B, D·H), grad_h_n and
    torch.nn.RNN's parameters by their names (its initialisation: uniform in ±1/sqrt(H))."""
    T, B, I, H = shape
    L, D = stack
    rng = np.random.default_rng(seed)
    k = 1 / math.sqrt(H)
    arrays = {"x": rng.standard_normal((T, B, I)), "h0": rng.uniform(-1, 1, (L * D, B, H)),
              "grad_output": rng.standard_normal((T, B, D * H)),
              "grad_h_n": rng.standard_normal((L * D, B, H))}
    for name, parameter_shape in stack_parameter_shapes(I, H, stack).items():
        arrays[name] = rng.uniform(-k, k, parameter_shape)
    return {name: array.astype(dtype) for name, array in arrays.items()}


def stack_parameter_shapes(I, H, stack):
    """{torch.nn.RNN parameter name: shape}, in torch's order."""
    L, D = stack
    shapes = {}
    for layer in range(L):
        for suffix in ("", "_reverse")[:D]:
            shapes.update({f"weight_ih_l{layer}{suffix}": (H, I if layer == 0 else D * H),
                           f"weight_hh_l{layer}{suffix}": (H, H), f"bias_ih_l{layer}{suffix}": (H,),
                           f"bias_hh_l{layer}{suffix}": (H,)})
    return shapes


def stack_reference_results(problem):
    """{name: float64 array}: output, h_n, grad_x, grad_h0 and grad_<parameter> for every
    parameter, from the reference composition in float64 (bias_ih and bias_hh enter as their sum
    and get the same gradient)."""
    p = {name: array.astype(np.float64) for name, array in problem.items()}
    L, D = stack_of(problem)
    names = [name[len("weight_ih"):] for name in p if name.startswith("weight_ih")]
    layers = [(p["weight_ih" + s], p["weight_hh" + s], p["bias_ih" + s] + p["bias_hh" + s]) for s in names]
    options = dict(bidirectional=D == 2, backend="numpy")
    output, h_n, layer_outputs = pyrnn.stack_forward(p["x"], layers, p["h0"], **options)
    grads = pyrnn.stack_backward(p["grad_output"], p["x"], layers, layer_outputs, p["h0"],
                                 grad_h_n=p["grad_h_n"], **options)
    results = {"output": output, "h_n": h_n, "grad_x": grads.x, "grad_h0": grads.h0}
    for suffix, layer in zip(names, grads.layers):
        results.update({"grad_weight_ih" + suffix: layer.weight_ih, "grad_weight_hh" + suffix: layer.weight_hh,
                        "grad_bias_ih" + suffix: layer.bias, "grad_bias_hh" + suffix: layer.bias})
    return results


class PyrnnStackRunner:
    """pyrnn.RNN on one backend, holding the problem's parameters: one stack call per forward
    and one per backward, as a model runs it."""

    def __init__(self, backend, problem, precision="fp32"):
        T, B, I = problem["x"].shape
        L, D = stack_of(problem)
        self.rnn = pyrnn.RNN(I, problem["h0"].shape[2], L, bidirectional=D == 2,
                             dtype=problem["x"].dtype, backend=backend, precision=precision)
        self.rnn.load_state_dict({name: problem[name] for name in self.rnn.params})
        self.p = problem

    def forward(self):
        return self.rnn(self.p["x"], self.p["h0"])

    def train(self):
        output, h_n = self.forward()
        grad_x = self.rnn.backward(self.p["grad_output"], self.p["grad_h_n"])
        return output, h_n, grad_x, self.rnn.grad_h0, self.rnn.grads

    @staticmethod
    def results(trained):
        output, h_n, grad_x, grad_h0, grads = trained
        return {"output": output, "h_n": h_n, "grad_x": grad_x, "grad_h0": grad_h0,
                **{"grad_" + name: grad.copy() for name, grad in grads.items()}}


class TorchStackRunner(TorchRunner):
    """torch.nn.RNN (tanh, CPU) with the problem's num_layers, bidirectional and parameters;
    forward and train are TorchRunner's, autograd computing every gradient pyrnn.RNN's
    backward gives."""

    def __init__(self, problem, autocast=False):
        torch = self.torch = torch_or_none()
        T, B, I = problem["x"].shape
        L, D = stack_of(problem)
        tensor = {name: torch.from_numpy(array.copy()) for name, array in problem.items()}
        self.rnn = torch.nn.RNN(I, problem["h0"].shape[2], L, nonlinearity="tanh",
                                bidirectional=D == 2, dtype=tensor["x"].dtype)
        self.names = [name for name, _ in self.rnn.named_parameters()]
        self.rnn.load_state_dict({name: tensor[name] for name in self.names})
        self.x, self.h0 = tensor["x"].requires_grad_(), tensor["h0"].requires_grad_()
        self.grad_output, self.grad_h_n = tensor["grad_output"], tensor["grad_h_n"]
        self.wrt = (self.x, self.h0, *self.rnn.parameters())
        self._use_autocast(autocast)

    def results(self, trained):
        output, h_n, (grad_x, grad_h0, *grads) = trained
        results = {"output": output, "h_n": h_n, "grad_x": grad_x, "grad_h0": grad_h0,
                   **{"grad_" + name: grad for name, grad in zip(self.names, grads)}}
        return {name: value.detach().float().numpy() for name, value in results.items()}


def make_runner(name, problem):
    backend, precision = split_name(name, problem["x"].dtype)
    if stack_of(problem) != ONE_LAYER:
        if backend == PEER:
            return TorchStackRunner(problem, autocast=precision == "bf16")
        return PyrnnStackRunner(backend, problem, precision)
    if backend == PEER:
        return TorchRunner(problem, autocast=precision == "bf16")
    return PyrnnRunner(backend, problem, precision)


def disagreement(results, expected, problem, precision="fp32"):
    """(worst relative error, its result name, its tolerance) over the expected results, NaN
    counted as infinitely wrong; agreement means error <= tolerance for every result. A stack
    of L layers is allowed L times one layer's tolerance (each layer adds its own rounding to
    its input's), for the longest sums of any of its layers (above the first: D·H inputs). In
    precision bf16 the error and its bound are those bf16 promises against float64
    (pyrnn.testing.bf16_accuracy)."""
    T, B, I = problem["x"].shape
    L, D = stack_of(problem)
    H = problem["h0"].shape[-1]
    forward_terms, backward_terms = testing.accumulated_terms(T, B, I if L == 1 else max(I, D * H), H)
    worst = None
    for name in expected:
        terms = forward_terms if name in ("output", "h_n") else backward_terms
        tol = L * testing.tolerance(problem["x"].dtype, terms)
        error = testing.relative_error(results[name], expected[name])
        if precision == "bf16":
            error, tol = testing.bf16_accuracy(name, results[name], expected[name])
        error = math.inf if math.isnan(error) else error
        if worst is None or error / tol > worst[0] / worst[2]:
            worst = (error, name, tol)
    return worst


# ---------------------------------------------------------------------------------------------
# Threads


def set_threads(n):
    """Bound every pool to n threads: pyrnn's (native kernel, numba, NumPy's BLAS, OpenMP) and torch's."""
    pyrnn.available_backends()  # load them all, so that the limit reaches each one
    torch = torch_or_none()
    if torch is not None:
        torch.set_num_threads(n)
    pyrnn.set_num_threads(n)


def thread_report():
    """What each pool says it will use now: {"threads": {pool: count}, "threadpoolctl": its full
    view (library, version, architecture, threading layer of every BLAS and OpenMP loaded)}."""
    from threadpoolctl import threadpool_info

    pyrnn.available_backends()
    counts = {"pyrnn": pyrnn.get_num_threads()}
    native = sys.modules.get("pyrnn._cpp")
    if native is not None and hasattr(native, "get_num_threads"):
        counts["cpp"] = native.get_num_threads()
    if "numba" in sys.modules:
        counts["numba"] = sys.modules["numba"].get_num_threads()
    torch = torch_or_none()
    if torch is not None:
        counts["torch"] = torch.get_num_threads()
    pools = threadpool_info()
    for pool in pools:
        counts[f"{pool['internal_api']} ({os.path.basename(pool['filepath'])})"] = pool["num_threads"]
    return {"threads": counts, "threadpoolctl": pools}


# ---------------------------------------------------------------------------------------------
# Timing


def time_calls(call, number):
    """Seconds per call of `number` back-to-back calls, without the garbage collector."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter()
        for _ in range(number):
            call()
        return (time.perf_counter() - start) / number
    finally:
        if collecting:
            gc.enable()


def gemm_call(dtype, n=PEAK_N):
    """A call doing one n×n×n NumPy matmul in `dtype` (2·n³ FLOP): the machine's BLAS GEMM rate
    under the current thread limits, a peer row beside the CPU's limit."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, n, n)).astype(dtype)
    out = np.empty((n, n), dtype)
    return lambda: np.matmul(a, b, out=out)


def precision_of(dtype):
    """The precision name of a float dtype's arithmetic: "fp32" or "fp64"."""
    return "fp64" if np.dtype(dtype) == np.float64 else "fp32"


def limit_calls(precisions, threads):
    """{timed-call name: (call, FLOP per call, precision)} for the CPU's limit of each precision
    on `threads` threads: the native module's peak loop ("fp64" runs the fp32 loop and counts half
    its FLOP: same FMA units, half the lanes). {} without the native module."""
    native = _native()
    if native is None:
        return {}
    calls = {}
    for precision in precisions:
        loop = "fp32" if precision == "fp64" else precision
        flop = native.peak_loop(loop, threads, LIMIT_ITERATIONS) / (2 if precision == "fp64" else 1)
        calls[LIMIT.format(precision)] = (lambda loop=loop: native.peak_loop(loop, threads, LIMIT_ITERATIONS),
                                          flop, precision)
    return calls


def best_gflops(flop, samples):
    """GFLOP/s of the fastest sample (s per call) of a call doing `flop`: a limit is a maximum."""
    return flop / min(samples) / 1e9


def busy_wait(seconds):
    """Wait on this core without sleeping: an idle pause would let the CPU clock down, and the
    next sample would start slow (measured here: single-threaded tiny and small calls 30-50%
    slower right after a 0.15 s sleep)."""
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        pass


def warm_up(call, seconds):
    """Call until `seconds` have passed (at least once)."""
    deadline = time.perf_counter() + seconds
    call()
    while time.perf_counter() < deadline:
        call()


def warm_call_seconds(call):
    """Seconds per call, from one call and, if that was short, from a batch lasting about a tenth
    of a sample: one call straight after another contestant's runs with cold caches and can take
    several times as long (tiny: ~110 us against 11), which would make every sample too short."""
    seconds = time_calls(call, 1)
    if seconds < SAMPLE_SECONDS / 10:
        seconds = time_calls(call, round(SAMPLE_SECONDS / 10 / max(seconds, 1e-9)))
    return seconds


def measure_block(calls, repeat, budget, progress, settle=0.0):
    """Time calls[name]() interleaved until every contestant has `repeat` samples, and on while
    the block has used less than `budget` seconds, pausing `settle` seconds before each sample;
    `progress` (a tqdm bar) shows the rounds.
    -> {name: (samples in s per call, calls per sample)}."""
    number, samples = {}, {}
    for name, call in calls.items():  # a warm-up round (the first call was the gate's), sizing samples
        busy_wait(settle)
        seconds = warm_call_seconds(call)
        number[name] = max(1, round(SAMPLE_SECONDS / max(seconds, 1e-9)))
        samples[name] = [seconds] if number[name] == 1 else []  # a warm call long enough to be a sample
    start = time.perf_counter()
    rounds = 0
    while calls:
        enough = min(map(len, samples.values())) >= repeat
        if enough and (time.perf_counter() - start >= budget or rounds >= MAX_ROUNDS):
            break
        for name, call in calls.items():
            if settle:
                busy_wait(settle)
                warm_up(call, WARM_SECONDS)  # wakes its parked threads, as a loop's earlier calls would
            samples[name].append(time_calls(call, number[name]))
        rounds += 1
        progress.set_postfix_str(f"round {rounds}", refresh=False)
        progress.update(0)  # redraws at most every mininterval
    return {name: (samples[name], number[name]) for name in calls}


def gate(runner, expected, problem, modes, precision="fp32"):
    """Check one contestant against the reference, timing the first call of each mode on the way.

    -> dict with "status" ("ok", "wrong" or "error"), the worst error and its tolerance, and
    "first_call_s" {mode: seconds}.
    """
    first_call, outcomes = {}, {}
    try:
        for mode in modes:
            start = time.perf_counter()
            outcomes[mode] = getattr(runner, mode)()
            first_call[mode] = time.perf_counter() - start
        trained = outcomes["train"] if "train" in outcomes else runner.train()  # gradients always checked
        error, worst, tol = disagreement(runner.results(trained), expected, problem, precision)
    except Exception as exc:  # a contestant that raises is reported, not timed
        return {"status": "error", "message": f"{type(exc).__name__}: {exc}", "first_call_s": first_call}
    status = "ok" if error <= tol else "wrong"
    return {"status": status, "max_error": error, "worst": worst, "tolerance": tol,
            "first_call_s": first_call}


def run(shapes, threads, modes, names, dtype, repeat, budget, stream=sys.stderr, stack=ONE_LAYER):
    """Measure everything (each shape as a stack of stack.layers × stack.directions); -> the
    report (a JSON-ready dict)."""
    dtype = np.dtype(dtype)
    report = {"machine": machine(), "versions": versions(), "dtype": dtype.name,
              "settings": {"shapes": list(shapes), "threads": list(threads), "modes": list(modes),
                           "backends": list(names), "repeat": repeat, "budget_s": budget,
                           "sample_s": SAMPLE_SECONDS, "settle_s": SETTLE_SECONDS, "warm_s": WARM_SECONDS,
                           "stack": stack._asdict()},
              "shapes": {name: SHAPES[name]._asdict() for name in shapes},
              "peak": {}, "gemm": {}, "thread_pools": {}, "results": []}
    gemm = gemm_call(dtype)
    precision = {name: split_name(name, dtype)[1] for name in names}
    precisions = sorted(set(precision.values()) | {precision_of(dtype)}, key=["fp64", "fp32", "bf16"].index)
    progress = tqdm(total=len(threads) * len(shapes) * (1 + len(modes)), file=stream, unit="block",
                    leave=False, dynamic_ncols=True)
    problems, expected = {}, {}
    for n in threads:
        set_threads(n)
        report["thread_pools"][n] = thread_report()
        limits = limit_calls(precisions, n)
        extra_samples = {name: [] for name in (GEMM, *limits)}
        for shape_name in shapes:
            shape = SHAPES[shape_name]
            if shape_name not in problems:
                progress.set_description_str(f"{shape_name}: float64 reference")
                if stack == ONE_LAYER:
                    problems[shape_name] = make_problem(shape, dtype)
                    expected[shape_name] = reference_results(problems[shape_name])
                else:
                    problems[shape_name] = make_stack_problem(shape, stack, dtype)
                    expected[shape_name] = stack_reference_results(problems[shape_name])
            problem = problems[shape_name]
            label = f"{shape_name} {n} thread(s)"
            runners, checks = {}, {}
            for name in names:
                progress.set_description_str(f"{label}: checking {name}")
                runner = make_runner(name, problem)
                checks[name] = gate(runner, expected[shape_name], problem, modes, precision[name])
                if checks[name]["status"] == "ok":
                    runners[name] = runner
            progress.update()
            for mode in modes:
                calls = {name: getattr(runner, mode) for name, runner in runners.items()}
                calls.update({GEMM: gemm}, **{name: limit[0] for name, limit in limits.items()})
                progress.set_description_str(f"{label} {mode}")
                timed = measure_block(calls, repeat, budget, progress, SETTLE_SECONDS if n > 1 else 0.0)
                for name in extra_samples:
                    extra_samples[name] += timed.pop(name)[0]
                for name in names:
                    report["results"].append(result_row(shape_name, shape, mode, n, name, checks[name],
                                                        timed.get(name), precision[name], stack))
                progress.update()
        report["gemm"][n] = {"gflops": best_gflops(PEAK_FLOP, extra_samples[GEMM]),
                             "samples_s": extra_samples[GEMM], "n": PEAK_N}
        report["peak"][n] = {precision: {"gflops": best_gflops(flop, extra_samples[name]),
                                         "samples_s": extra_samples[name],
                                         "instruction": _native_peak_instruction(precision)}
                             for name, (_, flop, precision) in limits.items()}
    progress.close()
    report["machine"]["load_average_end"] = _load_average()
    add_ratios(report["results"], report["peak"])
    return report


def _native():
    """The native module (pyrnn._cpp), or None when it is not built."""
    return _backends.loaded().get("cpp") if "cpp" in pyrnn.available_backends() else None


def _native_peak_instruction(precision):
    return _native().peak_instruction("fp32" if precision == "fp64" else precision)


def result_row(shape_name, shape, mode, threads, name, check, timed, precision, stack=ONE_LAYER):
    row = {"shape": shape_name, "mode": mode, "threads": threads, "backend": name, "precision": precision,
           "status": check["status"], "first_call_s": check["first_call_s"].get(mode)}
    row.update({key: check[key] for key in ("max_error", "worst", "tolerance", "message") if key in check})
    if timed is not None:
        samples, number = timed
        median = statistics.median(samples)
        q1, _, q3 = statistics.quantiles(samples, n=4) if len(samples) > 1 else (median,) * 3
        row.update({"samples_s": samples, "calls_per_sample": number, "median_s": median,
                    "iqr_s": q3 - q1, "gflops": flops(shape, mode, stack) / median / 1e9})
    return row


def add_ratios(rows, peak):
    """fraction_of_peak = GFLOP/s / the CPU's limit of the row's precision at that thread count
    (when measured); speedup_vs_<base> = base's median / this median, within the same shape, mode
    and threads (a bf16 row's bases are torch bf16 and numpy bf16, and speedup_vs_fp32 is over
    its own backend in float32); speedup_vs_1_thread = the same contestant's median on 1 thread
    / this median."""
    for row in rows:
        limit = peak.get(row["threads"], {}).get(row["precision"])
        if "median_s" in row and limit is not None:
            row["fraction_of_peak"] = row["gflops"] / limit["gflops"]
    medians = {(r["shape"], r["mode"], r["threads"], r["backend"]): r["median_s"]
               for r in rows if "median_s" in r}
    for row in rows:
        bf16 = row["precision"] == "bf16"  # then the peers are the bf16 ones, and its fp32 twin one more
        peers = {base: base + BF16 if bf16 else base for base in (PEER, "numpy")}
        if bf16:
            peers["fp32"] = row["backend"][: -len(BF16)]
        for base, peer in peers.items():
            key = (row["shape"], row["mode"], row["threads"], peer)
            if "median_s" in row and key in medians:
                row[f"speedup_vs_{base}"] = medians[key] / row["median_s"]
        one_thread = (row["shape"], row["mode"], 1, row["backend"])
        if "median_s" in row and row["threads"] > 1 and one_thread in medians:
            row["speedup_vs_1_thread"] = medians[one_thread] / row["median_s"]


# ---------------------------------------------------------------------------------------------
# Reporting


def machine():
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": model, "cores": os.cpu_count(), "system": f"{platform.system()} {platform.release()}",
            "python": platform.python_version(), "load_average_start": _load_average(),
            "blas_env": {k: v for k, v in os.environ.items() if k.startswith(("OPENBLAS_", "OMP_", "MKL_"))}}


def _load_average():
    """1-minute load average (runnable threads): above the core count, other work shares the CPU."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def versions():
    found = {"pyrnn": pyrnn.__version__, "numpy": np.__version__}
    for module in ("numba", "torch", "threadpoolctl"):
        try:
            found[module] = __import__(module).__version__
        except ImportError:
            pass
    return found


def _of_limit(measured, limit):
    return f" ({100 * measured['gflops'] / limit['gflops']:.0f}% of the limit)" if limit else ""


def _speedup(row, base):
    value = row.get(f"speedup_vs_{base}")
    return f"{value:.2f}x" if value is not None else "-"


def _vs_1_thread(row):
    value = row.get("speedup_vs_1_thread")
    return f"{value:.2f}x" if value is not None else "-"


def _ceilings(rows):
    """Lines giving, per torch row's precision, the most any "vs torch" can be: a kernel doing the
    shape's FLOP at the CPU's limit of that precision runs 1 / torch's fraction of it faster."""
    lines = []
    for peer in (PEER, PEER + BF16):
        found = [r for r in rows if r["backend"] == peer and "fraction_of_peak" in r]
        if found:
            lines.append(f"ceiling of vs {peer} (a kernel at the {found[0]['precision']} limit): " + ", ".join(
                f"{r['mode']} {r['threads']} thr {1 / r['fraction_of_peak']:.2f}x" for r in found))
    return lines


def format_report(report):
    """The tables as text: one per shape, rows by mode, thread count and contestant."""
    m = report["machine"]
    gemm = "SGEMM" if report["dtype"] == "float32" else "DGEMM"
    load = ("" if m["load_average_start"] is None else
            f", load average {m['load_average_start']:.1f} at start, {m['load_average_end']:.1f} at end")
    lines = [f"machine: {m['cpu']}, {m['cores']} cores, {m['system']}, Python {m['python']}{load}",
             "versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items())]
    for n, limits in report["peak"].items():
        lines += [f"CPU limit {precision} ({limit['instruction']} loop, best sample), {n} thread(s): "
                  f"{limit['gflops']:.1f} GFLOP/s" for precision, limit in limits.items()]
    if not any(report["peak"].values()):
        lines.append("CPU limit: not measured (needs the native module); %peak not shown")
    lines.append(f"{gemm} peer (NumPy matmul {PEAK_N}^3, best sample): " + ", ".join(
        f"{n} thread(s) {g['gflops']:.1f} GFLOP/s" + _of_limit(g, report["peak"][n].get(precision_of(report["dtype"])))
        for n, g in report["gemm"].items()))
    for n, pools in report["thread_pools"].items():
        over = {pool: count for pool, count in pools["threads"].items() if count > n}
        if over:
            lines.append(f"warning: asked for {n} thread(s) but these pools report more: {over}")
    vs_fp32 = any("speedup_vs_fp32" in row for row in report["results"])  # a --precision bf16 run
    header = (f"{'mode':8s} {'thr':>3s} {'backend':10s} {'median ms':>10s} {'±iqr':>6s} {'GFLOP/s':>8s} "
              f"{'%peak':>6s} {'vs torch':>8s} {'vs numpy':>8s} " + (f"{'vs fp32':>8s} " if vs_fp32 else "")
              + f"{'vs 1 thr':>8s} {'1st call ms':>11s}  check")
    stack = Stack(**report["settings"].get("stack", ONE_LAYER._asdict()))
    layout = "" if stack == ONE_LAYER else (f"  {stack.layers} layer(s) x {stack.directions} "
                                           "direction(s): pyrnn.RNN vs torch.nn.RNN")
    for shape_name, dims in report["shapes"].items():
        shape = Shape(**dims)
        lines += ["", f"{shape_name}  T={shape.T} B={shape.B} I={shape.I} H={shape.H}{layout}  "
                  f"{report['dtype']}  forward {flops(shape, 'forward', stack) / 1e9:.3g} GFLOP, "
                  f"train {flops(shape, 'train', stack) / 1e9:.3g} GFLOP", header]
        for row in (r for r in report["results"] if r["shape"] == shape_name):
            first = f"{row['first_call_s'] * 1e3:.1f}" if row.get("first_call_s") is not None else "-"
            if row["status"] == "error":
                check = f"ERROR {row['message']}"[:80]
            else:
                check = (f"{'ok' if row['status'] == 'ok' else 'WRONG'} {row['max_error']:.1e} "
                         f"{'<=' if row['status'] == 'ok' else '>'} {row['tolerance']:.1e} ({row['worst']})")
            if "median_s" in row:
                peak = f"{100 * row['fraction_of_peak']:5.1f}%" if "fraction_of_peak" in row else f"{'-':>6s}"
                timing = (f"{row['median_s'] * 1e3:10.3f} {100 * row['iqr_s'] / row['median_s']:5.0f}% "
                          f"{row['gflops']:8.2f} {peak} "
                          f"{_speedup(row, PEER):>8s} {_speedup(row, 'numpy'):>8s} "
                          + (f"{_speedup(row, 'fp32'):>8s} " if vs_fp32 else "") + f"{_vs_1_thread(row):>8s}")
            else:
                timing = (f"{'not timed':>10s} {'':6s} {'':8s} {'':6s} {'':8s} {'':8s} "
                          + (f"{'':8s} " if vs_fp32 else "") + f"{'':8s}")
            lines.append(f"{row['mode']:8s} {row['threads']:3d} {row['backend']:10s} {timing} {first:>11s}  {check}")
        lines += _ceilings([r for r in report["results"] if r["shape"] == shape_name])
    lines += ["", "median ms: median over samples (each the mean of calls lasting ~10 ms), backends "
              "interleaved; ±iqr: interquartile range / median.",
              "%peak: GFLOP/s (forward 2·T·B·H·(I+H), train 3x) / the CPU limit of the row's precision "
              "(timed in every round). vs X: X's median / this median (>1: faster than X; a bf16 row is "
              "compared with torch bf16, i.e. torch.autocast, and numpy bf16, and vs fp32 with its own "
              "backend in float32); vs 1 thr: the same contestant's 1-thread median / this one. ceiling: 1 / "
              "torch's %peak, the most that any contestant's vs torch can be.",
              "1st call: the first call of that mode in this process (includes JIT compilation), "
              "not in the samples. check: worst relative error against the float64 reference (bf16: "
              "output absolute, gradients relative to their largest magnitude)."]
    return "\n".join(lines)


def plot(report, path):
    """Save speedup_figure(report) as a PNG at `path`."""
    speedup_figure(report).savefig(path, dpi=120)


def speedup_figure(report):
    """A bar chart of speed-up over torch (over numpy without torch) per shape: one panel per mode
    (rows) and thread count (columns), one bar per contestant. -> a matplotlib Figure."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend
    except ImportError as error:
        raise SystemExit("--plot needs matplotlib: pip install 'pyrnn[plot]'") from error

    rows = [r for r in report["results"] if "median_s" in r]
    base = PEER if any(r["backend"] == PEER for r in rows) else "numpy"
    speedup = {(r["shape"], r["mode"], r["threads"], r["backend"]): r.get(f"speedup_vs_{base}", math.nan)
               for r in rows}
    modes, threads = report["settings"]["modes"], report["settings"]["threads"]
    shapes = list(report["shapes"])
    names = [n for n in report["settings"]["backends"] if n != base]
    width_in = max(6.0, 1 + 1.2 * len(shapes) * len(threads))
    fig = Figure(figsize=(width_in, 3.5 * len(modes)), layout="constrained")
    axes = fig.subplots(len(modes), len(threads), squeeze=False, sharey=True)
    width = 0.8 / max(len(names), 1)
    for ax_row, mode in zip(axes, modes):
        for ax, n in zip(ax_row, threads):
            for i, name in enumerate(names):
                ax.bar([j + (i - (len(names) - 1) / 2) * width for j in range(len(shapes))],
                       [speedup.get((s, mode, n, name), math.nan) for s in shapes], width, label=name)
            ax.axhline(1, color="black", linewidth=0.8)
            ax.set_yscale("log")
            ax.set_xticks(range(len(shapes)), shapes)
            ax.set_title(f"{mode}, {n} thread(s)")
        ax_row[0].set_ylabel(f"speed-up over {base}")
    axes[0][-1].legend()
    # Wrapped to the figure's width (~0.6 em a character): a narrow figure must not clip its title;
    # constrained layout then makes room for every line.
    title = f"pyrnn vs {base} ({report['dtype']}; higher is faster), {report['machine']['cpu']}"
    fig.suptitle(textwrap.fill(title, int(width_in * 72 / (0.6 * TITLE_POINTS))), fontsize=TITLE_POINTS)
    return fig


def main(args):
    """The `pyrnn bench` subcommand (arguments parsed in pyrnn.__main__)."""
    shapes = list(SHAPES) if args.full else _choices(args.shapes, SHAPES, "--shapes")
    names = _choices(args.backends, contestants(), "--backends") if args.backends else list(contestants())
    if args.precision == "bf16":
        if args.dtype != "float32":
            raise SystemExit(f"--precision bf16 needs --dtype float32, got {args.dtype}")
        names = with_bf16(names)
    modes = _choices(args.modes, MODES, "--modes")
    try:
        threads = [int(n) for n in args.threads.split(",")] if args.threads else [pyrnn.get_num_threads()]
    except ValueError:
        raise SystemExit(f"--threads must be comma-separated positive integers, got {args.threads!r}") from None
    if any(n < 1 for n in threads):
        raise SystemExit(f"--threads must be positive, got {args.threads!r}")
    if args.repeat < 1 or args.budget < 0:
        raise SystemExit(f"--repeat must be at least 1 and --budget not negative, got {args.repeat} "
                         f"and {args.budget}")
    if args.torch_train:
        from . import bench_torch  # needs torch

        return bench_torch.main(threads, args)
    if args.layers < 1:
        raise SystemExit(f"--layers must be at least 1, got {args.layers}")
    stack = Stack(args.layers, 2 if args.bidirectional else 1)
    report = run(shapes, threads, modes, names, args.dtype, args.repeat, args.budget, stack=stack)
    print(format_report(report))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(report, out, indent=1)
    if args.plot:
        plot(report, args.plot)
    return 0 if all(r["status"] == "ok" for r in report["results"]) else 1


def _choices(text, allowed, option):
    chosen = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [item for item in chosen if item not in allowed]
    if unknown or not chosen:
        raise SystemExit(f"{option}: {', '.join(unknown) or text!r} not among {', '.join(allowed)}")
    return chosen

"""The ``pyrnn`` command: ``pyrnn backends``, ``pyrnn gradcheck`` and ``pyrnn bench``."""
import argparse
import sys

import numpy as np

from . import __version__, _backends
from .gradcheck import GradcheckError, gradcheck, pre_activations, stack_gradcheck


def _backends_command(args):
    for name in _backends.available_backends():
        print(f"{name:6s} available" + (_native_isa() if name == "cpp" else ""))
    for name, reason in _backends.unavailable_backends().items():
        print(f"{name:6s} unavailable: {reason}")
    return 0


def _native_isa():
    """Which copy of the native kernel runs, and so how its bf16 products are computed."""
    isa = _backends.loaded()["cpp"].isa()
    products = {"avx512amx": "AMX tiles (tdpbf16ps), else vdpbf16ps",
                "avx512bf16": "vdpbf16ps"}.get(isa, "emulated with float32 FMAs")
    return f" (instruction set {isa}; bf16 products: {products})"


def _gradcheck_problem(rng, T, B, I, H, L, D, lengths, nonlinearity):
    """(x, layers, h0) of a random float64 stack (one layer: L = D = 1); with relu, redrawn until
    every pre-activation is at least 1e-3 from relu's kink."""
    while True:
        x = rng.standard_normal((T, B, I)) * 0.5
        layers = [tuple(rng.standard_normal(shape) * 0.5 for shape in [(H, I if k < D else D * H), (H, H), (H,)])
                  for k in range(L * D)]
        h0 = rng.standard_normal((L * D, B, H)) * 0.5
        if nonlinearity != "relu":
            return x, layers, h0
        if np.all(np.abs(pre_activations(x, layers, h0, lengths, None, D == 2, "relu")) >= 1e-3):
            return x, layers, h0


def _gradcheck_command(args):
    """Gradient-check every backend on small random problems, with and without lengths: one
    layer, or the stack --layers and --bidirectional ask for."""
    rng = np.random.default_rng(args.seed)
    names = args.backends.split(",") if args.backends else _backends.available_backends()
    L, D = args.layers, 2 if args.bidirectional else 1
    status = 0
    for name in names:
        for T, B, I, H in [(1, 1, 1, 1), (4, 3, 2, 5), (6, 2, 3, 4)]:
            for with_lengths in (False, True):
                lengths = rng.integers(0, T + 1, size=B) if with_lengths else None
                x, layers, h0 = _gradcheck_problem(rng, T, B, I, H, L, D, lengths, args.nonlinearity)
                stack = f"L={L} D={D} " if L * D > 1 else ""
                label = (f"{name:6s} {args.nonlinearity} {stack}T={T} B={B} I={I} H={H} "
                         f"lengths={None if lengths is None else lengths.tolist()}")
                options = dict(lengths=lengths, backend=name, nonlinearity=args.nonlinearity)
                try:
                    if L * D > 1:
                        errors = stack_gradcheck(x, layers, h0, bidirectional=D == 2, **options)
                    else:
                        errors = gradcheck(x, *layers[0], h0[0], **options)
                except (GradcheckError, ValueError) as error:
                    print(f"FAIL {label}\n{error}")
                    status = 1
                    continue
                print(f"ok   {label}  max |error| {max(errors.values()):.1e}")
    return status


def _bench_command(args):
    from . import bench  # imports torch when present: only for this command

    return bench.main(args)


def _add_bench_parser(commands):
    from .bench import DEFAULT_SHAPES, MODES, SHAPES

    bench = commands.add_parser(
        "bench", help="time every backend and torch.nn.RNN side by side, checked against the reference",
        description="Time every available backend and torch.nn.RNN (when importable), interleaved in "
        "one process, after checking each against the float64 reference; print a table per shape.")
    bench.add_argument("--shapes", default=",".join(DEFAULT_SHAPES),
                       help=f"comma-separated, from {','.join(SHAPES)} (default: %(default)s)")
    bench.add_argument("--full", action="store_true", help="the whole shape grid (overrides --shapes)")
    bench.add_argument("--threads", help="comma-separated thread counts, e.g. 1,2 "
                       "(default: pyrnn.get_num_threads(), i.e. $PYRNN_NUM_THREADS or all cores)")
    bench.add_argument("--modes", default=",".join(MODES), help="forward, train or both (default: %(default)s)")
    bench.add_argument("--backends", help="comma-separated contestants (default: every available backend "
                       "and torch)")
    bench.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    bench.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                       help="bf16: every contestant also in bf16 products, side by side with its float32 "
                       "run (torch: under torch.autocast); %%peak against each precision's CPU limit")
    bench.add_argument("--layers", type=int, default=1, help="time a stack of this many layers: "
                       "pyrnn.RNN against torch.nn.RNN(num_layers=...) (default: %(default)s, the kernel alone)")
    bench.add_argument("--bidirectional", action="store_true", help="both directions in every layer "
                       "(pyrnn.RNN against torch.nn.RNN(bidirectional=True))")
    bench.add_argument("--repeat", type=int, default=5, help="at least this many samples per contestant "
                       "(default: %(default)s)")
    bench.add_argument("--budget", type=float, default=2.0, help="keep sampling while a (shape, mode, "
                       "threads) block has taken fewer seconds than this (default: %(default)s)")
    bench.add_argument("--torch-train", action="store_true", help="instead: a whole training step in "
                       "PyTorch (Embedding, RNN, Linear, cross-entropy, Adam), torch.nn.RNN against "
                       "pyrnn.torch.RNN (needs torch; --shapes, --modes and --backends do not apply)")
    bench.add_argument("--json", metavar="PATH", help="write machine, versions, thread pools and every sample")
    bench.add_argument("--plot", metavar="PATH.png", help="bar chart of speed-ups (needs matplotlib)")
    bench.set_defaults(run=_bench_command)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="pyrnn", description=__doc__)
    parser.add_argument("--version", action="version", version=f"pyrnn {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("backends", help="list the backends and why any is unavailable"
                        ).set_defaults(run=_backends_command)
    check = commands.add_parser("gradcheck", help="check every backend's gradients by finite differences")
    check.add_argument("--backends", help="comma-separated backend names (default: all available)")
    check.add_argument("--nonlinearity", choices=["tanh", "relu"], default="tanh")
    check.add_argument("--layers", type=int, default=1, help="check a stack of this many layers "
                       "(pyrnn.stack_forward/stack_backward; default: %(default)s, one layer)")
    check.add_argument("--bidirectional", action="store_true", help="both directions in every layer")
    check.add_argument("--seed", type=int, default=0)
    check.set_defaults(run=_gradcheck_command)
    _add_bench_parser(commands)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())

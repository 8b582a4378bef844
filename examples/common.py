"""What the three examples share: their run options (seed, backend, threads, plot) and figures."""
import time

import numpy as np

import pyrnn


def add_run_options(parser, plot_help):
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", default=None,
                        help="cpp, numba or numpy (default: $PYRNN_BACKEND or the fastest)")
    # One thread by default: these matrices are small (a few hundred rows by 128), so a second
    # thread mostly waits at synchronisation points, and on a busy machine far worse (measured at
    # load 6 on 2 cores: the Linear head 6.5 ms with 1 thread, 43 ms with 2).
    parser.add_argument("--threads", type=int, default=1,
                        help="threads for the kernel and BLAS (pyrnn.set_num_threads; 0: pyrnn's default)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="bf16: every product of the RNN in bfloat16 (pyrnn.RNN's precision)")
    parser.add_argument("--plot", metavar="PATH.png", help=f"save {plot_help} (needs matplotlib)")


class Run:
    """Applies the run options: the thread count, a seeded generator, the backend's name, a clock."""

    def __init__(self, args):
        if args.threads:
            pyrnn.set_num_threads(args.threads)
        self.started = time.perf_counter()
        self.rng = np.random.default_rng(args.seed)
        self.backend = pyrnn.resolve_backend(args.backend)

    def elapsed(self):
        return time.perf_counter() - self.started


def pyplot():
    """matplotlib.pyplot drawing to files only (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(figure, path):
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"saved {path}")

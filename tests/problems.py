"""Random problems for the tests (imported by the test modules; tests/ is on pytest's pythonpath)."""
import numpy as np

from pyrnn.testing import make_problem  # the one generator, shared with `pyrnn bench`

# The largest float64 discrepancy between a backend and the reference seen in this run, reported
# at the end of the run by conftest.py: {(backend, tensor): relative error}.
float64_discrepancies = {}


def random_lengths(rng, T, B):
    """B lengths in [0, T], always including 0 and T when there is room, plus repeats."""
    lengths = rng.integers(0, T + 1, size=B)
    if B >= 2:
        lengths[:2] = [0, T]
    if B >= 4:
        lengths[3] = lengths[2]
    return lengths


def pre_activations(problem, lengths=None, nonlinearity="tanh"):
    """a_t = x_t · weight_ihᵀ + h_{t-1} · weight_hhᵀ + bias of every step of a time-major float64
    problem (NaN on padding), h_{t-1} taken from the reference's output."""
    import pyrnn

    output, _ = pyrnn.forward(**problem, lengths=lengths, backend="numpy",
                              nonlinearity=nonlinearity)
    T, B, H = output.shape
    h0 = np.zeros((B, H)) if problem.get("h0") is None else problem["h0"]
    bias = np.zeros(H) if problem.get("bias") is None else problem["bias"]
    h_prev = np.concatenate([h0[None], output[:-1]])  # h_{t-1} on every valid step
    a = problem["x"] @ problem["weight_ih"].T + h_prev @ problem["weight_hh"].T + bias
    if lengths is not None:
        a[np.arange(T)[:, None] >= np.asarray(lengths)[None, :]] = np.nan
    return a


def make_problem_away_from_relus_kink(rng, T, B, I, H, lengths=None, margin=1e-3, **options):
    """make_problem whose relu pre-activations are all at least `margin` from 0, where relu'
    jumps: finite differences across the kink measure neither side's derivative."""
    while True:
        problem = make_problem(rng, T, B, I, H, **options)
        a = pre_activations(problem, lengths, "relu")
        if not np.any(np.abs(a) < margin):  # (NaN on padding compares False)
            return problem

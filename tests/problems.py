"""Random problems for the tests (imported by the test modules; tests/ is on pytest's pythonpath)."""
import numpy as np

from pyrnn.gradcheck import pre_activations
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


def make_problem_away_from_relus_kink(rng, T, B, I, H, lengths=None, margin=1e-3, **options):
    """make_problem whose relu pre-activations are all at least `margin` from 0, where relu'
    jumps: finite differences across the kink measure neither side's derivative."""
    while True:
        problem = make_problem(rng, T, B, I, H, **options)
        h0 = np.zeros((B, H)) if problem.get("h0") is None else problem["h0"]
        bias = np.zeros(H) if problem.get("bias") is None else problem["bias"]
        layer = (problem["weight_ih"], problem["weight_hh"], bias)  # a stack of one layer
        if np.all(np.abs(pre_activations(problem["x"], [layer], h0[None], lengths, nonlinearity="relu")) >= margin):
            return problem

"""Random problems for the tests (imported by the test modules; tests/ is on pytest's pythonpath)."""
import numpy as np

# The largest float64 discrepancy between a backend and the reference seen in this run, reported
# at the end of the run by conftest.py: {(backend, tensor): relative error}.
float64_discrepancies = {}


def make_problem(rng, T, B, I, H, dtype=np.float64, bias=True, h0=True, scale=1.0):
    """Random inputs as torch.nn.RNN initialises its weights: U(-1/sqrt(H), 1/sqrt(H))."""
    bound = 1 / np.sqrt(H)

    def uniform(*shape):
        return rng.uniform(-bound, bound, size=shape).astype(dtype)

    return dict(
        x=(scale * rng.standard_normal((T, B, I))).astype(dtype),
        weight_ih=uniform(H, I),
        weight_hh=uniform(H, H),
        bias=uniform(H) if bias else None,
        h0=rng.standard_normal((B, H)).astype(dtype) if h0 else None,
    )


def random_lengths(rng, T, B):
    """B lengths in [0, T], always including 0 and T when there is room, plus repeats."""
    lengths = rng.integers(0, T + 1, size=B)
    if B >= 2:
        lengths[:2] = [0, T]
    if B >= 4:
        lengths[3] = lengths[2]
    return lengths

"""A whole training step in PyTorch (Embedding -> RNN -> Linear -> cross-entropy -> Adam), with
torch.nn.RNN and with pyrnn.torch.RNN, timed by pytest-benchmark; one group per case, so the
table reads torch against pyrnn. Each case first checks that the two models' first losses agree
to float32 roundoff (the gate of `pyrnn bench --torch-train`). No speed is asserted; for the
interleaved side-by-side figures use `pyrnn bench --torch-train --threads 1,2`.
"""
import functools

import pytest

pytest.importorskip("torch", reason="torch is optional (pip install torch); CI installs it")
from pyrnn import bench_torch  # noqa: E402


@functools.lru_cache(maxsize=None)
def losses_disagreement(case):
    return bench_torch.losses_disagreement(bench_torch.CASES[case])


# "shape": the smoke run (--benchmark-disable) keeps to conftest.SMOKE_SHAPES, as for the kernel.
@pytest.mark.parametrize("shape", list(bench_torch.CASES))
@pytest.mark.parametrize("contestant", bench_torch.CONTESTANTS)
def test_training_step(benchmark, contestant, shape):
    error, tolerance = losses_disagreement(shape)
    assert error <= tolerance, f"the first losses differ by {error:.2e} > {tolerance:.2e}"
    step = bench_torch.make_steps(bench_torch.CASES[shape])[contestant].step
    benchmark.group = f"training step {shape}"
    step()  # the first step (allocations, Adam's state) is not a sample
    benchmark(step)

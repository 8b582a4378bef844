"""The recurrent hot loop, timed by pytest-benchmark: forward, and forward+backward ("train"),
for every backend and torch.nn.RNN at each shape of the grid, in float32; and issue 12's stacks
(pyrnn.RNN against torch.nn.RNN with the same layers × directions).

Groups are "<shape> <mode>", so pytest-benchmark's table reads backend against backend at one
shape. Each case also checks its result against the float64 reference (the gate of `pyrnn
bench`), so the smoke run catches a wrong kernel, not only a broken one. No speed is asserted.
"""
import functools

import numpy as np
import pytest

import pyrnn
from pyrnn import bench

UNAVAILABLE = dict(pyrnn.unavailable_backends())
if bench.torch_or_none() is None:
    UNAVAILABLE[bench.PEER] = "torch cannot be imported (it is optional)"
CONTESTANTS = [pytest.param(name, marks=pytest.mark.skip(reason=UNAVAILABLE[name])) if name in UNAVAILABLE
               else name for name in pyrnn._backends.NAMES + (bench.PEER,)]


@functools.lru_cache(maxsize=None)
def problem_and_reference(shape):
    problem = bench.make_problem(bench.SHAPES[shape], np.float32)
    return problem, bench.reference_results(problem)


@pytest.mark.parametrize("shape", list(bench.SHAPES))
@pytest.mark.parametrize("mode", bench.MODES)
@pytest.mark.parametrize("backend", CONTESTANTS)
def test_rnn(benchmark, backend, mode, shape):
    problem, expected = problem_and_reference(shape)
    runner = bench.make_runner(backend, problem)
    benchmark.group = f"{shape} {mode}"
    benchmark.extra_info["gflop"] = bench.flops(bench.SHAPES[shape], mode) / 1e9
    getattr(runner, mode)()  # the first call (numba's JIT compilation) is not a sample
    outcome = benchmark(getattr(runner, mode))

    trained = outcome if mode == "train" else runner.train()
    error, worst, tolerance = bench.disagreement(runner.results(trained), expected, problem)
    assert error <= tolerance, f"{backend} disagrees with the reference on {worst}: {error:.2e} > {tolerance:.2e}"


# Issue 12's stacks: pyrnn.RNN (one stack call per forward, one per backward) against
# torch.nn.RNN with the same layers, directions and weights. Groups "<shape> <L>x<D> <mode>".
STACKS = [("tiny", bench.Stack(2, 1)), ("small", bench.Stack(2, 2)), ("small", bench.Stack(4, 1)),
          ("medium", bench.Stack(2, 2))]


@functools.lru_cache(maxsize=None)
def stack_problem_and_reference(shape, stack):
    problem = bench.make_stack_problem(bench.SHAPES[shape], stack, np.float32)
    return problem, bench.stack_reference_results(problem)


@pytest.mark.parametrize("shape,stack", STACKS, ids=[f"{shape}-{L}x{D}" for shape, (L, D) in STACKS])
@pytest.mark.parametrize("mode", bench.MODES)
@pytest.mark.parametrize("backend", CONTESTANTS)
def test_rnn_stack(benchmark, backend, mode, shape, stack):
    problem, expected = stack_problem_and_reference(shape, stack)
    runner = bench.make_runner(backend, problem)
    benchmark.group = f"{shape} {stack.layers}x{stack.directions} {mode}"
    benchmark.extra_info["gflop"] = bench.flops(bench.SHAPES[shape], mode, stack) / 1e9
    getattr(runner, mode)()  # the first call (numba's JIT compilation) is not a sample
    outcome = benchmark(getattr(runner, mode))

    trained = outcome if mode == "train" else runner.train()
    error, worst, tolerance = bench.disagreement(runner.results(trained), expected, problem)
    assert error <= tolerance, f"{backend} disagrees with the reference on {worst}: {error:.2e} > {tolerance:.2e}"

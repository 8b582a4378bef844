"""The benchmark suite: each backend and torch.nn.RNN on the shape grid of docs/design.md §4.

    pytest benchmarks/ --benchmark-only -k medium          # time one shape, backend vs backend
    PYRNN_NUM_THREADS=1 pytest benchmarks/ --benchmark-only  # bound every thread pool, torch's too
    pytest benchmarks/ --benchmark-disable                  # CI smoke run: SMOKE_SHAPES, once each

The smoke run (--benchmark-disable) keeps to the shapes in SMOKE_SHAPES so that it takes
seconds: tiny and small run the native kernel on one thread, medium on its multi-threaded path
(steps from 2 MFLOP up). large and deepbench add only size, and `pyrnn bench --full` covers them;
the smoke run skips them with a reason that says so.
For the interleaved side-by-side tables use `pyrnn bench` instead.
"""
import os

import pytest

from pyrnn import bench

SMOKE_SHAPES = ("tiny", "small", "medium")


def pytest_configure(config):
    if os.environ.get("PYRNN_NUM_THREADS"):  # pyrnn's pools follow it already; torch's must too
        bench.set_threads(int(os.environ["PYRNN_NUM_THREADS"]))


def pytest_collection_modifyitems(config, items):
    if not config.getoption("benchmark_disable", False):
        return
    skip = pytest.mark.skip(reason=f"smoke run (--benchmark-disable) covers {', '.join(SMOKE_SHAPES)}; "
                                   "`pyrnn bench --full` times the larger shapes")
    for item in items:
        shape = getattr(item, "callspec", None) and item.callspec.params.get("shape")
        if shape is not None and shape not in SMOKE_SHAPES:
            item.add_marker(skip)

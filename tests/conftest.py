"""Shared fixtures: the backends under test.

Every test that takes ``backend`` runs once per available backend, or only for the one
$PYRNN_BACKEND names: CI runs the backend-dependent modules once per backend that way.
"""
import os

import pytest

import pyrnn

FORCED_BACKEND = os.environ.get("PYRNN_BACKEND")
BACKENDS = (FORCED_BACKEND,) if FORCED_BACKEND else pyrnn.available_backends()


@pytest.fixture(params=BACKENDS, scope="session")
def backend(request):
    return request.param


# Modules whose tests name the backend they run (or run none), so that their results do not depend
# on $PYRNN_BACKEND: CI runs them once, and each forced-backend run skips them with
# `-m "not backend_independent"`. A module not listed runs in every forced run.
BACKEND_INDEPENDENT = {"test_native_kernel.py", "test_native_bindings.py", "test_native_tanh.py",
                       "test_native_peak.py", "test_native_stack.py", "test_native_fuzz.py",
                       "test_native_leaks.py", "test_numba_kernel.py", "test_bench.py", "test_optim.py",
                       "test_design.py", "test_packaging.py", "test_torch_integration.py"}


def pytest_collection_modifyitems(items):
    for item in items:
        if item.path.name in BACKEND_INDEPENDENT:
            item.add_marker(pytest.mark.backend_independent)


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the calls that reach pyrnn's kernel from pyrnn.torch (through pyrnn.stack_forward):
    a fallback to torch's own computation makes none."""
    calls = []
    stack_forward = pyrnn.stack_forward

    def counting(x, *args, **kwargs):
        calls.append(x.shape)
        return stack_forward(x, *args, **kwargs)

    monkeypatch.setattr(pyrnn, "stack_forward", counting)
    return calls


def pytest_terminal_summary(terminalreporter):
    import problems

    if problems.float64_discrepancies:
        (backend, tensor), error = max(problems.float64_discrepancies.items(), key=lambda kv: kv[1])
        terminalreporter.write_line(f"largest float64 discrepancy from the reference: {error:.2e} "
                                    f"({backend}, {tensor}; relative to max(1, |reference|))")

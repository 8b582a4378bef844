"""Shared fixtures: the backends under test.

Every test that takes ``backend`` runs once per available backend, or only for the one
$PYRNN_BACKEND names: CI runs the whole suite once per backend that way.
"""
import os

import pytest

import pyrnn

FORCED_BACKEND = os.environ.get("PYRNN_BACKEND")
BACKENDS = (FORCED_BACKEND,) if FORCED_BACKEND else pyrnn.available_backends()


@pytest.fixture(params=BACKENDS, scope="session")
def backend(request):
    return request.param


def pytest_terminal_summary(terminalreporter):
    import problems

    if problems.float64_discrepancies:
        (backend, tensor), error = max(problems.float64_discrepancies.items(), key=lambda kv: kv[1])
        terminalreporter.write_line(f"largest float64 discrepancy from the reference: {error:.2e} "
                                    f"({backend}, {tensor}; relative to max(1, |reference|))")

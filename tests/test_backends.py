"""Which backends exist, how one is chosen, and what happens when one is missing."""
import importlib.metadata
import os
import subprocess
import sys

import numpy as np
import pytest

import pyrnn
from pyrnn import _backends

from problems import make_problem


def test_available_backends_fastest_first():
    available = pyrnn.available_backends()
    assert "numpy" in available
    assert list(available) == [name for name in ("cpp", "numba", "numpy") if name in available]


def test_an_installed_package_has_its_native_module():
    """A green run must never hide an unbuilt extension: fail (not skip) when pyrnn was installed
    with pip but pyrnn._cpp is missing. Only a never-installed source tree may lack it."""
    try:
        importlib.metadata.distribution("pyrnn")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("pyrnn runs from a source tree that was never installed")
    if _backends.native_missing():
        pytest.skip(f"installed without the native module on purpose: {_backends.native_missing()}")
    assert "cpp" in pyrnn.available_backends(), pyrnn.unavailable_backends().get("cpp")
    assert "numba" in pyrnn.available_backends(), pyrnn.unavailable_backends().get("numba")


def test_environment_variable_forces_the_default(monkeypatch):
    monkeypatch.setenv("PYRNN_BACKEND", "numpy")
    assert _backends.resolve(None)[0] == "numpy"
    assert _backends.resolve("numba")[0] == "numba"  # an explicit choice still wins
    monkeypatch.setenv("PYRNN_BACKEND", "fortran")
    with pytest.raises(ValueError, match=r"\$PYRNN_BACKEND='fortran' is not a backend"):
        pyrnn.forward(**make_problem(np.random.default_rng(0), 2, 1, 1, 1))
    monkeypatch.delenv("PYRNN_BACKEND")
    assert _backends.resolve(None)[0] == pyrnn.available_backends()[0]


def test_the_suite_runs_the_forced_backend():
    forced = os.environ.get("PYRNN_BACKEND")
    if forced:
        assert _backends.resolve(None)[0] == forced


def run_python(code, **env):
    environment = dict(os.environ, **env)
    environment.pop("PYRNN_BACKEND", None)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=environment, check=True).stdout


@pytest.mark.parametrize("module, backend, reason", [
    ("pyrnn._cpp", "cpp", "the native module pyrnn._cpp was not built"),
    ("numba", "numba", "numba cannot be imported"),
])
def test_import_works_without_a_backend(module, backend, reason):
    """Block one import (as a missing build or a missing numba would) and use what remains."""
    out = run_python(f"""
import sys
sys.modules[{module!r}] = None  # makes `import {module}` raise ImportError
import numpy as np, pyrnn
print(pyrnn.available_backends())
print(pyrnn.unavailable_backends()[{backend!r}])
out, h_n = pyrnn.forward(np.ones((2, 1, 1)), np.ones((1, 1)), np.ones((1, 1)))
print(out.shape)
try:
    pyrnn.forward(np.ones((2, 1, 1)), np.ones((1, 1)), np.ones((1, 1)), backend={backend!r})
except ValueError as error:
    print("error:", error)
""")
    available, why, shape, error = out.splitlines()
    assert backend not in available and "numpy" in available
    assert why.startswith(reason)
    assert shape == "(2, 1, 1)"
    assert error.startswith(f"error: backend={backend!r} is not available: {reason}")


def test_import_does_not_load_numba():
    out = run_python("import sys, pyrnn; print('numba' in sys.modules)")
    assert out.strip() == "False"


def test_backends_command_lists_every_backend(capsys):
    from pyrnn.__main__ import main

    assert main(["backends"]) == 0
    out = capsys.readouterr().out
    for name in ("cpp", "numba", "numpy"):
        assert name in out
    if "cpp" in pyrnn.available_backends():
        isa = pyrnn._backends.loaded()["cpp"].isa()
        assert f"cpp    available (instruction set {isa}; bf16 products: " in out


def test_a_source_tree_shadowing_the_installed_package_says_so(tmp_path):
    """`python -c "import pyrnn"` from the repository root imports the unbuilt source tree."""
    try:
        importlib.metadata.distribution("pyrnn")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("needs an installed pyrnn to shadow")
    import shutil

    shutil.copytree(os.path.dirname(pyrnn.__file__), tmp_path / "pyrnn",
                    ignore=shutil.ignore_patterns("_cpp*", "_native_missing.txt", "__pycache__"))  # as in git
    out = subprocess.run([sys.executable, "-c", "import pyrnn; print(pyrnn.unavailable_backends()['cpp'])"],
                         capture_output=True, text=True, cwd=tmp_path, check=True).stdout
    assert f"imported from the source tree {tmp_path / 'pyrnn'}" in out


def _blas_threads():
    from threadpoolctl import threadpool_info

    return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]


def test_a_limited_thread_count_leaves_the_state_before_it():
    """Tests and benchmarks change the thread count for a while: afterwards every pool must be as
    it was, with no threadpoolctl limit left behind when no count had been set."""
    from pyrnn import _threads

    if _threads._num_threads is not None:
        pytest.skip("$PYRNN_NUM_THREADS sets a count for the whole process")
    pyrnn.available_backends()  # every backend loaded, so each gets the count
    blas_before, cores = _blas_threads(), pyrnn.get_num_threads()
    with _threads.limited_to(1):
        assert pyrnn.get_num_threads() == 1 and set(_blas_threads()) == {1}
        with _threads.limited_to(2):
            assert pyrnn.get_num_threads() == 2
        assert pyrnn.get_num_threads() == 1 and set(_blas_threads()) == {1}
    assert _threads._num_threads is None and pyrnn.get_num_threads() == cores
    assert _blas_threads() == blas_before
    if "cpp" in pyrnn.available_backends():
        from pyrnn import _cpp

        assert _cpp.get_num_threads() == cores

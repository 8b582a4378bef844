"""The backends and which of them this installation can run.

A backend is a module with ``forward`` and ``backward`` taking clean arrays (see
pyrnn/reference.py). ``cpp`` is the compiled extension, ``numba`` the JIT twin, ``numpy`` the
reference. Each is imported on first use, so ``import pyrnn`` stays cheap and works whatever
is missing; what is missing is remembered with a one-line reason.
"""
import importlib
import importlib.metadata
import os
from pathlib import Path

from . import _threads

NAMES = ("cpp", "numba", "numpy")  # fastest first
ENV_VAR = "PYRNN_BACKEND"  # forces the backend used when backend=None, e.g. for a whole CI run

_MODULES = {"cpp": "pyrnn._cpp", "numba": "pyrnn.numba", "numpy": "pyrnn.reference"}
_WHY_MISSING = {
    "cpp": "the native module pyrnn._cpp was not built (install the package with `pip install .`)",
    "numba": "numba cannot be imported",
}
_loaded = {}
_unavailable = {}


def _load(name):
    if name not in _loaded and name not in _unavailable:
        try:
            module = importlib.import_module(_MODULES[name])
        except Exception as error:  # ImportError, or a broken install failing at import
            built_without = name == "cpp" and native_missing()
            _unavailable[name] = (_built_without_native(built_without) if built_without else
                                  f"{_WHY_MISSING.get(name, 'import failed')}: {error}{_shadowed()}")
        else:
            _threads.apply(name, module)
            _loaded[name] = module
    return _loaded.get(name)


def native_missing():
    """Why this installation was built without pyrnn._cpp (CMakeLists.txt records it), or None."""
    try:
        return (Path(__file__).parent / "_native_missing.txt").read_text().strip()
    except OSError:
        return None


def _built_without_native(reason):
    return (f"pyrnn was built without the native module pyrnn._cpp ({reason}); to get it, install "
            "a C++17 compiler (g++ or clang++) and reinstall pyrnn from source: "
            "pip install --force-reinstall --no-cache-dir .")


def _shadowed():
    """A hint when this pyrnn is a source tree hiding an installed (built) copy, e.g. when Python
    runs from the repository root: the usual reason for a missing native module after `pip install .`."""
    here = Path(__file__).resolve().parent
    try:
        installed = Path(importlib.metadata.distribution("pyrnn").locate_file("pyrnn")).resolve()
    except importlib.metadata.PackageNotFoundError:
        return ""
    if installed == here or not installed.is_dir():
        return ""
    return (f"; pyrnn was imported from the source tree {here}, which hides the installed "
            f"package in {installed}: run from another directory")


def loaded():
    """{name: module} of the backends imported so far."""
    return dict(_loaded)


def available_backends():
    """Names of the backends that can run here, fastest first, e.g. ("cpp", "numba", "numpy")."""
    return tuple(name for name in NAMES if _load(name) is not None)


def unavailable_backends():
    """{name: one-line reason} for every backend that cannot run here."""
    available_backends()
    return dict(_unavailable)


def resolve_backend(backend=None):
    """The name of the backend a call with this `backend` argument runs on (see resolve)."""
    return resolve(backend)[0]


def resolve(backend):
    """(name, module) of the backend to run: the one asked for, else $PYRNN_BACKEND, else the fastest."""
    source = "backend"
    if backend is None and os.environ.get(ENV_VAR):
        backend, source = os.environ[ENV_VAR], f"${ENV_VAR}"
    if backend is None:  # the fastest that loads (numpy always does)
        backend = next(name for name in NAMES if _load(name) is not None)
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string or None, got {type(backend).__name__}")
    if backend not in NAMES:
        raise ValueError(f"{source}={backend!r} is not a backend; choose one of {NAMES} "
                         f"(available here: {available_backends()})")
    module = _load(backend)
    if module is None:
        raise ValueError(f"{source}={backend!r} is not available: {_unavailable[backend]}; "
                         f"available here: {available_backends()}")
    return backend, module

"""One thread count for every pool pyrnn computes with: the native kernel's, numba's, the BLAS
behind NumPy's matrix products and every OpenMP runtime in the process (those two through
threadpoolctl; numba's "omp" threading layer brings its own libgomp).

``pyrnn.set_num_threads(n)`` (or ``$PYRNN_NUM_THREADS`` at import) bounds them all; by default
each pool keeps its own default (all cores).
"""
import functools
import os

ENV_VAR = "PYRNN_NUM_THREADS"
_num_threads = None  # None: every pool keeps its default
_pool_limiter = None


def _parse(n, source):
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{source} must be a positive integer, got {n!r}")
    return n


def get_num_threads():
    """The thread count set by set_num_threads or $PYRNN_NUM_THREADS, else the cores this
    process may run on."""
    return _num_threads or _cores()


@functools.cache
def _cores():
    """The cores this process may run on (its CPU affinity where the OS has one), read once as
    the native kernel does: os.cpu_count() reads sysfs, ~6 us a call."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity API (macOS, Windows)
        return os.cpu_count() or 1


def set_num_threads(n):
    """Use at most n threads in every backend (native kernel, numba, NumPy's BLAS, OpenMP)."""
    global _num_threads
    _num_threads = _parse(n, "n")
    from . import _backends

    for name, module in _backends.loaded().items():
        apply(name, module)
    _limit_pools(n)


def apply(name, module):
    """Give a freshly loaded backend module the current thread count."""
    if _num_threads is None:
        return
    if name == "cpp" and hasattr(module, "set_num_threads"):
        module.set_num_threads(_num_threads)
    elif name == "numba":
        import numba

        numba.set_num_threads(min(_num_threads, numba.config.NUMBA_NUM_THREADS))


def _limit_pools(n):
    global _pool_limiter
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl is a dependency
        return
    if _pool_limiter is not None:
        _pool_limiter.restore_original_limits()
    _pool_limiter = threadpool_limits(limits=n)  # every BLAS and OpenMP runtime loaded


if os.environ.get(ENV_VAR):
    try:
        _num_threads = _parse(int(os.environ[ENV_VAR]), f"${ENV_VAR}")
    except ValueError as error:
        raise ValueError(f"${ENV_VAR} must be a positive integer, got {os.environ[ENV_VAR]!r}") from error
    _limit_pools(_num_threads)

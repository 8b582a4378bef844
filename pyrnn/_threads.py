"""One thread count for every pool pyrnn computes with: the native kernel's, numba's, the BLAS
behind NumPy's matrix products and every OpenMP runtime in the process (those two through
threadpoolctl; numba's "omp" threading layer brings its own libgomp).

``pyrnn.set_num_threads(n)`` (or ``$PYRNN_NUM_THREADS`` at import) bounds them all; by default
each pool keeps its own default (all cores).
"""
import contextlib
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


def apply(name, module, default=False):
    """Give a freshly loaded backend module the current thread count (with default: its own
    default count, as if none had ever been set)."""
    if _num_threads is None and not default:
        return
    if name == "cpp" and hasattr(module, "set_num_threads"):
        module.set_num_threads(_num_threads or _cores())  # the kernel's default: these cores
    elif name == "numba":
        import numba

        most = numba.config.NUMBA_NUM_THREADS
        numba.set_num_threads(min(_num_threads, most) if _num_threads else most)


@contextlib.contextmanager
def limited_to(n):
    """set_num_threads(n) inside the block; after it, exactly the state before it: the previous
    count, or, if there was none, every pool back to its own default with no threadpoolctl limit
    left behind (for tests and benchmarks, which must not change the rest of the process)."""
    global _num_threads, _pool_limiter
    previous = _num_threads
    set_num_threads(n)
    try:
        yield
    finally:
        if previous is not None:
            set_num_threads(previous)
        else:
            _num_threads = None
            if _pool_limiter is not None:
                _pool_limiter.restore_original_limits()
                _pool_limiter = None
            from . import _backends

            for name, module in _backends.loaded().items():
                apply(name, module, default=True)


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

"""Stress, bounded in time: concurrent calls, memory over many calls, thread counts changed under
load, fork while computing, allocations that cannot succeed. Every backend unless said otherwise."""
import gc
import os
import subprocess
import sys
import threading
import tracemalloc
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import pyrnn
from forking import forked_child_agrees
from problems import make_problem, random_lengths
from pyrnn.testing import tolerance

# (T, B, I, H, dtype, with lengths): steps shared between threads or not, both dtypes, odd sizes
MIXED = [(5, 3, 7, 9, np.float64, True), (20, 16, 64, 128, np.float32, False),
         (7, 9, 70, 200, np.float32, True), (30, 1, 5, 33, np.float64, False),
         (4, 64, 32, 256, np.float64, True)]


def mixed_problems():
    rng = np.random.default_rng(7)
    problems = []
    for T, B, I, H, dtype, with_lengths in MIXED:
        p = make_problem(rng, T, B, I, H, dtype)
        p["lengths"] = random_lengths(rng, T, B) if with_lengths else None
        p["grad_output"] = rng.standard_normal((T, B, H)).astype(dtype)
        problems.append(p)
    return problems


def forward_and_backward(p, backend):
    output, h_n = pyrnn.forward(p["x"], p["weight_ih"], p["weight_hh"], p["bias"], p["h0"],
                                lengths=p["lengths"], backend=backend)
    grads = pyrnn.backward(p["grad_output"], p["x"], p["weight_ih"], p["weight_hh"], output,
                           p["h0"], lengths=p["lengths"], backend=backend)
    return (output, h_n) + tuple(grads)


def assert_bitwise_equal(results, expected):
    for got, want in zip(results, expected):
        assert got.dtype == want.dtype and np.array_equal(got.view(np.uint8), want.view(np.uint8))


@pytest.fixture
def restore_threads():
    before = pyrnn.get_num_threads()
    yield
    pyrnn.set_num_threads(before)


def test_concurrent_threads_on_mixed_shapes_give_the_sequential_results_bitwise(backend):
    problems = mixed_problems()
    sequential = [forward_and_backward(p, backend) for p in problems]
    jobs = list(range(len(problems))) * 4
    with ThreadPoolExecutor(4) as executor:
        results = list(executor.map(lambda i: forward_and_backward(problems[i], backend), jobs))
    for i, result in zip(jobs, results):
        assert_bitwise_equal(result, sequential[i])


def test_changing_the_thread_count_while_other_threads_compute(backend, restore_threads):
    """The thread count changed in the middle of other calls: the native kernel's results do not
    depend on it at all; numba's and NumPy's products go through BLAS, whose rounding may."""
    problems = mixed_problems()
    sequential = [forward_and_backward(p, backend) for p in problems]
    stop = threading.Event()

    def change_thread_counts():
        counts = [1, 2, 3, 1, 4, 2]
        i = 0
        while not stop.is_set():
            pyrnn.set_num_threads(counts[i % len(counts)])
            i += 1

    changer = threading.Thread(target=change_thread_counts)
    changer.start()
    try:
        with ThreadPoolExecutor(3) as executor:
            results = list(executor.map(lambda i: forward_and_backward(problems[i], backend),
                                        list(range(len(problems))) * 3))
    finally:
        stop.set()
        changer.join()
    for i, result in zip(list(range(len(problems))) * 3, results):
        if backend == "cpp":
            assert_bitwise_equal(result, sequential[i])
        else:
            for got, want in zip(result, sequential[i]):
                np.testing.assert_allclose(got, want, rtol=0, atol=tolerance(got.dtype, 1e4))


def test_native_calls_overlap_in_time():
    """Two Python threads are inside the native kernel at once. No timing: with a switch interval
    of 100 s, a thread gives the GIL up only by blocking or by releasing it in C, so when this
    thread runs again after a worker started its call, and the call has not returned, the kernel
    released the GIL; it does so again for a second worker while the first is still inside."""
    _cpp = pytest.importorskip("pyrnn._cpp")
    rng = np.random.default_rng(3)
    inputs = [(0.1 * rng.standard_normal(s)).astype(np.float32)
              for s in [(2000, 32, 64), (256, 64), (256, 256), (256,), (32, 256)]]
    calling = [threading.Event(), threading.Event()]
    returned = [threading.Event(), threading.Event()]
    go_second = threading.Event()

    def call(k):
        if k == 1:
            go_second.wait()
        calling[k].set()  # from here to the kernel's release of the GIL, nothing blocks
        _cpp.forward(*inputs)
        returned[k].set()

    interval = sys.getswitchinterval()
    sys.setswitchinterval(100.0)
    workers = [threading.Thread(target=call, args=(k,)) for k in (0, 1)]
    try:
        for worker in workers:
            worker.start()
        calling[0].wait()
        first_inside = not returned[0].is_set()
        go_second.set()
        calling[1].wait()
        both_inside = not returned[0].is_set() and not returned[1].is_set()
    finally:
        sys.setswitchinterval(interval)
        for worker in workers:
            worker.join()
    assert first_inside, "the first call held the GIL until it returned"
    assert both_inside, "the two calls were never inside the kernel at the same time"


def _rss_bytes():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _asan_loaded():
    with open("/proc/self/maps") as maps:
        return "libasan" in maps.read()


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads the RSS from /proc")
@pytest.mark.skipif(_asan_loaded(), reason="ASan holds freed memory in quarantine; "
                    "test_native_leaks.py checks that run")
def test_memory_stays_flat_over_many_calls(backend):
    """RSS and Python allocations (tracemalloc, which sees NumPy's buffers too) after 10x more
    calls are within generous bounds of those after the first few (the native kernel keeps its
    scratch memory: the first calls grow the RSS, later ones must not)."""
    problems = mixed_problems()[:2]
    calls = 30 if backend == "numpy" else 300

    def run(n):
        for _ in range(n):
            for p in problems:
                forward_and_backward(p, backend)
        gc.collect()

    run(5)  # compile, fill caches
    tracemalloc.start()
    try:
        run(3)
        rss, (python, _) = _rss_bytes(), tracemalloc.get_traced_memory()
        run(calls)
        rss_after, (python_after, _) = _rss_bytes(), tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert rss_after - rss < 32 << 20, f"RSS grew by {(rss_after - rss) >> 20} MiB over {calls} rounds"
    assert python_after - python < 256 << 10, f"Python allocations grew by {python_after - python} bytes"


def test_fork_while_another_thread_computes(backend, tmp_path):
    """The parent has a thread in the middle of calls when it forks: the child must not wait on
    that thread's locks or workers, which it does not have."""
    if backend == "numpy":
        pytest.skip("the reference is NumPy only: a child forked while another thread is inside "
                    "NumPy's matrix product hung, intermittently, in that product (OpenBLAS's lock "
                    "copied while held; not pyrnn code)")
    setup = (f"import threading, pyrnn\nfrom test_stress import mixed_problems, forward_and_backward\n"
             f"problems = mixed_problems()\nforward_and_backward(problems[2], {backend!r})\n"
             f"def busy():\n    for _ in range(300):\n        forward_and_backward(problems[4], {backend!r})\n"
             f"threading.Thread(target=busy).start()")
    assert forked_child_agrees(setup, f"forward_and_backward(problems[2], {backend!r})[0]", tmp_path)


def test_exit_while_a_daemon_thread_calls(backend, tmp_path):
    """The interpreter exits while a daemon thread makes call after call: the process ends
    normally. (CPython < 3.14 ends a thread that asks for the GIL back during finalization with
    pthread_exit; when one of the calls returned then, the unwinding met the native module's C++
    and aborted the process, every time here; csrc/bindings.cpp: WithoutGil.)"""
    code = f"""if True:
        import threading, numpy as np, pyrnn
        x, weight_ih, weight_hh = (np.zeros(shape, np.float32) for shape in ((20, 4, 16), (256, 16), (256, 256)))
        called = threading.Event()
        def calls():
            while True:
                pyrnn.forward(x, weight_ih, weight_hh, backend={backend!r})
                called.set()
        threading.Thread(target=calls, daemon=True).start()
        called.wait()
        print("exiting")
        """
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert (out.returncode, out.stdout) == (0, "exiting\n"), out.stderr[-3000:]


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_allocations_that_cannot_succeed_raise_memory_error(backend, direction):
    """Results of 8 TiB (x holds no bytes: I = 0)."""
    T, B, I, H = 2**30, 1, 0, 1024
    x, weight_ih = np.zeros((T, B, I), np.float64), np.zeros((H, I))
    weight_hh = np.zeros((H, H))
    with pytest.raises(MemoryError):
        if direction == "forward":
            pyrnn.forward(x, weight_ih, weight_hh, backend=backend)
        else:
            big = np.broadcast_to(np.zeros(1), (T, B, H))  # no memory; not contiguous: pyrnn copies it
            pyrnn.backward(big, x, weight_ih, weight_hh, big, backend=backend)

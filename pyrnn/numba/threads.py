"""Threads sharing a time loop, as the native kernel's do (docs/design.md §3.4).

From SPLIT_MIN_WORK multiply-adds per step, set_num_threads(n) threads share each time loop,
each owning whole panels of the hidden units (column_bounds) and all of them meeting at one
barrier per step (barrier: a counter per thread, written with release and read with acquire
ordering, so the columns a thread wrote before its counter moved are visible to the others once
they see it). The caller's thread is one of them, the others are kept worker threads
(on_threads); compiled code releases the GIL (``nogil``). NumPy's BLAS runs single-threaded
meanwhile (one_blas_thread), each thread calling it on its own share, so no idle BLAS worker
spins on the cores the barrier waits for.
"""
import contextlib
import math
import os
import queue
import threading

import numpy as np
from numba import njit

from .. import _threads
from .intrinsics import load_acquire, store_release, yield_core

# A waiting thread spins (a few us) and then yields its core at every check: when the machine
# has more runnable threads than cores (other processes, BLAS workers), the thread it waits for
# may be the one that needs the core. Measured on medium at 2 threads right after a NumPy
# product (whose BLAS workers spin ~0.1 s): 18 ms per forward with yielding, 50 without.
_SPINS_BEFORE_YIELD = 1 << 12


@njit(inline="always")
def barrier(steps_done, thread, step):
    """Thread `thread` has finished `step`; wait until every thread has."""
    store_release(steps_done, thread, step)
    for other in range(steps_done.shape[0]):
        spins = 0
        while load_acquire(steps_done, other) < step:
            spins += 1
            if spins > _SPINS_BEFORE_YIELD:
                yield_core()


@njit(inline="always")
def stopping(stop, steps_done, thread):
    """Whether the call was interrupted (stop[0] set: interruptible); the time loops ask once per
    step. A thread that leaves marks itself past every step, so that the others pass the
    barriers where they would wait for it, and they leave at their next step too."""
    if load_acquire(stop, 0) == 0:
        return False
    store_release(steps_done, thread, np.iinfo(np.int64).max)
    return True


# Ctrl-C (issue 15). Python runs signal handlers in the main thread only, between bytecodes, so a
# call of seconds in compiled code would hold Ctrl-C back until it returns. A call of more than
# INTERRUPTIBLE_WORK multiply-adds (~5 ms or more, the native module's threshold) from the main
# thread therefore computes on a helper thread while the main thread waits in join(), which a
# signal interrupts: the handler's exception (KeyboardInterrupt) sets the stop flag, the time
# loops leave at their next step (stopping), and the exception propagates once the helper is
# done. Shorter calls and calls from other threads run on the calling thread as before.
INTERRUPTIBLE_WORK = 1 << 27
NEVER = np.zeros(1, np.int64)  # the stop flag of a call that cannot be interrupted (never set)


def on_threads_interruptibly(work, n, task, steps_done):
    """on_threads(n, task, steps_done), interrupted as above if it is `work` multiply-adds or
    more: task(i, stop) then gets the stop flag (else it keeps its default, NEVER)."""
    if work < INTERRUPTIBLE_WORK or threading.current_thread() is not threading.main_thread():
        return on_threads(n, task, steps_done)
    stop, outcome = np.zeros(1, np.int64), []

    def helper():
        try:
            outcome.append((on_threads(n, lambda i: task(i, stop), steps_done), None))
        except BaseException as error:  # re-raised on the calling thread
            outcome.append((None, error))

    thread = threading.Thread(target=helper, name="pyrnn-numba-call")
    thread.start()
    try:
        thread.join()
    except BaseException:  # KeyboardInterrupt, or whatever another signal handler raised
        stop[0] = 1
        thread.join()
        raise
    result, error = outcome[0]
    if error is not None:
        raise error
    return result


# Per-step multiply-adds from which a time loop is split between threads; below it a second
# thread costs more at the barrier than it takes off the step.
SPLIT_MIN_WORK = 1 << 20


def thread_count(J, work, panel):
    """Threads for a time loop over J columns with `work` multiply-adds per step: as many as
    set_num_threads allows and the work pays for, each with at least one panel of columns."""
    return max(1, min(_threads.get_num_threads(), work // SPLIT_MIN_WORK, J // panel))


def column_bounds(J, n, panel):
    """n + 1 bounds splitting J columns into n slices of whole panels (products.pack), which
    start at a cache line in each row of an array that starts at one (empty)."""
    if n == 1:
        return 0, J  # without building the list: 0.9 us of a 18 us tiny forward
    panels = -(-J // panel)
    return [min(J, panel * (panels * i // n)) for i in range(n + 1)]


def empty(shape, dtype, threads):
    """np.empty(shape, dtype), starting at a 64-byte boundary, a cache line, if several threads
    write it. They write neighbouring column slices, which start at multiples of 64 bytes within
    each row: with aligned rows no cache line is written by two threads (NumPy aligns to 16
    bytes only). Measured at 2 threads, forward / backward: medium 11.0 / 22.6 ms aligned,
    12.5 / 23.6 ms 16 bytes past a line; large 44.6 / 104 against 47.3 / 108."""
    if threads == 1:
        return np.empty(shape, dtype)
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    buffer = np.empty(nbytes + 64, np.uint8)
    start = -buffer.ctypes.data % 64
    return buffer[start:start + nbytes].view(dtype).reshape(shape)


def no_float_warnings():
    """NaN and inf are values that propagate, not warnings, in the NumPy products here too
    (reference.without_float_warnings). np.errstate holds for the thread that enters it only, so
    each thread enters its own: the compiled loops need none (tiny forward: 0.7 us saved)."""
    return np.errstate(all="ignore")


_blas_pools = None  # threadpoolctl's handle on NumPy's BLAS, made on first use


@contextlib.contextmanager
def _one_blas_thread():
    """A context in which NumPy's BLAS computes on the calling thread only. Its own pool would
    wake worker threads that keep spinning ~0.1 s after the call, on the cores where our time
    loop's threads wait for each other at every step (measured: a 2-thread forward on medium
    takes 18 ms, median, instead of 9.6 right after a 2-thread NumPy product). Entered only
    under _workers_lock, by one split call at a time."""
    global _blas_pools
    if _blas_pools is None:
        from threadpoolctl import ThreadpoolController

        _blas_pools = ThreadpoolController().select(user_api="blas")
    limit = _blas_pools.limit(limits=1)
    try:
        yield
    finally:
        limit.restore_original_limits()


# Worker threads, started when first needed and kept: a thread started per call shares its
# creator's core until the scheduler moves it, which can take longer than the call (measured:
# 2-thread forwards on medium as slow as 1-thread ones). For the same reason a worker spins
# ~1 ms after each task before it sleeps: woken from sleep it may again be placed on the
# waking thread's core, while a spinning one keeps its own for back-to-back calls.
_workers = []  # (task queue, doorbell) per worker thread; doorbell[0] = 1: a task is queued
_workers_lock = threading.Lock()  # one split call at a time: its threads must all run at once
_WORKER_SPINS = 1 << 22  # checks of the doorbell: ~1 ms on the development machine


@njit(cache=True, nogil=True)
def _spin_until_rung(doorbell, spins):
    for _ in range(spins):
        if load_acquire(doorbell, 0):
            return


def _work(tasks, doorbell):
    while True:
        _spin_until_rung(doorbell, _WORKER_SPINS)
        task = tasks.get()  # sleeps here if no task came while spinning
        doorbell[0] = 0
        task()


def _forget_workers():  # a forked child has none of its parent's threads
    global _workers_lock
    _workers.clear()
    _workers_lock = threading.Lock()


if hasattr(os, "register_at_fork"):  # POSIX; Windows has no fork
    os.register_at_fork(after_in_child=_forget_workers)


def on_threads(n, task, steps_done):
    """[task(0), ..., task(n - 1)]: task(0) on this thread, the others on worker threads, where
    NumPy's BLAS then runs single-threaded, so that n threads compute in all. steps_done: the
    tasks' barrier counters (barrier)."""
    if n == 1:
        return [task(0)]
    results, errors, finished = [None] * n, [], threading.Semaphore(0)

    def run(i):
        try:
            results[i] = task(i)
        except BaseException as error:  # re-raised below, on the calling thread
            # Marked past every step, so that the tasks waiting for it at a barrier finish
            # instead of waiting forever (it may fail anywhere: BLAS, an allocation, compiled code).
            steps_done[i] = np.iinfo(steps_done.dtype).max
            errors.append(error)
        if i:
            finished.release()

    with _workers_lock, _one_blas_thread():
        while len(_workers) < n - 1:
            _workers.append((queue.SimpleQueue(), np.zeros(1, np.int64)))
            threading.Thread(target=_work, args=_workers[-1], daemon=True).start()
        for i in range(1, n):
            tasks, doorbell = _workers[i - 1]
            tasks.put(lambda i=i: run(i))
            doorbell[0] = 1
        run(0)
        for _ in range(1, n):
            finished.acquire()
    if errors:
        raise errors[0]
    return results

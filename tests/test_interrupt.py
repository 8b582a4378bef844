"""Ctrl-C: a long call stops within 100 ms of SIGINT with KeyboardInterrupt, leaves no thread
computing, changes no input, and the next call gives what a fresh one gives.

Each case runs in a child interpreter that sends itself SIGINT while a call of seconds runs
(csrc/bindings.cpp: run_kernel says how the native module does it; the NumPy reference's time loop
is Python, so the interrupt arrives between its steps)."""
import json
import subprocess
import sys

import pytest

import pyrnn

SCRIPT = """
import json, os, signal, threading, time
import numpy as np
import pyrnn
rng = np.random.default_rng(0)
T, B, I, H = {shape}
x = (0.1 * rng.standard_normal((T, B, I))).astype(np.float32)
weight_ih = (rng.standard_normal((H, I)) / np.sqrt(I)).astype(np.float32)
weight_hh = (0.5 * rng.standard_normal((H, H)) / np.sqrt(H)).astype(np.float32)
inputs = [x, weight_ih, weight_hh]
before = [a.copy() for a in inputs]
small = [a[:3, :2] if a is x else a for a in inputs]  # a short call on the same weights

def call(arrays):
    if {stack!r}:
        return pyrnn.stack_forward(arrays[0], [(arrays[1], arrays[2], None)], backend={backend!r}).output
    output, _ = pyrnn.forward(*arrays, backend={backend!r})
    if {direction!r} == "forward":
        return output
    return pyrnn.backward(output, *arrays, output, backend={backend!r}).x

expected_small = call(small)
call([x[:20], weight_ih, weight_hh])  # steps big enough to share: the native pool starts its workers
threads = lambda: len(os.listdir("/proc/self/task"))
threads_before = threads()
sent = []
def interrupt():
    sent.append(time.perf_counter())
    os.kill(os.getpid(), signal.SIGINT)
threading.Timer({delay}, interrupt).start()
start = time.perf_counter()
try:
    call(inputs)
    result = dict(interrupted=False, seconds=time.perf_counter() - start)
except KeyboardInterrupt:
    result = dict(interrupted=True, latency=time.perf_counter() - sent[0])
cpu = time.process_time()
time.sleep(0.3)
result.update(
    cpu_after=time.process_time() - cpu,  # ~0 unless a thread still computes
    threads_after=threads() - threads_before,  # the Timer's thread has ended too
    inputs_unchanged=all(np.array_equal(a, b) for a, b in zip(inputs, before)),
    next_call_agrees=bool(np.array_equal(call(small), expected_small)))
print(json.dumps(result))
"""

# A forward of ~1-3 s on 2 loaded cores (5·10^10 multiply-adds), 2 ms per step.
LONG = (1500, 4, 16, 2048)


def interrupted_call(cwd, backend, direction="forward", stack=False, shape=LONG, delay=0.3):
    """Run in cwd (not the source tree, which would hide the installed pyrnn)."""
    code = SCRIPT.format(shape=shape, backend=backend, direction=direction, stack=stack, delay=delay)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         cwd=cwd)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.splitlines()[-1])


CASES = [("cpp", "forward", False), ("cpp", "backward", False), ("cpp", "forward", True),
         ("numpy", "forward", False), ("numpy", "backward", False)]


@pytest.mark.parametrize("backend, direction, stack", CASES)
def test_a_long_call_stops_on_sigint(backend, direction, stack, tmp_path):
    if backend not in pyrnn.available_backends():
        pytest.skip(f"{backend} is not available here")
    result = interrupted_call(tmp_path, backend, direction, stack,
                              shape=(300, 4, 16, 2048) if backend == "numpy" else LONG)
    assert result["interrupted"], f"the call finished in {result['seconds']:.2f} s, not interrupted"
    assert result["latency"] < 0.1, f"KeyboardInterrupt {1e3 * result['latency']:.0f} ms after SIGINT"
    assert result["threads_after"] <= 0 and result["cpu_after"] < 0.1, result
    assert result["inputs_unchanged"] and result["next_call_agrees"], result

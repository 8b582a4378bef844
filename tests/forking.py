"""Checks that a forked child computes what its parent does. The native kernel and the numba
backend keep worker threads; a fork has none of them, so the child must start its own rather
than wait for threads it does not have."""
import os
import subprocess
import sys
from pathlib import Path

_SCRIPT = """
import multiprocessing, numpy as np
{setup}
parent = {call}
def child(queue):
    queue.put({call})
context = multiprocessing.get_context("fork")
queue = context.Queue()
process = context.Process(target=child, args=(queue,))
process.start()
try:
    result = queue.get(timeout=60)
    process.join(60)
finally:
    if process.is_alive():  # a hung child must not outlive the test
        process.kill()
print(process.exitcode, np.array_equal(result, parent))
"""


def forked_child_agrees(setup, call, cwd):
    """In a fresh interpreter (run in cwd, so that the installed pyrnn is imported, with tests/
    importable): run `setup`, evaluate `call` (an array), fork, evaluate it again in the child.
    -> whether the child exited cleanly with the parent's result, bit for bit."""
    path = [str(Path(__file__).parent)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))  # keeps .ci/run's sanitized build first
    out = subprocess.run([sys.executable, "-c", _SCRIPT.format(setup=setup, call=call)],
                         capture_output=True, text=True, check=True, cwd=cwd, env=env,
                         timeout=600).stdout
    return out.split() == ["0", "True"]

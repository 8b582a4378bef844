"""LeakSanitizer on the native module's calls: run by .ci/run on the ASan build (skipped elsewhere).

The suite itself runs with leak detection off: the interpreter leaves memory behind at exit by
design. Here a child interpreter with every Python allocation going through malloc (so LSan sees
objects, not pymalloc's arenas) calls the module in every way that allocates, succeeding and
failing; a leak whose allocation stack passes through pyrnn's module is then reported, while the
interpreter's own are not ours. Verified to catch one extra reference to a result array.
"""
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("pyrnn._cpp")


def _asan_loaded():
    with open("/proc/self/maps") as maps:
        return "libasan" in maps.read()


pytestmark = pytest.mark.skipif(not _asan_loaded(), reason="needs the ASan build (.ci/run builds "
                                "it with -DPYRNN_SANITIZE=ON and runs this file under it)")

CALLS = """
import numpy as np
from pyrnn import _cpp
rng = np.random.default_rng(0)
for dtype in (np.float32, np.float64):
    T, B, I, H = 6, 3, 4, 40
    x = rng.standard_normal((T, B, I)).astype(dtype)
    wi = rng.standard_normal((H, I)).astype(dtype)
    wh = (0.1 * rng.standard_normal((H, H))).astype(dtype)
    lengths = np.array([6, 0, 2])
    for _ in range(50):
        output, h_n = _cpp.forward(x, wi, wh, None, None, lengths)
        _cpp.backward(output, x, wi, wh, output, None, None, lengths)
        _cpp.backward(output, x, wi, wh, output, h_n, h_n, None)
        _cpp.tanh(x)
        for bad in [(x, wi[:, :2].copy(), wh), (x, wi.astype(np.float16), wh), (x, wi, wh, None, None, lengths + 7),
                    (x, wi, wh, None, np.zeros((B + 1, H), dtype)), (np.zeros((2**40, 1, 0), dtype), wi[:, :0], wh)]:
            try:
                _cpp.forward(*bad)
            except (TypeError, ValueError, MemoryError):
                pass
print("done")
"""


def test_native_calls_leak_nothing(tmp_path):
    env = dict(os.environ, PYTHONMALLOC="malloc",
               ASAN_OPTIONS="detect_leaks=1:fast_unwind_on_malloc=0:allocator_may_return_null=1")
    result = subprocess.run([sys.executable, "-c", CALLS], capture_output=True, text=True, cwd=tmp_path,
                            env=env, timeout=600)
    assert result.stdout.strip() == "done", result.stderr[-3000:]
    reports = re.split(r"\n(?=(?:Direct|Indirect) leak of)", result.stderr)
    ours = [r for r in reports if re.match(r"(Direct|Indirect) leak of", r)
            and re.search(r"_cpp\.cpython|pyrnn::", r)]
    assert not ours, "\n".join(ours)[:5000]

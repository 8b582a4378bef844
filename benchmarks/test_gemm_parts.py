"""benchmarks/gemm_parts.py builds and measures every part (smoke test: no speed is asserted)."""
import importlib.util
import os
import shutil

import pytest

import pyrnn

HERE = os.path.dirname(os.path.abspath(__file__))


def load_gemm_parts():
    spec = importlib.util.spec_from_file_location("gemm_parts", os.path.join(HERE, "gemm_parts.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif("cpp" not in pyrnn.available_backends(), reason="needs the native module (its limits)")
@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None, reason="needs a C++ compiler")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_every_part_is_built_and_measured(tmp_path, precision):
    import subprocess
    import sys

    gemm_parts = load_gemm_parts()
    # The harness is built as the kernel's avx512 (fp32) or avx512bf16 (bf16) copy: it runs where
    # the CPU can run that copy, whatever copy $PYRNN_ISA selects here. A process forcing that
    # copy says so (the module refuses a copy the CPU cannot run).
    copy = gemm_parts.COPIES[precision][0]
    forced = subprocess.run([sys.executable, "-c", "import pyrnn._cpp; print(pyrnn._cpp.isa())"], cwd=tmp_path,
                            env={**os.environ, "PYRNN_ISA": copy}, capture_output=True, text=True)
    if forced.returncode != 0:
        pytest.skip(f"the {precision} harness is the kernel's {copy} copy, which this CPU cannot run: "
                    f"{forced.stderr.strip().splitlines()[-1]}")
    assert forced.stdout.strip() == copy
    measured = gemm_parts.parts(gemm_parts.build(str(tmp_path), precision), (5, 3, 7, 40), precision)
    assert [part for part, _ in measured] == ["micro-kernel in L1", "input product", "recurrent step product",
                                              "grad_x product", "grad_weight_ih product", "grad_weight_hh product"]
    assert all(rate > 0 for _, rate in measured)
    assert gemm_parts.limit(precision) > 0

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
    from pyrnn import _cpp
    # What the CPU can run, whatever copy of the kernel $PYRNN_ISA selects: the harness is built
    # as the avx512 (fp32) or avx512bf16 (bf16) copy and divided by the CPU's own limit loop.
    runs = _cpp.peak_instruction(precision)
    needs = {"fp32": ("vfmadd zmm",), "bf16": ("vdpbf16ps zmm", "tdpbf16ps tmm")}[precision]
    if runs not in needs:
        pytest.skip(f"the {precision} harness needs {' or '.join(needs)}; this CPU's {precision} limit runs {runs}")
    gemm_parts = load_gemm_parts()
    measured = gemm_parts.parts(gemm_parts.build(str(tmp_path), precision), (5, 3, 7, 40), precision)
    assert [part for part, _ in measured] == ["micro-kernel in L1", "input product", "recurrent step product",
                                              "grad_x product", "grad_weight_ih product", "grad_weight_hh product"]
    assert all(rate > 0 for _, rate in measured)
    assert gemm_parts.limit(precision) > 0

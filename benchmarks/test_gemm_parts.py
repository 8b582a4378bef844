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
    needs = {"fp32": ("avx512", "avx512bf16", "avx512amx"), "bf16": ("avx512bf16", "avx512amx")}[precision]
    if _cpp.isa() not in needs:
        pytest.skip(f"the {precision} harness is the kernel's {needs[0]} copy; pyrnn._cpp runs its {_cpp.isa()} "
                    "copy here (the CPU's best, or $PYRNN_ISA's)")
    gemm_parts = load_gemm_parts()
    measured = gemm_parts.parts(gemm_parts.build(str(tmp_path), precision), (5, 3, 7, 40), precision)
    assert [part for part, _ in measured] == ["micro-kernel in L1", "input product", "recurrent step product",
                                              "grad_x product", "grad_weight_ih product", "grad_weight_hh product"]
    assert all(rate > 0 for _, rate in measured)
    assert gemm_parts.limit(precision) > 0

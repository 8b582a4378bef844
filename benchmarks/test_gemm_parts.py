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


@pytest.mark.skipif("cpp" not in pyrnn.available_backends(), reason="needs the native module (its FMA limit)")
@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None, reason="needs a C++ compiler")
def test_every_part_is_built_and_measured(tmp_path):
    from pyrnn import _cpp
    if not _cpp.isa().startswith("avx512"):
        pytest.skip(f"the harness is the kernel's avx512 copy; this CPU runs {_cpp.isa()}")
    gemm_parts = load_gemm_parts()
    measured = gemm_parts.parts(gemm_parts.build(str(tmp_path)), (5, 3, 7, 40))
    assert [part for part, _ in measured] == ["micro-kernel in L1", "input product", "recurrent step product",
                                              "grad_x product", "grad_weight_ih product", "grad_weight_hh product"]
    assert all(rate > 0 for _, rate in measured)
    assert gemm_parts.fma_limit() > 0

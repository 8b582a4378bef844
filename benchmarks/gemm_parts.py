"""Where the float32 kernel's time goes, part by part, against the CPU's FMA limit.

    python benchmarks/gemm_parts.py                    # large and deepbench
    python benchmarks/gemm_parts.py --shapes medium,large
    taskset -c 1 python benchmarks/gemm_parts.py       # on one core, away from other work

perf cannot say it on our machines (no hardware counters in the VM, and the module is stripped),
so this builds benchmarks/gemm_parts.cpp: csrc/gemm.h's products timed one at a time on one
thread, each as rnn_kernel.cpp calls it, compiled with the flags of the kernel's avx512 copy
(CMakeLists.txt). The limit is pyrnn._cpp's FMA loop, measured in the same run. What the parts
leave out of a pyrnn.forward / backward call (tanh, the per-step epilogue, packing weight_hh,
page faults of the results) is the difference from `pyrnn bench`'s figure for the shape.
Needs a C++ compiler, an AVX-512 CPU and an installed pyrnn with its native module.
"""
import argparse
import os
import subprocess
import tempfile

from pyrnn import bench
from pyrnn.bench import SHAPES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AVX512_FLAGS = ["-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx2", "-mfma",
                "-mprefer-vector-width=512"]  # PYRNN_FLAGS_avx512 in CMakeLists.txt


def build(directory):
    binary = os.path.join(directory, "gemm_parts")
    subprocess.run([os.environ.get("CXX", "c++"), "-std=c++17", "-O3", "-ffp-contract=fast", *AVX512_FLAGS,
                    "-DPYRNN_ISA=avx512", "-DPYRNN_VECTOR_BYTES=64", "-I", os.path.join(ROOT, "csrc"),
                    os.path.join(ROOT, "benchmarks", "gemm_parts.cpp"), "-o", binary], check=True)
    return binary


def fma_limit():
    """GFLOP/s of the native FMA loop on one thread (pyrnn bench's limit), the best of 20 calls."""
    (call, flop, _), = bench.limit_calls(["fp32"], 1).values()
    return bench.best_gflops(flop, [bench.time_calls(call, 1) for _ in range(20)])


def parts(binary, shape):
    """[(part, GFLOP/s)] of the built harness for shape (T, B, I, H)."""
    run = subprocess.run([binary, *map(str, shape)], check=True, capture_output=True, text=True)
    return [(part, float(rate)) for part, rate in (line.rsplit(" ", 1) for line in run.stdout.splitlines())]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="large,deepbench", help=f"comma-separated, from {','.join(SHAPES)}")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as directory:
        binary = build(directory)
        for name in args.shapes.split(","):
            measured, limit = parts(binary, SHAPES[name]), fma_limit()
            print(f"{name} (T, B, I, H) = {tuple(SHAPES[name])}, float32, 1 thread; FMA limit {limit:.0f} GFLOP/s")
            for part, rate in measured:
                print(f"  {part:<24} {rate:6.1f} GFLOP/s  {100 * rate / limit:3.0f}%")


if __name__ == "__main__":
    main()

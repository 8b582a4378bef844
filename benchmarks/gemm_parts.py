"""Where the kernel's time goes, part by part, against the CPU's limit for the precision.

    python benchmarks/gemm_parts.py                    # large and deepbench, float32
    python benchmarks/gemm_parts.py --shapes medium,large --precision bf16
    taskset -c 1 python benchmarks/gemm_parts.py       # on one core, away from other work

perf cannot say it on our machines (no hardware counters in the VM, and the module is stripped),
so this builds benchmarks/gemm_parts.cpp: csrc/gemm.h's products timed one at a time on one
thread, each as rnn_kernel.cpp calls it, compiled with the flags of the kernel's avx512 copy
(CMakeLists.txt), or its avx512bf16 copy for bf16. The limit is pyrnn._cpp's FMA loop (bf16: its
vdpbf16ps loop), measured in the same run. What the parts
leave out of a pyrnn.forward / backward call (tanh, the per-step epilogue, packing weight_hh,
page faults of the results) is the difference from `pyrnn bench`'s figure for the shape.
Needs a C++ compiler, an AVX-512 CPU (AVX512-BF16 for bf16) and an installed pyrnn with its
native module.
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
COPIES = {"fp32": ("avx512", AVX512_FLAGS), "bf16": ("avx512bf16", [*AVX512_FLAGS, "-mavx512bf16"])}


def build(directory, precision="fp32"):
    """The harness compiled as the kernel's copy for `precision` (COPIES)."""
    isa, flags = COPIES[precision]
    binary = os.path.join(directory, f"gemm_parts_{precision}")
    subprocess.run([os.environ.get("CXX", "c++"), "-std=c++17", "-O3", "-ffp-contract=fast", *flags,
                    f"-DPYRNN_ISA={isa}", "-DPYRNN_VECTOR_BYTES=64", "-I", os.path.join(ROOT, "csrc"),
                    os.path.join(ROOT, "benchmarks", "gemm_parts.cpp"), "-o", binary], check=True)
    return binary


def limit(precision="fp32"):
    """GFLOP/s of the native peak loop of `precision` on one thread (pyrnn bench's limit), the
    best of 20 calls."""
    (call, flop, _), = bench.limit_calls([precision], 1).values()
    return bench.best_gflops(flop, [bench.time_calls(call, 1) for _ in range(20)])


def parts(binary, shape, precision="fp32"):
    """[(part, GFLOP/s)] of the built harness for shape (T, B, I, H)."""
    extra = [] if precision == "fp32" else [precision]
    run = subprocess.run([binary, *map(str, shape), *extra], check=True, capture_output=True, text=True)
    return [(part, float(rate)) for part, rate in (line.rsplit(" ", 1) for line in run.stdout.splitlines())]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="large,deepbench", help=f"comma-separated, from {','.join(SHAPES)}")
    parser.add_argument("--precision", default="fp32", choices=sorted(COPIES))
    args = parser.parse_args(argv)
    loop = {"fp32": "FMA", "bf16": "vdpbf16ps"}[args.precision]
    with tempfile.TemporaryDirectory() as directory:
        binary = build(directory, args.precision)
        for name in args.shapes.split(","):
            measured, peak = parts(binary, SHAPES[name], args.precision), limit(args.precision)
            print(f"{name} (T, B, I, H) = {tuple(SHAPES[name])}, {args.precision}, 1 thread; "
                  f"{loop} limit {peak:.0f} GFLOP/s")
            for part, rate in measured:
                print(f"  {part:<24} {rate:6.1f} GFLOP/s  {100 * rate / peak:3.0f}%")


if __name__ == "__main__":
    main()

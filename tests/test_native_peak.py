"""The native module's peak loop, which `pyrnn bench` divides GFLOP/s by (docs/design.md §4)."""
import time

import pytest

_cpp = pytest.importorskip("pyrnn._cpp")  # required when installed: see test_backends.py

ACCUMULATORS = 12  # csrc/peak.cpp: independent vector chains per loop iteration


def flop_per_iteration(instruction):
    """What csrc/peak.cpp's loop of `instruction` does per iteration."""
    if instruction == "tdpbf16ps tmm":  # four 16×16 tile sums, each of 32 products per element
        return 4 * 16 * 16 * 32 * 2
    lanes = {"zmm": 16, "ymm": 8, "xmm": 4}[instruction.split()[-1]]
    per_multiply_add = 4 if instruction.startswith("vdpbf16ps") else 2  # a bf16 pair per lane
    return ACCUMULATORS * lanes * per_multiply_add


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_peak_loop_counts_what_it_runs(precision):
    per_iteration = flop_per_iteration(_cpp.peak_instruction(precision))
    for threads in (1, 2):
        assert _cpp.peak_loop(precision, threads, 1000) == threads * 1000 * per_iteration
    assert _cpp.peak_loop(precision, 1, 0) == 0


def test_the_bf16_loop_is_the_kernels_instruction():
    """The bf16 limit is that of the instruction the kernel's bf16 products run on."""
    expected = {"avx512amx": "tdpbf16ps tmm", "avx512bf16": "vdpbf16ps zmm"}.get(_cpp.isa())
    if expected is not None:  # (a lower $PYRNN_ISA emulates them; the limit stays the CPU's)
        assert _cpp.peak_instruction("bf16") == expected


def test_peak_loop_rejects_bad_arguments():
    with pytest.raises(ValueError, match="precision must be 'fp32' or 'bf16', got 'fp16'"):
        _cpp.peak_loop("fp16", 1, 10)
    with pytest.raises(ValueError, match="threads must be at least 1"):
        _cpp.peak_loop("fp32", 0, 10)
    with pytest.raises(ValueError, match="iterations must not be negative"):
        _cpp.peak_loop("fp32", 1, -1)


def test_peak_loop_takes_time_in_proportion_to_its_work():
    """The loop is not optimised away: ten times the iterations take several times as long (a
    loose bound, the machine may be busy)."""
    def seconds(iterations):
        start = time.perf_counter()
        _cpp.peak_loop("fp32", 1, iterations)
        return time.perf_counter() - start

    seconds(10_000)
    assert min(seconds(200_000) for _ in range(3)) > 3 * min(seconds(20_000) for _ in range(3))

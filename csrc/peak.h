// The CPU's arithmetic limit per precision (peak.cpp): what `pyrnn bench` reports %peak against.
#pragma once
#include <cstdint>
#include <string>

namespace pyrnn {

// Runs `iterations` of the peak loop of `precision` ("fp32": FMAs; "bf16": vdpbf16ps where the
// CPU has it, else FMAs) on each thread of a team of up to `threads` from the kernel's pool, and
// returns the floating-point operations done (a multiply-add counts 2); the caller times it.
int64_t peak_loop(const std::string& precision, int threads, int64_t iterations);

// The instruction that loop runs on this CPU, e.g. "vdpbf16ps zmm" or "vfmadd zmm".
const char* peak_instruction(const std::string& precision);

}  // namespace pyrnn

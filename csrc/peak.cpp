// The CPU's own arithmetic limit, measured (docs/design.md §4): what %peak in `pyrnn bench` divides by.
//
// A loop of independent multiply-adds with nothing else in it: "fp32" runs FMAs (vfmadd231ps) at
// the widest vector width this CPU has; "bf16" runs AMX's tdpbf16ps (a 16×32 by 32×16 bf16 tile
// product into 16×16 float32 sums) where the CPU has AMX and Linux allows it, else vdpbf16ps (16
// lanes, each the sum of a pair of bf16 products added into float32) where the CPU has
// AVX512-BF16, else the fp32 loop (the kernel then emulates bf16 rounding and multiplies in
// float32 FMAs: that is its limit). The choice follows the kernel's (kernels.h). Each loop
// keeps ACCUMULATORS independent chains in registers, more than latency × issue rate of either
// instruction on current x86 cores (FMA: 4 cycles × 2 per cycle; vdpbf16ps: at most 6 × 2), so
// the loop is bound by throughput alone.
//
// Unlike the kernel, this file is compiled once, for plain x86-64: each loop carries the
// instruction set it needs as a function attribute and is called only after the CPU is checked
// at run time. The limit is the CPU's, whatever copy of the kernel $PYRNN_ISA selects.
#include <atomic>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "kernels.h"
#include "peak.h"
#include "pool.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define PYRNN_PEAK_X86 1
#endif

namespace pyrnn {
namespace {

constexpr int ACCUMULATORS = 12;  // + 2 factors: fits AVX2's and SSE's 16 vector registers

// Every loop runs `iterations` × ACCUMULATORS vector multiply-adds on values that neither
// overflow nor become subnormal (acc·0.999 + 1e-3 tends to 1; the bf16 sums grow by 2e-6 per
// step), and returns their sum so that the compiler must compute them. The factors come in as
// arguments so that nothing folds at compile time.

float fma_baseline(int64_t iterations, float a, float b) {  // SSE2: no FMA, a multiply and an add
    typedef float V __attribute__((vector_size(16)));
    V acc[ACCUMULATORS] = {};
    const V va = a - V{}, vb = b - V{};
    for (int64_t i = 0; i < iterations; ++i)
#pragma GCC unroll 16
        for (int j = 0; j < ACCUMULATORS; ++j) acc[j] = acc[j] * va + vb;
    float sum = 0;
    for (int j = 0; j < ACCUMULATORS; ++j) sum += acc[j][0];
    return sum;
}

#ifdef PYRNN_PEAK_X86
__attribute__((target("avx2,fma"))) float fma_avx2(int64_t iterations, float a, float b) {
    __m256 acc[ACCUMULATORS];
    const __m256 va = _mm256_set1_ps(a), vb = _mm256_set1_ps(b);
    for (int j = 0; j < ACCUMULATORS; ++j) acc[j] = _mm256_setzero_ps();
    for (int64_t i = 0; i < iterations; ++i)
#pragma GCC unroll 16
        for (int j = 0; j < ACCUMULATORS; ++j) acc[j] = _mm256_fmadd_ps(acc[j], va, vb);
    float sum = 0;
    for (int j = 0; j < ACCUMULATORS; ++j) sum += _mm256_cvtss_f32(acc[j]);
    return sum;
}

__attribute__((target("avx512f"))) float fma_avx512(int64_t iterations, float a, float b) {
    __m512 acc[ACCUMULATORS];
    const __m512 va = _mm512_set1_ps(a), vb = _mm512_set1_ps(b);
    for (int j = 0; j < ACCUMULATORS; ++j) acc[j] = _mm512_setzero_ps();
    for (int64_t i = 0; i < iterations; ++i)
#pragma GCC unroll 16
        for (int j = 0; j < ACCUMULATORS; ++j) acc[j] = _mm512_fmadd_ps(acc[j], va, vb);
    float sum = 0;
    for (int j = 0; j < ACCUMULATORS; ++j) sum += _mm512_cvtss_f32(acc[j]);
    return sum;
}

__attribute__((target("avx512f,avx512bf16"))) float dot_bf16_avx512(int64_t iterations, float a, float b) {
    __m512 acc[ACCUMULATORS];
    const __m512bh va = _mm512_cvtne2ps_pbh(_mm512_set1_ps(a), _mm512_set1_ps(a)),
                   vb = _mm512_cvtne2ps_pbh(_mm512_set1_ps(b), _mm512_set1_ps(b));
    for (int j = 0; j < ACCUMULATORS; ++j) acc[j] = _mm512_setzero_ps();
    for (int64_t i = 0; i < iterations; ++i)
#pragma GCC unroll 16
        for (int j = 0; j < ACCUMULATORS; ++j) acc[j] = _mm512_dpbf16_ps(acc[j], va, vb);
    float sum = 0;
    for (int j = 0; j < ACCUMULATORS; ++j) sum += _mm512_cvtss_f32(acc[j]);
    return sum;
}

// Four independent tile sums (the four tiles of bf16.h's product), 16 cycles each per tdpbf16ps.
__attribute__((target("amx-tile,amx-bf16"))) float dot_bf16_amx(int64_t iterations, float, float) {
    struct alignas(64) {
        uint8_t palette = 1, start_row = 0, reserved[14] = {};
        uint16_t bytes_per_row[16] = {64, 64, 64, 64, 64, 64, 64, 64};
        uint8_t rows[16] = {16, 16, 16, 16, 16, 16, 16, 16};
    } config;
    // Not zeros (tiles of zeros run faster than any data); 2^-7 in bf16, so that the sums stay small.
    alignas(64) uint16_t operand[16 * 32];
    for (uint16_t& e : operand) e = 0x3C00;
    alignas(64) float sums[16 * 16];
    _tile_loadconfig(&config);
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    _tile_loadd(4, operand, 64);
    _tile_loadd(5, operand, 64);
    _tile_loadd(6, operand, 64);
    _tile_loadd(7, operand, 64);
    for (int64_t i = 0; i < iterations; ++i) {
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
    }
    _tile_stored(0, sums, 64);
    _tile_release();
    return sums[0];
}
#endif

struct Loop {
    float (*run)(int64_t iterations, float a, float b);
    float a, b;
    int64_t flop_per_iteration;  // ACCUMULATORS × lanes × 2 (× 2 again for vdpbf16ps: a pair per lane)
};

Loop loop_for(const std::string& precision) {
    const bool bf16 = precision == "bf16";
    if (!bf16 && precision != "fp32")
        throw std::invalid_argument("precision must be 'fp32' or 'bf16', got '" + precision + "'");
#ifdef PYRNN_PEAK_X86
    __builtin_cpu_init();
    const bool avx512 = __builtin_cpu_supports("avx512f");
    if (bf16 && avx512 && __builtin_cpu_supports("amx-tile") && __builtin_cpu_supports("amx-bf16") && amx_allowed())
        return {dot_bf16_amx, 0, 0, 4 * 16 * 16 * 32 * 2};
    if (bf16 && avx512 && __builtin_cpu_supports("avx512bf16"))
        return {dot_bf16_avx512, 1e-3f, 1e-3f, ACCUMULATORS * 16 * 4};
    if (avx512) return {fma_avx512, 0.999f, 1e-3f, ACCUMULATORS * 16 * 2};
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        return {fma_avx2, 0.999f, 1e-3f, ACCUMULATORS * 8 * 2};
#endif
    return {fma_baseline, 0.999f, 1e-3f, ACCUMULATORS * 4 * 2};
}

std::atomic<float> sink{0};  // where the loops' results go, so that no loop is optimised away

}  // namespace

const char* peak_instruction(const std::string& precision) {
    const Loop loop = loop_for(precision);
#ifdef PYRNN_PEAK_X86
    if (loop.run == dot_bf16_amx) return "tdpbf16ps tmm";
    if (loop.run == dot_bf16_avx512) return "vdpbf16ps zmm";
    if (loop.run == fma_avx512) return "vfmadd zmm";
    if (loop.run == fma_avx2) return "vfmadd ymm";
#endif
    return "mulps+addps xmm";
}

int64_t peak_loop(const std::string& precision, int threads, int64_t iterations) {
    if (threads < 1) throw std::invalid_argument("threads must be at least 1, got " + std::to_string(threads));
    if (iterations < 0) throw std::invalid_argument("iterations must not be negative");
    const Loop loop = loop_for(precision);
    std::atomic<int> team_size{1};
    run_team(
        threads, [&](int team) { team_size = team; },
        [&](int, int) { sink = sink + loop.run(iterations, loop.a, loop.b); });
    return team_size * iterations * loop.flop_per_iteration;
}

}  // namespace pyrnn

// Precision "bf16" (docs/design.md §1, §3.9): every operand of every product rounded to bfloat16, the
// products summed in float32; everything else stays float32. This is its GEMM policy, the
// counterpart of gemm.h's Plain: operands stored as bf16, B packed as k-pairs.
//
// A bfloat16 is the upper half of a float32, so widening one is a shift, and a product of two is
// exact in float32. Panels hold, for each pair of consecutive k and each of the NR columns, the
// two bf16 side by side (one 32-bit lane): vdpbf16ps (AVX512-BF16) multiplies such lanes pairwise
// with a broadcast pair of A and adds both products into float32 lanes, 2 k per instruction.
// Without AVX512-BF16 (every other copy of the kernel) the same pairs are widened and multiplied
// by two FMAs: the same products, summed in another order, so results agree within float32
// roundoff whatever the CPU. The rounding itself is the reference's (round_to_bf16 in
// pyrnn/reference.py), in integer arithmetic, so it is bitwise the same on every path.
#pragma once
#include <cstdint>

#include "gemm.h"

#if defined(__AVX512BF16__) && PYRNN_VECTOR_BYTES == 64
#include <immintrin.h>
#define PYRNN_NATIVE_BF16 1
#endif

namespace pyrnn {
namespace PYRNN_ISA {

using bf16 = uint16_t;  // the bit pattern: the upper half of a float32
typedef uint32_t U32s __attribute__((vector_size(PYRNN_VECTOR_BYTES)));         // lanes<float> of them
typedef uint16_t Bf16s __attribute__((vector_size(PYRNN_VECTOR_BYTES / 2)));  // as many, half as wide

// Round to nearest even, NaN kept (quiet): add half a unit of the kept bits, minus one when the
// lowest kept bit is 0, and drop the lower half; a carry steps the exponent, which is right up
// to and including overflow to inf. The result sits in the low 16 bits of each lane.
static inline U32s round_to_bf16(Vec<float> v) {
    U32s bits;
    std::memcpy(&bits, &v, sizeof bits);
    const U32s rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
    const U32s quiet_nan = (bits >> 16) | 0x0040u;
    return v != v ? quiet_nan : rounded;
}
static inline bf16 round_to_bf16(float a) {
    uint32_t bits;
    std::memcpy(&bits, &a, sizeof bits);
    return a != a ? bf16((bits >> 16) | 0x0040u) : bf16((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}
static inline float widen(uint32_t bits16) {  // a bf16 (low 16 bits) as the float32 it is
    const uint32_t bits = bits16 << 16;
    float a;
    std::memcpy(&a, &bits, sizeof a);
    return a;
}

// dst[0:n] = src[0:n] rounded to bf16.
static inline void round_row(const float* src, bf16* dst, int64_t n) {
    constexpr int L = lanes<float>;
    int64_t i = 0;
    for (; i + L <= n; i += L) {
        const Bf16s half = __builtin_convertvector(round_to_bf16(load(src + i)), Bf16s);
        std::memcpy(dst + i, &half, sizeof half);
    }
    for (; i < n; ++i) dst[i] = round_to_bf16(src[i]);
}

struct Bf16 {
    using Stored = bf16;  // A and the packed panels
    using Acc = float;    // C, the tile, and the B that is packed
    static constexpr int k_group = 2;
    static constexpr int NR = Tile<float>::NR;

    // Elements of a packed k×NR panel: k rounded up to pairs (the last pair's second half 0).
    static int64_t panel_size(int64_t k) { return ceil_div(k, 2) * 2 * NR; }

    // Pack rows [0, k) × columns [0, n) of B (float) into NR-column panels of bf16 k-pairs:
    // panel row g holds, for columns j = 0..NR-1, B(2g, j) and B(2g + 1, j) side by side; zero
    // past k and past n. B row-major (cs == 1): two rows rounded a vector at a time and
    // interleaved by a shift; otherwise (weight_ihᵀ: once per call) element by element.
    static void pack(int64_t k, int64_t n, View<float> b, bf16* dst) {
        constexpr int L = lanes<float>;
        for (int64_t jr = 0; jr < n; jr += NR, dst += panel_size(k)) {
            const int64_t cols = min64(NR, n - jr);
            for (int64_t g = 0; 2 * g < k; ++g) {
                bf16* row = dst + g * 2 * NR;
                const bool second = 2 * g + 1 < k;
                if (b.cs == 1 && cols == NR) {
                    for (int v = 0; v < NR; v += L) {
                        const U32s even = round_to_bf16(load(&b(2 * g, jr + v)));
                        const U32s odd = second ? round_to_bf16(load(&b(2 * g + 1, jr + v))) : U32s{};
                        const U32s pairs = even | (odd << 16);
                        std::memcpy(row + 2 * v, &pairs, sizeof pairs);
                    }
                    continue;
                }
                for (int64_t j = 0; j < NR; ++j) {
                    row[2 * j] = j < cols ? round_to_bf16(b(2 * g, jr + j)) : bf16(0);
                    row[2 * j + 1] = j < cols && second ? round_to_bf16(b(2 * g + 1, jr + j)) : bf16(0);
                }
            }
        }
    }

#ifdef PYRNN_NATIVE_BF16
    using PanelVec = __m512bh;  // lanes<float> pairs
    static PanelVec load_panel(const bf16* panel_row, int v) {
        PanelVec p;
        std::memcpy(&p, panel_row + v * 2 * lanes<float>, sizeof p);
        return p;
    }
    // A(r, k) and A(r, k + 1), k_stride apart, as one pair in every lane.
    static PanelVec broadcast_a(const bf16* a, int64_t k_stride) {
        return (PanelVec)_mm512_set1_epi32(int(uint32_t(a[0]) | uint32_t(a[k_stride]) << 16));
    }
    static Vec<float> multiply_add(Vec<float> sum, PanelVec a, PanelVec b) {
        return (Vec<float>)_mm512_dpbf16_ps((__m512)sum, a, b);
    }
#else
    struct PanelVec {
        Vec<float> even, odd;  // the two halves of each pair, widened
    };
    static PanelVec load_panel(const bf16* panel_row, int v) {
        U32s pairs;
        std::memcpy(&pairs, panel_row + v * 2 * lanes<float>, sizeof pairs);
        const U32s even = pairs << 16, odd = pairs & 0xFFFF0000u;
        PanelVec p;
        std::memcpy(&p.even, &even, sizeof even);
        std::memcpy(&p.odd, &odd, sizeof odd);
        return p;
    }
    static PanelVec broadcast_a(const bf16* a, int64_t k_stride) {
        return {broadcast(widen(a[0])), broadcast(widen(a[k_stride]))};
    }
    static Vec<float> multiply_add(Vec<float> sum, PanelVec a, PanelVec b) {
        return sum + a.even * b.even + a.odd * b.odd;  // exact products; two FMAs
    }
#endif
};

}  // namespace PYRNN_ISA
}  // namespace pyrnn

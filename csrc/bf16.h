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
//
// With AMX (the avx512amx copy), the products with a row-major A of 16 or 32 rows and K a
// multiple of 32 run on tiles (tdpbf16ps: a 16×32 bf16 tile of A times a 16-pair×16 tile of B
// into 16×16 float32 sums, 16 times the work of a vdpbf16ps). The panels are already AMX's B
// layout: a panel row is 32 columns of k-pairs, two B tile rows side by side.
#pragma once
#include <cstdint>

#include "gemm.h"

#if defined(__AVX512BF16__) && PYRNN_VECTOR_BYTES == 64
#include <immintrin.h>
#define PYRNN_NATIVE_BF16 1
#endif
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(PYRNN_NATIVE_BF16)
#define PYRNN_AMX_BF16 1
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
    // interleaved by a shift; B transposed (rs == 1: weight_ihᵀ and weight_hhᵀ, once per call),
    // L×L blocks read along B's columns and transposed in registers as Plain::pack does (element
    // by element, they took 3.8 % of a bf16 forward at large); the rest element by element.
    static void pack(int64_t k, int64_t n, View<float> b, bf16* dst) {
        constexpr int L = lanes<float>;
        for (int64_t jr = 0; jr < n; jr += NR, dst += panel_size(k)) {
            const int64_t cols = min64(NR, n - jr);
            int64_t g = 0;
            if (b.cs != 1 && b.rs == 1 && cols == NR)
                for (; 2 * g + L <= k; g += L / 2)
                    for (int c = 0; c < NR; c += L) {
                        Vec<float> block[L];  // block[i]: rows 2g .. 2g + L of column jr + c + i
                        for (int i = 0; i < L; ++i) block[i] = load(&b(2 * g, jr + c + i));
                        transpose<float>(block);  // block[i]: row 2g + i, columns jr + c ..
                        for (int i = 0; i < L; i += 2) {
                            const U32s pairs = round_to_bf16(block[i]) | round_to_bf16(block[i + 1]) << 16;
                            std::memcpy(dst + (g + i / 2) * 2 * NR + 2 * c, &pairs, sizeof pairs);
                        }
                    }
            for (; 2 * g < k; ++g) {
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
    // A(r, k) and A(r, k + 1), k_stride apart, as one pair in every lane. Side by side (k_stride
    // 1, known where this is inlined) they are one 32-bit broadcast load: GCC does not merge the
    // two 16-bit loads itself (measured on the recurrent step's product, which reads h_{t-1}
    // row-major, benchmarks/gemm_parts.py --precision bf16, paired medians of 10 rounds on a
    // Zen 4: 1.05-1.08× faster at medium and deepbench).
    static PanelVec broadcast_a(const bf16* a, int64_t k_stride) {
        uint32_t pair;
        if (k_stride == 1)
            std::memcpy(&pair, a, sizeof pair);
        else
            pair = uint32_t(a[0]) | uint32_t(a[k_stride]) << 16;
        return (PanelVec)_mm512_set1_epi32(int(pair));
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

#ifdef PYRNN_AMX_BF16
    static constexpr int block_rows = 32;  // two rows of AMX tiles per product call

    // tile (rows × NR) = A (rows × K) · panel, as micro_kernel_rows does; on AMX tiles when A is
    // row-major with 16 or 32 rows and K is a multiple of 32, else by vdpbf16ps, MR rows a call.
    template <ALayout Layout>
    static void product(int rows, int64_t K, const bf16* a, int64_t lda, const bf16* panel, float* tile) {
        if (Layout == ALayout::rows && K % 32 == 0 && (rows == 16 || rows == 32))
            return tile_product(rows, K, a, lda, panel, tile);
        constexpr int MR = Tile<float>::MR;
        for (int r0 = 0; r0 < rows; r0 += MR)
            micro_kernel_rows<Bf16, Layout>(int(min64(MR, rows - r0)), K, a + r0 * AStrides<Layout, k_group>(lda).row,
                                            lda, panel, tile + r0 * NR);
    }

  private:
    // The tile configuration of every call: sums 0-3 (rows 0-15 and 16-31 × columns 0-15 and
    // 16-31), A 4-5 (the two row halves), B 6-7 (the two column halves); all 16 rows of 64 bytes.
    struct alignas(64) TileConfig {
        uint8_t palette = 1, start_row = 0, reserved[14] = {};
        uint16_t bytes_per_row[16] = {64, 64, 64, 64, 64, 64, 64, 64};
        uint8_t rows[16] = {16, 16, 16, 16, 16, 16, 16, 16};
    };

    static void tile_product(int rows, int64_t K, const bf16* a, int64_t lda, const bf16* panel, float* tile) {
        // Loaded on every call (~1 % of a call's cycles): whatever ran on this thread before may
        // have released or changed the tiles, and a tile instruction without them is illegal.
        static const TileConfig config;
        _tile_loadconfig(&config);
        const int64_t a_stride = lda * sizeof(bf16), b_stride = 2 * NR * sizeof(bf16);
        constexpr int64_t c_stride = NR * sizeof(float);
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int64_t k = 0; k < K; k += 32) {  // B: panel rows k/2 .. k/2 + 15, each 2·NR bf16
            _tile_loadd(6, panel + k * NR, b_stride);
            _tile_loadd(7, panel + k * NR + 32, b_stride);
            _tile_loadd(4, a + k, a_stride);
            _tile_dpbf16ps(0, 4, 6);
            _tile_dpbf16ps(1, 4, 7);
            if (rows == 32) {
                _tile_loadd(5, a + 16 * lda + k, a_stride);
                _tile_dpbf16ps(2, 5, 6);
                _tile_dpbf16ps(3, 5, 7);
            }
        }
        _tile_stored(0, tile, c_stride);
        _tile_stored(1, tile + 16, c_stride);
        if (rows == 32) {
            _tile_stored(2, tile + 16 * NR, c_stride);
            _tile_stored(3, tile + 16 * NR + 16, c_stride);
        }
    }
#endif
};

}  // namespace PYRNN_ISA
}  // namespace pyrnn

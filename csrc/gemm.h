// A blocked, packed matrix product C = A·B (+ a row vector), for the hoisted input projection and
// the gradient products, and the register-tile micro-kernel that the recurrent steps reuse.
//
// The Goto/BLIS structure: B is copied ("packed") into NR-column panels, k-major, so that the
// micro-kernel streams it with aligned-free unit-stride vector loads and keeps an MR×NR tile of C
// in vector registers for the whole k loop; A is read by broadcasts, in place or, column-major
// and far apart along k, from a copy (see micro_kernel, pack_columns). Block sizes: see KC. A and
// B are strided views, so transposed operands (weight_ihᵀ, grad_aᵀ) cost B's packing and at most
// that copy of A.
//
// What the operands are stored as, what they are summed in and how B's panels are laid out is a
// policy (Plain below: storage and sums in F, panels k-major); a precision that stores bf16 and
// multiplies k-pairs with vdpbf16ps is another policy with the same members, not another copy of
// these loops.
//
// Each element of C is summed in one fixed order (k ascending, in blocks from k = 0) whatever
// the column range a thread is given, which is what makes the threaded results bitwise
// independent of the thread count.
#pragma once
#include <atomic>
#include <type_traits>

#include "simd.h"

namespace pyrnn {
namespace PYRNN_ISA {

// Register tile: MR rows × NR columns of accumulators. AVX-512 has 32 vector registers (24 for the
// tile, the rest for B and the broadcast), AVX2 and SSE have 16 (12 for the tile).
template <typename F> struct Tile {
    static constexpr int vectors = 2;  // per tile row
    static constexpr int NR = vectors * lanes<F>;
    static constexpr int MR = PYRNN_VECTOR_BYTES == 64 ? 12 : 6;
};

// Cache blocking of gemm(): a KC×NC block of B packed, and for each MR rows of A a KC-long
// micro-panel run against every NR-column panel of the block in turn, the panels streamed from L2
// (1 MiB per core on this Zen 5, L1d 32 KiB). Measured at 1 thread (float32, GFLOP/s, against the
// former order: 8·MR rows of A against each panel, KC = 512; on a Zen 4): the input product
// 3200×512×1024 122 -> 153; grad_weight_hh 1024×3200×1024 (A packed, see pack_columns) 60 -> 126-130.
// KC counts 256 micro-kernel steps of P::k_group k each: bf16's 512 k are float's bytes of A and B
// (1.03-1.07× faster than 256 k at medium and deepbench, benchmarks/gemm_parts.py --precision bf16).
// Where A is row-major (the input product, grad_x) its rows are read in place, k contiguous, and a
// k block twice as long (KC_ROWS) halves the passes over C, though its B block (2 MiB) then exceeds
// L2: measured regardless, 1.04-1.07× faster products at large and deepbench in both precisions,
// 1.00-1.04× whole forward and backward calls (gemm_parts, paired
// medians; real calls, medians of 5 interleaved processes); with A packed or column-major (the
// weight gradients, the steps) the longer block gained nothing.
template <typename P> constexpr int64_t KC = 256 * P::k_group;
template <typename P> constexpr int64_t KC_ROWS = 2 * KC<P>;
template <typename F> constexpr int64_t NC = 4096 / sizeof(F);  // 1 MiB packed at KC<Plain<F>>, either type

// Element (i, k) of a strided matrix: p[i·rs + k·cs].
template <typename F> struct View {
    const F* p;
    int64_t rs, cs;
    const F& operator()(int64_t i, int64_t k) const { return p[i * rs + k * cs]; }
    View shifted(int64_t i, int64_t k) const { return {p + i * rs + k * cs, rs, cs}; }
};

static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
static inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }
static inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The row stride (elements) of the kernel's own B×H and T·B×H buffers that the products read
// rows of: a whole and odd number of cache lines. The micro-kernel reads MR rows at once, one
// element of each per k; rows a multiple of 4 KiB apart all fall in one L1 set, which holds 8-12
// lines, so they evict each other. Measured on the forward at T=50, B=64, I=512, float64, 1
// thread: H = 1024 (8 KiB rows) at 56 GFLOP/s against 63-65 for H = 1008 or 1040.
template <typename F>
static inline int64_t row_stride(int64_t H) {
    constexpr int64_t per_line = 64 / sizeof(F);
    return (ceil_div(H, per_line) | 1) * per_line;
}

// A micro-kernel call streams its panel from L2 (or L3: a weight_hh of 4 MB), 128 bytes per step
// (2 lines), faster than the hardware's L1 prefetcher fetches it: each step asks for the lines
// 8 steps ahead (measured on the recurrent step's product, B = 64, H = 1024: 132 -> 147 GFLOP/s;
// 16 or 32 steps ahead no better, into L2 only no gain). Only tiles of >= 8 vectors do: with
// fewer rows a step is bound by its loads, not its FMAs, and two more cost B = 1, H = 64 a fifth
// of its speed. A prefetch past the end never faults.
template <typename P>
static inline void prefetch_panel(const typename P::Stored* panel_row) {
    constexpr int step_bytes = P::k_group * Tile<typename P::Acc>::NR * sizeof(typename P::Stored);
    const char* ahead = reinterpret_cast<const char*>(panel_row) + 8 * step_bytes;
#pragma GCC unroll 2
    for (int line = 0; line < step_bytes; line += 64) __builtin_prefetch(ahead + line, 0, 3);
}

// Asks for the cache lines of p[0:n], n > 0, to be read and written soon (rnn_kernel.cpp: the
// epilogue's rows while a step's product runs; gemm: C's rows of the tile the micro-kernel is
// summing, out of cache since their last k block or never written: on the Zen 4 of 2026-12-04,
// benchmarks/gemm_parts.py's input and grad_x products 1.5-2 % faster at large, and whole float32
// calls 1.01-1.03x (forward) and 1.02-1.03x (backward) at large and deepbench, 1 thread, paired
// medians of 4-5 interleaved processes; bf16 unchanged within noise).
template <typename F>
static inline void prefetch_row(const F* p, int64_t n) {
    const char* bytes = reinterpret_cast<const char*>(p);
    const int64_t size = n * int64_t(sizeof(F));
    for (int64_t line = 0; line < size; line += 64) __builtin_prefetch(bytes + line, 1, 3);
    __builtin_prefetch(bytes + size - 1, 1, 3);  // p need not start a line
}

// Where the micro-kernel finds A(r, k): row-major, A(r, k) = a[r·lda + k] (x, h_{t-1}, grad_a;
// the broadcasts gather R rows); column-major, a[k·lda + r] (grad_aᵀ in place); or packed by
// pack_columns, k-group-major with each row's G = P::k_group consecutive k side by side,
// a[(k / G)·G·lda + r·G + k % G] (lda = the copy's rows). Each step broadcasts, for every row,
// the G elements of A it multiplies: one load where they are adjacent (rows, packed), G loads
// combined where they are lda apart (columns). bf16's weight gradients read their grad_aᵀ
// packed so, not column-major (benchmarks/gemm_parts.py --precision bf16, paired medians of 10
// rounds on a Zen 4: medium's 1.15-1.17× faster, deepbench's 1.02×).
enum class ALayout { rows, columns, packed };
template <ALayout Layout, int G> struct AStrides {  // in elements, for A's leading dimension lda
    int64_t row, group, pair;
    explicit AStrides(int64_t lda)
        : row(Layout == ALayout::rows ? lda : Layout == ALayout::packed ? G : 1),
          group(Layout == ALayout::rows ? G : G * lda), pair(Layout == ALayout::columns ? lda : 1) {}
};

// tile (R×NR) = Σ_k A(r, k) · B(k, j): NR columns of B packed by P (P::pack), and R rows of A
// laid out as Layout says. The micro-kernel never needs A packed: each of its elements is loaded
// once per NR columns, by a broadcast that does not care about alignment (gemm copies a
// column-major A only for what its cache lines and broadcasts cost: pack_columns).
// One step consumes P::k_group consecutive k. A tile of fewer than 8 vectors (R <= 3) cannot
// cover the FMA latency (4 cycles × 2 units), so its k loop is split into S interleaved partial
// sums, added in a fixed order at the end.
template <typename P, int R, ALayout Layout>
static inline void micro_kernel(int64_t K, const typename P::Stored* a, int64_t lda,
                                const typename P::Stored* b, typename P::Acc* tile) {
    using Acc = typename P::Acc;
    constexpr int NV = Tile<Acc>::vectors, NR = Tile<Acc>::NR, G = P::k_group;
    constexpr int S = R * NV >= 8 ? 1 : (8 + R * NV - 1) / (R * NV);
    const AStrides<Layout, G> stride(lda);
    Vec<Acc> acc[S][R][NV];
#pragma GCC unroll 4
    for (int s = 0; s < S; ++s)
#pragma GCC unroll 16
        for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
            for (int v = 0; v < NV; ++v) acc[s][r][v] = Vec<Acc>{};
    auto step = [&](Vec<Acc>(&sum)[R][NV], const typename P::Stored* ak, const typename P::Stored* bk)
                    __attribute__((always_inline)) {
        typename P::PanelVec bv[NV];
        if constexpr (S == 1) prefetch_panel<P>(bk);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) bv[v] = P::load_panel(bk, v);
#pragma GCC unroll 16
        for (int r = 0; r < R; ++r) {
            const auto ar = P::broadcast_a(ak + r * stride.row, stride.pair);
#pragma GCC unroll 4
            for (int v = 0; v < NV; ++v) sum[r][v] = P::multiply_add(sum[r][v], ar, bv[v]);
        }
    };
    const int64_t groups = (K + G - 1) / G;  // P::pack zero-pads B's last group
    int64_t g = 0;
    // Two steps per iteration: the loop's own instructions and its 12+ address updates halved
    // (measured: 12×32 tile in L1 168 -> 177 GFLOP/s, B = 1, H = 64 step 82 -> 96; by 4 no better).
#pragma GCC unroll 2
    for (; g + S <= groups; g += S)
#pragma GCC unroll 4
        for (int s = 0; s < S; ++s) step(acc[s], a + (g + s) * stride.group, b + (g + s) * G * NR);
    // The last groups mod S; s stays a compile-time index (unrolled), so acc stays in registers.
#pragma GCC unroll 4
    for (int s = 0; s < S - 1; ++s)
        if (g + s < groups) step(acc[s], a + (g + s) * stride.group, b + (g + s) * G * NR);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) {
#pragma GCC unroll 4
            for (int s = 1; s < S; ++s) acc[0][r][v] += acc[s][r][v];
            store(tile + r * NR + v * lanes<Acc>, acc[0][r][v]);
        }
}

// The micro-kernel for any row count 1..MR: short edges cost no padded rows (B = 1 is a
// matrix-vector chain and runs the 1-row kernel).
template <typename P, ALayout Layout, int R = Tile<typename P::Acc>::MR>
static inline void micro_kernel_rows(int rows, int64_t K, const typename P::Stored* a, int64_t lda,
                                     const typename P::Stored* b, typename P::Acc* tile) {
    if constexpr (R > 1) {
        if (rows < R) return micro_kernel_rows<P, Layout, R - 1>(rows, K, a, lda, b, tile);
    }
    micro_kernel<P, R, Layout>(K, a, lda, b, tile);
}

// Rows of A per product call (block_rows<P>) and the call itself (product_rows): the register
// tile's MR rows by micro_kernel_rows, unless the policy brings bigger tiles of its own (bf16.h
// on AMX: P::block_rows and P::product).
template <typename P, typename = void> struct BlockRows { static constexpr int value = Tile<typename P::Acc>::MR; };
template <typename P> struct BlockRows<P, std::void_t<decltype(P::block_rows)>> { static constexpr int value = P::block_rows; };
template <typename P> constexpr int block_rows = BlockRows<P>::value;

template <typename P, ALayout Layout>
static inline void product_rows(int rows, int64_t K, const typename P::Stored* a, int64_t lda,
                                const typename P::Stored* b, typename P::Acc* tile) {
    if constexpr (block_rows<P> == Tile<typename P::Acc>::MR)
        micro_kernel_rows<P, Layout>(rows, K, a, lda, b, tile);
    else
        P::template product<Layout>(rows, K, a, lda, b, tile);
}

// v[0..L), the rows of an L×L block (L = lanes), becomes its columns: log2(L) rounds in which
// rows i and i + L/2 are interleaved into rows 2i and 2i + 1 (two-source shuffles, no memory).
template <typename F>
static inline void transpose(Vec<F> (&v)[lanes<F>]) {
    constexpr int L = lanes<F>;
    Bits<F> low, high;  // lanes 0..L/2 of both sources, then lanes L/2..L, alternating
#pragma GCC unroll 16
    for (int m = 0; m < L / 2; ++m) {
        low[2 * m] = m, low[2 * m + 1] = m + L;
        high[2 * m] = m + L / 2, high[2 * m + 1] = m + L / 2 + L;
    }
#pragma GCC unroll 4
    for (int round = 1; round < L; round *= 2) {
        Vec<F> w[L];
#pragma GCC unroll 16
        for (int i = 0; i < L / 2; ++i) {
            w[2 * i] = __builtin_shuffle(v[i], v[i + L / 2], low);
            w[2 * i + 1] = __builtin_shuffle(v[i], v[i + L / 2], high);
        }
#pragma GCC unroll 16
        for (int i = 0; i < L; ++i) v[i] = w[i];
    }
}

// The plain policy: A, B and C all of type F; B packed into NR-column panels, k-major, one k per
// multiply-add step.
template <typename F>
struct Plain {
    using Stored = F;  // elements of A and of the packed panels
    using Acc = F;     // elements of C, of the tile and of the B that is packed
    using PanelVec = Vec<F>;
    static constexpr int k_group = 1;  // consecutive k per multiply-add step (and per panel row)

    // Elements of a packed k×NR panel.
    static int64_t panel_size(int64_t k) { return k * Tile<F>::NR; }
    static PanelVec load_panel(const F* panel_row, int v) { return load(panel_row + v * lanes<F>); }
    static Vec<F> broadcast_a(const F* a, int64_t /*k stride*/) { return broadcast(*a); }
    static Vec<F> multiply_add(Vec<F> sum, Vec<F> a, PanelVec b) { return sum + a * b; }

    // Pack rows [0, k) × columns [0, n) of B into NR-column panels, k-major, zero-padded to NR
    // columns. Panel jr starts at dst + panel_size(k)·jr/NR. B is either row-major (cs == 1: vector
    // copies) or transposed (rs == 1, e.g. weight_ihᵀ: L×L blocks read along B's columns and
    // transposed in registers; gathered element by element they took ~1 µs of a 9 µs tiny call).
    static void pack(int64_t k, int64_t n, View<F> b, F* dst) {
        constexpr int NR = Tile<F>::NR, L = lanes<F>;
        for (int64_t jr = 0; jr < n; jr += NR, dst += k * NR) {
            const int64_t cols = min64(NR, n - jr);
            if (b.cs == 1) {
                for (int64_t kk = 0; kk < k; ++kk) {
                    const F* src = &b(kk, jr);
                    if (cols == NR)
                        for (int v = 0; v < NR; v += L) store(dst + kk * NR + v, load(src + v));
                    else
                        for (int64_t j = 0; j < NR; ++j) dst[kk * NR + j] = j < cols ? src[j] : F(0);
                }
                continue;
            }
            int64_t kk = 0;
            if (b.rs == 1 && cols == NR)
                for (; kk + L <= k; kk += L)
                    for (int c = 0; c < NR; c += L) {
                        Vec<F> block[L];
                        for (int i = 0; i < L; ++i) block[i] = load(&b(kk, jr + c + i));
                        transpose<F>(block);
                        for (int i = 0; i < L; ++i) store(dst + (kk + i) * NR + c, block[i]);
                    }
            for (int64_t j = 0; j < NR; ++j)  // the rest, element by element
                for (int64_t r = kk; r < k; ++r) dst[r * NR + j] = j < cols ? b(r, jr + j) : F(0);
        }
    }
};

// Elements of the buffer one thread's gemm() packs B into, for a K×N operand.
template <typename P> inline int64_t pack_b_size(int64_t K, int64_t N) {
    constexpr int NR = Tile<typename P::Acc>::NR;
    return P::panel_size(min64(KC_ROWS<P>, K)) * min64(NC<typename P::Acc>, ceil_div(N, NR) * NR) / NR;
}

// Rows [0, rows) × k [0, kc) of a column-major A (A.rs == 1) copied into the packed layout
// (ALayout::packed, lda = MR): dst[(k / G)·G·MR + r·G + k % G], zero past `rows` and past kc to
// a whole k group. In place, A's consecutive k are 4·H bytes apart in the weight gradients
// (A = grad_aᵀ): 4 KiB at H = 1024, so all KC lines of a micro-kernel's A fall in one L1 set,
// each on its own page, and are fetched again for every panel (grad_weight_hh at H = 1024,
// T·B = 3200: 60 GFLOP/s in place). Copied once per MR rows, they are one sequential stream that
// every panel reuses, each row's k group one broadcast.
template <typename P>
static inline void pack_columns(int rows, int64_t kc, View<typename P::Stored> a, typename P::Stored* dst) {
    using S = typename P::Stored;
    constexpr int MR = block_rows<P>, G = P::k_group;
    for (int64_t k = 0; k < kc; k += G) {
        S* group = dst + k * MR;
        if (rows == MR && k + G <= kc) {  // constant sizes: vector moves
            if constexpr (G == 1) {
                std::memcpy(group, &a(0, k), sizeof(S) * MR);
            } else {  // 16-bit pairs as 32-bit lanes: element by element GCC made a chain of
                      // inserts (bf16 grad_weight_hh 1.08x faster at medium, 1.19x at small:
                      // gemm_parts --precision bf16, paired medians of 8 rounds)
                static_assert(G == 2 && sizeof(S) == 2, "k-pairs of 16-bit elements");
                S even[MR], odd[MR];
                uint32_t pairs[MR];
                std::memcpy(even, &a(0, k), sizeof even);
                std::memcpy(odd, &a(0, k + 1), sizeof odd);
                for (int r = 0; r < MR; ++r) pairs[r] = uint32_t(even[r]) | uint32_t(odd[r]) << 16;
                std::memcpy(group, pairs, sizeof pairs);
            }
            continue;
        }
        for (int r = 0; r < MR; ++r)
            for (int i = 0; i < G; ++i) group[r * G + i] = r < rows && k + i < kc ? a(r, k + i) : S(0);
    }
}

// C[0:M, n0:n1] = bias[n0:n1] (or 0) + A·B, with A (M×K) row-major (A.cs == 1) or column-major
// (A.rs == 1), B (K×N) strided, C row-major (ldc).
// One thread's share of a product: threads are given disjoint column ranges starting on NR.
// A product over a whole sequence can take seconds, so it looks at the call's stop request
// (rnn.h: Options::stop) before each MR rows of a block (~10-50 µs of work) and, once it is set,
// returns with C unspecified; the caller's next stop check ends the call.
template <typename P>
static void gemm(int64_t M, int64_t n0, int64_t n1, int64_t K, View<typename P::Stored> A,
                 View<typename P::Acc> B, const typename P::Acc* bias, typename P::Acc* C, int64_t ldc,
                 typename P::Stored* pack_b_buf, const std::atomic<bool>* stop = nullptr) {
    using Acc = typename P::Acc;
    constexpr int MR = block_rows<P>, NR = Tile<Acc>::NR;
    alignas(64) Acc tile[MR * NR];
    alignas(64) typename P::Stored a_panel[MR * (KC<P> + P::k_group)];  // see pack_columns
    const int64_t k_block = A.cs == 1 ? KC_ROWS<P> : KC<P>;  // see KC_ROWS
    if (K == 0) {
        for (int64_t i = 0; i < M; ++i)
            for (int64_t j = n0; j < n1; ++j) C[i * ldc + j] = bias ? bias[j] : Acc(0);
        return;
    }
    for (int64_t jc = n0; jc < n1; jc += NC<Acc>) {
        const int64_t nc = min64(NC<Acc>, n1 - jc);
        const bool pack_a = A.cs != 1 && nc > 2 * NR;  // a copy used by one or two panels costs more than it saves
        for (int64_t pc = 0; pc < K; pc += k_block) {
            const int64_t kc = min64(k_block, K - pc);
            P::pack(kc, nc, B.shifted(pc, jc), pack_b_buf);
            for (int64_t ir = 0; ir < M; ir += MR) {
                if (stop && stop->load(std::memory_order_relaxed)) return;
                const int rows = int(min64(MR, M - ir));
                if (pack_a) pack_columns<P>(rows, kc, A.shifted(ir, pc), a_panel);
                const typename P::Stored* a = pack_a ? a_panel : &A(ir, pc);
                const int64_t lda = pack_a ? MR : A.cs == 1 ? A.rs : A.cs;
                for (int64_t jr = 0; jr < nc; jr += NR) {
                    const int64_t cols = min64(NR, nc - jr);
                    const typename P::Stored* panel = pack_b_buf + P::panel_size(kc) * (jr / NR);
                    for (int r = 0; r < rows; ++r) prefetch_row(C + (ir + r) * ldc + jc + jr, cols);
                    if (A.cs == 1)
                        product_rows<P, ALayout::rows>(rows, kc, a, lda, panel, tile);
                    else if (pack_a)  // with one k a step, the packed layout is the column-major one
                        product_rows<P, P::k_group == 1 ? ALayout::columns : ALayout::packed>(rows, kc, a, lda,
                                                                                           panel, tile);
                    else
                        product_rows<P, ALayout::columns>(rows, kc, a, lda, panel, tile);
                    for (int r = 0; r < rows; ++r) {
                        Acc* c = C + (ir + r) * ldc + jc + jr;
                        const Acc* t = tile + r * NR;
                        if (pc == 0)
                            for (int64_t j = 0; j < cols; ++j) c[j] = (bias ? bias[jc + jr + j] : Acc(0)) + t[j];
                        else
                            for (int64_t j = 0; j < cols; ++j) c[j] += t[j];
                    }
                }
            }
        }
    }
}

}  // namespace PYRNN_ISA
}  // namespace pyrnn

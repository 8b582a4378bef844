// The kernel's products one at a time on one thread, each as rnn_kernel.cpp calls it: what
// GFLOP/s each part reaches, for `benchmarks/gemm_parts.py` (which builds this file, runs it and
// divides by the CPU's limit for the precision, measured by pyrnn._cpp in the same run).
//
//   gemm_parts T B I H          float32 (gemm.h's Plain policy)
//   gemm_parts T B I H bf16     bf16 (bf16.h's Bf16 policy: the operands the kernel reads rounded)
// print "part GFLOP/s" lines: the micro-kernel alone on data in L1 (its ceiling), then the
// forward's and the backward's products for that shape.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include <string>

#include "bf16.h"

using namespace pyrnn::PYRNN_ISA;

// The best of 7 timings of fn() (each repeated until it takes ~20 ms), in GFLOP/s.
template <typename Fn> static double gflops(double flop, Fn fn) {
    using clock = std::chrono::steady_clock;
    fn();
    const auto t0 = clock::now();
    fn();
    const double once = std::chrono::duration<double>(clock::now() - t0).count();
    const int repeat = std::max(1, int(0.02 / std::max(once, 1e-9)));
    double best = 1e30;
    for (int sample = 0; sample < 7; ++sample) {
        const auto start = clock::now();
        for (int r = 0; r < repeat; ++r) fn();
        best = std::min(best, std::chrono::duration<double>(clock::now() - start).count() / repeat);
    }
    return flop / best / 1e9;
}

static std::vector<float> random_floats(size_t n) {
    std::mt19937 rng(1);
    std::uniform_real_distribution<float> uniform(-1, 1);
    std::vector<float> v(n);
    for (float& e : v) e = uniform(rng);
    return v;
}

// The operand rows P's products read of a float matrix (rows × cols): the floats themselves, or
// rounded to bf16 at the kernel's stride for them (rnn_kernel.cpp's Operand), one zero row more.
template <typename P>
static std::vector<typename P::Stored> operand(const std::vector<float>& m, int64_t rows, int64_t cols, int64_t ld) {
    using S = typename P::Stored;
    std::vector<S> out((rows + 1) * ld, S(0));
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < cols; ++c) {
            if constexpr (std::is_same_v<S, float>)
                out[r * ld + c] = m[r * ld + c];
            else
                out[r * ld + c] = round_to_bf16(m[r * ld + c]);
        }
    return out;
}

template <typename P>
static void parts(int64_t T, int64_t B, int64_t I, int64_t H) {
    using S = typename P::Stored;
    constexpr int MR = block_rows<P>, NR = Tile<float>::NR;
    // The kernel's row strides: of h_{t-1} and grad_a in float, and of what its products read.
    const int64_t TB = T * B, ld = row_stride<float>(H), ld_s = std::is_same_v<S, float> ? ld : row_stride<S>(H),
                  ld_x = std::is_same_v<S, float> ? I : row_stride<S>(I);
    const std::vector<float> x = random_floats(TB * ld_x), weight_ih = random_floats(H * I),
                             weight_hh = random_floats(H * H), grad_a = random_floats(TB * ld_s),
                             h_prev = random_floats(TB * H), states = random_floats(B * ld_s), bias = random_floats(H);
    const std::vector<S> x_s = operand<P>(x, TB, I, ld_x), grad_a_s = operand<P>(grad_a, TB, H, ld_s),
                         states_s = operand<P>(states, B, H, ld_s);
    std::vector<float> out(TB * std::max(H, I)), grad_w(H * std::max(H, I));
    std::vector<S> packed(std::max(pack_b_size<P>(std::max(TB, H), std::max(H, I)), P::panel_size(H) * (H + NR) / NR));
    alignas(64) float tile[MR * NR];

    // The micro-kernel's ceiling: an MR-row A and a 256-deep panel, both in L1.
    const int64_t K = 256;
    const std::vector<float> a_l1 = random_floats(MR * K), b_l1 = random_floats(K * NR);
    const std::vector<S> a_l1_s = operand<P>(a_l1, MR, K, K);
    std::vector<S> panel_l1(P::panel_size(K));
    P::pack(K, NR, View<float>{b_l1.data(), NR, 1}, panel_l1.data());
    std::printf("micro-kernel in L1 %.1f\n", gflops(100 * 2.0 * MR * NR * K, [&] {
                    for (int i = 0; i < 100; ++i) product_rows<P, ALayout::rows>(MR, K, a_l1_s.data(), K, panel_l1.data(), tile);
                }));

    // Forward: x·weight_ihᵀ + bias over all steps, then per step h_{t-1}·weight_hhᵀ (packed once).
    std::printf("input product %.1f\n", gflops(2.0 * TB * I * H, [&] {
                    gemm<P>(TB, 0, H, I, View<S>{x_s.data(), ld_x, 1}, View<float>{weight_ih.data(), 1, I}, bias.data(),
                            out.data(), H, packed.data());
                }));
    P::pack(H, H, View<float>{weight_hh.data(), 1, H}, packed.data());
    std::printf("recurrent step product %.1f\n", gflops(2.0 * B * H * H, [&] {
                    for (int64_t j = 0; j < H; j += NR) {
                        const S* panel = packed.data() + j / NR * P::panel_size(H);
                        for (int64_t b0 = 0; b0 < B; b0 += MR) {
                            const int rows = int(std::min<int64_t>(MR, B - b0));
                            product_rows<P, ALayout::rows>(rows, H, states_s.data() + b0 * ld_s, ld_s, panel, tile);
                            for (int r = 0; r < rows; ++r)
                                std::copy_n(tile + r * NR, std::min<int64_t>(NR, H - j), out.data() + (b0 + r) * H + j);
                        }
                    }
                }));

    // Backward: grad_x = grad_a·weight_ih; grad_weight_ih = grad_aᵀ·x, grad_weight_hh = grad_aᵀ·h_prev.
    std::printf("grad_x product %.1f\n", gflops(2.0 * TB * H * I, [&] {
                    gemm<P>(TB, 0, I, H, View<S>{grad_a_s.data(), ld_s, 1}, View<float>{weight_ih.data(), I, 1}, nullptr,
                            out.data(), I, packed.data());
                }));
    std::printf("grad_weight_ih product %.1f\n", gflops(2.0 * H * TB * I, [&] {
                    gemm<P>(H, 0, I, TB, View<S>{grad_a_s.data(), 1, ld_s}, View<float>{x.data(), I, 1}, nullptr,
                            grad_w.data(), I, packed.data());
                }));
    std::printf("grad_weight_hh product %.1f\n", gflops(2.0 * H * TB * H, [&] {
                    gemm<P>(H, 0, H, TB, View<S>{grad_a_s.data(), 1, ld_s}, View<float>{h_prev.data(), H, 1}, nullptr,
                            grad_w.data(), H, packed.data());
                }));
}

int main(int argc, char** argv) {
    const bool bf16 = argc == 6 && std::string(argv[5]) == "bf16";
    if (argc != 5 && !bf16) {
        std::fprintf(stderr, "usage: %s T B I H [bf16]\n", argv[0]);
        return 2;
    }
    const int64_t T = std::atoll(argv[1]), B = std::atoll(argv[2]), I = std::atoll(argv[3]), H = std::atoll(argv[4]);
    if (bf16)
        parts<Bf16>(T, B, I, H);
    else
        parts<Plain<float>>(T, B, I, H);
    return 0;
}

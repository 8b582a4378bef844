// The kernel's products one at a time, float32 on one thread, each as rnn_kernel.cpp calls it:
// what GFLOP/s each part reaches, for `benchmarks/gemm_parts.py` (which builds this file, runs
// it and divides by the CPU's FMA limit measured by pyrnn._cpp in the same run).
//
//   gemm_parts T B I H    prints "part GFLOP/s" lines: the micro-kernel alone on data in L1 (its
//                         ceiling), then the forward's and the backward's products for that shape.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "gemm.h"

using namespace pyrnn::PYRNN_ISA;
using P = Plain<float>;
constexpr int MR = Tile<float>::MR, NR = Tile<float>::NR;

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

int main(int argc, char** argv) {
    if (argc != 5) {
        std::fprintf(stderr, "usage: %s T B I H\n", argv[0]);
        return 2;
    }
    const int64_t T = std::atoll(argv[1]), B = std::atoll(argv[2]), I = std::atoll(argv[3]), H = std::atoll(argv[4]);
    const int64_t TB = T * B, ld = row_stride<float>(H);  // the kernel's h_{t-1} and grad_a rows
    const std::vector<float> x = random_floats(TB * I), weight_ih = random_floats(H * I),
                             weight_hh = random_floats(H * H), grad_a = random_floats(TB * ld),
                             h_prev = random_floats(TB * H), states = random_floats(B * ld), bias = random_floats(H);
    std::vector<float> out(TB * std::max(H, I)), grad_w(H * std::max(H, I));
    std::vector<float> packed(std::max(pack_b_size<P>(std::max(TB, H), std::max(H, I)), P::panel_size(H) * (H + NR) / NR));
    alignas(64) float tile[MR * NR];

    // The micro-kernel's ceiling: a 12-row A and a 256-deep panel, both in L1.
    const int64_t K = 256;
    const std::vector<float> a_l1 = random_floats(MR * K), panel_l1 = random_floats(K * NR);
    std::printf("micro-kernel in L1 %.1f\n", gflops(100 * 2.0 * MR * NR * K, [&] {
                    for (int i = 0; i < 100; ++i) micro_kernel<P, MR, true>(K, a_l1.data(), K, panel_l1.data(), tile);
                }));

    // Forward: x·weight_ihᵀ + bias over all steps, then per step h_{t-1}·weight_hhᵀ (packed once).
    std::printf("input product %.1f\n", gflops(2.0 * TB * I * H, [&] {
                    gemm<P>(TB, 0, H, I, View<float>{x.data(), I, 1}, View<float>{weight_ih.data(), 1, I}, bias.data(),
                            out.data(), H, packed.data());
                }));
    P::pack(H, H, View<float>{weight_hh.data(), 1, H}, packed.data());
    std::printf("recurrent step product %.1f\n", gflops(2.0 * B * H * H, [&] {
                    for (int64_t j = 0; j < H; j += NR) {
                        const float* panel = packed.data() + j / NR * P::panel_size(H);
                        for (int64_t b0 = 0; b0 < B; b0 += MR) {
                            const int rows = int(std::min<int64_t>(MR, B - b0));
                            product_rows<P, true>(rows, H, states.data() + b0 * ld, ld, panel, tile);
                            for (int r = 0; r < rows; ++r)
                                std::copy_n(tile + r * NR, std::min<int64_t>(NR, H - j), out.data() + (b0 + r) * H + j);
                        }
                    }
                }));

    // Backward: grad_x = grad_a·weight_ih; grad_weight_ih = grad_aᵀ·x, grad_weight_hh = grad_aᵀ·h_prev.
    std::printf("grad_x product %.1f\n", gflops(2.0 * TB * H * I, [&] {
                    gemm<P>(TB, 0, I, H, View<float>{grad_a.data(), ld, 1}, View<float>{weight_ih.data(), I, 1}, nullptr,
                            out.data(), I, packed.data());
                }));
    std::printf("grad_weight_ih product %.1f\n", gflops(2.0 * H * TB * I, [&] {
                    gemm<P>(H, 0, I, TB, View<float>{grad_a.data(), 1, ld}, View<float>{x.data(), I, 1}, nullptr,
                            grad_w.data(), I, packed.data());
                }));
    std::printf("grad_weight_hh product %.1f\n", gflops(2.0 * H * TB * H, [&] {
                    gemm<P>(H, 0, H, TB, View<float>{grad_a.data(), 1, ld}, View<float>{h_prev.data(), H, 1}, nullptr,
                            grad_w.data(), H, packed.data());
                }));
    return 0;
}

// The straightforward kernel: loops ordered so that every inner loop is an axpy over
// contiguous memory (y[0:n] += a * x[0:n]), which the compiler vectorises without
// reassociating sums. Buffers are allocated once per call, never per step.
#include "rnn.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace pyrnn {
namespace {

template <typename F>
inline void axpy(int64_t n, F a, const F* x, F* y) {
    for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

// Row-major (rows, cols) -> (cols, rows).
template <typename F>
std::vector<F> transposed(const F* a, int64_t rows, int64_t cols) {
    std::vector<F> t(static_cast<size_t>(rows * cols));
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < cols; ++c) t[c * rows + r] = a[r * cols + c];
    return t;
}

// Row b takes part in step t unless t is past its length (design.md §1: padding).
inline bool valid(const int64_t* lengths, int64_t t, int64_t b) {
    return lengths == nullptr || t < lengths[b];
}

}  // namespace

template <typename F>
void forward(const F* x, const F* weight_ih, const F* weight_hh, const F* bias, const F* h0,
             const int64_t* lengths, F* output, F* h_n,
             int64_t T, int64_t B, int64_t I, int64_t H) {
    // Transposed weights, so that a row of the product is a sum of contiguous weight rows.
    const std::vector<F> weight_ih_t = transposed(weight_ih, H, I);  // (I,H)
    const std::vector<F> weight_hh_t = transposed(weight_hh, H, H);  // (H,H)

    // The input term does not depend on h: all T*B rows at once, written into output.
    for (int64_t r = 0; r < T * B; ++r) {
        F* a = output + r * H;
        std::copy(bias, bias + H, a);
        for (int64_t i = 0; i < I; ++i) axpy(H, x[r * I + i], weight_ih_t.data() + i * H, a);
    }

    // The recurrence; h_n holds the running state of every row.
    std::copy(h0, h0 + B * H, h_n);
    for (int64_t t = 0; t < T; ++t) {
        for (int64_t b = 0; b < B; ++b) {
            F* a = output + (t * B + b) * H;
            F* h = h_n + b * H;
            if (!valid(lengths, t, b)) {  // padding: output 0, state carried
                std::fill(a, a + H, F(0));
                continue;
            }
            for (int64_t k = 0; k < H; ++k) axpy(H, h[k], weight_hh_t.data() + k * H, a);
            for (int64_t j = 0; j < H; ++j) a[j] = std::tanh(a[j]);
            std::copy(a, a + H, h);
        }
    }
}

template <typename F>
void backward(const F* grad_output, const F* x, const F* weight_ih, const F* weight_hh,
              const F* output, const F* h0, const F* grad_h_n, const int64_t* lengths,
              F* grad_x, F* grad_h0, F* grad_weight_ih, F* grad_weight_hh, F* grad_bias,
              int64_t T, int64_t B, int64_t I, int64_t H) {
    // grad_a (T,B,H): dL/da_t for every step, 0 on padding. g: dL/dh flowing back, kept in grad_h0.
    std::vector<F> grad_a(static_cast<size_t>(T * B * H), F(0));
    std::copy(grad_h_n, grad_h_n + B * H, grad_h0);
    for (int64_t t = T - 1; t >= 0; --t) {
        for (int64_t b = 0; b < B; ++b) {
            if (!valid(lengths, t, b)) continue;  // padding: g passes through unchanged
            const int64_t r = t * B + b;
            F* g = grad_h0 + b * H;
            F* da = grad_a.data() + r * H;
            for (int64_t j = 0; j < H; ++j)
                da[j] = (g[j] + grad_output[r * H + j]) * (F(1) - output[r * H + j] * output[r * H + j]);
            std::fill(g, g + H, F(0));  // g = da · weight_hh
            for (int64_t j = 0; j < H; ++j) axpy(H, da[j], weight_hh + j * H, g);
        }
    }

    // Everything else is a sum over the valid (t, b) rows; padding rows contribute nothing.
    std::fill(grad_x, grad_x + T * B * I, F(0));
    std::fill(grad_weight_ih, grad_weight_ih + H * I, F(0));
    std::fill(grad_weight_hh, grad_weight_hh + H * H, F(0));
    std::fill(grad_bias, grad_bias + H, F(0));
    for (int64_t t = 0; t < T; ++t) {
        for (int64_t b = 0; b < B; ++b) {
            if (!valid(lengths, t, b)) continue;
            const int64_t r = t * B + b;
            const F* da = grad_a.data() + r * H;
            const F* h_prev = t == 0 ? h0 + b * H : output + (r - B) * H;
            for (int64_t j = 0; j < H; ++j) {
                axpy(I, da[j], x + r * I, grad_weight_ih + j * I);
                axpy(H, da[j], h_prev, grad_weight_hh + j * H);
                axpy(I, da[j], weight_ih + j * I, grad_x + r * I);
                grad_bias[j] += da[j];
            }
        }
    }
}

#define PYRNN_INSTANTIATE(F)                                                                     \
    template void forward<F>(const F*, const F*, const F*, const F*, const F*, const int64_t*,   \
                             F*, F*, int64_t, int64_t, int64_t, int64_t);                        \
    template void backward<F>(const F*, const F*, const F*, const F*, const F*, const F*,        \
                              const F*, const int64_t*, F*, F*, F*, F*, F*, int64_t, int64_t,    \
                              int64_t, int64_t);
PYRNN_INSTANTIATE(float)
PYRNN_INSTANTIATE(double)

}  // namespace pyrnn

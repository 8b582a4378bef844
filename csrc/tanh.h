// Vectorised tanh with a stated error bound, for the forward epilogue.
//
//   |x| <  0.35 : tanh(x) = x + x³·P(x²), the Taylor series cut where its remainder is below
//                 6e-10 (float) / 9e-18 (double) relative, far under half an ulp;
//   |x| >= 0.35 : tanh(|x|) = (1 - e) / (1 + e) with e = exp(-2|x|) <= 0.497, sign copied back.
//                 1 - e is exact there (Sterbenz) and the relative error of e is amplified by
//                 at most 2e/(1-e²) < 1.33, so the result stays within a few ulp.
// exp(y) = 2^n · exp(r), n = round(y/ln2), r = y - n·ln2 (Cody-Waite: ln2 in two parts, |r| <= 0.347),
// exp(r) by its Taylor series (degree 7 float, 13 double). y is clamped at -80 so 2^n stays a normal
// number; tanh is exactly ±1 in the working precision long before that (|x| > 9 float, > 19.1 double).
// No branches: both halves are computed on |x| and selected per lane, then x's sign is put back:
// NaN goes through as NaN, ±inf -> ±1, -0.0 -> -0.0.
// The bound is asserted by tests/test_native_tanh.py over every float32 input of a dense sweep.
#pragma once
#include "simd.h"

namespace pyrnn {
namespace PYRNN_ISA {

template <typename F> struct TanhConstants;

template <> struct TanhConstants<float> {
    using Uint = uint32_t;
    static constexpr Uint sign_bit = 0x80000000u;
    static constexpr int mantissa_bits = 23, exponent_bias = 127;
    static constexpr float round_shift = 12582912.0f;  // 1.5·2^23: adding it rounds to an integer
    static constexpr float ln2_hi = 0.693359375f, ln2_lo = -2.12194440e-4f;
    // tanh(x)/x - 1 = x²·(c1 + c2·x² + ...), Taylor coefficients c1..c6
    static constexpr int series_terms = 6;
    static constexpr float series[6] = {-3.33333333e-1f, 1.33333333e-1f, -5.39682540e-2f,
                                        2.18694885e-2f, -8.86323553e-3f, 3.59212804e-3f};
    static constexpr int exp_degree = 7;
};

template <> struct TanhConstants<double> {
    using Uint = uint64_t;
    static constexpr Uint sign_bit = 0x8000000000000000ull;
    static constexpr int mantissa_bits = 52, exponent_bias = 1023;
    static constexpr double round_shift = 6755399441055744.0;  // 1.5·2^52
    static constexpr double ln2_hi = 6.93147180369123816490e-01, ln2_lo = 1.90821492927058770002e-10;
    static constexpr int series_terms = 12;
    static constexpr double series[12] = {
        -3.333333333333333333e-1, 1.333333333333333333e-1, -5.396825396825396825e-2,
        2.186948853615520282e-2,  -8.863235529902196569e-3, 3.592128036572481017e-3,
        -1.455834387051318268e-3, 5.900274409455859814e-4,  -2.391291142435524815e-4,
        9.691537956929450326e-5,  -3.927832388331683405e-5, 1.591890506932896474e-5};
    static constexpr int exp_degree = 13;
};

// 1/0!, 1/1!, ..., 1/N!, computed at compile time.
template <typename F, int N>
struct InverseFactorials {
    F value[N + 1];
    constexpr InverseFactorials() : value() {
        double f = 1;
        for (int k = 0; k <= N; ++k) value[k] = F(f /= (k > 0 ? k : 1));
    }
};

template <typename F>
__attribute__((always_inline)) static inline Vec<F> tanh(Vec<F> x) {
    using C = TanhConstants<F>;
    using V = Vec<F>;
    using U = typename C::Uint;
    typedef U Ubits __attribute__((vector_size(PYRNN_VECTOR_BYTES)));

    const Ubits sign = (Ubits)x & C::sign_bit;
    const V ax = (V)((Ubits)x ^ sign);

    // Small |x|: the odd series, Horner in x².
    const V x2 = ax * ax;
    V p = broadcast<F>(C::series[C::series_terms - 1]);
#pragma GCC unroll 16
    for (int k = C::series_terms - 2; k >= 0; --k) p = p * x2 + C::series[k];
    const V small = ax + ax * (x2 * p);

    // Large |x|: e = exp(-2|x|).
    V y = F(-2) * ax;
    y = y < F(-80) ? broadcast<F>(F(-80)) : y;
    const V shifted = y * F(1.4426950408889634) + C::round_shift;  // n + 1.5·2^m in the low bits
    const V n = shifted - C::round_shift;
    const V r = (y - n * C::ln2_hi) - n * C::ln2_lo;
    static constexpr InverseFactorials<F, C::exp_degree> exp_series{};  // Taylor series of exp(r)
    V e = broadcast<F>(exp_series.value[C::exp_degree]);
#pragma GCC unroll 16
    for (int k = C::exp_degree - 1; k >= 0; --k) e = e * r + exp_series.value[k];
    const Ubits n_bits = (Ubits)shifted - (Ubits)broadcast<F>(C::round_shift);
    e *= (V)((n_bits + U(C::exponent_bias)) << C::mantissa_bits);  // · 2^n
    const V large = (F(1) - e) / (F(1) + e);

    const V magnitude = ax < F(0.35) ? small : large;
    return (V)((Ubits)magnitude | sign);  // tanh is odd; keeps the sign of -0.0 too
}

}  // namespace PYRNN_ISA
}  // namespace pyrnn

// The SIMD vector of the instruction set this translation unit is compiled for.
//
// rnn_kernel.cpp is compiled once per instruction set (CMakeLists.txt), each time with its own
// PYRNN_ISA and compiler flags; this header turns that into one vector type per float type,
// written with GCC/Clang vector extensions so that the same source becomes AVX-512, AVX2+FMA
// or SSE2 (the x86-64 baseline) code. Everything here lives in the per-ISA namespace so that
// no inline function compiled for AVX-512 can be picked by the linker for the baseline path.
#pragma once
#include <cstdint>
#include <cstring>

#if !defined(PYRNN_ISA) || !defined(PYRNN_VECTOR_BYTES)
#error "compile rnn_kernel.cpp with PYRNN_ISA and PYRNN_VECTOR_BYTES defined (see CMakeLists.txt)"
#endif

namespace pyrnn {
namespace PYRNN_ISA {

template <typename F> struct Simd;

template <> struct Simd<float> {
    typedef float V __attribute__((vector_size(PYRNN_VECTOR_BYTES)));
    typedef int32_t Bits __attribute__((vector_size(PYRNN_VECTOR_BYTES)));  // same width, as integers
};
template <> struct Simd<double> {
    typedef double V __attribute__((vector_size(PYRNN_VECTOR_BYTES)));
    typedef int64_t Bits __attribute__((vector_size(PYRNN_VECTOR_BYTES)));
};

template <typename F> using Vec = typename Simd<F>::V;
template <typename F> using Bits = typename Simd<F>::Bits;
template <typename F> constexpr int lanes = PYRNN_VECTOR_BYTES / sizeof(F);

// Unaligned load and store (memcpy of a vector compiles to one vector move).
template <typename F> static inline Vec<F> load(const F* p) {
    Vec<F> v;
    std::memcpy(&v, p, sizeof v);
    return v;
}
template <typename F> static inline void store(F* p, Vec<F> v) { std::memcpy(p, &v, sizeof v); }
// a - 0 is a for every a (0 + a is not: it turns -0.0 into +0.0), so this folds to one broadcast.
template <typename F> static inline Vec<F> broadcast(F a) { return a - Vec<F>{}; }

}  // namespace PYRNN_ISA
}  // namespace pyrnn

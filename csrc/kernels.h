// The instruction sets the kernel is compiled for, and each copy's entry points.
//
// rnn_kernel.cpp is compiled once per ISA (CMakeLists.txt gives each its compiler flags), each
// copy in its own namespace (pyrnn::avx512, pyrnn::avx2, pyrnn::baseline); dispatch.cpp picks
// one at run time. Adding an ISA is one line of PYRNN_FOR_EACH_ISA plus its flags in CMake.
#pragma once
#include "rnn.h"

// X(name, whether this CPU has the features its compiler flags rely on), lowest first.
// PYRNN_CPU(feature) is __builtin_cpu_supports, defined where the list is used (dispatch.cpp),
// and so is PYRNN_AMX_ALLOWED (amx_allowed() below: Linux hands out AMX's tile state on request).
#if defined(PYRNN_X86_ISAS)
#define PYRNN_FOR_EACH_ISA(X)                                                           \
    X(baseline, true)                                                                   \
    X(avx2, PYRNN_CPU("avx2") && PYRNN_CPU("fma"))                                      \
    X(avx512, PYRNN_CPU("avx512f") && PYRNN_CPU("avx512bw") && PYRNN_CPU("avx512dq") && \
                  PYRNN_CPU("avx512vl") && PYRNN_CPU("avx2") && PYRNN_CPU("fma"))               \
    X(avx512bf16, PYRNN_CPU("avx512f") && PYRNN_CPU("avx512bw") && PYRNN_CPU("avx512dq") && \
                      PYRNN_CPU("avx512vl") && PYRNN_CPU("avx2") && PYRNN_CPU("fma") &&       \
                      PYRNN_CPU("avx512bf16"))                                           \
    X(avx512amx, PYRNN_CPU("avx512f") && PYRNN_CPU("avx512bw") && PYRNN_CPU("avx512dq") &&  \
                     PYRNN_CPU("avx512vl") && PYRNN_CPU("avx2") && PYRNN_CPU("fma") &&        \
                     PYRNN_CPU("avx512bf16") && PYRNN_CPU("amx-tile") && PYRNN_CPU("amx-bf16") && \
                     PYRNN_AMX_ALLOWED)
#else
#define PYRNN_FOR_EACH_ISA(X) X(baseline, true)
#endif

// The entry points of each copy: those of rnn.h, with Options::max_threads already filled in.
#define PYRNN_DECLARE_KERNELS(isa, supported)       \
    namespace pyrnn {                               \
    namespace isa {                                 \
    template <typename F>                           \
    Status forward(const Forward<F>& call);         \
    template <typename F>                           \
    Status backward(const Backward<F>& call);       \
    template <typename F>                           \
    Status stack_forward(const StackForward<F>& call); \
    template <typename F>                           \
    Status stack_backward(const StackBackward<F>& call); \
    template <typename F>                           \
    void tanh(const F* x, F* y, int64_t n);         \
    }                                               \
    }
PYRNN_FOR_EACH_ISA(PYRNN_DECLARE_KERNELS)
#undef PYRNN_DECLARE_KERNELS

namespace pyrnn {
// Whether this process may use AMX tiles (asks Linux for them; dispatch.cpp).
bool amx_allowed();
}  // namespace pyrnn

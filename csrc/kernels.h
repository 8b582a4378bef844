// The kernel entry points of each instruction set: rnn_kernel.cpp compiled once per ISA, each
// copy in its own namespace (pyrnn::avx512, pyrnn::avx2, pyrnn::baseline). dispatch.cpp picks one
// at run time. Same arguments as pyrnn::forward/backward (rnn.h) plus the thread budget.
#pragma once
#include <cstdint>

#define PYRNN_DECLARE_KERNELS(isa)                                                               \
    namespace pyrnn {                                                                            \
    namespace isa {                                                                              \
    template <typename F>                                                                        \
    void forward(const F* x, const F* weight_ih, const F* weight_hh, const F* bias, const F* h0, \
                 const int64_t* lengths, F* output, F* h_n, int64_t T, int64_t B, int64_t I,     \
                 int64_t H, int max_threads);                                                    \
    template <typename F>                                                                        \
    void backward(const F* grad_output, const F* x, const F* weight_ih, const F* weight_hh,      \
                  const F* output, const F* h0, const F* grad_h_n, const int64_t* lengths,       \
                  F* grad_x, F* grad_h0, F* grad_weight_ih, F* grad_weight_hh, F* grad_bias,     \
                  int64_t T, int64_t B, int64_t I, int64_t H, int max_threads);                  \
    template <typename F>                                                                        \
    void tanh(const F* x, F* y, int64_t n);                                                      \
    }                                                                                            \
    }

PYRNN_DECLARE_KERNELS(baseline)
#if defined(PYRNN_X86_ISAS)
PYRNN_DECLARE_KERNELS(avx2)
PYRNN_DECLARE_KERNELS(avx512)
#endif

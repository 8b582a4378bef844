// pyrnn native kernel: the Elman (tanh) RNN over a whole sequence, forward and BPTT.
//
// This is the `cpp` backend. It computes what the NumPy reference computes (pyrnn/reference.py,
// the math of design.md §1) on clean arrays: C-contiguous, time-major, one floating type, h0
// present, lengths either null or B integers in [0, T]. The bindings (bindings.cpp) check all of
// that; the kernel has no Python in it. Design: design.md §3 (hoisted input GEMM, fused recurrent
// steps over a packed weight_hh, threads owning column blocks with one barrier per step).
//
// Dimensions: T steps, B batch rows, I input features, H hidden units.
#pragma once
#include <cstdint>

namespace pyrnn {

// x (T,B,I), weight_ih (H,I), weight_hh (H,H), bias (H), h0 (B,H), lengths (B) or null
// -> output (T,B,H): h_t on valid steps, 0 on padding; h_n (B,H): state after each row's last step.
template <typename F>
void forward(const F* x, const F* weight_ih, const F* weight_hh, const F* bias, const F* h0,
             const int64_t* lengths, F* output, F* h_n,
             int64_t T, int64_t B, int64_t I, int64_t H);

// grad_output (T,B,H), x (T,B,I), weight_ih (H,I), weight_hh (H,H), output (T,B,H) from forward,
// h0 (B,H), grad_h_n (B,H), lengths (B) or null
// -> grad_x (T,B,I), grad_h0 (B,H), grad_weight_ih (H,I), grad_weight_hh (H,H), grad_bias (H).
template <typename F>
void backward(const F* grad_output, const F* x, const F* weight_ih, const F* weight_hh,
              const F* output, const F* h0, const F* grad_h_n, const int64_t* lengths,
              F* grad_x, F* grad_h0, F* grad_weight_ih, F* grad_weight_hh, F* grad_bias,
              int64_t T, int64_t B, int64_t I, int64_t H);

// y[0:n] = tanh(x[0:n]) with the kernel's vectorised tanh (exposed for its accuracy tests).
template <typename F>
void tanh(const F* x, F* y, int64_t n);

// The instruction set in use: "avx512", "avx2" or "baseline". The best one this CPU supports,
// unless $PYRNN_ISA names a lower one; naming one the CPU lacks, or an unknown one, throws
// std::runtime_error (the first call, at import, surfaces it).
const char* isa();

// Threads the kernel may use (never more): set_num_threads(n >= 1); the default is every core
// this process may run on (its CPU affinity). The kernel uses fewer on shapes too small to share.
void set_num_threads(int n);
int get_num_threads();

}  // namespace pyrnn

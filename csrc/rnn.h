// pyrnn native kernel: the Elman (tanh) RNN over a whole sequence, forward and BPTT.
//
// This is the `cpp` backend. It computes exactly what the NumPy reference computes
// (pyrnn/reference.py, the math of design.md §1) on clean arrays: C-contiguous, time-major,
// one floating type, h0 present, lengths either null or B integers in [0, T].
// The bindings (bindings.cpp) check all of that; this file has no Python in it.
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

}  // namespace pyrnn

// The nonlinearity φ of h_t = φ(a_t) as a policy the kernel is templated on (docs/design.md §1):
// apply on a vector in the forward epilogue; in the backward epilogue, dL/da_t from dL/dh_t and
// the saved output h_t. Adding one is a struct here and a case in with_activation.
#pragma once
#include "rnn.h"
#include "simd.h"
#include "tanh.h"

namespace pyrnn {
namespace PYRNN_ISA {

struct Tanh {
    template <typename F> static Vec<F> apply(Vec<F> a) { return tanh<F>(a); }
    // tanh' = 1 - h²
    template <typename F> static F gradient(F grad_h, F h) { return grad_h * (F(1) - h * h); }
};

struct Relu {
    // max(a, 0) with NaN kept (a < 0 is false for NaN), as torch.relu.
    template <typename F> static Vec<F> apply(Vec<F> a) { return a < F(0) ? Vec<F>{} : a; }
    // grad_h where h > 0, else 0 (0 at the kink): a select, as torch's threshold_backward, not
    // grad_h · [h > 0], which is NaN for an inf or NaN grad_h where relu cut h off.
    template <typename F> static F gradient(F grad_h, F h) { return h <= F(0) ? F(0) : grad_h; }
};

// run(Tanh{}) or run(Relu{}): the choice is made once per call, outside the loops.
template <typename Run>
inline auto with_activation(Activation activation, const Run& run) {
    switch (activation) {
        case Activation::relu: return run(Relu{});
        case Activation::tanh: break;
    }
    return run(Tanh{});
}

}  // namespace PYRNN_ISA
}  // namespace pyrnn

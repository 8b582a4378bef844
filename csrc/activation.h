// The nonlinearity φ of h_t = φ(a_t) as a policy the kernel is templated on (docs/design.md §1):
// apply on a vector in the forward epilogue, derivative from the saved output h_t in the backward
// epilogue. Adding one is a struct here and a case in with_activation.
#pragma once
#include "rnn.h"
#include "simd.h"
#include "tanh.h"

namespace pyrnn {
namespace PYRNN_ISA {

struct Tanh {
    template <typename F> static Vec<F> apply(Vec<F> a) { return tanh<F>(a); }
    template <typename F> static F derivative(F h) { return F(1) - h * h; }  // tanh' = 1 - h²
};

struct Relu {
    // max(a, 0) with NaN kept (a < 0 is false for NaN), as torch.relu.
    template <typename F> static Vec<F> apply(Vec<F> a) { return a < F(0) ? Vec<F>{} : a; }
    // [h > 0]: 0 at the kink, as torch.
    template <typename F> static F derivative(F h) { return h > F(0) ? F(1) : F(0); }
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

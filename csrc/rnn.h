// pyrnn native kernel: the Elman RNN over a whole sequence, forward and BPTT.
//
// This is the `cpp` backend. It computes what the NumPy reference computes (pyrnn/reference.py,
// the math of docs/design.md §1) on clean arrays: one floating type, h0 present, lengths either
// null or B integers in [0, T]. The bindings (bindings.cpp) check all of that; the kernel has no
// Python in it. Design: docs/design.md §3 (hoisted input GEMM, fused recurrent steps over a
// packed weight_hh, threads owning column blocks with one barrier per step).
//
// A call is described by one struct per pass (Forward, Backward below) that the bindings fill,
// dispatch.cpp passes on and rnn_kernel.cpp reads: a new option is one more member.
// Dimensions: T steps, B batch rows, I input features, H hidden units.
#pragma once
#include <atomic>
#include <cstdint>

namespace pyrnn {

// φ in h_t = φ(a_t) (docs/design.md §1); backward goes through it from the saved output h_t.
enum class Activation { tanh, relu };

// The arithmetic of the products (docs/design.md §1): fp32 multiplies the arrays' own type (float32
// or float64); bf16 (float32 arrays only) rounds every operand of every product to bfloat16 and
// sums in float32, everything else staying float32.
enum class Precision { fp32, bf16 };

// The rows of a matrix: row r starts at data + r·stride (elements). A stride wider than the row
// lets a call read or write a slice of a wider buffer (one direction's half of (T, B, 2H)).
template <typename T>
struct Rows {
    T* data;
    int64_t stride;
    T* row(int64_t r) const { return data + r * stride; }
};

// Everything about a call that is not an array.
struct Options {
    Activation activation = Activation::tanh;
    Precision precision = Precision::fp32;
    // Threads the call may use; 0 means the budget (set_num_threads). dispatch.cpp fills it in.
    int max_threads = 0;
    // Optional stop request (issue 15: Ctrl-C). The time loops read it once per step, and the
    // products over the whole sequence once per block of rows (one relaxed load each); once it is
    // seen set, every thread of the call leaves at the same step (the decision is made at a
    // barrier, so no thread waits for one that left) and the call returns Status::stopped with its
    // outputs unspecified. The flag must stay set until the call returns.
    const std::atomic<bool>* stop = nullptr;
};

enum class Status { finished, stopped };

// x (T·B rows of I, row t·B + b), weight_ih (H, I), weight_hh (H, H), bias (H), h0 (B rows of H),
// lengths (B) or null -> output (T·B rows of H): h_t on valid steps, 0 on padding; h_n (B rows
// of H): the state after each row's last step. Weights and bias are contiguous.
template <typename F>
struct Forward {
    int64_t T, B, I, H;
    Rows<const F> x;
    const F *weight_ih, *weight_hh, *bias;
    Rows<const F> h0;
    const int64_t* lengths;
    Rows<F> output, h_n;
    Options options;
};

// grad_output (T·B rows of H), x (T·B rows of I), weight_ih (H, I), weight_hh (H, H), output
// (T·B rows of H) from forward, h0 (B rows of H), grad_h_n (B rows of H), lengths (B) or null
// -> grad_x (T·B rows of I), grad_h0 (B rows of H), grad_weight_ih (H, I), grad_weight_hh (H, H),
// grad_bias (H), the last three contiguous.
template <typename F>
struct Backward {
    int64_t T, B, I, H;
    Rows<const F> grad_output, x;
    const F *weight_ih, *weight_hh;
    Rows<const F> output, h0, grad_h_n;
    const int64_t* lengths;
    Rows<F> grad_x, grad_h0;
    F *grad_weight_ih, *grad_weight_hh, *grad_bias;
    Options options;
};

// A stack (torch.nn.RNN's num_layers × bidirectional; docs/design.md §1) in one call: L layers of D
// directions (1 or 2), unit u = l·D + d. Layer 0 reads x (T, B, I); layer l > 0 reads
// layer_outputs[l - 1] (T, B, D·H, the forward direction's features first) times
// dropout_masks[l - 1] if given. The reverse direction reads each row reversed within its own
// length and writes its output back in time order. All arrays contiguous.
template <typename F>
struct Weights {
    const F *weight_ih, *weight_hh, *bias;  // (H, I) for l = 0, else (H, D·H); (H, H); (H)
};
template <typename F>
struct WeightGrads {
    F *weight_ih, *weight_hh, *bias;
};

// -> layer_outputs (L, T, B, D·H): every layer's output before dropout; h_n (L·D, B, H).
template <typename F>
struct StackForward {
    int64_t L, D, T, B, I, H;
    const F* x;
    const Weights<F>* layers;  // L·D
    const F* h0;               // (L·D, B, H)
    const int64_t* lengths;    // (B) or null
    const F* dropout_masks;    // (L - 1, T, B, D·H) or null
    F *layer_outputs, *h_n;
    Options options;
};

// grad_output (T, B, D·H) = dL/d(layer_outputs[L - 1]), layer_outputs from StackForward,
// grad_h_n (L·D, B, H) -> grad_x (T, B, I), grad_h0 (L·D, B, H), grads[u] of each unit's weights.
template <typename F>
struct StackBackward {
    int64_t L, D, T, B, I, H;
    const F *grad_output, *x;
    const Weights<F>* layers;
    const F *layer_outputs, *h0, *grad_h_n;
    const int64_t* lengths;
    const F* dropout_masks;
    F *grad_x, *grad_h0;
    const WeightGrads<F>* grads;  // L·D
    Options options;
};

template <typename F>
Status forward(Forward<F> call);
template <typename F>
Status backward(Backward<F> call);
template <typename F>
Status stack_forward(StackForward<F> call);
template <typename F>
Status stack_backward(StackBackward<F> call);

// y[0:n] = tanh(x[0:n]) with the kernel's vectorised tanh (exposed for its accuracy tests).
template <typename F>
void tanh(const F* x, F* y, int64_t n);

// The instruction set in use: "avx512amx" (bf16 products on AMX tiles where they fit, else as
// avx512bf16), "avx512bf16" (AVX-512 with vdpbf16ps), "avx512", "avx2" or "baseline" (these
// emulate bf16 products with float32 FMAs). The best one this CPU supports,
// unless $PYRNN_ISA names a lower one; naming one the CPU lacks, or an unknown one, throws
// std::runtime_error (the first call, at import, surfaces it).
const char* isa();

// Threads the kernel may use (never more): set_num_threads(n >= 1); the default is every core
// this process may run on (its CPU affinity). The kernel uses fewer on shapes too small to share.
void set_num_threads(int n);
int get_num_threads();

}  // namespace pyrnn

// Run-time choice of the kernel's instruction set, and the kernel's thread budget.
//
// The module is built for plain x86-64 and carries three copies of the kernel (kernels.h); the
// best one the running CPU supports is used, so one wheel runs on any x86-64. $PYRNN_ISA forces a
// lower one (tests cover the AVX2 and baseline paths on an AVX-512 machine this way).
#include <atomic>
#include <cstdlib>
#include <stdexcept>
#include <string>

#include <thread>
#ifdef __linux__
#include <sched.h>
#endif

#include "kernels.h"
#include "rnn.h"

namespace pyrnn {
namespace {

enum class Isa { baseline, avx2, avx512 };
const char* const isa_names[] = {"baseline", "avx2", "avx512"};

Isa best_supported() {
#if defined(PYRNN_X86_ISAS)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
        return Isa::avx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::avx2;
#endif
    return Isa::baseline;
}

Isa choose() {
    const Isa best = best_supported();
    const char* forced = std::getenv("PYRNN_ISA");
    if (forced == nullptr || *forced == '\0') return best;
    for (int i = 0; i <= int(best); ++i)
        if (std::string(forced) == isa_names[i]) return Isa(i);
    throw std::runtime_error(std::string("$PYRNN_ISA=") + forced + " is not an instruction set this build " +
                             "can run on this CPU; choose one of baseline..." + isa_names[int(best)]);
}

Isa selected() {
    static const Isa chosen = choose();
    return chosen;
}

std::atomic<int> thread_budget{0};  // 0: every core this process may run on

// The cores this process may run on, read once: the system call costs ~0.3 µs, a few percent of
// a small call. As with OpenMP's default, a later change of affinity is not seen.
int usable_cores() {
    static const int cores = [] {
#ifdef __linux__
        cpu_set_t cpus;
        if (sched_getaffinity(0, sizeof(cpus), &cpus) == 0) return CPU_COUNT(&cpus);
#endif
        const unsigned n = std::thread::hardware_concurrency();
        return n > 0 ? int(n) : 1;
    }();
    return cores;
}

}  // namespace

const char* isa() { return isa_names[int(selected())]; }

void set_num_threads(int n) {
    if (n < 1) throw std::invalid_argument("n must be a positive integer, got " + std::to_string(n));
    thread_budget = n;
}

int get_num_threads() {
    if (thread_budget > 0) return thread_budget;
    return usable_cores();
}

// Calls the chosen copy of a kernel function: PYRNN_DISPATCH(forward<F>, args...).
#if defined(PYRNN_X86_ISAS)
#define PYRNN_DISPATCH(call)                                \
    switch (selected()) {                                   \
        case Isa::avx512: return avx512::call;              \
        case Isa::avx2: return avx2::call;                  \
        case Isa::baseline: return baseline::call;          \
    }
#else
#define PYRNN_DISPATCH(call) return baseline::call;
#endif

template <typename F>
void forward(const F* x, const F* weight_ih, const F* weight_hh, const F* bias, const F* h0,
             const int64_t* lengths, F* output, F* h_n, int64_t T, int64_t B, int64_t I, int64_t H) {
    PYRNN_DISPATCH(forward<F>(x, weight_ih, weight_hh, bias, h0, lengths, output, h_n, T, B, I, H,
                              get_num_threads()))
}

template <typename F>
void backward(const F* grad_output, const F* x, const F* weight_ih, const F* weight_hh,
              const F* output, const F* h0, const F* grad_h_n, const int64_t* lengths,
              F* grad_x, F* grad_h0, F* grad_weight_ih, F* grad_weight_hh, F* grad_bias,
              int64_t T, int64_t B, int64_t I, int64_t H) {
    PYRNN_DISPATCH(backward<F>(grad_output, x, weight_ih, weight_hh, output, h0, grad_h_n, lengths,
                               grad_x, grad_h0, grad_weight_ih, grad_weight_hh, grad_bias, T, B, I,
                               H, get_num_threads()))
}

template <typename F>
void tanh(const F* x, F* y, int64_t n) {
    PYRNN_DISPATCH(tanh<F>(x, y, n))
}

#define PYRNN_INSTANTIATE(F)                                                                     \
    template void forward<F>(const F*, const F*, const F*, const F*, const F*, const int64_t*,   \
                             F*, F*, int64_t, int64_t, int64_t, int64_t);                        \
    template void backward<F>(const F*, const F*, const F*, const F*, const F*, const F*,        \
                              const F*, const int64_t*, F*, F*, F*, F*, F*, int64_t, int64_t,    \
                              int64_t, int64_t);                                                 \
    template void tanh<F>(const F*, F*, int64_t);
PYRNN_INSTANTIATE(float)
PYRNN_INSTANTIATE(double)

}  // namespace pyrnn

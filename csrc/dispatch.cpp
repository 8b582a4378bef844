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
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "kernels.h"
#include "rnn.h"

namespace pyrnn {

// Whether this process may use AMX tiles: Linux gives a process the (8 KiB) tile state only
// after it asks (arch_prctl ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA), once, for all its threads.
bool amx_allowed() {
#if defined(__linux__) && defined(SYS_arch_prctl)
    constexpr int request_permission = 0x1023, tile_data = 18;
    return syscall(SYS_arch_prctl, request_permission, tile_data) == 0;
#else
    return false;
#endif
}

namespace {

#define PYRNN_ISA_ENUM(isa, supported) isa,
#define PYRNN_ISA_NAME(isa, supported) #isa,
enum class Isa { PYRNN_FOR_EACH_ISA(PYRNN_ISA_ENUM) };
const char* const isa_names[] = {PYRNN_FOR_EACH_ISA(PYRNN_ISA_NAME)};

// Each ISA's copy of the kernel's entry points, in the order of Isa.
template <typename F>
struct Kernels {
    Status (*forward)(const Forward<F>&);
    Status (*backward)(const Backward<F>&);
    Status (*stack_forward)(const StackForward<F>&);
    Status (*stack_backward)(const StackBackward<F>&);
    void (*tanh)(const F*, F*, int64_t);
};
#define PYRNN_KERNELS_OF(isa, supported) {&isa::forward<F>, &isa::backward<F>, &isa::stack_forward<F>, &isa::stack_backward<F>, &isa::tanh<F>},
template <typename F>
const Kernels<F> kernels[] = {PYRNN_FOR_EACH_ISA(PYRNN_KERNELS_OF)};

Isa best_supported() {
#if defined(PYRNN_X86_ISAS)
    __builtin_cpu_init();
#endif
#define PYRNN_CPU(feature) __builtin_cpu_supports(feature)
#define PYRNN_AMX_ALLOWED amx_allowed()
#define PYRNN_IF_SUPPORTED(isa, supported) \
    if (supported) best = Isa::isa;
    Isa best = Isa::baseline;
    PYRNN_FOR_EACH_ISA(PYRNN_IF_SUPPORTED)
    return best;
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

template <typename F>
const Kernels<F>& selected_kernels() {
    return kernels<F>[int(selected())];
}

// The selected copy's entry point, with the thread budget filled in unless the call sets one.
template <typename F, typename Call>
Status run_selected(Status (*Kernels<F>::*entry)(const Call&), Call call) {
    if (call.options.max_threads <= 0) call.options.max_threads = get_num_threads();
    return (selected_kernels<F>().*entry)(call);
}

template <typename F>
Status forward(Forward<F> call) {
    return run_selected<F>(&Kernels<F>::forward, call);
}

template <typename F>
Status backward(Backward<F> call) {
    return run_selected<F>(&Kernels<F>::backward, call);
}

template <typename F>
Status stack_forward(StackForward<F> call) {
    return run_selected<F>(&Kernels<F>::stack_forward, call);
}

template <typename F>
Status stack_backward(StackBackward<F> call) {
    return run_selected<F>(&Kernels<F>::stack_backward, call);
}

template <typename F>
void tanh(const F* x, F* y, int64_t n) {
    selected_kernels<F>().tanh(x, y, n);
}

#define PYRNN_INSTANTIATE(F)                    \
    template Status forward(Forward<F>);        \
    template Status backward(Backward<F>);      \
    template Status stack_forward(StackForward<F>); \
    template Status stack_backward(StackBackward<F>); \
    template void tanh(const F*, F*, int64_t);
PYRNN_INSTANTIATE(float)
PYRNN_INSTANTIATE(double)

}  // namespace pyrnn

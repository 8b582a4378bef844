// The kernel's threads: one team of std::threads per call, and the barrier that ends each
// recurrent step.
//
// Why not OpenMP: the module would link the system's libgomp.so.1, and whichever libgomp.so.1 a
// process loads first serves every library asking for that name. Imported before torch, ours
// took over torch's (torch ships its own) and made torch.nn.RNN ~25× slower at 2 threads
// (medium forward: 14 ms -> 350 ms). A team per call costs ~50 µs to start, and the kernel only
// asks for more than one thread when a call takes milliseconds (rnn_kernel.cpp: threads_for).
//
// The barrier spins (a step of the recurrence takes microseconds, so the partner is usually
// about to arrive; giving the core away costs a scheduler time slice, milliseconds), and yields
// the core after 50 µs without the partner: on a machine with more runnable threads than cores,
// spinning for a partner that is not running only delays that partner. (Measured under load:
// 1 ms of spinning before yielding made a 100-step shape 7× slower than 50 µs.)
#pragma once
#include <atomic>
#include <chrono>
#include <system_error>
#include <thread>
#include <vector>

namespace pyrnn {
namespace PYRNN_ISA {
namespace {

// Spin briefly (pause), then yield the core, until `ready()` is true.
template <typename Ready>
inline void wait_until(const Ready& ready) {
    const auto start = std::chrono::steady_clock::now();
    bool patient = true;
    for (unsigned spins = 1; !ready(); ++spins) {
        if (patient) {
#if defined(__x86_64__) || defined(__i386__)
            __builtin_ia32_pause();
#endif
            if (spins % 256 == 0) patient = std::chrono::steady_clock::now() - start < std::chrono::microseconds(50);
        } else {
            std::this_thread::yield();
        }
    }
}

class Barrier {
  public:
    explicit Barrier(int threads = 1) : threads_(threads) {}
    void set_threads(int threads) { threads_ = threads; }  // before anyone waits
    void wait() {
        if (threads_ == 1) return;
        const unsigned generation = generation_.load(std::memory_order_acquire);
        if (arrived_.fetch_add(1, std::memory_order_acq_rel) == threads_ - 1) {
            arrived_.store(0, std::memory_order_relaxed);
            generation_.fetch_add(1, std::memory_order_release);  // publishes every thread's writes
            return;
        }
        wait_until([&] { return generation_.load(std::memory_order_acquire) != generation; });
    }

  private:
    int threads_;
    std::atomic<int> arrived_{0};
    std::atomic<unsigned> generation_{0};
};

// body(tid, nt, barrier) on a team of nt threads (this one is tid 0), or straight on this thread
// when nt == 1. If the system refuses a thread, the team is smaller: body gets the real size.
template <typename Body>
inline void in_parallel(int nt, const Body& body) {
    Barrier barrier;
    if (nt <= 1) {
        body(0, 1, barrier);
        return;
    }
    std::atomic<int> team_size{0};  // published once every thread that could start has started
    std::vector<std::thread> team;
    team.reserve(nt - 1);
    try {
        for (int tid = 1; tid < nt; ++tid)
            team.emplace_back([&, tid] {
                wait_until([&] { return team_size.load(std::memory_order_acquire) != 0; });
                body(tid, team_size.load(std::memory_order_relaxed), barrier);
            });
    } catch (const std::system_error&) {
    }
    const int size = static_cast<int>(team.size()) + 1;
    barrier.set_threads(size);
    team_size.store(size, std::memory_order_release);
    body(0, size, barrier);
    for (std::thread& thread : team) thread.join();
}

}  // namespace
}  // namespace PYRNN_ISA
}  // namespace pyrnn

// The kernel's threads: one OpenMP team per call, and the barrier that ends each recurrent step.
//
// The barrier spins (a step of the recurrence takes microseconds, so the partner is usually
// about to arrive; giving the core away costs a scheduler time slice, milliseconds), and yields
// the core after 50 µs without the partner: on a machine with more runnable threads than cores,
// spinning for a partner that is not running only delays that partner. (Measured under load:
// 1 ms of spinning before yielding made a 100-step shape 7× slower than 50 µs.)
#pragma once
#include <atomic>
#include <chrono>
#include <thread>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace pyrnn {
namespace PYRNN_ISA {
namespace {

class Barrier {
  public:
    explicit Barrier(int threads) : threads_(threads) {}
    void wait() {
        if (threads_ == 1) return;
        const unsigned generation = generation_.load(std::memory_order_acquire);
        if (arrived_.fetch_add(1, std::memory_order_acq_rel) == threads_ - 1) {
            arrived_.store(0, std::memory_order_relaxed);
            generation_.fetch_add(1, std::memory_order_release);  // publishes every thread's writes
            return;
        }
        const auto start = std::chrono::steady_clock::now();
        bool patient = true;
        for (unsigned spins = 1; generation_.load(std::memory_order_acquire) == generation; ++spins) {
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

  private:
    const int threads_;
    std::atomic<int> arrived_{0};
    std::atomic<unsigned> generation_{0};
};

// body(tid, nt, barrier) on a team of nt threads, or straight on this thread when nt == 1.
// The team may come out smaller than asked (OpenMP limits); body gets the real size.
template <typename Body>
inline void in_parallel(int nt, const Body& body) {
#ifdef _OPENMP
    if (nt > 1) {
#pragma omp parallel num_threads(nt)
        {
            Barrier barrier(omp_get_num_threads());
            Barrier* shared = nullptr;
#pragma omp single copyprivate(shared)
            shared = &barrier;  // the single thread's barrier, for the whole team
            body(omp_get_thread_num(), omp_get_num_threads(), *shared);
#pragma omp barrier  // the barrier lives on that thread's stack: nobody leaves before all are done
        }
        return;
    }
#endif
    Barrier alone(1);
    body(0, 1, alone);
}

}  // namespace
}  // namespace PYRNN_ISA
}  // namespace pyrnn

// The kernel's threads: a team from the worker pool (pool.h) per call, and the barrier that ends
// each recurrent step (and decides, for all threads at once, whether a stop request ends the call).
//
// Why not OpenMP: the module would link the system's libgomp.so.1, and whichever libgomp.so.1 a
// process loads first serves every library asking for that name. Imported before torch, ours
// took over torch's (torch ships its own) and made torch.nn.RNN ~25× slower at 2 threads
// (medium forward: 14 ms -> 350 ms).
//
// The barrier spins (a step of the recurrence takes microseconds, so the partner is usually
// about to arrive; giving the core away costs a scheduler time slice, milliseconds), and yields
// the core after 50 µs without the partner: on a machine with more runnable threads than cores,
// spinning for a partner that is not running only delays that partner. (Measured under load:
// 1 ms of spinning before yielding made a 100-step shape 7× slower than 50 µs.)
#pragma once
#include <atomic>
#include <cstdint>
#include <thread>

#include "pool.h"

namespace pyrnn {
namespace PYRNN_ISA {
namespace {

class Barrier {
  public:
    explicit Barrier(int threads = 1) : threads_(threads) {}
    void set_threads(int threads) { threads_ = threads; }  // before anyone waits

    // Waits for every thread; -> whether `stop` (if any) was set when the last one arrived. All
    // threads get the same answer, so they can all leave at the same step.
    bool wait(const std::atomic<bool>* stop = nullptr) {
        if (threads_ == 1) return stop_requested(stop);
        const unsigned generation = generation_.load(std::memory_order_acquire);
        if (arrived_.fetch_add(1, std::memory_order_acq_rel) == threads_ - 1) {
            arrived_.store(0, std::memory_order_relaxed);
            stopping_ = stop_requested(stop);
            generation_.fetch_add(1, std::memory_order_release);  // publishes every thread's writes
            return stopping_;
        }
        while (!spin_until([&] { return generation_.load(std::memory_order_acquire) != generation; },
                           std::chrono::microseconds(50)))
            std::this_thread::yield();
        return stopping_;  // written before the generation changed, read before anyone can arrive again
    }

    static bool stop_requested(const std::atomic<bool>* stop) {
        return stop != nullptr && stop->load(std::memory_order_relaxed);
    }

  private:
    int threads_;
    std::atomic<int> arrived_{0};
    std::atomic<unsigned> generation_{0};
    bool stopping_ = false;
};

// The steps one layer of a stack has finished, published for the layer that reads its results
// (release/acquire): the point-to-point signal of a wavefront, in place of a barrier per step.
class Progress {
  public:
    void publish(int64_t steps) { steps_.store(steps, std::memory_order_release); }
    // Waits until `steps` are published, or until `stop` is set (then the caller's next stop
    // check, or barrier, ends the call).
    void wait_for(int64_t steps, const std::atomic<bool>* stop) const {
        const auto ready = [&] {
            return steps_.load(std::memory_order_acquire) >= steps || Barrier::stop_requested(stop);
        };
        while (!spin_until(ready, std::chrono::microseconds(50))) std::this_thread::yield();
    }

  private:
    alignas(64) std::atomic<int64_t> steps_{0};  // a line of its own: the consumer spins on it
};

// body(tid, nt, barrier) on a team of at most nt threads (this one is tid 0), or straight on
// this thread when nt == 1. The team may come out smaller (pool.h): body gets the real size.
template <typename Body>
inline void in_parallel(int nt, const Body& body) {
    Barrier barrier;
    if (nt <= 1) {
        body(0, 1, barrier);
        return;
    }
    run_team(nt, [&](int team) { barrier.set_threads(team); },
             [&](int tid, int team) { body(tid, team, barrier); });
}

}  // namespace
}  // namespace PYRNN_ISA
}  // namespace pyrnn

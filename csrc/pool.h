// The kernel's worker threads: a pool that lives for the whole process.
//
// Why not a team per call: a new thread starts on its creator's core and only moves to an idle
// one when the scheduler rebalances, milliseconds later; until then both share a core and wait
// for each other at every step's barrier (measured: a 0.6 ms call took 7 ms on 2 threads). The
// pool's workers stay where they run, spin 1 ms after a call for the next one (a training loop's
// next call comes within microseconds), then sleep.
// Why not OpenMP: see threads.h.
#pragma once
#include <chrono>
#include <functional>

namespace pyrnn {

// Spin briefly (pause), then yield the core, until ready() or `patience` has passed; -> ready().
template <typename Ready, typename Duration>
inline bool spin_until(const Ready& ready, Duration patience) {
    const auto start = std::chrono::steady_clock::now();
    for (unsigned spins = 1; !ready(); ++spins) {
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#endif
        if (spins % 256 == 0 && std::chrono::steady_clock::now() - start > patience) return ready();
    }
    return true;
}


// Runs task(tid, team) for every tid in [0, team) at once, the calling thread being tid 0, and
// returns when all are done. team is at most `threads`: smaller when the system refuses a thread
// or when other calls (or other pieces of this one, which may call run_team from inside a task)
// hold the workers; the pool never has more than the thread budget minus one. prepare(team)
// runs on the caller before any task starts.
void run_team(int threads, const std::function<void(int team)>& prepare,
              const std::function<void(int tid, int team)>& task);

}  // namespace pyrnn

// The process-wide worker pool (pool.h).
#include "pool.h"

#include <pthread.h>

#include <atomic>
#include <condition_variable>
#include <mutex>
#include <system_error>
#include <thread>
#include <vector>

namespace pyrnn {
namespace {

class Pool {
  public:
    void run(int threads, const std::function<void(int)>& prepare,
             const std::function<void(int, int)>& task) {
        std::unique_lock<std::mutex> in_use(in_use_, std::try_to_lock);
        const int team = in_use.owns_lock() && threads > 1 ? grow(threads - 1) + 1 : 1;
        prepare(team);
        if (team == 1) {
            task(0, 1);
            return;
        }
        {
            std::lock_guard<std::mutex> lock(mutex_);
            task_ = &task;
            team_ = team;
            pending_.store(team - 1, std::memory_order_relaxed);
            generation_.fetch_add(1, std::memory_order_release);
        }
        wake_.notify_all();
        task(0, team);
        while (!spin_until([&] { return pending_.load(std::memory_order_acquire) == 0; },
                           std::chrono::microseconds(50)))
            std::this_thread::yield();
    }

  private:
    // Starts workers until there are `wanted` (or the system refuses one); -> how many there are.
    int grow(int wanted) {
        while (int(workers_.size()) < wanted) {
            try {
                const int tid = int(workers_.size()) + 1;
                workers_.emplace_back([this, tid] { work(tid); });
            } catch (const std::system_error&) {
                break;
            }
        }
        return std::min(wanted, int(workers_.size()));
    }

    void work(int tid) {
        unsigned seen = 0;
        for (;;) {
            const auto called = [&] { return generation_.load(std::memory_order_acquire) != seen; };
            if (!spin_until(called, std::chrono::milliseconds(1))) {
                std::unique_lock<std::mutex> lock(mutex_);
                wake_.wait(lock, called);
            }
            const std::function<void(int, int)>* task;
            int team;
            {
                std::lock_guard<std::mutex> lock(mutex_);  // generation, task and team together
                seen = generation_.load(std::memory_order_relaxed);
                task = task_;
                team = team_;
            }
            if (tid < team) {
                (*task)(tid, team);
                pending_.fetch_sub(1, std::memory_order_release);
            }
        }
    }

    std::mutex in_use_;  // one call at a time uses the workers
    std::mutex mutex_;   // guards task_, team_ and changes of generation_
    std::condition_variable wake_;
    std::atomic<unsigned> generation_{0};  // one more per call that uses the workers
    std::atomic<int> pending_{0};          // workers of the current call still running
    const std::function<void(int, int)>* task_ = nullptr;
    int team_ = 1;
    std::vector<std::thread> workers_;  // never joined: the pool lives as long as the process
};

// Never destroyed (its workers block forever when idle, and joining them at exit could hang). A
// forked child has none of its parent's threads, so it starts a pool of its own.
Pool* pool = new Pool;
const int fork_handler = pthread_atfork(nullptr, nullptr, [] { pool = new Pool; });

}  // namespace

void run_team(int threads, const std::function<void(int)>& prepare,
              const std::function<void(int, int)>& task) {
    pool->run(threads, prepare, task);
}

}  // namespace pyrnn

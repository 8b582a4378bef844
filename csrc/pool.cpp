// The process-wide worker pool (pool.h).
#include "pool.h"

#include <pthread.h>

#include <atomic>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <system_error>
#include <thread>
#include <vector>

#include "rnn.h"

namespace pyrnn {
namespace {

struct Job {
    const std::function<void(int, int)>* task;
    int team;
    std::atomic<int> pending;  // workers still running it
};

struct Worker {
    std::atomic<Job*> job{nullptr};  // set when a call hands it a task, cleared when done
    const Job* claimed = nullptr;    // (under the pool's mutex) the call it belongs to, if any
    int tid = 0;
    std::thread thread;
};

// Workers are claimed per call: a call takes the idle ones it wants (up to the thread budget in
// all), so independent pieces of one call (each direction of a layer) and concurrent callers each
// get a team of their own; a caller that finds none idle runs alone, which changes nothing in the
// results (they do not depend on the thread count).
class Pool {
  public:
    void run(int threads, const std::function<void(int)>& prepare,
             const std::function<void(int, int)>& task) {
        Job job{&task, 1, {0}};
        if (threads > 1) {
            std::lock_guard<std::mutex> lock(mutex_);
            grow(get_num_threads() - 1);
            for (auto& w : workers_)
                if (job.team < threads && w->claimed == nullptr) {
                    w->claimed = &job;
                    w->tid = job.team++;
                }
        }
        prepare(job.team);
        if (job.team == 1) {
            task(0, 1);
            return;
        }
        job.pending.store(job.team - 1, std::memory_order_relaxed);
        {
            std::lock_guard<std::mutex> lock(mutex_);  // a sleeping worker checks `job` under it
            for (auto& w : workers_)
                if (w->claimed == &job) w->job.store(&job, std::memory_order_release);
        }
        wake_.notify_all();
        task(0, job.team);
        while (!spin_until([&] { return job.pending.load(std::memory_order_acquire) == 0; },
                           std::chrono::microseconds(50)))
            std::this_thread::yield();
    }

  private:
    // Starts workers until there are `wanted` (or the system refuses one). Under mutex_.
    void grow(int wanted) {
        while (int(workers_.size()) < wanted) {
            auto w = std::make_unique<Worker>();
            try {
                w->thread = std::thread([this, p = w.get()] { work(*p); });
            } catch (const std::system_error&) {
                return;
            }
            workers_.push_back(std::move(w));
        }
    }

    void work(Worker& w) {
        const auto called = [&] { return w.job.load(std::memory_order_acquire) != nullptr; };
        for (;;) {
            if (!spin_until(called, std::chrono::milliseconds(1))) {
                std::unique_lock<std::mutex> lock(mutex_);
                wake_.wait(lock, called);
            }
            Job* job = w.job.load(std::memory_order_acquire);
            (*job->task)(w.tid, job->team);
            w.job.store(nullptr, std::memory_order_relaxed);
            {
                std::lock_guard<std::mutex> lock(mutex_);
                w.claimed = nullptr;
            }
            job->pending.fetch_sub(1, std::memory_order_release);  // last use of *job (the caller's)
        }
    }

    std::mutex mutex_;  // guards workers_, Worker::claimed and the handing out of jobs
    std::condition_variable wake_;
    std::vector<std::unique_ptr<Worker>> workers_;  // never joined: the pool lives as long as the process
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

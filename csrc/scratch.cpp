// The kernel's scratch memory, kept between calls (scratch.h).
#include "scratch.h"

#include <pthread.h>

#include <cstdlib>
#include <mutex>
#include <new>
#include <vector>

namespace pyrnn {
namespace {

constexpr size_t kept_at_most = size_t(256) << 20;

class KeptBlocks {
  public:
    ScratchBlock take(size_t bytes) {
        std::lock_guard<std::mutex> lock(mutex_);
        size_t best = blocks_.size();
        for (size_t i = 0; i < blocks_.size(); ++i)
            if (blocks_[i].bytes >= bytes && (best == blocks_.size() || blocks_[i].bytes < blocks_[best].bytes))
                best = i;
        if (best == blocks_.size()) return {nullptr, 0};
        const ScratchBlock block = blocks_[best];
        blocks_.erase(blocks_.begin() + best);
        total_ -= block.bytes;
        return block;
    }

    void keep(ScratchBlock block) {
        std::lock_guard<std::mutex> lock(mutex_);
        blocks_.push_back(block);
        total_ += block.bytes;
        if (total_ > kept_at_most) {  // shapes changed: start over rather than grow without bound
            for (const ScratchBlock& b : blocks_) std::free(b.data);
            blocks_.clear();
            total_ = 0;
        }
    }

  private:
    std::mutex mutex_;
    std::vector<ScratchBlock> blocks_;
    size_t total_ = 0;
};

// Never destroyed (a call may still run on another thread at exit). A forked child starts with
// none kept: its parent's lock may have been held by a thread the child does not have.
KeptBlocks* kept = new KeptBlocks;
const int fork_handler = pthread_atfork(nullptr, nullptr, [] { kept = new KeptBlocks; });

}  // namespace

ScratchBlock acquire_scratch(size_t bytes) {
    bytes = (bytes + 63) / 64 * 64;
    if (bytes == 0) bytes = 64;
    const ScratchBlock reused = kept->take(bytes);
    if (reused.data) return reused;
    void* data = std::aligned_alloc(64, bytes);
    if (!data) throw std::bad_alloc();
    return {data, bytes};
}

void release_scratch(ScratchBlock block) { kept->keep(block); }

}  // namespace pyrnn

// Scratch memory for the kernel's calls, kept between calls.
//
// Why: a call needs megabytes of scratch (medium train: 13 MB). Given back to malloc, blocks that
// big are often returned to the OS and page-faulted in again by the next call, 4 KiB at a time:
// measured 6 000 faults per medium train call at 2 threads, a third of its time. Released blocks
// are therefore kept (up to a cap) and handed to the next call that fits in one; a training loop
// asks for the same sizes at every step.
#pragma once
#include <cstddef>

namespace pyrnn {

struct ScratchBlock {
    void* data;    // 64-byte aligned
    size_t bytes;  // at least the size asked for
};

// A block of at least `bytes` bytes: a kept one (the smallest that fits) or a new one.
// Throws std::bad_alloc when memory runs out.
ScratchBlock acquire_scratch(size_t bytes);

// Gives a block back for reuse. Blocks kept beyond 256 MiB in all are freed.
void release_scratch(ScratchBlock block);

}  // namespace pyrnn

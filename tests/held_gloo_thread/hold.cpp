// A fault injector for tests/test_torch_integration.py, preloaded (LD_PRELOAD) into the DDP
// test's worker processes. It stands in for torch's ProcessGroupGloo::AsyncWork::execute, which
// gloo's run-loop threads call for each collective: once the real one has returned (the work's
// future is complete, its caller goes on), the thread waits there, still holding the work, until
// another work starts (holding it longer would stall training) or until release(). That is what a
// loaded machine does when it preempts the thread at that point. sitecustomize.py calls release()
// after every atexit hook, so the thread lets go of the last work as the interpreter finalizes.
#include <dlfcn.h>
#include <fcntl.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <thread>

// EXECUTE: the mangled name of that function, a string (the test defines it: -DEXECUTE="...").

namespace {
std::atomic<long> started{0};
std::atomic<int> holding{0};
std::atomic<bool> released{false};

void log_hold() {  // one line per hold in $HELD_GLOO_THREAD_LOG: the test sees the injector ran
    char line[32];
    const int n = std::snprintf(line, sizeof line, "%d\n", int(getpid()));
    const int fd = open(std::getenv("HELD_GLOO_THREAD_LOG"), O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (fd < 0) return;
    if (write(fd, line, n) != n) std::perror("held_gloo_thread");
    close(fd);
}
}  // namespace

extern "C" void execute(const void* work) __asm__(EXECUTE);
extern "C" void execute(const void* work) {
    static const auto real = reinterpret_cast<void (*)(const void*)>(
        dlsym(dlopen("libtorch_cpu.so", RTLD_NOW | RTLD_NOLOAD), EXECUTE));
    const long mine = ++started;
    real(work);
    ++holding;
    log_hold();
    const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(60);
    while (started.load() == mine && !released.load() && std::chrono::steady_clock::now() < give_up)
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
    --holding;
}

// Lets the held thread go and returns once it has left the hold (it then drops the work and,
// releasing the Python object the work keeps, waits for the GIL). Called with the GIL held.
extern "C" void release() {
    released = true;
    while (holding.load() > 0) std::this_thread::sleep_for(std::chrono::microseconds(100));
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
}

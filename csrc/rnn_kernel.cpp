// The fast kernel, compiled once per instruction set (CMakeLists.txt defines PYRNN_ISA, the
// namespace, and PYRNN_VECTOR_BYTES, the vector width). dispatch.cpp chooses the copy to run.
//
// forward:  1. pre = x·weight_ihᵀ + bias for all T·B rows at once (gemm), written into output;
//           2. per step, h_t = tanh(pre_t + h_{t-1}·weight_hhᵀ): the micro-kernel over a
//              weight_hhᵀ packed once per call, tanh and the store of h_t fused in its epilogue.
// backward: 1. the g-chain, per step g = da_{t+1}·weight_hh over a packed weight_hh, with
//              da_t = (g + grad_output_t)·(1 - h_t²) in the epilogue;
//           2. grad_x, grad_weight_ih, grad_weight_hh as single products over all T·B rows.
// Threads: one team of threads per call (threads.h, plan_threads). Each thread owns a fixed range
// of NR-wide column panels (of the output in each product, and of H in the recurrence when its
// steps are big enough to share; else thread 0 runs them) and sums every element it owns in the
// same order whatever the thread count, so results are bitwise identical across thread counts.
// Shared steps are separated by one barrier each. Nothing is allocated inside the loops.
#include "gemm.h"
#include "kernels.h"
#include "scratch.h"
#include "tanh.h"
#include "threads.h"

namespace pyrnn {
namespace PYRNN_ISA {
namespace {

// Scratch memory for one call (scratch.h: kept for the next call), 64-byte aligned.
template <typename F>
class Scratch {
  public:
    explicit Scratch(int64_t n) : block_(acquire_scratch(size_t(n > 0 ? n : 1) * sizeof(F))) {}
    ~Scratch() { release_scratch(block_); }
    Scratch(const Scratch&) = delete;
    Scratch& operator=(const Scratch&) = delete;
    F* get() const { return static_cast<F*>(block_.data); }

  private:
    ScratchBlock block_;
};

// Row b takes part in step t unless t is past its length (design.md §1: padding).
inline bool valid(const int64_t* lengths, int64_t t, int64_t b) {
    return lengths == nullptr || t < lengths[b];
}
inline int64_t length(const int64_t* lengths, int64_t T, int64_t b) { return lengths ? lengths[b] : T; }

// How a call shares its work among threads. The products over all T·B rows split into column
// ranges with nothing to synchronise inside, so they use every thread once they are worth waking
// one for (>= 4M multiply-adds, ~40 µs on one core). A recurrence step shared between threads
// ends in a barrier (~1 µs when both threads run, far more when the OS has just put them on one
// core), so the steps are shared only from 2 MFLOP (~15 µs on one core) up, and otherwise run
// on thread 0 while the others wait: measured on 2 cores, the small shape's 0.5 MFLOP steps were
// 1.85× faster on 2 threads back to back but up to 10× slower after an idle pause.
// Never more threads than max_threads, nor than H has column panels.
struct Plan {
    int team;          // threads to ask the pool for
    bool share_steps;  // whether the recurrence is split too (else thread 0 runs it)
};
template <typename F>
inline Plan plan_threads(int max_threads, int64_t T, int64_t B, int64_t I, int64_t H) {
    const int most = int(max64(1, min64(max_threads, ceil_div(H, Tile<F>::NR))));
    const bool share_steps = 2 * B * H * H >= (int64_t(1) << 21);
    const bool share_products = T * B * H * (I + H) >= (int64_t(1) << 22);
    return {share_steps || share_products ? most : 1, share_steps && most > 1};
}

// The columns [begin, end) of an n-column output that thread `tid` of `nt` owns: whole NR panels.
template <typename F>
struct Columns {
    int64_t begin, end;
    Columns(int64_t n, int tid, int nt) {
        const int64_t panels = ceil_div(n, Tile<F>::NR);
        begin = min64(n, panels * tid / nt * Tile<F>::NR);
        end = min64(n, panels * (tid + 1) / nt * Tile<F>::NR);
    }
};

// Thread `tid`'s share of a call on a team of `nt`: its columns of H in the products (mine) and
// in the recurrence (steps: empty unless tid < step_threads, i.e. on thread 0 alone when the
// plan keeps the steps on one thread).
template <typename F>
struct Share {
    int step_threads;
    Columns<F> mine, steps;
    Share(const Plan& plan, int64_t H, int tid, int nt)
        : step_threads(plan.share_steps ? nt : 1), mine(H, tid, nt), steps(H, tid, step_threads) {}
};

// The row stride (elements) of the kernel's own B×H and T·B×H buffers that the recurrence reads
// rows of: a whole and odd number of cache lines. The micro-kernel reads MR rows at once, one
// element of each per k; rows a multiple of 4 KiB apart all fall in one L1 set, which holds 12
// lines, so they evict each other. Measured on the forward at T=50, B=64, I=512, float64, 1
// thread: H = 1024 (8 KiB rows) at 56 GFLOP/s against 63-65 for H = 1008 or 1040.
template <typename F>
inline int64_t row_stride(int64_t H) {
    constexpr int64_t per_line = 64 / sizeof(F);
    return (ceil_div(H, per_line) | 1) * per_line;
}

// out[0:n] = state[0:n] = tanh(out[0:n] + acc[0:n]), n <= NR: out holds the input term on entry.
// Whole vectors only, so every element goes through exactly the same arithmetic whether or not it
// sits in a partial panel.
template <typename F>
inline void add_tanh_store(const F* acc, F* out, F* state, int64_t n) {
    constexpr int L = lanes<F>, NR = Tile<F>::NR;
    if (n == NR) {
        for (int v = 0; v < NR; v += L) {
            const Vec<F> h = tanh<F>(load(acc + v) + load(out + v));
            store(out + v, h);
            store(state + v, h);
        }
        return;
    }
    alignas(64) F pre[NR] = {};
    for (int64_t j = 0; j < n; ++j) pre[j] = out[j];
    for (int v = 0; v < NR; v += L) store(pre + v, tanh<F>(load(acc + v) + load(pre + v)));
    for (int64_t j = 0; j < n; ++j) out[j] = state[j] = pre[j];
}

}  // namespace

template <typename F>
void tanh(const F* x, F* y, int64_t n) {
    constexpr int L = lanes<F>;
    int64_t i = 0;
    for (; i + L <= n; i += L) store(y + i, tanh<F>(load(x + i)));
    if (i < n) {
        alignas(64) F rest[L] = {};
        for (int64_t j = i; j < n; ++j) rest[j - i] = x[j];
        store(rest, tanh<F>(load(rest)));
        for (int64_t j = i; j < n; ++j) y[j] = rest[j - i];
    }
}

template <typename F>
void forward(const F* x, const F* weight_ih, const F* weight_hh, const F* bias, const F* h0,
             const int64_t* lengths, F* output, F* h_n, int64_t T, int64_t B, int64_t I,
             int64_t H, int max_threads) {
    constexpr int MR = Tile<F>::MR, NR = Tile<F>::NR;
    const Plan plan = plan_threads<F>(max_threads, T, B, I, H);
    const int64_t panels = ceil_div(H, NR);
    Scratch<F> packed_whh(panels * NR * H);  // weight_hhᵀ in NR-column panels
    // h_{t-1} and h_t (B×H, row-major). Not output itself: a padding row's state is carried
    // while its output is 0.
    const int64_t ld = row_stride<F>(H);
    Scratch<F> states(2 * B * ld);
    const int64_t b_size = pack_b_size<F>(I, H);
    Scratch<F> per_thread(plan.team * b_size);

    in_parallel(plan.team, [&](const int tid, const int nt, Barrier& barrier) {
        F* pack_b_buf = per_thread.get() + tid * b_size;
        const Share<F> share(plan, H, tid, nt);
        const Columns<F>& mine = share.mine, &steps = share.steps;
        const int step_threads = share.step_threads;
        alignas(64) F tile[MR * NR];

        // 1. output <- x·weight_ihᵀ + bias on my columns, every step at once.
        gemm<F>(T * B, mine.begin, mine.end, I, View<F>{x, I, 1}, View<F>{weight_ih, 1, I}, bias,
                output, H, pack_b_buf);
        pack_b<F>(H, steps.end - steps.begin, View<F>{weight_hh + steps.begin * H, 1, H},
                  packed_whh.get() + steps.begin * H);
        for (int64_t b = 0; b < B; ++b)
            for (int64_t j = steps.begin; j < steps.end; ++j) states.get()[b * ld + j] = h0[b * H + j];
        barrier.wait();
        if (tid >= step_threads) return;

        // 2. The recurrence. Step t reads all of h_{t-1} (states[t % 2]) and writes my columns
        //    of h_t into output and states[(t + 1) % 2]; one barrier between shared steps.
        for (int64_t t = 0; t < T; ++t) {
            const F* h_prev = states.get() + (t % 2) * B * ld;
            F* h_next = states.get() + ((t + 1) % 2) * B * ld;
            for (int64_t j = steps.begin; j < steps.end; j += NR) {
                const int64_t cols = min64(NR, H - j);
                for (int64_t b0 = 0; b0 < B; b0 += MR) {
                    const int rows = int(min64(MR, B - b0));
                    micro_kernel_rows<F, true>(rows, H, h_prev + b0 * ld, ld, packed_whh.get() + j * H, tile);
                    for (int r = 0; r < rows; ++r) {
                        const int64_t b = b0 + r;
                        F* out = output + (t * B + b) * H + j;
                        if (valid(lengths, t, b)) {
                            add_tanh_store(tile + r * NR, out, h_next + b * ld + j, cols);
                        } else {  // padding: output 0, state carried
                            for (int64_t c = 0; c < cols; ++c) out[c] = F(0);
                            for (int64_t c = 0; c < cols; ++c) h_next[b * ld + j + c] = h_prev[b * ld + j + c];
                        }
                    }
                }
            }
            if (step_threads > 1) barrier.wait();
        }
        const F* h_last = states.get() + (T % 2) * B * ld;
        for (int64_t b = 0; b < B; ++b)
            for (int64_t j = steps.begin; j < steps.end; ++j) h_n[b * H + j] = h_last[b * ld + j];
    });
}

template <typename F>
void backward(const F* grad_output, const F* x, const F* weight_ih, const F* weight_hh,
              const F* output, const F* h0, const F* grad_h_n, const int64_t* lengths,
              F* grad_x, F* grad_h0, F* grad_weight_ih, F* grad_weight_hh, F* grad_bias,
              int64_t T, int64_t B, int64_t I, int64_t H, int max_threads) {
    constexpr int MR = Tile<F>::MR, NR = Tile<F>::NR;
    const Plan plan = plan_threads<F>(max_threads, T, B, I, H);
    const int64_t panels = ceil_div(H, NR), TB = T * B;
    Scratch<F> packed_whh(panels * NR * H);  // weight_hh in NR-column panels
    const int64_t ld = row_stride<F>(H);
    Scratch<F> grad_a(TB * ld);              // dL/da_t (row stride ld), 0 on padding
    Scratch<F> h_prev(TB * H);               // h_{t-1} of every valid row, 0 on padding
    Scratch<F> x_valid(lengths ? TB * I : 0);  // x with padding rows zeroed (a NaN there must not leak)
    const F* x_rows = lengths ? x_valid.get() : x;
    const int64_t b_size = max64(pack_b_size<F>(H, I), max64(pack_b_size<F>(TB, I), pack_b_size<F>(TB, H)));
    Scratch<F> per_thread(plan.team * b_size);

    in_parallel(plan.team, [&](const int tid, const int nt, Barrier& barrier) {
        F* pack_b_buf = per_thread.get() + tid * b_size;
        const Share<F> share(plan, H, tid, nt);
        const Columns<F>& mine = share.mine, &steps = share.steps;
        const int step_threads = share.step_threads;
        alignas(64) F tile[MR * NR];
        const F no_g[NR] = {};

        pack_b<F>(H, steps.end - steps.begin, View<F>{weight_hh + steps.begin, H, 1},
                  packed_whh.get() + steps.begin * H);
        for (int64_t t = 0; t < T; ++t)
            for (int64_t b = 0; b < B; ++b) {
                const F* h = t == 0 ? h0 + b * H : output + ((t - 1) * B + b) * H;
                const bool ok = valid(lengths, t, b);
                for (int64_t j = mine.begin; j < mine.end; ++j) h_prev.get()[(t * B + b) * H + j] = ok ? h[j] : F(0);
            }
        if (lengths)
            for (int64_t r = TB * tid / nt; r < TB * (tid + 1) / nt; ++r)
                for (int64_t i = 0; i < I; ++i)
                    x_valid.get()[r * I + i] = valid(lengths, r / B, r % B) ? x[r * I + i] : F(0);

        // 1. The g-chain, s = T-1 .. -1: g_s = da_{s+1}·weight_hh (+ grad_h_n where s is the row's
        //    last step; padding rows have da = 0, so g reaches that step unchanged), then
        //    da_s = (g_s + grad_output_s)·(1 - h_s²) on valid rows; g_{-1} is grad_h0.
        if (tid < step_threads)
            for (int64_t s = T - 1; s >= -1; --s) {
                const bool has_next = s + 1 <= T - 1;
                const F* da_next = grad_a.get() + (s + 1) * B * ld;  // read only if has_next
                for (int64_t j = steps.begin; j < steps.end; j += NR) {
                    const int64_t cols = min64(NR, H - j);
                    for (int64_t b0 = 0; b0 < B; b0 += MR) {
                        const int rows = int(min64(MR, B - b0));
                        if (has_next)
                            micro_kernel_rows<F, true>(rows, H, da_next + b0 * ld, ld, packed_whh.get() + j * H, tile);
                        else
                            for (int i = 0; i < MR * NR; ++i) tile[i] = F(0);
                        for (int r = 0; r < rows; ++r) {
                            const int64_t b = b0 + r;
                            // Past the row's length da_{s+1} is 0 and so is g, exactly: not
                            // 0·weight_hh, NaN where weight_hh holds inf or NaN (the reference
                            // multiplies no padding row).
                            const F* g = has_next && !valid(lengths, s + 1, b) ? no_g : tile + r * NR;
                            const F* g_end = grad_h_n + b * H + j;  // enters at the row's last step
                            const bool last = s == length(lengths, T, b) - 1;
                            if (s < 0) {
                                for (int64_t c = 0; c < cols; ++c) grad_h0[b * H + j + c] = g[c] + (last ? g_end[c] : F(0));
                                continue;
                            }
                            F* da = grad_a.get() + (s * B + b) * ld + j;
                            const F* go = grad_output + (s * B + b) * H + j;
                            const F* h = output + (s * B + b) * H + j;
                            if (valid(lengths, s, b))
                                for (int64_t c = 0; c < cols; ++c)
                                    da[c] = (g[c] + (last ? g_end[c] : F(0)) + go[c]) * (F(1) - h[c] * h[c]);
                            else
                                for (int64_t c = 0; c < cols; ++c) da[c] = F(0);
                        }
                    }
                }
                if (step_threads > 1) barrier.wait();
            }
        if (step_threads == 1) barrier.wait();  // the products read all of grad_a

        // 2. The products over all T·B rows, each thread on its own output columns.
        const Columns<F> mine_i(I, tid, nt);
        gemm<F>(TB, mine_i.begin, mine_i.end, H, View<F>{grad_a.get(), ld, 1}, View<F>{weight_ih, I, 1},
                nullptr, grad_x, I, pack_b_buf);
        gemm<F>(H, mine_i.begin, mine_i.end, TB, View<F>{grad_a.get(), 1, ld}, View<F>{x_rows, I, 1},
                nullptr, grad_weight_ih, I, pack_b_buf);
        gemm<F>(H, mine.begin, mine.end, TB, View<F>{grad_a.get(), 1, ld}, View<F>{h_prev.get(), H, 1},
                nullptr, grad_weight_hh, H, pack_b_buf);
        for (int64_t j = mine.begin; j < mine.end; ++j) grad_bias[j] = F(0);
        for (int64_t r = 0; r < TB; ++r)
            for (int64_t j = mine.begin; j < mine.end; ++j) grad_bias[j] += grad_a.get()[r * ld + j];
    });
}

#define PYRNN_INSTANTIATE(F)                                                                     \
    template void forward<F>(const F*, const F*, const F*, const F*, const F*, const int64_t*,   \
                             F*, F*, int64_t, int64_t, int64_t, int64_t, int);                   \
    template void backward<F>(const F*, const F*, const F*, const F*, const F*, const F*,        \
                              const F*, const int64_t*, F*, F*, F*, F*, F*, int64_t, int64_t,    \
                              int64_t, int64_t, int);                                            \
    template void tanh<F>(const F*, F*, int64_t);
PYRNN_INSTANTIATE(float)
PYRNN_INSTANTIATE(double)

}  // namespace PYRNN_ISA
}  // namespace pyrnn

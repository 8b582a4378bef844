// The fast kernel, compiled once per instruction set (CMakeLists.txt defines PYRNN_ISA, the
// namespace, and PYRNN_VECTOR_BYTES, the vector width). dispatch.cpp chooses the copy to run.
//
// forward:  1. pre = x·weight_ihᵀ + bias for all T·B rows at once (gemm), written into output;
//           2. per step, h_t = φ(pre_t + h_{t-1}·weight_hhᵀ): the micro-kernel over a
//              weight_hhᵀ packed once per call, φ and the store of h_t fused in its epilogue.
// backward: 1. the g-chain, per step g = da_{t+1}·weight_hh over a packed weight_hh, with
//              da_t = (g + grad_output_t)·φ'(h_t) in the epilogue;
//           2. grad_x, grad_weight_ih, grad_weight_hh as single products over all T·B rows.
// Threads: one team of threads per call (threads.h, plan_threads). Each thread owns a fixed range
// of NR-wide column panels (of the output in each product, and of H in the recurrence when its
// steps are big enough to share; else thread 0 runs them) and sums every element it owns in the
// same order whatever the thread count, so results are bitwise identical across thread counts.
// Shared steps are separated by one barrier each. Nothing is allocated inside the loops.
// φ is a policy (activation.h) the passes are templated on; the call's struct (rnn.h) picks it.
// So is the arithmetic of the products (P: gemm.h's Plain, or bf16.h's Bf16 for precision bf16,
// where the operands of every product are rounded to bf16 once: weights as they are packed, x once
// per call, h_{t-1} and dL/da in the epilogue of the step that makes them).
#include <cstring>
#include <type_traits>

#include "activation.h"
#include "bf16.h"
#include "gemm.h"
#include "kernels.h"
#include "scratch.h"
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

// Row b takes part in step t unless t is past its length (docs/design.md §1: padding).
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

// out[0:n] = state[0:n] = φ(out[0:n] + acc[0:n]), n <= NR: out holds the input term on entry.
// Whole vectors only, so every element goes through exactly the same arithmetic whether or not it
// sits in a partial panel.
template <typename F, typename Act>
inline void add_activate_store(const F* acc, F* out, F* state, int64_t n) {
    constexpr int L = lanes<F>, NR = Tile<F>::NR;
    if (n == NR) {
        for (int v = 0; v < NR; v += L) {
            const Vec<F> h = Act::template apply<F>(load(acc + v) + load(out + v));
            store(out + v, h);
            store(state + v, h);
        }
        return;
    }
    alignas(64) F pre[NR] = {};
    for (int64_t j = 0; j < n; ++j) pre[j] = out[j];
    for (int v = 0; v < NR; v += L) store(pre + v, Act::template apply<F>(load(acc + v) + load(pre + v)));
    for (int64_t j = 0; j < n; ++j) out[j] = state[j] = pre[j];
}

// What the products of P read of a float matrix whose rows the kernel writes itself (h_{t-1},
// dL/da): the rows themselves when P multiplies F, else a copy in P::Stored, rounded row by row
// as they are made. Its rows have a stride of their own, an even one, with a zero past column H
// when H is odd, and one zero row more at the end: P's k-pairs may read one element past a row
// (or past the last row) against a zero in the packed operand, and 0·(an unset NaN) is NaN.
template <typename F, typename P>
struct Operand {
    using S = typename P::Stored;
    static constexpr bool rounded = !std::is_same_v<S, F>;
    Scratch<S> copy;
    const int64_t ld;
    const S* rows;  // what the products read

    Operand(const F* own_rows, int64_t own_ld, int64_t n_rows, int64_t n_cols)
        : copy(rounded ? (n_rows + 1) * row_stride<S>(n_cols) : 0),
          ld(rounded ? row_stride<S>(n_cols) : own_ld) {
        if constexpr (rounded) {
            rows = copy.get();
            std::memset(copy.get() + n_rows * ld, 0, ld * sizeof(S));
            if (n_cols % 2)
                for (int64_t r = 0; r < n_rows; ++r) copy.get()[r * ld + n_cols] = S(0);
        } else {
            rows = own_rows;
        }
    }
    // Row r, columns [j, j + n), has just been written to `from`: round it into the copy.
    void update(int64_t r, int64_t j, const F* from, int64_t n) {
        if constexpr (rounded) round_row(from, copy.get() + r * ld + j, n);
    }
};

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

namespace {

template <typename F, typename Act, typename P>
Status forward_pass(const Forward<F>& c) {
    using S = typename P::Stored;
    constexpr int MR = Tile<F>::MR, NR = Tile<F>::NR;
    const int64_t T = c.T, B = c.B, I = c.I, H = c.H;
    const Plan plan = plan_threads<F>(c.options.max_threads, T, B, I, H);
    const int64_t panels = ceil_div(H, NR);
    Scratch<S> packed_whh(panels * P::panel_size(H));  // weight_hhᵀ in NR-column panels
    // h_{t-1} and h_t (B×H, row-major). Not output itself: a padding row's state is carried
    // while its output is 0.
    const int64_t ld = row_stride<F>(H);
    Scratch<F> states(2 * B * ld);
    Operand<F, P> x_operand(c.x.data, c.x.stride, T * B, I), state_operand(states.get(), ld, 2 * B, H);
    const int64_t b_size = pack_b_size<P>(I, H);
    Scratch<S> per_thread(plan.team * b_size);
    Status status = Status::finished;  // written by thread 0

    in_parallel(plan.team, [&](const int tid, const int nt, Barrier& barrier) {
        S* pack_b_buf = per_thread.get() + tid * b_size;
        const Share<F> share(plan, H, tid, nt);
        const Columns<F>& mine = share.mine, &steps = share.steps;
        const int step_threads = share.step_threads;
        alignas(64) F tile[MR * NR];
        const auto stopped = [&] {
            if (tid == 0) status = Status::stopped;
        };

        // 1. output <- x·weight_ihᵀ + bias on my columns, every step at once (after x is
        //    rounded, when P rounds, each thread a share of its rows).
        if constexpr (Operand<F, P>::rounded) {
            for (int64_t r = T * B * tid / nt; r < T * B * (tid + 1) / nt; ++r) x_operand.update(r, 0, c.x.row(r), I);
            if (barrier.wait(c.options.stop)) return stopped();
        }
        gemm<P>(T * B, mine.begin, mine.end, I, View<S>{x_operand.rows, x_operand.ld, 1},
                View<F>{c.weight_ih, 1, I}, c.bias, c.output.data, c.output.stride, pack_b_buf);
        P::pack(H, steps.end - steps.begin, View<F>{c.weight_hh + steps.begin * H, 1, H},
                packed_whh.get() + steps.begin / NR * P::panel_size(H));
        for (int64_t b = 0; b < B; ++b) {
            for (int64_t j = steps.begin; j < steps.end; ++j) states.get()[b * ld + j] = c.h0.row(b)[j];
            state_operand.update(b, steps.begin, states.get() + b * ld + steps.begin, steps.end - steps.begin);
        }
        if (barrier.wait(c.options.stop)) return stopped();
        if (tid >= step_threads) return;

        // 2. The recurrence. Step t reads all of h_{t-1} (states[t % 2]) and writes my columns
        //    of h_t into output and states[(t + 1) % 2]; one barrier between shared steps, which
        //    also decides whether to stop (alone, thread 0 looks at the flag itself).
        for (int64_t t = 0; t < T; ++t) {
            if (step_threads == 1 && t > 0 && Barrier::stop_requested(c.options.stop)) return stopped();
            const F* h_prev = states.get() + (t % 2) * B * ld;
            F* h_next = states.get() + ((t + 1) % 2) * B * ld;
            const int64_t prev = (t % 2) * B, next = ((t + 1) % 2) * B;  // their rows in state_operand
            for (int64_t j = steps.begin; j < steps.end; j += NR) {
                const int64_t cols = min64(NR, H - j);
                const S* panel = packed_whh.get() + j / NR * P::panel_size(H);
                for (int64_t b0 = 0; b0 < B; b0 += MR) {
                    const int rows = int(min64(MR, B - b0));
                    micro_kernel_rows<P, true>(rows, H, state_operand.rows + (prev + b0) * state_operand.ld,
                                               state_operand.ld, panel, tile);
                    for (int r = 0; r < rows; ++r) {
                        const int64_t b = b0 + r;
                        F* out = c.output.row(t * B + b) + j;
                        if (valid(c.lengths, t, b)) {
                            add_activate_store<F, Act>(tile + r * NR, out, h_next + b * ld + j, cols);
                        } else {  // padding: output 0, state carried
                            for (int64_t k = 0; k < cols; ++k) out[k] = F(0);
                            for (int64_t k = 0; k < cols; ++k) h_next[b * ld + j + k] = h_prev[b * ld + j + k];
                        }
                        state_operand.update(next + b, j, h_next + b * ld + j, cols);
                    }
                }
            }
            if (step_threads > 1 && barrier.wait(c.options.stop)) return stopped();
        }
        const F* h_last = states.get() + (T % 2) * B * ld;
        for (int64_t b = 0; b < B; ++b)
            for (int64_t j = steps.begin; j < steps.end; ++j) c.h_n.row(b)[j] = h_last[b * ld + j];
    });
    return status;
}

template <typename F, typename Act, typename P>
Status backward_pass(const Backward<F>& c) {
    using S = typename P::Stored;
    constexpr int MR = Tile<F>::MR, NR = Tile<F>::NR;
    const int64_t T = c.T, B = c.B, I = c.I, H = c.H;
    const Plan plan = plan_threads<F>(c.options.max_threads, T, B, I, H);
    const int64_t panels = ceil_div(H, NR), TB = T * B;
    Scratch<S> packed_whh(panels * P::panel_size(H));  // weight_hh in NR-column panels
    const int64_t ld = row_stride<F>(H);
    Scratch<F> grad_a(TB * ld);              // dL/da_t (row stride ld), 0 on padding
    Operand<F, P> grad_a_operand(grad_a.get(), ld, TB, H);  // what the products read of it
    Scratch<F> h_prev(TB * H);               // h_{t-1} of every valid row, 0 on padding
    // x with padding rows zeroed (a NaN there must not leak), contiguous.
    const bool copy_x = c.lengths != nullptr || c.x.stride != I;
    Scratch<F> x_valid(copy_x ? TB * I : 0);
    const F* x_rows = copy_x ? x_valid.get() : c.x.data;
    const int64_t b_size = max64(pack_b_size<P>(H, I), max64(pack_b_size<P>(TB, I), pack_b_size<P>(TB, H)));
    Scratch<S> per_thread(plan.team * b_size);
    Status status = Status::finished;  // written by thread 0

    in_parallel(plan.team, [&](const int tid, const int nt, Barrier& barrier) {
        S* pack_b_buf = per_thread.get() + tid * b_size;
        const Share<F> share(plan, H, tid, nt);
        const Columns<F>& mine = share.mine, &steps = share.steps;
        const int step_threads = share.step_threads;
        alignas(64) F tile[MR * NR];
        const F no_g[NR] = {};
        const int64_t lda = grad_a_operand.ld;

        P::pack(H, steps.end - steps.begin, View<F>{c.weight_hh + steps.begin, H, 1},
                packed_whh.get() + steps.begin / NR * P::panel_size(H));
        for (int64_t t = 0; t < T; ++t)
            for (int64_t b = 0; b < B; ++b) {
                const F* h = t == 0 ? c.h0.row(b) : c.output.row((t - 1) * B + b);
                const bool ok = valid(c.lengths, t, b);
                for (int64_t j = mine.begin; j < mine.end; ++j) h_prev.get()[(t * B + b) * H + j] = ok ? h[j] : F(0);
            }
        if (copy_x)
            for (int64_t r = TB * tid / nt; r < TB * (tid + 1) / nt; ++r)
                for (int64_t i = 0; i < I; ++i)
                    x_valid.get()[r * I + i] = valid(c.lengths, r / B, r % B) ? c.x.row(r)[i] : F(0);

        // 1. The g-chain, s = T-1 .. -1: g_s = da_{s+1}·weight_hh (+ grad_h_n where s is the row's
        //    last step; padding rows have da = 0, so g reaches that step unchanged), then
        //    da_s = (g_s + grad_output_s)·φ'(h_s) on valid rows; g_{-1} is grad_h0. Shared steps
        //    end in a barrier that also decides whether to stop; alone, thread 0 looks itself.
        if (tid < step_threads)
            for (int64_t s = T - 1; s >= -1; --s) {
                if (step_threads == 1 && Barrier::stop_requested(c.options.stop)) break;
                const bool has_next = s + 1 <= T - 1;
                const S* da_next = grad_a_operand.rows + (s + 1) * B * lda;  // read only if has_next
                for (int64_t j = steps.begin; j < steps.end; j += NR) {
                    const int64_t cols = min64(NR, H - j);
                    const S* panel = packed_whh.get() + j / NR * P::panel_size(H);
                    for (int64_t b0 = 0; b0 < B; b0 += MR) {
                        const int rows = int(min64(MR, B - b0));
                        if (has_next)
                            micro_kernel_rows<P, true>(rows, H, da_next + b0 * lda, lda, panel, tile);
                        else
                            for (int i = 0; i < MR * NR; ++i) tile[i] = F(0);
                        for (int r = 0; r < rows; ++r) {
                            const int64_t b = b0 + r;
                            // Past the row's length da_{s+1} is 0 and so is g, exactly: not
                            // 0·weight_hh, NaN where weight_hh holds inf or NaN (the reference
                            // multiplies no padding row).
                            const F* g = has_next && !valid(c.lengths, s + 1, b) ? no_g : tile + r * NR;
                            const F* g_end = c.grad_h_n.row(b) + j;  // enters at the row's last step
                            const bool last = s == length(c.lengths, T, b) - 1;
                            if (s < 0) {
                                F* grad_h0 = c.grad_h0.row(b) + j;
                                for (int64_t k = 0; k < cols; ++k) grad_h0[k] = g[k] + (last ? g_end[k] : F(0));
                                continue;
                            }
                            F* da = grad_a.get() + (s * B + b) * ld + j;
                            const F* go = c.grad_output.row(s * B + b) + j;
                            const F* h = c.output.row(s * B + b) + j;
                            if (valid(c.lengths, s, b))
                                for (int64_t k = 0; k < cols; ++k)
                                    da[k] = (g[k] + (last ? g_end[k] : F(0)) + go[k]) * Act::derivative(h[k]);
                            else
                                for (int64_t k = 0; k < cols; ++k) da[k] = F(0);
                            grad_a_operand.update(s * B + b, j, da, cols);
                        }
                    }
                }
                if (step_threads > 1 && barrier.wait(c.options.stop)) {
                    if (tid == 0) status = Status::stopped;
                    return;
                }
            }
        // The products read all of grad_a; after shared steps the last one's barrier said so.
        if (step_threads == 1 && barrier.wait(c.options.stop)) {
            if (tid == 0) status = Status::stopped;
            return;
        }

        // 2. The products over all T·B rows, each thread on its own output columns.
        const Columns<F> mine_i(I, tid, nt);
        const S* da_rows = grad_a_operand.rows;
        gemm<P>(TB, mine_i.begin, mine_i.end, H, View<S>{da_rows, lda, 1}, View<F>{c.weight_ih, I, 1},
                nullptr, c.grad_x.data, c.grad_x.stride, pack_b_buf);
        gemm<P>(H, mine_i.begin, mine_i.end, TB, View<S>{da_rows, 1, lda}, View<F>{x_rows, I, 1},
                nullptr, c.grad_weight_ih, I, pack_b_buf);
        gemm<P>(H, mine.begin, mine.end, TB, View<S>{da_rows, 1, lda}, View<F>{h_prev.get(), H, 1},
                nullptr, c.grad_weight_hh, H, pack_b_buf);
        for (int64_t j = mine.begin; j < mine.end; ++j) c.grad_bias[j] = F(0);
        for (int64_t r = 0; r < TB; ++r)
            for (int64_t j = mine.begin; j < mine.end; ++j) c.grad_bias[j] += grad_a.get()[r * ld + j];
    });
    return status;
}

}  // namespace

// run(Plain<F>{}) or, for precision bf16 (float only: the bindings refuse float64), run(Bf16{}).
template <typename F, typename Run>
inline Status with_products(Precision precision, const Run& run) {
    if constexpr (std::is_same_v<F, float>)
        if (precision == Precision::bf16) return run(Bf16{});
    return run(Plain<F>{});
}

template <typename F>
Status forward(const Forward<F>& call) {
    return with_activation(call.options.activation, [&](auto act) {
        return with_products<F>(call.options.precision,
                                [&](auto p) { return forward_pass<F, decltype(act), decltype(p)>(call); });
    });
}

template <typename F>
Status backward(const Backward<F>& call) {
    return with_activation(call.options.activation, [&](auto act) {
        return with_products<F>(call.options.precision,
                                [&](auto p) { return backward_pass<F, decltype(act), decltype(p)>(call); });
    });
}

#define PYRNN_INSTANTIATE(F)                           \
    template Status forward(const Forward<F>&);        \
    template Status backward(const Backward<F>&);      \
    template void tanh(const F*, F*, int64_t);
PYRNN_INSTANTIATE(float)
PYRNN_INSTANTIATE(double)

}  // namespace PYRNN_ISA
}  // namespace pyrnn

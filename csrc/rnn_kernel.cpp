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
// of NR-wide column panels (of the output in each product but the weight gradients, whose rows
// it owns, in whole register tiles; and of H in the recurrence when its
// steps are big enough to share; else thread 0 runs them) and sums every element it owns in the
// same order whatever the thread count, so results are bitwise identical across thread counts.
// Shared steps are separated by one barrier each. Nothing is allocated inside the loops.
// φ is a policy (activation.h) the passes are templated on; the call's struct (rnn.h) picks it.
// So is the arithmetic of the products (P: gemm.h's Plain, or bf16.h's Bf16 for precision bf16,
// where the operands of every product are rounded to bf16 once: weights as they are packed, x once
// per call, h_{t-1} and dL/da in the epilogue of the step that makes them).
#include <cstring>
#include <type_traits>
#include <vector>

#include "activation.h"
#include "bf16.h"
#include "gemm.h"
#include "kernels.h"
#include "scratch.h"
#include "threads.h"

namespace pyrnn {
namespace PYRNN_ISA {
namespace {

// Scratch memory for one call (scratch.h: kept for the next call), 64-byte aligned; none (null)
// for n = 0, which costs nothing (a block costs two locks of the kept blocks' list).
template <typename F>
class Scratch {
  public:
    explicit Scratch(int64_t n) : block_(n > 0 ? acquire_scratch(size_t(n) * sizeof(F)) : ScratchBlock{nullptr, 0}) {}
    ~Scratch() {
        if (block_.data) release_scratch(block_);
    }
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

// Thread `tid` of `nt`'s share [begin, end) of [0, n): whole units, in order.
struct Range {
    int64_t begin, end;
    Range(int64_t n, int64_t unit, int tid, int nt)
        : begin(min64(n, ceil_div(n, unit) * tid / nt * unit)), end(min64(n, ceil_div(n, unit) * (tid + 1) / nt * unit)) {}
};

// The columns [begin, end) of an n-column output that thread `tid` of `nt` owns: whole NR panels.
template <typename F>
struct Columns {
    int64_t begin, end;
    Columns(int64_t n, int tid, int nt) {
        const Range share(n, Tile<F>::NR, tid, nt);
        begin = share.begin, end = share.end;
    }
    int64_t panels() const { return ceil_div(end - begin, Tile<F>::NR); }
    // The first column of the i-th of these panels, counted from the last if `backwards`.
    int64_t panel(int64_t i, bool backwards) const {
        return begin + (backwards ? panels() - 1 - i : i) * Tile<F>::NR;
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

// Whether recurrent step `step` visits its panels of weight_hh backwards: on odd steps when B <= 2.
// At one or two rows a step reads the packed panels (H² elements, 64 KiB at H = 128 float32) faster
// than L2 delivers them, and they outgrow L1 (48 KiB) from H ≈ 110 up: read in one order every
// step, each panel has been evicted (LRU) just before it is read again, while in alternate orders a
// step begins with the panels the last one ended with, still in L1. The order changes no sum
// (panels are separate columns). Measured at H = 128, float32, 1 thread (loaded machine), ns per
// step: B = 1 forward 660 -> 567, backward 1040 -> 826; B = 2 1295 -> 1111 and 1870 -> 1619; at
// B = 1, H = 256 5-7 % faster. From B = 4 up the steps are not bound by L2 and alternating
// measured no faster (3-7 % slower in some runs).
inline bool panels_backwards(int64_t B, int64_t step) { return B <= 2 && step % 2 != 0; }

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

// How a layer of a stack runs inside the stack's call; a single-layer call has the defaults.
// Its time order, masks, and the point-to-point signals with the layers it reads and feeds.
template <typename F>
struct LayerForward {
    bool reverse = false;                  // row b's step s is time step_time(s, b)
    Rows<const F> input_mask{nullptr, 0};  // the input is x ⊙ mask (rows as x's)
    const Progress* input_ready = nullptr;  // steps of x written so far (x is the layer below's output)
    Progress* done = nullptr;               // steps of output written so far
};

template <typename F>
struct LayerBackward {
    bool reverse = false;
    Rows<const F> input_mask{nullptr, 0};     // the forward's input was x ⊙ mask
    Rows<const F> grad_output_2{nullptr, 0};  // added to grad_output (the layer above's other direction)
    Rows<const F> output_mask{nullptr, 0};    // then ⊙ mask: the layer above read output ⊙ mask
    const Progress* grad_output_ready = nullptr;  // steps of grad_output written so far, from T - 1 down
    Progress* grad_x_done = nullptr;              // steps of grad_x written so far, from T - 1 down
};

// The time of row b's step s: s, or in the reverse direction the row's own steps backwards
// (docs/design.md §1: step 0 reads time lengths[b] - 1); padding steps stay where they are.
inline int64_t step_time(bool reverse, const int64_t* lengths, int64_t T, int64_t s, int64_t b) {
    if (!reverse) return s;
    const int64_t n = length(lengths, T, b);
    return s < n ? n - 1 - s : s;
}

// Steps per chunk of a layer that runs behind another (a stack's wavefront): its input product
// (forward) or grad_x product (backward) runs a chunk at a time. >= 96 rows keeps that product
// efficient; the lag between successive layers is one chunk.
inline int64_t chunk_steps(int64_t B) { return ceil_div(96, max64(B, 1)); }

template <typename F, typename Act, typename P>
Status forward_pass(const Forward<F>& c, const LayerForward<F>& w = {}) {
    using S = typename P::Stored;
    constexpr int MR = block_rows<P>, NR = Tile<F>::NR;
    const int64_t T = c.T, B = c.B, I = c.I, H = c.H;
    const std::atomic<bool>* stop = c.options.stop;
    const Plan plan = plan_threads<F>(c.options.max_threads, T, B, I, H);
    const int64_t panels = ceil_div(H, NR);
    Scratch<S> packed_whh(panels * P::panel_size(H));  // weight_hhᵀ in NR-column panels
    // h_{t-1} and h_t (B×H, row-major). Not output itself: a padding row's state is carried
    // while its output is 0.
    const int64_t ld = row_stride<F>(H);
    Scratch<F> states(2 * B * ld);
    // The input product covers every step at once, or a chunk at a time behind the layer below.
    // It reads x, or x ⊙ mask, and that rounded when P rounds: its rows are prepared first.
    const int64_t chunk = w.input_ready ? chunk_steps(B) : max64(T, 1);
    Scratch<F> masked_x(w.input_mask.data ? T * B * I : 0);
    const Rows<const F> input = w.input_mask.data ? Rows<const F>{masked_x.get(), I} : c.x;
    const bool prepare = w.input_mask.data || Operand<F, P>::rounded;
    Operand<F, P> x_operand(input.data, input.stride, T * B, I), state_operand(states.get(), ld, 2 * B, H);
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
        // Rows [r0, r1) of the input product's operand: x ⊙ input_mask, rounded when P rounds.
        const auto prepare_input = [&](int64_t r0, int64_t r1) {
            for (int64_t r = r0; r < r1; ++r) {
                if (w.input_mask.data) {
                    const F *xr = c.x.row(r), *m = w.input_mask.row(r);
                    for (int64_t i = 0; i < I; ++i) masked_x.get()[r * I + i] = xr[i] * m[i];
                }
                x_operand.update(r, 0, input.row(r), I);
            }
        };
        // output rows of steps [t0, t1) <- x·weight_ihᵀ + bias, on columns `cols`
        const auto input_product = [&](int64_t t0, int64_t t1, const Columns<F>& cols) {
            gemm<P>((t1 - t0) * B, cols.begin, cols.end, I,
                    View<S>{x_operand.rows + t0 * B * x_operand.ld, x_operand.ld, 1}, View<F>{c.weight_ih, 1, I},
                    c.bias, c.output.row(t0 * B), c.output.stride, pack_b_buf, stop);
        };

        P::pack(H, steps.end - steps.begin, View<F>{c.weight_hh + steps.begin * H, 1, H},
                packed_whh.get() + steps.begin / NR * P::panel_size(H));
        for (int64_t b = 0; b < B; ++b) {
            for (int64_t j = steps.begin; j < steps.end; ++j) states.get()[b * ld + j] = c.h0.row(b)[j];
            state_operand.update(b, steps.begin, states.get() + b * ld + steps.begin, steps.end - steps.begin);
        }
        // 1. output <- x·weight_ihᵀ + bias on my columns, every step at once (its operand
        //    prepared first, each thread a share of the rows).
        if (!w.input_ready) {
            if (prepare) {
                prepare_input(T * B * tid / nt, T * B * (tid + 1) / nt);
                if (barrier.wait(stop)) return stopped();
            }
            input_product(0, T, mine);
        }
        if (barrier.wait(stop)) return stopped();
        if (tid >= step_threads) return;

        // 2. The recurrence. Step t reads all of h_{t-1} (states[t % 2]) and writes my columns
        //    of h_t into output and states[(t + 1) % 2]; one barrier between shared steps, which
        //    also decides whether to stop (alone, thread 0 looks at the flag itself).
        for (int64_t t = 0; t < T; ++t) {
            if (w.input_ready && t % chunk == 0) {  // the next chunk of step 1, on my step columns
                const int64_t t1 = min64(T, t + chunk);
                w.input_ready->wait_for(t1, stop);
                if (step_threads > 1 ? barrier.wait(stop) : Barrier::stop_requested(stop)) return stopped();
                if (prepare) {
                    prepare_input(t * B + (t1 - t) * B * tid / step_threads, t * B + (t1 - t) * B * (tid + 1) / step_threads);
                    if (step_threads > 1) barrier.wait();
                }
                input_product(t, t1, steps);
            } else if (step_threads == 1 && t > 0 && Barrier::stop_requested(stop)) {
                return stopped();
            }
            const F* h_prev = states.get() + (t % 2) * B * ld;
            F* h_next = states.get() + ((t + 1) % 2) * B * ld;
            const int64_t prev = (t % 2) * B, next = ((t + 1) % 2) * B;  // their rows in state_operand
            for (int64_t i = 0; i < steps.panels(); ++i) {
                const int64_t j = steps.panel(i, panels_backwards(B, t)), cols = min64(NR, H - j);
                const S* panel = packed_whh.get() + j / NR * P::panel_size(H);
                for (int64_t b0 = 0; b0 < B; b0 += MR) {
                    const int rows = int(min64(MR, B - b0));
                    const auto out_row = [&](int64_t b) { return c.output.row(step_time(w.reverse, c.lengths, T, t, b) * B + b) + j; };
                    // The input terms the epilogue adds, written by the input product long before
                    // and out of cache since, asked for while the product runs (float32 forward at
                    // large, 1 thread, medians of 3 interleaved processes: 117.7 -> 111.9 ms).
                    for (int r = 0; r < rows; ++r) prefetch_row(out_row(b0 + r), cols);
                    product_rows<P, ALayout::rows>(rows, H, state_operand.rows + (prev + b0) * state_operand.ld,
                                                   state_operand.ld, panel, tile);
                    for (int r = 0; r < rows; ++r) {
                        const int64_t b = b0 + r;
                        F* out = out_row(b);
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
            if (step_threads > 1 && barrier.wait(stop)) return stopped();
            if (w.done && tid == 0) w.done->publish(t + 1);
        }
        const F* h_last = states.get() + (T % 2) * B * ld;
        for (int64_t b = 0; b < B; ++b)
            for (int64_t j = steps.begin; j < steps.end; ++j) c.h_n.row(b)[j] = h_last[b * ld + j];
    });
    return status;
}

template <typename F, typename Act, typename P>
Status backward_pass(const Backward<F>& c, const LayerBackward<F>& w = {}) {
    using S = typename P::Stored;
    constexpr int MR = block_rows<P>, NR = Tile<F>::NR;
    const int64_t T = c.T, B = c.B, I = c.I, H = c.H;
    const std::atomic<bool>* stop = c.options.stop;
    const Plan plan = plan_threads<F>(c.options.max_threads, T, B, I, H);
    const int64_t panels = ceil_div(H, NR), TB = T * B;
    Scratch<S> packed_whh(panels * P::panel_size(H));  // weight_hh in NR-column panels
    // Rows in step order (row s·B + b is row b's step s; time order unless reverse).
    const int64_t ld = row_stride<F>(H);
    // dL/da (row stride ld), 0 on padding. The products read it, or (P rounds) only its rounded
    // copy: then each row is made in a local buffer and rounded into the copy, grad_bias is
    // summed as the rows are made, and the float matrix is never written (its 13 MB of first
    // writes held up the g-chain at large, 5 % of a bf16 backward in round_row's loads; without
    // them the bf16 backward took 0.96× the time at large and 0.87× at medium, paired medians of
    // 8 and 5 interleaved processes on one core).
    constexpr bool rounded = Operand<F, P>::rounded;
    Scratch<F> grad_a(rounded ? 0 : TB * ld);
    Operand<F, P> grad_a_operand(grad_a.get(), ld, TB, H);  // what the products read of it
    // The weight gradients' A is grad_aᵀ, read in place (column-major), except for a policy with
    // tiles of its own (bf16.h on AMX), which want it row-major: then it is transposed once, when
    // the sum over T·B rows is a whole number of tile steps (32).
    const bool transpose_grad_a = block_rows<P> != Tile<F>::MR && TB % 32 == 0;
    Scratch<S> grad_a_t(transpose_grad_a ? H * TB : 0);  // (H, T·B)
    Scratch<F> h_prev(TB * H);   // h_{s-1} of every valid row, 0 on padding
    // x (⊙ input_mask) with padding rows zeroed (a NaN there must not leak), unless x is that already.
    const bool copy_x = c.lengths || c.x.stride != I || w.input_mask.data || w.reverse;
    Scratch<F> x_valid(copy_x ? TB * I : 0);
    const F* x_rows = copy_x ? x_valid.get() : c.x.data;
    // grad_x is computed in step order: in the reverse direction into here, then put in time order.
    Scratch<F> grad_x_steps(w.reverse ? TB * I : 0);
    const Rows<F> grad_x_rows = w.reverse ? Rows<F>{grad_x_steps.get(), I} : c.grad_x;
    // grad_x all at once after the chain, or a chunk at a time for the layer below.
    const int64_t chunk = w.grad_output_ready || w.grad_x_done ? chunk_steps(B) : max64(T, 1);
    const int64_t b_size = max64(pack_b_size<P>(H, I), max64(pack_b_size<P>(TB, I), pack_b_size<P>(TB, H)));
    Scratch<S> per_thread(plan.team * b_size);
    Status status = Status::finished;  // written by thread 0

    in_parallel(plan.team, [&](const int tid, const int nt, Barrier& barrier) {
        S* pack_b_buf = per_thread.get() + tid * b_size;
        const Share<F> share(plan, H, tid, nt);
        const Columns<F>& mine = share.mine, &steps = share.steps;
        const int step_threads = share.step_threads;
        alignas(64) F tile[MR * NR], dy[NR], da_row[NR], bias_part[NR];
        const F no_g[NR] = {};
        const int64_t lda = grad_a_operand.ld;
        const auto time = [&](int64_t s, int64_t b) { return step_time(w.reverse, c.lengths, T, s, b); };
        // grad_x rows of steps [s0, s1) <- grad_a·weight_ih, on columns `cols` of I
        const auto grad_x_product = [&](int64_t s0, int64_t s1, const Columns<F>& cols) {
            gemm<P>((s1 - s0) * B, cols.begin, cols.end, H, View<S>{grad_a_operand.rows + s0 * B * lda, lda, 1},
                    View<F>{c.weight_ih, I, 1}, nullptr, grad_x_rows.row(s0 * B), grad_x_rows.stride, pack_b_buf, stop);
        };

        P::pack(H, steps.end - steps.begin, View<F>{c.weight_hh + steps.begin, H, 1},
                packed_whh.get() + steps.begin / NR * P::panel_size(H));
        for (int64_t s = 0; s < T; ++s)
            for (int64_t b = 0; b < B; ++b) {
                const F* h = s == 0 ? c.h0.row(b) : c.output.row(time(s - 1, b) * B + b);
                const bool ok = valid(c.lengths, s, b);
                for (int64_t j = mine.begin; j < mine.end; ++j) h_prev.get()[(s * B + b) * H + j] = ok ? h[j] : F(0);
            }
        if (copy_x)
            for (int64_t r = TB * tid / nt; r < TB * (tid + 1) / nt; ++r) {
                const int64_t s = r / B, b = r % B, source = time(s, b) * B + b;
                const F *xr = c.x.row(source), *m = w.input_mask.data ? w.input_mask.row(source) : nullptr;
                F* out = x_valid.get() + r * I;
                if (!valid(c.lengths, s, b))
                    for (int64_t i = 0; i < I; ++i) out[i] = F(0);
                else if (m)
                    for (int64_t i = 0; i < I; ++i) out[i] = xr[i] * m[i];
                else
                    for (int64_t i = 0; i < I; ++i) out[i] = xr[i];
            }

        // 1. The g-chain, s = T-1 .. -1: g_s = da_{s+1}·weight_hh (+ grad_h_n where s is the row's
        //    last step; padding rows have da = 0, so g reaches that step unchanged), then
        //    da_s = (g_s + grad_output_s)·φ'(h_s) on valid rows; g_{-1} is grad_h0. When P rounds,
        //    grad_bias sums da as it is made: per tile of rows in row order, then step by step from
        //    T - 1 down, each column by the thread whose panel it is (an order no thread count
        //    changes). Shared steps end in a barrier that also decides whether to stop; alone,
        //    thread 0 looks itself.
        if constexpr (rounded)
            for (int64_t j = steps.begin; j < steps.end; ++j) c.grad_bias[j] = F(0);
        if (tid < step_threads)
            for (int64_t s = T - 1; s >= -1; --s) {
                if (w.grad_output_ready && s >= 0 && (T - 1 - s) % chunk == 0) {  // a chunk begins
                    w.grad_output_ready->wait_for(T - max64(0, s + 1 - chunk), stop);
                    if (step_threads > 1 && barrier.wait(stop)) {
                        if (tid == 0) status = Status::stopped;
                        return;
                    }
                }
                if (step_threads == 1 && Barrier::stop_requested(stop)) break;
                const bool has_next = s + 1 <= T - 1;
                const S* da_next = grad_a_operand.rows + (s + 1) * B * lda;  // read only if has_next
                for (int64_t i = 0; i < steps.panels(); ++i) {
                    const int64_t j = steps.panel(i, panels_backwards(B, s)), cols = min64(NR, H - j);
                    const S* panel = packed_whh.get() + j / NR * P::panel_size(H);
                    for (int64_t b0 = 0; b0 < B; b0 += MR) {
                        const int rows = int(min64(MR, B - b0));
                        // What the epilogue reads, asked for while the product runs (bf16 backward, 1
                        // thread, paired medians of 5 interleaved processes: 0.96x the time at large
                        // and medium).
                        if (s >= 0)
                            for (int64_t b = b0; b < b0 + rows; ++b) {
                                const int64_t row = time(s, b) * B + b;
                                prefetch_row(c.grad_output.row(row) + j, cols);
                                prefetch_row(c.output.row(row) + j, cols);
                            }
                        if (has_next)
                            product_rows<P, ALayout::rows>(rows, H, da_next + b0 * lda, lda, panel, tile);
                        else
                            for (int i = 0; i < MR * NR; ++i) tile[i] = F(0);
                        if constexpr (rounded)
                            for (int k = 0; k < NR; ++k) bias_part[k] = F(0);
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
                            F* da = rounded ? da_row : grad_a.get() + (s * B + b) * ld + j;
                            if (!valid(c.lengths, s, b)) {
                                for (int64_t k = 0; k < cols; ++k) da[k] = F(0);
                                grad_a_operand.update(s * B + b, j, da, cols);
                                continue;
                            }
                            const int64_t row = time(s, b) * B + b;
                            const F* go = c.grad_output.row(row) + j;  // repointed at dy if combined
                            const F* go_2 = w.grad_output_2.data ? w.grad_output_2.row(row) + j : nullptr;
                            const F* mask = w.output_mask.data ? w.output_mask.row(row) + j : nullptr;
                            const F* h = c.output.row(row) + j;
                            if (go_2 || mask) {  // dL/dh_s from above: the two directions' sum, masked
                                for (int64_t k = 0; k < cols; ++k) dy[k] = go[k];
                                if (go_2)
                                    for (int64_t k = 0; k < cols; ++k) dy[k] += go_2[k];
                                if (mask)
                                    for (int64_t k = 0; k < cols; ++k) dy[k] *= mask[k];
                                go = dy;
                            }
                            for (int64_t k = 0; k < cols; ++k)
                                da[k] = Act::gradient(g[k] + (last ? g_end[k] : F(0)) + go[k], h[k]);
                            if constexpr (rounded)
                                for (int64_t k = 0; k < cols; ++k) bias_part[k] += da[k];
                            grad_a_operand.update(s * B + b, j, da, cols);
                        }
                        if (rounded && s >= 0)
                            for (int64_t k = 0; k < cols; ++k) c.grad_bias[j + k] += bias_part[k];
                    }
                }
                if (step_threads > 1 && barrier.wait(stop)) {
                    if (tid == 0) status = Status::stopped;
                    return;
                }
                if (w.grad_x_done && s >= 0 && (s == 0 || (T - s) % chunk == 0)) {  // a chunk ends
                    const int64_t top = T - (T - 1 - s) / chunk * chunk;
                    grad_x_product(s, top, Columns<F>(I, tid, step_threads));
                    if (step_threads > 1) barrier.wait();
                    if (tid == 0) w.grad_x_done->publish(T - s);
                }
            }
        // The products read all of grad_a; after shared steps the last one's barrier said so.
        if (step_threads == 1 && barrier.wait(stop)) {
            if (tid == 0) status = Status::stopped;
            return;
        }

        // 2. The products over all T·B rows, each thread on its own output columns (grad_x) or
        //    rows (the weight gradients, below); every thread reads all of h_prev and x_valid,
        //    which the barrier after the chain has seen written.
        const Columns<F> mine_i(I, tid, nt);
        if (!w.grad_x_done) grad_x_product(0, T, mine_i);
        if (w.reverse)  // my columns of grad_x into time order
            for (int64_t s = 0; s < T; ++s)
                for (int64_t b = 0; b < B; ++b) {
                    const F* from = grad_x_rows.row(s * B + b);
                    F* to = c.grad_x.row(time(s, b) * B + b);
                    for (int64_t i = mine_i.begin; i < mine_i.end; ++i) to[i] = from[i];
                }
        const S* da_rows = grad_a_operand.rows;
        if (transpose_grad_a) {  // my rows of grad_aᵀ, 32 of grad_a at a time (one cache line each)
            for (int64_t r0 = 0; r0 < TB; r0 += 32)
                for (int64_t h = mine.begin; h < mine.end; ++h)
                    for (int64_t r = r0; r < r0 + 32; ++r) grad_a_t.get()[h * TB + r] = da_rows[r * lda + h];
            if (barrier.wait(stop)) {  // every product reads every row
                if (tid == 0) status = Status::stopped;
                return;
            }
        }
        const View<S> da_t = transpose_grad_a ? View<S>{grad_a_t.get(), TB, 1} : View<S>{da_rows, 1, lda};
        // The weight gradients are shared by rows (of H, whole tiles of MR: every element sums in the
        // order it has on one thread), not columns: split by columns, every thread copied all of
        // grad_aᵀ (pack_columns) for half the panels, and at 2 threads (large, float32) these two
        // products ran at 78-80 % of the FMA limit against 90 % on one. Split by rows, whole
        // backward calls at 2 threads ran 1.00x (large), 1.025x (deepbench) and 1.05x (medium) as
        // fast in float32 and 1.03x at large in bf16 (paired medians of 4-5 interleaved
        // processes, Zen 4, 2026-12-04): the rest of the loss at 2 threads is elsewhere.
        const Range my_rows(H, MR, tid, nt);
        if (const int64_t rows = my_rows.end - my_rows.begin; rows > 0) {
            const View<S> my_da_t = da_t.shifted(my_rows.begin, 0);
            gemm<P>(rows, 0, I, TB, my_da_t, View<F>{x_rows, I, 1}, nullptr, c.grad_weight_ih + my_rows.begin * I, I,
                    pack_b_buf, stop);
            gemm<P>(rows, 0, H, TB, my_da_t, View<F>{h_prev.get(), H, 1}, nullptr, c.grad_weight_hh + my_rows.begin * H,
                    H, pack_b_buf, stop);
        }
        if (Barrier::stop_requested(stop)) {  // the products may have been cut short
            if (tid == 0) status = Status::stopped;
            return;
        }
        if constexpr (!rounded) {  // grad_bias from the rows of grad_a
            for (int64_t j = mine.begin; j < mine.end; ++j) c.grad_bias[j] = F(0);
            for (int64_t r = 0; r < TB; ++r)
                for (int64_t j = mine.begin; j < mine.end; ++j) c.grad_bias[j] += grad_a.get()[r * ld + j];
        }
    });
    return status;
}

// A stack's units (layer l, direction d; u = l·D + d) share the call's threads: the directions of
// a layer run at once on different threads with nothing between them; with one direction,
// successive layers run on different threads as a wavefront, layer l's chunk of steps waiting only
// for layer l - 1 to publish that chunk (Progress). A layer reads its input, and writes its output
// and its gradients, through row strides into the stack's buffers: the reversal and the
// concatenation of directions are index arithmetic. Each unit runs on one thread, or on a sub-team
// when there are threads to spare, and its results do not depend on which (the single-layer passes'
// guarantee), so the stack's are bitwise identical across thread counts. Below ~4M multiply-adds
// per unit (the tiny shapes) waking a second thread costs more than it saves.
struct StackPlan {
    int team;      // threads for the stack
    int per_unit;  // each unit's budget (a sub-team from the pool)
};
inline StackPlan plan_stack(int max_threads, int64_t L, int64_t D, int64_t T, int64_t B, int64_t I, int64_t H) {
    const int64_t side_by_side = D == 2 ? 2 : L;  // units that can run at once
    const bool worth = T * B * H * (I + H) >= (int64_t(1) << 22);
    const int team = worth ? int(max64(1, min64(max_threads, side_by_side))) : 1;
    return {team, int(max64(1, max_threads / team))};
}

// The thread of a team of nt that runs unit u: one per direction, or layers in turn.
inline int unit_thread(int64_t u, int64_t L, int64_t D, int nt, bool top_down) {
    const int64_t l = u / D, d = u % D;
    return int((D == 2 ? d : (top_down ? L - 1 - l : l)) % nt);
}

template <typename F, typename Act, typename P>
Status stack_forward_pass(const StackForward<F>& s) {
    const int64_t L = s.L, D = s.D, T = s.T, B = s.B, I = s.I, H = s.H, DH = D * H, TB = T * B;
    const StackPlan plan = plan_stack(s.options.max_threads, L, D, T, B, I, H);
    std::vector<Progress> done(size_t(L * D));  // steps each unit has written (once per call)
    std::atomic<bool> stopped{false};

    in_parallel(plan.team, [&](const int tid, const int nt, Barrier&) {
        for (int64_t u = 0; u < L * D && !stopped.load(std::memory_order_relaxed); ++u) {
            if (unit_thread(u, L, D, nt, false) != tid) continue;
            const int64_t l = u / D, d = u % D;
            const F* below = s.layer_outputs + (l - 1) * TB * DH;  // layer l - 1's output, if l > 0
            Forward<F> call{T, B, l == 0 ? I : DH, H,
                            l == 0 ? Rows<const F>{s.x, I} : Rows<const F>{below, DH},
                            s.layers[u].weight_ih, s.layers[u].weight_hh, s.layers[u].bias,
                            {s.h0 + u * B * H, H}, s.lengths,
                            {s.layer_outputs + l * TB * DH + d * H, DH}, {s.h_n + u * B * H, H},
                            s.options};
            call.options.max_threads = plan.per_unit;
            LayerForward<F> wiring;
            wiring.reverse = d == 1;
            if (l > 0 && s.dropout_masks) wiring.input_mask = {s.dropout_masks + (l - 1) * TB * DH, DH};
            if (D == 1) {
                if (l > 0) wiring.input_ready = &done[size_t(u - 1)];
                wiring.done = &done[size_t(u)];
            } else if (l > 0) {  // a reverse step needs the layer below's every step
                for (int64_t below_d = 0; below_d < D; ++below_d) done[size_t((l - 1) * D + below_d)].wait_for(T, s.options.stop);
            }
            if (forward_pass<F, Act, P>(call, wiring) == Status::stopped || Barrier::stop_requested(s.options.stop))
                stopped = true;
            done[size_t(u)].publish(T);
        }
    });
    return stopped ? Status::stopped : Status::finished;
}

template <typename F, typename Act, typename P>
Status stack_backward_pass(const StackBackward<F>& s) {
    const int64_t L = s.L, D = s.D, T = s.T, B = s.B, I = s.I, H = s.H, DH = D * H, TB = T * B;
    const StackPlan plan = plan_stack(s.options.max_threads, L, D, T, B, I, H);
    // dL/d(input) of every unit above layer 0 (T·B rows of D·H), and of layer 0's reverse direction.
    Scratch<F> grad_inputs((L - 1) * D * TB * DH);
    Scratch<F> grad_x_reverse(D == 2 ? TB * I : 0);
    std::vector<Progress> grad_done(size_t(L * D));  // steps of each unit's grad_x written, from T - 1 down
    std::atomic<bool> stopped{false};
    const auto grad_input = [&](int64_t l, int64_t d) { return grad_inputs.get() + ((l - 1) * D + d) * TB * DH; };

    in_parallel(plan.team, [&](const int tid, const int nt, Barrier&) {
        for (int64_t u = L * D - 1; u >= 0 && !stopped.load(std::memory_order_relaxed); --u) {
            // units top down; within a layer, directions in order (they do not depend on each other)
            const int64_t l = u / D, d = D == 2 ? 1 - u % D : 0, unit = l * D + d;
            if (unit_thread(unit, L, D, nt, true) != tid) continue;
            const bool top = l == L - 1;
            const F* input = l == 0 ? s.x : s.layer_outputs + (l - 1) * TB * DH;
            const int64_t width = l == 0 ? I : DH;
            Rows<F> grad_x = l > 0 ? Rows<F>{grad_input(l, d), DH}
                                   : d == 0 ? Rows<F>{s.grad_x, I} : Rows<F>{grad_x_reverse.get(), I};
            Backward<F> call{T, B, width, H,
                             top ? Rows<const F>{s.grad_output + d * H, DH} : Rows<const F>{grad_input(l + 1, 0) + d * H, DH},
                             {input, width}, s.layers[unit].weight_ih, s.layers[unit].weight_hh,
                             {s.layer_outputs + l * TB * DH + d * H, DH}, {s.h0 + unit * B * H, H},
                             {s.grad_h_n + unit * B * H, H}, s.lengths, grad_x, {s.grad_h0 + unit * B * H, H},
                             s.grads[unit].weight_ih, s.grads[unit].weight_hh, s.grads[unit].bias, s.options};
            call.options.max_threads = plan.per_unit;
            LayerBackward<F> wiring;
            wiring.reverse = d == 1;
            if (l > 0 && s.dropout_masks) wiring.input_mask = {s.dropout_masks + (l - 1) * TB * DH, DH};
            if (!top && s.dropout_masks) wiring.output_mask = {s.dropout_masks + l * TB * DH + d * H, DH};
            if (D == 1) {
                if (!top) wiring.grad_output_ready = &grad_done[size_t(unit + 1)];
                if (l > 0) wiring.grad_x_done = &grad_done[size_t(unit)];
            } else if (!top) {  // a reverse step needs the layer above's every step
                wiring.grad_output_2 = {grad_input(l + 1, 1) + d * H, DH};
                for (int64_t above_d = 0; above_d < D; ++above_d) grad_done[size_t((l + 1) * D + above_d)].wait_for(T, s.options.stop);
            }
            if (backward_pass<F, Act, P>(call, wiring) == Status::stopped || Barrier::stop_requested(s.options.stop))
                stopped = true;
            grad_done[size_t(unit)].publish(T);
        }
        if (D == 2 && !stopped) {  // dL/dx: the forward direction's part plus the reverse one's (my rows)
            for (int64_t d = 0; d < D; ++d) grad_done[size_t(d)].wait_for(T, s.options.stop);
            if (Barrier::stop_requested(s.options.stop)) return;
            for (int64_t r = TB * I * tid / nt; r < TB * I * (tid + 1) / nt; ++r) s.grad_x[r] += grad_x_reverse.get()[r];
        }
    });
    return stopped || Barrier::stop_requested(s.options.stop) ? Status::stopped : Status::finished;
}

}  // namespace

// run(Plain<F>{}) or, for precision bf16 (float only: the bindings refuse float64), run(Bf16{}).
template <typename F, typename Run>
inline Status with_products(Precision precision, const Run& run) {
    if constexpr (std::is_same_v<F, float>)
        if (precision == Precision::bf16) return run(Bf16{});
    return run(Plain<F>{});
}

// pass<Act, P>(call) for the call's activation and precision, chosen once per call.
#define PYRNN_ENTRY_POINT(Call, name, pass)                                                              \
    template <typename F>                                                                                \
    Status name(const Call<F>& call) {                                                                   \
        return with_activation(call.options.activation, [&](auto act) {                                  \
            return with_products<F>(call.options.precision,                                              \
                                    [&](auto p) { return pass<F, decltype(act), decltype(p)>(call); });  \
        });                                                                                              \
    }
PYRNN_ENTRY_POINT(Forward, forward, forward_pass)
PYRNN_ENTRY_POINT(Backward, backward, backward_pass)
PYRNN_ENTRY_POINT(StackForward, stack_forward, stack_forward_pass)
PYRNN_ENTRY_POINT(StackBackward, stack_backward, stack_backward_pass)

#define PYRNN_INSTANTIATE(F)                                     \
    template Status forward(const Forward<F>&);                  \
    template Status backward(const Backward<F>&);                \
    template Status stack_forward(const StackForward<F>&);       \
    template Status stack_backward(const StackBackward<F>&);     \
    template void tanh(const F*, F*, int64_t);
PYRNN_INSTANTIATE(float)
PYRNN_INSTANTIATE(double)

}  // namespace PYRNN_ISA
}  // namespace pyrnn

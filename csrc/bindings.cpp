// pybind11 bindings of the kernel (rnn.h) as pyrnn._cpp.
//
// This module checks everything the kernel relies on (exact dtype, C order, shapes, lengths in
// range) and raises instead of crashing: it is reachable from Python on its own, and pyrnn's
// public functions hand it the caller's arrays as they are, normalising them only when it
// raises. Nothing is copied. The GIL is released while the kernel runs.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include "peak.h"
#include "rnn.h"

namespace py = pybind11;

namespace {

template <typename F>
using Array = py::array_t<F, py::array::c_style>;

// Arguments arrive as Python objects and are matched here rather than by pybind11 overloads:
// pybind11's message for a mismatch prints every argument (1.6 ms for a (50, 16, 64) array), and
// pyrnn.forward/backward call this module with the caller's arrays first, falling back on their
// own normalisation when it raises (pyrnn/_api.py), so a mismatch must be cheap.
template <typename F>
constexpr const char* dtype_name = sizeof(F) == 4 ? "float32" : "float64";

std::string shape_str(const std::vector<py::ssize_t>& shape) {
    std::string s = "(";
    for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
    return s + (shape.size() == 1 ? ",)" : ")");
}

void check_shape(const py::array& a, const char* name, std::initializer_list<py::ssize_t> expected) {
    if (a.ndim() == py::ssize_t(expected.size()) && std::equal(expected.begin(), expected.end(), a.shape()))
        return;
    throw py::value_error(std::string(name) + " has shape " +
                          shape_str({a.shape(), a.shape() + a.ndim()}) + ", expected " +
                          shape_str(expected));
}

// Whether `array` (an ndarray) is aligned to its dtype. NumPy makes views that are not (into a
// byte buffer at an odd offset, or a field of a packed structured array): the kernel's typed
// reads of those are undefined behaviour, and vectorised code may assume the alignment.
bool aligned(py::handle array) {
    return py::detail::check_flags(array.ptr(), py::detail::npy_api::NPY_ARRAY_ALIGNED_);
}

// `object` as a C-contiguous, aligned array of F (no copy), or a TypeError naming it.
template <typename F>
Array<F> array_arg(py::handle object, const char* name) {
    if (!Array<F>::check_(object))
        throw py::type_error(std::string(name) + " must be a C-contiguous " + dtype_name<F> +
                             " array (the dtype of x)");
    if (!aligned(object))
        throw py::type_error(std::string(name) + " is not aligned to its dtype; pass a copy");
    return py::reinterpret_borrow<Array<F>>(object);
}

template <typename F>
Array<F> array_arg(py::handle object, const char* name, std::initializer_list<py::ssize_t> shape) {
    Array<F> array = array_arg<F>(object, name);
    check_shape(array, name, shape);
    return array;
}

// A new C-contiguous array of this shape, or a ValueError where its strides overflow: pybind11
// computes them (itemsize times the later dimensions) before NumPy checks the size, and signed
// overflow is undefined behaviour (an array with a 0 dimension first can have such strides).
template <typename F>
Array<F> new_array(std::initializer_list<py::ssize_t> shape) {
    py::ssize_t stride = sizeof(F);
    for (size_t i = shape.size(); i-- > 1;)
        if (__builtin_mul_overflow(stride, shape.begin()[i], &stride))
            throw py::value_error("array is too big: a result of shape " + shape_str(shape) +
                                  " has strides past the largest byte offset");
    return Array<F>(std::vector<py::ssize_t>(shape));
}

template <typename F>
Array<F> zeros(std::initializer_list<py::ssize_t> shape) {
    Array<F> array = new_array<F>(shape);
    std::fill_n(array.mutable_data(), array.size(), F(0));
    return array;
}

// The same, where None means zeros (no bias, h0 = 0, grad_h_n = 0), as in pyrnn.forward.
template <typename F>
Array<F> optional_arg(py::handle object, const char* name, std::initializer_list<py::ssize_t> shape) {
    if (!object.is_none()) return array_arg<F>(object, name, shape);
    return zeros<F>(shape);
}

// lengths as a pointer into the caller's array (alive for the call), or null for None.
const int64_t* checked_lengths(py::handle object, int64_t T, int64_t B) {
    if (object.is_none()) return nullptr;
    if (!Array<int64_t>::check_(object))
        throw py::type_error("lengths must be None or a C-contiguous int64 array");
    if (!aligned(object)) throw py::type_error("lengths is not aligned to its dtype; pass a copy");
    auto lengths = py::reinterpret_borrow<Array<int64_t>>(object);
    check_shape(lengths, "lengths", {B});
    const int64_t* p = lengths.data();
    for (int64_t b = 0; b < B; ++b)
        if (p[b] < 0 || p[b] > T)
            throw py::value_error("lengths[" + std::to_string(b) + "] = " + std::to_string(p[b]) +
                                  " is outside [0, T=" + std::to_string(T) + "]");
    return p;
}

// (T, B, I, H) from x (T, B, I) and weight_hh (H, H), after checking their ranks.
template <typename F>
std::array<int64_t, 4> dimensions(const Array<F>& x, const Array<F>& weight_hh) {
    if (x.ndim() != 3)
        throw py::value_error("x must be 3-D (T, B, I), got shape " +
                              shape_str({x.shape(), x.shape() + x.ndim()}));
    if (weight_hh.ndim() != 2) throw py::value_error("weight_hh must be 2-D (H, H)");
    check_shape(weight_hh, "weight_hh", {weight_hh.shape(0), weight_hh.shape(0)});
    return {x.shape(0), x.shape(1), x.shape(2), weight_hh.shape(0)};
}

// nonlinearity: "tanh" or "relu" (a Python str), else a ValueError naming it.
pyrnn::Activation activation_arg(py::handle object) {
    if (PyUnicode_Check(object.ptr())) {  // compared in place: no string is made on the fast path
        if (PyUnicode_CompareWithASCIIString(object.ptr(), "tanh") == 0) return pyrnn::Activation::tanh;
        if (PyUnicode_CompareWithASCIIString(object.ptr(), "relu") == 0) return pyrnn::Activation::relu;
    }
    throw py::value_error("nonlinearity must be 'tanh' or 'relu', got " + py::repr(object).cast<std::string>());
}

// precision: "fp32" or "bf16" (a Python str), else a ValueError naming it; bf16 with float64
// arrays is a TypeError (bf16 products exist for float32 only).
template <typename F>
pyrnn::Precision precision_arg(py::handle object) {
    if (PyUnicode_Check(object.ptr())) {
        if (PyUnicode_CompareWithASCIIString(object.ptr(), "fp32") == 0) return pyrnn::Precision::fp32;
        if (PyUnicode_CompareWithASCIIString(object.ptr(), "bf16") == 0) {
            if (sizeof(F) != 4)
                throw py::type_error("precision='bf16' needs float32 arrays, got float64 ones");
            return pyrnn::Precision::bf16;
        }
    }
    throw py::value_error("precision must be 'fp32' or 'bf16', got " + py::repr(object).cast<std::string>());
}

// The rows of a C-contiguous array whose last axis is the row.
template <typename F>
pyrnn::Rows<const F> rows(const Array<F>& a) {
    return {a.data(), a.ndim() > 0 ? a.shape(a.ndim() - 1) : 1};
}
template <typename F>
pyrnn::Rows<F> rows(Array<F>& a) {
    return {a.mutable_data(), a.ndim() > 0 ? a.shape(a.ndim() - 1) : 1};
}

// ---- The GIL released while the kernel runs, and the interpreter's exit (issue 15). ----
//
// A daemon thread may still be inside the kernel when the interpreter exits. CPython before 3.14
// ends a thread that asks for the GIL back once finalization has begun with pthread_exit, whose
// unwinding through a C++ frame that cannot throw (pybind11's gil_scoped_release destructor)
// aborts the whole process. So a thread coming back from the kernel after exit has begun does
// not ask: it sleeps until the process ends (what CPython 3.14 does to such threads itself).
// "Begun" is pyrnn's atexit hook, which runs before finalization: it raises `exiting`, then,
// without the GIL, lets through any thread already past the check (`reacquiring`), so none is
// left between the check and the GIL when finalization starts. The main thread, which is the
// one finalizing, is never stopped (it may call pyrnn from later atexit hooks).
unsigned long main_thread = 0;  // PyThread_get_thread_ident() of threading.main_thread(), at import
std::atomic<bool> exiting{false};
std::atomic<int> reacquiring{0};

class WithoutGil {
public:
    WithoutGil() : state_(PyEval_SaveThread()) {}
    WithoutGil(const WithoutGil&) = delete;
    WithoutGil& operator=(const WithoutGil&) = delete;
    ~WithoutGil() {
        reacquiring.fetch_add(1);
        if (exiting.load() && PyThread_get_thread_ident() != main_thread) {
            reacquiring.fetch_sub(1);
            for (;;) std::this_thread::sleep_for(std::chrono::hours(24));
        }
        PyEval_RestoreThread(state_);
        reacquiring.fetch_sub(1);
    }

private:
    PyThreadState* state_;
};

void before_exit() {  // atexit, holding the GIL
    exiting.store(true);
    WithoutGil without_gil;
    while (reacquiring.load() > 0) std::this_thread::yield();
}

// ---- Ctrl-C (issue 15): a long call from the main thread stops on SIGINT. ----
//
// Python runs its signal handlers in the main thread only, holding the GIL, between bytecodes:
// a native call of seconds would hold Ctrl-C back until it returns. So a call of more than
// interruptible_work multiply-adds (~5 ms or more), made from the main thread, computes on a
// helper thread while the calling thread waits, the GIL released, and takes the GIL every 10 ms
// to let Python run any pending handler (PyErr_CheckSignals). When one raises (Ctrl-C's
// KeyboardInterrupt), the kernel's stop flag (rnn.h: Options::stop) is set, its threads leave at
// the next step, the helper is joined and the exception propagates; the results are dropped.
// Shorter calls, and calls from other threads (which Python never hands a signal), run on the
// calling thread as before: no thread handoff, no check, nothing on the hot path.
// Why not a C signal handler setting the flag: it would replace Python's (which signal.signal
// may replace in turn), for the whole process, for the length of every call.
constexpr int64_t interruptible_work = int64_t(1) << 27;
constexpr auto signal_check_interval = std::chrono::milliseconds(10);

// run(stop) -> pyrnn::Status runs the kernel with the GIL released; throws what it throws, or the
// exception of a signal handler that stopped it.
template <typename Run>
void run_kernel(double work, const Run& run) {  // a double: huge dimensions could overflow int64
    if (work < interruptible_work || PyThread_get_thread_ident() != main_thread) {
        WithoutGil without_gil;
        run(nullptr);
        return;
    }
    std::atomic<bool> stop{false};
    std::mutex mutex;
    std::condition_variable finished;
    bool done = false, interrupted = false;
    std::exception_ptr error;
    PyThreadState* state = PyEval_SaveThread();
    try {
        std::thread helper([&] {
            try {
                run(&stop);
            } catch (...) {
                error = std::current_exception();
            }
            std::lock_guard<std::mutex> lock(mutex);
            done = true;
            finished.notify_one();
        });
        std::unique_lock<std::mutex> lock(mutex);
        while (!finished.wait_for(lock, signal_check_interval, [&] { return done; })) {
            if (interrupted) continue;
            lock.unlock();
            PyEval_RestoreThread(state);
            interrupted = PyErr_CheckSignals() != 0;  // the handler's exception stays set
            state = PyEval_SaveThread();
            if (interrupted) stop.store(true, std::memory_order_relaxed);
            lock.lock();
        }
        lock.unlock();
        helper.join();
    } catch (const std::system_error&) {  // no thread to be had: compute here, uninterruptibly
        run(nullptr);
    }
    PyEval_RestoreThread(state);
    if (interrupted) throw py::error_already_set();
    if (error) std::rethrow_exception(error);
}

template <typename F>
py::tuple forward(py::handle x_object, py::handle weight_ih_object, py::handle weight_hh_object,
                  py::handle bias_object, py::handle h0_object, py::handle lengths_object,
                  py::handle nonlinearity, py::handle precision) {
    const Array<F> x = array_arg<F>(x_object, "x"), weight_hh = array_arg<F>(weight_hh_object, "weight_hh");
    const auto [T, B, I, H] = dimensions(x, weight_hh);
    const Array<F> weight_ih = array_arg<F>(weight_ih_object, "weight_ih", {H, I}),
                   bias = optional_arg<F>(bias_object, "bias", {H}),
                   h0 = optional_arg<F>(h0_object, "h0", {B, H});
    const int64_t* lens = checked_lengths(lengths_object, T, B);

    Array<F> output = new_array<F>({T, B, H}), h_n = new_array<F>({B, H});
    pyrnn::Forward<F> call{T, B, I, H, rows(x), weight_ih.data(), weight_hh.data(), bias.data(),
                           rows(h0), lens, rows(output), rows(h_n), {}};
    call.options.activation = activation_arg(nonlinearity);
    call.options.precision = precision_arg<F>(precision);
    // No step has any work when B·H = 0, and both results are empty. The kernel is not called:
    // its time loop would still count T steps, and T is unbounded here (x of shape
    // (2**58, 0, 1) holds no bytes).
    if (B == 0 || H == 0) return py::make_tuple(output, h_n);
    run_kernel(double(T) * B * H * (I + H), [&](const std::atomic<bool>* stop) {
        call.options.stop = stop;
        return pyrnn::forward<F>(call);
    });
    return py::make_tuple(output, h_n);
}

template <typename F>
py::tuple backward(py::handle grad_output_object, py::handle x_object, py::handle weight_ih_object,
                   py::handle weight_hh_object, py::handle output_object, py::handle h0_object,
                   py::handle grad_h_n_object, py::handle lengths_object, py::handle nonlinearity,
                   py::handle precision) {
    const Array<F> x = array_arg<F>(x_object, "x"), weight_hh = array_arg<F>(weight_hh_object, "weight_hh");
    const auto [T, B, I, H] = dimensions(x, weight_hh);
    const Array<F> weight_ih = array_arg<F>(weight_ih_object, "weight_ih", {H, I}),
                   output = array_arg<F>(output_object, "output", {T, B, H}),
                   grad_output = array_arg<F>(grad_output_object, "grad_output", {T, B, H}),
                   h0 = optional_arg<F>(h0_object, "h0", {B, H}),
                   grad_h_n = optional_arg<F>(grad_h_n_object, "grad_h_n", {B, H});
    const int64_t* lens = checked_lengths(lengths_object, T, B);
    Array<F> grad_x = new_array<F>({T, B, I}), grad_h0 = new_array<F>({B, H}),
             grad_weight_ih = new_array<F>({H, I}), grad_weight_hh = new_array<F>({H, H}),
             grad_bias = new_array<F>({H});
    pyrnn::Backward<F> call{T, B, I, H, rows(grad_output), rows(x), weight_ih.data(), weight_hh.data(),
                            rows(output), rows(h0), rows(grad_h_n), lens, rows(grad_x), rows(grad_h0),
                            grad_weight_ih.mutable_data(), grad_weight_hh.mutable_data(),
                            grad_bias.mutable_data(), {}};
    call.options.activation = activation_arg(nonlinearity);
    call.options.precision = precision_arg<F>(precision);
    if (B == 0 || H == 0) {  // no step has any work (see forward): every gradient is 0
        for (Array<F>* grad : {&grad_x, &grad_weight_ih, &grad_weight_hh, &grad_bias})
            std::fill_n(grad->mutable_data(), grad->size(), F(0));
        return py::make_tuple(grad_x, grad_h0, grad_weight_ih, grad_weight_hh, grad_bias);
    }
    run_kernel(2.0 * T * B * H * (I + H), [&](const std::atomic<bool>* stop) {
        call.options.stop = stop;
        return pyrnn::backward<F>(call);
    });
    return py::make_tuple(grad_x, grad_h0, grad_weight_ih, grad_weight_hh, grad_bias);
}

template <typename F>
Array<F> tanh(py::handle x_object) {
    const Array<F> x = array_arg<F>(x_object, "x");
    Array<F> y(std::vector<py::ssize_t>(x.shape(), x.shape() + x.ndim()));
    const F* px = x.data();
    F* py_ = y.mutable_data();
    {
        WithoutGil without_gil;
        pyrnn::tanh<F>(px, py_, x.size());
    }
    return y;
}

// The dtype of x picks the kernel; every other array must share it.
py::tuple forward_any(py::handle x, py::handle weight_ih, py::handle weight_hh, py::handle bias,
                      py::handle h0, py::handle lengths, py::handle nonlinearity, py::handle precision) {
    if (Array<float>::check_(x))
        return forward<float>(x, weight_ih, weight_hh, bias, h0, lengths, nonlinearity, precision);
    if (Array<double>::check_(x))
        return forward<double>(x, weight_ih, weight_hh, bias, h0, lengths, nonlinearity, precision);
    throw py::type_error("x must be a C-contiguous float32 or float64 array");
}

py::array tanh_any(py::handle x) {
    if (Array<float>::check_(x)) return tanh<float>(x);
    if (Array<double>::check_(x)) return tanh<double>(x);
    throw py::type_error("x must be a C-contiguous float32 or float64 array");
}

py::tuple backward_any(py::handle grad_output, py::handle x, py::handle weight_ih,
                       py::handle weight_hh, py::handle output, py::handle h0, py::handle grad_h_n,
                       py::handle lengths, py::handle nonlinearity, py::handle precision) {
    if (Array<float>::check_(x))
        return backward<float>(grad_output, x, weight_ih, weight_hh, output, h0, grad_h_n, lengths,
                               nonlinearity, precision);
    if (Array<double>::check_(x))
        return backward<double>(grad_output, x, weight_ih, weight_hh, output, h0, grad_h_n, lengths,
                                nonlinearity, precision);
    throw py::type_error("x must be a C-contiguous float32 or float64 array");
}

// ---- Stacks: L layers × D directions in one call (rnn.h: StackForward, StackBackward). ----

// The layers of a stack, L·D (weight_ih, weight_hh, bias) entries checked against each other and x.
template <typename F>
struct StackLayers {
    int64_t L, H;
    std::vector<Array<F>> arrays;  // held for the call
    std::vector<pyrnn::Weights<F>> weights;
};

template <typename F>
StackLayers<F> stack_layers(py::handle object, int64_t D, int64_t I) {
    if (!py::isinstance<py::list>(object) && !py::isinstance<py::tuple>(object))
        throw py::type_error("layers must be a list of (weight_ih, weight_hh, bias) tuples");
    const auto layers = py::reinterpret_borrow<py::sequence>(object);
    const int64_t n = int64_t(py::len(layers));
    if (n == 0 || n % D != 0)
        throw py::value_error("layers has " + std::to_string(n) + " entries, expected num_layers × " +
                              std::to_string(D) + (D == 2 ? " (bidirectional)" : "") + ", at least one");
    StackLayers<F> stack{n / D, 0, {}, {}};
    for (int64_t u = 0; u < n; ++u) {
        const std::string name = "layers[" + std::to_string(u) + "]";
        const py::object layer = layers[size_t(u)];
        if (!(py::isinstance<py::tuple>(layer) || py::isinstance<py::list>(layer)) || py::len(layer) != 3)
            throw py::type_error(name + " must be a (weight_ih, weight_hh, bias) tuple");
        const auto entry = py::reinterpret_borrow<py::sequence>(layer);
        const std::string weight_hh_name = name + ".weight_hh";
        const Array<F> weight_hh = array_arg<F>(entry[1], weight_hh_name.c_str());
        if (u == 0) {
            if (weight_hh.ndim() != 2) throw py::value_error(weight_hh_name + " must be 2-D (H, H)");
            stack.H = weight_hh.shape(0);
        }
        const int64_t H = stack.H, width = u < D ? I : D * H;  // layer 0 reads x, the others D·H features
        check_shape(weight_hh, weight_hh_name.c_str(), {H, H});
        const Array<F> weight_ih = array_arg<F>(entry[0], (name + ".weight_ih").c_str(), {H, width}),
                       bias = optional_arg<F>(entry[2], (name + ".bias").c_str(), {H});
        stack.weights.push_back({weight_ih.data(), weight_hh.data(), bias.data()});
        stack.arrays.insert(stack.arrays.end(), {weight_ih, weight_hh, bias});
    }
    return stack;
}

int64_t directions_arg(py::handle bidirectional) {
    if (!py::isinstance<py::bool_>(bidirectional)) throw py::type_error("bidirectional must be True or False");
    return bidirectional.cast<bool>() ? 2 : 1;
}

template <typename F>
const F* masks_arg(py::handle object, int64_t L, int64_t T, int64_t B, int64_t DH) {
    if (object.is_none()) return nullptr;
    return array_arg<F>(object, "dropout_masks", {L - 1, T, B, DH}).data();  // the caller holds it
}

template <typename F>
py::tuple stack_forward(py::handle x_object, py::handle layers_object, py::handle h0_object,
                        py::handle lengths_object, py::handle masks_object, py::handle bidirectional,
                        py::handle nonlinearity, py::handle precision) {
    const Array<F> x = array_arg<F>(x_object, "x");
    if (x.ndim() != 3)
        throw py::value_error("x must be 3-D (T, B, I), got shape " + shape_str({x.shape(), x.shape() + x.ndim()}));
    const int64_t T = x.shape(0), B = x.shape(1), I = x.shape(2), D = directions_arg(bidirectional);
    const StackLayers<F> layers = stack_layers<F>(layers_object, D, I);
    const int64_t L = layers.L, H = layers.H;
    const Array<F> h0 = optional_arg<F>(h0_object, "h0", {L * D, B, H});
    const int64_t* lens = checked_lengths(lengths_object, T, B);
    const F* masks = masks_arg<F>(masks_object, L, T, B, D * H);

    Array<F> layer_outputs = new_array<F>({L, T, B, D * H}), h_n = new_array<F>({L * D, B, H});
    pyrnn::StackForward<F> call{L, D, T, B, I, H, x.data(), layers.weights.data(), h0.data(), lens, masks,
                                layer_outputs.mutable_data(), h_n.mutable_data(), {}};
    call.options.activation = activation_arg(nonlinearity);
    call.options.precision = precision_arg<F>(precision);
    if (B == 0 || H == 0) return py::make_tuple(layer_outputs, h_n);  // both empty: see forward
    run_kernel(double(L) * D * T * B * H * (std::max(I, D * H) + H), [&](const std::atomic<bool>* stop) {
        call.options.stop = stop;
        return pyrnn::stack_forward<F>(call);
    });
    return py::make_tuple(layer_outputs, h_n);
}

template <typename F>
py::tuple stack_backward(py::handle grad_output_object, py::handle x_object, py::handle layers_object,
                         py::handle layer_outputs_object, py::handle h0_object, py::handle grad_h_n_object,
                         py::handle lengths_object, py::handle masks_object, py::handle bidirectional,
                         py::handle nonlinearity, py::handle precision) {
    const Array<F> x = array_arg<F>(x_object, "x");
    if (x.ndim() != 3)
        throw py::value_error("x must be 3-D (T, B, I), got shape " + shape_str({x.shape(), x.shape() + x.ndim()}));
    const int64_t T = x.shape(0), B = x.shape(1), I = x.shape(2), D = directions_arg(bidirectional);
    const StackLayers<F> layers = stack_layers<F>(layers_object, D, I);
    const int64_t L = layers.L, H = layers.H;
    const Array<F> grad_output = array_arg<F>(grad_output_object, "grad_output", {T, B, D * H}),
                   layer_outputs = array_arg<F>(layer_outputs_object, "layer_outputs", {L, T, B, D * H}),
                   h0 = optional_arg<F>(h0_object, "h0", {L * D, B, H}),
                   grad_h_n = optional_arg<F>(grad_h_n_object, "grad_h_n", {L * D, B, H});
    const int64_t* lens = checked_lengths(lengths_object, T, B);
    const F* masks = masks_arg<F>(masks_object, L, T, B, D * H);

    Array<F> grad_x = new_array<F>({T, B, I}), grad_h0 = new_array<F>({L * D, B, H});
    py::list grad_layers;
    std::vector<pyrnn::WeightGrads<F>> grads;
    for (int64_t u = 0; u < L * D; ++u) {
        Array<F> weight_ih = new_array<F>({H, u < D ? I : D * H}), weight_hh = new_array<F>({H, H}),
                 bias = new_array<F>({H});
        grads.push_back({weight_ih.mutable_data(), weight_hh.mutable_data(), bias.mutable_data()});
        grad_layers.append(py::make_tuple(weight_ih, weight_hh, bias));
    }
    pyrnn::StackBackward<F> call{L, D, T, B, I, H, grad_output.data(), x.data(), layers.weights.data(),
                                 layer_outputs.data(), h0.data(), grad_h_n.data(), lens, masks,
                                 grad_x.mutable_data(), grad_h0.mutable_data(), grads.data(), {}};
    call.options.activation = activation_arg(nonlinearity);
    call.options.precision = precision_arg<F>(precision);
    if (B == 0 || H == 0) {  // no step has any work (see forward): every gradient is 0
        std::fill_n(grad_x.mutable_data(), grad_x.size(), F(0));
        for (int64_t u = 0; u < L * D; ++u) {
            std::fill_n(grads[u].weight_ih, H * (u < D ? I : D * H), F(0));
            std::fill_n(grads[u].weight_hh, H * H, F(0));
            std::fill_n(grads[u].bias, H, F(0));
        }
        return py::make_tuple(grad_x, grad_h0, grad_layers);
    }
    run_kernel(2.0 * L * D * T * B * H * (std::max(I, D * H) + H), [&](const std::atomic<bool>* stop) {
        call.options.stop = stop;
        return pyrnn::stack_backward<F>(call);
    });
    return py::make_tuple(grad_x, grad_h0, grad_layers);
}

py::tuple stack_forward_any(py::handle x, py::handle layers, py::handle h0, py::handle lengths,
                            py::handle masks, py::handle bidirectional, py::handle nonlinearity,
                            py::handle precision) {
    if (Array<float>::check_(x))
        return stack_forward<float>(x, layers, h0, lengths, masks, bidirectional, nonlinearity, precision);
    if (Array<double>::check_(x))
        return stack_forward<double>(x, layers, h0, lengths, masks, bidirectional, nonlinearity, precision);
    throw py::type_error("x must be a C-contiguous float32 or float64 array");
}

py::tuple stack_backward_any(py::handle grad_output, py::handle x, py::handle layers, py::handle layer_outputs,
                             py::handle h0, py::handle grad_h_n, py::handle lengths, py::handle masks,
                             py::handle bidirectional, py::handle nonlinearity, py::handle precision) {
    if (Array<float>::check_(x))
        return stack_backward<float>(grad_output, x, layers, layer_outputs, h0, grad_h_n, lengths, masks,
                                     bidirectional, nonlinearity, precision);
    if (Array<double>::check_(x))
        return stack_backward<double>(grad_output, x, layers, layer_outputs, h0, grad_h_n, lengths, masks,
                                      bidirectional, nonlinearity, precision);
    throw py::type_error("x must be a C-contiguous float32 or float64 array");
}

}  // namespace

PYBIND11_MODULE(_cpp, m) {
    m.doc() = "pyrnn's native kernel (the 'cpp' backend): RNN forward and BPTT (tanh or relu).";
    using py::arg;
    // No copies: every array must already be C-contiguous with the dtype of x (float32 or
    // float64), else a TypeError, so the caller always knows the kernel saw exactly its arrays.
    m.def("forward", &forward_any, arg("x"), arg("weight_ih"), arg("weight_hh"),
          arg("bias") = py::none(), arg("h0") = py::none(), arg("lengths") = py::none(),
          arg("nonlinearity") = "tanh", arg("precision") = "fp32",
          "(output, h_n) of the RNN over the whole sequence; see pyrnn.forward.");
    m.def("backward", &backward_any, arg("grad_output"), arg("x"), arg("weight_ih"),
          arg("weight_hh"), arg("output"), arg("h0") = py::none(), arg("grad_h_n") = py::none(),
          arg("lengths") = py::none(), arg("nonlinearity") = "tanh", arg("precision") = "fp32",
          "(grad_x, grad_h0, grad_weight_ih, grad_weight_hh, grad_bias) by BPTT; see "
          "pyrnn.backward.");
    m.def("stack_forward", &stack_forward_any, arg("x"), arg("layers"), arg("h0") = py::none(),
          arg("lengths") = py::none(), arg("dropout_masks") = py::none(), arg("bidirectional") = false,
          arg("nonlinearity") = "tanh", arg("precision") = "fp32",
          "(layer_outputs (L, T, B, D·H), h_n (L·D, B, H)) of a whole stack in one call; see "
          "pyrnn.stack_forward.");
    m.def("stack_backward", &stack_backward_any, arg("grad_output"), arg("x"), arg("layers"),
          arg("layer_outputs"), arg("h0") = py::none(), arg("grad_h_n") = py::none(),
          arg("lengths") = py::none(), arg("dropout_masks") = py::none(), arg("bidirectional") = false,
          arg("nonlinearity") = "tanh", arg("precision") = "fp32",
          "(grad_x, grad_h0, [(grad_weight_ih, grad_weight_hh, grad_bias) per layer and direction]) by "
          "BPTT through a whole stack; see pyrnn.stack_backward.");
    m.def("tanh", &tanh_any, arg("x"),
          "Elementwise tanh by the kernel's vectorised approximation (exposed for its tests).");
    main_thread = py::module_::import("threading").attr("main_thread")().attr("ident").cast<unsigned long>();
    py::module_::import("atexit").attr("register")(py::cpp_function(&before_exit));
    // NumPy's C API is looked up now, by the importing thread: looked up on first use, inside a call,
    // it imports numpy's module there, running Python code in our C++ frames, where a daemon thread
    // may be told to exit (see WithoutGil).
    py::detail::npy_api::get();
    pyrnn::isa();  // choose the instruction set now: a bad $PYRNN_ISA fails the import, not a call
    m.def("isa", &pyrnn::isa,
          "Instruction set of the kernel in use: 'avx512amx' (bf16 products on AMX tiles), 'avx512bf16' "
          "(vdpbf16ps), 'avx512', 'avx2' or 'baseline' (these emulate bf16 products); $PYRNN_ISA forces "
          "a lower one.");
    m.def("set_num_threads", &pyrnn::set_num_threads, py::arg("n"),
          "Use at most n threads (pyrnn.set_num_threads calls this).");
    m.def("get_num_threads", &pyrnn::get_num_threads, "The kernel's thread budget.");

    // ---- The CPU's arithmetic limit (peak.h): what `pyrnn bench` reports %peak against. ----
    m.def(
        "peak_loop",
        [](const std::string& precision, int threads, int64_t iterations) {
            WithoutGil without_gil;
            return pyrnn::peak_loop(precision, threads, iterations);
        },
        arg("precision"), arg("threads"), arg("iterations"),
        "Run `iterations` of the peak loop of precision 'fp32' (FMAs) or 'bf16' (vdpbf16ps where the "
        "CPU has it, else FMAs) on each of up to `threads` pool threads; -> FLOP done (time it).");
    m.def("peak_instruction", &pyrnn::peak_instruction, arg("precision"),
          "The instruction peak_loop(precision, ...) runs on this CPU, e.g. 'vdpbf16ps zmm'.");
    // ---- end of the CPU's arithmetic limit ----
}

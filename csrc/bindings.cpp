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
#include <string>
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

template <typename F>
Array<F> zeros(std::initializer_list<py::ssize_t> shape) {
    Array<F> array{std::vector<py::ssize_t>(shape)};
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

    Array<F> output({T, B, H});
    Array<F> h_n({B, H});
    pyrnn::Forward<F> call{T, B, I, H, rows(x), weight_ih.data(), weight_hh.data(), bias.data(),
                           rows(h0), lens, rows(output), rows(h_n), {}};
    call.options.activation = activation_arg(nonlinearity);
    call.options.precision = precision_arg<F>(precision);
    // No step has any work when B·H = 0, and both results are empty. The kernel is not called:
    // its time loop would still count T steps, and T is unbounded here (x of shape
    // (2**58, 0, 1) holds no bytes).
    if (B == 0 || H == 0) return py::make_tuple(output, h_n);
    {
        py::gil_scoped_release release;
        pyrnn::forward<F>(call);
    }
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
    Array<F> grad_x({T, B, I}), grad_h0({B, H}), grad_weight_ih({H, I}), grad_weight_hh({H, H}),
        grad_bias({H});
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
    {
        py::gil_scoped_release release;
        pyrnn::backward<F>(call);
    }
    return py::make_tuple(grad_x, grad_h0, grad_weight_ih, grad_weight_hh, grad_bias);
}

template <typename F>
Array<F> tanh(py::handle x_object) {
    const Array<F> x = array_arg<F>(x_object, "x");
    Array<F> y(std::vector<py::ssize_t>(x.shape(), x.shape() + x.ndim()));
    const F* px = x.data();
    F* py_ = y.mutable_data();
    {
        py::gil_scoped_release release;
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
    m.def("tanh", &tanh_any, arg("x"),
          "Elementwise tanh by the kernel's vectorised approximation (exposed for its tests).");
    pyrnn::isa();  // choose the instruction set now: a bad $PYRNN_ISA fails the import, not a call
    m.def("isa", &pyrnn::isa,
          "Instruction set of the kernel in use: 'avx512bf16' (native bf16 products), 'avx512', 'avx2' "
          "or 'baseline' (these emulate bf16 products); $PYRNN_ISA forces a lower one.");
    m.def("set_num_threads", &pyrnn::set_num_threads, py::arg("n"),
          "Use at most n threads (pyrnn.set_num_threads calls this).");
    m.def("get_num_threads", &pyrnn::get_num_threads, "The kernel's thread budget.");

    // ---- The CPU's arithmetic limit (peak.h): what `pyrnn bench` reports %peak against. ----
    m.def(
        "peak_loop",
        [](const std::string& precision, int threads, int64_t iterations) {
            py::gil_scoped_release release;
            return pyrnn::peak_loop(precision, threads, iterations);
        },
        arg("precision"), arg("threads"), arg("iterations"),
        "Run `iterations` of the peak loop of precision 'fp32' (FMAs) or 'bf16' (vdpbf16ps where the "
        "CPU has it, else FMAs) on each of up to `threads` pool threads; -> FLOP done (time it).");
    m.def("peak_instruction", &pyrnn::peak_instruction, arg("precision"),
          "The instruction peak_loop(precision, ...) runs on this CPU, e.g. 'vdpbf16ps zmm'.");
    // ---- end of the CPU's arithmetic limit ----
}

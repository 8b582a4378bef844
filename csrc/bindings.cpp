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

template <typename F>
py::tuple forward(py::handle x_object, py::handle weight_ih_object, py::handle weight_hh_object,
                  py::handle bias_object, py::handle h0_object, py::handle lengths_object) {
    const Array<F> x = array_arg<F>(x_object, "x"), weight_hh = array_arg<F>(weight_hh_object, "weight_hh");
    const auto [T, B, I, H] = dimensions(x, weight_hh);
    const Array<F> weight_ih = array_arg<F>(weight_ih_object, "weight_ih", {H, I}),
                   bias = optional_arg<F>(bias_object, "bias", {H}),
                   h0 = optional_arg<F>(h0_object, "h0", {B, H});
    const int64_t* lens = checked_lengths(lengths_object, T, B);

    Array<F> output({T, B, H});
    Array<F> h_n({B, H});
    // No step has any work when B·H = 0, and both results are empty. The kernel is not called:
    // its time loop would still count T steps, and T is unbounded here (x of shape
    // (2**58, 0, 1) holds no bytes).
    if (B == 0 || H == 0) return py::make_tuple(output, h_n);
    const F *px = x.data(), *pwi = weight_ih.data(), *pwh = weight_hh.data(), *pb = bias.data(),
            *ph0 = h0.data();
    F *pout = output.mutable_data(), *phn = h_n.mutable_data();
    {
        py::gil_scoped_release release;
        pyrnn::forward<F>(px, pwi, pwh, pb, ph0, lens, pout, phn, T, B, I, H);
    }
    return py::make_tuple(output, h_n);
}

template <typename F>
py::tuple backward(py::handle grad_output_object, py::handle x_object, py::handle weight_ih_object,
                   py::handle weight_hh_object, py::handle output_object, py::handle h0_object,
                   py::handle grad_h_n_object, py::handle lengths_object) {
    const Array<F> x = array_arg<F>(x_object, "x"), weight_hh = array_arg<F>(weight_hh_object, "weight_hh");
    const auto [T, B, I, H] = dimensions(x, weight_hh);
    const Array<F> weight_ih = array_arg<F>(weight_ih_object, "weight_ih", {H, I}),
                   output = array_arg<F>(output_object, "output", {T, B, H}),
                   grad_output = array_arg<F>(grad_output_object, "grad_output", {T, B, H}),
                   h0 = optional_arg<F>(h0_object, "h0", {B, H}),
                   grad_h_n = optional_arg<F>(grad_h_n_object, "grad_h_n", {B, H});
    const int64_t* lens = checked_lengths(lengths_object, T, B);

    if (B == 0 || H == 0)  // no step has any work (see forward): every gradient is 0
        return py::make_tuple(zeros<F>({T, B, I}), zeros<F>({B, H}), zeros<F>({H, I}),
                              zeros<F>({H, H}), zeros<F>({H}));
    Array<F> grad_x({T, B, I}), grad_h0({B, H}), grad_weight_ih({H, I}), grad_weight_hh({H, H}),
        grad_bias({H});
    const F *pgo = grad_output.data(), *px = x.data(), *pwi = weight_ih.data(),
            *pwh = weight_hh.data(), *pout = output.data(), *ph0 = h0.data(),
            *pghn = grad_h_n.data();
    F *pgx = grad_x.mutable_data(), *pgh0 = grad_h0.mutable_data(),
      *pgwi = grad_weight_ih.mutable_data(), *pgwh = grad_weight_hh.mutable_data(),
      *pgb = grad_bias.mutable_data();
    {
        py::gil_scoped_release release;
        pyrnn::backward<F>(pgo, px, pwi, pwh, pout, ph0, pghn, lens, pgx, pgh0, pgwi, pgwh, pgb,
                           T, B, I, H);
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
                      py::handle h0, py::handle lengths) {
    if (Array<float>::check_(x)) return forward<float>(x, weight_ih, weight_hh, bias, h0, lengths);
    if (Array<double>::check_(x)) return forward<double>(x, weight_ih, weight_hh, bias, h0, lengths);
    throw py::type_error("x must be a C-contiguous float32 or float64 array");
}

py::array tanh_any(py::handle x) {
    if (Array<float>::check_(x)) return tanh<float>(x);
    if (Array<double>::check_(x)) return tanh<double>(x);
    throw py::type_error("x must be a C-contiguous float32 or float64 array");
}

py::tuple backward_any(py::handle grad_output, py::handle x, py::handle weight_ih,
                       py::handle weight_hh, py::handle output, py::handle h0, py::handle grad_h_n,
                       py::handle lengths) {
    if (Array<float>::check_(x))
        return backward<float>(grad_output, x, weight_ih, weight_hh, output, h0, grad_h_n, lengths);
    if (Array<double>::check_(x))
        return backward<double>(grad_output, x, weight_ih, weight_hh, output, h0, grad_h_n, lengths);
    throw py::type_error("x must be a C-contiguous float32 or float64 array");
}

}  // namespace

PYBIND11_MODULE(_cpp, m) {
    m.doc() = "pyrnn's native kernel (the 'cpp' backend): tanh RNN forward and BPTT.";
    using py::arg;
    // No copies: every array must already be C-contiguous with the dtype of x (float32 or
    // float64), else a TypeError, so the caller always knows the kernel saw exactly its arrays.
    m.def("forward", &forward_any, arg("x"), arg("weight_ih"), arg("weight_hh"),
          arg("bias") = py::none(), arg("h0") = py::none(), arg("lengths") = py::none(),
          "(output, h_n) of the tanh RNN over the whole sequence; see pyrnn.forward.");
    m.def("backward", &backward_any, arg("grad_output"), arg("x"), arg("weight_ih"),
          arg("weight_hh"), arg("output"), arg("h0") = py::none(), arg("grad_h_n") = py::none(),
          arg("lengths") = py::none(),
          "(grad_x, grad_h0, grad_weight_ih, grad_weight_hh, grad_bias) by BPTT; see "
          "pyrnn.backward.");
    m.def("tanh", &tanh_any, arg("x"),
          "Elementwise tanh by the kernel's vectorised approximation (exposed for its tests).");
    pyrnn::isa();  // choose the instruction set now: a bad $PYRNN_ISA fails the import, not a call
    m.def("isa", &pyrnn::isa,
          "Instruction set of the kernel in use: 'avx512', 'avx2' or 'baseline' ($PYRNN_ISA forces a "
          "lower one).");
    m.def("set_num_threads", &pyrnn::set_num_threads, py::arg("n"),
          "Use at most n threads (pyrnn.set_num_threads calls this).");
    m.def("get_num_threads", &pyrnn::get_num_threads, "The kernel's thread budget.");
}

// pybind11 bindings of the kernel (rnn.h) as pyrnn._cpp.
//
// pyrnn's public functions validate and normalise before calling here, but this module is
// reachable from Python on its own, so it re-checks what the kernel relies on (exact dtype,
// C order, shapes, lengths in range) and raises instead of crashing. The GIL is released
// while the kernel runs.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <string>
#include <vector>

#include "rnn.h"

namespace py = pybind11;

namespace {

template <typename F>
using Array = py::array_t<F, py::array::c_style>;
using Lengths = std::optional<Array<int64_t>>;

std::string shape_str(const std::vector<py::ssize_t>& shape) {
    std::string s = "(";
    for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
    return s + (shape.size() == 1 ? ",)" : ")");
}

void check_shape(const py::array& a, const char* name, const std::vector<py::ssize_t>& expected) {
    const std::vector<py::ssize_t> got(a.shape(), a.shape() + a.ndim());
    if (got != expected)
        throw py::value_error(std::string(name) + " has shape " + shape_str(got) +
                              ", expected " + shape_str(expected));
}

const int64_t* checked_lengths(const Lengths& lengths, int64_t T, int64_t B) {
    if (!lengths) return nullptr;
    check_shape(*lengths, "lengths", {B});
    const int64_t* p = lengths->data();
    for (int64_t b = 0; b < B; ++b)
        if (p[b] < 0 || p[b] > T)
            throw py::value_error("lengths[" + std::to_string(b) + "] = " + std::to_string(p[b]) +
                                  " is outside [0, T=" + std::to_string(T) + "]");
    return p;
}

template <typename F>
py::tuple forward(const Array<F>& x, const Array<F>& weight_ih, const Array<F>& weight_hh,
                  const Array<F>& bias, const Array<F>& h0, const Lengths& lengths) {
    if (x.ndim() != 3) throw py::value_error("x must be 3-D (T, B, I)");
    const int64_t T = x.shape(0), B = x.shape(1), I = x.shape(2);
    if (weight_hh.ndim() != 2) throw py::value_error("weight_hh must be 2-D (H, H)");
    const int64_t H = weight_hh.shape(0);
    check_shape(weight_hh, "weight_hh", {H, H});
    check_shape(weight_ih, "weight_ih", {H, I});
    check_shape(bias, "bias", {H});
    check_shape(h0, "h0", {B, H});
    const int64_t* lens = checked_lengths(lengths, T, B);

    Array<F> output({T, B, H});
    Array<F> h_n({B, H});
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
py::tuple backward(const Array<F>& grad_output, const Array<F>& x, const Array<F>& weight_ih,
                   const Array<F>& weight_hh, const Array<F>& output, const Array<F>& h0,
                   const Array<F>& grad_h_n, const Lengths& lengths) {
    if (x.ndim() != 3) throw py::value_error("x must be 3-D (T, B, I)");
    const int64_t T = x.shape(0), B = x.shape(1), I = x.shape(2);
    if (weight_hh.ndim() != 2) throw py::value_error("weight_hh must be 2-D (H, H)");
    const int64_t H = weight_hh.shape(0);
    check_shape(weight_hh, "weight_hh", {H, H});
    check_shape(weight_ih, "weight_ih", {H, I});
    check_shape(output, "output", {T, B, H});
    check_shape(grad_output, "grad_output", {T, B, H});
    check_shape(h0, "h0", {B, H});
    check_shape(grad_h_n, "grad_h_n", {B, H});
    const int64_t* lens = checked_lengths(lengths, T, B);

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
Array<F> tanh(const Array<F>& x) {
    Array<F> y(std::vector<py::ssize_t>(x.shape(), x.shape() + x.ndim()));
    const F* px = x.data();
    F* py_ = y.mutable_data();
    {
        py::gil_scoped_release release;
        pyrnn::tanh<F>(px, py_, x.size());
    }
    return y;
}

// One overload per dtype. noconvert: a wrong dtype or memory order is a TypeError, never a
// silent copy, so the caller always knows the kernel saw exactly its arrays.
template <typename F>
void bind(py::module_& m) {
    m.def("forward", &forward<F>, py::arg("x").noconvert(), py::arg("weight_ih").noconvert(),
          py::arg("weight_hh").noconvert(), py::arg("bias").noconvert(),
          py::arg("h0").noconvert(), py::arg("lengths").noconvert() = py::none(),
          "(output, h_n) of the tanh RNN over the whole sequence; see pyrnn.forward.");
    m.def("backward", &backward<F>, py::arg("grad_output").noconvert(), py::arg("x").noconvert(),
          py::arg("weight_ih").noconvert(), py::arg("weight_hh").noconvert(),
          py::arg("output").noconvert(), py::arg("h0").noconvert(),
          py::arg("grad_h_n").noconvert(), py::arg("lengths").noconvert() = py::none(),
          "(grad_x, grad_h0, grad_weight_ih, grad_weight_hh, grad_bias) by BPTT; see "
          "pyrnn.backward.");
    m.def("tanh", &tanh<F>, py::arg("x").noconvert(),
          "Elementwise tanh by the kernel's vectorised approximation (exposed for its tests).");
}

}  // namespace

PYBIND11_MODULE(_cpp, m) {
    m.doc() = "pyrnn's native kernel (the 'cpp' backend): tanh RNN forward and BPTT.";
    bind<float>(m);
    bind<double>(m);
    pyrnn::isa();  // choose the instruction set now: a bad $PYRNN_ISA fails the import, not a call
    m.def("isa", &pyrnn::isa,
          "Instruction set of the kernel in use: 'avx512', 'avx2' or 'baseline' ($PYRNN_ISA forces a "
          "lower one).");
    m.def("set_num_threads", &pyrnn::set_num_threads, py::arg("n"),
          "Use at most n threads (pyrnn.set_num_threads calls this).");
    m.def("get_num_threads", &pyrnn::get_num_threads, "The kernel's thread budget.");
}

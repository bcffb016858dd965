#pragma once
// Elementwise operations. Each op is a small struct with its forward and its backward side by side,
// written over Eigen array expressions so the same code runs vectorised on whole tensors.
//
//   unary:  y = f(x)            dx = backward(dy, x, y)
//   binary: out = f(a, b)       da = grad_a(g, a, b), db = grad_b(g, a, b), then summed over the
//                               dimensions a (or b) was broadcast along (numpy rules).
//
// needs_input / needs_output say which values the backward reads, so the tape saves only those.
// The gradient table in docs/GRADIENTS.md lists the same formulas.

#include <algorithm>
#include <cmath>
#include <limits>
#include <numbers>
#include <type_traits>

#include "autodiff/parallel.hpp"
#include "autodiff/tensor.hpp"

namespace autodiff {

// e^x with e^−∞ = 0 exactly. Eigen's vectorised exp clamps its argument, so a −∞ (a masked logit)
// would give ~1e-38 in float and ~1e-308 in double instead of 0, and only in vectorised lanes.
// (Eigen's select() is not vectorised; the kernels' hot rows use detail::exp_shifted_sum, autodiff/detail/simd.hpp.)
template <class X>
auto exact_exp(const X& x) {
    using T = typename X::Scalar;
    return (x == -std::numeric_limits<T>::infinity()).select(T(0), x.exp());
}

// ---- unary ops --------------------------------------------------------------------------------

struct Exp {
    static constexpr const char* name = "exp";
    static constexpr bool needs_input = false, needs_output = true;
    template <class X> auto forward(const X& x) const { return exact_exp(x); }
    template <class G, class X, class Y> auto backward(const G& dy, const X&, const Y& y) const { return dy * y; }
};

struct Log {
    static constexpr const char* name = "log";
    static constexpr bool needs_input = true, needs_output = false;
    template <class X> auto forward(const X& x) const { return x.log(); }
    template <class G, class X, class Y> auto backward(const G& dy, const X& x, const Y&) const { return dy / x; }
};

struct Tanh {
    static constexpr const char* name = "tanh";
    static constexpr bool needs_input = false, needs_output = true;
    template <class X> auto forward(const X& x) const { return x.tanh(); }
    template <class G, class X, class Y> auto backward(const G& dy, const X&, const Y& y) const {
        return dy * (1 - y.square());
    }
};

struct Sigmoid {
    static constexpr const char* name = "sigmoid";
    static constexpr bool needs_input = false, needs_output = true;
    template <class X> auto forward(const X& x) const { return x.logistic(); }
    template <class G, class X, class Y> auto backward(const G& dy, const X&, const Y& y) const {
        return dy * y * (1 - y);
    }
};

struct Relu {
    static constexpr const char* name = "relu";
    static constexpr bool needs_input = true, needs_output = false;
    // select() rather than max(): max(NaN, 0) may drop the NaN, and NaN must propagate.
    template <class X> auto forward(const X& x) const {
        using T = typename X::Scalar;
        return (x < T(0)).select(T(0), x);
    }
    // At a NaN input the gradient passes through (as PyTorch's threshold_backward): never silently zeroed.
    template <class G, class X, class Y> auto backward(const G& dy, const X& x, const Y&) const {
        using T = typename X::Scalar;
        return (x <= T(0)).select(T(0), dy);
    }
};

// torch.nn.functional.gelu's `approximate` argument.
enum class GeluApproximate {
    none,  // exact: x·Φ(x)
    tanh,  // x/2·(1 + tanh(√(2/π)·(x + 0.044715·x³)))
};

// Throws unless `a` is one of the enumerators (a value cast from an integer may be neither).
inline void check_gelu_approximate(std::string_view op, GeluApproximate a) {
    if (a != GeluApproximate::none && a != GeluApproximate::tanh)
        fail(op, "approximate must be GeluApproximate::none or GeluApproximate::tanh, got {}", static_cast<int>(a));
}

namespace detail {
// gelu(x + b) and dy ⊙ gelu′(x + b) over n contiguous values (b: n values, or nullptr for gelu(x)), in
// the library (kernels/activation.cpp): the elementwise Gelu op, the fused bias_gelu and Gelu's scalar
// functions all run this one compiled code, so they agree bitwise (gelu(x + b) and bias_gelu(x, b)
// included) whatever the compiler contracts into FMAs elsewhere. Float runs in vectors, the tail of a
// row in a partly filled vector; double runs the standard library's erf, tanh and exp per element.
template <class T>
void gelu_rows(const T* x, const T* b, T* y, std::int64_t n, GeluApproximate a);
template <class T>
void gelu_backward_rows(const T* dy, const T* x, const T* b, T* dx, std::int64_t n, GeluApproximate a);
// The erf and tanh gelu uses. Float: erf is Eigen's generic_fast_erf_float (|x| clamped to 4, an odd
// degree-13 numerator over an even degree-8 denominator; within 4e-7 of erf, tested), tanh(u) =
// 1 − 2/(1 + e^{2u}) with the kernels' exp (±1 at the ends, correct to float's absolute precision,
// which is what gelu's 1 + tanh needs). Double: std::erf, std::tanh.
float gelu_erf(float x);
double gelu_erf(double x);
float gelu_tanh(float u);
double gelu_tanh(double u);
}  // namespace detail

// GELU, as torch.nn.functional.gelu(approximate='none' | 'tanh'), with torch's constants:
//   y = x·Φ(x), or x/2·(1 + tanh(√(2/π)(x + 0.044715x³)))
//   dy/dx = Φ(x) + x·φ(x), or (1 + t)/2 + x/2·(1 − t²)·√(2/π)(1 + 3·0.044715x²), t = tanh(√(2/π)(x + 0.044715x³))
// The op runs detail::gelu_rows; the scalar functions here are that code on one value.
struct Gelu {
    static constexpr const char* name = "gelu";
    static constexpr bool needs_input = true, needs_output = false;
    GeluApproximate approximate = GeluApproximate::none;

    template <class T> static T erf_of(T x) { return detail::gelu_erf(x); }
    template <class T> static T tanh_of(T u) { return detail::gelu_tanh(u); }
    template <class T>
    static T value(T v, GeluApproximate a) {
        T y;
        detail::gelu_rows(&v, static_cast<const T*>(nullptr), &y, 1, a);
        return y;
    }
    template <class T>
    static T derivative(T v, GeluApproximate a) {
        const T one(1);
        T d;
        detail::gelu_backward_rows(&one, &v, static_cast<const T*>(nullptr), &d, 1, a);
        return d;
    }

    // Row kernels (unary_forward and unary_backward call them instead of an Eigen expression).
    template <class T> void forward_rows(const T* x, T* y, std::int64_t n) const { detail::gelu_rows(x, static_cast<const T*>(nullptr), y, n, approximate); }
    // dx = dy · gelu'(x)
    template <class T> void backward_rows(const T* dy, const T* x, T* dx, std::int64_t n) const {
        detail::gelu_backward_rows(dy, x, static_cast<const T*>(nullptr), dx, n, approximate);
    }
};

struct Abs {
    static constexpr const char* name = "abs";
    static constexpr bool needs_input = true, needs_output = false;
    template <class X> auto forward(const X& x) const { return x.abs(); }
    template <class G, class X, class Y> auto backward(const G& dy, const X& x, const Y&) const { return dy * x.sign(); }
};

struct Neg {
    static constexpr const char* name = "neg";
    static constexpr bool needs_input = false, needs_output = false;
    template <class X> auto forward(const X& x) const { return -x; }
    template <class G, class X, class Y> auto backward(const G& dy, const X&, const Y&) const { return -dy; }
};

// y = x^p for a scalar p.
template <class T>
struct Pow {
    static constexpr const char* name = "pow";
    static constexpr bool needs_input = true, needs_output = false;
    T p;
    // Scalar std::pow: Eigen's vectorised pow trips GCC 12's -Wuninitialized under AVX-512 in user code.
    template <class X> auto forward(const X& x) const {
        return x.unaryExpr([p = p](T v) { return std::pow(v, p); });
    }
    template <class G, class X, class Y> auto backward(const G& dy, const X& x, const Y&) const {
        return dy * x.unaryExpr([p = p](T v) { return p * std::pow(v, p - 1); });
    }
};

// y = s·x for a scalar s (written `x * s`, `s * x` or `x / s`).
template <class T>
struct Scale {
    static constexpr const char* name = "scale";
    static constexpr bool needs_input = false, needs_output = false;
    T s;
    template <class X> auto forward(const X& x) const { return x * s; }
    template <class G, class X, class Y> auto backward(const G& dy, const X&, const Y&) const { return dy * s; }
};

// y = x + c for a scalar c (written `x + c`, `c + x` or `x - c`).
template <class T>
struct Shift {
    static constexpr const char* name = "shift";
    static constexpr bool needs_input = false, needs_output = false;
    T c;
    template <class X> auto forward(const X& x) const { return x + c; }
    template <class G, class X, class Y> auto backward(const G& dy, const X&, const Y&) const { return dy; }
};

// ---- binary ops (numpy broadcasting) ------------------------------------------------------------
// `sign_a`/`sign_b` mark ops whose gradients are ±g: their backward only reduces g, never reads a or b.

struct Add {
    static constexpr const char* name = "add";
    static constexpr int sign_a = 1, sign_b = 1;
    template <class A, class B> auto forward(const A& a, const B& b) const { return a + b; }
};

struct Sub {
    static constexpr const char* name = "sub";
    static constexpr int sign_a = 1, sign_b = -1;
    template <class A, class B> auto forward(const A& a, const B& b) const { return a - b; }
};

struct Mul {
    static constexpr const char* name = "mul";
    template <class A, class B> auto forward(const A& a, const B& b) const { return a * b; }
    template <class G, class A, class B> auto grad_a(const G& g, const A&, const B& b) const { return g * b; }
    template <class G, class A, class B> auto grad_b(const G& g, const A& a, const B&) const { return g * a; }
};

struct Div {
    static constexpr const char* name = "div";
    template <class A, class B> auto forward(const A& a, const B& b) const { return a / b; }
    template <class G, class A, class B> auto grad_a(const G& g, const A&, const B& b) const { return g / b; }
    template <class G, class A, class B> auto grad_b(const G& g, const A& a, const B& b) const {
        return -g * a / (b * b);
    }
};

template <class Op>
inline constexpr bool is_linear_binary_v = requires { Op::sign_a; };

// ---- kernels ----------------------------------------------------------------------------------

namespace detail {
inline constexpr std::int64_t elementwise_chunk = 1 << 14;

// Calls fn(row) with the row as an Eigen array: a view when contiguous, a broadcast constant otherwise.
template <class T, class Fn>
void with_row(const T* p, std::int64_t n, bool contiguous, Fn&& fn) {
    if (contiguous)
        fn(ConstArrayMap<T>(p, n));
    else
        fn(Eigen::Array<T, Eigen::Dynamic, 1>::Constant(n, *p));
}

// Iterates the rows (last dimension) of `out`, handing fn the matching rows of the operands, each
// broadcast to out's shape: fn(out_row_offset, row_length, operand_rows, operand_is_contiguous).
template <class T, std::size_t N, class Fn>
void for_each_broadcast_row(const Shape& out, const std::array<const Tensor<T>*, N>& in, Fn&& fn) {
    const auto po = out.padded();
    std::array<std::array<std::int64_t, max_rank>, N> strides;
    for (std::size_t k = 0; k < N; ++k) strides[k] = in[k]->shape().broadcast_strides();
    const std::int64_t len = po[3];
    const std::int64_t rows = po[0] * po[1] * po[2];
    parallel_for(rows, len, [&](std::int64_t r) {
        const std::int64_t i2 = r % po[2], i1 = r / po[2] % po[1], i0 = r / (po[2] * po[1]);
        std::array<const T*, N> ptr;
        std::array<bool, N> contiguous;
        for (std::size_t k = 0; k < N; ++k) {
            ptr[k] = in[k]->data() + i0 * strides[k][0] + i1 * strides[k][1] + i2 * strides[k][2];
            contiguous[k] = strides[k][3] != 0 || len == 1;
        }
        fn(r * len, len, ptr, contiguous);
    });
}
}  // namespace detail

// y = op(x), elementwise.
template <class T, class Op>
Tensor<T> unary_forward(const Op& op, const Tensor<T>& x) {
    Tensor<T> y(x.shape());
    parallel_chunks(x.numel(), detail::elementwise_chunk, [&](std::int64_t b, std::int64_t e) {
        if constexpr (requires { op.forward_rows(x.data(), y.data(), b); }) op.forward_rows(x.data() + b, y.data() + b, e - b);
        else ArrayMap<T>(y.data() + b, e - b) = op.forward(ConstArrayMap<T>(x.data() + b, e - b));
    });
    return y;
}

// dx = op.backward(dy, x, y); x or y may be undefined when the op does not need it.
template <class T, class Op>
Tensor<T> unary_backward(const Op& op, const Tensor<T>& dy, const Tensor<T>& x, const Tensor<T>& y) {
    Tensor<T> dx(dy.shape());
    parallel_chunks(dy.numel(), detail::elementwise_chunk, [&](std::int64_t b, std::int64_t e) {
        const std::int64_t n = e - b;
        if constexpr (requires { op.backward_rows(dy.data(), x.data(), dx.data(), n); }) {
            static_assert(Op::needs_input, "row kernels read the saved input");
            op.backward_rows(dy.data() + b, x.data() + b, dx.data() + b, n);
        } else {
            ConstArrayMap<T> xs(x.defined() ? x.data() + b : nullptr, x.defined() ? n : 0);
            ConstArrayMap<T> ys(y.defined() ? y.data() + b : nullptr, y.defined() ? n : 0);
            ArrayMap<T>(dx.data() + b, n) = op.backward(ConstArrayMap<T>(dy.data() + b, n), xs, ys);
        }
    });
    return dx;
}

// out = op(a, b) with numpy broadcasting; `out_shape` is broadcast_shapes(a, b).
template <class T, class Op>
Tensor<T> binary_forward(const Op& op, const Tensor<T>& a, const Tensor<T>& b, const Shape& out_shape) {
    Tensor<T> out(out_shape);
    if (a.shape() == out_shape && b.shape() == out_shape) {
        parallel_chunks(out.numel(), detail::elementwise_chunk, [&](std::int64_t s, std::int64_t e) {
            ArrayMap<T>(out.data() + s, e - s) =
                op.forward(ConstArrayMap<T>(a.data() + s, e - s), ConstArrayMap<T>(b.data() + s, e - s));
        });
        return out;
    }
    detail::for_each_broadcast_row<T, 2>(out_shape, {&a, &b}, [&](std::int64_t o, std::int64_t n, auto p, auto c) {
        detail::with_row(p[0], n, c[0], [&](const auto& ra) {
            detail::with_row(p[1], n, c[1], [&](const auto& rb) { ArrayMap<T>(out.data() + o, n) = op.forward(ra, rb); });
        });
    });
    return out;
}

// Sums `g` over the dimensions along which a tensor of shape `target` was broadcast to g's shape.
// Each output element is summed in one fixed order (bit-identical for any thread count). When the
// shapes are equal, returns g itself (shared storage).
template <class T>
Tensor<T> reduce_to_shape(const Tensor<T>& g, const Shape& target);

// Gradients of out = op(a, b) with respect to a and b, each reduced to its operand's shape.
//   g (out's shape), a (a_shape), b (b_shape) -> da (a_shape), db (b_shape)
// For linear ops (Add, Sub) a and b are not read and may be undefined: only their shapes matter.
// Pass nullptr for a gradient that is not wanted.
template <class T, class Op>
void binary_backward(const Op& op, const Tensor<T>& g, const Tensor<T>& a, const Tensor<T>& b, const Shape& a_shape,
                     const Shape& b_shape, NoDeduce<Tensor<T>>* da, NoDeduce<Tensor<T>>* db) {
    if constexpr (is_linear_binary_v<Op>) {
        (void)op;
        (void)a;
        (void)b;
        auto signed_reduce = [&](const Shape& s, int sign) {
            Tensor<T> r = reduce_to_shape(g, s);
            return sign > 0 ? r : unary_forward(Neg{}, r);
        };
        if (da) *da = signed_reduce(a_shape, Op::sign_a);
        if (db) *db = signed_reduce(b_shape, Op::sign_b);
    } else {
        auto full_grad = [&](auto grad_of) {
            Tensor<T> full(g.shape());
            detail::for_each_broadcast_row<T, 3>(g.shape(), {&g, &a, &b}, [&](std::int64_t o, std::int64_t n, auto p, auto c) {
                ConstArrayMap<T> rg(p[0], n);
                detail::with_row(p[1], n, c[1], [&](const auto& ra) {
                    detail::with_row(p[2], n, c[2], [&](const auto& rb) { ArrayMap<T>(full.data() + o, n) = grad_of(rg, ra, rb); });
                });
            });
            return full;
        };
        if (da) *da = reduce_to_shape(full_grad([&](const auto& rg, const auto& ra, const auto& rb) { return op.grad_a(rg, ra, rb); }), a_shape);
        if (db) *db = reduce_to_shape(full_grad([&](const auto& rg, const auto& ra, const auto& rb) { return op.grad_b(rg, ra, rb); }), b_shape);
    }
}

}  // namespace autodiff

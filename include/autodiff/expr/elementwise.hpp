#pragma once
// Elementwise expressions: unary functions, scalar scale/shift, and binary + - * / with numpy
// broadcasting (add_bias is + with the check that the bias broadcasts into the scores' shape).
// The op structs and their derivatives are in kernels/elementwise.hpp.

#include <cmath>
#include <concepts>

#include "autodiff/expr/variable.hpp"
#include "autodiff/kernels/elementwise.hpp"

namespace autodiff {

template <class Op, class C>
struct Unary : Expr<Unary<Op, C>> {
    using value_type = typename C::value_type;
    static constexpr bool may_require_grad = C::may_require_grad;
    Op op;
    C child;
    Unary(Op o, C c) : op(o), child(std::move(c)) {}
    [[nodiscard]] const Shape& shape() const { return child.shape(); }
};

template <class Op, class C>
struct Evaluator<Unary<Op, C>> {
    using T = typename C::value_type;
    // y = op(x) ; dx = op.backward(dy, x, y)
    static Value<T> eval(const Unary<Op, C>& e, EvalContext& ctx) {
        Value<T> x = evaluate(e.child, ctx);
        Tensor<T> y = unary_forward(e.op, x.value);
        auto backward = [op = e.op, xt = x.target, X = Saved<T>(Op::needs_input ? x.value : Tensor<T>()),
                         Y = Saved<T>(Op::needs_output ? y : Tensor<T>())](const Tensor<T>& dy, Tape& tape) {
            tape.accumulate(xt, unary_backward(op, dy, X.get(Op::name, "input"), Y.get(Op::name, "output")));
        };
        return finish(ctx, std::move(y), static_cast<bool>(x.target), std::move(backward));
    }
};

template <class Op, class L, class R>
struct Binary : Expr<Binary<Op, L, R>> {
    using value_type = typename L::value_type;
    static constexpr bool may_require_grad = any_may_require_grad_v<L, R>;
    L lhs;
    R rhs;
    Shape shape_;
    Binary(L l, R r) : lhs(std::move(l)), rhs(std::move(r)), shape_(broadcast_shapes(Op::name, lhs.shape(), "lhs", rhs.shape(), "rhs")) {}
    [[nodiscard]] const Shape& shape() const { return shape_; }
};

template <class Op, class L, class R>
struct Evaluator<Binary<Op, L, R>> {
    using T = typename L::value_type;
    // out = op(a, b) ; da, db = op.grad_a/grad_b, summed over broadcast dimensions
    static Value<T> eval(const Binary<Op, L, R>& e, EvalContext& ctx) {
        Value<T> a = evaluate(e.lhs, ctx);
        Value<T> b = evaluate(e.rhs, ctx);
        Tensor<T> out = binary_forward(Op{}, a.value, b.value, e.shape());
        // Linear ops need only the operands' shapes: do not keep (possibly L×L) values alive.
        constexpr bool keep = !is_linear_binary_v<Op>;
        auto backward = [at = a.target, bt = b.target, as = a.value.shape(), bs = b.value.shape(),
                         A = Saved<T>(keep ? a.value : Tensor<T>()), B = Saved<T>(keep ? b.value : Tensor<T>())](const Tensor<T>& g,
                                                                                                                 Tape& tape) {
            Tensor<T> da, db;
            binary_backward(Op{}, g, A.get(Op::name, "lhs"), B.get(Op::name, "rhs"), as, bs, at ? &da : nullptr, bt ? &db : nullptr);
            if (at) tape.accumulate(at, std::move(da));
            if (bt) tape.accumulate(bt, std::move(db));
        };
        return finish(ctx, std::move(out), a.target || b.target, std::move(backward));
    }
};

// ---- builders -----------------------------------------------------------------------------------

namespace detail {
template <class Op, class X>
auto unary(const Op& op, const X& x) {
    return Unary<Op, expr_t<X>>(op, as_expr(x));
}
template <class Op, class A, class B>
auto binary(const A& a, const B& b) {
    static_assert(same_value_type_v<A, B>, "autodiff: both operands of + - * / must have the same value type (float or double)");
    return Binary<Op, expr_t<A>, expr_t<B>>(as_expr(a), as_expr(b));
}
template <class T, class S>
T finite_scalar(const char* op, const char* what, S s) {
    const T v = static_cast<T>(s);
    if (!std::isfinite(v)) fail(op, "{} must be finite, got {}", what, v);
    return v;
}
}  // namespace detail

template <class S>
concept Scalar = std::is_arithmetic_v<S>;

template <ExprLike X> auto exp(const X& x) { return detail::unary(Exp{}, x); }
template <ExprLike X> auto log(const X& x) { return detail::unary(Log{}, x); }
template <ExprLike X> auto tanh(const X& x) { return detail::unary(Tanh{}, x); }
template <ExprLike X> auto sigmoid(const X& x) { return detail::unary(Sigmoid{}, x); }
template <ExprLike X> auto relu(const X& x) { return detail::unary(Relu{}, x); }
template <ExprLike X> auto gelu(const X& x) { return detail::unary(Gelu{}, x); }
// gelu(x, GeluApproximate::tanh): torch.nn.functional.gelu(x, approximate='tanh'); ::none is gelu(x).
template <ExprLike X> auto gelu(const X& x, GeluApproximate approximate) {
    check_gelu_approximate("gelu", approximate);
    return detail::unary(Gelu{approximate}, x);
}
template <ExprLike X> auto abs(const X& x) { return detail::unary(Abs{}, x); }
template <ExprLike X> auto neg(const X& x) { return detail::unary(Neg{}, x); }
template <Operand X> auto operator-(const X& x) { return detail::unary(Neg{}, x); }
template <ExprLike X, Scalar S> auto pow(const X& x, S p) {
    using T = value_type_t<X>;
    return detail::unary(Pow<T>{detail::finite_scalar<T>("pow", "exponent", p)}, x);
}

template <Operand X, Scalar S> auto operator*(const X& x, S s) {
    using T = value_type_t<X>;
    return detail::unary(Scale<T>{detail::finite_scalar<T>("scale", "factor", s)}, x);
}
template <Operand X, Scalar S> auto operator*(S s, const X& x) { return x * s; }
template <Operand X, Scalar S> auto operator/(const X& x, S s) {
    using T = value_type_t<X>;
    const T v = static_cast<T>(s);
    if (v == T(0) || !std::isfinite(v)) fail("scale", "divisor must be finite and non-zero, got {}", v);
    return detail::unary(Scale<T>{T(1) / v}, x);
}
template <Operand X, Scalar S> auto operator+(const X& x, S c) {
    using T = value_type_t<X>;
    return detail::unary(Shift<T>{detail::finite_scalar<T>("shift", "constant", c)}, x);
}
template <Operand X, Scalar S> auto operator+(S c, const X& x) { return x + c; }
template <Operand X, Scalar S> auto operator-(const X& x, S c) { return x + (-c); }
template <Operand X, Scalar S> auto operator-(S c, const X& x) { return (-x) + c; }

template <ExprLike A, ExprLike B> requires(Operand<A> || Operand<B>)
auto operator+(const A& a, const B& b) { return detail::binary<Add>(a, b); }
template <ExprLike A, ExprLike B> requires(Operand<A> || Operand<B>)
auto operator-(const A& a, const B& b) { return detail::binary<Sub>(a, b); }
template <ExprLike A, ExprLike B> requires(Operand<A> || Operand<B>)
auto operator*(const A& a, const B& b) { return detail::binary<Mul>(a, b); }
template <ExprLike A, ExprLike B> requires(Operand<A> || Operand<B>)
auto operator/(const A& a, const B& b) { return detail::binary<Div>(a, b); }

// scores + bias, where the bias (any numpy-broadcastable shape: (Lk), (Lq,Lk), (h,Lq,Lk),
// (n,1,Lq,Lk), (1,h,1,Lk), ...) must broadcast into the scores' shape without enlarging it.
// Its gradient is summed back to the bias's own shape in a fixed order.
template <ExprLike S, ExprLike B>
auto add_bias(const S& scores, const B& bias) {
    const Shape ss = as_expr(scores).shape();
    const Shape bs = as_expr(bias).shape();
    if (!broadcasts_to(bs, ss)) fail("add_bias", "bias {} does not broadcast to the scores {}", bs, ss);
    return detail::binary<Add>(scores, bias);
}

}  // namespace autodiff

#pragma once
// layer_norm(x, normalized_shape, weight, bias, eps) and rms_norm(x, normalized_shape, weight, eps):
// torch.nn.functional.layer_norm and rms_norm, one tape record each. weight and bias are optional:
// pass ad::none for an absent one. Formulas, saved values and the eps convention are in
// kernels/norm.hpp.
//
//   ad::Var<float> y = ad::layer_norm(x, {E}, gamma, beta);           // eps 1e-5, as torch
//   ad::Var<float> z = ad::rms_norm(x, {E}, gamma, 1e-6);             // eps is explicit here

#include "autodiff/expr/variable.hpp"
#include "autodiff/kernels/norm.hpp"

namespace autodiff {

// An absent optional operand (torch's None): layer_norm(x, s, ad::none, ad::none). It needs no gradient.
struct None : Expr<None> {
    static constexpr bool may_require_grad = false;
};
inline constexpr None none{};

namespace detail {
template <class E>
inline constexpr bool is_none_v = std::is_same_v<std::remove_cvref_t<E>, None>;

template <class E>
const Shape* shape_or_null(const E& e) {
    if constexpr (is_none_v<E>) return nullptr;
    else return &e.shape();
}
// The operand's value, or an undefined tensor for ad::none.
template <class T, class E>
Value<T> evaluate_optional(const E& e, EvalContext& ctx) {
    if constexpr (is_none_v<E>) return {};
    else return evaluate(e, ctx);
}
template <class X, class E>
constexpr bool same_value_type_or_none() {
    if constexpr (is_none_v<E>) return true;
    else return same_value_type_v<X, E>;
}
template <class X, class... Optional>
inline constexpr bool same_value_types_or_none_v = (same_value_type_or_none<X, Optional>() && ...);

template <class T>
T checked_eps(const char* op, const Shape& x, const Shape& normalized_shape, const Shape* w, const Shape* b, double eps) {
    check_norm(op, x, normalized_shape, w, b, eps);
    const T e = static_cast<T>(eps);
    if (!(e > 0)) fail(op, "eps {} rounds to 0 in the input's type", eps);
    return e;
}
}  // namespace detail

template <class X, class W, class B>
struct LayerNorm : Expr<LayerNorm<X, W, B>> {
    using value_type = typename X::value_type;
    static constexpr bool may_require_grad = any_may_require_grad_v<X, W, B>;
    X x;
    W weight;  // None: no weight
    B bias;    // None: no bias
    Shape normalized_shape;
    value_type eps;

    LayerNorm(X x_, Shape ns, W w, B b, double eps_)
        : x(std::move(x_)), weight(std::move(w)), bias(std::move(b)), normalized_shape(ns),
          eps(detail::checked_eps<value_type>("layer_norm", x.shape(), ns, detail::shape_or_null(weight), detail::shape_or_null(bias), eps_)) {}
    [[nodiscard]] const Shape& shape() const { return x.shape(); }
};

// torch.nn.functional.layer_norm(x, normalized_shape, weight, bias, eps): x (..., *normalized_shape);
// weight and bias of normalized_shape, or ad::none.
template <ExprLike X, class W = None, class B = None>
    requires(ExprLike<W> && ExprLike<B>)
auto layer_norm(const X& x, const Shape& normalized_shape, const W& weight = none, const B& bias = none, double eps = 1e-5) {
    static_assert(!detail::is_none_v<X>, "autodiff::layer_norm: the input cannot be ad::none");
    static_assert(detail::same_value_types_or_none_v<X, expr_t<W>, expr_t<B>>,
                  "autodiff::layer_norm: input, weight and bias must have the same value type (float or double)");
    return LayerNorm<expr_t<X>, expr_t<W>, expr_t<B>>(as_expr(x), normalized_shape, as_expr(weight), as_expr(bias), eps);
}

template <class X, class W, class B>
struct Evaluator<LayerNorm<X, W, B>> {
    using T = typename X::value_type;
    // y = (x − mean)·rstd ⊙ w + b ; dx = rstd·(g − mean(g) − x̂·mean(g ⊙ x̂)), dw = Σ dy ⊙ x̂, db = Σ dy   (norm.hpp)
    static Value<T> eval(const LayerNorm<X, W, B>& e, EvalContext& ctx) {
        Value<T> x = evaluate(e.x, ctx);
        Value<T> w = detail::evaluate_optional<T>(e.weight, ctx);
        Value<T> b = detail::evaluate_optional<T>(e.bias, ctx);
        NormForward<T> f = layer_norm_forward(x.value, e.normalized_shape, w.value, b.value, e.eps);
        // mean and rstd are the record's own; x and the weight are checked for writes since (tape.hpp's Saved)
        auto backward = [xt = x.target, wt = w.target, bt = b.target, X_ = Saved<T>(x.value), W_ = Saved<T>(w.value), mean = f.mean,
                         rstd = f.rstd, ns = e.normalized_shape](const Tensor<T>& dy, Tape& tape) {
            Tensor<T> dx, dw, db;
            layer_norm_backward(xt ? &dx : nullptr, wt ? &dw : nullptr, bt ? &db : nullptr, dy, X_.get("layer_norm", "input"),
                                W_.get("layer_norm", "weight"), mean, rstd, ns);
            if (xt) tape.accumulate(xt, std::move(dx));
            if (wt) tape.accumulate(wt, std::move(dw));
            if (bt) tape.accumulate(bt, std::move(db));
        };
        return finish(ctx, std::move(f.y), x.target || w.target || b.target, std::move(backward));
    }
};

template <class X, class W>
struct RmsNorm : Expr<RmsNorm<X, W>> {
    using value_type = typename X::value_type;
    static constexpr bool may_require_grad = any_may_require_grad_v<X, W>;
    X x;
    W weight;  // None: no weight
    Shape normalized_shape;
    value_type eps;

    RmsNorm(X x_, Shape ns, W w, double eps_)
        : x(std::move(x_)), weight(std::move(w)), normalized_shape(ns),
          eps(detail::checked_eps<value_type>("rms_norm", x.shape(), ns, detail::shape_or_null(weight), nullptr, eps_)) {}
    [[nodiscard]] const Shape& shape() const { return x.shape(); }
};

// torch.nn.functional.rms_norm(x, normalized_shape, weight, eps) with eps given explicitly (torch's
// eps=None is std::numeric_limits<T>::epsilon()); weight of normalized_shape, or ad::none.
template <ExprLike X, ExprLike W>
auto rms_norm(const X& x, const Shape& normalized_shape, const W& weight, double eps) {
    static_assert(!detail::is_none_v<X>, "autodiff::rms_norm: the input cannot be ad::none");
    static_assert(detail::same_value_types_or_none_v<X, expr_t<W>>,
                  "autodiff::rms_norm: input and weight must have the same value type (float or double)");
    return RmsNorm<expr_t<X>, expr_t<W>>(as_expr(x), normalized_shape, as_expr(weight), eps);
}

template <class X, class W>
struct Evaluator<RmsNorm<X, W>> {
    using T = typename X::value_type;
    // y = x·rstd ⊙ w ; dx = rstd·(g − x̂·mean(g ⊙ x̂)), dw = Σ dy ⊙ x̂   (norm.hpp)
    static Value<T> eval(const RmsNorm<X, W>& e, EvalContext& ctx) {
        Value<T> x = evaluate(e.x, ctx);
        Value<T> w = detail::evaluate_optional<T>(e.weight, ctx);
        NormForward<T> f = rms_norm_forward(x.value, e.normalized_shape, w.value, e.eps);
        auto backward = [xt = x.target, wt = w.target, X_ = Saved<T>(x.value), W_ = Saved<T>(w.value), rstd = f.rstd,
                         ns = e.normalized_shape](const Tensor<T>& dy, Tape& tape) {
            Tensor<T> dx, dw;
            rms_norm_backward(xt ? &dx : nullptr, wt ? &dw : nullptr, dy, X_.get("rms_norm", "input"), W_.get("rms_norm", "weight"), rstd, ns);
            if (xt) tape.accumulate(xt, std::move(dx));
            if (wt) tape.accumulate(wt, std::move(dw));
        };
        return finish(ctx, std::move(f.y), x.target || w.target, std::move(backward));
    }
};

}  // namespace autodiff

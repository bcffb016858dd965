#pragma once
// sum(x), mean(x) and mse(a, b): scalar (rank-0) results.

#include "autodiff/expr/elementwise.hpp"
#include "autodiff/kernels/reduce.hpp"

namespace autodiff {

template <class C>
struct Sum : Expr<Sum<C>> {
    using value_type = typename C::value_type;
    static constexpr bool may_require_grad = C::may_require_grad;
    C child;
    explicit Sum(C c) : child(std::move(c)) {}
    [[nodiscard]] const Shape& shape() const {
        static const Shape scalar{};
        return scalar;
    }
};

template <ExprLike X>
auto sum(const X& x) {
    return Sum<expr_t<X>>(as_expr(x));
}
template <ExprLike X>
auto mean(const X& x) {
    const std::int64_t n = as_expr(x).shape().numel();
    if (n == 0) fail("mean", "input {} is empty", as_expr(x).shape());
    return sum(x) * (1.0 / static_cast<double>(n));
}

template <class C>
struct Evaluator<Sum<C>> {
    using T = typename C::value_type;
    // s = Σ x ; dx = dy (broadcast)
    static Value<T> eval(const Sum<C>& e, EvalContext& ctx) {
        Value<T> x = evaluate(e.child, ctx);
        return finish(ctx, full<T>({}, sum_forward(x.value)), static_cast<bool>(x.target),
                      [xt = x.target, xs = x.value.shape()](const Tensor<T>& dy, Tape& tape) { tape.accumulate(xt, full<T>(xs, dy.item())); });
    }
};

template <class A, class B>
struct MseLoss : Expr<MseLoss<A, B>> {
    using value_type = typename A::value_type;
    static constexpr bool may_require_grad = any_may_require_grad_v<A, B>;
    A input;
    B target;
    MseLoss(A a, B b) : input(std::move(a)), target(std::move(b)) {
        if (input.shape() != target.shape())
            fail("mse", "input and target must have the same shape, got input {} and target {}", input.shape(), target.shape());
        if (input.shape().numel() == 0) fail("mse", "inputs are empty {}", input.shape());
    }
    [[nodiscard]] const Shape& shape() const {
        static const Shape scalar{};
        return scalar;
    }
};

// mean((input − target)²), like torch.nn.functional.mse_loss.
template <ExprLike A, ExprLike B>
auto mse(const A& input, const B& target) {
    static_assert(same_value_type_v<A, B>, "autodiff::mse: input and target must have the same value type (float or double)");
    return MseLoss<expr_t<A>, expr_t<B>>(as_expr(input), as_expr(target));
}

template <class A, class B>
struct Evaluator<MseLoss<A, B>> {
    using T = typename A::value_type;
    // loss = mean((a − b)²) ; da = dloss·2(a − b)/N, db = −da
    static Value<T> eval(const MseLoss<A, B>& e, EvalContext& ctx) {
        Value<T> a = evaluate(e.input, ctx);
        Value<T> b = evaluate(e.target, ctx);
        return finish(ctx, full<T>({}, mse_loss_forward(a.value, b.value)), a.target || b.target,
                      [at = a.target, bt = b.target, A_ = Saved<T>(a.value), B_ = Saved<T>(b.value)](const Tensor<T>& dy, Tape& tape) {
                          Tensor<T> da, db;
                          mse_loss_backward(at ? &da : nullptr, bt ? &db : nullptr, dy.item(), A_.get("mse", "input"),
                                            B_.get("mse", "target"));
                          if (at) tape.accumulate(at, std::move(da));
                          if (bt) tape.accumulate(bt, std::move(db));
                      });
    }
};

}  // namespace autodiff

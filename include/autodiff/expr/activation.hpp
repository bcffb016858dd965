#pragma once
// bias_gelu(x, b, approximate): the MLP's fused y = gelu(x + b), b (n) broadcast over the rows of
// x (..., n); one tape record instead of an Add and a Gelu, and no x + b kept for the backward
// (kernels/activation.hpp).

#include "autodiff/expr/elementwise.hpp"
#include "autodiff/kernels/activation.hpp"

namespace autodiff {

template <class X, class B>
struct BiasGelu : Expr<BiasGelu<X, B>> {
    using value_type = typename X::value_type;
    static constexpr bool may_require_grad = any_may_require_grad_v<X, B>;
    X x;
    B bias;
    GeluApproximate approximate;

    BiasGelu(X x_, B b, GeluApproximate a) : x(std::move(x_)), bias(std::move(b)), approximate(a) {
        check_bias_gelu("bias_gelu", x.shape(), bias.shape());
        check_gelu_approximate("bias_gelu", approximate);
    }
    [[nodiscard]] const Shape& shape() const { return x.shape(); }
};

// gelu(x + b) as torch.nn.functional.gelu(x + b, approximate='none' | 'tanh'), b of shape (n) for x (..., n).
template <ExprLike X, ExprLike B>
auto bias_gelu(const X& x, const B& b, GeluApproximate approximate = GeluApproximate::none) {
    static_assert(same_value_type_v<X, B>, "autodiff::bias_gelu: input and bias must have the same value type (float or double)");
    return BiasGelu<expr_t<X>, expr_t<B>>(as_expr(x), as_expr(b), approximate);
}

template <class X, class B>
struct Evaluator<BiasGelu<X, B>> {
    using T = typename X::value_type;
    // y = gelu(x + b) ; dx = dy ⊙ gelu'(x + b), db = Σ_rows dx   (activation.hpp)
    static Value<T> eval(const BiasGelu<X, B>& e, EvalContext& ctx) {
        Value<T> x = evaluate(e.x, ctx);
        Value<T> b = evaluate(e.bias, ctx);
        Tensor<T> y = bias_gelu_forward(x.value, b.value, e.approximate);
        auto backward = [xt = x.target, bt = b.target, X_ = Saved<T>(x.value), B_ = Saved<T>(b.value), a = e.approximate](const Tensor<T>& dy,
                                                                                                                      Tape& tape) {
            Tensor<T> dx, db;
            bias_gelu_backward(xt ? &dx : nullptr, bt ? &db : nullptr, dy, X_.get("bias_gelu", "input"), B_.get("bias_gelu", "bias"), a);
            if (xt) tape.accumulate(xt, std::move(dx));
            if (bt) tape.accumulate(bt, std::move(db));
        };
        return finish(ctx, std::move(y), x.target || b.target, std::move(backward));
    }
};

}  // namespace autodiff

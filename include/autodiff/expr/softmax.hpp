#pragma once
// softmax(x, mask, additive) over the last dimension, and dropout(x, descriptor).
// Masks and the fully-masked-row rule are described in kernels/softmax.hpp; dropout's generator in
// kernels/dropout.hpp.

#include "autodiff/expr/variable.hpp"
#include "autodiff/kernels/dropout.hpp"
#include "autodiff/kernels/softmax.hpp"

namespace autodiff {

// No mask function (the default of Softmax's M; mask functions are in expr/modifier.hpp).
struct NoMaskFn {};

template <class C, class M = NoMaskFn>
struct Softmax : Expr<Softmax<C, M>> {
    using value_type = typename C::value_type;
    static constexpr bool may_require_grad = C::may_require_grad;
    C child;
    Mask mask;
    Tensor<value_type> additive;  // undefined: none
    [[no_unique_address]] M mask_fn;  // a mask function of the indices (expr/modifier.hpp), or none

    Softmax(C c, Mask m, Tensor<value_type> add, M fn = {})
        : child(std::move(c)), mask(std::move(m)), additive(std::move(add)), mask_fn(std::move(fn)) {
        check_softmax_mask("softmax", child.shape(), mask, additive);
    }
    [[nodiscard]] const Shape& shape() const { return child.shape(); }
};

// softmax over the last dimension; `mask` keeps keys (ad::causal, ad::key_padding_mask(m),
// ad::keep_mask(m), combined with |); `additive` is added to the logits (-inf masks a key).
template <ExprLike X>
auto softmax(const X& x, const Mask& mask = {}, const Tensor<value_type_t<X>>& additive = {}) {
    return Softmax<expr_t<X>>(as_expr(x), mask, additive);
}

template <class C>
struct Evaluator<Softmax<C>> {
    using T = typename C::value_type;
    // y = softmax(x) ; dx = y ⊙ (dy − rowsum(dy ⊙ y))
    static Value<T> eval(const Softmax<C>& e, EvalContext& ctx) {
        Value<T> x = evaluate(e.child, ctx);
        Tensor<T> y = softmax_forward(x.value, e.mask, e.additive);
        auto backward = [xt = x.target, Y = Saved<T>(y)](const Tensor<T>& dy, Tape& tape) {
            tape.accumulate(xt, softmax_backward(dy, Y.get("softmax", "output")));
        };
        return finish(ctx, std::move(y), static_cast<bool>(x.target), std::move(backward));
    }
};

template <class C>
struct Dropout : Expr<Dropout<C>> {
    using value_type = typename C::value_type;
    static constexpr bool may_require_grad = C::may_require_grad;
    C child;
    DropoutDescriptor desc;

    Dropout(C c, DropoutDescriptor d) : child(std::move(c)), desc(d) { check_dropout("dropout", desc); }
    [[nodiscard]] const Shape& shape() const { return child.shape(); }
};

// Drops each element with probability desc.rate (scaling the rest by 1/(1-rate)) in training;
// the identity when desc.training is false.
template <ExprLike X>
auto dropout(const X& x, const DropoutDescriptor& desc) {
    return Dropout<expr_t<X>>(as_expr(x), desc);
}

template <class C>
struct Evaluator<Dropout<C>> {
    using T = typename C::value_type;
    // y = x·keep/(1-p) ; dx = dy·keep/(1-p), keep regenerated from (seed, offset)
    static Value<T> eval(const Dropout<C>& e, EvalContext& ctx) {
        Value<T> x = evaluate(e.child, ctx);
        return finish(ctx, dropout_forward(e.desc, x.value), static_cast<bool>(x.target),
                      [xt = x.target, d = e.desc](const Tensor<T>& dy, Tape& tape) { tape.accumulate(xt, dropout_backward(d, dy)); });
    }
};

}  // namespace autodiff

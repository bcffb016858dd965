#pragma once
// reshape (no copy), permute, narrow, and the attention head split/merge built from them:
//   split_heads(x, H):  (B, L, E) -> (B, H, L, E/H)
//   merge_heads(x):     (B, H, L, D) -> (B, L, H·D)

#include "autodiff/expr/variable.hpp"
#include "autodiff/kernels/layout.hpp"

namespace autodiff {

template <class C>
struct Reshape : Expr<Reshape<C>> {
    using value_type = typename C::value_type;
    static constexpr bool may_require_grad = C::may_require_grad;
    C child;
    Shape shape_;
    Reshape(C c, Shape s) : child(std::move(c)), shape_(s) {
        if (shape_.numel() != child.shape().numel())
            fail("reshape", "cannot reshape {} to {}: element counts differ", child.shape(), shape_);
    }
    [[nodiscard]] const Shape& shape() const { return shape_; }
};

template <ExprLike X>
auto reshape(const X& x, const Shape& shape) {
    return Reshape<expr_t<X>>(as_expr(x), shape);
}

template <class C>
struct Evaluator<Reshape<C>> {
    using T = typename C::value_type;
    // y = x viewed as another shape ; dx = dy viewed as x's shape
    static Value<T> eval(const Reshape<C>& e, EvalContext& ctx) {
        Value<T> x = evaluate(e.child, ctx);
        return finish(ctx, x.value.reshaped(e.shape()), static_cast<bool>(x.target),
                      [xt = x.target, xs = x.value.shape()](const Tensor<T>& dy, Tape& tape) { tape.accumulate(xt, dy.reshaped(xs)); });
    }
};

template <class C>
struct Permute : Expr<Permute<C>> {
    using value_type = typename C::value_type;
    static constexpr bool may_require_grad = C::may_require_grad;
    C child;
    Permutation perm;
    Shape shape_;
    Permute(C c, Permutation p) : child(std::move(c)), perm(p), shape_(permute_output_shape("permute", child.shape(), p)) {}
    [[nodiscard]] const Shape& shape() const { return shape_; }
};

// y.dim(k) = x.dim(perm[k]); perm lists x.rank() dimensions.
template <ExprLike X>
auto permute(const X& x, std::initializer_list<int> perm) {
    const Shape s = as_expr(x).shape();
    if (static_cast<int>(perm.size()) != s.rank())
        fail("permute", "permutation has {} entries but the input {} has rank {}", perm.size(), s, s.rank());
    Permutation p{0, 1, 2, 3};
    std::copy(perm.begin(), perm.end(), p.begin());
    return Permute<expr_t<X>>(as_expr(x), p);
}

template <class C>
struct Evaluator<Permute<C>> {
    using T = typename C::value_type;
    // y = permute(x, p) ; dx = permute(dy, p⁻¹)
    static Value<T> eval(const Permute<C>& e, EvalContext& ctx) {
        Value<T> x = evaluate(e.child, ctx);
        return finish(ctx, permute_forward(x.value, e.perm), static_cast<bool>(x.target),
                      [xt = x.target, inv = inverse_permutation(e.perm, x.value.rank())](const Tensor<T>& dy, Tape& tape) {
                          tape.accumulate(xt, permute_forward(dy, inv));
                      });
    }
};

template <class C>
struct Narrow : Expr<Narrow<C>> {
    using value_type = typename C::value_type;
    static constexpr bool may_require_grad = C::may_require_grad;
    C child;
    int dim;
    std::int64_t start;
    Shape shape_;
    Narrow(C c, int d, std::int64_t s, std::int64_t length)
        : child(std::move(c)), dim(d), start(s), shape_(narrow_output_shape("narrow", child.shape(), d, s, length)) {}
    [[nodiscard]] const Shape& shape() const { return shape_; }
};

// x[..., start:start+length, ...] along dimension `dim` (as torch.narrow).
template <ExprLike X>
auto narrow(const X& x, int dim, std::int64_t start, std::int64_t length) {
    return Narrow<expr_t<X>>(as_expr(x), dim, start, length);
}

template <class C>
struct Evaluator<Narrow<C>> {
    using T = typename C::value_type;
    // y = x[.., start:start+len, ..] ; dx = zeros with the slice set to dy
    static Value<T> eval(const Narrow<C>& e, EvalContext& ctx) {
        Value<T> x = evaluate(e.child, ctx);
        return finish(ctx, narrow_forward(x.value, e.dim, e.start, e.shape()[e.dim]), static_cast<bool>(x.target),
                      [xt = x.target, xs = x.value.shape(), dim = e.dim, start = e.start](const Tensor<T>& dy, Tape& tape) {
                          tape.accumulate(xt, narrow_backward(dy, xs, dim, start));
                      });
    }
};

template <ExprLike X>
auto split_heads(const X& x, std::int64_t heads) {
    const Shape s = as_expr(x).shape();
    check_rank("split_heads", "input", s, 3, 3);
    if (heads < 1 || s[2] % heads != 0)
        fail("split_heads", "embedding dimension {} of input {} is not divisible by {} heads", s[2], s, heads);
    return permute(reshape(x, {s[0], s[1], heads, s[2] / heads}), {0, 2, 1, 3});
}

template <ExprLike X>
auto merge_heads(const X& x) {
    const Shape s = as_expr(x).shape();
    check_rank("merge_heads", "input", s, 4, 4);
    return reshape(permute(x, {0, 2, 1, 3}), {s[0], s[2], s[1] * s[3]});
}

}  // namespace autodiff

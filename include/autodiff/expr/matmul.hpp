#pragma once
// transpose(x), matmul(a, b) and linear(x, W, b).
//
// matmul folds a transpose child into the GEMM's flags at compile time: matmul(q, transpose(k))
// never materialises kᵀ, and its backward writes dK directly in k's layout.

#include "autodiff/expr/variable.hpp"
#include "autodiff/kernels/gemm.hpp"
#include "autodiff/kernels/layout.hpp"
#include "autodiff/kernels/linear.hpp"

namespace autodiff {

// xᵀ over the last two dimensions.
template <class C>
struct Transpose : Expr<Transpose<C>> {
    using value_type = typename C::value_type;
    static constexpr bool may_require_grad = C::may_require_grad;
    C child;
    Shape shape_;

    explicit Transpose(C c) : child(std::move(c)), shape_(child.shape()) {
        check_rank("transpose", "input", shape_, 2, 4);
        std::swap(shape_[shape_.rank() - 1], shape_[shape_.rank() - 2]);
    }
    [[nodiscard]] const Shape& shape() const { return shape_; }
    // The permutation that swaps the last two of `rank` dimensions.
    static Permutation swap_last_two(int rank) {
        Permutation p{0, 1, 2, 3};
        std::swap(p[static_cast<std::size_t>(rank - 1)], p[static_cast<std::size_t>(rank - 2)]);
        return p;
    }
};

template <ExprLike X>
auto transpose(const X& x) {
    return Transpose<expr_t<X>>(as_expr(x));
}

template <class C>
struct Evaluator<Transpose<C>> {
    using T = typename C::value_type;
    // y = xᵀ ; dx = dyᵀ
    static Value<T> eval(const Transpose<C>& e, EvalContext& ctx) {
        Value<T> x = evaluate(e.child, ctx);
        const Permutation p = Transpose<C>::swap_last_two(x.value.rank());
        return finish(ctx, permute_forward(x.value, p), static_cast<bool>(x.target),
                      [xt = x.target, p](const Tensor<T>& dy, Tape& tape) { tape.accumulate(xt, permute_forward(dy, p)); });
    }
};

// C = A·B over the last two dimensions, batched over equal leading dimensions; a rank-2 operand is
// broadcast over the other's batch.
template <class L, class R>
struct MatMul : Expr<MatMul<L, R>> {
    using value_type = typename L::value_type;
    static constexpr bool may_require_grad = any_may_require_grad_v<L, R>;
    L lhs;
    R rhs;
    Shape shape_;

    MatMul(L l, R r);
    [[nodiscard]] const Shape& shape() const { return shape_; }
};

template <ExprLike A, ExprLike B>
auto matmul(const A& a, const B& b) {
    static_assert(same_value_type_v<A, B>, "autodiff::matmul: both operands must have the same value type (float or double)");
    return MatMul<expr_t<A>, expr_t<B>>(as_expr(a), as_expr(b));
}

namespace detail {
// A matmul operand, seen through a transpose: evaluate the inner expression and set the GEMM flag.
template <class X>
struct GemmOperand {
    static constexpr bool transposed = false;
    static const X& inner(const X& x) { return x; }
};
template <class X>
struct GemmOperand<Transpose<X>> {
    static constexpr bool transposed = true;
    static const X& inner(const Transpose<X>& x) { return x.child; }
};
}  // namespace detail

// Shapes are checked on the operands as the GEMM sees them, so an error names a transposed
// operand's own shape: "rhs (2,3,4,6) (transposed)".
template <class L, class R>
MatMul<L, R>::MatMul(L l, R r)
    : lhs(std::move(l)),
      rhs(std::move(r)),
      shape_(gemm_output_shape("matmul", detail::GemmOperand<L>::inner(lhs).shape(), detail::GemmOperand<L>::transposed,
                               detail::GemmOperand<R>::inner(rhs).shape(), detail::GemmOperand<R>::transposed)) {}

namespace detail {
// The node-by-node evaluation of a matmul; a fused evaluator falls back to it.
template <class L, class R>
struct GenericMatMul {
    using T = typename L::value_type;
    using OpA = detail::GemmOperand<L>;
    using OpB = detail::GemmOperand<R>;

    // C = op(A)·op(B) ; dA, dB by matmul_backward (gemm.hpp)
    static Value<T> eval(const MatMul<L, R>& e, EvalContext& ctx) {
        Value<T> a = evaluate(OpA::inner(e.lhs), ctx);
        Value<T> b = evaluate(OpB::inner(e.rhs), ctx);
        Tensor<T> c = matmul_forward(a.value, OpA::transposed, b.value, OpB::transposed);
        return finish(ctx, std::move(c), a.target || b.target,
                      [at = a.target, bt = b.target, A = Saved<T>(a.value), B = Saved<T>(b.value)](const Tensor<T>& dC, Tape& tape) {
                          Tensor<T> dA, dB;
                          matmul_backward(at ? &dA : nullptr, bt ? &dB : nullptr, dC, A.get("matmul", "lhs"), OpA::transposed,
                                          B.get("matmul", "rhs"), OpB::transposed);
                          if (at) tape.accumulate(at, std::move(dA));
                          if (bt) tape.accumulate(bt, std::move(dB));
                      });
    }
};
}  // namespace detail

template <class L, class R>
struct Evaluator<MatMul<L, R>> : detail::GenericMatMul<L, R> {};

// y = x·Wᵀ + b (torch.nn.functional.linear). W is (out, in); b is (out) or absent.
// Reports no gradient work itself, so that Linear's may_require_grad is defined without a bias.
struct NoBias : Expr<NoBias> {
    static constexpr bool may_require_grad = false;
};

namespace detail {
// What tells the linear-like nodes apart (Linear here, HeadsLinear in heads.hpp): the op's name, whether
// its record fuses a layout change (for the graph view), its output shape and its kernels
// (kernels/linear.hpp). LinearNode and LinearEvaluator are the rest, shared.
struct LinearKernels {
    static constexpr const char* name = "linear";
    static constexpr bool fused = false;
    static Shape output_shape(const Shape& x, const Shape& w, const Shape* b) { return linear_output_shape(name, x, w, b); }
    template <class T>
    static Tensor<T> forward(const Tensor<T>& x, const Tensor<T>& w, const Tensor<T>& b) {
        return linear_forward(x, w, b);
    }
    template <class T>
    static void backward(Tensor<T>* dx, Tensor<T>* dW, Tensor<T>* db, const Tensor<T>& dy, const Tensor<T>& x, const Tensor<T>& w) {
        linear_backward(dx, dW, db, dy, x, w);
    }
};

// y = x·Wᵀ + b, the node's data: input, weight, bias (NoBias when absent) and the output shape, checked
// when the node is built.
template <class Node, class Kernels, class X, class W, class B>
struct LinearNode : Expr<Node> {
    using value_type = typename X::value_type;
    static constexpr bool has_bias = !std::is_same_v<B, NoBias>;
    static constexpr bool may_require_grad = any_may_require_grad_v<X, W> || (has_bias && B::may_require_grad);
    X x;
    W weight;
    B bias;
    Shape shape_;

    LinearNode(X x_, W w_, B b_) : x(std::move(x_)), weight(std::move(w_)), bias(std::move(b_)) {
        if constexpr (has_bias) shape_ = Kernels::output_shape(x.shape(), weight.shape(), &bias.shape());
        else shape_ = Kernels::output_shape(x.shape(), weight.shape(), nullptr);
    }
    [[nodiscard]] const Shape& shape() const { return shape_; }
};

// y = x·Wᵀ + b ; dx = dy·W, dW = dyᵀ·x, db = colsum(dy)   (linear.hpp), with the kernels' layouts.
template <class Node, class Kernels>
struct LinearEvaluator {
    using T = typename Node::value_type;
    static Value<T> eval(const Node& e, EvalContext& ctx) {
        Value<T> x = evaluate(e.x, ctx);
        Value<T> w = evaluate(e.weight, ctx);
        Value<T> b;
        if constexpr (Node::has_bias) b = evaluate(e.bias, ctx);
        Tensor<T> y = Kernels::forward(x.value, w.value, b.value);
        if constexpr (Kernels::fused) ctx.fused = true;
        return finish(ctx, std::move(y), x.target || w.target || b.target,
                      [xt = x.target, wt = w.target, bt = b.target, Xs = Saved<T>(x.value), Ws = Saved<T>(w.value)](const Tensor<T>& dy,
                                                                                                                   Tape& tape) {
                          const Tensor<T>& X_ = Xs.get(Kernels::name, "input");
                          const Tensor<T>& W_ = Ws.get(Kernels::name, "weight");
                          Tensor<T> dx;
                          Tensor<T> dW = wt ? zeros<T>(W_.shape()) : Tensor<T>();
                          Tensor<T> db = bt ? zeros<T>({W_.dim(0)}) : Tensor<T>();
                          Kernels::backward(xt ? &dx : nullptr, wt ? &dW : nullptr, bt ? &db : nullptr, dy, X_, W_);
                          if (xt) tape.accumulate(xt, std::move(dx));
                          if (wt) tape.accumulate(wt, std::move(dW));
                          if (bt) tape.accumulate(bt, std::move(db));
                      });
    }
};
}  // namespace detail

template <class X, class W, class B>
struct Linear : detail::LinearNode<Linear<X, W, B>, detail::LinearKernels, X, W, B> {
    using detail::LinearNode<Linear<X, W, B>, detail::LinearKernels, X, W, B>::LinearNode;
};

template <ExprLike X, ExprLike W, ExprLike B>
auto linear(const X& x, const W& w, const B& b) {
    static_assert(same_value_type_v<X, W> && same_value_type_v<X, B>,
                  "autodiff::linear: input, weight and bias must have the same value type (float or double)");
    return Linear<expr_t<X>, expr_t<W>, expr_t<B>>(as_expr(x), as_expr(w), as_expr(b));
}
template <ExprLike X, ExprLike W>
auto linear(const X& x, const W& w) {
    static_assert(same_value_type_v<X, W>, "autodiff::linear: input and weight must have the same value type (float or double)");
    return Linear<expr_t<X>, expr_t<W>, NoBias>(as_expr(x), as_expr(w), NoBias{});
}

template <class X, class W, class B>
struct Evaluator<Linear<X, W, B>> : detail::LinearEvaluator<Linear<X, W, B>, detail::LinearKernels> {};

}  // namespace autodiff

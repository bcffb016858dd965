#pragma once
// Linear layers that write or read the attention's head layout directly (kernels/linear.hpp): the
// split into heads happens in the in-projection GEMM's output pass and merge_heads in the output
// projection's packing, forward and backward, with no copy in between.
//
//   linear_heads<S>(x, W, b, H):  x (B, L, in), W (S·E, in), b (S·E) or absent
//                                 -> S Vars y_s (B, H, L, E/H) = split_heads(narrow(linear(x, W, b), 2, s·E, E), H)
//   heads_linear(o, W, b):        o (B, H, L, D), W (out, H·D), b (out) or absent
//                                 -> (B, L, out) = linear(merge_heads(o), W, b)
//
// linear_heads makes its S values (q, k and v of a packed in-projection: S = 3) with one GEMM and one
// record of S outputs, so it is not an expression node: it evaluates at once, like Var's constructor
// (on the current tape; if anything throws, the tape is left as it was), and returns the Vars.
// heads_linear is an expression node like linear.

#include <array>

#include "autodiff/expr/matmul.hpp"

namespace autodiff {

namespace detail {
template <std::size_t S, class X, class W, class B>
std::array<Var<typename X::value_type>, S> linear_heads_eval(const X& x, const W& w, const B& b, std::int64_t heads) {
    using T = typename X::value_type;
    constexpr bool has_bias = !std::is_same_v<B, NoBias>;
    Shape bias_shape;
    if constexpr (has_bias) bias_shape = b.shape();
    // Checked before anything is evaluated or recorded.
    const Shape ys = linear_heads_output_shape("linear_heads", x.shape(), w.shape(), has_bias ? &bias_shape : nullptr, heads, S);
    Tape& tape = current_tape();
    EvalContext ctx{grad_enabled() ? &tape : nullptr};
    RecordInputs inputs;
    ctx.inputs = &inputs;
    const Tape::Checkpoint cp = tape.checkpoint();
    try {
        Value<T> xv = evaluate(x, ctx);
        Value<T> wv = evaluate(w, ctx);
        Value<T> bv;
        if constexpr (has_bias) bv = evaluate(b, ctx);
        std::array<Tensor<T>, S> y;
        linear_heads_forward(xv.value, wv.value, bv.value, heads, std::span<Tensor<T>>(y));
        // y_s = split_heads(x·Wᵀ + b) ; dx = dY·W, dW = dYᵀ·x, db = colsum(dY), dY = [dy_0 … dy_S-1] (linear.hpp)
        std::array<GradTarget<T>, S> targets{};
        if (ctx.tape && (xv.target || wv.target || bv.target)) {
            targets = tape.record_outputs<T, S>([xt = xv.target, wt = wv.target, bt = bv.target, Xs = Saved<T>(xv.value),
                                                 Ws = Saved<T>(wv.value), ys](const std::array<Tensor<T>, S>& adjoints, Tape& t) {
                const Tensor<T>& X_ = Xs.get("linear_heads", "input");
                const Tensor<T>& W_ = Ws.get("linear_heads", "weight");
                std::array<Tensor<T>, S> dys = adjoints;
                for (auto& dy : dys)  // an output that got no gradient contributes zeros
                    if (!dy.defined()) dy = zeros<T>(ys);
                Tensor<T> dx;
                Tensor<T> dW = wt ? zeros<T>(W_.shape()) : Tensor<T>();
                Tensor<T> db = bt ? zeros<T>({W_.dim(0)}) : Tensor<T>();
                linear_heads_backward(xt ? &dx : nullptr, wt ? &dW : nullptr, bt ? &db : nullptr, std::span<const Tensor<T>>(dys), X_, W_);
                if (xt) t.accumulate(xt, std::move(dx));
                if (wt) t.accumulate(wt, std::move(dW));
                if (bt) t.accumulate(bt, std::move(db));
            });
            tape.describe_last<T>(targets[0].slot, "linear_heads", ys, true, inputs);
        }
        std::array<Var<T>, S> out;
        for (std::size_t s = 0; s < S; ++s) out[s] = Var<T>(Value<T>{std::move(y[s]), targets[s]}, tape);
        return out;
    } catch (...) {
        tape.rollback(cp);
        throw;
    }
}
}  // namespace detail

template <std::size_t S, ExprLike X, ExprLike W, ExprLike B>
std::array<Var<value_type_t<X>>, S> linear_heads(const X& x, const W& w, const B& b, std::int64_t heads) {
    static_assert(same_value_type_v<X, W> && same_value_type_v<X, B>,
                  "autodiff::linear_heads: input, weight and bias must have the same value type (float or double)");
    return detail::linear_heads_eval<S>(as_expr(x), as_expr(w), as_expr(b), heads);
}
template <std::size_t S, ExprLike X, ExprLike W>
std::array<Var<value_type_t<X>>, S> linear_heads(const X& x, const W& w, std::int64_t heads) {
    static_assert(same_value_type_v<X, W>, "autodiff::linear_heads: input and weight must have the same value type (float or double)");
    return detail::linear_heads_eval<S>(as_expr(x), as_expr(w), NoBias{}, heads);
}

namespace detail {
// y = merge_heads(o)·Wᵀ + b with o read in its head layout; do = dy·W written in the head layout.
struct HeadsLinearKernels {
    static constexpr const char* name = "heads_linear";
    static constexpr bool fused = true;  // for the graph view: merge_heads and linear in one record
    static Shape output_shape(const Shape& o, const Shape& w, const Shape* b) { return heads_linear_output_shape(name, o, w, b); }
    template <class T>
    static Tensor<T> forward(const Tensor<T>& o, const Tensor<T>& w, const Tensor<T>& b) {
        return heads_linear_forward(o, w, b);
    }
    template <class T>
    static void backward(Tensor<T>* d_o, Tensor<T>* dW, Tensor<T>* db, const Tensor<T>& dy, const Tensor<T>& o, const Tensor<T>& w) {
        heads_linear_backward(d_o, dW, db, dy, o, w);
    }
};
}  // namespace detail

template <class X, class W, class B>
struct HeadsLinear : detail::LinearNode<HeadsLinear<X, W, B>, detail::HeadsLinearKernels, X, W, B> {
    using detail::LinearNode<HeadsLinear<X, W, B>, detail::HeadsLinearKernels, X, W, B>::LinearNode;
};

template <ExprLike X, ExprLike W, ExprLike B>
auto heads_linear(const X& o, const W& w, const B& b) {
    static_assert(same_value_type_v<X, W> && same_value_type_v<X, B>,
                  "autodiff::heads_linear: input, weight and bias must have the same value type (float or double)");
    return HeadsLinear<expr_t<X>, expr_t<W>, expr_t<B>>(as_expr(o), as_expr(w), as_expr(b));
}
template <ExprLike X, ExprLike W>
auto heads_linear(const X& o, const W& w) {
    static_assert(same_value_type_v<X, W>, "autodiff::heads_linear: input and weight must have the same value type (float or double)");
    return HeadsLinear<expr_t<X>, expr_t<W>, NoBias>(as_expr(o), as_expr(w), NoBias{});
}

template <class X, class W, class B>
struct Evaluator<HeadsLinear<X, W, B>> : detail::LinearEvaluator<HeadsLinear<X, W, B>, detail::HeadsLinearKernels> {};

}  // namespace autodiff

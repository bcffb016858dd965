#pragma once
// The fused attention path: an expression of the form
//
//   matmul(dropout?(softmax(scores, mask, additive)), v)
//   scores = matmul(q, transpose(k))                  optionally scaled (`* s`, `/ s`, `s *`) and
//            + bias or bias + ..., before or after the scaling (a bias added before is scaled too)
//
// is recognised from its type at compile time (is_fused_v<Expr>) and evaluated as ONE tape record
// whose forward and backward are the flash-style kernels of kernels/attention.hpp. q, k, v and the
// bias are any expressions (evaluated node by node: `q * s` is a Scale record feeding the kernel).
// The meaning never changes: the same expression through the generic path gives the same numbers
// within rounding. The fused record is used when, at run time, q, k and v have equal ranks and
// leading dimensions and the bias broadcasts into the scores; otherwise (e.g. a rank-2 k broadcast
// over the batch) and under NoFusionGuard the generic path runs.
//
// Extension point: a user can recognise another pattern the same way, with a constrained partial
// specialisation `template <...> requires my_pattern<...> struct Evaluator<Node> {...}` that calls
// its own kernels and falls back to the generic evaluator.

#include "autodiff/expr/elementwise.hpp"
#include "autodiff/expr/matmul.hpp"
#include "autodiff/expr/softmax.hpp"
#include "autodiff/kernels/attention.hpp"

namespace autodiff {

namespace detail {

// What the softmax's argument may be; q(), k(), bias() return the sub-expressions.
template <class S>
struct ScoresPattern {
    static constexpr bool value = false;
};

template <class Q, class K>
struct ScoresPattern<MatMul<Q, Transpose<K>>> {
    using Node = MatMul<Q, Transpose<K>>;
    static constexpr bool value = true, biased = false;
    static const Q& q(const Node& e) { return e.lhs; }
    static const K& k(const Node& e) { return e.rhs.child; }
    static double scale(const Node&) { return 1.0; }
    static double bias_scale(const Node&) { return 1.0; }
};

template <class T, class X>
    requires ScoresPattern<X>::value
struct ScoresPattern<Unary<Scale<T>, X>> {
    using Node = Unary<Scale<T>, X>;
    using Inner = ScoresPattern<X>;
    static constexpr bool value = true, biased = Inner::biased;
    static decltype(auto) q(const Node& e) { return Inner::q(e.child); }
    static decltype(auto) k(const Node& e) { return Inner::k(e.child); }
    static decltype(auto) bias(const Node& e)
        requires biased
    {
        return Inner::bias(e.child);
    }
    static double scale(const Node& e) { return static_cast<double>(e.op.s) * Inner::scale(e.child); }
    static double bias_scale(const Node& e) { return static_cast<double>(e.op.s) * Inner::bias_scale(e.child); }
};

template <class X, class B>
    requires(ScoresPattern<X>::value && !ScoresPattern<X>::biased)
struct ScoresPattern<Binary<Add, X, B>> {
    using Node = Binary<Add, X, B>;
    using Inner = ScoresPattern<X>;
    static constexpr bool value = true, biased = true;
    static decltype(auto) q(const Node& e) { return Inner::q(e.lhs); }
    static decltype(auto) k(const Node& e) { return Inner::k(e.lhs); }
    static const B& bias(const Node& e) { return e.rhs; }
    static double scale(const Node& e) { return Inner::scale(e.lhs); }
    static double bias_scale(const Node&) { return 1.0; }
};

template <class B, class X>
    requires(ScoresPattern<X>::value && !ScoresPattern<X>::biased && !ScoresPattern<B>::value)
struct ScoresPattern<Binary<Add, B, X>> {
    using Node = Binary<Add, B, X>;
    using Inner = ScoresPattern<X>;
    static constexpr bool value = true, biased = true;
    static decltype(auto) q(const Node& e) { return Inner::q(e.rhs); }
    static decltype(auto) k(const Node& e) { return Inner::k(e.rhs); }
    static const B& bias(const Node& e) { return e.lhs; }
    static double scale(const Node& e) { return Inner::scale(e.rhs); }
    static double bias_scale(const Node&) { return 1.0; }
};

template <class E>
struct AttentionPattern {
    static constexpr bool value = false;
};

template <class S, class V>
    requires ScoresPattern<S>::value
struct AttentionPattern<MatMul<Softmax<S>, V>> {
    using Scores = ScoresPattern<S>;
    static constexpr bool value = true;
    static const Softmax<S>& softmax(const MatMul<Softmax<S>, V>& e) { return e.lhs; }
    static DropoutDescriptor dropout(const MatMul<Softmax<S>, V>&) { return {}; }
};

template <class S, class V>
    requires ScoresPattern<S>::value
struct AttentionPattern<MatMul<Dropout<Softmax<S>>, V>> {
    using Scores = ScoresPattern<S>;
    static constexpr bool value = true;
    static const Softmax<S>& softmax(const MatMul<Dropout<Softmax<S>>, V>& e) { return e.lhs.child; }
    static DropoutDescriptor dropout(const MatMul<Dropout<Softmax<S>>, V>& e) { return e.lhs.desc; }
};

}  // namespace detail

// True when the expression type is evaluated by the fused attention kernels.
template <class E>
inline constexpr bool is_fused_v = detail::AttentionPattern<std::remove_cvref_t<E>>::value;

template <class L, class R>
    requires is_fused_v<MatMul<L, R>>
struct Evaluator<MatMul<L, R>> {
    using T = typename L::value_type;
    using Pattern = detail::AttentionPattern<MatMul<L, R>>;
    using Scores = typename Pattern::Scores;

    static Value<T> eval(const MatMul<L, R>& e, EvalContext& ctx) {
        const auto& sm = Pattern::softmax(e);
        if (!fusion_enabled() || !applicable(e)) return detail::GenericMatMul<L, R>::eval(e, ctx);
        Value<T> q = evaluate(Scores::q(sm.child), ctx);
        Value<T> k = evaluate(Scores::k(sm.child), ctx);
        Value<T> b;
        if constexpr (Scores::biased) b = evaluate(Scores::bias(sm.child), ctx);
        Value<T> v = evaluate(e.rhs, ctx);
        // A trainable full-shape bias: its gradient is an L×L buffer anyway, so the forward leaves the
        // scores in it and the backward does not recompute them (attention.hpp, docs/ARCHITECTURE.md).
        const bool keep_scores = b.target && b.value.shape() == scores_shape(q.value.shape(), k.value.shape());
        const AttentionOptions opt{Scores::scale(sm.child), Scores::bias_scale(sm.child), sm.mask, Pattern::dropout(e), keep_scores};
        AttentionSaved<T> saved = attention_forward(q.value, k.value, v.value, b.value, sm.additive, opt);
        Tensor<T> O = saved.O;
        // O = dropout(softmax(S))·V ; dQ, dK, dV, dbias by attention_backward (attention.hpp). The first
        // backward consumes the kept scores; another one (retain_graph) recomputes them.
        auto backward = [qt = q.target, kt = k.target, vt = v.target, bt = b.target, Q = q.value, K = k.value, V = v.value,
                         B = b.value, A = sm.additive, saved = std::move(saved), opt](const Tensor<T>& dO, Tape& tape) mutable {
            Tensor<T> dQ, dK, dV, dB;
            attention_backward(qt ? &dQ : nullptr, kt ? &dK : nullptr, vt ? &dV : nullptr, bt ? &dB : nullptr, dO, Q, K, V, B,
                               A, saved, opt);
            if (qt) tape.accumulate(qt, std::move(dQ));
            if (kt) tape.accumulate(kt, std::move(dK));
            if (vt) tape.accumulate(vt, std::move(dV));
            if (bt) tape.accumulate(bt, std::move(dB));
        };
        return finish(ctx, std::move(O), q.target || k.target || v.target || b.target, std::move(backward));
    }

    // The kernel's preconditions, from the shapes known before anything is evaluated.
    static bool applicable(const MatMul<L, R>& e) {
        const auto& sm = Pattern::softmax(e);
        const Shape& q = Scores::q(sm.child).shape();
        const Shape& k = Scores::k(sm.child).shape();
        const Shape& v = e.rhs.shape();
        if (q.rank() != k.rank() || q.rank() != v.rank()) return false;
        for (int i = 0; i + 2 < q.rank(); ++i)
            if (q[i] != k[i] || q[i] != v[i]) return false;
        if constexpr (Scores::biased)
            if (!broadcasts_to(Scores::bias(sm.child).shape(), scores_shape(q, k))) return false;
        return true;
    }

    static Shape scores_shape(const Shape& q, const Shape& k) {
        Shape scores = q;
        scores[scores.rank() - 1] = k.dim_from_end(2);
        return scores;
    }
};

}  // namespace autodiff

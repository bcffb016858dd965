#pragma once
// The fused attention path: an expression of the form
//
//   matmul(dropout?(softmax(scores, mask, additive)), v)
//   scores = matmul(q, transpose(k))                  optionally scaled (`* s`, `/ s`, `s *`) and
//            + bias or bias + ..., before or after the scaling (a bias added before is scaled too)
//
// and its variants with modifiers (expr/modifier.hpp, docs/MODIFIERS.md):
//
//   softmax(g(scores)) with g any chain of tanh sigmoid exp log abs relu neg pow, scalar * / + −,
//                      and score functions (score_mod(x, f), x + f, x * f for a modifier expression f),
//   softmax(g(scores) + bias) (the bias outside the score function, when the scores have none),
//   softmax(..., mask function) (ad::causal_window(w), ad::same_segment(seg), any boolean index expression)
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
#include "autodiff/expr/modifier.hpp"
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

// The tensor ops a score function may be built from, as modifier expressions of their input.
template <class Op>
struct ModifierOf;
#define AUTODIFF_MODIFIER_OF(TensorOp, ModOp)                           \
    template <>                                                         \
    struct ModifierOf<TensorOp> {                                       \
        template <class F>                                              \
        static auto apply(const TensorOp&, const F& f) {                \
            return modifier::unary(modifier::ModOp{}, f);               \
        }                                                               \
    };
AUTODIFF_MODIFIER_OF(Tanh, TanhOp)
AUTODIFF_MODIFIER_OF(Sigmoid, SigmoidOp)
AUTODIFF_MODIFIER_OF(Exp, ExpOp)
AUTODIFF_MODIFIER_OF(Log, LogOp)
AUTODIFF_MODIFIER_OF(Abs, AbsOp)
AUTODIFF_MODIFIER_OF(Relu, ReluOp)
AUTODIFF_MODIFIER_OF(Neg, NegOp)
#undef AUTODIFF_MODIFIER_OF
template <class T>
struct ModifierOf<Scale<T>> {
    template <class F>
    static auto apply(const Scale<T>& op, const F& f) { return f * static_cast<double>(op.s); }
};
template <class T>
struct ModifierOf<Shift<T>> {
    template <class F>
    static auto apply(const Shift<T>& op, const F& f) { return f + static_cast<double>(op.c); }
};
template <class T>
struct ModifierOf<Pow<T>> {
    template <class F>
    static auto apply(const Pow<T>& op, const F& f) { return modifier::unary(modifier::PowOp{static_cast<double>(op.p)}, f); }
};
template <class Op>
concept ModifierOp = requires { sizeof(ModifierOf<Op>); };

// The softmax's argument: scores (ScoresPattern) under a score function fn(e) (modifier::Score when
// there is none), with the bias inside the scores or added after the function (bias_outside).
template <class S>
struct ModdedScores {
    static constexpr bool value = false;
};

template <class S>
    requires ScoresPattern<S>::value
struct ModdedScores<S> {
    using Core = ScoresPattern<S>;
    static constexpr bool value = true, has_fn = false, biased = Core::biased, bias_outside = false;
    static const S& core(const S& e) { return e; }
    static modifier::Score fn(const S&) { return {}; }
    static decltype(auto) bias(const S& e)
        requires biased
    {
        return Core::bias(e);
    }
    static double bias_scale(const S& e) { return Core::bias_scale(e); }
};

// g(x) for a tensor op g of the chain.
template <class Op, class X>
    requires(ModdedScores<X>::value && !ModdedScores<X>::bias_outside && !ScoresPattern<Unary<Op, X>>::value && ModifierOp<Op>)
struct ModdedScores<Unary<Op, X>> {
    using Node = Unary<Op, X>;
    using Inner = ModdedScores<X>;
    using Core = typename Inner::Core;
    static constexpr bool value = true, has_fn = true, biased = Inner::biased, bias_outside = false;
    static decltype(auto) core(const Node& e) { return Inner::core(e.child); }
    static auto fn(const Node& e) { return ModifierOf<Op>::apply(e.op, Inner::fn(e.child)); }
    static decltype(auto) bias(const Node& e)
        requires biased
    {
        return Inner::bias(e.child);
    }
    static double bias_scale(const Node& e) { return Inner::bias_scale(e.child); }
};

// score_mod(x, f), x + f, x * f, ...: f after x's own function.
template <class X, class F>
    requires(ModdedScores<X>::value && !ModdedScores<X>::bias_outside)
struct ModdedScores<ScoreMod<X, F>> {
    using Node = ScoreMod<X, F>;
    using Inner = ModdedScores<X>;
    using Core = typename Inner::Core;
    static constexpr bool value = true, has_fn = true, biased = Inner::biased, bias_outside = false;
    static decltype(auto) core(const Node& e) { return Inner::core(e.child); }
    static auto fn(const Node& e) { return modifier::compose(e.fn, Inner::fn(e.child)); }
    static decltype(auto) bias(const Node& e)
        requires biased
    {
        return Inner::bias(e.child);
    }
    static double bias_scale(const Node& e) { return Inner::bias_scale(e.child); }
};

// f = score ± g with g free of the score (ALiBi, relative positions): it commutes with an outside bias,
// so g(x) + bias + f is g(x) + f + bias.
template <class F>
inline constexpr bool adds_to_score_v = false;
template <class G>
inline constexpr bool adds_to_score_v<modifier::Binary<modifier::AddOp, modifier::Score, G>> = !G::uses_score;
template <class G>
inline constexpr bool adds_to_score_v<modifier::Binary<modifier::AddOp, G, modifier::Score>> = !G::uses_score;
template <class G>
inline constexpr bool adds_to_score_v<modifier::Binary<modifier::SubOp, modifier::Score, G>> = !G::uses_score;

template <class X, class F>
    requires(ModdedScores<X>::value && ModdedScores<X>::bias_outside && adds_to_score_v<F>)
struct ModdedScores<ScoreMod<X, F>> {
    using Node = ScoreMod<X, F>;
    using Inner = ModdedScores<X>;
    using Core = typename Inner::Core;
    static constexpr bool value = true, has_fn = true, biased = true, bias_outside = true;
    static decltype(auto) core(const Node& e) { return Inner::core(e.child); }
    static auto fn(const Node& e) { return modifier::compose(e.fn, Inner::fn(e.child)); }
    static decltype(auto) bias(const Node& e) { return Inner::bias(e.child); }
    static double bias_scale(const Node& e) { return Inner::bias_scale(e.child); }
};

// g(x) + bias or bias + g(x), x without a bias of its own: the bias after the score function.
template <class X, class B, bool BiasFirst>
struct BiasOutside {
    using Node = std::conditional_t<BiasFirst, Binary<Add, B, X>, Binary<Add, X, B>>;
    using Inner = ModdedScores<X>;
    using Core = typename Inner::Core;
    static constexpr bool value = true, has_fn = true, biased = true, bias_outside = true;
    static const X& scores(const Node& e) {
        if constexpr (BiasFirst) return e.rhs;
        else return e.lhs;
    }
    static decltype(auto) core(const Node& e) { return Inner::core(scores(e)); }
    static auto fn(const Node& e) { return Inner::fn(scores(e)); }
    static const B& bias(const Node& e) {
        if constexpr (BiasFirst) return e.lhs;
        else return e.rhs;
    }
    static double bias_scale(const Node&) { return 1.0; }
};
template <class X>
concept ModdedWithoutBias = ModdedScores<X>::value && ModdedScores<X>::has_fn && !ModdedScores<X>::biased;
template <class X, class B>
    requires(ModdedWithoutBias<X> && !ModdedScores<B>::value)
struct ModdedScores<Binary<Add, X, B>> : BiasOutside<X, B, false> {};
template <class B, class X>
    requires(ModdedWithoutBias<X> && !ModdedScores<B>::value)
struct ModdedScores<Binary<Add, B, X>> : BiasOutside<X, B, true> {};

template <class E>
struct AttentionPattern {
    static constexpr bool value = false;
};

template <class S, class M>
inline constexpr bool attention_softmax_v = ModdedScores<S>::value && (std::is_same_v<M, NoMaskFn> || modifier::is_mask_v<M>);

template <class S, class M, class V>
    requires attention_softmax_v<S, M>
struct AttentionPattern<MatMul<Softmax<S, M>, V>> {
    using Scores = ModdedScores<S>;
    using ScoresNode = S;
    using MaskFn = M;
    static constexpr bool value = true;
    static const Softmax<S, M>& softmax(const MatMul<Softmax<S, M>, V>& e) { return e.lhs; }
    static DropoutDescriptor dropout(const MatMul<Softmax<S, M>, V>&) { return {}; }
};

template <class S, class M, class V>
    requires attention_softmax_v<S, M>
struct AttentionPattern<MatMul<Dropout<Softmax<S, M>>, V>> {
    using Scores = ModdedScores<S>;
    using ScoresNode = S;
    using MaskFn = M;
    static constexpr bool value = true;
    static const Softmax<S, M>& softmax(const MatMul<Dropout<Softmax<S, M>>, V>& e) { return e.lhs.child; }
    static DropoutDescriptor dropout(const MatMul<Dropout<Softmax<S, M>>, V>& e) { return e.lhs.desc; }
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
    using Core = typename Scores::Core;
    static constexpr bool has_mask_fn = !std::is_same_v<typename Pattern::MaskFn, NoMaskFn>;
    using Fn = std::conditional_t<Scores::has_fn, decltype(Scores::fn(std::declval<const typename Pattern::ScoresNode&>())),
                                  modifier::NoScoreFn>;

    static Value<T> eval(const MatMul<L, R>& e, EvalContext& ctx) {
        const auto& sm = Pattern::softmax(e);
        if (!fusion_enabled() || !applicable(e)) return detail::GenericMatMul<L, R>::eval(e, ctx);
        const auto& core = Scores::core(sm.child);
        Value<T> q = evaluate(Core::q(core), ctx);
        Value<T> k = evaluate(Core::k(core), ctx);
        Value<T> b;
        if constexpr (Scores::biased) b = evaluate(Scores::bias(sm.child), ctx);
        Value<T> v = evaluate(e.rhs, ctx);
        const Shape scores = scores_shape(q.value.shape(), k.value.shape());
        // A trainable full-shape bias: its gradient is an L×L buffer anyway, so the forward leaves the
        // scores in it and the backward does not recompute them (attention.hpp, docs/ARCHITECTURE.md).
        const bool keep_scores = b.target && b.value.shape() == scores;
        AttentionOptions opt{Core::scale(core), Scores::bias_scale(sm.child), sm.mask, Pattern::dropout(e), keep_scores};
        if constexpr (Scores::has_fn || has_mask_fn) {
            using Mod = modifier::Modifier<T, Fn, typename Pattern::MaskFn>;
            Mod mod("attention", score_fn(sm.child), sm.mask_fn, !Scores::bias_outside, scores, ctx);
            return record(ctx, q, k, v, b, sm.additive, std::move(opt), std::move(mod));
        } else {
            return record(ctx, q, k, v, b, sm.additive, std::move(opt), nullptr);
        }
    }

    static Fn score_fn(const typename Pattern::ScoresNode& scores) {
        if constexpr (Scores::has_fn) return Scores::fn(scores);
        else return {};
    }

    template <class Mod>
    static const AttentionModifier<T>* as_modifier(const Mod& mod) {
        if constexpr (std::is_same_v<Mod, std::nullptr_t>) return nullptr;
        else return &mod;
    }

    // Runs the forward kernel and records the backward: O = dropout(softmax(S))·V ; dQ, dK, dV, dbias
    // (and the modifier's captured tensors' gradients) by attention_backward (attention.hpp). The
    // first backward consumes the kept scores; another one (retain_graph) recomputes them.
    template <class Mod>
    static Value<T> record(EvalContext& ctx, const Value<T>& q, const Value<T>& k, const Value<T>& v, const Value<T>& b,
                           const Tensor<T>& additive, AttentionOptions opt, Mod mod) {
        constexpr bool modified = !std::is_same_v<Mod, std::nullptr_t>;
        bool needs = q.target || k.target || v.target || b.target;
        if constexpr (modified) needs = needs || !mod.targets().empty();
        // A backward will run: the forward may keep dropout's mask for it (attention_stores_dropout_mask).
        opt.keep_dropout_mask = ctx.tape && needs;
        opt.keep_mask_tiles = ctx.tape && needs;  // and the mask's tiles, their scores too when few
        AttentionSaved<T> saved = attention_forward(q.value, k.value, v.value, b.value, additive, opt, as_modifier(mod));
        Tensor<T> O = saved.O;
        // The backward reads q, k, v, the bias, the masks, O (and the modifier's captured tensors): the
        // versions they have now are checked before it runs. lse and the kept scores are private.
        const SavedVersions versions{opt.mask.keep.version(), opt.mask.key_padding.version(), saved.O.version()};
        auto backward = [qt = q.target, kt = k.target, vt = v.target, bt = b.target, Q = Saved<T>(q.value), K = Saved<T>(k.value),
                         V = Saved<T>(v.value), B = Saved<T>(b.value), A = Saved<T>(additive), saved = std::move(saved), opt = std::move(opt), versions,
                         mod = std::move(mod)](const Tensor<T>& dO, Tape& tape) mutable {
            constexpr const char* op = "attention";
            check_saved(op, "keep mask", opt.mask.keep, versions.keep);
            check_saved(op, "key padding mask", opt.mask.key_padding, versions.key_padding);
            check_saved(op, "output", saved.O, versions.O);
            if constexpr (modified) mod.check_saved(op);
            Tensor<T> dQ, dK, dV, dB;
            std::vector<Tensor<T>> dmod;
            const AttentionModifier<T>* modifier = as_modifier(mod);
            attention_backward(qt ? &dQ : nullptr, kt ? &dK : nullptr, vt ? &dV : nullptr, bt ? &dB : nullptr, dO, Q.get(op, "q"),
                               K.get(op, "k"), V.get(op, "v"), B.get(op, "bias"), A.get(op, "additive mask"), saved, opt, modifier,
                               modified ? &dmod : nullptr);
            if (qt) tape.accumulate(qt, std::move(dQ));
            if (kt) tape.accumulate(kt, std::move(dK));
            if (vt) tape.accumulate(vt, std::move(dV));
            if (bt) tape.accumulate(bt, std::move(dB));
            if constexpr (modified)
                for (std::size_t i = 0; i < dmod.size(); ++i) tape.accumulate(mod.targets()[i], std::move(dmod[i]));
        };
        ctx.fused = true;  // for the graph view (graph.hpp)
        return finish(ctx, std::move(O), needs, std::move(backward));
    }

    // The kernel's preconditions, from the shapes known before anything is evaluated.
    static bool applicable(const MatMul<L, R>& e) {
        const auto& sm = Pattern::softmax(e);
        const auto& core = Scores::core(sm.child);
        const Shape& q = Core::q(core).shape();
        const Shape& k = Core::k(core).shape();
        const Shape& v = e.rhs.shape();
        if (q.rank() != k.rank() || q.rank() != v.rank()) return false;
        for (int i = 0; i + 2 < q.rank(); ++i)
            if (q[i] != k[i] || q[i] != v[i]) return false;
        if constexpr (Scores::biased)
            if (!broadcasts_to(Scores::bias(sm.child).shape(), scores_shape(q, k))) return false;
        return true;
    }

    // The versions of the saved values that are not held as Saved<T>.
    struct SavedVersions {
        std::uint64_t keep, key_padding, O;
    };

    static Shape scores_shape(const Shape& q, const Shape& k) {
        Shape scores = q;
        scores[scores.rank() - 1] = k.dim_from_end(2);
        return scores;
    }
};

}  // namespace autodiff

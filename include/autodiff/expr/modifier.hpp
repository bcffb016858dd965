#pragma once
// Attention modifiers written as expressions (FlexAttention's score_mod and mask_mod, at compile time):
//
//   score function  f(score, b, h, q, k)   stands between the scores and the softmax
//   mask            m(b, h, q, k) -> bool  drops the elements where it is false
//
// built from the placeholders ad::score, ad::b_idx, ad::h_idx, ad::q_idx, ad::k_idx, numbers,
// captured tensors indexed by expressions (ad::at(slopes, ad::h_idx)), + − × ÷, min, max, clamp,
// neg, abs, exp, log, tanh, sigmoid, relu, pow, comparisons and & | ! (docs/MODIFIERS.md has the
// grammar). The expression is a type: from it this header generates, for a row of a tile, the values
// of f in SIMD vectors, ∂f/∂score (forward mode, in the same pass as f) and the gradients of captured
// tensors (reverse mode over the tree), the interval of values of any sub-expression over a tile (used to classify tiles
// of a mask as empty, full or partial without looking at their elements), and the element-wise mask.
// The fused attention kernels call this code per tile through AttentionModifier
// (kernels/attention.hpp); the generic path calls the same code over whole tensors (ScoreMod below,
// and softmax with a mask function), and the recognised attention patterns are in expr/attention.hpp.
//
// Index arithmetic runs in the scores' value type: exact while values stay below 2^24 (float).
// A captured tensor's index is truncated toward zero; before anything is evaluated every index's
// range over the whole problem is checked against the tensor's shape (an Error names both).

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "autodiff/detail/simd.hpp"
#include "autodiff/expr/elementwise.hpp"
#include "autodiff/expr/softmax.hpp"
#include "autodiff/kernels/attention.hpp"
#include "autodiff/parallel.hpp"

namespace autodiff {

namespace modifier {

// A range of values [lo, hi]; booleans are 0 or 1.
struct Interval {
    double lo, hi;
};
// The ranges of the arguments: over one tile, or over the whole problem.
struct Box {
    Interval s, b, h, q, k;
};

// An evaluation point: the lanes of V share (b, h, q) and hold consecutive keys k. Lanes at and past
// `count` repeat the last valid key (and score), so every lane is a valid point.
template <class V>
struct Point {
    V s, b, h, q, k;
    int count;
};

template <class V>
using lane_t = std::remove_cvref_t<decltype(std::declval<V>()[0])>;

// A value and its derivative with respect to the score (forward mode).
template <class V>
struct Dual {
    V value, d;
};

// Where backprop() adds the gradients of captured tensors: grads[slot] of the work item (null: none).
template <class T>
struct Sink {
    T* const* grads;
};

struct NodeTag {};
// The base of every modifier node: visit (captured leaves, in order) and flush (hoisted gradients)
// recurse into the node's children(), a tuple of references.
template <class Derived>
struct Node : NodeTag {
    template <class Fn>
    void visit(Fn&& fn) {
        std::apply([&](auto&... child) { (child.visit(fn), ...); }, static_cast<Derived&>(*this).children());
    }
    template <class V, class S>
    void flush(const Point<V>& p, S& sink) {
        std::apply([&](auto&... child) { (child.flush(p, sink), ...); }, static_cast<Derived&>(*this).children());
    }
    static std::tuple<> children() { return {}; }
};

// A leaf whose value does not depend on the score: no ∂/∂score (a captured tensor adds its own
// gradient in its backprop).
template <class Derived>
struct ScoreFree : Node<Derived> {
    template <class V, class S>
    V backprop(const Point<V>&, V, S&) const {
        return V{};
    }
    template <class V>
    Dual<V> tangent(const Point<V>& p) const {
        return {static_cast<const Derived&>(*this).eval(p), V{}};
    }
};

template <class X>
inline constexpr bool is_mod_v = std::is_base_of_v<NodeTag, std::remove_cvref_t<X>>;

// ---- vector math ------------------------------------------------------------------------------

namespace vm {
template <class V>
V vexp(V x) {
    return detail::vexp<lane_t<V>, static_cast<int>(sizeof(V))>(x);
}
template <class V, class F>
V lanewise(V x, F f) {
    for (int l = 0; l < static_cast<int>(sizeof(V) / sizeof(lane_t<V>)); ++l) x[l] = f(x[l]);
    return x;
}
template <class V>
V splat(double c) {
    return V{} + static_cast<lane_t<V>>(c);
}
template <class V, class M>
V pick(M mask, V a, V b) {
    return detail::select(mask, a, b);
}
// 1 / q for q > 0 (or any normal q): AVX-512's 14-bit reciprocal estimate and one Newton step,
// r + r·(1 − q·r), in place of a division (a vector division costs ~5× an FMA's throughput here);
// within about 1 ulp of the division (the tanh below stays within 4 ulp: tests/test_modifiers.cpp).
template <class V>
V recip(V q) {
    using T = lane_t<V>;
#if defined(__AVX512F__)
    if constexpr (sizeof(T) == 4 && sizeof(V) == 64) {
        __m512 qv;
        std::memcpy(&qv, &q, sizeof qv);
        const __m512 r = _mm512_maskz_rcp14_ps(0xFFFF, qv);  // maskz: GCC 12 warns of the plain form's undefined merge source
        const __m512 e = _mm512_fnmadd_ps(qv, r, _mm512_set1_ps(1.0F));
        const __m512 out = _mm512_fmadd_ps(r, e, r);
        V v;
        std::memcpy(&v, &out, sizeof v);
        return v;
    }
#endif
    return T(1) / q;
}
// tanh. float: x·P(x²)·(1/Q(x²)) (recip) over |x| <= 7.9 and ±1 beyond, the minimax rational of Eigen's fast
// float tanh (16 operations where the exponential form takes twice as many). double: a rational near
// 0 (Cephes; no cancellation) and (1 − e^−2|x|)/(1 + e^−2|x|) beyond 0.625. Both within a few ulp
// (tests/test_modifiers.cpp sweeps the range).
template <class V>
V vtanh(V x) {
    using T = lane_t<V>;
    if constexpr (sizeof(T) == 4) {
        const V z = x * x;
        V p = T(-2.76076847742355e-16) * z + T(2.00018790482477e-13);
        p = p * z + T(-8.60467152213735e-11);
        p = p * z + T(5.12229709037114e-08);
        p = p * z + T(1.48572235717979e-05);
        p = p * z + T(6.37261928875436e-04);
        p = p * z + T(4.89352455891786e-03);
        V q = T(1.19825839466702e-06) * z + T(1.18534705686654e-04);
        q = q * z + T(2.26843463243900e-03);
        q = q * z + T(4.89352518554385e-03);
        const V t = pick(x > T(7.90531110763549805), V{} + T(1), pick(x < T(-7.90531110763549805), V{} - T(1), x * p * recip(q)));
        return pick(x != x, x, t);  // NaN stays NaN
    } else {
        const V ax = pick(x < T(0), -x, x);
        const V e = vexp(ax * T(-2));
        const V far = (T(1) - e) / (T(1) + e);
        const V z = ax * ax;
        const V p = (T(-9.64399179425052238628e-1) * z - T(9.92877231001918586564e1)) * z - T(1.61468768441708447952e3);
        const V q = ((z + T(1.12811678491632931402e2)) * z + T(2.23548839060100448583e3)) * z + T(4.84406305325125486048e3);
        const V t = pick(ax < T(0.625), ax + ax * z * p / q, far);
        return pick(x < T(0), -t, t);
    }
}
template <class V>
V vsigmoid(V x) {
    using T = lane_t<V>;
    return T(1) / (T(1) + vexp(-x));
}
}  // namespace vm

// Sums the first `count` lanes of v in a fixed order.
template <class V>
lane_t<V> lane_sum(V v, int count) {
    using T = lane_t<V>;
    constexpr int W = static_cast<int>(sizeof(V) / sizeof(T));
    if (count == W) return detail::reduce<T, static_cast<int>(sizeof(V))>(v, [](auto a, auto b) { return a + b; });
    T s = 0;
    for (int l = 0; l < count; ++l) s += v[l];
    return s;
}

// ---- leaves -----------------------------------------------------------------------------------
// Every node: uses_score, uses_k (its value varies along a row), is_bool, may_require_grad (a
// captured tensor below may need a gradient), and active = uses_score || may_require_grad (whether
// backprop has anything to do); eval, backprop (adds captured gradients to the sink and returns the
// contribution to ∂/∂score), tangent (value and ∂/∂score in one pass), range over a box, and visit
// (its captured leaves, in order).

struct Score : Node<Score> {
    static constexpr bool uses_score = true, uses_k = false, is_bool = false, may_require_grad = false, active = true;
    template <class V>
    V eval(const Point<V>& p) const {
        return p.s;
    }
    template <class V, class S>
    V backprop(const Point<V>&, V g, S&) const {
        return g;
    }
    template <class V>
    Dual<V> tangent(const Point<V>& p) const {
        return {p.s, vm::splat<V>(1)};
    }
    [[nodiscard]] Interval range(const Box& box) const { return box.s; }
};

// Axis 0: batch b, 1: head h, 2: query q, 3: key k (of the padded rank-4 scores).
template <int Axis>
struct Index : ScoreFree<Index<Axis>> {
    static constexpr bool uses_score = false, uses_k = Axis == 3, is_bool = false, may_require_grad = false, active = false;
    template <class V>
    V eval(const Point<V>& p) const {
        if constexpr (Axis == 0) return p.b;
        else if constexpr (Axis == 1) return p.h;
        else if constexpr (Axis == 2) return p.q;
        else return p.k;
    }
    [[nodiscard]] Interval range(const Box& box) const {
        if constexpr (Axis == 0) return box.b;
        else if constexpr (Axis == 1) return box.h;
        else if constexpr (Axis == 2) return box.q;
        else return box.k;
    }
};

struct Constant : ScoreFree<Constant> {
    static constexpr bool uses_score = false, uses_k = false, is_bool = false, may_require_grad = false, active = false;
    double c;
    explicit Constant(double v) : c(v) {}
    template <class V>
    V eval(const Point<V>&) const {
        return vm::splat<V>(c);
    }
    [[nodiscard]] Interval range(const Box&) const { return {c, c}; }
};

// A tensor (any tensor expression: a Param, a Const, a Tensor, or an expression of them) read at
// indices that are expressions of b, h, q, k. Bound to its evaluated value by Modifier before use.
template <class E, class... I>
struct Captured : ScoreFree<Captured<E, I...>> {
    using value_type = typename E::value_type;
    static constexpr int rank = sizeof...(I);
    static constexpr bool uses_score = false, uses_k = (I::uses_k || ...), is_bool = false,
                          may_require_grad = E::may_require_grad, active = may_require_grad;
    static_assert(!(I::uses_score || ...), "autodiff::at: an index of a captured tensor cannot depend on the score");
    static_assert(!(I::is_bool || ...), "autodiff::at: an index of a captured tensor must be a number, not a comparison");

    E expr;
    std::tuple<I...> idx;
    // Set by Modifier::bind.
    const value_type* data = nullptr;
    std::array<std::int64_t, rank> strides{};
    int slot = -1;  // which of the modifier's gradients, or −1 when none is needed
    Interval values{0, 0};

    Captured(E e, I... i) : expr(std::move(e)), idx(std::move(i)...) {}

    // Along a row the lanes' offsets are often all equal (the index does not depend on k after
    // clamping) or consecutive, up or down (an index k or q − k): then one load or a vector add; else
    // lane by lane.
    template <class V>
    V eval(const Point<V>& p) const {
        using T = lane_t<V>;
        static_assert(std::is_same_v<T, value_type>, "autodiff::at: a captured tensor must have the scores' value type");
        constexpr int W = static_cast<int>(sizeof(V) / sizeof(T));
        if constexpr (!uses_k) {
            return V{} + data[offset_of_lane(p, 0)];
        } else {
            const auto off = offsets(p);
            switch (run_of(off)) {
                case Run::same: return V{} + data[off[0]];
                case Run::up: return detail::load<V>(data + off[0]);
                case Run::down: return reversed(detail::load<V>(data + off[0] - (W - 1)));
                default: break;
            }
            V v;
            for (int l = 0; l < W; ++l) v[l] = data[off[l]];
            return v;
        }
    }
    template <class V, class S>
    V backprop(const Point<V>& p, V g, S& sink) const {
        using T = lane_t<V>;
        constexpr int W = static_cast<int>(sizeof(V) / sizeof(T));
        if constexpr (may_require_grad) {
            if (slot >= 0 && sink.grads) {
                T* grad = sink.grads[slot];
                if constexpr (!uses_k) {
                    grad[offset_of_lane(p, 0)] += lane_sum(g, p.count);
                } else {
                    const auto off = offsets(p);
                    const Run run = p.count == W ? run_of(off) : Run::scattered;
                    if (run == Run::same) {
                        grad[off[0]] += lane_sum(g, W);
                    } else if (run == Run::up) {
                        detail::store(grad + off[0], detail::load<V>(grad + off[0]) + g);
                    } else if (run == Run::down) {
                        T* at = grad + off[0] - (W - 1);
                        detail::store(at, detail::load<V>(at) + reversed(g));
                    } else {
                        for (int l = 0; l < p.count; ++l) grad[off[l]] += g[l];
                    }
                }
            }
        }
        return V{};
    }
    [[nodiscard]] Interval range(const Box&) const { return values; }
    template <class Fn>
    void visit(Fn&& fn) {
        fn(*this);
    }

private:
    template <class V>
    std::int64_t offset_of_lane(const Point<V>& p, int lane) const {
        return offset_impl(p, lane, std::make_index_sequence<rank>{});
    }
    template <class V, std::size_t... N>
    std::int64_t offset_impl(const Point<V>& p, int lane, std::index_sequence<N...>) const {
        return ((static_cast<std::int64_t>(std::get<N>(idx).eval(p)[lane]) * strides[N]) + ... + 0);
    }
    // The lanes' offsets, in 32-bit integer vectors (captured tensors have fewer than 2^31 elements;
    // indices converted with truncation, as a C cast); indices that are constant along the row
    // (those without k) are computed once, as scalars.
    template <class V>
    auto offsets(const Point<V>& p) const {
        constexpr int W = static_cast<int>(sizeof(V) / sizeof(lane_t<V>));
        using IV [[gnu::vector_size(W * sizeof(std::int32_t))]] = std::int32_t;
        IV sum{};
        std::int32_t fixed = 0;
        [&]<std::size_t... N>(std::index_sequence<N...>) {
            (add_index<N>(p, sum, fixed), ...);
        }(std::make_index_sequence<rank>{});
        return sum + fixed;
    }
    template <std::size_t N, class V, class IV>
    void add_index(const Point<V>& p, IV& sum, std::int32_t& fixed) const {
        const auto stride = static_cast<std::int32_t>(strides[N]);
        if constexpr (!std::tuple_element_t<N, std::tuple<I...>>::uses_k) fixed += static_cast<std::int32_t>(std::get<N>(idx).eval(p)[0]) * stride;
        else sum += __builtin_convertvector(std::get<N>(idx).eval(p), IV) * stride;
    }
    enum class Run { same, up, down, scattered };
    template <class IV>
    static Run run_of(IV off) {
        constexpr int W = static_cast<int>(sizeof(IV) / sizeof(std::int32_t));
        IV lane{};
        for (int l = 0; l < W; ++l) lane[l] = l;
        auto zero = [](IV v) {  // by halving, in registers
            return detail::reduce<std::int32_t, static_cast<int>(sizeof(IV))>(v, [](auto a, auto b) { return a | b; }) == 0;
        };
        const IV from_first = off - off[0];
        if (zero(from_first)) return Run::same;
        if (zero(from_first - lane)) return Run::up;
        if (zero(from_first + lane)) return Run::down;
        return Run::scattered;
    }
    template <class V>
    static V reversed(V v) {
        constexpr int W = static_cast<int>(sizeof(V) / sizeof(lane_t<V>));
        return [&]<int... L>(std::integer_sequence<int, L...>) { return V{v[W - 1 - L]...}; }(std::make_integer_sequence<int, W>{});
    }
};

// ---- operations -------------------------------------------------------------------------------
// Each op: f (value), df / da, db (local derivatives, given the arguments), range (interval).

inline Interval hull(std::initializer_list<double> v) {
    for (double x : v)
        if (std::isnan(x)) return {-std::numeric_limits<double>::infinity(), std::numeric_limits<double>::infinity()};
    return {std::min(v), std::max(v)};
}
inline constexpr Interval unknown_bool{0, 1}, always{1, 1}, never{0, 0};
inline const Interval everything{-std::numeric_limits<double>::infinity(), std::numeric_limits<double>::infinity()};

// f(x) and f'(x) of a unary op, together where they share work (tanh, sigmoid, exp).
template <class Op, class V>
Dual<V> value_and_derivative(const Op& op, V x) {
    if constexpr (requires { op.fdf(x); }) return op.fdf(x);
    else return {op.f(x), op.df(x)};
}

// Which arguments a binary op's local derivatives read: da(a, b) and db(a, b) (the backward evaluates
// only those).
template <bool DaA, bool DaB, bool DbA, bool DbB>
struct Reads {
    static constexpr bool da_reads_a = DaA, da_reads_b = DaB, db_reads_a = DbA, db_reads_b = DbB;
};

struct NegOp {
    static constexpr bool differentiable = true, boolean = false;
    template <class V> static V f(V x) { return -x; }
    template <class V> static V df(V x) { return vm::splat<V>(-1) + x * lane_t<V>(0); }
    static Interval range(Interval a) { return {-a.hi, -a.lo}; }
};
struct AbsOp {
    static constexpr bool differentiable = true, boolean = false;
    template <class V> static V f(V x) { return vm::pick(x < lane_t<V>(0), -x, x); }
    // sign(x), 0 at 0 (as the generic abs)
    template <class V> static V df(V x) {
        using T = lane_t<V>;
        return vm::pick(x < T(0), vm::splat<V>(-1), vm::pick(x > T(0), vm::splat<V>(1), V{}));
    }
    static Interval range(Interval a) {
        if (a.lo >= 0) return a;
        if (a.hi <= 0) return {-a.hi, -a.lo};
        return {0, std::max(-a.lo, a.hi)};
    }
};
struct ExpOp {
    static constexpr bool differentiable = true, boolean = false;
    template <class V> static V f(V x) { return vm::vexp(x); }
    template <class V> static V df(V x) { return vm::vexp(x); }
    template <class V> static Dual<V> fdf(V x) {
        const V e = vm::vexp(x);
        return {e, e};
    }
    static Interval range(Interval a) { return hull({std::exp(a.lo), std::exp(a.hi)}); }
};
struct LogOp {
    static constexpr bool differentiable = true, boolean = false;
    template <class V> static V f(V x) { return vm::lanewise(x, [](auto v) { return std::log(v); }); }
    template <class V> static V df(V x) { return lane_t<V>(1) / x; }
    static Interval range(Interval a) { return a.lo < 0 ? everything : hull({std::log(a.lo), std::log(a.hi)}); }
};
struct TanhOp {
    static constexpr bool differentiable = true, boolean = false;
    template <class V> static V f(V x) { return vm::vtanh(x); }
    template <class V> static V df(V x) { return fdf(x).d; }
    template <class V> static Dual<V> fdf(V x) {
        const V t = vm::vtanh(x);
        return {t, lane_t<V>(1) - t * t};
    }
    static Interval range(Interval a) { return hull({std::tanh(a.lo), std::tanh(a.hi)}); }
};
struct SigmoidOp {
    static constexpr bool differentiable = true, boolean = false;
    template <class V> static V f(V x) { return vm::vsigmoid(x); }
    template <class V> static V df(V x) { return fdf(x).d; }
    template <class V> static Dual<V> fdf(V x) {
        const V y = vm::vsigmoid(x);
        return {y, y * (lane_t<V>(1) - y)};
    }
    static Interval range(Interval a) { return hull({1 / (1 + std::exp(-a.lo)), 1 / (1 + std::exp(-a.hi))}); }
};
struct ReluOp {
    static constexpr bool differentiable = true, boolean = false;
    template <class V> static V f(V x) { return vm::pick(x < lane_t<V>(0), V{}, x); }
    template <class V> static V df(V x) { return vm::pick(x <= lane_t<V>(0), V{}, vm::splat<V>(1)); }
    static Interval range(Interval a) { return {std::max(a.lo, 0.0), std::max(a.hi, 0.0)}; }
};
struct PowOp {
    static constexpr bool differentiable = true, boolean = false;
    double p;
    template <class V> V f(V x) const {
        return vm::lanewise(x, [p = static_cast<lane_t<V>>(p)](auto v) { return std::pow(v, p); });
    }
    template <class V> V df(V x) const {
        return vm::lanewise(x, [p = static_cast<lane_t<V>>(p)](auto v) { return p * std::pow(v, p - 1); });
    }
    [[nodiscard]] Interval range(Interval) const { return everything; }
};
struct NotOp {
    static constexpr bool differentiable = false, boolean = true;
    template <class V> static V f(V x) { return lane_t<V>(1) - x; }
    template <class V> static V df(V) { return V{}; }
    static Interval range(Interval a) { return {1 - a.hi, 1 - a.lo}; }
};

struct AddOp : Reads<false, false, false, false> {
    static constexpr bool differentiable = true, boolean = false;
    template <class V> static V f(V a, V b) { return a + b; }
    template <class V> static V da(V, V) { return vm::splat<V>(1); }
    template <class V> static V db(V, V) { return vm::splat<V>(1); }
    static Interval range(Interval a, Interval b) { return hull({a.lo + b.lo, a.hi + b.hi}); }
};
struct SubOp : Reads<false, false, false, false> {
    static constexpr bool differentiable = true, boolean = false;
    template <class V> static V f(V a, V b) { return a - b; }
    template <class V> static V da(V, V) { return vm::splat<V>(1); }
    template <class V> static V db(V, V) { return vm::splat<V>(-1); }
    static Interval range(Interval a, Interval b) { return hull({a.lo - b.hi, a.hi - b.lo}); }
};
struct MulOp : Reads<false, true, true, false> {
    static constexpr bool differentiable = true, boolean = false;
    template <class V> static V f(V a, V b) { return a * b; }
    template <class V> static V da(V, V b) { return b; }
    template <class V> static V db(V a, V) { return a; }
    static Interval range(Interval a, Interval b) { return hull({a.lo * b.lo, a.lo * b.hi, a.hi * b.lo, a.hi * b.hi}); }
};
struct DivOp : Reads<false, true, true, true> {
    static constexpr bool differentiable = true, boolean = false;
    template <class V> static V f(V a, V b) { return a / b; }
    template <class V> static V da(V, V b) { return lane_t<V>(1) / b; }
    template <class V> static V db(V a, V b) { return -a / (b * b); }
    static Interval range(Interval a, Interval b) {
        if (b.lo <= 0 && b.hi >= 0) return everything;
        return hull({a.lo / b.lo, a.lo / b.hi, a.hi / b.lo, a.hi / b.hi});
    }
};
// min/max: the gradient goes to a on ties.
struct MinOp : Reads<true, true, true, true> {
    static constexpr bool differentiable = true, boolean = false;
    template <class V> static V f(V a, V b) { return vm::pick(b < a, b, a); }
    template <class V> static V da(V a, V b) { return vm::pick(b < a, V{}, vm::splat<V>(1)); }
    template <class V> static V db(V a, V b) { return vm::pick(b < a, vm::splat<V>(1), V{}); }
    static Interval range(Interval a, Interval b) { return {std::min(a.lo, b.lo), std::min(a.hi, b.hi)}; }
};
struct MaxOp : Reads<true, true, true, true> {
    static constexpr bool differentiable = true, boolean = false;
    template <class V> static V f(V a, V b) { return vm::pick(b > a, b, a); }
    template <class V> static V da(V a, V b) { return vm::pick(b > a, V{}, vm::splat<V>(1)); }
    template <class V> static V db(V a, V b) { return vm::pick(b > a, vm::splat<V>(1), V{}); }
    static Interval range(Interval a, Interval b) { return {std::max(a.lo, b.lo), std::max(a.hi, b.hi)}; }
};

// Comparisons and logic give 0 or 1 and have no gradient.
template <class Derived>
struct Predicate : Reads<false, false, false, false> {
    static constexpr bool differentiable = false, boolean = true;
    template <class V> static V da(V, V) { return V{}; }
    template <class V> static V db(V, V) { return V{}; }
    template <class V> static V f(V a, V b) { return vm::pick(Derived::test(a, b), vm::splat<V>(1), V{}); }
};
struct LtOp : Predicate<LtOp> {
    template <class V> static auto test(V a, V b) { return a < b; }
    static Interval range(Interval a, Interval b) { return a.hi < b.lo ? always : a.lo >= b.hi ? never : unknown_bool; }
};
struct LeOp : Predicate<LeOp> {
    template <class V> static auto test(V a, V b) { return a <= b; }
    static Interval range(Interval a, Interval b) { return a.hi <= b.lo ? always : a.lo > b.hi ? never : unknown_bool; }
};
struct EqOp : Predicate<EqOp> {
    template <class V> static auto test(V a, V b) { return a == b; }
    static Interval range(Interval a, Interval b) {
        if (a.lo == a.hi && b.lo == b.hi && a.lo == b.lo) return always;
        return a.hi < b.lo || b.hi < a.lo ? never : unknown_bool;
    }
};
struct NeOp : Predicate<NeOp> {
    template <class V> static auto test(V a, V b) { return a != b; }
    static Interval range(Interval a, Interval b) { return NotOp::range(EqOp::range(a, b)); }
};
struct AndOp : Predicate<AndOp> {
    template <class V> static V f(V a, V b) { return a * b; }
    static Interval range(Interval a, Interval b) { return {std::min(a.lo, b.lo), std::min(a.hi, b.hi)}; }
};
struct OrOp : Predicate<OrOp> {
    template <class V> static V f(V a, V b) { return vm::pick(b > a, b, a); }
    static Interval range(Interval a, Interval b) { return {std::max(a.lo, b.lo), std::max(a.hi, b.hi)}; }
};

template <class Op, class X>
struct Unary : Node<Unary<Op, X>> {
    static constexpr bool uses_score = X::uses_score, uses_k = X::uses_k, is_bool = Op::boolean,
                          may_require_grad = Op::differentiable && X::may_require_grad,
                          active = Op::differentiable && X::active;
    Op op;
    X x;
    Unary(Op o, X c) : op(o), x(std::move(c)) {}
    template <class V>
    V eval(const Point<V>& p) const {
        return op.f(x.eval(p));
    }
    template <class V, class S>
    V backprop(const Point<V>& p, V g, S& sink) const {
        if constexpr (!active) return V{};
        else return x.backprop(p, g * op.df(x.eval(p)), sink);
    }
    template <class V>
    Dual<V> tangent(const Point<V>& p) const {
        if constexpr (!uses_score || !Op::differentiable) {
            return {eval(p), V{}};
        } else {
            const Dual<V> in = x.tangent(p);
            const Dual<V> out = value_and_derivative(op, in.value);
            return {out.value, out.d * in.d};
        }
    }
    [[nodiscard]] Interval range(const Box& box) const { return op.range(x.range(box)); }
    auto children() { return std::tie(x); }
};

template <class Op, class A, class B>
struct Binary : Node<Binary<Op, A, B>> {
    using op_type = Op;
    static constexpr bool uses_score = A::uses_score || B::uses_score, uses_k = A::uses_k || B::uses_k, is_bool = Op::boolean,
                          may_require_grad = Op::differentiable && (A::may_require_grad || B::may_require_grad),
                          active = Op::differentiable && (A::active || B::active);
    A a;
    B b;
    Binary(A x, B y) : a(std::move(x)), b(std::move(y)) {}
    template <class V>
    V eval(const Point<V>& p) const {
        return Op::f(a.eval(p), b.eval(p));
    }
    // Only the operands the local derivatives read are evaluated (a + b reads neither).
    template <class V, class S>
    V backprop(const Point<V>& p, V g, S& sink) const {
        V ds{};
        if constexpr (active) {
            V av{}, bv{};
            if constexpr ((A::active && Op::da_reads_a) || (B::active && Op::db_reads_a)) av = a.eval(p);
            if constexpr ((A::active && Op::da_reads_b) || (B::active && Op::db_reads_b)) bv = b.eval(p);
            if constexpr (A::active) ds += a.backprop(p, g * Op::da(av, bv), sink);
            if constexpr (B::active) ds += b.backprop(p, g * Op::db(av, bv), sink);
        }
        return ds;
    }
    template <class V>
    Dual<V> tangent(const Point<V>& p) const {
        if constexpr (!uses_score || !Op::differentiable) {
            return {eval(p), V{}};
        } else {
            const Dual<V> x = a.tangent(p), y = b.tangent(p);
            V d{};
            if constexpr (A::uses_score) d += Op::da(x.value, y.value) * x.d;
            if constexpr (B::uses_score) d += Op::db(x.value, y.value) * y.d;
            return {Op::f(x.value, y.value), d};
        }
    }
    [[nodiscard]] Interval range(const Box& box) const { return Op::range(a.range(box), b.range(box)); }
    auto children() { return std::tie(a, b); }
};

// F with the score replaced by G's value: a score function applied after another one.
template <class F, class G>
struct Compose : Node<Compose<F, G>> {
    static constexpr bool uses_score = F::uses_score && G::uses_score, uses_k = F::uses_k || (F::uses_score && G::uses_k),
                          is_bool = F::is_bool, may_require_grad = F::may_require_grad || (F::uses_score && G::may_require_grad),
                          active = F::may_require_grad || (F::uses_score && G::active);
    F outer;
    G inner;
    Compose(F f, G g) : outer(std::move(f)), inner(std::move(g)) {}
    template <class V>
    V eval(const Point<V>& p) const {
        Point<V> at = p;
        at.s = inner.eval(p);
        return outer.eval(at);
    }
    template <class V, class S>
    V backprop(const Point<V>& p, V g, S& sink) const {
        Point<V> at = p;
        at.s = inner.eval(p);
        const V ds = outer.backprop(at, g, sink);
        if constexpr (F::uses_score && G::active) return inner.backprop(p, ds, sink);
        else return V{};
    }
    template <class V>
    Dual<V> tangent(const Point<V>& p) const {
        const Dual<V> g = inner.tangent(p);
        Point<V> at = p;
        at.s = g.value;
        const Dual<V> f = outer.tangent(at);
        return {f.value, f.d * g.d};
    }
    [[nodiscard]] Interval range(const Box& box) const {
        Box at = box;
        at.s = inner.range(box);
        return outer.range(at);
    }
    auto children() { return std::tie(outer, inner); }
};

// F ∘ G, with the identity (Score) folded away.
template <class F, class G>
auto compose(F f, G g) {
    if constexpr (std::is_same_v<G, Score>) return f;
    else if constexpr (std::is_same_v<F, Score>) return g;
    else return Compose<F, G>(std::move(f), std::move(g));
}

// Whether a node's backprop reads the score's value: whether its local derivatives depend on it.
// When they do not (x + a relative-position table, x + ALiBi), the kernels keep S instead of x for
// the backward (AttentionModifier::backward_reads_scores). Conservative (true) for any other node
// that uses the score.
template <class E>
struct BackpropReadsScore : std::bool_constant<E::uses_score> {};
template <>
struct BackpropReadsScore<Score> : std::false_type {};
template <class Op, class X>
struct BackpropReadsScore<Unary<Op, X>> {
    static constexpr bool value = Unary<Op, X>::active && (X::uses_score || BackpropReadsScore<X>::value);
};
template <class Op, class A, class B>
struct BackpropReadsScore<Binary<Op, A, B>> {
    static constexpr bool reads() {
        if constexpr (!Binary<Op, A, B>::active) {
            return false;
        } else {  // as Binary::backprop: the operands its local derivatives read, then its children
            constexpr bool eval_a = (A::active && Op::da_reads_a) || (B::active && Op::db_reads_a);
            constexpr bool eval_b = (A::active && Op::da_reads_b) || (B::active && Op::db_reads_b);
            return (eval_a && A::uses_score) || (eval_b && B::uses_score) || (A::active && BackpropReadsScore<A>::value) ||
                   (B::active && BackpropReadsScore<B>::value);
        }
    }
    static constexpr bool value = reads();
};

// ---- row hoisting ----------------------------------------------------------------------------
// Along a row of a tile b, h and q are fixed: a sub-expression that uses neither the score nor k
// (sigmoid(at(gate, h_idx)), at(slopes, h_idx), q_idx + R) has one value for the whole row. hoist(e, p)
// is e with its largest such sub-expressions evaluated once for the row (Hoisted) and every other leaf
// used by reference (Ref). A hoisted sub-expression's upstream gradients are summed over the row
// (every lane sees the same partial derivatives) and propagated once by flush() at the row's end.

template <class E, class V>
struct Hoisted : Node<Hoisted<E, V>> {
    static constexpr bool uses_score = false, uses_k = false, is_bool = E::is_bool, may_require_grad = E::may_require_grad,
                          active = E::may_require_grad;
    const E* e;
    V value;
    mutable V acc{};  // Σ of the upstream gradients over the row
    Hoisted(const E* expr, V v) : e(expr), value(v) {}
    V eval(const Point<V>&) const { return value; }
    template <class S>
    V backprop(const Point<V>&, V g, S&) const {
        if constexpr (active) acc += g;
        return V{};
    }
    Dual<V> tangent(const Point<V>&) const { return {value, V{}}; }
    [[nodiscard]] Interval range(const Box& box) const { return e->range(box); }
    template <class S>
    void flush(const Point<V>& p, S& sink) {
        if constexpr (active) {
            Point<V> all = p;  // acc sums whole vectors: every lane counts
            all.count = static_cast<int>(sizeof(V) / sizeof(lane_t<V>));
            e->backprop(all, acc, sink);
            acc = V{};
        }
    }
};

template <class E>
struct Ref : Node<Ref<E>> {
    static constexpr bool uses_score = E::uses_score, uses_k = E::uses_k, is_bool = E::is_bool, may_require_grad = E::may_require_grad,
                          active = E::active;
    const E* e;
    explicit Ref(const E* expr) : e(expr) {}
    template <class V>
    V eval(const Point<V>& p) const {
        return e->eval(p);
    }
    template <class V, class S>
    V backprop(const Point<V>& p, V g, S& sink) const {
        return e->backprop(p, g, sink);
    }
    template <class V>
    Dual<V> tangent(const Point<V>& p) const {
        return e->tangent(p);
    }
    [[nodiscard]] Interval range(const Box& box) const { return e->range(box); }
};

template <class E>
inline constexpr bool row_constant_v = !E::uses_score && !E::uses_k;

// A value fixed for the row that no gradient flows into: the reciprocal of a constant divisor.
template <class V>
struct RowValue : Node<RowValue<V>> {
    static constexpr bool uses_score = false, uses_k = false, is_bool = false, may_require_grad = false, active = false;
    V value;
    explicit RowValue(V v) : value(v) {}
    V eval(const Point<V>&) const { return value; }
    template <class S>
    V backprop(const Point<V>&, V, S&) const {
        return V{};
    }
    Dual<V> tangent(const Point<V>&) const { return {value, V{}}; }
};

// a / b with b fixed along the row and needing no gradient (soft-capping's score / c): a · (1/b),
// the reciprocal taken once per row, so the tile loops run no vector division (f, and ∂f/∂a = 1/b).
template <class E>
struct DividesByRowConstant : std::false_type {};
template <class A, class B>
struct DividesByRowConstant<Binary<DivOp, A, B>> : std::bool_constant<row_constant_v<B> && !B::may_require_grad && !row_constant_v<A>> {};

// ∂f/∂score from f's value alone: f a chain of steps by numbers (· ÷ + −, neg) around at most one of
// tanh (1 − t²), sigmoid (y(1 − y)) and exp (y). The affine steps are inverted on the way in (y / c for
// y = c·u). AttentionModifier::derivative_from_value.
template <class E>
struct FromValue {
    static constexpr bool value = false, affine = false;
};
template <>
struct FromValue<Score> {
    static constexpr bool value = true, affine = true;
    template <class V>
    static V d(const Score&, V) {
        return vm::splat<V>(1);
    }
};
template <class X>
struct FromValue<Unary<NegOp, X>> {
    static constexpr bool value = FromValue<X>::value, affine = FromValue<X>::affine;
    template <class V>
    static V d(const Unary<NegOp, X>& e, V y) {
        return -FromValue<X>::d(e.x, -y);
    }
};
// y = u·c, c·u, u / c, u + c, c + u, u − c, c − u
template <class Op, class X, bool ConstantFirst>
struct FromValueAffine {
    static constexpr bool value = FromValue<X>::value, affine = FromValue<X>::affine;
    template <class V, class E>
    static V d(const E& e, V y) {
        using T = lane_t<V>;
        const double c = [&] {
            if constexpr (ConstantFirst) return e.a.c;
            else return e.b.c;
        }();
        const X& x = [&]() -> const X& {
            if constexpr (ConstantFirst) return e.b;
            else return e.a;
        }();
        if constexpr (std::is_same_v<Op, MulOp>) {
            if (c == 0) return V{};
            return static_cast<T>(c) * FromValue<X>::d(x, y * static_cast<T>(1.0 / c));
        } else if constexpr (std::is_same_v<Op, DivOp>) {
            return static_cast<T>(1.0 / c) * FromValue<X>::d(x, y * static_cast<T>(c));
        } else if constexpr (std::is_same_v<Op, AddOp>) {
            return FromValue<X>::d(x, y - static_cast<T>(c));
        } else if constexpr (ConstantFirst) {  // c − u
            return -FromValue<X>::d(x, static_cast<T>(c) - y);
        } else {  // u − c
            return FromValue<X>::d(x, y + static_cast<T>(c));
        }
    }
};
template <class X>
struct FromValue<Binary<MulOp, X, Constant>> : FromValueAffine<MulOp, X, false> {};
template <class X>
struct FromValue<Binary<MulOp, Constant, X>> : FromValueAffine<MulOp, X, true> {};
template <class X>
struct FromValue<Binary<DivOp, X, Constant>> : FromValueAffine<DivOp, X, false> {};
template <class X>
struct FromValue<Binary<AddOp, X, Constant>> : FromValueAffine<AddOp, X, false> {};
template <class X>
struct FromValue<Binary<AddOp, Constant, X>> : FromValueAffine<AddOp, X, true> {};
template <class X>
struct FromValue<Binary<SubOp, X, Constant>> : FromValueAffine<SubOp, X, false> {};
template <class X>
struct FromValue<Binary<SubOp, Constant, X>> : FromValueAffine<SubOp, X, true> {};
template <>
struct FromValue<Binary<MulOp, Constant, Constant>> : FromValue<void> {};
template <>
struct FromValue<Binary<DivOp, Constant, Constant>> : FromValue<void> {};
template <>
struct FromValue<Binary<AddOp, Constant, Constant>> : FromValue<void> {};
template <>
struct FromValue<Binary<SubOp, Constant, Constant>> : FromValue<void> {};
// y = g(u), u affine in the score: g'(u) from y.
template <class Op, class X>
struct FromValueCurve {
    static constexpr bool value = FromValue<X>::affine, affine = false;
    template <class V>
    static V d(const Unary<Op, X>& e, V y) {
        using T = lane_t<V>;
        V local;
        if constexpr (std::is_same_v<Op, TanhOp>) local = T(1) - y * y;
        else if constexpr (std::is_same_v<Op, SigmoidOp>) local = y * (T(1) - y);
        else local = y;  // exp
        return local * FromValue<X>::d(e.x, V{});
    }
};
template <class X>
struct FromValue<Unary<TanhOp, X>> : FromValueCurve<TanhOp, X> {};
template <class X>
struct FromValue<Unary<SigmoidOp, X>> : FromValueCurve<SigmoidOp, X> {};
template <class X>
struct FromValue<Unary<ExpOp, X>> : FromValueCurve<ExpOp, X> {};

// f = score·a or a·score with a fixed along a row (no score, no k) and needing a gradient (a gate):
// AttentionModifier::row_scaled. factor(f) is a.
template <class F>
struct RowScaled : std::false_type {};
template <class A>
struct RowScaled<Binary<MulOp, Score, A>> : std::bool_constant<row_constant_v<A> && A::may_require_grad> {
    static const A& factor(const Binary<MulOp, Score, A>& f) { return f.b; }
};
template <class A>
struct RowScaled<Binary<MulOp, A, Score>> : std::bool_constant<row_constant_v<A> && A::may_require_grad> {
    static const A& factor(const Binary<MulOp, A, Score>& f) { return f.a; }
};
template <>
struct RowScaled<Binary<MulOp, Score, Score>> : std::false_type {};

template <class V, class E>
auto hoist(const E& e, const Point<V>& p) {
    if constexpr (row_constant_v<E>) {
        return Hoisted<E, V>(&e, e.eval(p));
    } else if constexpr (DividesByRowConstant<E>::value) {
        auto a = hoist(e.a, p);
        return Binary<MulOp, decltype(a), RowValue<V>>(std::move(a), RowValue<V>(lane_t<V>(1) / e.b.eval(p)));
    } else if constexpr (requires { e.op; e.x; }) {
        auto x = hoist(e.x, p);
        return Unary<std::remove_cvref_t<decltype(e.op)>, decltype(x)>(e.op, std::move(x));
    } else if constexpr (requires { e.a; e.b; }) {
        auto a = hoist(e.a, p);
        auto b = hoist(e.b, p);
        return Binary<typename E::op_type, decltype(a), decltype(b)>(std::move(a), std::move(b));
    } else if constexpr (requires { e.outer; e.inner; }) {
        auto outer = hoist(e.outer, p);
        auto inner = hoist(e.inner, p);
        return Compose<decltype(outer), decltype(inner)>(std::move(outer), std::move(inner));
    } else {
        return Ref<E>(&e);
    }
}

// ---- builders ---------------------------------------------------------------------------------

template <class X>
auto lift(const X& x) {
    if constexpr (is_mod_v<X>) return x;
    else return Constant(static_cast<double>(x));
}
template <class X>
using lift_t = decltype(lift(std::declval<const X&>()));

template <class A, class B>
concept Operands = (is_mod_v<A> || is_mod_v<B>) && (is_mod_v<A> || std::is_arithmetic_v<A>) && (is_mod_v<B> || std::is_arithmetic_v<B>);

template <class Op, class A, class B>
auto binary(const A& a, const B& b) {
    using LA = lift_t<A>;
    using LB = lift_t<B>;
    if constexpr (Op::boolean && !std::is_same_v<Op, AndOp> && !std::is_same_v<Op, OrOp>)
        static_assert(!LA::is_bool && !LB::is_bool, "autodiff: compare numbers, not comparisons (combine those with & | !)");
    if constexpr (std::is_same_v<Op, AndOp> || std::is_same_v<Op, OrOp>)
        static_assert(LA::is_bool && LB::is_bool, "autodiff: & and | combine comparisons (e.g. (q_idx >= k_idx) & (q_idx - k_idx < w))");
    if constexpr (!Op::boolean)
        static_assert(!LA::is_bool && !LB::is_bool, "autodiff: arithmetic on a comparison; comparisons only combine with & | !");
    return Binary<Op, LA, LB>(lift(a), lift(b));
}
template <class Op, class X>
auto unary(Op op, const X& x) {
    static_assert(Op::boolean == X::is_bool, "autodiff: ! applies to comparisons, the other functions to numbers");
    return Unary<Op, X>(op, x);
}

}  // namespace modifier

// ---- what users write -------------------------------------------------------------------------

// The placeholders: the score s and the indices of the padded rank-4 scores (batch, heads, Lq, Lk)
// (rank-3 scores (x, Lq, Lk) are (1, x, Lq, Lk): their leading index is h_idx).
inline constexpr modifier::Score score{};
inline constexpr modifier::Index<0> b_idx{};
inline constexpr modifier::Index<1> h_idx{};
inline constexpr modifier::Index<2> q_idx{};
inline constexpr modifier::Index<3> k_idx{};

template <class X>
concept ModExpr = modifier::is_mod_v<X>;

// tensor[i0, i1, ...] with index expressions, one per dimension of the tensor: ad::at(slopes, ad::h_idx),
// ad::at(table, ad::h_idx, ad::clamp(ad::q_idx - ad::k_idx + R, 0, 2 * R)), ad::at(seg, ad::b_idx, ad::k_idx).
// A Param (or any expression of Params) gets its gradient; numbers are allowed as indices.
template <ExprLike X, class... I>
    requires((ModExpr<I> || std::is_integral_v<I>) && ...)
auto at(const X& tensor, const I&... index) {
    auto e = as_expr(tensor);
    if (e.shape().rank() != static_cast<int>(sizeof...(I)))
        fail("at", "tensor {} has rank {} but {} indices were given", e.shape(), e.shape().rank(), sizeof...(I));
    return modifier::Captured<decltype(e), modifier::lift_t<I>...>(std::move(e), modifier::lift(index)...);
}

namespace modifier {
// The operators live with the node types, where argument-dependent lookup finds them.
template <class A, class B> requires Operands<A, B> auto operator+(const A& a, const B& b) { return binary<AddOp>(a, b); }
template <class A, class B> requires Operands<A, B> auto operator-(const A& a, const B& b) { return binary<SubOp>(a, b); }
template <class A, class B> requires Operands<A, B> auto operator*(const A& a, const B& b) { return binary<MulOp>(a, b); }
template <class A, class B> requires Operands<A, B> auto operator/(const A& a, const B& b) { return binary<DivOp>(a, b); }
template <class A, class B> requires Operands<A, B> auto operator<(const A& a, const B& b) { return binary<LtOp>(a, b); }
template <class A, class B> requires Operands<A, B> auto operator<=(const A& a, const B& b) { return binary<LeOp>(a, b); }
template <class A, class B> requires Operands<A, B> auto operator>(const A& a, const B& b) { return binary<LtOp>(b, a); }
template <class A, class B> requires Operands<A, B> auto operator>=(const A& a, const B& b) { return binary<LeOp>(b, a); }
template <class A, class B> requires Operands<A, B> auto operator==(const A& a, const B& b) { return binary<EqOp>(a, b); }
template <class A, class B> requires Operands<A, B> auto operator!=(const A& a, const B& b) { return binary<NeOp>(a, b); }
template <class A, class B> requires Operands<A, B> auto operator&(const A& a, const B& b) { return binary<AndOp>(a, b); }
template <class A, class B> requires Operands<A, B> auto operator|(const A& a, const B& b) { return binary<OrOp>(a, b); }
template <class X> requires is_mod_v<X> auto operator!(const X& x) { return unary(NotOp{}, x); }
template <class X> requires is_mod_v<X> auto operator-(const X& x) { return unary(NegOp{}, x); }
}  // namespace modifier

template <class A, class B> requires modifier::Operands<A, B> auto min(const A& a, const B& b) { return modifier::binary<modifier::MinOp>(a, b); }
template <class A, class B> requires modifier::Operands<A, B> auto max(const A& a, const B& b) { return modifier::binary<modifier::MaxOp>(a, b); }
template <ModExpr X, class L, class H> auto clamp(const X& x, const L& lo, const H& hi) { return min(max(x, lo), hi); }

template <ModExpr X> auto neg(const X& x) { return modifier::unary(modifier::NegOp{}, x); }
template <ModExpr X> auto abs(const X& x) { return modifier::unary(modifier::AbsOp{}, x); }
template <ModExpr X> auto exp(const X& x) { return modifier::unary(modifier::ExpOp{}, x); }
template <ModExpr X> auto log(const X& x) { return modifier::unary(modifier::LogOp{}, x); }
template <ModExpr X> auto tanh(const X& x) { return modifier::unary(modifier::TanhOp{}, x); }
template <ModExpr X> auto sigmoid(const X& x) { return modifier::unary(modifier::SigmoidOp{}, x); }
template <ModExpr X> auto relu(const X& x) { return modifier::unary(modifier::ReluOp{}, x); }
template <ModExpr X, Scalar P> auto pow(const X& x, P p) { return modifier::unary(modifier::PowOp{static_cast<double>(p)}, x); }

// Ready-made modifiers.
// Soft-capping (Gemma 2): c·tanh(s / c).
inline auto soft_cap(double c) {
    if (!(c > 0) || !std::isfinite(c)) fail("soft_cap", "cap must be finite and positive, got {}", c);
    return tanh(score / c) * c;
}
// ALiBi's linear bias slope_h·(k − q), slopes (heads) a tensor (a Param to learn them).
template <ExprLike S>
auto alibi(const S& slopes) {
    return at(slopes, h_idx) * (k_idx - q_idx);
}
// Keys within w of the query on either side: |q − k| <= w.
inline auto sliding_window(std::int64_t w) {
    if (w < 0) fail("sliding_window", "width must be >= 0, got {}", w);
    return abs(q_idx - k_idx) <= w;
}
// The query and the w − 1 keys before it: k <= q and q − k < w (causal sliding window of w keys).
inline auto causal_window(std::int64_t w) {
    if (w < 1) fail("causal_window", "width must be >= 1 (the query's own key), got {}", w);
    return (k_idx <= q_idx) & (q_idx - k_idx < w);
}
// Causal as a mask function (ad::causal is the equivalent Mask): k <= q.
inline auto causal_fn() { return k_idx <= q_idx; }
// Document masking: query and key in the same segment; seg (batch, L) holds segment ids (numbers).
template <ExprLike S>
auto same_segment(const S& seg) {
    return at(seg, b_idx, q_idx) == at(seg, b_idx, k_idx);
}
// Prefix-LM: the first prefix[b] keys are visible to every query, the rest causally.
template <ExprLike S>
auto prefix_lm(const S& prefix) {
    return (k_idx <= q_idx) | (k_idx < at(prefix, b_idx));
}

namespace modifier {

// The score function of a modifier that only masks.
struct NoScoreFn {};

template <class M>
constexpr bool is_mask() {
    if constexpr (is_mod_v<M>) return std::remove_cvref_t<M>::is_bool && !std::remove_cvref_t<M>::uses_score;
    else return false;
}
template <class M>
inline constexpr bool is_mask_v = is_mask<M>();

// An AttentionModifier generated from a score function F (or NoScoreFn) and a mask M (or NoMaskFn),
// bound to the values of its captured tensors. Built when the expression is evaluated; copied into
// the backward's closure (the captured values are shared tensor handles).
template <class T, class F, class M>
class Modifier final : public AttentionModifier<T> {
    using V = typename detail::Simd<T, detail::simd_bytes>::type;
    static constexpr int W = detail::Simd<T, detail::simd_bytes>::lanes;
    static constexpr bool has_fn = !std::is_same_v<F, NoScoreFn>, has_mask = !std::is_same_v<M, NoMaskFn>;

public:
    // Evaluates the captured tensors (recording on ctx's tape like any operand) and checks that every
    // index stays inside its tensor over the scores `scores` (rank 2..4).
    Modifier(const char* op, F f, M m, bool bias_inside, const Shape& scores, EvalContext& ctx)
        : f_(std::move(f)), m_(std::move(m)), bias_inside_(bias_inside) {
        if (scores.rank() < 2) fail(op, "scores must have rank 2 to 4, got {}", scores);
        const auto p = scores.padded();
        B_ = p[0], H_ = p[1], Lq_ = p[2], Lk_ = p[3];
        if constexpr (has_fn) bind(op, f_, ctx, true, scores);
        if constexpr (has_mask) bind(op, m_, ctx, false, scores);
    }

    [[nodiscard]] bool modifies_scores() const override { return has_fn; }
    [[nodiscard]] bool masks() const override { return has_mask; }
    [[nodiscard]] bool bias_inside() const override { return bias_inside_; }
    [[nodiscard]] const std::vector<Shape>& gradient_shapes() const override { return grad_shapes_; }
    // The gradient targets of the captured tensors, in the order of gradient_shapes().
    [[nodiscard]] const std::vector<GradTarget<T>>& targets() const { return targets_; }

    [[nodiscard]] bool needs_reverse() const override { return !targets_.empty(); }
    [[nodiscard]] bool backward_reads_scores() const override {
        if constexpr (has_fn) return BackpropReadsScore<F>::value;
        else return false;
    }
    [[nodiscard]] bool derivative_from_value() const override {
        if constexpr (has_fn) return FromValue<F>::value;
        else return false;
    }
    void derivative_at_value(const ScoreTile& tile, T* fd, std::int64_t ld) const override {
        if constexpr (has_fn && FromValue<F>::value)
            for (std::int64_t r = 0; r < tile.rows; ++r)
                for (std::int64_t c = 0; c < tile.cols; c += W) {
                    T* at = fd + r * ld + c;
                    const int count = static_cast<int>(std::min<std::int64_t>(W, tile.cols - c));
                    const V y = count == W ? detail::load<V>(at) : detail::load_first(at, count, T(0));
                    // f = −∞ (masked) or NaN (S = −∞ less an additive −∞): dS is 0 there
                    put(at, vm::pick((y == -std::numeric_limits<T>::infinity()) | (y != y), V{}, FromValue<F>::d(f_, y)), count);
                }
    }
    [[nodiscard]] bool row_scaled() const override {
        if constexpr (has_fn) return RowScaled<F>::value;
        else return false;
    }
    void row_factors(const ScoreTile& tile, T* a) const override {
        if constexpr (has_fn && RowScaled<F>::value)
            for (std::int64_t r = 0; r < tile.rows; ++r) a[r] = RowScaled<F>::factor(f_).eval(row_only(tile, r))[0];
    }
    void row_factor_backward(const ScoreTile& tile, const T* rsum, T* const* grads) const override {
        if constexpr (has_fn && RowScaled<F>::value) {
            Sink<T> sink{grads};
            for (std::int64_t r = 0; r < tile.rows; ++r) (void)RowScaled<F>::factor(f_).backprop(row_only(tile, r), V{} + rsum[r], sink);
        }
    }
    // Throws if a captured tensor was written into since the modifier was built (a backward reads them).
    void check_saved(const char* op) const {
        for (const Saved<T>& v : values_) (void)v.get(op, "captured tensor");
    }

    void modify(const ScoreTile& tile, const T* x, std::int64_t ldx, T* s, std::int64_t lds) const override {
        if constexpr (has_fn)
            for (std::int64_t r = 0; r < tile.rows; ++r) {
                Point<V> p = row_point(tile, r);
                const auto f = hoist(f_, p);
                for (std::int64_t c = 0; c < tile.cols; c += W) {
                    at_vector(p, tile, x + r * ldx, c);
                    put(s + r * lds + c, f.eval(p), p.count);
                }
            }
    }

    void modify_with_derivative(const ScoreTile& tile, const T* x, std::int64_t ldx, T* s, std::int64_t lds, T* dfdx,
                                std::int64_t ldd) const override {
        if constexpr (has_fn)
            for (std::int64_t r = 0; r < tile.rows; ++r) {
                Point<V> p = row_point(tile, r);
                const auto f = hoist(f_, p);
                for (std::int64_t c = 0; c < tile.cols; c += W) {
                    at_vector(p, tile, x + r * ldx, c);
                    const Dual<V> y = f.tangent(p);
                    put(s + r * lds + c, y.value, p.count);
                    put(dfdx + r * ldd + c, y.d, p.count);
                }
            }
    }

    void modify_backward(const ScoreTile& tile, const T* x, std::int64_t ldx, T* g, std::int64_t ldg, T* const* grads) const override {
        if constexpr (has_fn) {
            Sink<T> sink{grads};
            for (std::int64_t r = 0; r < tile.rows; ++r) {
                const T* xr = x + r * ldx;
                T* gr = g + r * ldg;
                Point<V> p = row_point(tile, r);
                auto f = hoist(f_, p);
                for (std::int64_t c = 0; c < tile.cols; c += W) {
                    at_vector(p, tile, xr, c);
                    const V gv = p.count == W ? detail::load<V>(gr + c) : detail::load_first(gr + c, p.count, T(0));
                    put(gr + c, f.backprop(p, gv, sink), p.count);
                }
                f.flush(p, sink);
            }
        }
    }

    [[nodiscard]] TileKind classify(const ScoreTile& tile) const override {
        if constexpr (!has_mask) {
            return TileKind::full;
        } else {
            const double inf = std::numeric_limits<double>::infinity();
            const auto d = [](std::int64_t v) { return static_cast<double>(v); };
            const Box box{{-inf, inf}, {d(tile.b), d(tile.b)}, {d(tile.h), d(tile.h)}, {d(tile.i0), d(tile.i0 + tile.rows - 1)},
                          {d(tile.j0), d(tile.j0 + tile.cols - 1)}};
            const Interval r = m_.range(box);
            if (r.lo >= 1) return TileKind::full;
            if (r.hi <= 0) return TileKind::empty;
            // Undecided by intervals (e.g. segment ids, or a window's edge): look at the elements until
            // both a kept and a dropped one are seen (a window's edge tile stops at its first vector).
            bool any_kept = false, any_dropped = false;
            for (std::int64_t row = 0; row < tile.rows; ++row) {
                Point<V> p = row_point(tile, row);
                const auto m = hoist(m_, p);
                for (std::int64_t c = 0; c < tile.cols; c += W) {
                    at_vector(p, tile, nullptr, c);
                    const V keep = m.eval(p);
                    for (int l = 0; l < p.count; ++l) (keep[l] != T(0) ? any_kept : any_dropped) = true;
                    if (any_kept && any_dropped) return TileKind::partial;
                }
            }
            return any_kept ? TileKind::full : TileKind::empty;
        }
    }

    void apply_mask(const ScoreTile& tile, T* s, std::int64_t ld) const override {
        if constexpr (has_mask)
            for (std::int64_t r = 0; r < tile.rows; ++r) {
                Point<V> p = row_point(tile, r);
                const auto m = hoist(m_, p);
                for (std::int64_t c = 0; c < tile.cols; c += W) {
                    at_vector(p, tile, s + r * ld, c);
                    put(s + r * ld + c, vm::pick(m.eval(p) == T(0), vm::splat<V>(-std::numeric_limits<double>::infinity()), p.s), p.count);
                }
            }
    }

    // keep (rows × cols, ld) = the mask over the tile (the generic path's keep mask).
    void keep_mask(const ScoreTile& tile, bool* keep, std::int64_t ld) const {
        for (std::int64_t r = 0; r < tile.rows; ++r) {
            Point<V> p = row_point(tile, r);
            const auto m = hoist(m_, p);
            for (std::int64_t c = 0; c < tile.cols; c += W) {
                at_vector(p, tile, nullptr, c);
                const V v = m.eval(p);
                for (int l = 0; l < p.count; ++l) keep[r * ld + c + l] = v[l] != T(0);
            }
        }
    }

    [[nodiscard]] ScoreTile whole(std::int64_t t) const { return {t / H_, t % H_, 0, Lq_, 0, Lk_}; }
    [[nodiscard]] std::int64_t items() const { return B_ * H_; }

private:
    F f_;
    M m_;
    bool bias_inside_;
    std::int64_t B_ = 1, H_ = 1, Lq_ = 0, Lk_ = 0;
    std::vector<Saved<T>> values_;  // keeps the captured tensors' storage alive, with their versions
    std::vector<GradTarget<T>> targets_;
    std::vector<Shape> grad_shapes_;

    template <class Expr>
    void bind(const char* op, Expr& e, EvalContext& ctx, bool gradients, const Shape& scores) {
        const double inf = std::numeric_limits<double>::infinity();
        const auto d = [](std::int64_t v) { return static_cast<double>(v); };
        const Box all{{-inf, inf}, {0, d(B_ - 1)}, {0, d(H_ - 1)}, {0, d(Lq_ - 1)}, {0, d(Lk_ - 1)}};
        e.visit([&](auto& leaf) {
            using Leaf = std::remove_cvref_t<decltype(leaf)>;
            static_assert(std::is_same_v<typename Leaf::value_type, T>, "autodiff::at: a captured tensor must have the scores' value type");
            Value<T> v = evaluate(leaf.expr, ctx);
            const Shape& s = v.value.shape();
            std::int64_t stride = 1;
            for (int i = Leaf::rank - 1; i >= 0; --i) {
                leaf.strides[static_cast<std::size_t>(i)] = stride;
                stride *= s[i];
            }
            if (v.value.numel() > std::numeric_limits<std::int32_t>::max())
                fail(op, "a captured tensor of shape {} has more than 2^31 - 1 elements; capture smaller tensors", s);
            leaf.data = std::as_const(v.value).data();
            double lo = inf, hi = -inf;
            for (std::int64_t i = 0; i < v.value.numel(); ++i) {
                const double x = static_cast<double>(leaf.data[i]);
                if (std::isnan(x)) lo = -inf, hi = inf;
                lo = std::min(lo, x), hi = std::max(hi, x);
            }
            leaf.values = v.value.numel() ? Interval{lo, hi} : Interval{0, 0};
            int dim = 0;
            std::apply(
                [&](const auto&... index) {
                    (check_index(op, index.range(all), s, dim++, scores), ...);
                },
                leaf.idx);
            if (gradients && v.target) {
                leaf.slot = static_cast<int>(targets_.size());
                targets_.push_back(v.target);
                grad_shapes_.push_back(s);
            }
            values_.push_back(Saved<T>(std::move(v.value)));
        });
    }

    static void check_index(const char* op, Interval r, const Shape& tensor, int dim, const Shape& scores) {
        if (!(r.lo > -1 && r.hi < static_cast<double>(tensor[dim])))
            fail(op, "index {} of a captured tensor of shape {} takes values in [{}, {}] over the scores {}, outside [0, {}]: "
                     "clamp it (ad::clamp) or capture a tensor that covers it",
                 dim, tensor, r.lo, r.hi, scores, tensor[dim] - 1);
    }

    [[nodiscard]] Point<V> row_point(const ScoreTile& tile, std::int64_t r) const {
        Point<V> p{};
        p.b = V{} + static_cast<T>(tile.b);
        p.h = V{} + static_cast<T>(tile.h);
        p.q = V{} + static_cast<T>(tile.i0 + r);
        return p;
    }
    // Row r of the tile as a point of one lane (key and score 0: an expression fixed along the row).
    [[nodiscard]] Point<V> row_only(const ScoreTile& tile, std::int64_t r) const {
        Point<V> p = row_point(tile, r);
        p.count = 1;
        return p;
    }
    // Lanes [c, c + W) of a row: keys, and scores from `row` (if any); lanes past the tile's columns
    // repeat the last valid column.
    static void at_vector(Point<V>& p, const ScoreTile& tile, const T* row, std::int64_t c) {
        p.count = static_cast<int>(std::min<std::int64_t>(W, tile.cols - c));
        const V base = V{} + static_cast<T>(tile.j0 + c);
        p.k = p.count == W ? base + iota() : base + vm::pick(iota() < static_cast<T>(p.count), iota(), V{} + static_cast<T>(p.count - 1));
        if (row) p.s = p.count == W ? detail::load<V>(row + c) : detail::load_first(row + c, p.count, row[c + p.count - 1]);
    }
    static V iota() {
        V v{};
        for (int l = 0; l < W; ++l) v[l] = static_cast<T>(l);
        return v;
    }
    static void put(T* at, V v, int count) {
        if (count == W) detail::store(at, v);
        else detail::store_first(at, v, count);
    }
};

}  // namespace modifier

// ---- score_mod: the score function as an expression node (generic path) ------------------------

// f applied to every element of x (..., Lq, Lk), with the indices of the element: the explicit form
// of a score function, ad::score_mod(scores, f). Inside a recognised attention pattern it runs fused.
template <class X, class F>
struct ScoreMod : Expr<ScoreMod<X, F>> {
    using value_type = typename X::value_type;
    static constexpr bool may_require_grad = X::may_require_grad || F::may_require_grad;
    static_assert(!F::is_bool, "autodiff::score_mod: the score function is a comparison; pass masks to softmax instead");
    X child;
    F fn;
    ScoreMod(X x, F f) : child(std::move(x)), fn(std::move(f)) {
        if (child.shape().rank() < 2) fail("score_mod", "scores must have rank 2 to 4, got {}", child.shape());
    }
    [[nodiscard]] const Shape& shape() const { return child.shape(); }
};

template <ExprLike X, ModExpr F>
auto score_mod(const X& scores, const F& f) {
    return ScoreMod<expr_t<X>, F>(as_expr(scores), f);
}

// scores + ALiBi etc.: a tensor expression combined with a modifier expression is a score function
// of that tensor.
namespace modifier {
template <ExprLike X, class F> requires(is_mod_v<F> && !F::is_bool) auto operator+(const X& x, const F& f) { return score_mod(x, score + f); }
template <ExprLike X, class F> requires(is_mod_v<F> && !F::is_bool) auto operator+(const F& f, const X& x) { return score_mod(x, f + score); }
template <ExprLike X, class F> requires(is_mod_v<F> && !F::is_bool) auto operator-(const X& x, const F& f) { return score_mod(x, score - f); }
template <ExprLike X, class F> requires(is_mod_v<F> && !F::is_bool) auto operator*(const X& x, const F& f) { return score_mod(x, score * f); }
template <ExprLike X, class F> requires(is_mod_v<F> && !F::is_bool) auto operator*(const F& f, const X& x) { return score_mod(x, f * score); }
template <ExprLike X, class F> requires(is_mod_v<F> && !F::is_bool) auto operator/(const X& x, const F& f) { return score_mod(x, score / f); }

}  // namespace modifier

template <class X, class F>
struct Evaluator<ScoreMod<X, F>> {
    using T = typename X::value_type;
    // y = f(x, b, h, q, k) ; dx = dy ⊙ ∂f/∂x, d(captured) = Σ dy ⊙ ∂f/∂captured (per item, summed in order)
    static Value<T> eval(const ScoreMod<X, F>& e, EvalContext& ctx) {
        Value<T> x = evaluate(e.child, ctx);
        using Mod = modifier::Modifier<T, F, NoMaskFn>;
        Mod mod("score_mod", e.fn, NoMaskFn{}, true, x.value.shape(), ctx);
        Tensor<T> y = x.value.clone();
        const std::int64_t Lk = x.value.shape().dim_from_end(1), plane = x.value.shape().dim_from_end(2) * Lk;
        parallel_for(mod.items(), plane * 16, [&](std::int64_t t) { mod.modify(mod.whole(t), y.data() + t * plane, Lk, y.data() + t * plane, Lk); });
        const bool needs = x.target || !mod.targets().empty();
        auto backward = [xt = x.target, Xs = Saved<T>(x.value), mod](const Tensor<T>& dy, Tape& tape) {
            const Tensor<T>& X_ = Xs.get("score_mod", "input");
            mod.check_saved("score_mod");
            Tensor<T> dx = dy.clone();
            const std::int64_t n = mod.items(), cols = X_.shape().dim_from_end(1), size = X_.shape().dim_from_end(2) * cols;
            const std::vector<Shape>& shapes = mod.gradient_shapes();
            std::vector<Tensor<T>> partial;  // per item, summed in item order
            std::vector<T*> ptr;
            for (std::int64_t t = 0; t < n && !shapes.empty(); ++t)
                for (const Shape& s : shapes) {
                    partial.push_back(zeros<T>(s));
                    ptr.push_back(partial.back().data());
                }
            parallel_for(n, size * 32, [&](std::int64_t t) {
                mod.modify_backward(mod.whole(t), X_.data() + t * size, cols, dx.data() + t * size, cols,
                                    shapes.empty() ? nullptr : ptr.data() + static_cast<std::size_t>(t) * shapes.size());
            });
            for (std::size_t i = 0; i < shapes.size(); ++i) {
                Tensor<T> g = zeros<T>(shapes[i]);
                for (std::size_t p = i; p < partial.size(); p += shapes.size()) g.array() += partial[p].array();
                tape.accumulate(mod.targets()[i], std::move(g));
            }
            if (xt) tape.accumulate(xt, std::move(dx));
        };
        return finish(ctx, std::move(y), needs, std::move(backward));
    }
};

// ---- softmax with a mask function -------------------------------------------------------------

// softmax over the last dimension with the elements where `keep` is false dropped (a mask function
// of the indices: ad::causal_window(256), ad::same_segment(seg), ad::q_idx - ad::k_idx < 64),
// combined with `mask` and `additive` as in softmax(). A fully masked row gives 0.
template <ExprLike X, ModExpr M>
    requires modifier::is_mask_v<M>
auto softmax(const X& x, const M& keep, const Mask& mask = {}, const Tensor<value_type_t<X>>& additive = {}) {
    return Softmax<expr_t<X>, M>(as_expr(x), mask, additive, keep);
}

template <class C, class M>
    requires modifier::is_mask_v<M>
struct Evaluator<Softmax<C, M>> {
    using T = typename C::value_type;
    // The mask function becomes a keep mask of the scores' shape (combined with the Mask's own keep
    // tensor, if any); then as softmax: y = softmax(x) ; dx = y ⊙ (dy − rowsum(dy ⊙ y))
    static Value<T> eval(const Softmax<C, M>& e, EvalContext& ctx) {
        Value<T> x = evaluate(e.child, ctx);
        const Shape& s = x.value.shape();
        modifier::Modifier<T, modifier::NoScoreFn, M> mod("softmax", {}, e.mask_fn, true, s, ctx);
        Tensor<bool> keep(s);
        const std::int64_t Lk = s.dim_from_end(1), L2 = s.dim_from_end(2) * Lk;
        parallel_for(mod.items(), L2 * 4, [&](std::int64_t t) { mod.keep_mask(mod.whole(t), keep.data() + t * L2, Lk); });
        Mask m = e.mask;
        if (m.keep.defined())  // both keep: and of the two, the user's broadcast over the scores
            detail::for_each_broadcast_row<bool, 1>(s, {&m.keep}, [&](std::int64_t o, std::int64_t n, auto row, auto contiguous) {
                for (std::int64_t c = 0; c < n; ++c) keep.data()[o + c] = keep.data()[o + c] && row[0][contiguous[0] ? c : 0];
            });
        m.keep = keep;
        Tensor<T> y = softmax_forward(x.value, m, e.additive);
        auto backward = [xt = x.target, Y = Saved<T>(y)](const Tensor<T>& dy, Tape& tape) {
            tape.accumulate(xt, softmax_backward(dy, Y.get("softmax", "output")));
        };
        return finish(ctx, std::move(y), static_cast<bool>(x.target), std::move(backward));
    }
};

}  // namespace autodiff

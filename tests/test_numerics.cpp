// Numerical edge cases of attention, each a test of the behaviour docs/NUMERICS.md documents, on the
// fused path and on the generic path (NoFusionGuard), and that the two agree on it: logits of ±1e4
// and ±∞, NaN and ∞ in every input, fully masked rows, L = 1, d = 1, scale 0, dropout rates 0, 0.999,
// within 2⁻³³ of 1 and 1 (refused), subnormal inputs with and without flush-to-zero, float vs double.
#include <doctest/doctest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <vector>
#if defined(__SSE2__)
#include <xmmintrin.h>
#endif

#include <autodiff/autodiff.hpp>

#include "check_error.hpp"
#include "fused_vs_generic.hpp"

namespace ad = autodiff;

namespace {

template <class T>
constexpr T inf = std::numeric_limits<T>::infinity();
template <class T>
constexpr T not_a_number = std::numeric_limits<T>::quiet_NaN();

// O and the Params' gradients, through the fused path (checked to be one tape record) or the generic one.
template <class T, class F>
std::vector<ad::Tensor<T>> run(const F& f, std::vector<ad::Param<T>> params, const ad::Tensor<T>& dO, bool fused) {
    static_assert(ad::is_fused_v<decltype(f())>);
    for (auto& p : params) p.zero_grad();
    std::optional<ad::NoFusionGuard> generic;
    if (!fused) generic.emplace();
    ad::Tape tape;
    ad::TapeGuard guard(tape);
    ad::Var<T> out = f();
    REQUIRE((tape.size() == 1) == fused);  // one record when fused, one per node otherwise
    out.backward(dO);
    std::vector<ad::Tensor<T>> r{out.value().clone()};
    for (auto& p : params) r.push_back(p.grad().clone());
    return r;
}

// Both paths: [0] fused, [1] generic.
template <class T, class F>
std::array<std::vector<ad::Tensor<T>>, 2> both(const F& f, const std::vector<ad::Param<T>>& params, const ad::Tensor<T>& dO) {
    return {run<T>(f, params, dO, true), run<T>(f, params, dO, false)};
}

template <class T>
bool all_finite(const ad::Tensor<T>& t) {
    return t.array().isFinite().all();
}
template <class T>
std::int64_t count_nan(const ad::Tensor<T>& t) {
    return t.array().isNaN().count();
}
// Whether every NaN of a is a NaN of b.
template <class T>
bool nan_subset(const ad::Tensor<T>& a, const ad::Tensor<T>& b) {
    return ((a.array().isNaN()) && !(b.array().isNaN())).count() == 0;
}
template <class T>
bool same_nan(const ad::Tensor<T>& a, const ad::Tensor<T>& b) {
    return nan_subset(a, b) && nan_subset(b, a);
}
// max |a − b| over the elements that are finite in both, relative to max(1, max |b|).
template <class T>
double finite_diff(const ad::Tensor<T>& a, const ad::Tensor<T>& b) {
    const auto ok = a.array().isFinite() && b.array().isFinite();
    const double scale = std::max(1.0, double(ok.select(b.array().abs(), T(0)).maxCoeff()));
    return double(ok.select((a.array() - b.array()).abs(), T(0)).maxCoeff()) / scale;
}

// Attention inputs (n, h, L, d) with a full bias: the shapes of the edge cases below.
template <class T>
struct Problem {
    std::int64_t n, h, Lq, Lk, d, dv;
    ad::Param<T> q, k, v, b;
    ad::Tensor<T> dO;
    Problem(std::int64_t n_, std::int64_t h_, std::int64_t lq, std::int64_t lk, std::int64_t d_, std::int64_t dv_)
        : n(n_), h(h_), Lq(lq), Lk(lk), d(d_), dv(dv_), q(ad::randn<T>({n, h, Lq, d}, 1), "q"), k(ad::randn<T>({n, h, Lk, d}, 2), "k"),
          v(ad::randn<T>({n, h, Lk, dv}, 3), "v"), b(ad::randn<T>({n, h, Lq, Lk}, 4), "bias"), dO(ad::randn<T>({n, h, Lq, dv}, 5)) {}
    [[nodiscard]] std::vector<ad::Param<T>> params() const { return {q, k, v, b}; }
    [[nodiscard]] auto attention(double scale, const ad::Mask& mask = {}) const {
        return [this, scale, mask] { return ad::matmul(ad::softmax(ad::matmul(q, ad::transpose(k)) * T(scale) + b, mask), v); };
    }
};

// O[b, h, i, :] = softmax(scale·q_i·Kᵀ + bias_i)·V in double from the inputs (no mask).
template <class T>
std::vector<double> reference_row(const Problem<T>& p, double scale, std::int64_t b, std::int64_t h, std::int64_t i) {
    std::vector<double> s(static_cast<std::size_t>(p.Lk)), o(static_cast<std::size_t>(p.dv), 0.0);
    double m = -std::numeric_limits<double>::infinity(), sum = 0;
    for (std::int64_t j = 0; j < p.Lk; ++j) {
        double dot = 0;
        for (std::int64_t c = 0; c < p.d; ++c) dot += double(p.q.value()(b, h, i, c)) * double(p.k.value()(b, h, j, c));
        s[static_cast<std::size_t>(j)] = scale * dot + double(p.b.value()(b, h, i, j));
        m = std::max(m, s[static_cast<std::size_t>(j)]);
    }
    for (std::int64_t j = 0; j < p.Lk; ++j) {
        const double e = std::exp(s[static_cast<std::size_t>(j)] - m);
        sum += e;
        for (std::int64_t c = 0; c < p.dv; ++c) o[static_cast<std::size_t>(c)] += e * double(p.v.value()(b, h, j, c));
    }
    for (double& x : o) x /= sum;
    return o;
}

// Rows (b, h, i) of a (n, h, L, c) tensor.
template <class T>
bool row_is(const ad::Tensor<T>& t, std::int64_t b, std::int64_t h, std::int64_t i, bool (*pred)(T)) {
    for (std::int64_t c = 0; c < t.dim(3); ++c)
        if (!pred(t(b, h, i, c))) return false;
    return true;
}
template <class T>
bool is_nan(T x) {
    return std::isnan(x);
}
template <class T>
bool is_finite(T x) {
    return std::isfinite(x);
}
template <class T>
bool is_not_finite(T x) {
    return !std::isfinite(x);
}
template <class T>
bool is_zero(T x) {
    return x == T(0);
}

}  // namespace

TEST_CASE_TEMPLATE("logits of ±1e4 do not overflow: finite results, the paths agree, the largest logit takes the row", T, float, double) {
    Problem<T> p(2, 2, 70, 75, 8, 6);  // two query blocks, two key blocks
    // Every logit about ±1e4 (the bias), one key per row at +1e4 + 10 above the rest.
    for (std::int64_t i = 0; i < p.b.value().numel(); ++i) p.b.value().data()[i] = (i % 3 == 0 ? T(-1e4) : T(1e4));
    for (std::int64_t b = 0; b < p.n; ++b)
        for (std::int64_t h = 0; h < p.h; ++h)
            for (std::int64_t i = 0; i < p.Lq; ++i) p.b.value()(b, h, i, (7 * i) % p.Lk) = T(1e4 + 10);
    const auto r = both<T>(p.attention(0.01), p.params(), p.dO);
    for (int path = 0; path < 2; ++path)
        for (const auto& t : r[static_cast<std::size_t>(path)]) CHECK(all_finite(t));
    // Against a double reference of a few rows: |S| = 1e4 is rounded to eps·1e4 absolute, which is P's
    // relative error (8 roundings), times max |v|.
    const double max_v = double(p.v.value().array().abs().maxCoeff());
    const double tol = 8 * std::numeric_limits<T>::epsilon() * (1e4 + double(p.Lk)) * max_v;
    for (std::int64_t i : {0, 33, 69}) {
        CAPTURE(i);
        const std::vector<double> ref = reference_row(p, 0.01, 1, 0, i);
        for (int path = 0; path < 2; ++path)
            for (std::int64_t c = 0; c < p.dv; ++c) CHECK(std::abs(double(r[static_cast<std::size_t>(path)][0](1, 0, i, c)) - ref[static_cast<std::size_t>(c)]) <= tol);
        // the winning key, e^10 heavier than any other, takes most of the row
        CHECK(std::abs(ref[0] - double(p.v.value()(1, 0, (7 * i) % p.Lk, 0))) < 0.1 * max_v);
    }
    // The paths agree to the same rounding (relative to each tensor's largest value).
    for (std::size_t i = 0; i < r[0].size(); ++i) CHECK(finite_diff(r[0][i], r[1][i]) <= 8 * std::numeric_limits<T>::epsilon() * (1e4 + double(p.Lk)));
}

TEST_CASE_TEMPLATE("a −∞ logit is a masked key: the same numbers as a keep mask, bias gradient 0 there", T, float, double) {
    Problem<T> p(2, 2, 70, 75, 8, 6);
    ad::Tensor<bool> keep = ad::full<bool>({p.Lq, p.Lk}, true);
    for (std::int64_t i = 0; i < p.Lq; ++i)
        for (std::int64_t j = 0; j < p.Lk; ++j) keep(i, j) = (i + 2 * j) % 5 != 0;
    const ad::Tensor<T> finite_bias = p.b.value().clone();
    const auto masked = both<T>(p.attention(0.3, ad::keep_mask(keep)), p.params(), p.dO);
    for (std::int64_t t = 0; t < p.n * p.h; ++t)
        for (std::int64_t i = 0; i < p.Lq; ++i)
            for (std::int64_t j = 0; j < p.Lk; ++j)
                if (!keep(i, j)) p.b.value().data()[(t * p.Lq + i) * p.Lk + j] = -inf<T>;
    const auto minus_inf = both<T>(p.attention(0.3), p.params(), p.dO);
    for (int path = 0; path < 2; ++path) {
        CAPTURE(path);
        for (std::size_t i = 0; i < masked[0].size(); ++i) CHECK(ad::max_abs_diff(masked[static_cast<std::size_t>(path)][i], minus_inf[static_cast<std::size_t>(path)][i]) == T(0));
        CHECK(minus_inf[static_cast<std::size_t>(path)][4](1, 1, 0, 0) == T(0));  // dbias at a −∞ logit (key 0 of row 0 is masked)
    }
}

TEST_CASE_TEMPLATE("a +∞ logit makes its row NaN (∞/∞, as PyTorch) on both paths; other rows stay finite", T, float, double) {
    Problem<T> p(2, 2, 70, 75, 8, 6);
    p.b.value()(0, 1, 3, 5) = inf<T>;
    const auto r = both<T>(p.attention(0.3), p.params(), p.dO);
    for (int path = 0; path < 2; ++path) {
        const auto& x = r[static_cast<std::size_t>(path)];
        CAPTURE(path);
        CHECK(row_is<T>(x[0], 0, 1, 3, is_nan<T>));
        CHECK(count_nan(x[0]) == p.dv);  // only that row
        CHECK(row_is<T>(x[1], 0, 1, 3, is_nan<T>));  // dq of that row
        CHECK(row_is<T>(x[1], 0, 1, 4, is_finite<T>));
        CHECK(row_is<T>(x[2], 0, 1, 0, is_nan<T>));  // dk and dv of every key of that head
        CHECK(row_is<T>(x[3], 0, 1, 74, is_nan<T>));
        CHECK(row_is<T>(x[2], 1, 1, 0, is_finite<T>));  // other (batch, head) slices untouched
        CHECK(row_is<T>(x[3], 0, 0, 0, is_finite<T>));
    }
    for (std::size_t i = 0; i < r[0].size(); ++i) {
        CHECK(same_nan(r[0][i], r[1][i]));
        CHECK(finite_diff(r[0][i], r[1][i]) < 1e3 * std::numeric_limits<T>::epsilon());
    }
}

TEST_CASE_TEMPLATE("NaN and ∞ in q, k, v, the bias or the upstream gradient propagate on both paths (never zeroed)", T, float, double) {
    // No mask: every tile is visited, so both paths give NaN (and ±∞) in exactly the same places.
    const std::int64_t b = 1, h = 0;  // the poisoned (batch, head) slice
    for (const T bad : {not_a_number<T>, inf<T>}) {
        // What a poisoned element makes of its dependents: NaN stays NaN; +∞ gives ±∞, or NaN where
        // ∞ − ∞ or ∞/∞ meet (a row of logits with +∞, the softmax's normalisation).
        bool (*poisoned_value)(T) = std::isnan(bad) ? &is_nan<T> : &is_not_finite<T>;
        for (const char* what : {"q", "k", "v", "bias", "dO"}) {
            const std::string w = what;
            CAPTURE(w);
            CAPTURE(bad);
            Problem<T> p(2, 2, 70, 75, 8, 6);
            if (w == "q") p.q.value()(b, h, 10, 2) = bad;
            if (w == "k") p.k.value()(b, h, 20, 2) = bad;
            if (w == "v") p.v.value()(b, h, 20, 1) = bad;
            if (w == "bias") p.b.value()(b, h, 10, 20) = bad;
            if (w == "dO") p.dO(b, h, 10, 1) = bad;
            const auto r = both<T>(p.attention(0.3), p.params(), p.dO);
            for (int path = 0; path < 2; ++path) {
                CAPTURE(path);
                const auto& x = r[static_cast<std::size_t>(path)];
                // O: row 10 (a poisoned query or logit), column 1 of every row (a poisoned value); a NaN
                // key reaches every row's softmax (an ∞ key only the rows where its logit is +∞).
                if (w == "q" || w == "bias") CHECK(row_is<T>(x[0], b, h, 10, poisoned_value));
                if (w == "k" && std::isnan(bad)) CHECK(count_nan(x[0]) == p.Lq * p.dv);
                if (w == "k") CHECK(!all_finite(x[0]));
                if (w == "v") CHECK(poisoned_value(x[0](b, h, 0, 1)));
                if (w == "v") CHECK(std::isfinite(x[0](b, h, 0, 0)));
                if (w == "dO") CHECK(all_finite(x[0]));
                // Gradients: dv of every key (Pᵀ·dO with a poisoned row of P; column 1 with dO's), dq of row 10.
                if (w == "q" || w == "bias") CHECK(row_is<T>(x[3], b, h, 0, is_nan<T>));
                if (w == "dO") CHECK(poisoned_value(x[3](b, h, 0, 1)));
                if (w == "q" || w == "bias" || w == "dO") CHECK(row_is<T>(x[1], b, h, 10, poisoned_value));
                if (w == "bias" || w == "dO") CHECK(poisoned_value(x[4](b, h, 10, 20)));
                for (std::size_t i = 0; i < x.size(); ++i) {  // nothing leaks into another (batch, head) slice
                    CAPTURE(i);
                    CHECK(row_is<T>(x[i], 0, 0, 0, is_finite<T>));
                    CHECK(row_is<T>(x[i], 1, 1, 0, is_finite<T>));
                }
            }
            // The same non-finite elements on both paths; with a NaN input also the same NaN. (With ∞ an
            // element may be NaN on one path and ±∞ on the other: the fused backward's D = rowsum(dO ⊙ O)
            // and the generic softmax backward's rowsum(dP ⊙ P) form ∞ − ∞ in different places.)
            for (std::size_t i = 0; i < r[0].size(); ++i) {
                CAPTURE(i);
                if (std::isnan(bad)) CHECK(same_nan(r[0][i], r[1][i]));
                CHECK((r[0][i].array().isFinite() == r[1][i].array().isFinite()).all());
                CHECK(finite_diff(r[0][i], r[1][i]) < 1e3 * std::numeric_limits<T>::epsilon());
            }
        }
    }
}

TEST_CASE("NaN under a mask: what depends on it through kept scores is NaN on both paths; the fused path adds no NaN") {
    using T = double;
    // Causal, L = 130 (3 blocks): key 100 (a NaN in k) is seen by queries 100..129 only.
    Problem<T> p(1, 2, 130, 130, 8, 6);
    p.k.value()(0, 1, 100, 3) = not_a_number<T>;
    const auto r = both<T>(p.attention(0.3, ad::causal), p.params(), p.dO);
    for (int path = 0; path < 2; ++path) {
        CAPTURE(path);
        const auto& x = r[static_cast<std::size_t>(path)];
        for (std::int64_t i = 0; i < 130; ++i) CHECK(row_is<T>(x[0], 0, 1, i, i >= 100 ? is_nan<T> : is_finite<T>));
        for (std::int64_t i = 100; i < 130; ++i) CHECK(row_is<T>(x[1], 0, 1, i, is_nan<T>));  // dq
        CHECK(row_is<T>(x[2], 0, 1, 0, is_nan<T>));  // dk of a key seen by the NaN rows
        CHECK(count_nan(x[4]) > 0);
        for (std::size_t i = 0; i < x.size(); ++i) CHECK(row_is<T>(x[i], 0, 0, 5, is_finite<T>));  // the other head
    }
    // The generic path's products multiply the NaN by masked weights (0·NaN): column 3 of every dq row
    // is NaN; the fused path skips the tiles wholly above the diagonal (query rows 0..63 never meet key
    // 100), so its NaN are a subset.
    for (std::size_t i = 0; i < r[0].size(); ++i) CHECK(nan_subset(r[0][i], r[1][i]));
    CHECK(std::isnan(r[1][1](0, 1, 0, 3)));
    CHECK(row_is<T>(r[0][1], 0, 1, 0, is_finite<T>));
}

TEST_CASE_TEMPLATE("a NaN or ∞ at a masked position is masked: finite results on both paths", T, float, double) {
    Problem<T> p(2, 2, 70, 75, 8, 6);
    p.b.value()(0, 1, 3, 50) = not_a_number<T>;   // masked by causal (key 50 > query 3)
    p.b.value()(1, 0, 60, 70) = inf<T>;  // idem
    ad::Tensor<T> additive = ad::zeros<T>({p.Lq, p.Lk});
    additive(5, 60) = not_a_number<T>;
    const auto f = [&] { return ad::matmul(ad::softmax(ad::matmul(p.q, ad::transpose(p.k)) * T(0.3) + p.b, ad::causal, additive), p.v); };
    const auto r = both<T>(f, p.params(), p.dO);
    for (std::size_t i = 0; i < r[0].size(); ++i) {
        CHECK(all_finite(r[0][i]));
        CHECK(all_finite(r[1][i]));
        CHECK(finite_diff(r[0][i], r[1][i]) < 1e3 * std::numeric_limits<T>::epsilon());
    }
    CHECK(r[0][4](0, 1, 3, 50) == T(0));
    CHECK(r[1][4](0, 1, 3, 50) == T(0));
}

TEST_CASE_TEMPLATE("fully masked rows: output 0 and every gradient through them 0, for each way of masking a row", T, float, double) {
    Problem<T> p(2, 2, 70, 75, 8, 6);
    ad::Tensor<bool> kp = ad::full<bool>({p.n, p.Lk}, true), keep = ad::full<bool>({p.Lq, p.Lk}, true);
    for (std::int64_t j = 0; j < p.Lk; ++j) kp(1, j) = false;  // batch 1 keeps nothing
    for (std::int64_t j = 0; j < p.Lk; ++j) keep(4, j) = false;  // row 4 keeps nothing
    ad::Tensor<T> additive = ad::zeros<T>({1, p.h, p.Lq, p.Lk});
    for (std::int64_t j = 0; j < p.Lk; ++j) additive(0, 1, 9, j) = -inf<T>;  // row 9 of head 1: all −∞
    for (std::int64_t j = 0; j < p.Lk; ++j) p.b.value()(0, 0, 11, j) = -inf<T>;  // row 11 of (0, 0): bias all −∞
    const auto f = [&] {
        return ad::matmul(ad::softmax(ad::matmul(p.q, ad::transpose(p.k)) * T(0.3) + p.b, ad::key_padding_mask(kp) | ad::keep_mask(keep), additive), p.v);
    };
    const auto r = both<T>(f, p.params(), p.dO);
    for (int path = 0; path < 2; ++path) {
        CAPTURE(path);
        const auto& x = r[static_cast<std::size_t>(path)];
        for (const auto& t : x) CHECK(all_finite(t));
        for (std::int64_t h = 0; h < p.h; ++h)
            for (std::int64_t i = 0; i < p.Lq; ++i) {
                CHECK(row_is<T>(x[0], 1, h, i, is_zero<T>));  // key padding
                CHECK(row_is<T>(x[1], 1, h, i, is_zero<T>));
            }
        for (std::int64_t j = 0; j < p.Lk; ++j) {
            CHECK(row_is<T>(x[2], 1, 0, j, is_zero<T>));  // dk, dv of a batch entry that keeps nothing
            CHECK(row_is<T>(x[3], 1, 1, j, is_zero<T>));
            CHECK(x[4](0, 1, 4, j) == T(0));  // dbias of a fully masked row
            CHECK(x[4](0, 0, 11, j) == T(0));
        }
        for (const auto& [b, h, i] : std::vector<std::array<std::int64_t, 3>>{{0, 0, 4}, {0, 1, 4}, {0, 1, 9}, {0, 0, 11}}) {
            CHECK(row_is<T>(x[0], b, h, i, is_zero<T>));
            CHECK(row_is<T>(x[1], b, h, i, is_zero<T>));
        }
        CHECK(row_is<T>(x[0], 0, 0, 9, [](T y) { return y != T(0); }));  // head 0's row 9 is not masked
    }
    for (std::size_t i = 0; i < r[0].size(); ++i) CHECK(finite_diff(r[0][i], r[1][i]) < 1e3 * std::numeric_limits<T>::epsilon());
}

TEST_CASE_TEMPLATE("L = 1 and d = 1: one key gives O = v, dq = dk = 0, dv = dO", T, float, double) {
    for (const std::int64_t d : {1, 5}) {
        CAPTURE(d);
        Problem<T> p(2, 3, 1, 1, d, 1);
        const auto r = both<T>(p.attention(0.7), p.params(), p.dO);
        for (int path = 0; path < 2; ++path) {
            const auto& x = r[static_cast<std::size_t>(path)];
            CHECK(ad::max_abs_diff(x[0], p.v.value()) == T(0));  // softmax of one logit is exactly 1
            CHECK(x[1].array().abs().maxCoeff() == T(0));
            CHECK(x[2].array().abs().maxCoeff() == T(0));
            CHECK(ad::max_abs_diff(x[3], p.dO) == T(0));
            CHECK(x[4].array().abs().maxCoeff() == T(0));
        }
    }
    // d = 1 and dv = 1 with several keys: the paths agree (the tile products' 1-wide edge).
    Problem<T> p(2, 3, 70, 67, 1, 1);
    const auto r = both<T>(p.attention(0.7, ad::causal), p.params(), p.dO);
    for (std::size_t i = 0; i < r[0].size(); ++i) CHECK(finite_diff(r[0][i], r[1][i]) < 1e3 * std::numeric_limits<T>::epsilon());
}

TEST_CASE_TEMPLATE("scale 0: uniform weights over the kept keys, dq = dk = 0 exactly", T, float, double) {
    Problem<T> p(1, 2, 70, 75, 8, 6);
    const auto f = [&] { return ad::matmul(ad::softmax(ad::matmul(p.q, ad::transpose(p.k)) * T(0), ad::causal), p.v); };
    const std::vector<ad::Param<T>> qkv{p.q, p.k, p.v};
    const auto r = both<T>(f, qkv, p.dO);
    for (int path = 0; path < 2; ++path) {
        const auto& x = r[static_cast<std::size_t>(path)];
        CHECK(x[1].array().abs().maxCoeff() == T(0));
        CHECK(x[2].array().abs().maxCoeff() == T(0));
        for (std::int64_t i = 0; i < p.Lq; i += 13)  // O row i = mean of v rows 0..i (causal)
            for (std::int64_t c = 0; c < p.dv; ++c) {
                double mean = 0;
                for (std::int64_t j = 0; j <= i; ++j) mean += double(p.v.value()(0, 1, j, c));
                CHECK(std::abs(double(x[0](0, 1, i, c)) - mean / double(i + 1)) <= 4 * double(i + 1) * std::numeric_limits<T>::epsilon() * 4);
            }
    }
}

TEST_CASE_TEMPLATE("dropout rate 0 is no dropout (bitwise), 0.999 keeps a few entries scaled by 1000, a rate within 2^-33 of 1 drops all", T, float, double) {
    Problem<T> p(2, 2, 70, 75, 8, 6);
    auto with_rate = [&](double rate) {
        return [&p, rate] {
            return ad::matmul(ad::dropout(ad::softmax(ad::matmul(p.q, ad::transpose(p.k)) * T(0.3) + p.b, ad::causal), {rate, 17, 3}), p.v);
        };
    };
    const auto none = both<T>(p.attention(0.3, ad::causal), p.params(), p.dO);
    const auto zero = both<T>(with_rate(0.0), p.params(), p.dO);
    for (int path = 0; path < 2; ++path)
        for (std::size_t i = 0; i < none[0].size(); ++i)
            CHECK(ad::max_abs_diff(none[static_cast<std::size_t>(path)][i], zero[static_cast<std::size_t>(path)][i]) == T(0));
    const auto high = both<T>(with_rate(0.999), p.params(), p.dO);
    for (std::size_t i = 0; i < high[0].size(); ++i) {
        CHECK(all_finite(high[0][i]));
        CHECK(finite_diff(high[0][i], high[1][i]) < 1e4 * std::numeric_limits<T>::epsilon());  // values up to ~1000·|v|
    }
    // About 0.1 % of the 2·2·70·75 weights are kept: some rows of O are exactly 0, some are not.
    const std::int64_t zero_rows = (high[0][0].array() == T(0)).count() / p.dv;
    CHECK(zero_rows > 0);
    CHECK(zero_rows < p.n * p.h * p.Lq);
    const auto all = both<T>(with_rate(1.0 - 1e-12), p.params(), p.dO);
    for (int path = 0; path < 2; ++path) {
        const auto& x = all[static_cast<std::size_t>(path)];
        CHECK(x[0].array().abs().maxCoeff() == T(0));
        CHECK(x[1].array().abs().maxCoeff() == T(0));
        CHECK(x[3].array().abs().maxCoeff() == T(0));
    }
}

TEST_CASE("dropout rate 1 (or NaN, or negative) is refused by the node and by the kernel, naming the rate") {
    ad::Param<double> q(ad::randn<double>({1, 4, 3}, 1));
    for (const double rate : {1.0, 1.5, -0.1, std::numeric_limits<double>::quiet_NaN()}) {
        CAPTURE(rate);
        test::check_error([&] { (void)ad::dropout(ad::softmax(ad::matmul(q, ad::transpose(q))), {rate, 1, 0}); }, "dropout",
                          {"rate must be in [0, 1), got"});
        ad::AttentionOptions opt;
        opt.dropout = {rate, 1, 0};
        test::check_error([&] { (void)ad::attention_forward(q.value(), q.value(), q.value(), {}, {}, opt); }, "attention",
                          {"rate must be in [0, 1), got"});
    }
}

TEST_CASE_TEMPLATE("subnormal inputs are computed with gradual underflow; flush-to-zero only changes subnormal results", T, float, double) {
    // v subnormal: O = P·v is subnormal (P ≤ 1), computed in the subnormal range's fixed absolute
    // precision: the paths agree within a few units of the smallest subnormal per summed term.
    Problem<T> p(1, 2, 70, 75, 8, 6);
    const T tiny = std::numeric_limits<T>::denorm_min() * 1024;  // 2^-139 (float), 2^-1064 (double)
    p.v.value().array() *= tiny;
    const auto r = both<T>(p.attention(0.3), p.params(), p.dO);
    const double denorm = double(std::numeric_limits<T>::denorm_min());
    CHECK(r[0][0].array().abs().maxCoeff() > T(0));
    CHECK(r[0][0].array().abs().maxCoeff() < std::numeric_limits<T>::min());
    CHECK(double((r[0][0].array() - r[1][0].array()).abs().maxCoeff()) <= 8 * double(p.Lk) * denorm);
    CHECK(finite_diff(r[0][3], r[1][3]) < 1e3 * std::numeric_limits<T>::epsilon());  // dv = Pᵀ·dO is normal
#if defined(__SSE2__)
    // With FTZ and DAZ set (one thread: MXCSR is per thread), subnormal v reads as 0, so O is 0 on both
    // paths, while results in the normal range are unchanged (v normal: the same bits).
    ad::set_num_threads(1);
    const unsigned csr = _mm_getcsr();
    Problem<T> fresh(1, 2, 70, 75, 8, 6);
    const auto before = both<T>(fresh.attention(0.3), fresh.params(), p.dO);
    _mm_setcsr(csr | 0x8040);  // FTZ (bit 15) and DAZ (bit 6)
    const auto flushed = both<T>(p.attention(0.3), p.params(), p.dO);
    const auto after = both<T>(fresh.attention(0.3), fresh.params(), p.dO);
    _mm_setcsr(csr);
    ad::set_num_threads(2);
    for (int path = 0; path < 2; ++path) {
        CHECK(flushed[static_cast<std::size_t>(path)][0].array().abs().maxCoeff() == T(0));
        for (std::size_t i = 0; i < before[0].size(); ++i)
            CHECK(ad::max_abs_diff(before[static_cast<std::size_t>(path)][i], after[static_cast<std::size_t>(path)][i]) == T(0));
    }
#endif
}

TEST_CASE("float and double agree at the edges: logits of ±1e4, fully masked rows, dropout 0.9, on the fused path") {
    const std::int64_t n = 2, h = 2, L = 70, d = 8;
    ad::Tensor<double> qd = ad::randn<double>({n, h, L, d}, 1), kd = ad::randn<double>({n, h, L, d}, 2), vd = ad::randn<double>({n, h, L, d}, 3),
                       bd = ad::randn<double>({h, L, L}, 4);
    for (std::int64_t i = 0; i < bd.numel(); ++i)  // multiples of 2500 up to ±1e4: exact in float
        bd.data()[i] = std::clamp(std::round(bd.data()[i] * 2) * 2500, -1e4, 1e4);
    ad::Tensor<bool> kp = ad::full<bool>({n, L}, true);
    for (std::int64_t j = 0; j < L; ++j) kp(1, j) = j >= 60;  // batch 1: rows 0..59 of the causal mask keep nothing
    const ad::Mask mask = ad::causal | ad::key_padding_mask(kp);
    const ad::DropoutDescriptor drop{0.9, 5, 1};
    ad::Param<float> q(test::to_float(qd)), k(test::to_float(kd)), v(test::to_float(vd)), b(test::to_float(bd));
    ad::Param<double> q64(qd), k64(kd), v64(vd), b64(bd);
    ad::Var<float> O = ad::matmul(ad::dropout(ad::softmax(ad::matmul(q, ad::transpose(k)) * 0.25f + b, mask), drop), v);
    O.backward(ad::ones<float>(O.shape()));
    ad::Var<double> O64 = ad::matmul(ad::dropout(ad::softmax(ad::matmul(q64, ad::transpose(k64)) * 0.25 + b64, mask), drop), v64);
    O64.backward(ad::ones<double>(O64.shape()));
    // Logits are multiples of 2500 plus 0.25·q·k: float rounds |S| ~ 1e4 to 1e4·eps absolute, which is P's
    // relative error (8 roundings): relative 1e-2 of each tensor's largest value.
    const double tol = 8 * 1e4 * std::numeric_limits<float>::epsilon();
    CHECK(test::relative_error(O.value(), O64.value()) < tol);
    CHECK(test::relative_error(q.grad(), q64.grad()) < tol);
    CHECK(test::relative_error(k.grad(), k64.grad()) < tol);
    CHECK(test::relative_error(v.grad(), v64.grad()) < tol);
    CHECK(test::relative_error(b.grad(), b64.grad()) < tol);
    CHECK(O.value()(1, 0, 10, 3) == 0.0f);
    CHECK(O64.value()(1, 0, 10, 3) == 0.0);
}

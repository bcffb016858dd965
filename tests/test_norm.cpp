// The transformer block's normalisations and activations (issue 11): layer_norm, rms_norm, gelu with
// the tanh approximation, the fused bias_gelu, and the nn::LayerNorm / nn::RMSNorm modules.
// Checked by gradcheck in double for every combination of which inputs are Params, Consts or absent,
// against naive loops, against PyTorch's goldens (tools/make_goldens.py) in float64 and float32,
// bitwise across thread counts, float against double, and on bad input.
#include <doctest/doctest.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <set>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include <autodiff/autodiff.hpp>

#include "check_error.hpp"
#include "golden.hpp"

namespace ad = autodiff;
using Tensor = ad::Tensor<double>;
using test::check_error;

namespace {

// ---- checking -----------------------------------------------------------------------------------

// gradcheck's defaults (fourth-order differences, eps 1e-4, |analytic − numeric| <= 1e-8 + 1e-6·|numeric|)
// and a normwise relative error below 1e-6, as tests/test_nodes.cpp. AUTODIFF_GRADCHECK_REPORT=1 prints them.
void check_report(const ad::GradcheckReport& report) {
    INFO(report.str());
    if (std::getenv("AUTODIFF_GRADCHECK_REPORT")) MESSAGE(report.str());
    CHECK(report.passed);
    CHECK(report.max_rel_error() < 1e-6);
}

// One optional input of a node under test: absent (ad::none), or a Param or a Const holding `value`.
enum class Kind { absent, param, constant };
const char* kind_name(Kind k) { return k == Kind::absent ? "none" : k == Kind::param ? "Param" : "Const"; }

// Calls f(leaf) with the input as ad::none (when Optional), a Param (appended to params) or a Const.
template <bool Optional = true, class F>
void with_leaf(Kind k, const Tensor& value, const std::string& name, std::vector<ad::Param<double>>& params, F&& f) {
    if constexpr (Optional)
        if (k == Kind::absent) return f(ad::none);
    if (k == Kind::constant) return f(ad::Const<double>(value));
    params.emplace_back(value.clone(), name);
    f(params.back());
}

// gradcheck of op(x, w, b) for every way of making x a Param or a Const and w and b absent, Params or
// Consts (`optional`: how many of w, b the op takes; with 1, b stays absent). `names` label w and b.
// With no Param the node must need no gradient work and record nothing.
template <class Op>
void check_every_activity(const Op& op, const Tensor& x, const Tensor& w, const Tensor& b, int optional = 2,
                          std::array<const char*, 2> names = {"weight", "bias"}) {
    const std::array<Kind, 3> kinds{Kind::absent, Kind::param, Kind::constant};
    for (Kind kx : {Kind::param, Kind::constant})
        for (Kind kw : kinds)
            for (Kind kb : kinds) {
                if (optional < 2 && kb != Kind::absent) continue;
                const std::string name = fmt::format("x {}, {} {}{}", kind_name(kx), names[0], kind_name(kw),
                                                     optional < 2 ? "" : fmt::format(", {} {}", names[1], kind_name(kb)));
                SUBCASE(name.c_str()) {
                    std::vector<ad::Param<double>> params;
                    params.reserve(3);  // with_leaf hands out references into it
                    with_leaf<false>(kx, x, "x", params, [&](const auto& X) {
                        with_leaf(kw, w, names[0], params, [&](const auto& W) {
                            with_leaf(kb, b, names[1], params, [&](const auto& B) {
                                using E = ad::expr_t<decltype(op(X, W, B))>;
                                CHECK(E::may_require_grad == !params.empty());
                                if (params.empty()) {
                                    const std::size_t records = ad::current_tape().size();
                                    const ad::Var<double> y = op(X, W, B);
                                    CHECK_FALSE(y.requires_grad());
                                    CHECK(ad::current_tape().size() == records);
                                } else {
                                    check_report(ad::gradcheck([&] { return op(X, W, B); }, params));
                                }
                            });
                        });
                    });
                }
            }
}

// The value of an expression, computed without recording.
template <class E>
auto value_of(const E& e) {
    ad::NoGradGuard no_grad;
    return ad::eval(e).value();
}

template <class T>
bool bitwise_equal(const ad::Tensor<T>& a, const ad::Tensor<T>& b) {
    return a.shape() == b.shape() && std::memcmp(a.data(), b.data(), static_cast<std::size_t>(a.numel()) * sizeof(T)) == 0;
}

// max |a − ref| / max |ref|: a float result against a double reference.
double relative_error(const ad::Tensor<float>& a, const Tensor& ref) {
    return (a.array().cast<double>() - ref.array()).abs().maxCoeff() / ref.array().abs().maxCoeff();
}

// Sets the library's thread count for one scope.
class ThreadCount {
public:
    explicit ThreadCount(int n) { ad::set_num_threads(n); }
    ~ThreadCount() { ad::set_num_threads(saved_); }
    ThreadCount(const ThreadCount&) = delete;
    ThreadCount& operator=(const ThreadCount&) = delete;

private:
    int saved_ = ad::num_threads();
};

Tensor scaled(Tensor t, double s) {
    t.array() *= s;
    return t;
}

// Inputs with a non-zero mean per row, so that centring matters.
Tensor input(const ad::Shape& s, std::uint64_t seed) {
    Tensor x = ad::randn<double>(s, seed);
    x.array() = 1.5 * x.array() + 0.5;
    return x;
}
Tensor weight_like(const ad::Shape& s, std::uint64_t seed) {
    Tensor w = ad::randn<double>(s, seed);
    w.array() = 1 + 0.5 * w.array();
    return w;
}

// ---- naive references (double) ------------------------------------------------------------------

// layer_norm (centered) or rms_norm row by row with plain loops; w, b may be undefined.
Tensor naive_norm(const Tensor& x, std::int64_t n, const Tensor& w, const Tensor& b, double eps, bool centered) {
    Tensor y(x.shape());
    for (std::int64_t r = 0; r < x.numel() / n; ++r) {
        const double* xr = x.data() + r * n;
        double mean = 0, var = 0;
        if (centered) {
            for (std::int64_t j = 0; j < n; ++j) mean += xr[j];
            mean /= static_cast<double>(n);
        }
        for (std::int64_t j = 0; j < n; ++j) var += (xr[j] - mean) * (xr[j] - mean);
        var /= static_cast<double>(n);
        for (std::int64_t j = 0; j < n; ++j) {
            double v = (xr[j] - mean) / std::sqrt(var + eps);
            if (w.defined()) v *= w.data()[j];
            if (b.defined()) v += b.data()[j];
            y.data()[r * n + j] = v;
        }
    }
    return y;
}

double gelu_exact(double v) { return 0.5 * v * (1 + std::erf(v / std::sqrt(2.0))); }
double gelu_tanh(double v) {
    const double k = std::sqrt(2.0 / std::acos(-1.0));
    return 0.5 * v * (1 + std::tanh(k * (v + 0.044715 * v * v * v)));
}

// The shapes layer_norm and rms_norm are checked on: ranks 1 to 4, one to all dimensions normalised,
// a normalised size of 1, a single row.
struct NormCase {
    const char* name;
    ad::Shape x, normalized;
};
const std::vector<NormCase> norm_cases{
    {"rank 1, all of it", {7}, {7}},
    {"rank 2, last dimension", {3, 5}, {5}},
    {"rank 2, a single row", {1, 6}, {6}},
    {"rank 3, last two dimensions", {2, 3, 4}, {3, 4}},
    {"rank 3, all three dimensions", {2, 3, 2}, {2, 3, 2}},
    {"rank 4, last dimension", {2, 1, 3, 5}, {5}},
    {"rank 4, last three dimensions with a 1 among them", {2, 3, 1, 4}, {3, 1, 4}},
    {"normalised size 1", {4, 1}, {1}},
};

}  // namespace

// ---- layer_norm ---------------------------------------------------------------------------------

TEST_CASE("layer_norm: gradcheck for every shape, eps, and weight/bias absent, Param or Const") {
    for (const NormCase& c : norm_cases)
        for (double eps : {1e-5, 0.5}) {
            const std::string name = fmt::format("{}: x {}, normalized_shape {}, eps {}", c.name, c.x, c.normalized, eps);
            SUBCASE(name.c_str()) {
                check_every_activity([&](const auto& x, const auto& w, const auto& b) { return ad::layer_norm(x, c.normalized, w, b, eps); },
                                     input(c.x, 1), weight_like(c.normalized, 2), ad::randn<double>(c.normalized, 3));
            }
        }
}

TEST_CASE("layer_norm: forward equals the definition: biased variance, eps inside the square root") {
    for (const NormCase& c : norm_cases) {
        CAPTURE(c.name);
        const Tensor x = input(c.x, 4), w = weight_like(c.normalized, 5), b = ad::randn<double>(c.normalized, 6);
        const std::int64_t n = c.normalized.numel();
        // O(1) values through a few dozen operations (rstd up to 1/√eps ≈ 316 only multiplies x − mean = 0
        // for a normalised size of 1): rounding stays far below 1e-12.
        CHECK(ad::max_abs_diff(value_of(ad::layer_norm(ad::Const<double>(x), c.normalized, w, b, 1e-5)), naive_norm(x, n, w, b, 1e-5, true)) < 1e-12);
        CHECK(ad::max_abs_diff(value_of(ad::layer_norm(ad::Const<double>(x), c.normalized, w, ad::none, 0.5)), naive_norm(x, n, w, {}, 0.5, true)) < 1e-12);
        CHECK(ad::max_abs_diff(value_of(ad::layer_norm(ad::Const<double>(x), c.normalized, ad::none, b, 1e-3)), naive_norm(x, n, {}, b, 1e-3, true)) < 1e-12);
        CHECK(ad::max_abs_diff(value_of(ad::layer_norm(ad::Const<double>(x), c.normalized)), naive_norm(x, n, {}, {}, 1e-5, true)) < 1e-12);
    }
}

TEST_CASE_TEMPLATE("layer_norm of a normalised size of 1: y = bias and the gradients of x and weight are exactly 0", T, double, float) {
    ad::Param<T> x(ad::randn<T>({64, 1}, 1), "x"), w(ad::randn<T>({1}, 2), "weight"), b(ad::randn<T>({1}, 3), "bias");
    ad::Var<T> y = ad::layer_norm(x, {1}, w, b);
    y.backward(ad::randn<T>({64, 1}, 4));
    for (std::int64_t r = 0; r < 64; ++r) {
        CHECK(y.value()(r, 0) == b.value()(0));
        CHECK(x.grad()(r, 0) == T(0));
    }
    CHECK(w.grad()(0) == T(0));
}

TEST_CASE("layer_norm: the kernel's saved mean and rstd have torch's shape (normalised dimensions kept as 1)") {
    const Tensor x = input({2, 3, 4}, 1);
    const ad::NormForward<double> f = ad::layer_norm_forward<double>(x, {3, 4}, {}, {}, 1e-5);
    CHECK(f.mean.shape() == ad::Shape{2, 1, 1});
    CHECK(f.rstd.shape() == ad::Shape{2, 1, 1});
    for (std::int64_t r = 0; r < 2; ++r) {
        const auto row = x.array().segment(r * 12, 12);
        const double mean = row.sum() / 12, var = (row - mean).square().sum() / 12;
        CHECK(std::abs(f.mean.data()[r] - mean) < 1e-15);
        CHECK(std::abs(f.rstd.data()[r] - 1 / std::sqrt(var + 1e-5)) < 1e-14);
    }
    const ad::NormForward<double> g = ad::rms_norm_forward<double>(x, {4}, {}, 1e-6);
    CHECK_FALSE(g.mean.defined());
    CHECK(g.rstd.shape() == ad::Shape{2, 3, 1});
}

// ---- rms_norm -----------------------------------------------------------------------------------

TEST_CASE("rms_norm: gradcheck for every shape, eps, and weight absent, Param or Const") {
    for (const NormCase& c : norm_cases)
        for (double eps : {1e-6, 0.5}) {
            const std::string name = fmt::format("{}: x {}, normalized_shape {}, eps {}", c.name, c.x, c.normalized, eps);
            SUBCASE(name.c_str()) {
                check_every_activity([&](const auto& x, const auto& w, const auto&) { return ad::rms_norm(x, c.normalized, w, eps); },
                                     input(c.x, 1), weight_like(c.normalized, 2), Tensor(), 1);
            }
        }
}

TEST_CASE("rms_norm: forward equals the definition y = x / √(mean(x²) + eps) ⊙ w") {
    for (const NormCase& c : norm_cases) {
        CAPTURE(c.name);
        const Tensor x = input(c.x, 4), w = weight_like(c.normalized, 5);
        const std::int64_t n = c.normalized.numel();
        CHECK(ad::max_abs_diff(value_of(ad::rms_norm(ad::Const<double>(x), c.normalized, w, 1e-6)), naive_norm(x, n, w, {}, 1e-6, false)) < 1e-12);
        CHECK(ad::max_abs_diff(value_of(ad::rms_norm(ad::Const<double>(x), c.normalized, ad::none, 0.5)), naive_norm(x, n, {}, {}, 0.5, false)) < 1e-12);
    }
}

// ---- gelu and bias_gelu -------------------------------------------------------------------------

TEST_CASE("gelu: the tanh approximation, and GeluApproximate::none is the existing exact gelu") {
    const Tensor x = ad::randn<double>({3, 5, 7}, 1);
    const ad::Const<double> X(x);
    const Tensor exact = value_of(ad::gelu(X)), none = value_of(ad::gelu(X, ad::GeluApproximate::none));
    const Tensor tanh = value_of(ad::gelu(X, ad::GeluApproximate::tanh));
    CHECK(bitwise_equal(exact, none));
    for (std::int64_t i = 0; i < x.numel(); ++i) {
        // One or two roundings apart (the constants are spelled differently) on O(1) values.
        CHECK(std::abs(exact.data()[i] - gelu_exact(x.data()[i])) < 1e-14);
        CHECK(std::abs(tanh.data()[i] - gelu_tanh(x.data()[i])) < 1e-14);
    }
    // The approximation is close to, but not, the exact function (max difference ~5e-4 near |x| ≈ 2).
    const double diff = ad::max_abs_diff(exact, tanh);
    CHECK(diff > 1e-5);
    CHECK(diff < 1e-3);
}

TEST_CASE("gelu: gradcheck of both approximations") {
    auto check = [](ad::GeluApproximate a) {
        ad::Param<double> x(scaled(ad::randn<double>({3, 5, 7}, 1), 2.0), "x");
        check_report(ad::gradcheck([&] { return ad::gelu(x, a); }, {x}));
    };
    SUBCASE("none") { check(ad::GeluApproximate::none); }
    SUBCASE("tanh") { check(ad::GeluApproximate::tanh); }
}

TEST_CASE("bias_gelu: gradcheck for both approximations, x and b Params or Consts, ranks 1 to 4") {
    for (ad::GeluApproximate a : {ad::GeluApproximate::none, ad::GeluApproximate::tanh})
        for (const ad::Shape& s : {ad::Shape{7}, ad::Shape{3, 5}, ad::Shape{2, 3, 1}, ad::Shape{2, 1, 3, 4}}) {
            const std::string name = fmt::format("{}, x {}", a == ad::GeluApproximate::tanh ? "tanh" : "exact", s);
            SUBCASE(name.c_str()) {
                check_every_activity([&](const auto& x, const auto& b, const auto&) {
                    if constexpr (std::is_same_v<std::remove_cvref_t<decltype(b)>, ad::None>) return ad::gelu(x, a);
                    else return ad::bias_gelu(x, b, a);
                }, scaled(ad::randn<double>(s, 1), 2.0), ad::randn<double>({s.dim_from_end(1)}, 2), Tensor(), 1, {"bias (none: gelu(x))", ""});
            }
        }
}

TEST_CASE("bias_gelu(x, b) equals gelu(x + b) bitwise: value and both gradients (one chunk of rows)") {
    for (ad::GeluApproximate a : {ad::GeluApproximate::none, ad::GeluApproximate::tanh}) {
        CAPTURE(static_cast<int>(a));
        ad::Param<float> x(ad::randn<float>({4, 6, 33}, 1), "x"), b(ad::randn<float>({33}, 2), "b");
        ad::Param<float> x2(x.value().clone()), b2(b.value().clone());
        const ad::Tensor<float> dy = ad::randn<float>({4, 6, 33}, 3);
        ad::Var<float> fused = ad::bias_gelu(x, b, a);
        fused.backward(dy);
        ad::Var<float> composed = ad::gelu(x2 + b2, a);
        composed.backward(dy);
        CHECK(bitwise_equal(fused.value(), composed.value()));
        CHECK(bitwise_equal(x.grad(), x2.grad()));
        CHECK(bitwise_equal(b.grad(), b2.grad()));
    }
}

TEST_CASE("gelu in float: full vectors and row tails give the one-value functions' results bitwise; specials and large |x|") {
    // 1001 values (62 full vectors of 16 and a tail of 9; with 8-wide vectors a tail of 1) over
    // [-10, 10] with ±0, ±∞ and NaN at the start, the middle and the tail.
    const std::int64_t n = 1001;
    ad::Tensor<float> x({n});
    for (std::int64_t i = 0; i < n; ++i) x.data()[i] = -10.f + 20.f * static_cast<float>(i) / static_cast<float>(n - 1);
    const float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
    for (auto [i, v] : {std::pair{0, -inf}, {1, inf}, {2, nan}, {500, -0.f}, {501, 0.f}, {998, nan}, {999, inf}, {1000, -inf}})
        x.data()[i] = v;
    for (ad::GeluApproximate a : {ad::GeluApproximate::none, ad::GeluApproximate::tanh}) {
        CAPTURE(static_cast<int>(a));
        ad::Param<float> p(x.clone(), "x");
        ad::Var<float> y = ad::gelu(p, a);
        y.backward(ad::full<float>({n}, 1.f));
        for (std::int64_t i = 0; i < n; ++i) {
            CAPTURE(x.data()[i]);
            const float value = ad::Gelu::value(x.data()[i], a), slope = ad::Gelu::derivative(x.data()[i], a);
            CHECK(std::bit_cast<std::uint32_t>(y.value().data()[i]) == std::bit_cast<std::uint32_t>(value));
            CHECK(std::bit_cast<std::uint32_t>(p.grad().data()[i]) == std::bit_cast<std::uint32_t>(slope));
        }
        // Large |x|: gelu(x) ≈ x and gelu′ ≈ 1 above, ≈ 0 below (to float precision); +∞ stays +∞, NaN NaN.
        CHECK(std::abs(ad::Gelu::value(10.f, a) - 10.f) <= 1e-5f);
        CHECK(std::abs(ad::Gelu::value(-10.f, a)) <= 1e-6f);
        CHECK(std::abs(ad::Gelu::derivative(10.f, a) - 1.f) <= 1e-6f);
        CHECK(std::abs(ad::Gelu::derivative(-10.f, a)) <= 1e-6f);
        CHECK(ad::Gelu::value(inf, a) == inf);
        CHECK(std::isnan(ad::Gelu::value(nan, a)));
        CHECK(std::isnan(ad::Gelu::derivative(nan, a)));
    }
}

TEST_CASE("layer_norm, rms_norm and bias_gelu are one tape record each") {
    ad::Param<double> x(ad::randn<double>({2, 5}, 1)), w(ad::randn<double>({5}, 2)), b(ad::randn<double>({5}, 3));
    ad::Tape tape;
    ad::TapeGuard guard(tape);
    const ad::Var<double> y = ad::layer_norm(x, {5}, w, b);
    CHECK(tape.size() == 1);
    const ad::Var<double> z = ad::rms_norm(y, {5}, w, 1e-6);
    CHECK(tape.size() == 2);
    const ad::Var<double> g = ad::bias_gelu(z, b, ad::GeluApproximate::tanh);
    CHECK(tape.size() == 3);
}

// ---- determinism and precision ------------------------------------------------------------------

TEST_CASE("layer_norm, rms_norm and bias_gelu: bitwise identical results on 1 and 2 threads") {
    // Shapes large enough for the parallel paths: many row chunks for the weight and bias gradients.
    for (const auto& shapes : {std::pair{ad::Shape{96, 2048}, ad::Shape{2048}}, std::pair{ad::Shape{8, 512, 48}, ad::Shape{48}},
                               std::pair{ad::Shape{4, 64, 4, 33}, ad::Shape{4, 33}}}) {
        const ad::Shape xs = shapes.first, ns = shapes.second;  // not a structured binding: Clang 14 cannot capture one
        CAPTURE(xs);
        ad::Param<float> x(ad::randn<float>(xs, 1)), w(ad::randn<float>(ns, 2)), b(ad::randn<float>(ns, 3));
        ad::Param<float> bg(ad::randn<float>({xs.dim_from_end(1)}, 4));
        const ad::Tensor<float> dy = ad::randn<float>(xs, 5);
        auto run = [&](int threads) {
            ThreadCount t(threads);
            ad::zero_grad(x, w, b, bg);
            std::vector<ad::Tensor<float>> out;
            ad::Var<float> y = ad::layer_norm(x, ns, w, b);
            y.backward(dy);
            for (const auto& v : {y.value(), x.grad(), w.grad(), b.grad()}) out.push_back(v.clone());
            ad::zero_grad(x, w);
            ad::Var<float> z = ad::rms_norm(x, ns, w, 1e-6);
            z.backward(dy);
            for (const auto& v : {z.value(), x.grad(), w.grad()}) out.push_back(v.clone());
            ad::zero_grad(x);
            ad::Var<float> g = ad::bias_gelu(x, bg, ad::GeluApproximate::tanh);
            g.backward(dy);
            for (const auto& v : {g.value(), x.grad(), bg.grad()}) out.push_back(v.clone());
            return out;
        };
        const auto one = run(1), two = run(2);
        for (std::size_t i = 0; i < one.size(); ++i) {
            CAPTURE(i);
            CHECK(bitwise_equal(one[i], two[i]));
        }
    }
}

TEST_CASE("many chunks of rows: the weight and bias gradients equal the naive column sums over every row") {
    // 600 rows of 96: more than one chunk (row_sums.hpp: at least 2^14 elements, at most 64 chunks), the
    // last one partial. The gradients by their definition, Σ_rows dy ⊙ x̂ and Σ_rows dy, with plain loops.
    const ad::Shape xs{5, 120, 96}, ns{96};
    const std::int64_t n = 96, rows = 600;
    const Tensor x = input(xs, 1), dy = ad::randn<double>(xs, 2);
    ad::Param<double> w(weight_like(ns, 3)), b(ad::randn<double>(ns, 4)), bg(ad::randn<double>(ns, 5));
    ad::Var<double> y = ad::layer_norm(x, ns, w, b);
    y.backward(dy);
    const Tensor xhat = naive_norm(x, n, {}, {}, 1e-5, true);
    Tensor dw = ad::zeros<double>(ns), db = ad::zeros<double>(ns), dbg = ad::zeros<double>(ns);
    for (std::int64_t r = 0; r < rows; ++r)
        for (std::int64_t j = 0; j < n; ++j) {
            const double v = x.data()[r * n + j] + bg.value().data()[j];
            dw.data()[j] += dy.data()[r * n + j] * xhat.data()[r * n + j];
            db.data()[j] += dy.data()[r * n + j];
            dbg.data()[j] += dy.data()[r * n + j] * (0.5 * (1 + std::erf(v / std::sqrt(2.0))) + v * std::exp(-0.5 * v * v) / std::sqrt(2 * std::acos(-1.0)));
        }
    // Sums of 600 O(1) terms in another order: rounding ~1e-13.
    CHECK(ad::max_abs_diff(w.grad(), dw) < 1e-11);
    CHECK(ad::max_abs_diff(b.grad(), db) < 1e-11);
    ad::Var<double> g = ad::bias_gelu(x, bg);
    g.backward(dy);
    CHECK(ad::max_abs_diff(bg.grad(), dbg) < 1e-11);
}

TEST_CASE("layer_norm, rms_norm and bias_gelu: float agrees with double to float precision") {
    const ad::Shape xs{3, 7, 40}, ns{40};
    const Tensor x = input(xs, 1), w = weight_like(ns, 2), b = ad::randn<double>(ns, 3), dy = ad::randn<double>(xs, 4);
    auto to_float = [](const Tensor& t) {
        ad::Tensor<float> f(t.shape());
        f.array() = t.array().cast<float>();
        return f;
    };
    ad::Param<double> xd(x.clone()), wd(w.clone()), bd(b.clone());
    ad::Param<float> xf(to_float(x)), wf(to_float(w)), bf(to_float(b));
    // O(1) values and sums over 40 elements per row (280 rows for the weight gradients): float rounding
    // (6e-8 per operation) accumulates to ~1e-6 relative; 1e-5 catches any wrong term.
    SUBCASE("layer_norm") {
        ad::Var<double> yd = ad::layer_norm(xd, ns, wd, bd);
        yd.backward(dy);
        ad::Var<float> yf = ad::layer_norm(xf, ns, wf, bf);
        yf.backward(to_float(dy));
        CHECK(relative_error(yf.value(), yd.value()) < 1e-5);
        CHECK(relative_error(xf.grad(), xd.grad()) < 1e-5);
        CHECK(relative_error(wf.grad(), wd.grad()) < 1e-5);
        CHECK(relative_error(bf.grad(), bd.grad()) < 1e-5);
    }
    SUBCASE("rms_norm") {
        ad::Var<double> yd = ad::rms_norm(xd, ns, wd, 1e-6);
        yd.backward(dy);
        ad::Var<float> yf = ad::rms_norm(xf, ns, wf, 1e-6);
        yf.backward(to_float(dy));
        CHECK(relative_error(yf.value(), yd.value()) < 1e-5);
        CHECK(relative_error(xf.grad(), xd.grad()) < 1e-5);
        CHECK(relative_error(wf.grad(), wd.grad()) < 1e-5);
    }
    SUBCASE("bias_gelu, both approximations") {
        for (ad::GeluApproximate a : {ad::GeluApproximate::none, ad::GeluApproximate::tanh}) {
            ad::zero_grad(xd, bd, xf, bf);
            ad::Var<double> yd = ad::bias_gelu(xd, bd, a);
            yd.backward(dy);
            ad::Var<float> yf = ad::bias_gelu(xf, bf, a);
            yf.backward(to_float(dy));
            CHECK(relative_error(yf.value(), yd.value()) < 1e-5);
            CHECK(relative_error(xf.grad(), xd.grad()) < 1e-5);
            CHECK(relative_error(bf.grad(), bd.grad()) < 1e-5);
        }
    }
}

// ---- modules ------------------------------------------------------------------------------------

TEST_CASE("nn::LayerNorm: weight 1 and bias 0 of normalized_shape, named after the layer; eps 1e-5") {
    const ad::nn::LayerNorm<float> ln(ad::Shape{3, 4});
    CHECK(ln.normalized_shape() == ad::Shape{3, 4});
    CHECK(ln.eps() == 1e-5);
    const std::vector<ad::Param<float>> p = ln.parameters();
    REQUIRE(p.size() == 2);
    CHECK(p[0].name() == "layer_norm.weight");
    CHECK(p[1].name() == "layer_norm.bias");
    CHECK(p[0].shape() == ad::Shape{3, 4});
    CHECK(p[1].shape() == ad::Shape{3, 4});
    CHECK((p[0].value().array() == 1.0f).all());
    CHECK((p[1].value().array() == 0.0f).all());
    CHECK(p[0].state() == ln.weight().state());  // parameters() share the module's state
}

TEST_CASE("nn::LayerNorm: elementwise_affine=false has no parameters, bias=false only a weight") {
    const ad::nn::LayerNorm<double> plain(8, 1e-5, false);
    CHECK(plain.parameters().empty());
    CHECK_FALSE(plain.has_weight());
    const ad::nn::LayerNorm<double> no_bias(8, 1e-5, true, false);
    REQUIRE(no_bias.parameters().size() == 1);
    CHECK(no_bias.has_weight());
    CHECK_FALSE(no_bias.has_bias());
    check_error([&] { (void)plain.weight(); }, "nn::LayerNorm", {"no weight"});
    check_error([&] { (void)no_bias.bias(); }, "nn::LayerNorm", {"no bias"});
}

TEST_CASE("nn::LayerNorm and nn::RMSNorm: forward is the functional op with the module's parameters") {
    const Tensor x = input({2, 3, 6}, 1);
    ad::nn::LayerNorm<double> ln(6, 1e-3);
    ln.weight().value() = weight_like({6}, 2);
    ln.bias().value() = ad::randn<double>({6}, 3);
    CHECK(bitwise_equal(ln(x).value(), value_of(ad::layer_norm(x, {6}, ln.weight().value(), ln.bias().value(), 1e-3))));
    CHECK(bitwise_equal(ln.forward(x).value(), ln(x).value()));
    const ad::nn::LayerNorm<double> no_bias(6, 1e-5, true, false), plain(6, 1e-5, false);
    CHECK(bitwise_equal(no_bias(x).value(), value_of(ad::layer_norm(x, {6}))));  // weight 1
    CHECK(bitwise_equal(plain(x).value(), value_of(ad::layer_norm(x, {6}))));

    ad::nn::RMSNorm<double> rms(ad::Shape{3, 6}, 1e-4);
    rms.weight().value() = weight_like({3, 6}, 4);
    CHECK(bitwise_equal(rms(x).value(), value_of(ad::rms_norm(x, {3, 6}, rms.weight().value(), 1e-4))));
    const ad::nn::RMSNorm<double> rms_plain(6, std::nullopt, false);
    CHECK(rms_plain.parameters().empty());
    CHECK(bitwise_equal(rms_plain.forward(x).value(), value_of(ad::rms_norm(x, {6}, ad::none, std::numeric_limits<double>::epsilon()))));
}

TEST_CASE("nn::RMSNorm: eps defaults to the type's machine epsilon (torch's eps=None), weight 1") {
    const ad::nn::RMSNorm<float> f(16);
    const ad::nn::RMSNorm<double> d(16);
    CHECK(f.eps() == static_cast<double>(std::numeric_limits<float>::epsilon()));
    CHECK(d.eps() == std::numeric_limits<double>::epsilon());
    REQUIRE(f.parameters().size() == 1);
    CHECK(f.parameters()[0].name() == "rms_norm.weight");
    CHECK((f.weight().value().array() == 1.0f).all());
}

TEST_CASE("nn::LayerNorm and nn::RMSNorm: gradcheck through the modules' parameters") {
    ad::nn::LayerNorm<double> ln(ad::Shape{2, 5});
    ln.weight().value() = weight_like({2, 5}, 1);
    ln.bias().value() = ad::randn<double>({2, 5}, 2);
    ad::nn::RMSNorm<double> rms(5, 1e-6);
    rms.weight().value() = weight_like({5}, 3);
    ad::Param<double> x(input({3, 2, 5}, 4), "x");
    check_report(ad::gradcheck([&] { return rms(ln(x)); }, {x, ln.weight(), ln.bias(), rms.weight()}));
}

// ---- PyTorch goldens ----------------------------------------------------------------------------
// Tolerances as tests/test_goldens.cpp (normwise relative, golden::compare): float64 1e-10 (both sides
// round O(1) values a few dozen operations deep, ~1e-15 each), float32 1e-4 (independent float
// rounding, observed ~1e-6 of the tensor's scale; a wrong term is O(1)).

namespace {

using golden::load;

// The trailing `normalized_rank` dimensions of x.
template <class T>
ad::Shape normalized_shape_of(const golden::Fixture& fx) {
    const ad::Shape x = fx.tensor<T>("x").shape();
    const auto k = static_cast<int>(fx.tensor<T>("normalized_rank").item());
    return ad::Shape::from_range(x.end() - k, x.end());
}

// Runs y = make(x, weight or none, bias or none, eps) with Params for every tensor the fixture has,
// backward with torch's dout, and compares y and every gradient torch stored.
template <class T, class Make>
void check_fixture(const std::string& case_name, Make&& make) {
    const golden::Fixture fx = load<T>(case_name);
    std::vector<ad::Param<T>> params;
    params.reserve(3);
    for (const char* name : {"x", "weight", "bias"})
        if (fx.has(name)) params.emplace_back(fx.tensor<T>(name), name);
    auto find = [&](const std::string& name) -> const ad::Param<T>* {
        for (const auto& p : params)
            if (p.name() == name) return &p;
        return nullptr;
    };
    const double eps = fx.has("eps") ? static_cast<double>(fx.tensor<T>("eps").item()) : 0.0;
    ad::Var<T> y = make(fx, *find("x"), find("weight"), find("bias"), eps);
    y.backward(fx.tensor<T>("dout"));
    golden::check_matches(fx, "out", y.value(), golden::rtol<T>);
    std::set<std::string> compared;
    for (const auto& p : params) {
        golden::check_matches(fx, "grad." + p.name(), p.grad(), golden::rtol<T>);
        compared.insert("grad." + p.name());
    }
    for (const std::string& name : fx.names())
        if (name.rfind("grad.", 0) == 0) CHECK_MESSAGE(compared.count(name) == 1, name, " of ", fx.path(), " was not compared");
}

template <class T>
void check_layer_norm_golden(const std::string& case_name) {
    check_fixture<T>(case_name, [](const golden::Fixture& fx, const ad::Param<T>& x, const ad::Param<T>* w, const ad::Param<T>* b, double eps) {
        const ad::Shape ns = normalized_shape_of<T>(fx);
        if (w && b) return ad::Var<T>(ad::layer_norm(x, ns, *w, *b, eps));
        if (w) return ad::Var<T>(ad::layer_norm(x, ns, *w, ad::none, eps));
        if (b) return ad::Var<T>(ad::layer_norm(x, ns, ad::none, *b, eps));
        return ad::Var<T>(ad::layer_norm(x, ns, ad::none, ad::none, eps));
    });
}

template <class T>
void check_rms_norm_golden(const std::string& case_name) {
    check_fixture<T>(case_name, [](const golden::Fixture& fx, const ad::Param<T>& x, const ad::Param<T>* w, const ad::Param<T>*, double eps) {
        const ad::Shape ns = normalized_shape_of<T>(fx);
        if (w) return ad::Var<T>(ad::rms_norm(x, ns, *w, eps));
        return ad::Var<T>(ad::rms_norm(x, ns, ad::none, eps));
    });
}

// fused: bias_gelu(x, b); otherwise gelu(x + b) (or gelu(x) when the fixture has no bias).
template <class T>
void check_gelu_golden(const std::string& case_name, bool fused) {
    check_fixture<T>(case_name, [fused](const golden::Fixture& fx, const ad::Param<T>& x, const ad::Param<T>*, const ad::Param<T>* b, double) {
        const auto a = fx.tensor<T>("approximate").item() == T(1) ? ad::GeluApproximate::tanh : ad::GeluApproximate::none;
        if (!b) return ad::Var<T>(ad::gelu(x, a));
        if (fused) return ad::Var<T>(ad::bias_gelu(x, *b, a));
        return ad::Var<T>(ad::gelu(x + *b, a));
    });
}

}  // namespace

TEST_CASE_TEMPLATE("torch layer_norm: output and gradients of x, weight and bias match", T, double, float) {
    SUBCASE("(5, 8) over the last dimension") { check_layer_norm_golden<T>("layer_norm_rank2"); }
    SUBCASE("(2, 3, 4, 6) over the last two dimensions") { check_layer_norm_golden<T>("layer_norm_rank4_two_dims"); }
    SUBCASE("(2, 3, 5) over all three dimensions, eps 1e-3") { check_layer_norm_golden<T>("layer_norm_rank3_all_dims"); }
    SUBCASE("(7) without weight and bias") { check_layer_norm_golden<T>("layer_norm_rank1_no_affine"); }
    SUBCASE("weight without bias, eps 1e-3") { check_layer_norm_golden<T>("layer_norm_weight_only"); }
    SUBCASE("bias without weight, eps 0.1") { check_layer_norm_golden<T>("layer_norm_bias_only"); }
}

TEST_CASE_TEMPLATE("torch layer_norm of a normalised size of 1: y = bias matches; dx and dweight are exactly 0, torch's are rounding noise", T,
                   double, float) {
    // Over one element x − mean = 0, so y = bias whatever x and w are: dx = 0 and dweight = 0. Ours are
    // exactly 0; torch's are the rounding of its mean times rstd = 1/√eps ≈ 316 (~1e-14 in float64, ~1e-5
    // in float32), which a comparison relative to torch's own scale cannot judge.
    const golden::Fixture fx = load<T>("layer_norm_size1");
    ad::Param<T> x(fx.tensor<T>("x"), "x"), w(fx.tensor<T>("weight"), "weight"), b(fx.tensor<T>("bias"), "bias");
    ad::Var<T> y = ad::layer_norm(x, {1}, w, b, static_cast<double>(fx.tensor<T>("eps").item()));
    y.backward(fx.tensor<T>("dout"));
    golden::check_matches(fx, "out", y.value(), golden::rtol<T>);
    golden::check_matches(fx, "grad.bias", b.grad(), golden::rtol<T>);
    CHECK(x.grad().array().abs().maxCoeff() == T(0));
    CHECK(w.grad().array().abs().maxCoeff() == T(0));
    CHECK(fx.tensor<T>("grad.x").array().abs().maxCoeff() < T(std::is_same_v<T, double> ? 1e-13 : 1e-4));
    CHECK(fx.tensor<T>("grad.weight").array().abs().maxCoeff() < T(std::is_same_v<T, double> ? 1e-13 : 1e-4));
}

TEST_CASE_TEMPLATE("torch layer_norm through nn::LayerNorm with torch's weight and bias", T, double, float) {
    const golden::Fixture fx = load<T>("layer_norm_rank2");
    ad::nn::LayerNorm<T> ln(8);
    ln.weight().value() = fx.tensor<T>("weight");
    ln.bias().value() = fx.tensor<T>("bias");
    ad::Param<T> x(fx.tensor<T>("x"), "x");
    ad::Var<T> y = ln(x);
    y.backward(fx.tensor<T>("dout"));
    golden::check_matches(fx, "out", y.value(), golden::rtol<T>);
    golden::check_matches(fx, "grad.x", x.grad(), golden::rtol<T>);
    golden::check_matches(fx, "grad.weight", ln.weight().grad(), golden::rtol<T>);
    golden::check_matches(fx, "grad.bias", ln.bias().grad(), golden::rtol<T>);
}

TEST_CASE_TEMPLATE("torch rms_norm: output and gradients match, eps=None being the type's machine epsilon", T, double, float) {
    SUBCASE("(2, 3, 8) with weight, eps=None") {
        CHECK(load<T>("rms_norm_default_eps").template tensor<T>("eps").item() == std::numeric_limits<T>::epsilon());
        check_rms_norm_golden<T>("rms_norm_default_eps");
    }
    SUBCASE("(3, 4, 5) over two dimensions without weight, eps 1e-6") { check_rms_norm_golden<T>("rms_norm_two_dims_no_weight"); }
    SUBCASE("(9), eps 0.5") { check_rms_norm_golden<T>("rms_norm_rank1"); }
}

TEST_CASE_TEMPLATE("torch rms_norm through nn::RMSNorm with its default eps", T, double, float) {
    const golden::Fixture fx = load<T>("rms_norm_default_eps");
    ad::nn::RMSNorm<T> rms(8);
    rms.weight().value() = fx.tensor<T>("weight");
    ad::Param<T> x(fx.tensor<T>("x"), "x");
    ad::Var<T> y = rms(x);
    y.backward(fx.tensor<T>("dout"));
    golden::check_matches(fx, "out", y.value(), golden::rtol<T>);
    golden::check_matches(fx, "grad.x", x.grad(), golden::rtol<T>);
    golden::check_matches(fx, "grad.weight", rms.weight().grad(), golden::rtol<T>);
}

TEST_CASE_TEMPLATE("torch gelu(approximate='none' | 'tanh') and gelu(x + b): output and gradients match, fused and composed", T,
                   double, float) {
    SUBCASE("gelu exact") { check_gelu_golden<T>("gelu_exact", false); }
    SUBCASE("gelu tanh") { check_gelu_golden<T>("gelu_tanh", false); }
    SUBCASE("bias_gelu exact") { check_gelu_golden<T>("bias_gelu_exact", true); }
    SUBCASE("bias_gelu tanh") { check_gelu_golden<T>("bias_gelu_tanh", true); }
    SUBCASE("gelu(x + b) exact") { check_gelu_golden<T>("bias_gelu_exact", false); }
    SUBCASE("gelu(x + b) tanh") { check_gelu_golden<T>("bias_gelu_tanh", false); }
}

// ---- bad input ----------------------------------------------------------------------------------

TEST_CASE("layer_norm: bad input is rejected with op, argument and shapes, before anything is recorded") {
    const ad::Param<double> x(ad::zeros<double>({2, 3, 4}));
    const ad::Param<double> w(ad::zeros<double>({4})), b(ad::zeros<double>({4}));
    SUBCASE("rank 0 input") {
        check_error([] { (void)ad::layer_norm(ad::Param<double>(ad::zeros<double>({})), {1}); }, "layer_norm", {"input must have rank 1..4", "got ()"});
    }
    SUBCASE("normalized_shape not at the end of the input") {
        check_error([&] { (void)ad::layer_norm(x, {3}); }, "layer_norm", {"input (2,3,4) does not end with normalized_shape (3)"});
        check_error([&] { (void)ad::layer_norm(x, {2, 4}); }, "layer_norm", {"input (2,3,4)", "normalized_shape (2,4)"});
    }
    SUBCASE("normalized_shape empty or longer than the input") {
        check_error([&] { (void)ad::layer_norm(x, ad::Shape{}); }, "layer_norm", {"normalized_shape () must have rank 1..3", "input (2,3,4)"});
        check_error([] { (void)ad::layer_norm(ad::Param<double>(ad::zeros<double>({4})), {1, 4}); }, "layer_norm",
                    {"normalized_shape (1,4) must have rank 1..1", "input (4)"});
    }
    SUBCASE("normalized_shape with no elements") {
        check_error([] { (void)ad::layer_norm(ad::Param<double>(ad::zeros<double>({3, 0})), {0}); }, "layer_norm",
                    {"normalized_shape (0) has no elements"});
    }
    SUBCASE("weight or bias of the wrong shape") {
        check_error([&] { (void)ad::layer_norm(x, {4}, ad::Param<double>(ad::zeros<double>({5})), b); }, "layer_norm",
                    {"weight must have normalized_shape (4), got (5)"});
        check_error([&] { (void)ad::layer_norm(x, {4}, w, ad::Param<double>(ad::zeros<double>({1, 4}))); }, "layer_norm",
                    {"bias must have normalized_shape (4), got (1,4)"});
        check_error([&] { (void)ad::layer_norm(x, {3, 4}, w, ad::none); }, "layer_norm", {"weight must have normalized_shape (3,4), got (4)"});
    }
    SUBCASE("eps zero, negative, NaN, infinite, or 0 in float") {
        check_error([&] { (void)ad::layer_norm(x, {4}, w, b, 0.0); }, "layer_norm", {"eps must be finite and > 0, got 0"});
        check_error([&] { (void)ad::layer_norm(x, {4}, w, b, -1e-5); }, "layer_norm", {"eps must be finite and > 0, got -1e-05"});
        check_error([&] { (void)ad::layer_norm(x, {4}, w, b, std::nan("")); }, "layer_norm", {"eps must be finite and > 0, got nan"});
        check_error([&] { (void)ad::layer_norm(x, {4}, w, b, HUGE_VAL); }, "layer_norm", {"eps must be finite and > 0, got inf"});
        check_error([] { (void)ad::layer_norm(ad::Param<float>(ad::zeros<float>({4})), {4}, ad::none, ad::none, 1e-60); }, "layer_norm",
                    {"eps 1e-60 rounds to 0"});
    }
}

TEST_CASE("rms_norm: bad input is rejected") {
    const ad::Param<float> x(ad::zeros<float>({2, 6}));
    check_error([] { (void)ad::rms_norm(ad::Param<float>(ad::zeros<float>({})), {1}, ad::none, 1e-6); }, "rms_norm", {"input must have rank 1..4, got ()"});
    check_error([&] { (void)ad::rms_norm(x, {5}, ad::none, 1e-6); }, "rms_norm", {"input (2,6) does not end with normalized_shape (5)"});
    check_error([&] { (void)ad::rms_norm(x, {6}, ad::Param<float>(ad::zeros<float>({2, 6})), 1e-6); }, "rms_norm",
                {"weight must have normalized_shape (6), got (2,6)"});
    check_error([&] { (void)ad::rms_norm(x, {6}, ad::none, 0.0); }, "rms_norm", {"eps must be finite and > 0, got 0"});
}

TEST_CASE("gelu and bias_gelu: bad input is rejected") {
    const ad::Param<double> x(ad::zeros<double>({2, 3, 5}));
    check_error([&] { (void)ad::bias_gelu(x, ad::Param<double>(ad::zeros<double>({3}))); }, "bias_gelu",
                {"bias must have shape (5) (the input's last dimension) for input (2,3,5), got (3)"});
    check_error([&] { (void)ad::bias_gelu(x, ad::Param<double>(ad::zeros<double>({1, 5}))); }, "bias_gelu", {"got (1,5)"});
    check_error([] { (void)ad::bias_gelu(ad::Param<double>(ad::zeros<double>({})), ad::zeros<double>({1})); }, "bias_gelu",
                {"input must have rank 1..4, got ()"});
    const auto bad = static_cast<ad::GeluApproximate>(7);
    check_error([&] { (void)ad::bias_gelu(x, ad::zeros<double>({5}), bad); }, "bias_gelu", {"approximate must be", "got 7"});
    check_error([&] { (void)ad::gelu(x, bad); }, "gelu", {"approximate must be GeluApproximate::none or GeluApproximate::tanh, got 7"});
}

TEST_CASE("the functional kernels validate their inputs too") {
    const Tensor x = ad::zeros<double>({2, 4}), w = ad::ones<double>({4});
    const ad::NormForward<double> f = ad::layer_norm_forward<double>(x, {4}, w, {}, 1e-5);
    Tensor dx, dw, db;
    check_error([&] { (void)ad::layer_norm_forward<double>(x, {4}, ad::ones<double>({3}), {}, 1e-5); }, "layer_norm",
                {"weight must have normalized_shape (4), got (3)"});
    check_error([&] { ad::layer_norm_backward<double>(&dx, &dw, &db, ad::zeros<double>({2, 5}), x, w, f.mean, f.rstd, {4}); },
                "layer_norm_backward", {"dy must have the input's shape (2,4), got (2,5)"});
    check_error([&] { ad::layer_norm_backward<double>(&dx, &dw, &db, x, x, w, f.mean, ad::zeros<double>({2}), {4}); },
                "layer_norm_backward", {"rstd must have shape (2,1) for input (2,4), got (2)"});
    check_error([&] { ad::layer_norm_backward<double>(&dx, &dw, &db, x, x, w, {}, f.rstd, {4}); }, "layer_norm_backward",
                {"mean must have shape (2,1)", "got (undefined)"});
    check_error([&] { ad::layer_norm_backward<double>(&dx, &dw, nullptr, x, x, {}, f.mean, f.rstd, {4}); }, "layer_norm_backward",
                {"dweight was asked for, but there is no weight"});
    check_error([&] { (void)ad::rms_norm_forward<double>(x, {1, 4}, {}, 1e-6); }, "rms_norm", {"input (2,4) does not end with normalized_shape (1,4)"});
    check_error([&] { ad::rms_norm_backward<double>(&dx, nullptr, x, x, {}, ad::zeros<double>({2, 4}), {4}); }, "rms_norm_backward",
                {"rstd must have shape (2,1) for input (2,4), got (2,4)"});
    check_error([&] { (void)ad::bias_gelu_forward<double>(x, ad::zeros<double>({3})); }, "bias_gelu", {"bias must have shape (4)"});
    check_error([&] { ad::bias_gelu_backward<double>(&dx, &db, ad::zeros<double>({4}), x, w); }, "bias_gelu_backward",
                {"dy must have the input's shape (2,4), got (4)"});
}

TEST_CASE("nn::LayerNorm and nn::RMSNorm: bad construction throws") {
    check_error([] { (void)ad::nn::LayerNorm<float>(8, 0.0); }, "nn::LayerNorm", {"eps must be finite and > 0, got 0"});
    check_error([] { (void)ad::nn::LayerNorm<float>(0); }, "nn::LayerNorm", {"normalized_shape (0) has no elements"});
    check_error([] { (void)ad::nn::LayerNorm<float>(ad::Shape{}); }, "nn::LayerNorm", {"normalized_shape must have rank 1..4, got ()"});
    check_error([] { (void)ad::nn::RMSNorm<double>(4, -1.0); }, "nn::RMSNorm", {"eps must be finite and > 0, got -1"});
    check_error([] { (void)ad::nn::RMSNorm<double>(4, std::nullopt, false).weight(); }, "nn::RMSNorm", {"no weight"});
}

TEST_CASE("gelu in float: its erf and tanh stay within 4e-7 of the double functions, and NaN propagates") {
    double erf_err = 0, tanh_err = 0;
    for (double x = -8; x <= 8; x += 1e-4) {
        const auto f = static_cast<float>(x);
        erf_err = std::max(erf_err, std::abs(static_cast<double>(ad::Gelu::erf_of(f)) - std::erf(static_cast<double>(f))));
        tanh_err = std::max(tanh_err, std::abs(static_cast<double>(ad::Gelu::tanh_of(f)) - std::tanh(static_cast<double>(f))));
    }
    CHECK(erf_err < 4e-7);
    CHECK(tanh_err < 4e-7);
    CHECK(std::isnan(ad::Gelu::erf_of(std::numeric_limits<float>::quiet_NaN())));
    CHECK(std::isnan(ad::Gelu::value(std::numeric_limits<float>::quiet_NaN(), ad::GeluApproximate::tanh)));
    CHECK(ad::Gelu::tanh_of(100.f) == 1.f);
    CHECK(ad::Gelu::tanh_of(-100.f) == -1.f);
}

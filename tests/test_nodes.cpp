// Every expression node, checked by gradcheck in double for every combination of which inputs are
// Params and which are Consts, at sizes that include 1 and odd numbers. With every input a Const the
// node's type must say that no gradient work is needed (may_require_grad == false) and nothing is
// recorded. gradcheck compares the engine's gradient with central differences of the same forward,
// so where a node's meaning is easy to get backwards (c - x, x / s, operand order) its forward is
// checked against the definition as well.
#include <doctest/doctest.h>

#include <cstdlib>

#include <algorithm>
#include <array>
#include <cmath>
#include <concepts>
#include <cstdint>
#include <limits>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include <autodiff/autodiff.hpp>

namespace ad = autodiff;
using Tensor = ad::Tensor<double>;

namespace {

// ---- inputs -------------------------------------------------------------------------------------

Tensor normal(const ad::Shape& s, std::uint64_t seed) { return ad::randn<double>(s, seed); }

// Values in [0.5, 2): for log, pow(x, 0.5) and anything else that needs x > 0.
Tensor positive(const ad::Shape& s, std::uint64_t seed) { return ad::uniform<double>(s, 0.5, 2.0, seed); }

// Values in ±[0.5, 1.5): divisors, and relu/abs inputs kept away from their kink at 0 (the
// central differences, which step up to 2·eps = 2e-4 away, never cross it).
Tensor away_from_zero(const ad::Shape& s, std::uint64_t seed) {
    Tensor t = ad::uniform<double>(s, 0.5, 1.5, seed);
    const Tensor sign = ad::uniform<double>(s, -1.0, 1.0, seed + 1000);
    for (std::int64_t i = 0; i < t.numel(); ++i)
        if (sign.data()[i] < 0) t.data()[i] = -t.data()[i];
    return t;
}

ad::Tensor<bool> bools(const ad::Shape& s, const std::vector<bool>& v) { return ad::from_vector<bool>(s, v); }

// ---- checking -----------------------------------------------------------------------------------

// gradcheck with its default options (fourth-order central differences, eps 1e-4, elementwise
// |analytic - numeric| <= 1e-8 + 1e-6·|numeric|), and a normwise relative error below 1e-6: the
// differences in double are good to ~1e-11 here. AUTODIFF_GRADCHECK_REPORT=1 prints every report.
void check_report(const ad::GradcheckReport& report) {
    INFO(report.str());
    if (std::getenv("AUTODIFF_GRADCHECK_REPORT")) MESSAGE(report.str());
    CHECK(report.passed);
    CHECK(report.max_rel_error() < 1e-6);
}

template <class F>
void check_gradients(F&& f, std::vector<ad::Param<double>> params) {
    check_report(ad::gradcheck(std::forward<F>(f), std::move(params)));
}

// One input of a node under test: its name (used for the Param and the SUBCASE) and its value.
struct Input {
    std::string name;
    Tensor value;
};

template <bool IsParam>
auto make_leaf(const Input& in) {
    if constexpr (IsParam) return ad::Param<double>(in.value.clone(), in.name);
    else return ad::Const<double>(in.value);
}

// Bit k of Mask says whether input k is a Param (1) or a Const (0).
template <std::size_t Mask, std::size_t N, class Op>
void check_activity(const Op& op, const std::array<Input, N>& inputs) {
    [&]<std::size_t... I>(std::index_sequence<I...>) {
        std::string name;
        ((name += std::string(I ? ", " : "") + inputs[I].name + (((Mask >> I) & 1) ? " Param" : " Const")), ...);
        if constexpr (Mask == 0) name += ": no gradient work, nothing recorded";
        SUBCASE(name.c_str()) {
            auto leaves = std::make_tuple(make_leaf<((Mask >> I) & 1) != 0>(inputs[I])...);
            using E = ad::expr_t<decltype(std::apply(op, leaves))>;
            if constexpr (Mask == 0) {
                static_assert(!E::may_require_grad, "an expression of Consts only must not require grad");
                const std::size_t records = ad::current_tape().size();
                const ad::Var<double> y = std::apply(op, leaves);
                CHECK_FALSE(y.requires_grad());
                CHECK(ad::current_tape().size() == records);
            } else {
                static_assert(E::may_require_grad, "an expression with a Param must require grad");
                std::vector<ad::Param<double>> params;
                (
                    [&] {
                        if constexpr (((Mask >> I) & 1) != 0) params.push_back(std::get<I>(leaves));
                    }(),
                    ...);
                check_gradients([&] { return std::apply(op, leaves); }, params);
            }
        }
    }(std::make_index_sequence<N>{});
}

// gradcheck of op(inputs...) for every way of making each input a Param or a Const (one SUBCASE each).
template <class Op, std::same_as<Input>... In>
void check_every_activity(const Op& op, const In&... in) {
    constexpr std::size_t n = sizeof...(In);
    const std::array<Input, n> inputs{in...};
    [&]<std::size_t... M>(std::index_sequence<M...>) { (check_activity<M>(op, inputs), ...); }(
        std::make_index_sequence<std::size_t{1} << n>{});
}

// The value of an expression, computed without recording.
template <class E>
Tensor value_of(const E& e) {
    ad::NoGradGuard no_grad;
    return ad::eval(e).value();
}

// Rounding of one or two operations on O(1) values in double stays below 1e-15; 1e-14 leaves room
// and still catches any wrong sign, operand order or constant.
constexpr double forward_tol = 1e-14;

template <class F>
Tensor elementwise(const Tensor& x, F f) {
    Tensor y = ad::empty<double>(x.shape());
    for (std::int64_t i = 0; i < x.numel(); ++i) y.data()[i] = f(x.data()[i]);
    return y;
}

// Gradient of sum(f(x)) with respect to x, recorded on a private tape.
template <class F>
Tensor grad_of_sum(ad::Param<double>& x, F f) {
    ad::Tape tape;
    ad::TapeGuard guard(tape);
    x.zero_grad();
    ad::Var<double> loss = ad::sum(f(x));
    loss.backward();
    return x.grad().clone();
}

const auto add = [](const auto& a, const auto& b) { return a + b; };
const auto sub = [](const auto& a, const auto& b) { return a - b; };
const auto mul = [](const auto& a, const auto& b) { return a * b; };
const auto divide = [](const auto& a, const auto& b) { return a / b; };
const auto mat = [](const auto& a, const auto& b) { return ad::matmul(a, b); };

// The shapes every binary op is checked on; `op` is add, sub, mul or divide.
template <class Op>
void check_broadcasting(const Op& op) {
    auto run = [&](const ad::Shape& a, const ad::Shape& b) {
        check_every_activity(op, Input{"lhs", away_from_zero(a, 1)}, Input{"rhs", away_from_zero(b, 2)});
    };
    SUBCASE("same shapes (2,3,5,7)") { run({2, 3, 5, 7}, {2, 3, 5, 7}); }
    SUBCASE("(2,3,5,7) with (5,7): rhs broadcast over batch and heads") { run({2, 3, 5, 7}, {5, 7}); }
    SUBCASE("(2,3,5,7) with (3,5,7): rhs broadcast over the batch") { run({2, 3, 5, 7}, {3, 5, 7}); }
    SUBCASE("(2,3,5,7) with (1,3,1,7): rhs broadcast over batch and queries") { run({2, 3, 5, 7}, {1, 3, 1, 7}); }
    SUBCASE("(2,3,5,7) with (1): a one-element rhs") { run({2, 3, 5, 7}, {1}); }
    SUBCASE("(5,7) with (2,3,5,7): lhs broadcast") { run({5, 7}, {2, 3, 5, 7}); }
    SUBCASE("(2,1,5,1) with (1,3,1,7): both broadcast to (2,3,5,7)") { run({2, 1, 5, 1}, {1, 3, 1, 7}); }
    SUBCASE("(1) with (1): size 1") { run({1}, {1}); }
}

}  // namespace

// ---- matmul and transpose -----------------------------------------------------------------------

TEST_CASE("matmul: batched rank 3, with a size-1 output column") {
    check_every_activity(mat, Input{"lhs", normal({3, 5, 7}, 1)}, Input{"rhs", normal({3, 7, 1}, 2)});
}

TEST_CASE("matmul: batched rank 4, with a single query row") {
    check_every_activity(mat, Input{"lhs", normal({2, 3, 1, 5}, 1)}, Input{"rhs", normal({2, 3, 5, 7}, 2)});
}

TEST_CASE("matmul: a rank-2 right operand is broadcast over the batch and its gradient summed over it") {
    SUBCASE("rank 4 by rank 2") {
        check_every_activity(mat, Input{"lhs", normal({2, 3, 5, 7}, 1)}, Input{"rhs", normal({7, 3}, 2)});
    }
    SUBCASE("rank 3 by rank 2") {
        check_every_activity(mat, Input{"lhs", normal({3, 1, 5}, 1)}, Input{"rhs", normal({5, 7}, 2)});
    }
}

TEST_CASE("matmul: a rank-2 left operand is broadcast over the batch and its gradient summed over it") {
    SUBCASE("rank 2 by rank 4") {
        check_every_activity(mat, Input{"lhs", normal({5, 7}, 1)}, Input{"rhs", normal({2, 3, 7, 1}, 2)});
    }
    SUBCASE("rank 2 by rank 3") {
        check_every_activity(mat, Input{"lhs", normal({1, 7}, 1)}, Input{"rhs", normal({3, 7, 5}, 2)});
    }
}

TEST_CASE("matmul: rank 2 by rank 2") {
    SUBCASE("(1,7) by (7,5)") { check_every_activity(mat, Input{"lhs", normal({1, 7}, 1)}, Input{"rhs", normal({7, 5}, 2)}); }
    SUBCASE("(5,1) by (1,3)") { check_every_activity(mat, Input{"lhs", normal({5, 1}, 1)}, Input{"rhs", normal({1, 3}, 2)}); }
}

TEST_CASE("matmul: the product equals the definition C[i,j] = sum_k A[i,k]·B[k,j] for each batch") {
    const Tensor A = normal({2, 3, 5}, 1), B = normal({2, 5, 7}, 2);
    const Tensor C = value_of(ad::matmul(ad::Const<double>(A), ad::Const<double>(B)));
    REQUIRE(C.shape() == ad::Shape{2, 3, 7});
    double err = 0;
    for (int b = 0; b < 2; ++b)
        for (int i = 0; i < 3; ++i)
            for (int j = 0; j < 7; ++j) {
                double s = 0;
                for (int k = 0; k < 5; ++k) s += A(b, i, k) * B(b, k, j);
                err = std::max(err, std::abs(C(b, i, j) - s));
            }
    CHECK(err < forward_tol * 10);  // a dot product of 5 O(1) terms: a few roundings
}

const auto mat_bt = [](const auto& a, const auto& b) { return ad::matmul(a, ad::transpose(b)); };
const auto mat_at = [](const auto& a, const auto& b) { return ad::matmul(ad::transpose(a), b); };
const auto mat_at_bt = [](const auto& a, const auto& b) { return ad::matmul(ad::transpose(a), ad::transpose(b)); };

TEST_CASE("matmul(a, transpose(b)): gradients of both operands") {
    SUBCASE("batched b (2,3,1,7): a single key") {
        check_every_activity(mat_bt, Input{"a", normal({2, 3, 5, 7}, 1)}, Input{"b", normal({2, 3, 1, 7}, 2)});
    }
    SUBCASE("rank-2 b (3,7) broadcast over the batch") {
        check_every_activity(mat_bt, Input{"a", normal({2, 3, 5, 7}, 1)}, Input{"b", normal({3, 7}, 2)});
    }
    SUBCASE("rank-2 a (5,7) with batched b (3,1,7)") {
        check_every_activity(mat_bt, Input{"a", normal({5, 7}, 1)}, Input{"b", normal({3, 1, 7}, 2)});
    }
}

TEST_CASE("matmul(transpose(a), b): gradients of both operands") {
    SUBCASE("batched a (2,3,7,5), b (2,3,7,1)") {
        check_every_activity(mat_at, Input{"a", normal({2, 3, 7, 5}, 1)}, Input{"b", normal({2, 3, 7, 1}, 2)});
    }
    SUBCASE("rank-2 a (7,5) broadcast over batched b (2,3,7,3)") {
        check_every_activity(mat_at, Input{"a", normal({7, 5}, 1)}, Input{"b", normal({2, 3, 7, 3}, 2)});
    }
    SUBCASE("batched a (3,7,5) with rank-2 b (7,1)") {
        check_every_activity(mat_at, Input{"a", normal({3, 7, 5}, 1)}, Input{"b", normal({7, 1}, 2)});
    }
}

TEST_CASE("matmul(transpose(a), transpose(b)): gradients of both operands") {
    check_every_activity(mat_at_bt, Input{"a", normal({3, 7, 5}, 1)}, Input{"b", normal({3, 1, 7}, 2)});
}

TEST_CASE("matmul folds a transpose operand: one tape record, the same values as an explicit transpose") {
    ad::Param<double> a(normal({2, 3, 5, 7}, 1)), b(normal({2, 3, 4, 7}, 2));
    ad::Tape tape;
    ad::TapeGuard guard(tape);
    ad::Var<double> folded = ad::matmul(a, ad::transpose(b));
    CHECK(tape.size() == 1);
    ad::Var<double> bt = ad::transpose(b);
    ad::Var<double> explicit_product = ad::matmul(a, bt);
    CHECK(tape.size() == 3);
    CHECK(ad::max_abs_diff(folded.value(), explicit_product.value()) == 0.0);
}

TEST_CASE("transpose: swaps the last two dimensions") {
    const auto t = [](const auto& x) { return ad::transpose(x); };
    SUBCASE("rank 2 (1,7)") { check_every_activity(t, Input{"x", normal({1, 7}, 1)}); }
    SUBCASE("rank 3 (3,5,7)") { check_every_activity(t, Input{"x", normal({3, 5, 7}, 1)}); }
    SUBCASE("rank 4 (2,3,5,1)") { check_every_activity(t, Input{"x", normal({2, 3, 5, 1}, 1)}); }
    SUBCASE("forward: y[b,j,i] = x[b,i,j]") {
        const Tensor x = normal({3, 5, 7}, 1);
        const Tensor y = value_of(ad::transpose(ad::Const<double>(x)));
        REQUIRE(y.shape() == ad::Shape{3, 7, 5});
        bool same = true;
        for (int b = 0; b < 3; ++b)
            for (int i = 0; i < 5; ++i)
                for (int j = 0; j < 7; ++j) same = same && y(b, j, i) == x(b, i, j);
        CHECK(same);
    }
}

// ---- scalar scale and shift ---------------------------------------------------------------------

TEST_CASE("scale: x*s, s*x and x/s multiply every element by s (or 1/s)") {
    const Tensor x = normal({3, 5, 7}, 1);
    SUBCASE("x * 0.7") {
        check_every_activity([](const auto& v) { return v * 0.7; }, Input{"x", x});
        CHECK(ad::max_abs_diff(value_of(ad::Const<double>(x) * 0.7), elementwise(x, [](double v) { return v * 0.7; })) <= forward_tol);
    }
    SUBCASE("-1.3 * x") {
        check_every_activity([](const auto& v) { return -1.3 * v; }, Input{"x", x});
        CHECK(ad::max_abs_diff(value_of(-1.3 * ad::Const<double>(x)), elementwise(x, [](double v) { return -1.3 * v; })) <= forward_tol);
    }
    SUBCASE("x / 3") {
        check_every_activity([](const auto& v) { return v / 3; }, Input{"x", x});
        CHECK(ad::max_abs_diff(value_of(ad::Const<double>(x) / 3), elementwise(x, [](double v) { return v / 3; })) <= forward_tol);
    }
    SUBCASE("x / -2.5 on a single element") {
        check_every_activity([](const auto& v) { return v / -2.5; }, Input{"x", normal({1}, 2)});
    }
}

TEST_CASE("shift: x+c, c+x, x-c and c-x add the constant with the written sign") {
    const Tensor x = normal({3, 5, 7}, 1);
    SUBCASE("x + 0.3") {
        check_every_activity([](const auto& v) { return v + 0.3; }, Input{"x", x});
        CHECK(ad::max_abs_diff(value_of(ad::Const<double>(x) + 0.3), elementwise(x, [](double v) { return v + 0.3; })) <= forward_tol);
    }
    SUBCASE("0.3 + x") {
        check_every_activity([](const auto& v) { return 0.3 + v; }, Input{"x", x});
        CHECK(ad::max_abs_diff(value_of(0.3 + ad::Const<double>(x)), elementwise(x, [](double v) { return 0.3 + v; })) <= forward_tol);
    }
    SUBCASE("x - 0.3") {
        check_every_activity([](const auto& v) { return v - 0.3; }, Input{"x", x});
        CHECK(ad::max_abs_diff(value_of(ad::Const<double>(x) - 0.3), elementwise(x, [](double v) { return v - 0.3; })) <= forward_tol);
    }
    SUBCASE("0.3 - x") {
        check_every_activity([](const auto& v) { return 0.3 - v; }, Input{"x", x});
        CHECK(ad::max_abs_diff(value_of(0.3 - ad::Const<double>(x)), elementwise(x, [](double v) { return 0.3 - v; })) <= forward_tol);
    }
    SUBCASE("2 - x on a single element (integer constant)") {
        check_every_activity([](const auto& v) { return 2 - v; }, Input{"x", normal({1}, 2)});
    }
}

// ---- binary + - * / with numpy broadcasting --------------------------------------------------------

TEST_CASE("add: each operand's gradient is summed over the dimensions it was broadcast along") { check_broadcasting(add); }
TEST_CASE("sub: each operand's gradient is summed over the dimensions it was broadcast along") { check_broadcasting(sub); }
TEST_CASE("mul: each operand's gradient is summed over the dimensions it was broadcast along") { check_broadcasting(mul); }
TEST_CASE("div: each operand's gradient is summed over the dimensions it was broadcast along") { check_broadcasting(divide); }

TEST_CASE("binary ops: a rank-0 operand (a sum) broadcasts against any tensor") {
    const auto normalise = [](const auto& x) { return x / ad::sum(x * x); };
    check_every_activity(normalise, Input{"x", away_from_zero({3, 5}, 1)});
}

TEST_CASE("binary ops: forward follows numpy broadcasting and the written operand order") {
    const Tensor a = away_from_zero({2, 3, 5, 7}, 1), b = away_from_zero({1, 3, 1, 7}, 2);
    const ad::Const<double> A(a), B(b);
    auto reference = [&](auto f) {
        Tensor r = ad::empty<double>(a.shape());
        for (int i = 0; i < 2; ++i)
            for (int j = 0; j < 3; ++j)
                for (int k = 0; k < 5; ++k)
                    for (int l = 0; l < 7; ++l) r(i, j, k, l) = f(a(i, j, k, l), b(0, j, 0, l));
        return r;
    };
    CHECK(ad::max_abs_diff(value_of(A + B), reference([](double u, double v) { return u + v; })) <= forward_tol);
    CHECK(ad::max_abs_diff(value_of(A - B), reference([](double u, double v) { return u - v; })) <= forward_tol);
    CHECK(ad::max_abs_diff(value_of(A * B), reference([](double u, double v) { return u * v; })) <= forward_tol);
    CHECK(ad::max_abs_diff(value_of(A / B), reference([](double u, double v) { return u / v; })) <= forward_tol);
    CHECK(ad::max_abs_diff(value_of(B - A), reference([](double u, double v) { return v - u; })) <= forward_tol);
    CHECK(ad::max_abs_diff(value_of(B / A), reference([](double u, double v) { return v / u; })) <= forward_tol);
}

// ---- add_bias -----------------------------------------------------------------------------------

TEST_CASE("add_bias: the bias gradient is summed back to the bias's own shape, for every bias shape") {
    const auto add_bias = [](const auto& s, const auto& b) { return ad::add_bias(s, b); };
    auto run = [&](const ad::Shape& bias) {
        check_every_activity(add_bias, Input{"scores", normal({2, 3, 5, 7}, 1)}, Input{"bias", normal(bias, 2)});
    };
    SUBCASE("bias (2,3,5,7): full") { run({2, 3, 5, 7}); }
    SUBCASE("bias (3,5,7): per head") { run({3, 5, 7}); }
    SUBCASE("bias (5,7): shared by batch and heads") { run({5, 7}); }
    SUBCASE("bias (2,1,5,7): per batch") { run({2, 1, 5, 7}); }
    SUBCASE("bias (1,3,1,7): per head and key") { run({1, 3, 1, 7}); }
    SUBCASE("bias (7): per key") { run({7}); }
    SUBCASE("bias (2,3,5,1): per query") { run({2, 3, 5, 1}); }
    SUBCASE("bias (1): one value") { run({1}); }
}

// ---- softmax ------------------------------------------------------------------------------------

namespace {
// A key-padding mask (batch 2, Lk 7): batch 0 keeps its first 4 keys, batch 1 its first 6.
ad::Tensor<bool> padding_2x7() {
    return bools({2, 7}, {true, true, true, true, false, false, false, true, true, true, true, true, true, false});
}
// A (5,7) keep mask with at least one kept key in every row.
ad::Tensor<bool> keep_5x7() {
    std::vector<bool> v;
    for (int i = 0; i < 5; ++i)
        for (int j = 0; j < 7; ++j) v.push_back((i + 2 * j) % 3 != 0);
    return bools({5, 7}, v);
}
constexpr double inf = std::numeric_limits<double>::infinity();
}  // namespace

TEST_CASE("softmax: without a mask") {
    const auto sm = [](const auto& x) { return ad::softmax(x); };
    SUBCASE("(2,3,5,7)") { check_every_activity(sm, Input{"x", normal({2, 3, 5, 7}, 1)}); }
    SUBCASE("rank 1 (7)") { check_every_activity(sm, Input{"x", normal({7}, 1)}); }
    SUBCASE("a single key (5,1): output 1, gradient 0") {
        check_every_activity(sm, Input{"x", normal({5, 1}, 1)});
        CHECK(ad::max_abs_diff(value_of(ad::softmax(ad::Const<double>(normal({5, 1}, 1)))), ad::ones<double>({5, 1})) == 0.0);
    }
    SUBCASE("rows sum to 1") {
        const Tensor y = value_of(ad::softmax(ad::Const<double>(normal({3, 5, 7}, 1)) * 3.0));
        const Eigen::ArrayXd row_sums = y.reshaped({15, 7}).matrix().rowwise().sum().array();
        CHECK((row_sums - 1.0).abs().maxCoeff() < 1e-15);
    }
}

TEST_CASE("softmax: causal mask") {
    const auto sm = [](const auto& x) { return ad::softmax(x, ad::causal); };
    SUBCASE("square (2,3,5,5)") { check_every_activity(sm, Input{"x", normal({2, 3, 5, 5}, 1)}); }
    SUBCASE("more keys than queries (3,5,7)") { check_every_activity(sm, Input{"x", normal({3, 5, 7}, 1)}); }
    SUBCASE("more queries than keys (7,5)") { check_every_activity(sm, Input{"x", normal({7, 5}, 1)}); }
    SUBCASE("query i sees keys 0..i only") {
        const Tensor y = value_of(ad::softmax(ad::Const<double>(normal({5, 7}, 1)), ad::causal));
        bool future_is_zero = true, past_is_positive = true;
        for (int i = 0; i < 5; ++i)
            for (int j = 0; j < 7; ++j) {
                if (j > i) future_is_zero = future_is_zero && y(i, j) == 0.0;
                else past_is_positive = past_is_positive && y(i, j) > 0.0;
            }
        CHECK(future_is_zero);
        CHECK(past_is_positive);
    }
}

TEST_CASE("softmax: keep mask") {
    SUBCASE("(5,7) broadcast over batch and heads") {
        check_every_activity([](const auto& x) { return ad::softmax(x, ad::keep_mask(keep_5x7())); },
                             Input{"x", normal({2, 3, 5, 7}, 1)});
    }
    SUBCASE("(2,1,1,7) per batch") {
        const auto keep = bools({2, 1, 1, 7}, {true, false, true, true, false, true, true,  //
                                               false, true, true, true, true, true, false});
        check_every_activity([&](const auto& x) { return ad::softmax(x, ad::keep_mask(keep)); },
                             Input{"x", normal({2, 3, 5, 7}, 1)});
    }
}

TEST_CASE("softmax: key-padding mask") {
    SUBCASE("(2,7) for logits (2,3,5,7)") {
        check_every_activity([](const auto& x) { return ad::softmax(x, ad::key_padding_mask(padding_2x7())); },
                             Input{"x", normal({2, 3, 5, 7}, 1)});
    }
    SUBCASE("(2,7) for logits (2,5,7)") {
        check_every_activity([](const auto& x) { return ad::softmax(x, ad::key_padding_mask(padding_2x7())); },
                             Input{"x", normal({2, 5, 7}, 1)});
    }
    SUBCASE("(7) for logits (5,7)") {
        const auto kp = bools({7}, {true, true, false, true, true, true, false});
        check_every_activity([&](const auto& x) { return ad::softmax(x, ad::key_padding_mask(kp)); },
                             Input{"x", normal({5, 7}, 1)});
    }
}

TEST_CASE("softmax: additive mask") {
    SUBCASE("(5,7) with finite values and some -inf") {
        Tensor add = normal({5, 7}, 9);
        add(0, 3) = add(2, 0) = add(2, 6) = add(4, 4) = -inf;
        check_every_activity([&](const auto& x) { return ad::softmax(x, {}, add); }, Input{"x", normal({2, 3, 5, 7}, 1)});
    }
    SUBCASE("(1,3,1,7) per head") {
        check_every_activity([](const auto& x) { return ad::softmax(x, {}, normal({1, 3, 1, 7}, 9)); },
                             Input{"x", normal({2, 3, 5, 7}, 1)});
    }
    SUBCASE("equals softmax of x + additive") {
        const Tensor x = normal({2, 3, 5, 7}, 1), add = normal({3, 5, 7}, 9);
        const Tensor masked = value_of(ad::softmax(ad::Const<double>(x), {}, add));
        const Tensor summed = value_of(ad::softmax(ad::Const<double>(x) + ad::Const<double>(add)));
        CHECK(ad::max_abs_diff(masked, summed) <= forward_tol);
    }
}

TEST_CASE("softmax: causal and key-padding masks combined") {
    const auto mask = ad::causal | ad::key_padding_mask(padding_2x7());
    check_every_activity([&](const auto& x) { return ad::softmax(x, mask); }, Input{"x", normal({2, 3, 7, 7}, 1)});
}

TEST_CASE("softmax: masked keys get probability exactly 0 and gradient exactly 0") {
    ad::Param<double> x(normal({2, 3, 5, 7}, 1));
    ad::Tape tape;
    ad::TapeGuard guard(tape);
    ad::Var<double> y = ad::softmax(x * 2.0 + 1.0, ad::key_padding_mask(padding_2x7()));
    y.backward(normal({2, 3, 5, 7}, 2));
    const auto kp = padding_2x7();
    bool y_zero = true, grad_zero = true, kept_nonzero = true;
    for (int b = 0; b < 2; ++b)
        for (int h = 0; h < 3; ++h)
            for (int i = 0; i < 5; ++i)
                for (int j = 0; j < 7; ++j) {
                    if (kp(b, j)) {
                        kept_nonzero = kept_nonzero && y.value()(b, h, i, j) > 0.0 && x.grad()(b, h, i, j) != 0.0;
                    } else {
                        y_zero = y_zero && y.value()(b, h, i, j) == 0.0;
                        grad_zero = grad_zero && x.grad()(b, h, i, j) == 0.0;
                    }
                }
    CHECK(y_zero);
    CHECK(grad_zero);
    CHECK(kept_nonzero);
}

namespace {
// Checks that rows `masked` (flat row indices of x viewed as (rows, Lk)) of y and of x's gradient are
// exactly 0, that the other rows are not, and that gradcheck passes through the masked rows.
template <class F>
void check_fully_masked_rows(const Tensor& x0, F softmax_of, const std::vector<std::int64_t>& masked) {
    const std::int64_t lk = x0.shape().dim_from_end(1), rows = x0.numel() / lk;
    ad::Param<double> x(x0.clone(), "x");
    {
        ad::Tape tape;
        ad::TapeGuard guard(tape);
        ad::Var<double> y = softmax_of(x);
        y.backward(normal(x0.shape(), 2));
        bool gradient_elsewhere = false;
        for (std::int64_t r = 0; r < rows; ++r) {
            const bool is_masked = std::find(masked.begin(), masked.end(), r) != masked.end();
            const ad::ConstArrayMap<double> yr(y.value().data() + r * lk, lk), gr(x.grad().data() + r * lk, lk);
            INFO("row ", r, std::string(is_masked ? " (fully masked)" : ""));
            if (is_masked) {
                CHECK((yr == 0.0).all());
                CHECK((gr == 0.0).all());
            } else {
                CHECK(yr.sum() == doctest::Approx(1.0).epsilon(1e-14));
                gradient_elsewhere = gradient_elsewhere || (gr != 0.0).any();
            }
        }
        CHECK(gradient_elsewhere);  // the zeros above are the mask's doing, not a gradient that is zero everywhere
    }
    check_gradients([&] { return softmax_of(x); }, {x});
}
}  // namespace

TEST_CASE("softmax: a fully masked row gives output exactly 0 and gradient exactly 0 (not NaN)") {
    SUBCASE("key padding masks every key of batch 1") {
        const auto kp = bools({2, 7}, {true, true, true, false, false, false, false, false, false, false, false, false, false, false});
        // x (2,5,7): rows 5..9 belong to batch 1.
        check_fully_masked_rows(normal({2, 5, 7}, 1), [&](const auto& x) { return ad::softmax(x, ad::key_padding_mask(kp)); },
                                {5, 6, 7, 8, 9});
    }
    SUBCASE("a keep mask with one all-false row") {
        std::vector<bool> v(35, true);
        for (int j = 0; j < 7; ++j) v[2 * 7 + j] = false;
        const auto keep = bools({5, 7}, v);
        check_fully_masked_rows(normal({5, 7}, 1), [&](const auto& x) { return ad::softmax(x, ad::keep_mask(keep)); }, {2});
    }
    SUBCASE("an additive mask with one all -inf row") {
        Tensor add = ad::zeros<double>({5, 7});
        for (int j = 0; j < 7; ++j) add(3, j) = -inf;
        check_fully_masked_rows(normal({5, 7}, 1), [&](const auto& x) { return ad::softmax(x, {}, add); }, {3});
    }
    SUBCASE("causal with left padding: the first query sees only a padded key") {
        const auto kp = bools({1, 5}, {false, true, true, true, true});
        // x (1,2,5,5): row 0 of each head sees key 0 only, which is padded.
        check_fully_masked_rows(normal({1, 2, 5, 5}, 1),
                                [&](const auto& x) { return ad::softmax(x, ad::causal | ad::key_padding_mask(kp)); }, {0, 5});
    }
}

// ---- dropout ------------------------------------------------------------------------------------

TEST_CASE("dropout: rate 0.3 in training, with a fixed seed and offset") {
    const ad::DropoutDescriptor d{0.3, 42, 7, true};
    const Tensor x = away_from_zero({2, 3, 5, 7}, 1);
    SUBCASE("gradcheck (the mask is a pure function of seed, offset and index)") {
        check_every_activity([&](const auto& v) { return ad::dropout(v, d); }, Input{"x", x});
    }
    SUBCASE("each element is either dropped (0) or scaled by 1/(1 - 0.3), and both happen") {
        const Tensor y = value_of(ad::dropout(ad::Const<double>(x), d));
        std::int64_t dropped = 0, kept = 0;
        bool well_formed = true;
        for (std::int64_t i = 0; i < x.numel(); ++i) {
            if (y.data()[i] == 0.0) ++dropped;
            else if (std::abs(y.data()[i] - x.data()[i] / 0.7) <= forward_tol) ++kept;
            else well_formed = false;
        }
        CHECK(well_formed);
        CHECK(dropped > 0);
        CHECK(kept > 0);
    }
    SUBCASE("the same seed and offset give the same output") {
        CHECK(ad::max_abs_diff(value_of(ad::dropout(ad::Const<double>(x), d)), value_of(ad::dropout(ad::Const<double>(x), d))) == 0.0);
    }
}

TEST_CASE("dropout: training == false is the identity, in value and gradient") {
    const ad::DropoutDescriptor d{0.3, 42, 7, false};
    const Tensor x = normal({3, 5, 7}, 1);
    check_every_activity([&](const auto& v) { return ad::dropout(v, d); }, Input{"x", x});
    CHECK(ad::max_abs_diff(value_of(ad::dropout(ad::Const<double>(x), d)), x) == 0.0);
    ad::Param<double> p(x.clone());
    CHECK(ad::max_abs_diff(grad_of_sum(p, [&](const auto& v) { return ad::dropout(v, d); }), ad::ones<double>(x.shape())) == 0.0);
}

TEST_CASE("dropout: rate 0 in training is the identity") {
    const Tensor x = normal({3, 5, 7}, 1);
    CHECK(ad::max_abs_diff(value_of(ad::dropout(ad::Const<double>(x), ad::DropoutDescriptor{0.0, 42, 7, true})), x) == 0.0);
}

// ---- linear -------------------------------------------------------------------------------------

TEST_CASE("linear: y = x·Wᵀ + b, for inputs of rank 1, 2 and 3") {
    const auto with_bias = [](const auto& x, const auto& w, const auto& b) { return ad::linear(x, w, b); };
    const auto without_bias = [](const auto& x, const auto& w) { return ad::linear(x, w); };
    const Tensor W = normal({3, 7}, 2), b = normal({3}, 3);
    for (const ad::Shape& xs : {ad::Shape{7}, ad::Shape{5, 7}, ad::Shape{2, 5, 7}}) {
        const Tensor x = normal(xs, 1);
        SUBCASE(("with bias, x " + xs.str()).c_str()) {
            check_every_activity(with_bias, Input{"x", x}, Input{"W", W}, Input{"b", b});
        }
        SUBCASE(("without bias, x " + xs.str()).c_str()) {
            check_every_activity(without_bias, Input{"x", x}, Input{"W", W});
        }
    }
    SUBCASE("one output feature, W (1,7)") {
        check_every_activity(with_bias, Input{"x", normal({2, 5, 7}, 1)}, Input{"W", normal({1, 7}, 2)}, Input{"b", normal({1}, 3)});
    }
    SUBCASE("forward equals matmul(x, transpose(W)) + b") {
        const Tensor x = normal({2, 5, 7}, 1);
        const ad::Const<double> X(x), Wc(W), B(b);
        // Two dot products of 7 O(1) terms summed in different orders: a few roundings each.
        CHECK(ad::max_abs_diff(value_of(ad::linear(X, Wc, B)), value_of(ad::matmul(X, ad::transpose(Wc)) + B)) <= forward_tol * 10);
    }
}

// ---- layout -------------------------------------------------------------------------------------

TEST_CASE("reshape: the gradient is the upstream gradient seen in the input's shape") {
    const Tensor x = normal({2, 3, 5}, 1);
    SUBCASE("(2,3,5) to (6,5)") { check_every_activity([](const auto& v) { return ad::reshape(v, {6, 5}); }, Input{"x", x}); }
    SUBCASE("(2,3,5) to (30)") { check_every_activity([](const auto& v) { return ad::reshape(v, {30}); }, Input{"x", x}); }
    SUBCASE("(2,3,5) to (1,30,1)") { check_every_activity([](const auto& v) { return ad::reshape(v, {1, 30, 1}); }, Input{"x", x}); }
    SUBCASE("(2,3,5) to (5,3,2) keeps row-major order") {
        check_every_activity([](const auto& v) { return ad::reshape(v, {5, 3, 2}); }, Input{"x", x});
        CHECK(value_of(ad::reshape(ad::Const<double>(x), {5, 3, 2})).to_vector() == x.to_vector());
    }
}

TEST_CASE("permute: y.dim(k) = x.dim(perm[k]), gradient permuted back") {
    SUBCASE("rank 4 {3,1,0,2}") {
        check_every_activity([](const auto& v) { return ad::permute(v, {3, 1, 0, 2}); }, Input{"x", normal({2, 3, 5, 7}, 1)});
    }
    SUBCASE("rank 3 {2,0,1}") {
        check_every_activity([](const auto& v) { return ad::permute(v, {2, 0, 1}); }, Input{"x", normal({3, 1, 5}, 1)});
    }
    SUBCASE("rank 2 {1,0}") { check_every_activity([](const auto& v) { return ad::permute(v, {1, 0}); }, Input{"x", normal({5, 7}, 1)}); }
    SUBCASE("forward: y[l,j,i,k] = x[i,j,k,l]") {
        const Tensor x = normal({2, 3, 5, 7}, 1);
        const Tensor y = value_of(ad::permute(ad::Const<double>(x), {3, 1, 0, 2}));
        REQUIRE(y.shape() == ad::Shape{7, 3, 2, 5});
        bool same = true;
        for (int i = 0; i < 2; ++i)
            for (int j = 0; j < 3; ++j)
                for (int k = 0; k < 5; ++k)
                    for (int l = 0; l < 7; ++l) same = same && y(l, j, i, k) == x(i, j, k, l);
        CHECK(same);
    }
}

TEST_CASE("narrow: the gradient is the upstream gradient placed in the slice, zeros elsewhere") {
    const Tensor x = normal({2, 3, 5, 7}, 1);
    SUBCASE("dimension 0, one index") { check_every_activity([](const auto& v) { return ad::narrow(v, 0, 1, 1); }, Input{"x", x}); }
    SUBCASE("dimension 1, from the start") { check_every_activity([](const auto& v) { return ad::narrow(v, 1, 0, 2); }, Input{"x", x}); }
    SUBCASE("dimension 2, in the middle") { check_every_activity([](const auto& v) { return ad::narrow(v, 2, 1, 3); }, Input{"x", x}); }
    SUBCASE("dimension 3, to the end") { check_every_activity([](const auto& v) { return ad::narrow(v, 3, 4, 3); }, Input{"x", x}); }
    SUBCASE("the whole dimension") { check_every_activity([](const auto& v) { return ad::narrow(v, 3, 0, 7); }, Input{"x", x}); }
    SUBCASE("rank 1") { check_every_activity([](const auto& v) { return ad::narrow(v, 0, 2, 3); }, Input{"x", normal({7}, 1)}); }
    SUBCASE("a packed projection split into three slices that meet again") {
        check_every_activity(
            [](const auto& v) { return ad::narrow(v, 2, 0, 2) * ad::narrow(v, 2, 2, 2) + ad::narrow(v, 2, 4, 2); },
            Input{"qkv", normal({2, 5, 6}, 1)});
    }
    SUBCASE("forward: y[.., j, ..] = x[.., start + j, ..]") {
        const Tensor y = value_of(ad::narrow(ad::Const<double>(x), 2, 1, 3));
        REQUIRE(y.shape() == ad::Shape{2, 3, 3, 7});
        bool same = true;
        for (int i = 0; i < 2; ++i)
            for (int j = 0; j < 3; ++j)
                for (int k = 0; k < 3; ++k)
                    for (int l = 0; l < 7; ++l) same = same && y(i, j, k, l) == x(i, j, k + 1, l);
        CHECK(same);
    }
}

TEST_CASE("split_heads and merge_heads: gradients, and merge_heads(split_heads(x)) == x") {
    const Tensor x = normal({2, 5, 12}, 1);
    SUBCASE("split_heads (2,5,12) into 3 heads") {
        check_every_activity([](const auto& v) { return ad::split_heads(v, 3); }, Input{"x", x});
        CHECK(value_of(ad::split_heads(ad::Const<double>(x), 3)).shape() == ad::Shape{2, 3, 5, 4});
    }
    SUBCASE("split_heads into 1 head and into 12 heads of size 1") {
        check_every_activity([](const auto& v) { return ad::split_heads(v, 1); }, Input{"x", x});
        check_every_activity([](const auto& v) { return ad::split_heads(v, 12); }, Input{"x", x});
    }
    SUBCASE("merge_heads (2,3,5,4)") {
        check_every_activity([](const auto& v) { return ad::merge_heads(v); }, Input{"y", normal({2, 3, 5, 4}, 2)});
    }
    SUBCASE("head h of token t holds features h·D .. h·D + D - 1") {
        const Tensor s = value_of(ad::split_heads(ad::Const<double>(x), 3));
        bool same = true;
        for (int b = 0; b < 2; ++b)
            for (int h = 0; h < 3; ++h)
                for (int t = 0; t < 5; ++t)
                    for (int d = 0; d < 4; ++d) same = same && s(b, h, t, d) == x(b, t, h * 4 + d);
        CHECK(same);
    }
    SUBCASE("round trips are exact") {
        CHECK(value_of(ad::merge_heads(ad::split_heads(ad::Const<double>(x), 3))).to_vector() == x.to_vector());
        const Tensor y = normal({2, 3, 5, 4}, 2);
        CHECK(value_of(ad::split_heads(ad::merge_heads(ad::Const<double>(y)), 3)).to_vector() == y.to_vector());
    }
    SUBCASE("the round trip's gradient is the identity") {
        ad::Param<double> p(x.clone());
        CHECK(ad::max_abs_diff(grad_of_sum(p, [](const auto& v) { return ad::merge_heads(ad::split_heads(v, 3)) * 1.0; }),
                               ad::ones<double>(x.shape())) == 0.0);
    }
}

// ---- reductions ---------------------------------------------------------------------------------

TEST_CASE("sum: every element gets the upstream gradient") {
    SUBCASE("(2,3,5,7)") { check_every_activity([](const auto& v) { return ad::sum(v); }, Input{"x", normal({2, 3, 5, 7}, 1)}); }
    SUBCASE("(1)") { check_every_activity([](const auto& v) { return ad::sum(v); }, Input{"x", normal({1}, 1)}); }
    SUBCASE("value and rank-0 shape") {
        const Tensor x = normal({3, 5}, 1);
        const Tensor s = value_of(ad::sum(ad::Const<double>(x)));
        CHECK(s.shape() == ad::Shape{});
        CHECK(s.item() == doctest::Approx(x.array().sum()).epsilon(1e-14));
    }
}

TEST_CASE("mean: the sum divided by the element count") {
    check_every_activity([](const auto& v) { return ad::mean(v); }, Input{"x", normal({3, 5, 7}, 1)});
    const Tensor x = normal({3, 5, 7}, 1);
    CHECK(value_of(ad::mean(ad::Const<double>(x))).item() == doctest::Approx(x.array().sum() / 105.0).epsilon(1e-14));
}

TEST_CASE("mse: mean((input - target)²), with gradients for both operands") {
    const auto loss = [](const auto& a, const auto& b) { return ad::mse(a, b); };
    SUBCASE("(3,5,7)") { check_every_activity(loss, Input{"input", normal({3, 5, 7}, 1)}, Input{"target", normal({3, 5, 7}, 2)}); }
    SUBCASE("(1)") { check_every_activity(loss, Input{"input", normal({1}, 1)}, Input{"target", normal({1}, 2)}); }
    SUBCASE("value") {
        const Tensor a = normal({3, 5}, 1), b = normal({3, 5}, 2);
        CHECK(value_of(ad::mse(ad::Const<double>(a), ad::Const<double>(b))).item() ==
              doctest::Approx((a.array() - b.array()).square().sum() / 15.0).epsilon(1e-14));
    }
}

// ---- unary functions ----------------------------------------------------------------------------

TEST_CASE("unary functions: gradcheck on inputs inside their smooth domain") {
    const ad::Shape s{3, 5, 7};
    SUBCASE("exp") { check_every_activity([](const auto& v) { return ad::exp(v); }, Input{"x", normal(s, 1)}); }
    SUBCASE("log of positive x") { check_every_activity([](const auto& v) { return ad::log(v); }, Input{"x", positive(s, 1)}); }
    SUBCASE("tanh") { check_every_activity([](const auto& v) { return ad::tanh(v); }, Input{"x", normal(s, 1)}); }
    SUBCASE("sigmoid") { check_every_activity([](const auto& v) { return ad::sigmoid(v); }, Input{"x", normal(s, 1)}); }
    SUBCASE("relu away from 0") { check_every_activity([](const auto& v) { return ad::relu(v); }, Input{"x", away_from_zero(s, 1)}); }
    SUBCASE("gelu") { check_every_activity([](const auto& v) { return ad::gelu(v); }, Input{"x", normal(s, 1)}); }
    SUBCASE("abs away from 0") { check_every_activity([](const auto& v) { return ad::abs(v); }, Input{"x", away_from_zero(s, 1)}); }
    SUBCASE("neg") { check_every_activity([](const auto& v) { return ad::neg(v); }, Input{"x", normal(s, 1)}); }
    SUBCASE("unary minus") { check_every_activity([](const auto& v) { return -v; }, Input{"x", normal(s, 1)}); }
    SUBCASE("pow(x, 3)") { check_every_activity([](const auto& v) { return ad::pow(v, 3); }, Input{"x", away_from_zero(s, 1)}); }
    SUBCASE("pow(x, 0.5) of positive x") { check_every_activity([](const auto& v) { return ad::pow(v, 0.5); }, Input{"x", positive(s, 1)}); }
    SUBCASE("on a single element") { check_every_activity([](const auto& v) { return ad::tanh(v); }, Input{"x", normal({1}, 1)}); }
}

TEST_CASE("unary functions: forward equals the scalar function") {
    const Tensor x = away_from_zero({3, 5, 7}, 1), p = positive({3, 5, 7}, 2);
    const ad::Const<double> X(x), P(p);
    CHECK(ad::max_abs_diff(value_of(ad::exp(X)), elementwise(x, [](double v) { return std::exp(v); })) <= forward_tol);
    CHECK(ad::max_abs_diff(value_of(ad::log(P)), elementwise(p, [](double v) { return std::log(v); })) <= forward_tol);
    CHECK(ad::max_abs_diff(value_of(ad::tanh(X)), elementwise(x, [](double v) { return std::tanh(v); })) <= forward_tol);
    CHECK(ad::max_abs_diff(value_of(ad::sigmoid(X)), elementwise(x, [](double v) { return 1 / (1 + std::exp(-v)); })) <= forward_tol);
    CHECK(ad::max_abs_diff(value_of(ad::relu(X)), elementwise(x, [](double v) { return v > 0 ? v : 0.0; })) == 0.0);
    CHECK(ad::max_abs_diff(value_of(ad::gelu(X)), elementwise(x, [](double v) { return 0.5 * v * (1 + std::erf(v / std::sqrt(2.0))); })) <=
          forward_tol);
    CHECK(ad::max_abs_diff(value_of(ad::abs(X)), elementwise(x, [](double v) { return std::abs(v); })) == 0.0);
    CHECK(ad::max_abs_diff(value_of(-X), elementwise(x, [](double v) { return -v; })) == 0.0);
    CHECK(ad::max_abs_diff(value_of(ad::pow(X, 3)), elementwise(x, [](double v) { return v * v * v; })) <= forward_tol);
    CHECK(ad::max_abs_diff(value_of(ad::pow(P, 0.5)), elementwise(p, [](double v) { return std::sqrt(v); })) <= forward_tol);
}

// ---- Var intermediates --------------------------------------------------------------------------

TEST_CASE("Var intermediates route gradients to the Params below them") {
    ad::Param<double> A(normal({3, 5, 7}, 1), "A"), B(normal({3, 7, 1}, 2), "B"), W(normal({4, 7}, 3), "W");
    SUBCASE("a Var leaf: s = matmul(A, B); sum(s * s)") {
        check_gradients(
            [&] {
                ad::Var<double> s = ad::matmul(A, B);
                return ad::sum(s * s);
            },
            {A, B});
    }
    SUBCASE("a chain of Vars, one used twice") {
        check_gradients(
            [&] {
                ad::Var<double> h = ad::tanh(ad::linear(A, W));
                ad::Var<double> z = h * h + h;
                return ad::mean(z);
            },
            {A, W});
    }
    SUBCASE("a Var used next to the Param it came from") {
        check_gradients(
            [&] {
                ad::Var<double> e = ad::exp(A * 0.5);
                return ad::sum(e * A);
            },
            {A});
    }
}

// ---- compositions -------------------------------------------------------------------------------

TEST_CASE("attention with a bias, a causal mask and dropout: gradients of Q, K, V and the bias") {
    ad::Param<double> Q(normal({2, 3, 5, 4}, 1), "Q"), K(normal({2, 3, 5, 4}, 2), "K"), V(normal({2, 3, 5, 4}, 3), "V"),
        B(normal({3, 5, 5}, 4), "B");
    const ad::DropoutDescriptor d{0.3, 11, 3, true};
    SUBCASE("all nodes in one expression") {
        check_gradients(
            [&] { return ad::matmul(ad::dropout(ad::softmax(ad::add_bias(ad::matmul(Q, ad::transpose(K)) * 0.5, B), ad::causal), d), V); },
            {Q, K, V, B});
    }
    SUBCASE("through Var intermediates") {
        check_gradients(
            [&] {
                ad::Var<double> scores = ad::matmul(Q, ad::transpose(K)) * 0.5 + B;
                ad::Var<double> probs = ad::dropout(ad::softmax(scores, ad::causal), d);
                return ad::matmul(probs, V);
            },
            {Q, K, V, B});
    }
}

TEST_CASE("one value feeding several branches: Q, K and V all projected from one X") {
    ad::Param<double> X(normal({2, 5, 6}, 1), "X"), Wq(normal({6, 6}, 2), "Wq"), Wk(normal({6, 6}, 3), "Wk"),
        Wv(normal({6, 6}, 4), "Wv"), bq(normal({6}, 5), "bq"), Wo(normal({3, 6}, 6), "Wo");
    const auto attention = [&] {
        auto q = ad::split_heads(ad::linear(X, Wq, bq), 2);
        auto k = ad::split_heads(ad::linear(X, Wk), 2);
        auto v = ad::split_heads(ad::linear(X, Wv), 2);
        auto o = ad::matmul(ad::softmax(ad::matmul(q, ad::transpose(k)) * (1 / std::sqrt(3.0)), ad::causal), v);
        return ad::linear(ad::merge_heads(o), Wo);
    };
    check_gradients(attention, {X, Wq, Wk, Wv, bq, Wo});
}

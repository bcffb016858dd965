// Linear layers in the attention's head layout (expr/heads.hpp): linear_heads<S> (split_heads in the
// in-projection GEMM's output pass, S outputs in one record) and heads_linear (merge_heads in the
// output projection's packing). Each: gradcheck in double for every combination of inputs needing a
// gradient, agreement with the unfused composition (split_heads/narrow/linear, linear/merge_heads) at
// shapes that cut the GEMM's blocks and panels inside a head and a batch, 1 vs 2 threads bitwise,
// and the errors of bad input.
#include <doctest/doctest.h>

#include <array>
#include <cstring>
#include <string>
#include <vector>

#include <autodiff/autodiff.hpp>

#include "check_error.hpp"

namespace ad = autodiff;
using test::check_error;

namespace {

template <class T>
ad::Tensor<T> normal(const ad::Shape& s, std::uint64_t seed) {
    return ad::randn<T>(s, seed);
}

// Same as test_nodes.cpp: default gradcheck tolerances and a normwise relative error below 1e-6.
template <class F>
void check_gradients(F&& f, const std::vector<ad::Param<double>>& params) {
    const ad::GradcheckReport report = ad::gradcheck(std::forward<F>(f), params);
    INFO(report.str());
    CHECK(report.passed);
    CHECK(report.max_rel_error() < 1e-6);
}

// Σ_s <y_s, R_s> over the outputs `used` (a loss that reads every part with its own weights, or
// leaves some out: those get no gradient).
template <class T, std::size_t S>
ad::Var<T> weighted_sum(const std::array<ad::Var<T>, S>& y, const std::vector<std::size_t>& used) {
    ad::Var<T> total;
    bool first = true;
    for (std::size_t s : used) {
        const ad::Const<T> R(normal<T>(y[s].shape(), 50 + s));
        ad::Var<T> term = ad::sum(y[s] * R);
        total = first ? term : ad::Var<T>(total + term);
        first = false;
    }
    return total;
}

// A Param or a Const holding `value`, as `is_param` says.
template <class F>
void with_leaf(bool is_param, const ad::Tensor<double>& value, const std::string& name, F&& f) {
    if (is_param) f(ad::Param<double>(value.clone(), name));
    else f(ad::Const<double>(value));
}

// gradcheck of linear_heads<S> for every way of making x, W (and b) Params or Consts.
template <std::size_t S>
void check_linear_heads(const ad::Shape& xs, std::int64_t E, std::int64_t H, bool bias, const std::vector<std::size_t>& used) {
    const std::int64_t parts = static_cast<std::int64_t>(S);
    const ad::Tensor<double> x = normal<double>(xs, 1), W = normal<double>({parts * E, xs[2]}, 2), b = normal<double>({parts * E}, 3);
    const int inputs = bias ? 3 : 2;
    for (int mask = 1; mask < (1 << inputs); ++mask) {
        std::string name = std::string("x ") + (mask & 1 ? "Param" : "Const") + ", W " + (mask & 2 ? "Param" : "Const");
        if (bias) name += std::string(", b ") + (mask & 4 ? "Param" : "Const");
        SUBCASE(name.c_str()) {
            with_leaf((mask & 1) != 0, x, "x", [&](const auto& X) {
                with_leaf((mask & 2) != 0, W, "W", [&](const auto& Wl) {
                    std::vector<ad::Param<double>> params;
                    auto add = [&](const auto& leaf) {
                        if constexpr (std::is_same_v<std::decay_t<decltype(leaf)>, ad::Param<double>>) params.push_back(leaf);
                    };
                    add(X);
                    add(Wl);
                    if (bias) {
                        with_leaf((mask & 4) != 0, b, "b", [&](const auto& B) {
                            add(B);
                            check_gradients([&] { return weighted_sum(ad::linear_heads<S>(X, Wl, B, H), used); }, params);
                        });
                    } else {
                        check_gradients([&] { return weighted_sum(ad::linear_heads<S>(X, Wl, H), used); }, params);
                    }
                });
            });
        }
    }
}

// gradcheck of heads_linear for every way of making o, W (and b) Params or Consts.
void check_heads_linear(const ad::Shape& os, std::int64_t out, bool bias) {
    const ad::Tensor<double> o = normal<double>(os, 1), W = normal<double>({out, os[1] * os[3]}, 2), b = normal<double>({out}, 3);
    const int inputs = bias ? 3 : 2;
    for (int mask = 1; mask < (1 << inputs); ++mask) {
        std::string name = std::string("o ") + (mask & 1 ? "Param" : "Const") + ", W " + (mask & 2 ? "Param" : "Const");
        if (bias) name += std::string(", b ") + (mask & 4 ? "Param" : "Const");
        SUBCASE(name.c_str()) {
            with_leaf((mask & 1) != 0, o, "o", [&](const auto& O) {
                with_leaf((mask & 2) != 0, W, "W", [&](const auto& Wl) {
                    std::vector<ad::Param<double>> params;
                    auto add = [&](const auto& leaf) {
                        if constexpr (std::is_same_v<std::decay_t<decltype(leaf)>, ad::Param<double>>) params.push_back(leaf);
                    };
                    add(O);
                    add(Wl);
                    if (bias) {
                        with_leaf((mask & 4) != 0, b, "b", [&](const auto& B) {
                            add(B);
                            check_gradients([&] { return ad::Var<double>(ad::heads_linear(O, Wl, B)); }, params);
                        });
                    } else {
                        check_gradients([&] { return ad::Var<double>(ad::heads_linear(O, Wl)); }, params);
                    }
                });
            });
        }
    }
}

// Values and gradients of the fused and the unfused in-projection, from one seed per part.
template <class T>
struct Run {
    std::vector<ad::Tensor<T>> values;
    ad::Tensor<T> dx, dW, db;
};

template <class T, std::size_t S>
Run<T> run_in_projection(bool fused, const ad::Tensor<T>& x, const ad::Tensor<T>& W, const ad::Tensor<T>& b, std::int64_t H) {
    ad::Tape tape;
    ad::TapeGuard guard(tape);
    ad::Param<T> X(x.clone(), "x"), Wp(W.clone(), "W"), B(b.clone(), "b");
    const std::int64_t E = W.dim(0) / static_cast<std::int64_t>(S);
    std::array<ad::Var<T>, S> y;
    if (fused) {
        y = ad::linear_heads<S>(X, Wp, B, H);
    } else {
        ad::Var<T> all = ad::linear(X, Wp, B);
        for (std::size_t s = 0; s < S; ++s) y[s] = ad::split_heads(ad::narrow(all, 2, static_cast<std::int64_t>(s) * E, E), H);
    }
    std::vector<std::size_t> every;
    for (std::size_t s = 0; s < S; ++s) every.push_back(s);
    weighted_sum(y, every).backward();
    Run<T> r;
    for (const auto& v : y) r.values.push_back(v.value());
    r.dx = X.grad();
    r.dW = Wp.grad();
    r.db = B.grad();
    return r;
}

template <class T>
Run<T> run_out_projection(bool fused, const ad::Tensor<T>& o, const ad::Tensor<T>& W, const ad::Tensor<T>& b) {
    ad::Tape tape;
    ad::TapeGuard guard(tape);
    ad::Param<T> O(o.clone(), "o"), Wp(W.clone(), "W"), B(b.clone(), "b");
    ad::Var<T> y = fused ? ad::Var<T>(ad::heads_linear(O, Wp, B)) : ad::Var<T>(ad::linear(ad::merge_heads(O), Wp, B));
    weighted_sum(std::array<ad::Var<T>, 1>{y}, {0}).backward();
    Run<T> r;
    r.values.push_back(y.value());
    r.dx = O.grad();
    r.dW = Wp.grad();
    r.db = B.grad();
    return r;
}

template <class T>
T max_abs(const ad::Tensor<T>& t) {
    return t.numel() ? t.array().abs().maxCoeff() : T(0);
}

// |a − b| <= rtol·max|b| for every tensor of the runs.
template <class T>
void check_close(const Run<T>& a, const Run<T>& b, T rtol) {
    for (std::size_t s = 0; s < a.values.size(); ++s) {
        INFO("output ", s);
        CHECK(ad::max_abs_diff(a.values[s], b.values[s]) <= rtol * max_abs(b.values[s]));
    }
    CHECK(ad::max_abs_diff(a.dx, b.dx) <= rtol * max_abs(b.dx));
    CHECK(ad::max_abs_diff(a.dW, b.dW) <= rtol * max_abs(b.dW));
    CHECK(ad::max_abs_diff(a.db, b.db) <= rtol * max_abs(b.db));
}

template <class T>
bool bitwise_equal(const ad::Tensor<T>& a, const ad::Tensor<T>& b) {
    return a.shape() == b.shape() && std::memcmp(a.data(), b.data(), static_cast<std::size_t>(a.numel()) * sizeof(T)) == 0;
}

template <class T>
void check_bitwise(const Run<T>& a, const Run<T>& b) {
    for (std::size_t s = 0; s < a.values.size(); ++s) {
        INFO("output ", s);
        CHECK(bitwise_equal(a.values[s], b.values[s]));
    }
    CHECK(bitwise_equal(a.dx, b.dx));
    CHECK(bitwise_equal(a.dW, b.dW));
    CHECK(bitwise_equal(a.db, b.db));
}

struct Threads {
    int previous = ad::num_threads();
    explicit Threads(int n) { ad::set_num_threads(n); }
    ~Threads() { ad::set_num_threads(previous); }
};

}  // namespace

// ---- linear_heads ---------------------------------------------------------------------------------

TEST_CASE("linear_heads: gradcheck for every input needing a gradient") {
    SUBCASE("3 parts (q, k, v), 2 heads of 3, with bias") { check_linear_heads<3>({2, 5, 7}, 6, 2, true, {0, 1, 2}); }
    SUBCASE("3 parts, without bias") { check_linear_heads<3>({2, 5, 7}, 6, 3, false, {0, 1, 2}); }
    SUBCASE("1 part, one head (D = E)") { check_linear_heads<1>({1, 4, 3}, 5, 1, true, {0}); }
    SUBCASE("2 parts, heads of 1 feature (D = 1)") { check_linear_heads<2>({3, 1, 4}, 4, 4, true, {0, 1}); }
    SUBCASE("3 parts, the loss reads q and v only: k's gradient counts as zero") {
        check_linear_heads<3>({2, 3, 5}, 4, 2, true, {0, 2});
    }
}

TEST_CASE("linear_heads: the parts are split_heads(narrow(linear(x, W, b), 2, s·E, E), H)") {
    // L = 200 puts a batch boundary inside the GEMM's first 192-row block, in = 300 cuts a 256-wide
    // k panel, D = 40 puts head boundaries inside the 256-wide column panels.
    const std::int64_t B = 2, L = 200, in = 300, E = 120, H = 3;
    SUBCASE("double") {
        const auto x = normal<double>({B, L, in}, 1), W = normal<double>({3 * E, in}, 2), b = normal<double>({3 * E}, 3);
        // The same products in the same order up to the k-panel cuts: sums of ≤ 400 O(1) terms agree to ~1e-14 relative.
        check_close(run_in_projection<double, 3>(true, x, W, b, H), run_in_projection<double, 3>(false, x, W, b, H), 1e-12);
    }
    SUBCASE("float") {
        const auto x = normal<float>({B, L, in}, 1), W = normal<float>({3 * E, in}, 2), b = normal<float>({3 * E}, 3);
        check_close(run_in_projection<float, 3>(true, x, W, b, H), run_in_projection<float, 3>(false, x, W, b, H), 1e-5f);
    }
    SUBCASE("one part, float") {
        const auto x = normal<float>({B, L, in}, 4), W = normal<float>({E, in}, 5), b = normal<float>({E}, 6);
        check_close(run_in_projection<float, 1>(true, x, W, b, H), run_in_projection<float, 1>(false, x, W, b, H), 1e-5f);
    }
}

TEST_CASE("linear_heads: one part as the root of backward(seed) reads the seed in place; the others give zeros") {
    // The root's adjoint is the caller's seed itself (Tape::backward): the multi-output record must
    // leave it as it was, values and version, and its gradients match the unfused composition's.
    const std::int64_t B = 2, L = 5, in = 6, E = 8, H = 2;
    const auto x = normal<double>({B, L, in}, 1), W = normal<double>({3 * E, in}, 2), b = normal<double>({3 * E}, 3);
    const ad::Tensor<double> seed = normal<double>({B, H, L, E / H}, 4), before = seed.clone();
    const std::uint64_t version = seed.version();
    ad::Param<double> X(x.clone()), Wp(W.clone()), Bp(b.clone());
    std::array<ad::Var<double>, 3> parts = ad::linear_heads<3>(X, Wp, Bp, H);
    parts[1].backward(seed);
    CHECK(ad::max_abs_diff(seed, before) == 0.0);
    CHECK(seed.version() == version);
    ad::Param<double> X2(x.clone()), W2(W.clone()), B2(b.clone());
    ad::Var<double> k = ad::split_heads(ad::narrow(ad::linear(X2, W2, B2), 2, E, E), H);
    k.backward(seed);
    CHECK(ad::max_abs_diff(X.grad(), X2.grad()) < 1e-12);
    CHECK(ad::max_abs_diff(Wp.grad(), W2.grad()) < 1e-12);
    CHECK(ad::max_abs_diff(Bp.grad(), B2.grad()) < 1e-12);
}

TEST_CASE("linear_heads: bit-identical on 1 and 2 threads") {
    const auto x = normal<float>({2, 256, 192}, 1), W = normal<float>({3 * 192, 192}, 2), b = normal<float>({3 * 192}, 3);
    Run<float> one, two;
    {
        Threads t(1);
        one = run_in_projection<float, 3>(true, x, W, b, 4);
    }
    {
        Threads t(2);
        two = run_in_projection<float, 3>(true, x, W, b, 4);
    }
    check_bitwise(one, two);
}

TEST_CASE("linear_heads: one record for every part; nothing recorded without a Param or under NoGradGuard") {
    ad::Tape tape;
    ad::TapeGuard guard(tape);
    ad::Param<double> W(normal<double>({6, 4}, 2), "W");
    const ad::Tensor<double> x = normal<double>({2, 3, 4}, 1);
    const auto y = ad::linear_heads<3>(x, W, 2);
    CHECK(tape.size() == 1);
    for (const auto& v : y) {
        CHECK(v.requires_grad());
        CHECK(v.shape() == ad::Shape{2, 2, 3, 1});
    }
    const std::string dot = ad::to_dot(ad::Var<double>(ad::sum(y[1])));
    CHECK(dot.find("linear_heads") != std::string::npos);
    CHECK(dot.find("W") != std::string::npos);
    {
        const auto c = ad::linear_heads<3>(x, ad::Const<double>(W.value()), 2);
        CHECK_FALSE(c[0].requires_grad());
    }
    {
        ad::NoGradGuard no_grad;
        const auto n = ad::linear_heads<3>(x, W, 2);
        CHECK_FALSE(n[2].requires_grad());
    }
    CHECK(tape.size() == 2);  // the sum recorded above, nothing since
}

TEST_CASE("linear_heads: bad input names the op, the argument and the shapes") {
    ad::Param<float> W(normal<float>({12, 5}, 1), "W");
    ad::Param<float> b(normal<float>({12}, 2), "b");
    const ad::Tensor<float> x = normal<float>({2, 3, 5}, 3);
    SUBCASE("input of rank 2") {
        check_error([&] { (void)ad::linear_heads<3>(normal<float>({3, 5}, 4), W, b, 2); }, "linear_heads",
                    {"input must have rank 3", "(3,5)"});
    }
    SUBCASE("input features differ from the weight's") {
        check_error([&] { (void)ad::linear_heads<3>(normal<float>({2, 3, 4}, 4), W, b, 2); }, "linear_heads",
                    {"input features differ", "(2,3,4)", "(12,5)"});
    }
    SUBCASE("weight rows not divisible into the parts") {
        check_error([&] { (void)ad::linear_heads<3>(x, ad::Param<float>(normal<float>({10, 5}, 1)), 1); }, "linear_heads",
                    {"(10,5)", "not divisible into 3 parts"});
    }
    SUBCASE("features per part not divisible by the heads") {
        check_error([&] { (void)ad::linear_heads<3>(x, W, b, 3); }, "linear_heads", {"output features per part 4", "(12,5)", "by 3 heads"});
    }
    SUBCASE("bias of the wrong shape") {
        check_error([&] { (void)ad::linear_heads<3>(x, W, ad::Param<float>(normal<float>({4}, 1)), 2); }, "linear_heads",
                    {"bias must have shape (12)", "got (4)"});
    }
    SUBCASE("the backward kernel: a gradient part of the wrong shape") {
        std::array<ad::Tensor<float>, 3> y;
        ad::linear_heads_forward(x, W.value(), b.value(), 2, std::span<ad::Tensor<float>>(y));
        const std::array<ad::Tensor<float>, 3> dy{y[0], normal<float>({2, 2, 3, 1}, 5), y[2]};
        ad::Tensor<float> dx;
        check_error([&] { ad::linear_heads_backward(&dx, nullptr, nullptr, std::span<const ad::Tensor<float>>(dy), x, W.value()); },
                    "linear_heads_backward", {"dy part 1", "(2,2,3,2)", "got (2,2,3,1)"});
    }
}

// ---- heads_linear ---------------------------------------------------------------------------------

TEST_CASE("heads_linear: gradcheck for every input needing a gradient") {
    SUBCASE("2 heads of 3, with bias") { check_heads_linear({2, 2, 5, 3}, 4, true); }
    SUBCASE("3 heads of 2, without bias") { check_heads_linear({1, 3, 4, 2}, 5, false); }
    SUBCASE("one head, one token, one output feature") { check_heads_linear({2, 1, 1, 3}, 1, true); }
}

TEST_CASE("heads_linear: equals linear(merge_heads(o), W, b)") {
    const std::int64_t B = 2, H = 3, L = 200, D = 40, out = 300;
    SUBCASE("double") {
        const auto o = normal<double>({B, H, L, D}, 1), W = normal<double>({out, H * D}, 2), b = normal<double>({out}, 3);
        check_close(run_out_projection<double>(true, o, W, b), run_out_projection<double>(false, o, W, b), 1e-12);
    }
    SUBCASE("float") {
        const auto o = normal<float>({B, H, L, D}, 1), W = normal<float>({out, H * D}, 2), b = normal<float>({out}, 3);
        check_close(run_out_projection<float>(true, o, W, b), run_out_projection<float>(false, o, W, b), 1e-5f);
    }
}

TEST_CASE("heads_linear: bit-identical on 1 and 2 threads") {
    const auto o = normal<float>({2, 8, 256, 64}, 1), W = normal<float>({512, 512}, 2), b = normal<float>({512}, 3);
    Run<float> one, two;
    {
        Threads t(1);
        one = run_out_projection<float>(true, o, W, b);
    }
    {
        Threads t(2);
        two = run_out_projection<float>(true, o, W, b);
    }
    check_bitwise(one, two);
}

TEST_CASE("heads_linear: bad input names the op, the argument and the shapes") {
    ad::Param<float> W(normal<float>({4, 6}, 1), "W");
    SUBCASE("input of rank 3") {
        check_error([&] { (void)ad::heads_linear(normal<float>({2, 3, 6}, 2), W); }, "heads_linear", {"input must have rank 4", "(2,3,6)"});
    }
    SUBCASE("H·D differs from the weight's input features") {
        check_error([&] { (void)ad::heads_linear(normal<float>({2, 2, 3, 2}, 2), W); }, "heads_linear",
                    {"input features differ", "(2,2,3,2)", "H·D = 4", "(4,6)"});
    }
    SUBCASE("bias of the wrong shape") {
        check_error([&] { (void)ad::heads_linear(normal<float>({2, 3, 3, 2}, 2), W, normal<float>({6}, 3)); }, "heads_linear",
                    {"bias must have shape (4)", "got (6)"});
    }
}

// ---- in nn::MultiHeadAttention ----------------------------------------------------------------------

TEST_CASE("MultiHeadAttention: self-attention records three records, no split, narrow or merge copies") {
    ad::Tape tape;
    ad::TapeGuard guard(tape);
    ad::nn::MultiHeadAttention<float> mha({.embed_dim = 8, .num_heads = 2, .seed = 1});
    ad::Param<float> x(normal<float>({2, 5, 8}, 1), "x");
    const ad::Var<float> y = mha(x, x, x);
    // linear_heads (q, k, v), the fused attention, heads_linear
    CHECK(tape.size() == 3);
    const std::string dot = ad::to_dot(y);
    CHECK(dot.find("linear_heads") != std::string::npos);
    CHECK(dot.find("HeadsLinear") != std::string::npos);
    for (const char* copy : {"Permute", "Narrow", "Reshape"}) {
        INFO(copy);
        CHECK(dot.find(copy) == std::string::npos);
    }
}

// nn::Linear, nn::MultiHeadAttention and the optimisers as a user meets them: parameters and their
// names, initialisation, what masks and dropout modes do to the output, and bad input.
//
// Tolerances: fp64 results of the same formulas evaluated in a different order are compared with
// 1e-12 absolute error on O(1) values (rounding is ~1e-15). Where a masked or dropped input must not
// reach the output at all, the comparison is exact: a masked key enters as probability 0.0, and
// 0.0·v adds exactly nothing, so any difference means the input leaked. Optimiser steps computed by
// hand are compared with 1e-14 on O(1) values: a handful of roundings apart.

#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <string>
#include <string_view>
#include <vector>

#include <fmt/format.h>

#include <autodiff/autodiff.hpp>

#include "check_error.hpp"

namespace ad = autodiff;

namespace {

using Tensor = ad::Tensor<double>;
using MHA = ad::nn::MultiHeadAttention<double>;

constexpr double fp64_tol = 1e-12;  // see the file comment
constexpr double not_a_number = std::numeric_limits<double>::quiet_NaN();

Tensor randn(const ad::Shape& s, std::uint64_t seed) { return ad::randn<double>(s, seed); }

using test::check_error;

void check_close(const Tensor& got, const Tensor& want, double tol = fp64_tol) {
    REQUIRE(got.shape() == want.shape());
    const double err = ad::max_abs_diff(got, want);
    CHECK_MESSAGE(err <= tol, fmt::format("max abs err {} > {} for shape {}", err, tol, got.shape()));
}

bool bitwise_equal(const Tensor& a, const Tensor& b) {
    return a.shape() == b.shape() && std::memcmp(a.data(), b.data(), static_cast<std::size_t>(a.numel()) * sizeof(double)) == 0;
}

double max_abs(const Tensor& t) { return t.numel() ? t.array().abs().maxCoeff() : 0.0; }

std::vector<std::string> names_of(const std::vector<ad::Param<double>>& params) {
    std::vector<std::string> names;
    for (const auto& p : params) names.push_back(p.name());
    return names;
}

// A module with random (non-zero) biases, so that no test runs at the special point b = 0.
MHA module(const ad::nn::MultiHeadAttentionOptions& o) {
    MHA mha(o);
    for (ad::Param<double>& p : mha.parameters())
        if (p.shape().rank() == 1) p.value().array() = 0.1 * randn(p.shape(), 900 + static_cast<std::uint64_t>(p.shape()[0])).array();
    return mha;
}

// Output rows [0, n) along the sequence dimension of a (B, L, E) tensor.
Tensor first_positions(const Tensor& t, std::int64_t n) { return ad::narrow_forward(t, 1, 0, n); }

// Flat offset in a tensor of shape `s` of the (rank-4 padded) index (i0, i1, i2, i3) of a shape that `s`
// broadcasts to: dimensions of size 1 read index 0.
std::int64_t broadcast_offset(const ad::Shape& s, const std::array<std::int64_t, 4>& i) {
    const auto p = s.padded();
    std::int64_t off = 0;
    for (std::size_t d = 0; d < 4; ++d) off = off * p[d] + (p[d] == 1 ? 0 : i[d]);
    return off;
}

}  // namespace

// ---- nn::Linear -----------------------------------------------------------------------------------

TEST_CASE("nn::Linear: weight is (out, in), bias is (out), and x (..., in) gives y (..., out)") {
    ad::nn::Linear<double> lin(5, 3);
    CHECK(lin.weight().shape() == ad::Shape{3, 5});
    REQUIRE(lin.has_bias());
    CHECK(lin.bias().shape() == ad::Shape{3});
    for (const ad::Shape& xs : {ad::Shape{5}, ad::Shape{4, 5}, ad::Shape{2, 4, 5}, ad::Shape{2, 2, 4, 5}}) {
        CAPTURE(xs.str());
        ad::Shape ys = xs;
        ys[ys.rank() - 1] = 3;
        CHECK(lin(randn(xs, 1)).shape() == ys);
    }
}

TEST_CASE("nn::Linear: y = x·Wᵀ + b, element by element") {
    ad::nn::Linear<double> lin(4, 3, true, 7);
    const Tensor x = randn({2, 4}, 2);
    const Tensor y = lin(x).value();
    const Tensor& W = lin.weight().value();
    const Tensor& b = lin.bias().value();
    Tensor want(y.shape());
    for (std::int64_t r = 0; r < 2; ++r)
        for (std::int64_t o = 0; o < 3; ++o) {
            double s = b(o);
            for (std::int64_t i = 0; i < 4; ++i) s += x(r, i) * W(o, i);
            want(r, o) = s;
        }
    check_close(y, want);
}

TEST_CASE("nn::Linear: weight and bias are uniform within ±1/√in_features, as torch.nn.Linear") {
    ad::nn::Linear<double> lin(16, 32, true, 3);
    const double bound = 1.0 / std::sqrt(16.0);
    CHECK(max_abs(lin.weight().value()) <= bound);
    CHECK(max_abs(lin.bias().value()) <= bound);
    // The samples fill the interval: a bound of 1/in (0.0625) or 1/(2√in) would fail here. With 512
    // (32) uniform samples, the largest |w| is below bound/2 with probability 2^-512 (2^-32).
    CHECK(max_abs(lin.weight().value()) > bound / 2);
    CHECK(max_abs(lin.bias().value()) > bound / 2);
}

TEST_CASE("nn::Linear: another seed gives other weights; the same seed the same ones") {
    ad::nn::Linear<double> a(6, 4, true, 1), b(6, 4, true, 1), c(6, 4, true, 2);
    CHECK(bitwise_equal(a.weight().value(), b.weight().value()));
    CHECK_FALSE(bitwise_equal(a.weight().value(), c.weight().value()));
    // The bias does not reuse the weight's random stream.
    CHECK_FALSE(bitwise_equal(a.bias().value(), ad::narrow_forward(a.weight().value().reshaped({24}), 0, 0, 4)));
}

TEST_CASE("nn::Linear: without bias there is one parameter and y = x·Wᵀ") {
    ad::nn::Linear<double> lin(4, 3, false, 7);
    CHECK_FALSE(lin.has_bias());
    CHECK(lin.parameters().size() == 1);
    const Tensor x = randn({2, 4}, 2);
    CHECK(bitwise_equal(lin(x).value(), ad::linear_forward(x, lin.weight().value())));
}

TEST_CASE("nn::Linear: parameters() are the weight and the bias, named after the layer, sharing their state") {
    ad::nn::Linear<double> lin(4, 3, true, 0, "encoder");
    const auto params = lin.parameters();
    REQUIRE(params.size() == 2);
    CHECK(names_of(params) == std::vector<std::string>{"encoder.weight", "encoder.bias"});
    // An optimiser given parameters() updates the layer itself.
    CHECK(params[0].state() == lin.weight().state());
    CHECK(params[1].state() == lin.bias().state());
}

TEST_CASE("nn::Linear: a const layer gives read access to the same weight and bias") {
    ad::nn::Linear<double> lin(4, 3);
    const ad::nn::Linear<double>& view = lin;
    CHECK(view.weight().state() == lin.weight().state());
    CHECK(view.bias().state() == lin.bias().state());
    const ad::nn::Linear<double> no_bias(4, 3, false);
    check_error([&] { (void)no_bias.bias(); }, "nn::Linear", {"this layer has no bias"});
}

TEST_CASE("nn::Linear: bad construction and bias() on a layer without bias throw") {
    check_error([] { ad::nn::Linear<double>(0, 3); }, "nn::Linear", {"in_features (0) and out_features (3) must be >= 1"});
    check_error([] { ad::nn::Linear<double>(3, -1); }, "nn::Linear", {"in_features (3) and out_features (-1) must be >= 1"});
    ad::nn::Linear<double> lin(4, 3, false);
    check_error([&] { (void)lin.bias(); }, "nn::Linear", {"this layer has no bias"});
    check_error([&] { (void)lin(randn({2, 5}, 1)); }, "linear", {"input features differ", "(2,5)", "(3,4)"});
}

// ---- nn::MultiHeadAttention: parameters and initialisation ----------------------------------------

TEST_CASE("MultiHeadAttention: parameters() and their names and shapes follow torch") {
    SUBCASE("packed projections with bias: in_proj_weight, in_proj_bias, out_proj.weight, out_proj.bias") {
        MHA mha({.embed_dim = 8, .num_heads = 2});
        const auto params = mha.parameters();
        CHECK(names_of(params) == std::vector<std::string>{"in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"});
        REQUIRE(params.size() == 4);
        CHECK(params[0].shape() == ad::Shape{24, 8});
        CHECK(params[1].shape() == ad::Shape{24});
        CHECK(params[2].shape() == ad::Shape{8, 8});
        CHECK(params[3].shape() == ad::Shape{8});
        CHECK(mha.packed());
        CHECK(params[0].state() == mha.in_proj_weight().state());
    }
    SUBCASE("packed projections without bias: in_proj_weight and out_proj.weight") {
        MHA mha({.embed_dim = 8, .num_heads = 2, .bias = false});
        CHECK(names_of(mha.parameters()) == std::vector<std::string>{"in_proj_weight", "out_proj.weight"});
    }
    SUBCASE("kdim and vdim != embed_dim: separate q, k, v projection weights") {
        MHA mha({.embed_dim = 8, .num_heads = 2, .kdim = 5, .vdim = 3});
        const auto params = mha.parameters();
        CHECK(names_of(params) == std::vector<std::string>{"q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias",
                                                            "out_proj.weight", "out_proj.bias"});
        REQUIRE(params.size() == 6);
        CHECK(params[0].shape() == ad::Shape{8, 8});
        CHECK(params[1].shape() == ad::Shape{8, 5});
        CHECK(params[2].shape() == ad::Shape{8, 3});
        CHECK(params[3].shape() == ad::Shape{24});
        CHECK_FALSE(mha.packed());
    }
    SUBCASE("only kdim differs: separate projections too") {
        MHA mha({.embed_dim = 8, .num_heads = 2, .kdim = 5});
        CHECK_FALSE(mha.packed());
        CHECK(mha.v_proj_weight().shape() == ad::Shape{8, 8});
    }
}

TEST_CASE("MultiHeadAttention: xavier-uniform in-projections, zero biases, out_proj uniform within ±1/√E") {
    const std::int64_t E = 16;
    SUBCASE("packed: in_proj_weight (3E, E) within sqrt(6/(E + 3E))") {
        MHA mha({.embed_dim = E, .num_heads = 4, .seed = 5});
        const double bound = std::sqrt(6.0 / (E + 3 * E));
        CHECK(max_abs(mha.in_proj_weight().value()) <= bound);
        CHECK(max_abs(mha.in_proj_weight().value()) > bound / 2);  // 768 samples fill the interval
        CHECK(max_abs(mha.in_proj_bias().value()) == 0.0);
        CHECK(max_abs(mha.out_proj().bias().value()) == 0.0);
        const double out_bound = 1.0 / std::sqrt(static_cast<double>(E));
        CHECK(max_abs(mha.out_proj().weight().value()) <= out_bound);
        CHECK(max_abs(mha.out_proj().weight().value()) > out_bound / 2);
    }
    SUBCASE("separate: each weight (E, in) within sqrt(6/(E + in))") {
        MHA mha({.embed_dim = E, .num_heads = 4, .kdim = 6, .vdim = 40, .seed = 5});
        for (const auto& entry : {std::pair{&mha.q_proj_weight(), E}, std::pair{&mha.k_proj_weight(), std::int64_t{6}},
                                  std::pair{&mha.v_proj_weight(), std::int64_t{40}}}) {
            const auto [p, in] = entry;
            const std::string name = p->name();  // CAPTURE uses a lambda, which cannot capture a binding in Clang 14
            CAPTURE(name);
            const double bound = std::sqrt(6.0 / static_cast<double>(E + in));
            CHECK(max_abs(p->value()) <= bound);
            CHECK(max_abs(p->value()) > bound / 2);
        }
        CHECK(max_abs(mha.in_proj_bias().value()) == 0.0);
    }
}

// ---- nn::MultiHeadAttention: behaviour -------------------------------------------------------------

TEST_CASE("MultiHeadAttention: self-attention (one tensor as q, k, v) equals cross-attention with three equal copies") {
    // The same tensor for query, key and value takes the packed fast path (one (B, L, 3E) product);
    // three separate copies take three projections. Results and gradients must agree.
    MHA mha = module({.embed_dim = 8, .num_heads = 2, .seed = 3});
    const Tensor X = randn({2, 5, 8}, 10), dout = randn({2, 5, 8}, 11);
    ad::Param<double> x(X.clone()), xq(X.clone()), xk(X.clone()), xv(X.clone());

    const ad::Var<double> self_in(x);
    ad::Var<double> self_out = mha(self_in, self_in, self_in, ad::causal);
    self_out.backward(dout);
    std::vector<Tensor> self_grads;
    for (const auto& p : mha.parameters()) self_grads.push_back(p.grad().clone());
    for (auto& p : mha.parameters()) p.zero_grad();

    ad::Var<double> cross_out = mha(ad::Var<double>(xq), ad::Var<double>(xk), ad::Var<double>(xv), ad::causal);
    cross_out.backward(dout);

    check_close(self_out.value(), cross_out.value());
    Tensor dx_cross(X.shape());
    dx_cross.array() = xq.grad().array() + xk.grad().array() + xv.grad().array();
    check_close(x.grad(), dx_cross);
    const auto params = mha.parameters();
    for (std::size_t i = 0; i < params.size(); ++i) {
        CAPTURE(params[i].name());
        check_close(params[i].grad(), self_grads[i]);
    }
}

TEST_CASE("MultiHeadAttention: eval() makes dropout the identity") {
    MHA with_dropout = module({.embed_dim = 8, .num_heads = 2, .dropout = 0.5, .seed = 4});
    MHA without = module({.embed_dim = 8, .num_heads = 2, .dropout = 0.0, .seed = 4});  // the same weights
    with_dropout.eval();
    CHECK_FALSE(with_dropout.training());
    const ad::Var<double> x(randn({2, 5, 8}, 20));
    const Tensor first = with_dropout(x, x, x).value();
    const Tensor second = with_dropout(x, x, x).value();
    CHECK(bitwise_equal(first, second));
    CHECK(bitwise_equal(first, without(x, x, x).value()));
}

TEST_CASE("MultiHeadAttention: train() with dropout > 0 draws a new mask on every call") {
    MHA mha = module({.embed_dim = 8, .num_heads = 2, .dropout = 0.5, .seed = 4});
    mha.eval();
    mha.train();
    CHECK(mha.training());
    const ad::Var<double> x(randn({2, 5, 8}, 21));
    const Tensor first = mha(x, x, x).value();
    const Tensor second = mha(x, x, x).value();
    mha.eval();
    const Tensor evaluated = mha(x, x, x).value();
    // Two masks of 2·2·5·5 = 100 probabilities with rate 0.5 coincide with probability 2^-100.
    CHECK_FALSE(bitwise_equal(first, second));
    CHECK_FALSE(bitwise_equal(first, evaluated));
    CHECK_FALSE(bitwise_equal(second, evaluated));
}

TEST_CASE("MultiHeadAttention: dropout_descriptor() is the next call's dropout: the options' rate and seed, offset = calls so far, the mode") {
    MHA mha = module({.embed_dim = 8, .num_heads = 2, .dropout = 0.25, .seed = 9});
    const MHA& view = mha;
    const ad::Var<double> x(randn({2, 5, 8}, 22));
    auto check_descriptor = [&](std::uint64_t offset, bool training) {
        const ad::DropoutDescriptor d = view.dropout_descriptor();
        CHECK(d.rate == 0.25);
        CHECK(d.seed == 9);
        CHECK(d.offset == offset);
        CHECK(d.training == training);
    };
    check_descriptor(0, true);
    (void)mha(x, x, x);
    check_descriptor(1, true);
    (void)mha(x, x, x, randn({2, 5, 5}, 23), ad::causal);  // the overload with an attention bias counts too
    check_descriptor(2, true);
    SUBCASE("eval() clears the training flag, and calls in eval mode still advance the offset") {
        mha.eval();
        check_descriptor(2, false);
        (void)mha(x, x, x);
        check_descriptor(3, false);
        mha.train();
        check_descriptor(3, true);
    }
    SUBCASE("a call rejected for bad input leaves the offset where it was") {
        const ad::Var<double> q2(randn({5, 8}, 24));
        CHECK_THROWS_AS((void)mha(q2, x, x), ad::Error);
        check_descriptor(2, true);
    }
}

TEST_CASE("MultiHeadAttention with a causal mask: the output at position i does not depend on inputs after i") {
    const std::int64_t B = 2, L = 6, E = 8;
    MHA mha = module({.embed_dim = E, .num_heads = 2, .seed = 6});
    const Tensor X = randn({B, L, E}, 30);
    ad::NoGradGuard no_grad;
    const Tensor out = mha(ad::Var<double>(X), ad::Var<double>(X), ad::Var<double>(X), ad::causal).value();
    for (std::int64_t i = 0; i + 1 < L; ++i) {
        CAPTURE(i);
        // Every input after position i replaced (in every batch): query, key and value all change there.
        Tensor Xp = X.clone();
        const Tensor noise = randn({B, L, E}, 31 + static_cast<std::uint64_t>(i));
        for (std::int64_t b = 0; b < B; ++b)
            for (std::int64_t j = i + 1; j < L; ++j)
                for (std::int64_t e = 0; e < E; ++e) Xp(b, j, e) = noise(b, j, e);
        const ad::Var<double> xp(Xp);
        const Tensor outp = mha(xp, xp, xp, ad::causal).value();
        CHECK(bitwise_equal(first_positions(outp, i + 1), first_positions(out, i + 1)));
        CHECK(max_abs_diff(ad::narrow_forward(outp, 1, i + 1, 1), ad::narrow_forward(out, 1, i + 1, 1)) > 1e-3);
    }
}

TEST_CASE("MultiHeadAttention with a key-padding mask: padded keys and values do not influence the output") {
    const std::int64_t B = 2, Lq = 3, Lk = 5, E = 8;
    MHA mha = module({.embed_dim = E, .num_heads = 2, .seed = 7});
    // Batch 0 keeps keys 0, 1, 2; batch 1 keeps keys 0, 2, 4 (true = keep, the negation of torch's mask).
    const ad::Tensor<bool> keep = ad::from_vector<bool>({B, Lk}, {true, true, true, false, false,  //
                                                                  true, false, true, false, true});
    const Tensor q = randn({B, Lq, E}, 40), k = randn({B, Lk, E}, 41), v = randn({B, Lk, E}, 42);
    auto run = [&](const Tensor& key, const Tensor& value) {
        ad::NoGradGuard no_grad;
        return mha(ad::Var<double>(q), ad::Var<double>(key), ad::Var<double>(value), ad::key_padding_mask(keep)).value();
    };
    const Tensor out = run(k, v);
    auto perturbed = [&](const Tensor& t, std::int64_t b, std::int64_t j) {
        Tensor p = t.clone();
        for (std::int64_t e = 0; e < E; ++e) p(b, j, e) += 10.0;
        return p;
    };
    SUBCASE("changing a padded key or value leaves the output bitwise unchanged") {
        for (const auto& key : {std::pair<std::int64_t, std::int64_t>{0, 3}, {0, 4}, {1, 1}, {1, 3}}) {
            const std::int64_t b = key.first, j = key.second;  // not a binding: CAPTURE uses a lambda
            CAPTURE(b);
            CAPTURE(j);
            CHECK(bitwise_equal(run(perturbed(k, b, j), v), out));
            CHECK(bitwise_equal(run(k, perturbed(v, b, j)), out));
        }
    }
    SUBCASE("changing a kept key or value changes the output") {
        CHECK(max_abs_diff(run(perturbed(k, 1, 2), v), out) > 1e-3);
        CHECK(max_abs_diff(run(k, perturbed(v, 1, 2)), out) > 1e-3);
    }
    SUBCASE("padded keys and values get a gradient of exactly zero") {
        ad::Param<double> pk(k.clone()), pv(v.clone());
        ad::Var<double> y = mha(ad::Var<double>(q), ad::Var<double>(pk), ad::Var<double>(pv), ad::key_padding_mask(keep));
        y.backward(randn(y.shape(), 43));
        for (std::int64_t b = 0; b < B; ++b)
            for (std::int64_t j = 0; j < Lk; ++j) {
                CAPTURE(b);
                CAPTURE(j);
                const Tensor gk = ad::narrow_forward(ad::narrow_forward(pk.grad(), 0, b, 1), 1, j, 1);
                const Tensor gv = ad::narrow_forward(ad::narrow_forward(pv.grad(), 0, b, 1), 1, j, 1);
                if (keep(b, j)) {
                    CHECK(max_abs(gk) > 0.0);
                    CHECK(max_abs(gv) > 0.0);
                } else {
                    CHECK(max_abs(gk) == 0.0);
                    CHECK(max_abs(gv) == 0.0);
                }
            }
    }
}

TEST_CASE("MultiHeadAttention: a trainable attention bias gets a gradient of its own shape, the full gradient summed over its broadcast dimensions") {
    const std::int64_t B = 2, H = 2, Lq = 3, Lk = 4, E = 8;
    MHA mha = module({.embed_dim = E, .num_heads = H, .seed = 8});
    const Tensor q = randn({B, Lq, E}, 50), kv = randn({B, Lk, E}, 51), dout = randn({B, Lq, E}, 52);
    const ad::Shape full{B, H, Lq, Lk};
    for (const ad::Shape& bs : {ad::Shape{Lk}, ad::Shape{Lq, Lk}, ad::Shape{H, Lq, Lk}, ad::Shape{B, 1, Lq, Lk},
                                ad::Shape{1, H, 1, Lk}, ad::Shape{B, H, Lq, 1}, full}) {
        CAPTURE(bs.str());
        ad::Param<double> bias(randn(bs, 53), "bias");
        // The same bias written out at full size (B, H, Lq, Lk).
        ad::Param<double> bias_full(ad::Tensor<double>(full), "bias_full");
        for (std::int64_t i = 0; i < bias_full.value().numel(); ++i) {
            const std::array<std::int64_t, 4> idx{i / (H * Lq * Lk), i / (Lq * Lk) % H, i / Lk % Lq, i % Lk};
            bias_full.value().data()[i] = bias.value().data()[broadcast_offset(bs, idx)];
        }
        const ad::Var<double> query(q), key(kv);
        ad::Var<double> out = mha(query, key, key, bias, ad::causal);
        out.backward(dout);
        ad::Var<double> out_full = mha(query, key, key, bias_full, ad::causal);
        out_full.backward(dout);

        check_close(out.value(), out_full.value());
        REQUIRE(bias.grad().shape() == bs);
        Tensor want = ad::zeros<double>(bs);
        for (std::int64_t i = 0; i < bias_full.grad().numel(); ++i) {
            const std::array<std::int64_t, 4> idx{i / (H * Lq * Lk), i / (Lq * Lk) % H, i / Lk % Lq, i % Lk};
            want.data()[broadcast_offset(bs, idx)] += bias_full.grad().data()[i];
        }
        check_close(bias.grad(), want);
        CHECK(max_abs(bias.grad()) > 0.0);
        for (auto& p : mha.parameters()) p.zero_grad();
    }
}

TEST_CASE("MultiHeadAttention: gradcheck of the whole module with a trainable bias, causal and key-padding masks") {
    const std::int64_t B = 2, H = 2, L = 4, E = 8;
    MHA mha = module({.embed_dim = E, .num_heads = H, .seed = 9});
    ad::Param<double> X(randn({B, L, E}, 60), "X");
    ad::Param<double> bias(randn({H, L, L}, 61), "attn_bias");
    const ad::Tensor<bool> keep = ad::from_vector<bool>({B, L}, {true, true, true, true, true, false, true, false});
    const ad::Mask mask = ad::causal | ad::key_padding_mask(keep);
    std::vector<ad::Param<double>> inputs = mha.parameters();
    inputs.push_back(X);
    inputs.push_back(bias);
    const ad::GradcheckReport report = ad::gradcheck(
        [&] {
            const ad::Var<double> x(X);
            return mha(x, x, x, bias, mask);
        },
        inputs);
    INFO(report.str());
    CHECK(report.passed);
    CHECK(report.max_rel_error() < 1e-6);
}

// ---- nn::MultiHeadAttention: bad input -------------------------------------------------------------

TEST_CASE("MultiHeadAttention: bad options are rejected when the module is built") {
    const char* op = "nn::MultiHeadAttention";
    SUBCASE("embed_dim not divisible by num_heads") {
        check_error([] { MHA({.embed_dim = 10, .num_heads = 3}); }, op, {"embed_dim 10 is not divisible by num_heads 3"});
    }
    SUBCASE("embed_dim 0") {
        check_error([] { MHA({.embed_dim = 0, .num_heads = 1}); }, op, {"embed_dim (0) and num_heads (1) must be >= 1"});
    }
    SUBCASE("num_heads 0") {
        check_error([] { MHA({.embed_dim = 8, .num_heads = 0}); }, op, {"embed_dim (8) and num_heads (0) must be >= 1"});
    }
    SUBCASE("dropout 1.0") {
        check_error([] { MHA({.embed_dim = 8, .num_heads = 2, .dropout = 1.0}); }, op, {"rate must be in [0, 1), got 1"});
    }
    SUBCASE("dropout -0.1") {
        check_error([] { MHA({.embed_dim = 8, .num_heads = 2, .dropout = -0.1}); }, op, {"rate must be in [0, 1), got -0.1"});
    }
    SUBCASE("dropout NaN") {
        check_error([] { MHA({.embed_dim = 8, .num_heads = 2, .dropout = not_a_number}); }, op, {"rate must be in [0, 1), got nan"});
    }
    SUBCASE("negative kdim") {
        check_error([] { MHA({.embed_dim = 8, .num_heads = 2, .kdim = -1}); }, op, {"kdim (-1) and vdim (0) must be >= 0"});
    }
}

TEST_CASE("MultiHeadAttention: bad inputs are rejected before anything is recorded") {
    const char* op = "nn::MultiHeadAttention";
    MHA mha({.embed_dim = 8, .num_heads = 2});
    const ad::Var<double> x(randn({2, 5, 8}, 70));
    SUBCASE("query of rank 2") {
        const ad::Var<double> q2(randn({5, 8}, 71));
        check_error([&] { (void)mha(q2, x, x); }, op, {"query must have rank 3, got (5,8)"});
    }
    SUBCASE("query with the wrong feature count") {
        const ad::Var<double> q(randn({2, 5, 6}, 72));
        check_error([&] { (void)mha(q, x, x); }, op, {"query (2,5,6) must have embed_dim = 8 features"});
    }
    SUBCASE("key with the wrong feature count") {
        const ad::Var<double> k(randn({2, 5, 6}, 72));
        check_error([&] { (void)mha(x, k, x); }, op, {"key (2,5,6) must have kdim = 8 features"});
    }
    SUBCASE("key and value batch differs from the query's") {
        const ad::Var<double> kv(randn({3, 6, 8}, 73));
        check_error([&] { (void)mha(x, kv, kv); }, op, {"batch sizes differ: query (2,5,8), key (3,6,8), value (3,6,8)"});
    }
    SUBCASE("key and value lengths differ") {
        const ad::Var<double> k(randn({2, 6, 8}, 74)), v(randn({2, 7, 8}, 75));
        check_error([&] { (void)mha(x, k, v); }, op, {"key (2,6,8) and value (2,7,8) must have the same length"});
    }
    SUBCASE("key-padding mask of the wrong shape") {
        const ad::Var<double> kv(randn({2, 6, 8}, 76));
        const ad::Mask mask = ad::key_padding_mask(ad::Tensor<bool>(ad::Shape{2, 5}));
        check_error([&] { (void)mha(x, kv, kv, mask); }, op,
                    {"key-padding mask must have shape (2,6) (batch, Lk) for logits (2,2,5,6), got (2,5)"});
    }
    SUBCASE("keep mask that does not broadcast to (B, H, Lq, Lk)") {
        const ad::Var<double> kv(randn({2, 6, 8}, 76));
        const ad::Mask mask = ad::keep_mask(ad::full<bool>({5, 7}, true));
        check_error([&] { (void)mha(x, kv, kv, mask); }, op, {"keep mask (5,7) does not broadcast to the logits (2,2,5,6)"});
    }
    SUBCASE("attention bias that does not broadcast to (B, H, Lq, Lk)") {
        const ad::Var<double> kv(randn({2, 6, 8}, 77));
        const Tensor bias = randn({3, 5, 6}, 78);
        check_error([&] { (void)mha(x, kv, kv, bias); }, op,
                    {"attention bias (3,5,6) does not broadcast to the scores (B, H, Lq, Lk) = (2,2,5,6)"});
    }
}

TEST_CASE("MultiHeadAttention: asking for a projection the module does not have throws") {
    const char* op = "nn::MultiHeadAttention";
    MHA separate({.embed_dim = 8, .num_heads = 2, .kdim = 4});
    check_error([&] { (void)separate.in_proj_weight(); }, op, {"this module has no in_proj_weight"});
    MHA packed({.embed_dim = 8, .num_heads = 2});
    check_error([&] { (void)packed.q_proj_weight(); }, op, {"this module has no q_proj_weight"});
    MHA no_bias({.embed_dim = 8, .num_heads = 2, .bias = false});
    check_error([&] { (void)no_bias.in_proj_bias(); }, op, {"this module has no in_proj_bias"});
    check_error([&] { (void)no_bias.out_proj().bias(); }, "nn::Linear", {"this layer has no bias"});
}

// ---- optimisers -----------------------------------------------------------------------------------

namespace {

ad::Param<double> scalar_param(std::initializer_list<double> values, const char* name = "w") {
    return ad::Param<double>(ad::from_vector<double>({static_cast<std::int64_t>(values.size())}, values), name);
}

// w.grad() becomes exactly g: the gradient of Σ w·g.
void set_gradient(ad::Param<double>& w, std::initializer_list<double> g) {
    w.zero_grad();
    ad::Var<double> loss = ad::sum(w * ad::from_vector<double>(w.shape(), g));
    loss.backward();
}

}  // namespace

TEST_CASE("SGD and Adam: bad options and an empty parameter list throw") {
    const std::vector<ad::Param<double>> params{scalar_param({1.0})};
    SUBCASE("SGD") {
        check_error([&] { ad::nn::SGD<double>(params, {.lr = 0.0}); }, "SGD", {"lr must be finite and > 0, got 0"});
        check_error([&] { ad::nn::SGD<double>(params, {.lr = -0.1}); }, "SGD", {"lr must be finite and > 0, got -0.1"});
        check_error([&] { ad::nn::SGD<double>(params, {.lr = not_a_number}); }, "SGD", {"lr must be finite and > 0, got nan"});
        check_error([&] { ad::nn::SGD<double>(params, {.lr = 0.1, .momentum = 1.0}); }, "SGD", {"momentum must be in [0, 1), got 1"});
        check_error([&] { ad::nn::SGD<double>(params, {.lr = 0.1, .weight_decay = -1.0}); }, "SGD",
                    {"weight_decay must be finite and >= 0, got -1"});
        check_error([] { ad::nn::SGD<double>({}, {.lr = 0.1}); }, "SGD", {"no parameters to optimise"});
    }
    SUBCASE("Adam") {
        check_error([&] { ad::nn::Adam<double>(params, {.lr = 0.0}); }, "Adam", {"lr must be finite and > 0, got 0"});
        check_error([&] { ad::nn::Adam<double>(params, {.lr = -1e-3}); }, "Adam", {"lr must be finite and > 0, got -0.001"});
        check_error([&] { ad::nn::Adam<double>(params, {.lr = not_a_number}); }, "Adam", {"lr must be finite and > 0, got nan"});
        check_error([&] { ad::nn::Adam<double>(params, {.beta1 = 1.0}); }, "Adam", {"beta1 must be in [0, 1), got 1"});
        check_error([&] { ad::nn::Adam<double>(params, {.beta2 = 1.0}); }, "Adam", {"beta2 must be in [0, 1), got 1"});
        check_error([&] { ad::nn::Adam<double>(params, {.eps = 0.0}); }, "Adam", {"eps must be finite and > 0, got 0"});
        check_error([] { ad::nn::Adam<double>({}, {}); }, "Adam", {"no parameters to optimise"});
    }
}

TEST_CASE("Adam: a step leaves a Param without a gradient unchanged") {
    ad::Param<double> reached = scalar_param({1.0, 2.0}, "reached"), skipped = scalar_param({3.0, -4.0}, "skipped");
    ad::nn::Adam<double> adam({reached, skipped}, {.lr = 0.1, .weight_decay = 0.5, .decoupled_weight_decay = true});
    set_gradient(reached, {0.5, -0.5});
    REQUIRE_FALSE(skipped.has_grad());
    adam.step();
    CHECK(skipped.value().to_vector() == std::vector<double>{3.0, -4.0});  // not even weight decay
    CHECK(reached.value()(0) < 1.0);
    CHECK(reached.value()(1) > 2.0 * (1 - 0.1 * 0.5));
}

TEST_CASE("SGD with momentum and weight decay: two steps equal torch.optim.SGD's formula by hand") {
    // torch.optim.SGD (dampening 0, not nesterov):  g += wd·w ; buf = g at the first step, then
    // buf = momentum·buf + g ; w -= lr·buf.   lr = 0.1, momentum = 0.9, wd = 0.1.
    //   w0 = ( 1,     -2     )   g1 = (0.5, 0.25)   g2 = (0.5, -1)
    //   step 1: g = (0.6, 0.05)          buf = (0.6, 0.05)        w1 = (0.94, -2.005)
    //   step 2: g = (0.594, -1.2005)     buf = (1.134, -1.1555)   w2 = (0.8266, -1.88945)
    ad::Param<double> w = scalar_param({1.0, -2.0});
    ad::nn::SGD<double> sgd({w}, {.lr = 0.1, .momentum = 0.9, .weight_decay = 0.1});
    set_gradient(w, {0.5, 0.25});
    sgd.step();
    CHECK(std::abs(w.value()(0) - 0.94) < 1e-14);
    CHECK(std::abs(w.value()(1) - -2.005) < 1e-14);
    set_gradient(w, {0.5, -1.0});
    sgd.step();
    CHECK(std::abs(w.value()(0) - 0.8266) < 1e-14);
    CHECK(std::abs(w.value()(1) - -1.88945) < 1e-14);
}

namespace {

// torch.optim.Adam / AdamW for one scalar, written from torch's documented algorithm.
struct HandAdam {
    double lr, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0;
    bool decoupled = false;
    double w, m = 0, v = 0;
    int t = 0;
    void step(double g) {
        ++t;
        if (decoupled) w *= 1 - lr * weight_decay;
        else g += weight_decay * w;
        m = beta1 * m + (1 - beta1) * g;
        v = beta2 * v + (1 - beta2) * g * g;
        const double m_hat = m / (1 - std::pow(beta1, t)), v_hat = v / (1 - std::pow(beta2, t));
        w -= lr * m_hat / (std::sqrt(v_hat) + eps);
    }
};

}  // namespace

TEST_CASE("AdamW: decoupled weight decay w *= 1 - lr·wd before the Adam step, two steps by hand") {
    // Step 1 by hand: w = 1·(1 − 0.1·0.1) = 0.99, m̂ = g = 0.5, v̂ = g² = 0.25,
    // w1 = 0.99 − 0.1·0.5/(0.5 + 1e-8) = 0.890000002 (to 4e-17).
    ad::Param<double> w = scalar_param({1.0});
    ad::nn::Adam<double> adamw({w}, {.lr = 0.1, .weight_decay = 0.1, .decoupled_weight_decay = true});
    HandAdam hand{.lr = 0.1, .weight_decay = 0.1, .decoupled = true, .w = 1.0};
    set_gradient(w, {0.5});
    adamw.step();
    hand.step(0.5);
    CHECK(std::abs(w.value()(0) - 0.890000002) < 1e-14);
    CHECK(std::abs(w.value()(0) - hand.w) < 1e-14);
    set_gradient(w, {-0.25});
    adamw.step();
    hand.step(-0.25);
    CHECK(std::abs(w.value()(0) - hand.w) < 1e-14);
}

TEST_CASE("Adam with coupled weight decay adds wd·w to the gradient instead: two steps by hand") {
    // Step 1 by hand: g = 0.5 + 0.1·1 = 0.6, w1 = 1 − 0.1·0.6/(0.6 + 1e-8) = 0.9000000016667 (to 3e-17):
    // the decay is normalised away on the first step, unlike AdamW's 0.89.
    ad::Param<double> w = scalar_param({1.0});
    ad::nn::Adam<double> adam({w}, {.lr = 0.1, .weight_decay = 0.1});
    HandAdam hand{.lr = 0.1, .weight_decay = 0.1, .w = 1.0};
    set_gradient(w, {0.5});
    adam.step();
    hand.step(0.5);
    CHECK(std::abs(w.value()(0) - (1 - 0.1 / (1 + 1e-8 / 0.6))) < 1e-14);
    CHECK(std::abs(w.value()(0) - hand.w) < 1e-14);
    set_gradient(w, {-0.25});
    adam.step();
    hand.step(-0.25);
    CHECK(std::abs(w.value()(0) - hand.w) < 1e-14);
}

TEST_CASE("Adam: a Param first reached at step 2 gets a first step's bias correction, as torch's per-parameter step count") {
    // torch keeps state['step'] per parameter and advances it only when the parameter has a gradient:
    // a parameter skipped at step 1 is bias-corrected with t = 1 at step 2, so it moves by ≈ lr.
    ad::Param<double> early = scalar_param({1.0}, "early"), late = scalar_param({1.0}, "late");
    ad::nn::Adam<double> adam({early, late}, {.lr = 0.1});
    HandAdam hand_early{.lr = 0.1, .w = 1.0}, hand_late{.lr = 0.1, .w = 1.0};
    set_gradient(early, {0.5});
    adam.step();
    hand_early.step(0.5);
    CHECK(late.value()(0) == 1.0);
    set_gradient(early, {0.5});
    set_gradient(late, {0.5});
    adam.step();
    hand_early.step(0.5);
    hand_late.step(0.5);
    CHECK(std::abs(early.value()(0) - hand_early.w) < 1e-14);
    CHECK(std::abs(late.value()(0) - hand_late.w) < 1e-14);
    CHECK(std::abs(late.value()(0) - 0.900000002) < 1e-14);  // 1 − 0.1·0.5/(0.5 + 1e-8)
}

// The fused attention path: which spellings it recognises, and that it gives the generic path's
// numbers (the oracle) for every bias shape, mask, dropout and odd size, in double and float.
#include <doctest/doctest.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include <autodiff/autodiff.hpp>

#include "fused_vs_generic.hpp"

namespace ad = autodiff;

namespace {

using P = ad::Param<double>;
using test::fused_vs_generic;

P param(ad::Shape s, std::uint64_t seed, const char* name) { return P(ad::randn<double>(s, seed), name); }

}  // namespace

TEST_CASE("is_fused_v: the natural spellings of attention hit the fused path") {
    P q = param({2, 2, 4, 8}, 1, "q"), k = param({2, 2, 5, 8}, 2, "k"), v = param({2, 2, 5, 8}, 3, "v"),
      b = param({2, 4, 5}, 4, "b");
    const ad::DropoutDescriptor drop{0.1, 1, 0};
    static_assert(ad::is_fused_v<decltype(ad::matmul(ad::softmax(ad::matmul(q, ad::transpose(k))), v))>);
    static_assert(ad::is_fused_v<decltype(ad::matmul(ad::softmax(ad::matmul(q, ad::transpose(k)) * 0.5), v))>);
    static_assert(ad::is_fused_v<decltype(ad::matmul(ad::softmax(0.5 * ad::matmul(q, ad::transpose(k))), v))>);
    static_assert(ad::is_fused_v<decltype(ad::matmul(ad::softmax(ad::matmul(q, ad::transpose(k)) / 8.0), v))>);
    static_assert(ad::is_fused_v<decltype(ad::matmul(ad::softmax(ad::matmul(q * 0.5, ad::transpose(k))), v))>);
    static_assert(ad::is_fused_v<decltype(ad::matmul(ad::softmax(ad::matmul(q, ad::transpose(k)) * 0.5 + b), v))>);
    static_assert(ad::is_fused_v<decltype(ad::matmul(ad::softmax(b + ad::matmul(q, ad::transpose(k)) * 0.5), v))>);
    static_assert(ad::is_fused_v<decltype(ad::matmul(ad::softmax((ad::matmul(q, ad::transpose(k)) + b) * 0.5), v))>);
    static_assert(ad::is_fused_v<decltype(ad::matmul(ad::softmax(ad::add_bias(ad::matmul(q, ad::transpose(k)), b)), v))>);
    static_assert(ad::is_fused_v<decltype(ad::matmul(ad::dropout(ad::softmax(ad::matmul(q, ad::transpose(k)) * 0.5 + b, ad::causal), drop), v))>);
    CHECK(ad::is_fused_v<decltype(ad::matmul(ad::softmax(ad::matmul(q, ad::transpose(k))), v))>);
}

TEST_CASE("is_fused_v: variants outside the pattern use the generic path") {
    P q = param({2, 4, 8}, 1, "q"), k = param({2, 5, 8}, 2, "k"), v = param({2, 5, 8}, 3, "v");
    // gelu of the scores (no modifier form), a squared score, attention without the value product, kᵀ given
    // pre-transposed. (Score functions such as tanh soft-capping are fused: tests/test_modifiers.cpp.)
    static_assert(!ad::is_fused_v<decltype(ad::matmul(ad::softmax(ad::gelu(ad::matmul(q, ad::transpose(k)))), v))>);
    static_assert(!ad::is_fused_v<decltype(ad::matmul(ad::softmax(ad::matmul(q, ad::transpose(k)) * ad::matmul(q, ad::transpose(k))), v))>);
    static_assert(!ad::is_fused_v<decltype(ad::softmax(ad::matmul(q, ad::transpose(k))))>);
    P kt = param({2, 8, 5}, 4, "kt");
    static_assert(!ad::is_fused_v<decltype(ad::matmul(ad::softmax(ad::matmul(q, kt)), v))>);
    CHECK_FALSE(ad::is_fused_v<decltype(ad::matmul(q, ad::transpose(k)))>);
}

TEST_CASE("fused attention is one tape record; the generic path records every node") {
    P q = param({2, 4, 8}, 1, "q"), k = param({2, 5, 8}, 2, "k"), v = param({2, 5, 8}, 3, "v"), b = param({4, 5}, 4, "b");
    auto f = [&] { return ad::matmul(ad::softmax(ad::matmul(q, ad::transpose(k)) * 0.5 + b), v); };
    ad::Tape tape;
    ad::TapeGuard guard(tape);
    ad::Var<double> fused = f();
    CHECK(tape.size() == 1);
    ad::NoFusionGuard no_fusion;
    ad::Var<double> generic = f();
    CHECK(tape.size() == 1 + 5);  // matmul, scale, add, softmax, matmul
    CHECK(ad::max_abs_diff(fused.value(), generic.value()) < 1e-14);
}

TEST_CASE("fused vs generic: every bias shape, odd sizes (Lq=37, Lk=53, d=24, dv=16)") {
    const std::int64_t n = 2, h = 3, Lq = 37, Lk = 53, d = 24, dv = 16;
    P q = param({n, h, Lq, d}, 1, "q"), k = param({n, h, Lk, d}, 2, "k"), v = param({n, h, Lk, dv}, 3, "v");
    const std::vector<ad::Shape> bias_shapes{{n, h, Lq, Lk}, {h, Lq, Lk}, {Lq, Lk}, {n, 1, Lq, Lk}, {1, h, 1, Lk}, {Lk}, {Lq, 1}, {1}};
    for (const ad::Shape& bs : bias_shapes) {
        CAPTURE(bs);
        P b = param(bs, 4, "bias");
        auto f = [&] { return ad::matmul(ad::softmax(ad::matmul(q, ad::transpose(k)) / std::sqrt(double(d)) + b), v); };
        // Same arithmetic in another order: differences at rounding level of O(1) values.
        CHECK(fused_vs_generic<double>(f, {q, k, v, b}) < 1e-13);
        CHECK(b.grad().shape() == bs);
    }
}

TEST_CASE("fused vs generic: biases shared by few (batch, head) pairs split the query blocks (Lq = 150: 3 blocks)") {
    // Fewer than 4 groups of leading indices sharing a bias-gradient slice: the backward splits the
    // query blocks into chunks with partial dK, dV (and dB without a query dimension).
    const std::int64_t n = 1, h = 2, Lq = 150, Lk = 70, d = 8;
    P q = param({n, h, Lq, d}, 1, "q"), k = param({n, h, Lk, d}, 2, "k"), v = param({n, h, Lk, d}, 3, "v");
    for (const ad::Shape& bs : std::vector<ad::Shape>{{n, h, Lq, Lk}, {Lq, Lk}, {Lk}, {Lq, 1}, {1, h, 1, Lk}}) {
        CAPTURE(bs);
        P b = param(bs, 4, "bias");
        CHECK(fused_vs_generic<double>([&] { return ad::matmul(ad::softmax(ad::matmul(q, ad::transpose(k)) * 0.3 + b), v); }, {q, k, v, b}) < 1e-13);
        CHECK(fused_vs_generic<double>([&] { return ad::matmul(ad::softmax(ad::matmul(q, ad::transpose(k)) * 0.3 + b, ad::causal), v); }, {q, k, v, b}) < 1e-13);
    }
    P q2 = param({Lq, d}, 5, "q2"), k2 = param({Lk, d}, 6, "k2"), v2 = param({Lk, d}, 7, "v2");  // one leading index
    CHECK(fused_vs_generic<double>([&] { return ad::matmul(ad::softmax(ad::matmul(q2, ad::transpose(k2))), v2); }, {q2, k2, v2}) < 1e-13);
}

TEST_CASE("fused vs generic: masks, additive mask, dropout, bias scaled before or after") {
    const std::int64_t n = 2, h = 2, Lq = 19, Lk = 70;
    P q = param({n, h, Lq, 8}, 1, "q"), k = param({n, h, Lk, 8}, 2, "k"), v = param({n, h, Lk, 8}, 3, "v"),
      b = param({h, Lq, Lk}, 4, "b");
    ad::Tensor<bool> kp = ad::full<bool>({n, Lk}, true);
    for (std::int64_t j = 50; j < Lk; ++j) kp(1, j) = false;
    ad::Tensor<bool> keep = ad::full<bool>({Lq, Lk}, true);
    for (std::int64_t i = 0; i < Lq; ++i) keep(i, (3 * i) % Lk) = false;
    ad::Tensor<double> additive = ad::randn<double>({1, h, 1, Lk}, 7);
    const ad::DropoutDescriptor drop{0.3, 11, 5};
    SUBCASE("causal") { CHECK(fused_vs_generic<double>([&] { return ad::matmul(ad::softmax(ad::matmul(q, ad::transpose(k)) + b, ad::causal), v); }, {q, k, v, b}) < 1e-13); }
    SUBCASE("causal with a full (n,h,Lq,Lk) bias: skipped tiles of the bias gradient are zero") {
        P bf = param({n, h, Lq, Lk}, 9, "bias_full");
        CHECK(fused_vs_generic<double>([&] { return ad::matmul(ad::softmax(ad::matmul(q, ad::transpose(k)) + bf, ad::causal), v); }, {q, k, v, bf}) < 1e-13);
        CHECK(bf.grad()(1, 1, 3, 60) == 0.0);  // key 60 is after query 3
    }
    SUBCASE("key padding and keep mask") {
        CHECK(fused_vs_generic<double>([&] { return ad::matmul(ad::softmax(ad::matmul(q, ad::transpose(k)) + b, ad::key_padding_mask(kp) | ad::keep_mask(keep)), v); }, {q, k, v, b}) < 1e-13);
    }
    SUBCASE("additive mask") {
        CHECK(fused_vs_generic<double>([&] { return ad::matmul(ad::softmax(ad::matmul(q, ad::transpose(k)) + b, {}, additive), v); }, {q, k, v, b}) < 1e-13);
    }
    SUBCASE("dropout: the same entries are dropped on both paths") {
        CHECK(fused_vs_generic<double>([&] { return ad::matmul(ad::dropout(ad::softmax(ad::matmul(q, ad::transpose(k)) * 0.3 + b, ad::causal), drop), v); }, {q, k, v, b}) < 1e-13);
    }
    SUBCASE("bias added before the scaling is scaled too") {
        CHECK(fused_vs_generic<double>([&] { return ad::matmul(ad::softmax((ad::matmul(q, ad::transpose(k)) + b) * 0.3), v); }, {q, k, v, b}) < 1e-13);
    }
    SUBCASE("rank 3 (batch, L, d)") {
        P q3 = param({3, Lq, 8}, 5, "q3"), k3 = param({3, Lk, 8}, 6, "k3"), v3 = param({3, Lk, 5}, 7, "v3"), b3 = param({3, Lq, Lk}, 8, "b3");
        CHECK(fused_vs_generic<double>([&] { return ad::matmul(ad::softmax(ad::matmul(q3, ad::transpose(k3)) + b3, ad::causal), v3); }, {q3, k3, v3, b3}) < 1e-13);
    }
}

TEST_CASE("fused attention: sequences of length 1 and single rows") {
    for (const auto& sizes : std::vector<std::pair<std::int64_t, std::int64_t>>{{1, 1}, {1, 9}, {9, 1}, {65, 1}, {1, 130}}) {
        const std::int64_t Lq = sizes.first, Lk = sizes.second;  // not a structured binding: CAPTURE uses a lambda
        CAPTURE(Lq);
        CAPTURE(Lk);
        P q = param({2, Lq, 4}, 1, "q"), k = param({2, Lk, 4}, 2, "k"), v = param({2, Lk, 3}, 3, "v"), b = param({Lq, Lk}, 4, "b");
        CHECK(fused_vs_generic<double>([&] { return ad::matmul(ad::softmax(ad::matmul(q, ad::transpose(k)) + b), v); }, {q, k, v, b}) < 1e-13);
    }
}

TEST_CASE("fused attention: a fully masked row outputs 0 and passes no gradient (no NaN)") {
    P q = param({2, 2, 6, 4}, 1, "q"), k = param({2, 2, 6, 4}, 2, "k"), v = param({2, 2, 6, 4}, 3, "v"), b = param({6, 6}, 4, "b");
    ad::Tensor<bool> kp = ad::full<bool>({2, 6}, false);  // batch 0 keeps nothing
    for (std::int64_t j = 0; j < 6; ++j) kp(1, j) = j < 2;
    ad::Var<double> O = ad::matmul(ad::softmax(ad::matmul(q, ad::transpose(k)) + b, ad::key_padding_mask(kp)), v);
    O.backward(ad::ones<double>(O.shape()));
    for (std::int64_t h = 0; h < 2; ++h)
        for (std::int64_t i = 0; i < 6; ++i)
            for (std::int64_t c = 0; c < 4; ++c) {
                CHECK(O.value()(0, h, i, c) == 0.0);
                CHECK(q.grad()(0, h, i, c) == 0.0);
                CHECK(k.grad()(0, h, i, c) == 0.0);
            }
    CHECK(std::isfinite(b.grad().array().sum()));
    CHECK(b.grad().array().abs().sum() > 0);  // batch 1's rows still pass gradient to the bias
}

TEST_CASE("fused attention: gradcheck in double through the fused kernels") {
    P q = param({2, 2, 9, 6}, 1, "q"), k = param({2, 2, 11, 6}, 2, "k"), v = param({2, 2, 11, 5}, 3, "v"), b = param({2, 9, 11}, 4, "b");
    const ad::DropoutDescriptor drop{0.2, 3, 1};
    auto f = [&] { return ad::matmul(ad::dropout(ad::softmax(ad::matmul(q, ad::transpose(k)) * 0.4 + b, ad::causal), drop), v); };
    static_assert(ad::is_fused_v<decltype(f())>);
    const auto report = ad::gradcheck(f, {q, k, v, b});
    INFO(report.str());
    CHECK(report.passed);
    CHECK(report.max_rel_error() < 1e-6);
}

TEST_CASE("fused attention: float results agree with the double generic path") {
    const std::int64_t n = 2, h = 2, L = 100, d = 32;
    ad::Tensor<double> qd = ad::randn<double>({n, h, L, d}, 1), kd = ad::randn<double>({n, h, L, d}, 2),
                       vd = ad::randn<double>({n, h, L, d}, 3), bd = ad::randn<double>({h, L, L}, 4);
    ad::Param<float> q(test::to_float(qd)), k(test::to_float(kd)), v(test::to_float(vd)), b(test::to_float(bd));
    P q64(qd.clone()), k64(kd.clone()), v64(vd.clone()), b64(bd.clone());
    ad::Var<float> O = ad::matmul(ad::softmax(ad::matmul(q, ad::transpose(k)) * 0.2f + b, ad::causal), v);
    O.backward(ad::ones<float>(O.shape()));
    ad::NoFusionGuard generic;
    ad::Var<double> O64 = ad::matmul(ad::softmax(ad::matmul(q64, ad::transpose(k64)) * 0.2 + b64, ad::causal), v64);
    O64.backward(ad::ones<double>(O64.shape()));
    test::check_float_close_to_double(
        {{&O.value(), &O64.value()}, {&q.grad(), &q64.grad()}, {&k.grad(), &k64.grad()}, {&v.grad(), &v64.grad()}, {&b.grad(), &b64.grad()}});
}

TEST_CASE("fused attention: float K and V transposed 16 by 16 (d, dv multiples of 16) and key by key (the keys after the last 16)") {
    // Lk = 83: key blocks of 64 and 19 keys, groups of 16 keys at offsets 0..48 of the first block and
    // 0 of the second, then 3 keys one at a time; d = 48 and dv = 16 take 3 and 1 groups of columns.
    const std::int64_t n = 1, h = 2, Lq = 40, Lk = 83, d = 48, dv = 16;
    ad::Tensor<double> qd = ad::randn<double>({n, h, Lq, d}, 1), kd = ad::randn<double>({n, h, Lk, d}, 2),
                       vd = ad::randn<double>({n, h, Lk, dv}, 3);
    ad::Param<float> q(test::to_float(qd)), k(test::to_float(kd)), v(test::to_float(vd));
    P q64(qd.clone()), k64(kd.clone()), v64(vd.clone());
    ad::Var<float> O = ad::matmul(ad::softmax(ad::matmul(q, ad::transpose(k)) * 0.2f), v);
    O.backward(ad::ones<float>(O.shape()));
    ad::NoFusionGuard generic;
    ad::Var<double> O64 = ad::matmul(ad::softmax(ad::matmul(q64, ad::transpose(k64)) * 0.2), v64);
    O64.backward(ad::ones<double>(O64.shape()));
    test::check_float_close_to_double({{&O.value(), &O64.value()}, {&q.grad(), &q64.grad()}, {&k.grad(), &k64.grad()}, {&v.grad(), &v64.grad()}});
}

TEST_CASE("fused attention: bitwise identical results on 1 and 2 threads, for every bias shape") {
    const std::int64_t n = 2, h = 4, L = 130, d = 16;
    ad::Param<float> q(ad::randn<float>({n, h, L, d}, 1)), k(ad::randn<float>({n, h, L, d}, 2)), v(ad::randn<float>({n, h, L, d}, 3));
    for (const ad::Shape& bs : std::vector<ad::Shape>{{n, h, L, L}, {h, L, L}, {L, L}, {1, h, 1, L}, {L}}) {
        CAPTURE(bs);
        ad::Param<float> b(ad::randn<float>(bs, 4));
        auto run = [&](int threads) {
            ad::set_num_threads(threads);
            ad::zero_grad(q, k, v, b);
            ad::Var<float> O = ad::matmul(ad::dropout(ad::softmax(ad::matmul(q, ad::transpose(k)) * 0.25f + b, ad::causal), {0.1, 5, 2}), v);
            O.backward(ad::ones<float>(O.shape()));
            return std::vector{O.value().clone(), q.grad().clone(), k.grad().clone(), v.grad().clone(), b.grad().clone()};
        };
        const auto one = run(1), two = run(2);
        ad::set_num_threads(2);
        for (std::size_t i = 0; i < one.size(); ++i) CHECK(ad::max_abs_diff(one[i], two[i]) == 0.0f);
    }
}

TEST_CASE("kept scores: the backward that reads the forward's scores equals, bitwise, the one that recomputes them") {
    using T = float;
    const std::int64_t n = 2, h = 3, Lq = 70, Lk = 130, d = 24;  // several tiles, partial ones on both axes
    const ad::Tensor<T> q = ad::randn<T>({n, h, Lq, d}, 1), k = ad::randn<T>({n, h, Lk, d}, 2), v = ad::randn<T>({n, h, Lk, 16}, 3);
    const ad::Tensor<T> dO = ad::randn<T>({n, h, Lq, 16}, 5), none;
    ad::Tensor<bool> kp = ad::full<bool>({n, Lk}, true);
    for (std::int64_t j = 100; j < Lk; ++j) kp(1, j) = false;
    ad::Tensor<bool> keep = ad::full<bool>({Lq, Lk}, true);
    for (std::int64_t j = 0; j < Lk; ++j) keep(3, j) = false;  // a fully masked row
    struct Case {
        const char* name;
        ad::Mask mask;
        ad::DropoutDescriptor drop;
    };
    for (const Case& c : {Case{"no mask", {}, {}}, Case{"causal", ad::causal, {}},
                          Case{"key padding and keep", ad::key_padding_mask(kp) | ad::keep_mask(keep), {}},
                          Case{"causal and dropout", ad::causal, {0.2, 9, 4}}}) {
        for (const ad::Shape& bs : std::vector<ad::Shape>{{n, h, Lq, Lk}, {h, Lq, Lk}}) {
            const std::string name = c.name;
            CAPTURE(name);
            CAPTURE(bs);
            const ad::Tensor<T> b = ad::randn<T>(bs, 4);
            ad::AttentionOptions opt{0.3, 1.5, c.mask, c.drop};
            auto ref = ad::attention_forward(q, k, v, b, none, opt);
            CHECK_FALSE(ref.scores.defined());
            opt.keep_scores = true;
            auto kept = ad::attention_forward(q, k, v, b, none, opt);
            REQUIRE(kept.scores.defined());
            CHECK(kept.scores.shape() == ad::Shape{n, h, Lq, Lk});
            CHECK(ad::max_abs_diff(ref.O, kept.O) == 0.0f);
            CHECK(ad::max_abs_diff(ref.lse, kept.lse) == 0.0f);
            const bool row_masked = kept.scores(0, 1, 3, 2) == -std::numeric_limits<T>::infinity();
            CHECK(row_masked == c.mask.keep.defined());
            ad::Tensor<T> gr[4], gk[4];
            ad::attention_backward<T>(&gr[0], &gr[1], &gr[2], &gr[3], dO, q, k, v, b, none, ref, opt);
            ad::attention_backward<T>(&gk[0], &gk[1], &gk[2], &gk[3], dO, q, k, v, b, none, kept, opt);
            for (int i = 0; i < 4; ++i) CHECK(ad::max_abs_diff(gr[i], gk[i]) == 0.0f);
            // A full bias gradient takes over the scores' buffer; a broadcast one leaves the scores kept.
            CHECK(kept.scores.defined() == (bs.rank() == 3));
            if (kept.scores.defined()) {
                ad::Tensor<T> again;
                ad::attention_backward<T>(nullptr, nullptr, nullptr, &again, dO, q, k, v, b, none, kept, opt);
                CHECK(ad::max_abs_diff(again, gr[3]) == 0.0f);
            }
        }
    }
}

// A retained graph's second backward with the same seed adds the same gradients again: after it,
// each gradient is exactly twice what the first backward gave (x + x == 2x exactly).
static void check_second_backward_doubles(ad::Var<double>& O, const std::vector<P>& params) {
    const ad::Tensor<double> seed = ad::randn<double>(O.shape(), 8);
    O.backward(seed, true);
    std::vector<ad::Tensor<double>> once;
    for (const P& p : params) once.push_back(p.grad().clone());
    O.backward(seed);
    for (std::size_t i = 0; i < once.size(); ++i) {
        once[i].array() *= 2.0;
        CHECK(ad::max_abs_diff(once[i], params[i].grad()) == 0.0);
    }
}

TEST_CASE("kept scores: a second backward (retain_graph) recomputes the scores the first one consumed") {
    P q = param({2, 2, 67, 8}, 1, "q"), k = param({2, 2, 67, 8}, 2, "k"), v = param({2, 2, 67, 8}, 3, "v"),
      b = param({2, 2, 67, 67}, 4, "b");
    ad::Var<double> O = ad::matmul(ad::softmax(ad::matmul(q, ad::transpose(k)) * 0.3 + b, ad::causal), v);
    check_second_backward_doubles(O, {q, k, v, b});
}

TEST_CASE("stored dropout mask: the forward's bits are dropout_keeps's, and the backward that reads them equals, bitwise, the one that regenerates them") {
    using T = float;
    // Lk = 130: rows start inside a Philox block (element index (t·Lq + i)·Lk + j) and end in a partial word.
    const std::int64_t n = 2, h = 3, Lq = 70, Lk = 130, d = 16;
    const ad::Tensor<T> q = ad::randn<T>({n, h, Lq, d}, 1), k = ad::randn<T>({n, h, Lk, d}, 2), v = ad::randn<T>({n, h, Lk, 8}, 3);
    const ad::Tensor<T> dO = ad::randn<T>({n, h, Lq, 8}, 5), none, full_bias = ad::randn<T>({n, h, Lq, Lk}, 4);
    const ad::DropoutDescriptor drop{0.3, 9, 4};
    for (const bool causal : {false, true})
        for (const bool keep_scores : {false, true}) {
            CAPTURE(causal);
            CAPTURE(keep_scores);
            const ad::Tensor<T>& b = keep_scores ? full_bias : none;
            ad::AttentionOptions opt{0.3, 1.0, causal ? ad::causal : ad::Mask{}, drop, keep_scores};
            auto regenerated = ad::attention_forward(q, k, v, b, none, opt);
            CHECK_FALSE(regenerated.keep_bits.defined());
            opt.keep_dropout_mask = true;
            auto stored = ad::attention_forward(q, k, v, b, none, opt);
            REQUIRE(stored.keep_bits.defined());
            CHECK(stored.keep_bits.shape() == ad::Shape{n * h * Lq, 3});
            CHECK(ad::max_abs_diff(regenerated.O, stored.O) == 0.0f);
            CHECK(ad::max_abs_diff(regenerated.lse, stored.lse) == 0.0f);
            // Every tile the forward visits holds the mask of the generic dropout (all of them without causal).
            std::int64_t wrong = 0;
            for (std::int64_t row = 0; row < n * h * Lq; ++row)
                for (std::int64_t j = 0; j < (causal ? std::min(Lk, (row % Lq) / 64 * 64 + 64) : Lk); ++j)
                    wrong += ((stored.keep_bits(row, j / 64) >> (j % 64)) & 1) != ad::dropout_keeps(drop, static_cast<std::uint64_t>(row * Lk + j));
            CHECK(wrong == 0);
            ad::Tensor<T> gr[4], gs[4];
            ad::attention_backward<T>(&gr[0], &gr[1], &gr[2], keep_scores ? &gr[3] : nullptr, dO, q, k, v, b, none, regenerated, opt);
            ad::attention_backward<T>(&gs[0], &gs[1], &gs[2], keep_scores ? &gs[3] : nullptr, dO, q, k, v, b, none, stored, opt);
            for (int i = 0; i < (keep_scores ? 4 : 3); ++i) CHECK(ad::max_abs_diff(gr[i], gs[i]) == 0.0f);
            CHECK(stored.keep_bits.defined());  // not consumed: a second backward reads it again
        }
}

TEST_CASE("stored dropout mask: kept when a backward will run, dropout is on, and the bits are small or an L² buffer exists") {
    using T = float;
    ad::AttentionOptions opt{1.0, 1.0, {}, {0.1, 1, 2}};
    opt.keep_dropout_mask = true;
    // d = 16 in float: Q has 64 bytes per row, the bits ⌈Lk/64⌉·8: up to Lk = 512.
    CHECK(ad::attention_stores_dropout_mask<T>({2, 4, 9, 16}, {2, 4, 512, 16}, opt));
    CHECK_FALSE(ad::attention_stores_dropout_mask<T>({2, 4, 9, 16}, {2, 4, 513, 16}, opt));
    CHECK(ad::attention_stores_dropout_mask<double>({2, 4, 9, 16}, {2, 4, 1024, 16}, opt));
    opt.keep_scores = true;  // the scores' L² buffer exists anyway
    CHECK(ad::attention_stores_dropout_mask<T>({2, 4, 9, 16}, {2, 4, 16384, 16}, opt));
    ad::AttentionOptions off = opt;
    off.keep_dropout_mask = false;  // no backward
    CHECK_FALSE(ad::attention_stores_dropout_mask<T>({2, 4, 9, 16}, {2, 4, 64, 16}, off));
    off = opt;
    off.dropout.training = false;
    CHECK_FALSE(ad::attention_stores_dropout_mask<T>({2, 4, 9, 16}, {2, 4, 64, 16}, off));
    off = opt;
    off.dropout.rate = 0.0;
    CHECK_FALSE(ad::attention_stores_dropout_mask<T>({2, 4, 9, 16}, {2, 4, 64, 16}, off));
}

TEST_CASE("stored dropout mask: a second backward (retain_graph) reads it again and gives the same gradients") {
    P q = param({2, 2, 67, 8}, 1, "q"), k = param({2, 2, 67, 8}, 2, "k"), v = param({2, 2, 67, 8}, 3, "v"),
      b = param({2, 2, 67, 67}, 4, "b");
    const ad::DropoutDescriptor drop{0.25, 5, 6};
    for (const bool biased : {false, true}) {  // bits kept because they are small / because of the kept scores
        CAPTURE(biased);
        ad::zero_grad(q, k, v, b);
        ad::Var<double> O = biased ? ad::Var<double>(ad::matmul(ad::dropout(ad::softmax(ad::matmul(q, ad::transpose(k)) * 0.3 + b, ad::causal), drop), v))
                                   : ad::Var<double>(ad::matmul(ad::dropout(ad::softmax(ad::matmul(q, ad::transpose(k)) * 0.3, ad::causal), drop), v));
        check_second_backward_doubles(O, {q, k, v, b});
    }
}

TEST_CASE("stored dropout mask: the wrong shape is refused by the backward") {
    const ad::Tensor<double> q = ad::randn<double>({1, 5, 4}, 1), none;
    ad::AttentionOptions opt{1.0, 1.0, {}, {0.2, 3, 4}};
    opt.keep_dropout_mask = true;
    auto saved = ad::attention_forward(q, q, q, none, none, opt);
    REQUIRE(saved.keep_bits.shape() == ad::Shape{5, 1});
    saved.keep_bits = ad::Tensor<std::uint64_t>(ad::Shape{5, 2});
    ad::Tensor<double> dQ;
    CHECK_THROWS_WITH_AS(ad::attention_backward<double>(&dQ, nullptr, nullptr, nullptr, q, q, q, q, none, none, saved, opt),
                         doctest::Contains("saved dropout mask (5,2) must have the shape (5,1)"), ad::Error);
}

TEST_CASE("kept scores: the wrong shape is refused by the backward") {
    const ad::Tensor<double> q = ad::randn<double>({1, 5, 4}, 1), none;
    ad::AttentionOptions opt;
    opt.keep_scores = true;
    auto saved = ad::attention_forward(q, q, q, none, none, opt);
    saved.scores = ad::zeros<double>({1, 5, 6});
    ad::Tensor<double> dQ;
    CHECK_THROWS_WITH_AS(ad::attention_backward<double>(&dQ, nullptr, nullptr, nullptr, q, q, q, q, none, none, saved, opt),
                         doctest::Contains("saved scores (1,5,6) must have the scores' shape (1,5,5)"), ad::Error);
}

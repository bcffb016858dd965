// Score and mask functions written as expressions (expr/modifier.hpp): which spellings run fused, and
// that the fused kernels give the generic path's numbers (the oracle) for every variant, with biases,
// masks, dropout, odd sizes and fully masked rows; gradcheck through the fused path; determinism.
#include <doctest/doctest.h>

#include <cmath>
#include <functional>
#include <limits>
#include <tuple>
#include <vector>

#include <autodiff/autodiff.hpp>

#include "check_error.hpp"
#include "fused_vs_generic.hpp"

namespace ad = autodiff;

namespace {

using P = ad::Param<double>;
using test::fused_vs_generic;

P param(ad::Shape s, std::uint64_t seed, const char* name) { return P(ad::randn<double>(s, seed), name); }

// The variants of the issue, on one set of inputs (odd sizes: Lq = 37, Lk = 53, d = 24, dv = 16).
struct Inputs {
    static constexpr std::int64_t n = 2, h = 3, Lq = 37, Lk = 53, d = 24, dv = 16, R = 6;
    P q = param({n, h, Lq, d}, 1, "q"), k = param({n, h, Lk, d}, 2, "k"), v = param({n, h, Lk, dv}, 3, "v");
    P bias = param({n, h, Lq, Lk}, 4, "bias");
    P slopes = P(ad::from_vector<double>({h}, {0.5, 0.25, 0.125}), "slopes");
    P table = param({h, 2 * R + 1}, 5, "table");
    P gate = param({h}, 6, "gate");
    [[nodiscard]] auto scores() const { return ad::matmul(q, ad::transpose(k)) / std::sqrt(double(d)); }
};

}  // namespace

TEST_CASE("is_fused_v: score functions, biases inside or outside them, and mask functions are fused") {
    Inputs in;
    auto s = in.scores();
    const auto& b = in.bias;
    const ad::DropoutDescriptor drop{0.1, 1, 0};
    auto relative = ad::at(in.table, ad::h_idx, ad::clamp(ad::q_idx - ad::k_idx + Inputs::R, 0, 2 * Inputs::R));
    // soft-capping, the bias inside or outside the cap
    static_assert(ad::is_fused_v<decltype(ad::matmul(ad::softmax(ad::tanh(s / 5.0) * 5.0), in.v))>);
    static_assert(ad::is_fused_v<decltype(ad::matmul(ad::softmax(ad::tanh((s + b) / 5.0) * 5.0), in.v))>);
    static_assert(ad::is_fused_v<decltype(ad::matmul(ad::softmax(ad::tanh(s / 5.0) * 5.0 + b), in.v))>);
    static_assert(ad::is_fused_v<decltype(ad::matmul(ad::softmax(b + ad::tanh(s / 5.0) * 5.0), in.v))>);
    static_assert(ad::is_fused_v<decltype(ad::matmul(ad::softmax(ad::score_mod(s, ad::soft_cap(5.0)) + b), in.v))>);
    // ALiBi (fixed or trainable slopes), relative positions, a sigmoid gate
    static_assert(ad::is_fused_v<decltype(ad::matmul(ad::softmax(s + ad::alibi(in.slopes), ad::causal), in.v))>);
    static_assert(ad::is_fused_v<decltype(ad::matmul(ad::softmax(s + b + ad::alibi(in.slopes.value())), in.v))>);
    static_assert(ad::is_fused_v<decltype(ad::matmul(ad::softmax(s + relative), in.v))>);
    static_assert(ad::is_fused_v<decltype(ad::matmul(ad::softmax(s * ad::sigmoid(ad::at(in.gate, ad::h_idx))), in.v))>);
    // mask functions, alone and with everything else
    static_assert(ad::is_fused_v<decltype(ad::matmul(ad::softmax(s, ad::sliding_window(4)), in.v))>);
    static_assert(ad::is_fused_v<decltype(ad::matmul(ad::dropout(ad::softmax(ad::tanh(s / 5.0) * 5.0 + b, ad::causal_window(8) | ad::sliding_window(2), ad::causal), drop), in.v))>);
    // outside the grammar: gelu has no modifier form; two biases (inside and outside) are one too many
    static_assert(!ad::is_fused_v<decltype(ad::matmul(ad::softmax(ad::gelu(s)), in.v))>);
    static_assert(!ad::is_fused_v<decltype(ad::matmul(ad::softmax(ad::tanh(s + b) + b), in.v))>);
    CHECK(ad::is_fused_v<decltype(ad::matmul(ad::softmax(s + relative), in.v))>);
}

TEST_CASE("outside the grammar: the generic path runs, with the same numbers as under NoFusionGuard") {
    Inputs in;
    P b2 = param({Inputs::Lq, Inputs::Lk}, 9, "b2");
    auto f = [&] { return ad::matmul(ad::softmax(ad::tanh(in.scores() + in.bias) + b2), in.v); };  // two biases
    static_assert(!ad::is_fused_v<decltype(f())>);
    ad::Tape tape;
    ad::TapeGuard guard(tape);
    ad::Var<double> O = f();
    CHECK(tape.size() > 1);  // node by node
    CHECK(fused_vs_generic<double>(f, {in.q, in.k, in.v, in.bias, b2}) == 0.0);
}

TEST_CASE("a modified fused attention is one tape record") {
    Inputs in;
    ad::Tape tape;
    ad::TapeGuard guard(tape);
    ad::Var<double> O = ad::matmul(ad::softmax(in.scores() + ad::alibi(in.slopes) + in.bias, ad::causal_window(5)), in.v);
    CHECK(tape.size() == 1);  // the scale is folded into the kernel, the captured slopes are a Param leaf
}

TEST_CASE("fused vs generic: every variant, odd sizes (Lq=37, Lk=53, d=24, dv=16)") {
    Inputs in;
    auto s = [&] { return in.scores(); };
    auto relative = [&] { return ad::at(in.table, ad::h_idx, ad::clamp(ad::q_idx - ad::k_idx + Inputs::R, 0, 2 * Inputs::R)); };
    const ad::DropoutDescriptor drop{0.2, 7, 3};
    // Same arithmetic in another order (and the SIMD tanh/sigmoid vs Eigen's, both within a few ulp):
    // differences at rounding level of O(1) values.
    constexpr double tol = 1e-13;
    std::vector<P> all{in.q, in.k, in.v, in.bias, in.slopes, in.table, in.gate};
    SUBCASE("soft-capping, bias inside the cap") {
        CHECK(fused_vs_generic<double>([&] { return ad::matmul(ad::softmax(ad::tanh((s() + in.bias) / 3.0) * 3.0), in.v); }, all) < tol);
    }
    SUBCASE("soft-capping, bias outside the cap") {
        CHECK(fused_vs_generic<double>([&] { return ad::matmul(ad::softmax(ad::tanh(s() / 3.0) * 3.0 + in.bias), in.v); }, all) < tol);
        CHECK(fused_vs_generic<double>([&] { return ad::matmul(ad::softmax(ad::score_mod(s(), ad::soft_cap(3.0)) + in.bias), in.v); }, all) < tol);
    }
    SUBCASE("ALiBi: fixed slopes with causal, trainable slopes with a bias") {
        const ad::Tensor<double> fixed = in.slopes.value().clone();
        CHECK(fused_vs_generic<double>([&] { return ad::matmul(ad::softmax(s() + ad::alibi(fixed), ad::causal), in.v); }, all) < tol);
        CHECK(fused_vs_generic<double>([&] { return ad::matmul(ad::softmax(s() + in.bias + ad::alibi(in.slopes)), in.v); }, all) < tol);
        CHECK(in.slopes.grad().array().abs().maxCoeff() > 0);
    }
    SUBCASE("trainable relative-position table") {
        CHECK(fused_vs_generic<double>([&] { return ad::matmul(ad::softmax(s() + relative()), in.v); }, all) < tol);
        CHECK(in.table.grad().array().abs().maxCoeff() > 0);
    }
    SUBCASE("sigmoid-gated scores with a trainable gate per head") {
        CHECK(fused_vs_generic<double>([&] { return ad::matmul(ad::softmax(s() * ad::sigmoid(ad::at(in.gate, ad::h_idx)) + in.bias), in.v); }, all) < tol);
        CHECK(in.gate.grad().array().abs().maxCoeff() > 0);
    }
    SUBCASE("every op of the grammar in one score function") {
        auto f = ad::relu(ad::score + 1.0) - ad::abs(ad::score) * 0.5 + ad::exp(ad::score * 0.1) + ad::log(ad::sigmoid(ad::score) + 1.0) +
                 ad::pow(ad::sigmoid(ad::score), 2) - ad::min(ad::score, 0.5) / ad::max(ad::score * ad::score, 1.0) - (-ad::score);
        CHECK(fused_vs_generic<double>([&] { return ad::matmul(ad::softmax(ad::score_mod(s(), f), ad::causal), in.v); }, all) < tol);
    }
    SUBCASE("sliding window, causal window, with bias and dropout") {
        CHECK(fused_vs_generic<double>([&] { return ad::matmul(ad::softmax(s() + in.bias, ad::sliding_window(5)), in.v); }, all) < tol);
        CHECK(fused_vs_generic<double>([&] { return ad::matmul(ad::dropout(ad::softmax(s() + in.bias, ad::causal_window(8)), drop), in.v); }, all) < tol);
    }
    SUBCASE("a mask function combined with a score function, causal, key padding and dropout") {
        ad::Tensor<bool> kp = ad::full<bool>({Inputs::n, Inputs::Lk}, true);
        for (std::int64_t j = 40; j < Inputs::Lk; ++j) kp(1, j) = false;
        auto f = [&] {
            return ad::matmul(ad::dropout(ad::softmax(ad::tanh(s() / 3.0) * 3.0 + in.bias, ad::sliding_window(20) & !(ad::q_idx == ad::k_idx + 1),
                                                      ad::causal | ad::key_padding_mask(kp)),
                                          drop),
                              in.v);
        };
        CHECK(fused_vs_generic<double>(f, all) < tol);
    }
    SUBCASE("a mask function and a broadcast keep mask: kept where both keep") {
        ad::Tensor<bool> keep_k = ad::full<bool>({Inputs::Lk}, true), keep_qk = ad::full<bool>({Inputs::Lq, Inputs::Lk}, true);
        for (std::int64_t j = 0; j < Inputs::Lk; j += 3) keep_k(j) = false;
        for (std::int64_t i = 0; i < Inputs::Lq; ++i) keep_qk(i, (5 * i) % Inputs::Lk) = false;
        for (const ad::Tensor<bool>& keep : {keep_k, keep_qk}) {
            CAPTURE(keep.shape());
            CHECK(fused_vs_generic<double>([&] { return ad::matmul(ad::softmax(s() + in.bias, ad::sliding_window(7), ad::keep_mask(keep)), in.v); }, all) < tol);
        }
    }
    SUBCASE("fully masked rows give 0 and no gradient on both paths") {
        auto f = [&] { return ad::matmul(ad::softmax(ad::tanh(s()) + in.bias, ad::q_idx - ad::k_idx > 20), in.v); };
        CHECK(fused_vs_generic<double>(f, all) < tol);
        ad::Var<double> O = f();
        for (std::int64_t i = 0; i <= 20; ++i) CHECK(O.value()(1, 2, i, 3) == 0.0);
        CHECK(O.value()(1, 2, 21, 3) != 0.0);
    }
    SUBCASE("biases of every broadcast shape, inside and outside a score function") {
        for (const ad::Shape& bs : std::vector<ad::Shape>{{Inputs::h, Inputs::Lq, Inputs::Lk}, {Inputs::Lq, Inputs::Lk}, {Inputs::n, 1, Inputs::Lq, Inputs::Lk}, {1, Inputs::h, 1, Inputs::Lk}, {Inputs::Lk}, {Inputs::Lq, 1}}) {
            CAPTURE(bs);
            P b = param(bs, 8, "b");
            std::vector<P> ps{in.q, in.k, in.v, b, in.table};
            CHECK(fused_vs_generic<double>([&] { return ad::matmul(ad::softmax(ad::tanh((s() + b) / 2.0) * 2.0 + relative(), ad::causal), in.v); }, ps) < tol);
            CHECK(fused_vs_generic<double>([&] { return ad::matmul(ad::softmax(ad::tanh(s() / 2.0) * 2.0 + b, ad::sliding_window(9)), in.v); }, ps) < tol);
            CHECK(b.grad().shape() == bs);
        }
    }
}

TEST_CASE("fused vs generic: document masks and prefix-LM from tensors of ids (Lq = Lk = 150, three query blocks)") {
    const std::int64_t n = 2, h = 2, L = 150, d = 16;
    P q = param({n, h, L, d}, 1, "q"), k = param({n, h, L, d}, 2, "k"), v = param({n, h, L, d}, 3, "v"), b = param({h, L, L}, 4, "b");
    ad::Tensor<double> seg({n, L});
    for (std::int64_t i = 0; i < L; ++i) seg(0, i) = double(i / 40), seg(1, i) = double(i < 100 ? 0 : i < 110 ? 1 : 2);
    const ad::Tensor<double> prefix = ad::from_vector<double>({n}, {30.0, 90.0});
    auto s = [&] { return ad::matmul(q, ad::transpose(k)) * 0.25; };
    CHECK(fused_vs_generic<double>([&] { return ad::matmul(ad::softmax(s() + b, ad::same_segment(seg)), v); }, {q, k, v, b}) < 1e-13);
    CHECK(fused_vs_generic<double>([&] { return ad::matmul(ad::softmax(s() + b, ad::same_segment(seg) & ad::causal_fn()), v); }, {q, k, v, b}) < 1e-13);
    CHECK(fused_vs_generic<double>([&] { return ad::matmul(ad::softmax(s(), ad::prefix_lm(prefix)), v); }, {q, k, v, b}) < 1e-13);
}

TEST_CASE("partial tiles are computed in bands of 16 rows over the keys they keep: window boundaries at every offset") {
    // Lq = 150: query blocks of 64, 64 and 22 rows (bands of 16 and a last one of 6); Lk = 137: key blocks of 64,
    // 64 and 9 keys. The windows' edges fall at every offset within a band and a block of 16 keys; a full
    // trainable bias checks that every element of dB outside the computed parts is written 0.
    const std::int64_t n = 1, h = 2, Lq = 150, Lk = 137, d = 8;
    P q = param({n, h, Lq, d}, 1, "q"), k = param({n, h, Lk, d}, 2, "k"), v = param({n, h, Lk, d}, 3, "v");
    P b = param({n, h, Lq, Lk}, 4, "b");
    auto s = [&] { return ad::matmul(q, ad::transpose(k)) * 0.3; };
    for (std::int64_t w = 1; w <= 70; ++w) {
        CAPTURE(w);
        CHECK(fused_vs_generic<double>([&] { return ad::matmul(ad::softmax(s() + b, ad::causal_window(w)), v); }, {q, k, v, b}) < 1e-13);
        CHECK(fused_vs_generic<double>([&] { return ad::matmul(ad::softmax(s(), ad::sliding_window(w)), v); }, {q, k, v}) < 1e-13);
    }
    SUBCASE("keys from an offset on: the band's key range starts inside a block of 16") {
        for (std::int64_t off = -20; off <= 20; off += 3) {
            CAPTURE(off);
            CHECK(fused_vs_generic<double>([&] { return ad::matmul(ad::softmax(s() + b, ad::k_idx - ad::q_idx >= off), v); }, {q, k, v, b}) < 1e-13);
        }
    }
    SUBCASE("dropout in bands: the keep bits of a band whose keys start inside a key block, stored by the forward") {
        const ad::DropoutDescriptor drop{0.3, 11, 5};
        ad::AttentionOptions opt;
        opt.dropout = drop;
        opt.keep_dropout_mask = true;
        REQUIRE(ad::attention_stores_dropout_mask<double>(q.value().shape(), k.value().shape(), opt));
        for (std::int64_t w : {1, 7, 16, 23, 40}) {
            CAPTURE(w);
            CHECK(fused_vs_generic<double>([&] { return ad::matmul(ad::dropout(ad::softmax(s() + b, ad::sliding_window(w)), drop), v); },
                                           {q, k, v, b}) < 1e-13);
            CHECK(fused_vs_generic<double>(
                      [&] { return ad::matmul(ad::dropout(ad::softmax(s(), ad::k_idx - ad::q_idx >= w - 30), drop), v); }, {q, k, v}) < 1e-13);
        }
    }
    SUBCASE("a band with an empty block of keys between kept ones") {
        auto ring = (ad::abs(ad::q_idx - ad::k_idx) >= 20) & (ad::abs(ad::q_idx - ad::k_idx) <= 45);
        CHECK(fused_vs_generic<double>([&] { return ad::matmul(ad::softmax(s() + b, ring), v); }, {q, k, v, b}) < 1e-13);
    }
    SUBCASE("a fully masked band is left out: its rows give 0 and no gradient") {
        auto f = [&] { return ad::matmul(ad::softmax(s() + b, (ad::q_idx < 80) | (ad::q_idx >= 96) | (ad::k_idx > 200)), v); };
        CHECK(fused_vs_generic<double>(f, {q, k, v, b}) < 1e-13);
        ad::Var<double> O = f();
        O.backward(ad::randn<double>(O.shape(), 5));
        for (std::int64_t i = 80; i < 96; ++i) {
            CHECK(O.value()(0, 1, i, 3) == 0.0);
            CHECK(b.grad()(0, 1, i, 7) == 0.0);
            CHECK(q.grad()(0, 1, i, 2) == 0.0);
        }
        CHECK(O.value()(0, 1, 79, 3) != 0.0);
        CHECK(O.value()(0, 1, 96, 3) != 0.0);
    }
}

TEST_CASE("gradcheck in double through the fused kernels with modifiers") {
    const std::int64_t n = 2, h = 2, Lq = 9, Lk = 11, R = 3;
    P q = param({n, h, Lq, 6}, 1, "q"), k = param({n, h, Lk, 6}, 2, "k"), v = param({n, h, Lk, 5}, 3, "v"), b = param({h, Lq, Lk}, 4, "b");
    P slopes = param({h}, 5, "slopes"), table = param({h, 2 * R + 1}, 6, "table"), gate = param({h}, 7, "gate");
    const ad::DropoutDescriptor drop{0.2, 3, 1};
    auto check = [](auto f, std::vector<P> params) {
        static_assert(ad::is_fused_v<decltype(f())>);
        const auto report = ad::gradcheck(f, params);
        INFO(report.str());
        CHECK(report.passed);
        CHECK(report.max_rel_error() < 1e-6);
    };
    auto s = [&] { return ad::matmul(q, ad::transpose(k)) * 0.4; };
    check([&] { return ad::matmul(ad::softmax(ad::tanh((s() + b) / 2.0) * 2.0), v); }, {q, k, v, b});
    check([&] { return ad::matmul(ad::dropout(ad::softmax(ad::tanh(s() / 2.0) * 2.0 + b, ad::causal), drop), v); }, {q, k, v, b});
    check([&] { return ad::matmul(ad::softmax(s() + ad::alibi(slopes), ad::causal), v); }, {q, k, v, slopes});
    check([&] { return ad::matmul(ad::softmax(s() + ad::at(table, ad::h_idx, ad::clamp(ad::q_idx - ad::k_idx + R, 0, 2 * R)) + b), v); },
          {q, k, v, table, b});
    check([&] { return ad::matmul(ad::softmax(s() * ad::sigmoid(ad::at(gate, ad::h_idx)), ad::sliding_window(3)), v); }, {q, k, v, gate});
    check([&] { return ad::matmul(ad::softmax(s() * ad::sigmoid(ad::at(gate, ad::h_idx)) + b, ad::causal), v); }, {q, k, v, gate, b});
    // Several bands of 16 rows, each over part of a key block.
    P q2 = param({1, 1, 40, 3}, 8, "q2"), k2 = param({1, 1, 37, 3}, 9, "k2"), v2 = param({1, 1, 37, 2}, 10, "v2"), b2 = param({40, 37}, 11, "b2");
    check([&] { return ad::matmul(ad::softmax(ad::matmul(q2, ad::transpose(k2)) * 0.5 + b2, ad::causal_window(10)), v2); }, {q2, k2, v2, b2});
}

TEST_CASE("modified fused attention: bitwise identical on 1 and 2 threads, captured gradients included") {
    const std::int64_t n = 2, h = 4, L = 130, d = 16, R = 40;
    ad::Param<float> q(ad::randn<float>({n, h, L, d}, 1)), k(ad::randn<float>({n, h, L, d}, 2)), v(ad::randn<float>({n, h, L, d}, 3));
    ad::Param<float> table(ad::randn<float>({h, 2 * R + 1}, 4)), slopes(ad::randn<float>({h}, 5)), b(ad::randn<float>({L, L}, 6));
    auto run = [&](int threads) {
        ad::set_num_threads(threads);
        ad::zero_grad(q, k, v, table, slopes, b);
        auto rel = ad::at(table, ad::h_idx, ad::clamp(ad::q_idx - ad::k_idx + R, 0, 2 * R));
        ad::Var<float> O = ad::matmul(ad::dropout(ad::softmax(ad::tanh((ad::matmul(q, ad::transpose(k)) * 0.25f + b) / 4.0f) * 4.0f + rel +
                                                                  ad::alibi(slopes),
                                                              ad::causal_window(70)),
                                                  {0.1, 5, 2}),
                                      v);
        O.backward(ad::ones<float>(O.shape()));
        return std::vector{O.value().clone(), q.grad().clone(), k.grad().clone(), v.grad().clone(), table.grad().clone(), slopes.grad().clone(), b.grad().clone()};
    };
    const auto one = run(1), two = run(2);
    ad::set_num_threads(2);
    for (std::size_t i = 0; i < one.size(); ++i) CHECK(ad::max_abs_diff(one[i], two[i]) == 0.0f);
}

TEST_CASE("a trainable full bias with a score function: the kept x gives the recomputing backward's numbers") {
    // The first backward reads x from the bias gradient's buffer; a retain_graph second one recomputes it.
    Inputs in;
    auto f = [&] { return ad::matmul(ad::softmax(ad::tanh(in.scores() / 3.0) * 3.0 + in.bias, ad::sliding_window(10)), in.v); };
    ad::Var<double> O = f();
    const ad::Tensor<double> seed = ad::randn<double>(O.shape(), 9);
    O.backward(seed, true);
    const ad::Tensor<double> dq1 = in.q.grad().clone(), db1 = in.bias.grad().clone();
    ad::zero_grad(in.q, in.bias);
    O.backward(seed);
    CHECK(ad::max_abs_diff(in.q.grad(), dq1) == 0.0);
    CHECK(ad::max_abs_diff(in.bias.grad(), db1) == 0.0);
}

TEST_CASE("f's derivatives without the score (a relative table, ALiBi): the kept buffer holds S, same numbers as recomputing") {
    namespace m = ad::modifier;
    Inputs in;
    auto relative = [&] { return ad::at(in.table, ad::h_idx, ad::clamp(ad::q_idx - ad::k_idx + Inputs::R, 0, 2 * Inputs::R)); };
    static_assert(!m::BackpropReadsScore<decltype(ad::score + relative())>::value);
    static_assert(!m::BackpropReadsScore<decltype(ad::score * 0.5 + ad::alibi(in.slopes))>::value);
    static_assert(m::BackpropReadsScore<decltype(ad::score * ad::sigmoid(ad::at(in.gate, ad::h_idx)))>::value);
    static_assert(m::BackpropReadsScore<decltype(ad::tanh(ad::score) + relative())>::value);
    // Bias inside f, outside f, and with a window; the first backward reads the kept S, a retain_graph
    // second one recomputes the scores.
    auto inside = [&] { return ad::matmul(ad::softmax(in.scores() + in.bias + relative()), in.v); };
    auto outside = [&] { return ad::matmul(ad::softmax(ad::score_mod(in.scores(), ad::score * 0.5 + relative()) + in.bias), in.v); };
    auto window = [&] { return ad::matmul(ad::softmax(in.scores() + in.bias + ad::alibi(in.slopes), ad::sliding_window(12)), in.v); };
    std::vector<P> all{in.q, in.k, in.v, in.bias, in.slopes, in.table};
    auto check = [&](auto f) {
        CHECK(fused_vs_generic<double>(f, all) < 1e-13);
        for (P& p : all) p.zero_grad();
        ad::Var<double> O = f();
        const ad::Tensor<double> seed = ad::randn<double>(O.shape(), 9);
        O.backward(seed, true);
        std::vector<ad::Tensor<double>> first;
        for (P& p : all) first.push_back(p.grad().clone());
        for (P& p : all) p.zero_grad();
        O.backward(seed);
        for (std::size_t i = 0; i < all.size(); ++i) CHECK(ad::max_abs_diff(all[i].grad(), first[i]) == 0.0);
    };
    check(inside);
    check(outside);
    check(window);
    // Bitwise the same on 1 and 2 threads.
    auto run = [&](int threads) {
        ad::set_num_threads(threads);
        for (P& p : all) p.zero_grad();
        ad::Var<double> O = inside();
        O.backward(ad::randn<double>(O.shape(), 9));
        std::vector<ad::Tensor<double>> r{O.value().clone()};
        for (P& p : all) r.push_back(p.grad().clone());
        return r;
    };
    const auto one = run(1), two = run(2);
    ad::set_num_threads(2);
    for (std::size_t i = 0; i < one.size(); ++i) CHECK(ad::max_abs_diff(one[i], two[i]) == 0.0);
}

TEST_CASE("a gate fixed along a row (score times a(b, h, q)): its gradient from the rows of dQ, the kept buffer holds S") {
    namespace m = ad::modifier;
    Inputs in;
    auto gate = [&] { return ad::sigmoid(ad::at(in.gate, ad::h_idx)); };
    static_assert(m::RowScaled<decltype(ad::score * gate())>::value);
    static_assert(m::RowScaled<decltype(gate() * ad::score)>::value);
    static_assert(m::RowScaled<decltype(ad::score * ad::exp(ad::at(in.gate, ad::h_idx) * ad::q_idx))>::value);
    static_assert(!m::RowScaled<decltype(ad::score * 0.5)>::value);                          // no gradient: forward mode
    static_assert(!m::RowScaled<decltype(ad::score * ad::at(in.table, ad::h_idx, ad::k_idx))>::value);  // varies along the row
    static_assert(!m::RowScaled<decltype(ad::tanh(ad::score) * gate())>::value);
    static_assert(!m::RowScaled<decltype(ad::score * ad::score)>::value);
    P qrow = param({Inputs::n, Inputs::Lq}, 12, "qrow");  // a per-(b, q) factor
    const ad::Tensor<double> qc = in.q.value().clone();   // Q without a gradient: dQ's rows go to scratch
    const ad::DropoutDescriptor drop{0.2, 7, 3};
    auto s = [&] { return in.scores(); };
    std::vector<P> all{in.q, in.k, in.v, in.bias, in.gate, qrow};
    auto outside = [&] { return ad::matmul(ad::softmax(s() * gate() + in.bias), in.v); };
    auto flipped = [&] { return ad::matmul(ad::softmax(ad::score_mod(s(), gate() * ad::score) + in.bias, ad::causal), in.v); };
    auto per_row = [&] { return ad::matmul(ad::softmax(ad::score_mod(s(), ad::score * ad::sigmoid(ad::at(qrow, ad::b_idx, ad::q_idx)))), in.v); };
    auto no_dq = [&] { return ad::matmul(ad::softmax(ad::matmul(qc, ad::transpose(in.k)) * 0.2 * gate() + in.bias), in.v); };
    auto masked = [&] { return ad::matmul(ad::dropout(ad::softmax(s() * gate(), ad::sliding_window(9), ad::causal), drop), in.v); };
    auto inside = [&] { return ad::matmul(ad::softmax((s() + in.bias) * gate()), in.v); };  // x has a bias: x kept, reverse mode
    static_assert(ad::is_fused_v<decltype(outside())> && ad::is_fused_v<decltype(flipped())> && ad::is_fused_v<decltype(per_row())> &&
                  ad::is_fused_v<decltype(no_dq())> && ad::is_fused_v<decltype(masked())> && ad::is_fused_v<decltype(inside())>);
    for (auto f : std::vector<std::function<ad::Var<double>()>>{outside, flipped, per_row, no_dq, masked, inside}) {
        CHECK(fused_vs_generic<double>(f, all) < 1e-13);
        CHECK(in.gate.grad().array().abs().maxCoeff() + qrow.grad().array().abs().maxCoeff() > 0);
    }
    // The first backward reads S from the bias gradient's buffer; a retain_graph second one recomputes it.
    for (auto f : std::vector<std::function<ad::Var<double>()>>{outside, no_dq}) {
        for (P& p : all) p.zero_grad();
        ad::Var<double> O = f();
        const ad::Tensor<double> seed = ad::randn<double>(O.shape(), 9);
        O.backward(seed, true);
        std::vector<ad::Tensor<double>> first;
        for (P& p : all) first.push_back(p.grad().clone());
        for (P& p : all) p.zero_grad();
        O.backward(seed);
        for (std::size_t i = 0; i < all.size(); ++i) CHECK(ad::max_abs_diff(all[i].grad(), first[i]) == 0.0);
    }
    // Bitwise the same on 1 and 2 threads (130 rows: three query blocks).
    const std::int64_t n = 2, h = 4, L = 130, d = 16;
    ad::Param<float> q(ad::randn<float>({n, h, L, d}, 1)), k(ad::randn<float>({n, h, L, d}, 2)), v(ad::randn<float>({n, h, L, d}, 3));
    ad::Param<float> g(ad::randn<float>({h}, 4)), b(ad::randn<float>({n, h, L, L}, 5));
    auto run = [&](int threads) {
        ad::set_num_threads(threads);
        ad::zero_grad(q, k, v, g, b);
        ad::Var<float> O = ad::matmul(ad::softmax(ad::matmul(q, ad::transpose(k)) * 0.25f * ad::sigmoid(ad::at(g, ad::h_idx)) + b, ad::causal_window(70)), v);
        O.backward(ad::ones<float>(O.shape()));
        return std::vector{O.value().clone(), q.grad().clone(), k.grad().clone(), v.grad().clone(), g.grad().clone(), b.grad().clone()};
    };
    const auto one = run(1), two = run(2);
    ad::set_num_threads(2);
    for (std::size_t i = 0; i < one.size(); ++i) CHECK(ad::max_abs_diff(one[i], two[i]) == 0.0f);
}

TEST_CASE("soft-capping and other curves of the score: dS's factor from f's value, the kept buffer holds S") {
    namespace m = ad::modifier;
    Inputs in;
    static_assert(m::FromValue<decltype(ad::soft_cap(5.0))>::value);
    static_assert(m::FromValue<decltype(ad::tanh(ad::score) * 5.0)>::value);
    static_assert(m::FromValue<decltype(3.0 - ad::sigmoid(-(ad::score * 2.0 + 1.0)) / 0.5)>::value);
    static_assert(m::FromValue<decltype(ad::exp(ad::score * 0.1) + 2.0)>::value);
    static_assert(m::FromValue<decltype(ad::score * 0.5)>::value);
    static_assert(!m::FromValue<decltype(ad::tanh(ad::tanh(ad::score)))>::value);  // two curves: the inner value is not known
    static_assert(!m::FromValue<decltype(ad::relu(ad::score))>::value);
    static_assert(!m::FromValue<decltype(ad::score * ad::at(in.gate, ad::h_idx))>::value);
    static_assert(!m::FromValue<decltype(ad::tanh(ad::score) + ad::alibi(in.slopes))>::value);
    auto s = [&] { return in.scores(); };
    // An additive mask with −∞ entries (S − additive is NaN there), a mask function, causal, dropout.
    ad::Tensor<double> add = ad::randn<double>({1, Inputs::h, 1, Inputs::Lk}, 8);
    for (std::int64_t j = 0; j < Inputs::Lk; j += 5) add(0, 1, 0, j) = -std::numeric_limits<double>::infinity();
    const ad::DropoutDescriptor drop{0.2, 7, 3};
    std::vector<P> all{in.q, in.k, in.v, in.bias};
    auto outside = [&] { return ad::matmul(ad::softmax(ad::tanh(s() / 3.0) * 3.0 + in.bias, ad::sliding_window(9), ad::causal, add), in.v); };
    auto inside = [&] { return ad::matmul(ad::dropout(ad::softmax(ad::tanh((s() + in.bias) / 3.0) * 3.0, ad::causal_window(20)), drop), in.v); };
    auto curve = [&] { return ad::matmul(ad::softmax(ad::score_mod(s(), 3.0 - ad::sigmoid(-(ad::score * 2.0 + 1.0)) / 0.5) + in.bias), in.v); };
    auto exp_fn = [&] { return ad::matmul(ad::softmax(ad::score_mod(s() + in.bias, ad::exp(ad::score * 0.1) + 2.0), {}, add), in.v); };
    auto no_bias = [&] { return ad::matmul(ad::softmax(ad::tanh(s() / 3.0) * 3.0, ad::causal), in.v); };  // nothing kept: recomputed
    static_assert(ad::is_fused_v<decltype(outside())> && ad::is_fused_v<decltype(inside())> && ad::is_fused_v<decltype(curve())> &&
                  ad::is_fused_v<decltype(exp_fn())> && ad::is_fused_v<decltype(no_bias())>);
    for (auto f : std::vector<std::function<ad::Var<double>()>>{outside, inside, curve, exp_fn, no_bias}) {
        const double err = fused_vs_generic<double>(f, all);
        CHECK(err < 1e-13);
        CHECK(std::isfinite(in.q.grad().array().abs().maxCoeff()));
        CHECK(in.q.grad().array().abs().maxCoeff() > 0);
    }
    // The first backward reads S from the bias gradient's buffer; a retain_graph second one recomputes
    // S and takes ∂f/∂x from it the same way: the same bits.
    for (auto f : std::vector<std::function<ad::Var<double>()>>{outside, inside, curve}) {
        for (P& p : all) p.zero_grad();
        ad::Var<double> O = f();
        const ad::Tensor<double> seed = ad::randn<double>(O.shape(), 9);
        O.backward(seed, true);
        std::vector<ad::Tensor<double>> first;
        for (P& p : all) first.push_back(p.grad().clone());
        for (P& p : all) p.zero_grad();
        O.backward(seed);
        for (std::size_t i = 0; i < all.size(); ++i) CHECK(ad::max_abs_diff(all[i].grad(), first[i]) == 0.0);
    }
}

TEST_CASE("soft-capping with a full trainable bias outside the cap, over several tiles: f = S − B from the kept buffer") {
    // Lq = 130, Lk = 140: three query and three key blocks per head, so the backward walks down the
    // kept buffer tile after tile (prefetching the next tile's S and bias rows) and takes f = S − B
    // for ∂f/∂x in one pass over both. Query row 70 of head 1 sees no key (an additive −∞ row).
    const std::int64_t n = 2, h = 2, Lq = 130, Lk = 140, d = 16;
    auto make = [&](auto scalar, std::int64_t lq, std::int64_t lk, std::int64_t masked_row) {
        using T = decltype(scalar);
        ad::Param<T> q(ad::randn<T>({n, h, lq, d}, 1)), k(ad::randn<T>({n, h, lk, d}, 2)), v(ad::randn<T>({n, h, lk, d}, 3)),
            b(ad::randn<T>({n, h, lq, lk}, 4));
        ad::Tensor<T> add = ad::zeros<T>({1, h, lq, lk});
        for (std::int64_t j = 0; j < lk; ++j) add(0, 1, masked_row, j) = -std::numeric_limits<T>::infinity();
        return std::tuple{q, k, v, b, add};
    };
    const ad::DropoutDescriptor drop{0.2, 7, 3};
    SUBCASE("fused vs generic in double, with and without dropout and causal") {
        auto in = make(0.0, Lq, Lk, 70);
        auto &q = std::get<0>(in), &k = std::get<1>(in), &v = std::get<2>(in), &b = std::get<3>(in);
        const auto& add = std::get<4>(in);
        auto s = [&] { return ad::matmul(q, ad::transpose(k)) * 0.25; };
        auto capped = [&] { return ad::matmul(ad::softmax(ad::tanh(s() / 3.0) * 3.0 + b, {}, add), v); };
        auto dropped = [&] { return ad::matmul(ad::dropout(ad::softmax(ad::tanh(s() / 3.0) * 3.0 + b, ad::causal, add), drop), v); };
        static_assert(ad::is_fused_v<decltype(capped())> && ad::is_fused_v<decltype(dropped())>);
        for (auto f : std::vector<std::function<ad::Var<double>()>>{capped, dropped}) {
            CHECK(fused_vs_generic<double>(f, {q, k, v, b}) < 1e-13);
            CHECK(q.grad().array().isFinite().all());
            CHECK(b.grad().array().abs().maxCoeff() > 0);
        }
    }
    SUBCASE("bitwise identical on 1 and 2 threads (float)") {
        auto in = make(0.0f, Lq, Lk, 70);
        auto &q = std::get<0>(in), &k = std::get<1>(in), &v = std::get<2>(in), &b = std::get<3>(in);
        const auto& add = std::get<4>(in);
        auto run = [&](int threads) {
            ad::set_num_threads(threads);
            ad::zero_grad(q, k, v, b);
            ad::Var<float> O = ad::matmul(
                ad::dropout(ad::softmax(ad::tanh(ad::matmul(q, ad::transpose(k)) * 0.25f / 3.0f) * 3.0f + b, {}, add), {0.1, 5, 2}), v);
            O.backward(ad::ones<float>(O.shape()));
            return std::vector{O.value().clone(), q.grad().clone(), k.grad().clone(), v.grad().clone(), b.grad().clone()};
        };
        const auto one = run(1), two = run(2);
        ad::set_num_threads(2);
        for (std::size_t i = 0; i < one.size(); ++i) CHECK(ad::max_abs_diff(one[i], two[i]) == 0.0f);
    }
    SUBCASE("gradcheck in double: full bias, a fully masked row, dropout") {
        auto in = make(0.0, 9, 11, 4);
        auto &q = std::get<0>(in), &k = std::get<1>(in), &v = std::get<2>(in), &b = std::get<3>(in);
        const auto& add = std::get<4>(in);
        auto f = [&] {
            return ad::matmul(ad::dropout(ad::softmax(ad::tanh(ad::matmul(q, ad::transpose(k)) * 0.4 / 2.0) * 2.0 + b, {}, add), drop), v);
        };
        static_assert(ad::is_fused_v<decltype(f())>);
        const auto report = ad::gradcheck(f, std::vector<P>{q, k, v, b});
        INFO(report.str());
        CHECK(report.passed);
        CHECK(report.max_rel_error() < 1e-6);
    }
}

TEST_CASE("float fused modifiers agree with the double generic path") {
    const std::int64_t n = 2, h = 2, L = 100, d = 32;
    ad::Tensor<double> qd = ad::randn<double>({n, h, L, d}, 1), kd = ad::randn<double>({n, h, L, d}, 2),
                       vd = ad::randn<double>({n, h, L, d}, 3), bd = ad::randn<double>({h, L, L}, 4);
    ad::Param<float> q(test::to_float(qd)), k(test::to_float(kd)), v(test::to_float(vd)), b(test::to_float(bd));
    P q64(qd.clone()), k64(kd.clone()), v64(vd.clone()), b64(bd.clone());
    ad::Var<float> O = ad::matmul(ad::softmax(ad::tanh(ad::matmul(q, ad::transpose(k)) * 0.05f) * 4.0f + b, ad::sliding_window(30)), v);
    O.backward(ad::ones<float>(O.shape()));
    ad::NoFusionGuard generic;
    ad::Var<double> O64 = ad::matmul(ad::softmax(ad::tanh(ad::matmul(q64, ad::transpose(k64)) * 0.05) * 4.0 + b64, ad::sliding_window(30)), v64);
    O64.backward(ad::ones<double>(O64.shape()));
    test::check_float_close_to_double(
        {{&O.value(), &O64.value()}, {&q.grad(), &q64.grad()}, {&k.grad(), &k64.grad()}, {&v.grad(), &v64.grad()}, {&b.grad(), &b64.grad()}});
}

TEST_CASE("tiles of a mask: intervals and element tests classify every tile as its elements say") {
    const std::int64_t L = 300;
    ad::Tensor<double> seg({2, L});
    for (std::int64_t i = 0; i < L; ++i) seg(0, i) = double(i / 70), seg(1, i) = double(i % 3);
    ad::EvalContext ctx{nullptr};
    auto check_mask = [&](auto mask) {
        using M = decltype(mask);
        const ad::modifier::Modifier<double, ad::modifier::NoScoreFn, M> mod("test", {}, mask, true, ad::Shape{2, 3, L, L}, ctx);
        std::vector<bool> keep_storage;
        bool keep[64 * 64];
        for (std::int64_t b = 0; b < 2; ++b)
            for (std::int64_t i0 = 0; i0 < L; i0 += 64)
                for (std::int64_t j0 = 0; j0 < L; j0 += 64) {
                    const ad::ScoreTile tile{b, 1, i0, std::min<std::int64_t>(64, L - i0), j0, std::min<std::int64_t>(64, L - j0)};
                    mod.keep_mask(tile, keep, 64);
                    std::int64_t kept = 0;
                    for (std::int64_t r = 0; r < tile.rows; ++r)
                        for (std::int64_t c = 0; c < tile.cols; ++c) kept += keep[r * 64 + c];
                    const ad::TileKind expected = kept == 0 ? ad::TileKind::empty : kept == tile.rows * tile.cols ? ad::TileKind::full : ad::TileKind::partial;
                    CAPTURE(b);
                    CAPTURE(i0);
                    CAPTURE(j0);
                    CHECK(mod.classify(tile) == expected);
                }
    };
    check_mask(ad::causal_window(100));
    check_mask(ad::sliding_window(64));
    check_mask(ad::same_segment(seg));
    check_mask((!(ad::q_idx < ad::k_idx)) | (ad::k_idx == 3));
}

TEST_CASE("SIMD tanh and sigmoid of the modifiers: within a few ulp of the standard library") {
    auto sweep = [](auto zero) {
        using T = decltype(zero);
        using V = typename ad::detail::Simd<T, ad::detail::simd_bytes>::type;
        constexpr int W = ad::detail::Simd<T, ad::detail::simd_bytes>::lanes;
        double worst_tanh = 0, worst_sigmoid = 0;
        for (double x0 = -30; x0 < 30; x0 += 0.0137 * W) {
            V x;
            for (int l = 0; l < W; ++l) x[l] = static_cast<T>(x0 * std::pow(10.0, -(l % 6)) + 1e-3 * l);
            const V t = ad::modifier::vm::vtanh(x), s = ad::modifier::vm::vsigmoid(x);
            for (int l = 0; l < W; ++l) {
                const T rt = std::tanh(x[l]), rs = T(1) / (T(1) + std::exp(-x[l]));
                if (rt != 0) worst_tanh = std::max(worst_tanh, std::abs(double(t[l] - rt) / double(rt)));
                worst_sigmoid = std::max(worst_sigmoid, std::abs(double(s[l] - rs) / double(rs)));
            }
        }
        const double eps = std::numeric_limits<T>::epsilon();
        CHECK(worst_tanh < 4 * eps);
        CHECK(worst_sigmoid < 4 * eps);
        // tanh(±inf) = ±1, tanh(NaN) = NaN, tanh(0) = 0, a vector of W lanes at a time (W is 2 for double
        // in a portable SSE2 build: indexing a vector past its lanes is undefined).
        const T inf = std::numeric_limits<T>::infinity(), nan = std::numeric_limits<T>::quiet_NaN();
        const T special[4] = {inf, -inf, nan, T(0)}, expected[4] = {T(1), T(-1), nan, T(0)};
        for (int first = 0; first < 4; first += W) {
            V x{};
            for (int l = 0; l < W && first + l < 4; ++l) x[l] = special[first + l];
            const V t = ad::modifier::vm::vtanh(x);
            for (int l = 0; l < W && first + l < 4; ++l) {
                CAPTURE(special[first + l]);
                if (std::isnan(expected[first + l])) CHECK(std::isnan(t[l]));
                else CHECK(t[l] == expected[first + l]);
            }
        }
    };
    sweep(0.0f);
    sweep(0.0);
}

TEST_CASE("bad modifiers throw autodiff::Error naming the op and the shapes") {
    Inputs in;
    test::check_error([&] { (void)ad::at(in.table, ad::h_idx); }, "at", {"tensor (3,13) has rank 2 but 1 indices were given"});
    test::check_error([&] { (void)ad::soft_cap(0.0); }, "soft_cap", {"cap must be finite and positive, got 0"});
    // q − k + R ranges over [-46, 42] over these scores: outside the table's 13 columns unless clamped.
    auto unclamped = ad::at(in.table, ad::h_idx, ad::q_idx - ad::k_idx + Inputs::R);
    test::check_error([&] { ad::Var<double> O = ad::matmul(ad::softmax(in.scores() + unclamped), in.v); }, "attention",
                      {"index 1 of a captured tensor of shape (3,13) takes values in [-46, 42] over the scores (2,3,37,53), outside [0, 12]"});
    {
        ad::NoFusionGuard generic;
        test::check_error([&] { ad::Var<double> O = ad::matmul(ad::softmax(in.scores() + unclamped), in.v); }, "score_mod", {"outside [0, 12]"});
    }
    // A head index over scores with more heads than the tensor has entries.
    P few = param({2}, 9, "few");
    test::check_error([&] { ad::Var<double> O = ad::matmul(ad::softmax(in.scores() + ad::alibi(few)), in.v); }, "attention",
                      {"index 0 of a captured tensor of shape (2) takes values in [0, 2]"});
    test::check_error([&] { (void)ad::score_mod(in.slopes, ad::score * 2.0); }, "score_mod", {"scores must have rank 2 to 4, got (3)"});
    test::check_error([&] { (void)ad::sliding_window(-1); }, "sliding_window", {"width must be >= 0, got -1"});
    test::check_error([&] { (void)ad::causal_window(0); }, "causal_window", {"width must be >= 1 (the query's own key), got 0"});
    test::check_error([&] { ad::Var<double> y = ad::softmax(in.slopes * 2.0, ad::sliding_window(1)); }, "softmax",
                      {"scores must have rank 2 to 4, got (3)"});
}

namespace {

// Hand-written modifiers for the kernel layer's contract. The score part, f(x) = 2x (used where a derived
// modifier's modifies_scores() says so), and a mask function the derived one supplies.
struct TwiceScoresMasked : ad::AttentionModifier<double> {
    bool masks() const override { return true; }
    bool bias_inside() const override { return true; }
    void modify(const ad::ScoreTile& t, const double* x, std::int64_t ldx, double* s, std::int64_t lds) const override {
        for (std::int64_t r = 0; r < t.rows; ++r)
            for (std::int64_t c = 0; c < t.cols; ++c) s[r * lds + c] = 2 * x[r * ldx + c];
    }
    void modify_with_derivative(const ad::ScoreTile& t, const double* x, std::int64_t ldx, double* s, std::int64_t lds, double* d,
                                std::int64_t ldd) const override {
        modify(t, x, ldx, s, lds);
        for (std::int64_t r = 0; r < t.rows; ++r)
            for (std::int64_t c = 0; c < t.cols; ++c) d[r * ldd + c] = 2;
    }
    bool needs_reverse() const override { return false; }
    void modify_backward(const ad::ScoreTile& t, const double*, std::int64_t, double* g, std::int64_t ldg, double* const*) const override {
        for (std::int64_t r = 0; r < t.rows; ++r)
            for (std::int64_t c = 0; c < t.cols; ++c) g[r * ldg + c] *= 2;
    }
    const std::vector<ad::Shape>& gradient_shapes() const override { return shapes; }
    std::vector<ad::Shape> shapes;
};

// f(x) = 2x and a mask keeping k <= q + 3.
struct DoubleScores final : TwiceScoresMasked {
    bool modifies_scores() const override { return true; }
    ad::TileKind classify(const ad::ScoreTile& t) const override {
        if (t.j0 > t.i0 + t.rows - 1 + 3) return ad::TileKind::empty;
        if (t.j0 + t.cols - 1 <= t.i0 + 3) return ad::TileKind::full;
        return ad::TileKind::partial;
    }
    void apply_mask(const ad::ScoreTile& t, double* s, std::int64_t ld) const override {
        for (std::int64_t r = 0; r < t.rows; ++r)
            for (std::int64_t c = 0; c < t.cols; ++c)
                if (t.j0 + c > t.i0 + r + 3) s[r * ld + c] = -std::numeric_limits<double>::infinity();
    }
};

}  // namespace

TEST_CASE("kernel layer: attention_forward/backward with a hand-written AttentionModifier equal the same attention spelled with a scale and a keep mask") {
    const std::int64_t n = 1, h = 2, L = 150, d = 8;
    const ad::Tensor<double> q = ad::randn<double>({n, h, L, d}, 1), k = ad::randn<double>({n, h, L, d}, 2),
                             v = ad::randn<double>({n, h, L, d}, 3), b = ad::randn<double>({h, L, L}, 4), dO = ad::randn<double>({n, h, L, d}, 5);
    ad::Tensor<bool> keep({L, L});
    for (std::int64_t i = 0; i < L; ++i)
        for (std::int64_t j = 0; j < L; ++j) keep(i, j) = j <= i + 3;
    const DoubleScores mod;
    ad::AttentionOptions with_mod{0.3, 1.0, {}, {}, false};
    ad::AttentionOptions reference{0.6, 2.0, ad::keep_mask(keep), {}, false};  // 2·(0.3·QKᵀ + B)
    ad::AttentionSaved<double> a = ad::attention_forward(q, k, v, b, {}, with_mod, &mod);
    ad::AttentionSaved<double> r = ad::attention_forward(q, k, v, b, {}, reference);
    CHECK(ad::max_abs_diff(a.O, r.O) < 1e-13);
    ad::Tensor<double> dq1, dk1, dv1, db1, dq2, dk2, dv2, db2;
    std::vector<ad::Tensor<double>> captured;
    ad::attention_backward<double>(&dq1, &dk1, &dv1, &db1, dO, q, k, v, b, {}, a, with_mod, &mod, &captured);
    ad::attention_backward<double>(&dq2, &dk2, &dv2, &db2, dO, q, k, v, b, {}, r, reference);
    CHECK(captured.empty());
    CHECK(ad::max_abs_diff(dq1, dq2) < 1e-12);
    CHECK(ad::max_abs_diff(dk1, dk2) < 1e-12);
    CHECK(ad::max_abs_diff(dv1, dv2) < 1e-12);
    CHECK(ad::max_abs_diff(db1, db2) < 1e-12);
}


namespace {

// A hand-written window for the kernel layer: keeps q − w < k <= q for rows q >= dead (the rows above
// are fully masked), with f(x) = 2x or no score function.
struct WindowModifier final : TwiceScoresMasked {
    std::int64_t w = 1, dead = 0;
    bool doubles = false;
    WindowModifier(std::int64_t w_, std::int64_t dead_, bool doubles_) : w(w_), dead(dead_), doubles(doubles_) {}
    [[nodiscard]] bool keeps(std::int64_t q, std::int64_t k) const { return q >= dead && k <= q && k > q - w; }
    bool modifies_scores() const override { return doubles; }
    ad::TileKind classify(const ad::ScoreTile& t) const override {
        const std::int64_t q0 = std::max(t.i0, dead), q1 = t.i0 + t.rows - 1, k0 = t.j0, k1 = t.j0 + t.cols - 1;
        if (q0 > q1 || k0 > q1 || k1 <= q0 - w) return ad::TileKind::empty;
        if (t.i0 >= dead && k1 <= t.i0 && k0 > q1 - w) return ad::TileKind::full;
        return ad::TileKind::partial;
    }
    void apply_mask(const ad::ScoreTile& t, double* s, std::int64_t ld) const override {
        for (std::int64_t r = 0; r < t.rows; ++r)
            for (std::int64_t c = 0; c < t.cols; ++c)
                if (!keeps(t.i0 + r, t.j0 + c)) s[r * ld + c] = -std::numeric_limits<double>::infinity();
    }
};

}  // namespace

TEST_CASE("kept mask tiles: a window's forward keeps the scores of its tiles, the backward reads them: bitwise the recomputing backward") {
    // L = 389: 7 query blocks, the last of 5 rows; windows whose edges fall inside bands and blocks of 16
    // (and one too wide for its tiles to be kept: the index alone then);
    // rows above `dead` fully masked (their output and gradients 0); a broadcast bias (h, L, L) and x kept
    // for f = 2x. Against the same attention spelled with a scale and a keep mask.
    const std::int64_t n = 1, h = 2, L = 389, d = 32;
    const ad::Tensor<double> q = ad::randn<double>({n, h, L, d}, 1), k = ad::randn<double>({n, h, L, d}, 2),
                             v = ad::randn<double>({n, h, L, d}, 3), b = ad::randn<double>({h, L, L}, 4), dO = ad::randn<double>({n, h, L, d}, 5);
    for (const bool doubles : {false, true})
        for (const std::int64_t w : {1, 37, 100, 150, 255})
            for (const std::int64_t dead : {0, 77}) {
                CAPTURE(doubles);
                CAPTURE(w);
                CAPTURE(dead);
                const WindowModifier mod(w, dead, doubles);
                ad::Tensor<bool> keep({L, L});
                for (std::int64_t i = 0; i < L; ++i)
                    for (std::int64_t j = 0; j < L; ++j) keep(i, j) = mod.keeps(i, j);
                ad::AttentionOptions kept_opt, recompute;
                kept_opt.scale = recompute.scale = 0.3;
                kept_opt.keep_mask_tiles = true;
                ad::AttentionOptions reference;
                reference.scale = doubles ? 0.6 : 0.3;
                reference.bias_scale = doubles ? 2.0 : 1.0;
                reference.mask = ad::keep_mask(keep);
                auto grads = [&](ad::AttentionSaved<double>& saved, const ad::AttentionOptions& opt, const ad::AttentionModifier<double>* m) {
                    std::vector<ad::Tensor<double>> g(4), captured;
                    ad::attention_backward<double>(&g[0], &g[1], &g[2], &g[3], dO, q, k, v, b, {}, saved, opt, m, m ? &captured : nullptr);
                    g.push_back(saved.O);
                    return g;
                };
                std::vector<std::vector<ad::Tensor<double>>> runs;
                for (const int threads : {1, 2}) {
                    ad::set_num_threads(threads);
                    ad::AttentionSaved<double> a = ad::attention_forward(q, k, v, b, {}, kept_opt, &mod);
                    // w = 255 computes 25 tiles of 4096 per head, more than 8 times Q's 389·32 elements: none kept
                    // (with rows 0-76 masked, 23: kept)
                    CHECK(a.tile_scores.defined() == (w < 255 || dead > 0));
                    REQUIRE(a.tile_index.defined());
                    runs.push_back(grads(a, kept_opt, &mod));
                    runs.push_back(grads(a, kept_opt, &mod));  // a second backward (retain_graph) reads them again
                }
                ad::set_num_threads(2);
                ad::AttentionSaved<double> c = ad::attention_forward(q, k, v, b, {}, recompute, &mod);
                CHECK_FALSE(c.tile_scores.defined());
                const auto base = grads(c, recompute, &mod);
                for (const auto& run : runs)
                    for (std::size_t i = 0; i < base.size(); ++i) CHECK(ad::max_abs_diff(run[i], base[i]) == 0.0);
                ad::AttentionSaved<double> r = ad::attention_forward(q, k, v, b, {}, reference);
                const auto ref = grads(r, reference, nullptr);
                for (std::size_t i = 0; i < base.size(); ++i) CHECK(ad::max_abs_diff(base[i], ref[i]) < 1e-12);
                for (std::int64_t i = 0; i < dead; i += 19) {
                    CHECK(base[4](0, 1, i, 3) == 0.0);
                    CHECK(base[0](0, 1, i, 5) == 0.0);
                }
            }
}

TEST_CASE("kept mask tiles through the tape: long windows fused vs generic, odd lengths, and a saved index of another problem throws") {
    const std::int64_t n = 1, h = 2, L = 389, d = 32;
    P q = param({n, h, L, d}, 1, "q"), k = param({n, h, L, d}, 2, "k"), v = param({n, h, L, d}, 3, "v");
    auto s = [&] { return ad::matmul(q, ad::transpose(k)) * 0.2; };
    for (const std::int64_t w : {1, 17, 64, 100, 255}) {
        CAPTURE(w);
        CHECK(fused_vs_generic<double>([&] { return ad::matmul(ad::softmax(s(), ad::causal_window(w)), v); }, {q, k, v}) < 1e-13);
        CHECK(fused_vs_generic<double>([&] { return ad::matmul(ad::softmax(ad::tanh(s() / 3.0) * 3.0, ad::causal_window(w) & (ad::q_idx >= 50)), v); },
                                       {q, k, v}) < 1e-13);
    }
    // With dropout (its bits stored by the forward or regenerated) and a trainable bias shared over
    // the batch (not full: the tiles are kept, and dB is summed from them).
    P bh = param({h, L, L}, 4, "bh");
    for (const std::int64_t w : {23, 130}) {
        CAPTURE(w);
        CHECK(fused_vs_generic<double>(
                  [&] { return ad::matmul(ad::dropout(ad::softmax(s() + bh, ad::causal_window(w)), {0.2, 9, 3}), v); }, {q, k, v, bh}) < 1e-13);
    }
    const WindowModifier mod(40, 0, false);
    ad::AttentionOptions opt;
    opt.keep_mask_tiles = true;
    ad::AttentionSaved<double> saved = ad::attention_forward(q.value(), k.value(), v.value(), {}, {}, opt, &mod);
    REQUIRE(saved.tile_scores.defined());
    saved.tile_index = ad::Tensor<std::uint64_t>(ad::Shape{3, 7});
    ad::Tensor<double> dq;
    test::check_error([&] { ad::attention_backward<double>(&dq, nullptr, nullptr, nullptr, saved.O, q.value(), k.value(), v.value(), {}, {}, saved, opt, &mod); },
                      "attention_backward", {"saved tile index (3,7) must have the shape (14,7)"});
    // Kept tile scores of the wrong shape, or fewer than the index names.
    for (const ad::Shape& wrong : {ad::Shape{2, 100}, ad::Shape{1, 4096}}) {
        ad::AttentionSaved<double> bad = ad::attention_forward(q.value(), k.value(), v.value(), {}, {}, opt, &mod);
        bad.tile_scores = ad::Tensor<double>(wrong);
        const std::string message = wrong[1] == 100 ? "saved tile scores (2,100) must have the shape (tiles, 4096)"
                                                    : "saved tile index names tile 1 of 1 kept";
        test::check_error([&] { ad::attention_backward<double>(&dq, nullptr, nullptr, nullptr, bad.O, q.value(), k.value(), v.value(), {}, {}, bad, opt, &mod); },
                          "attention_backward", {message});
    }
}

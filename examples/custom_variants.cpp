// Attention variants written as plain expressions. None of them has a fused kernel: the generic path
// differentiates each node, and gradcheck confirms every gradient in double.
//   1. ALiBi:          softmax(QKᵀ/√d + m_h·(j − i), causal)·V   (a constant, per-head linear bias)
//   2. soft-capping:   softmax(c·tanh(QKᵀ/(√d·c)))·V           (Gemma 2's logit cap)
//   3. gated output:   sigmoid(X·W_gᵀ) ⊙ attention(X)          (a learnt gate on the output)
//
//   ./build/examples/custom_variants
#include <cmath>
#include <cstdlib>

#include <fmt/core.h>

#include <autodiff/autodiff.hpp>

namespace ad = autodiff;

namespace {

bool report(const char* name, const ad::GradcheckReport& r) {
    fmt::print("== {}: {}", name, r.str());
    return r.passed;
}

// ALiBi's bias: head h gets slope 2^(-8(h+1)/H), and key j is penalised by its distance to query i.
ad::Tensor<double> alibi_bias(std::int64_t heads, std::int64_t L) {
    ad::Tensor<double> b = ad::zeros<double>({heads, L, L});
    for (std::int64_t h = 0; h < heads; ++h) {
        const double slope = std::pow(2.0, -8.0 * static_cast<double>(h + 1) / static_cast<double>(heads));
        for (std::int64_t i = 0; i < L; ++i)
            for (std::int64_t j = 0; j < L; ++j) b(h, i, j) = slope * static_cast<double>(j - i);
    }
    return b;
}

}  // namespace

int main() {
    const std::int64_t n = 2, h = 4, L = 6, d = 8, E = h * d;
    ad::Param<double> Q(ad::randn<double>({n, h, L, d}, 1), "Q"), K(ad::randn<double>({n, h, L, d}, 2), "K"),
        V(ad::randn<double>({n, h, L, d}, 3), "V");
    const double scale = 1.0 / std::sqrt(static_cast<double>(d));
    bool ok = true;

    // 1. ALiBi: a constant bias (no gradient is computed for it) plus the causal mask.
    const ad::Const<double> alibi(alibi_bias(h, L));
    auto alibi_attention = [&] { return ad::matmul(ad::softmax(ad::matmul(Q, ad::transpose(K)) * scale + alibi, ad::causal), V); };
    ok &= report("ALiBi (constant per-head bias, causal)", ad::gradcheck(alibi_attention, {Q, K, V}));

    // 2. Soft-capping: logits squashed into (-cap, cap) by tanh before the softmax.
    const double cap = 2.0;
    auto capped_attention = [&] {
        return ad::matmul(ad::softmax(ad::tanh(ad::matmul(Q, ad::transpose(K)) * (scale / cap)) * cap), V);
    };
    ok &= report("tanh soft-capping of the logits", ad::gradcheck(capped_attention, {Q, K, V}));
    {
        ad::Var<double> O = capped_attention();
        ad::Var<double> S = ad::tanh(ad::matmul(Q, ad::transpose(K)) * (scale / cap)) * cap;
        fmt::print("   capped logits stay in ({}, {}): max |logit| = {:.4f}\n", -cap, cap, S.value().array().abs().maxCoeff());
    }

    // 3. Gated output: projections from one input X (X feeds Q, K, V and the gate: four branches).
    ad::Param<double> X(ad::randn<double>({n, L, E}, 4), "X");
    ad::Param<double> Wq(ad::randn<double>({E, E}, 5), "Wq"), Wk(ad::randn<double>({E, E}, 6), "Wk"),
        Wv(ad::randn<double>({E, E}, 7), "Wv"), Wg(ad::randn<double>({E, E}, 8), "Wg");
    for (ad::Param<double>* w : {&Wq, &Wk, &Wv, &Wg}) w->value().array() *= 1.0 / std::sqrt(static_cast<double>(E));
    auto gated_attention = [&] {
        auto q = ad::split_heads(ad::linear(X, Wq), h);
        auto k = ad::split_heads(ad::linear(X, Wk), h);
        auto v = ad::split_heads(ad::linear(X, Wv), h);
        auto attention = ad::merge_heads(ad::matmul(ad::softmax(ad::matmul(q, ad::transpose(k)) * scale), v));
        return ad::sigmoid(ad::linear(X, Wg)) * attention;
    };
    ok &= report("sigmoid-gated output (X feeds four branches)", ad::gradcheck(gated_attention, {X, Wq, Wk, Wv, Wg}));

    fmt::print("{}\n", ok ? "all variants passed gradcheck" : "SOME VARIANTS FAILED gradcheck");
    return ok ? 0 : 1;
}

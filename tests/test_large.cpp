// Large sizes (ctest label `large`, run by tools/test.sh and CI's GCC Release build, excluded from the
// sanitizer builds with `ctest -LE large`, see docs/NUMERICS.md): fused attention whose score index
// space passes 2³¹ within one head and 2³² over the heads, checked on sampled rows and keys against a
// double-precision reference computed for those rows and keys only.
//
// n = 1, h = 2, Lq = Lk = 46400 (n·h·Lq·Lk = 4.3·10⁹), d = 4, dv = 3, double, dropout 0.1: the dropout
// decision of element (t, i, j) is a function of its index (t·Lq + i)·Lk + j, which passes 2³¹ in the
// last rows of head 0 and 2³² in the last rows of head 1; a 32-bit index anywhere on that path would
// change those rows' masks. Memory: inputs, outputs and gradients, about 25 MB (no L×L buffer; 40 MB
// resident); time: one to two minutes on 2 cores (the forward and backward visit 4.3·10⁹ scores each).
#include <doctest/doctest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include <autodiff/autodiff.hpp>

namespace ad = autodiff;

TEST_CASE("large: fused attention with n·h·Lq·Lk > 2^32 and dropout matches a double reference on sampled rows and keys") {
    using T = double;
    const std::int64_t h = 2, L = 46400, d = 4, dv = 3;
    static_assert(46400LL * 46400 > (1LL << 31) && 2 * 46400LL * 46400 > (1LL << 32));
    const double scale = 0.7, rate = 0.1;
    const ad::Tensor<T> q = ad::randn<T>({1, h, L, d}, 1), k = ad::randn<T>({1, h, L, d}, 2), v = ad::randn<T>({1, h, L, dv}, 3),
                        dO = ad::randn<T>({1, h, L, dv}, 4);
    ad::AttentionOptions opt;
    opt.scale = scale;
    opt.dropout = {rate, 12345, 6};
    const auto start = std::chrono::steady_clock::now();
    ad::AttentionSaved<T> saved = ad::attention_forward<T>(q, k, v, {}, {}, opt);
    const auto forward_done = std::chrono::steady_clock::now();
    ad::Tensor<T> dq, dk, dv_;
    ad::attention_backward<T>(&dq, &dk, &dv_, nullptr, dO, q, k, v, {}, {}, saved, opt);
    const auto backward_done = std::chrono::steady_clock::now();
    MESSAGE("forward ", std::chrono::duration<double>(forward_done - start).count(), " s, backward ",
            std::chrono::duration<double>(backward_done - forward_done).count(), " s");

    // The reference, in double, by the definition (kernels/attention.hpp): S = scale·q_i·k_j,
    // P = softmax_j(S), keep(t, i, j) = dropout_keeps(desc, (t·Lq + i)·Lk + j), O = (keep ⊙ P / (1 − p))·V.
    const double inv_keep = 1 / (1 - rate);
    auto index = [&](std::int64_t t, std::int64_t i, std::int64_t j) { return static_cast<std::uint64_t>((t * L + i) * L + j); };
    auto score = [&](std::int64_t t, std::int64_t i, std::int64_t j) {
        double s = 0;
        for (std::int64_t c = 0; c < d; ++c) s += q(0, t, i, c) * k(0, t, j, c);
        return scale * s;
    };
    // Tolerance: sums of Lk terms and scores of magnitude |S| (their rounding is P's relative error),
    // 16 roundings each, relative to max(1, the largest reference value).
    const double eps = std::numeric_limits<T>::epsilon();
    const double max_s = scale * double(d) * q.array().abs().maxCoeff() * k.array().abs().maxCoeff();  // >= |S|
    const double tol = 16 * eps * (double(L) + max_s);
    auto check_close = [&](const char* what, std::int64_t t, std::int64_t row, const std::vector<double>& ref, auto&& got) {
        double worst = 0, scale_ref = 1;
        for (double r : ref) scale_ref = std::max(scale_ref, std::abs(r));
        for (std::size_t c = 0; c < ref.size(); ++c) worst = std::max(worst, std::abs(got(static_cast<std::int64_t>(c)) - ref[c]));
        INFO(std::string(what), " of head ", t, " row or key ", row, ": max |fused − reference| ", worst, " vs tolerance ", tol * scale_ref);
        CHECK(worst <= tol * scale_ref);
    };

    // Rows: the first, one in the middle, and the last ones, whose indices pass 2^31 (head 0) and 2^32 (head 1).
    std::int64_t rows_past_2_32 = 0;
    for (std::int64_t t = 0; t < h; ++t)
        for (std::int64_t i : {std::int64_t{0}, std::int64_t{20011}, L - 100, L - 2, L - 1}) {
            rows_past_2_32 += index(t, i, L - 1) >= (std::uint64_t{1} << 32);
            std::vector<double> s(static_cast<std::size_t>(L)), o(static_cast<std::size_t>(dv), 0.0), dp(static_cast<std::size_t>(L));
            double m = -std::numeric_limits<double>::infinity(), sum = 0;
            for (std::int64_t j = 0; j < L; ++j) m = std::max(m, s[static_cast<std::size_t>(j)] = score(t, i, j));
            for (std::int64_t j = 0; j < L; ++j) sum += std::exp(s[static_cast<std::size_t>(j)] - m);
            const double lse = m + std::log(sum);
            // O_i, and dq_i = scale·Σ_j P_ij (dP_ij − D_i) k_j with dP_ij = keep_ij/(1−p)·dO_i·v_j, D_i = dO_i·O_i.
            for (std::int64_t j = 0; j < L; ++j) {
                const double p = std::exp(s[static_cast<std::size_t>(j)] - lse);
                const double f = ad::dropout_keeps(opt.dropout, index(t, i, j)) ? inv_keep : 0.0;
                double dpj = 0;
                for (std::int64_t c = 0; c < dv; ++c) {
                    o[static_cast<std::size_t>(c)] += f * p * v(0, t, j, c);
                    dpj += dO(0, t, i, c) * v(0, t, j, c);
                }
                s[static_cast<std::size_t>(j)] = p;
                dp[static_cast<std::size_t>(j)] = f * dpj;
            }
            double D = 0;
            for (std::int64_t c = 0; c < dv; ++c) D += dO(0, t, i, c) * o[static_cast<std::size_t>(c)];
            std::vector<double> g(static_cast<std::size_t>(d), 0.0);
            for (std::int64_t j = 0; j < L; ++j)
                for (std::int64_t c = 0; c < d; ++c)
                    g[static_cast<std::size_t>(c)] += scale * s[static_cast<std::size_t>(j)] * (dp[static_cast<std::size_t>(j)] - D) * k(0, t, j, c);
            check_close("O", t, i, o, [&](std::int64_t c) { return saved.O(0, t, i, c); });
            check_close("lse", t, i, {lse}, [&](std::int64_t) { return saved.lse(0, t, i); });
            check_close("dq", t, i, g, [&](std::int64_t c) { return dq(0, t, i, c); });
        }
    CHECK(rows_past_2_32 >= 3);

    // Keys: dv_j = Σ_i keep_ij/(1−p)·P_ij·dO_i and dk_j = scale·Σ_i dS_ij·q_i, summed over every row, with
    // P_ij = e^(S_ij − lse_i) from the forward's lse and D_i from its O (both checked on the rows above).
    for (std::int64_t t = 0; t < h; ++t)
        for (std::int64_t j : {std::int64_t{0}, std::int64_t{31337}, L - 1}) {
            std::vector<double> gv(static_cast<std::size_t>(dv), 0.0), gk(static_cast<std::size_t>(d), 0.0);
            for (std::int64_t i = 0; i < L; ++i) {
                const double p = std::exp(score(t, i, j) - saved.lse(0, t, i));
                const double f = ad::dropout_keeps(opt.dropout, index(t, i, j)) ? inv_keep : 0.0;
                double dpj = 0, D = 0;
                for (std::int64_t c = 0; c < dv; ++c) {
                    gv[static_cast<std::size_t>(c)] += f * p * dO(0, t, i, c);
                    dpj += dO(0, t, i, c) * v(0, t, j, c);
                    D += dO(0, t, i, c) * saved.O(0, t, i, c);
                }
                for (std::int64_t c = 0; c < d; ++c) gk[static_cast<std::size_t>(c)] += scale * p * (f * dpj - D) * q(0, t, i, c);
            }
            check_close("dv", t, j, gv, [&](std::int64_t c) { return dv_(0, t, j, c); });
            check_close("dk", t, j, gk, [&](std::int64_t c) { return dk(0, t, j, c); });
        }
}

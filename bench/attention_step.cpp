// Biased attention, forward and forward+backward, timed: the C++ side of bench/attention_vs_torch.py.
//
//   bench_attention_step n h L d bias causal dropout reps [generic] [train-only] [paired]
//     bias: 0 none, 1 a trainable full (n, h, L, L) bias;  generic: evaluate node by node (no fusion);
//     train-only: skip the separately timed no-grad forward (for -DAUTODIFF_PROFILE_KERNELS=ON runs,
//     whose phase table then covers forward+backward steps only);
//     paired: each repetition also runs a forward+backward step with dropout 0 right before the one
//     with the given rate, so that both see the same load on a shared machine (what dropout costs)
// Prints one JSON object: median/min/max milliseconds of the forward and of forward+backward (with
// paired: also of the dropout-0 steps, and the median of the per-repetition ratios).
#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <optional>
#include <vector>


#include <fmt/core.h>

#include <autodiff/autodiff.hpp>

#include "peak_rss.hpp"

namespace ad = autodiff;


namespace {
struct Stats {
    double median, min, max;
};
Stats stats(std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return {v[v.size() / 2], v.front(), v.back()};
}
}  // namespace

int main(int argc, char** argv) {
    if (argc < 9) {
        fmt::print(stderr, "usage: {} n h L d bias causal dropout reps [generic] [train-only]\n", argv[0]);
        return 2;
    }
    const std::int64_t n = std::atoll(argv[1]), h = std::atoll(argv[2]), L = std::atoll(argv[3]), d = std::atoll(argv[4]);
    const bool with_bias = std::atoi(argv[5]) != 0, causal = std::atoi(argv[6]) != 0;
    const double rate = std::atof(argv[7]);
    const int reps = std::atoi(argv[8]);
    bool generic = false, train_only = false, paired = false;
    for (int i = 9; i < argc; ++i) {
        const std::string flag = argv[i];
        if (flag == "generic") generic = true;
        else if (flag == "train-only") train_only = true;
        else if (flag == "paired") paired = true;
        else {
            fmt::print(stderr, "unknown flag '{}' (expected generic, train-only or paired)\n", flag);
            return 2;
        }
    }

    ad::Param<float> Q(ad::randn<float>({n, h, L, d}, 1)), K(ad::randn<float>({n, h, L, d}, 2)), V(ad::randn<float>({n, h, L, d}, 3));
    ad::Param<float> B(with_bias ? ad::randn<float>({n, h, L, L}, 4) : ad::zeros<float>({1}));
    const ad::Tensor<float> dO = ad::randn<float>({n, h, L, d}, 5);
    const float scale = 1.0f / std::sqrt(static_cast<float>(d));
    const ad::Mask mask = causal ? ad::causal : ad::Mask{};
    std::uint64_t step = 0;
    auto forward = [&](double p) {
        const ad::DropoutDescriptor drop{p, 7, step++};
        if (with_bias) return ad::Var<float>(ad::matmul(ad::dropout(ad::softmax(ad::matmul(Q, ad::transpose(K)) * scale + B, mask), drop), V));
        return ad::Var<float>(ad::matmul(ad::dropout(ad::softmax(ad::matmul(Q, ad::transpose(K)) * scale, mask), drop), V));
    };
    std::optional<ad::NoFusionGuard> no_fusion;
    if (generic) no_fusion.emplace();
    std::vector<double> fwd, fwd_bwd, fwd_bwd_p0, ratio;
    for (int i = 0; i < reps + 2; ++i) {  // the first two warm the pool and the threads
        if (paired) {
            ad::zero_grad(Q, K, V, B);
            auto t0 = std::chrono::steady_clock::now();
            ad::Var<float> O = forward(0.0);
            O.backward(dO);
            if (i >= 2) fwd_bwd_p0.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
        }
        ad::zero_grad(Q, K, V, B);
        auto t0 = std::chrono::steady_clock::now();
        if (!train_only) {
            ad::NoGradGuard no_grad;
            ad::Var<float> O = forward(rate);
        }
        auto t1 = std::chrono::steady_clock::now();
        ad::Var<float> O = forward(rate);
        O.backward(dO);
        auto t2 = std::chrono::steady_clock::now();
        if (i >= 2) {
            fwd.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
            fwd_bwd.push_back(std::chrono::duration<double, std::milli>(t2 - t1).count());
            if (paired) ratio.push_back(fwd_bwd.back() / fwd_bwd_p0.back());
        }
    }
    const Stats f = stats(fwd), fb = stats(fwd_bwd);
    fmt::print("{{\"fwd_ms\": {:.4f}, \"fwd_min_ms\": {:.4f}, \"fwd_max_ms\": {:.4f}, \"fwd_bwd_ms\": {:.4f}, \"fwd_bwd_min_ms\": {:.4f}, "
               "\"fwd_bwd_max_ms\": {:.4f}, \"threads\": {}, \"rss_mib\": {:.1f}, \"pool_peak_mib\": {:.1f}}}\n",
               f.median, f.min, f.max, fb.median, fb.min, fb.max, ad::num_threads(), bench::peak_rss_mib(),
               static_cast<double>(ad::pool::stats().peak_bytes_in_use) / (1 << 20));
    if (paired) {
        const Stats p0 = stats(fwd_bwd_p0), r = stats(ratio);
        fmt::print("{{\"paired_fwd_bwd_p0_ms\": {:.4f}, \"paired_fwd_bwd_p0_min_ms\": {:.4f}, \"paired_ratio\": {:.4f}, "
                   "\"paired_ratio_min\": {:.4f}, \"paired_ratio_max\": {:.4f}}}\n",
                   p0.median, p0.min, r.median, r.min, r.max);
    }
    return 0;
}

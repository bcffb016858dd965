// One training step (forward + backward of every input and parameter, then an Adam step) of
// nn::MultiHeadAttention (self-attention) or of nn::TransformerEncoderLayer (post-norm, ReLU,
// batch_first, FF = 4E), timed: the C++ side of bench/mha_vs_torch.py.
//
//   bench_mha_step E H B L dropout reps [mha|encoder] [paired]   ->   one JSON object with per-step times in ms
//     paired: each repetition also runs a step of a second module with dropout 0 (same weights at the
//     start) right before the timed one, so that both see the same load on a shared machine; prints a
//     second JSON object with the dropout-0 steps and the median of the per-repetition ratios
#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <string>
#include <vector>


#include <fmt/core.h>
#include <fmt/format.h>

#include <autodiff/autodiff.hpp>

#include "peak_rss.hpp"

namespace ad = autodiff;


int main(int argc, char** argv) {
    if (argc < 7 || argc > 9) {
        fmt::print(stderr, "usage: {} E H B L dropout reps [mha|encoder] [paired]\n", argv[0]);
        return 2;
    }
    const std::int64_t E = std::atoll(argv[1]), H = std::atoll(argv[2]), B = std::atoll(argv[3]), L = std::atoll(argv[4]);
    const double dropout = std::atof(argv[5]);
    const int reps = std::atoi(argv[6]);

    const bool encoder = argc >= 8 && std::string(argv[7]) == "encoder";
    const bool paired = argc == 9 && std::string(argv[8]) == "paired";
    if (argc == 9 && !paired) {
        fmt::print(stderr, "unknown flag '{}': paired\n", argv[8]);
        return 2;
    }
    if (argc >= 8 && !encoder && std::string(argv[7]) != "mha") {
        fmt::print(stderr, "unknown module '{}': mha or encoder\n", argv[7]);
        return 2;
    }
    ad::nn::MultiHeadAttention<float> mha({.embed_dim = E, .num_heads = H, .dropout = dropout, .seed = 1});
    ad::nn::TransformerEncoderLayer<float> layer(
        {.d_model = E, .nhead = H, .dim_feedforward = 4 * E, .dropout = dropout, .batch_first = true, .seed = 1});
    ad::nn::MultiHeadAttention<float> mha0({.embed_dim = E, .num_heads = H, .dropout = 0.0, .seed = 1});
    ad::nn::TransformerEncoderLayer<float> layer0(
        {.d_model = E, .nhead = H, .dim_feedforward = 4 * E, .dropout = 0.0, .batch_first = true, .seed = 1});
    ad::Param<float> X(ad::randn<float>({B, L, E}, 2), "x");
    const ad::Tensor<float> dO = ad::randn<float>({B, L, E}, 3);
    std::vector<ad::Param<float>> params = encoder ? layer.parameters() : mha.parameters();
    std::vector<ad::Param<float>> params0 = encoder ? layer0.parameters() : mha0.parameters();
    ad::nn::Adam<float> adam(params, {.lr = 1e-4}), adam0(params0, {.lr = 1e-4});
    auto step = [&](bool no_dropout) {
        for (auto& p : no_dropout ? params0 : params) p.zero_grad();
        X.zero_grad();
        ad::Var<float> out = no_dropout ? (encoder ? layer0(X) : mha0(X, X, X)) : (encoder ? layer(X) : mha(X, X, X));
        out.backward(dO);
        (no_dropout ? adam0 : adam).step();
    };
    auto timed = [&](bool no_dropout) {
        const auto t0 = std::chrono::steady_clock::now();
        step(no_dropout);
        return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    };
    for (int i = 0; i < 3; ++i) {  // warm the pool, the arena and the thread pool
        if (paired) step(true);
        step(false);
    }
    std::vector<double> ms, ms0, ratio;
    for (int i = 0; i < reps; ++i) {
        if (paired) ms0.push_back(timed(true));
        ms.push_back(timed(false));
        if (paired) ratio.push_back(ms.back() / ms0.back());
    }
    std::sort(ms.begin(), ms.end());
    std::sort(ms0.begin(), ms0.end());
    std::sort(ratio.begin(), ratio.end());
    fmt::print("{{\"median_ms\": {:.4f}, \"min_ms\": {:.4f}, \"max_ms\": {:.4f}, \"threads\": {}, \"rss_mib\": {:.1f}, \"peak_pool_mib\": {:.1f}}}\n",
               ms[ms.size() / 2], ms.front(), ms.back(), ad::num_threads(), bench::peak_rss_mib(),
               static_cast<double>(ad::pool::stats().peak_bytes_in_use) / (1 << 20));
    if (paired)
        fmt::print("{{\"paired_p0_median_ms\": {:.4f}, \"paired_p0_min_ms\": {:.4f}, \"paired_ratio\": {:.4f}, \"paired_ratio_min\": {:.4f}, "
                   "\"paired_ratio_max\": {:.4f}}}\n",
                   ms0[ms0.size() / 2], ms0.front(), ratio[ratio.size() / 2], ratio.front(), ratio.back());
    return 0;
}

// One training step (forward + backward of every input and parameter, then an Adam step) of
// nn::MultiHeadAttention (self-attention) or of nn::TransformerEncoderLayer (post-norm, ReLU,
// batch_first, FF = 4E), timed: the C++ side of bench/mha_vs_torch.py.
//
//   bench_mha_step E H B L dropout reps [mha|encoder]   ->   one JSON object with per-step times in ms
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
    if (argc != 7 && argc != 8) {
        fmt::print(stderr, "usage: {} E H B L dropout reps [mha|encoder]\n", argv[0]);
        return 2;
    }
    const std::int64_t E = std::atoll(argv[1]), H = std::atoll(argv[2]), B = std::atoll(argv[3]), L = std::atoll(argv[4]);
    const double dropout = std::atof(argv[5]);
    const int reps = std::atoi(argv[6]);

    const bool encoder = argc == 8 && std::string(argv[7]) == "encoder";
    if (argc == 8 && !encoder && std::string(argv[7]) != "mha") {
        fmt::print(stderr, "unknown module '{}': mha or encoder\n", argv[7]);
        return 2;
    }
    ad::nn::MultiHeadAttention<float> mha({.embed_dim = E, .num_heads = H, .dropout = dropout, .seed = 1});
    ad::nn::TransformerEncoderLayer<float> layer(
        {.d_model = E, .nhead = H, .dim_feedforward = 4 * E, .dropout = dropout, .batch_first = true, .seed = 1});
    ad::Param<float> X(ad::randn<float>({B, L, E}, 2), "x");
    const ad::Tensor<float> dO = ad::randn<float>({B, L, E}, 3);
    std::vector<ad::Param<float>> params = encoder ? layer.parameters() : mha.parameters();
    ad::nn::Adam<float> adam(params, {.lr = 1e-4});
    auto step = [&] {
        for (auto& p : params) p.zero_grad();
        X.zero_grad();
        ad::Var<float> out = encoder ? layer(X) : mha(X, X, X);
        out.backward(dO);
        adam.step();
    };
    for (int i = 0; i < 3; ++i) step();  // warm the pool, the arena and the thread pool
    std::vector<double> ms;
    for (int i = 0; i < reps; ++i) {
        const auto t0 = std::chrono::steady_clock::now();
        step();
        ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
    }
    std::sort(ms.begin(), ms.end());
    fmt::print("{{\"median_ms\": {:.4f}, \"min_ms\": {:.4f}, \"max_ms\": {:.4f}, \"threads\": {}, \"rss_mib\": {:.1f}, \"peak_pool_mib\": {:.1f}}}\n",
               ms[ms.size() / 2], ms.front(), ms.back(), ad::num_threads(), bench::peak_rss_mib(),
               static_cast<double>(ad::pool::stats().peak_bytes_in_use) / (1 << 20));
    return 0;
}

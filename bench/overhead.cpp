// Per-call overhead: the blog post's biased attention, forward + backward, at tiny shapes where the
// engine's own bookkeeping (nodes, tape, pool) dominates the arithmetic; through the generic path
// (node by node, NoFusionGuard) and through the fused kernels.
// Also counts heap allocations per iteration (operator new is replaced in this program): in steady
// state the pool and the tape's arena must serve everything.
//
//   OMP_NUM_THREADS=1 ./build/bench/bench_overhead
#include <optional>

#include <benchmark/benchmark.h>

#include <autodiff/autodiff.hpp>

namespace ad = autodiff;

#include "alloc_counter.hpp"

static void biased_attention_fwd_bwd(benchmark::State& state, bool fused) {
    std::optional<ad::NoFusionGuard> generic;
    if (!fused) generic.emplace();
    const std::int64_t n = state.range(0), h = state.range(1), l = state.range(2), d = state.range(3);
    ad::Param<float> Q(ad::randn<float>({n, h, l, d}, 1)), K(ad::randn<float>({n, h, l, d}, 2)),
        V(ad::randn<float>({n, h, l, d}, 3)), B(ad::randn<float>({n, h, l, l}, 4));
    const ad::Tensor<float> dO = ad::randn<float>({n, h, l, d}, 5);
    const float scale = 1.0f / std::sqrt(static_cast<float>(d));
    auto step = [&] {
        ad::Var<float> O = ad::matmul(ad::softmax(ad::matmul(Q, ad::transpose(K)) * scale + B), V);
        O.backward(dO);
        benchmark::DoNotOptimize(Q.grad().data());
    };
    for (int i = 0; i < 10; ++i) step();  // warm the pool and the arena
    const std::uint64_t allocs_before = bench::heap_allocations();
    for (auto _ : state) step();
    state.counters["heap_allocs_per_iter"] =
        static_cast<double>(bench::heap_allocations() - allocs_before) / static_cast<double>(state.iterations());
}
static void BM_generic(benchmark::State& state) { biased_attention_fwd_bwd(state, false); }
static void BM_fused(benchmark::State& state) { biased_attention_fwd_bwd(state, true); }
BENCHMARK(BM_generic)->Args({2, 4, 8, 16})->Args({1, 1, 8, 16})->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_fused)->Args({2, 4, 8, 16})->Args({1, 1, 8, 16})->Unit(benchmark::kMicrosecond);

BENCHMARK_MAIN();

// layer_norm, rms_norm and bias_gelu, forward and forward+backward, timed, with the heap allocations
// per step (the pool and the tape's arena must serve everything in steady state):
//
//   bench_norm_step rows n reps        e.g. OMP_NUM_THREADS=2 ./build/bench/bench_norm_step 8192 1024 20
//
// x (rows, n) float, weight and bias (n) trainable Params. Prints one line per op: median milliseconds
// of the no-grad forward and of forward+backward, and the bytes moved per second by forward+backward
// (x, y read or written once each way, dy and dx: 5 passes over rows·n floats).
#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <string>
#include <vector>

#include <fmt/core.h>

#include <autodiff/autodiff.hpp>

#include "alloc_counter.hpp"

namespace ad = autodiff;

namespace {
template <class F>
double median_ms(int reps, F&& f) {
    std::vector<double> t;
    t.reserve(static_cast<std::size_t>(reps));  // no allocation inside the counted steps
    for (int i = 0; i < reps; ++i) {
        const auto t0 = std::chrono::steady_clock::now();
        f();
        t.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
    }
    std::sort(t.begin(), t.end());
    return t[t.size() / 2];
}
}  // namespace

int main(int argc, char** argv) {
    if (argc < 4) {
        fmt::print(stderr, "usage: {} rows n reps\n", argv[0]);
        return 2;
    }
    const std::int64_t rows = std::atoll(argv[1]), n = std::atoll(argv[2]);
    const int reps = std::atoi(argv[3]);
    ad::Param<float> x(ad::randn<float>({rows, n}, 1)), w(ad::randn<float>({n}, 2)), b(ad::randn<float>({n}, 3));
    const ad::Tensor<float> dy = ad::randn<float>({rows, n}, 4);
    const double bytes = 5.0 * static_cast<double>(rows * n) * sizeof(float);

    auto run = [&](const std::string& name, auto&& make) {
        auto forward = [&] {
            ad::NoGradGuard no_grad;
            ad::Var<float> y = make();
            (void)y;
        };
        auto step = [&] {
            ad::zero_grad(x, w, b);
            ad::Var<float> y = make();
            y.backward(dy);
        };
        for (int i = 0; i < 3; ++i) step();  // warm the pool and the arena
        const double fwd = median_ms(reps, forward);
        const std::uint64_t before = bench::heap_allocations();
        const double both = median_ms(reps, step);
        const double allocs = static_cast<double>(bench::heap_allocations() - before) / reps;
        fmt::print("{:<18} rows {} n {} threads {}: forward {:.3f} ms, forward+backward {:.3f} ms ({:.1f} GB/s), heap allocations per step {:.1f}\n",
                   name, rows, n, ad::num_threads(), fwd, both, bytes / both * 1e-6, allocs);
    };
    run("layer_norm", [&] { return ad::Var<float>(ad::layer_norm(x, {n}, w, b)); });
    run("rms_norm", [&] { return ad::Var<float>(ad::rms_norm(x, {n}, w, 1e-6)); });
    run("bias_gelu exact", [&] { return ad::Var<float>(ad::bias_gelu(x, b)); });
    run("bias_gelu tanh", [&] { return ad::Var<float>(ad::bias_gelu(x, b, ad::GeluApproximate::tanh)); });
    run("gelu(x + b)", [&] { return ad::Var<float>(ad::gelu(x + b)); });
    return 0;
}

// The GPU fused attention's timings (issue 12): bf16, n=2, h=8, d=64 and d=128, L = 1024 ... 8192, with a
// full trainable bias (forward, and forward + backward with dQ, dK, dV and dbias) and without bias under
// a causal mask, and (BENCH_CASES=docmask) a block-diagonal keep mask of 4 documents. Median of CUDA-event timings after warm-up; inputs random (never zeros). Prints one CSV
// line per configuration (bench/cuda/run.sh joins them with PyTorch's in one table; BENCH_DIMS and BENCH_CASES
// narrow a run, see main):
//   ours,<case>,<d>,<L>,<forward ms>,<forward+backward ms>,<peak device bytes>,<Q+K+V+dO+bias+dbias bytes>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

#include "autodiff/cuda/attention.hpp"

namespace ad = autodiff;

namespace {

void check(cudaError_t e, const char* what) {
    if (e != cudaSuccess) {
        std::fprintf(stderr, "%s: %s\n", what, cudaGetErrorString(e));
        std::exit(1);
    }
}

// Median milliseconds of `f` over `reps` runs, each timed with events, after `warmup` runs.
double median_ms(const std::function<void()>& f, int warmup, int reps) {
    for (int i = 0; i < warmup; ++i) f();
    ad::cuda_synchronize("bench warm-up");
    cudaEvent_t start, stop;
    check(cudaEventCreate(&start), "cudaEventCreate");
    check(cudaEventCreate(&stop), "cudaEventCreate");
    std::vector<double> ms;
    for (int i = 0; i < reps; ++i) {
        check(cudaEventRecord(start), "cudaEventRecord");
        f();
        check(cudaEventRecord(stop), "cudaEventRecord");
        check(cudaEventSynchronize(stop), "cudaEventSynchronize");
        float t = 0;
        check(cudaEventElapsedTime(&t, start, stop), "cudaEventElapsedTime");
        ms.push_back(t);
    }
    ad::cuda_synchronize("bench");
    cudaEventDestroy(start);
    cudaEventDestroy(stop);
    std::sort(ms.begin(), ms.end());
    return ms[ms.size() / 2];
}

// The documents case: no bias, a keep mask (L, L) (broadcast over n and h) of `documents` equal
// documents, block diagonal: query i sees key j iff both lie in the same document.
ad::DeviceTensor<bool> document_mask(std::int64_t L, std::int64_t documents) {
    ad::Tensor<bool> keep(ad::Shape{L, L});
    for (std::int64_t i = 0; i < L; ++i)
        for (std::int64_t j = 0; j < L; ++j) keep.data()[i * L + j] = i * documents / L == j * documents / L;
    return ad::to(keep, ad::cuda);
}

void run(std::int64_t L, std::int64_t d, bool with_bias, bool causal, std::int64_t documents = 0) {
    const std::int64_t n = 2, h = 8;
    const ad::Shape qs{n, h, L, d};
    auto Q = ad::to<ad::bf16>(ad::randn<float>(qs, 1), ad::cuda);
    auto K = ad::to<ad::bf16>(ad::randn<float>(qs, 2), ad::cuda);
    auto V = ad::to<ad::bf16>(ad::randn<float>(qs, 3), ad::cuda);
    auto dO = ad::to<ad::bf16>(ad::randn<float>(qs, 4), ad::cuda);
    ad::DeviceTensor<ad::bf16> bias;
    if (with_bias) bias = ad::to<ad::bf16>(ad::randn<float>(ad::Shape{n, h, L, L}, 5), ad::cuda);
    ad::DeviceAttentionOptions opt;
    opt.scale = 1.0 / std::sqrt(static_cast<double>(d));
    opt.causal = causal;
    if (documents > 0) opt.keep = document_mask(L, documents);
    const int reps = L >= 8192 ? 10 : 20;
    const double fwd = median_ms([&] { (void)ad::attention_forward(Q, K, V, bias, opt); }, 3, reps);
    ad::DeviceTensor<ad::bf16> dQ, dK, dV, dbias;
    auto step = [&] {
        auto saved = ad::attention_forward(Q, K, V, bias, opt);
        ad::attention_backward(&dQ, &dK, &dV, with_bias ? &dbias : nullptr, dO, Q, K, V, bias, saved, opt);
    };
    step();
    ad::cuda_synchronize("bench");
    // Peak over one step with the gradients of the last step released first (a training step's view).
    dQ = dK = dV = dbias = {};
    ad::device_pool::reset_stats();
    step();
    ad::cuda_synchronize("bench");
    const std::size_t peak = ad::device_pool::stats().peak_bytes_in_use;
    const double both = median_ms(step, 2, reps);
    const std::size_t base = 4 * Q.bytes() + (with_bias ? 2 * bias.bytes() : 0);
    std::printf("ours,%s,%lld,%lld,%.4f,%.4f,%zu,%zu\n", with_bias ? "bias" : documents > 0 ? "docmask" : (causal ? "causal" : "plain"), static_cast<long long>(d),
                static_cast<long long>(L), fwd, both, peak, base);
    std::fflush(stdout);
}

}  // namespace

int main(int argc, char** argv) {
    if (!ad::cuda_available()) {
        std::printf("SKIPPED: no CUDA device found\n");
        return 77;
    }
    std::fprintf(stderr, "device: %s\n", ad::cuda_device_name().c_str());
    std::vector<std::int64_t> lengths;
    for (int i = 1; i < argc; ++i) lengths.push_back(std::atoll(argv[i]));
    if (lengths.empty()) lengths = {1024, 2048, 4096, 8192};
    // BENCH_DIMS (e.g. "64") and BENCH_CASES ("bias", "causal", "docmask", comma-separated; default bias and causal) narrow a run.
    auto listed = [](const char* var, const char* item) {
        const char* v = std::getenv(var);
        if (!v || !*v) return true;
        const std::string list = std::string(",") + v + ",";
        return list.find(std::string(",") + item + ",") != std::string::npos;
    };
    for (const std::int64_t d : {64, 128}) {
        if (!listed("BENCH_DIMS", d == 64 ? "64" : "128")) continue;
        if (listed("BENCH_CASES", "bias"))
            for (std::int64_t L : lengths) run(L, d, true, false);
        if (listed("BENCH_CASES", "causal"))
            for (std::int64_t L : lengths) run(L, d, false, true);
        // Documents: a keep mask of 4 documents (block diagonal), no bias, not causal; only when asked for.
        if (std::getenv("BENCH_CASES") && listed("BENCH_CASES", "docmask"))
            for (std::int64_t L : lengths) run(L, d, false, false, 4);
    }
    return 0;
}

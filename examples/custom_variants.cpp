// Attention variants written as expressions, every one run by the fused flash kernels: the score
// function and the mask are compile-time expressions (expr/modifier.hpp, docs/MODIFIERS.md) whose
// forward and derivatives are generated into the kernels' tile loops.
//
//   plain            softmax(S + B)·V,  S = QKᵀ/√d, B a trainable (n, h, L, L) bias
//   softcap_inside   softmax(c·tanh((S + B)/c))·V                  (Gemma 2's logit cap, bias inside)
//   softcap_outside  softmax(c·tanh(S/c) + B)·V                    (bias outside the cap)
//   alibi            softmax(S + B + m_h·(k − q))·V                 (ALiBi with trainable slopes m)
//   relative         softmax(S + B + T[h, clamp(q − k + R, 0, 2R)])·V (trainable relative-position table)
//   gated            softmax(S·sigmoid(g_h) + B)·V                 (a trainable gate per head)
//   window           softmax(S + B, |q − k| <= 256)·V              (sliding window)
//   document         softmax(S + B, seg[b, q] == seg[b, k])·V      (document masking)
//   prefix_lm        softmax(S + B, k <= q or k < prefix[b])·V     (prefix-LM)
//   combined         dropout(softmax(c·tanh(S/c) + B + ALiBi, causal))·V
//   causal           softmax(S, causal)·V                          (no bias)
//   causal_window    softmax(S, q − 256 < k <= q)·V                (no bias)
//
// Without arguments: each variant's fused forward+backward time next to the generic path's (float,
// n=2, h=8, L=512, d=64), then gradcheck of each in double through the fused kernels.
//   ./build/examples/custom_variants
// As the C++ side of bench/variants_vs_torch.py: one variant, timed, printed as JSON.
//   ./build/examples/custom_variants --bench VARIANT n h L d reps [generic]
// Two variants in one process, one step of each in turn per round (both see the same machine state; the
// ratio per round and its median), printed as JSON:
//   ./build/examples/custom_variants --pair VARIANT_A VARIANT_B n h L d rounds
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <ctime>
#include <optional>
#include <string>
#include <vector>

#include <fmt/core.h>

#include <autodiff/autodiff.hpp>

namespace ad = autodiff;

namespace {

template <class T>
struct Inputs {
    std::int64_t n, h, L, d, R = 128, window = 256;
    ad::Param<T> Q, K, V, B, slopes, table, gate;
    ad::Tensor<T> seg, prefix;
    T scale, cap = 5;

    Inputs(std::int64_t n_, std::int64_t h_, std::int64_t L_, std::int64_t d_, bool bias)
        : n(n_), h(h_), L(L_), d(d_), Q(ad::randn<T>({n, h, L, d}, 1)), K(ad::randn<T>({n, h, L, d}, 2)), V(ad::randn<T>({n, h, L, d}, 3)),
          B(bias ? ad::randn<T>({n, h, L, L}, 4) : ad::zeros<T>({1})), slopes(ad::zeros<T>({h})), table(ad::randn<T>({h, 2 * R + 1}, 5)),
          gate(ad::randn<T>({h}, 6)), seg({n, L}), prefix(ad::full<T>({n}, static_cast<T>(L / 4))),
          scale(static_cast<T>(1.0 / std::sqrt(static_cast<double>(d)))) {
        for (std::int64_t i = 0; i < h; ++i)  // ALiBi's slopes 2^(-8(i+1)/h)
            slopes.value()(i) = static_cast<T>(std::pow(2.0, -8.0 * static_cast<double>(i + 1) / static_cast<double>(h)));
        for (std::int64_t b = 0; b < n; ++b)  // documents of L/4 keys in even batch entries, L/3 in odd ones
            for (std::int64_t i = 0; i < L; ++i) seg(b, i) = static_cast<T>(i / std::max<std::int64_t>(1, b % 2 ? L / 3 : L / 4));
    }
    [[nodiscard]] std::vector<ad::Param<T>> params() const { return {Q, K, V, B, slopes, table, gate}; }
};

// Calls visit(name, expression maker, seed dropout offset) for every variant; each maker's expression
// type is checked to be fused at compile time.
template <class T, class Visit>
void for_each_variant(Inputs<T>& in, Visit&& visit) {
    auto S = [&] { return ad::matmul(in.Q, ad::transpose(in.K)) * in.scale; };
    auto relative = [&] { return ad::at(in.table, ad::h_idx, ad::clamp(ad::q_idx - ad::k_idx + in.R, 0, 2 * in.R)); };
    const T c = in.cap;
    visit("plain", [&] { return ad::matmul(ad::softmax(S() + in.B), in.V); });
    visit("softcap_inside", [&] { return ad::matmul(ad::softmax(ad::tanh((S() + in.B) / c) * c), in.V); });
    visit("softcap_outside", [&] { return ad::matmul(ad::softmax(ad::tanh(S() / c) * c + in.B), in.V); });
    visit("alibi", [&] { return ad::matmul(ad::softmax(S() + in.B + ad::alibi(in.slopes)), in.V); });
    visit("relative", [&] { return ad::matmul(ad::softmax(S() + in.B + relative()), in.V); });
    visit("gated", [&] { return ad::matmul(ad::softmax(S() * ad::sigmoid(ad::at(in.gate, ad::h_idx)) + in.B), in.V); });
    visit("window", [&] { return ad::matmul(ad::softmax(S() + in.B, ad::sliding_window(in.window)), in.V); });
    visit("document", [&] { return ad::matmul(ad::softmax(S() + in.B, ad::same_segment(in.seg)), in.V); });
    visit("prefix_lm", [&] { return ad::matmul(ad::softmax(S() + in.B, ad::prefix_lm(in.prefix)), in.V); });
    visit("combined", [&] {
        return ad::matmul(ad::dropout(ad::softmax(ad::tanh(S() / c) * c + in.B + ad::alibi(in.slopes), ad::causal), {0.1, 7, 0}), in.V);
    });
    visit("causal", [&] { return ad::matmul(ad::softmax(S(), ad::causal), in.V); });
    visit("causal_window", [&] { return ad::matmul(ad::softmax(S(), ad::causal_window(in.window)), in.V); });
}

bool uses_bias(const std::string& name) { return name != "causal" && name != "causal_window"; }

struct Stats {
    double median, min, max, cpu_median = 0;
};
Stats stats(std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return {v[v.size() / 2], v.front(), v.back()};
}

// CPU time of the whole process (every thread), in ms: with OMP_WAIT_POLICY=passive idle threads
// sleep, so it counts the work done, not the time lost to other processes on a shared machine.
double cpu_ms() {
    timespec ts{};
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return static_cast<double>(ts.tv_sec) * 1e3 + static_cast<double>(ts.tv_nsec) * 1e-6;
}

// Forward+backward of make() timed `reps` times after one warm-up, fused or generic.
template <class T, class Make>
Stats time_step(Inputs<T>& in, Make&& make, int reps, bool generic) {
    std::optional<ad::NoFusionGuard> no_fusion;
    if (generic) no_fusion.emplace();
    const ad::Tensor<T> dO = ad::randn<T>({in.n, in.h, in.L, in.d}, 9);
    std::vector<double> ms, cpu;
    for (int i = 0; i < reps + 1; ++i) {
        for (ad::Param<T>& p : in.params()) p.zero_grad();
        const double c0 = cpu_ms();
        const auto t0 = std::chrono::steady_clock::now();
        ad::Var<T> O = make();
        O.backward(dO);
        const auto t1 = std::chrono::steady_clock::now();
        const double c1 = cpu_ms();
        if (i > 0) ms.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count()), cpu.push_back(c1 - c0);
    }
    Stats s = stats(ms);
    s.cpu_median = stats(cpu).median;
    return s;
}

int bench(int argc, char** argv) {
    if (argc < 8) {
        fmt::print(stderr, "usage: {} --bench VARIANT n h L d reps [generic]\n", argv[0]);
        return 2;
    }
    const std::string variant = argv[2];
    const std::int64_t n = std::atoll(argv[3]), h = std::atoll(argv[4]), L = std::atoll(argv[5]), d = std::atoll(argv[6]);
    const int reps = std::atoi(argv[7]);
    const bool generic = argc > 8 && std::string(argv[8]) == "generic";
    Inputs<float> in(n, h, L, d, uses_bias(variant));
    bool found = false;
    for_each_variant(in, [&](const char* name, auto make) {
        if (variant != name) return;
        found = true;
        const Stats s = time_step(in, make, reps, generic);
        fmt::print("{{\"fwd_bwd_ms\": {:.4f}, \"fwd_bwd_min_ms\": {:.4f}, \"fwd_bwd_max_ms\": {:.4f}, \"cpu_ms\": {:.4f}, \"threads\": {}, \"pool_peak_mib\": {:.1f}}}\n",
                   s.median, s.min, s.max, s.cpu_median, ad::num_threads(), static_cast<double>(ad::pool::stats().peak_bytes_in_use) / (1 << 20));
    });
    if (!found) fmt::print(stderr, "unknown variant '{}'\n", variant);
    return found ? 0 : 2;
}

int pair(int argc, char** argv) {
    if (argc < 9) {
        fmt::print(stderr, "usage: {} --pair VARIANT_A VARIANT_B n h L d rounds\n", argv[0]);
        return 2;
    }
    const std::string a = argv[2], b = argv[3];
    const std::int64_t n = std::atoll(argv[4]), h = std::atoll(argv[5]), L = std::atoll(argv[6]), d = std::atoll(argv[7]);
    const int rounds = std::atoi(argv[8]);
    if (rounds < 1) {
        fmt::print(stderr, "rounds must be at least 1, got {}\n", rounds);
        return 2;
    }
    Inputs<float> in(n, h, L, d, uses_bias(a) || uses_bias(b));
    bool found = false;
    for_each_variant(in, [&](const char* name_a, auto make_a) {
        if (a != name_a) return;
        for_each_variant(in, [&](const char* name_b, auto make_b) {
            if (b != name_b) return;
            found = true;
            std::vector<double> ms_a, ms_b, ratio;
            for (int r = 0; r < rounds; ++r) {  // time_step: a warm-up step, then the timed one
                ms_a.push_back(time_step(in, make_a, 1, false).median);
                ms_b.push_back(time_step(in, make_b, 1, false).median);
                ratio.push_back(ms_a.back() / ms_b.back());
            }
            const Stats sa = stats(ms_a), sb = stats(ms_b), sr = stats(ratio);
            fmt::print("{{\"a_ms\": {:.4f}, \"b_ms\": {:.4f}, \"a_over_b\": {:.4f}, \"a_over_b_min\": {:.4f}, \"a_over_b_max\": {:.4f}, "
                       "\"rounds\": {}, \"threads\": {}}}\n",
                       sa.median, sb.median, sr.median, sr.min, sr.max, rounds, ad::num_threads());
        });
    });
    if (!found) fmt::print(stderr, "unknown variant '{}' or '{}'\n", a, b);
    return found ? 0 : 2;
}

}  // namespace

int main(int argc, char** argv) {
    if (argc > 1 && std::string(argv[1]) == "--bench") return bench(argc, argv);
    if (argc > 1 && std::string(argv[1]) == "--pair") return pair(argc, argv);

    fmt::print("Every variant runs fused (is_fused_v is checked at compile time). Forward+backward, float, n=2, h=8, L=512, d=64,\n"
               "{} threads, median of 3 (ms):\n\n  {:<16} {:>9} {:>9} {:>8}\n",
               ad::num_threads(), "variant", "fused", "generic", "speed-up");
    {
        Inputs<float> in(2, 8, 512, 64, true);
        for_each_variant(in, [&](const char* name, auto make) {
            static_assert(ad::is_fused_v<decltype(make())>, "this variant should run fused");
            const double fused = time_step(in, make, 3, false).median, generic = time_step(in, make, 3, true).median;
            fmt::print("  {:<16} {:9.2f} {:9.2f} {:7.2f}x\n", name, fused, generic, generic / fused);
        });
    }

    fmt::print("\ngradcheck of every parameter through the fused kernels (double, n=2, h=2, L=12, d=6; small window,\n"
               "relative range, documents and prefix to match):\n");
    bool ok = true;
    Inputs<double> in(2, 2, 12, 6, true);
    in.R = 3, in.window = 4, in.cap = 2;
    in.prefix = ad::full<double>({2}, 3.0);
    in.table = ad::Param<double>(ad::randn<double>({2, 2 * in.R + 1}, 5));
    for_each_variant(in, [&](const char* name, auto make) {
        const ad::GradcheckReport r = ad::gradcheck(make, in.params());
        fmt::print("  {:<16} {}", name, r.str());
        ok = ok && r.passed;
    });
    fmt::print("{}\n", ok ? "all variants passed gradcheck" : "SOME VARIANTS FAILED gradcheck");
    return ok ? 0 : 1;
}

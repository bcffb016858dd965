// Thread safety (issue 10): independent graphs on several std::threads at once, on each thread's
// default tape or on explicit Tapes, all drawing from the one shared storage pool and reading shared
// constant tensors, give bitwise the results of the same work on one thread. (A Param is not shared
// between threads that differentiate at once: backward() writes its grad().) CI also runs this file
// under ThreadSanitizer (.ci/run).
#include <doctest/doctest.h>

#include <cstdint>
#include <optional>
#include <thread>
#include <vector>

#include <autodiff/autodiff.hpp>

namespace ad = autodiff;

namespace {

constexpr int n_threads = 4;
constexpr int steps = 3;

template <class T>
std::vector<T> flat(const ad::Tensor<T>& t) {
    return t.to_vector();
}

// What one worker computes: a few Adam steps of a biased attention (fused or generic) and of a
// MultiHeadAttention, from seeds that depend on the worker's index only. Returns every final
// parameter value, every last gradient and every loss, flattened.
struct Result {
    std::vector<std::vector<float>> tensors;
    std::vector<float> losses;
    bool operator==(const Result&) const = default;
};

Result work(int index, const ad::Tensor<float>& shared_target, bool fused, ad::Tape* explicit_tape) {
    std::optional<ad::TapeGuard> guard;
    if (explicit_tape) guard.emplace(*explicit_tape);
    std::optional<ad::NoFusionGuard> generic;
    if (!fused) generic.emplace();
    const auto seed = static_cast<std::uint64_t>(10 * index);
    ad::Param<float> q(ad::randn<float>({2, 2, 8, 4}, seed + 1)), k(ad::randn<float>({2, 2, 8, 4}, seed + 2)),
        v(ad::randn<float>({2, 2, 8, 4}, seed + 3)), bias(ad::randn<float>({2, 8, 8}, seed + 4));
    ad::nn::MultiHeadAttention<float> mha({.embed_dim = 8, .num_heads = 2, .dropout = 0.1, .seed = seed + 5});
    ad::Param<float> x(ad::randn<float>({2, 8, 8}, seed + 6));
    std::vector<ad::Param<float>> params{q, k, v, bias, x};
    for (const auto& p : mha.parameters()) params.push_back(p);
    ad::nn::Adam<float> adam(params, {.lr = 1e-2});
    Result r;
    for (int step = 0; step < steps; ++step) {
        adam.zero_grad();
        const ad::DropoutDescriptor drop{0.2, seed, static_cast<std::uint64_t>(step)};
        ad::Var<float> O = ad::matmul(ad::dropout(ad::softmax(ad::matmul(q, ad::transpose(k)) * 0.5f + bias, ad::causal), drop), v);
        ad::Var<float> loss1 = ad::mse(O, shared_target);
        loss1.backward();
        ad::Var<float> in = x;
        ad::Var<float> y = mha(in, in, in, ad::causal);
        ad::Var<float> loss2 = ad::mse(y, shared_target.reshaped({2, 8, 8}));
        loss2.backward();
        r.losses.push_back(loss1.item());
        r.losses.push_back(loss2.item());
        adam.step();
    }
    for (const auto& p : params) {
        r.tensors.push_back(flat(p.value()));
        r.tensors.push_back(flat(p.grad()));
    }
    return r;
}

// Runs work(i, ...) for every worker on one thread, then on n_threads threads at once, and checks
// that each worker's result is bitwise the same.
void check_threads(bool fused, bool explicit_tapes) {
    const ad::Tensor<float> target = ad::randn<float>({2, 2, 8, 4}, 99);  // read by every thread
    std::vector<Result> serial;
    for (int i = 0; i < n_threads; ++i) {
        ad::Tape tape;
        serial.push_back(work(i, target, fused, explicit_tapes ? &tape : nullptr));
    }
    std::vector<Result> parallel(n_threads);
    std::vector<std::thread> threads;
    for (int i = 0; i < n_threads; ++i)
        threads.emplace_back([&, i] {
            ad::Tape tape;
            parallel[static_cast<std::size_t>(i)] = work(i, target, fused, explicit_tapes ? &tape : nullptr);
        });
    for (auto& t : threads) t.join();
    for (int i = 0; i < n_threads; ++i) {
        CAPTURE(i);
        CHECK(parallel[static_cast<std::size_t>(i)] == serial[static_cast<std::size_t>(i)]);
    }
    // Workers with different seeds computed different things (the comparison is not vacuous).
    CHECK_FALSE(serial[0] == serial[1]);
}

}  // namespace

TEST_CASE("threads on their default tapes: fused attention and MultiHeadAttention training, bitwise as on one thread") {
    check_threads(true, false);
}

TEST_CASE("threads on explicit Tapes: bitwise as on one thread") { check_threads(true, true); }

TEST_CASE("threads on the generic path (node by node): bitwise as on one thread") { check_threads(false, false); }

TEST_CASE("a constant tensor saved by records on several threads is read, never written: every backward passes") {
    const ad::Tensor<double> w = ad::randn<double>({6, 6}, 1);  // saved by every thread's matmul
    std::vector<std::thread> threads;
    std::vector<int> ok(n_threads, 0);
    for (int i = 0; i < n_threads; ++i)
        threads.emplace_back([&, i] {
            ad::Param<double> x(ad::randn<double>({6, 6}, static_cast<std::uint64_t>(i)));
            for (int s = 0; s < 20; ++s) {
                ad::Var<double> loss = ad::sum(ad::exp(ad::matmul(x, w)) * ad::Const<double>(w));
                loss.backward();
            }
            ok[static_cast<std::size_t>(i)] = 1;
        });
    for (auto& t : threads) t.join();
    for (int i = 0; i < n_threads; ++i) CHECK(ok[static_cast<std::size_t>(i)] == 1);
}

TEST_CASE("the pool serves several threads at once: every block comes back") {
    const std::size_t before = ad::pool::stats().bytes_in_use;
    std::vector<std::thread> threads;
    std::vector<int> sums(n_threads, 0);
    for (int i = 0; i < n_threads; ++i)
        threads.emplace_back([&, i] {
            for (int s = 0; s < 200; ++s) {
                ad::Tensor<float> t = ad::full<float>({static_cast<std::int64_t>(1 + (s * 7 + i) % 300)}, 1.0f);
                const ad::Tensor<float> u = t.clone();
                sums[static_cast<std::size_t>(i)] += static_cast<int>(u.array().sum());
            }
        });
    for (auto& t : threads) t.join();
    for (int i = 0; i < n_threads; ++i) {
        int expected = 0;
        for (int s = 0; s < 200; ++s) expected += 1 + (s * 7 + i) % 300;
        CHECK(sums[static_cast<std::size_t>(i)] == expected);
    }
    CHECK(ad::pool::stats().bytes_in_use == before);
}

// Exception safety (issue 10): an allocation that fails anywhere in building, evaluating or
// differentiating an expression leaves the tape, the pool and every Param as they were. The pool's
// test hook (pool::fail_acquire_after) makes the n-th acquisition throw std::bad_alloc; the sweeps
// below move n over every acquisition of a forward + backward and check after each failure:
//   - a failed evaluation recorded nothing (the tape has the records of the Vars made before it);
//   - a failed backward left every Param's grad() bitwise as it was, kept the graph, and a retry
//     without the failure gives the reference gradients bitwise;
//   - once everything is destroyed, the pool holds the bytes it held before (no leaked block);
//   - a module's state (MultiHeadAttention's dropout offset) advances only on success.
#include <doctest/doctest.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <new>
#include <optional>
#include <vector>

#include <autodiff/autodiff.hpp>

namespace ad = autodiff;
using Tensor = ad::Tensor<double>;

namespace {

Tensor normal(const ad::Shape& s, std::uint64_t seed) { return ad::randn<double>(s, seed); }

// Turns the injection off when the scope ends, even if a CHECK throws.
struct Injection {
    explicit Injection(std::int64_t n) { ad::pool::fail_acquire_after(n); }
    ~Injection() { ad::pool::fail_acquire_after(-1); }
    Injection(const Injection&) = delete;
    Injection& operator=(const Injection&) = delete;
};

std::uint64_t requests() { return ad::pool::stats().requests; }

std::vector<Tensor> grads_of(const std::vector<ad::Param<double>>& params) {
    std::vector<Tensor> g;
    for (const auto& p : params) g.push_back(p.grad().clone());
    return g;
}

bool bitwise_equal(const std::vector<ad::Param<double>>& params, const std::vector<Tensor>& expected) {
    for (std::size_t i = 0; i < params.size(); ++i)
        if (ad::max_abs_diff(params[i].grad(), expected[i]) != 0.0) return false;
    return true;
}

// One training step in stages, each a Var made by the user: stages[i](previous) returns the next Var;
// the last is the loss. Returns the loss's value.
using Stage = std::function<ad::Var<double>(const ad::Var<double>&)>;

// Sweeps the failing acquisition over every acquisition of the stages and the backward.
void sweep(const std::vector<ad::Param<double>>& params, const std::vector<Stage>& stages,
           const std::function<void()>& before_attempt = [] {}, const std::function<void()>& after_failure = [] {}) {
    // Gradients before every attempt: non-zero, so that "unchanged" is a real condition.
    for (const auto& p : params) p.state()->grad = ad::full<double>(p.shape(), 0.5);
    const std::vector<Tensor> initial = grads_of(params);

    auto run = [&](ad::Var<double>& out, std::vector<std::size_t>& records, ad::Tape& tape) {
        for (const Stage& s : stages) {
            out = s(out);
            records.push_back(tape.size());
        }
    };
    // The reference: the loss and the gradients of a step that does not fail, and its acquisitions.
    before_attempt();
    std::uint64_t total = 0;
    double loss_value = 0;
    std::vector<Tensor> reference;
    {
        ad::Tape tape;
        ad::TapeGuard guard(tape);
        const std::uint64_t r0 = requests();
        ad::Var<double> out;
        std::vector<std::size_t> records;
        run(out, records, tape);
        out.backward();
        total = requests() - r0;
        loss_value = out.item();
        reference = grads_of(params);
    }
    REQUIRE(total > 5);
    for (std::size_t i = 0; i < params.size(); ++i) params[i].state()->grad = initial[i].clone();

    std::uint64_t failed_forward = 0, failed_backward = 0;
    for (std::uint64_t n = 0; n < total; ++n) {
        CAPTURE(n);
        before_attempt();
        const std::size_t bytes = ad::pool::stats().bytes_in_use;
        {
            ad::Tape tape;
            ad::TapeGuard guard(tape);
            ad::Var<double> out;
            std::vector<std::size_t> records{0};
            bool threw = false;
            {
                Injection inject(static_cast<std::int64_t>(n));
                try {
                    for (const Stage& s : stages) {
                        out = s(out);
                        records.push_back(tape.size());
                    }
                } catch (const std::bad_alloc&) {
                    threw = true;
                    ++failed_forward;
                    // The stage that failed recorded nothing: the tape has the records of those before it.
                    CHECK(tape.size() == records.back());
                    after_failure();
                }
                if (!threw) {
                    try {
                        out.backward();
                    } catch (const std::bad_alloc&) {
                        threw = true;
                        ++failed_backward;
                        CHECK(tape.size() == records.back());  // the graph is kept
                    }
                }
            }
            REQUIRE_MESSAGE(threw, "acquisition ", n, " of ", total, " was not reached");
            CHECK(bitwise_equal(params, initial));
            if (failed_backward && tape.size() == records.back() && tape.size() > 0) {  // retry the backward
                CHECK(out.item() == loss_value);
                out.backward();
                CHECK(bitwise_equal(params, reference));
                for (std::size_t i = 0; i < params.size(); ++i) params[i].state()->grad = initial[i].clone();
            }
        }
        CHECK(ad::pool::stats().bytes_in_use == bytes);
    }
    MESSAGE(total, " acquisitions: ", failed_forward, " failures in the forward, ", failed_backward, " in the backward");
    CHECK(failed_forward > 0);
    CHECK(failed_backward > 0);
}

}  // namespace

TEST_CASE("fail_acquire_after(n): n acquisitions succeed, the next throws std::bad_alloc once") {
    Injection inject(2);
    Tensor a = ad::zeros<double>({3}), b = ad::zeros<double>({3});
    CHECK_THROWS_AS((void)ad::zeros<double>({3}), std::bad_alloc);
    CHECK_NOTHROW((void)ad::zeros<double>({3}));
}

TEST_CASE("a failed acquisition leaves the pool's statistics as they were") {
    const ad::pool::Stats before = ad::pool::stats();
    {
        Injection inject(0);
        CHECK_THROWS_AS((void)ad::empty<double>({1000}), std::bad_alloc);
    }
    const ad::pool::Stats after = ad::pool::stats();
    CHECK(after.requests == before.requests);
    CHECK(after.bytes_in_use == before.bytes_in_use);
    CHECK(after.bytes_cached == before.bytes_cached);
}

TEST_CASE("allocation failure at every point of a fused attention step with a trainable bias and dropout") {
    // (n, h, L, d) = (2, 2, 6, 4), full-shape trainable bias (the kept-scores path), causal, dropout 0.25.
    ad::Param<double> q(normal({2, 2, 6, 4}, 1)), k(normal({2, 2, 6, 4}, 2)), v(normal({2, 2, 6, 4}, 3));
    ad::Param<double> bias(normal({2, 2, 6, 6}, 4));
    const Tensor target = normal({2, 2, 6, 4}, 5);
    const ad::DropoutDescriptor drop{0.25, 11, 3};
    auto attention = [&] { return ad::matmul(ad::dropout(ad::softmax(ad::matmul(q * 1.5, ad::transpose(k)) * 0.5 + bias, ad::causal), drop), v); };
    static_assert(ad::is_fused_v<decltype(attention())>);
    const std::vector<Stage> stages{[&](const ad::Var<double>&) { return ad::Var<double>(attention()); },
                                    [&](const ad::Var<double>& O) { return ad::Var<double>(ad::mse(O, target)); }};
    SUBCASE("fused, kept scores") { sweep({q, k, v, bias}, stages); }
    SUBCASE("a broadcast bias (recomputed scores)") {
        ad::Param<double> b2(normal({6, 6}, 6));
        const std::vector<Stage> s2{
            [&](const ad::Var<double>&) {
                return ad::Var<double>(ad::matmul(ad::dropout(ad::softmax(ad::matmul(q, ad::transpose(k)) * 0.5 + b2, ad::causal), drop), v));
            },
            [&](const ad::Var<double>& O) { return ad::Var<double>(ad::mse(O, target)); }};
        sweep({q, k, v, b2}, s2);
    }
    SUBCASE("generic (node by node)") {
        ad::NoFusionGuard generic;
        sweep({q, k, v, bias}, stages);
    }
}

TEST_CASE("allocation failure at every point of a MultiHeadAttention step") {
    // Eval mode: every call advances the dropout offset (a state a failed call must leave alone), and
    // in eval mode the results do not depend on it, so every attempt can be compared with one reference.
    ad::nn::MultiHeadAttention<double> mha({.embed_dim = 8, .num_heads = 2, .dropout = 0.25, .seed = 3});
    mha.eval();
    ad::Param<double> x(normal({2, 5, 8}, 1));
    ad::Param<double> bias(normal({2, 5, 5}, 2));
    const Tensor target = normal({2, 5, 8}, 3);
    std::vector<ad::Param<double>> params = mha.parameters();
    params.push_back(x);
    params.push_back(bias);
    std::uint64_t offset = 0;
    const std::vector<Stage> stages{
        [&](const ad::Var<double>&) {
            ad::Var<double> in = x;
            offset = mha.dropout_descriptor().offset;
            ad::Var<double> out = mha(in, in, in, bias, ad::causal);
            CHECK(mha.dropout_descriptor().offset == offset + 1);
            return out;
        },
        [&](const ad::Var<double>& out) { return ad::Var<double>(ad::mse(out, target)); }};
    sweep(params, stages, [] {}, [&] {
        const std::uint64_t now = mha.dropout_descriptor().offset;
        CHECK((now == offset || now == offset + 1));  // unchanged if the module's call failed
    });
}

TEST_CASE("a MultiHeadAttention call that fails leaves its dropout offset and the tape as they were") {
    ad::nn::MultiHeadAttention<double> mha({.embed_dim = 8, .num_heads = 2, .dropout = 0.25, .seed = 3});
    ad::Param<double> x(normal({2, 5, 8}, 1));
    ad::Tape tape;
    ad::TapeGuard guard(tape);
    std::uint64_t total = 0;
    {
        ad::Var<double> x_var = x;
        const std::uint64_t r0 = requests();
        ad::Var<double> out = mha(x_var, x_var, x_var, ad::causal);
        total = requests() - r0;
    }
    tape.clear();
    ad::Var<double> in = x;
    REQUIRE(total > 5);
    for (std::uint64_t n = 0; n < total; ++n) {
        CAPTURE(n);
        const std::uint64_t offset = mha.dropout_descriptor().offset;
        Injection inject(static_cast<std::int64_t>(n));
        CHECK_THROWS_AS((void)mha(in, in, in, ad::causal), std::bad_alloc);
        CHECK(mha.dropout_descriptor().offset == offset);
        CHECK(tape.size() == 0);
    }
}

// ---- regressions found while hardening -------------------------------------------------------------

TEST_CASE("an exception inside a parallel loop reaches the caller (it used to leave the OpenMP region: std::terminate)") {
    const int threads = ad::num_threads();
    ad::set_num_threads(2);
    CHECK_THROWS_WITH_AS(ad::parallel_for(8, ad::parallel_grain, [](std::int64_t i) {
                             if (i == 5) ad::fail("body", "item {} failed", i);
                         }),
                         "body: item 5 failed", ad::Error);
    std::vector<int> done(8, 0);
    ad::parallel_for(8, ad::parallel_grain, [&](std::int64_t i) { done[static_cast<std::size_t>(i)] = 1; });
    CHECK(std::count(done.begin(), done.end(), 1) == 8);
    ad::set_num_threads(threads);
}

TEST_CASE("a shape of more than 2^63 - 1 elements is refused when built (its element count used to overflow)") {
    const std::int64_t big = std::int64_t{1} << 40;
    CHECK_THROWS_WITH_AS((void)ad::Shape({big, big}), "shape: dimension 1099511627776 after (1099511627776) makes more than 2^63 - 1 elements",
                         ad::Error);
    CHECK_THROWS_AS((void)ad::Shape({0, big, big}), ad::Error);  // strides multiply the non-zero dimensions
    CHECK_NOTHROW((void)ad::Shape({0, big}));
    // reshape compares element counts: no overflow on the way to its message
    CHECK_THROWS_AS((void)ad::zeros<float>({2, 3}).reshaped(ad::Shape({big, 4})), ad::Error);
}

TEST_CASE("a tensor too large for the address space is refused before the pool computes its size (it used to wrap around)") {
    const std::int64_t huge = std::int64_t{1} << 61;  // x 8 bytes wraps a 64-bit size to 0
    const std::size_t bytes = ad::pool::stats().bytes_in_use;
    CHECK_THROWS_WITH_AS((void)ad::Tensor<double>(ad::Shape({huge})), "tensor: shape (2305843009213693952) is too large to allocate (2305843009213693952 elements)",
                         ad::Error);
    CHECK_THROWS_AS((void)ad::pool::acquire(std::size_t{1} << 63), std::bad_alloc);
    CHECK(ad::pool::stats().bytes_in_use == bytes);
}

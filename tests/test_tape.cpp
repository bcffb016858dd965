// The tape's semantics: accumulation into Param::grad(), values used more than once, NoGradGuard,
// retain_graph and freed graphs, explicit tapes, rollback of a failed evaluation, and the steady
// state of a training loop (no new allocations after warm-up).
#include <doctest/doctest.h>

#include <cstdint>
#include <optional>
#include <string>
#include <thread>

#include <autodiff/autodiff.hpp>

namespace ad = autodiff;
using Tensor = ad::Tensor<double>;

namespace {

Tensor normal(const ad::Shape& s, std::uint64_t seed) { return ad::randn<double>(s, seed); }

// Gradients here are a handful of double operations on O(1) values, against the same formula
// written with Eigen: they agree to a few ulps, far below 1e-12, and any missing or extra
// contribution is O(1).
constexpr double tol = 1e-12;

template <class F>
Tensor map(const Tensor& x, F f) {
    Tensor y = ad::empty<double>(x.shape());
    for (std::int64_t i = 0; i < x.numel(); ++i) y.data()[i] = f(x.data()[i]);
    return y;
}

Tensor scaled(const Tensor& x, double s) {
    return map(x, [s](double v) { return s * v; });
}

// The message of the ad::Error that f throws ("" and a failed check if it throws nothing).
template <class F>
std::string error_of(F&& f) {
    try {
        f();
    } catch (const ad::Error& e) {
        return e.what();
    }
    FAIL_CHECK("expected an autodiff::Error");
    return "";
}

bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

}  // namespace

// ---- Param::grad() ------------------------------------------------------------------------------

TEST_CASE("Param::grad() of a Param that no backward reached is zeros of its shape") {
    ad::Param<double> untouched(normal({2, 3, 5}, 1)), used(normal({2, 3, 5}, 2));
    CHECK_FALSE(untouched.has_grad());
    ad::Var<double> loss = ad::sum(used * 2.0);
    loss.backward();
    CHECK_FALSE(untouched.has_grad());
    CHECK(untouched.grad().shape() == ad::Shape{2, 3, 5});
    CHECK(ad::max_abs_diff(untouched.grad(), ad::zeros<double>({2, 3, 5})) == 0.0);
    CHECK(used.has_grad());
}

TEST_CASE("gradients accumulate (+=) across backward() calls until zero_grad()") {
    ad::Param<double> x(normal({3, 5}, 1));
    const auto backward_once = [&] {
        ad::Var<double> loss = ad::sum(x * x);  // d/dx = 2x
        loss.backward();
    };
    backward_once();
    CHECK(ad::max_abs_diff(x.grad(), scaled(x.value(), 2)) <= tol);
    backward_once();
    CHECK(ad::max_abs_diff(x.grad(), scaled(x.value(), 4)) <= tol);
    x.zero_grad();
    CHECK_FALSE(x.has_grad());
    CHECK(ad::max_abs_diff(x.grad(), ad::zeros<double>({3, 5})) == 0.0);
    backward_once();
    CHECK(ad::max_abs_diff(x.grad(), scaled(x.value(), 2)) <= tol);
}

TEST_CASE("zero_grad(a, b) zeroes every Param given") {
    ad::Param<double> a(normal({3}, 1)), b(normal({3}, 2));
    ad::Var<double> loss = ad::sum(a * b);
    loss.backward();
    REQUIRE(a.has_grad());
    REQUIRE(b.has_grad());
    ad::zero_grad(a, b);
    CHECK_FALSE(a.has_grad());
    CHECK_FALSE(b.has_grad());
}

// ---- values used more than once -----------------------------------------------------------------

TEST_CASE("a Param used twice in one expression gets both contributions") {
    SUBCASE("sum(X·X): dX[a,b] = rowsum(X)[b] + colsum(X)[a]") {
        ad::Param<double> X(normal({5, 5}, 1));
        ad::Var<double> loss = ad::sum(ad::matmul(X, X));
        loss.backward();
        const ad::RowMatrix<double> x = X.value().matrix();
        Tensor expected = ad::empty<double>({5, 5});
        for (int a = 0; a < 5; ++a)
            for (int b = 0; b < 5; ++b) expected(a, b) = x.row(b).sum() + x.col(a).sum();
        CHECK(ad::max_abs_diff(X.grad(), expected) <= tol);
    }
    SUBCASE("sum(tanh(x)·x): dx = (1 - tanh²x)·x + tanh x") {
        ad::Param<double> x(normal({3, 5}, 2));
        ad::Var<double> loss = ad::sum(ad::tanh(x) * x);
        loss.backward();
        const Tensor expected = map(x.value(), [](double v) { return (1 - std::tanh(v) * std::tanh(v)) * v + std::tanh(v); });
        CHECK(ad::max_abs_diff(x.grad(), expected) <= tol);
    }
}

TEST_CASE("a Var used in two branches gets the sum of both branches' gradients") {
    ad::Param<double> x(normal({3, 5}, 1));
    ad::Var<double> h = ad::tanh(x);
    ad::Var<double> loss = ad::sum(h * h + h);  // d/dx = (2h + 1)(1 - h²)
    loss.backward();
    const Tensor expected = map(x.value(), [](double v) {
        const double t = std::tanh(v);
        return (2 * t + 1) * (1 - t * t);
    });
    CHECK(ad::max_abs_diff(x.grad(), expected) <= tol);
}

TEST_CASE("a Var made from a Param alone passes its gradient to the Param") {
    ad::Param<double> p(normal({4}, 1));
    ad::Var<double> v = p;
    CHECK(v.requires_grad());
    ad::Var<double> loss = ad::sum(v * 3.0);
    loss.backward();
    CHECK(ad::max_abs_diff(p.grad(), ad::full<double>({4}, 3.0)) == 0.0);
}

// ---- NoGradGuard --------------------------------------------------------------------------------

TEST_CASE("NoGradGuard: results do not require grad and nothing is recorded") {
    ad::Param<double> x(normal({3, 5}, 1));
    const std::size_t records = ad::current_tape().size();
    ad::NoGradGuard no_grad;
    CHECK_FALSE(ad::grad_enabled());
    ad::Var<double> y = ad::sum(ad::exp(x) * x);
    CHECK_FALSE(y.requires_grad());
    CHECK(ad::current_tape().size() == records);
    const std::string message = error_of([&] { y.backward(); });
    INFO(message);
    CHECK(contains(message, "backward: "));
    CHECK(contains(message, "does not require grad"));
    CHECK_FALSE(x.has_grad());
}

TEST_CASE("NoGradGuard: recording resumes when the guard ends, and guards nest") {
    {
        ad::NoGradGuard outer;
        {
            ad::NoGradGuard inner;
            CHECK_FALSE(ad::grad_enabled());
        }
        CHECK_FALSE(ad::grad_enabled());
    }
    CHECK(ad::grad_enabled());
    ad::Param<double> x(normal({3}, 1));
    ad::Var<double> y = ad::sum(x * x);
    CHECK(y.requires_grad());
}

TEST_CASE("NoGradGuard: a Var computed under the guard is a constant in later expressions") {
    ad::Param<double> x(normal({3, 5}, 1));
    ad::Var<double> c;
    {
        ad::NoGradGuard no_grad;
        c = ad::exp(x);
    }
    ad::Var<double> loss = ad::sum(c * x);  // c is constant: d/dx = exp(x), not exp(x)·(1 + x)
    loss.backward();
    CHECK(ad::max_abs_diff(x.grad(), map(x.value(), [](double v) { return std::exp(v); })) <= tol);
}

// ---- backward(), retain_graph and freed graphs ---------------------------------------------------

TEST_CASE("backward() a second time without retain_graph throws: the graph was already freed") {
    ad::Param<double> x(normal({3}, 1));
    ad::Var<double> loss = ad::sum(x * x);
    loss.backward();
    const Tensor after_first = x.grad().clone();
    const std::string message = error_of([&] { loss.backward(); });
    INFO(message);
    CHECK(contains(message, "backward: "));
    CHECK(contains(message, "already freed"));
    CHECK(contains(message, "retain_graph"));
    CHECK(ad::max_abs_diff(x.grad(), after_first) == 0.0);
}

TEST_CASE("retain_graph = true allows a second backward(), which doubles the gradients") {
    ad::Param<double> x(normal({3, 5}, 1)), w(normal({5, 2}, 2));
    ad::Var<double> loss = ad::sum(ad::tanh(ad::matmul(x, w)));
    loss.backward(true);
    const Tensor gx = x.grad().clone(), gw = w.grad().clone();
    loss.backward(true);
    CHECK(ad::max_abs_diff(x.grad(), scaled(gx, 2)) <= tol);
    CHECK(ad::max_abs_diff(w.grad(), scaled(gw, 2)) <= tol);
    SUBCASE("a later backward() without retain_graph frees the graph") {
        loss.backward();
        CHECK(ad::max_abs_diff(x.grad(), scaled(gx, 3)) <= tol);
        CHECK(contains(error_of([&] { loss.backward(); }), "already freed"));
    }
}

TEST_CASE("backward() on one loss frees the graph of every Var recorded on the same tape") {
    ad::Param<double> x(normal({3}, 1));
    ad::Var<double> first = ad::sum(x * x);
    ad::Var<double> second = ad::sum(ad::exp(x));
    first.backward();
    CHECK(contains(error_of([&] { second.backward(); }), "already freed"));
}

TEST_CASE("backward() differentiates only what its Var was computed from, not later records") {
    ad::Param<double> x(normal({3}, 1));
    ad::Var<double> first = ad::sum(x * x);
    ad::Var<double> later = ad::sum(ad::exp(x));
    first.backward(true);
    CHECK(ad::max_abs_diff(x.grad(), scaled(x.value(), 2)) <= tol);
    later.backward();
    const Tensor both = map(x.value(), [](double v) { return 2 * v + std::exp(v); });
    CHECK(ad::max_abs_diff(x.grad(), both) <= tol);
}

TEST_CASE("backward() on a non-scalar needs a seed: the message names the output's shape") {
    ad::Param<double> x(normal({2, 3}, 1));
    ad::Var<double> y = x * 2.0;
    const std::string message = error_of([&] { y.backward(); });
    INFO(message);
    CHECK(contains(message, "backward: "));
    CHECK(contains(message, "(2,3)"));
    CHECK_FALSE(x.has_grad());
}

TEST_CASE("backward(seed) with a seed of another shape throws, naming both shapes") {
    ad::Param<double> x(normal({2, 3}, 1));
    ad::Var<double> y = x * 2.0;
    SUBCASE("transposed seed") {
        const std::string message = error_of([&] { y.backward(ad::ones<double>({3, 2})); });
        INFO(message);
        CHECK(contains(message, "backward: "));
        CHECK(contains(message, "(3,2)"));
        CHECK(contains(message, "(2,3)"));
    }
    SUBCASE("undefined seed") {
        const std::string message = error_of([&] { y.backward(Tensor()); });
        INFO(message);
        CHECK(contains(message, "(undefined)"));
        CHECK(contains(message, "(2,3)"));
    }
    SUBCASE("the graph survives the rejected seed") {
        (void)error_of([&] { y.backward(ad::ones<double>({6})); });
        y.backward(ad::ones<double>({2, 3}));
        CHECK(ad::max_abs_diff(x.grad(), ad::full<double>({2, 3}, 2.0)) == 0.0);
    }
}

TEST_CASE("backward(seed) on a non-scalar gives the vector-Jacobian product") {
    ad::Param<double> x(normal({2, 3}, 1));
    ad::Var<double> y = ad::exp(x);
    const Tensor seed = normal({2, 3}, 2);
    y.backward(seed);
    Tensor expected = ad::empty<double>({2, 3});
    for (std::int64_t i = 0; i < 6; ++i) expected.data()[i] = seed.data()[i] * std::exp(x.value().data()[i]);
    CHECK(ad::max_abs_diff(x.grad(), expected) <= tol);
}

TEST_CASE("backward(seed) reads the caller's seed in place: no copy, its values and version untouched") {
    ad::Param<double> x(normal({64, 32}, 1));
    const Tensor seed = normal({64, 32}, 2), before = seed.clone();
    const std::uint64_t version = seed.version();
    ad::Var<double> y = x * 2.0;
    // The backward's only block is dx = 2·seed (which becomes x.grad()); a copy of the seed would be a second.
    const std::uint64_t requests = ad::pool::stats().requests;
    y.backward(seed);
    CHECK(ad::pool::stats().requests - requests == 1);
    CHECK(ad::max_abs_diff(x.grad(), scaled(seed, 2.0)) == 0.0);
    CHECK(ad::max_abs_diff(seed, before) == 0.0);
    CHECK(seed.version() == version);

    SUBCASE("a seed that flows unchanged into two inputs and a Param twice") {
        ad::Param<double> a(normal({64, 32}, 3)), b(normal({64, 32}, 4));
        ad::Var<double> z = (a + b) + a;  // dz/da = 2, dz/db = 1: the seed's storage passed along three times
        z.backward(seed);
        CHECK(ad::max_abs_diff(a.grad(), scaled(seed, 2.0)) == 0.0);
        CHECK(ad::max_abs_diff(b.grad(), seed) == 0.0);
        CHECK(ad::max_abs_diff(seed, before) == 0.0);
        CHECK(seed.version() == version);
        // The gradients own their storage: accumulating into them leaves the seed alone.
        CHECK(b.grad().data() != seed.data());
        ad::Var<double> z2 = (a + b) + a;
        z2.backward(seed);
        CHECK(ad::max_abs_diff(b.grad(), scaled(seed, 2.0)) == 0.0);
        CHECK(ad::max_abs_diff(seed, before) == 0.0);
    }
    SUBCASE("a seed added twice into one Param: the second contribution is added from the seed itself") {
        ad::Param<double> a(normal({64, 32}, 3));
        ad::Var<double> z = a + a;
        z.backward(seed);
        CHECK(ad::max_abs_diff(a.grad(), scaled(seed, 2.0)) == 0.0);
        CHECK(ad::max_abs_diff(seed, before) == 0.0);
        CHECK(seed.version() == version);
    }
    SUBCASE("a root that is a Param itself gets a copy (its grad is added into later)") {
        ad::Var<double> v = x;
        x.zero_grad();
        v.backward(seed);
        CHECK(x.grad().data() != seed.data());
        ad::Var<double> v2 = x;
        v2.backward(seed);
        CHECK(ad::max_abs_diff(x.grad(), scaled(seed, 2.0)) == 0.0);
        CHECK(ad::max_abs_diff(seed, before) == 0.0);
        CHECK(seed.version() == version);
    }
}

TEST_CASE("a Var whose graph was freed cannot enter a new expression; its detach() can") {
    ad::Param<double> x(normal({3, 5}, 1));
    ad::Var<double> h = ad::tanh(x);
    ad::Var<double> loss = ad::sum(h);
    loss.backward();
    x.zero_grad();
    SUBCASE("using the Var throws, and the message says detach()") {
        const std::size_t records = ad::current_tape().size();
        const std::string message = error_of([&] { ad::Var<double> z = h * x; });
        INFO(message);
        CHECK(contains(message, "detach()"));
        CHECK(contains(message, "freed"));
        CHECK(ad::current_tape().size() == records);
    }
    SUBCASE("detach() is the same value as a constant") {
        const ad::Var<double> hd = h.detach();
        CHECK_FALSE(hd.requires_grad());
        CHECK(ad::max_abs_diff(hd.value(), h.value()) == 0.0);
        ad::Var<double> z = ad::sum(hd * x);  // d/dx = h
        z.backward();
        CHECK(ad::max_abs_diff(x.grad(), h.value()) == 0.0);
    }
}

// ---- explicit tapes -----------------------------------------------------------------------------

TEST_CASE("an explicit Tape with TapeGuard isolates records: the default tape is untouched") {
    ad::Param<double> x(normal({3, 5}, 1));
    const std::size_t default_records = ad::current_tape().size();
    ad::Tape tape;
    {
        ad::TapeGuard guard(tape);
        CHECK(&ad::current_tape() == &tape);
        ad::Var<double> loss = ad::sum(ad::exp(x) * 2.0);
        CHECK(tape.size() == 3);
        loss.backward();
        CHECK(tape.size() == 0);
    }
    CHECK(&ad::current_tape() != &tape);
    CHECK(ad::current_tape().size() == default_records);
    CHECK(ad::max_abs_diff(x.grad(), map(x.value(), [](double v) { return 2 * std::exp(v); })) <= tol);
}

TEST_CASE("TapeGuard restores the previous tape when it ends, and guards nest") {
    ad::Tape& default_tape = ad::current_tape();
    ad::Tape a, b;
    {
        ad::TapeGuard ga(a);
        {
            ad::TapeGuard gb(b);
            CHECK(&ad::current_tape() == &b);
        }
        CHECK(&ad::current_tape() == &a);
    }
    CHECK(&ad::current_tape() == &default_tape);
}

TEST_CASE("Var(expr, tape) records on the given tape") {
    ad::Param<double> x(normal({3}, 1));
    const std::size_t default_records = ad::current_tape().size();
    ad::Tape tape;
    ad::Var<double> loss(ad::sum(x * x), tape);
    CHECK(tape.size() == 2);
    CHECK(ad::current_tape().size() == default_records);
    loss.backward();
    CHECK(ad::max_abs_diff(x.grad(), scaled(x.value(), 2)) <= tol);
}

TEST_CASE("a Var recorded on tape A cannot be used while recording on tape B") {
    ad::Param<double> x(normal({3}, 1));
    ad::Tape a, b;
    ad::Var<double> on_a(ad::exp(x), a);
    ad::TapeGuard guard(b);
    const std::string message = error_of([&] { ad::Var<double> z = on_a * x; });
    INFO(message);
    CHECK(contains(message, "another tape"));
    CHECK(b.size() == 0);
    CHECK(a.size() == 1);
    SUBCASE("its detach() can") {
        ad::Var<double> z = ad::sum(on_a.detach() * x);
        z.backward();
        CHECK(ad::max_abs_diff(x.grad(), on_a.value()) == 0.0);
    }
}

TEST_CASE("each thread records on its own default tape") {
    ad::Param<double> x(normal({3}, 1));
    const std::size_t records = ad::current_tape().size();
    std::size_t other_thread_records = 0;
    const ad::Tape* other_thread_tape = nullptr;
    std::thread t([&] {
        ad::Var<double> y = ad::exp(x) * 2.0;
        other_thread_records = ad::current_tape().size();
        other_thread_tape = &ad::current_tape();
    });
    t.join();
    CHECK(other_thread_records == 2);
    CHECK(other_thread_tape != &ad::current_tape());
    CHECK(ad::current_tape().size() == records);
}

// ---- rollback -----------------------------------------------------------------------------------

TEST_CASE("rollback: an evaluation that throws leaves the tape, the gradients and the pool as they were") {
    ad::Param<double> x(normal({3, 5}, 1)), w(normal({5, 4}, 2));
    ad::Tape tape;
    ad::TapeGuard guard(tape);
    // A Var whose graph is freed: evaluating it on the tape throws.
    ad::Var<double> freed = ad::tanh(ad::matmul(x, w));
    ad::Var<double> first_loss = ad::sum(freed);
    first_loss.backward();
    const Tensor gx = x.grad().clone(), gw = w.grad().clone();

    // Records pushed before the failing expression; they must survive it.
    ad::Var<double> kept = ad::sum(ad::exp(x) * 0.5);
    const std::size_t records = tape.size();
    REQUIRE(records == 3);
    const std::size_t bytes_in_use = ad::pool::stats().bytes_in_use;

    // Left to right, the expression records matmul, tanh, exp, scale, + and mul before it reaches `freed`.
    const std::string message = error_of([&] {
        ad::Var<double> bad = ad::sum(ad::tanh(ad::matmul(x, w)) + ad::exp(ad::matmul(x, w)) * 2.0 * freed);
    });
    INFO(message);
    CHECK(contains(message, "freed"));
    CHECK(tape.size() == records);
    CHECK(ad::pool::stats().bytes_in_use == bytes_in_use);
    CHECK(ad::max_abs_diff(x.grad(), gx) == 0.0);
    CHECK(ad::max_abs_diff(w.grad(), gw) == 0.0);

    SUBCASE("the records before the failure still differentiate correctly") {
        x.zero_grad();
        kept.backward();
        CHECK(ad::max_abs_diff(x.grad(), map(x.value(), [](double v) { return 0.5 * std::exp(v); })) <= tol);
    }
    SUBCASE("new records after the failure work") {
        x.zero_grad();
        ad::Var<double> again = ad::sum(x * x);
        CHECK(tape.size() == records + 2);
        again.backward();
        CHECK(ad::max_abs_diff(x.grad(), scaled(x.value(), 2)) <= tol);
    }
}

TEST_CASE("rollback: a Var from another tape deep inside an expression leaves both tapes as they were") {
    ad::Param<double> x(normal({3, 5}, 1));
    ad::Tape a, b;
    ad::Var<double> on_a(ad::exp(x), a);
    ad::TapeGuard guard(b);
    ad::Var<double> on_b = ad::tanh(x);
    CHECK(contains(error_of([&] { ad::Var<double> bad = ad::sigmoid(x) * on_b + ad::relu(x) * on_a; }), "another tape"));
    CHECK(a.size() == 1);
    CHECK(b.size() == 1);
}

// ---- Consts -------------------------------------------------------------------------------------

TEST_CASE("a Const-only expression records nothing and does not require grad") {
    const ad::Const<double> c(normal({3, 5}, 1)), d(normal({3, 5}, 2));
    const std::size_t records = ad::current_tape().size();
    ad::Var<double> y = ad::sum(ad::exp(c) * d + c);
    CHECK_FALSE(y.requires_grad());
    CHECK(ad::current_tape().size() == records);
}

TEST_CASE("a Const gets no gradient: a Param whose value is passed as a Const is unaffected") {
    ad::Param<double> p(normal({3, 5}, 1)), q(normal({3, 5}, 2));
    const ad::Const<double> q_as_const(q.value());
    const Tensor q_before = q.value().clone();
    ad::Var<double> loss = ad::sum(p * q_as_const + ad::exp(q_as_const));
    loss.backward();
    CHECK_FALSE(q.has_grad());
    CHECK(ad::max_abs_diff(p.grad(), q.value()) == 0.0);
    CHECK(ad::max_abs_diff(q.value(), q_before) == 0.0);
}

// ---- gradcheck and the tape ---------------------------------------------------------------------

TEST_CASE("gradcheck leaves the Params' gradients and the current tape as they were") {
    ad::Param<double> x(normal({3, 4}, 1), "x");
    ad::Var<double> loss = ad::sum(x * 3.0);
    loss.backward();
    const Tensor before = x.grad().clone();
    const std::size_t records = ad::current_tape().size();
    const ad::GradcheckReport report = ad::gradcheck([&] { return ad::tanh(x); }, {x});
    INFO(report.str());
    CHECK(report.passed);
    CHECK(ad::max_abs_diff(x.grad(), before) == 0.0);
    CHECK(ad::current_tape().size() == records);
}

// ---- steady state -------------------------------------------------------------------------------

TEST_CASE("steady state: repeating the same forward and backward allocates nothing new") {
    ad::Param<double> W(normal({4, 6}, 1)), b(normal({4}, 2)), X(normal({3, 5, 6}, 3));
    const ad::Const<double> target(normal({3, 5, 4}, 4));
    ad::Tape tape;
    ad::TapeGuard guard(tape);
    const auto step = [&] {
        ad::zero_grad(W, b, X);
        ad::Var<double> h = ad::tanh(ad::linear(X, W, b));
        ad::Var<double> loss = ad::mse(ad::softmax(h, ad::causal) * 2.0, target);
        loss.backward();
    };
    step();
    const std::size_t arena = tape.arena_bytes();
    CHECK(arena > 0);
    step();
    CHECK(tape.arena_bytes() == arena);
    const std::uint64_t system_allocs = ad::pool::stats().system_allocs;
    step();
    CHECK(ad::pool::stats().system_allocs == system_allocs);
    CHECK(tape.arena_bytes() == arena);
    CHECK(tape.size() == 0);
}

TEST_CASE("a Var whose tape was destroyed is not taken for a Var of a new tape at the same address") {
    ad::Param<double> x(normal({3}, 1));
    std::optional<ad::Tape> tape;  // the second Tape is built in the storage of the first
    tape.emplace();
    ad::Var<double> orphan(ad::exp(x), *tape);
    tape.reset();
    tape.emplace();
    ad::TapeGuard guard(*tape);
    REQUIRE(orphan.tape() == &*tape);
    const std::string message = error_of([&] { ad::Var<double> z = ad::sum(orphan * x); });
    INFO(message);
    CHECK(contains(message, "detach()"));
    CHECK(tape->size() == 0);
    CHECK(contains(error_of([&] { orphan.backward(ad::ones<double>({3})); }), "has been destroyed"));
    CHECK_FALSE(x.has_grad());
}

TEST_CASE("backward on a Var whose explicit Tape was destroyed throws instead of touching freed memory") {
    ad::Param<double> x(normal({3}, 1));
    std::optional<ad::Var<double>> orphan;
    {
        ad::Tape tape;
        orphan.emplace(ad::sum(ad::exp(x)), tape);
    }
    const std::string message = error_of([&] { orphan->backward(); });
    INFO(message);
    CHECK(message.starts_with("backward: "));
    CHECK(contains(message, "Tape this Var was recorded on has been destroyed"));
    CHECK_FALSE(x.has_grad());
}

TEST_CASE("gradcheck whose function throws leaves the Params' gradients and values as they were") {
    ad::Param<double> x(normal({3, 4}, 1), "x");
    ad::Var<double> loss = ad::sum(x * 3.0);
    loss.backward();
    const Tensor grad_before = x.grad().clone(), value_before = x.value().clone();
    ad::Var<double> on_default_tape = ad::tanh(x);  // gradcheck records on its own tape: using this Var there throws
    const std::string message = error_of([&] { (void)ad::gradcheck([&] { return on_default_tape * x; }, {x}); });
    INFO(message);
    CHECK(contains(message, "another tape"));
    REQUIRE(x.has_grad());
    CHECK(ad::max_abs_diff(x.grad(), grad_before) == 0.0);
    CHECK(ad::max_abs_diff(x.value(), value_before) == 0.0);
}

TEST_CASE("gradcheck of a Param listed twice checks it and keeps its gradient") {
    ad::Param<double> x(normal({3, 4}, 1), "x");
    ad::Var<double> loss = ad::sum(x * 3.0);
    loss.backward();
    const Tensor grad_before = x.grad().clone();
    const ad::GradcheckReport report = ad::gradcheck([&] { return ad::tanh(x) * x; }, {x, x});
    INFO(report.str());
    CHECK(report.passed);
    CHECK(report.max_rel_error() < 1e-6);
    CHECK(ad::max_abs_diff(x.grad(), grad_before) == 0.0);
}

TEST_CASE("gradcheck whose function throws while differencing leaves the Params' values as they were") {
    ad::Param<double> x(normal({3, 4}, 1), "x");
    const Tensor value_before = x.value().clone();
    int calls = 0;
    const std::string message = error_of([&] {
        (void)ad::gradcheck(
            [&] {
                if (++calls == 3) ad::fail("user function", "fails on its third call, inside the differencing");
                return ad::tanh(x);
            },
            {x});
    });
    CHECK(contains(message, "third call"));
    CHECK(ad::max_abs_diff(x.value(), value_before) == 0.0);
}

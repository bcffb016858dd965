// Saved values modified in place (issue 10): every record remembers the storage version of each
// value it saves for its backward; a write into one of them between the forward and backward()
// (through any handle or view) makes backward() throw an Error naming the op and the value, before
// any Param's gradient changes. Values a backward does not read may be modified freely.
#include <doctest/doctest.h>

#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include <autodiff/autodiff.hpp>

#include "check_error.hpp"

namespace ad = autodiff;
using Tensor = ad::Tensor<double>;

namespace {

Tensor normal(const ad::Shape& s, std::uint64_t seed) { return ad::randn<double>(s, seed); }

// Records `make()` (a scalar loss), writes into a saved value with `write`, and checks that
// backward() throws naming `op`'s saved `which` with its shape, leaving the gradients of `params`
// (pre-filled by an earlier backward) bitwise as they were.
void check_modified(const std::function<ad::Var<double>()>& make, const std::function<void()>& write,
                    const std::vector<ad::Param<double>*>& params, const std::string& op, const std::string& which,
                    const std::string& shape, int line = __builtin_LINE()) {
    INFO("checked at line ", line);
    make().backward();  // gradients before: a failed backward must leave them exactly so
    std::vector<Tensor> before;
    for (auto* p : params) before.push_back(p->grad().clone());
    ad::Var<double> loss = make();
    write();
    test::check_error([&] { loss.backward(); }, "backward",
                      {op + "'s saved " + which + " " + shape, "modified in place after it was recorded"}, line);
    for (std::size_t i = 0; i < before.size(); ++i) CHECK(ad::max_abs_diff(params[i]->grad(), before[i]) == 0.0);
}

// The same record without the write: backward() succeeds (the check has no false positive).
void check_unmodified(const std::function<ad::Var<double>()>& make, int line = __builtin_LINE()) {
    INFO("checked at line ", line);
    ad::Var<double> loss = make();
    CHECK_NOTHROW(loss.backward());
}

}  // namespace

TEST_CASE("version(): every write access moves it; reads through a const handle and clones of it do not") {
    Tensor t = ad::zeros<double>({2, 3});
    const Tensor& c = t;
    std::uint64_t v = t.version();
    auto moved = [&] {  // whether the version moved since the last call
        const bool m = t.version() > v;
        v = t.version();
        return m;
    };
    (void)c.data(), (void)c.array(), (void)c.matrix(), (void)c(1, 2), (void)c.at(0, 0), (void)c.to_vector();
    Tensor copy = t.clone();
    CHECK(t.version() == v);
    (void)t.data();
    CHECK(moved());
    t.fill(1.0);
    CHECK(moved());
    t.array() += 1.0;
    CHECK(moved());
    t.matrix()(0, 0) = 2.0;
    CHECK(moved());
    t(1, 1) = 3.0;
    CHECK(moved());
    t.at(1, 2) = 4.0;
    CHECK(moved());
    SUBCASE("a write through another handle or a reshaped view moves it too (one version per storage)") {
        Tensor other = t;
        other.fill(0.0);
        CHECK(moved());
        Tensor view = t.reshaped({6});
        view(5) = 1.0;
        CHECK(t.version() > v);
    }
    SUBCASE("a clone has storage of its own") {
        const std::uint64_t cv = copy.version();
        t.fill(5.0);
        CHECK(copy.version() == cv);
    }
    CHECK(Tensor().version() == 0);
}

TEST_CASE("matmul: a write into a saved operand is refused by backward(), naming the operand") {
    ad::Param<double> a(normal({3, 4}, 1)), b(normal({4, 2}, 2));
    auto make = [&] { return ad::Var<double>(ad::sum(ad::matmul(a, b))); };
    SUBCASE("lhs") { check_modified(make, [&] { a.value()(0, 0) = 1.0; }, {&a, &b}, "matmul", "lhs", "(3,4)"); }
    SUBCASE("rhs") { check_modified(make, [&] { b.value().fill(0.5); }, {&a, &b}, "matmul", "rhs", "(4,2)"); }
    SUBCASE("a transposed operand is saved untransposed (the GEMM reads it through a flag)") {
        ad::Param<double> c(normal({2, 4}, 3));
        auto make_t = [&] { return ad::Var<double>(ad::sum(ad::matmul(a, ad::transpose(c)))); };
        check_modified(make_t, [&] { c.value().fill(0.5); }, {&a, &c}, "matmul", "rhs", "(2,4)");
    }
    SUBCASE("a transpose that is not folded materialises a copy: the original may then change") {
        ad::Var<double> loss = ad::sum(ad::matmul(a, ad::transpose(ad::transpose(b))));
        b.value().fill(0.5);
        CHECK_NOTHROW(loss.backward());
    }
    SUBCASE("a Var operand, written through a reshaped view of its value") {
        ad::Var<double> x;
        auto make_v = [&] {
            x = a * 2.0;
            return ad::Var<double>(ad::sum(ad::matmul(x, b)));
        };
        check_modified(make_v, [&] { Tensor view = x.value().reshaped({12}); view.fill(0.0); }, {&a, &b}, "matmul", "lhs", "(3,4)");
    }
    check_unmodified(make);
}

TEST_CASE("an optimiser step between forward and backward is refused: it writes the saved weights") {
    ad::Param<double> x(normal({5, 3}, 1)), w(normal({4, 3}, 2)), bias(normal({4}, 3));
    ad::nn::SGD<double> sgd({w, bias}, {.lr = 0.1});
    ad::Var<double> first = ad::sum(ad::linear(x, w, bias));
    first.backward();
    ad::Var<double> loss = ad::sum(ad::linear(x, w, bias));
    sgd.step();
    test::check_error([&] { loss.backward(); }, "backward", {"linear's saved weight (4,3)", "modified in place"});
}

TEST_CASE("linear: input and weight are saved; the bias is not") {
    ad::Param<double> x(normal({5, 3}, 1)), w(normal({4, 3}, 2)), bias(normal({4}, 3));
    auto make = [&] { return ad::Var<double>(ad::sum(ad::linear(x, w, bias))); };
    SUBCASE("input") { check_modified(make, [&] { x.value().fill(0.0); }, {&x, &w, &bias}, "linear", "input", "(5,3)"); }
    SUBCASE("weight") { check_modified(make, [&] { w.value()(3, 2) = 0.0; }, {&x, &w, &bias}, "linear", "weight", "(4,3)"); }
    SUBCASE("the bias may change: linear's backward does not read it") {
        ad::Var<double> loss = ad::sum(ad::linear(x, w, bias));
        bias.value().fill(7.0);
        x.zero_grad(), w.zero_grad(), bias.zero_grad();
        loss.backward();
        CHECK(ad::max_abs_diff(bias.grad(), ad::full<double>({4}, 5.0)) == 0.0);
    }
}

TEST_CASE("softmax: its saved output, modified through the Var's value, is refused") {
    ad::Param<double> x(normal({2, 5}, 1)), w(normal({2, 5}, 2));
    ad::Var<double> y;
    auto make = [&] {
        y = ad::softmax(x, ad::causal);
        return ad::Var<double>(ad::sum(ad::narrow(y, 1, 1, 3)));  // narrow saves nothing
    };
    check_modified(make, [&] { Tensor h = y.value(); h(0, 0) = 0.25; }, {&x, &w}, "softmax", "output", "(2,5)");
    SUBCASE("its mask is not saved (the output holds the zeros): changing it after the forward is harmless") {
        ad::Tensor<bool> keep = ad::full<bool>({5}, true);
        ad::Var<double> loss = ad::sum(ad::softmax(x, ad::keep_mask(keep)) * w);
        keep.fill(false);
        CHECK_NOTHROW(loss.backward());
    }
}

TEST_CASE("dropout saves nothing: its input may change before backward(), the gradient is its mask") {
    ad::Param<double> x(normal({4, 8}, 1));
    const ad::DropoutDescriptor d{0.5, 7, 3};
    ad::Var<double> loss = ad::sum(ad::dropout(x, d));
    x.value().fill(100.0);
    x.zero_grad();
    loss.backward();
    CHECK(ad::max_abs_diff(x.grad(), ad::dropout_forward(d, ad::ones<double>({4, 8}))) == 0.0);
}

TEST_CASE("elementwise ops: the inputs or outputs each one saves are checked") {
    ad::Param<double> a(ad::uniform<double>({3, 4}, 0.5, 2.0, 1)), b(ad::uniform<double>({4}, 0.5, 2.0, 2));
    SUBCASE("exp saves its output") {
        ad::Var<double> y;
        auto make = [&] {
            y = ad::exp(a);
            return ad::Var<double>(ad::sum(y));
        };
        check_modified(make, [&] { Tensor h = y.value(); h.fill(1.0); }, {&a}, "exp", "output", "(3,4)");
    }
    SUBCASE("log saves its input") {
        check_modified([&] { return ad::Var<double>(ad::sum(ad::log(a))); }, [&] { a.value().fill(1.0); }, {&a}, "log", "input",
                       "(3,4)");
    }
    SUBCASE("mul saves both operands (the broadcast one with its own shape)") {
        auto make = [&] { return ad::Var<double>(ad::sum(a * b)); };
        check_modified(make, [&] { b.value()(1) = 3.0; }, {&a, &b}, "mul", "rhs", "(4)");
        check_modified(make, [&] { a.value()(2, 3) = 3.0; }, {&a, &b}, "mul", "lhs", "(3,4)");
    }
    SUBCASE("div saves both operands") {
        check_modified([&] { return ad::Var<double>(ad::sum(a / b)); }, [&] { b.value().fill(1.0); }, {&a, &b}, "div", "rhs", "(4)");
    }
    SUBCASE("add, sub and scale save nothing: their operands may change") {
        ad::Var<double> loss = ad::sum((a + b) * 2.0 - b);
        a.value().fill(0.0), b.value().fill(0.0);
        a.zero_grad(), b.zero_grad();
        loss.backward();
        CHECK(ad::max_abs_diff(a.grad(), ad::full<double>({3, 4}, 2.0)) == 0.0);
        CHECK(ad::max_abs_diff(b.grad(), ad::full<double>({4}, 3.0)) == 0.0);
    }
}

TEST_CASE("every unary op checks the value its backward reads (input or output), and neg reads none") {
    ad::Param<double> a(ad::uniform<double>({2, 3}, 0.5, 2.0, 1));
    ad::Var<double> y;
    auto check_output = [&](const char* op, auto f) {
        auto make = [&] {
            y = f(a);
            return ad::Var<double>(ad::sum(y));
        };
        check_modified(make, [&] { Tensor h = y.value(); h.fill(0.25); }, {&a}, op, "output", "(2,3)");
    };
    auto check_input = [&](const char* op, auto f) {
        check_modified([&] { return ad::Var<double>(ad::sum(f(a))); }, [&] { a.value()(1, 2) = 1.25; }, {&a}, op, "input", "(2,3)");
    };
    check_output("tanh", [](const auto& x) { return ad::tanh(x); });
    check_output("sigmoid", [](const auto& x) { return ad::sigmoid(x); });
    check_input("relu", [](const auto& x) { return ad::relu(x); });
    check_input("gelu", [](const auto& x) { return ad::gelu(x); });
    check_input("abs", [](const auto& x) { return ad::abs(x); });
    check_input("pow", [](const auto& x) { return ad::pow(x, 3.0); });
    ad::Var<double> loss = ad::sum(-a);
    a.value().fill(9.0);
    a.zero_grad();
    loss.backward();
    CHECK(ad::max_abs_diff(a.grad(), ad::full<double>({2, 3}, -1.0)) == 0.0);
}

TEST_CASE("mse saves its input and target") {
    ad::Param<double> x(normal({3, 2}, 1));
    Tensor target = normal({3, 2}, 2);
    auto make = [&] { return ad::Var<double>(ad::mse(x, target)); };
    check_modified(make, [&] { target.fill(0.0); }, {&x}, "mse", "target", "(3,2)");
    check_modified(make, [&] { x.value().fill(0.0); }, {&x}, "mse", "input", "(3,2)");
}

namespace {
// A small attention problem for the fused record: (n, h, L, d) = (1, 2, 6, 4).
struct Attention {
    ad::Param<double> q{normal({1, 2, 6, 4}, 1)}, k{normal({1, 2, 6, 4}, 2)}, v{normal({1, 2, 6, 4}, 3)};
    ad::Param<double> bias{normal({1, 2, 6, 6}, 4)};
    Tensor additive = normal({6, 6}, 5);
    ad::Tensor<bool> keep = ad::full<bool>({6, 6}, true);
    ad::Tensor<bool> padding = ad::full<bool>({1, 6}, true);
    ad::Var<double> O;
    std::vector<ad::Param<double>*> params() { return {&q, &k, &v, &bias}; }
    auto expr() {
        return ad::matmul(ad::softmax(ad::matmul(q, ad::transpose(k)) * 0.5 + bias, ad::keep_mask(keep) | ad::key_padding_mask(padding),
                                      additive),
                          v);
    }
    ad::Var<double> loss() {
        static_assert(ad::is_fused_v<decltype(expr())>);
        O = expr();
        return ad::sum(ad::narrow(O, 3, 0, 3));  // narrow saves nothing: O is saved by the attention record only
    }
};
}  // namespace

TEST_CASE("fused attention: q, k, v, the bias, the masks and the output are checked") {
    Attention at;
    auto make = [&] { return at.loss(); };
    SUBCASE("q") { check_modified(make, [&] { at.q.value().fill(0.0); }, at.params(), "attention", "q", "(1,2,6,4)"); }
    SUBCASE("k") { check_modified(make, [&] { at.k.value()(0, 1, 5, 3) = 0.0; }, at.params(), "attention", "k", "(1,2,6,4)"); }
    SUBCASE("v") { check_modified(make, [&] { at.v.value().array() += 1.0; }, at.params(), "attention", "v", "(1,2,6,4)"); }
    SUBCASE("bias (trainable, full shape: the scores are kept)") {
        check_modified(make, [&] { at.bias.value().fill(0.0); }, at.params(), "attention", "bias", "(1,2,6,6)");
    }
    SUBCASE("additive mask") { check_modified(make, [&] { at.additive(0, 0) = -1e9; }, at.params(), "attention", "additive mask", "(6,6)"); }
    SUBCASE("keep mask") { check_modified(make, [&] { at.keep(5, 0) = false; }, at.params(), "attention", "keep mask", "(6,6)"); }
    SUBCASE("key padding mask") {
        check_modified(make, [&] { at.padding(0, 5) = false; }, at.params(), "attention", "key padding mask", "(1,6)");
    }
    SUBCASE("output") {
        check_modified(make, [&] { Tensor h = at.O.value(); h.fill(0.0); }, at.params(), "attention", "output", "(1,2,6,4)");
    }
    SUBCASE("a second backward (retain_graph) passes: the backward itself writes nothing saved") {
        at.O = at.expr();
        ad::Var<double> loss = ad::sum(at.O * at.O);  // O saved by mul too: the kernel's reads of O must not count as writes
        loss.backward(true);
        CHECK_NOTHROW(loss.backward());
    }
    check_unmodified(make);
}

TEST_CASE("fused attention with a modifier: a captured tensor is checked") {
    ad::Param<double> q(normal({1, 2, 5, 4}, 1)), k(normal({1, 2, 5, 4}, 2)), v(normal({1, 2, 5, 4}, 3));
    ad::Param<double> slopes(ad::uniform<double>({2}, 0.1, 1.0, 4));
    auto make = [&] {
        auto e = ad::matmul(ad::softmax(ad::matmul(q, ad::transpose(k)) + ad::alibi(slopes), ad::causal), v);
        static_assert(ad::is_fused_v<decltype(e)>);
        return ad::Var<double>(ad::sum(e));
    };
    check_modified(make, [&] { slopes.value()(1) = 2.0; }, {&q, &k, &v, &slopes}, "attention", "captured tensor", "(2)");
    SUBCASE("retain_graph: a second backward passes") {
        ad::Var<double> loss = make();
        loss.backward(true);
        CHECK_NOTHROW(loss.backward());
    }
}

TEST_CASE("modifier nodes on the generic path: score_mod's input and captured tensors, softmax with a mask function") {
    ad::NoFusionGuard generic;
    ad::Param<double> x(normal({2, 5, 5}, 1)), slopes(ad::uniform<double>({2}, 0.1, 1.0, 2)), w(normal({2, 5, 5}, 3));
    SUBCASE("score_mod input") {
        ad::Var<double> s;
        auto make = [&] {
            s = x * 1.0;
            return ad::Var<double>(ad::sum(ad::score_mod(s, ad::soft_cap(2.0)) * w));
        };
        check_modified(make, [&] { Tensor h = s.value(); h(0, 0, 0) = 9.0; }, {&x, &w}, "score_mod", "input", "(2,5,5)");
    }
    SUBCASE("score_mod captured tensor") {
        auto make = [&] { return ad::Var<double>(ad::sum(ad::score_mod(x, ad::score + ad::at(slopes, ad::b_idx)) * w)); };
        check_modified(make, [&] { slopes.value().fill(0.0); }, {&x, &slopes, &w}, "score_mod", "captured tensor", "(2)");
    }
    SUBCASE("softmax with a mask function saves its output") {
        ad::Var<double> y;
        auto make = [&] {
            y = ad::softmax(x, ad::causal_window(2));
            return ad::Var<double>(ad::sum(ad::narrow(y, 2, 0, 2)));
        };
        check_modified(make, [&] { Tensor h = y.value(); h.fill(0.0); }, {&x, &w}, "softmax", "output", "(2,5,5)");
    }
}

TEST_CASE("reading a saved value, as gradcheck or a print does, does not count as a write") {
    ad::Param<double> a(normal({3, 4}, 1)), b(normal({4, 2}, 2));
    ad::Var<double> y = ad::matmul(a, b);
    ad::Var<double> loss = ad::sum(y);
    const ad::Param<double>& ca = a;
    double s = 0;
    for (std::int64_t i = 0; i < ca.value().numel(); ++i) s += ca.value().data()[i];
    (void)fmt::format("{} {}", y.value(), s);
    CHECK_NOTHROW(loss.backward());
}

TEST_CASE("after a refused backward the graph is still recorded: a later backward throws the same way") {
    ad::Param<double> a(normal({3, 4}, 1)), b(normal({4, 2}, 2));
    ad::Var<double> loss = ad::sum(ad::matmul(a, b));
    const std::size_t records = ad::current_tape().size();
    b.value().fill(0.0);
    test::check_error([&] { loss.backward(); }, "backward", {"matmul's saved rhs (4,2)"});
    CHECK(ad::current_tape().size() == records);
    CHECK_FALSE(a.has_grad());
    CHECK_FALSE(b.has_grad());
    test::check_error([&] { loss.backward(); }, "backward", {"matmul's saved rhs (4,2)"});
}

TEST_CASE("layer_norm, rms_norm and bias_gelu: the input and the weight (bias_gelu: the bias) are checked") {
    ad::Param<double> x(normal({3, 4}, 1)), w(normal({4}, 2)), b(normal({4}, 3));
    // sum(tanh(·)): a plain sum of a normalised row has gradient 0 with respect to x
    auto ln = [&] { return ad::Var<double>(ad::sum(ad::tanh(ad::layer_norm(x, {4}, w, b)))); };
    auto rms = [&] { return ad::Var<double>(ad::sum(ad::tanh(ad::rms_norm(x, {4}, w, 1e-6)))); };
    auto gelu = [&] { return ad::Var<double>(ad::sum(ad::bias_gelu(x, b))); };
    SUBCASE("layer_norm input") { check_modified(ln, [&] { x.value()(0, 0) = 9.0; }, {&x, &w, &b}, "layer_norm", "input", "(3,4)"); }
    SUBCASE("layer_norm weight") { check_modified(ln, [&] { w.value().fill(1.0); }, {&x, &w, &b}, "layer_norm", "weight", "(4)"); }
    SUBCASE("rms_norm input") { check_modified(rms, [&] { x.value().fill(1.0); }, {&x, &w}, "rms_norm", "input", "(3,4)"); }
    SUBCASE("rms_norm weight") { check_modified(rms, [&] { w.value()(1) = 0.0; }, {&x, &w}, "rms_norm", "weight", "(4)"); }
    SUBCASE("bias_gelu input") { check_modified(gelu, [&] { x.value().fill(1.0); }, {&x, &b}, "bias_gelu", "input", "(3,4)"); }
    SUBCASE("bias_gelu bias") { check_modified(gelu, [&] { b.value()(2) = 0.0; }, {&x, &b}, "bias_gelu", "bias", "(4)"); }
    SUBCASE("layer_norm's bias may change: its backward does not read it") {
        ad::Var<double> loss = ln();
        b.value().fill(3.0);
        CHECK_NOTHROW(loss.backward());
    }
}

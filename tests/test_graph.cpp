// The graph view (graph.hpp): to_dot draws one box per record the Var depends on, with the op, the
// output's shape and whether a fused kernel computed it, the Params with their names and shapes, and
// an edge per input; it refuses Vars without a graph.

#include <doctest/doctest.h>

#include <string>

#include <autodiff/autodiff.hpp>

#include "check_error.hpp"

namespace ad = autodiff;
using test::check_error;

namespace {

int count(const std::string& s, const std::string& what) {
    int n = 0;
    for (std::size_t p = s.find(what); p != std::string::npos; p = s.find(what, p + 1)) ++n;
    return n;
}

struct Attention {
    ad::Param<float> Q{ad::randn<float>({1, 2, 8, 4}, 1), "Q"}, K{ad::randn<float>({1, 2, 8, 4}, 2), "K"},
        V{ad::randn<float>({1, 2, 8, 4}, 3), "V"}, B{ad::zeros<float>({2, 8, 8}), "bias"};
    ad::Var<float> out() const { return ad::matmul(ad::softmax(ad::matmul(Q, ad::transpose(K)) * 0.5f + B, ad::causal), V); }
};

}  // namespace

TEST_CASE("to_dot: fused attention is one record, drawn with its Params, shapes and the fused mark") {
    ad::Tape tape;  // records numbered from 0
    ad::TapeGuard guard(tape);
    Attention a;
    ad::Var<float> O = a.out();
    ad::Var<float> loss = ad::mse(O, ad::zeros<float>(O.shape()));
    const std::string dot = ad::to_dot(loss);
    CHECK(dot.rfind("digraph tape {", 0) == 0);
    CHECK(count(dot, "shape=box") == 2);  // the fused attention and the loss
    CHECK(count(dot, "(fused)") == 1);
    CHECK(count(dot, "attention (fused)\\n(1,2,8,4)") == 1);
    CHECK(count(dot, "MseLoss\\n()") == 1);
    for (const char* p : {"label=\"Q\\n(1,2,8,4)\"", "label=\"K\\n(1,2,8,4)\"", "label=\"V\\n(1,2,8,4)\"", "label=\"bias\\n(2,8,8)\""})
        CHECK_MESSAGE(count(dot, p) == 1, p);
    CHECK(count(dot, "-> r1;") == 2);  // the loss reads the attention and a constant target
    CHECK(count(dot, "label=\"const\\n(1,2,8,4)\"") == 1);
    CHECK(count(dot, "\"param Q(1,2,8,4)\" -> r0;") == 1);
}

TEST_CASE("to_dot: the generic path draws every node, none fused") {
    Attention a;
    ad::NoFusionGuard generic;
    ad::Var<float> O = a.out();
    const std::string dot = ad::to_dot(O);
    CHECK(count(dot, "(fused)") == 0);
    CHECK(count(dot, "shape=box") >= 4);
    CHECK(count(dot, "Softmax") >= 1);
    CHECK(count(dot, "MatMul") >= 2);
    CHECK(count(dot, "\\n(1,2,8,8)\"") >= 2);  // the scores
}

TEST_CASE("to_dot: only the records the Var depends on, and an input used twice has two edges") {
    ad::Tape tape;
    ad::TapeGuard guard(tape);
    ad::Param<double> x(ad::randn<double>({3, 3}, 1), "x");
    ad::Var<double> unrelated = ad::exp(x);
    ad::Var<double> y = ad::tanh(x) * ad::tanh(x);
    ad::Var<double> z = y + y;
    const std::string dot = ad::to_dot(z);
    CHECK(count(dot, "shape=box") == 4);  // tanh, tanh, mul, add; not exp
    CHECK(count(dot, "r3 -> r4;") == 2);  // y, used twice by the add
    CHECK(count(dot, "Exp") == 0);
    CHECK(count(dot, "Tanh\\n(3,3)") == 2);
    CHECK(count(dot, "Mul\\n(3,3)") == 1);
    CHECK(count(dot, "Add\\n(3,3)") == 1);
    CHECK(count(dot, "label=\"x\\n(3,3)\"") == 1);  // one node for the Param, however often it is used
    (void)unrelated;
}

TEST_CASE("to_dot refuses a Var without a graph") {
    ad::Param<double> x(ad::randn<double>({2}, 1), "x");
    ad::Var<double> constant = ad::exp(ad::Const<double>(ad::ones<double>({2})));
    check_error([&] { (void)ad::to_dot(constant); }, "to_dot", {"does not require grad"});
    ad::Var<double> s = ad::sum(ad::exp(x));
    s.backward();
    check_error([&] { (void)ad::to_dot(s); }, "to_dot", {"already freed"});
    ad::Var<double> leaf = x;
    check_error([&] { (void)ad::to_dot(leaf); }, "to_dot", {"is a Param's value, not a recorded result"});
}

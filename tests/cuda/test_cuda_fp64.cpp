// Gradient checks in fp64 ON THE DEVICE (issue 12, item 5), and double agreement with the CPU path.
//
// Gradient checks: for a device function y = f(x_1, ..., x_n) in double, a random projection
// L = Σ R ⊙ y (R fixed, drawn once) is differentiated two ways: the device backward with dy = R, and
// central differences (L(x + h·e_k) − L(x − h·e_k)) / 2h, each L a full device forward on the input
// with element k perturbed (the perturbed host copy uploaded; every other input unchanged; L summed in
// double on the host from the device output). Every element of every input is checked (the shapes are
// small), and the worst error err = |fd − g| / max(1, |g|) is reported.
//   Expected error: with h = 1e-6, the truncation error is h²/6·|L'''| ≈ 1e-13 (the functions are smooth
//   where sampled: relu, the masks and the dropout decisions are piecewise constant and no input lies
//   within h of a kink); the rounding error is about eps·|L|/h ≈ 1.1e-16·|L|/1e-6 ≈ 1e-10·|L|, and
//   |L| ≤ 30 here (≤ 200 terms of size O(1) with random signs), so errors of 1e-9 to 1e-8 are expected.
//   Tolerance: 1e-6, two orders above that. An error in a formula (a missing factor, a wrong mask, a
//   transposed product) gives errors of O(1e-2) to O(1).
// CPU agreement: the same double inputs through the CPU's kernels. Both sides compute in double and
// differ by summation order (K ≤ 32 terms) and by a few ulp of exp/log/erf/tanh: ~1e-15 relative. The
// tolerance 1e-12 (norm of the difference over the norm of the CPU's) leaves a large margin while
// catching any fp32 step (which would give ~1e-7).
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "../check_error.hpp"
#include "compare.hpp"
#include "autodiff/cuda/attention.hpp"
#include "autodiff/cuda/blas.hpp"
#include "autodiff/cuda/ops.hpp"
#include "autodiff/cuda/optim.hpp"
#include "autodiff/kernels/attention.hpp"
#include "autodiff/kernels/elementwise.hpp"
#include "autodiff/kernels/gemm.hpp"
#include "autodiff/kernels/linear.hpp"
#include "autodiff/kernels/reduce.hpp"
#include "autodiff/kernels/softmax.hpp"

namespace ad = autodiff;
using ad::DeviceTensor;
using ad::Shape;
using ad::Tensor;
using ad::test::relative_error;
using D = DeviceTensor<double>;
using H = Tensor<double>;

namespace {

constexpr double h = 1e-6;                // the central-difference step
constexpr double gradcheck_tolerance = 1e-6;
constexpr double cpu_tolerance = 1e-12;

// The worst errors seen, printed at the end of each test case (for docs/bench_gpufp64_2026-12-04.md).
struct Worst {
    double value = 0;
    std::string what;
    void update(double e, const std::string& w) {
        if (!(e <= value)) {  // NaN sticks
            value = e;
            what = w;
        }
    }
};

D up(const H& x) { return ad::to(x, ad::cuda); }
H down(const D& x) { return ad::to(x, ad::cpu); }

H randn(const Shape& s, std::uint64_t seed) { return ad::randn<double>(s, seed); }

// Σ R ⊙ y in double.
double project(const H& R, const H& y) {
    REQUIRE(R.shape() == y.shape());
    double s = 0;
    for (std::int64_t i = 0; i < y.numel(); ++i) s += R.data()[i] * y.data()[i];
    return s;
}

// L(inputs) on the device; grads: the device backward's gradient of L for each input.
using Loss = std::function<double(const std::vector<H>&)>;

// Central differences for every element of every input against the analytic gradients.
double gradcheck(const std::string& name, std::vector<H> inputs, const std::vector<std::string>& input_names, const Loss& loss,
                 const std::vector<H>& grads) {
    REQUIRE(inputs.size() == grads.size());
    Worst worst;
    for (std::size_t a = 0; a < inputs.size(); ++a) {
        REQUIRE(grads[a].shape() == inputs[a].shape());
        for (std::int64_t k = 0; k < inputs[a].numel(); ++k) {
            double& x = inputs[a].data()[k];
            const double x0 = x;
            x = x0 + h;
            const double plus = loss(inputs);
            x = x0 - h;
            const double minus = loss(inputs);
            x = x0;
            const double fd = (plus - minus) / (2 * h), g = grads[a].data()[k];
            const double err = std::abs(fd - g) / std::max(1.0, std::abs(g));
            worst.update(err, input_names[a] + "[" + std::to_string(k) + "]: fd " + std::to_string(fd) + " vs " + std::to_string(g));
        }
    }
    MESSAGE(name, ": worst gradcheck error ", worst.value, " at ", worst.what, " (tolerance ", gradcheck_tolerance, ")");
    CHECK(worst.value <= gradcheck_tolerance);
    return worst.value;
}

void check_cpu(const std::string& name, const H& gpu, const H& cpu) {
    const double err = relative_error(gpu, cpu);
    MESSAGE(name, ": relative error vs the CPU ", err, " (tolerance ", cpu_tolerance, ")");
    CHECK(err <= cpu_tolerance);
}

// Batch 0 keeps keys j < Lk − 2, the last batch keeps none (its rows are fully masked).
Tensor<bool> key_padding(std::int64_t batch, std::int64_t Lk) {
    Tensor<bool> m(Shape{batch, Lk});
    for (std::int64_t b = 0; b < batch; ++b)
        for (std::int64_t j = 0; j < Lk; ++j) m.data()[b * Lk + j] = b != batch - 1 && j < Lk - 2 * (b + 1);
    return m;
}

// ---- attention ------------------------------------------------------------------------------------

struct AttentionCase {
    Shape q, k, v, bias;  // bias rank 0: none
    bool causal = false, padding = false;
    double dropout = 0;
};

void check_attention(const AttentionCase& c, std::uint64_t seed) {
    const bool has_bias = c.bias.rank() > 0;
    std::vector<H> in{randn(c.q, seed), randn(c.k, seed + 1), randn(c.v, seed + 2)};
    std::vector<std::string> names{"Q", "K", "V"};
    if (has_bias) {
        in.push_back(randn(c.bias, seed + 3));
        names.emplace_back("bias");
    }
    Shape out = c.q;
    out[out.rank() - 1] = c.v.dim_from_end(1);
    const H R = randn(out, seed + 4);

    ad::AttentionOptions opt;
    opt.scale = 1.0 / std::sqrt(static_cast<double>(c.q.dim_from_end(1)));
    opt.bias_scale = 0.75;
    opt.mask.causal = c.causal;
    if (c.padding) opt.mask.key_padding = key_padding(c.q[0], c.k.dim_from_end(2));
    opt.dropout = {c.dropout, 4321, 9, true};
    ad::DeviceAttentionOptions dopt;
    dopt.scale = opt.scale;
    dopt.bias_scale = opt.bias_scale;
    dopt.causal = c.causal;
    if (c.padding) dopt.key_padding = ad::to(opt.mask.key_padding, ad::cuda);
    dopt.dropout = opt.dropout;

    const auto bias_of = [&](const std::vector<H>& x) { return has_bias ? up(x[3]) : D(); };
    const Loss loss = [&](const std::vector<H>& x) {
        return project(R, down(ad::attention_forward<double>(up(x[0]), up(x[1]), up(x[2]), bias_of(x), dopt).O));
    };
    const D Q = up(in[0]), K = up(in[1]), V = up(in[2]), B = bias_of(in), dO = up(R);
    const auto saved = ad::attention_forward<double>(Q, K, V, B, dopt);
    D dQ, dK, dV, dB;
    ad::attention_backward<double>(&dQ, &dK, &dV, has_bias ? &dB : nullptr, dO, Q, K, V, B, saved, dopt);
    std::vector<H> grads{down(dQ), down(dK), down(dV)};
    if (has_bias) grads.push_back(down(dB));
    gradcheck("attention", in, names, loss, grads);

    // The CPU's attention in double on the same inputs.
    auto cpu = ad::attention_forward<double>(in[0], in[1], in[2], has_bias ? in[3] : H(), H(), opt);
    H cQ, cK, cV, cB;
    ad::attention_backward<double>(&cQ, &cK, &cV, has_bias ? &cB : nullptr, R, in[0], in[1], in[2], has_bias ? in[3] : H(), H(), cpu, opt);
    check_cpu("O", down(saved.O), cpu.O);
    check_cpu("lse", down(saved.lse), cpu.lse);
    check_cpu("dQ", grads[0], cQ);
    check_cpu("dK", grads[1], cK);
    check_cpu("dV", grads[2], cV);
    if (has_bias) check_cpu("dbias", grads[3], cB);

    if (c.padding) {  // the last batch keeps no key: zero output and gradients there, lse = −inf
        const H O = down(saved.O), lse = down(saved.lse);
        const std::int64_t per = O.numel() / c.q[0], rows = lse.numel() / c.q[0];
        for (std::int64_t i = O.numel() - per; i < O.numel(); ++i) REQUIRE(O.data()[i] == 0.0);
        for (std::int64_t i = lse.numel() - rows; i < lse.numel(); ++i) REQUIRE(std::isinf(lse.data()[i]));
        const std::int64_t qper = grads[0].numel() / c.q[0];
        for (std::int64_t i = grads[0].numel() - qper; i < grads[0].numel(); ++i) REQUIRE(grads[0].data()[i] == 0.0);
    }
}

}  // namespace

TEST_CASE("fp64 device tensors: exact round trips, the layer's element type name") {
    const H x = randn(Shape{3, 5, 7}, 1);
    const H y = down(up(x));
    CHECK(std::memcmp(x.data(), y.data(), static_cast<std::size_t>(x.numel()) * sizeof(double)) == 0);
    CHECK(std::string(ad::dtype_name<double>()) == "float64");
    CHECK(up(x).bytes() == static_cast<std::size_t>(x.numel()) * sizeof(double));
}

TEST_CASE("fp64 gradcheck on the device: fused attention (Q, K, V, full and broadcast trainable bias, masks, dropout)") {
    SUBCASE("full bias, no mask") { check_attention({Shape{2, 2, 5, 4}, Shape{2, 2, 6, 4}, Shape{2, 2, 6, 3}, Shape{2, 2, 5, 6}}, 11); }
    SUBCASE("full bias, causal, key padding with a fully masked batch, dropout 0.3") {
        check_attention({Shape{2, 2, 5, 4}, Shape{2, 2, 6, 4}, Shape{2, 2, 6, 3}, Shape{2, 2, 5, 6}, true, true, 0.3}, 12);
    }
    SUBCASE("bias broadcast over the batch (1, H, Lq, Lk), causal, dropout 0.25") {
        check_attention({Shape{2, 2, 5, 4}, Shape{2, 2, 6, 4}, Shape{2, 2, 6, 3}, Shape{1, 2, 5, 6}, true, false, 0.25}, 13);
    }
    SUBCASE("bias broadcast over batch and heads (Lq, Lk), key padding with a fully masked batch, dropout 0.3") {
        check_attention({Shape{2, 2, 4, 3}, Shape{2, 2, 7, 3}, Shape{2, 2, 7, 2}, Shape{4, 7}, false, true, 0.3}, 14);
    }
    SUBCASE("per-key bias (B, 1, 1, Lk) with causal and key padding; rank 3 without a bias, causal") {
        check_attention({Shape{2, 1, 3, 4}, Shape{2, 1, 5, 4}, Shape{2, 1, 5, 4}, Shape{2, 1, 1, 5}, true, true}, 15);
        check_attention({Shape{3, 4, 4}, Shape{3, 6, 4}, Shape{3, 6, 5}, Shape{}, true}, 16);
    }
}

TEST_CASE("fp64 gradcheck on the device: matmul (every transpose pair, batched and broadcast) and linear") {
    for (int bits = 0; bits < 4; ++bits) {
        const bool ta = bits & 1, tb = bits & 2;
        INFO("trans_a ", ta, ", trans_b ", tb);
        const Shape a = ta ? Shape{2, 4, 3} : Shape{2, 3, 4}, b = tb ? Shape{5, 4} : Shape{4, 5};  // B broadcast over the batch
        std::vector<H> in{randn(a, 20 + bits), randn(b, 30 + bits)};
        const H R = randn(Shape{2, 3, 5}, 40 + bits);
        const Loss loss = [&](const std::vector<H>& x) { return project(R, down(ad::matmul_forward<double>(up(x[0]), ta, up(x[1]), tb))); };
        D dA, dB;
        ad::matmul_backward<double>(&dA, &dB, up(R), up(in[0]), ta, up(in[1]), tb);
        gradcheck("matmul", in, {"A", "B"}, loss, {down(dA), down(dB)});
        check_cpu("matmul C", down(ad::matmul_forward<double>(up(in[0]), ta, up(in[1]), tb)), ad::matmul_forward<double>(in[0], ta, in[1], tb));
        H cA, cB;
        ad::matmul_backward<double>(&cA, &cB, R, in[0], ta, in[1], tb);
        check_cpu("matmul dA", down(dA), cA);
        check_cpu("matmul dB", down(dB), cB);
    }
    // linear: y = x·Wᵀ + b, x (2, 3, 5), W (4, 5), b (4); dW and db accumulate into zeros.
    std::vector<H> in{randn(Shape{2, 3, 5}, 50), randn(Shape{4, 5}, 51), randn(Shape{4}, 52)};
    const H R = randn(Shape{2, 3, 4}, 53);
    const Loss loss = [&](const std::vector<H>& x) { return project(R, down(ad::linear_forward<double>(up(x[0]), up(x[1]), up(x[2])))); };
    D dx, dW(Shape{4, 5}), db(Shape{4});
    dW.zero();
    db.zero();
    ad::linear_backward<double>(&dx, &dW, &db, up(R), up(in[0]), up(in[1]));
    gradcheck("linear", in, {"x", "W", "b"}, loss, {down(dx), down(dW), down(db)});
    check_cpu("linear y", down(ad::linear_forward<double>(up(in[0]), up(in[1]), up(in[2]))), ad::linear_forward<double>(in[0], in[1], in[2]));
    H cx, cW = ad::zeros<double>(Shape{4, 5}), cb = ad::zeros<double>(Shape{4});
    ad::linear_backward<double>(&cx, &cW, &cb, R, in[0], in[1]);
    check_cpu("linear dx", down(dx), cx);
    check_cpu("linear dW", down(dW), cW);
    check_cpu("linear db", down(db), cb);
}

TEST_CASE("fp64 gradcheck on the device: softmax with causal and key-padding masks (a fully masked row) and an additive mask") {
    const Shape shape{2, 2, 4, 6};
    std::vector<H> in{randn(shape, 60)};
    const H add = randn(Shape{2, 4, 6}, 61), R = randn(shape, 62);
    ad::Mask mask = ad::causal | ad::key_padding_mask(key_padding(2, 6));
    ad::DeviceMask dmask;
    dmask.causal = true;
    dmask.key_padding = ad::to(mask.key_padding, ad::cuda);
    const D dadd = up(add);
    const Loss loss = [&](const std::vector<H>& x) { return project(R, down(ad::softmax_forward(up(x[0]), dmask, dadd))); };
    const D y = ad::softmax_forward(up(in[0]), dmask, dadd);
    const H dx = down(ad::softmax_backward(up(R), y));
    gradcheck("softmax", in, {"x"}, loss, {dx});
    const H cy = ad::softmax_forward<double>(in[0], mask, add);
    check_cpu("softmax y", down(y), cy);
    check_cpu("softmax dx", dx, ad::softmax_backward<double>(R, cy));
}

namespace {

template <class Op>
void check_unary(ad::DeviceUnaryOp op, const Op& cpu_op, const char* name, bool positive, Worst& worst, float alpha = 1.f) {
    INFO(name);
    H x = randn(Shape{3, 7}, 70);
    // log and sqrt: positive inputs; relu: away from its kink at 0 (|x| ≥ 0.05, far more than h).
    for (std::int64_t i = 0; i < x.numel(); ++i) {
        double& v = x.data()[i];
        if (positive) v = std::abs(v) + 0.5;
        else if (std::abs(v) < 0.05) v += v < 0 ? -0.05 : 0.05;
    }
    const H R = randn(x.shape(), 71);
    const Loss loss = [&](const std::vector<H>& in) { return project(R, down(ad::unary_forward(op, up(in[0]), alpha))); };
    const H g = down(ad::unary_backward(op, up(R), up(x), alpha));
    worst.update(gradcheck(name, {x}, {"x"}, loss, {g}), name);
    const H y = ad::unary_forward<double>(cpu_op, x);
    check_cpu(std::string(name) + " forward", down(ad::unary_forward(op, up(x), alpha)), y);
    check_cpu(std::string(name) + " backward", g, ad::unary_backward<double>(cpu_op, R, x, y));
}

}  // namespace

TEST_CASE("fp64 gradcheck on the device: every elementwise op (the expression evaluator in double)") {
    using U = ad::DeviceUnaryOp;
    Worst worst;
    check_unary(U::neg, ad::Neg{}, "neg", false, worst);
    check_unary(U::scale, ad::Scale<double>{-1.75}, "scale", false, worst, -1.75f);
    check_unary(U::exp, ad::Exp{}, "exp", false, worst);
    check_unary(U::log, ad::Log{}, "log", true, worst);
    check_unary(U::tanh, ad::Tanh{}, "tanh", false, worst);
    check_unary(U::sigmoid, ad::Sigmoid{}, "sigmoid", false, worst);
    check_unary(U::relu, ad::Relu{}, "relu", false, worst);
    check_unary(U::square, ad::Pow<double>{2.0}, "square", false, worst);
    check_unary(U::sqrt, ad::Pow<double>{0.5}, "sqrt", true, worst);
    check_unary(U::gelu, ad::Gelu{ad::GeluApproximate::none}, "gelu", false, worst);
    check_unary(U::gelu_tanh, ad::Gelu{ad::GeluApproximate::tanh}, "gelu_tanh", false, worst);

    using B = ad::DeviceBinaryOp;
    H a = randn(Shape{4, 5}, 80), b = randn(Shape{4, 5}, 81);
    for (std::int64_t i = 0; i < b.numel(); ++i) b.data()[i] = std::abs(b.data()[i]) + 0.5;  // away from 0 for div
    const H R = randn(a.shape(), 82);
    const std::pair<B, const char*> ops[] = {{B::add, "add"}, {B::sub, "sub"}, {B::mul, "mul"}, {B::div, "div"}};
    for (const auto& [op, name] : ops) {
        INFO(name);
        const B o = op;
        const Loss loss = [&](const std::vector<H>& in) { return project(R, down(ad::binary_forward(o, up(in[0]), up(in[1])))); };
        D da, db;
        ad::binary_backward(o, &da, &db, up(R), up(a), up(b));
        worst.update(gradcheck(name, {a, b}, {"a", "b"}, loss, {down(da), down(db)}), name);
        // The formulas in double on the host.
        H y(a.shape()), ga(a.shape()), gb(a.shape());
        for (std::int64_t i = 0; i < a.numel(); ++i) {
            const double x = a.data()[i], z = b.data()[i], r = R.data()[i];
            switch (o) {
                case B::add: y.data()[i] = x + z, ga.data()[i] = r, gb.data()[i] = r; break;
                case B::sub: y.data()[i] = x - z, ga.data()[i] = r, gb.data()[i] = -r; break;
                case B::mul: y.data()[i] = x * z, ga.data()[i] = r * z, gb.data()[i] = r * x; break;
                case B::div: y.data()[i] = x / z, ga.data()[i] = r / z, gb.data()[i] = -r * x / (z * z); break;
            }
        }
        check_cpu(std::string(name) + " forward", down(ad::binary_forward(o, up(a), up(b))), y);
        check_cpu(std::string(name) + " da", down(da), ga);
        check_cpu(std::string(name) + " db", down(db), gb);
    }
    MESSAGE("elementwise: worst gradcheck error over all ops ", worst.value, " (", worst.what, ")");
}

TEST_CASE("fp64 gradcheck on the device: mse_loss, dropout; sums in double") {
    std::vector<H> in{randn(Shape{3, 7}, 90), randn(Shape{3, 7}, 91)};
    const double dloss = 0.75;
    const Loss loss = [&](const std::vector<H>& x) { return dloss * ad::mse_loss_forward(up(x[0]), up(x[1])); };
    D da, db;
    ad::mse_loss_backward<double>(&da, &db, dloss, up(in[0]), up(in[1]));
    gradcheck("mse_loss", in, {"a", "b"}, loss, {down(da), down(db)});
    const double l = ad::mse_loss_forward(up(in[0]), up(in[1])), l_cpu = ad::mse_loss_forward<double>(in[0], in[1]);
    MESSAGE("mse_loss: ", l, " vs the CPU's ", l_cpu, ", relative ", std::abs(l - l_cpu) / l_cpu);
    CHECK(std::abs(l - l_cpu) <= cpu_tolerance * l_cpu);
    H ca, cb;
    ad::mse_loss_backward<double>(&ca, &cb, dloss, in[0], in[1]);
    check_cpu("mse da", down(da), ca);
    check_cpu("mse db", down(db), cb);

    // dropout: the same decisions as the CPU (Philox), the scale 1/(1 − rate) in double.
    const ad::DropoutDescriptor d{0.3, 0xfeedull, 5, true};
    std::vector<H> x{randn(Shape{5, 9}, 92)};
    const H R = randn(Shape{5, 9}, 93);
    const Loss dl = [&](const std::vector<H>& v) { return project(R, down(ad::dropout_forward(d, up(v[0])))); };
    const H dx = down(ad::dropout_backward(d, up(R)));
    gradcheck("dropout", x, {"x"}, dl, {dx});
    check_cpu("dropout y", down(ad::dropout_forward(d, up(x[0]))), ad::dropout_forward<double>(d, x[0]));
    check_cpu("dropout dx", dx, ad::dropout_backward<double>(d, R));

    // sum and sum_rows accumulate in double.
    const H s = randn(Shape{37, 3, 101}, 94);
    const double sum = ad::sum_forward(up(s)), sum_cpu = ad::sum_forward<double>(s);
    MESSAGE("sum: ", sum, " vs the CPU's ", sum_cpu);
    CHECK(std::abs(sum - sum_cpu) <= cpu_tolerance * std::sqrt(static_cast<double>(s.numel())));
    H rows = ad::zeros<double>(Shape{101});
    for (std::int64_t r = 0; r < 37 * 3; ++r)
        for (std::int64_t j = 0; j < 101; ++j) rows.data()[j] += s.data()[r * 101 + j];
    check_cpu("sum_rows", down(ad::sum_rows_forward(up(s))), rows);
}

TEST_CASE("fp64: repeated runs of the attention backward are bitwise equal") {
    const D Q = up(randn(Shape{2, 2, 9, 4}, 100)), K = up(randn(Shape{2, 2, 11, 4}, 101)), V = up(randn(Shape{2, 2, 11, 4}, 102));
    const D B = up(randn(Shape{2, 9, 11}, 103)), dO = up(randn(Shape{2, 2, 9, 4}, 104));
    ad::DeviceAttentionOptions opt;
    opt.causal = true;
    opt.dropout = {0.2, 7, 3, true};
    H first[4], second[4];
    for (H* out : {first, second}) {
        const auto saved = ad::attention_forward<double>(Q, K, V, B, opt);
        D g[4];
        ad::attention_backward<double>(&g[0], &g[1], &g[2], &g[3], dO, Q, K, V, B, saved, opt);
        for (int i = 0; i < 4; ++i) out[i] = down(g[i]);
    }
    for (int i = 0; i < 4; ++i)
        CHECK(std::memcmp(first[i].data(), second[i].data(), static_cast<std::size_t>(first[i].numel()) * sizeof(double)) == 0);
}

TEST_CASE("fp64: unsupported combinations throw autodiff::Error naming the op and the type") {
    using test::check_error;
    D w(Shape{4}), g(Shape{4});
    ad::DeviceAdamState state;
    check_error([&] { ad::adam_step(w, g, state, {}); }, "adam_step (cuda)", {"element type float64 is not supported"});
    check_error([&] { ad::DeviceAdam<double>({w}, {}); }, "DeviceAdam", {"element type float64 is not supported"});
    // The checks of the other types apply to double alike.
    const D Q(Shape{2, 3, 4}), K(Shape{2, 5, 6});
    check_error([&] { (void)ad::attention_forward<double>(Q, K, K, {}, {}); }, "attention (cuda)", {"(2,3,4)", "(2,5,6)"});
    check_error([&] { (void)ad::to(D(), ad::cpu); }, "to(cpu)", {"float64", "undefined"});
}

// The device functional layer (cuda/blas.hpp, ops.hpp, optim.hpp, expr.cuh) against the CPU's
// functional API: GEMMs and linear through cuBLAS, the elementwise ops of the one expression
// evaluator, sums, softmax with masks, dropout, Adam; determinism and bad input.
// Tolerances, as relative errors (norm of the difference over the norm of the CPU's, per tensor):
//  - fp32: 1e-5. cuBLAS (CUBLAS_COMPUTE_32F, no TF32) and the CPU sum in different orders: rounding
//    of O(1e-7) relative grows like √K, far under 1e-5 at K ≤ 64; elementwise formulas differ from
//    the CPU's by the device's erff/tanhf/expf (within a few ulp) and the CPU's rational erf (4e-7).
//  - bf16/fp16: inputs rounded to 16 bits on the device and read back, so both sides see the same
//    values; the GPU accumulates in fp32 and rounds the result once: 2^-9 ≈ 2e-3 relative per element
//    for bf16 (2^-12 for fp16), 1e-2 (bf16) and 2e-3 (fp16) as tolerances.
#include <doctest/doctest.h>

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "../check_error.hpp"
#include "compare.hpp"
#include "autodiff/cuda/blas.hpp"
#include "autodiff/cuda/ops.hpp"
#include "autodiff/cuda/optim.hpp"
#include "autodiff/kernels/elementwise.hpp"
#include "autodiff/kernels/gemm.hpp"
#include "autodiff/kernels/layout.hpp"
#include "autodiff/kernels/linear.hpp"
#include "autodiff/kernels/reduce.hpp"
#include "fused_expression.hpp"

namespace ad = autodiff;
using ad::DeviceTensor;
using ad::Shape;
using ad::Tensor;
using ad::test::bitwise_equal;
using ad::test::check_close;

namespace {

constexpr double fp32_tolerance = 1e-5;
constexpr double bf16_tolerance = 1e-2;
constexpr double fp16_tolerance = 2e-3;

template <class T>
constexpr double tolerance_of() {
    if constexpr (std::is_same_v<T, float>) return fp32_tolerance;
    else if constexpr (std::is_same_v<T, ad::bf16>) return bf16_tolerance;
    else return fp16_tolerance;
}

// A device tensor of random values in T, and its host copy (the values the device holds, bf16- or
// fp16-rounded), so the CPU reference sees exactly the GPU's inputs.
template <class T>
struct Input {
    DeviceTensor<T> device;
    Tensor<float> host;
};
template <class T>
Input<T> random_input(const Shape& shape, std::uint64_t seed) {
    DeviceTensor<T> d = ad::to<T>(ad::randn<float>(shape, seed), ad::cuda);
    Tensor<float> h = ad::to(d, ad::cpu);
    return {d, h};
}

std::string flags_name(ad::GemmFlags f) {
    return std::string("trans_a ") + (f.trans_a ? "1" : "0") + ", trans_b " + (f.trans_b ? "1" : "0") + ", trans_c " + (f.trans_c ? "1" : "0");
}

// Shapes of A and B for op_a(A) (M, K) and op_b(B) (K, N), with the given batch prefixes.
Shape operand(Shape batch, std::int64_t rows, std::int64_t cols, bool trans) {
    batch.push_back(trans ? cols : rows);
    batch.push_back(trans ? rows : cols);
    return batch;
}

// C = beta·C + alpha·op_c(op_a(A)·op_b(B)) and its backward on the GPU and the CPU, every flag combination.
template <class T>
void check_gemm(const Shape& a_batch, const Shape& b_batch, bool reduce, std::uint64_t seed) {
    const std::int64_t M = 13, K = 24, N = 9;
    for (int bits = 0; bits < 8; ++bits) {
        const ad::GemmFlags f{(bits & 1) != 0, (bits & 2) != 0, (bits & 4) != 0};
        INFO(flags_name(f));
        const auto A = random_input<T>(operand(a_batch, M, K, f.trans_a), seed);
        const auto B = random_input<T>(operand(b_batch, K, N, f.trans_b), seed + 1);
        Shape c = ad::gemm_output_shape("test", A.host.shape(), f.trans_a, B.host.shape(), f.trans_b);
        if (f.trans_c) std::swap(c[c.rank() - 1], c[c.rank() - 2]);
        if (reduce) c = Shape{c.dim_from_end(2), c.dim_from_end(1)};
        auto C = random_input<T>(c, seed + 2);
        Tensor<float> C_cpu = C.host.clone();
        ad::strided_batched_gemm<float>(0.5f, A.host, B.host, 0.25f, C_cpu, f);
        ad::strided_batched_gemm(0.5f, A.device, B.device, 0.25f, C.device, f);
        check_close("C (" + flags_name(f) + ")", C.device, C_cpu, tolerance_of<T>());

        // Backward with beta = 1: accumulated into random gradients. A batch-summed C has no backward
        // (the CPU's strided_batched_gemm_backward refuses it alike: see the bad-input test).
        if (reduce) continue;
        const auto dC = random_input<T>(c, seed + 3);
        auto dA = random_input<T>(A.host.shape(), seed + 4), dB = random_input<T>(B.host.shape(), seed + 5);
        Tensor<float> dA_cpu = dA.host.clone(), dB_cpu = dB.host.clone();
        ad::strided_batched_gemm_backward<float>(&dA_cpu, &dB_cpu, dC.host, 0.5f, A.host, B.host, 1.f, f);
        ad::strided_batched_gemm_backward(&dA.device, &dB.device, dC.device, 0.5f, A.device, B.device, 1.f, f);
        check_close("dA", dA.device, dA_cpu, tolerance_of<T>());
        check_close("dB", dB.device, dB_cpu, tolerance_of<T>());
    }
}

}  // namespace

// ---- GEMM and linear ------------------------------------------------------------------------------

TEST_CASE("strided_batched_gemm: every transpose flag, batched, broadcast and batch-summed C, as the CPU") {
    SUBCASE("fp32: batched A and B") { check_gemm<float>(Shape{2, 3}, Shape{2, 3}, false, 11); }
    SUBCASE("fp32: rank-2 A broadcast over B's batch") { check_gemm<float>(Shape{}, Shape{4}, false, 21); }
    SUBCASE("fp32: rank-2 B broadcast over A's batch") { check_gemm<float>(Shape{2, 2}, Shape{}, false, 31); }
    SUBCASE("fp32: rank-2 C receives the sum over the batch") { check_gemm<float>(Shape{3}, Shape{3}, true, 41); }
    SUBCASE("fp32: plain matrices") { check_gemm<float>(Shape{}, Shape{}, false, 51); }
    SUBCASE("bf16: batched A and B") { check_gemm<ad::bf16>(Shape{2, 3}, Shape{2, 3}, false, 61); }
    SUBCASE("bf16: rank-2 C receives the sum over the batch") { check_gemm<ad::bf16>(Shape{3}, Shape{3}, true, 71); }
    SUBCASE("fp16: rank-2 B broadcast") { check_gemm<ad::fp16>(Shape{2}, Shape{}, false, 81); }
}

TEST_CASE("matmul: forward and backward allocate and match the CPU") {
    const auto A = random_input<float>(Shape{2, 7, 5}, 1), B = random_input<float>(Shape{2, 6, 5}, 2);
    const auto dC = random_input<float>(Shape{2, 7, 6}, 3);
    check_close("C", ad::matmul_forward<float>(A.device, false, B.device, true), ad::matmul_forward<float>(A.host, false, B.host, true),
                fp32_tolerance);
    Tensor<float> dA, dB;
    ad::matmul_backward<float>(&dA, &dB, dC.host, A.host, false, B.host, true);
    DeviceTensor<float> gA, gB;
    ad::matmul_backward<float>(&gA, &gB, dC.device, A.device, false, B.device, true);
    check_close("dA", gA, dA, fp32_tolerance);
    check_close("dB", gB, dB, fp32_tolerance);
    // A gradient that is not wanted is not computed.
    DeviceTensor<float> only_b;
    ad::matmul_backward<float>(nullptr, &only_b, dC.device, A.device, false, B.device, true);
    check_close("dB alone", only_b, dB, fp32_tolerance);
}

template <class T>
void check_linear(const Shape& x_shape, bool bias, std::uint64_t seed) {
    const std::int64_t in = x_shape.dim_from_end(1), out = 11;
    const auto x = random_input<T>(x_shape, seed), W = random_input<T>(Shape{out, in}, seed + 1);
    const auto b = bias ? random_input<T>(Shape{out}, seed + 2) : Input<T>{};
    const Tensor<float> y = ad::linear_forward<float>(x.host, W.host, b.host);
    check_close("y", ad::linear_forward(x.device, W.device, b.device), y, tolerance_of<T>());
    const auto dy = random_input<T>(y.shape(), seed + 3);
    // dW and db accumulate into what they hold, on both sides.
    auto dW = random_input<T>(W.host.shape(), seed + 4), db = random_input<T>(Shape{out}, seed + 5);
    Tensor<float> dx_cpu, dW_cpu = dW.host.clone(), db_cpu = db.host.clone();
    ad::linear_backward<float>(&dx_cpu, &dW_cpu, &db_cpu, dy.host, x.host, W.host);
    DeviceTensor<T> dx;
    ad::linear_backward(&dx, &dW.device, &db.device, dy.device, x.device, W.device);
    check_close("dx", dx, dx_cpu, tolerance_of<T>());
    check_close("dW", dW.device, dW_cpu, tolerance_of<T>());
    check_close("db", db.device, db_cpu, tolerance_of<T>());
}

TEST_CASE("linear: y = x·Wᵀ + b and its backward (dW and db accumulated) match the CPU") {
    SUBCASE("fp32, rank 3 with bias") { check_linear<float>(Shape{2, 9, 16}, true, 5); }
    SUBCASE("fp32, rank 1 without bias") { check_linear<float>(Shape{16}, false, 6); }
    SUBCASE("fp32, rank 4, one row") { check_linear<float>(Shape{1, 1, 1, 33}, true, 7); }
    SUBCASE("bf16, rank 3 with bias") { check_linear<ad::bf16>(Shape{2, 9, 16}, true, 8); }
    SUBCASE("fp16, rank 2 with bias") { check_linear<ad::fp16>(Shape{17, 16}, true, 9); }
}

// ---- elementwise: the one expression evaluator ------------------------------------------------------

template <class T, class Op>
void check_unary(ad::DeviceUnaryOp op, const Op& cpu_op, const char* name, bool positive, float alpha = 1.f) {
    INFO(name);
    Tensor<float> x0 = ad::randn<float>(Shape{3, 257}, 17);
    if (positive) x0.array() = x0.array().abs() + 0.5f;
    const DeviceTensor<T> xd = ad::to<T>(x0, ad::cuda);
    const Tensor<float> x = ad::to(xd, ad::cpu);
    const Tensor<float> y = ad::unary_forward<float>(cpu_op, x);
    check_close(std::string(name) + " forward", ad::unary_forward(op, xd, alpha), y, tolerance_of<T>());
    const auto dy = random_input<T>(x.shape(), 18);
    check_close(std::string(name) + " backward", ad::unary_backward(op, dy.device, xd, alpha), ad::unary_backward<float>(cpu_op, dy.host, x, y),
                tolerance_of<T>());
}

template <class T>
void check_all_unary() {
    using U = ad::DeviceUnaryOp;
    check_unary<T>(U::neg, ad::Neg{}, "neg", false);
    check_unary<T>(U::scale, ad::Scale<float>{-1.75f}, "scale", false, -1.75f);
    check_unary<T>(U::exp, ad::Exp{}, "exp", false);
    check_unary<T>(U::log, ad::Log{}, "log", true);
    check_unary<T>(U::tanh, ad::Tanh{}, "tanh", false);
    check_unary<T>(U::sigmoid, ad::Sigmoid{}, "sigmoid", false);
    check_unary<T>(U::relu, ad::Relu{}, "relu", false);
    check_unary<T>(U::square, ad::Pow<float>{2.f}, "square", false);
    check_unary<T>(U::sqrt, ad::Pow<float>{0.5f}, "sqrt", true);
    check_unary<T>(U::gelu, ad::Gelu{ad::GeluApproximate::none}, "gelu", false);
    check_unary<T>(U::gelu_tanh, ad::Gelu{ad::GeluApproximate::tanh}, "gelu_tanh", false);
}

TEST_CASE("elementwise unary ops: forward and forward-mode gradient match the CPU's ops") {
    SUBCASE("fp32") { check_all_unary<float>(); }
    SUBCASE("bf16") { check_all_unary<ad::bf16>(); }
}

// out = f(a, b) and its two partials, against the formulas in double.
template <class T>
void check_binary(ad::DeviceBinaryOp op, const char* name, double (*f)(double, double), double (*fa)(double, double), double (*fb)(double, double)) {
    INFO(name);
    const auto a = random_input<T>(Shape{5, 3, 41}, 31);
    Tensor<float> b0 = ad::randn<float>(a.host.shape(), 32);
    b0.array() = b0.array().abs() + 0.5f;  // away from 0 for div
    const DeviceTensor<T> bd = ad::to<T>(b0, ad::cuda);
    const Tensor<float> b = ad::to(bd, ad::cpu);
    const auto dy = random_input<T>(a.host.shape(), 33);
    Tensor<float> out(a.host.shape()), da(a.host.shape()), db(a.host.shape());
    for (std::int64_t i = 0; i < out.numel(); ++i) {
        const double x = a.host.data()[i], y = b.data()[i], g = dy.host.data()[i];
        out.data()[i] = static_cast<float>(f(x, y));
        da.data()[i] = static_cast<float>(g * fa(x, y));
        db.data()[i] = static_cast<float>(g * fb(x, y));
    }
    check_close(std::string(name) + " forward", ad::binary_forward(op, a.device, bd), out, tolerance_of<T>());
    DeviceTensor<T> gda, gdb;
    ad::binary_backward(op, &gda, &gdb, dy.device, a.device, bd);
    check_close(std::string(name) + " da", gda, da, tolerance_of<T>());
    check_close(std::string(name) + " db", gdb, db, tolerance_of<T>());
}

TEST_CASE("elementwise binary ops: forward and both partials match their formulas") {
    using B = ad::DeviceBinaryOp;
    check_binary<float>(B::add, "add", [](double a, double b) { return a + b; }, [](double, double) { return 1.0; }, [](double, double) { return 1.0; });
    check_binary<float>(B::sub, "sub", [](double a, double b) { return a - b; }, [](double, double) { return 1.0; }, [](double, double) { return -1.0; });
    check_binary<float>(B::mul, "mul", [](double a, double b) { return a * b; }, [](double, double b) { return b; }, [](double a, double) { return a; });
    check_binary<float>(B::div, "div", [](double a, double b) { return a / b; }, [](double, double b) { return 1 / b; },
                        [](double a, double b) { return -a / (b * b); });
    check_binary<ad::fp16>(B::mul, "mul (fp16)", [](double a, double b) { return a * b; }, [](double, double b) { return b; },
                           [](double a, double) { return a; });
}

TEST_CASE("a fused expression built in a CUDA file: value and forward-mode gradients of inputs used several times") {
    const auto a = random_input<float>(Shape{1000}, 41), b = random_input<float>(Shape{1000}, 42), dy = random_input<float>(Shape{1000}, 43);
    DeviceTensor<float> y(Shape{1000}), da(Shape{1000}), db(Shape{1000});
    REQUIRE(test::fused_expression_forward(a.device.data(), b.device.data(), y.data(), 1000) == cudaSuccess);
    REQUIRE(test::fused_expression_backward(a.device.data(), b.device.data(), dy.device.data(), da.data(), db.data(), 1000) == cudaSuccess);
    Tensor<float> y_ref(Shape{1000}), da_ref(Shape{1000}), db_ref(Shape{1000});
    for (std::int64_t i = 0; i < 1000; ++i) {
        const double x = a.host.data()[i], z = b.host.data()[i], g = dy.host.data()[i];
        // y = t·x/s − r²/4 with t = tanh(x·z + 1/2), s = 1 + σ(z), r = relu(x − z)
        const double t = std::tanh(x * z + 0.5), sig = 1 / (1 + std::exp(-z)), s = 1 + sig, r = x - z > 0 ? x - z : 0;
        const double dt = 1 - t * t, dr = x - z > 0 ? 1 : 0;
        y_ref.data()[i] = static_cast<float>(t * x / s - r * r / 4);
        da_ref.data()[i] = static_cast<float>(g * ((dt * z * x + t) / s - r * dr / 2));
        db_ref.data()[i] = static_cast<float>(g * (dt * x * x / s - t * x * sig * (1 - sig) / (s * s) + r * dr / 2));
    }
    check_close("y", y, y_ref, fp32_tolerance);
    check_close("da", da, da_ref, fp32_tolerance);
    check_close("db", db, db_ref, fp32_tolerance);
}

// ---- reductions -----------------------------------------------------------------------------------

TEST_CASE("sums: the full sum and the sum over rows match the CPU") {
    const auto x = random_input<float>(Shape{37, 3, 1001}, 51);
    double ref = 0;
    for (std::int64_t i = 0; i < x.host.numel(); ++i) ref += x.host.data()[i];
    const float s = ad::sum_forward(x.device);
    MESSAGE("sum: ", s, " vs ", ref);
    CHECK(std::abs(s - ref) <= 1e-5 * std::sqrt(static_cast<double>(x.host.numel())) * 4);
    CHECK(std::abs(s - ad::sum_forward<float>(x.host)) <= 1e-5 * std::sqrt(static_cast<double>(x.host.numel())) * 4);
    CHECK(ad::sum_forward(DeviceTensor<float>(Shape{0})) == 0.f);

    Tensor<float> rows(Shape{1001});
    rows.array() = 0;
    for (std::int64_t r = 0; r < 37 * 3; ++r)
        for (std::int64_t j = 0; j < 1001; ++j) rows.data()[j] += x.host.data()[r * 1001 + j];
    check_close("sum_rows", ad::sum_rows_forward(x.device), rows, fp32_tolerance);
}

TEST_CASE("mse_loss: forward and backward match the CPU") {
    const auto a = random_input<float>(Shape{3, 17, 29}, 55), b = random_input<float>(Shape{3, 17, 29}, 56);
    const float loss = ad::mse_loss_forward(a.device, b.device), loss_cpu = ad::mse_loss_forward<float>(a.host, b.host);
    MESSAGE("mse_loss: ", loss, " vs ", loss_cpu);
    CHECK(std::abs(loss - loss_cpu) <= 1e-5 * std::abs(loss_cpu));
    Tensor<float> da, db;
    ad::mse_loss_backward<float>(&da, &db, 0.75f, a.host, b.host);
    DeviceTensor<float> gda, gdb;
    ad::mse_loss_backward<float>(&gda, &gdb, 0.75f, a.device, b.device);
    check_close("da", gda, da, fp32_tolerance);
    check_close("db", gdb, db, fp32_tolerance);
    const auto ab = random_input<ad::bf16>(Shape{1000}, 57), bb = random_input<ad::bf16>(Shape{1000}, 58);
    const float loss_bf16 = ad::mse_loss_forward(ab.device, bb.device), ref = ad::mse_loss_forward<float>(ab.host, bb.host);
    MESSAGE("mse_loss (bf16): ", loss_bf16, " vs ", ref);
    CHECK(std::abs(loss_bf16 - ref) <= bf16_tolerance * ref);
}

// ---- layout ----------------------------------------------------------------------------------------

TEST_CASE("permute and narrow: the CPU's copies; split and merge heads as reshape + permute") {
    const auto x = random_input<float>(Shape{2, 5, 3, 4}, 91);
    for (const ad::Permutation perm : {ad::Permutation{0, 2, 1, 3}, ad::Permutation{3, 1, 0, 2}, ad::Permutation{0, 1, 2, 3}}) {
        INFO("perm ", perm[0], perm[1], perm[2], perm[3]);
        CHECK(bitwise_equal(ad::to(ad::permute_forward(x.device, perm), ad::cpu), ad::permute_forward<float>(x.host, perm)));
    }
    const auto x3 = random_input<ad::bf16>(Shape{7, 3, 5}, 92);
    CHECK(bitwise_equal(ad::to(ad::permute_forward(x3.device, {2, 0, 1, 0}), ad::cpu), ad::permute_forward<float>(x3.host, {2, 0, 1, 0})));
    // split_heads then merge_heads gives x back.
    const DeviceTensor<float> heads = ad::permute_forward(x.device.reshape(Shape{2, 5, 3, 4}), {0, 2, 1, 3});
    CHECK(heads.shape() == Shape{2, 3, 5, 4});
    CHECK(bitwise_equal(ad::to(ad::permute_forward(heads, ad::inverse_permutation({0, 2, 1, 3}, 4)), ad::cpu), x.host));

    for (int dim = 0; dim < 4; ++dim) {
        INFO("dim ", dim);
        const std::int64_t start = dim == 1 ? 2 : 1, length = dim == 1 ? 3 : 1;
        const Tensor<float> y = ad::narrow_forward<float>(x.host, dim, start, length);
        CHECK(bitwise_equal(ad::to(ad::narrow_forward(x.device, dim, start, length), ad::cpu), y));
        const auto dy = random_input<float>(y.shape(), 93 + static_cast<std::uint64_t>(dim));
        CHECK(bitwise_equal(ad::to(ad::narrow_backward(dy.device, x.host.shape(), dim, start), ad::cpu),
                            ad::narrow_backward<float>(dy.host, x.host.shape(), dim, start)));
    }
}

// ---- softmax ---------------------------------------------------------------------------------------

Tensor<bool> key_padding(std::int64_t batch, std::int64_t Lk) {  // batch 0 keeps a prefix, the last keeps nothing
    Tensor<bool> m(Shape{batch, Lk});
    for (std::int64_t b = 0; b < batch; ++b)
        for (std::int64_t j = 0; j < Lk; ++j) m.data()[b * Lk + j] = b != batch - 1 && j < Lk - 3 * (b + 1);
    return m;
}

template <class T>
void check_softmax(const Shape& shape, const ad::Mask& mask, const Shape& additive_shape, std::uint64_t seed) {
    const auto x = random_input<T>(shape, seed);
    const auto add = additive_shape.rank() ? random_input<T>(additive_shape, seed + 1) : Input<T>{};
    ad::DeviceMask dmask;
    dmask.causal = mask.causal;
    if (mask.keep.defined()) dmask.keep = ad::to(mask.keep, ad::cuda);
    if (mask.key_padding.defined()) dmask.key_padding = ad::to(mask.key_padding, ad::cuda);
    const Tensor<float> y = ad::softmax_forward<float>(x.host, mask, add.host);
    const DeviceTensor<T> yd = ad::softmax_forward(x.device, dmask, add.device);
    check_close("y", yd, y, tolerance_of<T>());
    const auto dy = random_input<T>(shape, seed + 2);
    // The backward reads y: the CPU's on the CPU, the GPU's on the GPU.
    check_close("dx", ad::softmax_backward(dy.device, yd), ad::softmax_backward<float>(dy.host, y), tolerance_of<T>());
}

TEST_CASE("softmax: masks (causal, keep, key padding, additive) and fully masked rows as the CPU") {
    SUBCASE("no mask, rank 2, rows longer than a warp") { check_softmax<float>(Shape{7, 100}, {}, Shape{}, 1); }
    SUBCASE("causal, rank 4") { check_softmax<float>(Shape{2, 3, 9, 11}, ad::causal, Shape{}, 2); }
    SUBCASE("key padding (batch, Lk), rank 4, the last batch fully masked") {
        check_softmax<float>(Shape{3, 2, 5, 40}, ad::key_padding_mask(key_padding(3, 40)), Shape{}, 3);
    }
    SUBCASE("key padding, rank 3") { check_softmax<float>(Shape{3, 5, 40}, ad::key_padding_mask(key_padding(3, 40)), Shape{}, 4); }
    SUBCASE("keep mask broadcast over batch and heads, with causal") {
        Tensor<bool> keep(Shape{6, 6});
        for (std::int64_t i = 0; i < 36; ++i) keep.data()[i] = (i * 7) % 5 != 0;
        check_softmax<float>(Shape{2, 2, 6, 6}, ad::keep_mask(keep) | ad::causal, Shape{}, 5);
    }
    SUBCASE("additive mask broadcast over the batch") { check_softmax<float>(Shape{2, 3, 4, 33}, {}, Shape{3, 4, 33}, 6); }
    SUBCASE("bf16, causal and key padding") {
        check_softmax<ad::bf16>(Shape{2, 4, 8, 70}, ad::causal | ad::key_padding_mask(key_padding(2, 70)), Shape{}, 7);
    }
}

// ---- dropout ---------------------------------------------------------------------------------------

TEST_CASE("dropout: the CPU's decisions (same Philox stream), forward and backward; identity when off") {
    const auto x = random_input<float>(Shape{3, 1001}, 61);  // not a multiple of 4: the last Philox block is partial
    for (const double rate : {0.1, 0.5, 0.9}) {
        INFO("rate ", rate);
        const ad::DropoutDescriptor d{rate, 0x1234567890ull, 77, true};
        const Tensor<float> y = ad::dropout_forward<float>(d, x.host);
        const Tensor<float> yd = ad::to(ad::dropout_forward(d, x.device), ad::cpu);
        // The same elements are dropped, and the kept ones scaled alike (x·scale in float on both sides).
        CHECK(bitwise_equal(yd, y));
        CHECK(bitwise_equal(ad::to(ad::dropout_backward(d, x.device), ad::cpu), ad::dropout_backward<float>(d, x.host)));
        std::int64_t dropped = 0;
        for (std::int64_t i = 0; i < y.numel(); ++i) dropped += yd.data()[i] == 0.f;
        CHECK(std::abs(static_cast<double>(dropped) / static_cast<double>(y.numel()) - rate) < 0.05);
    }
    const ad::DropoutDescriptor off{0.5, 1, 2, false};
    CHECK(ad::dropout_forward(off, x.device).data() == x.device.data());
    const ad::DropoutDescriptor bf{0.3, 9, 4, true};
    const auto xb = random_input<ad::bf16>(Shape{513}, 62);
    // bf16: the same elements dropped; the kept ones are x·scale rounded to bf16 once.
    const Tensor<float> yb = ad::to(ad::dropout_forward(bf, xb.device), ad::cpu), yb_cpu = ad::dropout_forward<float>(bf, xb.host);
    bool same_mask = true;
    for (std::int64_t i = 0; i < yb.numel(); ++i) same_mask = same_mask && (yb.data()[i] == 0.f) == (yb_cpu.data()[i] == 0.f);
    CHECK(same_mask);
    check_close("bf16 dropout", yb, yb_cpu, bf16_tolerance);
}

// ---- Adam ----------------------------------------------------------------------------------------

void check_adam(ad::nn::AdamOptions opt) {
    const std::vector<Shape> shapes{Shape{7, 5}, Shape{5}, Shape{3, 2, 4}};
    std::vector<ad::Param<float>> params;
    std::vector<DeviceTensor<float>> device_params;
    for (std::size_t i = 0; i < shapes.size(); ++i) {
        const Tensor<float> w = ad::randn<float>(shapes[i], 100 + i);
        params.emplace_back(w.clone());
        device_params.push_back(ad::to(w, ad::cuda));
    }
    ad::nn::Adam<float> cpu(params, opt);
    ad::DeviceAdam<float> gpu(device_params, opt);
    for (int step = 0; step < 6; ++step) {
        std::vector<DeviceTensor<float>> grads;
        for (std::size_t i = 0; i < shapes.size(); ++i) {
            if (step == 2 && i == 1) {  // a parameter without a gradient is skipped, its step count too
                params[i].zero_grad();
                grads.emplace_back();
                continue;
            }
            const Tensor<float> g = ad::randn<float>(shapes[i], 1000 + 10 * step + i);
            Tensor<float> pg = params[i].grad();  // the Param's gradient storage
            std::memcpy(pg.data(), g.data(), static_cast<std::size_t>(g.numel()) * sizeof(float));
            grads.push_back(ad::to(g, ad::cuda));
        }
        cpu.step();
        gpu.step(grads);
    }
    for (std::size_t i = 0; i < shapes.size(); ++i) {
        check_close("parameter " + std::to_string(i), device_params[i], params[i].value(), 1e-6);
        check_close("exp_avg " + std::to_string(i), gpu.state(i).exp_avg, cpu.state(i).exp_avg, 1e-6);
        check_close("exp_avg_sq " + std::to_string(i), gpu.state(i).exp_avg_sq, cpu.state(i).exp_avg_sq, 1e-6);
        CHECK(gpu.state(i).step == cpu.state(i).step);
    }
}

TEST_CASE("Adam and AdamW on the device: six steps match nn::Adam (bias correction, weight decay, a skipped parameter)") {
    // fp32 on both sides with the same order of operations; the CPU may fuse multiply-adds differently.
    SUBCASE("Adam") { check_adam({.lr = 1e-2}); }
    SUBCASE("Adam with L2 weight decay") { check_adam({.lr = 1e-2, .weight_decay = 0.1}); }
    SUBCASE("AdamW") { check_adam({.lr = 1e-2, .beta1 = 0.8, .beta2 = 0.99, .weight_decay = 0.1, .decoupled_weight_decay = true}); }
}

TEST_CASE("adam_step on bf16 parameters keeps fp32 moments and matches the fp32 update to bf16 precision") {
    const auto w = random_input<ad::bf16>(Shape{300}, 71);
    const auto g = random_input<ad::bf16>(Shape{300}, 72);
    ad::DeviceAdamState state;
    DeviceTensor<ad::bf16> wd = w.device;
    ad::adam_step(wd, g.device, state, {.lr = 1e-1});
    ad::Param<float> p(w.host.clone());
    Tensor<float> pg = p.grad();
    std::memcpy(pg.data(), g.host.data(), static_cast<std::size_t>(g.host.numel()) * sizeof(float));
    ad::nn::Adam<float> cpu({p}, {.lr = 1e-1});
    cpu.step();
    check_close("w", wd, p.value(), bf16_tolerance);
    check_close("exp_avg (fp32)", state.exp_avg, cpu.state(0).exp_avg, 1e-6);
    CHECK(state.step == 1);
}

// ---- determinism -----------------------------------------------------------------------------------

TEST_CASE("determinism: two runs of GEMM, linear backward, softmax, dropout and the sums are bitwise equal") {
    auto run = [] {
        const auto x = random_input<ad::bf16>(Shape{4, 64, 96}, 81), W = random_input<ad::bf16>(Shape{80, 96}, 82);
        const auto b = random_input<ad::bf16>(Shape{80}, 83);
        const DeviceTensor<ad::bf16> y = ad::linear_forward(x.device, W.device, b.device);
        DeviceTensor<ad::bf16> dx, dW(W.host.shape()), db(Shape{80});
        dW.zero();
        db.zero();
        ad::linear_backward(&dx, &dW, &db, y, x.device, W.device);
        const DeviceTensor<ad::bf16> p = ad::softmax_forward(y, ad::DeviceMask{true, {}, {}});
        const DeviceTensor<ad::bf16> q = ad::dropout_forward({0.2, 5, 6, true}, p);
        DeviceTensor<ad::bf16> red(Shape{80, 80});  // the sum over the batch of yᵀ·q
        ad::strided_batched_gemm(1.f, y, q, 0.f, red, {true, false, false});
        return std::vector<Tensor<float>>{ad::to(y, ad::cpu), ad::to(dx, ad::cpu), ad::to(dW, ad::cpu), ad::to(db, ad::cpu), ad::to(q, ad::cpu),
                                          ad::to(red, ad::cpu), ad::full<float>(Shape{1}, ad::sum_forward(dW))};
    };
    const auto first = run(), second = run();
    for (std::size_t i = 0; i < first.size(); ++i) {
        INFO("output ", i);
        CHECK(bitwise_equal(first[i], second[i]));
    }
}

// ---- bad input -------------------------------------------------------------------------------------

TEST_CASE("bad input: the device functional layer throws autodiff::Error naming op, argument and shapes") {
    using test::check_error;
    const DeviceTensor<float> A(Shape{2, 3, 4}), B(Shape{2, 5, 6}), x(Shape{4, 8}), W(Shape{3, 7});
    DeviceTensor<float> C(Shape{2, 3, 6});
    check_error([&] { ad::strided_batched_gemm(1.f, A, B, 0.f, C); }, "strided_batched_gemm (cuda)",
                {"inner dimensions differ", "(2,3,4)", "(2,5,6)"});
    const DeviceTensor<float> B2(Shape{2, 4, 5});
    check_error([&] { ad::strided_batched_gemm(1.f, A, B2, 0.f, C); }, "strided_batched_gemm (cuda)",
                {"C has shape (2,3,6)", "needs (2,3,5)"});
    DeviceTensor<float> C5(Shape{2, 3, 5});
    check_error([&] { ad::strided_batched_gemm(NAN, A, B2, 0.f, C5); }, "strided_batched_gemm (cuda)", {"alpha (nan)", "must be finite"});
    DeviceTensor<float> dA(A.shape()), dB(B2.shape());
    check_error([&] { ad::strided_batched_gemm_backward<float>(&dA, &dB, DeviceTensor<float>(Shape{3, 5}), 1.f, A, B2, 0.f); },
                "strided_batched_gemm_backward (cuda)", {"dC has shape (3,5) but C of A (2,3,4) and B (2,4,5) has shape (2,3,5)"});
    check_error([&] { ad::linear_forward(x, W); }, "linear (cuda)", {"input features differ", "(4,8)", "(3,7)"});
    const DeviceTensor<float> W8(Shape{3, 8}), dy(Shape{4, 3});
    DeviceTensor<float> dW_bad(Shape{8, 3}), dx;
    check_error([&] { ad::linear_backward<float>(&dx, &dW_bad, nullptr, dy, x, W8); }, "linear_backward (cuda)",
                {"dW must be preallocated with W's shape (3,8), got (8,3)"});
    check_error([&] { ad::linear_forward(x, W8, DeviceTensor<float>(Shape{4})); }, "linear (cuda)", {"bias must have shape (3)", "got (4)"});
    check_error([&] { ad::binary_forward(ad::DeviceBinaryOp::add, x, dy); }, "add (cuda)", {"b has shape (4,3)", "a has shape (4,8)"});
    check_error([&] { ad::unary_backward(ad::DeviceUnaryOp::tanh, dy, x); }, "tanh_backward (cuda)", {"dy has shape (4,3)", "x has shape (4,8)"});
    check_error([&] { ad::unary_forward(static_cast<ad::DeviceUnaryOp>(99), x); }, "elementwise (cuda)", {"op 99 is not a DeviceUnaryOp"});
    check_error([&] { ad::unary_forward(ad::DeviceUnaryOp::exp, DeviceTensor<float>()); }, "exp (cuda)", {"x must be a defined device tensor"});
    const DeviceTensor<float> logits(Shape{2, 3, 5, 7});
    check_error([&] { ad::softmax_forward(logits, ad::DeviceMask{false, {}, DeviceTensor<bool>(Shape{3, 7})}); }, "softmax (cuda)",
                {"key-padding mask must have shape (2,7) (batch, Lk)", "got (3,7)"});
    check_error([&] { ad::softmax_forward(logits, ad::DeviceMask{false, DeviceTensor<bool>(Shape{4, 7}), {}}); }, "softmax (cuda)",
                {"keep mask (4,7) does not broadcast to the logits (2,3,5,7)"});
    check_error([&] { ad::softmax_backward(logits, DeviceTensor<float>(Shape{2, 3, 5, 6})); }, "softmax_backward (cuda)",
                {"dy has shape (2,3,5,7)", "y has shape (2,3,5,6)"});
    check_error([&] { ad::permute_forward(logits, {0, 1, 1, 3}); }, "permute (cuda)", {"(0,1,1,3) is not a permutation of the 4 dimensions"});
    check_error([&] { ad::narrow_forward(logits, 3, 5, 3); }, "narrow (cuda)", {"slice [5, 8) of dimension 3 is out of range for input (2,3,5,7)"});
    check_error([&] { ad::narrow_backward(x, Shape{4, 9}, 1, 2); }, "narrow_backward (cuda)", {"slice [2, 10) of dimension 1"});
    check_error([&] { ad::mse_loss_forward(x, dy); }, "mse_loss (cuda)", {"b has shape (4,3) but a has shape (4,8)"});
    check_error([&] { ad::dropout_forward({1.0, 0, 0, true}, x); }, "dropout (cuda)", {"rate must be in [0, 1), got 1"});
    check_error([&] { ad::dropout_backward({-0.5, 0, 0, true}, x); }, "dropout_backward (cuda)", {"rate must be in [0, 1), got -0.5"});
    ad::DeviceAdamState state;
    DeviceTensor<float> w(Shape{4, 8});
    check_error([&] { ad::adam_step(w, dy, state, {}); }, "adam_step (cuda)", {"gradient has shape (4,3)", "parameter has shape (4,8)"});
    check_error([&] { ad::adam_step(w, x, state, {.lr = -1.0}); }, "adam_step (cuda)", {"lr must be finite and > 0, got -1"});
    check_error([&] { ad::DeviceAdam<float>({}, {}); }, "DeviceAdam", {"no parameters to optimise"});
    ad::DeviceAdam<float> adam({w}, {});
    check_error([&] { adam.step(std::vector<DeviceTensor<float>>{}); }, "DeviceAdam", {"one gradient per parameter (1), got 0"});
}

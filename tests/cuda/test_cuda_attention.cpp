// The fused attention on the GPU against the CPU path (kernels/attention.hpp), the device allocator,
// host/device copies, determinism and bad input. fp32: the GPU and the CPU sum in different orders
// (tiles of 32 vs 64 keys, fp32 FMA vs Eigen), so results agree to rounding, far under the 1e-4
// relative error required (norm of the difference over the norm of the CPU's, per tensor). bf16: the
// GPU's operands, P and dS are rounded to bf16 (8 significant bits, relative rounding 2^-9 ≈ 2e-3 per
// rounding, a few roundings deep): 1e-2 relative against the CPU in fp32 on the same bf16-rounded inputs.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "../check_error.hpp"
#include "compare.hpp"
#include "autodiff/cuda/attention.hpp"
#include "autodiff/kernels/attention.hpp"

namespace ad = autodiff;
using ad::Shape;
using ad::Tensor;
using ad::test::bitwise_equal;
using ad::test::check_close;

namespace {

struct Case {
    Shape q, k, v;
    Shape bias;  // rank 0: no bias
    bool causal = false;
    bool key_padding = false;  // (batch, Lk), batch 0 keeps a prefix, the last batch keeps nothing
    double dropout = 0.0;
    Shape keep = {};  // the keep mask's shape (rank 0: none); see keep_mask
    bool documents = false;  // the keep mask is document_mask's (block sparse) instead of keep_mask's
};

// The query row of the scores that keep_mask masks entirely (in every (b, h) plane it has).
constexpr std::int64_t masked_row = 5;

// A keep mask of the given shape: pseudo-random, about a quarter of its entries false (a pattern that
// differs from plane to plane), row masked_row all false.
Tensor<bool> keep_mask(const Shape& shape) {
    Tensor<bool> keep(shape);
    const std::int64_t Lk = shape.dim_from_end(1), Lq = shape.dim_from_end(2);
    for (std::int64_t e = 0; e < keep.numel(); ++e) {
        const auto h = static_cast<std::uint64_t>(e) * 0x9E3779B97F4A7C15ull;
        keep.data()[e] = e / Lk % Lq != masked_row && (h >> 40) % 4 != 0;
    }
    return keep;
}

// A block-sparse keep mask of the given shape: documents, query i sees key j iff both positions lie in
// the same one of three documents [0, 128), [128, b), [b, ...) with b = 200 + 9·plane (a boundary on a
// 64 tile edge and one that moves from plane to plane), so whole 64 × 64 tiles are empty, others full or
// partial; row masked_row all false (its tiles partial).
Tensor<bool> document_mask(const Shape& shape) {
    Tensor<bool> keep(shape);
    const std::int64_t Lk = shape.dim_from_end(1), Lq = shape.dim_from_end(2);
    for (std::int64_t e = 0; e < keep.numel(); ++e) {
        const std::int64_t plane = e / (Lq * Lk), i = e / Lk % Lq, j = e % Lk;
        auto doc = [&](std::int64_t x) { return x < 128 ? 0 : x < 200 + 9 * plane ? 1 : 2; };
        keep.data()[e] = i != masked_row && doc(i) == doc(j);
    }
    return keep;
}

Tensor<bool> padding_mask(std::int64_t batch, std::int64_t Lk) {
    std::vector<char> keep;
    for (std::int64_t b = 0; b < batch; ++b)
        for (std::int64_t j = 0; j < Lk; ++j) keep.push_back(b == batch - 1 ? 0 : j < Lk - 7 * (b + 1));
    Tensor<bool> mask(Shape{batch, Lk});
    std::copy(keep.begin(), keep.end(), mask.data());
    return mask;
}

struct Result {
    Tensor<float> O, lse, dQ, dK, dV, dbias;
};

// The same problem on the CPU (fp32, from the host copies of the device inputs) and on the GPU in T.
template <class T>
std::pair<Result, Result> run_both(const Case& c, std::uint64_t seed) {
    const Tensor<float> Q = ad::randn<float>(c.q, seed), K = ad::randn<float>(c.k, seed + 1), V = ad::randn<float>(c.v, seed + 2);
    Shape out = c.q;
    out[out.rank() - 1] = c.v.dim_from_end(1);
    const Tensor<float> dO = ad::randn<float>(out, seed + 3);
    const bool has_bias = c.bias.rank() > 0;
    const Tensor<float> bias = has_bias ? ad::randn<float>(c.bias, seed + 4) : Tensor<float>();
    // The device copies in T; the CPU works on their values read back (bf16-rounded for bf16).
    const auto dQ_in = ad::to<T>(Q, ad::cuda), dK_in = ad::to<T>(K, ad::cuda), dV_in = ad::to<T>(V, ad::cuda), ddO = ad::to<T>(dO, ad::cuda);
    const auto dbias_in = has_bias ? ad::to<T>(bias, ad::cuda) : ad::DeviceTensor<T>();
    const Tensor<float> Qh = ad::to(dQ_in, ad::cpu), Kh = ad::to(dK_in, ad::cpu), Vh = ad::to(dV_in, ad::cpu), dOh = ad::to(ddO, ad::cpu);
    const Tensor<float> biash = has_bias ? ad::to(dbias_in, ad::cpu) : Tensor<float>();

    ad::AttentionOptions opt;
    opt.scale = 1.0 / std::sqrt(static_cast<double>(c.q.dim_from_end(1)));
    opt.bias_scale = 0.75;
    opt.mask.causal = c.causal;
    const std::int64_t batch = c.q.rank() >= 3 ? c.q[0] : 1;
    if (c.key_padding) opt.mask.key_padding = c.q.rank() >= 3 ? padding_mask(batch, c.k.dim_from_end(2))
                                                               : padding_mask(1, c.k.dim_from_end(2)).reshaped(Shape{c.k.dim_from_end(2)});
    if (c.keep.rank() > 0) opt.mask.keep = c.documents ? document_mask(c.keep) : keep_mask(c.keep);
    opt.dropout = {c.dropout, 1234, 56, true};
    ad::DeviceAttentionOptions dopt;
    dopt.scale = opt.scale;
    dopt.bias_scale = opt.bias_scale;
    dopt.causal = c.causal;
    if (c.key_padding) dopt.key_padding = ad::to(opt.mask.key_padding, ad::cuda);
    if (c.keep.rank() > 0) dopt.keep = ad::to(opt.mask.keep, ad::cuda);
    dopt.dropout = opt.dropout;

    Result cpu, gpu;
    {
        auto saved = ad::attention_forward<float>(Qh, Kh, Vh, biash, Tensor<float>(), opt);
        cpu.O = saved.O.clone();
        cpu.lse = saved.lse.clone();
        ad::attention_backward<float>(&cpu.dQ, &cpu.dK, &cpu.dV, has_bias ? &cpu.dbias : nullptr, dOh, Qh, Kh, Vh, biash, Tensor<float>(), saved, opt);
    }
    {
        auto saved = ad::attention_forward<T>(dQ_in, dK_in, dV_in, dbias_in, dopt);
        ad::DeviceTensor<T> dQ, dK, dV, db;
        ad::attention_backward<T>(&dQ, &dK, &dV, has_bias ? &db : nullptr, ddO, dQ_in, dK_in, dV_in, dbias_in, saved, dopt);
        gpu.O = ad::to(saved.O, ad::cpu);
        gpu.lse = ad::to(saved.lse, ad::cpu);
        gpu.dQ = ad::to(dQ, ad::cpu);
        gpu.dK = ad::to(dK, ad::cpu);
        gpu.dV = ad::to(dV, ad::cpu);
        if (has_bias) gpu.dbias = ad::to(db, ad::cpu);
    }
    return {gpu, cpu};
}

template <class T>
void check_against_cpu(const Case& c, double tolerance, std::uint64_t seed = 7) {
    const auto [gpu, cpu] = run_both<T>(c, seed);
    check_close("O", gpu.O, cpu.O, tolerance);
    check_close("lse", gpu.lse, cpu.lse, tolerance);
    check_close("dQ", gpu.dQ, cpu.dQ, tolerance);
    check_close("dK", gpu.dK, cpu.dK, tolerance);
    check_close("dV", gpu.dV, cpu.dV, tolerance);
    if (c.bias.rank() > 0) check_close("dbias", gpu.dbias, cpu.dbias, tolerance);
}

constexpr double fp32_tolerance = 1e-4;
constexpr double bf16_tolerance = 1e-2;
// The keep-mask tests hold fp32 to 1e-5 (the largest fp32 error measured so far is 4.8e-7).
constexpr double fp32_keep_tolerance = 1e-5;

// Row masked_row, fully masked by the keep mask in every leading index: lse −inf, O, dQ and the bias
// gradient's row exactly zero (GPU), and the GPU matches the CPU elsewhere (check_against_cpu).
template <class T>
void check_keep_mask(const Case& c, double tolerance) {
    const auto [gpu, cpu] = run_both<T>(c, 7);
    check_close("O", gpu.O, cpu.O, tolerance);
    check_close("lse", gpu.lse, cpu.lse, tolerance);
    check_close("dQ", gpu.dQ, cpu.dQ, tolerance);
    check_close("dK", gpu.dK, cpu.dK, tolerance);
    check_close("dV", gpu.dV, cpu.dV, tolerance);
    if (c.bias.rank() > 0) check_close("dbias", gpu.dbias, cpu.dbias, tolerance);
    const std::int64_t Lq = c.q.dim_from_end(2), Lk = c.k.dim_from_end(2), d = c.q.dim_from_end(1), dv = c.v.dim_from_end(1);
    const std::int64_t items = gpu.lse.numel() / Lq;
    for (std::int64_t t = 0; t < items; ++t) {
        CAPTURE(t);
        REQUIRE(std::isinf(gpu.lse.data()[t * Lq + masked_row]));
        REQUIRE(gpu.lse.data()[t * Lq + masked_row] < 0);
        for (std::int64_t c2 = 0; c2 < dv; ++c2) REQUIRE(gpu.O.data()[(t * Lq + masked_row) * dv + c2] == 0.0f);
        for (std::int64_t c2 = 0; c2 < d; ++c2) REQUIRE(gpu.dQ.data()[(t * Lq + masked_row) * d + c2] == 0.0f);
        if (c.bias.rank() > 0 && c.bias.numel() == items * Lq * Lk)
            for (std::int64_t j = 0; j < Lk; ++j) REQUIRE(gpu.dbias.data()[(t * Lq + masked_row) * Lk + j] == 0.0f);
    }
}

}  // namespace

TEST_CASE("device tensors: float, bf16 and fp16 round trips; the allocator reuses freed blocks") {
    const Tensor<float> x = ad::randn<float>(Shape{3, 5, 7}, 1);
    CHECK(bitwise_equal(ad::to(ad::to(x, ad::cuda), ad::cpu), x));
    const Tensor<float> b = ad::to(ad::to<ad::bf16>(x, ad::cuda), ad::cpu);
    const Tensor<float> h = ad::to(ad::to<ad::fp16>(x, ad::cuda), ad::cpu);
    for (std::int64_t i = 0; i < x.numel(); ++i) {
        CHECK(std::abs(b.data()[i] - x.data()[i]) <= std::abs(x.data()[i]) * 0x1p-8);   // bf16: 8 significant bits
        CHECK(std::abs(h.data()[i] - x.data()[i]) <= std::abs(x.data()[i]) * 0x1p-11);  // fp16: 11
    }
    ad::device_pool::release_cached();
    ad::device_pool::reset_stats();
    { ad::DeviceTensor<float> a(Shape{1000}); }
    { ad::DeviceTensor<float> a(Shape{1000}); }
    const auto s = ad::device_pool::stats();
    CHECK(s.requests == 2);
    CHECK(s.system_allocs == 1);
    CHECK(s.reused == 1);
    CHECK(s.bytes_in_use == 0);
    CHECK(s.bytes_cached >= 4000);
    CHECK(s.peak_bytes_in_use >= 4000);
}

TEST_CASE("fp32: GPU matches the CPU for every bias shape (full, broadcast over batch, over batch and heads, per key)") {
    const Shape q{2, 3, 70, 40}, k{2, 3, 90, 40}, v{2, 3, 90, 24};
    for (const Shape& bias : {Shape{2, 3, 70, 90}, Shape{1, 3, 70, 90}, Shape{70, 90}, Shape{2, 1, 1, 90}, Shape{}}) {
        INFO("bias ", bias.str());
        check_against_cpu<float>({q, k, v, bias}, fp32_tolerance);
    }
}

TEST_CASE("fp32: ranks 2 and 3, head dimension 128, one query") {
    check_against_cpu<float>({Shape{33, 16}, Shape{45, 16}, Shape{45, 16}, Shape{33, 45}}, fp32_tolerance);
    check_against_cpu<float>({Shape{4, 50, 128}, Shape{4, 50, 128}, Shape{4, 50, 128}, Shape{4, 50, 50}}, fp32_tolerance);
    check_against_cpu<float>({Shape{2, 2, 1, 8}, Shape{2, 2, 17, 8}, Shape{2, 2, 17, 8}, Shape{2, 2, 1, 17}}, fp32_tolerance);
}

TEST_CASE("fp32: causal and key-padding masks; fully masked rows give zero output and gradients") {
    const Shape q{3, 2, 100, 32}, k{3, 2, 100, 32};
    check_against_cpu<float>({q, k, k, Shape{3, 2, 100, 100}, true}, fp32_tolerance);
    check_against_cpu<float>({q, k, k, Shape{1, 2, 100, 100}, false, true}, fp32_tolerance);
    check_against_cpu<float>({q, k, k, Shape{100, 100}, true, true}, fp32_tolerance);
    // Batch 2 keeps no key: its output, dQ, and its share of every gradient are exactly zero.
    const auto [gpu, cpu] = run_both<float>({q, k, k, Shape{3, 2, 100, 100}, false, true}, 11);
    const std::int64_t per_batch = 2 * 100 * 32;
    for (std::int64_t i = 2 * per_batch; i < 3 * per_batch; ++i) {
        REQUIRE(gpu.O.data()[i] == 0.0f);
        REQUIRE(gpu.dQ.data()[i] == 0.0f);
        REQUIRE(gpu.dK.data()[i] == 0.0f);
    }
    for (std::int64_t i = 2 * 2 * 100 * 100; i < 3 * 2 * 100 * 100; ++i) REQUIRE(gpu.dbias.data()[i] == 0.0f);
    CHECK(std::isinf(gpu.lse.data()[2 * 2 * 100]));
}

TEST_CASE("fp32: keep mask, full and broadcast, with causal, key padding, a trainable bias and dropout") {
    const Shape q{2, 3, 100, 32}, k{2, 3, 90, 32}, v{2, 3, 90, 24};
    SUBCASE("keep (B, H, Lq, Lk), full bias, causal, key padding, dropout") {
        check_keep_mask<float>({q, k, v, Shape{2, 3, 100, 90}, true, true, 0.3, Shape{2, 3, 100, 90}}, fp32_keep_tolerance);
    }
    SUBCASE("keep (1, 1, Lq, Lk), broadcast bias (1, H, Lq, Lk), key padding") {
        check_keep_mask<float>({q, k, v, Shape{1, 3, 100, 90}, false, true, 0.0, Shape{1, 1, 100, 90}}, fp32_keep_tolerance);
    }
    SUBCASE("keep (B, 1, Lq, Lk), full bias, causal, dropout") {
        check_keep_mask<float>({q, k, v, Shape{2, 3, 100, 90}, true, false, 0.2, Shape{2, 1, 100, 90}}, fp32_keep_tolerance);
    }
    SUBCASE("keep alone (no bias, no other mask), (Lq, Lk)") {
        check_keep_mask<float>({q, k, v, Shape{}, false, false, 0.0, Shape{100, 90}}, fp32_keep_tolerance);
    }
    SUBCASE("rank 3, keep (Lq, Lk) broadcast over the leading dimension, per-key bias") {
        check_keep_mask<float>({Shape{4, 40, 16}, Shape{4, 70, 16}, Shape{4, 70, 16}, Shape{70}, true, true, 0.1, Shape{40, 70}},
                               fp32_keep_tolerance);
    }
}

TEST_CASE("fp32: dropout makes the CPU's decisions (same Philox stream, same element indices)") {
    const Shape q{2, 2, 80, 32}, k{2, 2, 96, 32};
    check_against_cpu<float>({q, k, k, Shape{2, 2, 80, 96}, false, false, 0.3}, fp32_tolerance);
    check_against_cpu<float>({q, k, k, Shape{1, 2, 80, 96}, true, true, 0.5}, fp32_tolerance);
}

TEST_CASE("bf16: GPU matches the CPU in fp32 on the same bf16 inputs") {
    const Shape q{2, 4, 200, 64}, k{2, 4, 260, 64};
    check_against_cpu<ad::bf16>({q, k, k, Shape{2, 4, 200, 260}}, bf16_tolerance);
    check_against_cpu<ad::bf16>({q, k, k, Shape{1, 4, 200, 260}, true}, bf16_tolerance);
    check_against_cpu<ad::bf16>({q, k, k, Shape{200, 260}, false, true, 0.2}, bf16_tolerance);
    check_against_cpu<ad::bf16>({Shape{2, 2, 64, 128}, Shape{2, 2, 64, 128}, Shape{2, 2, 64, 40}, Shape{2, 2, 64, 64}}, bf16_tolerance);
    check_against_cpu<ad::fp16>({q, k, k, Shape{2, 4, 200, 260}, true}, bf16_tolerance);
}

TEST_CASE("bf16/fp16: keep mask, full and broadcast, through the general mma kernels (never the Plain ones)") {
    const Shape q{2, 4, 200, 64}, k{2, 4, 260, 64};
    SUBCASE("keep (B, H, Lq, Lk), full bias (dQ read back from its gradient), causal, key padding, dropout") {
        check_keep_mask<ad::bf16>({q, k, k, Shape{2, 4, 200, 260}, true, true, 0.2, Shape{2, 4, 200, 260}}, bf16_tolerance);
    }
    SUBCASE("keep (1, 1, Lq, Lk) alone: a problem that would otherwise take the Plain kernels") {
        check_keep_mask<ad::bf16>({q, k, k, Shape{}, false, false, 0.0, Shape{1, 1, 200, 260}}, bf16_tolerance);
        check_keep_mask<ad::bf16>({q, k, k, Shape{}, true, false, 0.0, Shape{1, 1, 200, 260}}, bf16_tolerance);
    }
    SUBCASE("keep (B, 1, Lq, Lk), broadcast bias (1, H, Lq, Lk), causal, key padding") {
        check_keep_mask<ad::bf16>({q, k, k, Shape{1, 4, 200, 260}, true, true, 0.0, Shape{2, 1, 200, 260}}, bf16_tolerance);
    }
    SUBCASE("d = 128 (dv = 100), fp16, full keep and bias, dropout") {
        check_keep_mask<ad::bf16>({Shape{1, 2, 150, 128}, Shape{1, 2, 190, 128}, Shape{1, 2, 190, 100}, Shape{1, 2, 150, 190}, false, false, 0.1,
                                   Shape{1, 2, 150, 190}},
                                  bf16_tolerance);
        check_keep_mask<ad::fp16>({q, k, k, Shape{2, 4, 200, 260}, true, true, 0.2, Shape{2, 4, 200, 260}}, bf16_tolerance);
    }
}

TEST_CASE("block-sparse keep masks (documents): empty tiles skipped, full tiles unmasked, all matching the CPU") {
    // 384 = six 64-tiles a side: tiles empty (across documents), full (inside one) and partial (on a moving
    // boundary, or holding the fully masked row masked_row). General mma kernels, fp16 and fp32 too.
    const Shape q{2, 4, 384, 64};
    SUBCASE("keep (B, H, L, L) alone, bf16") {
        check_keep_mask<ad::bf16>({q, q, q, Shape{}, false, false, 0.0, Shape{2, 4, 384, 384}, true}, bf16_tolerance);
    }
    SUBCASE("keep (L, L) broadcast, causal, Lq < Lk, bf16 and fp16") {
        check_keep_mask<ad::bf16>({Shape{2, 4, 330, 64}, q, q, Shape{}, true, false, 0.0, Shape{330, 384}, true}, bf16_tolerance);
        check_keep_mask<ad::fp16>({Shape{2, 4, 330, 64}, q, q, Shape{}, false, false, 0.0, Shape{330, 384}, true}, bf16_tolerance);
    }
    SUBCASE("keep (B, 1, L, L), full bias (its gradient zero on skipped tiles, dQ read back), key padding, dropout") {
        check_keep_mask<ad::bf16>({q, q, q, Shape{2, 4, 384, 384}, false, true, 0.2, Shape{2, 1, 384, 384}, true}, bf16_tolerance);
    }
    SUBCASE("keep (1, H, L, L), broadcast bias (1, H, L, L) through the fp32 scratch, d = 128 (dv = 100)") {
        check_keep_mask<ad::bf16>({Shape{2, 4, 384, 128}, Shape{2, 4, 384, 128}, Shape{2, 4, 384, 100}, Shape{1, 4, 384, 384}, false, false, 0.0,
                                   Shape{1, 4, 384, 384}, true},
                                  bf16_tolerance);
    }
    SUBCASE("fp32 (32 × 32 tiles inside the 64 × 64 keep tiles): full bias, causal, and alone") {
        check_keep_mask<float>({q, q, q, Shape{2, 4, 384, 384}, true, false, 0.0, Shape{2, 4, 384, 384}, true}, fp32_keep_tolerance);
        check_keep_mask<float>({Shape{2, 4, 330, 64}, q, q, Shape{}, false, true, 0.1, Shape{330, 384}, true}, fp32_keep_tolerance);
    }
}

TEST_CASE("bf16 causal without a full bias gradient: matches the CPU and is bitwise repeatable") {
    // Many key blocks per leading index, Lq ≠ Lk both ways, key padding (a batch with no kept key),
    // dropout, a broadcast bias, d = 128 with dv = 100, fp16 at d = 40; a larger problem twice.
    const Shape q{2, 3, 700, 64}, k{2, 3, 700, 64};
    check_against_cpu<ad::bf16>({q, k, k, Shape{}, true}, bf16_tolerance);
    check_against_cpu<ad::bf16>({q, Shape{2, 3, 450, 64}, Shape{2, 3, 450, 64}, Shape{}, true, true}, bf16_tolerance);
    check_against_cpu<ad::bf16>({Shape{2, 3, 330, 64}, k, k, Shape{1, 3, 330, 700}, true, false, 0.2}, bf16_tolerance);
    check_against_cpu<ad::bf16>({Shape{1, 2, 300, 128}, Shape{1, 2, 300, 128}, Shape{1, 2, 300, 100}, Shape{}, true, true}, bf16_tolerance);
    check_against_cpu<ad::fp16>({Shape{2, 2, 257, 40}, Shape{2, 2, 257, 40}, Shape{2, 2, 257, 40}, Shape{}, true}, bf16_tolerance);
    // The Plain kernels (no bias, key padding or dropout) at d = 128 (dv = 100), and without the causal
    // mask with Lq ≠ Lk (partial tiles on both sides).
    check_against_cpu<ad::bf16>({Shape{1, 2, 300, 128}, Shape{1, 2, 300, 128}, Shape{1, 2, 300, 100}, Shape{}, true}, bf16_tolerance);
    check_against_cpu<ad::bf16>({Shape{2, 2, 200, 64}, Shape{2, 2, 260, 64}, Shape{2, 2, 260, 64}, Shape{}}, bf16_tolerance);
    check_against_cpu<ad::fp16>({Shape{1, 2, 150, 96}, Shape{1, 2, 190, 96}, Shape{1, 2, 190, 96}, Shape{}}, bf16_tolerance);
    const Case c{Shape{4, 8, 1024, 64}, Shape{4, 8, 1024, 64}, Shape{4, 8, 1024, 64}, Shape{}, true};
    const auto first = run_both<ad::bf16>(c, 9).first;
    const auto second = run_both<ad::bf16>(c, 9).first;
    CHECK(bitwise_equal(first.dQ, second.dQ));
    CHECK(bitwise_equal(first.dK, second.dK));
    CHECK(bitwise_equal(first.dV, second.dV));
}

TEST_CASE("determinism: two runs give bitwise equal outputs and gradients, broadcast bias gradient included") {
    for (const Shape& bias : {Shape{2, 4, 130, 130}, Shape{1, 4, 130, 130}}) {
        INFO("bias ", bias.str());
        const Case c{Shape{2, 4, 130, 64}, Shape{2, 4, 130, 64}, Shape{2, 4, 130, 64}, bias, true, false, 0.1};
        const auto first = run_both<ad::bf16>(c, 5).first;
        const auto second = run_both<ad::bf16>(c, 5).first;
        CHECK(bitwise_equal(first.O, second.O));
        CHECK(bitwise_equal(first.dQ, second.dQ));
        CHECK(bitwise_equal(first.dK, second.dK));
        CHECK(bitwise_equal(first.dV, second.dV));
        CHECK(bitwise_equal(first.dbias, second.dbias));
    }
}

TEST_CASE("bad input: the GPU attention throws autodiff::Error naming op, argument and shapes") {
    const auto Q = ad::to(ad::randn<float>(Shape{2, 3, 10, 8}), ad::cuda);
    const auto K = ad::to(ad::randn<float>(Shape{2, 3, 12, 8}), ad::cuda);
    const auto K_bad = ad::to(ad::randn<float>(Shape{2, 3, 12, 9}), ad::cuda);
    const auto bias_bad = ad::to(ad::randn<float>(Shape{3, 10, 13}), ad::cuda);
    const auto big = ad::to(ad::randn<float>(Shape{2, 3, 10, 200}), ad::cuda);
    const ad::DeviceAttentionOptions opt;
    test::check_error([&] { (void)ad::attention_forward<float>(Q, K_bad, K_bad, {}, opt); }, "attention (cuda)",
                      {"same head dimension", "(2,3,10,8)", "(2,3,12,9)"});
    test::check_error([&] { (void)ad::attention_forward<float>(Q, K, K, bias_bad, opt); }, "attention (cuda)",
                      {"bias (3,10,13) does not broadcast to the scores (2,3,10,12)"});
    test::check_error([&] { (void)ad::attention_forward<float>(big, big, big, {}, opt); }, "attention (cuda)",
                      {"head dimensions must be in [1, 128]", "(2,3,10,200)"});
    test::check_error([&] { (void)ad::attention_forward<float>(Q, {}, K, {}, opt); }, "attention (cuda)", {"K undefined"});
    ad::DeviceAttentionOptions padded;
    padded.key_padding = ad::to(Tensor<bool>(Shape{2, 11}), ad::cuda);
    test::check_error([&] { (void)ad::attention_forward<float>(Q, K, K, {}, padded); }, "attention (cuda)", {"(2,11)"});
    ad::DeviceAttentionOptions kept;
    kept.keep = ad::to(Tensor<bool>(Shape{2, 2, 10, 12}), ad::cuda);
    test::check_error([&] { (void)ad::attention_forward<float>(Q, K, K, {}, kept); }, "attention (cuda)",
                      {"keep mask (2,2,10,12) does not broadcast to the logits (2,3,10,12)"});
    kept.keep = ad::to(Tensor<bool>(Shape{10, 13}), ad::cuda);
    test::check_error([&] { (void)ad::attention_forward<float>(Q, K, K, {}, kept); }, "attention (cuda)",
                      {"keep mask (10,13) does not broadcast to the logits (2,3,10,12)"});
    {
        auto ok = opt;
        auto saved_ok = ad::attention_forward<float>(Q, K, K, {}, ok);
        ad::DeviceTensor<float> g;
        test::check_error([&] { ad::attention_backward<float>(&g, nullptr, nullptr, nullptr, saved_ok.O, Q, K, K, {}, saved_ok, kept); },
                          "attention_backward (cuda)", {"keep mask (10,13) does not broadcast to the logits (2,3,10,12)"});
    }
    ad::DeviceAttentionOptions drop;
    drop.dropout.rate = 1.0;
    test::check_error([&] { (void)ad::attention_forward<float>(Q, K, K, {}, drop); }, "attention (cuda)", {"rate must be in [0, 1)"});
    auto saved = ad::attention_forward<float>(Q, K, K, {}, opt);
    ad::DeviceTensor<float> dQ, dbias;
    test::check_error([&] { ad::attention_backward<float>(&dQ, nullptr, nullptr, nullptr, K, Q, K, K, {}, saved, opt); },
                      "attention_backward (cuda)", {"dO has shape (2,3,12,8) (cuda) but must have shape (2,3,10,8)"});
    test::check_error([&] { ad::attention_backward<float>(&dQ, nullptr, nullptr, &dbias, saved.O, Q, K, K, {}, saved, opt); },
                      "attention_backward (cuda)", {"no bias"});
    test::check_error([&] { (void)ad::to(ad::DeviceTensor<float>(), ad::cpu); }, "to(cpu)", {"undefined"});
    test::check_error([&] { (void)Q.reshape(Shape{7}); }, "reshape", {"(2,3,10,8) (cuda)", "(7)"});
}

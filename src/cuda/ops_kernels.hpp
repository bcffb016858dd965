#pragma once
// The launchers of the device functional layer's kernels (ops_kernels.cu), for ops.cpp, blas.cpp and
// optim.cpp. Plain types only, as attention_kernels.hpp: read by nvcc and by the host compiler. Every
// launcher queues its kernels on the default stream and returns the launch's cudaError_t.

#include <cstdint>

#include <cuda_runtime.h>

#include "attention_kernels.hpp"
#include "autodiff/cuda/op_kinds.hpp"

namespace autodiff::detail {

// ---- elementwise (the device expression layer, cuda/expr.cuh) -------------------------------------
// y = f(x) over n elements; alpha is DeviceUnaryOp::scale's factor.
cudaError_t launch_unary(DeviceDType dtype, DeviceUnaryOp op, float alpha, const void* x, void* y, std::int64_t n);
// dx = dy·f'(x)
cudaError_t launch_unary_backward(DeviceDType dtype, DeviceUnaryOp op, float alpha, const void* x,
                                  const void* dy, void* dx, std::int64_t n);
// out = f(a, b)
cudaError_t launch_binary(DeviceDType dtype, DeviceBinaryOp op, const void* a, const void* b, void* out, std::int64_t n);
// da = dy·∂f/∂a, db = dy·∂f/∂b (either may be null)
cudaError_t launch_binary_backward(DeviceDType dtype, DeviceBinaryOp op, const void* a, const void* b, const void* dy, void* da, void* db,
                                   std::int64_t n);

// out = scale·(a − b); with square: out = (a − b)² (scale ignored). mse_loss's two expressions. scale is
// rounded to the compute type (float, or double for f64).
cudaError_t launch_difference(DeviceDType dtype, bool square, double scale, const void* a, const void* b, void* out, std::int64_t n);

// ---- layout: permute and narrow as one strided copy ------------------------------------------------
// The output (or, with scatter, the input) is dense of padded rank-4 shape `shape`; the other side is
// read (written) at base + Σ_k index_k·strides[k]. gather: out[i] = in[base + ...]; scatter:
// out[base + ...] = in[i] (the narrow backward, into a zeroed dx).
cudaError_t launch_strided_copy(DeviceDType dtype, const void* in, void* out, const std::int64_t shape[4], const std::int64_t strides[4],
                                std::int64_t base, bool scatter);

// ---- rows and reductions ------------------------------------------------------------------------
// y (rows, n) = b (n) repeated on every row.
cudaError_t launch_broadcast_rows(DeviceDType dtype, const void* b, void* y, std::int64_t rows, std::int64_t n);
// out (n) = (accumulate ? out : 0) + Σ_r x[r, :], x (rows, n); each column summed in row order, in fp32
// (fp64 for f64).
cudaError_t launch_column_sums(DeviceDType dtype, const void* x, std::int64_t rows, std::int64_t n, void* out, bool accumulate);
// out (1 value) = Σ x over n elements: fixed partial sums (partials: sum_partials values) added in order.
// partials and out hold the compute type: float, or double for f64.
inline constexpr int sum_partials = 512;
cudaError_t launch_sum(DeviceDType dtype, const void* x, std::int64_t n, void* partials, void* out);

// ---- softmax over the last dimension --------------------------------------------------------------
// Rows of the padded rank-4 logits (B, H, Lq, Lk), leading index t = b·H + h, row r = t·Lq + i.
struct SoftmaxProblem {
    std::int64_t rows = 0, heads = 1, Lq = 1, Lk = 0;
    bool causal = false;
    const bool* keep = nullptr;  // broadcast to the logits through keep_s
    std::int64_t keep_s[4] = {0, 0, 0, 0};
    const bool* key_padding = nullptr;  // (batch, Lk), batch = t / kp_div
    std::int64_t kp_div = 1;
    const void* additive = nullptr;  // dtype, broadcast through additive_s
    std::int64_t additive_s[4] = {0, 0, 0, 0};
};
// y = softmax(x + additive, masked); fully masked rows give 0. Computed in fp32 (fp64 for f64).
cudaError_t launch_softmax_forward(DeviceDType dtype, const SoftmaxProblem& p, const void* x, void* y);
// dx = y ⊙ (dy − rowsum(dy ⊙ y)), rows of Lk.
cudaError_t launch_softmax_backward(DeviceDType dtype, std::int64_t rows, std::int64_t Lk, const void* dy, const void* y, void* dx);

// ---- dropout (the CPU's Philox decisions: kernels/dropout.hpp) ------------------------------------
// out[i] = in[i]·keep(i)·scale, keep(i) = Philox4x32::bits(seed, offset, i) >= threshold (drop_all: never).
cudaError_t launch_dropout(DeviceDType dtype, std::uint64_t seed, std::uint64_t offset, std::uint32_t threshold, bool drop_all, double scale,
                           const void* in, void* out, std::int64_t n);

// ---- Adam / AdamW (nn::Adam's update in fp32; the moments are fp32) ------------------------------------
struct AdamStep {
    float lr = 0, beta1 = 0, beta2 = 0, eps = 0, weight_decay = 0;
    bool decoupled = false;
    float step_size = 0;  // lr / (1 − β1ᵗ)
    float root_c2 = 0;    // √(1 − β2ᵗ)
};
// f64 is refused (cudaErrorInvalidValue): the optimizer takes float, bf16 and fp16.
cudaError_t launch_adam(DeviceDType dtype, const AdamStep& s, void* w, const void* g, float* m, float* v, std::int64_t n);

}  // namespace autodiff::detail

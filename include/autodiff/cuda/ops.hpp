#pragma once
// The device functional layer's elementwise ops, reductions, softmax and dropout (issue 12): the
// functional API of kernels/elementwise.hpp, reduce.hpp, softmax.hpp and dropout.hpp for device
// tensors, with the same formulas, masks and checks. Products: cuda/blas.hpp; Adam: cuda/optim.hpp.
//
// Elementwise ops are expressions of the device expression layer (cuda/expr.cuh), all run by its one
// templated kernel; each backward is that expression's forward-mode derivative, not code of its own.
// A .cu file can build a fused expression of its own there (tanh(a·b + 0.5f)) with the same evaluator.
// Element types: float, bf16, fp16 (every computation in fp32, results rounded to T once) and double
// (every computation and accumulation in fp64; gradient checks on the device, tests/cuda/test_cuda_fp64.cpp).
// alpha (DeviceUnaryOp::scale) is a float for every T.

#include "autodiff/cuda/device.hpp"
#include "autodiff/cuda/op_kinds.hpp"
#include "autodiff/kernels/dropout.hpp"
#include "autodiff/kernels/layout.hpp"
#include "autodiff/kernels/softmax.hpp"

namespace autodiff {

// ---- elementwise ------------------------------------------------------------------------------
// y = f(x); alpha is DeviceUnaryOp::scale's factor (ignored by the others).
template <class T>
DeviceTensor<T> unary_forward(DeviceUnaryOp op, const DeviceTensor<T>& x, float alpha = 1.f);
// dx = dy·f'(x):   dy, x (one shape) -> dx (allocated). Saved: x.
template <class T>
DeviceTensor<T> unary_backward(DeviceUnaryOp op, const DeviceTensor<T>& dy, const DeviceTensor<T>& x, float alpha = 1.f);

// out = f(a, b), a and b of one shape (no broadcasting on the device yet).
template <class T>
DeviceTensor<T> binary_forward(DeviceBinaryOp op, const DeviceTensor<T>& a, const DeviceTensor<T>& b);
// da = dy·∂f/∂a, db = dy·∂f/∂b (allocated; nullptr: not wanted). Saved: a, b.
template <class T>
void binary_backward(DeviceBinaryOp op, NoDeduce<DeviceTensor<T>>* da, NoDeduce<DeviceTensor<T>>* db, const DeviceTensor<T>& dy,
                     const DeviceTensor<T>& a, const DeviceTensor<T>& b);

// ---- reductions -------------------------------------------------------------------------------
// s = Σ x, summed in fp32 (fp64 for double: device_accum_t<T>) in a fixed order (bit-identical run to
// run). Waits for the device.
template <class T>
device_accum_t<T> sum_forward(const DeviceTensor<T>& x);
// s = Σ over every leading index of x (..., n) -> (n): the bias gradient's reduction, in row order.
template <class T>
DeviceTensor<T> sum_rows_forward(const DeviceTensor<T>& x);

// loss = mean((a − b)²)          a, b (same shape) -> scalar (to the host; waits for the device)
template <class T>
device_accum_t<T> mse_loss_forward(const DeviceTensor<T>& a, const DeviceTensor<T>& b);
// Backward of loss = mean((a − b)²):   da = dloss·2(a − b)/N,  db = −da (allocated; nullptr: not wanted).
template <class T>
void mse_loss_backward(NoDeduce<DeviceTensor<T>>* da, NoDeduce<DeviceTensor<T>>* db, device_accum_t<T> dloss, const DeviceTensor<T>& a,
                       const DeviceTensor<T>& b);

// ---- layout (kernels/layout.hpp): one strided-copy kernel ---------------------------------------------
// y.dim(k) = x.dim(perm[k]) (a copy). The backward is permute by inverse_permutation(perm, rank).
// split_heads is reshape (B, L, H, D) + permute {0, 2, 1, 3}; merge_heads the inverse.
template <class T>
DeviceTensor<T> permute_forward(const DeviceTensor<T>& x, const Permutation& perm);
// y = x[..., start:start+length, ...] along dim (a copy).
template <class T>
DeviceTensor<T> narrow_forward(const DeviceTensor<T>& x, int dim, std::int64_t start, std::int64_t length);
// Backward of narrow: dx = zeros(x_shape) with the slice set to dy.
template <class T>
DeviceTensor<T> narrow_backward(const DeviceTensor<T>& dy, const Shape& x_shape, int dim, std::int64_t start);

// ---- softmax over the last dimension ------------------------------------------------------------
// The masks of kernels/softmax.hpp, on the device (true = keep): causal, keep (broadcastable to x),
// key_padding ((batch, Lk) for rank >= 3, (Lk) for rank 2).
struct DeviceMask {
    bool causal = false;
    DeviceTensor<bool> keep;
    DeviceTensor<bool> key_padding;
};

// y = softmax(x + additive, masked) over the last dimension; a fully masked row gives 0.   x (..., Lk) -> y
template <class T>
DeviceTensor<T> softmax_forward(const DeviceTensor<T>& x, const DeviceMask& mask = {}, const DeviceTensor<T>& additive = {});
// dx = y ⊙ (dy − rowsum(dy ⊙ y)).   dy, y (..., Lk) -> dx. Saved: y.
template <class T>
DeviceTensor<T> softmax_backward(const DeviceTensor<T>& dy, const DeviceTensor<T>& y);

// ---- dropout ----------------------------------------------------------------------------------
// y = x·keep/(1 − rate), keep(i) the CPU's decision for element i (dropout_keeps: Philox4x32-10 keyed
// by the seed, counter (i/4, offset)): a device tensor and its host copy get identical masks.
// Evaluation (training == false) or rate == 0: y = x (the same storage, as on the CPU).
template <class T>
DeviceTensor<T> dropout_forward(const DropoutDescriptor& d, const DeviceTensor<T>& x);
// dx = dy·keep/(1 − rate), keep regenerated from (seed, offset).
template <class T>
DeviceTensor<T> dropout_backward(const DropoutDescriptor& d, const DeviceTensor<T>& dy);

}  // namespace autodiff

#pragma once
// Fused attention on the GPU (issue 12): the functional API of kernels/attention.hpp for device tensors.
//
//   S = scale·Q·Kᵀ + bias_scale·bias     (masked entries: −inf)
//   P = softmax(S) over keys; a row whose keys are all masked gives P = 0 (O = 0, zero gradients)
//   O = dropout(P)·V
//
// Shapes as on the CPU: Q (..., Lq, d), K (..., Lk, d), V (..., Lk, dv), equal leading dimensions
// (rank 2..4), d and dv at most 128; bias of any shape broadcastable to the scores (..., Lq, Lk), its
// gradient in its own shape. Masks (true = keep, all applied together, as the CPU's Mask): causal
// (top-left aligned), key padding (batch, Lk), and a keep mask of any shape broadcastable to the
// scores (broadcast like the bias; never in the Plain kernels). Whole tiles are skipped where causal
// or key padding keeps nothing, and where the keep mask does: each call first classifies every 64 × 64
// tile of each plane of the keep mask as empty (skipped by every kernel), full (no per-element keep
// test) or partial (read per element), FlexAttention's block mask. Dropout decisions are the CPU's: Philox4x32-10
// keyed by the seed, element index ((t·Lq + i)·Lk + j) for leading index t (kernels/dropout.hpp).
//
// FlashAttention-2 tiling. bf16/fp16: register-resident kernels on mma.sync.m16n8k16 (16-bit operands,
// fp32 accumulate), one warp per 16 rows of a 64-row block, 64-key tiles; S, the online softmax and P
// stay in registers (P is repacked as the next product's operand), K/V (or Q/dO) and the bias tile are
// double-buffered in shared memory by cp.async; head dimensions are padded to 64 or 128. float32: 32×32
// tiles staged in shared memory with fp32 FMA products (a slower, exact path). The softmax statistics,
// O and all gradients accumulate in fp32. No L×L buffer in the forward; the backward recomputes P.
//
// Determinism: no atomics. The backward runs one kernel over key blocks (dK, dV, and dS written to a
// full-shape bias gradient) and one over query blocks (dQ): with a full-shape bias gradient (and
// bias_scale ≠ 0) it reads dS back from it (dQ = scale/bias_scale · dbias·K, a plain tile product),
// otherwise it recomputes S and dP (then on a second stream of the device, concurrently with the dK/dV
// kernel, joined back to the default stream before the call returns). A broadcast bias gradient is reduced from an fp32 dS buffer by a
// kernel that sums each output element in a fixed order. Results are bit-identical run to run.

#include "autodiff/cuda/device.hpp"
#include "autodiff/kernels/dropout.hpp"

namespace autodiff {

struct DeviceAttentionOptions {
    double scale = 1.0;       // of Q·Kᵀ
    double bias_scale = 1.0;  // of the bias
    bool causal = false;      // key j is visible to query i iff j <= i
    DeviceTensor<bool> key_padding;  // (batch, Lk) for rank >= 3, (Lk) for rank 2; true = keep
    DeviceTensor<bool> keep;         // broadcastable to the scores (..., Lq, Lk); true = keep
    DropoutDescriptor dropout;
};

template <class T>
struct DeviceAttentionSaved {
    DeviceTensor<T> O;                     // (..., Lq, dv)
    DeviceTensor<device_accum_t<T>> lse;  // (..., Lq): log Σ_j exp(S_ij) over kept keys, −inf for fully masked rows
};

// bias may be undefined (absent). T: float, bf16, fp16 or double. double runs the fp64 kernels of
// src/cuda/attention_fp64.cu (every step in double, one thread a row: for gradient checks on small
// problems, not for speed), with the same shapes, masks, dropout decisions and determinism.
template <class T>
DeviceAttentionSaved<T> attention_forward(const DeviceTensor<T>& Q, const DeviceTensor<T>& K, const DeviceTensor<T>& V,
                                          const DeviceTensor<T>& bias, const DeviceAttentionOptions& opt);

// Backward, with D_i = rowsum(dO_i ⊙ O_i) and P = e^(S − lse) recomputed tile by tile:
//   dV = dropout(P)ᵀ·dO,  dP = dropout_mask ⊙ (dO·Vᵀ),  dS = P ⊙ (dP − D)
//   dQ = scale·dS·K,  dK = scale·dSᵀ·Q,  dbias = bias_scale·reduce(dS, bias's shape)
// Gradients are written (not accumulated); pass nullptr for any that is not wanted.
template <class T>
void attention_backward(DeviceTensor<T>* dQ, DeviceTensor<T>* dK, DeviceTensor<T>* dV, DeviceTensor<T>* dbias,
                        const DeviceTensor<T>& dO, const DeviceTensor<T>& Q, const DeviceTensor<T>& K,
                        const DeviceTensor<T>& V, const DeviceTensor<T>& bias, const DeviceAttentionSaved<T>& saved,
                        const DeviceAttentionOptions& opt);

}  // namespace autodiff

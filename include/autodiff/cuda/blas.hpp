#pragma once
// Matrix products on the GPU through cuBLAS (issue 12): the functional API of kernels/gemm.hpp and
// kernels/linear.hpp for device tensors, same names, shapes, broadcasting and checks.
//
//   strided_batched_gemm:  C = beta·C + alpha·op_c(op_a(A)·op_b(B))        (one cublasGemmStridedBatchedEx)
//   linear:                y = x·Wᵀ + b
//
// Element types: float (fp32 products, no TF32: CUBLAS_COMPUTE_32F), bf16 and fp16 (16-bit operands,
// fp32 accumulation, CUBLAS_COMPUTE_32F), double (fp64 throughout, CUBLAS_COMPUTE_64F). alpha and beta
// are float for every T (widened exactly to double for double).
// Batches as on the CPU: a rank-2 operand is broadcast over the other's batch (stride 0); a rank-2 C
// with batched operands receives the sum over the batch, one product per batch index added in order.
// Determinism: cuBLAS gives bit-identical results run to run for one configuration (toolkit, GPU
// model, SM count) on one stream; every call here runs on the default stream with a handle of this
// library, and the bias gradient is a column sum in row order (no atomics). CUBLAS_WORKSPACE_CONFIG
// matters only for several streams sharing a handle, which this library never does.

#include "autodiff/cuda/device.hpp"
#include "autodiff/kernels/gemm.hpp"
#include "autodiff/kernels/linear.hpp"

namespace autodiff {

// C = beta·C + alpha·op_c(op_a(A)·op_b(B)); C preallocated (not read when beta == 0).
template <class T>
void strided_batched_gemm(float alpha, const DeviceTensor<T>& A, const DeviceTensor<T>& B, float beta, DeviceTensor<T>& C,
                          GemmFlags flags = {});

// Backward of the above:   dC (C's shape) -> dA (A's shape), dB (B's shape), each = beta·d + alpha·∂/∂.
// dA and dB preallocated; nullptr: not wanted. A broadcast operand's gradient is summed over the batch.
template <class T>
void strided_batched_gemm_backward(NoDeduce<DeviceTensor<T>>* dA, NoDeduce<DeviceTensor<T>>* dB, const DeviceTensor<T>& dC, float alpha,
                                   const DeviceTensor<T>& A, const DeviceTensor<T>& B, float beta, GemmFlags flags = {});

// C = op_a(A)·op_b(B), allocated.
template <class T>
DeviceTensor<T> matmul_forward(const DeviceTensor<T>& A, bool trans_a, const DeviceTensor<T>& B, bool trans_b);

// Backward of C = op_a(A)·op_b(B): dA, dB allocated here (any previous content replaced); nullptr: not wanted.
template <class T>
void matmul_backward(NoDeduce<DeviceTensor<T>>* dA, NoDeduce<DeviceTensor<T>>* dB, const DeviceTensor<T>& dC, const DeviceTensor<T>& A,
                     bool trans_a, const DeviceTensor<T>& B, bool trans_b);

// y = x·Wᵀ + b:   x (..., in), W (out, in), b (out) or undefined -> y (..., out)
template <class T>
DeviceTensor<T> linear_forward(const DeviceTensor<T>& x, const DeviceTensor<T>& W, const DeviceTensor<T>& b = {});

// Backward of y = x·Wᵀ + b:
//   dx  = dy·W         (allocated)      dy (..., out) -> dx (..., in)
//   dW += dyᵀ·x        (accumulated)    (out, in)
//   db += colsum(dy)   (accumulated)    (out)
// As on the CPU: dW and db preallocated and accumulated into (zero() them for the plain gradient).
template <class T>
void linear_backward(NoDeduce<DeviceTensor<T>>* dx, NoDeduce<DeviceTensor<T>>* dW, NoDeduce<DeviceTensor<T>>* db, const DeviceTensor<T>& dy,
                     const DeviceTensor<T>& x, const DeviceTensor<T>& W);

}  // namespace autodiff

#pragma once
// Strided batched GEMM, cuDNN style:   C = beta·C + alpha·op_c(op_a(A) · op_b(B))
// where op_x(X) is X or Xᵀ over the last two dimensions (trans_x).
//
// Shapes: A (..., ra, ca), B (..., rb, cb), C (..., M, N); op_a(A) is (M, K), op_b(B) is (K, N).
// Batch: the leading dimensions of the batched operands must be equal. A rank-2 A or B is broadcast
// over the batch (like torch.matmul); a rank-2 C with batched A or B receives the sum of the products
// over the batch (the gradient of a broadcast operand). With beta == 0, C is not read (may be
// uninitialised). The backward is the same function with other flags (strided_batched_gemm_backward).

#include "autodiff/tensor.hpp"

namespace autodiff {

struct GemmFlags {
    bool trans_a = false;
    bool trans_b = false;
    bool trans_c = false;
};

// Validates the shapes of C = op(A)·op(B) and returns C's shape. `op` names the caller in errors.
Shape gemm_output_shape(std::string_view op, const Shape& a, bool trans_a, const Shape& b, bool trans_b);

template <class T>
void strided_batched_gemm(T alpha, const Tensor<T>& A, const Tensor<T>& B, T beta, Tensor<T>& C, GemmFlags flags = {});

// Backward of C = beta_c·C + alpha·op_c(op_a(A)·op_b(B)) (the cuDNN-style pair of the forward):
//   dC (C's shape) -> dA (A's shape), dB (B's shape); a broadcast operand's gradient is summed over the batch.
//   dA = beta·dA + alpha·∂(op_c(op_a(A)·op_b(B)))/∂A applied to dC, and likewise dB.
// Saved: A (for dB) and B (for dA). dA and dB must be preallocated with A's and B's shapes; they are
// scaled by beta and accumulated into (beta = 0 overwrites them without reading, beta = 1 accumulates).
// Pass nullptr for a gradient that is not wanted. The gradient with respect to the old C is beta_c·dC
// (not computed here).
template <class T>
void strided_batched_gemm_backward(NoDeduce<Tensor<T>>* dA, NoDeduce<Tensor<T>>* dB, const Tensor<T>& dC, T alpha,
                                   const Tensor<T>& A, const Tensor<T>& B, T beta, GemmFlags flags = {});

// C = op_a(A)·op_b(B), allocated.
template <class T>
Tensor<T> matmul_forward(const Tensor<T>& A, bool trans_a, const Tensor<T>& B, bool trans_b);

// Backward of C = op_a(A)·op_b(B):
//   dC (..., M, N) -> dA (A's shape), dB (B's shape); a broadcast operand's gradient is summed over the batch.
//   op_a(A) = A:  dA = dC·op_b(B)ᵀ      op_a(A) = Aᵀ: dA = op_b(B)·dCᵀ
//   op_b(B) = B:  dB = op_a(A)ᵀ·dC      op_b(B) = Bᵀ: dB = dCᵀ·op_a(A)
// Saved: A (for dB) and B (for dA). dA and dB are allocated here (any previous content is replaced);
// pass nullptr for a gradient that is not wanted.
template <class T>
void matmul_backward(NoDeduce<Tensor<T>>* dA, NoDeduce<Tensor<T>>* dB, const Tensor<T>& dC, const Tensor<T>& A, bool trans_a,
                     const Tensor<T>& B, bool trans_b);

}  // namespace autodiff

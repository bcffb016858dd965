#pragma once
// Linear layer, as in the eigenMHA seed:   y = x·Wᵀ + b
//   x (..., in), W (out, in), b (out) or undefined  ->  y (..., out)

#include <span>

#include "autodiff/tensor.hpp"

namespace autodiff {

// Validates the shapes and returns y's shape; `op` names the caller in errors.
Shape linear_output_shape(std::string_view op, const Shape& x, const Shape& W, const Shape* b);

template <class T>
Tensor<T> linear_forward(const Tensor<T>& x, const Tensor<T>& W, const Tensor<T>& b = {});

// Backward of y = x·Wᵀ + b:
//   dx  = dy·W             (allocated)      dy (..., out), W (out, in) -> dx (..., in)
//   dW += dyᵀ·x            (accumulated)    (out, in), summed over every leading index of x
//   db += colsum(dy)       (accumulated)    (out)
// Saved: x (for dW) and W (for dx). dx is allocated here (any previous content is replaced); dW and db
// must be preallocated and are accumulated into, as eigenMHA does (zero them to get the plain gradient).
// Pass nullptr for any gradient that is not wanted.
template <class T>
void linear_backward(NoDeduce<Tensor<T>>* dx, NoDeduce<Tensor<T>>* dW, NoDeduce<Tensor<T>>* db, const Tensor<T>& dy,
                     const Tensor<T>& x, const Tensor<T>& W);

// ---- linear layers in the attention's head layout ----------------------------------------------
// The GEMM reads or writes the (B, H, L, D) layout directly (gemm_internal.hpp): no split_heads or
// merge_heads copy, in the forward or the backward.
//
// linear_heads: y = split_heads(x·Wᵀ + b) into S parts (S = 3: q, k, v from a packed in-projection)
//   x (B, L, in), W (S·E, in), b (S·E) or undefined  ->  y_s (B, H, L, D), D = E/H, s < S
//   y_s[b, h, l, d] = (x·Wᵀ + b)[b, l, (s·H + h)·D + d]
//   = split_heads(narrow(linear(x, W, b), 2, s·E, E), H)
// Validates the shapes and returns each y_s's shape; `op` names the caller in errors.
Shape linear_heads_output_shape(std::string_view op, const Shape& x, const Shape& W, const Shape* b, std::int64_t heads,
                                std::int64_t parts);

// y.size() parts (1 to 3), each allocated here.
template <class T>
void linear_heads_forward(const Tensor<T>& x, const Tensor<T>& W, const Tensor<T>& b, std::int64_t heads, std::span<Tensor<T>> y);

// Backward of linear_heads, with dY the (B·L, S·E) matrix of the parts dy_s (B, H, L, D) side by side:
//   dx  = dY·W             (allocated)      (B, L, in)
//   dW += dYᵀ·x            (accumulated)    (S·E, in)
//   db += colsum(dY)       (accumulated)    (S·E)
// Saved: x (for dW) and W (for dx). dy holds every part (all defined); nullptr for an unwanted gradient.
template <class T>
void linear_heads_backward(NoDeduce<Tensor<T>>* dx, NoDeduce<Tensor<T>>* dW, NoDeduce<Tensor<T>>* db, std::span<const Tensor<T>> dy,
                           const Tensor<T>& x, const Tensor<T>& W);

// heads_linear: y = merge_heads(o)·Wᵀ + b (the output projection reading the attention's output)
//   o (B, H, L, D), W (out, H·D), b (out) or undefined  ->  y (B, L, out)
//   = linear(merge_heads(o), W, b)
Shape heads_linear_output_shape(std::string_view op, const Shape& o, const Shape& W, const Shape* b);

template <class T>
Tensor<T> heads_linear_forward(const Tensor<T>& o, const Tensor<T>& W, const Tensor<T>& b = {});

// Backward of heads_linear, with O the (B·L, H·D) matrix merge_heads(o):
//   do  = dy·W             (allocated, in o's head layout)   (B, H, L, D)
//   dW += dyᵀ·O            (accumulated)                     (out, H·D)
//   db += colsum(dy)       (accumulated)                     (out)
// Saved: o (for dW) and W (for do).
template <class T>
void heads_linear_backward(NoDeduce<Tensor<T>>* d_o, NoDeduce<Tensor<T>>* dW, NoDeduce<Tensor<T>>* db, const Tensor<T>& dy,
                           const Tensor<T>& o, const Tensor<T>& W);

}  // namespace autodiff

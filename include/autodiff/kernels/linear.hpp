#pragma once
// Linear layer, as in the eigenMHA seed:   y = x·Wᵀ + b
//   x (..., in), W (out, in), b (out) or undefined  ->  y (..., out)

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

}  // namespace autodiff

#pragma once
// Reductions and the MSE loss. Sums run over fixed chunks combined in a fixed order, so results are
// bit-identical for any thread count.

#include "autodiff/tensor.hpp"

namespace autodiff {

// s = Σ x
template <class T>
T sum_forward(const Tensor<T>& x);

// loss = mean((a − b)²)          a, b (same shape) -> scalar
template <class T>
T mse_loss_forward(const Tensor<T>& a, const Tensor<T>& b);

// Backward of loss = mean((a − b)²):   da = dloss·2(a − b)/N,  db = −da.
//   dloss (scalar), a, b (same shape) -> da, db (that shape). Saved: a, b.
// da and db are allocated here (any previous content is replaced); pass nullptr for a gradient that
// is not wanted.
template <class T>
void mse_loss_backward(NoDeduce<Tensor<T>>* da, NoDeduce<Tensor<T>>* db, T dloss, const Tensor<T>& a, const Tensor<T>& b);

}  // namespace autodiff

#pragma once
// The MLP's fused bias and activation:   y = gelu(x + b), b broadcast over every row of x
//   x (..., n), b (n) -> y (x's shape); gelu exact or tanh-approximated (GeluApproximate), with the
//   formulas of the elementwise Gelu op (kernels/elementwise.hpp), so it rounds as gelu(x + b).
// One pass over x each way; x + b is recomputed in the backward rather than kept. db is summed over
// the rows in fixed chunks added in order: bit-identical for any thread count.

#include "autodiff/kernels/elementwise.hpp"

namespace autodiff {

// Throws unless x has rank 1..4 and b has shape (n) for x (..., n). `op` names the caller in errors.
void check_bias_gelu(std::string_view op, const Shape& x, const Shape& b);

// y = gelu(x + b)
template <class T>
Tensor<T> bias_gelu_forward(const Tensor<T>& x, const Tensor<T>& b, GeluApproximate approximate = GeluApproximate::none);

// Backward of y = gelu(x + b):   dx = dy ⊙ gelu'(x + b)   (x's shape),   db = Σ_rows dx   (n)
// Saved: x and b. dx and db are allocated here (any previous content is replaced); nullptr: not wanted.
template <class T>
void bias_gelu_backward(NoDeduce<Tensor<T>>* dx, NoDeduce<Tensor<T>>* db, const Tensor<T>& dy, const Tensor<T>& x,
                        const Tensor<T>& b, GeluApproximate approximate = GeluApproximate::none);

}  // namespace autodiff

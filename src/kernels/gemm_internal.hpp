#pragma once
// Products shared by the kernels in src/kernels (internal; the public ones are in kernels/gemm.hpp).

#include "autodiff/tensor.hpp"

namespace autodiff {

// y2 (m × n) = x2 (m × k)·Wᵀ (W: n × k) + b (n, or undefined): linear's product, with the bias added
// in the GEMM's output pass. Shapes are validated by the caller (linear_output_shape).
template <class T>
void linear_product(const Tensor<T>& x2, const Tensor<T>& W, const Tensor<T>& b, Tensor<T>& y2);

}  // namespace autodiff

#pragma once
// The fused expression of fused_expression.cu (y = tanh(a·b + 0.5)·a/(1 + sigmoid(b)) − relu(a − b)²/4):
// its device forward and forward-mode gradients on raw device pointers of n floats.
#include <cstdint>

#include <cuda_runtime.h>

namespace test {

cudaError_t fused_expression_forward(const float* a, const float* b, float* y, std::int64_t n);
cudaError_t fused_expression_backward(const float* a, const float* b, const float* dy, float* da, float* db, std::int64_t n);

}  // namespace test

// A fused expression built in a CUDA file with the device expression layer (cuda/expr.cuh), as a user's
// .cu would: its forward and its forward-mode gradients, for test_cuda_ops.cpp (which compares them
// with the formulas in double). Plain pointers only: this file includes neither fmt nor Eigen.
#include "fused_expression.hpp"

#include "autodiff/cuda/expr.cuh"

namespace test {

namespace {
namespace ex = autodiff::device_expr;
// y = tanh(a·b + 0.5)·a / (1 + sigmoid(b)) − relu(a − b)²·0.25: a appears three times, b four.
constexpr auto fused() {
    constexpr auto a = ex::arg<0>();
    constexpr auto b = ex::arg<1>();
    return ex::tanh(a * b + 0.5f) * a / (1.f + ex::sigmoid(b)) - ex::square(ex::relu(a - b)) * 0.25f;
}
}  // namespace

cudaError_t fused_expression_forward(const float* a, const float* b, float* y, std::int64_t n) {
    return ex::evaluate<float, 2>(fused(), {{a, b}}, y, n);
}

cudaError_t fused_expression_backward(const float* a, const float* b, const float* dy, float* da, float* db, std::int64_t n) {
    return ex::evaluate_gradients<float, 2>(fused(), {{a, b}}, dy, {{da, db}}, false, n);
}

}  // namespace test

#pragma once
// The named elementwise ops of the device functional API (cuda/ops.hpp). Each is one expression of the
// device expression layer (cuda/expr.cuh) run by its one templated evaluator. No includes: read by
// nvcc (src/cuda/ops_kernels.cu) and by the host compiler alike.

namespace autodiff {

// y = f(x)
enum class DeviceUnaryOp {
    neg,        // −x
    scale,      // alpha·x
    exp,        // e^x
    log,        // ln x
    tanh,       // tanh x
    sigmoid,    // 1/(1 + e^−x)
    relu,       // max(x, 0), NaN propagated
    square,     // x²
    sqrt,       // √x
    gelu,       // x·Φ(x)
    gelu_tanh,  // x/2·(1 + tanh(√(2/π)·(x + 0.044715·x³)))
};

// out = f(a, b), a and b of one shape
enum class DeviceBinaryOp { add, sub, mul, div };

}  // namespace autodiff

#pragma once
// The one CUDA error check of src/cuda: every runtime call and every launch goes through it.

#include <cuda_runtime.h>

#include "autodiff/error.hpp"

namespace autodiff::detail {

inline void cuda_check(cudaError_t status, std::string_view op, const char* what) {
    if (status != cudaSuccess) fail(op, "{} failed on the cuda device: {} ({})", what, cudaGetErrorString(status), cudaGetErrorName(status));
}

}  // namespace autodiff::detail

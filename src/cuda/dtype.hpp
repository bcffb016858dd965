#pragma once
// The launchers' element-type tag of a device tensor's T (float, bf16, fp16), for the host files of
// src/cuda.

#include <type_traits>

#include "attention_kernels.hpp"
#include "autodiff/cuda/device.hpp"

namespace autodiff::detail {

template <class T>
constexpr DeviceDType dtype_of() {
    static_assert(std::is_same_v<T, float> || std::is_same_v<T, bf16> || std::is_same_v<T, fp16>,
                  "a device tensor's element type is float, bf16 or fp16");
    if constexpr (std::is_same_v<T, float>) return DeviceDType::f32;
    else if constexpr (std::is_same_v<T, bf16>) return DeviceDType::bf16;
    else return DeviceDType::f16;
}

}  // namespace autodiff::detail

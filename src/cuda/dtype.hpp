#pragma once
// The launchers' element-type tag of a device tensor's T (float, bf16, fp16, double), for the host files
// of src/cuda.

#include <type_traits>

#include "attention_kernels.hpp"
#include "autodiff/cuda/device.hpp"

namespace autodiff::detail {

template <class T>
constexpr DeviceDType dtype_of() {
    static_assert(is_device_value_type_v<T>, "a device tensor's element type is float, bf16, fp16 or double");
    if constexpr (std::is_same_v<T, float>) return DeviceDType::f32;
    else if constexpr (std::is_same_v<T, double>) return DeviceDType::f64;
    else if constexpr (std::is_same_v<T, bf16>) return DeviceDType::bf16;
    else return DeviceDType::f16;
}

}  // namespace autodiff::detail

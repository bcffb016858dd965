// Comparisons shared by the GPU tests: a device result against the CPU's, as one relative error per
// tensor (the norm of the difference over the norm of the CPU's), and bitwise equality for the
// determinism checks.
#pragma once

#include <doctest/doctest.h>

#include <cmath>
#include <cstring>
#include <string>

#include "autodiff/cuda/device.hpp"
#include "autodiff/tensor.hpp"

namespace autodiff::test {

// ‖a − b‖ / ‖b‖ (‖b‖ = 0: ‖a‖); NaN if either holds a NaN. Infinite entries (the lse of fully masked
// rows, −inf on both sides) must be equal and are left out of the norms.
template <class T>
double relative_error(const Tensor<T>& a, const Tensor<T>& b) {
    REQUIRE(a.shape() == b.shape());
    double diff = 0, ref = 0;
    for (std::int64_t i = 0; i < a.numel(); ++i) {
        const double x = a.data()[i], y = b.data()[i];
        if (std::isinf(x) || std::isinf(y)) {
            if (x != y) return INFINITY;
            continue;
        }
        diff += (x - y) * (x - y);
        ref += y * y;
    }
    return ref > 0 ? std::sqrt(diff / ref) : std::sqrt(diff);
}

template <class T>
void check_close(const std::string& name, const Tensor<T>& gpu, const Tensor<T>& cpu, double tolerance) {
    const double err = relative_error(gpu, cpu);
    MESSAGE(name, ": relative error ", err, " (tolerance ", tolerance, ")");
    CHECK(err <= tolerance);
}

// A device tensor of any element type against the CPU's float result (read back as float).
template <class S>
void check_close(const std::string& name, const DeviceTensor<S>& gpu, const Tensor<float>& cpu, double tolerance) {
    check_close(name, to(gpu, autodiff::cpu), cpu, tolerance);
}

template <class T>
bool bitwise_equal(const Tensor<T>& a, const Tensor<T>& b) {
    return a.shape() == b.shape() && std::memcmp(a.data(), b.data(), static_cast<std::size_t>(a.numel()) * sizeof(T)) == 0;
}

}  // namespace autodiff::test

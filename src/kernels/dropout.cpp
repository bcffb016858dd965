#include "autodiff/kernels/dropout.hpp"

#include <algorithm>
#include <cmath>

#include "autodiff/parallel.hpp"
#include "philox_simd.hpp"

namespace autodiff {

void check_dropout(std::string_view op, const DropoutDescriptor& d) {
    if (!(d.rate >= 0.0 && d.rate < 1.0)) fail(op, "rate must be in [0, 1), got {}", d.rate);
}

std::uint64_t dropout_keep_bits(const DropoutDescriptor& d, std::uint64_t first, std::int64_t n) {
    return detail::DropoutKeepBits(d)(first, n);
}

namespace {

// out[i] = in[i]·keep(i)/(1-rate); also the backward, which applies the same mask to dy.
template <class T>
Tensor<T> apply_dropout_mask(const char* op, const DropoutDescriptor& d, const Tensor<T>& in) {
    check_dropout(op, d);
    if (!d.training || d.rate == 0.0) return in;
    Tensor<T> out(in.shape());
    const T scale = static_cast<T>(1.0 / (1.0 - d.rate));
    const T* src = in.data();
    T* dst = out.data();
    const detail::DropoutKeepBits keep_bits(d);
    parallel_chunks(in.numel(), 1 << 14, [&](std::int64_t b, std::int64_t e) {
        for (std::int64_t i = b; i < e; i += 64) {
            const std::int64_t n = std::min<std::int64_t>(64, e - i);
            detail::multiply_by_keep(src + i, dst + i, n, keep_bits(static_cast<std::uint64_t>(i), n), scale);
        }
    });
    return out;
}

}  // namespace

template <class T>
Tensor<T> dropout_forward(const DropoutDescriptor& d, const Tensor<T>& x) {
    return apply_dropout_mask("dropout", d, x);
}

template <class T>
Tensor<T> dropout_backward(const DropoutDescriptor& d, const Tensor<T>& dy) {
    return apply_dropout_mask("dropout_backward", d, dy);
}

template Tensor<float> dropout_forward<float>(const DropoutDescriptor&, const Tensor<float>&);
template Tensor<double> dropout_forward<double>(const DropoutDescriptor&, const Tensor<double>&);
template Tensor<float> dropout_backward<float>(const DropoutDescriptor&, const Tensor<float>&);
template Tensor<double> dropout_backward<double>(const DropoutDescriptor&, const Tensor<double>&);

}  // namespace autodiff

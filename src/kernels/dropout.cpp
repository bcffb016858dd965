#include "autodiff/kernels/dropout.hpp"

#include <algorithm>
#include <cmath>

#include "autodiff/parallel.hpp"

namespace autodiff {

void check_dropout(std::string_view op, const DropoutDescriptor& d) {
    if (!(d.rate >= 0.0 && d.rate < 1.0)) fail(op, "rate must be in [0, 1), got {}", d.rate);
}

namespace {

// out[i] = in[i]·keep(i)/(1-rate); also the backward, which applies the same mask to dy.
template <class T>
Tensor<T> apply_dropout_mask(const char* op, const DropoutDescriptor& d, const Tensor<T>& in) {
    check_dropout(op, d);
    if (!d.training || d.rate == 0.0) return in;
    Tensor<T> out(in.shape());
    const std::uint64_t threshold = dropout_threshold(d.rate);
    const T scale = static_cast<T>(1.0 / (1.0 - d.rate));
    const Philox4x32::Key key{static_cast<std::uint32_t>(d.seed), static_cast<std::uint32_t>(d.seed >> 32)};
    const T* src = in.data();
    T* dst = out.data();
    // Chunks are multiples of 64 elements: 16 Philox blocks, generated together, serve 64 elements.
    constexpr int blocks = 16;
    parallel_chunks(in.numel(), 1 << 14, [&](std::int64_t b, std::int64_t e) {
        std::uint32_t bits[4 * blocks];
        for (std::int64_t i = b; i < e; i += 4 * blocks) {
            Philox4x32::generate_blocks<blocks>(static_cast<std::uint64_t>(i) >> 2, d.offset, key, bits);
            const std::int64_t n = std::min<std::int64_t>(4 * blocks, e - i);
            // A multiply, not a select: a dropped NaN stays NaN (NaN is never silently zeroed).
            for (std::int64_t l = 0; l < n; ++l) dst[i + l] = src[i + l] * (bits[l] >= threshold ? scale : T(0));
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

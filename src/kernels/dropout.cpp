#include "autodiff/kernels/dropout.hpp"

#include <algorithm>
#include <cmath>

#include "autodiff/parallel.hpp"
#include "philox_simd.hpp"

namespace autodiff {

void check_dropout(std::string_view op, const DropoutDescriptor& d) {
    if (!(d.rate >= 0.0 && d.rate < 1.0)) fail(op, "rate must be in [0, 1), got {}", d.rate);
}

template <class T>
void dropout_factors(const DropoutDescriptor& d, std::uint64_t first, std::int64_t n, T scale, T* factor) {
    // 64 elements starting anywhere inside a block of 4 words span up to 17 blocks.
    alignas(64) std::uint32_t bits[4 * 17];
    const Philox4x32::Key key{static_cast<std::uint32_t>(d.seed), static_cast<std::uint32_t>(d.seed >> 32)};
    const std::uint64_t block = first >> 2;
    detail::philox_blocks16(block, d.offset, key, bits);
    if (static_cast<std::int64_t>(first & 3) + n > 64) {
        const std::uint64_t last = block + 16;
        const auto words = Philox4x32::generate({static_cast<std::uint32_t>(last), static_cast<std::uint32_t>(last >> 32),
                                                 static_cast<std::uint32_t>(d.offset), static_cast<std::uint32_t>(d.offset >> 32)},
                                                key);
        std::copy(words.begin(), words.end(), bits + 64);
    }
    const std::uint64_t threshold = dropout_threshold(d.rate);
    const std::uint32_t* b = bits + (first & 3);
    if (threshold > 0xFFFFFFFFu) {  // a rate within 2^-33 of 1 drops everything
        std::fill_n(factor, n, T(0));
        return;
    }
    // A 32-bit comparison: the loop vectorises 16 lanes wide instead of widening every word to 64 bits.
    const auto threshold32 = static_cast<std::uint32_t>(threshold);
    for (std::int64_t k = 0; k < n; ++k) factor[k] = b[k] >= threshold32 ? scale : T(0);
}
template void dropout_factors<float>(const DropoutDescriptor&, std::uint64_t, std::int64_t, float, float*);
template void dropout_factors<double>(const DropoutDescriptor&, std::uint64_t, std::int64_t, double, double*);

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
    parallel_chunks(in.numel(), 1 << 14, [&](std::int64_t b, std::int64_t e) {
        T factor[64];
        for (std::int64_t i = b; i < e; i += 64) {
            const std::int64_t n = std::min<std::int64_t>(64, e - i);
            dropout_factors(d, static_cast<std::uint64_t>(i), n, scale, factor);
            // A multiply, not a select: a dropped NaN stays NaN (NaN is never silently zeroed).
            for (std::int64_t l = 0; l < n; ++l) dst[i + l] = src[i + l] * factor[l];
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

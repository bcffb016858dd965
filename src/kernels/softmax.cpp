#include "autodiff/kernels/softmax.hpp"

#include <cmath>
#include <limits>

#include "autodiff/kernels/elementwise.hpp"
#include "autodiff/parallel.hpp"
#include "autodiff/detail/simd.hpp"

namespace autodiff {

Mask operator|(const Mask& a, const Mask& b) {
    auto pick = [](const Tensor<bool>& x, const Tensor<bool>& y, const char* what) {
        if (x.defined() && y.defined())
            fail("mask", "cannot combine two {} masks ({} and {}); combine the tensors first", what, x.shape(), y.shape());
        return x.defined() ? x : y;
    };
    return Mask{a.causal || b.causal, pick(a.keep, b.keep, "keep"), pick(a.key_padding, b.key_padding, "key-padding")};
}

namespace {

// The key-padding mask as a keep mask broadcastable to x: (batch, Lk) -> (batch, 1, .., 1, Lk).
Tensor<bool> key_padding_as_keep(const Tensor<bool>& kp, const Shape& x) {
    if (!kp.defined()) return {};
    if (x.rank() < 3) return kp;
    Shape s{kp.dim(0)};
    for (int i = 1; i + 1 < x.rank(); ++i) s.push_back(1);
    s.push_back(kp.dim(1));
    return kp.reshaped(s);
}

}  // namespace

template <class T>
void check_softmax_mask(std::string_view op, const Shape& x, const Mask& mask, const Tensor<T>& additive) {
    if (x.rank() < 1) fail(op, "input must have rank >= 1, got {}", x);
    if (mask.causal && x.rank() < 2) fail(op, "a causal mask needs logits of rank >= 2 (.., Lq, Lk), got {}", x);
    if (mask.keep.defined() && !broadcasts_to(mask.keep.shape(), x))
        fail(op, "keep mask {} does not broadcast to the logits {}", mask.keep.shape(), x);
    if (mask.key_padding.defined()) {
        const Shape& kp = mask.key_padding.shape();
        const bool ok = x.rank() >= 3 ? kp == Shape{x[0], x.dim_from_end(1)} : kp == Shape{x.dim_from_end(1)};
        if (!ok) {
            if (x.rank() >= 3)
                fail(op, "key-padding mask must have shape {} (batch, Lk) for logits {}, got {}", Shape{x[0], x.dim_from_end(1)}, x, kp);
            fail(op, "key-padding mask must have shape {} (Lk) for logits {}, got {}", Shape{x.dim_from_end(1)}, x, kp);
        }
    }
    if (additive.defined() && !broadcasts_to(additive.shape(), x))
        fail(op, "additive mask {} does not broadcast to the logits {}", additive.shape(), x);
}

template <class T>
Tensor<T> softmax_forward(const Tensor<T>& x, const Mask& mask, const Tensor<T>& additive) {
    check_softmax_mask("softmax", x.shape(), mask, additive);
    Tensor<T> y(x.shape());
    if (x.numel() == 0) return y;
    const auto p = x.shape().padded();
    const std::int64_t lk = p[3], rows = p[0] * p[1] * p[2];
    const Tensor<bool> kp = key_padding_as_keep(mask.key_padding, x.shape());
    const auto keep_strides = mask.keep.defined() ? mask.keep.shape().broadcast_strides() : std::array<std::int64_t, 4>{};
    const auto kp_strides = kp.defined() ? kp.shape().broadcast_strides() : std::array<std::int64_t, 4>{};
    const auto add_strides = additive.defined() ? additive.shape().broadcast_strides() : std::array<std::int64_t, 4>{};
    auto offset = [&](const std::array<std::int64_t, 4>& s, std::int64_t i0, std::int64_t i1, std::int64_t i2) {
        return i0 * s[0] + i1 * s[1] + i2 * s[2];
    };
    constexpr T neg_inf = -std::numeric_limits<T>::infinity();

    parallel_for(rows, 4 * lk, [&](std::int64_t r) {
        const std::int64_t i2 = r % p[2], i1 = r / p[2] % p[1], i0 = r / (p[2] * p[1]);
        const T* xr = x.data() + r * lk;
        T* yr = y.data() + r * lk;
        // z = x + additive, -inf where masked; written into y, then exponentiated in place.
        const std::int64_t visible = mask.causal ? std::min(lk, i2 + 1) : lk;
        for (std::int64_t j = 0; j < visible; ++j) yr[j] = xr[j];
        for (std::int64_t j = visible; j < lk; ++j) yr[j] = neg_inf;
        if (additive.defined()) {
            const T* ar = additive.data() + offset(add_strides, i0, i1, i2);
            for (std::int64_t j = 0; j < visible; ++j) yr[j] += ar[j * add_strides[3]];
        }
        auto apply_keep = [&](const Tensor<bool>& keep, const std::array<std::int64_t, 4>& s) {
            if (!keep.defined()) return;
            const bool* kr = keep.data() + offset(s, i0, i1, i2);
            for (std::int64_t j = 0; j < visible; ++j)
                if (!kr[j * s[3]]) yr[j] = neg_inf;
        };
        apply_keep(mask.keep, keep_strides);
        apply_keep(kp, kp_strides);

        ArrayMap<T> row(yr, lk);
        const T m = detail::row_max(yr, lk);
        if (m == neg_inf) {  // every key masked: output 0 (and so gradient 0)
            row.setZero();
            return;
        }
        row /= detail::exp_shifted_sum(yr, yr, lk, m);  // masked entries (−∞) become exactly 0
    });
    return y;
}

template <class T>
Tensor<T> softmax_backward(const Tensor<T>& dy, const Tensor<T>& y) {
    if (dy.shape() != y.shape()) fail("softmax_backward", "dy {} and y {} must have the same shape", dy.shape(), y.shape());
    Tensor<T> dx(y.shape());
    const std::int64_t lk = y.shape().rank() ? y.shape().dim_from_end(1) : 1;
    const std::int64_t rows = lk ? y.numel() / lk : 0;
    parallel_for(rows, 3 * lk, [&](std::int64_t r) {
        ConstArrayMap<T> yr(y.data() + r * lk, lk), gr(dy.data() + r * lk, lk);
        const T dot = (gr * yr).sum();
        ArrayMap<T>(dx.data() + r * lk, lk) = yr * (gr - dot);
    });
    return dx;
}

#define AUTODIFF_INSTANTIATE(T)                                                                         \
    template void check_softmax_mask<T>(std::string_view, const Shape&, const Mask&, const Tensor<T>&); \
    template Tensor<T> softmax_forward<T>(const Tensor<T>&, const Mask&, const Tensor<T>&);             \
    template Tensor<T> softmax_backward<T>(const Tensor<T>&, const Tensor<T>&);
AUTODIFF_INSTANTIATE(float)
AUTODIFF_INSTANTIATE(double)
#undef AUTODIFF_INSTANTIATE

}  // namespace autodiff

#include "autodiff/kernels/norm.hpp"

#include <cmath>

#include "row_sums.hpp"

namespace autodiff {

void check_norm(std::string_view op, const Shape& x, const Shape& normalized_shape, const Shape* weight, const Shape* bias,
                double eps) {
    check_rank(op, "input", x, 1, max_rank);
    if (normalized_shape.rank() < 1 || normalized_shape.rank() > x.rank())
        fail(op, "normalized_shape {} must have rank 1..{} (the input's rank) for input {}", normalized_shape, x.rank(), x);
    for (int k = 1; k <= normalized_shape.rank(); ++k)
        if (normalized_shape.dim_from_end(k) != x.dim_from_end(k))
            fail(op, "input {} does not end with normalized_shape {}", x, normalized_shape);
    if (normalized_shape.numel() == 0) fail(op, "normalized_shape {} has no elements", normalized_shape);
    if (weight && *weight != normalized_shape)
        fail(op, "weight must have normalized_shape {}, got {}", normalized_shape, *weight);
    if (bias && *bias != normalized_shape) fail(op, "bias must have normalized_shape {}, got {}", normalized_shape, *bias);
    if (!(eps > 0) || !std::isfinite(eps)) fail(op, "eps must be finite and > 0, got {}", eps);
}

namespace {

// mean and rstd's shape: x's with the normalised dimensions set to 1.
Shape stats_shape(const Shape& x, const Shape& normalized_shape) {
    Shape s = x;
    for (int k = 1; k <= normalized_shape.rank(); ++k) s[x.rank() - k] = 1;
    return s;
}

// The shared forward of both norms, one row at a time. Centered: layer_norm (subtract the mean),
// otherwise rms_norm. Every row is two passes over its N elements (statistics, then y), in cache.
template <bool Centered, class T>
NormForward<T> norm_forward(const char* op, const Tensor<T>& x, const Shape& normalized_shape, const Tensor<T>& weight,
                            const Tensor<T>& bias, T eps) {
    const Shape* ws = weight.defined() ? &weight.shape() : nullptr;
    const Shape* bs = bias.defined() ? &bias.shape() : nullptr;
    check_norm(op, x.shape(), normalized_shape, ws, bs, static_cast<double>(eps));
    const std::int64_t n = normalized_shape.numel(), rows = x.numel() / n;
    NormForward<T> f{Tensor<T>(x.shape()), Centered ? Tensor<T>(stats_shape(x.shape(), normalized_shape)) : Tensor<T>(),
                     Tensor<T>(stats_shape(x.shape(), normalized_shape))};
    const ConstArrayMap<T> w(ws ? weight.data() : nullptr, ws ? n : 0), b(bs ? bias.data() : nullptr, bs ? n : 0);
    const T inv_n = T(1) / static_cast<T>(n);
    parallel_for(rows, 4 * n, [&](std::int64_t r) {
        const ConstArrayMap<T> xr(x.data() + r * n, n);
        ArrayMap<T> yr(f.y.data() + r * n, n);
        T mean = 0, rstd;
        if constexpr (Centered) {
            mean = xr.sum() * inv_n;
            rstd = T(1) / std::sqrt((xr - mean).square().sum() * inv_n + eps);  // biased variance, as torch
            f.mean.data()[r] = mean;
        } else {
            rstd = T(1) / std::sqrt(xr.square().sum() * inv_n + eps);
        }
        f.rstd.data()[r] = rstd;
        if (ws && bs) yr = (xr - mean) * rstd * w + b;
        else if (ws) yr = (xr - mean) * rstd * w;
        else if (bs) yr = (xr - mean) * rstd + b;
        else yr = (xr - mean) * rstd;
    });
    return f;
}

// The shared backward. Per row, x̂ = (x − mean)·rstd (mean = 0 for rms_norm), g = dy ⊙ w:
//   dx = rstd·(g − mean(g) − x̂·mean(g ⊙ x̂))   (without the mean(g) term for rms_norm)
//   dweight += dy ⊙ x̂, dbias += dy            (column sums over the rows, fixed order: row_sums.hpp)
// Three passes over each row, in cache: g, then its two means, then dx and the column sums.
template <bool Centered, class T>
void norm_backward(const char* op, Tensor<T>* dx, Tensor<T>* dweight, Tensor<T>* dbias, const Tensor<T>& dy, const Tensor<T>& x,
                   const Tensor<T>& weight, const Tensor<T>& mean, const Tensor<T>& rstd, const Shape& normalized_shape) {
    check_norm(op, x.shape(), normalized_shape, weight.defined() ? &weight.shape() : nullptr, nullptr, 1.0);
    const Shape stats = stats_shape(x.shape(), normalized_shape);
    if (dy.shape() != x.shape()) fail(op, "dy must have the input's shape {}, got {}", x.shape(), dy.shape());
    if (!rstd.defined() || rstd.shape() != stats)
        fail(op, "rstd must have shape {} for input {}, got {}", stats, x.shape(), rstd.defined() ? rstd.shape().str() : "(undefined)");
    if (Centered && (!mean.defined() || mean.shape() != stats))
        fail(op, "mean must have shape {} for input {}, got {}", stats, x.shape(), mean.defined() ? mean.shape().str() : "(undefined)");
    if (dweight && !weight.defined()) fail(op, "dweight was asked for, but there is no weight");

    const std::int64_t n = normalized_shape.numel(), rows = x.numel() / n;
    const bool has_weight = weight.defined();
    const ConstArrayMap<T> w(has_weight ? weight.data() : nullptr, has_weight ? n : 0);
    if (dx) *dx = Tensor<T>(x.shape());
    if (dweight) *dweight = Tensor<T>(normalized_shape);
    if (dbias) *dbias = Tensor<T>(normalized_shape);
    const T inv_n = T(1) / static_cast<T>(n);
    const std::array<T*, 2> out{dweight ? dweight->data() : nullptr, dbias ? dbias->data() : nullptr};
    detail::rows_with_column_sums<T, 2>(rows, n, out, 8 * n, [&](std::int64_t r, const std::array<T*, 2>& sums) {
        const ConstArrayMap<T> xr(x.data() + r * n, n), gr(dy.data() + r * n, n);
        const T m = Centered ? mean.data()[r] : T(0), s = rstd.data()[r];
        const auto xhat = (xr - m) * s;
        if (dx) {
            // g is stored (into dx's row) before it is used: then g − mean(g) is exactly 0 for a row of
            // one element (an FMA contracted from w·dy − mean(g) would leave w·dy's rounding error).
            ArrayMap<T> dxr(dx->data() + r * n, n);
            if (has_weight) dxr = gr * w;
            else dxr = gr;
            const T g_mean = dxr.sum() * inv_n, g_dot_xhat = (dxr * xhat).sum() * inv_n;
            if constexpr (Centered) dxr = s * ((dxr - g_mean) - xhat * g_dot_xhat);
            else dxr = s * (dxr - xhat * g_dot_xhat);
        }
        if (sums[0]) ArrayMap<T>(sums[0], n) += gr * xhat;
        if (sums[1]) ArrayMap<T>(sums[1], n) += gr;
    });
}

}  // namespace

template <class T>
NormForward<T> layer_norm_forward(const Tensor<T>& x, const Shape& normalized_shape, const Tensor<T>& weight,
                                  const Tensor<T>& bias, T eps) {
    return norm_forward<true>("layer_norm", x, normalized_shape, weight, bias, eps);
}

template <class T>
void layer_norm_backward(NoDeduce<Tensor<T>>* dx, NoDeduce<Tensor<T>>* dweight, NoDeduce<Tensor<T>>* dbias,
                         const Tensor<T>& dy, const Tensor<T>& x, const Tensor<T>& weight, const Tensor<T>& mean,
                         const Tensor<T>& rstd, const Shape& normalized_shape) {
    norm_backward<true>("layer_norm_backward", dx, dweight, dbias, dy, x, weight, mean, rstd, normalized_shape);
}

template <class T>
NormForward<T> rms_norm_forward(const Tensor<T>& x, const Shape& normalized_shape, const Tensor<T>& weight, T eps) {
    return norm_forward<false>("rms_norm", x, normalized_shape, weight, Tensor<T>(), eps);
}

template <class T>
void rms_norm_backward(NoDeduce<Tensor<T>>* dx, NoDeduce<Tensor<T>>* dweight, const Tensor<T>& dy, const Tensor<T>& x,
                       const Tensor<T>& weight, const Tensor<T>& rstd, const Shape& normalized_shape) {
    norm_backward<false, T>("rms_norm_backward", dx, dweight, nullptr, dy, x, weight, Tensor<T>(), rstd, normalized_shape);
}

#define AUTODIFF_INSTANTIATE(T)                                                                                        \
    template NormForward<T> layer_norm_forward<T>(const Tensor<T>&, const Shape&, const Tensor<T>&, const Tensor<T>&, T); \
    template void layer_norm_backward<T>(Tensor<T>*, Tensor<T>*, Tensor<T>*, const Tensor<T>&, const Tensor<T>&,        \
                                         const Tensor<T>&, const Tensor<T>&, const Tensor<T>&, const Shape&);          \
    template NormForward<T> rms_norm_forward<T>(const Tensor<T>&, const Shape&, const Tensor<T>&, T);                 \
    template void rms_norm_backward<T>(Tensor<T>*, Tensor<T>*, const Tensor<T>&, const Tensor<T>&, const Tensor<T>&,   \
                                       const Tensor<T>&, const Shape&);
AUTODIFF_INSTANTIATE(float)
AUTODIFF_INSTANTIATE(double)
#undef AUTODIFF_INSTANTIATE

}  // namespace autodiff

#include "autodiff/kernels/activation.hpp"

#include "autodiff/detail/simd.hpp"
#include "row_sums.hpp"

namespace autodiff {

namespace detail {

namespace {
// √(2/π) and 0.044715, as torch's (aten/src/ATen/native/cpu/Activation.cpp).
template <class T>
constexpr T gelu_beta = T(std::numbers::sqrt2 * std::numbers::inv_sqrtpi);
template <class T>
constexpr T gelu_kappa = T(0.044715);

// GELU's formulas (elementwise.hpp) on a vector of floats, lane by lane. A NaN fails every comparison,
// so it is never clamped and propagates.
struct GeluFloat {
    using V = Simd<float, simd_bytes>::type;
    static constexpr float beta = gelu_beta<float>, kappa = gelu_kappa<float>;
    // a·b + c rounded once, also where the target has no FMA instructions (std::fma lane by lane
    // there): the erf polynomials' accuracy (4e-7, tested) counts on it.
    static V fma(V a, V b, V c) {
#if defined(__AVX512F__)  // simd_bytes 64
        return bit_cast<V>(_mm512_fmadd_ps(bit_cast<__m512>(a), bit_cast<__m512>(b), bit_cast<__m512>(c)));
#elif defined(__FMA__)  // FMA implies AVX: simd_bytes 32
        return bit_cast<V>(_mm256_fmadd_ps(bit_cast<__m256>(a), bit_cast<__m256>(b), bit_cast<__m256>(c)));
#else
        V r{};
        for (int i = 0; i < Simd<float, simd_bytes>::lanes; ++i) r[i] = std::fma(a[i], b[i], c[i]);
        return r;
#endif
    }
    static V erf(V x) {
        x = select(x > 4.f, V{} + 4.f, x);
        x = select(x < -4.f, V{} - 4.f, x);
        const V x2 = x * x;
        V p = fma(x2, V{} - 2.72614225801306e-10f, V{} + 2.77068142495902e-08f);
        for (float c : {-2.10102402082508e-06f, -5.69250639462346e-05f, -7.34990630326855e-04f, -2.95459980854025e-03f,
                        -1.60960333262415e-02f})
            p = fma(x2, p, V{} + c);
        V q = fma(x2, V{} - 1.45660718464996e-05f, V{} - 2.13374055278905e-04f);
        for (float c : {-1.68282697438203e-03f, -7.37332916720468e-03f, -1.42647390514189e-02f}) q = fma(x2, q, V{} + c);
        return x * p / q;
    }
    static V tanh(V u) { return 1.f - 2.f / (1.f + vexp<float, simd_bytes>(2.f * u)); }
    static V value(V v, GeluApproximate a) {
        if (a == GeluApproximate::tanh) return 0.5f * v * (1.f + tanh(beta * (v + kappa * v * v * v)));
        return 0.5f * v * (1.f + erf(v * static_cast<float>(std::numbers::sqrt2 / 2)));
    }
    static V derivative(V v, GeluApproximate a) {
        if (a == GeluApproximate::tanh) {
            const V t = tanh(beta * (v + kappa * v * v * v));
            return 0.5f * (1.f + t) + 0.5f * v * (1.f - t * t) * beta * (1.f + 3.f * kappa * v * v);
        }
        const V cdf = 0.5f * (1.f + erf(v * static_cast<float>(std::numbers::sqrt2 / 2)));
        const V pdf = vexp<float, simd_bytes>(-0.5f * v * v) * static_cast<float>(std::numbers::inv_sqrtpi / std::numbers::sqrt2);
        return cdf + v * pdf;
    }
};

// The same formulas in double, one value at a time.
double gelu_value(double v, GeluApproximate a) {
    if (a == GeluApproximate::tanh) return 0.5 * v * (1.0 + std::tanh(gelu_beta<double> * (v + gelu_kappa<double> * v * v * v)));
    return 0.5 * v * (1.0 + std::erf(v * (std::numbers::sqrt2 / 2)));
}
double gelu_derivative(double v, GeluApproximate a) {
    if (a == GeluApproximate::tanh) {
        const double t = std::tanh(gelu_beta<double> * (v + gelu_kappa<double> * v * v * v));
        return 0.5 * (1.0 + t) + 0.5 * v * (1.0 - t * t) * gelu_beta<double> * (1.0 + 3.0 * gelu_kappa<double> * v * v);
    }
    const double cdf = 0.5 * (1.0 + std::erf(v * (std::numbers::sqrt2 / 2)));
    const double pdf = std::exp(-0.5 * v * v) * (std::numbers::inv_sqrtpi / std::numbers::sqrt2);
    return cdf + v * pdf;
}

// The `count` (≤ one vector's) floats at p as a vector (the lanes past them 0), and the store of a
// vector's first `count` lanes: whole vectors in the body of a row, a partly filled one at its tail.
constexpr int lanes = Simd<float, simd_bytes>::lanes;
GeluFloat::V load_part(const float* p, std::int64_t count) {
    return count == lanes ? load<GeluFloat::V>(p) : load_first(p, count, 0.f);
}
void store_part(float* p, GeluFloat::V v, std::int64_t count) {
    if (count == lanes) store(p, v);
    else store_first(p, v, count);
}

// Calls f(v, j, count) for the values v = x + b (or x) of n contiguous elements: in float, vectors of
// the values j .. j + count − 1, full ones and then one partly filled (its lanes past the row's end
// are computed and ignored); in double, each value (count 1).
template <class T, class F>
void for_each_value(const T* x, const T* b, std::int64_t n, F&& f) {
    if constexpr (std::is_same_v<T, float>) {
        auto at = [&](std::int64_t j, std::int64_t count) { return b ? load_part(x + j, count) + load_part(b + j, count) : load_part(x + j, count); };
        std::int64_t j = 0;
        for (; j + lanes <= n; j += lanes) f(at(j, lanes), j, lanes);
        if (j < n) f(at(j, n - j), j, n - j);
    } else {
        for (std::int64_t j = 0; j < n; ++j) f(b ? x[j] + b[j] : x[j], j, 1);
    }
}
}  // namespace

template <class T>
void gelu_rows(const T* x, const T* b, T* y, std::int64_t n, GeluApproximate a) {
    if constexpr (std::is_same_v<T, float>)
        for_each_value(x, b, n, [&](GeluFloat::V v, std::int64_t j, std::int64_t count) { store_part(y + j, GeluFloat::value(v, a), count); });
    else
        for_each_value(x, b, n, [&](T v, std::int64_t j, std::int64_t) { y[j] = gelu_value(v, a); });
}

template <class T>
void gelu_backward_rows(const T* dy, const T* x, const T* b, T* dx, std::int64_t n, GeluApproximate a) {
    if constexpr (std::is_same_v<T, float>)
        for_each_value(x, b, n, [&](GeluFloat::V v, std::int64_t j, std::int64_t count) {
            store_part(dx + j, load_part(dy + j, count) * GeluFloat::derivative(v, a), count);
        });
    else
        for_each_value(x, b, n, [&](T v, std::int64_t j, std::int64_t) { dx[j] = dy[j] * gelu_derivative(v, a); });
}

float gelu_erf(float x) { return GeluFloat::erf(GeluFloat::V{} + x)[0]; }
double gelu_erf(double x) { return std::erf(x); }
float gelu_tanh(float u) { return GeluFloat::tanh(GeluFloat::V{} + u)[0]; }
double gelu_tanh(double u) { return std::tanh(u); }

template void gelu_rows<float>(const float*, const float*, float*, std::int64_t, GeluApproximate);
template void gelu_rows<double>(const double*, const double*, double*, std::int64_t, GeluApproximate);
template void gelu_backward_rows<float>(const float*, const float*, const float*, float*, std::int64_t, GeluApproximate);
template void gelu_backward_rows<double>(const double*, const double*, const double*, double*, std::int64_t, GeluApproximate);

}  // namespace detail

void check_bias_gelu(std::string_view op, const Shape& x, const Shape& b) {
    check_rank(op, "input", x, 1, max_rank);
    if (b != Shape{x.dim_from_end(1)})
        fail(op, "bias must have shape ({}) (the input's last dimension) for input {}, got {}", x.dim_from_end(1), x, b);
}

template <class T>
Tensor<T> bias_gelu_forward(const Tensor<T>& x, const Tensor<T>& b, GeluApproximate approximate) {
    check_bias_gelu("bias_gelu", x.shape(), b.shape());
    check_gelu_approximate("bias_gelu", approximate);
    Tensor<T> y(x.shape());
    const std::int64_t n = b.numel(), rows = n ? x.numel() / n : 0;
    const T* bp = b.data();
    parallel_for(rows, 16 * n, [&](std::int64_t r) {
        const T* xr = x.data() + r * n;
        T* yr = y.data() + r * n;
        detail::gelu_rows(xr, bp, yr, n, approximate);
    });
    return y;
}

template <class T>
void bias_gelu_backward(NoDeduce<Tensor<T>>* dx, NoDeduce<Tensor<T>>* db, const Tensor<T>& dy, const Tensor<T>& x,
                        const Tensor<T>& b, GeluApproximate approximate) {
    const char* op = "bias_gelu_backward";
    check_bias_gelu(op, x.shape(), b.shape());
    check_gelu_approximate(op, approximate);
    if (dy.shape() != x.shape()) fail(op, "dy must have the input's shape {}, got {}", x.shape(), dy.shape());
    const std::int64_t n = b.numel(), rows = n ? x.numel() / n : 0;
    // db is the column sum of dx, so dx is computed (and allocated) even when only db is wanted.
    Tensor<T> full_dx(x.shape());
    if (db) *db = Tensor<T>(b.shape());
    const T* bp = b.data();
    detail::rows_with_column_sums<T, 1>(rows, n, {db ? db->data() : nullptr}, 24 * n,
                                        [&](std::int64_t r, const std::array<T*, 1>& sums) {
                                            const T* xr = x.data() + r * n;
                                            const T* gr = dy.data() + r * n;
                                            T* dxr = full_dx.data() + r * n;
                                            detail::gelu_backward_rows(gr, xr, bp, dxr, n, approximate);
                                            if (sums[0]) ArrayMap<T>(sums[0], n) += ConstArrayMap<T>(dxr, n);
                                        });
    if (dx) *dx = std::move(full_dx);
}

#define AUTODIFF_INSTANTIATE(T)                                                                            \
    template Tensor<T> bias_gelu_forward<T>(const Tensor<T>&, const Tensor<T>&, GeluApproximate);          \
    template void bias_gelu_backward<T>(Tensor<T>*, Tensor<T>*, const Tensor<T>&, const Tensor<T>&, const Tensor<T>&, \
                                        GeluApproximate);
AUTODIFF_INSTANTIATE(float)
AUTODIFF_INSTANTIATE(double)
#undef AUTODIFF_INSTANTIATE

}  // namespace autodiff

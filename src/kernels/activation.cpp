#include "autodiff/kernels/activation.hpp"

#include "row_sums.hpp"

namespace autodiff {

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
        for (std::int64_t j = 0; j < n; ++j) yr[j] = Gelu::value(xr[j] + bp[j], approximate);
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
                                            for (std::int64_t j = 0; j < n; ++j) dxr[j] = gr[j] * Gelu::derivative(xr[j] + bp[j], approximate);
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

#include "autodiff/kernels/linear.hpp"

#include "autodiff/kernels/gemm.hpp"
#include "gemm_internal.hpp"

namespace autodiff {

Shape linear_output_shape(std::string_view op, const Shape& x, const Shape& W, const Shape* b) {
    check_rank(op, "input", x, 1, 4);
    check_rank(op, "weight", W, 2, 2);
    if (x.dim_from_end(1) != W[1])
        fail(op, "input features differ: input {} has {} but weight {} (out, in) expects {}", x, x.dim_from_end(1), W, W[1]);
    if (b && *b != Shape{W[0]}) fail(op, "bias must have shape ({}) for weight {}, got {}", W[0], W, *b);
    Shape y = x;
    y[y.rank() - 1] = W[0];
    return y;
}

namespace {
// The product of every dimension but the last (not numel / last: that divides by zero when in = 0).
std::int64_t leading_rows(const Shape& s) {
    std::int64_t n = 1;
    for (int i = 0; i + 1 < s.rank(); ++i) n *= s[i];
    return n;
}
// x (..., in) seen as the matrix (rows, in).
template <class T>
Tensor<T> as_rows(const Tensor<T>& x) {
    return x.reshaped({leading_rows(x.shape()), x.shape().dim_from_end(1)});
}
}  // namespace

template <class T>
Tensor<T> linear_forward(const Tensor<T>& x, const Tensor<T>& W, const Tensor<T>& b) {
    const Shape* bs = b.defined() ? &b.shape() : nullptr;
    Tensor<T> y(linear_output_shape("linear", x.shape(), W.shape(), bs));
    Tensor<T> y2 = y.reshaped({leading_rows(x.shape()), W.dim(0)});
    linear_product(as_rows(x), W, b, y2);
    return y;
}

template <class T>
void linear_backward(NoDeduce<Tensor<T>>* dx, NoDeduce<Tensor<T>>* dW, NoDeduce<Tensor<T>>* db, const Tensor<T>& dy,
                     const Tensor<T>& x, const Tensor<T>& W) {
    const char* op = "linear_backward";
    const Shape y = linear_output_shape(op, x.shape(), W.shape(), nullptr);
    if (dy.shape() != y) fail(op, "dy must have the output's shape {}, got {}", y, dy.shape());
    if (dW && dW->shape() != W.shape()) fail(op, "dW must have W's shape {}, got {}", W.shape(), dW->shape());
    if (db && db->shape() != Shape{W.dim(0)}) fail(op, "db must have shape ({}), got {}", W.dim(0), db->shape());
    const Tensor<T> dy2 = as_rows(dy);
    if (dx) {
        *dx = Tensor<T>(x.shape());
        Tensor<T> dx2 = as_rows(*dx);
        strided_batched_gemm<T>(T(1), dy2, W, T(0), dx2);
    }
    if (dW) strided_batched_gemm<T>(T(1), dy2, as_rows(x), T(1), *dW, {true, false, false});
    if (db) db->matrix().row(0) += dy2.matrix().colwise().sum();
}

#define AUTODIFF_INSTANTIATE(T)                                                                 \
    template Tensor<T> linear_forward<T>(const Tensor<T>&, const Tensor<T>&, const Tensor<T>&); \
    template void linear_backward<T>(Tensor<T>*, Tensor<T>*, Tensor<T>*, const Tensor<T>&, const Tensor<T>&, const Tensor<T>&);
AUTODIFF_INSTANTIATE(float)
AUTODIFF_INSTANTIATE(double)
#undef AUTODIFF_INSTANTIATE

}  // namespace autodiff

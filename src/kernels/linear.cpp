#include "autodiff/kernels/linear.hpp"

#include "autodiff/kernels/gemm.hpp"
#include "autodiff/parallel.hpp"
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
// The weight and bias gradients' shapes, shared by the backward kernels of linear layers.
template <class T>
void check_param_grads(const char* op, const Tensor<T>& W, const Tensor<T>* dW, const Tensor<T>* db) {
    if (dW && dW->shape() != W.shape()) fail(op, "dW must have W's shape {}, got {}", W.shape(), dW->shape());
    if (db && db->shape() != Shape{W.dim(0)}) fail(op, "db must have shape ({}), got {}", W.dim(0), db->shape());
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
    check_param_grads<T>(op, W, dW, db);
    const Tensor<T> dy2 = as_rows(dy);
    if (dx) {
        *dx = Tensor<T>(x.shape());
        Tensor<T> dx2 = as_rows(*dx);
        strided_batched_gemm<T>(T(1), dy2, W, T(0), dx2);
    }
    if (dW) strided_batched_gemm<T>(T(1), dy2, as_rows(x), T(1), *dW, {true, false, false});
    if (db) db->matrix().row(0) += dy2.matrix().colwise().sum();
}

Shape linear_heads_output_shape(std::string_view op, const Shape& x, const Shape& W, const Shape* b, std::int64_t heads,
                                std::int64_t parts) {
    check_rank(op, "input", x, 3, 3);
    check_rank(op, "weight", W, 2, 2);
    if (parts < 1 || parts > 3) fail(op, "parts must be 1, 2 or 3, got {}", parts);
    if (x[2] != W[1])
        fail(op, "input features differ: input {} has {} but weight {} (out, in) expects {}", x, x[2], W, W[1]);
    if (W[0] % parts != 0) fail(op, "weight {} has {} output features, not divisible into {} parts", W, W[0], parts);
    const std::int64_t E = W[0] / parts;
    if (heads < 1 || E % heads != 0)
        fail(op, "output features per part {} of weight {} are not divisible by {} heads", E, W, heads);
    if (b && *b != Shape{W[0]}) fail(op, "bias must have shape ({}) for weight {}, got {}", W[0], W, *b);
    return Shape{x[0], heads, x[1], E / heads};
}

Shape heads_linear_output_shape(std::string_view op, const Shape& o, const Shape& W, const Shape* b) {
    check_rank(op, "input", o, 4, 4);
    check_rank(op, "weight", W, 2, 2);
    if (o[1] * o[3] != W[1])
        fail(op, "input features differ: input {} (B, H, L, D) has H·D = {} but weight {} (out, in) expects {}", o, o[1] * o[3], W,
             W[1]);
    if (b && *b != Shape{W[0]}) fail(op, "bias must have shape ({}) for weight {}, got {}", W[0], W, *b);
    return Shape{o[0], o[2], W[0]};
}

namespace {
// The parts' data as packed_gemm's head layout (unused parts null).
template <class T, class P>
std::array<T*, 3> part_data(std::span<P> parts) {
    std::array<T*, 3> d{};
    for (std::size_t s = 0; s < parts.size(); ++s) d[s] = parts[s].data();
    return d;
}
}  // namespace

template <class T>
void linear_heads_forward(const Tensor<T>& x, const Tensor<T>& W, const Tensor<T>& b, std::int64_t heads, std::span<Tensor<T>> y) {
    const Shape* bs = b.defined() ? &b.shape() : nullptr;
    const auto S = static_cast<std::int64_t>(y.size());
    const Shape ys = linear_heads_output_shape("linear_heads", x.shape(), W.shape(), bs, heads, S);
    for (auto& part : y) part = Tensor<T>(ys);
    const std::int64_t m = x.dim(0) * x.dim(1), in = x.dim(2);
    // y_s's elements are the columns [s·E, (s + 1)·E) of the (B·L, S·E) product, written by the output pass in place.
    packed_gemm<T>(m, W.dim(0), in, T(1), plain_layout(x.data(), in, 1), plain_layout(W.data(), 1, in), T(0),
                   heads_layout(part_data<T>(y), heads, ys[2], ys[3], false), b.defined() ? b.data() : nullptr);
}

template <class T>
void linear_heads_backward(NoDeduce<Tensor<T>>* dx, NoDeduce<Tensor<T>>* dW, NoDeduce<Tensor<T>>* db, std::span<const Tensor<T>> dy,
                           const Tensor<T>& x, const Tensor<T>& W) {
    const char* op = "linear_heads_backward";
    if (dy.empty()) fail(op, "dy must hold 1 to 3 parts, got none");
    for (std::size_t s = 0; s < dy.size(); ++s) {
        if (!dy[s].defined()) fail(op, "dy part {} is undefined", s);
        check_rank(op, "dy", dy[s].shape(), 4, 4);
    }
    const auto S = static_cast<std::int64_t>(dy.size());
    const Shape ys = linear_heads_output_shape(op, x.shape(), W.shape(), nullptr, dy[0].dim(1), S);
    for (std::size_t s = 0; s < dy.size(); ++s)
        if (dy[s].shape() != ys) fail(op, "dy part {} must have the output's shape {}, got {}", s, ys, dy[s].shape());
    check_param_grads<T>(op, W, dW, db);
    const std::int64_t H = ys[1], L = ys[2], D = ys[3], m = x.dim(0) * L, in = x.dim(2), n_out = W.dim(0);
    if (dx) {  // dx = dY·W, dY read in its head layout
        *dx = Tensor<T>(x.shape());
        packed_gemm<T>(m, in, n_out, T(1), heads_layout(part_data<const T>(dy), H, L, D, false), plain_layout(W.data(), in, 1), T(0),
                       plain_layout(dx->data(), in, 1));
    }
    if (dW)  // dW += dYᵀ·x
        packed_gemm<T>(n_out, in, m, T(1), heads_layout(part_data<const T>(dy), H, L, D, true), plain_layout(x.data(), in, 1), T(1),
                       plain_layout(dW->data(), in, 1));
    if (db) {  // db[(s·H + h)·D + d] += Σ_b Σ_l dy_s[b, h, l, d]: one work item per (s, h), tokens in order
        T* out = db->data();
        parallel_for(S * H, x.dim(0) * L * D, [&](std::int64_t g) {
            Eigen::Map<Eigen::Array<T, 1, Eigen::Dynamic>> sum(out + g * D, D);
            const T* part = dy[static_cast<std::size_t>(g / H)].data();
            for (std::int64_t b = 0; b < x.dim(0); ++b)
                sum += Eigen::Map<const RowMatrix<T>>(part + (b * H + g % H) * L * D, L, D).colwise().sum().array();
        });
    }
}

template <class T>
Tensor<T> heads_linear_forward(const Tensor<T>& o, const Tensor<T>& W, const Tensor<T>& b) {
    const Shape* bs = b.defined() ? &b.shape() : nullptr;
    Tensor<T> y(heads_linear_output_shape("heads_linear", o.shape(), W.shape(), bs));
    const std::int64_t H = o.dim(1), L = o.dim(2), D = o.dim(3), in = H * D, n_out = W.dim(0);
    // merge_heads(o) is read in place as the product's left operand.
    packed_gemm<T>(o.dim(0) * L, n_out, in, T(1), heads_layout<const T>({o.data()}, H, L, D, false), plain_layout(W.data(), 1, in), T(0),
                   plain_layout(y.data(), n_out, 1), b.defined() ? b.data() : nullptr);
    return y;
}

template <class T>
void heads_linear_backward(NoDeduce<Tensor<T>>* d_o, NoDeduce<Tensor<T>>* dW, NoDeduce<Tensor<T>>* db, const Tensor<T>& dy,
                           const Tensor<T>& o, const Tensor<T>& W) {
    const char* op = "heads_linear_backward";
    const Shape y = heads_linear_output_shape(op, o.shape(), W.shape(), nullptr);
    if (dy.shape() != y) fail(op, "dy must have the output's shape {}, got {}", y, dy.shape());
    check_param_grads<T>(op, W, dW, db);
    const std::int64_t H = o.dim(1), L = o.dim(2), D = o.dim(3), m = o.dim(0) * L, in = H * D, n_out = W.dim(0);
    if (d_o) {  // do = dy·W, written in the head layout by the output pass
        *d_o = Tensor<T>(o.shape());
        packed_gemm<T>(m, in, n_out, T(1), plain_layout(dy.data(), n_out, 1), plain_layout(W.data(), in, 1), T(0),
                       heads_layout<T>({d_o->data()}, H, L, D, false));
    }
    if (dW)  // dW += dyᵀ·O, O packed from the head layout
        packed_gemm<T>(n_out, in, m, T(1), plain_layout(dy.data(), 1, n_out), heads_layout<const T>({o.data()}, H, L, D, false), T(1),
                       plain_layout(dW->data(), in, 1));
    if (db) db->matrix().row(0) += as_rows(dy).matrix().colwise().sum();
}

#define AUTODIFF_INSTANTIATE(T)                                                                 \
    template Tensor<T> linear_forward<T>(const Tensor<T>&, const Tensor<T>&, const Tensor<T>&); \
    template void linear_backward<T>(Tensor<T>*, Tensor<T>*, Tensor<T>*, const Tensor<T>&, const Tensor<T>&, const Tensor<T>&);       \
    template void linear_heads_forward<T>(const Tensor<T>&, const Tensor<T>&, const Tensor<T>&, std::int64_t, std::span<Tensor<T>>); \
    template void linear_heads_backward<T>(Tensor<T>*, Tensor<T>*, Tensor<T>*, std::span<const Tensor<T>>, const Tensor<T>&,         \
                                           const Tensor<T>&);                                                                      \
    template Tensor<T> heads_linear_forward<T>(const Tensor<T>&, const Tensor<T>&, const Tensor<T>&);                               \
    template void heads_linear_backward<T>(Tensor<T>*, Tensor<T>*, Tensor<T>*, const Tensor<T>&, const Tensor<T>&, const Tensor<T>&);
AUTODIFF_INSTANTIATE(float)
AUTODIFF_INSTANTIATE(double)
#undef AUTODIFF_INSTANTIATE

}  // namespace autodiff

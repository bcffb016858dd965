#include "autodiff/kernels/layout.hpp"

#include <algorithm>

#include "autodiff/parallel.hpp"

namespace autodiff {

Shape permute_output_shape(std::string_view op, const Shape& x, const Permutation& perm) {
    std::array<bool, max_rank> seen{};
    Shape out;
    for (int k = 0; k < x.rank(); ++k) {
        const int p = perm[static_cast<std::size_t>(k)];
        if (p < 0 || p >= x.rank() || seen[static_cast<std::size_t>(p)])
            fail(op, "({}) is not a permutation of the {} dimensions of {}",
                 fmt::join(perm.begin(), perm.begin() + x.rank(), ","), x.rank(), x);
        seen[static_cast<std::size_t>(p)] = true;
        out.push_back(x[p]);
    }
    return out;
}

Permutation inverse_permutation(const Permutation& perm, int rank) {
    if (rank < 0 || rank > max_rank) fail("inverse_permutation", "rank must be in [0, {}], got {}", max_rank, rank);
    // Validated like permute's: an entry outside [0, rank) indexed past inv.
    Shape dims;
    for (int k = 0; k < rank; ++k) dims.push_back(1);
    (void)permute_output_shape("inverse_permutation", dims, perm);
    Permutation inv{0, 1, 2, 3};
    for (int k = 0; k < rank; ++k) inv[static_cast<std::size_t>(perm[static_cast<std::size_t>(k)])] = k;
    return inv;
}

template <class T>
Tensor<T> permute_forward(const Tensor<T>& x, const Permutation& perm) {
    const Shape out_shape = permute_output_shape("permute", x.shape(), perm);
    Tensor<T> y(out_shape);
    const int r = x.rank();
    if (r == 0) {
        if (x.numel()) y.data()[0] = x.data()[0];
        return y;
    }
    // Strides of x for each output dimension, padded at the front to rank 4.
    std::array<std::int64_t, max_rank> xs{}, in_stride{};
    std::int64_t s = 1;
    for (int k = r - 1; k >= 0; --k) {
        in_stride[static_cast<std::size_t>(k)] = s;
        s *= x.dim(k);
    }
    for (int k = 0; k < r; ++k)
        xs[static_cast<std::size_t>(max_rank - r + k)] = in_stride[static_cast<std::size_t>(perm[static_cast<std::size_t>(k)])];
    const auto o = out_shape.padded();
    const std::int64_t rows = o[0] * o[1] * o[2];
    parallel_for(rows, o[3], [&](std::int64_t row) {
        const std::int64_t i2 = row % o[2], i1 = row / o[2] % o[1], i0 = row / (o[2] * o[1]);
        const T* src = x.data() + i0 * xs[0] + i1 * xs[1] + i2 * xs[2];
        T* dst = y.data() + row * o[3];
        for (std::int64_t j = 0; j < o[3]; ++j) dst[j] = src[j * xs[3]];
    });
    return y;
}

Shape narrow_output_shape(std::string_view op, const Shape& x, int dim, std::int64_t start, std::int64_t length) {
    if (dim < 0 || dim >= x.rank()) fail(op, "dimension {} is out of range for input {}", dim, x);
    if (start < 0 || length < 0 || start > x[dim] || length > x[dim] - start)
        fail(op, "slice [{}, {}) of dimension {} is out of range for input {}", start, start + length, dim, x);
    Shape out = x;
    out[dim] = length;
    return out;
}

namespace {
// x seen as (outer, x.dim(dim), inner) and y as (outer, y.dim(dim), inner): copies, for every outer
// index, `rows` rows of `inner` elements from x at row offset x_row0 to y at row offset y_row0.
template <class T>
void copy_rows(const T* x, std::int64_t x_rows, std::int64_t x_row0, T* y, std::int64_t y_rows, std::int64_t y_row0,
               std::int64_t rows, std::int64_t outer, std::int64_t inner) {
    parallel_for(outer, rows * inner, [&](std::int64_t o) {
        std::copy_n(x + (o * x_rows + x_row0) * inner, rows * inner, y + (o * y_rows + y_row0) * inner);
    });
}
std::pair<std::int64_t, std::int64_t> outer_inner(const Shape& s, int dim) {
    std::int64_t outer = 1, inner = 1;
    for (int i = 0; i < dim; ++i) outer *= s[i];
    for (int i = dim + 1; i < s.rank(); ++i) inner *= s[i];
    return {outer, inner};
}
}  // namespace

template <class T>
Tensor<T> narrow_forward(const Tensor<T>& x, int dim, std::int64_t start, std::int64_t length) {
    Tensor<T> y(narrow_output_shape("narrow", x.shape(), dim, start, length));
    const auto [outer, inner] = outer_inner(x.shape(), dim);
    copy_rows(x.data(), x.dim(dim), start, y.data(), length, 0, length, outer, inner);
    return y;
}

template <class T>
Tensor<T> narrow_backward(const Tensor<T>& dy, const Shape& x_shape, int dim, std::int64_t start) {
    if (dy.shape() != narrow_output_shape("narrow_backward", x_shape, dim, start, dy.rank() > dim ? dy.dim(dim) : 0))
        fail("narrow_backward", "dy {} does not match a slice of {} along dimension {}", dy.shape(), x_shape, dim);
    Tensor<T> dx = zeros<T>(x_shape);
    const auto [outer, inner] = outer_inner(x_shape, dim);
    copy_rows(dy.data(), dy.dim(dim), 0, dx.data(), x_shape[dim], start, dy.dim(dim), outer, inner);
    return dx;
}

template Tensor<float> narrow_forward<float>(const Tensor<float>&, int, std::int64_t, std::int64_t);
template Tensor<double> narrow_forward<double>(const Tensor<double>&, int, std::int64_t, std::int64_t);
template Tensor<float> narrow_backward<float>(const Tensor<float>&, const Shape&, int, std::int64_t);
template Tensor<double> narrow_backward<double>(const Tensor<double>&, const Shape&, int, std::int64_t);

template Tensor<float> permute_forward<float>(const Tensor<float>&, const Permutation&);
template Tensor<double> permute_forward<double>(const Tensor<double>&, const Permutation&);

}  // namespace autodiff

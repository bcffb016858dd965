#include "autodiff/kernels/layout.hpp"

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

template Tensor<float> permute_forward<float>(const Tensor<float>&, const Permutation&);
template Tensor<double> permute_forward<double>(const Tensor<double>&, const Permutation&);

}  // namespace autodiff

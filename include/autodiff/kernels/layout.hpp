#pragma once
// Layout changes: permute (a copy in the new order), narrow (a slice along one dimension) and the
// attention head split/merge.
// Reshape needs no kernel: Tensor::reshaped shares the storage.

#include <array>

#include "autodiff/tensor.hpp"

namespace autodiff {

using Permutation = std::array<int, max_rank>;

// Validates that `perm` (its first x.rank() entries) is a permutation of 0..rank-1; returns the output shape.
Shape permute_output_shape(std::string_view op, const Shape& x, const Permutation& perm);

// y[i_perm[0], ..., i_perm[r-1]] = x[i_0, ..., i_{r-1}]: y.dim(k) = x.dim(perm[k]).
// The backward of permute is permute by the inverse permutation.
template <class T>
Tensor<T> permute_forward(const Tensor<T>& x, const Permutation& perm);

Permutation inverse_permutation(const Permutation& perm, int rank);

// Validates x.narrow(dim, start, length) and returns its shape.
Shape narrow_output_shape(std::string_view op, const Shape& x, int dim, std::int64_t start, std::int64_t length);

// y = x[..., start:start+length, ...] along `dim` (a copy).
template <class T>
Tensor<T> narrow_forward(const Tensor<T>& x, int dim, std::int64_t start, std::int64_t length);

// Backward of narrow: dx = zeros(x_shape) with dx[..., start:start+length, ...] = dy.
template <class T>
Tensor<T> narrow_backward(const Tensor<T>& dy, const Shape& x_shape, int dim, std::int64_t start);

}  // namespace autodiff

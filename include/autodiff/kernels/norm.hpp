#pragma once
// Layer normalisation and RMS normalisation over the trailing dimensions, as
// torch.nn.functional.layer_norm and torch.nn.functional.rms_norm.
//
//   x (..., *normalized_shape): each "row" is the N = numel(normalized_shape) trailing elements.
//   layer_norm: y = (x − mean)·rstd ⊙ w + b,  mean = Σx/N, var = Σ(x − mean)²/N (biased),
//               rstd = 1/√(var + eps)
//   rms_norm:   y = x·rstd ⊙ w,               rstd = 1/√(Σx²/N + eps)
// weight w and bias b have exactly normalized_shape and are optional (undefined tensors).
//
// eps is explicit and must be finite and > 0. torch's layer_norm defaults to 1e-5; torch's rms_norm
// with eps=None uses torch.finfo(x.dtype).eps (std::numeric_limits<T>::epsilon() here): pass that to
// get torch's default (nn::RMSNorm does).
//
// Determinism: rows are independent; dweight and dbias are summed over the rows in fixed chunks of
// rows (a function of the shapes only) whose partial sums are added in chunk order, so every result
// is bit-identical for any thread count.

#include "autodiff/tensor.hpp"

namespace autodiff {

// What the forward returns and the backward needs.
template <class T>
struct NormForward {
    Tensor<T> y;     // x's shape
    Tensor<T> mean;  // x's shape with the normalised dimensions set to 1 (torch's); undefined for rms_norm
    Tensor<T> rstd;  // that shape too: 1/√(var + eps) (layer_norm), 1/√(mean(x²) + eps) (rms_norm)
};

// Throws unless x (rank 1..4) ends with normalized_shape (rank 1..rank(x), no zero dimension), weight
// and bias (each may be null) have exactly normalized_shape, and eps is finite and > 0. `op` names the
// caller in errors.
void check_norm(std::string_view op, const Shape& x, const Shape& normalized_shape, const Shape* weight, const Shape* bias,
                double eps);

// y = (x − mean)·rstd ⊙ weight + bias over the trailing normalized_shape; weight, bias may be undefined.
//   x (..., *normalized_shape), weight, bias (normalized_shape) -> y (x's shape), mean, rstd (saved)
template <class T>
NormForward<T> layer_norm_forward(const Tensor<T>& x, const Shape& normalized_shape, const Tensor<T>& weight,
                                  const Tensor<T>& bias, T eps);

// Backward of layer_norm, with x̂ = (x − mean)·rstd and g = dy ⊙ weight (dy without a weight), per row:
//   dx      = rstd·(g − mean(g) − x̂·mean(g ⊙ x̂))     (x's shape)
//   dweight = Σ_rows dy ⊙ x̂                           (normalized_shape)
//   dbias   = Σ_rows dy                               (normalized_shape)
// Saved: x, weight (undefined if none), mean and rstd from the forward. Every gradient is allocated here
// (any previous content is replaced); pass nullptr for a gradient that is not wanted (dweight needs a
// weight, dbias the layer to have had a bias: the caller knows).
template <class T>
void layer_norm_backward(NoDeduce<Tensor<T>>* dx, NoDeduce<Tensor<T>>* dweight, NoDeduce<Tensor<T>>* dbias,
                         const Tensor<T>& dy, const Tensor<T>& x, const Tensor<T>& weight, const Tensor<T>& mean,
                         const Tensor<T>& rstd, const Shape& normalized_shape);

// y = x·rstd ⊙ weight over the trailing normalized_shape, rstd = 1/√(mean(x²) + eps); weight may be undefined.
//   x (..., *normalized_shape), weight (normalized_shape) -> y (x's shape), rstd (saved; mean undefined)
template <class T>
NormForward<T> rms_norm_forward(const Tensor<T>& x, const Shape& normalized_shape, const Tensor<T>& weight, T eps);

// Backward of rms_norm, with x̂ = x·rstd and g = dy ⊙ weight (dy without a weight), per row:
//   dx      = rstd·(g − x̂·mean(g ⊙ x̂))     (x's shape)
//   dweight = Σ_rows dy ⊙ x̂                 (normalized_shape)
// Saved: x, weight (undefined if none), rstd. Gradients allocated; nullptr: not wanted.
template <class T>
void rms_norm_backward(NoDeduce<Tensor<T>>* dx, NoDeduce<Tensor<T>>* dweight, const Tensor<T>& dy, const Tensor<T>& x,
                       const Tensor<T>& weight, const Tensor<T>& rstd, const Shape& normalized_shape);

}  // namespace autodiff

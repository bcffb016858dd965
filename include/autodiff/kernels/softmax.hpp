#pragma once
// Softmax over the last dimension, with masks.
//
// Masks (true = keep), all applied to the logits x of shape (..., Lq, Lk):
//   causal       key j is visible to query i iff j <= i (top-left aligned, as PyTorch's is_causal)
//   keep         a bool tensor broadcastable to x's shape
//   key_padding  a bool tensor (batch, Lk) for x of rank >= 3 (batch = x's first dimension), or (Lk)
//                for rank 2; note torch.nn.MultiheadAttention's key_padding_mask uses true = *ignore*
//   additive     a float tensor broadcastable to x's shape, added to the logits (-inf masks a key)
// A row whose keys are all masked (or all -inf) gives output 0 and gradient 0. PyTorch gives NaN
// there; we do not, because such rows are normal with padding and causal masks on short sequences.
// NaN logits in kept positions propagate to their whole row.

#include "autodiff/tensor.hpp"

namespace autodiff {

struct Mask {
    bool causal = false;
    Tensor<bool> keep;
    Tensor<bool> key_padding;

    [[nodiscard]] bool empty() const { return !causal && !keep.defined() && !key_padding.defined(); }
};

// Combination of two masks: a key is kept when both keep it.
Mask operator|(const Mask& a, const Mask& b);

// The causal mask, usable as `ad::softmax(x, ad::causal)`.
inline const Mask causal{true, {}, {}};
inline Mask keep_mask(Tensor<bool> keep) { return Mask{false, std::move(keep), {}}; }
inline Mask key_padding_mask(Tensor<bool> keep) { return Mask{false, {}, std::move(keep)}; }

// Throws unless every part of the mask (and the additive mask, if defined) fits logits of shape x.
template <class T>
void check_softmax_mask(std::string_view op, const Shape& x, const Mask& mask, const Tensor<T>& additive);

// y = softmax(x + additive, masked) over the last dimension.   x (..., Lk) -> y (same shape)
template <class T>
Tensor<T> softmax_forward(const Tensor<T>& x, const Mask& mask = {}, const Tensor<T>& additive = {});

// Backward of y = softmax(x):   dx = y ⊙ (dy − rowsum(dy ⊙ y))
//   dy, y (..., Lk) -> dx (same shape). Saved: y only; masked entries have y = 0, hence dx = 0.
template <class T>
Tensor<T> softmax_backward(const Tensor<T>& dy, const Tensor<T>& y);

}  // namespace autodiff

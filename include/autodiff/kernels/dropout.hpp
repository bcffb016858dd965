#pragma once
// Dropout with a counter-based generator: the keep decision for element i of a tensor is a pure
// function of (seed, offset, i), so forward and backward regenerate it instead of storing a mask,
// and a fused kernel that visits (b, h, i, j) in tiles makes exactly the same decisions (the fused
// attention stores them as bits for its backward where that costs little memory: attention.hpp).
// Training: y = x·keep/(1-rate). Evaluation (training == false) or rate == 0: y = x.
//
// Use a new offset (or seed) for every step; the same (seed, offset) gives the same mask.

#include <cstdint>

#include "autodiff/random.hpp"
#include "autodiff/tensor.hpp"

namespace autodiff {

struct DropoutDescriptor {
    double rate = 0.0;          // probability of dropping an element, in [0, 1)
    std::uint64_t seed = 0;     // Philox key
    std::uint64_t offset = 0;   // Philox stream: advance it every step
    bool training = true;       // false: dropout is the identity
};

// Throws unless rate is in [0, 1): "<op>: rate must be in [0, 1), got 1".
void check_dropout(std::string_view op, const DropoutDescriptor& d);

// Elements with random bits below this threshold are dropped: drop probability threshold / 2^32.
inline std::uint64_t dropout_threshold(double rate) {
    return static_cast<std::uint64_t>(rate * 4294967296.0 + 0.5);
}
inline bool dropout_keeps(const DropoutDescriptor& d, std::uint64_t index) {
    return Philox4x32::bits(d.seed, d.offset, index) >= dropout_threshold(d.rate);
}

// The keep mask of elements first .. first+n-1 (n <= 64) as bits: bit k set when element first + k
// is kept (dropout_keeps), bits n and above clear. One vectorised Philox call; the dropout kernel and
// the fused attention kernel both use it.
std::uint64_t dropout_keep_bits(const DropoutDescriptor& d, std::uint64_t first, std::int64_t n);

// y = x·keep/(1-rate).   x (any shape) -> y (same shape)
template <class T>
Tensor<T> dropout_forward(const DropoutDescriptor& d, const Tensor<T>& x);

// Backward of y = x·keep/(1-rate):   dx = dy·keep/(1-rate), keep regenerated from (seed, offset).
//   dy (any shape) -> dx (same shape). Saved: nothing but the descriptor.
template <class T>
Tensor<T> dropout_backward(const DropoutDescriptor& d, const Tensor<T>& dy);

}  // namespace autodiff

#pragma once
// nn::Linear: y = x·Wᵀ + b with W (out, in) and b (out), initialised like torch.nn.Linear:
// W and b uniform in [-1/√in, 1/√in) (kaiming_uniform with a = √5).

#include <cmath>
#include <optional>
#include <vector>

#include "autodiff/expr/matmul.hpp"

namespace autodiff::nn {

template <class T>
class Linear {
public:
    Linear(std::int64_t in_features, std::int64_t out_features, bool bias = true, std::uint64_t seed = 0,
           const std::string& name = "linear") {
        if (in_features < 1 || out_features < 1)
            fail("nn::Linear", "in_features ({}) and out_features ({}) must be >= 1", in_features, out_features);
        const T bound = T(1) / std::sqrt(static_cast<T>(in_features));
        weight_.emplace(uniform<T>({out_features, in_features}, -bound, bound, seed), name + ".weight");
        if (bias) bias_.emplace(uniform<T>({out_features}, -bound, bound, seed + 1), name + ".bias");
    }

    // y = x·Wᵀ + b for x (..., in).
    template <ExprLike X>
    Var<T> operator()(const X& x) const {
        if (bias_) return linear(x, *weight_, *bias_);
        return linear(x, *weight_);
    }

    [[nodiscard]] Param<T>& weight() { return *weight_; }
    [[nodiscard]] const Param<T>& weight() const { return *weight_; }
    [[nodiscard]] bool has_bias() const { return bias_.has_value(); }
    // Throws when the layer was built without a bias.
    [[nodiscard]] Param<T>& bias() { return get_bias(*this); }
    [[nodiscard]] const Param<T>& bias() const { return get_bias(*this); }
    [[nodiscard]] std::vector<Param<T>> parameters() const {
        std::vector<Param<T>> p{*weight_};
        if (bias_) p.push_back(*bias_);
        return p;
    }

private:
    template <class Self>
    static auto& get_bias(Self& self) {
        if (!self.bias_) fail("nn::Linear", "this layer has no bias");
        return *self.bias_;
    }

    std::optional<Param<T>> weight_;
    std::optional<Param<T>> bias_;
};

}  // namespace autodiff::nn

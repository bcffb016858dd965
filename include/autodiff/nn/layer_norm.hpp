#pragma once
// nn::LayerNorm and nn::RMSNorm: torch.nn.LayerNorm(normalized_shape, eps=1e-5, elementwise_affine=True,
// bias=True) and torch.nn.RMSNorm(normalized_shape, eps=None, elementwise_affine=True), over the
// functional layer_norm and rms_norm (expr/norm.hpp). The weight starts at 1 and the bias at 0, as
// torch's. RMSNorm's eps defaults, like torch's eps=None, to std::numeric_limits<T>::epsilon().

#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "autodiff/expr/norm.hpp"

namespace autodiff::nn {

namespace detail {
// A module's normalized_shape (rank 1..4, no zero dimension) and eps (finite, > 0).
inline void check_norm_options(std::string_view op, const Shape& normalized_shape, double eps) {
    if (normalized_shape.rank() < 1) fail(op, "normalized_shape must have rank 1..{}, got {}", max_rank, normalized_shape);
    check_norm(op, normalized_shape, normalized_shape, nullptr, nullptr, eps);
}
}  // namespace detail

template <class T>
class LayerNorm {
public:
    LayerNorm(const Shape& normalized_shape, double eps = 1e-5, bool elementwise_affine = true, bool bias = true,
              const std::string& name = "layer_norm")
        : normalized_shape_(normalized_shape), eps_(eps) {
        detail::check_norm_options("nn::LayerNorm", normalized_shape, eps);
        if (elementwise_affine) {
            weight_.emplace(ones<T>(normalized_shape), name + ".weight");
            if (bias) bias_.emplace(zeros<T>(normalized_shape), name + ".bias");
        }
    }
    // torch.nn.LayerNorm(features): normalises the last dimension.
    explicit LayerNorm(std::int64_t features, double eps = 1e-5, bool elementwise_affine = true, bool bias = true,
                       const std::string& name = "layer_norm")
        : LayerNorm(Shape{features}, eps, elementwise_affine, bias, name) {}

    // y = layer_norm(x, normalized_shape, weight, bias, eps) for x (..., *normalized_shape).
    template <ExprLike X>
    Var<T> operator()(const X& x) const {
        if (weight_ && bias_) return layer_norm(x, normalized_shape_, *weight_, *bias_, eps_);
        if (weight_) return layer_norm(x, normalized_shape_, *weight_, none, eps_);
        return layer_norm(x, normalized_shape_, none, none, eps_);
    }
    template <ExprLike X>
    Var<T> forward(const X& x) const {
        return (*this)(x);
    }

    [[nodiscard]] const Shape& normalized_shape() const { return normalized_shape_; }
    [[nodiscard]] double eps() const { return eps_; }
    [[nodiscard]] bool has_weight() const { return weight_.has_value(); }
    [[nodiscard]] bool has_bias() const { return bias_.has_value(); }
    // Throw when the layer was built without them.
    [[nodiscard]] Param<T>& weight() { return get(weight_, "weight"); }
    [[nodiscard]] const Param<T>& weight() const { return get(weight_, "weight"); }
    [[nodiscard]] Param<T>& bias() { return get(bias_, "bias"); }
    [[nodiscard]] const Param<T>& bias() const { return get(bias_, "bias"); }
    [[nodiscard]] std::vector<Param<T>> parameters() const {
        std::vector<Param<T>> p;
        if (weight_) p.push_back(*weight_);
        if (bias_) p.push_back(*bias_);
        return p;
    }

private:
    template <class P>
    static auto& get(P& p, const char* what) {
        if (!p) fail("nn::LayerNorm", "this layer has no {}", what);
        return *p;
    }

    Shape normalized_shape_;
    double eps_;
    std::optional<Param<T>> weight_;
    std::optional<Param<T>> bias_;
};

template <class T>
class RMSNorm {
public:
    // eps: std::nullopt is torch's eps=None, std::numeric_limits<T>::epsilon().
    RMSNorm(const Shape& normalized_shape, std::optional<double> eps = std::nullopt, bool elementwise_affine = true,
            const std::string& name = "rms_norm")
        : normalized_shape_(normalized_shape), eps_(eps.value_or(std::numeric_limits<T>::epsilon())) {
        detail::check_norm_options("nn::RMSNorm", normalized_shape, eps_);
        if (elementwise_affine) weight_.emplace(ones<T>(normalized_shape), name + ".weight");
    }
    explicit RMSNorm(std::int64_t features, std::optional<double> eps = std::nullopt, bool elementwise_affine = true,
                     const std::string& name = "rms_norm")
        : RMSNorm(Shape{features}, eps, elementwise_affine, name) {}

    // y = rms_norm(x, normalized_shape, weight, eps) for x (..., *normalized_shape).
    template <ExprLike X>
    Var<T> operator()(const X& x) const {
        if (weight_) return rms_norm(x, normalized_shape_, *weight_, eps_);
        return rms_norm(x, normalized_shape_, none, eps_);
    }
    template <ExprLike X>
    Var<T> forward(const X& x) const {
        return (*this)(x);
    }

    [[nodiscard]] const Shape& normalized_shape() const { return normalized_shape_; }
    [[nodiscard]] double eps() const { return eps_; }
    [[nodiscard]] bool has_weight() const { return weight_.has_value(); }
    // Throws when the layer was built without elementwise_affine.
    [[nodiscard]] Param<T>& weight() { return get(weight_); }
    [[nodiscard]] const Param<T>& weight() const { return get(weight_); }
    [[nodiscard]] std::vector<Param<T>> parameters() const {
        std::vector<Param<T>> p;
        if (weight_) p.push_back(*weight_);
        return p;
    }

private:
    template <class P>
    static auto& get(P& p) {
        if (!p) fail("nn::RMSNorm", "this layer has no weight");
        return *p;
    }

    Shape normalized_shape_;
    double eps_;
    std::optional<Param<T>> weight_;
};

}  // namespace autodiff::nn

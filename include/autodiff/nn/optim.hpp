#pragma once
// Optimisers acting on Params in place: SGD (momentum, weight decay) and Adam / AdamW, with the
// update rules of torch.optim (same defaults, same bias correction, AdamW's decoupled decay).
// A Param without a gradient (never reached by backward since the last zero_grad) is skipped.

#include <cmath>
#include <vector>

#include "autodiff/expr/variable.hpp"

namespace autodiff::nn {

namespace detail {
inline void check_positive(const char* op, const char* what, double v) {
    if (!(v > 0) || !std::isfinite(v)) fail(op, "{} must be finite and > 0, got {}", what, v);
}
inline void check_unit(const char* op, const char* what, double v) {
    if (!(v >= 0 && v < 1)) fail(op, "{} must be in [0, 1), got {}", what, v);
}
inline void check_non_negative(const char* op, const char* what, double v) {
    if (!(v >= 0) || !std::isfinite(v)) fail(op, "{} must be finite and >= 0, got {}", what, v);
}
template <class T>
void check_params(const char* op, const std::vector<Param<T>>& params) {
    if (params.empty()) fail(op, "no parameters to optimise");
}
}  // namespace detail

struct SGDOptions {
    double lr = 1e-2;
    double momentum = 0.0;
    double weight_decay = 0.0;  // L2: g += weight_decay·w
};

template <class T>
class SGD {
public:
    SGD(std::vector<Param<T>> params, SGDOptions opt) : params_(std::move(params)), opt_(opt) {
        detail::check_params("SGD", params_);
        detail::check_positive("SGD", "lr", opt.lr);
        detail::check_unit("SGD", "momentum", opt.momentum);
        detail::check_non_negative("SGD", "weight_decay", opt.weight_decay);
        velocity_.resize(params_.size());
    }

    // buf = momentum·buf + g ; w −= lr·buf   (g includes weight decay)
    void step() {
        const T lr = static_cast<T>(opt_.lr), mu = static_cast<T>(opt_.momentum), wd = static_cast<T>(opt_.weight_decay);
        for (std::size_t i = 0; i < params_.size(); ++i) {
            Param<T>& p = params_[i];
            if (!p.has_grad()) continue;
            Tensor<T> g = p.grad().clone();
            if (wd != T(0)) g.array() += wd * p.value().array();
            if (mu != T(0)) {
                if (!velocity_[i].defined()) velocity_[i] = g.clone();
                else velocity_[i].array() = mu * velocity_[i].array() + g.array();
                g = velocity_[i];
            }
            p.value().array() -= lr * g.array();
        }
    }
    void zero_grad() {
        for (auto& p : params_) p.zero_grad();
    }
    [[nodiscard]] const std::vector<Param<T>>& params() const { return params_; }
    // Parameter i's momentum buffer (undefined before its first step with momentum): nn/state.hpp saves it.
    [[nodiscard]] const Tensor<T>& momentum_buffer(std::size_t i) const { return velocity_.at(i); }
    void set_momentum_buffer(std::size_t i, Tensor<T> buffer) {
        if (buffer.defined() && buffer.shape() != params_.at(i).shape())
            fail("SGD", "momentum buffer {} of parameter {} must have its shape {}", buffer.shape(), i, params_[i].shape());
        velocity_.at(i) = std::move(buffer);
    }

private:
    std::vector<Param<T>> params_;
    SGDOptions opt_;
    std::vector<Tensor<T>> velocity_;
};

struct AdamOptions {
    double lr = 1e-3;
    double beta1 = 0.9;
    double beta2 = 0.999;
    double eps = 1e-8;
    double weight_decay = 0.0;
    bool decoupled_weight_decay = false;  // true: AdamW (w −= lr·wd·w), false: L2 added to g
};

template <class T>
class Adam {
public:
    Adam(std::vector<Param<T>> params, AdamOptions opt) : params_(std::move(params)), opt_(opt) {
        detail::check_params("Adam", params_);
        detail::check_positive("Adam", "lr", opt.lr);
        detail::check_unit("Adam", "beta1", opt.beta1);
        detail::check_unit("Adam", "beta2", opt.beta2);
        detail::check_positive("Adam", "eps", opt.eps);
        detail::check_non_negative("Adam", "weight_decay", opt.weight_decay);
        m_.resize(params_.size());
        v_.resize(params_.size());
        param_steps_.resize(params_.size());
    }

    // m = β1·m + (1−β1)·g ; v = β2·v + (1−β2)·g² ; w −= lr·m̂/(√v̂ + eps), m̂ = m/(1−β1ᵗ), v̂ = v/(1−β2ᵗ)
    // t counts the steps this Param took (torch's per-parameter state['step']), not the calls of step().
    void step() {
        ++t_;
        const T b1 = static_cast<T>(opt_.beta1), b2 = static_cast<T>(opt_.beta2), eps = static_cast<T>(opt_.eps);
        const T wd = static_cast<T>(opt_.weight_decay), lr = static_cast<T>(opt_.lr);
        for (std::size_t i = 0; i < params_.size(); ++i) {
            Param<T>& p = params_[i];
            if (!p.has_grad()) continue;
            const long t = ++param_steps_[i];
            const double c1 = 1 - std::pow(opt_.beta1, t), c2 = 1 - std::pow(opt_.beta2, t);
            const T step_size = static_cast<T>(opt_.lr / c1), root_c2 = static_cast<T>(std::sqrt(c2));
            auto w = p.value().array();
            if (!m_[i].defined()) {
                m_[i] = zeros<T>(p.shape());
                v_[i] = zeros<T>(p.shape());
            }
            Tensor<T> g = p.grad();
            if (wd != T(0) && !opt_.decoupled_weight_decay) {
                g = g.clone();
                g.array() += wd * w;
            }
            if (wd != T(0) && opt_.decoupled_weight_decay) w *= T(1) - lr * wd;
            m_[i].array() = b1 * m_[i].array() + (T(1) - b1) * g.array();
            v_[i].array() = b2 * v_[i].array() + (T(1) - b2) * g.array().square();
            w -= step_size * m_[i].array() / (v_[i].array().sqrt() / root_c2 + eps);
        }
    }
    void zero_grad() {
        for (auto& p : params_) p.zero_grad();
    }
    [[nodiscard]] const std::vector<Param<T>>& params() const { return params_; }
    // The calls of step() (since construction, reset_state or the count set_steps restored).
    [[nodiscard]] long steps() const { return t_; }
    // Restores the call count (load: nn/state.hpp); at least every parameter's own step count.
    void set_steps(long t) {
        for (std::size_t i = 0; i < params_.size(); ++i)
            if (t < param_steps_[i]) fail("Adam", "steps {} must be >= the {} steps parameter {} took", t, param_steps_[i], i);
        t_ = t;
    }

    // Parameter i's state as torch.optim.Adam keeps it (nn/state.hpp saves and loads it): the steps it
    // took, and its moments (undefined before its first step).
    struct ParamStateView {
        long step = 0;
        Tensor<T> exp_avg, exp_avg_sq;
    };
    [[nodiscard]] ParamStateView state(std::size_t i) const { return {param_steps_.at(i), m_.at(i), v_.at(i)}; }
    void set_state(std::size_t i, ParamStateView s) {
        const Shape& shape = params_.at(i).shape();
        if (s.step < 0 || s.exp_avg.shape() != shape || s.exp_avg_sq.shape() != shape)
            fail("Adam", "state of parameter {} (shape {}): step {} must be >= 0 and the moments {} and {} of its shape", i, shape, s.step,
                 s.exp_avg.shape(), s.exp_avg_sq.shape());
        param_steps_[i] = s.step;
        m_[i] = std::move(s.exp_avg);
        v_[i] = std::move(s.exp_avg_sq);
    }
    // Forgets every moment and step count (as a new optimiser over the same parameters).
    void reset_state() {
        for (std::size_t i = 0; i < params_.size(); ++i) {
            m_[i] = v_[i] = Tensor<T>();
            param_steps_[i] = 0;
        }
        t_ = 0;
    }

private:
    std::vector<Param<T>> params_;
    AdamOptions opt_;
    std::vector<Tensor<T>> m_, v_;
    std::vector<long> param_steps_;
    long t_ = 0;
};

}  // namespace autodiff::nn

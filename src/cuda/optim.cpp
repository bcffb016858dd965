// Adam and AdamW on device tensors: validation, the moments, the bias correction (in double, as
// nn::Adam), then the update kernel of ops_kernels.cu. Maths and API: include/autodiff/cuda/optim.hpp.
#include "autodiff/cuda/optim.hpp"

#include <cmath>
#include <type_traits>

#include "cuda_check.hpp"
#include "dtype.hpp"
#include "ops_kernels.hpp"

namespace autodiff {

void check_adam_options(std::string_view op, const nn::AdamOptions& opt) {
    const std::string name(op);  // nn::detail's checks take a C string
    nn::detail::check_positive(name.c_str(), "lr", opt.lr);
    nn::detail::check_unit(name.c_str(), "beta1", opt.beta1);
    nn::detail::check_unit(name.c_str(), "beta2", opt.beta2);
    nn::detail::check_positive(name.c_str(), "eps", opt.eps);
    nn::detail::check_non_negative(name.c_str(), "weight_decay", opt.weight_decay);
}

template <class T>
void adam_step(DeviceTensor<T>& w, const DeviceTensor<T>& g, DeviceAdamState& state, const nn::AdamOptions& opt) {
    constexpr std::string_view op = "adam_step (cuda)";
    if constexpr (std::is_same_v<T, double>)
        fail(op, "element type {} is not supported (float32, bfloat16 or float16; the moments are fp32)", dtype_name<T>());
    check_adam_options(op, opt);
    if (!w.defined() || !g.defined()) fail(op, "the parameter and its gradient must be defined device tensors");
    if (g.shape() != w.shape()) fail(op, "the gradient has shape {} but the parameter has shape {}", g.shape(), w.shape());
    if (g.device() != w.device())
        fail(op, "the gradient is on cuda device {} but the parameter {} is on cuda device {}", g.device(), w.shape(), w.device());
    if (!state.exp_avg.defined()) {
        if (state.step != 0) fail(op, "state at step {} has no moments", state.step);
        state.exp_avg = DeviceTensor<float>(w.shape());
        state.exp_avg_sq = DeviceTensor<float>(w.shape());
        state.exp_avg.zero();
        state.exp_avg_sq.zero();
    }
    if (state.exp_avg.shape() != w.shape() || state.exp_avg_sq.shape() != w.shape())
        fail(op, "the moments {} and {} must have the parameter's shape {}", state.exp_avg.shape(), state.exp_avg_sq.shape(), w.shape());
    const long t = ++state.step;
    const double c1 = 1 - std::pow(opt.beta1, t), c2 = 1 - std::pow(opt.beta2, t);
    detail::AdamStep s;
    s.lr = static_cast<float>(opt.lr);
    s.beta1 = static_cast<float>(opt.beta1);
    s.beta2 = static_cast<float>(opt.beta2);
    s.eps = static_cast<float>(opt.eps);
    s.weight_decay = static_cast<float>(opt.weight_decay);
    s.decoupled = opt.decoupled_weight_decay;
    s.step_size = static_cast<float>(opt.lr / c1);
    s.root_c2 = static_cast<float>(std::sqrt(c2));
    detail::cuda_check(detail::launch_adam(detail::dtype_of<T>(), s, w.data(), g.data(), state.exp_avg.data(), state.exp_avg_sq.data(), w.numel()), op,
                       "the Adam kernel");
}

template <class T>
DeviceAdam<T>::DeviceAdam(std::vector<DeviceTensor<T>> params, nn::AdamOptions opt) : params_(std::move(params)), opt_(opt) {
    if constexpr (std::is_same_v<T, double>)
        fail("DeviceAdam", "element type {} is not supported (float32, bfloat16 or float16; the moments are fp32)", dtype_name<T>());
    if (params_.empty()) fail("DeviceAdam", "no parameters to optimise");
    for (std::size_t i = 0; i < params_.size(); ++i)
        if (!params_[i].defined()) fail("DeviceAdam", "parameter {} is not a defined device tensor", i);
    check_adam_options("DeviceAdam", opt_);
    state_.resize(params_.size());
}

template <class T>
void DeviceAdam<T>::step(std::span<const DeviceTensor<T>> grads) {
    if (grads.size() != params_.size()) fail("DeviceAdam", "step needs one gradient per parameter ({}), got {}", params_.size(), grads.size());
    ++t_;
    for (std::size_t i = 0; i < params_.size(); ++i)
        if (grads[i].defined()) adam_step(params_[i], grads[i], state_[i], opt_);
}

#define AUTODIFF_INSTANTIATE(T)                                                                                            \
    template void adam_step<T>(DeviceTensor<T>&, const DeviceTensor<T>&, DeviceAdamState&, const nn::AdamOptions&); \
    template class DeviceAdam<T>;
AUTODIFF_INSTANTIATE(float)
AUTODIFF_INSTANTIATE(bf16)
AUTODIFF_INSTANTIATE(fp16)
AUTODIFF_INSTANTIATE(double)  // throws autodiff::Error naming the op and float64
#undef AUTODIFF_INSTANTIATE

}  // namespace autodiff

#pragma once
// Adam and AdamW on device tensors (issue 12): nn::Adam's update (nn/optim.hpp: torch.optim's rules,
// bias correction, AdamW's decoupled decay) run by one kernel per parameter, in fp32 with fp32
// moments whatever the parameter's type (float, bf16, fp16). double throws autodiff::Error (adam_step,
// DeviceAdam: "element type float64 is not supported").
//
//   m = β1·m + (1−β1)·g ; v = β2·v + (1−β2)·g² ; w −= lr/(1−β1ᵗ)·m/(√v/√(1−β2ᵗ) + eps)
//   weight decay: g += wd·w (Adam) or w ·= 1 − lr·wd first (AdamW, decoupled_weight_decay)

#include <span>
#include <vector>

#include "autodiff/cuda/device.hpp"
#include "autodiff/nn/optim.hpp"

namespace autodiff {

// One parameter's state, as torch.optim.Adam keeps it: the steps it took and its moments (allocated
// and zeroed by its first step).
struct DeviceAdamState {
    long step = 0;
    DeviceTensor<float> exp_avg, exp_avg_sq;
};

// Throws unless opt holds nn::Adam's valid ranges (lr, eps > 0; betas in [0, 1); weight_decay >= 0).
void check_adam_options(std::string_view op, const nn::AdamOptions& opt);

// One step of parameter w with gradient g (w's shape), in place; advances state.step.
template <class T>
void adam_step(DeviceTensor<T>& w, const DeviceTensor<T>& g, DeviceAdamState& state, const nn::AdamOptions& opt);

// nn::Adam over device parameters: the tensors share storage with the caller's (DeviceTensor is a
// handle), so step() updates them in place. step(grads): grads[i] is parameter i's gradient; an
// undefined one skips that parameter (and its step count), as nn::Adam skips a Param without one.
template <class T>
class DeviceAdam {
public:
    DeviceAdam(std::vector<DeviceTensor<T>> params, nn::AdamOptions opt);
    void step(std::span<const DeviceTensor<T>> grads);
    [[nodiscard]] long steps() const { return t_; }
    [[nodiscard]] const DeviceAdamState& state(std::size_t i) const { return state_.at(i); }

private:
    std::vector<DeviceTensor<T>> params_;
    nn::AdamOptions opt_;
    std::vector<DeviceAdamState> state_;
    long t_ = 0;
};

}  // namespace autodiff

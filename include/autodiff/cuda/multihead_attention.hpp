#pragma once
// nn::MultiHeadAttention on the GPU (issue 12, item 4): the same module (torch.nn.MultiheadAttention with
// batch_first=True, need_weights=False) over device tensors, with an explicit forward and backward
// (cuDNN-style: the forward saves what the backward needs; see docs/ARCHITECTURE.md "Training on the
// device: explicit module backward").
//
//   q_i = x_i·W_iᵀ + b_i (i = q, k, v; rows [i·E, (i+1)·E) of the packed in_proj_weight, or the separate
//         q/k/v_proj_weight), split into heads (B, H, L, D)
//   O   = dropout(softmax(q·kᵀ/√D + bias, mask))·v       the fused device attention (cuda/attention.hpp)
//   out = merge_heads(O)·W_oᵀ + b_o                      (B, Lq, E)
//
// Built from an nn::MultiHeadAttention<float> (options, parameters rounded to T, train/eval and its
// dropout offset) and copied back by parameter name, so the CPU and GPU modules can be compared and
// swapped. Dropout: the CPU module's Philox stream (seed = options().seed, offset = forward calls so far,
// every call advancing it, eval mode too), element index ((b·H + h)·Lq + i)·Lk + j: a GPU module built
// from a CPU one draws the masks the CPU module would. Masks (true = keep), the fused attention's:
// causal, key padding (B, Lk) and a keep mask broadcastable to (B, H, Lq, Lk). The attention bias is any device
// tensor broadcastable to (B, H, Lq, Lk); its gradient comes back in its own shape (a trainable bias).
//
// Element types: float, bf16, fp16 (the device functional layer's: fp32 accumulation, one rounding to T
// per op). Errors: autodiff::Error, op "nn::MultiHeadAttention (cuda)".

#include <string>
#include <vector>

#include "autodiff/cuda/attention.hpp"
#include "autodiff/cuda/device.hpp"
#include "autodiff/cuda/ops.hpp"
#include "autodiff/nn/multihead_attention.hpp"

namespace autodiff::nn {

template <class T>
class DeviceMultiHeadAttention {
public:
    // A copy of `module` on the current GPU.
    explicit DeviceMultiHeadAttention(const MultiHeadAttention<float>& module);

    // query (B, Lq, E), key (B, Lk, kdim), value (B, Lk, vdim) -> (B, Lq, E). bias: undefined (none) or
    // broadcastable to (B, H, Lq, Lk). Saves what backward() needs (the inputs are held, not copied).
    DeviceTensor<T> forward(const DeviceTensor<T>& query, const DeviceTensor<T>& key, const DeviceTensor<T>& value,
                            const DeviceTensor<T>& bias = {}, const DeviceMask& mask = {});

    // Backward of the last forward, dout (B, Lq, E): the parameter gradients (gradients()) are written,
    // not accumulated; dbias (the bias's shape) and the input gradients are allocated where wanted
    // (nullptr: not wanted; with one tensor as query, key and value, each receives the sum of the three).
    void backward(const DeviceTensor<T>& dout, DeviceTensor<T>* dbias = nullptr, DeviceTensor<T>* dquery = nullptr,
                  DeviceTensor<T>* dkey = nullptr, DeviceTensor<T>* dvalue = nullptr);

    // In nn::MultiHeadAttention::parameters()'s order and names: in_proj_weight (or q/k/v_proj_weight),
    // in_proj_bias, out_proj.weight, out_proj.bias. The tensors share storage with the module's (a
    // DeviceAdam over them updates the module).
    [[nodiscard]] std::vector<DeviceTensor<T>> parameters() const;
    [[nodiscard]] const std::vector<std::string>& parameter_names() const { return names_; }
    // The gradients of the last backward(), in parameters()'s order (undefined before the first).
    [[nodiscard]] std::vector<DeviceTensor<T>> gradients() const;
    // Writes every parameter into `module`'s parameter of the same name (widened to float); throws if
    // the modules' parameters differ in names or shapes.
    void copy_to(MultiHeadAttention<float>& module) const;

    void train(bool on = true) { training_ = on; }
    void eval() { training_ = false; }
    [[nodiscard]] bool training() const { return training_; }
    [[nodiscard]] DropoutDescriptor dropout_descriptor() const { return DropoutDescriptor{opt_.dropout, opt_.seed, calls_, training_}; }
    [[nodiscard]] const MultiHeadAttentionOptions& options() const { return opt_; }

private:
    // One parameter: its value and the gradient of the last backward (undefined: absent).
    struct Parameter {
        DeviceTensor<T> value, grad;
    };
    // What the forward leaves for the backward.
    struct Saved {
        bool valid = false;
        DeviceTensor<T> x[3];         // query, key, value (B, L, features)
        DeviceTensor<T> w[3], b[3];   // the projections' weights (E, features) and biases (E) (b: undefined without bias)
        DeviceTensor<T> qkv[3];       // q, k, v in heads (B, H, L, D)
        DeviceTensor<T> bias;         // the attention bias (undefined: none)
        DeviceAttentionOptions attention;
        DeviceAttentionSaved<T> attended;  // O (B, H, Lq, D), lse
        DeviceTensor<T> merged;       // merge_heads(O) (B, Lq, E)
        bool self = false;            // query, key and value are one tensor
        Shape out;                    // (B, Lq, E)
    };

    [[nodiscard]] int device() const { return out_w_.value.device(); }
    void check_inputs(const DeviceTensor<T>& q, const DeviceTensor<T>& k, const DeviceTensor<T>& v, const DeviceTensor<T>& bias,
                      const DeviceMask& mask) const;
    // Parameter slots in parameters()'s order (the defined ones).
    [[nodiscard]] std::vector<const Parameter*> slots() const;

    MultiHeadAttentionOptions opt_;
    Parameter in_w_, q_w_, k_w_, v_w_, in_b_, out_w_, out_b_;
    std::vector<std::string> names_;
    bool training_ = true;
    std::uint64_t calls_ = 0;
    Saved saved_;
};

}  // namespace autodiff::nn

// nn::MultiHeadAttention on the GPU: validation, then the device functional layer (cuda/blas.hpp,
// cuda/ops.hpp, cuda/attention.hpp) in the order of the CPU module's expressions. Maths and API:
// include/autodiff/cuda/multihead_attention.hpp.
#include "autodiff/cuda/multihead_attention.hpp"

#include <algorithm>
#include <cmath>
#include <string_view>

#include "autodiff/cuda/blas.hpp"

namespace autodiff::nn {

namespace {

constexpr std::string_view op = "nn::MultiHeadAttention (cuda)";

// (B, L, H, D) <-> (B, H, L, D): split_heads after the projection's reshape, and merge_heads before one.
constexpr Permutation swap_heads{0, 2, 1, 3};

// x + y + z, all of one shape.
template <class T>
DeviceTensor<T> sum3(const DeviceTensor<T>& x, const DeviceTensor<T>& y, const DeviceTensor<T>& z) {
    return binary_forward(DeviceBinaryOp::add, binary_forward(DeviceBinaryOp::add, x, y), z);
}

// A zeroed gradient of x's shape (linear_backward accumulates into dW and db).
template <class T>
DeviceTensor<T> zeros_like(const DeviceTensor<T>& x) {
    DeviceTensor<T> g(x.shape());
    g.zero();
    return g;
}

}  // namespace

template <class T>
DeviceMultiHeadAttention<T>::DeviceMultiHeadAttention(const MultiHeadAttention<float>& module)
    : opt_(module.options()), training_(module.training()), calls_(module.dropout_descriptor().offset) {
    for (const Param<float>& p : module.parameters()) {
        const std::string& name = p.name();
        Parameter* slot = name == "in_proj_weight"    ? &in_w_
                          : name == "q_proj_weight"   ? &q_w_
                          : name == "k_proj_weight"   ? &k_w_
                          : name == "v_proj_weight"   ? &v_w_
                          : name == "in_proj_bias"    ? &in_b_
                          : name == "out_proj.weight" ? &out_w_
                          : name == "out_proj.bias"   ? &out_b_
                                                      : nullptr;
        if (!slot) fail(op, "the module has a parameter {} {} this class does not know", name, p.value().shape());
        slot->value = to<T>(p.value(), cuda);
        names_.push_back(name);
    }
}

template <class T>
std::vector<const typename DeviceMultiHeadAttention<T>::Parameter*> DeviceMultiHeadAttention<T>::slots() const {
    std::vector<const Parameter*> s;
    for (const Parameter* p : {&in_w_, &q_w_, &k_w_, &v_w_, &in_b_, &out_w_, &out_b_})
        if (p->value.defined()) s.push_back(p);
    return s;
}

template <class T>
std::vector<DeviceTensor<T>> DeviceMultiHeadAttention<T>::parameters() const {
    std::vector<DeviceTensor<T>> v;
    for (const Parameter* p : slots()) v.push_back(p->value);
    return v;
}

template <class T>
std::vector<DeviceTensor<T>> DeviceMultiHeadAttention<T>::gradients() const {
    std::vector<DeviceTensor<T>> v;
    for (const Parameter* p : slots()) v.push_back(p->grad);
    return v;
}

template <class T>
void DeviceMultiHeadAttention<T>::copy_to(MultiHeadAttention<float>& module) const {
    std::vector<Param<float>> params = module.parameters();
    const std::vector<const Parameter*> mine = slots();
    if (params.size() != mine.size())
        fail(op, "copy_to: the modules differ: {} parameters on the device, {} in the CPU module", mine.size(), params.size());
    for (std::size_t k = 0; k < params.size(); ++k) {
        if (params[k].name() != names_[k] || params[k].value().shape() != mine[k]->value.shape())
            fail(op, "copy_to: parameter {} is {} {} on the device but {} {} in the CPU module", k, names_[k], mine[k]->value.shape(),
                 params[k].name(), params[k].value().shape());
    }
    for (std::size_t k = 0; k < params.size(); ++k) {
        const Tensor<float> host = to(mine[k]->value, cpu);
        std::copy(host.data(), host.data() + host.numel(), params[k].value().data());
    }
}

template <class T>
void DeviceMultiHeadAttention<T>::check_inputs(const DeviceTensor<T>& q, const DeviceTensor<T>& k, const DeviceTensor<T>& v,
                                               const DeviceTensor<T>& bias, const DeviceMask& mask) const {
    for (const auto& [name, x] : {std::pair<const char*, const DeviceTensor<T>*>{"query", &q}, {"key", &k}, {"value", &v}})
        if (!x->defined()) fail(op, "{} must be a defined device tensor", name);
    check_rank(op, "query", q.shape(), 3, 3);
    check_rank(op, "key", k.shape(), 3, 3);
    check_rank(op, "value", v.shape(), 3, 3);
    const std::int64_t E = opt_.embed_dim;
    const std::int64_t kdim = opt_.kdim ? opt_.kdim : E, vdim = opt_.vdim ? opt_.vdim : E;
    if (q.shape()[2] != E) fail(op, "query {} must have embed_dim = {} features", q.shape(), E);
    if (k.shape()[2] != kdim) fail(op, "key {} must have kdim = {} features", k.shape(), kdim);
    if (v.shape()[2] != vdim) fail(op, "value {} must have vdim = {} features", v.shape(), vdim);
    if (k.shape()[0] != q.shape()[0] || v.shape()[0] != q.shape()[0])
        fail(op, "batch sizes differ: query {}, key {}, value {}", q.shape(), k.shape(), v.shape());
    if (k.shape()[1] != v.shape()[1]) fail(op, "key {} and value {} must have the same length", k.shape(), v.shape());
    const Shape scores{q.shape()[0], opt_.num_heads, q.shape()[1], k.shape()[1]};
    if (bias.defined() && !broadcasts_to(bias.shape(), scores))
        fail(op, "attention bias {} does not broadcast to the scores (B, H, Lq, Lk) = {}", bias.shape(), scores);
    if (mask.keep.defined() && !broadcasts_to(mask.keep.shape(), scores))
        fail(op, "keep mask {} does not broadcast to the scores (B, H, Lq, Lk) = {}", mask.keep.shape(), scores);
    const Shape padding{q.shape()[0], k.shape()[1]};
    if (mask.key_padding.defined() && mask.key_padding.shape() != padding)
        fail(op, "key-padding mask must have shape (B, Lk) = {}, got {}", padding, mask.key_padding.shape());
    auto on_module_device = [&](const char* name, const Shape& shape, int dev) {
        if (dev >= 0 && dev != device())
            fail(op, "{} {} is on cuda device {} but the module's parameters are on cuda device {}", name, shape, dev, device());
    };
    on_module_device("query", q.shape(), q.device());
    on_module_device("key", k.shape(), k.device());
    on_module_device("value", v.shape(), v.device());
    on_module_device("bias", bias.shape(), bias.device());
    on_module_device("key_padding", mask.key_padding.shape(), mask.key_padding.device());
    on_module_device("keep", mask.keep.shape(), mask.keep.device());
}

template <class T>
DeviceTensor<T> DeviceMultiHeadAttention<T>::forward(const DeviceTensor<T>& query, const DeviceTensor<T>& key, const DeviceTensor<T>& value,
                                                     const DeviceTensor<T>& bias, const DeviceMask& mask) {
    check_inputs(query, key, value, bias, mask);
    const std::int64_t E = opt_.embed_dim, H = opt_.num_heads, D = E / H, B = query.shape()[0], Lq = query.shape()[1];
    Saved s;
    s.self = query.data() == key.data() && key.data() == value.data() && query.shape() == key.shape() && key.shape() == value.shape();
    const DeviceTensor<T>* inputs[3] = {&query, &key, &value};
    const Parameter* separate[3] = {&q_w_, &k_w_, &v_w_};
    for (int i = 0; i < 3; ++i) {
        s.x[i] = *inputs[i];
        s.w[i] = in_w_.value.defined() ? narrow_forward(in_w_.value, 0, i * E, E) : separate[i]->value;
        if (in_b_.value.defined()) s.b[i] = narrow_forward(in_b_.value, 0, i * E, E);
        const std::int64_t L = s.x[i].shape()[1];
        s.qkv[i] = permute_forward(linear_forward(s.x[i], s.w[i], s.b[i]).reshape(Shape{B, L, H, D}), swap_heads);
    }
    // The CPU module's scale, computed in float as there: T(1)/√(T(E/H)).
    s.attention.scale = 1.f / std::sqrt(static_cast<float>(D));
    s.attention.bias_scale = 1.0;
    s.attention.causal = mask.causal;
    s.attention.key_padding = mask.key_padding;
    s.attention.keep = mask.keep;
    s.attention.dropout = dropout_descriptor();
    s.bias = bias;
    s.attended = attention_forward(s.qkv[0], s.qkv[1], s.qkv[2], bias, s.attention);
    s.merged = permute_forward(s.attended.O, swap_heads).reshape(Shape{B, Lq, E});
    DeviceTensor<T> out = linear_forward(s.merged, out_w_.value, out_b_.value);
    s.out = out.shape();
    s.valid = true;
    saved_ = std::move(s);
    ++calls_;
    return out;
}

template <class T>
void DeviceMultiHeadAttention<T>::backward(const DeviceTensor<T>& dout, DeviceTensor<T>* dbias, DeviceTensor<T>* dquery,
                                           DeviceTensor<T>* dkey, DeviceTensor<T>* dvalue) {
    if (!saved_.valid) fail(op, "backward() needs a forward() first");
    if (!dout.defined() || dout.shape() != saved_.out)
        fail(op, "dout must be a device tensor of the output's shape {}, got {}", saved_.out, dout.defined() ? dout.shape() : Shape{});
    if (dout.device() != device())
        fail(op, "dout {} is on cuda device {} but the module's parameters are on cuda device {}", dout.shape(), dout.device(), device());
    if (dbias && !saved_.bias.defined()) fail(op, "dbias is wanted but the forward had no attention bias");
    const std::int64_t E = opt_.embed_dim, H = opt_.num_heads, D = E / H, B = saved_.out[0], Lq = saved_.out[1];

    // out = merged·W_oᵀ + b_o:   dout (B, Lq, E) -> dmerged (B, Lq, E), dW_o (E, E), db_o (E)
    DeviceTensor<T> dmerged;
    out_w_.grad = zeros_like(out_w_.value);
    if (out_b_.value.defined()) out_b_.grad = zeros_like(out_b_.value);
    linear_backward(&dmerged, &out_w_.grad, out_b_.value.defined() ? &out_b_.grad : nullptr, dout, saved_.merged, out_w_.value);

    // O = attention(q, k, v, bias):   dO (B, H, Lq, D) -> dq, dk, dv (B, H, L, D), dbias (bias's shape)
    const DeviceTensor<T> dO = permute_forward(dmerged.reshape(Shape{B, Lq, H, D}), swap_heads);
    DeviceTensor<T> dqkv[3], dbias_local;
    attention_backward(&dqkv[0], &dqkv[1], &dqkv[2], dbias ? &dbias_local : nullptr, dO, saved_.qkv[0], saved_.qkv[1], saved_.qkv[2],
                       saved_.bias, saved_.attended, saved_.attention);

    // q_i = x_i·W_iᵀ + b_i:   dq_i (B, H, L, D) -> dx_i (B, L, features), dW_i (E, features), db_i (E)
    const bool want_dx = dquery || dkey || dvalue;
    DeviceTensor<T> dW[3], db[3], dx[3];
    for (int i = 0; i < 3; ++i) {
        const std::int64_t L = saved_.x[i].shape()[1];
        const DeviceTensor<T> dy = permute_forward(dqkv[i], swap_heads).reshape(Shape{B, L, E});
        dW[i] = zeros_like(saved_.w[i]);
        if (saved_.b[i].defined()) db[i] = zeros_like(saved_.b[i]);
        linear_backward(want_dx ? &dx[i] : nullptr, &dW[i], saved_.b[i].defined() ? &db[i] : nullptr, dy, saved_.x[i], saved_.w[i]);
    }
    // The packed weight's and bias's gradient: the three row blocks put back in place (narrow's backward).
    auto packed = [&](const DeviceTensor<T>(&g)[3], const Shape& shape) {
        return sum3(narrow_backward(g[0], shape, 0, 0), narrow_backward(g[1], shape, 0, E), narrow_backward(g[2], shape, 0, 2 * E));
    };
    if (in_w_.value.defined()) {
        in_w_.grad = packed(dW, in_w_.value.shape());
    } else {
        q_w_.grad = dW[0];
        k_w_.grad = dW[1];
        v_w_.grad = dW[2];
    }
    if (in_b_.value.defined()) in_b_.grad = packed(db, in_b_.value.shape());
    if (dbias) *dbias = dbias_local;
    if (saved_.self && want_dx) {
        const DeviceTensor<T> dinput = sum3(dx[0], dx[1], dx[2]);
        for (DeviceTensor<T>* d : {dquery, dkey, dvalue})
            if (d) *d = dinput;
    } else {
        if (dquery) *dquery = dx[0];
        if (dkey) *dkey = dx[1];
        if (dvalue) *dvalue = dx[2];
    }
}

template class DeviceMultiHeadAttention<float>;
template class DeviceMultiHeadAttention<bf16>;
template class DeviceMultiHeadAttention<fp16>;

}  // namespace autodiff::nn

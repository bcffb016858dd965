#pragma once
// Saving and loading parameters and optimiser state as safetensors files (io/safetensors.hpp), with
// torch's names, so that torch reads what we write and the other way round:
//
//   nn::Linear              weight (out, in), bias (out)                    as torch.nn.Linear
//   nn::MultiHeadAttention  in_proj_weight (3E, E), in_proj_bias (3E),      as torch.nn.MultiheadAttention
//                           out_proj.weight (E, E), out_proj.bias (E)       (q/k/v_proj_weight when kdim or
//                                                                            vdim differ from E)
//   nn::Adam                state.<i>.step, state.<i>.exp_avg,              torch.optim.Adam's state_dict()
//                           state.<i>.exp_avg_sq for parameter i              ["state"], flattened
//   nn::SGD                 state.<i>.momentum_buffer                        (parameters without state yet
//                                                                            are absent, as in torch)
//
// Loading writes into the existing Params' values in place (an optimiser holding them keeps working)
// and checks first that the file has exactly the expected names, each with the expected shape and the
// module's dtype: on any mismatch it throws Error naming the file, the tensor, and both shapes or dtypes,
// and changes nothing.

#include <algorithm>
#include <charconv>
#include <cmath>
#include <string>
#include <utility>
#include <vector>

#include "autodiff/io/safetensors.hpp"
#include "autodiff/nn/linear.hpp"
#include "autodiff/nn/multihead_attention.hpp"
#include "autodiff/nn/optim.hpp"

namespace autodiff::nn {

template <class T>
using NamedParams = std::vector<std::pair<std::string, Param<T>>>;

// torch.nn.Linear's names.
template <class T>
NamedParams<T> named_parameters(const Linear<T>& m) {
    NamedParams<T> p{{"weight", m.weight()}};
    if (m.has_bias()) p.emplace_back("bias", m.bias());
    return p;
}

// torch.nn.MultiheadAttention's names (the module's Params carry them).
template <class T>
NamedParams<T> named_parameters(const MultiHeadAttention<T>& m) {
    NamedParams<T> p;
    for (const auto& param : m.parameters()) p.emplace_back(param.name(), param);
    return p;
}

namespace detail {

template <class T>
constexpr const char* dtype_name() {
    return std::is_same_v<T, float> ? "F32" : "F64";
}

// Checks that `file` holds exactly `expected` (name, shape) in dtype T, then returns the tensors in
// the order of `expected`.
template <class T>
std::vector<Tensor<T>> take(const char* op, const std::string& path, const SafetensorsFile& file,
                            const std::vector<std::pair<std::string, Shape>>& expected) {
    std::vector<Tensor<T>> out;
    for (const auto& [name, shape] : expected) {
        const NamedTensor* t = file.find(name);
        if (!t) fail(op, "{}: no tensor '{}' (expected shape {}, dtype {})", path, name, shape, dtype_name<T>());
        if (!std::holds_alternative<Tensor<T>>(t->value))
            fail(op, "{}: tensor '{}' has dtype {}, expected {}", path, name, t->dtype(), dtype_name<T>());
        if (t->shape() != shape) fail(op, "{}: tensor '{}' has shape {}, expected {}", path, name, t->shape(), shape);
        out.push_back(std::get<Tensor<T>>(t->value));
    }
    for (const auto& t : file.tensors) {
        const bool known = std::any_of(expected.begin(), expected.end(), [&](const auto& e) { return e.first == t.name; });
        if (!known) fail(op, "{}: unexpected tensor '{}' of shape {}", path, t.name, t.shape());
    }
    return out;
}

inline std::string state_name(std::size_t i, const char* key) { return fmt::format("state.{}.{}", i, key); }

}  // namespace detail

// Writes the parameters' values under their names.
template <class T>
void save_parameters(const std::string& path, const NamedParams<T>& params) {
    std::vector<NamedTensor> tensors;
    for (const auto& [name, p] : params) tensors.push_back({name, p.value()});
    save_safetensors(path, tensors, {{"format", "pt"}});
}

// Reads the parameters' values from `path` (exactly these names and shapes, dtype T) into the Params.
template <class T>
void load_parameters(const std::string& path, const NamedParams<T>& params) {
    std::vector<std::pair<std::string, Shape>> expected;
    for (const auto& [name, p] : params) expected.emplace_back(name, p.shape());
    const auto values = detail::take<T>("load_parameters", path, load_safetensors(path), expected);
    for (std::size_t i = 0; i < params.size(); ++i) {
        Tensor<T>& dst = const_cast<Param<T>&>(params[i].second).value();
        std::copy_n(values[i].data(), values[i].numel(), dst.data());
    }
}

// A module's parameters (Linear, MultiHeadAttention) under torch's names.
template <class Module>
void save(const Module& m, const std::string& path) {
    save_parameters(path, named_parameters(m));
}
template <class Module>
void load(Module& m, const std::string& path) {
    load_parameters(path, named_parameters(m));
}

// Adam's moments and per-parameter step counts, as torch.optim.Adam's state (step as a scalar), and
// the calls of step() as the metadata "steps" (torch keeps no such count: a file without it, saved by
// torch, restores steps() as the largest per-parameter count).
template <class T>
void save(const Adam<T>& opt, const std::string& path) {
    std::vector<NamedTensor> tensors;
    for (std::size_t i = 0; i < opt.params().size(); ++i) {
        const auto s = opt.state(i);
        if (!s.exp_avg.defined()) continue;
        tensors.push_back({detail::state_name(i, "step"), full<T>({}, static_cast<T>(s.step))});
        tensors.push_back({detail::state_name(i, "exp_avg"), s.exp_avg});
        tensors.push_back({detail::state_name(i, "exp_avg_sq"), s.exp_avg_sq});
    }
    save_safetensors(path, tensors, {{"format", "pt"}, {"optimizer", "Adam"}, {"steps", std::to_string(opt.steps())}});
}
template <class T>
void load(Adam<T>& opt, const std::string& path) {
    const char* op = "load(Adam)";
    const SafetensorsFile file = load_safetensors(path);
    std::vector<std::pair<std::string, Shape>> expected;
    std::vector<std::size_t> which;
    for (std::size_t i = 0; i < opt.params().size(); ++i) {
        if (!file.find(detail::state_name(i, "step"))) continue;
        which.push_back(i);
        expected.emplace_back(detail::state_name(i, "step"), Shape{});
        expected.emplace_back(detail::state_name(i, "exp_avg"), opt.params()[i].shape());
        expected.emplace_back(detail::state_name(i, "exp_avg_sq"), opt.params()[i].shape());
    }
    const auto values = detail::take<T>(op, path, file, expected);
    for (std::size_t j = 0; j < which.size(); ++j) {
        const T step = values[3 * j].item();
        if (!(step >= 1) || step != std::floor(step))
            fail(op, "{}: tensor '{}' must be a whole number of steps >= 1, got {}", path, expected[3 * j].first, step);
    }
    long steps = 0;
    for (std::size_t j = 0; j < which.size(); ++j) steps = std::max(steps, static_cast<long>(values[3 * j].item()));
    if (const auto it = file.metadata.find("steps"); it != file.metadata.end()) {
        const std::string& text = it->second;
        long saved = -1;
        const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), saved);
        if (ec != std::errc() || end != text.data() + text.size() || saved < steps)
            fail(op, "{}: metadata 'steps' must be a whole number >= the largest per-parameter step ({}), got '{}'", path, steps, text);
        steps = saved;
    }
    opt.reset_state();
    for (std::size_t j = 0; j < which.size(); ++j)
        opt.set_state(which[j], {static_cast<long>(values[3 * j].item()), values[3 * j + 1].clone(), values[3 * j + 2].clone()});
    opt.set_steps(steps);
}

// SGD's momentum buffers, as torch.optim.SGD's state.
template <class T>
void save(const SGD<T>& opt, const std::string& path) {
    std::vector<NamedTensor> tensors;
    for (std::size_t i = 0; i < opt.params().size(); ++i)
        if (opt.momentum_buffer(i).defined()) tensors.push_back({detail::state_name(i, "momentum_buffer"), opt.momentum_buffer(i)});
    save_safetensors(path, tensors, {{"format", "pt"}, {"optimizer", "SGD"}});
}
template <class T>
void load(SGD<T>& opt, const std::string& path) {
    const SafetensorsFile file = load_safetensors(path);
    std::vector<std::pair<std::string, Shape>> expected;
    std::vector<std::size_t> which;
    for (std::size_t i = 0; i < opt.params().size(); ++i) {
        if (!file.find(detail::state_name(i, "momentum_buffer"))) continue;
        which.push_back(i);
        expected.emplace_back(detail::state_name(i, "momentum_buffer"), opt.params()[i].shape());
    }
    const auto values = detail::take<T>("load(SGD)", path, file, expected);
    for (std::size_t i = 0; i < opt.params().size(); ++i) opt.set_momentum_buffer(i, Tensor<T>());
    for (std::size_t j = 0; j < which.size(); ++j) opt.set_momentum_buffer(which[j], values[j].clone());
}

}  // namespace autodiff::nn

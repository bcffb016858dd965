// The native half of the Python package autodiff_attention (python/autodiff_attention/__init__.py is
// the other): the fused attention kernels (kernels/attention.hpp) on CPU torch tensors, without copies.
//
// Inputs arrive through DLPack (nanobind's ndarray) and are viewed in place by Tensor<T>::adopt: they
// must be CPU, contiguous and row-major (the Python side calls .contiguous(), which copies only a
// non-contiguous tensor). Outputs are this library's pool tensors handed to torch through DLPack with a
// capsule that owns them: no copy either way. Errors are autodiff::Error, raised in Python as
// autodiff_attention.Error (a ValueError) with the C++ message.

#include <cstdint>
#include <optional>
#include <string>

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/map.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "autodiff/autodiff.hpp"

namespace nb = nanobind;
namespace ad = autodiff;

namespace {

using Array = nb::ndarray<nb::device::cpu>;
using OptArray = std::optional<Array>;

constexpr const char* op = "attention";

enum class DType { f32, f64, boolean, other };

DType dtype_of(const Array& a) {
    if (a.dtype() == nb::dtype<float>()) return DType::f32;
    if (a.dtype() == nb::dtype<double>()) return DType::f64;
    if (a.dtype() == nb::dtype<bool>()) return DType::boolean;
    return DType::other;
}

std::string dtype_name(const Array& a) {
    switch (dtype_of(a)) {
        case DType::f32: return "float32";
        case DType::f64: return "float64";
        case DType::boolean: return "bool";
        default: return fmt::format("(DLPack code {}, {} bits)", a.dtype().code, a.dtype().bits);
    }
}

ad::Shape shape_of(const char* arg, const Array& a) {
    if (a.ndim() > static_cast<std::size_t>(ad::max_rank)) {
        std::string dims;
        for (std::size_t i = 0; i < a.ndim(); ++i) dims += (i ? "," : "") + std::to_string(a.shape(i));
        ad::fail(op, "{} has rank {} ({}); at most {} is supported", arg, a.ndim(), dims, ad::max_rank);
    }
    ad::Shape s;
    for (std::size_t i = 0; i < a.ndim(); ++i) s.push_back(static_cast<std::int64_t>(a.shape(i)));
    return s;
}

// Views `a` without copying; throws unless it is contiguous and row-major (strides of size-1
// dimensions do not matter).
template <class T>
ad::Tensor<T> view(const char* arg, const Array& a) {
    const ad::Shape s = shape_of(arg, a);
    std::int64_t expected = 1;
    for (int i = s.rank() - 1; i >= 0; --i) {
        if (s[i] != 1 && a.stride(static_cast<std::size_t>(i)) != expected) {
            std::string strides;
            for (std::size_t j = 0; j < a.ndim(); ++j) strides += (j ? "," : "") + std::to_string(a.stride(j));
            ad::fail(op, "{} {} is not contiguous (strides ({}) in elements); call .contiguous() first", arg, s, strides);
        }
        expected *= s[i];
    }
    return ad::Tensor<T>::adopt(static_cast<T*>(a.data()), s);
}

template <class T>
ad::Tensor<T> optional_view(const char* arg, const OptArray& a) {
    return a ? view<T>(arg, *a) : ad::Tensor<T>();
}

// The float dtype shared by q, k, v (and bias, dO, O, lse when given).
DType common_dtype(std::initializer_list<std::pair<const char*, const Array*>> arrays) {
    const Array& first = *arrays.begin()->second;
    const DType d = dtype_of(first);
    if (d != DType::f32 && d != DType::f64)
        ad::fail(op, "{} must be float32 or float64, got {}", arrays.begin()->first, dtype_name(first));
    for (const auto& [name, a] : arrays)
        if (a && dtype_of(*a) != d)
            ad::fail(op, "{} has dtype {} but {} has {}: all must be equal", name, dtype_name(*a), arrays.begin()->first,
                     dtype_name(first));
    return d;
}

ad::Mask make_mask(const OptArray& mask, bool is_causal) {
    ad::Mask m;
    m.causal = is_causal;
    if (mask) {
        if (dtype_of(*mask) != DType::boolean)
            ad::fail(op, "mask must be a bool tensor (true = keep), got dtype {}", dtype_name(*mask));
        m.keep = view<bool>("mask", *mask);
    }
    return m;
}

ad::AttentionOptions make_options(const OptArray& mask, bool is_causal, double dropout_p, double scale, std::uint64_t seed) {
    if (!std::isfinite(scale)) ad::fail(op, "scale must be finite, got {}", scale);
    ad::AttentionOptions opt;
    opt.scale = scale;
    opt.mask = make_mask(mask, is_causal);
    opt.dropout = ad::DropoutDescriptor{dropout_p, seed, 0, true};
    ad::check_dropout(op, opt.dropout);
    return opt;
}

// A torch tensor owning `t` (no copy): the capsule keeps the pool block alive until torch lets go.
template <class T>
nb::object to_torch(ad::Tensor<T> t) {
    auto* owner = new ad::Tensor<T>(std::move(t));
    nb::capsule capsule(owner, [](void* p) noexcept { delete static_cast<ad::Tensor<T>*>(p); });
    std::size_t dims[ad::max_rank];
    for (int i = 0; i < owner->rank(); ++i) dims[i] = static_cast<std::size_t>(owner->shape()[i]);
    return nb::ndarray<nb::pytorch, T>(owner->data(), static_cast<std::size_t>(owner->rank()), dims, capsule).cast();
}

// keep_scores (a trainable full-shape bias): the forward also returns the masked scores S (..., Lq, Lk),
// and the backward reads P from them instead of recomputing Q·Kᵀ + bias and writes the bias gradient
// into their buffer (kernels/attention.hpp): one L×L buffer serves both, as in the C++ engine.
// keep_mask (a backward will run): the forward may also return dropout's keep mask as bits
// (attention_stores_dropout_mask decides; uint64 words, AttentionSaved::keep_bits), for the backward to
// apply instead of regenerating it.
template <class T>
nb::tuple forward(const Array& q, const Array& k, const Array& v, const OptArray& bias, const OptArray& mask, bool is_causal,
                  double dropout_p, double scale, std::uint64_t seed, bool keep_scores, bool keep_mask) {
    const ad::Tensor<T> Q = view<T>("q", q), K = view<T>("k", k), V = view<T>("v", v), B = optional_view<T>("bias", bias);
    ad::AttentionOptions opt = make_options(mask, is_causal, dropout_p, scale, seed);
    opt.keep_dropout_mask = keep_mask;
    if (keep_scores) {
        // Validates the shapes before they are read below.
        (void)ad::attention_output_shape(op, Q.shape(), K.shape(), V.shape(), B.defined() ? &B.shape() : nullptr, nullptr, opt.mask);
        ad::Shape full = Q.shape();
        full[full.rank() - 1] = K.shape()[K.rank() - 2];
        if (!B.defined() || B.shape() != full)
            ad::fail(op, "keep_scores needs a bias of the scores' full shape {}, got {}", full, B.defined() ? B.shape().str() : "none");
        opt.keep_scores = true;
    }
    ad::AttentionSaved<T> saved;
    {
        nb::gil_scoped_release release;
        saved = ad::attention_forward(Q, K, V, B, ad::Tensor<T>(), opt);
    }
    nb::object S = saved.scores.defined() ? to_torch(std::move(saved.scores)) : nb::none();
    nb::object bits = saved.keep_bits.defined() ? to_torch(std::move(saved.keep_bits)) : nb::none();
    return nb::make_tuple(to_torch(std::move(saved.O)), to_torch(std::move(saved.lse)), S, bits);
}

template <class T>
nb::tuple backward(const Array& dO, const Array& q, const Array& k, const Array& v, const OptArray& bias, const OptArray& mask,
                   const Array& O, const Array& lse, bool is_causal, double dropout_p, double scale, std::uint64_t seed,
                   const std::vector<bool>& needs, const OptArray& scores, const OptArray& keep_bits) {
    if (needs.size() != 4) ad::fail(op, "needs must have 4 flags (dq, dk, dv, dbias), got {}", needs.size());
    const ad::Tensor<T> Q = view<T>("q", q), K = view<T>("k", k), V = view<T>("v", v), B = optional_view<T>("bias", bias);
    const ad::Tensor<T> dOt = view<T>("grad_out", dO);
    // With the forward's scores, the bias gradient is written into their buffer (dbias then comes back as None).
    const ad::Tensor<T> S = optional_view<T>("scores", scores);
    if (S.defined() && (!B.defined() || S.shape() != B.shape()))
        ad::fail(op, "scores {} must have the bias's full shape {}", S.shape(), B.defined() ? B.shape().str() : "none");
    ad::AttentionSaved<T> saved{view<T>("out", O), view<T>("lse", lse), S, {}, {}, {}};
    if (keep_bits) {
        if (keep_bits->dtype() != nb::dtype<std::uint64_t>())
            ad::fail(op, "keep_bits must be uint64 (the forward's dropout mask), got {}", dtype_name(*keep_bits));
        saved.keep_bits = view<std::uint64_t>("keep_bits", *keep_bits);  // its shape is checked by attention_backward
    }
    if (dOt.shape() != saved.O.shape()) ad::fail(op, "grad_out {} must have the output's shape {}", dOt.shape(), saved.O.shape());
    if (needs[3] && !B.defined()) ad::fail(op, "the bias gradient was asked for without a bias");
    const ad::AttentionOptions opt = make_options(mask, is_causal, dropout_p, scale, seed);
    ad::Tensor<T> dQ, dK, dV, dB;
    {
        nb::gil_scoped_release release;
        ad::attention_backward<T>(needs[0] ? &dQ : nullptr, needs[1] ? &dK : nullptr, needs[2] ? &dV : nullptr,
                                  needs[3] ? &dB : nullptr, dOt, Q, K, V, B, ad::Tensor<T>(), saved, opt);
    }
    if (dB.defined() && dB.shares_storage_with(S)) dB = ad::Tensor<T>();  // it is in the caller's scores tensor
    auto out = [](ad::Tensor<T>& t) { return t.defined() ? to_torch(std::move(t)) : nb::none(); };
    return nb::make_tuple(out(dQ), out(dK), out(dV), out(dB));
}

// ---- parameter files ---------------------------------------------------------------------------

void save_file(const std::string& path, const std::vector<std::pair<std::string, Array>>& tensors,
               const std::map<std::string, std::string>& metadata) {
    std::vector<ad::NamedTensor> named;
    for (const auto& [name, a] : tensors) {
        const std::string arg = "tensor '" + name + "'";
        switch (dtype_of(a)) {
            case DType::f32: named.push_back({name, view<float>(arg.c_str(), a)}); break;
            case DType::f64: named.push_back({name, view<double>(arg.c_str(), a)}); break;
            default: ad::fail("save_safetensors", "{}: {} has dtype {}; only float32 and float64 are supported", path, arg, dtype_name(a));
        }
    }
    ad::save_safetensors(path, named, metadata);
}

nb::tuple load_file(const std::string& path) {
    ad::SafetensorsFile file = ad::load_safetensors(path);
    nb::dict tensors;
    for (auto& t : file.tensors)
        tensors[t.name.c_str()] = std::visit([](auto& v) { return to_torch(std::move(v)); }, t.value);
    return nb::make_tuple(tensors, file.metadata);
}

// nn::MultiHeadAttention (self-attention, eval mode) for the interoperability tests: built from `seed`,
// loaded from `load_path` and/or saved to `save_path`, applied to x (B, L, E).
template <class T>
nb::object mha_forward(std::int64_t embed_dim, std::int64_t num_heads, std::uint64_t seed, const std::optional<std::string>& load_path,
                       const std::optional<std::string>& save_path, const Array& x) {
    if (dtype_of(x) != DType::f32 && dtype_of(x) != DType::f64)
        ad::fail("nn::MultiHeadAttention", "x must be float32 or float64, got {}", dtype_name(x));
    ad::nn::MultiHeadAttention<T> mha({.embed_dim = embed_dim, .num_heads = num_heads, .seed = seed});
    if (load_path) ad::nn::load(mha, *load_path);
    if (save_path) ad::nn::save(mha, *save_path);
    mha.eval();
    const ad::Var<T> input(view<T>("x", x).clone());
    ad::Var<T> out = mha(input, input, input);
    return to_torch(out.value().clone());
}

// nn::Linear (float64) from (weight, bias) trained with nn::Adam(lr) on mse(layer(x_i), y_i), one step per
// pair, after loading the optimiser's state from `load_state` if given; saves the state to `save_state`
// if given; returns (weight, bias). For the interoperability tests with torch.optim.Adam.
nb::tuple linear_adam(const Array& weight, const Array& bias, const std::vector<Array>& xs, const std::vector<Array>& ys, double lr,
                      const std::optional<std::string>& load_state, const std::optional<std::string>& save_state) {
    const ad::Tensor<double> W = view<double>("weight", weight), b = view<double>("bias", bias);
    ad::check_rank("linear_adam", "weight", W.shape(), 2, 2);
    ad::nn::Linear<double> layer(W.shape()[1], W.shape()[0], true, 0);
    if (b.shape() != layer.bias().shape()) ad::fail("linear_adam", "bias {} must have shape {}", b.shape(), layer.bias().shape());
    std::copy_n(W.data(), W.numel(), layer.weight().value().data());
    std::copy_n(b.data(), b.numel(), layer.bias().value().data());
    ad::nn::Adam<double> opt(layer.parameters(), {.lr = lr});
    if (load_state) ad::nn::load(opt, *load_state);
    if (xs.size() != ys.size()) ad::fail("linear_adam", "{} inputs but {} targets", xs.size(), ys.size());
    for (std::size_t i = 0; i < xs.size(); ++i) {
        opt.zero_grad();
        ad::Var<double> loss = ad::mse(layer(view<double>("x", xs[i]).clone()), view<double>("y", ys[i]).clone());
        loss.backward();
        opt.step();
    }
    if (save_state) ad::nn::save(opt, *save_state);
    return nb::make_tuple(to_torch(layer.weight().value().clone()), to_torch(layer.bias().value().clone()));
}

}  // namespace

NB_MODULE(_C, m) {
    m.doc() = "Native kernels of autodiff_attention (use the functions of the package, not these).";
    nb::exception<ad::Error>(m, "Error", PyExc_ValueError);

    m.def(
        "attention_forward",
        [](const Array& q, const Array& k, const Array& v, const OptArray& bias, const OptArray& mask, bool is_causal,
           double dropout_p, double scale, std::uint64_t seed, bool keep_scores, bool keep_mask) {
            const DType d = common_dtype({{"q", &q}, {"k", &k}, {"v", &v}, {"bias", bias ? &*bias : nullptr}});
            return d == DType::f32 ? forward<float>(q, k, v, bias, mask, is_causal, dropout_p, scale, seed, keep_scores, keep_mask)
                                   : forward<double>(q, k, v, bias, mask, is_causal, dropout_p, scale, seed, keep_scores, keep_mask);
        },
        nb::arg("q"), nb::arg("k"), nb::arg("v"), nb::arg("bias").none(), nb::arg("mask").none(), nb::arg("is_causal"),
        nb::arg("dropout_p"), nb::arg("scale"), nb::arg("seed"), nb::arg("keep_scores") = false, nb::arg("keep_mask") = false,
        "O, lse, scores, keep_bits = attention_forward(...): O (..., Lq, dv), the per-row log-sum-exp (..., Lq), with "
        "keep_scores the masked scores (..., Lq, Lk) for the backward (else None), with keep_mask the dropout mask as "
        "uint64 words (leading index * Lq, ceil(Lk / 64)) when stores_dropout_mask says so (else None).");

    m.def(
        "stores_dropout_mask",
        [](const std::vector<std::int64_t>& q, const std::vector<std::int64_t>& k, bool f64, double dropout_p, bool keep_scores) {
            ad::AttentionOptions opt;
            opt.dropout = ad::DropoutDescriptor{dropout_p, 0, 0, true};
            opt.keep_scores = keep_scores;
            opt.keep_dropout_mask = true;
            const auto shape = [](const std::vector<std::int64_t>& dims) { return ad::Shape::from_range(dims.begin(), dims.end()); };
            return f64 ? ad::attention_stores_dropout_mask<double>(shape(q), shape(k), opt)
                       : ad::attention_stores_dropout_mask<float>(shape(q), shape(k), opt);
        },
        nb::arg("q_shape"), nb::arg("k_shape"), nb::arg("f64"), nb::arg("dropout_p"), nb::arg("keep_scores"),
        "Whether attention_forward with keep_mask returns the dropout mask for these shapes (for the fake kernel).");

    m.def(
        "attention_backward",
        [](const Array& dO, const Array& q, const Array& k, const Array& v, const OptArray& bias, const OptArray& mask,
           const Array& O, const Array& lse, bool is_causal, double dropout_p, double scale, std::uint64_t seed,
           const std::vector<bool>& needs, const OptArray& scores, const OptArray& keep_bits) {
            const DType d = common_dtype({{"q", &q}, {"k", &k}, {"v", &v}, {"bias", bias ? &*bias : nullptr}, {"grad_out", &dO},
                                          {"out", &O}, {"lse", &lse}, {"scores", scores ? &*scores : nullptr}});
            return d == DType::f32 ? backward<float>(dO, q, k, v, bias, mask, O, lse, is_causal, dropout_p, scale, seed, needs, scores, keep_bits)
                                   : backward<double>(dO, q, k, v, bias, mask, O, lse, is_causal, dropout_p, scale, seed, needs, scores, keep_bits);
        },
        nb::arg("grad_out"), nb::arg("q"), nb::arg("k"), nb::arg("v"), nb::arg("bias").none(), nb::arg("mask").none(),
        nb::arg("out"), nb::arg("lse"), nb::arg("is_causal"), nb::arg("dropout_p"), nb::arg("scale"), nb::arg("seed"),
        nb::arg("needs"), nb::arg("scores").none() = nb::none(), nb::arg("keep_bits").none() = nb::none(),
        "dq, dk, dv, dbias (None where not needed, or written into `scores` when given) = attention_backward(...); "
        "keep_bits: the forward's dropout mask (else regenerated).");

    m.def("save_safetensors", &save_file, nb::arg("path"), nb::arg("tensors"), nb::arg("metadata"),
          "Writes [(name, tensor)] (float32/float64, contiguous) with the C++ writer.");
    m.def("load_safetensors", &load_file, nb::arg("path"), "(tensors dict, metadata dict), read by the C++ reader.");
    m.def("linear_adam", &linear_adam, nb::arg("weight"), nb::arg("bias"), nb::arg("xs"), nb::arg("ys"), nb::arg("lr"),
          nb::arg("load_state").none(), nb::arg("save_state").none(),
          "nn::Linear trained by nn::Adam, state loaded/saved as safetensors (for the interoperability tests).");
    m.def(
        "mha_forward",
        [](std::int64_t embed_dim, std::int64_t num_heads, std::uint64_t seed, const std::optional<std::string>& load_path,
           const std::optional<std::string>& save_path, const Array& x) {
            return dtype_of(x) == DType::f64 ? mha_forward<double>(embed_dim, num_heads, seed, load_path, save_path, x)
                                             : mha_forward<float>(embed_dim, num_heads, seed, load_path, save_path, x);
        },
        nb::arg("embed_dim"), nb::arg("num_heads"), nb::arg("seed"), nb::arg("load_path").none(), nb::arg("save_path").none(),
        nb::arg("x"), "nn::MultiHeadAttention self-attention in eval mode (for the interoperability tests).");
}

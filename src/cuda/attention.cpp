// The GPU attention's host side: validation (the CPU's shape check, so both report alike), outputs and
// scratch, then the launchers of attention_kernels.cu. Maths and API: include/autodiff/cuda/attention.hpp.
#include "autodiff/cuda/attention.hpp"

#include <cmath>
#include <cstdint>
#include <string_view>
#include <type_traits>

#include "attention_fp64.hpp"
#include "attention_kernels.hpp"
#include "autodiff/kernels/attention.hpp"
#include "cuda_check.hpp"
#include "dtype.hpp"

namespace autodiff {

namespace {

const char* defined_or_not(bool defined) { return defined ? "defined" : "undefined"; }

template <class T>
detail::AttentionProblem make_problem(std::string_view op, const DeviceTensor<T>& Q, const DeviceTensor<T>& K, const DeviceTensor<T>& V,
                                      const DeviceTensor<T>& bias, const DeviceAttentionOptions& opt) {
    if (!Q.defined() || !K.defined() || !V.defined())
        fail(op, "Q, K and V must be defined device tensors (got Q {}, K {}, V {})", defined_or_not(Q.defined()),
             defined_or_not(K.defined()), defined_or_not(V.defined()));
    Mask mask;
    mask.causal = opt.causal;
    // The CPU's shape check reads only the mask's shape: a host mask of that shape stands in for it.
    if (opt.key_padding.defined()) mask.key_padding = Tensor<bool>(opt.key_padding.shape());
    if (opt.keep.defined()) mask.keep = Tensor<bool>(opt.keep.shape());
    (void)attention_output_shape(op, Q.shape(), K.shape(), V.shape(), bias.defined() ? &bias.shape() : nullptr, nullptr, mask);
    const int device = Q.device();
    auto same_device = [&](const char* name, const Shape& shape, int other) {
        if (other >= 0 && other != device)
            fail(op, "{} {} is on cuda device {} but Q {} is on cuda device {}", name, shape, other, Q.shape(), device);
    };
    same_device("K", K.shape(), K.device());
    same_device("V", V.shape(), V.device());
    same_device("bias", bias.shape(), bias.device());
    same_device("key_padding", opt.key_padding.shape(), opt.key_padding.device());
    same_device("keep", opt.keep.shape(), opt.keep.device());
    const std::int64_t d = Q.shape().dim_from_end(1), dv = V.shape().dim_from_end(1);
    if (d > detail::max_head_dim || dv > detail::max_head_dim || d < 1 || dv < 1)
        fail(op, "head dimensions must be in [1, {}] on cuda, got Q {} and V {}", detail::max_head_dim, Q.shape(), V.shape());
    if (!std::isfinite(opt.scale) || !std::isfinite(opt.bias_scale))
        fail(op, "scale ({}) and bias_scale ({}) must be finite", opt.scale, opt.bias_scale);
    check_dropout(op, opt.dropout);

    detail::AttentionProblem p;
    const auto padded = Q.shape().padded();
    p.heads = padded[1];
    p.items = padded[0] * padded[1];
    if (p.items > 65535) fail(op, "Q {}: {} leading indices (batch·heads) exceed the cuda grid's limit of 65535", Q.shape(), p.items);
    p.Lq = Q.shape().dim_from_end(2);
    p.Lk = K.shape().dim_from_end(2);
    p.d = static_cast<int>(d);
    p.dv = static_cast<int>(dv);
    p.scale = static_cast<float>(opt.scale);
    p.bias_scale = static_cast<float>(opt.bias_scale);
    if (bias.defined()) {
        p.bias = bias.data();
        const auto s = bias.shape().broadcast_strides();
        for (std::size_t k = 0; k < 4; ++k) p.bias_s[k] = s[k];
    }
    p.causal = opt.causal;
    if (opt.key_padding.defined()) {
        p.key_padding = opt.key_padding.data();
        p.kp_div = Q.rank() == 4 ? p.heads : 1;  // the batch is the scores' first dimension
    }
    if (opt.keep.defined()) {
        p.keep = opt.keep.data();
        const auto s = opt.keep.shape().broadcast_strides();
        for (std::size_t k = 0; k < 4; ++k) p.keep_s[k] = s[k];
    }
    const DropoutDescriptor& drop = opt.dropout;
    p.dropout = drop.training && drop.rate > 0.0;
    if (p.dropout) {
        // The CPU's decision (dropout_factors): keep when the 32 random bits reach the threshold.
        const std::uint64_t threshold = dropout_threshold(drop.rate);
        p.drop_all = threshold > 0xFFFFFFFFu;
        p.threshold = p.drop_all ? 0u : static_cast<std::uint32_t>(threshold);
        p.drop_scale = static_cast<float>(1.0 / (1.0 - drop.rate));
        p.seed = drop.seed;
        p.offset = drop.offset;
    }
    return p;
}

template <class T>
void expect_shape(std::string_view op, const char* name, const DeviceTensor<T>& x, const Shape& want) {
    if (!x.defined()) fail(op, "{} must be a defined device tensor of shape {}", name, want);
    if (x.shape() != want) fail(op, "{} has shape {} (cuda) but must have shape {}", name, x.shape(), want);
}

template <class T>
T* data_or_null(DeviceTensor<T>* x) {
    return x ? x->data() : nullptr;
}

// The keep mask's tile table (FlexAttention's block mask): each (keep_tile × keep_tile) tile of each
// plane of the mask classified empty / partial / full by one kernel, once a call, into `storage` (bytes,
// kept alive until the kernels that read it are queued: the pool is stream-ordered); p points at it. No
// keep mask: nothing.
void classify_keep_tiles(std::string_view op, detail::AttentionProblem& p, const DeviceTensor<bool>& keep, DeviceTensor<bool>& storage) {
    if (!keep.defined() || p.Lq == 0 || p.Lk == 0) return;
    const auto padded = keep.shape().padded();
    const std::int64_t planes_b = padded[0], planes_h = padded[1];
    const std::int64_t qb = (p.Lq + detail::keep_tile - 1) / detail::keep_tile, kb = (p.Lk + detail::keep_tile - 1) / detail::keep_tile;
    storage = DeviceTensor<bool>(Shape{planes_b * planes_h * qb * kb});
    auto* tiles = reinterpret_cast<std::uint8_t*>(storage.data());
    detail::cuda_check(detail::launch_keep_tile_classify(p, planes_b, planes_h, tiles), op, "the keep-tile classification's launch");
    p.keep_tiles = tiles;
    p.keep_tiles_s[0] = planes_b > 1 ? planes_h * qb * kb : 0;
    p.keep_tiles_s[1] = planes_h > 1 ? qb * kb : 0;
    p.keep_tiles_kb = kb;
}

// The problem's scalars in double, for the fp64 kernels (make_problem keeps float copies).
detail::AttentionScales64 scales64(const DeviceAttentionOptions& opt) {
    detail::AttentionScales64 s;
    s.scale = opt.scale;
    s.bias_scale = opt.bias_scale;
    if (opt.dropout.training && opt.dropout.rate > 0.0) s.drop_scale = 1.0 / (1.0 - opt.dropout.rate);
    return s;
}

}  // namespace

template <class T>
DeviceAttentionSaved<T> attention_forward(const DeviceTensor<T>& Q, const DeviceTensor<T>& K, const DeviceTensor<T>& V,
                                          const DeviceTensor<T>& bias, const DeviceAttentionOptions& opt) {
    constexpr std::string_view op = "attention (cuda)";
    detail::AttentionProblem p = make_problem(op, Q, K, V, bias, opt);
    Shape out = Q.shape();
    out[out.rank() - 1] = p.dv;
    DeviceAttentionSaved<T> saved{DeviceTensor<T>(out),
                                  DeviceTensor<device_accum_t<T>>(Shape::from_range(Q.shape().begin(), Q.shape().end() - 1))};
    if (out.numel() == 0) return saved;
    if constexpr (std::is_same_v<T, double>) {
        detail::cuda_check(detail::launch_attention_forward_f64(p, scales64(opt), Q.data(), K.data(), V.data(), saved.O.data(), saved.lse.data()),
                           op, "the fp64 forward kernel's launch");
    } else {
        DeviceTensor<bool> keep_tiles;
        classify_keep_tiles(op, p, opt.keep, keep_tiles);
        detail::cuda_check(detail::launch_attention_forward(detail::dtype_of<T>(), p, Q.data(), K.data(), V.data(), saved.O.data(),
                                                            saved.lse.data()),
                           op, "the forward kernel's launch");
    }
    return saved;
}

template <class T>
void attention_backward(DeviceTensor<T>* dQ, DeviceTensor<T>* dK, DeviceTensor<T>* dV, DeviceTensor<T>* dbias, const DeviceTensor<T>& dO,
                        const DeviceTensor<T>& Q, const DeviceTensor<T>& K, const DeviceTensor<T>& V, const DeviceTensor<T>& bias,
                        const DeviceAttentionSaved<T>& saved, const DeviceAttentionOptions& opt) {
    constexpr std::string_view op = "attention_backward (cuda)";
    detail::AttentionProblem p = make_problem(op, Q, K, V, bias, opt);
    Shape out = Q.shape();
    out[out.rank() - 1] = p.dv;
    expect_shape(op, "dO", dO, out);
    expect_shape(op, "saved.O", saved.O, out);
    expect_shape(op, "saved.lse", saved.lse, Shape::from_range(Q.shape().begin(), Q.shape().end() - 1));
    if (dbias && !bias.defined()) fail(op, "a bias gradient was requested but there is no bias (Q {}, K {})", Q.shape(), K.shape());
    if (dQ) *dQ = DeviceTensor<T>(Q.shape());
    if (dK) *dK = DeviceTensor<T>(K.shape());
    if (dV) *dV = DeviceTensor<T>(V.shape());
    if (dbias) *dbias = DeviceTensor<T>(bias.shape());
    if (Q.numel() == 0 || K.numel() == 0 || V.numel() == 0) {
        // No query or no key: every gradient is zero.
        for (DeviceTensor<T>* g : {dQ, dK, dV, dbias})
            if (g) g->zero();
        return;
    }
    if constexpr (std::is_same_v<T, double>) {
        // fp64: dS always goes through a double scratch (written everywhere, 0 where masked), reduced to the
        // bias's shape (a copy times bias_scale for a full-shape bias) by a fixed-order kernel.
        DeviceTensor<double> D(saved.lse.shape()), dS(Shape{p.items * p.Lq * p.Lk});
        std::int64_t bias_dims[4] = {1, 1, 1, 1};
        if (dbias) {
            const auto padded = bias.shape().padded();
            for (std::size_t k = 0; k < 4; ++k) bias_dims[k] = padded[k];
        }
        detail::cuda_check(detail::launch_attention_backward_f64(p, scales64(opt), Q.data(), K.data(), V.data(), dO.data(), saved.O.data(),
                                                                 saved.lse.data(), D.data(), dS.data(), data_or_null(dQ), data_or_null(dK),
                                                                 data_or_null(dV), data_or_null(dbias), bias_dims),
                           op, "the fp64 backward kernels' launch");
    } else {
        // A full-shape bias gradient is written in place by the dK/dV kernel; a broadcast one is reduced
        // from an fp32 dS buffer (deterministically, no atomics).
        const std::int64_t score_count = p.items * p.Lq * p.Lk;
        const bool full_bias = dbias && bias.shape().numel() == score_count;
        DeviceTensor<float> dS;
        if (dbias && !full_bias) dS = DeviceTensor<float>(Shape{score_count});
        // Tiles the kernels skip under a mask (empty keep tiles included) must read as zero gradient.
        if (opt.causal || opt.key_padding.defined() || opt.keep.defined()) {
            if (full_bias) dbias->zero();
            if (dS.defined()) dS.zero();
        }
        DeviceTensor<float> D(saved.lse.shape());
        DeviceTensor<bool> keep_tiles;
        classify_keep_tiles(op, p, opt.keep, keep_tiles);
        detail::cuda_check(detail::launch_attention_backward(detail::dtype_of<T>(), p, Q.data(), K.data(), V.data(), dO.data(), saved.O.data(),
                                                             saved.lse.data(), D.data(), data_or_null(dQ), data_or_null(dK), data_or_null(dV),
                                                             full_bias ? dbias->data() : nullptr, dS.defined() ? dS.data() : nullptr),
                           op, "the backward kernels' launch");
        if (dS.defined()) {
            const auto padded = bias.shape().padded();
            const std::int64_t scores[4] = {Q.shape().padded()[0], p.heads, p.Lq, p.Lk};
            const std::int64_t bias_dims[4] = {padded[0], padded[1], padded[2], padded[3]};
            detail::cuda_check(detail::launch_bias_gradient_reduce(detail::dtype_of<T>(), dS.data(), scores, bias_dims, p.bias_scale, dbias->data()), op,
                               "the bias gradient reduction's launch");
        }
    }
}

#define AUTODIFF_INSTANTIATE(T)                                                                                                        \
    template DeviceAttentionSaved<T> attention_forward<T>(const DeviceTensor<T>&, const DeviceTensor<T>&, const DeviceTensor<T>&,     \
                                                          const DeviceTensor<T>&, const DeviceAttentionOptions&);                    \
    template void attention_backward<T>(DeviceTensor<T>*, DeviceTensor<T>*, DeviceTensor<T>*, DeviceTensor<T>*, const DeviceTensor<T>&, \
                                        const DeviceTensor<T>&, const DeviceTensor<T>&, const DeviceTensor<T>&, const DeviceTensor<T>&, \
                                        const DeviceAttentionSaved<T>&, const DeviceAttentionOptions&);
AUTODIFF_INSTANTIATE(float)
AUTODIFF_INSTANTIATE(bf16)
AUTODIFF_INSTANTIATE(fp16)
AUTODIFF_INSTANTIATE(double)
#undef AUTODIFF_INSTANTIATE

}  // namespace autodiff

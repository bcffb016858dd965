// The functional (cuDNN-style) API with arbitrary shapes, flags, scales and descriptors:
// strided_batched_gemm and its backward, matmul, softmax, dropout, linear, mse, permute/narrow and the
// fused attention_forward/backward (bias, additive mask, masks, dropout, kept scores).
#include "fuzz.hpp"

using namespace fuzz;

namespace {

using T = float;

ad::Tensor<T> maybe(FuzzedDataProvider& in, bool absent_allowed = true) {
    if (absent_allowed && in.ConsumeIntegralInRange<int>(0, 3) == 0) return {};
    return tensor<T>(in, small_shape(in));
}

ad::Mask mask(FuzzedDataProvider& in) {
    ad::Mask m;
    m.causal = in.ConsumeBool();
    if (in.ConsumeBool()) m.keep = bool_tensor(in, small_shape(in));
    if (in.ConsumeBool()) m.key_padding = bool_tensor(in, small_shape(in, 0, 3));
    return m;
}

// A gradient buffer: absent, or preallocated with some shape (the backward may reshape or reject it).
ad::Tensor<T>* grad(FuzzedDataProvider& in, ad::Tensor<T>& slot) {
    if (in.ConsumeBool()) return nullptr;
    if (in.ConsumeBool()) slot = tensor<T>(in, small_shape(in));
    return &slot;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    FuzzedDataProvider in(data, size);
    const int op = in.ConsumeIntegralInRange<int>(0, 8);
    guarded([&] {
        switch (op) {
        case 0: {  // C = beta·C + alpha·op(op(A)·op(B)), and the backward
            ad::Tensor<T> A = maybe(in, false), B = maybe(in, false), C = maybe(in, false);
            const ad::GemmFlags f{in.ConsumeBool(), in.ConsumeBool(), in.ConsumeBool()};
            const T alpha = value<T>(in), beta = value<T>(in);
            ad::strided_batched_gemm(alpha, A, B, beta, C, f);
            ad::Tensor<T> dA = ad::zeros<T>(A.shape()), dB = ad::zeros<T>(B.shape());
            ad::strided_batched_gemm_backward<T>(in.ConsumeBool() ? &dA : nullptr, in.ConsumeBool() ? &dB : nullptr, C, alpha, A, B,
                                                 beta, f);
            break;
        }
        case 1: {
            ad::Tensor<T> A = maybe(in, false), B = maybe(in, false);
            const bool ta = in.ConsumeBool(), tb = in.ConsumeBool();
            ad::Tensor<T> C = ad::matmul_forward(A, ta, B, tb);
            ad::Tensor<T> dA, dB;
            ad::matmul_backward<T>(grad(in, dA), grad(in, dB), in.ConsumeBool() ? C : maybe(in, false), A, ta, B, tb);
            break;
        }
        case 2: {
            ad::Tensor<T> x = maybe(in, false);
            ad::Tensor<T> y = ad::softmax_forward(x, mask(in), maybe(in));
            (void)ad::softmax_backward(in.ConsumeBool() ? y : maybe(in, false), y);
            break;
        }
        case 3: {
            const ad::DropoutDescriptor d = dropout(in);
            ad::Tensor<T> x = maybe(in, false);
            (void)ad::dropout_forward(d, x);
            (void)ad::dropout_backward(d, x);
            break;
        }
        case 4: {
            ad::Tensor<T> x = maybe(in, false), W = maybe(in, false), b = maybe(in);
            ad::Tensor<T> y = ad::linear_forward(x, W, b);
            ad::Tensor<T> dx, dW, db;
            ad::linear_backward<T>(grad(in, dx), grad(in, dW), grad(in, db), in.ConsumeBool() ? y : maybe(in, false), x, W);
            break;
        }
        case 5: {
            ad::Tensor<T> a = maybe(in, false), b = maybe(in, false);
            (void)ad::mse_loss_forward(a, b);
            ad::Tensor<T> da, db;
            ad::mse_loss_backward<T>(grad(in, da), grad(in, db), value<T>(in), a, b);
            break;
        }
        case 6: {
            ad::Tensor<T> x = maybe(in, false);
            ad::Permutation p{};
            for (int& i : p) i = in.ConsumeIntegralInRange<int>(-1, 4);
            (void)ad::permute_forward(x, p);
            (void)ad::inverse_permutation(p, in.ConsumeIntegralInRange<int>(-1, 5));
            const int dim = in.ConsumeIntegralInRange<int>(-1, 4);
            const auto start = in.ConsumeIntegralInRange<std::int64_t>(-2, 6), length = in.ConsumeIntegralInRange<std::int64_t>(-2, 6);
            ad::Tensor<T> y = ad::narrow_forward(x, dim, start, length);
            (void)ad::narrow_backward(y, x.shape(), dim, start);
            break;
        }
        default: {  // the fused attention kernels
            ad::Tensor<T> Q = maybe(in, false), K = maybe(in, false), V = maybe(in, false), bias = maybe(in), additive = maybe(in);
            ad::AttentionOptions opt;
            opt.scale = value<double>(in);
            opt.bias_scale = value<double>(in);
            opt.mask = mask(in);
            opt.dropout = dropout(in);
            opt.keep_scores = in.ConsumeBool();
            ad::AttentionSaved<T> saved = ad::attention_forward(Q, K, V, bias, additive, opt);
            ad::Tensor<T> dQ, dK, dV, dB;
            const ad::Tensor<T> dO = in.ConsumeBool() ? saved.O : maybe(in, false);
            ad::attention_backward<T>(grad(in, dQ), grad(in, dK), grad(in, dV), grad(in, dB), dO, Q, K, V, bias, additive, saved, opt,
                                      nullptr, nullptr);
            if (in.ConsumeBool())  // a second backward from the same saved values (the kept scores were consumed)
                ad::attention_backward<T>(grad(in, dQ), grad(in, dK), grad(in, dV), grad(in, dB), dO, Q, K, V, bias, additive, saved,
                                          opt, nullptr, nullptr);
            break;
        }
        }
    });
    return 0;
}

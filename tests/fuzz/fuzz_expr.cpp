// Expressions with arbitrary shapes, broadcasts and masks: a chain of steps, each evaluated into a
// Var (elementwise ops, broadcasting binaries, matmul, linear, softmax with every kind of mask,
// dropout, reductions, the fused attention and its modifiers), then backward().
#include "fuzz.hpp"

using namespace fuzz;

namespace {

using T = double;

ad::Mask mask(FuzzedDataProvider& in) {
    ad::Mask m;
    if (in.ConsumeBool()) m = m | ad::causal;
    if (in.ConsumeBool()) m = m | ad::keep_mask(bool_tensor(in, small_shape(in)));
    if (in.ConsumeBool()) m = m | ad::key_padding_mask(bool_tensor(in, small_shape(in, 0, 3)));
    return m;
}

ad::Tensor<T> maybe_tensor(FuzzedDataProvider& in) {
    if (in.ConsumeBool()) return {};
    return tensor<T>(in, small_shape(in));
}

ad::Var<T> step(FuzzedDataProvider& in, const ad::Var<T>& x, const std::vector<ad::Param<T>>& leaves) {
    const ad::Param<T>& o = leaves[in.ConsumeIntegralInRange<std::size_t>(0, leaves.size() - 1)];
    switch (in.ConsumeIntegralInRange<int>(0, 27)) {
    case 0: return ad::exp(x);
    case 1: return ad::log(x);
    case 2: return ad::tanh(x);
    case 3: return ad::sigmoid(x) + ad::relu(x) + ad::gelu(x) + ad::abs(x) - x;
    case 4: return ad::pow(x, value<T>(in));
    case 5: return x * value<T>(in);
    case 6: return x / value<T>(in);
    case 7: return x + value<T>(in);
    case 8: return x + o;
    case 9: return o - x;
    case 10: return x * o;
    case 11: return x / o;
    case 12: return ad::add_bias(x, o);
    case 13: return ad::matmul(x, o);
    case 14: return ad::matmul(ad::transpose(o), x);
    case 15: return ad::linear(x, o);
    case 16: return ad::linear(x, o, leaves[0]);
    case 17: return ad::softmax(x, mask(in), maybe_tensor(in));
    case 18: return ad::dropout(x, dropout(in));
    case 19: return ad::sum(x);
    case 20: return ad::mean(x);
    case 21: return ad::mse(x, o);
    case 22: {  // the fused attention: q = x, k and v from the leaves, a bias, masks, dropout
        const ad::Param<T>& k = leaves[in.ConsumeIntegralInRange<std::size_t>(0, leaves.size() - 1)];
        const T s = value<T>(in);
        if (in.ConsumeBool())
            return ad::matmul(ad::dropout(ad::softmax(ad::matmul(x, ad::transpose(k)) * s + o, mask(in), maybe_tensor(in)), dropout(in)), k);
        return ad::matmul(ad::softmax(ad::matmul(x, ad::transpose(k)) * s, mask(in)), o);
    }
    case 23: {  // modifiers: ALiBi slopes, soft-capping, a window mask
        const ad::Param<T>& k = leaves[in.ConsumeIntegralInRange<std::size_t>(0, leaves.size() - 1)];
        const std::int64_t w = in.ConsumeIntegralInRange<std::int64_t>(-2, 6);
        switch (in.ConsumeIntegralInRange<int>(0, 3)) {
        case 0: return ad::matmul(ad::softmax(ad::matmul(x, ad::transpose(k)) + ad::alibi(o), ad::causal), k);
        case 1: return ad::matmul(ad::softmax(ad::score_mod(ad::matmul(x, ad::transpose(k)), ad::soft_cap(value<T>(in))) + o), k);
        case 2: return ad::matmul(ad::softmax(ad::matmul(x, ad::transpose(k)), ad::causal_window(w)), o);
        default: return ad::softmax(x, ad::sliding_window(w), mask(in));
        }
    }
    case 24: return ad::narrow(x, in.ConsumeIntegralInRange<int>(-1, 4), in.ConsumeIntegralInRange<std::int64_t>(-1, 4), in.ConsumeIntegralInRange<std::int64_t>(-1, 4));
    case 25: return ad::permute(x, {in.ConsumeIntegralInRange<int>(-1, 3), in.ConsumeIntegralInRange<int>(-1, 3), in.ConsumeIntegralInRange<int>(-1, 3)});
    case 26: return ad::reshape(x, small_shape(in));
    default: return x.detach() * o;
    }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    FuzzedDataProvider in(data, size);
    std::vector<ad::Param<T>> leaves;
    for (int i = in.ConsumeIntegralInRange<int>(1, 4); i > 0; --i) leaves.emplace_back(tensor<T>(in, small_shape(in)));
    ad::Var<T> x = leaves[0];
    const bool fused = in.ConsumeBool();
    std::optional<ad::NoFusionGuard> generic;
    if (!fused) generic.emplace();
    for (int i = in.ConsumeIntegralInRange<int>(1, 6); i > 0 && in.remaining_bytes() > 0; --i) {
        guarded([&] {
            ad::Var<T> y = step(in, x, leaves);
            if (y.shape().numel() > max_numel) return;
            x = y;
        });
    }
    guarded([&] {
        if (x.requires_grad()) x.backward(ad::ones<T>(x.shape()), in.ConsumeBool());
    });
    guarded([&] {
        if (x.requires_grad() && x.shape().numel() == 1) x.backward();
    });
    return 0;
}

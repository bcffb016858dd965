// nn::MultiHeadAttention: arbitrary construction options, then forward (self- or cross-attention,
// masks, an attention bias as a Tensor or a Param, train or eval) and backward.
#include "fuzz.hpp"

using namespace fuzz;

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    FuzzedDataProvider in(data, size);
    using T = float;
    ad::nn::MultiHeadAttentionOptions o;
    o.embed_dim = in.ConsumeIntegralInRange<std::int64_t>(-1, 12);
    o.num_heads = in.ConsumeIntegralInRange<std::int64_t>(-1, 5);
    o.dropout = rate(in);
    o.bias = in.ConsumeBool();
    o.kdim = in.ConsumeIntegralInRange<std::int64_t>(-1, 8);
    o.vdim = in.ConsumeIntegralInRange<std::int64_t>(-1, 8);
    o.seed = in.ConsumeIntegral<std::uint64_t>();
    std::optional<ad::nn::MultiHeadAttention<T>> mha;
    guarded([&] { mha.emplace(o); });
    if (!mha) return 0;
    if (in.ConsumeBool()) mha->eval();
    guarded([&] {
        auto shape3 = [&](std::int64_t last) {
            const std::int64_t f = in.ConsumeIntegralInRange<int>(0, 3) == 0 ? in.ConsumeIntegralInRange<std::int64_t>(0, 13) : last;
            return in.ConsumeIntegralInRange<int>(0, 7) == 0 ? small_shape(in)
                                                   : ad::Shape{in.ConsumeIntegralInRange<std::int64_t>(0, 3), in.ConsumeIntegralInRange<std::int64_t>(0, 6), f};
        };
        const std::int64_t E = o.embed_dim, kd = o.kdim ? o.kdim : E, vd = o.vdim ? o.vdim : E;
        ad::Param<T> q(tensor<T>(in, shape3(E)));
        const bool self = in.ConsumeBool();
        ad::Param<T> k = self ? q : ad::Param<T>(tensor<T>(in, shape3(kd)));
        ad::Param<T> v = self ? q : ad::Param<T>(tensor<T>(in, shape3(vd)));
        ad::Var<T> qv = q, kv = k, vv = v;
        ad::Mask m;
        if (in.ConsumeBool()) m = m | ad::causal;
        if (in.ConsumeBool()) m = m | ad::key_padding_mask(bool_tensor(in, small_shape(in, 0, 3)));
        if (in.ConsumeBool()) m = m | ad::keep_mask(bool_tensor(in, small_shape(in)));
        ad::Var<T> y;
        switch (in.ConsumeIntegralInRange<int>(0, 2)) {
        case 0: y = (*mha)(qv, kv, vv, m); break;
        case 1: y = (*mha)(qv, kv, vv, tensor<T>(in, small_shape(in)), m); break;
        default: {
            ad::Param<T> b(tensor<T>(in, small_shape(in)));
            y = (*mha)(qv, kv, vv, b, m);
        }
        }
        ad::Var<T> loss = ad::sum(y * y);
        loss.backward();
    });
    return 0;
}

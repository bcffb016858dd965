// Tensor factories, element access, and reshape/permute/narrow/transpose of tensors and of
// expressions (evaluated, then differentiated), with arbitrary ranks and dimensions.
#include "fuzz.hpp"

using namespace fuzz;

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    FuzzedDataProvider in(data, size);
    ad::Shape s;
    if (!make_shape(dims(in), s)) return 0;
    // Shape-only entry points take any shape, huge ones included: they must not allocate.
    ad::Shape other;
    const bool have_other = make_shape(dims(in), other);
    guarded([&] { (void)s.numel(); });
    guarded([&] { (void)ad::broadcast_shapes("fuzz", s, "a", other, "b"); });
    if (!small(s)) {
        // A shape too large to allocate: reshaping a small tensor to it must be refused.
        guarded([&] { (void)ad::zeros<float>({2, 3}).reshaped(s); });
        guarded([&] { (void)ad::reshape(ad::zeros<float>({2, 3}), s); });
        return 0;
    }
    const int op = in.ConsumeIntegralInRange<int>(0, 9);
    guarded([&] {
        switch (op) {
        case 0: (void)ad::full<float>(s, value<float>(in)); break;
        case 1: (void)ad::randn<double>(s, in.ConsumeIntegral<std::uint64_t>()); break;
        case 2: (void)ad::uniform<float>(s, value<float>(in), value<float>(in), in.ConsumeIntegral<std::uint64_t>()); break;
        case 3: {
            std::vector<double> v(in.ConsumeIntegralInRange<std::size_t>(0, 64), 1.0);
            (void)ad::from_vector<double>(s, v);
            break;
        }
        default: break;
        }
    });
    ad::Tensor<double> t = tensor<double>(in, s);
    guarded([&] { (void)t.item(); });
    guarded([&] {
        const auto i = in.ConsumeIntegralInRange<std::int64_t>(-1, 6), j = in.ConsumeIntegralInRange<std::int64_t>(-1, 6);
        switch (t.rank()) {
        case 0: (void)t.at(); break;
        case 1: (void)t.at(i); break;
        case 2: (void)t.at(i, j); break;
        default: (void)t.at(i, j, i); break;
        }
    });
    (void)ad::to_string(t, in.ConsumeIntegralInRange<int>(0, 8));
    if (have_other) guarded([&] { (void)t.reshaped(other); });

    // The same reshapes as expression nodes, on a Param, evaluated and differentiated.
    ad::Param<double> p(t);
    guarded([&] {
        ad::Var<double> y;
        switch (in.ConsumeIntegralInRange<int>(0, 5)) {
        case 0:
            if (!have_other) return;
            y = ad::reshape(p, other);
            break;
        case 1: {
            const int a = in.ConsumeIntegralInRange<int>(-1, 4), b = in.ConsumeIntegralInRange<int>(-1, 4), c = in.ConsumeIntegralInRange<int>(-1, 4),
                      d = in.ConsumeIntegralInRange<int>(-1, 4);
            switch (in.ConsumeIntegralInRange<int>(0, 4)) {
            case 0: y = ad::permute(p, {}); break;
            case 1: y = ad::permute(p, {a}); break;
            case 2: y = ad::permute(p, {a, b}); break;
            case 3: y = ad::permute(p, {a, b, c}); break;
            default: y = ad::permute(p, {a, b, c, d}); break;
            }
            break;
        }
        case 2:
            y = ad::narrow(p, in.ConsumeIntegralInRange<int>(-2, 5), in.ConsumeIntegralInRange<std::int64_t>(-3, 8),
                           in.ConsumeBool() ? in.ConsumeIntegralInRange<std::int64_t>(-3, 8) : std::int64_t{1} << 62);
            break;
        case 3: y = ad::transpose(p); break;
        case 4: y = ad::split_heads(p, in.ConsumeIntegralInRange<std::int64_t>(-1, 5)); break;
        default: y = ad::merge_heads(p); break;
        }
        y.backward(ad::ones<double>(y.shape()));
    });
    return 0;
}

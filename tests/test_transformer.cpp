// nn::TransformerEncoderLayer: torch.nn.TransformerEncoderLayer's goldens (tools/make_goldens.py, eval
// mode: both norm placements, relu / gelu / gelu-tanh, both layouts, a trainable (B·H, L, L) attention
// bias, a causal mask), gradcheck of every parameter and of the bias in double, dropout (training vs
// eval, a fresh mask per call, 1 vs 2 threads bitwise), and bad input.
//
// Tolerances: as test_goldens.cpp (normwise relative, 1e-10 in double, 1e-4 in float): the layer is a
// chain of O(10) nodes each within a few ulps of torch's.

#include <doctest/doctest.h>

#include <cstring>
#include <set>
#include <string>

#include <autodiff/autodiff.hpp>

#include "check_error.hpp"
#include "golden.hpp"

namespace ad = autodiff;
using test::check_error;

namespace {

using golden::load;
using golden::rtol;

// torch's hyper-parameters and parameter values (by torch's names).
template <class T>
ad::nn::TransformerEncoderLayer<T> layer_from(const golden::Fixture& fx) {
    const std::int64_t E = fx.tensor<T>("linear1.weight").dim(1), FF = fx.tensor<T>("linear1.weight").dim(0);
    const auto activation = static_cast<int>(fx.tensor<T>("activation").item());
    ad::nn::TransformerEncoderLayer<T> layer({.d_model = E,
                                              .nhead = static_cast<std::int64_t>(fx.tensor<T>("num_heads").item()),
                                              .dim_feedforward = FF,
                                              .dropout = 0.0,
                                              .activation = activation == 0   ? ad::nn::Activation::relu
                                                            : activation == 1 ? ad::nn::Activation::gelu
                                                                              : ad::nn::Activation::gelu_tanh,
                                              .batch_first = fx.tensor<T>("batch_first").item() != 0,
                                              .norm_first = fx.tensor<T>("norm_first").item() != 0});
    for (auto& named : layer.named_parameters()) {  // (no structured binding: Clang 14 cannot capture one)
        const std::string& name = named.first;
        ad::Param<T>& p = named.second;
        const ad::Tensor<T> value = fx.tensor<T>(name);
        REQUIRE_MESSAGE(p.shape() == value.shape(), name);
        std::copy(value.data(), value.data() + value.numel(), p.value().data());
    }
    return layer;
}

template <class T>
void check_encoder(const std::string& case_name) {
    const golden::Fixture fx = load<T>(case_name);
    ad::nn::TransformerEncoderLayer<T> layer = layer_from<T>(fx);
    layer.eval();
    ad::Param<T> src(fx.tensor<T>("src"), "src");
    ad::Mask mask;
    if (fx.has("causal_mask")) mask = ad::causal;
    std::optional<ad::Param<T>> bias;
    ad::Var<T> out;
    if (fx.has("attn_bias")) {
        // torch's (B·H, L, L) is our (B, H, L, L)
        const ad::Tensor<T> b = fx.tensor<T>("attn_bias");
        const std::int64_t H = layer.options().nhead;
        bias.emplace(b.reshaped({b.dim(0) / H, H, b.dim(1), b.dim(2)}), "attn_bias");
        out = layer(src, *bias, mask);
    } else {
        out = layer(src, mask);
    }
    golden::check_matches(fx, "out", out.value(), rtol<T>);
    out.backward(fx.tensor<T>("dout"));
    std::set<std::string> compared{"grad.src"};
    golden::check_matches(fx, "grad.src", src.grad(), rtol<T>);
    if (bias) {
        golden::check_matches(fx, "grad.attn_bias", bias->grad().reshaped(fx.tensor<T>("grad.attn_bias").shape()), rtol<T>);
        compared.insert("grad.attn_bias");
    }
    for (auto& [name, p] : layer.named_parameters()) {
        golden::check_matches(fx, "grad." + name, p.grad(), rtol<T>);
        compared.insert("grad." + name);
    }
    for (const std::string& name : fx.names())
        if (name.rfind("grad.", 0) == 0) CHECK_MESSAGE(compared.count(name) == 1, name, " was not compared");
}

}  // namespace

TEST_CASE_TEMPLATE("TransformerEncoderLayer equals torch.nn.TransformerEncoderLayer: output and every gradient", T, float, double) {
    SUBCASE("post-norm, relu, (L, B, E)") { check_encoder<T>("encoder_post_norm_relu"); }
    SUBCASE("pre-norm, gelu, batch_first") { check_encoder<T>("encoder_pre_norm_gelu_batch_first"); }
    SUBCASE("post-norm, gelu tanh, trainable (B*H, L, L) attention bias, batch_first") { check_encoder<T>("encoder_post_norm_gelu_tanh_bias"); }
    SUBCASE("pre-norm, relu, causal mask, (L, B, E)") { check_encoder<T>("encoder_pre_norm_relu_causal"); }
}

TEST_CASE("TransformerEncoderLayer: gradcheck of every parameter, the input and a trainable pair bias (double)") {
    for (bool norm_first : {false, true})
        for (ad::nn::Activation act : {ad::nn::Activation::relu, ad::nn::Activation::gelu}) {
            CAPTURE(norm_first);
            CAPTURE(static_cast<int>(act));
            ad::nn::TransformerEncoderLayer<double> layer(
                {.d_model = 8, .nhead = 2, .dim_feedforward = 12, .dropout = 0.0, .activation = act, .batch_first = true, .norm_first = norm_first, .seed = 3});
            ad::Param<double> x(ad::randn<double>({2, 3, 8}, 1), "x");
            ad::Param<double> pair_bias(ad::randn<double>({2, 3, 3}, 2), "pair_bias");  // (H, L, L), shared by the batch
            std::vector<ad::Param<double>> inputs = layer.parameters();
            inputs.push_back(x);
            inputs.push_back(pair_bias);
            const ad::GradcheckReport r = ad::gradcheck([&] { return ad::Var<double>(ad::sum(ad::tanh(layer(x, pair_bias)))); }, inputs);
            CHECK_MESSAGE(r.passed, r.str());
        }
}

TEST_CASE("TransformerEncoderLayer: dropout in training, none in eval; a new mask per call; 1 and 2 threads bitwise") {
    auto make = [] {
        return ad::nn::TransformerEncoderLayer<float>({.d_model = 16, .nhead = 4, .dim_feedforward = 32, .dropout = 0.3, .batch_first = true, .seed = 5});
    };
    const ad::Tensor<float> x = ad::randn<float>({2, 70, 16}, 1);
    auto run = [&](int threads, bool training) {
        ad::set_num_threads(threads);
        ad::nn::TransformerEncoderLayer<float> layer = make();
        layer.train(training);
        ad::Param<float> src(x, "src");
        ad::Var<float> a = layer(src);
        ad::Var<float> b = layer(src);  // second call: the next dropout offset
        ad::Var<float>(a + b).backward(ad::ones<float>({2, 70, 16}));
        return std::tuple{a.value(), b.value(), src.grad(), layer.linear1().weight().grad()};
    };
    auto same = [](const ad::Tensor<float>& u, const ad::Tensor<float>& v) {
        return u.shape() == v.shape() && std::memcmp(u.data(), v.data(), sizeof(float) * static_cast<std::size_t>(u.numel())) == 0;
    };
    const auto [a1, b1, g1, w1] = run(1, true);
    const auto [a2, b2, g2, w2] = run(2, true);
    ad::set_num_threads(2);
    CHECK(same(a1, a2));
    CHECK(same(b1, b2));
    CHECK(same(g1, g2));
    CHECK(same(w1, w2));
    CHECK_FALSE(same(a1, b1));  // two calls, two masks
    const auto [e1, f1, h1, v1] = run(2, false);
    CHECK(same(e1, f1));  // eval: no dropout, both calls equal
    CHECK_FALSE(same(e1, a1));
}

TEST_CASE("TransformerEncoderLayer: bad options and inputs throw naming the argument and shapes, recording nothing") {
    using ad::nn::TransformerEncoderLayer;
    check_error([] { TransformerEncoderLayer<float>({.d_model = 10, .nhead = 4}); }, "nn::TransformerEncoderLayer",
                {"d_model 10", "not divisible by nhead 4"});
    check_error([] { TransformerEncoderLayer<float>({.d_model = 0, .nhead = 1}); }, "nn::TransformerEncoderLayer",
                {"d_model (0)", ">= 1"});
    check_error([] { TransformerEncoderLayer<float>({.d_model = 8, .nhead = 2, .dropout = 1.0}); }, "nn::TransformerEncoderLayer",
                {"rate must be in [0, 1)"});
    TransformerEncoderLayer<float> layer({.d_model = 8, .nhead = 2, .dim_feedforward = 16, .batch_first = true});
    const ad::Param<float> x(ad::randn<float>({2, 5, 8}, 1), "x");
    check_error([&] { (void)layer(ad::Param<float>(ad::randn<float>({2, 5, 6}, 1), "y")); }, "nn::TransformerEncoderLayer",
                {"src (2,5,6)", "d_model = 8", "layout (B, L, E)"});
    check_error([&] { (void)layer(ad::Param<float>(ad::randn<float>({5, 8}, 1), "y")); }, "nn::TransformerEncoderLayer", {"src", "rank 3", "(5,8)"});
    const std::size_t records = ad::current_tape().size();
    check_error([&] { (void)layer(x, ad::Param<float>(ad::randn<float>({3, 5, 5}, 2), "b")); }, "nn::TransformerEncoderLayer",
                {"attention bias (3,5,5)", "(B, H, L, L) = (2,2,5,5)"});
    CHECK(ad::current_tape().size() == records);
}

// A small stack of biased transformer encoder layers (nn::TransformerEncoderLayer, each with its own
// trainable (H, L, L) pair bias) learns to reverse sequences, trained with AdamW; then every
// parameter is gradchecked in double at the trained values.
//
// Task: each step draws a fresh batch of random sequences X (B, L, E); the target is the sequence
// reversed, Y[b, i] = X[b, L − 1 − i]. No position encoding is given: the pair biases are the only
// place the model can learn where to look (query i must attend key L − 1 − i).
//
//   ./build/examples/train_transformer [steps] [csv path]      (defaults: 400, train_transformer_loss.csv)
#include <cstdlib>
#include <string>
#include <vector>

#include <fmt/core.h>

#include <autodiff/autodiff.hpp>

#include "training.hpp"

namespace ad = autodiff;

namespace {

constexpr std::int64_t batch = 16, L = 16, E = 32, H = 4, FF = 64, layers = 2;

template <class T>
std::pair<ad::Tensor<T>, ad::Tensor<T>> make_batch(std::int64_t b, std::uint64_t seed) {
    ad::Tensor<T> X = ad::randn<T>({b, L, E}, seed);
    ad::Tensor<T> Y({b, L, E});
    for (std::int64_t s = 0; s < b; ++s)
        for (std::int64_t i = 0; i < L; ++i)
            for (std::int64_t e = 0; e < E; ++e) Y(s, i, e) = X(s, L - 1 - i, e);
    return {X, Y};
}

// The encoder stack, its pair biases and a linear read-out.
template <class T>
struct Model {
    std::vector<ad::nn::TransformerEncoderLayer<T>> stack;
    std::vector<ad::Param<T>> biases;
    ad::nn::Linear<T> head{E, E, true, 99, "head"};

    explicit Model(double dropout) {
        for (std::int64_t l = 0; l < layers; ++l) {
            stack.emplace_back(ad::nn::TransformerEncoderLayerOptions{.d_model = E,
                                                                       .nhead = H,
                                                                       .dim_feedforward = FF,
                                                                       .dropout = dropout,
                                                                       .activation = ad::nn::Activation::gelu,
                                                                       .batch_first = true,
                                                                       .norm_first = true,
                                                                       .seed = static_cast<std::uint64_t>(10 * l + 1)});
            biases.emplace_back(ad::zeros<T>({H, L, L}), fmt::format("layers.{}.pair_bias", l));
        }
    }
    ad::Var<T> operator()(const ad::Var<T>& x) {
        ad::Var<T> h = x;
        for (std::size_t l = 0; l < stack.size(); ++l) h = stack[l](h, biases[l]);
        return head(h);
    }
    void train(bool on) {
        for (auto& layer : stack) layer.train(on);
    }
    [[nodiscard]] std::vector<std::pair<std::string, ad::Param<T>>> named_parameters() const {
        std::vector<std::pair<std::string, ad::Param<T>>> p;
        for (std::size_t l = 0; l < stack.size(); ++l) {
            for (auto& [name, param] : stack[l].named_parameters()) p.emplace_back(fmt::format("layers.{}.{}", l, name), param);
            p.emplace_back(biases[l].name(), biases[l]);
        }
        p.emplace_back("head.weight", head.weight());
        p.emplace_back("head.bias", head.bias());
        return p;
    }
    [[nodiscard]] std::vector<ad::Param<T>> parameters() const {
        std::vector<ad::Param<T>> p;
        for (auto& [name, param] : named_parameters()) p.push_back(param);
        return p;
    }
};

}  // namespace

int main(int argc, char** argv) {
    const int steps = argc > 1 ? std::max(1, std::atoi(argv[1])) : 400;
    const std::string csv_path = argc > 2 ? argv[2] : "train_transformer_loss.csv";

    Model<float> model(0.1);
    const std::vector<ad::Param<float>> params = model.parameters();
    ad::nn::Adam<float> adamw(params, {.lr = 1e-2, .weight_decay = 1e-2, .decoupled_weight_decay = true});
    fmt::print("== Training {} pre-norm encoder layers (E={}, heads={}, FF={}, GELU) with trainable pair biases ({}, {}, {})\n", layers,
               E, H, FF, H, L, L);
    fmt::print("   task: reverse sequences of L={}, batch {}, dropout 0.1, AdamW lr 1e-2 wd 1e-2, {} parameters, {} threads\n", L,
               batch, examples::count_parameters(params), ad::num_threads());

    const auto [first, last] = examples::train(params, adamw, steps, 50, csv_path, [&](int step) {
        auto [X, Y] = make_batch<float>(batch, static_cast<std::uint64_t>(step));
        return ad::Var<float>(ad::mse(model(X), Y));
    });

    model.train(false);
    const auto held_out = make_batch<float>(batch, 1'000'000);
    const ad::Tensor<float>& Xe = held_out.first;
    const ad::Tensor<float>& Ye = held_out.second;
    const float eval_loss = [&] {
        ad::NoGradGuard no_grad;
        return ad::Var<float>(ad::mse(model(Xe), Ye)).item();
    }();
    std::int64_t argmax = 0;  // where layer 0's head 0 looks from query 3
    for (std::int64_t j = 1; j < L; ++j)
        if (model.biases[0].value()(0, 3, j) > model.biases[0].value()(0, 3, argmax)) argmax = j;
    fmt::print("loss {:.5f} -> {:.5f} ({:.1f}x lower); held-out loss {:.5f}; loss curve in {}\n", first, last, first / last, eval_loss,
               csv_path);
    fmt::print("the learnt pair bias of layer 0, head 0, query 3 peaks at key {} (reversal reads key {})\n", argmax, L - 1 - 3);

    // Every parameter gradchecked in double at the trained values (no dropout).
    Model<double> model64(0.0);
    model64.train(false);
    examples::copy_parameters(model.parameters(), model64.parameters());
    for (auto& [name, param] : model64.named_parameters()) param.state()->name = name;  // layer-qualified names in the report
    const auto check_batch = make_batch<double>(2, 42);
    const ad::Tensor<double>& X64 = check_batch.first;
    const ad::Tensor<double>& Y64 = check_batch.second;
    fmt::print("== Gradient check of the loss at the trained parameters ({} tensors, double, central differences)\n", model64.parameters().size());
    const ad::GradcheckReport report = ad::gradcheck([&] { return ad::mse(model64(X64), Y64); }, model64.parameters());
    fmt::print("{}", report.str());

    const bool learnt = last < 0.25f * first;
    fmt::print("{}\n", learnt && report.passed ? "OK: the loss fell more than 4x and every gradient checks"
                                               : "FAILED: the loss did not fall 4x or a gradient does not check");
    return learnt && report.passed ? 0 : 1;
}

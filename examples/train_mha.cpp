// The flagship: multi-head self-attention with a trainable (Evoformer-style) attention bias,
// trained with Adam on a synthetic sequence task, then gradchecked.
//
// Task: copy with a delay. Each step draws a fresh batch of random sequences X (B, L, E); the
// target at position i is the input at position i − delay (zero before that). Under a causal mask,
// the model can only solve it by attending exactly `delay` positions back: the bias (H, L, L)
// learns where to look, the projections learn to carry the vector through unchanged.
//
//   ./build/examples/train_mha [steps] [csv path] [--device cpu|cuda]   (defaults: 300, train_mha_loss.csv, cpu)
//
// --device cuda trains on the GPU (nn::DeviceMultiHeadAttention, DeviceAdam: a copy of the same model,
// the same batches and dropout masks), then copies the trained parameters back for the held-out
// evaluation and the gradient check on the CPU. It needs a build with AUTODIFF_CUDA and a CUDA device.
#include <algorithm>
#include <cstdlib>
#include <string>
#include <string_view>
#include <vector>

#include <fmt/core.h>

#include <autodiff/autodiff.hpp>

#include "training.hpp"

#ifdef AUTODIFF_EXAMPLE_CUDA
#include <autodiff/cuda/multihead_attention.hpp>
#include <autodiff/cuda/optim.hpp>
#endif

namespace ad = autodiff;

namespace {

constexpr std::int64_t batch = 16, L = 24, E = 32, H = 4, delay = 3;

// A batch of the task: X (B, L, E) and its target Y with Y[b, i] = X[b, i − delay].
template <class T>
std::pair<ad::Tensor<T>, ad::Tensor<T>> make_batch(std::int64_t b, std::uint64_t seed) {
    ad::Tensor<T> X = ad::randn<T>({b, L, E}, seed);
    ad::Tensor<T> Y = ad::zeros<T>({b, L, E});
    for (std::int64_t s = 0; s < b; ++s)
        for (std::int64_t i = delay; i < L; ++i)
            for (std::int64_t e = 0; e < E; ++e) Y(s, i, e) = X(s, i - delay, e);
    return {X, Y};
}

template <class T>
ad::nn::MultiHeadAttention<T> make_model(double dropout) {
    return ad::nn::MultiHeadAttention<T>({.embed_dim = E, .num_heads = H, .dropout = dropout, .seed = 7});
}

constexpr ad::nn::AdamOptions adam_options{.lr = 1e-2};
constexpr int print_every = 25;

#ifdef AUTODIFF_EXAMPLE_CUDA
// The training loop of examples::train on the GPU: the model and the bias copied to the device, each
// step's batch drawn on the host (the same batches) and copied over, the loss and gradient norm read
// back for the log. The trained values are copied back into `model` and `bias`.
examples::LossRange train_on_gpu(ad::nn::MultiHeadAttention<float>& model, ad::Param<float>& bias, int steps,
                                 const std::string& csv_path) {
    ad::nn::DeviceMultiHeadAttention<float> gpu(model);
    ad::DeviceTensor<float> gbias = ad::to(bias.value(), ad::cuda);
    std::vector<ad::DeviceTensor<float>> params = gpu.parameters();
    params.push_back(gbias);
    ad::DeviceAdam<float> adam(params, adam_options);
    examples::LossLog log(csv_path, steps, print_every);
    for (int step = 1; step <= steps; ++step) {
        const auto [X, Y] = make_batch<float>(batch, static_cast<std::uint64_t>(step));
        const ad::DeviceTensor<float> x = ad::to(X, ad::cuda), y = ad::to(Y, ad::cuda);
        const ad::DeviceTensor<float> out = gpu.forward(x, x, x, gbias, {true, {}, {}});
        const float loss = ad::mse_loss_forward(out, y);
        ad::DeviceTensor<float> dout, dbias;
        ad::mse_loss_backward(&dout, nullptr, 1.f, out, y);
        gpu.backward(dout, &dbias);
        std::vector<ad::DeviceTensor<float>> grads = gpu.gradients();
        grads.push_back(dbias);
        float grad_sq = 0;
        for (const auto& g : grads) grad_sq += ad::sum_forward(ad::unary_forward(ad::DeviceUnaryOp::square, g));
        adam.step(grads);
        log.record(step, loss, std::sqrt(grad_sq));
    }
    gpu.copy_to(model);
    const ad::Tensor<float> trained = ad::to(gbias, ad::cpu);
    std::copy(trained.data(), trained.data() + trained.numel(), bias.value().data());
    return log.range();
}
#endif

}  // namespace

int main(int argc, char** argv) {
    std::vector<std::string_view> positional;
    std::string_view device = "cpu";
    for (int i = 1; i < argc; ++i) {
        const std::string_view arg = argv[i];
        if (arg == "--device" && i + 1 < argc) device = argv[++i];
        else if (arg.starts_with("--device=")) device = arg.substr(9);
        else positional.push_back(arg);
    }
    if (device != "cpu" && device != "cuda") {
        fmt::print(stderr, "train_mha: --device must be cpu or cuda, got '{}'\n", device);
        return 2;
    }
#ifdef AUTODIFF_EXAMPLE_CUDA
    if (device == "cuda" && !ad::cuda_available()) {
        fmt::print(stderr, "train_mha: --device cuda: no usable CUDA device found\n");
        return 2;
    }
#else
    if (device == "cuda") {
        fmt::print(stderr, "train_mha: --device cuda: this build has no GPU part (configure with -DAUTODIFF_CUDA=ON where nvcc is found)\n");
        return 2;
    }
#endif
    const int steps = !positional.empty() ? std::max(1, std::atoi(std::string(positional[0]).c_str())) : 300;
    const std::string csv_path = positional.size() > 1 ? std::string(positional[1]) : "train_mha_loss.csv";

    auto model = make_model<float>(0.1);
    ad::Param<float> bias(ad::zeros<float>({H, L, L}), "attn_bias");
    std::vector<ad::Param<float>> params = model.parameters();
    params.push_back(bias);

    fmt::print("== Training multi-head self-attention (E={}, heads={}, L={}, batch {}) with a trainable bias {}\n", E, H, L,
               batch, bias.shape());
    fmt::print("   task: copy the input {} positions back, causal mask, dropout 0.1, Adam lr 1e-2, {} parameters, {}\n", delay,
               examples::count_parameters(params), device == "cpu" ? fmt::format("{} threads", ad::num_threads()) : "on the GPU");
    examples::LossRange range;
    if (device == "cpu") {
        ad::nn::Adam<float> adam(params, adam_options);
        range = examples::train(params, adam, steps, print_every, csv_path, [&](int step) {
            auto [X, Y] = make_batch<float>(batch, static_cast<std::uint64_t>(step));
            return ad::Var<float>(ad::mse(model(X, X, X, bias, ad::causal), Y));
        });
    }
#ifdef AUTODIFF_EXAMPLE_CUDA
    else {
        fmt::print("   device: {}\n", ad::cuda_device_name());
        range = train_on_gpu(model, bias, steps, csv_path);
    }
#endif
    const auto [first, last] = range;

    // Held-out evaluation without dropout.
    model.eval();
    const auto held_out = make_batch<float>(batch, 1'000'000);
    const ad::Tensor<float>& Xe = held_out.first;
    const ad::Tensor<float>& Ye = held_out.second;
    const float eval_loss = [&] {
        ad::NoGradGuard no_grad;
        return ad::Var<float>(ad::mse(model(Xe, Xe, Xe, bias, ad::causal), Ye)).item();
    }();
    std::int64_t argmax = 0;
    for (std::int64_t j = 1; j < L; ++j)
        if (bias.value()(0, 12, j) > bias.value()(0, 12, argmax)) argmax = j;
    fmt::print("loss {:.5f} -> {:.5f} ({:.1f}x lower); held-out loss {:.5f}; loss curve in {}\n", first, last, first / last,
               eval_loss, csv_path);
    fmt::print("the learnt bias of head 0 for query 12 peaks at key {} (the task needs key {})\n", argmax, 12 - delay);

    // Gradient check of one training step's loss, in double, at the trained parameters.
    auto model64 = make_model<double>(0.0);
    model64.eval();
    ad::Param<double> bias64(ad::zeros<double>({H, L, L}), "attn_bias");
    std::vector<ad::Param<double>> params64 = model64.parameters();
    params64.push_back(bias64);
    examples::copy_parameters(params, params64);
    const auto check_batch = make_batch<double>(2, 42);
    const ad::Tensor<double>& X64 = check_batch.first;
    const ad::Tensor<double>& Y64 = check_batch.second;
    const ad::GradcheckReport report =
        ad::gradcheck([&] { return ad::mse(model64(X64, X64, X64, bias64, ad::causal), Y64); }, params64);
    fmt::print("== Gradient check of the loss at the trained parameters (double, central differences)\n{}", report.str());

    const bool learnt = last < 0.25f * first;
    if (!learnt) fmt::print("the loss did not fall below a quarter of its start\n");
    return report.passed && learnt ? 0 : 1;
}

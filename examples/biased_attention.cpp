// Multi-head attention with a trainable bias, the case of the blog post in the seeds
// ("Attention and its gradient"): O = softmax(QKᵀ/√d + B)·V with B of shape (h, L, L), as the pair
// bias of an Evoformer block. It
//   1. evaluates the post's case (n=2, h=4, l=8, d=16) and prints O and the norms of dQ, dK, dV, dB;
//   2. gradchecks every input in double;
//   3. trains the projections and the bias on a synthetic task for a few hundred SGD steps.
//
//   ./build/examples/biased_attention [steps]
#include <chrono>
#include <cmath>
#include <cstdlib>

#include <fmt/core.h>

#include <autodiff/autodiff.hpp>

namespace ad = autodiff;

namespace {

double norm(const ad::Tensor<double>& t) { return std::sqrt(t.array().square().sum()); }

void blog_case() {
    const std::int64_t n = 2, h = 4, l = 8, d = 16;
    ad::Param<double> Q(ad::randn<double>({n, h, l, d}, 1), "Q"), K(ad::randn<double>({n, h, l, d}, 2), "K"),
        V(ad::randn<double>({n, h, l, d}, 3), "V"), B(ad::randn<double>({n, h, l, l}, 4), "B");
    const ad::Tensor<double> dO = ad::randn<double>({n, h, l, d}, 5);
    auto attention = [&] { return ad::matmul(ad::softmax(ad::matmul(Q, ad::transpose(K)) / std::sqrt(double(d)) + B), V); };

    ad::Var<double> O = attention();
    O.backward(dO);
    fmt::print("== The blog post's case: n={}, h={}, l={}, d={}, bias {}\n", n, h, l, d, B.shape());
    for (std::int64_t c = 0; c < d; ++c) fmt::print("{}{:8.4f}", c ? " " : "O[0,0,0,:] ", O.value()(0, 0, 0, c));
    fmt::print("\n|dQ| = {:.6f}  |dK| = {:.6f}  |dV| = {:.6f}  |dB| = {:.6f}\n", norm(Q.grad()), norm(K.grad()),
               norm(V.grad()), norm(B.grad()));

    const ad::GradcheckReport report = ad::gradcheck(attention, {Q, K, V, B});
    fmt::print("{}", report.str());
    if (!report.passed) std::exit(1);
}

// A two-head attention layer with projections and a trainable (h, L, L) bias learns to reproduce
// the output of a fixed "teacher" layer whose bias is a relative-position pattern.
void train(int steps) {
    const std::int64_t batch = 8, L = 16, E = 32, H = 2;
    const double lr = 3e-2;
    auto init = [](ad::Shape s, std::uint64_t seed, float scale) {
        ad::Tensor<float> t = ad::randn<float>(s, seed);
        t.array() *= scale;
        return t;
    };
    const float w_scale = 1.0f / std::sqrt(static_cast<float>(E));
    ad::Param<float> Wq(init({E, E}, 10, w_scale), "Wq"), Wk(init({E, E}, 11, w_scale), "Wk"),
        Wv(init({E, E}, 12, w_scale), "Wv"), B(ad::zeros<float>({H, L, L}), "B");
    const ad::Tensor<float> X = ad::randn<float>({batch, L, E}, 20);

    // The teacher: other weights and a bias that favours looking two positions back.
    ad::Tensor<float> teacher_bias = ad::zeros<float>({H, L, L});
    for (std::int64_t h = 0; h < H; ++h)
        for (std::int64_t i = 0; i < L; ++i)
            for (std::int64_t j = 0; j < L; ++j) teacher_bias(h, i, j) = (i - j == 2 * (h + 1)) ? 4.0f : -0.25f * std::abs(float(i - j));
    const float scale = 1.0f / std::sqrt(static_cast<float>(E / H));
    auto layer = [&](const auto& wq, const auto& wk, const auto& wv, const auto& bias) {
        auto q = ad::split_heads(ad::linear(X, wq), H);
        auto k = ad::split_heads(ad::linear(X, wk), H);
        auto v = ad::split_heads(ad::linear(X, wv), H);
        return ad::merge_heads(ad::matmul(ad::softmax(ad::matmul(q, ad::transpose(k)) * scale + bias), v));
    };
    ad::Tensor<float> target;
    {
        ad::NoGradGuard no_grad;
        target = ad::Var<float>(layer(init({E, E}, 30, w_scale), init({E, E}, 31, w_scale), init({E, E}, 32, w_scale),
                                      teacher_bias))
                     .value();
    }

    ad::nn::Adam<float> adam({Wq, Wk, Wv, B}, {.lr = lr});
    fmt::print("\n== Training Wq, Wk, Wv and a trainable bias {} for {} Adam steps (lr {})\n", B.shape(), steps, lr);
    const auto start = std::chrono::steady_clock::now();
    float first_loss = 0, loss_value = 0;
    for (int step = 1; step <= steps; ++step) {
        adam.zero_grad();
        ad::Var<float> loss = ad::mse(layer(Wq, Wk, Wv, B), target);
        loss.backward();
        loss_value = loss.item();
        if (step == 1) first_loss = loss_value;
        float grad_sq = 0;
        for (const ad::Param<float>& p : adam.params()) grad_sq += p.grad().array().square().sum();
        adam.step();
        if (step == 1 || step % 50 == 0 || step == steps) {
            const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
            fmt::print("step {:4d}  loss {:.6f}  grad norm {:.4e}  {:.0f} steps/s\n", step, loss_value,
                       std::sqrt(grad_sq), step / secs);
        }
    }
    fmt::print("loss {:.6f} -> {:.6f} ({:.1f}x lower); learnt bias row B[0,8,0:8]:", first_loss, loss_value,
               first_loss / loss_value);
    for (std::int64_t j = 0; j < 8; ++j) fmt::print(" {:6.2f}", B.value()(0, 8, j));
    fmt::print("\n");
    if (!(loss_value < 0.5f * first_loss)) {
        fmt::print("training did not reduce the loss enough\n");
        std::exit(1);
    }
}

}  // namespace

int main(int argc, char** argv) {
    const int steps = argc > 1 ? std::atoi(argv[1]) : 300;
    blog_case();
    train(steps > 0 ? steps : 300);
    return 0;
}

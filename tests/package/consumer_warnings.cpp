// A user's translation unit under strict warnings: -Wall -Wextra -Wpedantic -Wshadow -Wconversion -Werror
// (tests/CMakeLists.txt, test consumer_warnings). Our headers are not system headers for a user who
// embeds the library with add_subdirectory or FetchContent, so the user's warning flags apply to them.
// A warning in a template shows only where it is instantiated: this file instantiates the public API
// (tensors, every expression node, the fused attention spellings, score and mask functions, the tape,
// gradcheck, the modules, the optimisers, the functional kernels and the normalisations) for float and double. It is
// compiled, not run.
#include <cstdint>
#include <string>
#include <vector>

#include <autodiff/autodiff.hpp>

namespace ad = autodiff;

namespace {

template <class T>
T tensors() {
    ad::Tensor<T> a = ad::randn<T>({2, 3, 4, 5}, 1);
    ad::Tensor<T> b = ad::uniform<T>({4, 5}, T(-1), T(1), 2);
    ad::Tensor<T> c = ad::from_vector<T>({2, 2}, {T(1), T(2), T(3), T(4)});
    a(0, 1, 2, 3) = T(0.5);
    a.at(1, 2, 3, 4) += c(1, 1) + b.at(3, 4);
    const ad::Tensor<T> r = a.reshaped({6, 20}).clone();
    const auto m = r.matrix(0);
    std::string s = ad::to_string(r, 4) + fmt::format("{} {}", c, r.shape());
    const std::vector<T> v = c.to_vector();
    return m(0, 0) + v[0] + ad::max_abs_diff(c, c) + ad::full<T>({}, T(s.size() > 0)).item() +
           ad::ones<T>({1}).array().sum() + ad::zeros<T>({2}).array().sum() + ad::empty<T>({0}).array().sum();
}

template <class T>
T expressions() {
    ad::Param<T> x(ad::randn<T>({2, 3, 4}, 3), "x"), y(ad::randn<T>({3, 4}, 4), "y");
    const ad::Const<T> k(ad::full<T>({4}, T(2)));
    ad::Var<T> e = ad::exp(x) + ad::log(ad::abs(y) + T(1)) * ad::tanh(x) - ad::sigmoid(x) / k;
    e = ad::relu(e) + ad::gelu(e) + ad::pow(ad::abs(e) + T(1), T(1.5)) + ad::neg(e) * T(0.5) + T(1) - T(2) / T(3);
    ad::Var<T> l = ad::permute(ad::reshape(e, {2, 3, 2, 2}), {0, 2, 1, 3});
    l = ad::narrow(l, 3, 0, 1);
    ad::Var<T> h = ad::merge_heads(ad::split_heads(ad::reshape(e, {2, 3, 4}), 2));
    ad::Var<T> loss = ad::sum(l) + ad::mean(h) + ad::mse(h, ad::zeros<T>(h.shape()));
    loss.backward();
    ad::zero_grad(x, y);
    {
        ad::NoGradGuard no_grad;
        const ad::Var<T> c = ad::sum(x).eval();
        (void)c;
    }
    return loss.item() + x.grad().array().sum();
}

template <class T>
T attention() {
    const std::int64_t n = 1, heads = 2, L = 5, d = 4;
    ad::Param<T> Q(ad::randn<T>({n, heads, L, d}, 5)), K(ad::randn<T>({n, heads, L, d}, 6)),
        V(ad::randn<T>({n, heads, L, d}, 7)), B(ad::zeros<T>({heads, L, L}));
    const T scale = T(0.5);
    const ad::DropoutDescriptor drop{0.1, 42, 0, true};
    const ad::Tensor<bool> keep = ad::full<bool>({n, L}, true);
    const ad::Mask mask = ad::causal | ad::key_padding_mask(keep);

    // Fused spellings: scaled and biased scores, masks, dropout, an additive mask.
    auto fused = ad::matmul(ad::dropout(ad::softmax(ad::matmul(Q, ad::transpose(K)) * scale + B, mask), drop), V);
    static_assert(ad::is_fused_v<decltype(fused)>);
    ad::Var<T> O1 = fused;
    ad::Var<T> O2 = ad::matmul(ad::softmax(ad::add_bias(ad::matmul(Q * scale, ad::transpose(K)), B), ad::causal), V);
    ad::Var<T> O3 = ad::matmul(ad::softmax(ad::matmul(Q, ad::transpose(K)) / T(2), {}, ad::zeros<T>({L, L})), V);
    // Generic path: a variant outside the fused pattern, and fusion switched off.
    ad::Var<T> O4 = ad::matmul(ad::softmax(ad::tanh(ad::matmul(Q, ad::transpose(K)))), V);
    ad::Var<T> O5 = [&] {
        ad::NoFusionGuard generic;
        return ad::Var<T>(ad::matmul(ad::softmax(ad::matmul(Q, ad::transpose(K)) + B, ad::keep_mask(keep)), V));
    }();
    ad::Var<T> loss = ad::sum(O1) + ad::sum(O2) + ad::sum(O3) + ad::sum(O4) + ad::sum(O5);
    loss.backward();
    return loss.item() + B.grad().array().sum();
}

// Score functions and mask functions written as expressions (expr/modifier.hpp), fused and generic.
template <class T>
T modifiers() {
    const std::int64_t heads = 2, L = 5, d = 4;
    ad::Param<T> Q(ad::randn<T>({1, heads, L, d}, 15)), K(ad::randn<T>({1, heads, L, d}, 16)),
        V(ad::randn<T>({1, heads, L, d}, 17)), gate(ad::zeros<T>({heads})), table(ad::zeros<T>({heads, 5}));
    auto S = [&] { return ad::matmul(Q, ad::transpose(K)); };
    const auto relative = ad::at(table, ad::h_idx, ad::clamp(ad::q_idx - ad::k_idx + 2, 0, 4));
    ad::Var<T> O1 = ad::matmul(ad::softmax(ad::score_mod(S(), ad::soft_cap(5.0))), V);
    ad::Var<T> O2 = ad::matmul(ad::softmax(S() * ad::sigmoid(ad::at(gate, ad::h_idx)), ad::sliding_window(2)), V);
    ad::Var<T> O3 = ad::matmul(ad::softmax(S() + relative, !(ad::q_idx < ad::k_idx)), V);
    ad::Var<T> O4 = [&] {
        ad::NoFusionGuard generic;
        return ad::Var<T>(ad::matmul(ad::softmax(ad::tanh(S() / T(5)) * T(5), ad::sliding_window(1)), V));
    }();
    ad::Var<T> loss = ad::sum(O1) + ad::sum(O2) + ad::sum(O3) + ad::sum(O4);
    loss.backward();
    return loss.item() + gate.grad().array().sum() + table.grad().array().sum();
}

template <class T>
T modules() {
    ad::nn::Linear<T> lin(4, 3);
    ad::nn::MultiHeadAttention<T> mha({.embed_dim = 4, .num_heads = 2, .dropout = 0.1, .seed = 1});
    ad::Param<T> bias(ad::zeros<T>({2, 3, 3}), "attn_bias");
    std::vector<ad::Param<T>> params = mha.parameters();
    params.push_back(bias);
    for (const auto& p : lin.parameters()) params.push_back(p);
    ad::nn::Adam<T> adam(params, {.lr = 1e-2});
    ad::nn::SGD<T> sgd(lin.parameters(), {.lr = 1e-2, .momentum = 0.9});
    const ad::Tensor<T> X = ad::randn<T>({2, 3, 4}, 8);
    adam.zero_grad();
    ad::Var<T> loss = ad::mse(lin(mha(X, X, X, bias, ad::causal)), ad::zeros<T>({2, 3, 3}));
    loss.backward();
    adam.step();
    sgd.step();
    mha.eval();
    return loss.item();
}

template <class T>
T kernels() {
    const ad::Tensor<T> A = ad::randn<T>({2, 3, 4}, 9), B = ad::randn<T>({2, 4, 5}, 10);
    ad::Tensor<T> C = ad::zeros<T>({2, 3, 5});
    ad::strided_batched_gemm<T>(T(1), A, B, T(0), C);
    ad::Tensor<T> dA, dB;
    ad::strided_batched_gemm_backward<T>(&dA, &dB, C, T(1), A, B, T(0));
    const ad::Tensor<T> P = ad::softmax_forward(C, ad::causal);
    const ad::Tensor<T> dS = ad::softmax_backward(P, P);
    const ad::DropoutDescriptor drop{0.25, 3, 1, true};
    const ad::Tensor<T> D = ad::dropout_backward(drop, ad::dropout_forward(drop, C));
    const ad::Tensor<T> W = ad::randn<T>({6, 5}, 11), b = ad::zeros<T>({6});
    const ad::Tensor<T> Y = ad::linear_forward(C, W, b);
    ad::Tensor<T> dX, dW, db;
    ad::linear_backward<T>(&dX, &dW, &db, Y, C, W);
    const ad::Tensor<T> R = ad::reduce_to_shape(C, ad::Shape{3, 5});
    const ad::Tensor<T> M = ad::matmul_forward(A, false, B, false);
    const ad::Tensor<T> Pm = ad::permute_forward(C, ad::Permutation{0, 2, 1});
    ad::Tensor<T> da, dbb;
    ad::mse_loss_backward<T>(&da, &dbb, T(1), C, D);
    return ad::sum_forward(dS) + ad::mse_loss_forward(C, D) + ad::sum_forward(R) + ad::sum_forward(M) +
           ad::sum_forward(Pm) + dX.array().sum() + dW.array().sum() + db.array().sum() + dA.array().sum();
}

// Normalisations and the MLP's activation: nodes (weight and bias given or ad::none), modules, kernels.
template <class T>
T norms() {
    ad::Param<T> x(ad::randn<T>({2, 3, 4}, 15), "x"), w(ad::ones<T>({4}), "w"), b(ad::zeros<T>({4}), "b");
    ad::nn::LayerNorm<T> ln(4);
    ad::nn::RMSNorm<T> rms(ad::Shape{3, 4}, 1e-6, false);
    ad::Var<T> y = ad::layer_norm(x, {4}, w, b) + ad::layer_norm(x, {3, 4}, ad::none, ad::none, 1e-3) +
                   ad::rms_norm(x, {4}, w, 1e-6) + ad::bias_gelu(x, b, ad::GeluApproximate::tanh) +
                   ad::gelu(x, ad::GeluApproximate::tanh) + ln.forward(x) + rms(x);
    ad::Var<T> loss = ad::sum(y);
    loss.backward();
    const ad::NormForward<T> f = ad::layer_norm_forward(x.value(), {4}, w.value(), b.value(), T(1e-5));
    const ad::NormForward<T> g = ad::rms_norm_forward(x.value(), {4}, w.value(), T(1e-5));
    ad::Tensor<T> dx, dw, db;
    ad::layer_norm_backward<T>(&dx, &dw, &db, f.y, x.value(), w.value(), f.mean, f.rstd, {4});
    ad::rms_norm_backward<T>(&dx, &dw, g.y, x.value(), w.value(), g.rstd, {4});
    ad::bias_gelu_backward<T>(&dx, &db, ad::bias_gelu_forward(x.value(), b.value()), x.value(), b.value());
    return loss.item() + dx.array().sum() + dw.array().sum() + db.array().sum();
}

double gradients() {
    ad::Param<double> Q(ad::randn<double>({1, 2, 3, 4}, 12)), K(ad::randn<double>({1, 2, 3, 4}, 13)),
        V(ad::randn<double>({1, 2, 3, 4}, 14));
    const ad::GradcheckReport report =
        ad::gradcheck([&] { return ad::matmul(ad::softmax(ad::matmul(Q, ad::transpose(K))), V); }, {Q, K, V});
    return report.max_rel_error() + static_cast<double>(report.str().size());
}

}  // namespace

// Referenced from outside so that nothing above is discarded unchecked.
double consumer_warnings_all() {
    ad::set_num_threads(1);
    return static_cast<double>(tensors<float>() + expressions<float>() + attention<float>() + modifiers<float>() +
                               modules<float>() + kernels<float>() + norms<float>()) +
           tensors<double>() + expressions<double>() + attention<double>() + modifiers<double>() + modules<double>() +
           kernels<double>() + norms<double>() + gradients() + ad::num_threads();
}

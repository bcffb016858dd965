// Our results against PyTorch's, from the fixtures of tools/make_goldens.py (tests/data, committed;
// golden.hpp documents the format). Every case runs in float64 (torch computed in float64) and in
// float32 (torch computed in float32 from the same inputs rounded to float32).
//
// Mapping torch.nn.MultiheadAttention(E, H, bias=True, batch_first=True) onto nn::MultiHeadAttention:
//   in_proj_weight (3E, E)  -> mha.in_proj_weight(): rows [0, E) project the query, [E, 2E) the key,
//                              [2E, 3E) the value (packed: kdim == vdim == E)
//   q/k/v_proj_weight        -> mha.q_proj_weight(), k_proj_weight(), v_proj_weight() of shapes
//                              (E, E), (E, kdim), (E, vdim) when kdim or vdim != E
//   in_proj_bias (3E)        -> mha.in_proj_bias(), the same three row blocks
//   out_proj.weight/.bias    -> mha.out_proj().weight() / .bias()
// Our Params carry torch's names, so values and gradients are matched by name.
//
// Masks: ours are true = KEEP, torch's boolean masks are true = MASKED OUT. The fixtures store torch's
// masks (1 = masked out) and golden::Fixture::keep_mask() negates them: our key_padding_mask(keep)
// takes keep = ~torch_key_padding_mask. torch's causal attn_mask is triu(ones(Lq, Lk), 1) (key j hidden
// from query i iff j > i); ours is ad::causal (key j visible iff j <= i, top-left aligned): the same.
// torch's float attn_mask of shape (Lq, Lk) or (B·H, Lq, Lk) is our additive bias of shape (Lq, Lk) or
// (B, H, Lq, Lk) (the same memory, index b·H + h).
//
// Tolerances are normwise relative (golden::compare): |ours − torch| <= rtol·max|torch| elementwise.
// Gradients have entries that cancel to near zero, where an elementwise relative error means nothing;
// the tensor's own scale is the meaningful yardstick, and an all-zero torch tensor must match exactly.
//   float64: 1e-10. Both sides do the same O(1)-valued arithmetic in a different order (rounding
//            ~1e-15 per operation, a few hundred operations deep); 1e-10 leaves four orders of margin
//            and still catches any wrong term, which shows as an O(1) error.
//   float32: 1e-4. Both sides round independently (~6e-8 per operation); observed differences are
//            below 1e-6 of the tensor's scale for one forward and backward, ~5e-6 for the gradients
//            after an Adam step (its g/(|g| + eps) magnifies the rounding of small gradients), and a
//            wrong term is still O(1).
// Dropout is 0 everywhere: torch's generator is not ours.
#include <doctest/doctest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include <autodiff/autodiff.hpp>

#include "golden.hpp"

namespace ad = autodiff;

namespace {

using golden::load;
using golden::rtol;

// Copies `value` into the Param's own storage (the module keeps its handle).
template <class T>
void copy_into(ad::Param<T>& p, const ad::Tensor<T>& value) {
    REQUIRE_MESSAGE(p.shape() == value.shape(), p.name(), ": ours ", p.shape().str(), ", torch's ", value.shape().str());
    std::copy(value.data(), value.data() + value.numel(), p.value().data());
}

// Rows [begin, end) of a rank-1 tensor, as a new tensor.
template <class T>
ad::Tensor<T> rows(const ad::Tensor<T>& t, std::int64_t begin, std::int64_t end) {
    ad::Tensor<T> r({end - begin});
    std::copy(t.data() + begin, t.data() + end, r.data());
    return r;
}

// Batch b of a tensor (b, ...) as a tensor (1, ...).
template <class T>
ad::Tensor<T> batch(const ad::Tensor<T>& t, std::int64_t b) {
    ad::Shape s = t.shape();
    const std::int64_t n = t.numel() / s[0];
    s[0] = 1;
    ad::Tensor<T> r(s);
    std::copy(t.data() + b * n, t.data() + (b + 1) * n, r.data());
    return r;
}

// An nn::MultiHeadAttention with torch's hyper-parameters and parameter values.
template <class T>
ad::nn::MultiHeadAttention<T> mha_from(const golden::Fixture& fx) {
    ad::nn::MultiHeadAttentionOptions o;
    o.embed_dim = fx.tensor<T>("out_proj.weight").dim(0);
    o.num_heads = static_cast<std::int64_t>(fx.tensor<T>("num_heads").item());
    if (fx.has("k_proj_weight")) {
        o.kdim = fx.tensor<T>("k_proj_weight").dim(1);
        o.vdim = fx.tensor<T>("v_proj_weight").dim(1);
    }
    ad::nn::MultiHeadAttention<T> mha(o);
    for (ad::Param<T>& p : mha.parameters()) copy_into(p, fx.tensor<T>(p.name()));
    return mha;
}

// torch's stored causal attn_mask must be exactly our causal rule: key j visible to query i iff j <= i.
inline bool is_our_causal_rule(const ad::Tensor<bool>& keep) {
    for (std::int64_t i = 0; i < keep.dim(0); ++i)
        for (std::int64_t j = 0; j < keep.dim(1); ++j)
            if (keep(i, j) != (j <= i)) return false;
    return true;
}

// Our mask for the fixture's torch masks (key padding and/or causal).
ad::Mask mask_from(const golden::Fixture& fx) {
    ad::Mask mask;
    if (fx.has("key_padding_mask")) mask = mask | ad::key_padding_mask(fx.keep_mask("key_padding_mask"));
    if (fx.has("causal_mask")) {
        REQUIRE(is_our_causal_rule(fx.keep_mask("causal_mask")));
        mask = mask | ad::causal;
    }
    return mask;
}

// Checks that every gradient torch stored (grad.*) was compared by the case.
inline void check_all_gradients_compared(const golden::Fixture& fx, const std::set<std::string>& compared) {
    for (const std::string& name : fx.names())
        if (name.rfind("grad.", 0) == 0) CHECK_MESSAGE(compared.count(name) == 1, name, " of ", fx.path(), " was not compared");
}

// One torch.nn.MultiheadAttention call, forward and backward: output, d(inputs), d(attention bias)
// and the gradient of every parameter.
template <class T>
void check_mha(const std::string& case_name) {
    const golden::Fixture fx = load<T>(case_name);
    ad::nn::MultiHeadAttention<T> mha = mha_from<T>(fx);
    const ad::Mask mask = mask_from(fx);
    std::set<std::string> compared;
    auto check_grad = [&](const std::string& name, const ad::Tensor<T>& ours) {
        golden::check_matches(fx, "grad." + name, ours, rtol<T>);
        compared.insert("grad." + name);
    };

    std::optional<ad::Param<T>> bias;
    if (fx.has("attn_bias")) {
        const ad::Tensor<T> b = fx.tensor<T>("attn_bias");
        if (b.rank() == 2) bias.emplace(b, "attn_bias");  // (Lq, Lk): the same for ours
        else {                                           // torch (B·H, Lq, Lk) -> ours (B, H, Lq, Lk)
            const std::int64_t H = mha.options().num_heads;
            bias.emplace(b.reshaped({b.dim(0) / H, H, b.dim(1), b.dim(2)}), "attn_bias");
        }
    }
    auto attend = [&](const ad::Var<T>& q, const ad::Var<T>& k, const ad::Var<T>& v) {
        return bias ? mha(q, k, v, *bias, mask) : mha(q, k, v, mask);
    };

    std::vector<ad::Param<T>> inputs;
    ad::Var<T> out;
    if (fx.has("x")) {  // self-attention: query = key = value = x, so d(x) sums the three paths
        inputs.emplace_back(fx.tensor<T>("x"), "x");
        const ad::Var<T> x = inputs[0];
        out = attend(x, x, x);
    } else {
        for (const char* name : {"query", "key", "value"}) inputs.emplace_back(fx.tensor<T>(name), name);
        out = attend(inputs[0], inputs[1], inputs[2]);
    }
    out.backward(fx.tensor<T>("dout"));

    golden::check_matches(fx, "out", out.value(), rtol<T>);
    for (const ad::Param<T>& p : inputs) check_grad(p.name(), p.grad());
    if (bias) check_grad("attn_bias", bias->grad().reshaped(fx.tensor<T>("attn_bias").shape()));
    for (const ad::Param<T>& p : mha.parameters()) check_grad(p.name(), p.grad());
    check_all_gradients_compared(fx, compared);
}

// O = softmax(Q·Kᵀ/√d + B)·V: O and the gradients of Q, K, V and the bias B.
template <class T>
void check_biased_attention(const std::string& case_name) {
    const golden::Fixture fx = load<T>(case_name);
    ad::Param<T> Q(fx.tensor<T>("Q"), "Q"), K(fx.tensor<T>("K"), "K"), V(fx.tensor<T>("V"), "V"), B(fx.tensor<T>("B"), "B");
    const T scale = T(1) / std::sqrt(static_cast<T>(Q.shape()[3]));
    ad::Var<T> O = ad::matmul(ad::softmax(ad::add_bias(ad::matmul(Q, ad::transpose(K)) * scale, B)), V);
    O.backward(fx.tensor<T>("dout"));

    golden::check_matches(fx, "out", O.value(), rtol<T>);
    std::set<std::string> compared;
    for (const ad::Param<T>* p : {&Q, &K, &V, &B}) {
        golden::check_matches(fx, "grad." + p->name(), p->grad(), rtol<T>);
        compared.insert("grad." + p->name());
    }
    CHECK(B.grad().shape() == B.shape());
    check_all_gradients_compared(fx, compared);
}

// y = softmax(x masked) over the last dimension: y and d(x).
template <class T>
void check_masked_softmax(const std::string& case_name) {
    const golden::Fixture fx = load<T>(case_name);
    ad::Param<T> x(fx.tensor<T>("x"), "x");
    ad::Mask mask = mask_from(fx);
    if (fx.has("mask")) mask = mask | ad::keep_mask(fx.keep_mask("mask"));  // an explicit boolean mask
    const ad::Tensor<T> additive = fx.has("additive") ? fx.tensor<T>("additive") : ad::Tensor<T>();
    ad::Var<T> y = ad::softmax(x, mask, additive);
    y.backward(fx.tensor<T>("dout"));

    golden::check_matches(fx, "out", y.value(), rtol<T>);
    golden::check_matches(fx, "grad.x", x.grad(), rtol<T>);
}

// y = x·Wᵀ + b through nn::Linear with torch's weight and bias: y, d(x), d(W), d(b).
template <class T>
void check_linear(const std::string& case_name) {
    const golden::Fixture fx = load<T>(case_name);
    const ad::Tensor<T> W = fx.tensor<T>("weight");
    ad::nn::Linear<T> linear(W.dim(1), W.dim(0), true);
    copy_into(linear.weight(), W);
    copy_into(linear.bias(), fx.tensor<T>("bias"));
    ad::Param<T> x(fx.tensor<T>("x"), "x");
    ad::Var<T> y = linear(x);
    y.backward(fx.tensor<T>("dout"));

    golden::check_matches(fx, "out", y.value(), rtol<T>);
    golden::check_matches(fx, "grad.x", x.grad(), rtol<T>);
    golden::check_matches(fx, "grad.weight", linear.weight().grad(), rtol<T>);
    golden::check_matches(fx, "grad.bias", linear.bias().grad(), rtol<T>);
}

// The training fixture: torch's optimiser `opt` ("adam" or "sgd") run for this many steps.
constexpr int training_steps = 2;

// Steps 0 and 1 of `opt` on MHA self-attention + MSE loss, all ours: loss, gradients and the
// parameters after each step.
template <class T, class Optimizer, class Options>
void check_training(const std::string& opt, const Options& options) {
    const golden::Fixture fx = load<T>("training_step");
    ad::nn::MultiHeadAttention<T> mha = mha_from<T>(fx);
    Optimizer optimizer(mha.parameters(), options);
    const ad::Var<T> x(fx.tensor<T>("x"));
    const ad::Tensor<T> target = fx.tensor<T>("target");
    const std::int64_t E = mha.options().embed_dim;
    for (int s = 0; s < training_steps; ++s) {
        CAPTURE(s);
        optimizer.zero_grad();
        ad::Var<T> loss = ad::mse(mha(x, x, x), target);
        loss.backward();
        golden::check_matches(fx, fmt::format("{}.loss.{}", opt, s), loss.value(), rtol<T>);
        for (const ad::Param<T>& p : mha.parameters())
            golden::check_matches(fx, fmt::format("{}.grad.{}.{}", opt, s, p.name()), p.grad(), rtol<T>);

        const ad::Tensor<T> key_bias_before = rows(mha.in_proj_bias().value(), E, 2 * E);
        optimizer.step();
        for (const ad::Param<T>& p : mha.parameters()) {
            const std::string name = fmt::format("{}.after.{}.{}", opt, s, p.name());
            if (opt != "adam" || p.name() != "in_proj_bias") {
                golden::check_matches(fx, name, p.value(), rtol<T>);
                continue;
            }
            // The key rows [E, 2E) of in_proj_bias get an exactly zero gradient (adding b_k to every key
            // shifts each row of scores by the constant q·b_k, and softmax is shift invariant), so both
            // sides hold rounding noise there (~1e-17 in float64, ~1e-8 in float32), different noise.
            // Adam's first step divides by √v̂ + eps = |g| + 1e-8 and turns that noise into a step of
            // up to lr with an arbitrary sign: the two results cannot agree there, and that is not a bug.
            // The query and value rows are compared; the key rows must only stay within one Adam step.
            const ad::Tensor<T> torch_after = fx.tensor<T>(name);
            golden::check_close(golden::file_name(fx) + " " + name + " rows [0,E)", rows(p.value(), 0, E), rows(torch_after, 0, E), rtol<T>);
            golden::check_close(golden::file_name(fx) + " " + name + " rows [2E,3E)", rows(p.value(), 2 * E, 3 * E), rows(torch_after, 2 * E, 3 * E), rtol<T>);
            const ad::Tensor<T> key_bias_after = rows(p.value(), E, 2 * E);
            CHECK(ad::max_abs_diff(key_bias_after, key_bias_before) <= 1e-2 * (1 + 1e-6));  // |step| <= lr
        }
    }
}

// The optimiser alone: torch's gradients fed to our optimiser must give torch's updated parameters
// (this isolates the update rule from the gradients, including the noise-amplified rows above).
template <class T, class Optimizer, class Options>
void check_update_rule(const std::string& opt, const Options& options) {
    const golden::Fixture fx = load<T>("training_step");
    ad::nn::MultiHeadAttention<T> mha = mha_from<T>(fx);
    std::vector<ad::Param<T>> params = mha.parameters();
    Optimizer optimizer(params, options);
    for (int s = 0; s < training_steps; ++s) {
        CAPTURE(s);
        for (ad::Param<T>& p : params) p.state()->grad = fx.tensor<T>(fmt::format("{}.grad.{}.{}", opt, s, p.name()));
        optimizer.step();
        for (const ad::Param<T>& p : params)
            golden::check_matches(fx, fmt::format("{}.after.{}.{}", opt, s, p.name()), p.value(), rtol<T>);
    }
}

}  // namespace

TEST_CASE_TEMPLATE("torch MultiheadAttention with packed projections: output and every gradient match", T, double, float) {
    SUBCASE("self-attention") { check_mha<T>("mha_self"); }
    SUBCASE("self-attention with a key padding mask") { check_mha<T>("mha_self_key_padding"); }
    SUBCASE("self-attention with a causal mask") { check_mha<T>("mha_self_causal"); }
    SUBCASE("self-attention with causal and key padding masks") { check_mha<T>("mha_self_causal_key_padding"); }
    SUBCASE("cross-attention, Lq != Lk") { check_mha<T>("mha_cross"); }
    SUBCASE("cross-attention with a key padding mask") { check_mha<T>("mha_cross_key_padding"); }
    SUBCASE("cross-attention with causal (top-left) and key padding masks") { check_mha<T>("mha_cross_causal_key_padding"); }
}

TEST_CASE_TEMPLATE("torch MultiheadAttention with separate projections (kdim, vdim != E): output and every gradient match", T,
                   double, float) {
    SUBCASE("cross-attention") { check_mha<T>("mha_separate_proj"); }
    SUBCASE("cross-attention with a key padding mask") { check_mha<T>("mha_separate_proj_key_padding"); }
}

TEST_CASE_TEMPLATE("torch MultiheadAttention with a trainable float attn_mask: the bias gradient matches too", T, double, float) {
    SUBCASE("bias (Lq, Lk) shared by batch and heads") { check_mha<T>("mha_bias_lq_lk"); }
    SUBCASE("bias (B*H, Lq, Lk) in torch, (B, H, Lq, Lk) in ours") { check_mha<T>("mha_bias_per_batch_head"); }
    SUBCASE("bias (B*H, L, L) with a key padding mask, self-attention") { check_mha<T>("mha_bias_per_batch_head_key_padding"); }
}

TEST_CASE_TEMPLATE("biased attention softmax(Q K^T/sqrt(d) + B) V: O and dQ, dK, dV, dB match for every bias shape", T, double,
                   float) {
    SUBCASE("bias (n, h, Lq, Lk)") { check_biased_attention<T>("attention_bias_n_h_lq_lk"); }
    SUBCASE("bias (h, Lq, Lk), broadcast over the batch") { check_biased_attention<T>("attention_bias_h_lq_lk"); }
    SUBCASE("bias (Lq, Lk), broadcast over batch and heads") { check_biased_attention<T>("attention_bias_lq_lk"); }
    SUBCASE("bias (n, 1, Lq, Lk), broadcast over the heads") { check_biased_attention<T>("attention_bias_n_1_lq_lk"); }
    SUBCASE("bias (1, h, 1, Lk), broadcast over batch and queries") { check_biased_attention<T>("attention_bias_1_h_1_lk"); }
    SUBCASE("bias (Lk), broadcast over everything but the keys") { check_biased_attention<T>("attention_bias_lk"); }
}

TEST_CASE_TEMPLATE("softmax with masks: output and gradient match torch's masked_fill(-inf) softmax", T, double, float) {
    SUBCASE("causal") { check_masked_softmax<T>("softmax_causal"); }
    SUBCASE("key padding") { check_masked_softmax<T>("softmax_key_padding"); }
    SUBCASE("causal and key padding") { check_masked_softmax<T>("softmax_causal_key_padding"); }
    SUBCASE("explicit boolean mask broadcast over the batch") { check_masked_softmax<T>("softmax_boolean"); }
    SUBCASE("additive float mask with -inf entries") { check_masked_softmax<T>("softmax_additive"); }
}

TEST_CASE_TEMPLATE("fully masked rows give output 0 and gradient 0 where torch gives NaN; other rows still match torch", T, double,
                   float) {
    // softmax_key_padding's fixture, with every key of batch 1 masked as well: torch has no finite
    // answer for batch 1, so batch 0 is compared with torch and batch 1 must be exactly zero.
    const golden::Fixture fx = load<T>("softmax_key_padding");
    ad::Param<T> x(fx.tensor<T>("x"), "x");
    ad::Tensor<bool> keep = fx.keep_mask("key_padding_mask");
    for (std::int64_t j = 0; j < keep.dim(1); ++j) keep(1, j) = false;
    ad::Var<T> y = ad::softmax(x, ad::key_padding_mask(keep));
    y.backward(fx.tensor<T>("dout"));

    golden::check_close(golden::file_name(fx) + " out, batch 0 (batch 1 fully masked)", batch(y.value(), 0), batch(fx.tensor<T>("out"), 0), rtol<T>);
    golden::check_close(golden::file_name(fx) + " grad.x, batch 0 (batch 1 fully masked)", batch(x.grad(), 0), batch(fx.tensor<T>("grad.x"), 0), rtol<T>);
    const ad::Tensor<T> y1 = batch(y.value(), 1), dx1 = batch(x.grad(), 1);
    CHECK(y1.array().abs().maxCoeff() == T(0));
    CHECK(dx1.array().abs().maxCoeff() == T(0));
}

TEST_CASE_TEMPLATE("a row of -inf additive logits gives output 0 and gradient 0", T, double, float) {
    ad::Param<T> x(ad::randn<T>({3, 4}, 7), "x");
    ad::Tensor<T> additive = ad::zeros<T>({3, 4});
    for (std::int64_t j = 0; j < 4; ++j) additive(1, j) = -std::numeric_limits<T>::infinity();
    ad::Var<T> y = ad::softmax(x, {}, additive);
    y.backward(ad::randn<T>({3, 4}, 8));
    for (std::int64_t j = 0; j < 4; ++j) {
        CHECK(y.value()(1, j) == T(0));
        CHECK(x.grad()(1, j) == T(0));
    }
    CHECK(std::abs(y.value().matrix().row(0).sum() - T(1)) < T(1e-6));
}

TEST_CASE_TEMPLATE("torch Linear: output and gradients of input, weight and bias match", T, double, float) {
    SUBCASE("input of rank 2") { check_linear<T>("linear_rank2"); }
    SUBCASE("input of rank 3") { check_linear<T>("linear_rank3"); }
}

TEST_CASE_TEMPLATE("training step, MHA self-attention and MSE loss: losses, gradients and updated parameters match torch.optim", T,
                   double, float) {
    ad::nn::AdamOptions adam;
    adam.lr = 1e-2;
    ad::nn::SGDOptions sgd;
    sgd.lr = 1e-2;
    sgd.momentum = 0.9;
    SUBCASE("Adam, lr 1e-2, two steps") { check_training<T, ad::nn::Adam<T>>("adam", adam); }
    SUBCASE("SGD, lr 1e-2, momentum 0.9, two steps") { check_training<T, ad::nn::SGD<T>>("sgd", sgd); }
    SUBCASE("Adam given torch's gradients gives torch's parameters") { check_update_rule<T, ad::nn::Adam<T>>("adam", adam); }
    SUBCASE("SGD given torch's gradients gives torch's parameters") { check_update_rule<T, ad::nn::SGD<T>>("sgd", sgd); }
}

TEST_CASE("golden fixtures fail loudly: a missing file, a missing tensor and a wrong dtype name the file and the script") {
    auto message_of = [](auto&& f) {
        try {
            f();
        } catch (const golden::FixtureError& e) {
            return std::string(e.what());
        }
        return std::string("(no exception)");
    };
    const std::string missing_file = message_of([] { (void)golden::Fixture::load("no_such_case.f64.bin"); });
    CHECK(missing_file.find("no_such_case.f64.bin") != std::string::npos);
    CHECK(missing_file.find("regenerate with: python3 tools/make_goldens.py") != std::string::npos);

    const golden::Fixture fx = golden::Fixture::load("linear_rank2.f64.bin");
    const std::string missing_tensor = message_of([&] { (void)fx.tensor<double>("no_such_tensor"); });
    CHECK(missing_tensor.find("linear_rank2.f64.bin") != std::string::npos);
    CHECK(missing_tensor.find("'no_such_tensor'") != std::string::npos);
    CHECK(missing_tensor.find("regenerate with") != std::string::npos);

    const std::string wrong_dtype = message_of([&] { (void)fx.tensor<float>("weight"); });
    CHECK(wrong_dtype.find("float64") != std::string::npos);

    // A damaged file: wrong magic, wrong version, truncated.
    std::ifstream in(fx.path(), std::ios::binary);
    const std::string good((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    const std::string damaged_path = (std::filesystem::temp_directory_path() / "autodiff_damaged_golden.bin").string();
    auto load_damaged = [&](std::string bytes) {
        std::ofstream(damaged_path, std::ios::binary) << bytes;
        return message_of([&] { (void)golden::Fixture::load_path(damaged_path); });
    };
    std::string bad_magic = good;
    bad_magic[0] = 'X';
    CHECK(load_damaged(bad_magic).find("bad magic") != std::string::npos);
    std::string bad_version = good;
    bad_version[8] = 2;
    CHECK(load_damaged(bad_version).find("format version 2") != std::string::npos);
    const std::string truncated = load_damaged(good.substr(0, good.size() - 1));
    CHECK(truncated.find("truncated") != std::string::npos);
    CHECK(truncated.find(damaged_path) != std::string::npos);
    CHECK(truncated.find("regenerate with") != std::string::npos);
    std::filesystem::remove(damaged_path);
}

TEST_CASE("every fixture file loads, and each case has both a float64 and a float32 file") {
    int files = 0;
    for (const auto& entry : std::filesystem::directory_iterator(AUTODIFF_TEST_DATA_DIR)) {
        const std::string name = entry.path().filename().string();
        if (entry.path().extension() != ".bin") continue;
        ++files;
        CAPTURE(name);
        CHECK_NOTHROW((void)golden::Fixture::load(name));
        const bool f64 = name.size() > 8 && name.compare(name.size() - 8, 8, ".f64.bin") == 0;
        const std::string twin = name.substr(0, name.size() - 8) + (f64 ? ".f32.bin" : ".f64.bin");
        CHECK(std::filesystem::exists(std::filesystem::path(AUTODIFF_TEST_DATA_DIR) / twin));
    }
    CHECK(files > 0);
}

TEST_CASE("the compare helper reports the tensor name, the errors and the first bad index") {
    const ad::Tensor<double> torch = ad::from_vector<double>({2, 3}, {1, 2, 3, 4, 5, 6});
    ad::Tensor<double> ours = torch.clone();
    ours(1, 1) += 1e-3;
    ours(1, 2) += 1e-2;
    const golden::Comparison c = golden::compare("probe", ours, torch, 1e-10);
    CHECK_FALSE(c.passed);
    CHECK(c.first_bad == 4);
    CHECK(c.first_bad_index == "(1,1)");
    CHECK(c.max_abs_error == doctest::Approx(1e-2));
    CHECK(c.max_rel_error == doctest::Approx(1e-2 / 6));
    CHECK(c.str().find("probe") != std::string::npos);
    CHECK(golden::compare("probe", torch, torch, 1e-10).passed);
    ours(0, 0) = std::numeric_limits<double>::quiet_NaN();
    CHECK_FALSE(golden::compare("nan", ours, torch, 1.0).passed);
    CHECK_FALSE(golden::compare("shape", torch.reshaped({3, 2}), torch, 1.0).passed);
}

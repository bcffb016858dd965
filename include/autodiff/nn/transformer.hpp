#pragma once
// nn::TransformerEncoderLayer: torch.nn.TransformerEncoderLayer's semantics, written as expressions
// over the engine, with an optional attention bias (a Param for a trainable pair bias):
//
//   norm_first = false (torch's default, post-norm):
//       x = norm1(x + dropout1(self_attn(x, x, x, bias, mask)))
//       x = norm2(x + dropout2(linear2(dropout(activation(linear1(x))))))
//   norm_first = true (pre-norm):
//       x = x + dropout1(self_attn(n, n, n, bias, mask)),  n = norm1(x)
//       x = x + dropout2(linear2(dropout(activation(linear1(norm2(x))))))
//
// batch_first = false (torch's default) takes and returns (L, B, E); true takes (B, L, E). The
// attention dropout is MultiHeadAttention's (on the probabilities, inside the fused kernel). With the
// GELU activation the MLP's first bias and the GELU are one node (bias_gelu). Parameters are
// initialised as torch's submodules are (MultiHeadAttention, Linear, LayerNorm); their names are
// torch's (self_attn.in_proj_weight, linear1.weight, norm2.bias, ...: named_parameters()), so a
// state dict maps one to one.
//
// Dropout: each of the three dropouts has its own Philox seed (options().seed + 1, + 2, + 3; the
// attention's is options().seed + 4) and the offset counts forward calls, as MultiHeadAttention
// does: two calls never share a mask. eval() turns every dropout off.
#include <string>
#include <utility>
#include <vector>

#include "autodiff/expr/activation.hpp"
#include "autodiff/expr/layout.hpp"
#include "autodiff/expr/softmax.hpp"
#include "autodiff/nn/layer_norm.hpp"
#include "autodiff/nn/linear.hpp"
#include "autodiff/nn/multihead_attention.hpp"

namespace autodiff::nn {

enum class Activation {
    relu,       // torch's default, F.relu
    gelu,       // F.gelu (exact, erf)
    gelu_tanh,  // F.gelu(approximate='tanh')
};

struct TransformerEncoderLayerOptions {
    std::int64_t d_model = 0;
    std::int64_t nhead = 1;
    std::int64_t dim_feedforward = 2048;
    double dropout = 0.1;
    Activation activation = Activation::relu;
    double layer_norm_eps = 1e-5;
    bool batch_first = false;
    bool norm_first = false;
    bool bias = true;  // of the linear layers and the layer norms
    std::uint64_t seed = 0;
};

template <class T>
class TransformerEncoderLayer {
public:
    explicit TransformerEncoderLayer(const TransformerEncoderLayerOptions& o)
        : opt_(check(o)),
          self_attn_({.embed_dim = o.d_model, .num_heads = o.nhead, .dropout = o.dropout, .bias = o.bias, .seed = o.seed + 4}),
          linear1_(o.d_model, o.dim_feedforward, o.bias, o.seed + 10, "linear1"),
          linear2_(o.dim_feedforward, o.d_model, o.bias, o.seed + 20, "linear2"),
          norm1_(o.d_model, o.layer_norm_eps, true, o.bias, "norm1"),
          norm2_(o.d_model, o.layer_norm_eps, true, o.bias, "norm2") {}

    // src (L, B, E), or (B, L, E) with batch_first -> the same shape.
    Var<T> operator()(const Var<T>& src, const Mask& mask = {}) {
        check_inputs(src, nullptr, mask);
        return forward(src, [&](const Var<T>& x) { return self_attn_(x, x, x, mask); });
    }
    // The same with an additive attention bias broadcastable to (B, H, L, L).
    template <ExprLike Bias>
    Var<T> operator()(const Var<T>& src, const Bias& bias, const Mask& mask = {}) {
        static_assert(std::is_same_v<value_type_t<Bias>, T>, "nn::TransformerEncoderLayer: the bias must have the layer's value type");
        const Shape bs = as_expr(bias).shape();
        check_inputs(src, &bs, mask);
        return forward(src, [&](const Var<T>& x) { return self_attn_(x, x, x, bias, mask); });
    }

    void train(bool on = true) {
        training_ = on;
        self_attn_.train(on);
    }
    void eval() { train(false); }
    [[nodiscard]] bool training() const { return training_; }

    [[nodiscard]] std::vector<Param<T>> parameters() const {
        std::vector<Param<T>> p;
        for (auto& [name, param] : named_parameters()) p.push_back(param);
        return p;
    }
    // torch's names, in torch's order (TransformerEncoderLayer.named_parameters()).
    [[nodiscard]] std::vector<std::pair<std::string, Param<T>>> named_parameters() const {
        std::vector<std::pair<std::string, Param<T>>> p;
        // MultiHeadAttention::parameters(): in_proj_weight, [in_proj_bias], out_proj.weight, [out_proj.bias]
        const std::vector<Param<T>> attn = self_attn_.parameters();
        const std::vector<const char*> attn_names =
            opt_.bias ? std::vector<const char*>{"in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"}
                      : std::vector<const char*>{"in_proj_weight", "out_proj.weight"};
        for (std::size_t i = 0; i < attn.size(); ++i) p.emplace_back(std::string("self_attn.") + attn_names.at(i), attn[i]);
        auto linear = [&](const char* name, const Linear<T>& l) {
            p.emplace_back(std::string(name) + ".weight", l.weight());
            if (l.has_bias()) p.emplace_back(std::string(name) + ".bias", l.bias());
        };
        linear("linear1", linear1_);
        linear("linear2", linear2_);
        auto norm = [&](const char* name, const LayerNorm<T>& n) {
            p.emplace_back(std::string(name) + ".weight", n.weight());
            if (n.has_bias()) p.emplace_back(std::string(name) + ".bias", n.bias());
        };
        norm("norm1", norm1_);
        norm("norm2", norm2_);
        return p;
    }

    [[nodiscard]] const TransformerEncoderLayerOptions& options() const { return opt_; }
    [[nodiscard]] MultiHeadAttention<T>& self_attn() { return self_attn_; }
    [[nodiscard]] Linear<T>& linear1() { return linear1_; }
    [[nodiscard]] Linear<T>& linear2() { return linear2_; }
    [[nodiscard]] LayerNorm<T>& norm1() { return norm1_; }
    [[nodiscard]] LayerNorm<T>& norm2() { return norm2_; }

private:
    static const TransformerEncoderLayerOptions& check(const TransformerEncoderLayerOptions& o) {
        const char* op = "nn::TransformerEncoderLayer";
        if (o.d_model < 1 || o.nhead < 1 || o.dim_feedforward < 1)
            fail(op, "d_model ({}), nhead ({}) and dim_feedforward ({}) must be >= 1", o.d_model, o.nhead, o.dim_feedforward);
        if (o.d_model % o.nhead != 0) fail(op, "d_model {} is not divisible by nhead {}", o.d_model, o.nhead);
        check_dropout(op, DropoutDescriptor{o.dropout});
        if (o.activation != Activation::relu && o.activation != Activation::gelu && o.activation != Activation::gelu_tanh)
            fail(op, "activation must be relu, gelu or gelu_tanh, got the value {}", static_cast<int>(o.activation));
        return o;
    }

    [[nodiscard]] DropoutDescriptor drop(std::uint64_t which) const {
        return DropoutDescriptor{opt_.dropout, opt_.seed + which, calls_, training_};
    }

    // linear2(dropout(activation(linear1(x)))), GELU with its bias fused.
    Var<T> feed_forward(const Var<T>& x) const {
        Var<T> h;
        if (opt_.activation == Activation::relu) {
            h = relu(linear1_(x));
        } else {
            const GeluApproximate a = opt_.activation == Activation::gelu ? GeluApproximate::none : GeluApproximate::tanh;
            h = linear1_.has_bias() ? Var<T>(bias_gelu(linear(x, linear1_.weight()), linear1_.bias(), a))
                                    : Var<T>(gelu(linear(x, linear1_.weight()), a));
        }
        return linear2_(dropout(h, drop(1)));
    }

    // Everything the attention would reject, checked before anything is recorded: a bad call leaves the
    // tape (and the dropout offsets) as they were.
    void check_inputs(const Var<T>& src, const Shape* bias, const Mask& mask) const {
        const char* op = "nn::TransformerEncoderLayer";
        check_rank(op, "src", src.shape(), 3, 3);
        if (src.shape()[2] != opt_.d_model)
            fail(op, "src {} must have d_model = {} features (layout {})", src.shape(), opt_.d_model, opt_.batch_first ? "(B, L, E)" : "(L, B, E)");
        const std::int64_t B = src.shape()[opt_.batch_first ? 0 : 1], L = src.shape()[opt_.batch_first ? 1 : 0];
        const Shape scores{B, opt_.nhead, L, L};
        if (bias && !broadcasts_to(*bias, scores))
            fail(op, "attention bias {} does not broadcast to the scores (B, H, L, L) = {}", *bias, scores);
        check_softmax_mask(op, scores, mask, Tensor<T>());
    }

    template <class Attend>
    Var<T> forward(const Var<T>& src, Attend&& attend) {
        Var<T> x = opt_.batch_first ? src : Var<T>(permute(src, {1, 0, 2}));  // (B, L, E)
        if (opt_.norm_first) {
            x = x + dropout(attend(norm1_(x)), drop(2));
            x = x + dropout(feed_forward(norm2_(x)), drop(3));
        } else {
            x = norm1_(x + dropout(attend(x), drop(2)));
            x = norm2_(x + dropout(feed_forward(x), drop(3)));
        }
        ++calls_;
        return opt_.batch_first ? x : Var<T>(permute(x, {1, 0, 2}));
    }

    TransformerEncoderLayerOptions opt_;
    MultiHeadAttention<T> self_attn_;
    Linear<T> linear1_, linear2_;
    LayerNorm<T> norm1_, norm2_;
    bool training_ = true;
    std::uint64_t calls_ = 0;
};

}  // namespace autodiff::nn

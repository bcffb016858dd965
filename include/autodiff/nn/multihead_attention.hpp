#pragma once
// nn::MultiHeadAttention, written as expressions over the engine (the semantics of
// torch.nn.MultiheadAttention with batch_first=True, need_weights=False):
//
//   q = query·W_qᵀ + b_q,  k = key·W_kᵀ + b_k,  v = value·W_vᵀ + b_v     (B, L, E) each
//   per head h (D = E/H):  O_h = dropout(softmax(q_h·k_hᵀ/√D + bias, mask))·v_h
//   out = merge_heads(O)·W_oᵀ + b_o                                        (B, Lq, E)
//
// Projections: packed (torch's in_proj_weight (3E, E) and in_proj_bias (3E), rows [0, E) for q,
// [E, 2E) for k, [2E, 3E) for v) when kdim == vdim == E, else separate q/k/v weights of shapes
// (E, E), (E, kdim), (E, vdim) (torch's q_proj_weight, k_proj_weight, v_proj_weight).
// Initialisation as torch: xavier-uniform in-projections, zero in-projection and output biases,
// output weight uniform in [-1/√E, 1/√E).
//
// Masks use this library's convention, true = keep: torch's key_padding_mask (true = ignore) is
// the negation of our key_padding_mask. The attention bias is any expression broadcastable to
// (B, H, Lq, Lk): a Param for a trainable (Evoformer-style pair) bias, a Tensor or Const otherwise.
// Dropout acts on the attention probabilities in training mode. Its Philox stream is
// (seed = options().seed, offset = number of forward calls so far): the n-th call (from 0) uses
// offset n, so two calls never share a mask, and dropout_descriptor() tells the one the next call
// uses (to reproduce it with the functional API). Every call advances the offset, in eval mode too;
// a call that throws (bad input, std::bad_alloc) does not, and leaves the tape as it was.

#include <array>
#include <cmath>
#include <optional>
#include <vector>

#include "autodiff/expr/elementwise.hpp"
#include "autodiff/expr/heads.hpp"
#include "autodiff/expr/layout.hpp"
#include "autodiff/expr/matmul.hpp"
#include "autodiff/expr/softmax.hpp"
#include "autodiff/nn/linear.hpp"

namespace autodiff::nn {

struct MultiHeadAttentionOptions {
    std::int64_t embed_dim = 0;
    std::int64_t num_heads = 1;
    double dropout = 0.0;        // on the attention probabilities, in training mode
    bool bias = true;            // biases of the input and output projections
    std::int64_t kdim = 0;       // features of key (0: embed_dim)
    std::int64_t vdim = 0;       // features of value (0: embed_dim)
    std::uint64_t seed = 0;      // of the initialisation and of the dropout stream
};

template <class T>
class MultiHeadAttention {
public:
    explicit MultiHeadAttention(const MultiHeadAttentionOptions& o)
        : opt_(o), out_proj_(check(o).embed_dim, o.embed_dim, o.bias, o.seed + 100, "out_proj") {
        const std::int64_t E = o.embed_dim, kd = kdim(), vd = vdim();
        auto xavier = [](std::int64_t rows, std::int64_t cols, std::uint64_t seed) {
            const T bound = std::sqrt(T(6) / static_cast<T>(rows + cols));
            return uniform<T>({rows, cols}, -bound, bound, seed);
        };
        if (packed()) {
            in_proj_weight_.emplace(xavier(3 * E, E, o.seed), "in_proj_weight");
        } else {
            q_proj_weight_.emplace(xavier(E, E, o.seed), "q_proj_weight");
            k_proj_weight_.emplace(xavier(E, kd, o.seed + 1), "k_proj_weight");
            v_proj_weight_.emplace(xavier(E, vd, o.seed + 2), "v_proj_weight");
        }
        if (o.bias) {
            in_proj_bias_.emplace(zeros<T>({3 * E}), "in_proj_bias");
            out_proj_.bias().value().fill(T(0));
        }
    }

    // query (B, Lq, E), key (B, Lk, kdim), value (B, Lk, vdim) -> (B, Lq, E).
    Var<T> operator()(const Var<T>& query, const Var<T>& key, const Var<T>& value, const Mask& mask = {}) {
        return forward(query, key, value, mask, [](auto&& scores) { return scores; });
    }
    // The same with an additive attention bias broadcastable to (B, H, Lq, Lk).
    template <ExprLike Bias>
    Var<T> operator()(const Var<T>& query, const Var<T>& key, const Var<T>& value, const Bias& bias, const Mask& mask = {}) {
        static_assert(std::is_same_v<value_type_t<Bias>, T>, "nn::MultiHeadAttention: the bias must have the module's value type");
        const Shape bs = as_expr(bias).shape();
        const Shape scores{query.shape()[0], opt_.num_heads, query.shape()[1], key.shape()[1]};
        if (!broadcasts_to(bs, scores))
            fail("nn::MultiHeadAttention", "attention bias {} does not broadcast to the scores (B, H, Lq, Lk) = {}", bs, scores);
        return forward(query, key, value, mask, [&](auto&& s) { return add_bias(s, bias); });
    }

    void train(bool on = true) { training_ = on; }
    void eval() { training_ = false; }
    [[nodiscard]] bool training() const { return training_; }
    // The dropout of the next forward call: {options().dropout, options().seed, forward calls so far, training()}.
    [[nodiscard]] DropoutDescriptor dropout_descriptor() const { return DropoutDescriptor{opt_.dropout, opt_.seed, calls_, training_}; }

    [[nodiscard]] std::vector<Param<T>> parameters() const {
        std::vector<Param<T>> p;
        for (const auto* w : {&in_proj_weight_, &q_proj_weight_, &k_proj_weight_, &v_proj_weight_, &in_proj_bias_})
            if (*w) p.push_back(**w);
        for (const auto& q : out_proj_.parameters()) p.push_back(q);
        return p;
    }
    [[nodiscard]] bool packed() const { return kdim() == opt_.embed_dim && vdim() == opt_.embed_dim; }
    [[nodiscard]] const MultiHeadAttentionOptions& options() const { return opt_; }
    // torch's names: in_proj_weight (packed) or q/k/v_proj_weight, in_proj_bias, out_proj.weight/.bias.
    [[nodiscard]] Param<T>& in_proj_weight() { return get(in_proj_weight_, "in_proj_weight"); }
    [[nodiscard]] Param<T>& q_proj_weight() { return get(q_proj_weight_, "q_proj_weight"); }
    [[nodiscard]] Param<T>& k_proj_weight() { return get(k_proj_weight_, "k_proj_weight"); }
    [[nodiscard]] Param<T>& v_proj_weight() { return get(v_proj_weight_, "v_proj_weight"); }
    [[nodiscard]] Param<T>& in_proj_bias() { return get(in_proj_bias_, "in_proj_bias"); }
    [[nodiscard]] Linear<T>& out_proj() { return out_proj_; }

private:
    static const MultiHeadAttentionOptions& check(const MultiHeadAttentionOptions& o) {
        const char* op = "nn::MultiHeadAttention";
        if (o.embed_dim < 1 || o.num_heads < 1) fail(op, "embed_dim ({}) and num_heads ({}) must be >= 1", o.embed_dim, o.num_heads);
        if (o.embed_dim % o.num_heads != 0)
            fail(op, "embed_dim {} is not divisible by num_heads {}", o.embed_dim, o.num_heads);
        if (o.kdim < 0 || o.vdim < 0) fail(op, "kdim ({}) and vdim ({}) must be >= 0", o.kdim, o.vdim);
        check_dropout(op, DropoutDescriptor{o.dropout});
        return o;
    }
    static Param<T>& get(std::optional<Param<T>>& p, const char* name) {
        if (!p) fail("nn::MultiHeadAttention", "this module has no {}", name);
        return *p;
    }
    [[nodiscard]] std::int64_t kdim() const { return opt_.kdim ? opt_.kdim : opt_.embed_dim; }
    [[nodiscard]] std::int64_t vdim() const { return opt_.vdim ? opt_.vdim : opt_.embed_dim; }

    void check_inputs(const Var<T>& q, const Var<T>& k, const Var<T>& v) const {
        const char* op = "nn::MultiHeadAttention";
        check_rank(op, "query", q.shape(), 3, 3);
        check_rank(op, "key", k.shape(), 3, 3);
        check_rank(op, "value", v.shape(), 3, 3);
        if (q.shape()[2] != opt_.embed_dim) fail(op, "query {} must have embed_dim = {} features", q.shape(), opt_.embed_dim);
        if (k.shape()[2] != kdim()) fail(op, "key {} must have kdim = {} features", k.shape(), kdim());
        if (v.shape()[2] != vdim()) fail(op, "value {} must have vdim = {} features", v.shape(), vdim());
        if (k.shape()[0] != q.shape()[0] || v.shape()[0] != q.shape()[0])
            fail(op, "batch sizes differ: query {}, key {}, value {}", q.shape(), k.shape(), v.shape());
        if (k.shape()[1] != v.shape()[1]) fail(op, "key {} and value {} must have the same length", k.shape(), v.shape());
    }

    // The projection of `x` by rows [which·E, (which + 1)·E) of the packed weight (or a separate
    // weight) and bias, written in the head layout (B, H, L, D).
    Var<T> project(const Var<T>& x, std::int64_t which) const {
        const std::int64_t E = opt_.embed_dim, H = opt_.num_heads;
        if (packed()) {
            auto w = narrow(*in_proj_weight_, 0, which * E, E);
            if (in_proj_bias_) return linear_heads<1>(x, w, narrow(*in_proj_bias_, 0, which * E, E), H)[0];
            return linear_heads<1>(x, w, H)[0];
        }
        const Param<T>& w = which == 0 ? *q_proj_weight_ : which == 1 ? *k_proj_weight_ : *v_proj_weight_;
        if (in_proj_bias_) return linear_heads<1>(x, w, narrow(*in_proj_bias_, 0, which * E, E), H)[0];
        return linear_heads<1>(x, w, H)[0];
    }

    template <class AddBias>
    Var<T> forward(const Var<T>& query, const Var<T>& key, const Var<T>& value, const Mask& mask, AddBias&& add_bias_to) {
        check_inputs(query, key, value);
        const std::int64_t E = opt_.embed_dim, H = opt_.num_heads;
        // Before the projections are recorded: a bad mask must leave the tape as it was.
        check_softmax_mask("nn::MultiHeadAttention", Shape{query.shape()[0], H, query.shape()[1], key.shape()[1]}, mask, Tensor<T>());
        // A call is several Vars: if a later one throws (std::bad_alloc), the earlier ones' records are
        // undone too, and the dropout offset advances only when the call succeeds.
        Tape& tape = current_tape();
        const Tape::Checkpoint cp = tape.checkpoint();
        try {
            Var<T> out = attend(query, key, value, mask, std::forward<AddBias>(add_bias_to), E, H);
            ++calls_;
            return out;
        } catch (...) {
            tape.rollback(cp);
            throw;
        }
    }

    template <class AddBias>
    Var<T> attend(const Var<T>& query, const Var<T>& key, const Var<T>& value, const Mask& mask, AddBias&& add_bias_to,
                  std::int64_t E, std::int64_t H) {
        // q, k, v (B, H, L, D) straight from the projections' GEMMs (split_heads in their output pass).
        std::array<Var<T>, 3> qkv;
        const bool self = query.value().shares_storage_with(key.value()) && key.value().shares_storage_with(value.value()) &&
                          query.shape() == key.shape() && key.shape() == value.shape() && packed();
        if (self) {  // one (B, L, 3E) product instead of three
            qkv = in_proj_bias_ ? linear_heads<3>(query, *in_proj_weight_, *in_proj_bias_, H) : linear_heads<3>(query, *in_proj_weight_, H);
        } else {
            qkv = {project(query, 0), project(key, 1), project(value, 2)};
        }
        const auto& [q, k, v] = qkv;
        const T scale = T(1) / std::sqrt(static_cast<T>(E / H));
        const DropoutDescriptor drop = dropout_descriptor();
        auto scores = matmul(q, transpose(k)) * scale;
        Var<T> attended = matmul(dropout(softmax(add_bias_to(scores), mask), drop), v);
        // out_proj(merge_heads(attended)) with the merge in the GEMM's packing.
        if (out_proj_.has_bias()) return heads_linear(attended, out_proj_.weight(), out_proj_.bias());
        return heads_linear(attended, out_proj_.weight());
    }

    MultiHeadAttentionOptions opt_;
    std::optional<Param<T>> in_proj_weight_, q_proj_weight_, k_proj_weight_, v_proj_weight_, in_proj_bias_;
    Linear<T> out_proj_;
    bool training_ = true;
    std::uint64_t calls_ = 0;
};

}  // namespace autodiff::nn

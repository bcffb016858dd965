#pragma once
// Fused attention, flash style (FlashAttention-2's tiling, on the CPU), with a trainable bias:
//
//   S = scale·Q·Kᵀ + bias_scale·bias + additive     (masked entries: −inf)
//   P = softmax(S) over keys; a row whose keys are all masked gives P = 0
//   O = dropout(P)·V
//
// Shapes: Q (..., Lq, d), K (..., Lk, d), V (..., Lk, dv), equal leading dimensions (rank 2..4);
// O (..., Lq, dv). bias and additive: any shape broadcastable to the scores (..., Lq, Lk); the bias
// gradient comes back in the bias's own shape. Masks as in softmax.hpp (true = keep).
//
// No L×L buffer is kept by default: the forward saves O and the per-row log-sum-exp `lse` (..., Lq)
// (−inf for a fully masked row); the backward recomputes P tile by tile from Q, K and the bias.
// With a trainable full-shape bias the bias gradient is an L×L buffer anyway: `keep_scores` lets the
// forward write the masked scores S into that buffer, and the backward reads P = e^(S − lse) from it
// and overwrites it with the bias gradient, skipping the recomputation of Q·Kᵀ + bias (one of the
// backward's five tile products) at no extra peak memory. Both ways give bit-identical results. Dropout decisions are those of the
// dropout kernel on the (..., Lq, Lk) probabilities, element index ((t·Lq + i)·Lk + j): the fused and
// the generic path drop the same entries. When a backward will run, the forward may keep the mask
// as bits for it (attention_stores_dropout_mask, below).
//
// Threads: work items are (leading index, query block) in the forward and leading indices in the
// backward; when a broadcast bias is shared by several leading indices, those indices form one
// group that is processed in a fixed order. No atomics: results are bit-identical for any thread count.

#include "autodiff/kernels/dropout.hpp"
#include "autodiff/kernels/softmax.hpp"
#include "autodiff/tensor.hpp"

#include <cstdint>
#include <vector>

namespace autodiff {

// ---- modifiers ----------------------------------------------------------------------------------
// A modifier changes the scores between the products and the softmax, and/or masks them, from code
// the expression layer generates for a user's expression (expr/modifier.hpp); the kernels call it
// once per tile, so the call is virtual and the loops inside it are the generated ones. With a
// modifier the scores become
//
//   x = scale·Q·Kᵀ (+ bias_scale·bias when the bias is inside the modifier)
//   S = f(x, b, h, q, k) (+ bias_scale·bias when outside) + additive, −∞ where masked
//
// and, with dS = ∂L/∂S:   dx = dS ⊙ ∂f/∂x,   d(captured tensor c) = Σ dS ⊙ ∂f/∂c,
// dbias = bias_scale·reduce(dx if inside, dS if outside), dQ = scale·dx·K, dK = scale·dxᵀ·Q.
// A mask classifies each (query block, key block) tile as empty (skipped by forward and backward),
// full (no per-element test) or partial (tested element by element).

// A tile of the scores: leading index b·heads + h of the padded rank-4 scores (batch, heads, Lq, Lk),
// query rows [i0, i0 + rows), keys [j0, j0 + cols).
struct ScoreTile {
    std::int64_t b, h, i0, rows, j0, cols;
};

enum class TileKind : std::uint8_t { empty, partial, full };

template <class T>
class AttentionModifier {
public:
    AttentionModifier() = default;
    AttentionModifier(const AttentionModifier&) = default;
    AttentionModifier& operator=(const AttentionModifier&) = default;
    virtual ~AttentionModifier() = default;

    // Whether there is a score function f (else S = x) and whether there is a mask.
    [[nodiscard]] virtual bool modifies_scores() const = 0;
    [[nodiscard]] virtual bool masks() const = 0;
    // Whether the bias is added to x before f (else after it).
    [[nodiscard]] virtual bool bias_inside() const = 0;
    // s (rows × cols, leading dimension lds) = f(x) for x (ldx); s may be x.
    virtual void modify(const ScoreTile& tile, const T* x, std::int64_t ldx, T* s, std::int64_t lds) const = 0;
    // The same, and dfdx (ldd) = ∂f/∂x, in one pass (forward mode): what the backward uses when no
    // captured tensor needs a gradient (needs_reverse() false), then dx = dS ⊙ dfdx.
    virtual void modify_with_derivative(const ScoreTile& tile, const T* x, std::int64_t ldx, T* s, std::int64_t lds, T* dfdx,
                                        std::int64_t ldd) const = 0;
    // Whether a captured tensor needs a gradient: the backward then calls modify_backward (reverse mode).
    [[nodiscard]] virtual bool needs_reverse() const = 0;
    // Whether modify_backward reads x (f's derivatives depend on it). When it does not, a forward
    // that keeps the scores for a reverse-mode backward keeps S rather than x, and modify_backward is
    // given S in place of x.
    [[nodiscard]] virtual bool backward_reads_scores() const { return true; }
    // g (rows × cols, ldg) = ∂L/∂f -> ∂L/∂x in place, at the tile's x (ldx); adds Σ g ⊙ ∂f/∂c for each
    // captured tensor c that needs a gradient to grads[i] (in the shape gradient_shapes()[i]).
    virtual void modify_backward(const ScoreTile& tile, const T* x, std::int64_t ldx, T* g, std::int64_t ldg,
                                 T* const* grads) const = 0;
    // Whether f(x) = x·a(b, h, q) with a fixed along a row and needing a gradient (a gate per head):
    // then ∂f/∂x = a and Σ_k g·∂f/∂c = (∂a/∂c)·Σ_k g·x over a row, where Σ_k g·x = q_i·(scale·Σ_k g·K_k)
    // when x = scale·Q·Kᵀ (no bias inside f): the kernels keep S rather than x, scale g by a per row
    // (row_factors) and call row_factor_backward with each row's Σ_k g·x, not modify_backward.
    [[nodiscard]] virtual bool row_scaled() const { return false; }
    // a[r] = a at the rows of the tile (its keys are not read).
    virtual void row_factors(const ScoreTile& /*tile*/, T* /*a*/) const {}
    // Adds r[i]·∂a/∂c at the tile's rows to grads[i] for each captured tensor c (as modify_backward).
    virtual void row_factor_backward(const ScoreTile& /*tile*/, const T* /*r*/, T* const* /*grads*/) const {}
    // Whether ∂f/∂x follows from f's value alone (c·tanh(x/c): c − f²/c; sigmoid, exp, affine steps):
    // then, without captured gradients (needs_reverse() false), the kernels keep S rather than x and
    // the backward gets ∂f/∂x from f = S − (bias outside f) − additive, with no evaluation of f.
    [[nodiscard]] virtual bool derivative_from_value() const { return false; }
    // fd (rows × cols, ld): f -> ∂f/∂x in place; 0 where f is −∞ or NaN (a masked element).
    virtual void derivative_at_value(const ScoreTile& /*tile*/, T* /*fd*/, std::int64_t /*ld*/) const {}
    // The shapes of the captured tensors whose gradients modify_backward adds, in order.
    [[nodiscard]] virtual const std::vector<Shape>& gradient_shapes() const = 0;
    [[nodiscard]] virtual TileKind classify(const ScoreTile& tile) const = 0;
    // s (rows × cols, ld): −∞ where the mask drops an element.
    virtual void apply_mask(const ScoreTile& tile, T* s, std::int64_t ld) const = 0;
};

struct AttentionOptions {
    double scale = 1.0;       // of Q·Kᵀ
    double bias_scale = 1.0;  // of the bias (a bias added before scaling is scaled too)
    Mask mask;
    DropoutDescriptor dropout;
    // The forward also returns the masked scores S (..., Lq, Lk) in AttentionSaved::scores, for the
    // backward to use instead of recomputing them (see above).
    bool keep_scores = false;
    // A backward will run: the forward may store dropout's keep mask as bits in
    // AttentionSaved::keep_bits (attention_stores_dropout_mask) instead of the backward regenerating it.
    bool keep_dropout_mask = false;
    // A backward will run: under a modifier's mask, the forward classifies every tile once for both
    // passes (AttentionSaved::tile_index) and, when the tiles it computes are few (their elements at
    // most 8× Q's), keeps their scores (AttentionSaved::tile_scores) for the backward to use instead
    // of recomputing them: a sliding window's backward then runs no Q·Kᵀ, and memory stays O(L·d).
    bool keep_mask_tiles = false;
};

// Whether attention_forward stores dropout's keep mask (one bit per element of the scores, rows of
// ⌈Lk/64⌉ words) for the backward, which then runs no Philox: when dropout is active,
// keep_dropout_mask is set, and the bits cost little memory: a full L² buffer exists anyway
// (keep_scores: the bits are 1/32 of it in float), or the bits take at most Q's bytes
// (⌈Lk/64⌉·8 ≤ d·sizeof(T): Lk ≤ 2048 at d = 64 in float), so that long sequences without a bias keep
// their O(L·d) memory. Either way the backward applies the same mask (bitwise the same results).
template <class T>
bool attention_stores_dropout_mask(const Shape& q, const Shape& k, const AttentionOptions& opt);

// Validates the shapes (and the bias, additive and mask shapes) and returns O's shape.
Shape attention_output_shape(std::string_view op, const Shape& q, const Shape& k, const Shape& v, const Shape* bias,
                             const Shape* additive, const Mask& mask);

template <class T>
struct AttentionSaved {
    Tensor<T> O;    // (..., Lq, dv)
    Tensor<T> lse;  // (..., Lq): log Σ_j exp(S_ij) over kept keys, −inf for fully masked rows
    // With AttentionOptions::keep_scores: S (..., Lq, Lk), −inf where masked. Only the tiles the
    // forward visits are written (under a causal mask, not those wholly above the diagonal).
    Tensor<T> scores;
    // When attention_stores_dropout_mask: the keep mask, (leading index·Lq + i, ⌈Lk/64⌉) words, bit c
    // of word w of row i set when key 64·w + c is kept. Only the tiles the forward visits are
    // written; in a tile a mask function leaves partial, a row's word holds the keys of its band only
    // (the others are masked). Not consumed by the backward (a second backward, retain_graph, reads it
    // again).
    Tensor<std::uint64_t> keep_bits;
    // With AttentionOptions::keep_mask_tiles and a modifier's mask: (leading index·⌈Lq/64⌉ + query
    // block, ⌈Lk/64⌉), the kind of each 64 × 64 tile (TileKind in bits 0-1; empty for the tiles a causal
    // mask skips) and, when tile_scores is defined, the tile's slot there (bits 2-63).
    Tensor<std::uint64_t> tile_index;
    // (tiles, 64·64): S (or x, as for scores) of every tile the mask does not empty, rows 64 apart;
    // only the parts the forward computes are written (Problem::parts). Not consumed by the backward.
    Tensor<T> tile_scores;
};

// bias and additive may be undefined (absent).
// mod may be null (no modifier). With a score function and keep_scores, saved.scores holds x (before f),
// unless the backward does not need x: then S (reverse mode with derivatives that do not read x, or
// row_scaled(); forward mode with derivative_from_value()).
template <class T>
AttentionSaved<T> attention_forward(const Tensor<T>& Q, const Tensor<T>& K, const Tensor<T>& V, const Tensor<T>& bias,
                                    const Tensor<T>& additive, const AttentionOptions& opt,
                                    const AttentionModifier<T>* mod = nullptr);

// Backward, with D_i = rowsum(dO_i ⊙ O_i) and P = e^(S − lse), S recomputed from Q, K and the bias
// or read from saved.scores:
//   dV = dropout(P)ᵀ·dO
//   dP = dropout_mask ⊙ (dO·Vᵀ)
//   dS = P ⊙ (dP − D)
//   dQ = scale·dS·K,  dK = scale·dSᵀ·Q,  dbias = bias_scale·reduce(dS, bias's shape)
// Gradients are written (not accumulated); pass nullptr for any that is not wanted. When saved.scores
// is defined and a full-shape bias gradient is requested, the gradient is written into the scores'
// buffer, which *dbias then holds and saved.scores releases (a later backward from the same saved
// values recomputes the scores). Otherwise saved is left as it is. With a modifier that has captured
// tensors needing gradients, *mod_grads receives them (one per gradient_shapes() entry), each summed
// over the work items in a fixed order: bit-identical for any thread count.
template <class T>
void attention_backward(NoDeduce<Tensor<T>>* dQ, NoDeduce<Tensor<T>>* dK, NoDeduce<Tensor<T>>* dV,
                        NoDeduce<Tensor<T>>* dbias, const Tensor<T>& dO, const Tensor<T>& Q, const Tensor<T>& K,
                        const Tensor<T>& V, const Tensor<T>& bias, const Tensor<T>& additive,
                        AttentionSaved<T>& saved, const AttentionOptions& opt,
                        const AttentionModifier<T>* mod = nullptr, std::vector<Tensor<T>>* mod_grads = nullptr);

// Whether problems of one tile (at most 64 query rows and 64 keys per leading index, no modifier, too
// little work for threads) take the fused kernels' one-tile path, which gives the general kernels'
// results bit for bit at a fraction of their per-call cost (issue 11's tiny graph). On by default;
// switched off only by the tests that compare the two paths. Process-wide: not for use while other
// threads run attention.
void set_attention_one_tile_path(bool enabled);
[[nodiscard]] bool attention_one_tile_path();

}  // namespace autodiff

#include "autodiff/kernels/attention.hpp"

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "autodiff/kernels/elementwise.hpp"
#include "autodiff/parallel.hpp"
#include "philox_simd.hpp"
#include "profile.hpp"
#include "tile_gemm.hpp"

namespace autodiff {

Shape attention_output_shape(std::string_view op, const Shape& q, const Shape& k, const Shape& v, const Shape* bias,
                             const Shape* additive, const Mask& mask) {
    check_rank(op, "q", q, 2, 4);
    if (k.rank() != q.rank() || v.rank() != q.rank())
        fail(op, "q, k and v must have the same rank, got q {}, k {}, v {}", q, k, v);
    for (int i = 0; i + 2 < q.rank(); ++i)
        if (k[i] != q[i] || v[i] != q[i]) fail(op, "leading dimensions differ: q {}, k {}, v {}", q, k, v);
    if (k.dim_from_end(1) != q.dim_from_end(1)) fail(op, "q {} and k {} must have the same head dimension", q, k);
    if (v.dim_from_end(2) != k.dim_from_end(2)) fail(op, "k {} and v {} must have the same number of keys", k, v);
    Shape scores = q;
    scores[scores.rank() - 1] = k.dim_from_end(2);
    if (bias && !broadcasts_to(*bias, scores)) fail(op, "bias {} does not broadcast to the scores {}", *bias, scores);
    if (additive && !broadcasts_to(*additive, scores))
        fail(op, "additive mask {} does not broadcast to the scores {}", *additive, scores);
    check_softmax_mask(op, scores, mask, Tensor<float>());
    Shape out = q;
    out[out.rank() - 1] = v.dim_from_end(1);
    return out;
}

namespace {

constexpr std::int64_t block_q = 64, block_k = 64;
// A tile the modifier's mask leaves partial is computed in bands of sub_rows query rows, each over the
// keys from its first to its last block of sub_cols keys that is not empty (see Problem::parts).
constexpr std::int64_t sub_rows = 16, sub_cols = 16;
template <class T>
constexpr T neg_inf = -std::numeric_limits<T>::infinity();

template <class T>
using RowMap = Eigen::Map<Eigen::Array<T, 1, Eigen::Dynamic>>;
template <class T>
using ConstRowMap = Eigen::Map<const Eigen::Array<T, 1, Eigen::Dynamic>>;

// A broadcast operand of the scores (..., Lq, Lk): data and strides over the padded rank-4 scores.
template <class U>
struct Broadcast {
    const U* data = nullptr;
    std::array<std::int64_t, max_rank> s{};

    Broadcast() = default;
    explicit Broadcast(const Tensor<U>& t) : data(t.defined() ? t.data() : nullptr) {
        if (t.defined()) s = t.shape().broadcast_strides();
    }
    explicit operator bool() const { return data != nullptr; }
};

#if defined(__AVX512F__)
// dst[c·ldd + r] = src[r·lds + c] for r, c < 16: rows interleaved in pairs, then in fours within
// 128-bit lanes, then the lanes exchanged twice. (The zero-masking forms with every lane selected are
// the plain instructions; GCC 12's unmasked ones warn about an undefined merge source.)
inline void transpose16(const float* src, std::int64_t lds, float* dst, std::int64_t ldd) {
    constexpr __mmask16 all = 0xFFFF;
    __m512 r[16], t[16];
    for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * lds);
    for (int i = 0; i < 16; i += 2) {  // lane L of t[i]: r_i[4L] r_i+1[4L] r_i[4L+1] r_i+1[4L+1]; t[i+1] the upper two
        t[i] = _mm512_maskz_unpacklo_ps(all, r[i], r[i + 1]);
        t[i + 1] = _mm512_maskz_unpackhi_ps(all, r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {  // lane L of r[i + k]: column 4L + k of rows i .. i+3
        r[i] = _mm512_maskz_shuffle_ps(all, t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
        r[i + 1] = _mm512_maskz_shuffle_ps(all, t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
        r[i + 2] = _mm512_maskz_shuffle_ps(all, t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
        r[i + 3] = _mm512_maskz_shuffle_ps(all, t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    for (int k = 0; k < 4; ++k) {
        t[k] = _mm512_maskz_shuffle_f32x4(all, r[k], r[4 + k], 0x88);
        t[4 + k] = _mm512_maskz_shuffle_f32x4(all, r[k], r[4 + k], 0xdd);
        t[8 + k] = _mm512_maskz_shuffle_f32x4(all, r[8 + k], r[12 + k], 0x88);
        t[12 + k] = _mm512_maskz_shuffle_f32x4(all, r[8 + k], r[12 + k], 0xdd);
    }
    for (int k = 0; k < 4; ++k) {  // r[c]: column c
        r[k] = _mm512_maskz_shuffle_f32x4(all, t[k], t[8 + k], 0x88);
        r[8 + k] = _mm512_maskz_shuffle_f32x4(all, t[k], t[8 + k], 0xdd);
        r[4 + k] = _mm512_maskz_shuffle_f32x4(all, t[4 + k], t[12 + k], 0x88);
        r[12 + k] = _mm512_maskz_shuffle_f32x4(all, t[4 + k], t[12 + k], 0xdd);
    }
    for (int c = 0; c < 16; ++c) _mm512_storeu_ps(dst + c * ldd, r[c]);
}
#endif

// Per-thread buffers, kept between calls: tiles, the transposed K and V of one leading index, rows.
// 64-byte aligned: Eigen's vectorised reductions split a row by its alignment, so every thread's
// buffers must be aligned alike for sums to round alike (bit-identical results for any thread count).
template <class T>
using AlignedVector = std::vector<T, Eigen::aligned_allocator<T>>;

template <class T>
struct Scratch {
    AlignedVector<T> S, X, Dfx, dS, acc, Kt, Vt, m, l, m_new, alpha, D, A, Rs, dQr;

    static Scratch& get() {
        thread_local Scratch s;
        return s;
    }
};

template <class T>
void ensure(AlignedVector<T>& v, std::int64_t n) {
    if (static_cast<std::int64_t>(v.size()) < n) v.resize(static_cast<std::size_t>(n));
}

// One attention problem: everything a tile needs.
template <class T>
struct Problem {
    std::int64_t items, P1, Lq, Lk, d, dv;
    const T *q, *k, *v;
    Broadcast<T> bias, additive;
    Broadcast<bool> keep, key_padding;
    bool causal;
    T scale, bias_scale;
    DropoutDescriptor drop;
    detail::DropoutKeepBits drop_bits;  // dropout_keep_bits of drop
    bool dropout;
    T drop_scale;
    // The modifier (attention.hpp), if any: a score function f, a mask, and where the bias goes.
    const AttentionModifier<T>* mod;
    bool score_fn, mask_fn, bias_inside;
    // f = x·a(b, h, q) with a trainable a fixed along a row (a gate) and x = scale·Q·Kᵀ (no bias inside
    // f): the backward takes the gradient of a from Σ_k dS·x = q_i·(scale·Σ_k dS·K_k), the row of dQ
    // before the scaling by a (AttentionModifier::row_scaled), so it needs S, not x.
    bool row_scaled;
    // No captured gradients and ∂f/∂x a function of f's value (soft-capping): the backward takes it from
    // f = S − outside bias − additive, so it needs S, not x, and evaluates no f
    // (AttentionModifier::derivative_from_value).
    bool from_value;
    // Whether keep_scores keeps x (f's derivatives read it) rather than S.
    bool keeps_x;

    Problem(const Tensor<T>& Q, const Tensor<T>& K, const Tensor<T>& V, const Tensor<T>& b, const Tensor<T>& add,
            const AttentionOptions& opt, const AttentionModifier<T>* m)
        : bias(b), additive(add), keep(opt.mask.keep), causal(opt.mask.causal), drop(opt.dropout), drop_bits(opt.dropout), mod(m),
          score_fn(m && m->modifies_scores()), mask_fn(m && m->masks()), bias_inside(!score_fn || m->bias_inside()),
          row_scaled(score_fn && m->needs_reverse() && m->row_scaled() && !(bias_inside && b.defined())),
          from_value(score_fn && !m->needs_reverse() && m->derivative_from_value()),
          keeps_x(score_fn && (m->needs_reverse() ? m->backward_reads_scores() && !row_scaled : !from_value)) {
        const Shape& qs = Q.shape();
        Lq = qs.dim_from_end(2);
        Lk = K.shape().dim_from_end(2);
        d = qs.dim_from_end(1);
        dv = V.shape().dim_from_end(1);
        items = qs.batch_count();
        Shape scores = qs;
        scores[scores.rank() - 1] = Lk;
        P1 = scores.padded()[1];
        q = Q.data();
        k = K.data();
        v = V.data();
        if (opt.mask.key_padding.defined()) {  // (batch, Lk) -> (batch, 1, .., 1, Lk) like the softmax kernel
            Shape s{opt.mask.key_padding.dim(0)};
            for (int i = 1; i + 1 < scores.rank(); ++i) s.push_back(1);
            s.push_back(opt.mask.key_padding.shape().dim_from_end(1));
            key_padding = Broadcast<bool>(scores.rank() >= 3 ? opt.mask.key_padding.reshaped(s) : opt.mask.key_padding);
        }
        scale = static_cast<T>(opt.scale);
        bias_scale = static_cast<T>(opt.bias_scale);
        dropout = drop.training && drop.rate > 0.0;
        drop_scale = static_cast<T>(1.0 / (1.0 - drop.rate));
    }

    // Offset of leading index t in a broadcast operand.
    template <class U>
    [[nodiscard]] std::int64_t lead(const Broadcast<U>& b, std::int64_t t) const {
        return (t / P1) * b.s[0] + (t % P1) * b.s[1];
    }

    // X_tᵀ for the (L × cols) slice of leading index t, stored as one contiguous (cols × block_k)
    // tile per key block: the products read rows of Kᵀ and Vᵀ contiguously, and a tile's rows are
    // 256 bytes apart instead of L·4 (with L a multiple of 1024 those rows would all fall into the
    // same few L1 sets and evict each other).
    // Float with AVX-512: 16 keys × 16 columns at a time, in registers (the per-head transposes were
    // ~4 % of a sliding window's time element by element); the rest element by element.
    static void transpose_blocked(const T* X, std::int64_t L, std::int64_t cols, AlignedVector<T>& Xt) {
        ensure(Xt, (L + block_k - 1) / block_k * block_k * cols);
        std::int64_t j = 0;
#if defined(__AVX512F__)
        if constexpr (std::is_same_v<T, float>) {
            static_assert(block_k % 16 == 0);  // 16 keys never straddle two key blocks
            if (cols % 16 == 0)
                for (; j + 16 <= L; j += 16) {
                    T* tile = Xt.data() + (j / block_k) * cols * block_k + j % block_k;
                    for (std::int64_t c = 0; c < cols; c += 16) transpose16(X + j * cols + c, cols, tile + c * block_k, block_k);
                }
        }
#endif
        for (; j < L; ++j) {
            T* tile = Xt.data() + (j / block_k) * cols * block_k + j % block_k;
            for (std::int64_t c = 0; c < cols; ++c) tile[c * block_k] = X[j * cols + c];
        }
    }
    // Key j0's column in its block's tile of a transpose_blocked layout with `cols` rows (leading
    // dimension block_k).
    static const T* tile_of(const AlignedVector<T>& Xt, std::int64_t j0, std::int64_t cols) {
        return Xt.data() + (j0 / block_k) * cols * block_k + j0 % block_k;
    }

    [[nodiscard]] ScoreTile tile(std::int64_t t, std::int64_t i0, std::int64_t rows, std::int64_t j0, std::int64_t cols) const {
        return {t / P1, t % P1, i0, rows, j0, cols};
    }
    // Empty, full or partial under the modifier's mask (full without one: the other masks are
    // applied element by element in any case).
    [[nodiscard]] TileKind tile_kind(std::int64_t t, std::int64_t i0, std::int64_t rows, std::int64_t j0, std::int64_t cols) const {
        if (!mask_fn) return TileKind::full;
        AUTODIFF_PHASE(mask_classify);
        return mod->classify(tile(t, i0, rows, j0, cols));
    }

    // The parts of a non-empty tile that forward and backward compute: the whole tile, unless the
    // modifier's mask leaves it partial; then each band of sub_rows rows over the keys from its first
    // to its last sub_cols-wide block that the mask does not empty (a band with none is left out).
    // Every element outside the parts is masked, so the boundary tiles of a window cost about the
    // elements they keep rather than the whole tile. A part is full when each of its blocks is.
    struct Part {
        std::int64_t i0, rows, j0, cols;
        TileKind kind;
    };
    struct Parts {
        std::array<Part, block_q / sub_rows> part;
        std::size_t n = 0;
        [[nodiscard]] const Part* begin() const { return part.data(); }
        [[nodiscard]] const Part* end() const { return part.data() + n; }
    };
    [[nodiscard]] Parts parts(std::int64_t t, std::int64_t i0, std::int64_t rows, std::int64_t j0, std::int64_t cols,
                              TileKind kind) const {
        Parts out;
        if (kind != TileKind::partial) {
            out.part[out.n++] = {i0, rows, j0, cols, kind};
            return out;
        }
        AUTODIFF_PHASE(mask_classify);
        for (std::int64_t r0 = 0; r0 < rows; r0 += sub_rows) {
            const std::int64_t band = std::min(sub_rows, rows - r0);
            std::array<TileKind, block_k / sub_cols> kinds{};
            std::int64_t first = -1, last = -1;  // block indices
            for (std::int64_t c = 0; c * sub_cols < cols; ++c) {
                kinds[static_cast<std::size_t>(c)] = mod->classify(tile(t, i0 + r0, band, j0 + c * sub_cols, std::min(sub_cols, cols - c * sub_cols)));
                if (kinds[static_cast<std::size_t>(c)] == TileKind::empty) continue;
                if (first < 0) first = c;
                last = c;
            }
            if (first < 0) continue;
            const bool full = std::all_of(kinds.begin() + first, kinds.begin() + last + 1, [](TileKind k) { return k == TileKind::full; });
            const std::int64_t c0 = first * sub_cols, c1 = std::min(cols, (last + 1) * sub_cols);
            out.part[out.n++] = {i0 + r0, band, j0 + c0, c1 - c0, full ? TileKind::full : TileKind::partial};
        }
        return out;
    }

    // S (rows × cols, leading dimension block_k) += factor·b over the tile.
    void add_operand(const Broadcast<T>& b, T factor, std::int64_t t, std::int64_t i0, std::int64_t rows, std::int64_t j0,
                     std::int64_t cols, T* S) const {
        if (!b) return;
        for (std::int64_t r = 0; r < rows; ++r) {
            const T* src = b.data + lead(b, t) + (i0 + r) * b.s[2] + j0 * b.s[3];
            T* dst = S + r * block_k;
            if (b.s[3]) RowMap<T>(dst, cols) += factor * ConstRowMap<T>(src, cols);
            else RowMap<T>(dst, cols) += factor * src[0];
        }
    }

    // X (rows × cols, leading dimension block_k) = x = scale·Q_i·K_jᵀ (+ bias_scale·bias when the bias
    // goes inside the score function, or there is none) for query rows [i0, i0+rows) and keys
    // [j0, j0+cols) of leading index t. Kt is the key block's tile of Kᵀ (d × block_k).
    void raw_scores(std::int64_t t, std::int64_t i0, std::int64_t rows, std::int64_t j0, std::int64_t cols, const T* Kt, T* X) const {
        {
            AUTODIFF_PHASE(qk_product);
            detail::tile_gemm<T>(rows, cols, d, scale, q + (t * Lq + i0) * d, d, 1, Kt, block_k, T(0), X, block_k);
        }
        AUTODIFF_PHASE(bias_and_masks);
        if (bias_inside) add_operand(bias, bias_scale, t, i0, rows, j0, cols, X);
    }

    // S = scale·Q_i·K_jᵀ + bias_scale·bias + additive (through the score function, if any); −inf where masked.
    void scores(std::int64_t t, std::int64_t i0, std::int64_t rows, std::int64_t j0, std::int64_t cols, const T* Kt, T* S,
                TileKind kind) const {
        raw_scores(t, i0, rows, j0, cols, Kt, S);
        finish_scores(t, i0, rows, j0, cols, S, kind);
    }

    // S holds x (raw_scores) -> S = f(x) (+ bias_scale·bias when outside) + additive, −inf where masked.
    void finish_scores(std::int64_t t, std::int64_t i0, std::int64_t rows, std::int64_t j0, std::int64_t cols, T* S, TileKind kind) const {
        if (score_fn) {
            AUTODIFF_PHASE(score_fn);
            mod->modify(tile(t, i0, rows, j0, cols), S, block_k, S, block_k);
        }
        outer_terms(t, i0, rows, j0, cols, S, kind);
    }

    // S holds f(x) -> S (+ bias_scale·bias when outside f) + additive, −inf where masked.
    void outer_terms(std::int64_t t, std::int64_t i0, std::int64_t rows, std::int64_t j0, std::int64_t cols, T* S, TileKind kind) const {
        AUTODIFF_PHASE(bias_and_masks);
        if (!bias_inside) add_operand(bias, bias_scale, t, i0, rows, j0, cols, S);
        add_operand(additive, T(1), t, i0, rows, j0, cols, S);
        if (kind == TileKind::partial) mod->apply_mask(tile(t, i0, rows, j0, cols), S, block_k);
        auto apply_keep = [&](const Broadcast<bool>& b) {
            if (!b) return;
            for (std::int64_t r = 0; r < rows; ++r) {
                const bool* src = b.data + lead(b, t) + (i0 + r) * b.s[2] + j0 * b.s[3];
                T* dst = S + r * block_k;
                for (std::int64_t c = 0; c < cols; ++c)
                    if (!src[c * b.s[3]]) dst[c] = neg_inf<T>;
            }
        };
        apply_keep(keep);
        apply_keep(key_padding);
        if (causal)
            for (std::int64_t r = 0; r < rows; ++r)
                for (std::int64_t c = std::max<std::int64_t>(0, i0 + r + 1 - j0); c < cols; ++c) S[r * block_k + c] = neg_inf<T>;
    }

    // fd (rows × cols, leading dimension block_k) = f = S (lds) − bias_scale·bias (when outside f) − additive.
    // A bias outside f that varies along the keys is subtracted in the pass that reads S (one pass over
    // the two L² streams that the backward of derivative_from_value reads, instead of a copy and an add).
    void value_of_f(std::int64_t t, std::int64_t i0, std::int64_t rows, std::int64_t j0, std::int64_t cols, const T* S, std::int64_t lds,
                    T* fd) const {
        const bool fused = !bias_inside && bias && bias.s[3] == 1;
        for (std::int64_t r = 0; r < rows; ++r) {
            RowMap<T> dst(fd + r * block_k, cols);
            const ConstRowMap<T> src(S + r * lds, cols);
            if (fused) dst = src - bias_scale * ConstRowMap<T>(bias.data + lead(bias, t) + (i0 + r) * bias.s[2] + j0, cols);
            else dst = src;
        }
        if (!bias_inside && !fused) add_operand(bias, -bias_scale, t, i0, rows, j0, cols, fd);
        add_operand(additive, T(-1), t, i0, rows, j0, cols, fd);
    }

    // Prefetches the tile of a bias or additive operand that scores() will read next.
    template <detail::PrefetchTo To = detail::PrefetchTo::l1>
    void prefetch_tile(std::int64_t t, std::int64_t i0, std::int64_t rows, std::int64_t j0, std::int64_t cols) const {
        for (const Broadcast<T>* b : {&bias, &additive})
            if (*b && b->s[3] == 1) detail::prefetch_rows<To>(b->data + lead(*b, t) + i0 * b->s[2] + j0, b->s[2] ? rows : 1, cols, b->s[2]);
    }

    // keep[r] = the keep bits of elements (t, i0+r, j0 .. j0+cols−1) (dropout_keep_bits): from the
    // forward's stored mask when there is one (bits, ⌈Lk/64⌉ words per row), else from Philox; the
    // forward passes `store` to write them there.
    void keep_tile(std::int64_t t, std::int64_t i0, std::int64_t rows, std::int64_t j0, std::int64_t cols, const std::uint64_t* stored,
                   std::uint64_t* store, std::uint64_t* keep) const {
        AUTODIFF_PHASE(dropout);
        const std::int64_t words = (Lk + block_k - 1) / block_k, at = (t * Lq + i0) * words + j0 / block_k;
        const auto shift = static_cast<unsigned>(j0 % block_k);  // a band of a partial tile starts inside its key block
        if (stored) {
            for (std::int64_t r = 0; r < rows; ++r) keep[r] = stored[at + r * words] >> shift;
            return;
        }
        for (std::int64_t r = 0; r < rows; ++r) keep[r] = drop_bits(static_cast<std::uint64_t>((t * Lq + i0 + r) * Lk + j0), cols);
        if (store)  // each row of a tile is in one part: its word holds that part's keys, the others are masked
            for (std::int64_t r = 0; r < rows; ++r) store[at + r * words] = keep[r] << shift;
    }

    // The last key a query block [i0, i0+rows) can see, plus one.
    [[nodiscard]] std::int64_t key_end(std::int64_t i0, std::int64_t rows) const {
        return causal ? std::min(Lk, i0 + rows) : Lk;
    }
};

// One key tile of the online softmax (FlashAttention-2): for each row r of S (rows × cols, leading
// dimension block_k), the running max m[r] becomes m_new = max(m[r], max_c S[r, c]), S[r, ·] becomes
// e^(S[r, ·] − m_new) (masked entries exactly 0), and the running sum l[r] and the accumulated output
// row acc[r, ·] are rescaled by e^(m[r] − m_new). A row with nothing kept yet stays 0. The rescale
// factors are computed block_q rows at a time, in vectors: a scalar exp per row cost as much as
// the row's 64 exponentials. The rows of S are rows [r0, r0 + rows) of the query block (a part of a
// tile, Problem::parts). With dropout, keep[r] holds row r's keep bits (Problem::keep_tile): S then
// becomes dropout(P) in the same pass, while l sums the undropped P.
template <class T>
void online_softmax_tile(T* S, std::int64_t r0, std::int64_t rows, std::int64_t cols, Scratch<T>& s, std::int64_t dv,
                         const std::uint64_t* keep = nullptr, T drop_scale = T(1)) {
    using V = typename detail::Simd<T, detail::simd_bytes>::type;
    constexpr int W = detail::Simd<T, detail::simd_bytes>::lanes;
    static_assert(block_q % W == 0 && sub_rows % W == 0);  // the vector lanes stay within the block and the band
    AUTODIFF_PHASE(fwd_softmax);
    T *m = s.m.data() + r0, *l = s.l.data() + r0, *m_new = s.m_new.data() + r0, *alpha = s.alpha.data() + r0;
    for (std::int64_t r = 0; r < rows; ++r) m_new[r] = detail::row_max(S + r * block_k, cols);
    for (std::int64_t r = 0; r < rows; r += W) {  // lanes past `rows` compute unused values
        const V m_old = detail::load<V>(m + r), m_max = detail::nan_max(m_old, detail::load<V>(m_new + r));
        const auto nothing_kept = m_max == (V{} + neg_inf<T>);  // −∞ − −∞ would be NaN
        detail::store(alpha + r, detail::vexp<T, detail::simd_bytes>(detail::select(nothing_kept, V{}, m_old - m_max)));
        detail::store(m_new + r, m_max);
    }
    for (std::int64_t r = 0; r < rows; ++r) {
        T* row = S + r * block_k;
        if (m_new[r] == neg_inf<T>) {
            std::fill_n(row, cols, T(0));
            continue;
        }
        l[r] = l[r] * alpha[r] + (keep ? detail::exp_shifted_sum_keep(row, row, cols, m_new[r], keep[r], drop_scale)
                                       : detail::exp_shifted_sum(row, row, cols, m_new[r]));
        if (alpha[r] != T(1)) RowMap<T>(s.acc.data() + (r0 + r) * dv, dv) *= alpha[r];
        m[r] = m_new[r];
    }
}

}  // namespace
}  // namespace autodiff

#include "attention_small.hpp"

namespace autodiff {

namespace {

// Under a modifier's mask with a backward to follow: classifies every tile the forward visits once,
// into saved.tile_index, for the forward and the backward (which then classify nothing), and keeps the
// scores of the non-empty tiles in saved.tile_scores when their elements are at most 8× Q's (a sliding
// window; not a document mask of long documents): the backward then reads S instead of recomputing
// Q·Kᵀ, and memory stays O(L·d). The work items and their split are the forward's (per_thread).
template <class T>
void plan_mask_tiles(const Problem<T>& p, AttentionSaved<T>& saved, const AttentionOptions& opt, std::int64_t q_blocks,
                     std::int64_t k_blocks, std::int64_t threads, std::int64_t per_thread) {
    const std::int64_t n_items = p.items * q_blocks;
    saved.tile_index = Tensor<std::uint64_t>(Shape{n_items, k_blocks});
    std::uint64_t* const index = saved.tile_index.data();
    parallel_for(threads, per_thread * k_blocks * 64, [&](std::int64_t worker) {
        for (std::int64_t w = worker * per_thread; w < std::min(n_items, (worker + 1) * per_thread); ++w) {
            const std::int64_t t = w / q_blocks, i0 = (w % q_blocks) * block_q, rows = std::min(block_q, p.Lq - i0);
            const std::int64_t j_end = p.key_end(i0, rows);
            for (std::int64_t b = 0; b < k_blocks; ++b) {
                const std::int64_t j0 = b * block_k;
                index[w * k_blocks + b] =
                    j0 < j_end ? static_cast<std::uint64_t>(p.tile_kind(t, i0, rows, j0, std::min(block_k, p.Lk - j0))) : std::uint64_t{0};
            }
        }
    });
    static_assert(static_cast<int>(TileKind::empty) == 0);
    if (opt.keep_scores) return;  // the full buffer keeps them
    std::int64_t n_tiles = 0;
    for (std::int64_t e = 0; e < n_items * k_blocks; ++e) n_tiles += index[e] != 0;
    if (n_tiles * block_q * block_k > 8 * p.items * p.Lq * p.d) return;
    std::uint64_t slot = 0;
    for (std::int64_t e = 0; e < n_items * k_blocks; ++e)
        if (index[e] != 0) index[e] |= slot++ << 2;
    saved.tile_scores = Tensor<T>(Shape{n_tiles, block_q * block_k});
}

}  // namespace

template <class T>
bool attention_stores_dropout_mask(const Shape& q, const Shape& k, const AttentionOptions& opt) {
    if (!opt.keep_dropout_mask || !opt.dropout.training || opt.dropout.rate == 0.0) return false;
    const std::int64_t words = (k.dim_from_end(2) + block_k - 1) / block_k;
    return opt.keep_scores || words * 8 <= q.dim_from_end(1) * static_cast<std::int64_t>(sizeof(T));
}

template <class T>
AttentionSaved<T> attention_forward(const Tensor<T>& Q, const Tensor<T>& K, const Tensor<T>& V, const Tensor<T>& bias,
                                    const Tensor<T>& additive, const AttentionOptions& opt, const AttentionModifier<T>* mod) {
    check_dropout("attention", opt.dropout);
    const Shape out = attention_output_shape("attention", Q.shape(), K.shape(), V.shape(), bias.defined() ? &bias.shape() : nullptr,
                                             additive.defined() ? &additive.shape() : nullptr, opt.mask);
    if (!std::isfinite(opt.scale) || !std::isfinite(opt.bias_scale))
        fail("attention", "scale ({}) and bias_scale ({}) must be finite", opt.scale, opt.bias_scale);
    const Problem<T> p(Q, K, V, bias, additive, opt, mod);
    AttentionSaved<T> saved{Tensor<T>(out), Tensor<T>(Shape::from_range(Q.shape().begin(), Q.shape().end() - 1)), {}, {}, {}, {}};
    if (opt.keep_scores) {
        Shape scores = Q.shape();
        scores[scores.rank() - 1] = p.Lk;
        saved.scores = Tensor<T>(scores);
    }
    if (attention_stores_dropout_mask<T>(Q.shape(), K.shape(), opt))
        saved.keep_bits = Tensor<std::uint64_t>(Shape{p.items * p.Lq, (p.Lk + block_k - 1) / block_k});
    std::uint64_t* const keep_bits = saved.keep_bits.data();
    if (out.numel() == 0) return saved;
    if (one_tile_problem(p)) {
        small_forward(p, saved, opt);
        return saved;
    }
    const std::int64_t q_blocks = (p.Lq + block_q - 1) / block_q, k_blocks = (p.Lk + block_k - 1) / block_k;
    // Work items run over (leading index, query block); consecutive items of one thread share the
    // leading index, so its Kᵀ is transposed once per thread and leading index, not per block.
    const std::int64_t threads = std::max(1, num_threads());
    const std::int64_t per_thread = (p.items * q_blocks + threads - 1) / threads;
    if (p.mask_fn && opt.keep_mask_tiles) plan_mask_tiles(p, saved, opt, q_blocks, k_blocks, threads, per_thread);
    const std::uint64_t* const tix = std::as_const(saved.tile_index).data();  // null when undefined
    T* const tiles = saved.tile_scores.data();
    const bool keeping = opt.keep_scores || tiles;

    parallel_for(threads, per_thread * block_q * p.Lk * (p.d + p.dv) * 2, [&](std::int64_t worker) {
        Scratch<T>& s = Scratch<T>::get();
        ensure(s.S, block_q * block_k);
        ensure(s.acc, block_q * p.dv);
        for (auto* buf : {&s.m, &s.l, &s.m_new, &s.alpha}) ensure(*buf, block_q);
        std::int64_t transposed_for = -1;
        for (std::int64_t w = worker * per_thread; w < std::min(p.items * q_blocks, (worker + 1) * per_thread); ++w) {
            const std::int64_t t = w / q_blocks, i0 = (w % q_blocks) * block_q, rows = std::min(block_q, p.Lq - i0);
            if (t != transposed_for) {
                AUTODIFF_PHASE(fwd_transpose);
                Problem<T>::transpose_blocked(p.k + t * p.Lk * p.d, p.Lk, p.d, s.Kt);
                transposed_for = t;
            }
            std::fill_n(s.m.begin(), block_q, neg_inf<T>);
            std::fill_n(s.l.begin(), block_q, T(0));
            std::fill_n(s.m_new.begin(), block_q, neg_inf<T>);
            std::fill_n(s.acc.begin(), rows * p.dv, T(0));
            const std::int64_t j_end = p.key_end(i0, rows);
            for (std::int64_t j0 = 0; j0 < j_end; j0 += block_k) {
                const std::int64_t cols = std::min(block_k, p.Lk - j0);
                const std::uint64_t entry = tix ? tix[w * k_blocks + j0 / block_k] : 0;
                const TileKind kind = tix ? static_cast<TileKind>(entry & 3) : p.tile_kind(t, i0, rows, j0, cols);
                if (kind == TileKind::empty) continue;  // every element masked: contributes nothing
                if (j0 + block_k < j_end) p.prefetch_tile(t, i0, rows, j0 + block_k, std::min(block_k, p.Lk - j0 - block_k));
                for (const auto& u : p.parts(t, i0, rows, j0, cols, kind)) {  // rows [u.i0, u.i0 + u.rows), keys [u.j0, u.j0 + u.cols)
                    T* S = s.S.data();
                    // Kept for the backward (read again only there: streamed past the caches): S, or x when
                    // f's derivatives need it; in the full buffer or in the tile's slot.
                    auto keep = [&] {
                        AUTODIFF_PHASE(keep_scores);
                        T* dst = tiles ? tiles + static_cast<std::int64_t>(entry >> 2) * (block_q * block_k) + (u.i0 - i0) * block_k + (u.j0 - j0)
                                       : saved.scores.data() + (t * p.Lq + u.i0) * p.Lk + u.j0;
                        const std::int64_t ld = tiles ? block_k : p.Lk;
                        for (std::int64_t r = 0; r < u.rows; ++r) detail::stream_row(dst + r * ld, S + r * block_k, u.cols);
                    };
                    p.raw_scores(t, u.i0, u.rows, u.j0, u.cols, Problem<T>::tile_of(s.Kt, u.j0, p.d), S);
                    if (keeping && p.keeps_x) keep();
                    p.finish_scores(t, u.i0, u.rows, u.j0, u.cols, S, u.kind);
                    if (keeping && !p.keeps_x) keep();
                    // S becomes the unnormalised P, with dropout dropout(P): the mask is applied in the exp pass
                    std::uint64_t bits[block_q];
                    if (p.dropout) p.keep_tile(t, u.i0, u.rows, u.j0, u.cols, nullptr, keep_bits, bits);
                    online_softmax_tile(S, u.i0 - i0, u.rows, u.cols, s, p.dv, p.dropout ? bits : nullptr, p.drop_scale);
                    AUTODIFF_PHASE(pv_product);  // acc += P·V_j
                    detail::tile_gemm<T>(u.rows, p.dv, u.cols, T(1), S, block_k, 1, p.v + (t * p.Lk + u.j0) * p.dv, p.dv, T(1),
                                         s.acc.data() + (u.i0 - i0) * p.dv, p.dv);
                }
            }
            AUTODIFF_PHASE(fwd_output);
            T* O = saved.O.data() + (t * p.Lq + i0) * p.dv;
            T* lse = saved.lse.data() + t * p.Lq + i0;
            for (std::int64_t r = 0; r < rows; ++r) {
                RowMap<T> o(O + r * p.dv, p.dv);
                if (s.m[r] == neg_inf<T>) {  // every key masked: output 0
                    o.setZero();
                    lse[r] = neg_inf<T>;
                } else {
                    o = RowMap<T>(s.acc.data() + r * p.dv, p.dv) / s.l[r];
                    lse[r] = s.m[r] + std::log(s.l[r]);
                }
            }
        }
        detail::stream_fence();
    });
    return saved;
}

template <class T>
void attention_backward(NoDeduce<Tensor<T>>* dQ, NoDeduce<Tensor<T>>* dK, NoDeduce<Tensor<T>>* dV,
                        NoDeduce<Tensor<T>>* dbias, const Tensor<T>& dO, const Tensor<T>& Q, const Tensor<T>& K,
                        const Tensor<T>& V, const Tensor<T>& bias, const Tensor<T>& additive,
                        AttentionSaved<T>& saved, const AttentionOptions& opt, const AttentionModifier<T>* mod,
                        std::vector<Tensor<T>>* mod_grads) {
    const char* op = "attention_backward";
    const Shape out = attention_output_shape(op, Q.shape(), K.shape(), V.shape(), bias.defined() ? &bias.shape() : nullptr,
                                             additive.defined() ? &additive.shape() : nullptr, opt.mask);
    if (dO.shape() != out || saved.O.shape() != out) fail(op, "dO {} and O {} must have the output's shape {}", dO.shape(), saved.O.shape(), out);
    if (dbias && !bias.defined()) fail(op, "a bias gradient was requested but there is no bias");
    const Problem<T> p(Q, K, V, bias, additive, opt, mod);
    // Gradients of the modifier's captured tensors: one partial sum per work item, added in order.
    const std::vector<Shape> no_shapes;
    const std::vector<Shape>& grad_shapes = mod && mod_grads ? mod->gradient_shapes() : no_shapes;
    if (mod_grads) mod_grads->clear();
    for (const Shape& g : grad_shapes) mod_grads->push_back(zeros<T>(g));
    // The general kernel zeroes its own rows of dQ, dK and dV in its parallel region, just before summing
    // into them (no serial zero fill); the one-tile kernel and the empty cases need zeros.
    const bool general = out.numel() != 0 && p.Lk != 0 && !one_tile_problem(p);
    if (dQ) *dQ = general ? Tensor<T>(Q.shape()) : zeros<T>(Q.shape());
    if (dK) *dK = general ? Tensor<T>(K.shape()) : zeros<T>(K.shape());
    if (dV) *dV = general ? Tensor<T>(V.shape()) : zeros<T>(V.shape());
    // A full-shape bias gradient is written exactly once per element (plain stores: no zero fill,
    // no read-modify-write, a third of the memory traffic); a broadcast one is summed into zeros.
    Shape scores = Q.shape();
    scores[scores.rank() - 1] = p.Lk;
    if (saved.scores.defined() && saved.scores.shape() != scores)
        fail(op, "saved scores {} must have the scores' shape {}", saved.scores.shape(), scores);
    const bool full_dbias = dbias && bias.shape() == scores;
    // P is read from the saved scores when there are some; a full bias gradient then overwrites them.
    const T* kept = saved.scores.defined() ? saved.scores.data() : nullptr;
    // The forward's dropout mask, if it stored one (then no Philox runs here).
    const Shape keep_shape{p.items * p.Lq, (p.Lk + block_k - 1) / block_k};
    if (saved.keep_bits.defined() && saved.keep_bits.shape() != keep_shape)
        fail(op, "saved dropout mask {} must have the shape {} (one word per query row and key block)", saved.keep_bits.shape(), keep_shape);
    const std::uint64_t* const kept_keep = p.dropout ? std::as_const(saved.keep_bits).data() : nullptr;
    // The forward's tile kinds and, if it kept them, the scores of its non-empty tiles (kept takes
    // precedence: it is there only with keep_scores, and then the forward keeps no tiles).
    const std::int64_t k_blocks = (p.Lk + block_k - 1) / block_k;
    const std::uint64_t* tix = nullptr;
    const T* tiles = nullptr;
    if (saved.tile_index.defined() && p.mask_fn) {
        const Shape index_shape{p.items * ((p.Lq + block_q - 1) / block_q), k_blocks};
        if (saved.tile_index.shape() != index_shape)
            fail(op, "saved tile index {} must have the shape {} (one entry per 64 × 64 tile)", saved.tile_index.shape(), index_shape);
        tix = std::as_const(saved.tile_index).data();
        if (saved.tile_scores.defined() && !kept) {
            const std::int64_t n_tiles = saved.tile_scores.numel() / (block_q * block_k);
            if (saved.tile_scores.shape() != Shape{n_tiles, block_q * block_k})
                fail(op, "saved tile scores {} must have the shape (tiles, {})", saved.tile_scores.shape(), block_q * block_k);
            for (std::int64_t e = 0; e < index_shape.numel(); ++e)
                if ((tix[e] & 3) != 0 && static_cast<std::int64_t>(tix[e] >> 2) >= n_tiles)
                    fail(op, "saved tile index names tile {} of {} kept", tix[e] >> 2, n_tiles);
            tiles = std::as_const(saved.tile_scores).data();
        }
    }
    if (dbias) *dbias = !full_dbias ? zeros<T>(bias.shape()) : kept ? std::exchange(saved.scores, Tensor<T>()) : Tensor<T>(scores);
    if (out.numel() == 0 || p.Lk == 0) {
        if (dbias) dbias->fill(T(0));
        return;
    }
    if (one_tile_problem(p)) {
        small_backward(p, dQ ? dQ->data() : nullptr, dK ? dK->data() : nullptr, dV ? dV->data() : nullptr,
                       dbias ? dbias->data() : nullptr, dbias ? Broadcast<T>(*dbias) : Broadcast<T>(), full_dbias, dO.data(),
                       std::as_const(saved), kept, kept_keep);
        return;
    }

    // Leading indices that share a slice of a broadcast bias gradient form one group, processed in
    // order by one thread: the bias gradient is summed in a fixed order without atomics. When there
    // are fewer groups than min_work_items (a bias shared by every head and batch entry is one
    // group), each group's query blocks are also split into `chunks`: a chunk owns its rows of dQ
    // (and of dB when dB has a query dimension) and writes its share of dK, dV (and of a dB without
    // one) to its own buffers, summed in chunk order at the end. The split depends on the shapes
    // only, so results stay bit-identical for any thread count.
    const Broadcast<T> db_map = dbias ? Broadcast<T>(*dbias) : Broadcast<T>();
    auto group_of = [&](std::int64_t t) {
        if (!dbias) return t;
        return (db_map.s[0] ? t / p.P1 : 0) * p.P1 + (db_map.s[1] ? t % p.P1 : 0);
    };
    // Groups: the leading indices t = a·P1 + b with the same (a if dB varies over it, b likewise);
    // group gi's first index, without a list (no heap allocation per call).
    const std::int64_t group_a = dbias && !db_map.s[0] ? 1 : p.items / p.P1, group_b = dbias && !db_map.s[1] ? 1 : p.P1;
    const std::int64_t n_groups = group_a * group_b;
    auto group_start = [&](std::int64_t gi) { return (gi / group_b) * p.P1 + gi % group_b; };
    constexpr std::int64_t min_work_items = 4;
    const std::int64_t q_blocks = (p.Lq + block_q - 1) / block_q;
    const std::int64_t chunks = n_groups >= min_work_items ? 1 : std::min(q_blocks, (min_work_items + n_groups - 1) / n_groups);
    const std::int64_t blocks_per_chunk = (q_blocks + chunks - 1) / chunks;
    // Chunk c > 0 writes dK, dV (and a dB without a query dimension) to partial[c - 1].
    struct Partial {
        Tensor<T> dK, dV, dB;
    };
    const bool dB_by_rows = dbias && db_map.s[2] != 0;
    std::array<Partial, min_work_items - 1> partial;
    for (std::int64_t c = 1; c < chunks; ++c) {
        Partial& part = partial[static_cast<std::size_t>(c - 1)];
        if (dK) part.dK = Tensor<T>(K.shape());
        if (dV) part.dV = Tensor<T>(V.shape());
        if (dbias && !dB_by_rows) part.dB = zeros<T>(bias.shape());
    }
    const std::size_t n_grads = grad_shapes.size();
    // f's derivative by forward mode in the same pass as f, when no captured tensor needs a gradient.
    const bool dual = p.score_fn && !mod->needs_reverse();
    const std::int64_t n_work = n_groups * chunks;
    std::vector<Tensor<T>> mod_partial;
    std::vector<T*> mod_partial_data;
    for (std::int64_t w = 0; w < n_work && n_grads; ++w)
        for (const Shape& g : grad_shapes) {
            mod_partial.push_back(zeros<T>(g));
            mod_partial_data.push_back(mod_partial.back().data());
        }
    parallel_for(n_work, blocks_per_chunk * block_q * p.Lk * (p.d + p.dv) * 4, [&](std::int64_t w) {
        T* const* grads_w = n_grads ? mod_partial_data.data() + static_cast<std::size_t>(w) * n_grads : nullptr;
        const std::int64_t g = group_start(w / chunks), chunk = w % chunks;
        const std::int64_t qa = std::min(p.Lq, chunk * blocks_per_chunk * block_q), qb = std::min(p.Lq, qa + blocks_per_chunk * block_q);
        T* dK_out = dK ? (chunk ? partial[static_cast<std::size_t>(chunk - 1)].dK : *dK).data() : nullptr;
        T* dV_out = dV ? (chunk ? partial[static_cast<std::size_t>(chunk - 1)].dV : *dV).data() : nullptr;
        T* dB_out = dbias ? (chunk && !dB_by_rows ? partial[static_cast<std::size_t>(chunk - 1)].dB : *dbias).data() : nullptr;
        Scratch<T>& s = Scratch<T>::get();
        for (auto* buf : {&s.S, &s.X, &s.Dfx, &s.dS}) ensure(*buf, block_q * block_k);
        ensure(s.D, p.Lq);
        for (std::int64_t t = g; t < p.items; ++t) {
            if (group_of(t) != g) continue;
            const T* dO_t = dO.data() + t * p.Lq * p.dv;
            const T* O_t = std::as_const(saved.O).data() + t * p.Lq * p.dv;
            {
                AUTODIFF_PHASE(bwd_prologue);
                if (dQ) std::fill(dQ->data() + (t * p.Lq + qa) * p.d, dQ->data() + (t * p.Lq + qb) * p.d, T(0));
                if (!kept && !tiles)  // Kᵀ only to recompute the scores
                    Problem<T>::transpose_blocked(p.k + t * p.Lk * p.d, p.Lk, p.d, s.Kt);
                Problem<T>::transpose_blocked(p.v + t * p.Lk * p.dv, p.Lk, p.dv, s.Vt);
                for (std::int64_t i = qa; i < qb; ++i)  // D_i = rowsum(dO_i ⊙ O_i)
                    s.D[static_cast<std::size_t>(i)] = (ConstRowMap<T>(dO_t + i * p.dv, p.dv) * ConstRowMap<T>(O_t + i * p.dv, p.dv)).sum();
            }
            const T* lse = std::as_const(saved.lse).data() + t * p.Lq;
            // row_scaled: dQr_t's rows [qa, qb) sum scale·dS·K_j (dS before the row's factor a); dQ's
            // own rows when dQ is wanted (scaled by a at the end), else scratch.
            T* dQr_t = nullptr;
            if (p.row_scaled && qa < qb) {
                AUTODIFF_PHASE(score_fn_backward);
                ensure(s.A, p.Lq);
                mod->row_factors(p.tile(t, qa, qb - qa, 0, p.Lk), s.A.data() + qa);
                if (dQ) {
                    dQr_t = dQ->data() + t * p.Lq * p.d;
                } else {
                    ensure(s.dQr, p.Lq * p.d);
                    dQr_t = s.dQr.data();
                    std::fill(dQr_t + qa * p.d, dQr_t + qb * p.d, T(0));
                }
            }
            for (std::int64_t j0 = 0; j0 < p.Lk; j0 += block_k) {
                const std::int64_t cols = std::min(block_k, p.Lk - j0);
                // dK_j, dV_j: this key block's rows, summed over the query blocks in place (no zero fill of
                // the whole tensors: each block's rows are zeroed here, then stay in cache while summed)
                T* dK_j = dK ? dK_out + (t * p.Lk + j0) * p.d : nullptr;
                T* dV_j = dV ? dV_out + (t * p.Lk + j0) * p.dv : nullptr;
                if (dK) std::fill_n(dK_j, cols * p.d, T(0));
                if (dV) std::fill_n(dV_j, cols * p.dv, T(0));
                // Under a causal mask, rows above j0 see none of these keys (their dS is 0).
                const std::int64_t i_first = std::max(qa, p.causal ? std::min(qb, j0 / block_q * block_q) : qa);
                if (full_dbias)
                    for (std::int64_t i = qa; i < i_first; ++i)
                        std::fill_n(dB_out + (t * p.Lq + i) * p.Lk + j0, cols, T(0));
                for (std::int64_t i0 = i_first; i0 < qb; i0 += block_q) {
                    const std::int64_t rows = std::min(block_q, p.Lq - i0);
                    const std::int64_t entry_at = (t * q_blocks + i0 / block_q) * k_blocks + j0 / block_k;
                    const TileKind kind = tix ? static_cast<TileKind>(tix[entry_at] & 3) : p.tile_kind(t, i0, rows, j0, cols);
                    // This tile's slot of the kept tiles (rows block_k apart), if they are kept.
                    const T* tile_kept = tiles ? tiles + static_cast<std::int64_t>(tix[entry_at] >> 2) * (block_q * block_k) : nullptr;
                    if (kind == TileKind::empty) {  // skipped by the forward too: dS = 0
                        if (full_dbias)
                            for (std::int64_t i = i0; i < i0 + rows; ++i) std::fill_n(dB_out + (t * p.Lq + i) * p.Lk + j0, cols, T(0));
                        continue;
                    }
                    const std::int64_t next_i = i0 + block_q, next_rows = std::min(block_q, p.Lq - next_i);
                    if (kept) {  // the next tile's rows of the full buffer, Lk apart, into L2 (detail::PrefetchTo)
                        AUTODIFF_PHASE(bwd_scores);
                        constexpr auto to_l2 = detail::PrefetchTo::l2;
                        if (next_i < qb) detail::prefetch_rows<to_l2>(kept + (t * p.Lq + next_i) * p.Lk + j0, next_rows, cols, p.Lk);
                        // x is kept, or ∂f/∂x comes from f's value, with a bias outside f: the bias is read
                        // again (a second L² stream: the two next tiles are 32 KiB, all of L1)
                        if (next_i < qb && !p.bias_inside && (p.keeps_x || p.from_value))
                            p.template prefetch_tile<to_l2>(t, next_i, next_rows, j0, cols);
                    } else if (tiles) {
                        AUTODIFF_PHASE(bwd_scores);
                        if (next_i < qb && (tix[entry_at + k_blocks] & 3) != 0)
                            detail::prefetch_rows(tiles + static_cast<std::int64_t>(tix[entry_at + k_blocks] >> 2) * (block_q * block_k), next_rows, cols,
                                                  block_k);
                        if (next_i < qb && !p.bias_inside && (p.keeps_x || p.from_value)) p.prefetch_tile(t, next_i, next_rows, j0, cols);
                    } else if (next_i < qb) {
                        p.prefetch_tile(t, next_i, next_rows, j0, cols);
                    }
                    const auto parts = p.parts(t, i0, rows, j0, cols, kind);
                    if (full_dbias) {  // the parts write their elements of dB, the rest of the tile is masked: dS = 0
                        std::int64_t i = i0;
                        auto zero = [&](std::int64_t end, std::int64_t c0, std::int64_t c1) {
                            for (; i < end; ++i) {
                                T* row = dB_out + (t * p.Lq + i) * p.Lk;
                                std::fill(row + j0, row + c0, T(0));
                                std::fill(row + c1, row + j0 + cols, T(0));
                            }
                        };
                        for (const auto& u : parts) {
                            zero(u.i0, j0 + cols, j0 + cols);
                            zero(u.i0 + u.rows, u.j0, u.j0 + u.cols);
                        }
                        zero(i0 + rows, j0 + cols, j0 + cols);
                    }
                    for (const auto& u : parts) {  // rows [u.i0, u.i0 + u.rows), keys [u.j0, u.j0 + u.cols)
                        T* P = s.S.data();
                        T* dS = s.dS.data();
                        // S: from the forward's buffer (the forward wrote every part this loop visits) or recomputed.
                        // When the buffer holds x (keeps_x), S = f(x) + ... is recomputed from it.
                        const T* kept_tile = kept ? kept + (t * p.Lq + u.i0) * p.Lk + u.j0
                                             : tile_kept ? tile_kept + (u.i0 - i0) * block_k + (u.j0 - j0)
                                                         : nullptr;
                        const std::int64_t ldk = kept ? p.Lk : block_k;  // of kept_tile
                        const bool kept_S = kept_tile && !p.keeps_x;
                        const T* S = kept_S ? kept_tile : P;
                        const std::int64_t lds = kept_S ? ldk : block_k;
                        // x for f: read in place from the kept buffer unless a bias gradient (outside f)
                        // overwrites it there before f's reverse-mode derivative reads it; else a copy or
                        // recomputed. Without captured gradients, f and ∂f/∂x come in one pass.
                        const T* X = kept_S ? kept_tile : s.X.data();  // kept S: modify_backward does not read x
                        std::int64_t ldx = kept_S ? ldk : block_k;
                        if (p.score_fn && !kept_S) {
                            if (kept_tile && (p.bias_inside || dual || !kept)) {  // only the full buffer becomes dB
                                X = kept_tile, ldx = ldk;
                            } else if (kept_tile) {
                                AUTODIFF_PHASE(bwd_scores);
                                for (std::int64_t r = 0; r < u.rows; ++r) std::copy_n(kept_tile + r * ldk, u.cols, s.X.data() + r * block_k);
                            } else {
                                p.raw_scores(t, u.i0, u.rows, u.j0, u.cols, Problem<T>::tile_of(s.Kt, u.j0, p.d), s.X.data());
                            }
                            {
                                AUTODIFF_PHASE(score_fn);
                                const ScoreTile tile = p.tile(t, u.i0, u.rows, u.j0, u.cols);
                                if (dual && !p.from_value) mod->modify_with_derivative(tile, X, ldx, P, block_k, s.Dfx.data(), block_k);
                                else mod->modify(tile, X, ldx, P, block_k);
                            }
                            p.outer_terms(t, u.i0, u.rows, u.j0, u.cols, P, u.kind);
                        } else if (!kept_tile) {
                            p.scores(t, u.i0, u.rows, u.j0, u.cols, Problem<T>::tile_of(s.Kt, u.j0, p.d), P, u.kind);
                        }
                        if (p.from_value) {  // ∂f/∂x from f = S − outside bias − additive, kept or recomputed (before exp or dB overwrite S)
                            AUTODIFF_PHASE(score_fn_backward);
                            T* fd = s.Dfx.data();
                            p.value_of_f(t, u.i0, u.rows, u.j0, u.cols, S, lds, fd);
                            mod->derivative_at_value(p.tile(t, u.i0, u.rows, u.j0, u.cols), fd, block_k);
                        }
                        {
                            AUTODIFF_PHASE(bwd_exp);
                            for (std::int64_t r = 0; r < u.rows; ++r) {
                                if (lse[u.i0 + r] == neg_inf<T>) RowMap<T>(P + r * block_k, u.cols).setZero();  // fully masked row: P = 0
                                else detail::exp_shifted(S + r * lds, P + r * block_k, u.cols, lse[u.i0 + r]);
                            }
                        }
                        const T* dOi = dO_t + u.i0 * p.dv;
                        const T* Qi = p.q + (t * p.Lq + u.i0) * p.d;
                        std::uint64_t bits[block_q];
                        if (p.dropout) p.keep_tile(t, u.i0, u.rows, u.j0, u.cols, kept_keep, nullptr, bits);
                        auto dv_product = [&] {  // dV_j += dropout(P)ᵀ·dO_i, P holding dropout(P)
                            AUTODIFF_PHASE(dv_product);
                            detail::tile_gemm<T>(u.cols, p.dv, u.rows, T(1), P, 1, block_k, dOi, p.dv, T(1), dV_j + (u.j0 - j0) * p.dv,
                                                 p.dv);
                        };
                        // With dropout, the pass that forms dS also turns P into dropout(P) (detail::dropout_ds),
                        // and dV's product follows it; without, P is dropout(P) already.
                        if (dV && !p.dropout) dv_product();
                        {  // dS = P ⊙ (dropout_mask ⊙ (dO_i·V_jᵀ) − D_i)
                            AUTODIFF_PHASE(dp_product);
                            detail::tile_gemm<T>(u.rows, u.cols, p.dv, T(1), dOi, p.dv, 1, Problem<T>::tile_of(s.Vt, u.j0, p.dv), block_k, T(0),
                                                 dS, block_k);
                        }
                        {
                            AUTODIFF_PHASE(ds);
                            for (std::int64_t r = 0; r < u.rows; ++r) {
                                const T D = s.D[static_cast<std::size_t>(u.i0 + r)];
                                if (p.dropout) {
                                    detail::dropout_ds(P + r * block_k, dS + r * block_k, u.cols, bits[r], p.drop_scale, D);
                                } else {
                                    RowMap<T> ds(dS + r * block_k, u.cols);
                                    ds = RowMap<T>(P + r * block_k, u.cols) * (ds - D);
                                }
                            }
                        }
                        if (dV && p.dropout) dv_product();
                        auto store_dbias = [&] {  // dbias = bias_scale·reduce(dS)
                            AUTODIFF_PHASE(dbias);
                            for (std::int64_t r = 0; r < u.rows; ++r) {
                                T* dst = dB_out + p.lead(db_map, t) + (u.i0 + r) * db_map.s[2] + u.j0 * db_map.s[3];
                                RowMap<T> ds(dS + r * block_k, u.cols);
                                if (full_dbias) RowMap<T>(dst, u.cols) = p.bias_scale * ds;
                                else if (db_map.s[3]) RowMap<T>(dst, u.cols) += p.bias_scale * ds;
                                else *dst += p.bias_scale * ds.sum();
                            }
                        };
                        if (dbias && !p.bias_inside) store_dbias();
                        if (p.score_fn && !p.row_scaled) {  // dS -> dx = dS ⊙ ∂f/∂x, captured tensors' gradients
                            AUTODIFF_PHASE(score_fn_backward);
                            if (dual)
                                for (std::int64_t r = 0; r < u.rows; ++r)
                                    RowMap<T>(dS + r * block_k, u.cols) *= RowMap<T>(s.Dfx.data() + r * block_k, u.cols);
                            else mod->modify_backward(p.tile(t, u.i0, u.rows, u.j0, u.cols), X, ldx, dS, block_k, grads_w);
                        }
                        if (dbias && p.bias_inside) store_dbias();
                        if (p.row_scaled) {  // dQr_i += scale·dS·K_j, then dS -> dx = a·dS
                            {
                                AUTODIFF_PHASE(dq_product);
                                detail::tile_gemm<T>(u.rows, p.d, u.cols, p.scale, dS, block_k, 1, p.k + (t * p.Lk + u.j0) * p.d, p.d, T(1),
                                                     dQr_t + u.i0 * p.d, p.d);
                            }
                            AUTODIFF_PHASE(score_fn_backward);
                            for (std::int64_t r = 0; r < u.rows; ++r) RowMap<T>(dS + r * block_k, u.cols) *= s.A[static_cast<std::size_t>(u.i0 + r)];
                        } else if (dQ) {  // dQ_i += scale·dS·K_j
                            AUTODIFF_PHASE(dq_product);
                            detail::tile_gemm<T>(u.rows, p.d, u.cols, p.scale, dS, block_k, 1, p.k + (t * p.Lk + u.j0) * p.d, p.d, T(1),
                                                 dQ->data() + (t * p.Lq + u.i0) * p.d, p.d);
                        }
                        if (dK) {  // dK_j += scale·dSᵀ·Q_i
                            AUTODIFF_PHASE(dk_product);
                            detail::tile_gemm<T>(u.cols, p.d, u.rows, p.scale, dS, 1, block_k, Qi, p.d, T(1), dK_j + (u.j0 - j0) * p.d, p.d);
                        }
                    }
                }
            }
            if (dQr_t) {  // Σ_k dS·x = q_i·dQr_i -> the gradient of a; dQ_i = a_i·dQr_i
                AUTODIFF_PHASE(score_fn_backward);
                ensure(s.Rs, p.Lq);
                for (std::int64_t i = qa; i < qb; ++i) {
                    RowMap<T> row(dQr_t + i * p.d, p.d);
                    s.Rs[static_cast<std::size_t>(i)] = (ConstRowMap<T>(p.q + (t * p.Lq + i) * p.d, p.d) * row).sum();
                    if (dQ) row *= s.A[static_cast<std::size_t>(i)];
                }
                mod->row_factor_backward(p.tile(t, qa, qb - qa, 0, p.Lk), s.Rs.data() + qa, grads_w);
            }
        }
    });
    for (std::int64_t c = 1; c < chunks; ++c) {  // in chunk order
        const Partial& part = partial[static_cast<std::size_t>(c - 1)];
        if (dK) dK->array() += part.dK.array();
        if (dV) dV->array() += part.dV.array();
        if (part.dB.defined()) dbias->array() += part.dB.array();
    }
    for (std::size_t i = 0; i < mod_partial.size(); ++i)  // in work-item order
        (*mod_grads)[i % n_grads].array() += mod_partial[i].array();
}

#define AUTODIFF_INSTANTIATE(T)                                                                                        \
    template bool attention_stores_dropout_mask<T>(const Shape&, const Shape&, const AttentionOptions&);                \
    template AttentionSaved<T> attention_forward<T>(const Tensor<T>&, const Tensor<T>&, const Tensor<T>&,              \
                                                    const Tensor<T>&, const Tensor<T>&, const AttentionOptions&,       \
                                                    const AttentionModifier<T>*);                                      \
    template void attention_backward<T>(Tensor<T>*, Tensor<T>*, Tensor<T>*, Tensor<T>*, const Tensor<T>&,             \
                                        const Tensor<T>&, const Tensor<T>&, const Tensor<T>&, const Tensor<T>&,        \
                                        const Tensor<T>&, AttentionSaved<T>&, const AttentionOptions&,                 \
                                        const AttentionModifier<T>*, std::vector<Tensor<T>>*);
AUTODIFF_INSTANTIATE(float)
AUTODIFF_INSTANTIATE(double)
#undef AUTODIFF_INSTANTIATE

}  // namespace autodiff

#include "autodiff/kernels/attention.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "autodiff/parallel.hpp"

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
template <class T>
constexpr T neg_inf = -std::numeric_limits<T>::infinity();

template <class T>
using CMap = Eigen::Map<const RowMatrix<T>>;
template <class T>
using MMap = Eigen::Map<RowMatrix<T>>;

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

// One attention problem, everything a tile needs.
template <class T>
struct Problem {
    std::int64_t items, P1, Lq, Lk, d, dv;
    const T *q, *k, *v;
    Broadcast<T> bias, additive;
    Broadcast<bool> keep, key_padding;
    bool causal;
    T scale, bias_scale;
    DropoutDescriptor drop;
    bool dropout;
    T drop_scale;

    Problem(const Tensor<T>& Q, const Tensor<T>& K, const Tensor<T>& V, const Tensor<T>& b, const Tensor<T>& add,
            const AttentionOptions& opt)
        : bias(b), additive(add), keep(opt.mask.keep), causal(opt.mask.causal), drop(opt.dropout) {
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

    // S = scale·Q_i·K_jᵀ + bias_scale·bias + additive for rows [i0, i0+rows) and keys [j0, j0+cols)
    // of leading index t; −inf where masked.
    template <class Block>
    void scores(std::int64_t t, std::int64_t i0, std::int64_t rows, std::int64_t j0, std::int64_t cols, Block&& S) const {
        const CMap<T> Qi(q + (t * Lq + i0) * d, rows, d), Kj(k + (t * Lk + j0) * d, cols, d);
        S.noalias() = scale * (Qi * Kj.transpose());
        auto add = [&](const Broadcast<T>& b, T factor) {
            if (!b) return;
            for (std::int64_t r = 0; r < rows; ++r) {
                const T* src = b.data + lead(b, t) + (i0 + r) * b.s[2] + j0 * b.s[3];
                for (std::int64_t c = 0; c < cols; ++c) S(r, c) += factor * src[c * b.s[3]];
            }
        };
        add(bias, bias_scale);
        add(additive, T(1));
        auto apply_keep = [&](const Broadcast<bool>& b) {
            if (!b) return;
            for (std::int64_t r = 0; r < rows; ++r) {
                const bool* src = b.data + lead(b, t) + (i0 + r) * b.s[2] + j0 * b.s[3];
                for (std::int64_t c = 0; c < cols; ++c)
                    if (!src[c * b.s[3]]) S(r, c) = neg_inf<T>;
            }
        };
        apply_keep(keep);
        apply_keep(key_padding);
        if (causal)
            for (std::int64_t r = 0; r < rows; ++r)
                for (std::int64_t c = std::max<std::int64_t>(0, i0 + r + 1 - j0); c < cols; ++c) S(r, c) = neg_inf<T>;
    }

    // F(r, c) = dropout factor (0 or 1/(1-p)) of element (t, i0+r, j0+c).
    template <class Block>
    void dropout_tile(std::int64_t t, std::int64_t i0, std::int64_t rows, std::int64_t j0, std::int64_t cols, Block&& F) const {
        for (std::int64_t r = 0; r < rows; ++r)
            dropout_factors(drop, static_cast<std::uint64_t>((t * Lq + i0 + r) * Lk + j0), cols, drop_scale, &F(r, 0));
    }

    // The last key a query block [i0, i0+rows) can see, plus one.
    [[nodiscard]] std::int64_t key_end(std::int64_t i0, std::int64_t rows) const {
        return causal ? std::min(Lk, i0 + rows) : Lk;
    }
};

// Per-thread tile buffers, kept between calls.
template <class T>
struct Scratch {
    RowMatrix<T> S, F, Pd, dP, acc, dK, dV;
    std::vector<T> m, l, D;

    static Scratch& get(std::int64_t d, std::int64_t dv) {
        thread_local Scratch s;
        s.S.resize(block_q, block_k);
        s.F.resize(block_q, block_k);
        s.Pd.resize(block_q, block_k);
        s.dP.resize(block_q, block_k);
        s.acc.resize(block_q, dv);
        s.dK.resize(block_k, d);
        s.dV.resize(block_k, dv);
        s.m.resize(block_q);
        s.l.resize(block_q);
        return s;
    }
};

}  // namespace

template <class T>
AttentionSaved<T> attention_forward(const Tensor<T>& Q, const Tensor<T>& K, const Tensor<T>& V, const Tensor<T>& bias,
                                    const Tensor<T>& additive, const AttentionOptions& opt) {
    check_dropout("attention", opt.dropout);
    const Shape out = attention_output_shape("attention", Q.shape(), K.shape(), V.shape(), bias.defined() ? &bias.shape() : nullptr,
                                             additive.defined() ? &additive.shape() : nullptr, opt.mask);
    if (!std::isfinite(opt.scale) || !std::isfinite(opt.bias_scale))
        fail("attention", "scale ({}) and bias_scale ({}) must be finite", opt.scale, opt.bias_scale);
    const Problem<T> p(Q, K, V, bias, additive, opt);
    AttentionSaved<T> saved{Tensor<T>(out), Tensor<T>(Shape::from_range(Q.shape().begin(), Q.shape().end() - 1))};
    const std::int64_t q_blocks = (p.Lq + block_q - 1) / block_q;

    parallel_for(p.items * q_blocks, block_q * p.Lk * (p.d + p.dv) * 2, [&](std::int64_t w) {
        const std::int64_t t = w / q_blocks, i0 = (w % q_blocks) * block_q, rows = std::min(block_q, p.Lq - i0);
        Scratch<T>& s = Scratch<T>::get(p.d, p.dv);
        std::fill_n(s.m.begin(), rows, neg_inf<T>);
        std::fill_n(s.l.begin(), rows, T(0));
        auto acc = s.acc.topRows(rows);
        acc.setZero();
        const std::int64_t j_end = p.key_end(i0, rows);
        for (std::int64_t j0 = 0; j0 < j_end; j0 += block_k) {
            const std::int64_t cols = std::min(block_k, p.Lk - j0);
            auto S = s.S.topLeftCorner(rows, cols);
            p.scores(t, i0, rows, j0, cols, S);
            // Online softmax: running max m and sum l per row; S becomes the unnormalised P.
            for (std::int64_t r = 0; r < rows; ++r) {
                auto row = S.row(r);
                const T mx = row.template maxCoeff<Eigen::PropagateNaN>();
                const T m_new = (mx > s.m[r] || std::isnan(mx)) ? mx : s.m[r];
                if (m_new == neg_inf<T>) {  // nothing kept so far in this row
                    row.setZero();
                    continue;
                }
                const T alpha = std::exp(s.m[r] - m_new);
                row = (row.array() - m_new).exp();
                s.l[r] = s.l[r] * alpha + row.sum();
                acc.row(r) *= alpha;
                s.m[r] = m_new;
            }
            if (p.dropout) {
                auto F = s.F.topLeftCorner(rows, cols);
                p.dropout_tile(t, i0, rows, j0, cols, F);
                S.array() *= F.array();
            }
            acc.noalias() += S * CMap<T>(p.v + (t * p.Lk + j0) * p.dv, cols, p.dv);
        }
        MMap<T> O(saved.O.data() + (t * p.Lq + i0) * p.dv, rows, p.dv);
        T* lse = saved.lse.data() + t * p.Lq + i0;
        for (std::int64_t r = 0; r < rows; ++r) {
            if (s.m[r] == neg_inf<T>) {  // every key masked: output 0
                O.row(r).setZero();
                lse[r] = neg_inf<T>;
            } else {
                O.row(r) = acc.row(r) / s.l[r];
                lse[r] = s.m[r] + std::log(s.l[r]);
            }
        }
    });
    return saved;
}

template <class T>
void attention_backward(NoDeduce<Tensor<T>>* dQ, NoDeduce<Tensor<T>>* dK, NoDeduce<Tensor<T>>* dV,
                        NoDeduce<Tensor<T>>* dbias, const Tensor<T>& dO, const Tensor<T>& Q, const Tensor<T>& K,
                        const Tensor<T>& V, const Tensor<T>& bias, const Tensor<T>& additive,
                        const AttentionSaved<T>& saved, const AttentionOptions& opt) {
    const char* op = "attention_backward";
    const Shape out = attention_output_shape(op, Q.shape(), K.shape(), V.shape(), bias.defined() ? &bias.shape() : nullptr,
                                             additive.defined() ? &additive.shape() : nullptr, opt.mask);
    if (dO.shape() != out || saved.O.shape() != out) fail(op, "dO {} and O {} must have the output's shape {}", dO.shape(), saved.O.shape(), out);
    if (dbias && !bias.defined()) fail(op, "a bias gradient was requested but there is no bias");
    const Problem<T> p(Q, K, V, bias, additive, opt);
    if (dQ) *dQ = zeros<T>(Q.shape());
    if (dK) *dK = Tensor<T>(K.shape());
    if (dV) *dV = Tensor<T>(V.shape());
    if (dbias) *dbias = zeros<T>(bias.shape());

    // Leading indices that share a slice of a broadcast bias gradient form one group, processed in
    // order by one thread: the bias gradient is summed in a fixed order without atomics.
    const Broadcast<T> db_map = dbias ? Broadcast<T>(*dbias) : Broadcast<T>();
    auto group_of = [&](std::int64_t t) {
        if (!dbias) return t;
        return (db_map.s[0] ? t / p.P1 : 0) * p.P1 + (db_map.s[1] ? t % p.P1 : 0);
    };
    const std::int64_t groups = p.items;  // group ids are < items (unused ids have no members)
    parallel_for(groups, p.Lq * p.Lk * (p.d + p.dv) * 4, [&](std::int64_t g) {
        for (std::int64_t t = 0; t < p.items; ++t) {
            if (group_of(t) != g) continue;
            Scratch<T>& s = Scratch<T>::get(p.d, p.dv);
            // D_i = rowsum(dO_i ⊙ O_i)
            s.D.resize(static_cast<std::size_t>(p.Lq));
            const CMap<T> dO_t(dO.data() + t * p.Lq * p.dv, p.Lq, p.dv), O_t(saved.O.data() + t * p.Lq * p.dv, p.Lq, p.dv);
            for (std::int64_t i = 0; i < p.Lq; ++i) s.D[static_cast<std::size_t>(i)] = dO_t.row(i).dot(O_t.row(i));
            const T* lse = saved.lse.data() + t * p.Lq;
            for (std::int64_t j0 = 0; j0 < p.Lk; j0 += block_k) {
                const std::int64_t cols = std::min(block_k, p.Lk - j0);
                auto dKj = s.dK.topRows(cols);
                auto dVj = s.dV.topRows(cols);
                dKj.setZero();
                dVj.setZero();
                const CMap<T> Kj(p.k + (t * p.Lk + j0) * p.d, cols, p.d), Vj(p.v + (t * p.Lk + j0) * p.dv, cols, p.dv);
                // Under a causal mask, rows above j0 see none of these keys.
                for (std::int64_t i0 = p.causal ? j0 / block_q * block_q : 0; i0 < p.Lq; i0 += block_q) {
                    const std::int64_t rows = std::min(block_q, p.Lq - i0);
                    auto P = s.S.topLeftCorner(rows, cols);
                    p.scores(t, i0, rows, j0, cols, P);
                    for (std::int64_t r = 0; r < rows; ++r) {
                        if (lse[i0 + r] == neg_inf<T>) P.row(r).setZero();  // fully masked row: P = 0
                        else P.row(r) = (P.row(r).array() - lse[i0 + r]).exp();
                    }
                    const CMap<T> dOi(dO.data() + (t * p.Lq + i0) * p.dv, rows, p.dv), Qi(p.q + (t * p.Lq + i0) * p.d, rows, p.d);
                    auto F = s.F.topLeftCorner(rows, cols);
                    if (p.dropout) p.dropout_tile(t, i0, rows, j0, cols, F);
                    if (dV) {  // dV_j += dropout(P)ᵀ·dO_i
                        if (p.dropout) {
                            auto Pd = s.Pd.topLeftCorner(rows, cols);
                            Pd = P.cwiseProduct(F);
                            dVj.noalias() += Pd.transpose() * dOi;
                        } else {
                            dVj.noalias() += P.transpose() * dOi;
                        }
                    }
                    // dS = P ⊙ (dropout_mask ⊙ (dO_i·V_jᵀ) − D_i)
                    auto dS = s.dP.topLeftCorner(rows, cols);
                    dS.noalias() = dOi * Vj.transpose();
                    if (p.dropout) dS.array() *= F.array();
                    for (std::int64_t r = 0; r < rows; ++r)
                        dS.row(r) = P.row(r).cwiseProduct((dS.row(r).array() - s.D[static_cast<std::size_t>(i0 + r)]).matrix());
                    if (dbias) {
                        for (std::int64_t r = 0; r < rows; ++r) {
                            T* dst = dbias->data() + p.lead(db_map, t) + (i0 + r) * db_map.s[2] + j0 * db_map.s[3];
                            if (db_map.s[3]) Eigen::Map<Eigen::Matrix<T, 1, Eigen::Dynamic>>(dst, cols) += p.bias_scale * dS.row(r);
                            else *dst += p.bias_scale * dS.row(r).sum();
                        }
                    }
                    if (dQ) MMap<T>(dQ->data() + (t * p.Lq + i0) * p.d, rows, p.d).noalias() += p.scale * (dS * Kj);
                    if (dK) dKj.noalias() += p.scale * (dS.transpose() * Qi);
                }
                if (dK) MMap<T>(dK->data() + (t * p.Lk + j0) * p.d, cols, p.d) = dKj;
                if (dV) MMap<T>(dV->data() + (t * p.Lk + j0) * p.dv, cols, p.dv) = dVj;
            }
        }
    });
}

#define AUTODIFF_INSTANTIATE(T)                                                                                        \
    template AttentionSaved<T> attention_forward<T>(const Tensor<T>&, const Tensor<T>&, const Tensor<T>&,              \
                                                    const Tensor<T>&, const Tensor<T>&, const AttentionOptions&);      \
    template void attention_backward<T>(Tensor<T>*, Tensor<T>*, Tensor<T>*, Tensor<T>*, const Tensor<T>&,             \
                                        const Tensor<T>&, const Tensor<T>&, const Tensor<T>&, const Tensor<T>&,        \
                                        const Tensor<T>&, const AttentionSaved<T>&, const AttentionOptions&);
AUTODIFF_INSTANTIATE(float)
AUTODIFF_INSTANTIATE(double)
#undef AUTODIFF_INSTANTIATE

}  // namespace autodiff

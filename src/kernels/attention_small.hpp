#pragma once
// The fused attention kernels' path for problems of one tile (issue 11, the tiny graph): every leading
// index has at most block_q query rows and block_k keys, there is no modifier, and the whole problem
// is below parallel_grain. Included by attention.cpp after Problem (it uses Problem's helpers).
//
// The general kernels' bookkeeping is written for long rows of 64 × 64 tiles: a running max and
// rescale factors for 64 rows, Kᵀ in 64-wide tiles, dK and dV tiles summed in scratch and copied out,
// work split into groups and chunks for threads. With one key tile the online softmax is a plain one
// (the first tile's rescale factors are exactly 0 or 1), the products write straight into their
// outputs, and the per-call work is too small for a parallel region. This path does the same
// arithmetic in the same order as the general kernels (the same element functions and the same
// per-element product order: the tile products' register blocks only change which elements share a
// loop), so its results are bit-identical to theirs; it runs on one thread, and which path runs
// depends on the shapes only: results stay bit-identical for any thread count.
//
// tests/test_attention_small.cpp compares it with the general kernels bit for bit and with the
// generic (unfused) path.

#include <atomic>

namespace autodiff {

namespace {
std::atomic<bool> one_tile_path_enabled{true};
}  // namespace

void set_attention_one_tile_path(bool enabled) { one_tile_path_enabled.store(enabled, std::memory_order_relaxed); }
bool attention_one_tile_path() { return one_tile_path_enabled.load(std::memory_order_relaxed); }

namespace {

// Whether p goes through the one-tile path.
template <class T>
bool one_tile_problem(const Problem<T>& p) {
    return attention_one_tile_path() && p.mod == nullptr && p.Lq <= block_q && p.Lk > 0 && p.Lk <= block_k &&
           p.items * p.Lq * p.Lk * (p.d + p.dv) * 2 < parallel_grain;
}

template <class T>
struct SmallScratch {
    AlignedVector<T> Kt, Vt, S, P, Pd, dS, acc, D, m, l;

    static SmallScratch& get() {
        thread_local SmallScratch s;
        return s;
    }
};

// C (m×n) = alpha·op(A)·B (tile_gemm with beta = 0) in blocks of 8 rows: a one-tile problem has few
// rows, and tile_gemm's 6 + 2 rows leave the 2-row block's short accumulator chains waiting on the
// FMA latency for the whole k loop. Each element is still the k products summed in order by FMAs
// and then scaled, as in tile_gemm: the same bits. (Not with beta ≠ 0: whether C·beta or acc·alpha
// is fused into the final add is the compiler's choice per instantiation.)
template <class T>
void small_gemm(std::int64_t m, std::int64_t n, std::int64_t k, T alpha, const T* A, std::int64_t a_row, std::int64_t a_col,
                const T* B, std::int64_t ldb, T* C, std::int64_t ldc) {
    constexpr int W = detail::Simd<T, detail::simd_bytes>::lanes;
    if (m % 8 != 0 || n > 2 * W) {  // 8 rows × block_vectors vectors would spill
        detail::tile_gemm<T>(m, n, k, alpha, A, a_row, a_col, B, ldb, T(0), C, ldc);
        return;
    }
    for (std::int64_t r = 0; r < m; r += 8) detail::row_block<T, 8>(n, k, alpha, A + r * a_row, a_row, a_col, B, ldb, T(0), C + r * ldc, ldc);
}

// Xt (cols × L, leading dimension L) = Xᵀ for the row-major (L × cols) X.
// A row of Xt at a time by masked gathers where AVX-512 has them (a scalar loop cost ~1 cycle per
// element: 10 % of a tiny step).
template <class T>
void small_transpose(const T* X, std::int64_t L, std::int64_t cols, T* Xt) {
    std::int64_t c = 0;
#if defined(__AVX512F__)
    if (L <= 16 && L * cols < (std::int64_t{1} << 31)) {
        const auto n = static_cast<int>(L);
        const __m512i idx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                               _mm512_set1_epi32(static_cast<int>(cols)));
        if constexpr (sizeof(T) == 4) {
            if (L <= 8) {  // 8-lane gathers cost about half of 16-lane ones
                const auto mask = static_cast<__mmask8>((1u << n) - 1u);
                const __m256i idx8 = _mm512_castsi512_si256(idx);
                for (; c < cols; ++c)
                    _mm256_mask_storeu_ps(reinterpret_cast<float*>(Xt + c * L), mask,
                                          _mm256_mmask_i32gather_ps(_mm256_setzero_ps(), mask, idx8, reinterpret_cast<const float*>(X + c), 4));
            }
            const auto mask = static_cast<__mmask16>((1u << n) - 1u);
            for (; c < cols; ++c)
                _mm512_mask_storeu_ps(reinterpret_cast<float*>(Xt + c * L), mask,
                                      _mm512_mask_i32gather_ps(_mm512_setzero_ps(), mask, idx, reinterpret_cast<const float*>(X + c), 4));
        } else if (L <= 8) {
            const auto mask = static_cast<__mmask8>((1u << n) - 1u);
            for (; c < cols; ++c)
                _mm512_mask_storeu_pd(reinterpret_cast<double*>(Xt + c * L), mask,
                                      _mm512_mask_i32gather_pd(_mm512_setzero_pd(), mask, _mm512_castsi512_si256(idx),
                                                               reinterpret_cast<const double*>(X + c), 8));
        }
    }
#endif
    for (; c < cols; ++c)
        for (std::int64_t j = 0; j < L; ++j) Xt[c * L + j] = X[j * cols + c];
}

// S (Lq × Lk, leading dimension block_k) = the scores of leading index t, −inf where masked (the
// general kernels' raw_scores + finish_scores without a modifier). Kt: Kᵀ of t (d × Lk).
template <class T>
void small_scores(const Problem<T>& p, std::int64_t t, const T* Kt, T* S) {
    small_gemm<T>(p.Lq, p.Lk, p.d, p.scale, p.q + t * p.Lq * p.d, p.d, 1, Kt, p.Lk, S, block_k);
    if (const Broadcast<T>& b = p.bias) {  // add_operand with the leading offset (two divisions) out of the row loop
        const T* src = b.data + p.lead(b, t);
        for (std::int64_t r = 0; r < p.Lq; ++r, src += b.s[2]) {
            T* dst = S + r * block_k;
            if (b.s[3]) RowMap<T>(dst, p.Lk) += p.bias_scale * ConstRowMap<T>(src, p.Lk);
            else RowMap<T>(dst, p.Lk) += p.bias_scale * src[0];
        }
    }
    p.outer_terms(t, 0, p.Lq, 0, p.Lk, S, TileKind::full);
}

template <class T>
void small_forward(const Problem<T>& p, AttentionSaved<T>& saved, const AttentionOptions& opt) {
    SmallScratch<T>& s = SmallScratch<T>::get();
    const std::int64_t rows = p.Lq, cols = p.Lk;
    ensure(s.Kt, p.d * cols);
    ensure(s.S, block_q * block_k);
    ensure(s.acc, rows * p.dv);
    ensure(s.m, rows);
    ensure(s.l, rows);
    std::uint64_t* const keep_bits = saved.keep_bits.data();
    T* const S = s.S.data();
    for (std::int64_t t = 0; t < p.items; ++t) {
        small_transpose(p.k + t * cols * p.d, cols, p.d, s.Kt.data());
        small_scores(p, t, s.Kt.data(), S);
        if (opt.keep_scores)
            for (std::int64_t r = 0; r < rows; ++r) std::copy_n(S + r * block_k, cols, saved.scores.data() + (t * rows + r) * cols);
        // The softmax of one tile: S becomes the unnormalised P (online_softmax_tile's first tile,
        // whose rescale factors are exactly 0 and whose running sums start at 0).
        for (std::int64_t r = 0; r < rows; ++r) {
            T* row = S + r * block_k;
            const T m = detail::row_max(row, cols);
            s.m[static_cast<std::size_t>(r)] = m;
            if (m == neg_inf<T>) {
                std::fill_n(row, cols, T(0));
                continue;
            }
            s.l[static_cast<std::size_t>(r)] = detail::exp_shifted_sum(row, row, cols, m);
        }
        if (p.dropout) {
            std::uint64_t bits[block_q];
            p.keep_tile(t, 0, rows, 0, cols, nullptr, keep_bits, bits);
            for (std::int64_t r = 0; r < rows; ++r) detail::multiply_by_keep(S + r * block_k, S + r * block_k, cols, bits[r], p.drop_scale);
        }
        std::fill_n(s.acc.begin(), rows * p.dv, T(0));  // acc = 0 + P·V (beta = 1 as the general kernel: the same signed zeros)
        detail::tile_gemm<T>(rows, p.dv, cols, T(1), S, block_k, 1, p.v + t * cols * p.dv, p.dv, T(1), s.acc.data(), p.dv);
        T* O = saved.O.data() + t * rows * p.dv;
        T* lse = saved.lse.data() + t * rows;
        for (std::int64_t r = 0; r < rows; ++r) {
            RowMap<T> o(O + r * p.dv, p.dv);
            const T m = s.m[static_cast<std::size_t>(r)], l = s.l[static_cast<std::size_t>(r)];
            if (m == neg_inf<T>) {  // every key masked: output 0
                o.setZero();
                lse[r] = neg_inf<T>;
            } else {
                o = RowMap<T>(s.acc.data() + r * p.dv, p.dv) / l;
                lse[r] = m + std::log(l);
            }
        }
    }
}

// The backward of a one-tile problem. dQ, dK, dV are zero (or null), dbias is prepared as the general
// kernel prepares it (zeros for a broadcast bias; the kept scores or a fresh tensor for a full one);
// kept: the forward's scores or null; kept_keep: the forward's dropout bits or null.
template <class T>
void small_backward(const Problem<T>& p, T* dQ, T* dK, T* dV, T* dB, const Broadcast<T>& db_map, bool full_dbias, const T* dO,
                    const AttentionSaved<T>& saved, const T* kept, const std::uint64_t* kept_keep) {
    SmallScratch<T>& s = SmallScratch<T>::get();
    const std::int64_t rows = p.Lq, cols = p.Lk;
    if (!kept) ensure(s.Kt, p.d * cols);
    ensure(s.Vt, p.dv * cols);
    for (auto* buf : {&s.P, &s.Pd, &s.dS}) ensure(*buf, block_q * block_k);
    ensure(s.D, rows);
    T* const P = s.P.data();
    T* const dS = s.dS.data();
    for (std::int64_t t = 0; t < p.items; ++t) {
        const T* dO_t = dO + t * rows * p.dv;
        const T* O_t = saved.O.data() + t * rows * p.dv;
        const T* Qt = p.q + t * rows * p.d;
        small_transpose(p.v + t * cols * p.dv, cols, p.dv, s.Vt.data());
        for (std::int64_t i = 0; i < rows; ++i)  // D_i = rowsum(dO_i ⊙ O_i)
            s.D[static_cast<std::size_t>(i)] = (ConstRowMap<T>(dO_t + i * p.dv, p.dv) * ConstRowMap<T>(O_t + i * p.dv, p.dv)).sum();
        const T* S = P;
        std::int64_t lds = block_k;
        if (kept) {
            S = kept + t * rows * cols;
            lds = cols;
        } else {
            small_transpose(p.k + t * cols * p.d, cols, p.d, s.Kt.data());
            small_scores(p, t, s.Kt.data(), P);
        }
        const T* lse = saved.lse.data() + t * rows;
        for (std::int64_t r = 0; r < rows; ++r) {
            if (lse[r] == neg_inf<T>) RowMap<T>(P + r * block_k, cols).setZero();  // fully masked row: P = 0
            else detail::exp_shifted(S + r * lds, P + r * block_k, cols, lse[r]);
        }
        const T* Pd = P;  // dropout(P)
        std::uint64_t bits[block_q];
        if (p.dropout) {
            p.keep_tile(t, 0, rows, 0, cols, kept_keep, nullptr, bits);
            for (std::int64_t r = 0; r < rows; ++r) detail::multiply_by_keep(P + r * block_k, s.Pd.data() + r * block_k, cols, bits[r], p.drop_scale);
            Pd = s.Pd.data();
        }
        if (dV)  // dV += dropout(P)ᵀ·dO
            detail::tile_gemm<T>(cols, p.dv, rows, T(1), Pd, 1, block_k, dO_t, p.dv, T(1), dV + t * cols * p.dv, p.dv);
        // dS = P ⊙ (dropout_mask ⊙ (dO·Vᵀ) − D)
        small_gemm<T>(rows, cols, p.dv, T(1), dO_t, p.dv, 1, s.Vt.data(), cols, dS, block_k);
        for (std::int64_t r = 0; r < rows; ++r) {
            RowMap<T> ds(dS + r * block_k, cols);
            if (p.dropout) detail::multiply_by_keep(ds.data(), ds.data(), cols, bits[r], p.drop_scale);
            ds = RowMap<T>(P + r * block_k, cols) * (ds - s.D[static_cast<std::size_t>(r)]);
        }
        if (dB)  // dbias = bias_scale·reduce(dS), leading indices in order
            for (std::int64_t r = 0; r < rows; ++r) {
                T* dst = dB + p.lead(db_map, t) + r * db_map.s[2];
                RowMap<T> ds(dS + r * block_k, cols);
                if (full_dbias) RowMap<T>(dst, cols) = p.bias_scale * ds;
                else if (db_map.s[3]) RowMap<T>(dst, cols) += p.bias_scale * ds;
                else *dst += p.bias_scale * ds.sum();
            }
        if (dQ)  // dQ += scale·dS·K
            detail::tile_gemm<T>(rows, p.d, cols, p.scale, dS, block_k, 1, p.k + t * cols * p.d, p.d, T(1), dQ + t * rows * p.d, p.d);
        if (dK)  // dK += scale·dSᵀ·Q
            detail::tile_gemm<T>(cols, p.d, rows, p.scale, dS, 1, block_k, Qt, p.d, T(1), dK + t * cols * p.d, p.d);
    }
}

}  // namespace
}  // namespace autodiff

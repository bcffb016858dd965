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

// 8 rows × one full-width vector of C = acc·alpha + 0, acc = op(A)·B accumulated exactly as
// detail::micro_kernel does (the same broadcasts, one FMA per k in order): micro_kernel<T, 8, 1>
// with the + 0 of small_gemm_onto_zeros in its output pass (no second pass that waits on the
// stores).
template <class T>
inline void kernel8_onto_zeros(std::int64_t k, T alpha, const T* A, std::int64_t a_row, std::int64_t a_col, const T* B,
                               std::int64_t ldb, T* C, std::int64_t ldc) {
    using V = typename detail::Simd<T, detail::simd_bytes>::type;
    V acc[8];
    for (int r = 0; r < 8; ++r) acc[r] = V{};
    for (std::int64_t p = 0; p < k; ++p) {
        V b = detail::load<V>(B + p * ldb);
#if defined(__x86_64__) || defined(__i386__)
        asm("" : "+v"(b));
#endif
        for (int r = 0; r < 8; ++r) {
            const V a = A[r * a_row + p * a_col] - V{};
            acc[r] += a * b;
        }
    }
    for (int r = 0; r < 8; ++r) detail::store(C + r * ldc, acc[r] * alpha + T(0));
}

// C (m×n) = alpha·op(A)·B + C for a C that holds zeros, in small_gemm's 8-row blocks (tile_gemm's
// 6 + 2 rows leave the 2-row block waiting on the FMA latency): what tile_gemm with beta = 1 gives
// there (acc·alpha + 0, whichever product the compiler fuses into the add, since C·1 = 0 exactly)
// as the beta = 0 product, then + 0 (which turns a −0 into +0 as the add onto C does). Returns false,
// touching nothing, for shapes without 8-row blocks: the caller then runs tile_gemm with beta = 1
// itself. Float only: with these call sites in the double instantiation, one double case of
// tests/test_attention_small.cpp (Lq 9, Lk 1, where dS is pure rounding noise) differed from the
// general kernels by an ulp even where every new branch was off, a change in the compiler's
// contraction or inlining choices, not in the arithmetic written here.
template <class T>
[[nodiscard]] bool small_gemm_onto_zeros(std::int64_t m, std::int64_t n, std::int64_t k, T alpha, const T* A, std::int64_t a_row,
                                         std::int64_t a_col, const T* B, std::int64_t ldb, T* C, std::int64_t ldc) {
    using V = typename detail::Simd<T, detail::simd_bytes>::type;
    constexpr int W = detail::Simd<T, detail::simd_bytes>::lanes;
    if constexpr (sizeof(T) != 4) return false;  // double: the old call sites unchanged (see above)
    if (m % 8 != 0 || n > 2 * W) return false;
    if (n == W) {
        for (std::int64_t r = 0; r < m; r += 8) kernel8_onto_zeros<T>(k, alpha, A + r * a_row, a_row, a_col, B, ldb, C + r * ldc, ldc);
        return true;
    }
    for (std::int64_t r = 0; r < m; r += 8) detail::row_block<T, 8>(n, k, alpha, A + r * a_row, a_row, a_col, B, ldb, T(0), C + r * ldc, ldc);
    for (std::int64_t r = 0; r < m; ++r) {
        T* row = C + r * ldc;
        std::int64_t c = 0;
        for (; c + W <= n; c += W) detail::store(row + c, detail::load<V>(row + c) + T(0));
        for (; c < n; ++c) row[c] += T(0);
    }
    return true;
}

// Xt (cols × L, leading dimension L) = Xᵀ for the row-major (L × cols) X.
// A row of Xt at a time by masked gathers where AVX-512 has them (a scalar loop cost ~1 cycle per
// element: 10 % of a tiny step).
#if defined(__AVX512F__)
// Xt (16 × 8, leading dimension 8) = Xᵀ for a float X of 8 rows × 16 columns with leading dimension
// ld, in registers: three rounds of two-source permutes (24 in all), each exchanging one bit of the
// row index (which register) with one bit of the column index (which lane); 8 loads, 8 stores.
inline void transpose_8x16(const float* X, std::int64_t ld, float* Xt) {
    alignas(64) static constexpr std::int32_t idx[3][2][16] = {
        {{0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23}, {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31}},
        {{0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27}, {4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31}},
        {{0, 16, 4, 20, 8, 24, 12, 28, 1, 17, 5, 21, 9, 25, 13, 29}, {2, 18, 6, 22, 10, 26, 14, 30, 3, 19, 7, 23, 11, 27, 15, 31}}};
    __m512 v[8];
    for (int j = 0; j < 8; ++j) v[j] = _mm512_loadu_ps(X + j * ld);
    for (int round = 0; round < 3; ++round) {  // round 0 pairs registers j, j + 4; round 1 j, j + 2; round 2 j, j + 1
        const int bit = 4 >> round;
        const __m512i lo = _mm512_load_si512(idx[round][0]), hi = _mm512_load_si512(idx[round][1]);
        for (int j = 0; j < 8; ++j) {
            if (j & bit) continue;
            const __m512 a = v[j], b = v[j | bit];
            v[j] = _mm512_permutex2var_ps(a, lo, b);
            v[j | bit] = _mm512_permutex2var_ps(a, hi, b);
        }
    }
    for (int c = 0; c < 8; ++c) _mm512_storeu_ps(Xt + 16 * c, v[c]);  // register c: rows 2c and 2c + 1 of Xt
}
#endif

template <class T>
void small_transpose(const T* X, std::int64_t L, std::int64_t cols, T* Xt) {
    std::int64_t c = 0;
#if defined(__AVX512F__)
    if constexpr (sizeof(T) == 4)
        if (L == 8 && cols % 16 == 0) {  // the blog's shape: permutes instead of gathers (vgatherdps is slow on Zen 4)
            for (; c < cols; c += 16) transpose_8x16(X + c, cols, Xt + c * 8);
            return;
        }
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

#if defined(__AVX512F__)
// Two rows of at most 8 floats in one register: a in lanes 0-7, b in lanes 8-15, lanes past the
// rows' length (mask k) = fill.
inline __m512 load_two_rows(const float* a, const float* b, __mmask8 k, float fill) {
    const __m256 f = _mm256_set1_ps(fill);
    return _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_mask_loadu_ps(f, k, a)), _mm256_mask_loadu_ps(f, k, b), 1);
}
inline void store_two_rows(float* a, float* b, __mmask8 k, __m512 v) {
    _mm256_mask_storeu_ps(a, k, _mm512_castps512_ps256(v));
    _mm256_mask_storeu_ps(b, k, _mm512_extractf32x8_ps(v, 1));
}
// Each 8-lane half reduced into its first lane by detail::reduce's tree on 8 lanes (op(lanes 0-3,
// lanes 4-7), then op(0-1, 2-3), then op(0, 1)): the same order and operands as a row of up to 8
// elements in one 16-lane register, whose first step (op(lanes 0-7, padding)) returns lanes 0-7
// unchanged (max with −∞; +0 added to e^x ≥ +0).
template <class Op>
inline __m512 reduce_halves(__m512 v, Op op) {
    v = op(v, _mm512_shuffle_f32x4(v, v, _MM_SHUFFLE(2, 3, 0, 1)));
    v = op(v, _mm512_permute_ps(v, _MM_SHUFFLE(1, 0, 3, 2)));
    return op(v, _mm512_permute_ps(v, _MM_SHUFFLE(2, 3, 0, 1)));
}
inline float lane8(__m512 v) { return _mm256_cvtss_f32(_mm512_extractf32x8_ps(v, 1)); }
inline __m512 two_broadcasts(float a, float b) { return _mm512_insertf32x8(_mm512_set1_ps(a), _mm256_set1_ps(b), 1); }
#endif

// The one-tile softmax of rows [0, rows) of S (cols elements, leading dimension block_k): S becomes
// the unnormalised P, m and l the rows' maxima and sums (detail::row_max and exp_shifted_sum; a row
// whose maximum is −∞ becomes 0 and keeps no sum). Rows of at most 8 floats go two to a register:
// one exp and one reduction tree for both, the same bits.
template <class T>
void small_softmax(T* S, std::int64_t rows, std::int64_t cols, T* m, T* l) {
    std::int64_t r = 0;
#if defined(__AVX512F__)
    if constexpr (sizeof(T) == 4)
        if (cols <= 8) {
            const auto k = static_cast<__mmask8>((1u << cols) - 1u);
            constexpr float ninf = -std::numeric_limits<float>::infinity();
            const auto max_op = [](__m512 a, __m512 b) {  // detail::nan_max(a, b): b where b > a or b is NaN
                return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(b, a, _CMP_GT_OQ) | _mm512_cmp_ps_mask(b, b, _CMP_UNORD_Q), a, b);
            };
            const __m512i spread = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 8, 8, 8, 8, 8, 8, 8, 8);
            for (; r + 2 <= rows; r += 2) {
                float* a = S + r * block_k;
                float* b = a + block_k;
                const __m512 x = load_two_rows(a, b, k, ninf);
                const __m512 mx = reduce_halves(x, max_op);
                const float m0 = _mm512_cvtss_f32(mx), m1 = lane8(mx);
                if (m0 == ninf || m1 == ninf) break;  // a fully masked row: the rows from here one at a time
                const __m512 e = detail::vexp512(_mm512_sub_ps(x, _mm512_permutexvar_ps(spread, mx)));
                store_two_rows(a, b, k, e);
                const __m512 sum = reduce_halves(e, [](__m512 u, __m512 w) { return _mm512_add_ps(u, w); });
                m[r] = m0, m[r + 1] = m1;
                l[r] = _mm512_cvtss_f32(sum), l[r + 1] = lane8(sum);
            }
        }
#endif
    for (; r < rows; ++r) {
        T* row = S + r * block_k;
        const T mr = detail::row_max(row, cols);
        m[r] = mr;
        if (mr == neg_inf<T>) {
            std::fill_n(row, cols, T(0));
            continue;
        }
        l[r] = detail::exp_shifted_sum(row, row, cols, mr);
    }
}

// P (rows × cols, leading dimension block_k) = e^(S − lse) row by row (S: leading dimension lds), 0 in a
// row whose lse is −∞ (fully masked); two rows of at most 8 floats to a register.
template <class T>
void small_exp_rows(const T* S, std::int64_t lds, const T* lse, std::int64_t rows, std::int64_t cols, T* P) {
    std::int64_t r = 0;
#if defined(__AVX512F__)
    if constexpr (sizeof(T) == 4)
        if (cols <= 8) {
            const auto k = static_cast<__mmask8>((1u << cols) - 1u);
            constexpr float ninf = -std::numeric_limits<float>::infinity();
            for (; r + 2 <= rows; r += 2) {
                if (lse[r] == ninf || lse[r + 1] == ninf) break;
                const __m512 x = load_two_rows(S + r * lds, S + (r + 1) * lds, k, ninf);
                store_two_rows(P + r * block_k, P + (r + 1) * block_k, k,
                               detail::vexp512(_mm512_sub_ps(x, two_broadcasts(lse[r], lse[r + 1]))));
            }
        }
#endif
    for (; r < rows; ++r) {
        if (lse[r] == neg_inf<T>) RowMap<T>(P + r * block_k, cols).setZero();
        else detail::exp_shifted(S + r * lds, P + r * block_k, cols, lse[r]);
    }
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

// dst (rows × cols, leading dimension cols) = S (leading dimension block_k): the kept scores; rows of
// 8 floats two to a register (a copy_n per row was a memmove call per 8 elements).
template <class T>
void small_copy_rows(const T* S, std::int64_t rows, std::int64_t cols, T* dst) {
    std::int64_t r = 0;
#if defined(__AVX512F__)
    if constexpr (sizeof(T) == 4)
        if (cols == 8) {
            for (; r + 2 <= rows; r += 2) _mm512_storeu_ps(dst + r * 8, load_two_rows(S + r * block_k, S + (r + 1) * block_k, 0xFF, 0.0f));
            if (r < rows) _mm256_storeu_ps(dst + r * 8, _mm256_loadu_ps(S + r * block_k));
            return;
        }
#endif
    for (; r < rows; ++r) std::copy_n(S + r * block_k, cols, dst + r * cols);
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
        if (opt.keep_scores) small_copy_rows(S, rows, cols, saved.scores.data() + t * rows * cols);
        // The softmax of one tile: S becomes the unnormalised P (online_softmax_tile's first tile,
        // whose rescale factors are exactly 0 and whose running sums start at 0).
        small_softmax(S, rows, cols, s.m.data(), s.l.data());
        if (p.dropout) {
            std::uint64_t bits[block_q];
            p.keep_tile(t, 0, rows, 0, cols, nullptr, keep_bits, bits);
            for (std::int64_t r = 0; r < rows; ++r) detail::multiply_by_keep(S + r * block_k, S + r * block_k, cols, bits[r], p.drop_scale);
        }
        // acc = 0 + P·V (onto zeros as the general kernel: the same signed zeros)
        if (!small_gemm_onto_zeros<T>(rows, p.dv, cols, T(1), S, block_k, 1, p.v + t * cols * p.dv, p.dv, s.acc.data(), p.dv)) {
            std::fill_n(s.acc.begin(), rows * p.dv, T(0));
            detail::tile_gemm<T>(rows, p.dv, cols, T(1), S, block_k, 1, p.v + t * cols * p.dv, p.dv, T(1), s.acc.data(), p.dv);
        }
        T* O = saved.O.data() + t * rows * p.dv;
        T* lse = saved.lse.data() + t * rows;
        std::int64_t r0 = 0;
#if defined(__AVX512F__)
        if constexpr (sizeof(T) == 4)
            if (p.dv <= 16) {  // a row of O in one register: the same division as Eigen's, without its loop
                const auto k = static_cast<__mmask16>((1u << p.dv) - 1u);
                for (; r0 < rows; ++r0) {
                    const float m = s.m[static_cast<std::size_t>(r0)], l = s.l[static_cast<std::size_t>(r0)];
                    if (m == neg_inf<T>) {
                        _mm512_mask_storeu_ps(O + r0 * p.dv, k, _mm512_setzero_ps());
                        lse[r0] = neg_inf<T>;
                    } else {
                        _mm512_mask_storeu_ps(O + r0 * p.dv, k, _mm512_div_ps(_mm512_maskz_loadu_ps(k, s.acc.data() + r0 * p.dv), _mm512_set1_ps(l)));
                        lse[r0] = m + std::log(l);
                    }
                }
            }
#endif
        for (std::int64_t r = r0; r < rows; ++r) {
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
        small_exp_rows(S, lds, lse, rows, cols, P);
        const T* Pd = P;  // dropout(P)
        std::uint64_t bits[block_q];
        if (p.dropout) {
            p.keep_tile(t, 0, rows, 0, cols, kept_keep, nullptr, bits);
            for (std::int64_t r = 0; r < rows; ++r) detail::multiply_by_keep(P + r * block_k, s.Pd.data() + r * block_k, cols, bits[r], p.drop_scale);
            Pd = s.Pd.data();
        }
        if (dV)  // dV += dropout(P)ᵀ·dO
            if (!small_gemm_onto_zeros<T>(cols, p.dv, rows, T(1), Pd, 1, block_k, dO_t, p.dv, dV + t * cols * p.dv, p.dv))
                detail::tile_gemm<T>(cols, p.dv, rows, T(1), Pd, 1, block_k, dO_t, p.dv, T(1), dV + t * cols * p.dv, p.dv);
        // dS = P ⊙ (dropout_mask ⊙ (dO·Vᵀ) − D)
        small_gemm<T>(rows, cols, p.dv, T(1), dO_t, p.dv, 1, s.Vt.data(), cols, dS, block_k);
        std::int64_t r_ds = 0, r_db = 0;  // rows done two to a register (8 keys or fewer, float)
#if defined(__AVX512F__)
        if constexpr (sizeof(T) == 4)
            if (cols <= 8) {
                const auto k = static_cast<__mmask8>((1u << cols) - 1u);
                if (!p.dropout)
                    for (; r_ds + 2 <= rows; r_ds += 2) {  // the same P·(dS − D) per element as below
                        float* a = dS + r_ds * block_k;
                        const __m512 x = _mm512_sub_ps(load_two_rows(a, a + block_k, k, 0.0f),
                                                       two_broadcasts(s.D[static_cast<std::size_t>(r_ds)], s.D[static_cast<std::size_t>(r_ds + 1)]));
                        store_two_rows(a, a + block_k, k, _mm512_mul_ps(load_two_rows(P + r_ds * block_k, P + (r_ds + 1) * block_k, k, 0.0f), x));
                    }
                if (dB && full_dbias) {  // the kept scores' buffer: dB = bias_scale·dS
                    float* dst = dB + p.lead(db_map, t);
                    const __m512 bs = _mm512_set1_ps(p.bias_scale);
                    for (; r_db + 2 <= rows && r_db + 2 <= r_ds; r_db += 2)
                        store_two_rows(dst + r_db * db_map.s[2], dst + (r_db + 1) * db_map.s[2], k,
                                       _mm512_mul_ps(bs, load_two_rows(dS + r_db * block_k, dS + (r_db + 1) * block_k, k, 0.0f)));
                }
            }
#endif
        for (std::int64_t r = r_ds; r < rows; ++r) {
            RowMap<T> ds(dS + r * block_k, cols);
            if (p.dropout) detail::multiply_by_keep(ds.data(), ds.data(), cols, bits[r], p.drop_scale);
            ds = RowMap<T>(P + r * block_k, cols) * (ds - s.D[static_cast<std::size_t>(r)]);
        }
        if (dB)  // dbias = bias_scale·reduce(dS), leading indices in order
            for (std::int64_t r = r_db; r < rows; ++r) {
                T* dst = dB + p.lead(db_map, t) + r * db_map.s[2];
                RowMap<T> ds(dS + r * block_k, cols);
                if (full_dbias) RowMap<T>(dst, cols) = p.bias_scale * ds;
                else if (db_map.s[3]) RowMap<T>(dst, cols) += p.bias_scale * ds;
                else *dst += p.bias_scale * ds.sum();
            }
        if (dQ)  // dQ += scale·dS·K
            if (!small_gemm_onto_zeros<T>(rows, p.d, cols, p.scale, dS, block_k, 1, p.k + t * cols * p.d, p.d, dQ + t * rows * p.d, p.d))
                detail::tile_gemm<T>(rows, p.d, cols, p.scale, dS, block_k, 1, p.k + t * cols * p.d, p.d, T(1), dQ + t * rows * p.d, p.d);
        if (dK)  // dK += scale·dSᵀ·Q
            if (!small_gemm_onto_zeros<T>(cols, p.d, rows, p.scale, dS, 1, block_k, Qt, p.d, dK + t * cols * p.d, p.d))
                detail::tile_gemm<T>(cols, p.d, rows, p.scale, dS, 1, block_k, Qt, p.d, T(1), dK + t * cols * p.d, p.d);
    }
}

}  // namespace
}  // namespace autodiff

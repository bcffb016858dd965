// The GPU attention kernels: forward, backward (dK/dV over key blocks, dQ over query blocks), the
// broadcast-bias gradient reduction, and the dtype conversions. The maths and the API are in
// include/autodiff/cuda/attention.hpp; validation and allocation in attention.cpp.
//
// Every kernel works on one tile of the padded rank-4 scores (B, H, Lq, Lk), leading index t = b·H + h,
// with 256 threads (8 warps). Operands are staged in shared memory, zero-padded to a multiple of 16 in
// every dimension; tile products go through block_mma (WMMA on the tensor cores for bf16/fp16, fp32 FMA
// for float32). Elementwise passes use a coalesced element-per-thread mapping.

#include "attention_kernels.hpp"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cstdint>
#include <limits>
#include <type_traits>

#include "autodiff/random.hpp"

namespace autodiff {

namespace {

// 8 warps a block. The forward and dQ kernels are held to 128 registers so that two blocks fit an SM
// (their shared memory allows it); the dK/dV kernel's shared memory allows one block anyway.
constexpr int threads = 256;
constexpr int warps = threads / 32;

// Tile sizes: 64×64 with 16-bit operands, 32×32 in float32 (whose staged operands are twice as large).
template <class C>
struct Tile {
    static constexpr int rows = sizeof(C) == 4 ? 32 : 64;  // query rows
    static constexpr int cols = rows;                        // keys
};

__host__ __device__ constexpr int round16(int x) { return (x + 15) / 16 * 16; }
// Leading dimensions of staged tiles: 8 elements (16 bytes in bf16) of padding against bank conflicts,
// keeping WMMA's 16-byte alignment of every row.
__host__ __device__ constexpr int staged_ld(int cols) { return cols + 8; }

__device__ inline float to_float(float x) { return x; }
__device__ inline float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ inline float to_float(__half x) { return __half2float(x); }
template <class C>
__device__ inline C from_float(float x) {
    if constexpr (std::is_same_v<C, float>) return x;
    else if constexpr (std::is_same_v<C, __nv_bfloat16>) return __float2bfloat16_rn(x);
    else return __float2half_rn(x);
}

// C (m × n, ldc, fp32, shared) = (accumulate ? C : 0) + op(A)·op(B), all threads of the block; m, n, k
// multiples of 16. op(A) is m × k: A[r·lda + c] when !TA, A stored k × m (A[c·lda + r]) when TA; op(B)
// is k × n: B[r·ldb + c] when !TB, stored n × k when TB. Ends with a barrier.
template <bool TA, bool TB, class C>
__device__ void block_mma(float* Cm, int ldc, const C* A, int lda, const C* B, int ldb, int m, int n, int k, bool accumulate) {
    if constexpr (std::is_same_v<C, float>) {
        for (int e = threadIdx.x; e < m * n; e += threads) {
            const int r = e / n, c = e % n;
            float acc = accumulate ? Cm[r * ldc + c] : 0.0f;
            for (int q = 0; q < k; ++q) acc = fmaf(TA ? A[q * lda + r] : A[r * lda + q], TB ? B[c * ldb + q] : B[q * ldb + c], acc);
            Cm[r * ldc + c] = acc;
        }
    } else {
        namespace wmma = nvcuda::wmma;
        using LayoutA = std::conditional_t<TA, wmma::col_major, wmma::row_major>;
        using LayoutB = std::conditional_t<TB, wmma::col_major, wmma::row_major>;
        const int warp = static_cast<int>(threadIdx.x) / 32;
        const int tiles_n = n / 16;
        for (int t = warp; t < (m / 16) * tiles_n; t += warps) {
            const int m0 = t / tiles_n * 16, n0 = t % tiles_n * 16;
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
            if (accumulate) wmma::load_matrix_sync(acc, Cm + m0 * ldc + n0, ldc, wmma::mem_row_major);
            else wmma::fill_fragment(acc, 0.0f);
            for (int k0 = 0; k0 < k; k0 += 16) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, C, LayoutA> a;
                wmma::fragment<wmma::matrix_b, 16, 16, 16, C, LayoutB> b;
                wmma::load_matrix_sync(a, TA ? A + k0 * lda + m0 : A + m0 * lda + k0, lda);
                wmma::load_matrix_sync(b, TB ? B + n0 * ldb + k0 : B + k0 * ldb + n0, ldb);
                wmma::mma_sync(acc, a, b, acc);
            }
            wmma::store_matrix_sync(Cm + m0 * ldc + n0, acc, ldc, wmma::mem_row_major);
        }
    }
    __syncthreads();
}

// dst (rows × padded cols, ld) = src rows [r0, r0 + rows) of a (len × width) matrix with row stride
// `stride`, zero outside. Rows of 16 bytes' worth of elements go through cp.async (queued, not waited
// for: the caller commits and waits, so the copies of several tiles are in flight together); other
// widths element by element.
template <class C>
__device__ void stage(C* dst, int ld, const C* src, std::int64_t stride, std::int64_t r0, std::int64_t len, int width, int rows, int padded) {
    constexpr int vec = 16 / sizeof(C);
    if (width % vec == 0 && stride % vec == 0) {
        const int chunks = padded / vec;
        for (int e = threadIdx.x; e < rows * chunks; e += threads) {
            const int r = e / chunks, c = e % chunks * vec;
            const std::int64_t row = r0 + r;
            C* to = dst + r * ld + c;
            if (row < len && c < width) {
                const auto shared = static_cast<unsigned>(__cvta_generic_to_shared(to));
                asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(shared), "l"(src + row * stride + c));
            } else {
                *reinterpret_cast<int4*>(to) = make_int4(0, 0, 0, 0);
            }
        }
        return;
    }
    for (int e = threadIdx.x; e < rows * padded; e += threads) {
        const int r = e / padded, c = e % padded;
        const std::int64_t row = r0 + r;
        dst[r * ld + c] = (row < len && c < width) ? src[row * stride + c] : from_float<C>(0.0f);
    }
}

// Waits for this thread's cp.async copies, then for the whole block.
__device__ inline void staged() {
    asm volatile("cp.async.commit_group;\n" ::);
    asm volatile("cp.async.wait_group 0;\n" ::);
    __syncthreads();
}

using Problem = detail::AttentionProblem;

// The bias of one leading index t as the kernels read it: staged tile by tile into shared memory when
// its rows are contiguous in whole 16-byte chunks (tile(), after stage_tile()), else from global memory.
template <class C>
struct BiasView {
    const C* base = nullptr;  // bias at (b, h, 0, 0) of t = b·H + h; null: no bias
    std::int64_t si = 0, sj = 0;
    bool staged = false;
    C* tile = nullptr;  // (rows × cols, ld) shared memory
    int ld = 0;

    __device__ BiasView(const Problem& p, std::int64_t t, C* shared, int shared_ld) {
        if (!p.bias) return;
        base = static_cast<const C*>(p.bias) + t / p.heads * p.bias_s[0] + t % p.heads * p.bias_s[1];
        si = p.bias_s[2];
        sj = p.bias_s[3];
        constexpr int vec = 16 / sizeof(C);
        staged = sj == 1 && si % vec == 0 && p.Lk % vec == 0;
        tile = shared;
        ld = shared_ld;
    }
    // Queues the copy of the tile at rows [i0, i0 + rows), keys [j0, j0 + cols) (zero outside).
    __device__ void stage_tile(const Problem& p, std::int64_t i0, std::int64_t j0, int rows, int cols) {
        if (!staged) return;
        // Columns past Lk: a whole chunk is in or out (Lk is a multiple of the chunk).
        const int width = static_cast<int>(min(std::int64_t{cols}, p.Lk - j0));
        stage(tile, ld, base + j0, si, i0, si == 0 ? std::int64_t{1} << 62 : p.Lq, width, rows, cols);
    }
    // The bias of element (i0 + r, j0 + c).
    __device__ float at(std::int64_t i0, std::int64_t j0, int r, int c) const {
        if (staged) return to_float(tile[r * ld + c]);
        return to_float(base[(i0 + r) * si + (j0 + c) * sj]);
    }
};

// The masked, biased score of element (i0 + r, j0 + c) of leading index t from s = (Q·Kᵀ)_ij; −inf
// where masked or out of range. kp: the key-padding row of t (null: none).
template <class C>
__device__ inline float score(const Problem& p, const BiasView<C>& bias, const bool* kp, std::int64_t i0, std::int64_t j0, int r, int c,
                              float s) {
    constexpr float neg_inf = -std::numeric_limits<float>::infinity();
    const std::int64_t i = i0 + r, j = j0 + c;
    if (i >= p.Lq || j >= p.Lk) return neg_inf;
    if (p.causal && j > i) return neg_inf;
    if (kp && !kp[j]) return neg_inf;
    float x = p.scale * s;
    if (bias.base) x += p.bias_scale * bias.at(i0, j0, r, c);
    return x;
}

__device__ inline const bool* key_padding_row(const Problem& p, std::int64_t t) {
    return p.key_padding ? p.key_padding + t / p.kp_div * p.Lk : nullptr;
}

// The dropout factor of element (t, i, j): the CPU's decision (dropout_keeps), times 1/(1 − rate).
__device__ inline float dropout_factor(const Problem& p, std::int64_t t, std::int64_t i, std::int64_t j) {
    if (!p.dropout) return 1.0f;
    if (p.drop_all) return 0.0f;
    const auto index = static_cast<std::uint64_t>((t * p.Lq + i) * p.Lk + j);
    return Philox4x32::bits(p.seed, p.offset, index) >= p.threshold ? p.drop_scale : 0.0f;
}

// Whether any key of [j0, j0 + cols) is kept by the key-padding mask for leading index t (block-wide).
__device__ bool keys_kept(const Problem& p, std::int64_t t, std::int64_t j0, int cols) {
    int kept = 0;
    if (!p.key_padding) return true;
    for (int c = threadIdx.x; c < cols; c += threads) {
        const std::int64_t j = j0 + c;
        if (j < p.Lk && p.key_padding[t / p.kp_div * p.Lk + j]) kept = 1;
    }
    return __syncthreads_or(kept) != 0;
}

// The key blocks a query block [i0, i0 + rows) sees: [0, end).
__device__ inline std::int64_t key_block_end(const Problem& p, std::int64_t i0, int rows, int cols) {
    const std::int64_t all = (p.Lk + cols - 1) / cols;
    if (!p.causal) return all;
    const std::int64_t last_row = min(i0 + rows, p.Lq) - 1;
    return min(all, last_row / cols + 1);
}

// ---- forward ----------------------------------------------------------------------------------------
// Q (t, Lq, d), K (t, Lk, d), V (t, Lk, dv) -> O (t, Lq, dv), lse (t, Lq). Grid: (query blocks, t).
// Online softmax over key blocks: m = running max, l = running Σ e^(s − m) (before dropout), O
// accumulates dropout(e^(s − m))·V in fp32 shared memory and is divided by l at the end.
template <class C>
__global__ void __launch_bounds__(threads, 2) attention_forward_kernel(Problem p, const C* Q, const C* K, const C* V, C* O, float* lse) {
    constexpr int R = Tile<C>::rows, N = Tile<C>::cols, per_row = threads / R, cols_per_thread = N / per_row;
    constexpr float neg_inf = -std::numeric_limits<float>::infinity();
    const int DP = round16(p.d), DVP = round16(p.dv), ldq = staged_ld(DP), ldv = staged_ld(DVP), lds = N + 4, ldp = staged_ld(N);
    const std::int64_t t = blockIdx.y, i0 = std::int64_t{blockIdx.x} * R;
    extern __shared__ __align__(128) unsigned char smem[];
    C* sQ = reinterpret_cast<C*>(smem);  // (R, DP)
    C* sK = sQ + R * ldq;                // (N, DP)
    C* sV = sK + N * ldq;                // (N, DVP)
    C* sP = sV + N * ldv;                // (R, N): dropout(e^(s − m))
    // The bias tile (when staged) shares sP's space: the score pass reads it, the row pass writes P
    // after a barrier, and the next tile's copy starts after the P·V product's barrier.
    C* sB = sP;
    float* sS = reinterpret_cast<float*>(sP + R * ldp);  // (R, N) scores
    float* sO = sS + R * lds;                             // (R, DVP) accumulator

    BiasView<C> bias(p, t, sB, ldp);
    const bool* kp = key_padding_row(p, t);
    stage(sQ, ldq, Q + t * p.Lq * p.d, p.d, i0, p.Lq, p.d, R, DP);
    for (int e = threadIdx.x; e < R * DVP; e += threads) sO[e] = 0.0f;
    staged();
    const int row = static_cast<int>(threadIdx.x) / per_row, part = static_cast<int>(threadIdx.x) % per_row;
    const std::int64_t i = i0 + row;
    float m = neg_inf, l = 0.0f;
    const std::int64_t end = key_block_end(p, i0, R, N);
    for (std::int64_t kb = 0; kb < end; ++kb) {
        const std::int64_t j0 = kb * N;
        if (!keys_kept(p, t, j0, N)) continue;
        __syncthreads();
        stage(sK, ldq, K + t * p.Lk * p.d, p.d, j0, p.Lk, p.d, N, DP);
        stage(sV, ldv, V + t * p.Lk * p.dv, p.dv, j0, p.Lk, p.dv, N, DVP);
        bias.stage_tile(p, i0, j0, R, N);
        staged();
        block_mma<false, true>(sS, lds, sQ, ldq, sK, ldq, R, N, DP, false);
        for (int e = threadIdx.x; e < R * N; e += threads) {
            const int r = e / N, c = e % N;
            sS[r * lds + c] = score<C>(p, bias, kp, i0, j0, r, c, sS[r * lds + c]);
        }
        __syncthreads();
        // Row statistics: per_row consecutive threads share a row, each with cols_per_thread columns.
        float* s = sS + row * lds + part * cols_per_thread;
        float tile_max = neg_inf;
        for (int c = 0; c < cols_per_thread; ++c) tile_max = fmaxf(tile_max, s[c]);
        for (int o = 1; o < per_row; o <<= 1) tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, o));
        const float m_new = fmaxf(m, tile_max);
        // A row with nothing kept so far keeps m = −inf, l = 0 and adds zeros.
        const float alpha = m_new == neg_inf ? 1.0f : __expf(m - m_new);
        float sum = 0.0f;
        C* prow = sP + row * ldp + part * cols_per_thread;
        for (int c = 0; c < cols_per_thread; ++c) {
            const float e = m_new == neg_inf ? 0.0f : __expf(s[c] - m_new);
            sum += e;
            prow[c] = from_float<C>(e * dropout_factor(p, t, i, j0 + part * cols_per_thread + c));
        }
        for (int o = 1; o < per_row; o <<= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
        l = l * alpha + sum;
        m = m_new;
        for (int c = part; c < DVP; c += per_row) sO[row * DVP + c] *= alpha;
        __syncthreads();
        block_mma<false, false>(sO, DVP, sP, ldp, sV, ldv, R, DVP, N, true);
    }
    __syncthreads();
    if (i < p.Lq) {
        const float inv = l > 0.0f ? 1.0f / l : 0.0f;
        for (int c = part; c < p.dv; c += per_row) O[(t * p.Lq + i) * p.dv + c] = from_float<C>(sO[row * DVP + c] * inv);
        if (part == 0) lse[t * p.Lq + i] = l > 0.0f ? m + logf(l) : neg_inf;
    }
}

// ---- backward ---------------------------------------------------------------------------------------
// Forward (above): O = dropout(softmax(S))·V. D_i = rowsum(dO_i ⊙ O_i): dO, O (t, Lq, dv) -> D (t, Lq).
template <class C>
__global__ void attention_row_dot_kernel(std::int64_t rows, int dv, const C* dO, const C* O, float* D) {
    const std::int64_t r = blockIdx.x * std::int64_t{warps} + threadIdx.x / 32;
    if (r >= rows) return;
    float acc = 0.0f;
    for (int c = threadIdx.x % 32; c < dv; c += 32) acc += to_float(dO[r * dv + c]) * to_float(O[r * dv + c]);
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (threadIdx.x % 32 == 0) D[r] = acc;
}

// One score tile's P and dS, elementwise, from sS = Q·Kᵀ and sdP = dO·Vᵀ (both (R, N) fp32):
//   P = e^(S − lse) (0 where masked or the row is fully masked), factor = dropout_factor
//   sP  <- P·factor                       (for dV = dropout(P)ᵀ·dO)       when write_dropped_p
//   dS  = P ⊙ (dP·factor − D) -> sdS (operand type), and bias_scale·dS or dS to the bias gradient
template <class C>
__device__ void probabilities_and_dS(const Problem& p, const BiasView<C>& bias, const bool* kp, std::int64_t t, std::int64_t i0, std::int64_t j0,
                                     const float* sS, const float* sdP,
                                     int lds, C* sP, C* sdS, int ldp, const float* s_lse, const float* s_D, C* dbias_full,
                                     float* dS_scratch) {
    constexpr int R = Tile<C>::rows, N = Tile<C>::cols;
    for (int e = threadIdx.x; e < R * N; e += threads) {
        const int r = e / N, c = e % N;
        const std::int64_t i = i0 + r, j = j0 + c;
        const float s = score<C>(p, bias, kp, i0, j0, r, c, sS[r * lds + c]);
        const float P = (s == -std::numeric_limits<float>::infinity() || s_lse[r] == -std::numeric_limits<float>::infinity())
                            ? 0.0f : __expf(s - s_lse[r]);
        const float factor = dropout_factor(p, t, i, j);
        if (sP) sP[r * ldp + c] = from_float<C>(P * factor);
        const float dS = P * (sdP[r * lds + c] * factor - s_D[r]);
        sdS[r * ldp + c] = from_float<C>(dS);
        if (i < p.Lq && j < p.Lk) {
            const std::int64_t at = (t * p.Lq + i) * p.Lk + j;
            if (dbias_full) dbias_full[at] = from_float<C>(p.bias_scale * dS);
            if (dS_scratch) dS_scratch[at] = dS;
        }
    }
    __syncthreads();
}

// dK, dV for key block [j0, j0 + N) of leading index t, looping over the query blocks that see it;
// dS of each visited tile goes to the bias gradient (full shape, in place) or to the fp32 scratch.
// Grid: (key blocks, t). Skipped tiles leave the bias gradient as it was (zeroed before when masked).
template <class C>
__global__ void __launch_bounds__(threads) attention_dkdv_kernel(Problem p, const C* Q, const C* K, const C* V, const C* dO, const float* lse,
                                                                 const float* D, C* dK, C* dV, C* dbias_full, float* dS_scratch) {
    constexpr int R = Tile<C>::rows, N = Tile<C>::cols;
    const int DP = round16(p.d), DVP = round16(p.dv), ldq = staged_ld(DP), ldv = staged_ld(DVP), lds = N + 4, ldp = staged_ld(N);
    const std::int64_t t = blockIdx.y, j0 = std::int64_t{blockIdx.x} * N;
    extern __shared__ __align__(128) unsigned char smem[];
    C* sK = reinterpret_cast<C*>(smem);  // (N, DP)
    C* sV = sK + N * ldq;                // (N, DVP)
    C* sQ = sV + N * ldv;                // (R, DP)
    C* sdO = sQ + R * ldq;               // (R, DVP)
    C* sP = sdO + R * ldv;               // (R, N) dropout(P)
    C* sdS = sP + R * ldp;               // (R, N)
    // The bias tile (when staged) shares sP's space: probabilities_and_dS reads each element's bias
    // before the same thread writes that element's P.
    C* sB = sP;
    float* sS = reinterpret_cast<float*>(sdS + R * ldp);  // (R, N)
    float* sdP = sS + R * lds;                             // (R, N)
    float* sdK = sdP + R * lds;                            // (N, DP)
    float* sdV = sdK + N * DP;                             // (N, DVP)
    float* s_lse = sdV + N * DVP;                          // (R)
    float* s_D = s_lse + R;                                // (R)

    BiasView<C> bias(p, t, sB, ldp);
    const bool* kp = key_padding_row(p, t);
    stage(sK, ldq, K + t * p.Lk * p.d, p.d, j0, p.Lk, p.d, N, DP);
    stage(sV, ldv, V + t * p.Lk * p.dv, p.dv, j0, p.Lk, p.dv, N, DVP);
    staged();
    for (int e = threadIdx.x; e < N * DP; e += threads) sdK[e] = 0.0f;
    for (int e = threadIdx.x; e < N * DVP; e += threads) sdV[e] = 0.0f;
    const bool any_key = keys_kept(p, t, j0, N);
    // Causal: query blocks before the first row that sees key j0 are skipped.
    const std::int64_t q_blocks = (p.Lq + R - 1) / R, first = p.causal ? j0 / R : 0;
    for (std::int64_t qb = any_key ? first : q_blocks; qb < q_blocks; ++qb) {
        const std::int64_t i0 = qb * R;
        __syncthreads();
        stage(sQ, ldq, Q + t * p.Lq * p.d, p.d, i0, p.Lq, p.d, R, DP);
        stage(sdO, ldv, dO + t * p.Lq * p.dv, p.dv, i0, p.Lq, p.dv, R, DVP);
        bias.stage_tile(p, i0, j0, R, N);
        for (int r = threadIdx.x; r < R; r += threads) {
            const bool in = i0 + r < p.Lq;
            s_lse[r] = in ? lse[t * p.Lq + i0 + r] : -std::numeric_limits<float>::infinity();
            s_D[r] = in ? D[t * p.Lq + i0 + r] : 0.0f;
        }
        staged();
        block_mma<false, true>(sS, lds, sQ, ldq, sK, ldq, R, N, DP, false);
        block_mma<false, true>(sdP, lds, sdO, ldv, sV, ldv, R, N, DVP, false);
        probabilities_and_dS(p, bias, kp, t, i0, j0, sS, sdP, lds, sP, sdS, ldp, s_lse, s_D, dbias_full, dS_scratch);
        block_mma<true, false>(sdV, DVP, sP, ldp, sdO, ldv, N, DVP, R, true);
        block_mma<true, false>(sdK, DP, sdS, ldp, sQ, ldq, N, DP, R, true);
    }
    __syncthreads();
    for (int e = threadIdx.x; e < N * p.d; e += threads) {
        const int r = e / p.d, c = e % p.d;
        if (j0 + r < p.Lk && dK) dK[(t * p.Lk + j0 + r) * p.d + c] = from_float<C>(p.scale * sdK[r * DP + c]);
    }
    for (int e = threadIdx.x; e < N * p.dv; e += threads) {
        const int r = e / p.dv, c = e % p.dv;
        if (j0 + r < p.Lk && dV) dV[(t * p.Lk + j0 + r) * p.dv + c] = from_float<C>(sdV[r * DVP + c]);
    }
}

// dQ for query block [i0, i0 + R) of leading index t, over the key blocks it sees. Grid: (query blocks, t).
template <class C>
__global__ void __launch_bounds__(threads, 2) attention_dq_kernel(Problem p, const C* Q, const C* K, const C* V, const C* dO, const float* lse,
                                                               const float* D, C* dQ) {
    constexpr int R = Tile<C>::rows, N = Tile<C>::cols;
    const int DP = round16(p.d), DVP = round16(p.dv), ldq = staged_ld(DP), ldv = staged_ld(DVP), lds = N + 4, ldp = staged_ld(N);
    const std::int64_t t = blockIdx.y, i0 = std::int64_t{blockIdx.x} * R;
    extern __shared__ __align__(128) unsigned char smem[];
    C* sQ = reinterpret_cast<C*>(smem);  // (R, DP)
    C* sdO = sQ + R * ldq;               // (R, DVP)
    C* sK = sdO + R * ldv;               // (N, DP)
    C* sV = sK + N * ldq;                // (N, DVP)
    C* sdS = sV + N * ldv;               // (R, N)
    // The bias tile (when staged) shares sdS's space: probabilities_and_dS reads each element's bias
    // before the same thread writes that element's dS.
    C* sB = sdS;
    float* sS = reinterpret_cast<float*>(sdS + R * ldp);  // (R, N)
    float* sdP = sS + R * lds;                             // (R, N)
    float* sdQ = sdP + R * lds;                            // (R, DP)
    float* s_lse = sdQ + R * DP;                           // (R)
    float* s_D = s_lse + R;                                // (R)

    BiasView<C> bias(p, t, sB, ldp);
    const bool* kp = key_padding_row(p, t);
    stage(sQ, ldq, Q + t * p.Lq * p.d, p.d, i0, p.Lq, p.d, R, DP);
    stage(sdO, ldv, dO + t * p.Lq * p.dv, p.dv, i0, p.Lq, p.dv, R, DVP);
    for (int e = threadIdx.x; e < R * DP; e += threads) sdQ[e] = 0.0f;
    for (int r = threadIdx.x; r < R; r += threads) {
        const bool in = i0 + r < p.Lq;
        s_lse[r] = in ? lse[t * p.Lq + i0 + r] : -std::numeric_limits<float>::infinity();
        s_D[r] = in ? D[t * p.Lq + i0 + r] : 0.0f;
    }
    staged();
    const std::int64_t end = key_block_end(p, i0, R, N);
    for (std::int64_t kb = 0; kb < end; ++kb) {
        const std::int64_t j0 = kb * N;
        if (!keys_kept(p, t, j0, N)) continue;
        __syncthreads();
        stage(sK, ldq, K + t * p.Lk * p.d, p.d, j0, p.Lk, p.d, N, DP);
        stage(sV, ldv, V + t * p.Lk * p.dv, p.dv, j0, p.Lk, p.dv, N, DVP);
        bias.stage_tile(p, i0, j0, R, N);
        staged();
        block_mma<false, true>(sS, lds, sQ, ldq, sK, ldq, R, N, DP, false);
        block_mma<false, true>(sdP, lds, sdO, ldv, sV, ldv, R, N, DVP, false);
        probabilities_and_dS<C>(p, bias, kp, t, i0, j0, sS, sdP, lds, nullptr, sdS, ldp, s_lse, s_D, nullptr, nullptr);
        block_mma<false, false>(sdQ, DP, sdS, ldp, sK, ldq, R, DP, N, true);
    }
    __syncthreads();
    for (int e = threadIdx.x; e < R * p.d; e += threads) {
        const int r = e / p.d, c = e % p.d;
        if (i0 + r < p.Lq) dQ[(t * p.Lq + i0 + r) * p.d + c] = from_float<C>(p.scale * sdQ[r * DP + c]);
    }
}

// dbias = bias_scale·Σ dS over the dimensions where the bias broadcasts: dS (B, H, Lq, Lk) fp32 ->
// dbias (the bias's padded shape). One thread per output element, summing in a fixed order.
struct Dims4 {
    std::int64_t n[4];
};
template <class C>
__global__ void bias_gradient_reduce_kernel(const float* dS, Dims4 score_dims, Dims4 bias_dims, float bias_scale, C* dbias, std::int64_t n) {
    const std::int64_t* scores = score_dims.n;
    const std::int64_t* bias = bias_dims.n;
    const std::int64_t e = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x;
    if (e >= n) return;
    std::int64_t at[4], rest = e;
    for (int k = 3; k >= 0; --k) {
        at[k] = rest % bias[k];
        rest /= bias[k];
    }
    std::int64_t lo[4], hi[4];
    for (int k = 0; k < 4; ++k) {
        lo[k] = bias[k] == 1 ? 0 : at[k];
        hi[k] = bias[k] == 1 ? scores[k] : at[k] + 1;
    }
    float acc = 0.0f;
    for (std::int64_t b = lo[0]; b < hi[0]; ++b)
        for (std::int64_t h = lo[1]; h < hi[1]; ++h)
            for (std::int64_t i = lo[2]; i < hi[2]; ++i)
                for (std::int64_t j = lo[3]; j < hi[3]; ++j) acc += dS[((b * scores[1] + h) * scores[2] + i) * scores[3] + j];
    dbias[e] = from_float<C>(bias_scale * acc);
}


template <class C>
__global__ void narrow_kernel(const float* in, C* out, std::int64_t n) {
    for (std::int64_t i = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x; i < n; i += std::int64_t{gridDim.x} * blockDim.x)
        out[i] = from_float<C>(in[i]);
}

template <class C>
__global__ void widen_kernel(const C* in, float* out, std::int64_t n) {
    for (std::int64_t i = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x; i < n; i += std::int64_t{gridDim.x} * blockDim.x)
        out[i] = to_float(in[i]);
}

// ---- launchers --------------------------------------------------------------------------------------

// Dynamic shared memory of each kernel, matching the carving at the top of each.
template <class C>
std::size_t forward_smem(int d, int dv) {
    constexpr int R = Tile<C>::rows, N = Tile<C>::cols;
    const int ldq = staged_ld(round16(d)), ldv = staged_ld(round16(dv));
    return sizeof(C) * (R * ldq + N * ldq + N * ldv + R * staged_ld(N)) + sizeof(float) * (R * (N + 4) + R * round16(dv));
}
template <class C>
std::size_t dkdv_smem(int d, int dv) {
    constexpr int R = Tile<C>::rows, N = Tile<C>::cols;
    const int DP = round16(d), DVP = round16(dv), ldq = staged_ld(DP), ldv = staged_ld(DVP);
    return sizeof(C) * (N * ldq + N * ldv + R * ldq + R * ldv + 2 * R * staged_ld(N)) +
           sizeof(float) * (2 * R * (N + 4) + N * DP + N * DVP + 2 * R);
}
template <class C>
std::size_t dq_smem(int d, int dv) {
    constexpr int R = Tile<C>::rows, N = Tile<C>::cols;
    const int DP = round16(d), DVP = round16(dv), ldq = staged_ld(DP), ldv = staged_ld(DVP);
    return sizeof(C) * (R * ldq + R * ldv + N * ldq + N * ldv + R * staged_ld(N)) + sizeof(float) * (2 * R * (N + 4) + R * DP + 2 * R);
}

template <class Kernel>
cudaError_t allow_smem(Kernel kernel, std::size_t bytes) {
    return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

// Calls f with a null pointer of the dtype's CUDA type.
template <class F>
cudaError_t dispatch(detail::DeviceDType dtype, F&& f) {
    switch (dtype) {
        case detail::DeviceDType::f32: return f(static_cast<float*>(nullptr));
        case detail::DeviceDType::bf16: return f(static_cast<__nv_bfloat16*>(nullptr));
        case detail::DeviceDType::f16: return f(static_cast<__half*>(nullptr));
    }
    return cudaErrorInvalidValue;
}

unsigned elementwise_grid(std::int64_t n) { return static_cast<unsigned>(n < 256 * 4096 ? (n + 255) / 256 : 4096); }

}  // namespace

namespace detail {

cudaError_t launch_attention_forward(DeviceDType dtype, const AttentionProblem& p, const void* Q, const void* K, const void* V, void* O,
                                     float* lse) {
    return dispatch(dtype, [&](auto* tag) {
        using C = std::remove_pointer_t<decltype(tag)>;
        const std::size_t smem = forward_smem<C>(p.d, p.dv);
        if (const cudaError_t e = allow_smem(attention_forward_kernel<C>, smem); e != cudaSuccess) return e;
        const dim3 grid(static_cast<unsigned>((p.Lq + Tile<C>::rows - 1) / Tile<C>::rows), static_cast<unsigned>(p.items));
        attention_forward_kernel<C><<<grid, threads, smem>>>(p, static_cast<const C*>(Q), static_cast<const C*>(K), static_cast<const C*>(V),
                                                             static_cast<C*>(O), lse);
        return cudaGetLastError();
    });
}

cudaError_t launch_attention_backward(DeviceDType dtype, const AttentionProblem& p, const void* Q, const void* K, const void* V,
                                      const void* dO, const void* O, const float* lse, float* D, void* dQ, void* dK, void* dV,
                                      void* dbias_full, float* dS_scratch) {
    return dispatch(dtype, [&](auto* tag) {
        using C = std::remove_pointer_t<decltype(tag)>;
        const auto* q = static_cast<const C*>(Q);
        const auto* k = static_cast<const C*>(K);
        const auto* v = static_cast<const C*>(V);
        const auto* dout = static_cast<const C*>(dO);
        const std::int64_t rows = p.items * p.Lq;
        attention_row_dot_kernel<C><<<static_cast<unsigned>((rows + warps - 1) / warps), threads>>>(rows, p.dv, dout, static_cast<const C*>(O), D);
        if (const cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
        if (dK || dV || dbias_full || dS_scratch) {
            const std::size_t smem = dkdv_smem<C>(p.d, p.dv);
            if (const cudaError_t e = allow_smem(attention_dkdv_kernel<C>, smem); e != cudaSuccess) return e;
            const dim3 grid(static_cast<unsigned>((p.Lk + Tile<C>::cols - 1) / Tile<C>::cols), static_cast<unsigned>(p.items));
            attention_dkdv_kernel<C><<<grid, threads, smem>>>(p, q, k, v, dout, lse, D, static_cast<C*>(dK), static_cast<C*>(dV),
                                                              static_cast<C*>(dbias_full), dS_scratch);
            if (const cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
        }
        if (dQ) {
            const std::size_t smem = dq_smem<C>(p.d, p.dv);
            if (const cudaError_t e = allow_smem(attention_dq_kernel<C>, smem); e != cudaSuccess) return e;
            const dim3 grid(static_cast<unsigned>((p.Lq + Tile<C>::rows - 1) / Tile<C>::rows), static_cast<unsigned>(p.items));
            attention_dq_kernel<C><<<grid, threads, smem>>>(p, q, k, v, dout, lse, D, static_cast<C*>(dQ));
        }
        return cudaGetLastError();
    });
}

cudaError_t launch_bias_gradient_reduce(DeviceDType dtype, const float* dS, const std::int64_t scores[4], const std::int64_t bias[4],
                                        float bias_scale, void* dbias) {
    const Dims4 s{{scores[0], scores[1], scores[2], scores[3]}}, b{{bias[0], bias[1], bias[2], bias[3]}};
    const std::int64_t n = bias[0] * bias[1] * bias[2] * bias[3];
    return dispatch(dtype, [&](auto* tag) {
        using C = std::remove_pointer_t<decltype(tag)>;
        bias_gradient_reduce_kernel<C><<<static_cast<unsigned>((n + 255) / 256), 256>>>(dS, s, b, bias_scale, static_cast<C*>(dbias), n);
        return cudaGetLastError();
    });
}

cudaError_t launch_narrow(DeviceDType dtype, const float* in, void* out, std::int64_t n) {
    return dispatch(dtype, [&](auto* tag) {
        using C = std::remove_pointer_t<decltype(tag)>;
        narrow_kernel<C><<<elementwise_grid(n), 256>>>(in, static_cast<C*>(out), n);
        return cudaGetLastError();
    });
}

cudaError_t launch_widen(DeviceDType dtype, const void* in, float* out, std::int64_t n) {
    return dispatch(dtype, [&](auto* tag) {
        using C = std::remove_pointer_t<decltype(tag)>;
        widen_kernel<C><<<elementwise_grid(n), 256>>>(static_cast<const C*>(in), out, n);
        return cudaGetLastError();
    });
}

}  // namespace detail

}  // namespace autodiff

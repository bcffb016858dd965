// The GPU attention kernels: forward, backward (dK/dV over key blocks, dQ over query blocks), the
// broadcast-bias gradient reduction, and the dtype conversions. The maths and the API are in
// include/autodiff/cuda/attention.hpp; validation and allocation in attention.cpp.
//
// Two sets of kernels, both on tiles of the padded rank-4 scores (B, H, Lq, Lk), leading index
// t = b·H + h:
//  - float32 (first section): 256 threads, operands and the scores staged in shared memory, zero-padded
//    to a multiple of 16, tile products in fp32 FMA (block_mma), elementwise passes one element a thread.
//  - bf16/fp16 (namespace mma): register-resident FlashAttention-2 kernels on mma.sync, one warp per 16
//    rows; see the comment at the top of that section for the fragment layouts.

#include "attention_kernels.hpp"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <limits>
#include <map>
#include <mutex>
#include <type_traits>

#include "autodiff/random.hpp"

namespace autodiff {

namespace {

// The float32 kernels: 8 warps a block. The forward and dQ kernels are held to 128 registers so that
// two blocks fit an SM (their shared memory allows it); the dK/dV kernel's allows one block anyway.
constexpr int threads = 256;
constexpr int warps = threads / 32;

// Tile sizes of the float32 kernels: 32×32 (64×64 fp32 tiles would not fit shared memory).
template <class C>
struct Tile {
    static constexpr int rows = 32;  // query rows
    static constexpr int cols = rows;  // keys
};

__host__ __device__ constexpr int round16(int x) { return (x + 15) / 16 * 16; }
// Leading dimensions of staged tiles: 8 elements of padding against bank conflicts, keeping every row
// 16-byte aligned for cp.async.
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

// C (m × n, ldc, fp32, shared) = (accumulate ? C : 0) + op(A)·op(B), all threads of the block, fp32 FMA
// (the float32 kernels; bf16/fp16 take the mma kernels below). op(A) is m × k: A[r·lda + c] when !TA,
// A stored k × m (A[c·lda + r]) when TA; op(B) is k × n: B[r·ldb + c] when !TB, stored n × k when TB.
// Ends with a barrier.
template <bool TA, bool TB>
__device__ void block_mma(float* Cm, int ldc, const float* A, int lda, const float* B, int ldb, int m, int n, int k, bool accumulate) {
    for (int e = threadIdx.x; e < m * n; e += threads) {
        const int r = e / n, c = e % n;
        float acc = accumulate ? Cm[r * ldc + c] : 0.0f;
        for (int q = 0; q < k; ++q) acc = fmaf(TA ? A[q * lda + r] : A[r * lda + q], TB ? B[c * ldb + q] : B[q * ldb + c], acc);
        Cm[r * ldc + c] = acc;
    }
    __syncthreads();
}

// dst (rows × padded cols, ld) = src rows [r0, r0 + rows) of a (len × width) matrix with row stride
// `stride`, zero outside. Rows of 16 bytes' worth of elements go through cp.async (queued, not waited
// for: the caller commits and waits, so the copies of several tiles are in flight together); other
// widths element by element.
// NT: the threads of the block (all of them take part).
template <int NT = threads, class C>
__device__ void stage(C* dst, int ld, const C* src, std::int64_t stride, std::int64_t r0, std::int64_t len, int width, int rows, int padded) {
    constexpr int vec = 16 / sizeof(C);
    if (width % vec == 0 && stride % vec == 0) {
        const int chunks = padded / vec;
        for (int e = threadIdx.x; e < rows * chunks; e += NT) {
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
    for (int e = threadIdx.x; e < rows * padded; e += NT) {
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

// The masks of one leading index t = b·H + h that are read from memory: the key-padding row and the
// keep mask's (b, h) plane (broadcast strides, as the bias's). Both null: neither.
struct KeyMasks {
    const bool* kp = nullptr;    // key padding of t, (Lk)
    const bool* keep = nullptr;  // keep mask at (b, h, 0, 0)
    std::int64_t ki = 0, kj = 0;  // the keep mask's strides over queries and keys
    __device__ bool any() const { return kp || keep; }
    // Whether element (i, j), in range, is kept by both.
    __device__ bool keeps(std::int64_t i, std::int64_t j) const { return !(kp && !kp[j]) && !(keep && !keep[i * ki + j * kj]); }
};

__device__ inline KeyMasks key_masks(const Problem& p, std::int64_t t) {
    KeyMasks m;
    if (p.key_padding) m.kp = p.key_padding + t / p.kp_div * p.Lk;
    if (p.keep) {
        m.keep = p.keep + t / p.heads * p.keep_s[0] + t % p.heads * p.keep_s[1];
        m.ki = p.keep_s[2];
        m.kj = p.keep_s[3];
    }
    return m;
}

// The keep mask's tile table of leading index t (null: no table, every tile partial).
__device__ inline const std::uint8_t* keep_tiles_of(const Problem& p, std::int64_t t) {
    if (!p.keep_tiles) return nullptr;
    return p.keep_tiles + t / p.heads * p.keep_tiles_s[0] + t % p.heads * p.keep_tiles_s[1];
}
// The class of keep tile (qb, kb) (in keep_tile blocks); without a keep mask, full.
__device__ inline std::uint8_t keep_class(const Problem& p, const std::uint8_t* tiles, std::int64_t qb, std::int64_t kb) {
    if (!p.keep) return detail::keep_tile_full;
    return tiles ? tiles[qb * p.keep_tiles_kb + kb] : detail::keep_tile_partial;
}
// The masks of a tile of class cls: a full keep tile needs no per-element keep test.
__device__ inline KeyMasks tile_masks(const KeyMasks& km, std::uint8_t cls) {
    KeyMasks m = km;
    if (cls == detail::keep_tile_full) m.keep = nullptr;
    return m;
}

// One block (256 threads) a keep tile (blockIdx.x = key block, .y = query block, .z = plane b·planes_h + h):
// empty, full or partial over its elements in range. Plane z reads the mask at (b, h) with its broadcast strides.
__global__ void keep_tile_classify_kernel(Problem p, std::int64_t planes_h, std::uint8_t* tiles) {
    const std::int64_t kb = blockIdx.x, qb = blockIdx.y, z = blockIdx.z;
    const bool* plane = p.keep + z / planes_h * p.keep_s[0] + z % planes_h * p.keep_s[1];
    const std::int64_t i0 = qb * detail::keep_tile, j0 = kb * detail::keep_tile;
    const int rq = static_cast<int>(min(std::int64_t{detail::keep_tile}, p.Lq - i0)), rk = static_cast<int>(min(std::int64_t{detail::keep_tile}, p.Lk - j0));
    int kept = 0, dropped = 0;
    for (int e = threadIdx.x; e < rq * rk; e += blockDim.x) {
        const std::int64_t i = i0 + e / rk, j = j0 + e % rk;
        if (plane[i * p.keep_s[2] + j * p.keep_s[3]]) kept = 1;
        else dropped = 1;
    }
    kept = __syncthreads_or(kept);
    dropped = __syncthreads_or(dropped);
    if (threadIdx.x == 0)
        tiles[(z * gridDim.y + qb) * gridDim.x + kb] = !kept ? detail::keep_tile_empty : dropped ? detail::keep_tile_partial : detail::keep_tile_full;
}

// The masked, biased score of element (i0 + r, j0 + c) of leading index t from s = (Q·Kᵀ)_ij; −inf
// where masked or out of range. km: the masks of t.
template <class C>
__device__ inline float score(const Problem& p, const BiasView<C>& bias, const KeyMasks& km, std::int64_t i0, std::int64_t j0, int r, int c,
                              float s) {
    constexpr float neg_inf = -std::numeric_limits<float>::infinity();
    const std::int64_t i = i0 + r, j = j0 + c;
    if (i >= p.Lq || j >= p.Lk) return neg_inf;
    if (p.causal && j > i) return neg_inf;
    if (!km.keeps(i, j)) return neg_inf;
    float x = p.scale * s;
    if (bias.base) x += p.bias_scale * bias.at(i0, j0, r, c);
    return x;
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
    const KeyMasks kp = key_masks(p, t);
    const std::uint8_t* ktiles = keep_tiles_of(p, t);
    stage(sQ, ldq, Q + t * p.Lq * p.d, p.d, i0, p.Lq, p.d, R, DP);
    for (int e = threadIdx.x; e < R * DVP; e += threads) sO[e] = 0.0f;
    staged();
    const int row = static_cast<int>(threadIdx.x) / per_row, part = static_cast<int>(threadIdx.x) % per_row;
    const std::int64_t i = i0 + row;
    float m = neg_inf, l = 0.0f;
    const std::int64_t end = key_block_end(p, i0, R, N);
    for (std::int64_t kb = 0; kb < end; ++kb) {
        const std::int64_t j0 = kb * N;
        const std::uint8_t cls = keep_class(p, ktiles, i0 / detail::keep_tile, j0 / detail::keep_tile);
        if (cls == detail::keep_tile_empty || !keys_kept(p, t, j0, N)) continue;
        const KeyMasks km = tile_masks(kp, cls);
        __syncthreads();
        stage(sK, ldq, K + t * p.Lk * p.d, p.d, j0, p.Lk, p.d, N, DP);
        stage(sV, ldv, V + t * p.Lk * p.dv, p.dv, j0, p.Lk, p.dv, N, DVP);
        bias.stage_tile(p, i0, j0, R, N);
        staged();
        block_mma<false, true>(sS, lds, sQ, ldq, sK, ldq, R, N, DP, false);
        for (int e = threadIdx.x; e < R * N; e += threads) {
            const int r = e / N, c = e % N;
            sS[r * lds + c] = score<C>(p, bias, km, i0, j0, r, c, sS[r * lds + c]);
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
__device__ void probabilities_and_dS(const Problem& p, const BiasView<C>& bias, const KeyMasks& kp, std::int64_t t, std::int64_t i0, std::int64_t j0,
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
    const KeyMasks kp = key_masks(p, t);
    stage(sK, ldq, K + t * p.Lk * p.d, p.d, j0, p.Lk, p.d, N, DP);
    stage(sV, ldv, V + t * p.Lk * p.dv, p.dv, j0, p.Lk, p.dv, N, DVP);
    staged();
    for (int e = threadIdx.x; e < N * DP; e += threads) sdK[e] = 0.0f;
    for (int e = threadIdx.x; e < N * DVP; e += threads) sdV[e] = 0.0f;
    const bool any_key = keys_kept(p, t, j0, N);
    // Causal: query blocks before the first row that sees key j0 are skipped.
    const std::int64_t q_blocks = (p.Lq + R - 1) / R, first = p.causal ? j0 / R : 0;
    const std::uint8_t* ktiles = keep_tiles_of(p, t);
    for (std::int64_t qb = any_key ? first : q_blocks; qb < q_blocks; ++qb) {
        const std::int64_t i0 = qb * R;
        const std::uint8_t cls = keep_class(p, ktiles, i0 / detail::keep_tile, j0 / detail::keep_tile);
        if (cls == detail::keep_tile_empty) continue;
        const KeyMasks km = tile_masks(kp, cls);
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
        probabilities_and_dS(p, bias, km, t, i0, j0, sS, sdP, lds, sP, sdS, ldp, s_lse, s_D, dbias_full, dS_scratch);
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
    const KeyMasks kp = key_masks(p, t);
    stage(sQ, ldq, Q + t * p.Lq * p.d, p.d, i0, p.Lq, p.d, R, DP);
    stage(sdO, ldv, dO + t * p.Lq * p.dv, p.dv, i0, p.Lq, p.dv, R, DVP);
    for (int e = threadIdx.x; e < R * DP; e += threads) sdQ[e] = 0.0f;
    for (int r = threadIdx.x; r < R; r += threads) {
        const bool in = i0 + r < p.Lq;
        s_lse[r] = in ? lse[t * p.Lq + i0 + r] : -std::numeric_limits<float>::infinity();
        s_D[r] = in ? D[t * p.Lq + i0 + r] : 0.0f;
    }
    staged();
    const std::uint8_t* ktiles = keep_tiles_of(p, t);
    const std::int64_t end = key_block_end(p, i0, R, N);
    for (std::int64_t kb = 0; kb < end; ++kb) {
        const std::int64_t j0 = kb * N;
        const std::uint8_t cls = keep_class(p, ktiles, i0 / detail::keep_tile, j0 / detail::keep_tile);
        if (cls == detail::keep_tile_empty || !keys_kept(p, t, j0, N)) continue;
        const KeyMasks km = tile_masks(kp, cls);
        __syncthreads();
        stage(sK, ldq, K + t * p.Lk * p.d, p.d, j0, p.Lk, p.d, N, DP);
        stage(sV, ldv, V + t * p.Lk * p.dv, p.dv, j0, p.Lk, p.dv, N, DVP);
        bias.stage_tile(p, i0, j0, R, N);
        staged();
        block_mma<false, true>(sS, lds, sQ, ldq, sK, ldq, R, N, DP, false);
        block_mma<false, true>(sdP, lds, sdO, ldv, sV, ldv, R, N, DVP, false);
        probabilities_and_dS<C>(p, bias, km, t, i0, j0, sS, sdP, lds, nullptr, sdS, ldp, s_lse, s_D, nullptr, nullptr);
        block_mma<false, false>(sdQ, DP, sdS, ldp, sK, ldq, R, DP, N, true);
    }
    __syncthreads();
    for (int e = threadIdx.x; e < R * p.d; e += threads) {
        const int r = e / p.d, c = e % p.d;
        if (i0 + r < p.Lq) dQ[(t * p.Lq + i0 + r) * p.d + c] = from_float<C>(p.scale * sdQ[r * DP + c]);
    }
}

// ---- 16-bit path: register-resident kernels on mma.sync ---------------------------------------------
// bf16/fp16 inputs take these kernels (the staged FMA kernels above serve float32). Each warp owns 16 rows of
// a 64-row tile; tile products are mma.sync.m16n8k16 (16-bit operands, fp32 accumulate) whose
// accumulators stay in registers: the scores, the online softmax and P never touch shared memory, and P
// (or dS) becomes the A operand of the next product by repacking the accumulator registers.
//
// Fragment layouts of mma.sync.aligned.m16n8k16.row.col (PTX ISA, "Matrix fragments for mma.m16n8k16"),
// lane = 4·g + q (g = lane/4 in 0..7, q = lane%4 in 0..3); each 32-bit register holds two 16-bit
// elements, the lower column in the lower half:
//   A (16×16, row-major):  a0 = A[g][2q, 2q+1]   a1 = A[g+8][2q, 2q+1]   a2 = A[g][2q+8, 2q+9]   a3 = A[g+8][2q+8, 2q+9]
//   B (16×8, k × n):       b0 = B[2q, 2q+1][g]   b1 = B[2q+8, 2q+9][g]
//   C (16×8, fp32):        c0, c1 = C[g][2q, 2q+1]                     c2, c3 = C[g+8][2q, 2q+1]
// So the accumulators of two neighbouring n-tiles (C of columns 16k..16k+7 and 16k+8..16k+15) are, once
// rounded to 16 bits and packed in pairs, exactly the A fragment of k-step k: (c0,c1 | c2,c3 of the
// first; c0,c1 | c2,c3 of the second) -> (a0, a1, a2, a3). That is how P and dS feed the next product.
//
// Operands come from shared memory through ldmatrix (each lane gives one row address of an 8×8 matrix
// of 16-bit elements; .x4 loads four matrices, lanes 8m..8m+7 addressing matrix m; .trans transposes
// each). Staged tiles have rows of HD + 8 elements: a row stride of 16 bytes past a multiple of 128
// puts the eight rows of one 8×8 matrix on eight different 4-bank groups, so ldmatrix is conflict-free.
namespace mma {

constexpr int warps = 4, threads = 32 * warps;
constexpr int rows = 16 * warps;  // query rows of a forward/dQ block, keys of a dK/dV block
constexpr int cols = 64;          // the other side of a tile: keys (forward, dQ) or queries (dK/dV)
static_assert(rows == detail::keep_tile && cols == detail::keep_tile, "a tile of these kernels is a keep tile");
constexpr int n_tiles = cols / 8;  // m16n8 accumulator tiles in a warp's 16 × cols strip
constexpr int bias_ld = cols + 8;  // staged (rows × cols) bias or dS tiles

// The padded head dimension of the kernels: 64 or 128.
__host__ __device__ constexpr int head_dim_bucket(int d, int dv) { return d <= 64 && dv <= 64 ? 64 : 128; }

__device__ inline unsigned shared_address(const void* p) { return static_cast<unsigned>(__cvta_generic_to_shared(p)); }

// Four 8×8 matrices; lane l addresses row l%8 of matrix l/8.
__device__ inline void ldmatrix_x4(std::uint32_t (&r)[4], const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(shared_address(row)));
}
__device__ inline void ldmatrix_x4_trans(std::uint32_t (&r)[4], const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(shared_address(row)));
}
// The inverse of ldmatrix_x4_trans (sm_90): lane l gives row l%8 of matrix l/8.
__device__ inline void stmatrix_x4_trans(void* row, const std::uint32_t (&r)[4]) {
    asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(shared_address(row)), "r"(r[0]), "r"(r[1]),
                 "r"(r[2]), "r"(r[3])
                 : "memory");
}

// d += a·b for one m16n8k16 tile.
template <class C>
__device__ inline void mma16816(float (&d)[4], const std::uint32_t (&a)[4], std::uint32_t b0, std::uint32_t b1) {
    if constexpr (std::is_same_v<C, __nv_bfloat16>)
        asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    else
        asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats rounded to C and packed, lo in the lower half.
template <class C>
__device__ inline std::uint32_t pack(float lo, float hi) {
    if constexpr (std::is_same_v<C, __nv_bfloat16>) {
        const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
        return *reinterpret_cast<const std::uint32_t*>(&v);
    } else {
        const __half2 v = __floats2half2_rn(lo, hi);
        return *reinterpret_cast<const std::uint32_t*>(&v);
    }
}

// The A fragment of k-step k from accumulators x (rows × cols strip, see the layout note above).
template <class C>
__device__ inline void accumulators_to_a(std::uint32_t (&a)[4], const float (&x)[n_tiles][4], int k) {
    a[0] = pack<C>(x[2 * k][0], x[2 * k][1]);
    a[1] = pack<C>(x[2 * k][2], x[2 * k][3]);
    a[2] = pack<C>(x[2 * k + 1][0], x[2 * k + 1][1]);
    a[3] = pack<C>(x[2 * k + 1][2], x[2 * k + 1][3]);
}

// The A fragment (16 rows from `rows16`, k-step k) of a row-major staged tile with leading dimension ld.
template <class C>
__device__ inline void load_a(std::uint32_t (&a)[4], const C* rows16, int ld, int k, int lane) {
    // Matrices: rows 0-7 | rows 8-15 at column 16k, then the same at 16k + 8 -> a0, a1, a2, a3.
    ldmatrix_x4(a, rows16 + (lane % 16) * ld + 16 * k + lane / 16 * 8);
}

// acc (16 × cols) += A (16 × 16·ksteps, a row-major staged strip) · Bᵀ, where B (cols × 16·ksteps) is a
// row-major staged tile: S = Q·Kᵀ with B = K, dP = dO·Vᵀ with B = V, and the transposed products of the
// dK/dV kernel. One ldmatrix.x4 of B gives the (b0, b1) of two n-tiles: rows 0-7 | 8-15 of the 16, at
// column 16k and 16k + 8.
template <class C, int HD>
__device__ inline void product_abt(float (&acc)[n_tiles][4], const C* a_rows16, const C* b, int ld, int lane) {
#pragma unroll
    for (int k = 0; k < HD / 16; ++k) {
        std::uint32_t a[4];
        load_a(a, a_rows16, ld, k, lane);
#pragma unroll
        for (int n = 0; n < n_tiles / 2; ++n) {
            std::uint32_t bf[4];
            ldmatrix_x4(bf, b + (16 * n + lane % 8 + lane / 16 * 8) * ld + 16 * k + lane / 8 % 2 * 8);
            mma16816<C>(acc[2 * n], a, bf[0], bf[1]);
            mma16816<C>(acc[2 * n + 1], a, bf[2], bf[3]);
        }
    }
}

// Same with A held in registers (a[k]: the A fragment of k-step k, loaded once by load_a).
template <class C, int HD>
__device__ inline void product_rbt(float (&acc)[n_tiles][4], const std::uint32_t (&a)[HD / 16][4], const C* b, int ld, int lane) {
#pragma unroll
    for (int k = 0; k < HD / 16; ++k)
#pragma unroll
        for (int n = 0; n < n_tiles / 2; ++n) {
            std::uint32_t bf[4];
            ldmatrix_x4(bf, b + (16 * n + lane % 8 + lane / 16 * 8) * ld + 16 * k + lane / 8 % 2 * 8);
            mma16816<C>(acc[2 * n], a[k], bf[0], bf[1]);
            mma16816<C>(acc[2 * n + 1], a[k], bf[2], bf[3]);
        }
}

// acc (16 × HD) += X (16 × cols, accumulators repacked as A) · B, B (cols × HD) a row-major staged tile:
// O += P·V, dV += Pᵀ·dO, dK += dSᵀ·Q, dQ += dS·K. ldmatrix.trans of B's rows 16k..16k+15 gives, per
// 16 columns, the (b0, b1) of two n-tiles: rows 0-7 | 8-15 at column 16n, then the same at 16n + 8.
template <class C, int HD>
__device__ inline void product_xb(float (&acc)[HD / 8][4], const float (&x)[n_tiles][4], const C* b, int ld, int lane) {
#pragma unroll
    for (int k = 0; k < cols / 16; ++k) {
        std::uint32_t a[4];
        accumulators_to_a<C>(a, x, k);
#pragma unroll
        for (int n = 0; n < HD / 16; ++n) {
            std::uint32_t bf[4];
            ldmatrix_x4_trans(bf, b + (16 * k + lane % 8 + lane / 8 % 2 * 8) * ld + 16 * n + lane / 16 * 8);
            mma16816<C>(acc[2 * n], a, bf[0], bf[1]);
            mma16816<C>(acc[2 * n + 1], a, bf[2], bf[3]);
        }
    }
}

// Same, with A read from a staged row-major strip (16 rows × cols) instead of registers: dQ = dS·K with
// dS read back from the bias gradient.
template <class C, int HD>
__device__ inline void product_ab(float (&acc)[HD / 8][4], const C* a_rows16, int lda, const C* b, int ld, int lane) {
#pragma unroll
    for (int k = 0; k < cols / 16; ++k) {
        std::uint32_t a[4];
        load_a(a, a_rows16, lda, k, lane);
#pragma unroll
        for (int n = 0; n < HD / 16; ++n) {
            std::uint32_t bf[4];
            ldmatrix_x4_trans(bf, b + (16 * k + lane % 8 + lane / 8 % 2 * 8) * ld + 16 * n + lane / 16 * 8);
            mma16816<C>(acc[2 * n], a, bf[0], bf[1]);
            mma16816<C>(acc[2 * n + 1], a, bf[2], bf[3]);
        }
    }
}

// Row r (0..15) and column c (0..cols) of accumulator element e of n-tile n in a warp's strip.
__device__ inline int frag_row(int lane, int e) { return lane / 4 + (e >= 2 ? 8 : 0); }
__device__ inline int frag_col(int lane, int n, int e) { return 8 * n + 2 * (lane % 4) + (e & 1); }

// Element (i, j) of the scores is in range and not masked.
__device__ inline bool visible(const Problem& p, const KeyMasks& km, std::int64_t i, std::int64_t j) {
    return i < p.Lq && j < p.Lk && !(p.causal && j > i) && km.keeps(i, j);
}

// Whether a key of [j0, j0 + cols) survives the key-padding mask (every thread computes the same). The
// keep mask's empty tiles are skipped by its tile table (keep_class), its full ones not tested per element.
__device__ inline bool tile_has_key(const Problem& p, const KeyMasks& km, std::int64_t j0) {
    if (!km.kp) return true;
    const std::int64_t end = min(j0 + cols, p.Lk);
    for (std::int64_t j = j0; j < end; ++j)
        if (km.kp[j]) return true;
    return false;
}

// Whether a tile (queries [i0, i0 + rq), keys [j0, j0 + rk)) needs the per-element mask: it crosses the
// causal diagonal, a key-padding or keep mask exists, or it overhangs Lq or Lk.
__device__ inline bool tile_needs_mask(const Problem& p, const KeyMasks& km, std::int64_t i0, int rq, std::int64_t j0, int rk) {
    return km.any() || (p.causal && j0 + rk - 1 > i0) || i0 + rq > p.Lq || j0 + rk > p.Lk;
}

__device__ inline void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ inline void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// Rows [r0, r0 + ROWS) of a (len × width) matrix (row stride `stride`) into a (ROWS × COLS, ld) staged
// tile, zero outside. When rows are whole 16-byte chunks: a fixed number of cp.async a thread, the
// index arithmetic at compile time (queued, not waited for); else stage()'s element-wise copy.
template <int ROWS, int COLS, class C>
__device__ inline void stage_async(C* dst, int ld, const C* src, std::int64_t stride, std::int64_t r0, std::int64_t len, int width) {
    constexpr int chunks = COLS / 8, per_thread = ROWS * chunks / threads;
    static_assert(ROWS * chunks % threads == 0);
    if (width % 8 != 0 || stride % 8 != 0) {
        stage<threads>(dst, ld, src, stride, r0, len, width, ROWS, COLS);
        return;
    }
    const C* first = src + r0 * stride;
    const int rows_left = static_cast<int>(min(std::int64_t{ROWS}, len - r0));
#pragma unroll
    for (int k = 0; k < per_thread; ++k) {
        const int e = static_cast<int>(threadIdx.x) + k * threads;
        const int r = e / chunks, c = e % chunks * 8;
        C* to = dst + r * ld + c;
        if (r < rows_left && c < width)
            asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(shared_address(to)), "l"(first + r * stride + c));
        else
            *reinterpret_cast<int4*>(to) = make_int4(0, 0, 0, 0);
    }
}

// The dropout factor of element (t, i, j) (dropout_factor above), out of line: the Philox rounds stay
// out of the unrolled tile loops, whose code must fit the instruction cache.
__device__ __noinline__ float dropout_factor_call(std::uint64_t seed, std::uint64_t offset, std::uint64_t index, std::uint32_t threshold,
                                                  float keep_scale) {
    return Philox4x32::bits(seed, offset, index) >= threshold ? keep_scale : 0.0f;
}
__device__ inline float dropout_of(const Problem& p, std::int64_t t, std::int64_t i, std::int64_t j) {
    if (!p.dropout) return 1.0f;
    if (p.drop_all) return 0.0f;
    return dropout_factor_call(p.seed, p.offset, static_cast<std::uint64_t>((t * p.Lq + i) * p.Lk + j), p.threshold, p.drop_scale);
}

// 2^x (ex2.approx.ftz: one instruction; −inf gives 0).
__device__ inline float exp2_fast(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

template <class C>
__device__ inline float2 to_float2(std::uint32_t packed) {
    if constexpr (std::is_same_v<C, __nv_bfloat16>) return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&packed));
    else return __half22float2(*reinterpret_cast<const __half2*>(&packed));
}

// The bias of one leading index t for these kernels: (rows × cols) tiles [q][k] staged in shared memory
// by cp.async when its rows are whole 16-byte chunks, else read from global memory element by element.
template <class C>
struct BiasTiles {
    const C* base = nullptr;  // bias at (b, h, 0, 0) of t = b·H + h; null: no bias
    std::int64_t si = 0, sj = 0;
    bool staged = false;

    __device__ BiasTiles(const Problem& p, std::int64_t t) {
        if (!p.bias) return;
        base = static_cast<const C*>(p.bias) + t / p.heads * p.bias_s[0] + t % p.heads * p.bias_s[1];
        si = p.bias_s[2];
        sj = p.bias_s[3];
        staged = sj == 1 && si % 8 == 0 && p.Lk % 8 == 0;
    }
    // Queues the copy of queries [i0, i0 + rows), keys [j0, j0 + cols) into tile (zero outside).
    __device__ void stage_tile(const Problem& p, C* tile, std::int64_t i0, std::int64_t j0) const {
        if (!base || !staged) return;
        const int width = static_cast<int>(min(std::int64_t{cols}, p.Lk - j0));
        stage_async<rows, cols>(tile, bias_ld, base + j0, si, i0, si == 0 ? std::int64_t{1} << 62 : p.Lq, width);
    }
    // bias_scale·bias of element (i, j) = (i0 + r, j0 + c); 0 without bias. Only for visible elements
    // when not staged (the global read is unguarded).
    __device__ float at(const C* tile, int r, int c, std::int64_t i, std::int64_t j) const {
        if (!base) return 0.0f;
        return staged ? to_float(tile[r * bias_ld + c]) : to_float(base[i * si + j * sj]);
    }
};

constexpr float log2e = 1.4426950408889634f;
constexpr float neg_inf = -std::numeric_limits<float>::infinity();

// x = (scale·s + bias_scale·bias)·log2(e) for a warp's (16 × cols) strip of accumulators s, queries
// iw + row, keys j0 + column; −inf where masked. B_strip: the warp's 16 rows of the staged bias tile.
// Tiles that need no mask, with no bias or a staged one, take the lean path (no per-element index
// arithmetic, the bias read in pairs).
template <class C>
__device__ inline void scores_to_base2(float (&s)[n_tiles][4], const Problem& p, const BiasTiles<C>& bias, const KeyMasks& kp, const C* B_strip,
                                       std::int64_t iw, std::int64_t j0, int lane) {
    const float sc = p.scale * log2e, bsc = p.bias_scale * log2e;
    if (!tile_needs_mask(p, kp, iw, 16, j0, cols) && (!bias.base || bias.staged)) {
        if (!bias.base) {
#pragma unroll
            for (int n = 0; n < n_tiles; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e) s[n][e] *= sc;
            return;
        }
#pragma unroll
        for (int n = 0; n < n_tiles; ++n)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const float2 b = to_float2<C>(*reinterpret_cast<const std::uint32_t*>(B_strip + frag_row(lane, 2 * h) * bias_ld + frag_col(lane, n, 0)));
                s[n][2 * h] = fmaf(s[n][2 * h], sc, bsc * b.x);
                s[n][2 * h + 1] = fmaf(s[n][2 * h + 1], sc, bsc * b.y);
            }
        return;
    }
#pragma unroll
    for (int n = 0; n < n_tiles; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int r = frag_row(lane, e), c = frag_col(lane, n, e);
            const std::int64_t i = iw + r, j = j0 + c;
            s[n][e] = visible(p, kp, i, j) ? (p.scale * s[n][e] + p.bias_scale * bias.at(B_strip, r, c, i, j)) * log2e : neg_inf;
        }
}

// The problem as a kernel instantiation sees it. The Plain instantiations (picked by the launchers only
// for problems without bias, key padding, keep mask or dropout: plain and causal attention) see those fields as
// constants, so their state, index arithmetic and the out-of-line dropout call vanish from the code,
// the kernels need fewer registers and more blocks fit an SM. Their shared memory has no bias tiles.
template <bool Plain>
__device__ inline Problem specialised(const Problem& given) {
    Problem p = given;
    if constexpr (Plain) {
        p.bias = nullptr;
        p.key_padding = nullptr;
        p.keep = nullptr;
        p.keep_tiles = nullptr;
        p.dropout = false;
        p.drop_all = false;
    }
    return p;
}
// Blocks an SM that the Plain instantiations for HD = 64 are compiled for (__launch_bounds__'s minimum;
// 65536 registers / (128 threads · blocks) caps the registers a thread). 3/2/3 keeps every kernel free of
// spills (168/253/168 registers); on the H200 (2026-12-04, causal L = 4096, bf16) it beat 4/3/4 (which
// spill 68/56/80 bytes) by 13 % fwd+bwd, and dQ at two blocks holding Q and dO fragments in registers
// was 2 % slower. Macros so that a tuning run can build variants (-DAUTODIFF_MMA_PLAIN_FWD_BLOCKS=4 ...).
#ifndef AUTODIFF_MMA_PLAIN_FWD_BLOCKS
#define AUTODIFF_MMA_PLAIN_FWD_BLOCKS 3
#endif
#ifndef AUTODIFF_MMA_PLAIN_DKDV_BLOCKS
#define AUTODIFF_MMA_PLAIN_DKDV_BLOCKS 2
#endif
#ifndef AUTODIFF_MMA_PLAIN_DQ_BLOCKS
#define AUTODIFF_MMA_PLAIN_DQ_BLOCKS 3
#endif
// Whether a problem takes the Plain instantiations.
inline bool plain_problem(const Problem& p) { return !p.bias && !p.key_padding && !p.keep && !p.dropout; }

// The mma kernels' grids: row blocks (queries or keys) × planes t. Block b = 0 is the heaviest under a
// causal mask (the kernel maps it to the last query block, or the first key block). Causal without bias,
// masks or dropout (the Plain instantiations): the grid is (planes, row blocks), so that the plane varies
// fastest in dispatch order: the heaviest block of every plane goes first, then the next heaviest of
// every plane ..., and light blocks of all planes fill the tail. In the (row blocks, planes) order, plane
// 1's heavy blocks started only after all of plane 0's blocks, and the last planes' heavy blocks ran at
// the end of the grid (measured on the H200 in docs/bench_gpucausal_2026-12-04.md). Otherwise (row
// blocks, planes): a plane's blocks run side by side and share its K and V in L2. Only the Plain
// kernels read the flag: in the others (at their register limit) the selection made the compiler hold
// t in a register and spill more. Read from blockIdx, not decoded from a linear index: the division's
// live values cost the bias kernels spills and 60 % of their forward speed (same document).
template <bool Plain>
__device__ inline std::int64_t grid_plane(const Problem& p) {
    if constexpr (Plain) return p.plane_fastest ? blockIdx.x : blockIdx.y;
    return blockIdx.y;
}
template <bool Plain>
__device__ inline std::int64_t grid_block(const Problem& p) {
    if constexpr (Plain) return p.plane_fastest ? blockIdx.y : blockIdx.x;
    return blockIdx.x;
}
template <bool Plain>
__device__ inline std::int64_t grid_blocks(const Problem& p) {
    if constexpr (Plain) return p.plane_fastest ? gridDim.y : gridDim.x;
    return gridDim.x;
}
// The grid of `length` rows a plane for the Plain kernels when `plain`, else the others; sets p.plane_fastest.
inline dim3 mma_grid(Problem& p, std::int64_t length, bool plain) {
    const auto blocks = static_cast<unsigned>((length + rows - 1) / rows), planes = static_cast<unsigned>(p.items);
    p.plane_fastest = plain && p.causal && blocks <= 65535;
    return p.plane_fastest ? dim3(planes, blocks) : dim3(blocks, planes);
}

// ---- forward (16-bit) ----
// Q (t, Lq, d), K (t, Lk, d), V (t, Lk, dv) -> O (t, Lq, dv), lse (t, Lq). Grid: (query blocks of 64, t), or (t, query blocks) (mma_grid).
// Warp w owns queries i0 + 16w ..+15: its Q fragments stay in registers, S (16 × 64) and O (16 × HD)
// accumulate in registers; K, V and the bias tile are double-buffered in shared memory by cp.async.
// Online softmax in base 2: x = (scale·s + bias_scale·b)·log2(e), m = running max of x, l = running
// Σ 2^(x − m) (per thread over its columns; the quad's partial sums are added at the end), O += 2^(x − m)
// ·dropout·V, rescaled by 2^(m_old − m_new) when the max moves.
// Three blocks an SM for HD = 64 (at most 170 registers; AUTODIFF_MMA_PLAIN_FWD_BLOCKS when Plain), two for 128.
template <class C, int HD, bool Plain>
__global__ void __launch_bounds__(threads, HD == 64 ? (Plain ? AUTODIFF_MMA_PLAIN_FWD_BLOCKS : 3) : 2)
    forward_kernel(Problem given, const C* Q, const C* K, const C* V, C* O, float* lse) {
    constexpr int LD = HD + 8;
    const Problem p = specialised<Plain>(given);
    // Query blocks in reverse: under a causal mask the last ones see the most keys, and starting them
    // first keeps the tail of the grid short.
    const std::int64_t t = grid_plane<Plain>(p), i0 = (grid_blocks<Plain>(p) - 1 - grid_block<Plain>(p)) * rows;
    const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
    extern __shared__ __align__(128) unsigned char smem[];
    C* sQ = reinterpret_cast<C*>(smem);  // (rows, LD)
    C* sK = sQ + rows * LD;              // 2 × (cols, LD)
    C* sV = sK + 2 * cols * LD;          // 2 × (cols, LD)
    C* sB = sV + 2 * cols * LD;          // 2 × (rows, bias_ld)

    const BiasTiles<C> bias(p, t);
    const KeyMasks kp = Plain ? KeyMasks{} : key_masks(p, t);  // Plain: no mask state (its registers as before the keep mask)
    const std::uint8_t* ktiles = keep_tiles_of(p, t);
    const std::int64_t qt = i0 / rows;  // the keep tile row
    const C* Kt = K + t * p.Lk * p.d;
    const C* Vt = V + t * p.Lk * p.dv;
    stage_async<rows, HD>(sQ, LD, Q + t * p.Lq * p.d, p.d, i0, p.Lq, p.d);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    std::uint32_t qf[HD / 16][4];
#pragma unroll
    for (int k = 0; k < HD / 16; ++k) load_a(qf[k], sQ + warp * 16 * LD, LD, k, lane);

    float o[HD / 8][4];
#pragma unroll
    for (int n = 0; n < HD / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
    float m[2] = {neg_inf, neg_inf}, l[2] = {0.0f, 0.0f};  // rows g and g + 8

    const std::int64_t end = key_block_end(p, i0, rows, cols);
    auto next_block = [&](std::int64_t kb) {
        while (kb < end && (!tile_has_key(p, kp, kb * cols) || keep_class(p, ktiles, qt, kb) == detail::keep_tile_empty)) ++kb;
        return kb;
    };
    auto issue = [&](std::int64_t kb, int buf) {
        const std::int64_t j0 = kb * cols;
        stage_async<cols, HD>(sK + buf * cols * LD, LD, Kt, p.d, j0, p.Lk, p.d);
        stage_async<cols, HD>(sV + buf * cols * LD, LD, Vt, p.dv, j0, p.Lk, p.dv);
        bias.stage_tile(p, sB + buf * rows * bias_ld, i0, j0);
    };
    std::int64_t kb = next_block(0);
    if (kb < end) issue(kb, 0);
    cp_async_commit();
    for (int buf = 0; kb < end; buf ^= 1) {
        const std::int64_t nb = next_block(kb + 1);
        if (nb < end) issue(nb, buf ^ 1);
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();
        const std::int64_t j0 = kb * cols;
        const C* K_tile = sK + buf * cols * LD;
        const C* B_tile = sB + buf * rows * bias_ld + warp * 16 * bias_ld;

        // S = Q·Kᵀ: A = qf (registers), B = Kᵀ, i.e. K's rows (keys) as the n index.
        float s[n_tiles][4];
#pragma unroll
        for (int n = 0; n < n_tiles; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
        for (int k = 0; k < HD / 16; ++k)
#pragma unroll
            for (int n = 0; n < n_tiles / 2; ++n) {
                std::uint32_t bf[4];
                ldmatrix_x4(bf, K_tile + (16 * n + lane % 8 + lane / 16 * 8) * LD + 16 * k + lane / 8 % 2 * 8);
                mma16816<C>(s[2 * n], qf[k], bf[0], bf[1]);
                mma16816<C>(s[2 * n + 1], qf[k], bf[2], bf[3]);
            }

        // Scores in base 2, masked to −inf; the tile's row maxima.
        const std::int64_t iw = i0 + warp * 16;
        scores_to_base2(s, p, bias, tile_masks(kp, keep_class(p, ktiles, qt, kb)), B_tile, iw, j0, lane);
        float tile_max[2] = {neg_inf, neg_inf};
#pragma unroll
        for (int n = 0; n < n_tiles; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) tile_max[e / 2] = fmaxf(tile_max[e / 2], s[n][e]);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            // The quad (lanes 4g .. 4g+3) holds one row.
            tile_max[h] = fmaxf(tile_max[h], __shfl_xor_sync(0xffffffffu, tile_max[h], 1));
            tile_max[h] = fmaxf(tile_max[h], __shfl_xor_sync(0xffffffffu, tile_max[h], 2));
            const float m_new = fmaxf(m[h], tile_max[h]);
            // A row with nothing visible so far keeps m = −inf, l = 0 and adds zeros.
            const float alpha = m_new == neg_inf ? 1.0f : exp2_fast(m[h] - m_new);
            l[h] *= alpha;
#pragma unroll
            for (int n = 0; n < HD / 8; ++n) {
                o[n][2 * h] *= alpha;
                o[n][2 * h + 1] *= alpha;
            }
            m[h] = m_new;
        }
        // P = 2^(x − m) in place (l sums it before dropout), then dropout's factor.
#pragma unroll
        for (int n = 0; n < n_tiles; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const float mh = m[e / 2];
                const float pe = mh == neg_inf ? 0.0f : exp2_fast(s[n][e] - mh);
                l[e / 2] += pe;
                s[n][e] = pe;
            }
        if (p.dropout) {
#pragma unroll
            for (int n = 0; n < n_tiles; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e) s[n][e] *= dropout_of(p, t, iw + frag_row(lane, e), j0 + frag_col(lane, n, e));
        }
        // O += P·V, P repacked from the accumulators.
        product_xb<C, HD>(o, s, sV + buf * cols * LD, LD, lane);
        __syncthreads();
        kb = nb;
    }

    // O = O / l, lse = (m + log2 l)·ln 2 (−inf and O = 0 for rows with nothing visible).
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        l[h] += __shfl_xor_sync(0xffffffffu, l[h], 1);
        l[h] += __shfl_xor_sync(0xffffffffu, l[h], 2);
        const std::int64_t i = i0 + warp * 16 + lane / 4 + 8 * h;
        if (i >= p.Lq) continue;
        const float inv = l[h] > 0.0f ? 1.0f / l[h] : 0.0f;
        C* out = O + (t * p.Lq + i) * p.dv;
#pragma unroll
        for (int n = 0; n < HD / 8; ++n) {
            const int c = 8 * n + 2 * (lane % 4);
            if (c + 1 < p.dv && p.dv % 2 == 0) {
                *reinterpret_cast<std::uint32_t*>(out + c) = pack<C>(o[n][2 * h] * inv, o[n][2 * h + 1] * inv);
            } else {
                if (c < p.dv) out[c] = from_float<C>(o[n][2 * h] * inv);
                if (c + 1 < p.dv) out[c + 1] = from_float<C>(o[n][2 * h + 1] * inv);
            }
        }
        if (lane % 4 == 0) lse[t * p.Lq + i] = l[h] > 0.0f ? m[h] * 0.6931471805599453f + logf(l[h]) : neg_inf;
    }
}

// Writes a warp's (16 × HD) accumulator strip times `factor` to rows [r0, r0 + 16) of a (len × width)
// matrix (row stride width), columns < width.
template <class C, int HD>
__device__ inline void store_strip(C* out, std::int64_t r0, std::int64_t len, int width, const float (&acc)[HD / 8][4], float factor, int lane) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const std::int64_t r = r0 + lane / 4 + 8 * h;
        if (r >= len) continue;
        C* row = out + r * width;
#pragma unroll
        for (int n = 0; n < HD / 8; ++n) {
            const int c = 8 * n + 2 * (lane % 4);
            if (c + 1 < width && width % 2 == 0) {
                *reinterpret_cast<std::uint32_t*>(row + c) = pack<C>(factor * acc[n][2 * h], factor * acc[n][2 * h + 1]);
            } else {
                if (c < width) row[c] = from_float<C>(factor * acc[n][2 * h]);
                if (c + 1 < width) row[c + 1] = from_float<C>(factor * acc[n][2 * h + 1]);
            }
        }
    }
}

// ---- backward (16-bit) ----
// dK, dV (and dS) for keys [j0, j0 + 64) of leading index t, over the query blocks that see them.
// Grid: (key blocks of 64, t) or (t, key blocks). Warp w owns keys j0 + 16w ..+15 and computes the transposed tiles, so
// its accumulators hold its own keys' rows: Sᵀ = K·Qᵀ, dPᵀ = V·dOᵀ (16 keys × 64 queries), then
//   Pᵀ = 2^(x − lse·log2 e), dSᵀ = Pᵀ ⊙ (dPᵀ·dropout − D),  dV += (Pᵀ·dropout)·dO,  dK += dSᵀ·Q
// with Pᵀ and dSᵀ repacked from the accumulators as A operands. Q, dO, the bias tile, lse and D are
// double-buffered by cp.async. dS of a full-shape bias gradient goes through the bias tile's buffer
// (each thread overwrites the elements it read) and out in coalesced 16-byte rows; a broadcast bias's
// dS goes to the fp32 scratch. Tiles skipped under a mask are not written (the caller zeroes them).
template <class C, int HD, bool Plain>
__global__ void __launch_bounds__(threads, Plain && HD == 64 ? AUTODIFF_MMA_PLAIN_DKDV_BLOCKS : 1)
    dkdv_kernel(Problem given, const C* Q, const C* K, const C* V, const C* dO, const float* lse, const float* D, C* dK, C* dV,
                C* dbias_full, float* dS_scratch) {
    constexpr int LD = HD + 8;
    const Problem p = specialised<Plain>(given);
    if constexpr (Plain) dbias_full = nullptr, dS_scratch = nullptr;
    // Key block 0 first: under a causal mask it sees every query block.
    const std::int64_t t = grid_plane<Plain>(p), j0 = grid_block<Plain>(p) * rows;
    const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
    extern __shared__ __align__(128) unsigned char smem[];
    C* sK = reinterpret_cast<C*>(smem);  // (rows, LD)
    C* sV = sK + rows * LD;              // (rows, LD)
    C* sQ = sV + rows * LD;              // 2 × (cols, LD)
    C* sdO = sQ + 2 * cols * LD;         // 2 × (cols, LD)
    C* sB = sdO + 2 * cols * LD;         // 2 × (cols queries, bias_ld): bias tile, then dS (none when Plain)
    float* s_lse = reinterpret_cast<float*>(sB + (Plain ? 0 : 2 * cols * bias_ld));  // 2 × cols, times log2(e)
    float* s_D = s_lse + 2 * cols;                                     // 2 × cols

    const BiasTiles<C> bias(p, t);
    const KeyMasks kp = Plain ? KeyMasks{} : key_masks(p, t);
    stage_async<rows, HD>(sK, LD, K + t * p.Lk * p.d, p.d, j0, p.Lk, p.d);
    stage_async<rows, HD>(sV, LD, V + t * p.Lk * p.dv, p.dv, j0, p.Lk, p.dv);
    cp_async_commit();
    // Plain at HD = 64 with two blocks an SM (room for 32 more registers): the warp's K and V rows stay
    // in registers as A fragments (read from shared memory once instead of once a query block; the
    // products Sᵀ and dPᵀ then load only B).
    constexpr bool hold = Plain && HD == 64 && AUTODIFF_MMA_PLAIN_DKDV_BLOCKS <= 2;
    std::uint32_t kf[hold ? HD / 16 : 1][4], vf[hold ? HD / 16 : 1][4];
    if constexpr (hold) {
        cp_async_wait<0>();
        __syncthreads();
#pragma unroll
        for (int k = 0; k < HD / 16; ++k) {
            load_a(kf[k], sK + warp * 16 * LD, LD, k, lane);
            load_a(vf[k], sV + warp * 16 * LD, LD, k, lane);
        }
    }

    float dk[HD / 8][4], dv[HD / 8][4];
#pragma unroll
    for (int n = 0; n < HD / 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) dk[n][e] = dv[n][e] = 0.0f;

    const C* Qt = Q + t * p.Lq * p.d;
    const C* dOt = dO + t * p.Lq * p.dv;
    auto issue = [&](std::int64_t qb, int buf) {
        const std::int64_t i0 = qb * cols;
        stage_async<cols, HD>(sQ + buf * cols * LD, LD, Qt, p.d, i0, p.Lq, p.d);
        stage_async<cols, HD>(sdO + buf * cols * LD, LD, dOt, p.dv, i0, p.Lq, p.dv);
        // The bias tile here is (queries × keys): queries i0.., keys j0.. (rows × cols = 64 × 64).
        bias.stage_tile(p, sB + buf * cols * bias_ld, i0, j0);
        for (int r = threadIdx.x; r < cols; r += threads) {
            const bool in = i0 + r < p.Lq;
            s_lse[buf * cols + r] = in ? lse[t * p.Lq + i0 + r] * log2e : neg_inf;
            s_D[buf * cols + r] = in ? D[t * p.Lq + i0 + r] : 0.0f;
        }
    };
    // Causal: query blocks before the first row that sees key j0 are skipped; no kept key: all are.
    // Empty keep tiles are skipped too.
    const std::uint8_t* ktiles = keep_tiles_of(p, t);
    const std::int64_t q_blocks = (p.Lq + cols - 1) / cols, kt = grid_block<Plain>(p);
    auto next_block = [&](std::int64_t qb) {
        while (qb < q_blocks && keep_class(p, ktiles, qb, kt) == detail::keep_tile_empty) ++qb;
        return qb;
    };
    std::int64_t qb = tile_has_key(p, kp, j0) ? next_block(p.causal ? j0 / cols : 0) : q_blocks;
    if (qb < q_blocks) issue(qb, 0);
    cp_async_commit();
    const std::int64_t jw = j0 + warp * 16;
    for (int buf = 0; qb < q_blocks; buf ^= 1) {
        const std::int64_t nb = next_block(qb + 1);
        if (nb < q_blocks) issue(nb, buf ^ 1);
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();
        const std::int64_t i0 = qb * cols;
        const C* Q_tile = sQ + buf * cols * LD;
        const C* dO_tile = sdO + buf * cols * LD;
        C* B_tile = sB + buf * cols * bias_ld;
        const float* lse2 = s_lse + buf * cols;
        const float* Dq = s_D + buf * cols;

        float st[n_tiles][4], dpt[n_tiles][4];
#pragma unroll
        for (int n = 0; n < n_tiles; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) st[n][e] = dpt[n][e] = 0.0f;
        if constexpr (hold) {
            product_rbt<C, HD>(st, kf, Q_tile, LD, lane);
            product_rbt<C, HD>(dpt, vf, dO_tile, LD, lane);
        } else {
            product_abt<C, HD>(st, sK + warp * 16 * LD, Q_tile, LD, lane);
            product_abt<C, HD>(dpt, sV + warp * 16 * LD, dO_tile, LD, lane);
        }

        // Element (n, e): key j = jw + frag_row, query i = i0 + frag_col. st <- Pᵀ·dropout, dpt <- dSᵀ.
        const float sc = p.scale * log2e, bsc = p.bias_scale * log2e;
        // The transposed bias tile's rows (queries 8n.., keys of this warp's half h) are 8×8 matrices:
        // ldmatrix.trans hands each thread the (query 8n + 2q, 8n + 2q + 1; key g + 8h) pairs of its
        // accumulators, and stmatrix.trans writes dS back the same way. Call c covers n-tiles 2c, 2c + 1.
        C* const bias_rows = B_tile + (8 * (lane / 16) + lane % 8) * bias_ld + warp * 16 + lane / 8 % 2 * 8;
        auto pair_of = [](int n, int h) { return n % 2 * 2 + h; };  // register of (n-tile n, half h) in call n/2
        const KeyMasks km = tile_masks(kp, keep_class(p, ktiles, qb, kt));
        if (!tile_needs_mask(p, km, i0, cols, jw, 16) && (!bias.base || bias.staged) && !p.dropout) {
            // Lean path: every element visible, every row's lse finite; P = 0 only where x = −inf.
            std::uint32_t bt[n_tiles / 2][4] = {};
            if (bias.base) {
#pragma unroll
                for (int c = 0; c < n_tiles / 2; ++c) ldmatrix_x4_trans(bt[c], bias_rows + 16 * c * bias_ld);
            }
#pragma unroll
            for (int n = 0; n < n_tiles; ++n) {
                const float2 l2 = *reinterpret_cast<const float2*>(lse2 + frag_col(lane, n, 0));
                const float2 d2 = *reinterpret_cast<const float2*>(Dq + frag_col(lane, n, 0));
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const float2 b2 = to_float2<C>(bt[n / 2][pair_of(n, e / 2)]);
                    const float x = fmaf(st[n][e], sc, bsc * ((e & 1) ? b2.y : b2.x));
                    const float P = x == neg_inf ? 0.0f : exp2_fast(x - ((e & 1) ? l2.y : l2.x));
                    const float dS = P * (dpt[n][e] - ((e & 1) ? d2.y : d2.x));
                    st[n][e] = P;
                    dpt[n][e] = dS;
                }
            }
        } else {
#pragma unroll
            for (int n = 0; n < n_tiles; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int kr = frag_row(lane, e), qc = frag_col(lane, n, e);
                    const std::int64_t i = i0 + qc, j = jw + kr;
                    float P = 0.0f;
                    if (visible(p, km, i, j) && lse2[qc] != neg_inf) {
                        const float x = (p.scale * st[n][e] + p.bias_scale * bias.at(B_tile, qc, warp * 16 + kr, i, j)) * log2e;
                        if (x != neg_inf) P = exp2_fast(x - lse2[qc]);
                    }
                    const float factor = dropout_of(p, t, i, j);
                    st[n][e] = P * factor;
                    dpt[n][e] = P * (dpt[n][e] * factor - Dq[qc]);
                }
        }
        if (dbias_full) {
            // bias_scale·dS over the bias tile (each warp its own 16 keys, whose bias it has read).
#pragma unroll
            for (int c = 0; c < n_tiles / 2; ++c) {
                std::uint32_t w[4];
#pragma unroll
                for (int m = 0; m < 4; ++m) {
                    const int n = 2 * c + m / 2, h = m % 2;
                    w[m] = pack<C>(p.bias_scale * dpt[n][2 * h], p.bias_scale * dpt[n][2 * h + 1]);
                }
                stmatrix_x4_trans(bias_rows + 16 * c * bias_ld, w);
            }
        }
        if (dS_scratch) {
#pragma unroll
            for (int n = 0; n < n_tiles; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const std::int64_t i = i0 + frag_col(lane, n, e), j = jw + frag_row(lane, e);
                    if (i < p.Lq && j < p.Lk) dS_scratch[(t * p.Lq + i) * p.Lk + j] = dpt[n][e];
                }
        }
        product_xb<C, HD>(dv, st, dO_tile, LD, lane);
        product_xb<C, HD>(dk, dpt, Q_tile, LD, lane);
        if (dbias_full) {
            // The (64 queries × 64 keys) dS tile to the bias gradient, 16 bytes a thread at a time.
            __syncthreads();
            const std::int64_t qrows = min(std::int64_t{cols}, p.Lq - i0), kcols = min(std::int64_t{rows}, p.Lk - j0);
            C* out = dbias_full + (t * p.Lq + i0) * p.Lk + j0;
            if (p.Lk % 8 == 0) {
                for (int e = threadIdx.x; e < cols * (rows / 8); e += threads) {
                    const int r = e / (rows / 8), c = e % (rows / 8) * 8;
                    if (r < qrows && c < kcols)
                        *reinterpret_cast<int4*>(out + r * p.Lk + c) = *reinterpret_cast<const int4*>(B_tile + r * bias_ld + c);
                }
            } else {
                for (int e = threadIdx.x; e < cols * rows; e += threads) {
                    const int r = e / rows, c = e % rows;
                    if (r < qrows && c < kcols) out[r * p.Lk + c] = B_tile[r * bias_ld + c];
                }
            }
        }
        __syncthreads();
        qb = nb;
    }
    cp_async_wait<0>();
    if (dK) store_strip<C, HD>(dK + t * p.Lk * p.d, jw, p.Lk, p.d, dk, p.scale, lane);
    if (dV) store_strip<C, HD>(dV + t * p.Lk * p.dv, jw, p.Lk, p.dv, dv, 1.0f, lane);
}

// dQ for queries [i0, i0 + 64) of leading index t, over the key blocks they see. Grid: (query blocks, t) or (t, query blocks).
// Warp w owns queries i0 + 16w ..+15. Recomputing (FromBiasGradient false): S = Q·Kᵀ, dP = dO·Vᵀ,
// P = 2^(x − lse·log2 e), dS = P ⊙ (dP·dropout − D), dQ += dS·K with dS repacked as A. Reading
// (FromBiasGradient true, a full-shape bias gradient already written by dkdv_kernel with bias_scale ≠
// 0): dS = dbias / bias_scale comes staged from it, and dQ = scale / bias_scale · dbias·K.
template <class C, int HD, bool FromBiasGradient, bool Plain>
__global__ void __launch_bounds__(threads, Plain && HD == 64 ? AUTODIFF_MMA_PLAIN_DQ_BLOCKS : 1)
    dq_kernel(Problem given, const C* Q, const C* K, const C* V, const C* dO, const float* lse, const float* D, const C* dbias_full, C* dQ) {
    static_assert(!(Plain && FromBiasGradient));
    constexpr int LD = HD + 8;
    const Problem p = specialised<Plain>(given);
    // Query blocks in reverse: under a causal mask the last ones see the most keys, and starting them
    // first keeps the tail of the grid short.
    const std::int64_t t = grid_plane<Plain>(p), i0 = (grid_blocks<Plain>(p) - 1 - grid_block<Plain>(p)) * rows;
    const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
    extern __shared__ __align__(128) unsigned char smem[];
    C* sQ = reinterpret_cast<C*>(smem);  // (rows, LD)
    C* sdO = sQ + rows * LD;             // (rows, LD)
    C* sK = sdO + rows * LD;             // 2 × (cols, LD)
    C* sV = sK + 2 * cols * LD;          // 2 × (cols, LD)
    C* sB = sV + 2 * cols * LD;          // 2 × (rows, bias_ld): bias tile, or dS read back

    const BiasTiles<C> bias(p, t);
    const KeyMasks kp = Plain ? KeyMasks{} : key_masks(p, t);
    const std::uint8_t* ktiles = keep_tiles_of(p, t);
    const std::int64_t qt = i0 / rows;  // the keep tile row
    if (!FromBiasGradient) {
        stage_async<rows, HD>(sQ, LD, Q + t * p.Lq * p.d, p.d, i0, p.Lq, p.d);
        stage_async<rows, HD>(sdO, LD, dO + t * p.Lq * p.dv, p.dv, i0, p.Lq, p.dv);
    }
    cp_async_commit();
    const std::int64_t iw = i0 + warp * 16;
    float lse2[2], Di[2];
    for (int h = 0; h < 2; ++h) {
        const std::int64_t i = iw + lane / 4 + 8 * h;
        lse2[h] = i < p.Lq ? lse[t * p.Lq + i] * log2e : neg_inf;
        Di[h] = i < p.Lq ? D[t * p.Lq + i] : 0.0f;
    }
    float dq[HD / 8][4];
#pragma unroll
    for (int n = 0; n < HD / 8; ++n) dq[n][0] = dq[n][1] = dq[n][2] = dq[n][3] = 0.0f;

    const C* Kt = K + t * p.Lk * p.d;
    const C* Vt = V + t * p.Lk * p.dv;
    const std::int64_t end = key_block_end(p, i0, rows, cols);
    auto next_block = [&](std::int64_t kb) {
        while (kb < end && (!tile_has_key(p, kp, kb * cols) || keep_class(p, ktiles, qt, kb) == detail::keep_tile_empty)) ++kb;
        return kb;
    };
    auto issue = [&](std::int64_t kb, int buf) {
        const std::int64_t j0 = kb * cols;
        stage_async<cols, HD>(sK + buf * cols * LD, LD, Kt, p.d, j0, p.Lk, p.d);
        if constexpr (FromBiasGradient) {
            stage_async<rows, cols>(sB + buf * rows * bias_ld, bias_ld, dbias_full + t * p.Lq * p.Lk + j0, p.Lk, i0, p.Lq,
                                   static_cast<int>(min(std::int64_t{cols}, p.Lk - j0)));
        } else {
            stage_async<cols, HD>(sV + buf * cols * LD, LD, Vt, p.dv, j0, p.Lk, p.dv);
            bias.stage_tile(p, sB + buf * rows * bias_ld, i0, j0);
        }
    };
    std::int64_t kb = next_block(0);
    if (kb < end) issue(kb, 0);
    cp_async_commit();
    for (int buf = 0; kb < end; buf ^= 1) {
        const std::int64_t nb = next_block(kb + 1);
        if (nb < end) issue(nb, buf ^ 1);
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();
        const std::int64_t j0 = kb * cols;
        const C* K_tile = sK + buf * cols * LD;
        const C* B_tile = sB + buf * rows * bias_ld + warp * 16 * bias_ld;
        if constexpr (FromBiasGradient) {
            product_ab<C, HD>(dq, B_tile, bias_ld, K_tile, LD, lane);
        } else {
            float s[n_tiles][4], dp[n_tiles][4];
#pragma unroll
            for (int n = 0; n < n_tiles; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e) s[n][e] = dp[n][e] = 0.0f;
            product_abt<C, HD>(s, sQ + warp * 16 * LD, K_tile, LD, lane);
            product_abt<C, HD>(dp, sdO + warp * 16 * LD, sV + buf * cols * LD, LD, lane);
            // x in base 2 (−inf where masked), P = 2^(x − lse·log2 e) (0 for rows with nothing visible).
            scores_to_base2(s, p, bias, tile_masks(kp, keep_class(p, ktiles, qt, kb)), B_tile, iw, j0, lane);
#pragma unroll
            for (int n = 0; n < n_tiles; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e) s[n][e] = s[n][e] == neg_inf || lse2[e / 2] == neg_inf ? 0.0f : exp2_fast(s[n][e] - lse2[e / 2]);
            if (p.dropout) {
#pragma unroll
                for (int n = 0; n < n_tiles; ++n)
#pragma unroll
                    for (int e = 0; e < 4; ++e) dp[n][e] *= dropout_of(p, t, iw + frag_row(lane, e), j0 + frag_col(lane, n, e));
            }
            // dS = P ⊙ (dP·dropout − D), in place.
#pragma unroll
            for (int n = 0; n < n_tiles; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e) s[n][e] *= dp[n][e] - Di[e / 2];
            product_xb<C, HD>(dq, s, K_tile, LD, lane);
        }
        __syncthreads();
        kb = nb;
    }
    cp_async_wait<0>();
    const float factor = FromBiasGradient ? p.scale / p.bias_scale : p.scale;
    store_strip<C, HD>(dQ + t * p.Lq * p.d, iw, p.Lq, p.d, dq, factor, lane);
}

// Dynamic shared memory of each kernel, matching the carving at the top of each.
template <class C>
std::size_t forward_smem(int HD, bool plain) {
    return sizeof(C) * ((rows + 4 * cols) * (HD + 8) + (plain ? 0 : 2 * rows * bias_ld));
}
template <class C>
std::size_t dkdv_smem(int HD, bool plain) {
    return sizeof(C) * ((2 * rows + 4 * cols) * (HD + 8) + (plain ? 0 : 2 * cols * bias_ld)) + sizeof(float) * 4 * cols;
}
template <class C>
std::size_t dq_smem(int HD, bool plain) {
    return sizeof(C) * ((2 * rows + 4 * cols) * (HD + 8) + (plain ? 0 : 2 * rows * bias_ld));
}

}  // namespace mma

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
        case detail::DeviceDType::f64: break;  // double attention: attention_fp64.cu
    }
    return cudaErrorInvalidValue;
}

unsigned elementwise_grid(std::int64_t n) { return static_cast<unsigned>(n < 256 * 4096 ? (n + 255) / 256 : 4096); }

// The 16-bit launchers: kernels instantiated for head dimensions padded to 64 or 128.
template <class C>
cudaError_t mma_forward(const Problem& p, const C* Q, const C* K, const C* V, C* O, float* lse) {
    const int HD = mma::head_dim_bucket(p.d, p.dv);
    const bool plain = mma::plain_problem(p);
    const auto kernel = plain ? (HD == 64 ? mma::forward_kernel<C, 64, true> : mma::forward_kernel<C, 128, true>)
                              : (HD == 64 ? mma::forward_kernel<C, 64, false> : mma::forward_kernel<C, 128, false>);
    const std::size_t smem = mma::forward_smem<C>(HD, plain);
    if (const cudaError_t e = allow_smem(kernel, smem); e != cudaSuccess) return e;
    Problem q = p;
    const dim3 grid = mma::mma_grid(q, p.Lq, plain);
    kernel<<<grid, mma::threads, smem>>>(q, Q, K, V, O, lse);
    return cudaGetLastError();
}

// A second stream of the current device (non-blocking, created once), on which the recomputing dQ
// kernel runs next to the dK/dV kernel: the two read the same inputs and write different outputs, so
// neither waits for the other and the tail of one fills with blocks of the other (causal grids end
// unevenly). Forked from and joined back to the default stream by events, so callers see one stream.
cudaError_t side_stream(cudaStream_t& stream) {
    static std::mutex lock;
    static std::map<int, cudaStream_t> streams;
    int device = 0;
    if (const cudaError_t e = cudaGetDevice(&device); e != cudaSuccess) return e;
    const std::lock_guard<std::mutex> guard(lock);
    auto it = streams.find(device);
    if (it == streams.end()) {
        cudaStream_t created = nullptr;
        if (const cudaError_t e = cudaStreamCreateWithFlags(&created, cudaStreamNonBlocking); e != cudaSuccess) return e;
        it = streams.emplace(device, created).first;
    }
    stream = it->second;
    return cudaSuccess;
}

// Makes `waiter` wait for the work queued so far on `from`.
cudaError_t stream_wait(cudaStream_t waiter, cudaStream_t from) {
    cudaEvent_t event = nullptr;
    if (const cudaError_t e = cudaEventCreateWithFlags(&event, cudaEventDisableTiming); e != cudaSuccess) return e;
    cudaError_t e = cudaEventRecord(event, from);
    if (e == cudaSuccess) e = cudaStreamWaitEvent(waiter, event, 0);
    const cudaError_t destroyed = cudaEventDestroy(event);  // released once it has completed
    return e != cudaSuccess ? e : destroyed;
}

// dK/dV (and dS) over key blocks, then dQ over query blocks: read back from a full-shape bias gradient
// when there is one (bias_scale ≠ 0, else dS cannot be recovered from it), recomputed otherwise (then on
// the side stream, concurrently with dK/dV).
template <class C>
cudaError_t mma_backward(const Problem& p, const C* Q, const C* K, const C* V, const C* dO, const float* lse, const float* D, C* dQ, C* dK,
                         C* dV, C* dbias_full, float* dS_scratch) {
    const int HD = mma::head_dim_bucket(p.d, p.dv);
    const bool plain = mma::plain_problem(p) && !dbias_full && !dS_scratch;
    const bool dkdv = dK || dV || dbias_full || dS_scratch, read_back = dbias_full && p.bias_scale != 0.0f;
    cudaStream_t dq_stream = nullptr;  // the default stream, or the side stream when both kernels run and dQ recomputes
    // -DAUTODIFF_NO_SIDE_STREAM: both on the default stream, one after the other (for comparison runs).
#ifndef AUTODIFF_NO_SIDE_STREAM
    if (dQ && dkdv && !read_back) {
        if (const cudaError_t e = side_stream(dq_stream); e != cudaSuccess) return e;
        if (const cudaError_t e = stream_wait(dq_stream, nullptr); e != cudaSuccess) return e;
    }
#endif
    auto launch_dkdv = [&]() -> cudaError_t {
        if (!dkdv) return cudaSuccess;
        const auto kernel = plain ? (HD == 64 ? mma::dkdv_kernel<C, 64, true> : mma::dkdv_kernel<C, 128, true>)
                                  : (HD == 64 ? mma::dkdv_kernel<C, 64, false> : mma::dkdv_kernel<C, 128, false>);
        const std::size_t smem = mma::dkdv_smem<C>(HD, plain);
        if (const cudaError_t e = allow_smem(kernel, smem); e != cudaSuccess) return e;
        Problem q = p;
        const dim3 grid = mma::mma_grid(q, p.Lk, plain);
        kernel<<<grid, mma::threads, smem>>>(q, Q, K, V, dO, lse, D, dK, dV, dbias_full, dS_scratch);
        return cudaGetLastError();
    };
    auto launch_dq = [&]() -> cudaError_t {
        if (!dQ) return cudaSuccess;
        const auto kernel = read_back ? (HD == 64 ? mma::dq_kernel<C, 64, true, false> : mma::dq_kernel<C, 128, true, false>)
                            : plain   ? (HD == 64 ? mma::dq_kernel<C, 64, false, true> : mma::dq_kernel<C, 128, false, true>)
                                      : (HD == 64 ? mma::dq_kernel<C, 64, false, false> : mma::dq_kernel<C, 128, false, false>);
        const std::size_t smem = mma::dq_smem<C>(HD, plain && !read_back);
        if (const cudaError_t e = allow_smem(kernel, smem); e != cudaSuccess) return e;
        Problem q = p;
        const dim3 grid = mma::mma_grid(q, p.Lq, plain && !read_back);
        kernel<<<grid, mma::threads, smem, dq_stream>>>(q, Q, K, V, dO, lse, D, dbias_full, dQ);
        return cudaGetLastError();
    };
    // dK/dV first: its blocks are dispatched first, and dQ's fill the SMs its tail leaves idle. Measured on
    // the H200 (docs/bench_gpuskip_2026-12-04.md): dQ first, or the side stream at the highest priority, no faster.
    if (const cudaError_t e = launch_dkdv(); e != cudaSuccess) return e;
    if (const cudaError_t e = launch_dq(); e != cudaSuccess) return e;
    if (dq_stream) return stream_wait(nullptr, dq_stream);
    return cudaGetLastError();
}

}  // namespace

namespace detail {

cudaError_t launch_attention_forward(DeviceDType dtype, const AttentionProblem& p, const void* Q, const void* K, const void* V, void* O,
                                     float* lse) {
    return dispatch(dtype, [&](auto* tag) {
        using C = std::remove_pointer_t<decltype(tag)>;
        const auto* q = static_cast<const C*>(Q);
        const auto* k = static_cast<const C*>(K);
        const auto* v = static_cast<const C*>(V);
        if constexpr (!std::is_same_v<C, float>) {
            return mma_forward<C>(p, q, k, v, static_cast<C*>(O), lse);
        } else {
            const std::size_t smem = forward_smem<C>(p.d, p.dv);
            if (const cudaError_t e = allow_smem(attention_forward_kernel<C>, smem); e != cudaSuccess) return e;
            const dim3 grid(static_cast<unsigned>((p.Lq + Tile<C>::rows - 1) / Tile<C>::rows), static_cast<unsigned>(p.items));
            attention_forward_kernel<C><<<grid, threads, smem>>>(p, q, k, v, static_cast<C*>(O), lse);
            return cudaGetLastError();
        }
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
        if constexpr (!std::is_same_v<C, float>) {
            return mma_backward<C>(p, q, k, v, dout, lse, D, static_cast<C*>(dQ), static_cast<C*>(dK), static_cast<C*>(dV),
                                   static_cast<C*>(dbias_full), dS_scratch);
        } else {
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
        }
    });
}

cudaError_t launch_keep_tile_classify(const AttentionProblem& p, std::int64_t planes_b, std::int64_t planes_h, std::uint8_t* tiles) {
    const dim3 grid(static_cast<unsigned>((p.Lk + keep_tile - 1) / keep_tile), static_cast<unsigned>((p.Lq + keep_tile - 1) / keep_tile),
                    static_cast<unsigned>(planes_b * planes_h));
    keep_tile_classify_kernel<<<grid, 256>>>(p, planes_h, tiles);
    return cudaGetLastError();
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

#pragma once
// Register-blocked products for the fused attention tiles (internal to src/kernels).
//
// C (m×n) = beta·C + alpha·op(A)·B, where op(A)(r, p) = A[r·a_row + p·a_col] (so a transposed A costs
// nothing: its elements are broadcast one at a time anyway) and B is row-major with leading
// dimension ldb. The micro-kernel keeps a block of 6 rows × 4 vectors of C in registers across the
// whole k loop (24 accumulators: 6×64 floats with AVX-512; 6 × 2 vectors with 16 registers), loads
// the vectors of a row of B and broadcasts 6 elements of A per step, and never packs its operands: Eigen's GEMM re-packs both
// operands on every call, which at attention's 64×64 tiles costs more than the arithmetic.
// GCC/Clang vector extensions pick the widest registers the target has (-march=native).

#include <cstdint>
#include <cstring>
#if defined(__SSE2__)
#include <immintrin.h>
#endif

namespace autodiff::detail {

// The target's widest vector registers. With 32 of them (AVX-512) a 6-row block holds 4 vectors per
// row in 24 accumulators; with 16 (AVX2, SSE) it holds 2, which keeps 12 accumulators, 2 rows of B
// and 1 broadcast in registers.
#if defined(__AVX512F__)
inline constexpr int simd_bytes = 64, block_vectors = 4;
#elif defined(__AVX__)
inline constexpr int simd_bytes = 32, block_vectors = 2;
#else
inline constexpr int simd_bytes = 16, block_vectors = 2;
#endif

// A vector of Bytes/sizeof(T) lanes; narrower ones serve the columns left over by the widest.
template <class T, int Bytes>
struct Simd {
    using type [[gnu::vector_size(Bytes)]] = T;
    static constexpr int lanes = Bytes / static_cast<int>(sizeof(T));
};

template <class V, class T>
inline V load(const T* p) {
    V v;
    std::memcpy(&v, p, sizeof(v));
    return v;
}
template <class V, class T>
inline void store(T* p, V v) {
    std::memcpy(p, &v, sizeof(v));
}

// dst[0, n) = src[0, n) with non-temporal stores where dst is vector-aligned: for data written once
// and read much later (it bypasses the caches instead of evicting the working set). Call
// stream_fence() before other threads read what was streamed.
template <class T>
inline void stream_row(T* dst, const T* src, std::int64_t n) {
    std::int64_t c = 0;
#if defined(__SSE2__)
    constexpr int W = Simd<T, simd_bytes>::lanes;
    if (reinterpret_cast<std::uintptr_t>(dst) % simd_bytes == 0)
        for (; c + W <= n; c += W) {
#if defined(__AVX512F__)
            if constexpr (sizeof(T) == 4) _mm512_stream_ps(reinterpret_cast<float*>(dst + c), _mm512_loadu_ps(reinterpret_cast<const float*>(src + c)));
            else _mm512_stream_pd(reinterpret_cast<double*>(dst + c), _mm512_loadu_pd(reinterpret_cast<const double*>(src + c)));
#elif defined(__AVX__)
            if constexpr (sizeof(T) == 4) _mm256_stream_ps(reinterpret_cast<float*>(dst + c), _mm256_loadu_ps(reinterpret_cast<const float*>(src + c)));
            else _mm256_stream_pd(reinterpret_cast<double*>(dst + c), _mm256_loadu_pd(reinterpret_cast<const double*>(src + c)));
#else
            if constexpr (sizeof(T) == 4) _mm_stream_ps(reinterpret_cast<float*>(dst + c), _mm_loadu_ps(reinterpret_cast<const float*>(src + c)));
            else _mm_stream_pd(reinterpret_cast<double*>(dst + c), _mm_loadu_pd(reinterpret_cast<const double*>(src + c)));
#endif
        }
#endif
    for (; c < n; ++c) dst[c] = src[c];
}
inline void stream_fence() {
#if defined(__SSE2__)
    _mm_sfence();
#endif
}

// Prefetches `rows` rows of `n` elements, `stride` elements apart, into the caches: a tile of a
// large row-major matrix, whose rows are too far apart for the hardware prefetchers to follow.
template <class T>
inline void prefetch_rows(const T* p, std::int64_t rows, std::int64_t n, std::int64_t stride) {
    constexpr std::int64_t line = 64 / sizeof(T);
    for (std::int64_t r = 0; r < rows; ++r)
        for (std::int64_t c = 0; c < n; c += line) __builtin_prefetch(p + r * stride + c, 0, 3);
}

// MR rows × NV vectors (of Bytes bytes) of C.
template <class T, int MR, int NV, int Bytes = simd_bytes>
inline void micro_kernel(std::int64_t k, T alpha, const T* A, std::int64_t a_row, std::int64_t a_col, const T* B,
                         std::int64_t ldb, T beta, T* C, std::int64_t ldc) {
    using V = typename Simd<T, Bytes>::type;
    constexpr int W = Simd<T, Bytes>::lanes;
    V acc[MR][NV];
    for (int r = 0; r < MR; ++r)
        for (int v = 0; v < NV; ++v) acc[r][v] = V{};
    for (std::int64_t p = 0; p < k; ++p) {
        V b[NV];
        for (int v = 0; v < NV; ++v) b[v] = load<V>(B + p * ldb + v * W);
        for (int r = 0; r < MR; ++r) {
            const V a = V{} + A[r * a_row + p * a_col];
            for (int v = 0; v < NV; ++v) acc[r][v] += a * b[v];
        }
    }
    for (int r = 0; r < MR; ++r)
        for (int v = 0; v < NV; ++v) {
            V c = acc[r][v] * alpha;
            if (beta != T(0)) c += load<V>(C + r * ldc + v * W) * beta;
            store(C + r * ldc + v * W, c);
        }
}

// Rows [r0, r0 + MR) of C for every column: blocks of block_vectors full-width vectors, then single
// vectors of halving width (down to 16 bytes), then scalars.
template <class T, int MR>
inline void row_block(std::int64_t n, std::int64_t k, T alpha, const T* A, std::int64_t a_row, std::int64_t a_col,
                      const T* B, std::int64_t ldb, T beta, T* C, std::int64_t ldc) {
    constexpr int W = Simd<T, simd_bytes>::lanes;
    constexpr int NV = block_vectors;
    std::int64_t c = 0;
    for (; c + NV * W <= n; c += NV * W) micro_kernel<T, MR, NV>(k, alpha, A, a_row, a_col, B + c, ldb, beta, C + c, ldc);
    for (; c + W <= n; c += W) micro_kernel<T, MR, 1>(k, alpha, A, a_row, a_col, B + c, ldb, beta, C + c, ldc);
    if constexpr (simd_bytes >= 64) {
        constexpr int W2 = Simd<T, 32>::lanes;
        if (c + W2 <= n) {
            micro_kernel<T, MR, 1, 32>(k, alpha, A, a_row, a_col, B + c, ldb, beta, C + c, ldc);
            c += W2;
        }
    }
    if constexpr (simd_bytes >= 32) {
        constexpr int W4 = Simd<T, 16>::lanes;
        if (c + W4 <= n) {
            micro_kernel<T, MR, 1, 16>(k, alpha, A, a_row, a_col, B + c, ldb, beta, C + c, ldc);
            c += W4;
        }
    }
    for (; c < n; ++c)
        for (int r = 0; r < MR; ++r) {
            T s = 0;
            for (std::int64_t p = 0; p < k; ++p) s += A[r * a_row + p * a_col] * B[p * ldb + c];
            T& dst = C[r * ldc + c];
            dst = alpha * s + (beta != T(0) ? beta * dst : T(0));
        }
}

// C (m×n) = beta·C + alpha·op(A)·B. beta == 0: C is not read.
template <class T>
void tile_gemm(std::int64_t m, std::int64_t n, std::int64_t k, T alpha, const T* A, std::int64_t a_row, std::int64_t a_col,
               const T* B, std::int64_t ldb, T beta, T* C, std::int64_t ldc) {
    constexpr int MR = 6;
    std::int64_t r = 0;
    for (; r + MR <= m; r += MR) row_block<T, MR>(n, k, alpha, A + r * a_row, a_row, a_col, B, ldb, beta, C + r * ldc, ldc);
    const T* Ar = A + r * a_row;
    T* Cr = C + r * ldc;
    switch (m - r) {
        case 5: row_block<T, 5>(n, k, alpha, Ar, a_row, a_col, B, ldb, beta, Cr, ldc); break;
        case 4: row_block<T, 4>(n, k, alpha, Ar, a_row, a_col, B, ldb, beta, Cr, ldc); break;
        case 3: row_block<T, 3>(n, k, alpha, Ar, a_row, a_col, B, ldb, beta, Cr, ldc); break;
        case 2: row_block<T, 2>(n, k, alpha, Ar, a_row, a_col, B, ldb, beta, Cr, ldc); break;
        case 1: row_block<T, 1>(n, k, alpha, Ar, a_row, a_col, B, ldb, beta, Cr, ldc); break;
        default: break;
    }
}

}  // namespace autodiff::detail

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

#include "autodiff/detail/simd.hpp"

namespace autodiff::detail {

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
        for (int v = 0; v < NV; ++v) {
            b[v] = load<V>(B + p * ldb + v * W);
#if defined(__x86_64__) || defined(__i386__)
            // Keeps b in a register: with few rows GCC folds the load into every FMA instead, which
            // makes a 4-row block load-bound (half speed on Zen 4).
            asm("" : "+v"(b[v]));
#endif
        }
        for (int r = 0; r < MR; ++r) {
            const V a = A[r * a_row + p * a_col] - V{};  // a broadcast (x − 0 is x, also for −0: it folds; 0 + x does not)
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

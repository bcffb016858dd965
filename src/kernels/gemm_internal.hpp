#pragma once
// Products shared by the kernels in src/kernels (internal; the public ones are in kernels/gemm.hpp).

#include <algorithm>
#include <array>
#include <cstdint>
#include <limits>

#include "autodiff/tensor.hpp"

namespace autodiff {

// Where packed_gemm reads an operand or writes its result: element (r, c) of a matrix kept in
// blocks of row_block rows × col_block columns, each block strided inside (row, col), the blocks
// strided by row_block_stride and col_block_stride. The blocks along one axis (parts_along_rows:
// the rows, else the columns) are grouped blocks_per_part at a time into separate tensors (part).
// A plain matrix is one block. The attention's head layout (B, H, L, D), seen as the (B·L) × (H·D)
// matrix of merge_heads, has blocks of L rows × D columns; S such tensors side by side are S parts.
template <class T>
struct MatrixLayout {
    static constexpr std::int64_t whole = std::numeric_limits<std::int64_t>::max();
    std::array<T*, 3> part{};
    std::int64_t row = 0, col = 0;
    std::int64_t row_block = whole, col_block = whole;
    std::int64_t row_block_stride = 0, col_block_stride = 0;
    std::int64_t blocks_per_part = 1;
    bool parts_along_rows = false;

    [[nodiscard]] T* at(std::int64_t r, std::int64_t c) const {
        const std::int64_t rb = r / row_block, cb = c / col_block;
        const std::int64_t g = parts_along_rows ? rb : cb;
        const std::int64_t rbi = parts_along_rows ? rb % blocks_per_part : rb, cbi = parts_along_rows ? cb : cb % blocks_per_part;
        return part[static_cast<std::size_t>(g / blocks_per_part)] + rbi * row_block_stride + (r % row_block) * row + cbi * col_block_stride +
               (c % col_block) * col;
    }
    // The end of the run of rows (columns) from r (c) that lies in one block, at most `limit`.
    [[nodiscard]] std::int64_t rows_end(std::int64_t r, std::int64_t limit) const { return block_end(r, row_block, limit); }
    [[nodiscard]] std::int64_t cols_end(std::int64_t c, std::int64_t limit) const { return block_end(c, col_block, limit); }

    static std::int64_t block_end(std::int64_t x, std::int64_t block, std::int64_t limit) {
        const std::int64_t end = (x / block + 1) * block;  // no overflow: x / whole is 0
        return end < limit ? end : limit;
    }
};

// The row-major matrix with element (r, c) at p[r·row + c·col] (col = 1: rows contiguous; row = 1:
// the transpose of a row-major matrix).
template <class T>
MatrixLayout<T> plain_layout(T* p, std::int64_t row, std::int64_t col) {
    MatrixLayout<T> m;
    m.part[0] = p;
    m.row = row;
    m.col = col;
    return m;
}

// `parts` tensors (B, H, L, D) side by side as the (B·L) × (parts·H·D) matrix of merge_heads on
// each and concatenation: row b·L + l, column (s·H + h)·D + d is parts[s][b, h, l, d]. With
// `transposed`, the (parts·H·D) × (B·L) matrix (features × tokens).
template <class T>
MatrixLayout<T> heads_layout(const std::array<T*, 3>& parts, std::int64_t H, std::int64_t L, std::int64_t D, bool transposed) {
    MatrixLayout<T> m;
    m.part = parts;
    m.blocks_per_part = H;
    // An empty L or D addresses no element; blocks of 1 keep the index arithmetic defined.
    const std::int64_t token = D, token_block = H * L * D, feature = 1, feature_block = L * D;
    L = std::max<std::int64_t>(L, 1);
    D = std::max<std::int64_t>(D, 1);
    if (!transposed) {
        m.row = token, m.row_block = L, m.row_block_stride = token_block;
        m.col = feature, m.col_block = D, m.col_block_stride = feature_block;
    } else {
        m.parts_along_rows = true;
        m.row = feature, m.row_block = D, m.row_block_stride = feature_block;
        m.col = token, m.col_block = L, m.col_block_stride = token_block;
    }
    return m;
}

// C (m × n) = beta·C + alpha·A (m × k)·B (k × n) (+ col_bias, n values, added to every row), on the
// tile micro-kernel with B packed (gemm.cpp). C's columns must be contiguous inside its blocks
// (C.col == 1). With beta == 0, C is not read. Bit-identical for any thread count.
template <class T>
void packed_gemm(std::int64_t m, std::int64_t n, std::int64_t k, T alpha, const MatrixLayout<const T>& A, const MatrixLayout<const T>& B,
                 T beta, const MatrixLayout<T>& C, const T* col_bias = nullptr);

// y2 (m × n) = x2 (m × k)·Wᵀ (W: n × k) + b (n, or undefined): linear's product, with the bias added
// in the GEMM's output pass. Shapes are validated by the caller (linear_output_shape).
template <class T>
void linear_product(const Tensor<T>& x2, const Tensor<T>& W, const Tensor<T>& b, Tensor<T>& y2);

}  // namespace autodiff

#pragma once
// Row loops that also sum per-column contributions over all rows (the weight and bias gradients of
// the norms, the bias gradient of bias_gelu), bit-identical for any thread count: the rows are split
// into chunks that depend on the shapes only, each chunk adds its rows in order into partial sums of
// its own, and the partials are added in chunk order at the end. Internal to src/kernels.

#include <algorithm>
#include <array>
#include <cstdint>

#include "autodiff/parallel.hpp"
#include "autodiff/tensor.hpp"

namespace autodiff::detail {

struct RowChunks {
    std::int64_t count;           // number of chunks
    std::int64_t rows_per_chunk;  // the last one may hold fewer
};

// At least 2^14 elements per chunk (a chunk's partial sums cost one pass over n elements), and at most
// 64 chunks (the partial sums take 64·n elements per column sum; 64 keeps many threads busy).
inline RowChunks row_chunks(std::int64_t rows, std::int64_t n) {
    constexpr std::int64_t min_elements = 1 << 14, max_chunks = 64;
    const std::int64_t per = std::max({std::int64_t{1}, (min_elements + n - 1) / std::max<std::int64_t>(n, 1),
                                       (rows + max_chunks - 1) / max_chunks});
    return {(rows + per - 1) / per, per};
}

// Calls row_fn(r, sums) once for every row r in [0, rows), where sums[k] points at the n accumulators of
// column sum k to which row r adds its contributions (nullptr where out[k] is nullptr: not wanted).
// out[k] (n elements each) is overwritten with the sum over all rows. cost_per_row (scalar operations)
// decides whether the loop runs in parallel (parallel.hpp).
template <class T, std::size_t K, class RowFn>
void rows_with_column_sums(std::int64_t rows, std::int64_t n, const std::array<T*, K>& out, std::int64_t cost_per_row,
                           RowFn&& row_fn) {
    bool any = false;
    for (T* o : out) {
        if (!o) continue;
        any = true;
        std::fill_n(o, n, T(0));
    }
    if (!any) {  // every row is independent
        parallel_for(rows, cost_per_row, [&](std::int64_t r) { row_fn(r, out); });
        return;
    }
    const RowChunks chunks = row_chunks(rows, n);
    if (chunks.count <= 1) {
        for (std::int64_t r = 0; r < rows; ++r) row_fn(r, out);
        return;
    }
    Tensor<T> partial = zeros<T>({chunks.count, static_cast<std::int64_t>(K), n});
    auto partial_row = [&](std::int64_t c, std::size_t k) { return partial.data() + (c * static_cast<std::int64_t>(K) + static_cast<std::int64_t>(k)) * n; };
    parallel_for(chunks.count, chunks.rows_per_chunk * cost_per_row, [&](std::int64_t c) {
        std::array<T*, K> sums{};
        for (std::size_t k = 0; k < K; ++k) sums[k] = out[k] ? partial_row(c, k) : nullptr;
        const std::int64_t end = std::min(rows, (c + 1) * chunks.rows_per_chunk);
        for (std::int64_t r = c * chunks.rows_per_chunk; r < end; ++r) row_fn(r, sums);
    });
    for (std::size_t k = 0; k < K; ++k)
        if (out[k])
            for (std::int64_t c = 0; c < chunks.count; ++c) ArrayMap<T>(out[k], n) += ConstArrayMap<T>(partial_row(c, k), n);
}

}  // namespace autodiff::detail

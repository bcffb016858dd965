#include "autodiff/kernels/reduce.hpp"

#include <vector>

#include "autodiff/kernels/elementwise.hpp"
#include "autodiff/parallel.hpp"

namespace autodiff {

namespace {
constexpr std::int64_t sum_chunk = 1 << 14;

// Σ_i f(begin, end) over fixed chunks, combined in chunk order.
template <class T, class ChunkSum>
T chunked_sum(std::int64_t n, ChunkSum&& chunk_sum) {
    const std::int64_t chunks = (n + sum_chunk - 1) / sum_chunk;
    if (chunks <= 1) return n ? chunk_sum(0, n) : T(0);
    std::vector<T> partial(static_cast<std::size_t>(chunks));
    parallel_chunks(n, sum_chunk, [&](std::int64_t b, std::int64_t e) { partial[static_cast<std::size_t>(b / sum_chunk)] = chunk_sum(b, e); });
    T s = 0;
    for (T p : partial) s += p;
    return s;
}

void check_same(const char* op, const Shape& a, const Shape& b) {
    if (a != b) fail(op, "input and target must have the same shape, got input {} and target {}", a, b);
}
}  // namespace

template <class T>
T sum_forward(const Tensor<T>& x) {
    return chunked_sum<T>(x.numel(), [&](std::int64_t b, std::int64_t e) { return ConstArrayMap<T>(x.data() + b, e - b).sum(); });
}

template <class T>
T mse_loss_forward(const Tensor<T>& a, const Tensor<T>& b) {
    check_same("mse_loss", a.shape(), b.shape());
    if (a.numel() == 0) fail("mse_loss", "inputs are empty {}", a.shape());
    const T s = chunked_sum<T>(a.numel(), [&](std::int64_t s0, std::int64_t e) {
        return (ConstArrayMap<T>(a.data() + s0, e - s0) - ConstArrayMap<T>(b.data() + s0, e - s0)).square().sum();
    });
    return s / static_cast<T>(a.numel());
}

template <class T>
void mse_loss_backward(NoDeduce<Tensor<T>>* da, NoDeduce<Tensor<T>>* db, T dloss, const Tensor<T>& a, const Tensor<T>& b) {
    check_same("mse_loss_backward", a.shape(), b.shape());
    const T k = dloss * T(2) / static_cast<T>(a.numel());
    Tensor<T> g(a.shape());
    parallel_chunks(a.numel(), sum_chunk, [&](std::int64_t s, std::int64_t e) {
        ArrayMap<T>(g.data() + s, e - s) = k * (ConstArrayMap<T>(a.data() + s, e - s) - ConstArrayMap<T>(b.data() + s, e - s));
    });
    if (db) *db = unary_forward(Neg{}, g);
    if (da) *da = std::move(g);
}

template <class T>
Tensor<T> reduce_to_shape(const Tensor<T>& g, const Shape& target) {
    if (g.shape() == target) return g;
    if (!broadcasts_to(target, g.shape())) fail("reduce_to_shape", "cannot reduce {} to {}", g.shape(), target);
    Tensor<T> out = zeros<T>(target);
    const auto F = g.shape().padded();
    const auto R = Shape(target).padded();
    const std::int64_t out_rows = R[0] * R[1] * R[2];
    // Each output row is owned by one work item and sums its preimage rows in row-major order.
    parallel_for(out_rows, g.numel() / std::max<std::int64_t>(out_rows, 1), [&](std::int64_t r) {
        const std::int64_t t2 = r % R[2], t1 = r / R[2] % R[1], t0 = r / (R[2] * R[1]);
        ArrayMap<T> out_row(out.data() + r * R[3], R[3]);
        for (std::int64_t f0 = R[0] == 1 ? 0 : t0; f0 < (R[0] == 1 ? F[0] : t0 + 1); ++f0)
            for (std::int64_t f1 = R[1] == 1 ? 0 : t1; f1 < (R[1] == 1 ? F[1] : t1 + 1); ++f1)
                for (std::int64_t f2 = R[2] == 1 ? 0 : t2; f2 < (R[2] == 1 ? F[2] : t2 + 1); ++f2) {
                    ConstArrayMap<T> g_row(g.data() + ((f0 * F[1] + f1) * F[2] + f2) * F[3], F[3]);
                    if (R[3] == F[3]) out_row += g_row;
                    else out_row(0) += g_row.sum();
                }
    });
    return out;
}

#define AUTODIFF_INSTANTIATE(T)                                                                         \
    template T sum_forward<T>(const Tensor<T>&);                                                        \
    template T mse_loss_forward<T>(const Tensor<T>&, const Tensor<T>&);                                 \
    template void mse_loss_backward<T>(Tensor<T>*, Tensor<T>*, T, const Tensor<T>&, const Tensor<T>&);  \
    template Tensor<T> reduce_to_shape<T>(const Tensor<T>&, const Shape&);
AUTODIFF_INSTANTIATE(float)
AUTODIFF_INSTANTIATE(double)
#undef AUTODIFF_INSTANTIATE

}  // namespace autodiff

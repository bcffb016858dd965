#include "autodiff/kernels/gemm.hpp"

#include <algorithm>
#include <cmath>
#include <vector>

#include "autodiff/kernels/layout.hpp"
#include "autodiff/parallel.hpp"
#include "gemm_internal.hpp"
#include "tile_gemm.hpp"

namespace autodiff {

namespace {

// (rows, cols) of op(X) for X's last two dimensions.
std::pair<std::int64_t, std::int64_t> op_dims(const Shape& s, bool trans) {
    const std::int64_t r = s.dim_from_end(2), c = s.dim_from_end(1);
    return trans ? std::pair{c, r} : std::pair{r, c};
}

// Leading (batch) dimensions of a rank >= 3 shape.
Shape batch_of(const Shape& s) {
    return Shape::from_range(s.begin(), s.end() - 2);
}

template <class T>
using CMap = Eigen::Map<const RowMatrix<T>>;
template <class T>
using MMap = Eigen::Map<RowMatrix<T>>;

// Below this many multiply-adds, Eigen's blocked GEMM spends more time packing its operands than
// multiplying; the loops of small_gemm do not pack (attention's per-head products at short sequences).
constexpr std::int64_t small_product = 24 * 24 * 24;

// C = beta·C + alpha·op(A)·op(B) for small matrices with the attention tile kernel (tile_gemm.hpp);
// op(B) = Bᵀ is first transposed into a per-thread scratch buffer, since that kernel reads rows of op(B).
template <class T>
bool small_gemm(T alpha, const CMap<T>& A, bool ta, const CMap<T>& B, bool tb, T beta, MMap<T>& C) {
    const std::int64_t m = C.rows(), n = C.cols(), k = ta ? A.rows() : A.cols();
    if (m * n * k > small_product) return false;
    const T* b = B.data();
    if (tb) {
        thread_local std::vector<T> scratch;
        scratch.resize(static_cast<std::size_t>(k * n));
        for (std::int64_t j = 0; j < n; ++j)
            for (std::int64_t p = 0; p < k; ++p) scratch[static_cast<std::size_t>(p * n + j)] = b[j * k + p];
        b = scratch.data();
    }
    // op(A)(i, p) = A[i·a_row + p·a_col]: a transposed A is read through its strides.
    detail::tile_gemm<T>(m, n, k, alpha, A.data(), ta ? 1 : k, ta ? m : 1, b, n, beta, C.data(), n);
    return true;
}

// Products of at least this many multiply-adds run on packed_gemm; smaller ones on Eigen (whose
// packing is cheap there) or the tile kernel (small_gemm).
constexpr std::int64_t packed_product = 96 * 96 * 96;

}  // namespace

// C (m×n) = beta·C + alpha·A·B on the tile micro-kernel (tile_gemm.hpp) with B packed: the dense
// layers' GEMM, chosen by measurement over Eigen's product, OpenBLAS and BLIS
// (bench/gemm_backends.cpp, docs/PERFORMANCE.md). A, B and C are MatrixLayouts (gemm_internal.hpp):
// plain strided matrices, or the attention's head layout, which the packing and the output pass read
// and write directly (split_heads and merge_heads fused into linear, docs/ARCHITECTURE.md).
// 1. B is copied once into row-major panels of kc × nc (contiguous rows for the micro-kernel's
//    vector loads; a transposed B is transposed here), the panels in parallel.
// 2. C is cut into blocks of mc rows × nc columns; each block is one work item that runs the k panels
//    in order (its C block, A's rows and one panel stay in the L2 cache). The cuts depend on the
//    shapes only, never on the thread count: every element is computed by the same instructions in the
//    same order, so results are bit-identical for any thread count. Where A or C is kept in blocks
//    (head layout), the micro-kernel runs once per piece of the work item that lies in one block of
//    A and one of C (rows cut at both's row blocks, columns at C's, k at A's column blocks); a k cut
//    inside a panel adds that piece's partial sums to C on their own, a change of rounding only.
// 3. Epilogue: with a column bias (n values), each block adds it to its rows after its last panel,
//    while the block is still in the cache (linear's + b without another pass over y).
template <class T>
void packed_gemm(std::int64_t m, std::int64_t n, std::int64_t k, T alpha, const MatrixLayout<const T>& A, const MatrixLayout<const T>& B,
                 T beta, const MatrixLayout<T>& C, const T* col_bias) {
    constexpr std::int64_t kc = 256, nc = 256, mc = 192;
    // k == 0 still runs one (empty) panel: C = beta·C (+ bias).
    const std::int64_t k_panels = std::max<std::int64_t>(1, (k + kc - 1) / kc), n_panels = (n + nc - 1) / nc, m_blocks = (m + mc - 1) / mc;
    Tensor<T> packed(Shape{k_panels * n_panels * kc * nc});
    auto panel = [&](std::int64_t kp, std::int64_t np) { return packed.data() + (kp * n_panels + np) * kc * nc; };
    parallel_for(k_panels * n_panels, kc * nc, [&](std::int64_t i) {
        const std::int64_t kp = i / n_panels, np = i % n_panels, k0 = kp * kc, c0 = np * nc;
        const std::int64_t kk = std::min(kc, k - k0), cols = std::min(nc, n - c0);
        T* dst = panel(kp, np);
        for (std::int64_t p0 = k0; p0 < k0 + kk;) {
            const std::int64_t p1 = B.rows_end(p0, k0 + kk);
            for (std::int64_t ca = c0; ca < c0 + cols;) {
                const std::int64_t cb = B.cols_end(ca, c0 + cols), w_all = cb - ca;
                const T* src = B.at(p0, ca);
                T* out = dst + (p0 - k0) * cols + (ca - c0);
                if (B.col == 1) {
                    for (std::int64_t p = 0; p < p1 - p0; ++p) std::copy_n(src + p * B.row, w_all, out + p * cols);
                } else {  // transposed: 16 columns at a time, read along p (16 streams), written a line per p
                    for (std::int64_t c1 = 0; c1 < w_all; c1 += 16) {
                        const std::int64_t w = std::min<std::int64_t>(16, w_all - c1);
                        for (std::int64_t p = 0; p < p1 - p0; ++p)
                            for (std::int64_t c = c1; c < c1 + w; ++c) out[p * cols + c] = src[p * B.row + c * B.col];
                    }
                }
                ca = cb;
            }
            p0 = p1;
        }
    });
    parallel_for(m_blocks * n_panels, mc * nc * k, [&](std::int64_t i) {
        const std::int64_t r0 = (i / n_panels) * mc, np = i % n_panels, c0 = np * nc;
        const std::int64_t rows = std::min(mc, m - r0), cols = std::min(nc, n - c0);
        for (std::int64_t kp = 0; kp < k_panels; ++kp) {
            const std::int64_t k0 = kp * kc, kk = std::max<std::int64_t>(0, std::min(kc, k - k0));
            for (std::int64_t ra = r0; ra < r0 + rows;) {
                const std::int64_t rb = std::min(A.rows_end(ra, r0 + rows), C.rows_end(ra, r0 + rows));
                std::int64_t pa = k0;
                do {  // at least once: with k == 0, C = beta·C
                    const std::int64_t pb = kk ? A.cols_end(pa, k0 + kk) : k0;
                    const T beta_piece = kp == 0 && pa == k0 ? beta : T(1);
                    for (std::int64_t ca = c0; ca < c0 + cols;) {
                        const std::int64_t cb = C.cols_end(ca, c0 + cols);
                        detail::tile_gemm<T>(rb - ra, cb - ca, pb - pa, alpha, A.at(ra, pa), A.row, A.col,
                                             panel(kp, np) + (pa - k0) * cols + (ca - c0), cols, beta_piece, C.at(ra, ca), C.row);
                        ca = cb;
                    }
                    pa = pb;
                } while (pa < k0 + kk);
                ra = rb;
            }
        }
        if (col_bias)
            for (std::int64_t ca = c0; ca < c0 + cols;) {
                const std::int64_t cb = C.cols_end(ca, c0 + cols);
                for (std::int64_t r = r0; r < r0 + rows; ++r)
                    Eigen::Map<Eigen::Array<T, 1, Eigen::Dynamic>>(C.at(r, ca), cb - ca) +=
                        Eigen::Map<const Eigen::Array<T, 1, Eigen::Dynamic>>(col_bias + ca, cb - ca);
                ca = cb;
            }
    });
}

namespace {

// One product C = beta·C + alpha·op_c(op_a(A)·op_b(B)) on matrix views.
template <class T>
void gemm_one(T alpha, const CMap<T>& A, bool ta, const CMap<T>& B, bool tb, T beta, MMap<T> C, bool tc) {
    if (!tc && small_gemm(alpha, A, ta, B, tb, beta, C)) return;
    if (!tc) {
        const std::int64_t m = C.rows(), n = C.cols(), k = ta ? A.rows() : A.cols();
        if (m * n * k >= packed_product) {
            packed_gemm<T>(m, n, k, alpha, plain_layout(A.data(), ta ? 1 : k, ta ? m : 1), plain_layout(B.data(), tb ? 1 : n, tb ? k : 1), beta,
                           plain_layout(C.data(), n, 1));
            return;
        }
    }
    auto run = [&](const auto& a, const auto& b) {
        auto assign = [&](auto&& dst, const auto& lhs, const auto& rhs) {
            if (beta == T(0)) {
                dst.noalias() = alpha * lhs * rhs;
            } else {
                if (beta != T(1)) dst *= beta;
                dst.noalias() += alpha * lhs * rhs;
            }
        };
        if (tc)  // (a·b)ᵀ = bᵀ·aᵀ
            assign(C, b.transpose(), a.transpose());
        else
            assign(C, a, b);
    };
    if (ta) {
        if (tb) run(A.transpose(), B.transpose());
        else run(A.transpose(), B);
    } else {
        if (tb) run(A, B.transpose());
        else run(A, B);
    }
}

template <class T>
CMap<T> slice(const Tensor<T>& X, std::int64_t i, bool batched) {
    const auto [r, c] = X.matrix_dims();
    return CMap<T>(X.data() + (batched ? i * r * c : 0), r, c);
}

}  // namespace

Shape gemm_output_shape(std::string_view op, const Shape& a, bool trans_a, const Shape& b, bool trans_b) {
    check_rank(op, "lhs", a, 2, 4);
    check_rank(op, "rhs", b, 2, 4);
    const auto [m, ka] = op_dims(a, trans_a);
    const auto [kb, n] = op_dims(b, trans_b);
    if (ka != kb)
        fail(op, "inner dimensions differ: lhs {}{} vs rhs {}{}", a, trans_a ? " (transposed)" : "", b,
             trans_b ? " (transposed)" : "");
    if (a.rank() > 2 && b.rank() > 2 && batch_of(a) != batch_of(b))
        fail(op, "batch dimensions differ: lhs {} vs rhs {}", a, b);
    Shape out = a.rank() > 2 ? batch_of(a) : b.rank() > 2 ? batch_of(b) : Shape{};
    out.push_back(m);
    out.push_back(n);
    return out;
}

template <class T>
void strided_batched_gemm(T alpha, const Tensor<T>& A, const Tensor<T>& B, T beta, Tensor<T>& C, GemmFlags f) {
    const char* op = "strided_batched_gemm";
    if (!A.defined() || !B.defined() || !C.defined()) fail(op, "A, B and C must be allocated tensors");
    Shape product = gemm_output_shape(op, A.shape(), f.trans_a, B.shape(), f.trans_b);
    const std::int64_t m = product.dim_from_end(2), n = product.dim_from_end(1);
    Shape expected = product;
    if (f.trans_c) {
        expected[expected.rank() - 2] = n;
        expected[expected.rank() - 1] = m;
    }
    const bool batched_in = A.rank() > 2 || B.rank() > 2;
    const bool reduce = batched_in && C.rank() == 2;  // C (M, N) receives the sum over the batch
    const Shape expected_c = reduce ? Shape{expected.dim_from_end(2), expected.dim_from_end(1)} : expected;
    if (C.shape() != expected_c)
        fail(op, "C has shape {} but op(A)·op(B) of A {} and B {} needs {}", C.shape(), A.shape(), B.shape(), expected_c);
    if (!(std::isfinite(alpha) && std::isfinite(beta))) fail(op, "alpha ({}) and beta ({}) must be finite", alpha, beta);

    const std::int64_t k = f.trans_a ? A.shape().dim_from_end(2) : A.shape().dim_from_end(1);
    const bool a_batched = A.rank() > 2, b_batched = B.rank() > 2;
    const std::int64_t batch = product.batch_count();

    // Contiguous batches of rows fold into one large product: A (batch, M, K) · B (K, N) is
    // (batch·M, K) · (K, N), and Aᵀ·B summed over the batch is (batch·K, M)ᵀ · (batch·K, N).
    if (!reduce && a_batched && !b_batched && !f.trans_a && !f.trans_c) {
        gemm_one<T>(alpha, CMap<T>(A.data(), batch * m, k), false, slice(B, 0, false), f.trans_b, beta,
                    MMap<T>(C.data(), batch * m, n), false);
        return;
    }
    if (reduce && a_batched && b_batched && f.trans_a && !f.trans_b && !f.trans_c) {
        gemm_one<T>(alpha, CMap<T>(A.data(), batch * k, m), true, CMap<T>(B.data(), batch * k, n), false, beta,
                    MMap<T>(C.data(), m, n), false);
        return;
    }
    // Plain variables, not a structured binding: lambdas below capture them (Clang 14 cannot capture bindings).
    const std::int64_t cr = C.matrix_dims().first, cc = C.matrix_dims().second;
    if (reduce) {  // sequential over the batch: a fixed summation order
        if (batch == 0) {  // the sum over an empty batch is 0: C = beta·C, and C is not read when beta == 0
            MMap<T> c(C.data(), cr, cc);
            if (beta == T(0)) c.setZero();
            else c *= beta;
            return;
        }
        for (std::int64_t i = 0; i < batch; ++i)
            gemm_one<T>(alpha, slice(A, i, a_batched), f.trans_a, slice(B, i, b_batched), f.trans_b,
                        i == 0 ? beta : T(1), MMap<T>(C.data(), cr, cc), f.trans_c);
        return;
    }
    parallel_for(batch, m * n * k, [&](std::int64_t i) {
        gemm_one<T>(alpha, slice(A, i, a_batched), f.trans_a, slice(B, i, b_batched), f.trans_b, beta,
                    MMap<T>(C.data() + i * cr * cc, cr, cc), f.trans_c);
    });
}

template <class T>
void linear_product(const Tensor<T>& x2, const Tensor<T>& W, const Tensor<T>& b, Tensor<T>& y2) {
    const std::int64_t m = x2.dim(0), k = x2.dim(1), n = W.dim(0);
    if (m * n * k >= packed_product) {
        packed_gemm<T>(m, n, k, T(1), plain_layout(x2.data(), k, 1), plain_layout(W.data(), 1, k), T(0), plain_layout(y2.data(), n, 1),
                       b.defined() ? b.data() : nullptr);
        return;
    }
    strided_batched_gemm<T>(T(1), x2, W, T(0), y2, {false, true, false});
    if (b.defined()) y2.matrix().rowwise() += b.matrix().row(0);
}

template <class T>
Tensor<T> matmul_forward(const Tensor<T>& A, bool trans_a, const Tensor<T>& B, bool trans_b) {
    Tensor<T> C(gemm_output_shape("matmul", A.shape(), trans_a, B.shape(), trans_b));
    strided_batched_gemm<T>(T(1), A, B, T(0), C, {trans_a, trans_b, false});
    return C;
}

template <class T>
void strided_batched_gemm_backward(NoDeduce<Tensor<T>>* dA, NoDeduce<Tensor<T>>* dB, const Tensor<T>& dC, T alpha,
                                   const Tensor<T>& A, const Tensor<T>& B, T beta, GemmFlags f) {
    const char* op = "strided_batched_gemm_backward";
    if (!A.defined() || !B.defined() || !dC.defined()) fail(op, "A, B and dC must be allocated tensors");
    Shape c = gemm_output_shape(op, A.shape(), f.trans_a, B.shape(), f.trans_b);
    if (f.trans_c) std::swap(c[c.rank() - 1], c[c.rank() - 2]);
    if (dC.shape() != c) fail(op, "dC has shape {} but C of A {} and B {} has shape {}", dC.shape(), A.shape(), B.shape(), c);
    if (dA && dA->shape() != A.shape()) fail(op, "dA must have A's shape {}, got {}", A.shape(), dA->shape());
    if (dB && dB->shape() != B.shape()) fail(op, "dB must have B's shape {}, got {}", B.shape(), dB->shape());
    // dP, the gradient of the product P = op_a(A)·op_b(B): C holds P or Pᵀ.
    Tensor<T> dP = dC;
    if (f.trans_c) {
        Permutation swap{0, 1, 2, 3};
        std::swap(swap[static_cast<std::size_t>(dC.rank() - 1)], swap[static_cast<std::size_t>(dC.rank() - 2)]);
        dP = permute_forward(dC, swap);
    }
    if (dA) {
        if (!f.trans_a)  // dA = dP·op_b(B)ᵀ
            strided_batched_gemm<T>(alpha, dP, B, beta, *dA, {false, !f.trans_b, false});
        else  // dA = op_b(B)·dPᵀ
            strided_batched_gemm<T>(alpha, B, dP, beta, *dA, {f.trans_b, true, false});
    }
    if (dB) {
        if (!f.trans_b)  // dB = op_a(A)ᵀ·dP
            strided_batched_gemm<T>(alpha, A, dP, beta, *dB, {!f.trans_a, false, false});
        else  // dB = dPᵀ·op_a(A)
            strided_batched_gemm<T>(alpha, dP, A, beta, *dB, {true, f.trans_a, false});
    }
}

template <class T>
void matmul_backward(NoDeduce<Tensor<T>>* dA, NoDeduce<Tensor<T>>* dB, const Tensor<T>& dC, const Tensor<T>& A, bool trans_a,
                     const Tensor<T>& B, bool trans_b) {
    if (dA) *dA = Tensor<T>(A.shape());
    if (dB) *dB = Tensor<T>(B.shape());
    strided_batched_gemm_backward<T>(dA, dB, dC, T(1), A, B, T(0), {trans_a, trans_b, false});
}

#define AUTODIFF_INSTANTIATE(T)                                                                                   \
    template void strided_batched_gemm<T>(T, const Tensor<T>&, const Tensor<T>&, T, Tensor<T>&, GemmFlags);       \
    template void strided_batched_gemm_backward<T>(Tensor<T>*, Tensor<T>*, const Tensor<T>&, T, const Tensor<T>&, \
                                                   const Tensor<T>&, T, GemmFlags);                               \
    template Tensor<T> matmul_forward<T>(const Tensor<T>&, bool, const Tensor<T>&, bool);                         \
    template void linear_product<T>(const Tensor<T>&, const Tensor<T>&, const Tensor<T>&, Tensor<T>&);           \
    template void packed_gemm<T>(std::int64_t, std::int64_t, std::int64_t, T, const MatrixLayout<const T>&,       \
                                 const MatrixLayout<const T>&, T, const MatrixLayout<T>&, const T*);              \
    template void matmul_backward<T>(Tensor<T>*, Tensor<T>*, const Tensor<T>&, const Tensor<T>&, bool,            \
                                     const Tensor<T>&, bool);
AUTODIFF_INSTANTIATE(float)
AUTODIFF_INSTANTIATE(double)
#undef AUTODIFF_INSTANTIATE

}  // namespace autodiff

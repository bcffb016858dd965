// Every kernel against straightforward loops written here (double unless stated), and Philox known answers.
//
// Tolerances: fp64 results are compared with 1e-12 absolute error on O(1) values (or relative to
// max(1, |value|)): the sums here have at most a few hundred terms, so rounding stays below 1e-13.
// fp32 results are compared with relative 1e-5 (float epsilon is 6e-8; a few hundred roundings fit).

#include <doctest/doctest.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <numbers>
#include <string>
#include <utility>
#include <vector>

#include <fmt/format.h>

#include "../src/kernels/philox_simd.hpp"  // internal headers: tested here directly
#include <autodiff/detail/simd.hpp>
#include "../src/kernels/tile_gemm.hpp"

#include "autodiff/error.hpp"
#include "autodiff/kernels/dropout.hpp"
#include "autodiff/kernels/elementwise.hpp"
#include "autodiff/kernels/gemm.hpp"
#include "autodiff/kernels/layout.hpp"
#include "autodiff/kernels/linear.hpp"
#include "autodiff/kernels/reduce.hpp"
#include "autodiff/kernels/softmax.hpp"
#include "autodiff/parallel.hpp"
#include "autodiff/random.hpp"
#include "autodiff/tensor.hpp"

namespace ad = autodiff;

namespace {

using Tensor = ad::Tensor<double>;
using Index = std::array<std::int64_t, 4>;

constexpr double fp64_tol = 1e-12;  // see the file comment
constexpr double qnan = std::numeric_limits<double>::quiet_NaN();
constexpr double inf = std::numeric_limits<double>::infinity();

// Calls fn(i) for every index of `s`, padded on the left to rank 4, in row-major order.
template <class Fn>
void for_each_index(const ad::Shape& s, Fn&& fn) {
    const auto p = s.padded();
    for (std::int64_t i0 = 0; i0 < p[0]; ++i0)
        for (std::int64_t i1 = 0; i1 < p[1]; ++i1)
            for (std::int64_t i2 = 0; i2 < p[2]; ++i2)
                for (std::int64_t i3 = 0; i3 < p[3]; ++i3) fn(Index{i0, i1, i2, i3});
}

// Flat offset in a tensor of shape `s` of the (rank-4 padded) index `i` of a larger shape that `s`
// broadcasts to: dimensions of size 1 read index 0.
std::int64_t broadcast_offset(const ad::Shape& s, const Index& i) {
    const auto p = s.padded();
    std::int64_t off = 0;
    for (std::size_t d = 0; d < 4; ++d) off = off * p[d] + (p[d] == 1 ? 0 : i[d]);
    return off;
}

Tensor randn(const ad::Shape& s, std::uint64_t seed) { return ad::randn<double>(s, seed); }

// Every element within `tol` (absolute), else one failure naming the first bad index and the worst error.
template <class T>
void check_close(const ad::Tensor<T>& got, const ad::Tensor<T>& want, double tol = fp64_tol) {
    REQUIRE(got.shape() == want.shape());
    std::int64_t bad = 0, first_bad = -1;
    double worst = 0;
    for (std::int64_t i = 0; i < got.numel(); ++i) {
        const double d = std::abs(static_cast<double>(got.data()[i]) - static_cast<double>(want.data()[i]));
        if (!(d <= tol)) {
            if (bad++ == 0) first_bad = i;
        }
        if (d > worst || std::isnan(d)) worst = d;
    }
    CHECK_MESSAGE(bad == 0, fmt::format("{} of {} elements of {} differ by more than {}; first at flat index {} "
                                        "(got {}, want {}); max abs err {}",
                                        bad, got.numel(), got.shape(), tol, first_bad,
                                        first_bad >= 0 ? static_cast<double>(got.data()[first_bad]) : 0.0,
                                        first_bad >= 0 ? static_cast<double>(want.data()[first_bad]) : 0.0, worst));
}

template <class T>
bool bitwise_equal(const ad::Tensor<T>& a, const ad::Tensor<T>& b) {
    return a.shape() == b.shape() &&
           std::memcmp(a.data(), b.data(), static_cast<std::size_t>(a.numel()) * sizeof(T)) == 0;
}

// Sets the library's thread count for one scope.
class ThreadCount {
public:
    explicit ThreadCount(int n) { ad::set_num_threads(n); }
    ~ThreadCount() { ad::set_num_threads(saved_); }
    ThreadCount(const ThreadCount&) = delete;
    ThreadCount& operator=(const ThreadCount&) = delete;

private:
    int saved_ = ad::num_threads();
};

// A shape: the leading (batch) dimensions, then a (rows, cols) matrix stored transposed when `trans`.
ad::Shape matrix_shape(const ad::Shape& batch, std::int64_t rows, std::int64_t cols, bool trans = false) {
    ad::Shape s = batch;
    s.push_back(trans ? cols : rows);
    s.push_back(trans ? rows : cols);
    return s;
}

// ---- naive GEMM --------------------------------------------------------------------------------

// A batched operand seen as op(X)(b, r, c): batch b is ignored when X has rank 2 (broadcast).
struct OpView {
    const Tensor& x;
    bool trans;
    [[nodiscard]] double operator()(std::int64_t b, std::int64_t r, std::int64_t c) const {
        const std::int64_t rows = x.shape().dim_from_end(2), cols = x.shape().dim_from_end(1);
        const std::int64_t base = x.rank() > 2 ? b * rows * cols : 0;
        return trans ? x.data()[base + c * cols + r] : x.data()[base + r * cols + c];
    }
    [[nodiscard]] std::int64_t rows() const { return x.shape().dim_from_end(trans ? 1 : 2); }
    [[nodiscard]] std::int64_t cols() const { return x.shape().dim_from_end(trans ? 2 : 1); }
};

std::int64_t batch_of(const Tensor& A, const Tensor& B) {
    return A.rank() > 2 ? A.shape().batch_count() : B.shape().batch_count();
}

// C = beta·C0 + alpha·op_c(op_a(A)·op_b(B)); a rank-2 C with batched A or B receives the sum over the
// batch. With beta = 0, C0 is not read.
Tensor naive_gemm(double alpha, const Tensor& A, bool ta, const Tensor& B, bool tb, double beta, const Tensor& C0,
                  bool tc) {
    const OpView a{A, ta}, b{B, tb};
    const std::int64_t m = a.rows(), k = a.cols(), n = b.cols();
    const std::int64_t batch = batch_of(A, B);
    Tensor C = ad::zeros<double>(C0.shape());
    if (beta != 0)
        for (std::int64_t i = 0; i < C.numel(); ++i) C.data()[i] = beta * C0.data()[i];
    const bool c_batched = C.rank() > 2;
    for (std::int64_t bi = 0; bi < batch; ++bi)
        for (std::int64_t i = 0; i < m; ++i)
            for (std::int64_t j = 0; j < n; ++j) {
                double s = 0;
                for (std::int64_t p = 0; p < k; ++p) s += a(bi, i, p) * b(bi, p, j);
                const std::int64_t base = c_batched ? bi * m * n : 0;
                C.data()[base + (tc ? j * m + i : i * n + j)] += alpha * s;
            }
    return C;
}

// Gradients of C = op_a(A)·op_b(B) by their definition: dop_a(A)[m,k] = Σ_n dC[m,n]·op_b(B)[k,n],
// dop_b(B)[k,n] = Σ_m op_a(A)[m,k]·dC[m,n], written back through the transposes and summed over the
// batch for a rank-2 (broadcast) operand.
std::pair<Tensor, Tensor> naive_matmul_backward(const Tensor& dC, const Tensor& A, bool ta, const Tensor& B, bool tb) {
    const OpView a{A, ta}, b{B, tb}, dc{dC, false};
    const std::int64_t m = a.rows(), k = a.cols(), n = b.cols();
    const std::int64_t batch = batch_of(A, B);
    Tensor dA = ad::zeros<double>(A.shape()), dB = ad::zeros<double>(B.shape());
    auto at = [](Tensor& X, bool trans, std::int64_t bi, std::int64_t r, std::int64_t c) -> double& {
        const std::int64_t rows = X.shape().dim_from_end(2), cols = X.shape().dim_from_end(1);
        const std::int64_t base = X.rank() > 2 ? bi * rows * cols : 0;
        return trans ? X.data()[base + c * cols + r] : X.data()[base + r * cols + c];
    };
    for (std::int64_t bi = 0; bi < batch; ++bi) {
        for (std::int64_t i = 0; i < m; ++i)
            for (std::int64_t p = 0; p < k; ++p) {
                double s = 0;
                for (std::int64_t j = 0; j < n; ++j) s += dc(bi, i, j) * b(bi, p, j);
                at(dA, ta, bi, i, p) += s;
            }
        for (std::int64_t p = 0; p < k; ++p)
            for (std::int64_t j = 0; j < n; ++j) {
                double s = 0;
                for (std::int64_t i = 0; i < m; ++i) s += a(bi, i, p) * dc(bi, i, j);
                at(dB, tb, bi, p, j) += s;
            }
    }
    return {dA, dB};
}

struct Flags {
    bool ta, tb, tc;
};
std::vector<Flags> all_flags() {
    std::vector<Flags> f;
    for (int i = 0; i < 8; ++i) f.push_back({(i & 1) != 0, (i & 2) != 0, (i & 4) != 0});
    return f;
}

// Runs strided_batched_gemm against naive_gemm for one configuration: A and B with the given batch
// prefixes (empty: rank 2), C with c_batch, op(A) (m, k), op(B) (k, n).
void check_gemm(const ad::Shape& a_batch, const ad::Shape& b_batch, const ad::Shape& c_batch, std::int64_t m,
                std::int64_t k, std::int64_t n, Flags f, double alpha, double beta, std::uint64_t seed = 1) {
    CAPTURE(f.ta);
    CAPTURE(f.tb);
    CAPTURE(f.tc);
    CAPTURE(m);
    CAPTURE(k);
    CAPTURE(n);
    CAPTURE(beta);
    const Tensor A = randn(matrix_shape(a_batch, m, k, f.ta), seed);
    const Tensor B = randn(matrix_shape(b_batch, k, n, f.tb), seed + 1);
    // With beta = 0, C must not be read: fill it with NaN so that any read shows in the result.
    Tensor C = beta == 0 ? ad::full<double>(matrix_shape(c_batch, m, n, f.tc), qnan)
                         : randn(matrix_shape(c_batch, m, n, f.tc), seed + 2);
    const Tensor want = naive_gemm(alpha, A, f.ta, B, f.tb, beta, C, f.tc);
    ad::strided_batched_gemm<double>(alpha, A, B, beta, C, {f.ta, f.tb, f.tc});
    check_close(C, want);
}

}  // namespace

// ---- strided_batched_gemm --------------------------------------------------------------------------

TEST_CASE("strided_batched_gemm: batched x batched, every combination of trans_a, trans_b, trans_c") {
    for (const Flags f : all_flags()) {
        check_gemm({3}, {3}, {3}, 4, 6, 5, f, 0.75, -1.25);
        check_gemm({3}, {3}, {3}, 4, 6, 5, f, 1.0, 1.0);
    }
}

TEST_CASE("strided_batched_gemm: beta = 0 ignores NaN garbage in C") {
    for (const Flags f : all_flags()) {
        check_gemm({3}, {3}, {3}, 4, 6, 5, f, 0.5, 0.0);
        check_gemm({}, {}, {}, 4, 6, 5, f, 1.0, 0.0);
        check_gemm({}, {3}, {3}, 4, 6, 5, f, 1.0, 0.0);  // A broadcast
        check_gemm({3}, {}, {3}, 4, 6, 5, f, 1.0, 0.0);  // B broadcast
        check_gemm({3}, {3}, {}, 4, 6, 5, f, 1.0, 0.0);  // C receives the sum over the batch
        check_gemm({3}, {3}, {3}, 40, 33, 37, f, 1.0, 0.0);
    }
}

TEST_CASE("strided_batched_gemm: rank-4 operands (batch, heads, ., .)") {
    for (const Flags f : all_flags()) check_gemm({2, 3}, {2, 3}, {2, 3}, 5, 4, 3, f, -0.5, 2.0);
}

TEST_CASE("strided_batched_gemm: a rank-2 A is broadcast over the batch of B") {
    for (const Flags f : all_flags()) {
        check_gemm({}, {4}, {4}, 3, 5, 7, f, 1.5, -0.5);
        check_gemm({}, {2, 3}, {2, 3}, 3, 5, 7, f, 1.0, 0.0);
    }
}

TEST_CASE("strided_batched_gemm: a rank-2 B is broadcast over the batch of A") {
    for (const Flags f : all_flags()) {
        check_gemm({4}, {}, {4}, 3, 5, 7, f, 1.5, -0.5);
        check_gemm({2, 3}, {}, {2, 3}, 3, 5, 7, f, 1.0, 0.0);
    }
}

TEST_CASE("strided_batched_gemm: a rank-2 C receives the sum of the products over the batch") {
    for (const Flags f : all_flags()) {
        check_gemm({4}, {4}, {}, 3, 5, 7, f, 1.0, 0.0);
        check_gemm({4}, {4}, {}, 3, 5, 7, f, 0.5, -2.0);  // beta·C is added once, not once per batch
        check_gemm({2, 3}, {2, 3}, {}, 3, 5, 7, f, 1.0, 1.0);
        check_gemm({}, {4}, {}, 3, 5, 7, f, 1.0, 0.0);    // only B batched
        check_gemm({4}, {}, {}, 3, 5, 7, f, 1.0, 0.5);    // only A batched
    }
}

TEST_CASE("strided_batched_gemm: rank-2 A, B and C is one plain product") {
    for (const Flags f : all_flags()) check_gemm({}, {}, {}, 6, 4, 5, f, 2.0, -1.0);
}

TEST_CASE("strided_batched_gemm: odd sizes 1, 3, 7 in every dimension") {
    for (const Flags f : all_flags())
        for (std::int64_t m : {1, 3, 7})
            for (std::int64_t k : {1, 3, 7})
                for (std::int64_t n : {1, 3, 7}) {
                    check_gemm({3}, {3}, {3}, m, k, n, f, 1.0, 0.5);
                    check_gemm({3}, {}, {3}, m, k, n, f, 1.0, 0.0);
                    check_gemm({3}, {3}, {}, m, k, n, f, 1.0, 0.0);
                }
}

TEST_CASE("strided_batched_gemm: larger products (40x33x37, batch 3)") {
    // Sums of 33 products of N(0,1) values: magnitude ~6, rounding ~1e-14, well inside 1e-12.
    for (const Flags f : all_flags()) {
        check_gemm({3}, {3}, {3}, 40, 33, 37, f, 1.0, 0.5);
        check_gemm({3}, {}, {3}, 40, 33, 37, f, 1.0, 0.0);
        check_gemm({}, {3}, {3}, 40, 33, 37, f, 1.0, 0.0);
        check_gemm({3}, {3}, {}, 40, 33, 37, f, 1.0, 0.0);
    }
}

TEST_CASE("strided_batched_gemm: an empty inner dimension gives C = beta·C") {
    for (const Flags f : all_flags()) {
        check_gemm({2}, {2}, {2}, 3, 0, 4, f, 1.0, 0.0);
        check_gemm({2}, {2}, {2}, 3, 0, 4, f, 1.0, 0.5);
        check_gemm({2}, {2}, {}, 3, 0, 4, f, 1.0, 0.0);
    }
}

TEST_CASE("strided_batched_gemm: an empty batch summed into a rank-2 C gives C = beta·C") {
    for (const Flags f : all_flags()) {
        check_gemm({0}, {0}, {}, 3, 5, 4, f, 1.0, 0.0);  // C must become 0, whatever it held
        check_gemm({0}, {0}, {}, 3, 5, 4, f, 1.0, 0.5);
        check_gemm({0}, {}, {}, 3, 5, 4, f, 1.0, 0.0);
    }
}

TEST_CASE("strided_batched_gemm: float agrees with the double loops to relative 1e-5") {
    for (const Flags f : all_flags()) {
        CAPTURE(f.ta);
        CAPTURE(f.tb);
        CAPTURE(f.tc);
        const Tensor A = ad::uniform<double>(matrix_shape({3}, 5, 9, f.ta), -1.0, 1.0, 1);
        const Tensor B = ad::uniform<double>(matrix_shape({3}, 9, 6, f.tb), -1.0, 1.0, 2);
        const Tensor C0 = ad::uniform<double>(matrix_shape({3}, 5, 6, f.tc), -1.0, 1.0, 3);
        auto to_float = [](const Tensor& x) {
            ad::Tensor<float> y(x.shape());
            for (std::int64_t i = 0; i < x.numel(); ++i) y.data()[i] = static_cast<float>(x.data()[i]);
            return y;
        };
        // The double reference is computed from the float-rounded inputs, so only the product's
        // own rounding is measured.
        const ad::Tensor<float> Af = to_float(A), Bf = to_float(B);
        ad::Tensor<float> Cf = to_float(C0);
        Tensor Ad(A.shape()), Bd(B.shape()), Cd(C0.shape());
        for (std::int64_t i = 0; i < A.numel(); ++i) Ad.data()[i] = Af.data()[i];
        for (std::int64_t i = 0; i < B.numel(); ++i) Bd.data()[i] = Bf.data()[i];
        for (std::int64_t i = 0; i < C0.numel(); ++i) Cd.data()[i] = Cf.data()[i];
        const Tensor want = naive_gemm(0.5, Ad, f.ta, Bd, f.tb, 0.25, Cd, f.tc);
        ad::strided_batched_gemm<float>(0.5f, Af, Bf, 0.25f, Cf, {f.ta, f.tb, f.tc});
        std::int64_t bad = 0;
        for (std::int64_t i = 0; i < want.numel(); ++i)
            bad += !(std::abs(Cf.data()[i] - want.data()[i]) <= 1e-5 * std::max(1.0, std::abs(want.data()[i])));
        CHECK(bad == 0);
    }
}

TEST_CASE("strided_batched_gemm: mismatched inner dimensions throw naming both shapes") {
    const Tensor A = ad::zeros<double>({2, 3}), B = ad::zeros<double>({4, 5});
    Tensor C = ad::zeros<double>({2, 5});
    CHECK_THROWS_WITH_AS(ad::strided_batched_gemm<double>(1.0, A, B, 0.0, C),
                         "strided_batched_gemm: inner dimensions differ: lhs (2,3) vs rhs (4,5)", ad::Error);
    Tensor C2 = ad::zeros<double>({3, 5});
    CHECK_THROWS_WITH_AS(ad::strided_batched_gemm<double>(1.0, A, B, 0.0, C2, {true, false, false}),
                         "strided_batched_gemm: inner dimensions differ: lhs (2,3) (transposed) vs rhs (4,5)",
                         ad::Error);
}

TEST_CASE("strided_batched_gemm: different batch dimensions throw naming both shapes") {
    const Tensor A = ad::zeros<double>({2, 3, 4}), B = ad::zeros<double>({3, 4, 5});
    Tensor C = ad::zeros<double>({2, 3, 5});
    CHECK_THROWS_WITH_AS(ad::strided_batched_gemm<double>(1.0, A, B, 0.0, C),
                         "strided_batched_gemm: batch dimensions differ: lhs (2,3,4) vs rhs (3,4,5)", ad::Error);
    // Batched operands are not broadcast against each other: (1,3,4) with (2,4,5) is an error too.
    const Tensor A1 = ad::zeros<double>({1, 3, 4}), B2 = ad::zeros<double>({2, 4, 5});
    CHECK_THROWS_WITH_AS(ad::strided_batched_gemm<double>(1.0, A1, B2, 0.0, C),
                         "strided_batched_gemm: batch dimensions differ: lhs (1,3,4) vs rhs (2,4,5)", ad::Error);
}

TEST_CASE("strided_batched_gemm: a C of the wrong shape throws naming C, A, B and the needed shape") {
    const Tensor A = ad::zeros<double>({2, 3}), B = ad::zeros<double>({3, 4});
    Tensor C = ad::zeros<double>({3, 3});
    CHECK_THROWS_WITH_AS(ad::strided_batched_gemm<double>(1.0, A, B, 0.0, C),
                         "strided_batched_gemm: C has shape (3,3) but op(A)·op(B) of A (2,3) and B (3,4) needs (2,4)",
                         ad::Error);
    Tensor Ct = ad::zeros<double>({2, 4});  // trans_c wants (4,2)
    CHECK_THROWS_WITH_AS(ad::strided_batched_gemm<double>(1.0, A, B, 0.0, Ct, {false, false, true}),
                         "strided_batched_gemm: C has shape (2,4) but op(A)·op(B) of A (2,3) and B (3,4) needs (4,2)",
                         ad::Error);
}

TEST_CASE("strided_batched_gemm: rank 1 or undefined operands and non-finite alpha/beta throw") {
    const Tensor A = ad::zeros<double>({2, 3}), B = ad::zeros<double>({3, 4}), v = ad::zeros<double>({3});
    Tensor C = ad::zeros<double>({2, 4});
    CHECK_THROWS_WITH_AS(ad::strided_batched_gemm<double>(1.0, v, B, 0.0, C),
                         "strided_batched_gemm: lhs must have rank 2..4, got (3)", ad::Error);
    Tensor undefined;
    CHECK_THROWS_WITH_AS(ad::strided_batched_gemm<double>(1.0, A, B, 0.0, undefined),
                         "strided_batched_gemm: A, B and C must be allocated tensors", ad::Error);
    CHECK_THROWS_WITH_AS(ad::strided_batched_gemm<double>(qnan, A, B, 0.0, C),
                         "strided_batched_gemm: alpha (nan) and beta (0) must be finite", ad::Error);
    CHECK_THROWS_WITH_AS(ad::strided_batched_gemm<double>(1.0, A, B, inf, C),
                         "strided_batched_gemm: alpha (1) and beta (inf) must be finite", ad::Error);
}

// ---- matmul_forward / matmul_backward --------------------------------------------------------------

TEST_CASE("matmul_forward: op_a(A)·op_b(B) for every transpose flag, batched and broadcast") {
    struct Case {
        ad::Shape a_batch, b_batch;
    };
    for (const Case& c : {Case{{3}, {3}}, Case{{2, 3}, {2, 3}}, Case{{}, {3}}, Case{{3}, {}}, Case{{}, {}}})
        for (bool ta : {false, true})
            for (bool tb : {false, true}) {
                const std::string a_batch = c.a_batch.str(), b_batch = c.b_batch.str();
                CAPTURE(a_batch);
                CAPTURE(b_batch);
                CAPTURE(ta);
                CAPTURE(tb);
                const Tensor A = randn(matrix_shape(c.a_batch, 3, 7, ta), 5);
                const Tensor B = randn(matrix_shape(c.b_batch, 7, 4, tb), 6);
                const Tensor C = ad::matmul_forward(A, ta, B, tb);
                const ad::Shape batch = c.a_batch.rank() ? c.a_batch : c.b_batch;
                REQUIRE(C.shape() == matrix_shape(batch, 3, 4));
                check_close(C, naive_gemm(1.0, A, ta, B, tb, 0.0, ad::zeros<double>(C.shape()), false));
            }
}

TEST_CASE("matmul_backward: dA and dB by their definition, a broadcast operand's gradient summed over the batch") {
    struct Case {
        ad::Shape a_batch, b_batch;
    };
    for (const Case& c : {Case{{3}, {3}}, Case{{2, 3}, {2, 3}}, Case{{}, {3}}, Case{{3}, {}}, Case{{}, {2, 3}},
                          Case{{}, {}}})
        for (bool ta : {false, true})
            for (bool tb : {false, true}) {
                const std::string a_batch = c.a_batch.str(), b_batch = c.b_batch.str();
                CAPTURE(a_batch);
                CAPTURE(b_batch);
                CAPTURE(ta);
                CAPTURE(tb);
                const Tensor A = randn(matrix_shape(c.a_batch, 5, 3, ta), 7);
                const Tensor B = randn(matrix_shape(c.b_batch, 3, 7, tb), 8);
                const ad::Shape batch = c.a_batch.rank() ? c.a_batch : c.b_batch;
                const Tensor dC = randn(matrix_shape(batch, 5, 7), 9);
                const auto [dA_want, dB_want] = naive_matmul_backward(dC, A, ta, B, tb);
                Tensor dA, dB;
                ad::matmul_backward(&dA, &dB, dC, A, ta, B, tb);
                check_close(dA, dA_want);
                check_close(dB, dB_want);
            }
}

TEST_CASE("matmul_backward: a null gradient pointer skips that gradient") {
    const Tensor A = randn({2, 4, 3}, 1), B = randn({2, 3, 5}, 2), dC = randn({2, 4, 5}, 3);
    const auto [dA_want, dB_want] = naive_matmul_backward(dC, A, false, B, false);
    Tensor dA;
    ad::matmul_backward<double>(&dA, nullptr, dC, A, false, B, false);
    check_close(dA, dA_want);
    Tensor dB;
    ad::matmul_backward<double>(nullptr, &dB, dC, A, false, B, false);
    check_close(dB, dB_want);
}

TEST_CASE("matmul_forward: the design's example error message") {
    const Tensor Q(ad::Shape{2, 8, 128, 64}), Kt(ad::Shape{2, 8, 32, 128});
    CHECK_THROWS_WITH_AS((void)ad::matmul_forward(Q, false, Kt, false),
                         "matmul: inner dimensions differ: lhs (2,8,128,64) vs rhs (2,8,32,128)", ad::Error);
}

// ---- softmax_forward / softmax_backward ------------------------------------------------------------

namespace {

using KeepFn = std::function<bool(const Index&)>;
const KeepFn keep_all = [](const Index&) { return true; };

// y = softmax over the last dimension of z = x + additive, keys with keep(i) == false excluded;
// a row with no key left (or only -inf ones) gives 0. Computed stably (max subtracted).
Tensor naive_softmax(const Tensor& x, const KeepFn& keep, const Tensor& additive = {}) {
    Tensor y = ad::zeros<double>(x.shape());
    const auto p = x.shape().padded();
    const std::int64_t lk = p[3];
    for (std::int64_t i0 = 0; i0 < p[0]; ++i0)
        for (std::int64_t i1 = 0; i1 < p[1]; ++i1)
            for (std::int64_t i2 = 0; i2 < p[2]; ++i2) {
                std::vector<double> z(static_cast<std::size_t>(lk));
                std::vector<bool> kept(static_cast<std::size_t>(lk));
                double m = -inf;
                for (std::int64_t j = 0; j < lk; ++j) {
                    const Index idx{i0, i1, i2, j};
                    const auto u = static_cast<std::size_t>(j);
                    kept[u] = keep(idx);
                    z[u] = x.data()[broadcast_offset(x.shape(), idx)] +
                           (additive.defined() ? additive.data()[broadcast_offset(additive.shape(), idx)] : 0.0);
                    if (kept[u] && z[u] > m) m = z[u];
                }
                if (m == -inf) continue;
                double sum = 0;
                for (std::size_t u = 0; u < z.size(); ++u) sum += kept[u] ? std::exp(z[u] - m) : 0.0;
                for (std::int64_t j = 0; j < lk; ++j) {
                    const auto u = static_cast<std::size_t>(j);
                    y.data()[broadcast_offset(x.shape(), {i0, i1, i2, j})] = kept[u] ? std::exp(z[u] - m) / sum : 0.0;
                }
            }
    return y;
}

// dx = Jᵀ·dy with the softmax Jacobian written out: ∂y_j/∂x_k = y_j(δ_jk − y_k), row by row.
Tensor naive_softmax_backward(const Tensor& dy, const Tensor& y) {
    Tensor dx = ad::zeros<double>(y.shape());
    const std::int64_t lk = y.shape().dim_from_end(1), rows = y.numel() / lk;
    for (std::int64_t r = 0; r < rows; ++r) {
        const double* yr = y.data() + r * lk;
        const double* gr = dy.data() + r * lk;
        for (std::int64_t k = 0; k < lk; ++k) {
            double s = 0;
            for (std::int64_t j = 0; j < lk; ++j) s += gr[j] * yr[j] * ((j == k ? 1.0 : 0.0) - yr[k]);
            dx.data()[r * lk + k] = s;
        }
    }
    return dx;
}

ad::Tensor<bool> random_keep(const ad::Shape& s, std::uint64_t seed, double p_keep = 0.7) {
    const Tensor u = ad::uniform<double>(s, 0.0, 1.0, seed);
    ad::Tensor<bool> m(s);
    for (std::int64_t i = 0; i < u.numel(); ++i) m.data()[i] = u.data()[i] < p_keep;
    return m;
}

bool all_finite(const Tensor& t) {
    for (std::int64_t i = 0; i < t.numel(); ++i)
        if (!std::isfinite(t.data()[i])) return false;
    return true;
}

}  // namespace

TEST_CASE("softmax_forward: every row sums to 1") {
    const Tensor x = ad::unary_forward(ad::Scale<double>{3.0}, randn({2, 3, 4, 5}, 1));
    const Tensor y = ad::softmax_forward(x);
    for (std::int64_t r = 0; r < 2 * 3 * 4; ++r) {
        double s = 0;
        for (std::int64_t j = 0; j < 5; ++j) s += y.data()[r * 5 + j];
        CHECK(std::abs(s - 1.0) < fp64_tol);
    }
}

TEST_CASE("softmax_forward: equals exp(x_j) / sum_k exp(x_k) over the last dimension, any rank") {
    for (const ad::Shape& s : {ad::Shape{7}, ad::Shape{3, 5}, ad::Shape{2, 3, 4}, ad::Shape{2, 3, 4, 5}, ad::Shape{4, 1}}) {
        CAPTURE(s.str());
        const Tensor x = randn(s, 2);
        Tensor want(s);
        const std::int64_t lk = s.dim_from_end(1);
        for (std::int64_t r = 0; r < x.numel() / lk; ++r) {
            double sum = 0;
            for (std::int64_t j = 0; j < lk; ++j) sum += std::exp(x.data()[r * lk + j]);
            for (std::int64_t j = 0; j < lk; ++j) want.data()[r * lk + j] = std::exp(x.data()[r * lk + j]) / sum;
        }
        check_close(ad::softmax_forward(x), want);
    }
}

TEST_CASE("softmax_forward: logits of magnitude 1e4 do not overflow") {
    const Tensor x = ad::from_vector<double>({2, 4}, {1e4, 1e4 - 1, -1e4, 0, -1e4, -1e4 + 2, -1e4, -1e4});
    const Tensor y = ad::softmax_forward(x);
    CHECK(all_finite(y));
    // Row 0: exp(x - 1e4) = {1, e^-1, 0, 0} (e^-1e4 and e^-2e4 underflow to 0).
    // Row 1: exp(x + 1e4 - 2) = {e^-2, 1, e^-2, e^-2}.
    const double e1 = std::exp(-1.0), e2 = std::exp(-2.0);
    const Tensor want = ad::from_vector<double>(
        {2, 4}, {1 / (1 + e1), e1 / (1 + e1), 0, 0, e2 / (1 + 3 * e2), 1 / (1 + 3 * e2), e2 / (1 + 3 * e2), e2 / (1 + 3 * e2)});
    check_close(y, want);

    const ad::Tensor<float> xf = ad::from_vector<float>({1, 3}, {1e4f, -1e4f, 1e4f - 1});
    const ad::Tensor<float> yf = ad::softmax_forward(xf);
    const double wf[3] = {1 / (1 + e1), 0, e1 / (1 + e1)};
    for (int j = 0; j < 3; ++j) {
        CHECK(std::isfinite(yf.data()[j]));
        CHECK(std::abs(yf.data()[j] - wf[j]) <= 1e-5 * std::max(1.0, wf[j]));  // fp32: relative 1e-5
    }
}

TEST_CASE("softmax_forward: -inf logits get probability exactly 0") {
    const Tensor x = ad::from_vector<double>({4}, {0, -inf, 1, -inf});
    const Tensor y = ad::softmax_forward(x);
    const double e = std::exp(1.0);
    CHECK(y.data()[1] == 0.0);
    CHECK(y.data()[3] == 0.0);
    check_close(y, ad::from_vector<double>({4}, {1 / (1 + e), 0, e / (1 + e), 0}));
}

TEST_CASE("softmax_forward: causal mask keeps key j for query i iff j <= i (top-left aligned)") {
    const KeepFn causal = [](const Index& i) { return i[3] <= i[2]; };
    for (const ad::Shape& s : {ad::Shape{4, 4}, ad::Shape{2, 3, 4, 4}, ad::Shape{3, 5}, ad::Shape{2, 5, 3}}) {
        CAPTURE(s.str());  // includes Lq < Lk and Lq > Lk
        const Tensor x = randn(s, 3);
        const Tensor y = ad::softmax_forward(x, ad::causal);
        check_close(y, naive_softmax(x, causal));
        std::int64_t nonzero_future = 0;
        for_each_index(s, [&](const Index& i) { nonzero_future += i[3] > i[2] && y.data()[broadcast_offset(s, i)] != 0.0; });
        CHECK(nonzero_future == 0);
    }
}

TEST_CASE("softmax_forward: a keep mask (Lq, Lk) or (1, Lk) is broadcast over batch and heads") {
    const ad::Shape s{2, 3, 4, 5};
    const Tensor x = randn(s, 4);
    for (const ad::Shape& ms : {ad::Shape{4, 5}, ad::Shape{1, 5}, ad::Shape{3, 1, 5}, ad::Shape{2, 1, 4, 5}}) {
        CAPTURE(ms.str());
        const ad::Tensor<bool> keep = random_keep(ms, 5);
        const KeepFn kf = [&](const Index& i) { return keep.data()[broadcast_offset(ms, i)]; };
        check_close(ad::softmax_forward(x, ad::keep_mask(keep)), naive_softmax(x, kf));
    }
}

TEST_CASE("softmax_forward: a key-padding mask (batch, Lk) masks key j of batch b for every head and query") {
    const ad::Shape s{3, 2, 4, 5};
    const Tensor x = randn(s, 6);
    const ad::Tensor<bool> kp = random_keep({3, 5}, 7);
    const KeepFn kf = [&](const Index& i) { return kp.data()[i[0] * 5 + i[3]]; };
    check_close(ad::softmax_forward(x, ad::key_padding_mask(kp)), naive_softmax(x, kf));
}

TEST_CASE("softmax_forward: a key-padding mask on rank-3 (batch, Lq, Lk) and rank-2 (Lq, Lk) logits") {
    SUBCASE("rank 3: (batch, Lk)") {
        const Tensor x = randn({3, 4, 5}, 8);
        const ad::Tensor<bool> kp = random_keep({3, 5}, 9);
        // Padded to rank 4, the batch index of a rank-3 tensor is i[1].
        const KeepFn kf = [&](const Index& i) { return kp.data()[i[1] * 5 + i[3]]; };
        check_close(ad::softmax_forward(x, ad::key_padding_mask(kp)), naive_softmax(x, kf));
    }
    SUBCASE("rank 2: (Lk)") {
        const Tensor x = randn({4, 5}, 10);
        const ad::Tensor<bool> kp = ad::from_vector<bool>({5}, {true, false, true, true, false});
        const KeepFn kf = [&](const Index& i) { return kp.data()[i[3]]; };
        check_close(ad::softmax_forward(x, ad::key_padding_mask(kp)), naive_softmax(x, kf));
    }
}

TEST_CASE("softmax_forward: causal, keep and key-padding masks combine with |: a key is kept when all keep it") {
    const ad::Shape s{2, 3, 4, 4};
    const Tensor x = randn(s, 11);
    const ad::Tensor<bool> keep = random_keep({4, 4}, 12, 0.8);
    const ad::Tensor<bool> kp = random_keep({2, 4}, 13, 0.8);
    const KeepFn kf = [&](const Index& i) {
        return i[3] <= i[2] && keep.data()[i[2] * 4 + i[3]] && kp.data()[i[0] * 4 + i[3]];
    };
    const ad::Mask mask = ad::causal | ad::keep_mask(keep) | ad::key_padding_mask(kp);
    check_close(ad::softmax_forward(x, mask), naive_softmax(x, kf));
}

TEST_CASE("softmax_forward: an additive mask is broadcast and added to the logits") {
    const ad::Shape s{2, 3, 4, 5};
    const Tensor x = randn(s, 14);
    for (const ad::Shape& as : {ad::Shape{4, 5}, ad::Shape{3, 1, 5}, ad::Shape{2, 1, 4, 5}, ad::Shape{5}, ad::Shape{2, 3, 4, 5}}) {
        CAPTURE(as.str());
        const Tensor add = randn(as, 15);
        check_close(ad::softmax_forward(x, {}, add), naive_softmax(x, keep_all, add));
        check_close(ad::softmax_forward(x, ad::causal, add),
                    naive_softmax(x, [](const Index& i) { return i[3] <= i[2]; }, add));
    }
}

TEST_CASE("softmax_forward: -inf in the additive mask masks that key") {
    const Tensor x = randn({3, 4}, 16);
    const Tensor add = ad::from_vector<double>({4}, {0, -inf, 0, -inf});
    const Tensor y = ad::softmax_forward(x, {}, add);
    check_close(y, naive_softmax(x, [](const Index& i) { return i[3] % 2 == 0; }));
}

TEST_CASE("softmax: a fully masked row gives output 0 and gradient 0, not NaN") {
    const ad::Shape s{2, 2, 3, 4};
    const Tensor x = randn(s, 17);
    const Tensor dy = randn(s, 18);
    auto check_row_zero = [&](const Tensor& y, const KeepFn& row_masked) {
        REQUIRE(all_finite(y));
        const Tensor dx = ad::softmax_backward(dy, y);
        REQUIRE(all_finite(dx));
        std::int64_t nonzero = 0, rows = 0;
        for_each_index(s, [&](const Index& i) {
            if (!row_masked(i)) return;
            rows += i[3] == 0;
            nonzero += y.data()[broadcast_offset(s, i)] != 0.0 || dx.data()[broadcast_offset(s, i)] != 0.0;
        });
        CHECK(rows > 0);
        CHECK(nonzero == 0);
        check_close(dx, naive_softmax_backward(dy, y));
    };
    SUBCASE("keep mask with an all-false query row") {
        ad::Tensor<bool> keep = ad::full<bool>({3, 4}, true);
        for (int j = 0; j < 4; ++j) keep(1, j) = false;
        check_row_zero(ad::softmax_forward(x, ad::keep_mask(keep)), [](const Index& i) { return i[2] == 1; });
    }
    SUBCASE("key-padding mask with every key of batch 1 padded") {
        ad::Tensor<bool> kp = ad::full<bool>({2, 4}, true);
        for (int j = 0; j < 4; ++j) kp(1, j) = false;
        check_row_zero(ad::softmax_forward(x, ad::key_padding_mask(kp)), [](const Index& i) { return i[0] == 1; });
    }
    SUBCASE("causal mask whose only visible key has additive -inf") {
        Tensor add = ad::zeros<double>({3, 4});
        add(0, 0) = -inf;
        check_row_zero(ad::softmax_forward(x, ad::causal, add), [](const Index& i) { return i[2] == 0; });
    }
    SUBCASE("all logits -inf") {
        Tensor xi = x.clone();
        for (int j = 0; j < 4; ++j) xi(0, 1, 2, j) = -inf;
        check_row_zero(ad::softmax_forward(xi), [](const Index& i) { return i[0] == 0 && i[1] == 1 && i[2] == 2; });
    }
}

TEST_CASE("softmax_forward: NaN in a kept logit propagates to its whole row, and only that row") {
    Tensor x = randn({3, 4}, 19);
    x(1, 2) = qnan;
    const Tensor y = ad::softmax_forward(x);
    for (int j = 0; j < 4; ++j) CHECK(std::isnan(y(1, j)));
    const Tensor want = naive_softmax(x, keep_all);
    for (int i : {0, 2})
        for (int j = 0; j < 4; ++j) CHECK(std::abs(y(i, j) - want(i, j)) < fp64_tol);
}

TEST_CASE("softmax_forward: NaN in a masked-out logit does not leak into the row") {
    Tensor x = randn({3, 4}, 20);
    x(0, 3) = qnan;  // masked for query 0 by the causal mask
    const Tensor y = ad::softmax_forward(x, ad::causal);
    CHECK(y(0, 0) == 1.0);
    for (int j = 1; j < 4; ++j) CHECK(y(0, j) == 0.0);
}

TEST_CASE("softmax_backward: equals the Jacobian-vector product y*(dy - sum(dy*y))") {
    for (const ad::Shape& s : {ad::Shape{6}, ad::Shape{3, 5}, ad::Shape{2, 3, 4, 5}, ad::Shape{4, 1}}) {
        CAPTURE(s.str());
        const Tensor y = ad::softmax_forward(randn(s, 21));
        const Tensor dy = randn(s, 22);
        check_close(ad::softmax_backward(dy, y), naive_softmax_backward(dy, y));
    }
}

TEST_CASE("softmax_backward: masked entries (y = 0) get gradient exactly 0") {
    const Tensor x = randn({2, 5, 5}, 23);
    const Tensor y = ad::softmax_forward(x, ad::causal);
    const Tensor dx = ad::softmax_backward(randn({2, 5, 5}, 24), y);
    std::int64_t nonzero = 0;
    for_each_index(y.shape(), [&](const Index& i) { nonzero += i[3] > i[2] && dx.data()[broadcast_offset(y.shape(), i)] != 0.0; });
    CHECK(nonzero == 0);
}

TEST_CASE("softmax: shape errors name the mask and the logits") {
    const Tensor x = ad::zeros<double>({2, 3, 4, 4});
    CHECK_THROWS_WITH_AS((void)ad::softmax_forward(x, ad::keep_mask(ad::full<bool>({3, 3}, true))),
                         "softmax: keep mask (3,3) does not broadcast to the logits (2,3,4,4)", ad::Error);
    CHECK_THROWS_WITH_AS((void)ad::softmax_forward(x, ad::key_padding_mask(ad::full<bool>({3, 4}, true))),
                         "softmax: key-padding mask must have shape (2,4) (batch, Lk) for logits (2,3,4,4), got (3,4)",
                         ad::Error);
    CHECK_THROWS_WITH_AS((void)ad::softmax_forward(x, {}, ad::zeros<double>({5, 4})),
                         "softmax: additive mask (5,4) does not broadcast to the logits (2,3,4,4)", ad::Error);
    CHECK_THROWS_WITH_AS((void)ad::softmax_forward(ad::zeros<double>({5}), ad::causal),
                         "softmax: a causal mask needs logits of rank >= 2 (.., Lq, Lk), got (5)", ad::Error);
    CHECK_THROWS_WITH_AS((void)ad::softmax_backward(ad::zeros<double>({2, 3}), ad::zeros<double>({3, 2})),
                         "softmax_backward: dy (2,3) and y (3,2) must have the same shape", ad::Error);
}

// ---- dropout ----------------------------------------------------------------------------------------

TEST_CASE("Philox4x32-10: Random123 known-answer vectors") {
    // The "philox4x32 10" lines of Random123's tests/kat_vectors: counter words, key words -> output words.
    using C = ad::Philox4x32::Counter;
    CHECK(ad::Philox4x32::generate({0, 0, 0, 0}, {0, 0}) == C{0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8});
    CHECK(ad::Philox4x32::generate({0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff}, {0xffffffff, 0xffffffff}) ==
          C{0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd});
    CHECK(ad::Philox4x32::generate({0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344}, {0xa4093822, 0x299f31d0}) ==
          C{0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1});
}

TEST_CASE("Philox4x32::generate_blocks: the vectorised form gives exactly generate() for each block") {
    const ad::Philox4x32::Key key{0x89abcdefu, 0x01234567u};
    const std::uint64_t offset = 0xfedcba9876543210ull;
    // The second start crosses 2^32 blocks, so the counter's high word changes inside the batch.
    for (std::uint64_t first : {0ull, (1ull << 32) - 5}) {
        std::uint32_t out[4 * 16];
        ad::Philox4x32::generate_blocks<16>(first, offset, key, out);
        for (std::uint64_t j = 0; j < 16; ++j) {
            const std::uint64_t block = first + j;
            const auto words = ad::Philox4x32::generate(
                {static_cast<std::uint32_t>(block), static_cast<std::uint32_t>(block >> 32),
                 static_cast<std::uint32_t>(offset), static_cast<std::uint32_t>(offset >> 32)},
                key);
            for (std::size_t l = 0; l < 4; ++l) CHECK(out[4 * j + l] == words[l]);
        }
    }
}

TEST_CASE("philox_keep_bits16: bit 4k + l is word l of generate() for block first + k compared with the threshold") {
    const ad::Philox4x32::Key key{0x89abcdefu, 0x01234567u};
    const std::uint64_t offset = 0xfedcba9876543210ull;
    // The AVX-512 version (in-register compares, pdep) where there is one. The second start crosses
    // 2^32 blocks; thresholds: rate 0.1, 0.5, everything kept, only the largest word kept.
    for (std::uint64_t first : {0ull, (1ull << 32) - 5})
        for (std::uint32_t threshold : {0x1999999Au, 0x80000000u, 0u, 0xFFFFFFFFu}) {
            CAPTURE(first);
            CAPTURE(threshold);
            const std::uint64_t bits = ad::detail::philox_keep_bits16(first, offset, key, threshold);
            std::uint64_t expected = 0;
            for (std::uint64_t k = 0; k < 16; ++k) {
                const std::uint64_t block = first + k;
                const auto words = ad::Philox4x32::generate(
                    {static_cast<std::uint32_t>(block), static_cast<std::uint32_t>(block >> 32),
                     static_cast<std::uint32_t>(offset), static_cast<std::uint32_t>(offset >> 32)},
                    key);
                for (std::uint64_t l = 0; l < 4; ++l) expected |= std::uint64_t{words[l] >= threshold} << (4 * k + l);
            }
            CHECK(bits == expected);
        }
}

TEST_CASE("dropout_keep_bits: bit k is dropout_keeps(first + k) for k < n, the bits above n are clear") {
    // Starts inside a block of 4 words (the 17th block), a start past 2^34, short and full rows.
    for (const ad::DropoutDescriptor& d : {ad::DropoutDescriptor{0.1, 7, 3}, ad::DropoutDescriptor{0.6, 1ull << 40, 5ull << 33}})
        for (std::uint64_t first : {0ull, 1ull, 2ull, 3ull, 6ull, 4097ull, (1ull << 34) + 3})
            for (std::int64_t n : {1, 13, 61, 63, 64}) {
                CAPTURE(d.rate);
                CAPTURE(first);
                CAPTURE(n);
                const std::uint64_t bits = ad::dropout_keep_bits(d, first, n);
                std::uint64_t expected = 0;
                for (std::int64_t k = 0; k < n; ++k)
                    expected |= std::uint64_t{ad::dropout_keeps(d, first + static_cast<std::uint64_t>(k))} << k;
                CHECK(bits == expected);
            }
    CHECK(ad::dropout_keep_bits({0.999999999999, 1, 2}, 5, 64) == 0);  // a rate within 2^-33 of 1 drops everything
}

TEST_CASE("Philox4x32::bits: element i is word i % 4 of the block counter (i / 4, offset) keyed by the seed") {
    const std::uint64_t seed = 0x0123456789abcdefull, offset = 0xfedcba9876543210ull;
    for (std::uint64_t i : {0ull, 1ull, 2ull, 3ull, 4ull, 7ull, 1000001ull, (1ull << 34) + 6}) {
        CAPTURE(i);
        const std::uint64_t block = i / 4;
        const auto words = ad::Philox4x32::generate(
            {static_cast<std::uint32_t>(block), static_cast<std::uint32_t>(block >> 32),
             static_cast<std::uint32_t>(offset), static_cast<std::uint32_t>(offset >> 32)},
            {static_cast<std::uint32_t>(seed), static_cast<std::uint32_t>(seed >> 32)});
        CHECK(ad::Philox4x32::bits(seed, offset, i) == words[i % 4]);
    }
}

TEST_CASE("multiply_by_keep: kept elements times the scale, dropped ones times 0 (a NaN stays NaN), tails of any length") {
    for (std::int64_t n : {1, 7, 16, 33, 64}) {
        CAPTURE(n);
        std::vector<float> src(64), dst(64, -1.0f);
        for (std::int64_t c = 0; c < 64; ++c) src[static_cast<std::size_t>(c)] = static_cast<float>(c) + 0.5f;
        src[2] = std::numeric_limits<float>::quiet_NaN();  // dropped below
        const std::uint64_t keep = 0xF0F0F0F0F0F0F0F1ull;
        ad::detail::multiply_by_keep(src.data(), dst.data(), n, keep, 1.25f);
        for (std::int64_t c = 0; c < 64; ++c) {
            CAPTURE(c);
            const float x = src[static_cast<std::size_t>(c)], y = dst[static_cast<std::size_t>(c)];
            if (c >= n) CHECK(y == -1.0f);  // past n: untouched
            else if (c == 2) CHECK(std::isnan(y));
            else CHECK(y == x * ((keep >> c) & 1 ? 1.25f : 0.0f));
        }
    }
}

namespace {
// Number of dropped (zeroed) elements of dropout(ones).
std::int64_t dropped_count(const ad::DropoutDescriptor& d, std::int64_t n) {
    const Tensor y = ad::dropout_forward(d, ad::ones<double>({n}));
    std::int64_t dropped = 0;
    for (std::int64_t i = 0; i < n; ++i) dropped += y.data()[i] == 0.0;
    return dropped;
}
}  // namespace

TEST_CASE("dropout_forward: the same (seed, offset) gives the same mask; another offset or seed another one") {
    const Tensor x = randn({4, 8, 16, 16}, 1);
    const ad::DropoutDescriptor d{0.3, 42, 7};
    const Tensor y1 = ad::dropout_forward(d, x);
    const Tensor y2 = ad::dropout_forward(d, x);
    CHECK(bitwise_equal(y1, y2));
    auto differing = [&](const ad::DropoutDescriptor& other) {
        const Tensor y = ad::dropout_forward(other, x);
        std::int64_t n = 0;
        for (std::int64_t i = 0; i < x.numel(); ++i) n += (y.data()[i] == 0.0) != (y1.data()[i] == 0.0);
        return n;
    };
    // Independent masks disagree on each element with probability q = 2·p·(1−p) = 0.42: on average
    // 3441 of the 8192 elements, standard deviation sqrt(8192·q·(1−q)) = 45. Five deviations below: 3217.
    const std::int64_t independent_floor = 3217;
    CHECK(differing({0.3, 42, 8}) > independent_floor);
    CHECK(differing({0.3, 43, 7}) > independent_floor);
    CHECK(differing({0.3, 42, 7 + (1ull << 32)}) > independent_floor);  // the offset's high word counts too
    CHECK(differing({0.3, 42 + (1ull << 32), 7}) > independent_floor);  // so does the seed's
}

TEST_CASE("dropout_forward: the dropped fraction is the rate (1e6 elements, binomial bound)") {
    constexpr std::int64_t n = 1000000;
    for (double rate : {0.1, 0.3, 0.5, 0.9}) {
        CAPTURE(rate);
        // The count of dropped elements is Binomial(n, rate): standard deviation sqrt(n·p·(1−p)) <= 500.
        // Five standard deviations: a correct generator fails with probability < 1e-6.
        const double sd = std::sqrt(n * rate * (1 - rate));
        CHECK(std::abs(static_cast<double>(dropped_count({rate, 2024, 3}, n)) - n * rate) < 5 * sd);
    }
}

TEST_CASE("dropout_forward: kept values are scaled by 1/(1-p), dropped ones are 0, as dropout_keeps says") {
    const std::int64_t n = 3 * (1 << 14) + 3;  // several chunks of work and a partial Philox block at the end
    const Tensor x = ad::uniform<double>({n}, 0.5, 1.5, 9);
    const ad::DropoutDescriptor d{0.25, 11, 5};
    const Tensor y = ad::dropout_forward(d, x);
    const double scale = 1.0 / (1.0 - d.rate);
    std::int64_t wrong = 0;
    for (std::int64_t i = 0; i < n; ++i) {
        const double want = ad::dropout_keeps(d, static_cast<std::uint64_t>(i)) ? x.data()[i] * scale : 0.0;
        wrong += y.data()[i] != want;
    }
    CHECK(wrong == 0);
}

TEST_CASE("dropout_forward: the keep decision of element i depends only on (seed, offset, i), not on the shape") {
    const ad::DropoutDescriptor d{0.5, 3, 4};
    const Tensor a = ad::dropout_forward(d, ad::ones<double>({2, 3, 5, 7}));
    const Tensor b = ad::dropout_forward(d, ad::ones<double>({210}));
    CHECK(a.to_vector() == b.to_vector());
}

TEST_CASE("dropout_backward: applies exactly the forward's mask and scale to dy") {
    const ad::Shape s{2, 4, 33, 17};
    const Tensor x = randn(s, 12), dy = randn(s, 13);
    const ad::DropoutDescriptor d{0.4, 99, 123};
    const Tensor y = ad::dropout_forward(d, x);
    const Tensor dx = ad::dropout_backward(d, dy);
    const double scale = 1.0 / (1.0 - d.rate);
    std::int64_t wrong = 0;
    for (std::int64_t i = 0; i < x.numel(); ++i) {
        const bool kept = y.data()[i] != 0.0;  // x is never exactly 0 (normal samples)
        wrong += dx.data()[i] != (kept ? dy.data()[i] * scale : 0.0);
    }
    CHECK(wrong == 0);
}

TEST_CASE("dropout: training = false and rate = 0 are the identity") {
    const Tensor x = randn({3, 50}, 14);
    CHECK(bitwise_equal(ad::dropout_forward({0.5, 1, 2, false}, x), x));
    CHECK(bitwise_equal(ad::dropout_backward({0.5, 1, 2, false}, x), x));
    CHECK(bitwise_equal(ad::dropout_forward({0.0, 1, 2, true}, x), x));
    CHECK(bitwise_equal(ad::dropout_backward({0.0, 1, 2, true}, x), x));
}

TEST_CASE("dropout: the result does not depend on the thread count") {
    const Tensor x = randn({1 << 18}, 15);
    const ad::DropoutDescriptor d{0.2, 77, 1};
    Tensor y1, y2, dx1, dx2;
    {
        ThreadCount one(1);
        y1 = ad::dropout_forward(d, x);
        dx1 = ad::dropout_backward(d, x);
    }
    {
        ThreadCount two(2);
        y2 = ad::dropout_forward(d, x);
        dx2 = ad::dropout_backward(d, x);
    }
    CHECK(bitwise_equal(y1, y2));
    CHECK(bitwise_equal(dx1, dx2));
}

TEST_CASE("dropout: a rate outside [0, 1) throws, in training and in evaluation") {
    const Tensor x = ad::ones<double>({4});
    CHECK_THROWS_WITH_AS((void)ad::dropout_forward({1.0, 0, 0}, x), "dropout: rate must be in [0, 1), got 1", ad::Error);
    CHECK_THROWS_WITH_AS((void)ad::dropout_forward({-0.1, 0, 0}, x), "dropout: rate must be in [0, 1), got -0.1",
                         ad::Error);
    CHECK_THROWS_WITH_AS((void)ad::dropout_forward({qnan, 0, 0}, x), "dropout: rate must be in [0, 1), got nan",
                         ad::Error);
    CHECK_THROWS_WITH_AS((void)ad::dropout_backward({1.5, 0, 0}, x),
                         "dropout_backward: rate must be in [0, 1), got 1.5", ad::Error);
    CHECK_THROWS_AS((void)ad::dropout_forward({1.0, 0, 0, false}, x), ad::Error);
}

// ---- linear ----------------------------------------------------------------------------------------

namespace {
// y[r, o] = Σ_i x[r, i]·W[o, i] + b[o] over the rows r of x (..., in).
Tensor naive_linear(const Tensor& x, const Tensor& W, const Tensor& b) {
    const std::int64_t in = W.dim(1), out = W.dim(0), rows = x.numel() / in;
    ad::Shape ys = x.shape();
    ys[ys.rank() - 1] = out;
    Tensor y(ys);
    for (std::int64_t r = 0; r < rows; ++r)
        for (std::int64_t o = 0; o < out; ++o) {
            double s = b.defined() ? b.data()[o] : 0.0;
            for (std::int64_t i = 0; i < in; ++i) s += x.data()[r * in + i] * W.data()[o * in + i];
            y.data()[r * out + o] = s;
        }
    return y;
}

struct LinearGrads {
    Tensor dx, dW, db;
};
// dx[r, i] = Σ_o dy[r, o]·W[o, i];  dW[o, i] = Σ_r dy[r, o]·x[r, i];  db[o] = Σ_r dy[r, o].
LinearGrads naive_linear_backward(const Tensor& dy, const Tensor& x, const Tensor& W) {
    const std::int64_t in = W.dim(1), out = W.dim(0), rows = x.numel() / in;
    LinearGrads g{ad::zeros<double>(x.shape()), ad::zeros<double>(W.shape()), ad::zeros<double>({out})};
    for (std::int64_t r = 0; r < rows; ++r)
        for (std::int64_t o = 0; o < out; ++o) {
            const double d = dy.data()[r * out + o];
            g.db.data()[o] += d;
            for (std::int64_t i = 0; i < in; ++i) {
                g.dx.data()[r * in + i] += d * W.data()[o * in + i];
                g.dW.data()[o * in + i] += d * x.data()[r * in + i];
            }
        }
    return g;
}
}  // namespace

TEST_CASE("linear_forward: y = x·Wᵀ + b for x of rank 1, 2, 3 and 4, with and without bias") {
    const Tensor W = randn({3, 5}, 1), b = randn({3}, 2);
    for (const ad::Shape& xs : {ad::Shape{5}, ad::Shape{4, 5}, ad::Shape{2, 3, 5}, ad::Shape{2, 2, 3, 5}, ad::Shape{1, 5}}) {
        CAPTURE(xs.str());
        const Tensor x = randn(xs, 3);
        const Tensor y = ad::linear_forward(x, W, b);
        ad::Shape ys = xs;
        ys[ys.rank() - 1] = 3;
        REQUIRE(y.shape() == ys);
        check_close(y, naive_linear(x, W, b));
        check_close(ad::linear_forward(x, W), naive_linear(x, W, {}));
    }
}

TEST_CASE("linear_backward: dx = dy·W, dW = dyᵀ·x and db = colsum(dy) for x of rank 1, 2, 3") {
    const Tensor W = randn({3, 5}, 4);
    for (const ad::Shape& xs : {ad::Shape{5}, ad::Shape{4, 5}, ad::Shape{2, 3, 5}}) {
        CAPTURE(xs.str());
        const Tensor x = randn(xs, 5);
        ad::Shape ys = xs;
        ys[ys.rank() - 1] = 3;
        const Tensor dy = randn(ys, 6);
        const LinearGrads want = naive_linear_backward(dy, x, W);
        Tensor dx, dW = ad::zeros<double>({3, 5}), db = ad::zeros<double>({3});
        ad::linear_backward(&dx, &dW, &db, dy, x, W);
        check_close(dx, want.dx);
        check_close(dW, want.dW);
        check_close(db, want.db);
    }
}

TEST_CASE("linear_backward: dW and db accumulate (called twice: twice the gradient); dx is overwritten") {
    const Tensor W = randn({4, 6}, 7), x = randn({2, 3, 6}, 8), dy = randn({2, 3, 4}, 9);
    const LinearGrads want = naive_linear_backward(dy, x, W);
    Tensor dx = ad::full<double>(x.shape(), qnan);  // garbage: must not be read
    Tensor dW = ad::zeros<double>(W.shape()), db = ad::zeros<double>({4});
    ad::linear_backward(&dx, &dW, &db, dy, x, W);
    ad::linear_backward(&dx, &dW, &db, dy, x, W);
    check_close(dx, want.dx);
    check_close(dW, ad::unary_forward(ad::Scale<double>{2.0}, want.dW));
    check_close(db, ad::unary_forward(ad::Scale<double>{2.0}, want.db));

    SUBCASE("accumulation onto existing values") {
        const Tensor dW0 = randn(W.shape(), 10), db0 = randn({4}, 11);
        Tensor dW1 = dW0.clone(), db1 = db0.clone();
        ad::linear_backward<double>(nullptr, &dW1, &db1, dy, x, W);
        Tensor dW_want = dW0.clone(), db_want = db0.clone();
        dW_want.array() += want.dW.array();
        db_want.array() += want.db.array();
        check_close(dW1, dW_want);
        check_close(db1, db_want);
    }
}

TEST_CASE("linear_backward: a null gradient pointer skips that gradient") {
    const Tensor W = randn({3, 5}, 12), x = randn({4, 5}, 13), dy = randn({4, 3}, 14);
    const LinearGrads want = naive_linear_backward(dy, x, W);
    Tensor dx;
    ad::linear_backward<double>(&dx, nullptr, nullptr, dy, x, W);
    check_close(dx, want.dx);
    Tensor db = ad::zeros<double>({3});
    ad::linear_backward<double>(nullptr, nullptr, &db, dy, x, W);
    check_close(db, want.db);
}

TEST_CASE("linear: shape errors name the input, the weight and the bias") {
    const Tensor W = ad::zeros<double>({3, 5});
    CHECK_THROWS_WITH_AS((void)ad::linear_forward(ad::zeros<double>({2, 4}), W),
                         "linear: input features differ: input (2,4) has 4 but weight (3,5) (out, in) expects 5", ad::Error);
    CHECK_THROWS_WITH_AS((void)ad::linear_forward(ad::zeros<double>({2, 5}), W, ad::zeros<double>({5})),
                         "linear: bias must have shape (3) for weight (3,5), got (5)", ad::Error);
    Tensor dW = ad::zeros<double>({5, 3});
    CHECK_THROWS_WITH_AS(ad::linear_backward<double>(nullptr, &dW, nullptr, ad::zeros<double>({2, 3}),
                                                     ad::zeros<double>({2, 5}), W),
                         "linear_backward: dW must have W's shape (3,5), got (5,3)", ad::Error);
}

// ---- reduce_to_shape ---------------------------------------------------------------------------------

namespace {
// out[t] = Σ g[i] over every index i of g whose projection onto `target` (size-1 dimensions read 0) is t.
Tensor naive_reduce(const Tensor& g, const ad::Shape& target) {
    Tensor out = ad::zeros<double>(target);
    for_each_index(g.shape(), [&](const Index& i) {
        out.data()[broadcast_offset(target, i)] += g.data()[broadcast_offset(g.shape(), i)];
    });
    return out;
}
}  // namespace

TEST_CASE("reduce_to_shape: the gradient of a broadcast operand is summed over every broadcast dimension") {
    const ad::Shape full{2, 3, 4, 5};  // (n, h, Lq, Lk)
    const Tensor g = randn(full, 1);
    SUBCASE("(Lq,Lk) bias: summed over batch and heads") { check_close(ad::reduce_to_shape(g, {4, 5}), naive_reduce(g, {4, 5})); }
    SUBCASE("(h,Lq,Lk) bias: the sum over the batch") {
        const Tensor r = ad::reduce_to_shape(g, {3, 4, 5});
        Tensor want = ad::zeros<double>({3, 4, 5});
        for_each_index(full, [&](const Index& i) { want(i[1], i[2], i[3]) += g(i[0], i[1], i[2], i[3]); });
        check_close(r, want);
    }
    SUBCASE("(n,1,Lq,Lk): summed over heads") { check_close(ad::reduce_to_shape(g, {2, 1, 4, 5}), naive_reduce(g, {2, 1, 4, 5})); }
    SUBCASE("(1,h,1,Lk): summed over batch and queries") {
        check_close(ad::reduce_to_shape(g, {1, 3, 1, 5}), naive_reduce(g, {1, 3, 1, 5}));
    }
    SUBCASE("(Lk)") { check_close(ad::reduce_to_shape(g, {5}), naive_reduce(g, {5})); }
    SUBCASE("(n,h,Lq,1): summed along the last dimension") {
        check_close(ad::reduce_to_shape(g, {2, 3, 4, 1}), naive_reduce(g, {2, 3, 4, 1}));
    }
    SUBCASE("(Lq,1)") { check_close(ad::reduce_to_shape(g, {4, 1}), naive_reduce(g, {4, 1})); }
    SUBCASE("(1,1,1,1): the total") {
        const Tensor r = ad::reduce_to_shape(g, {1, 1, 1, 1});
        REQUIRE(r.shape() == ad::Shape{1, 1, 1, 1});
        check_close(r, naive_reduce(g, {1, 1, 1, 1}));
    }
    SUBCASE("scalar (rank 0): the total") {
        const Tensor r = ad::reduce_to_shape(g, ad::Shape{});
        REQUIRE(r.shape() == ad::Shape{});
        double total = 0;
        for (double v : g.to_vector()) total += v;
        CHECK(std::abs(r.item() - total) < fp64_tol);
    }
}

TEST_CASE("reduce_to_shape: a rank-2 gradient to (1,L), (L,1) and (L)") {
    const Tensor g = randn({6, 7}, 2);
    for (const ad::Shape& t : {ad::Shape{1, 7}, ad::Shape{6, 1}, ad::Shape{7}, ad::Shape{1, 1}, ad::Shape{}}) {
        CAPTURE(t.str());
        check_close(ad::reduce_to_shape(g, t), naive_reduce(g, t));
    }
}

TEST_CASE("reduce_to_shape: an equal shape returns the gradient itself (shared storage)") {
    const Tensor g = randn({2, 3}, 3);
    const Tensor r = ad::reduce_to_shape(g, {2, 3});
    CHECK(r.shares_storage_with(g));
}

TEST_CASE("reduce_to_shape: a shape that does not broadcast to the gradient throws naming both") {
    const Tensor g = ad::zeros<double>({2, 3, 4, 5});
    CHECK_THROWS_WITH_AS((void)ad::reduce_to_shape(g, {3, 5}), "reduce_to_shape: cannot reduce (2,3,4,5) to (3,5)",
                         ad::Error);
    CHECK_THROWS_WITH_AS((void)ad::reduce_to_shape(ad::zeros<double>({4, 5}), {2, 4, 5}),
                         "reduce_to_shape: cannot reduce (4,5) to (2,4,5)", ad::Error);
}

TEST_CASE("reduce_to_shape: bitwise the same result with 1 and 2 threads") {
    const Tensor g = randn({4, 8, 64, 128}, 4);
    for (const ad::Shape& t : {ad::Shape{8, 64, 128}, ad::Shape{64, 128}, ad::Shape{1, 8, 1, 128}, ad::Shape{4, 8, 64, 1},
                               ad::Shape{128}, ad::Shape{}}) {
        CAPTURE(t.str());
        Tensor r1, r2;
        {
            ThreadCount one(1);
            r1 = ad::reduce_to_shape(g, t);
        }
        {
            ThreadCount two(2);
            r2 = ad::reduce_to_shape(g, t);
        }
        CHECK(bitwise_equal(r1, r2));
        // Sums of up to 2048 N(0,1) terms (magnitude ~45): rounding ~1e-12, hence 1e-10 here.
        check_close(r1, naive_reduce(g, t), 1e-10);
    }
}

// ---- unary elementwise ops ---------------------------------------------------------------------------

namespace {

// |got − want| <= rtol·max(1, |want|): Eigen's vectorised exp, log, tanh and pow are within a few ulp
// (~1e-15 relative) of the std:: functions, far inside 1e-12.
template <class T>
void check_close_rel(const ad::Tensor<T>& got, const Tensor& want, double rtol) {
    REQUIRE(got.shape() == want.shape());
    std::int64_t bad = 0, first_bad = -1;
    for (std::int64_t i = 0; i < want.numel(); ++i) {
        const double g = static_cast<double>(got.data()[i]), w = want.data()[i];
        if (!(std::abs(g - w) <= rtol * std::max(1.0, std::abs(w))) && bad++ == 0) first_bad = i;
    }
    CHECK_MESSAGE(bad == 0, fmt::format("{} of {} elements off by more than {} relative; first at {}: got {}, want {}", bad,
                                        want.numel(), rtol, first_bad,
                                        first_bad >= 0 ? static_cast<double>(got.data()[first_bad]) : 0.0,
                                        first_bad >= 0 ? want.data()[first_bad] : 0.0));
}

template <class F>
Tensor map(const Tensor& x, F f) {
    Tensor y(x.shape());
    for (std::int64_t i = 0; i < x.numel(); ++i) y.data()[i] = f(x.data()[i]);
    return y;
}

// y = f(x) and dx = dy·f'(x) against the std:: formulas. The backward is given only the saved values
// the op declares (needs_input / needs_output), as the tape does.
template <class Op, class F, class DF>
void check_unary(const Op& op, const Tensor& x, F f, DF df) {
    CAPTURE(std::string(Op::name));
    const Tensor y = ad::unary_forward(op, x);
    check_close_rel(y, map(x, f), fp64_tol);
    const Tensor dy = randn(x.shape(), 99);
    const Tensor dx = ad::unary_backward(op, dy, Op::needs_input ? x : Tensor{}, Op::needs_output ? y : Tensor{});
    Tensor want(x.shape());
    for (std::int64_t i = 0; i < x.numel(); ++i) want.data()[i] = dy.data()[i] * df(x.data()[i]);
    check_close_rel(dx, want, fp64_tol);
}

// 35000 elements: several chunks of the elementwise kernels.
const ad::Shape unary_shape{7, 5000};
Tensor any_x() { return ad::uniform<double>(unary_shape, -3.0, 3.0, 31); }
Tensor positive_x() { return ad::uniform<double>(unary_shape, 0.1, 3.0, 32); }

double normal_cdf(double v) { return 0.5 * (1 + std::erf(v / std::numbers::sqrt2)); }
double normal_pdf(double v) { return std::exp(-0.5 * v * v) / std::sqrt(2 * std::numbers::pi); }
double sigmoid(double v) { return 1 / (1 + std::exp(-v)); }

}  // namespace

TEST_CASE("unary Exp: y = exp(x), dx = dy·exp(x)") {
    check_unary(ad::Exp{}, any_x(), [](double v) { return std::exp(v); }, [](double v) { return std::exp(v); });
}

TEST_CASE("unary Log: y = log(x), dx = dy/x") {
    check_unary(ad::Log{}, positive_x(), [](double v) { return std::log(v); }, [](double v) { return 1 / v; });
}

TEST_CASE("unary Tanh: y = tanh(x), dx = dy·(1 − tanh²(x))") {
    check_unary(ad::Tanh{}, any_x(), [](double v) { return std::tanh(v); },
                [](double v) { return 1 - std::tanh(v) * std::tanh(v); });
}

TEST_CASE("unary Sigmoid: y = 1/(1 + e^−x), dx = dy·y(1 − y), also far in the tails") {
    check_unary(ad::Sigmoid{}, any_x(), sigmoid, [](double v) { return sigmoid(v) * (1 - sigmoid(v)); });
    check_unary(ad::Sigmoid{}, ad::uniform<double>({1000}, -40.0, 40.0, 33), sigmoid,
                [](double v) { return sigmoid(v) * (1 - sigmoid(v)); });
}

TEST_CASE("unary Relu: y = max(x, 0), dx = dy where x > 0; 0 at x = 0; NaN propagates") {
    check_unary(ad::Relu{}, any_x(), [](double v) { return v > 0 ? v : 0.0; }, [](double v) { return v > 0 ? 1.0 : 0.0; });
    const Tensor x = ad::from_vector<double>({4}, {0.0, -0.0, qnan, 2.0});
    const Tensor y = ad::unary_forward(ad::Relu{}, x);
    CHECK(y(0) == 0.0);
    CHECK(y(1) == 0.0);
    CHECK(std::isnan(y(2)));
    CHECK(y(3) == 2.0);
    const Tensor dx = ad::unary_backward(ad::Relu{}, ad::ones<double>({4}), x, Tensor{});
    CHECK(dx(0) == 0.0);
    CHECK(dx(3) == 1.0);
}

TEST_CASE("unary Gelu: exact GELU y = x·Φ(x), dx = dy·(Φ(x) + x·φ(x))") {
    check_unary(ad::Gelu{}, any_x(), [](double v) { return v * normal_cdf(v); },
                [](double v) { return normal_cdf(v) + v * normal_pdf(v); });
    // Known values: GELU(1) = 0.8413447460685429, GELU(−1) = −0.15865525393145707 (torch, exact erf).
    const Tensor y = ad::unary_forward(ad::Gelu{}, ad::from_vector<double>({2}, {1.0, -1.0}));
    CHECK(std::abs(y(0) - 0.8413447460685429) < fp64_tol);
    CHECK(std::abs(y(1) + 0.15865525393145707) < fp64_tol);
}

TEST_CASE("unary Abs: y = |x|, dx = dy·sign(x), 0 at x = 0") {
    check_unary(ad::Abs{}, any_x(), [](double v) { return std::abs(v); }, [](double v) { return v > 0 ? 1.0 : -1.0; });
    const Tensor dx = ad::unary_backward(ad::Abs{}, ad::ones<double>({1}), ad::zeros<double>({1}), Tensor{});
    CHECK(dx(0) == 0.0);
}

TEST_CASE("unary Neg: y = −x, dx = −dy") {
    check_unary(ad::Neg{}, any_x(), [](double v) { return -v; }, [](double) { return -1.0; });
}

TEST_CASE("unary Pow: y = x^p, dx = dy·p·x^(p−1)") {
    for (double p : {2.5, -1.5, 0.5}) {
        CAPTURE(p);
        check_unary(ad::Pow<double>{p}, positive_x(), [p](double v) { return std::pow(v, p); },
                    [p](double v) { return p * std::pow(v, p - 1); });
    }
    // Integer exponents are defined for negative x too.
    check_unary(ad::Pow<double>{3.0}, any_x(), [](double v) { return v * v * v; }, [](double v) { return 3 * v * v; });
    check_unary(ad::Pow<double>{2.0}, any_x(), [](double v) { return v * v; }, [](double v) { return 2 * v; });
}

TEST_CASE("unary Scale: y = s·x, dx = s·dy") {
    check_unary(ad::Scale<double>{-0.75}, any_x(), [](double v) { return -0.75 * v; }, [](double) { return -0.75; });
}

TEST_CASE("unary Shift: y = x + c, dx = dy") {
    check_unary(ad::Shift<double>{1.5}, any_x(), [](double v) { return v + 1.5; }, [](double) { return 1.0; });
}

TEST_CASE("unary ops in float agree with the double formulas to relative 1e-5") {
    const Tensor xd = any_x();
    ad::Tensor<float> x(xd.shape());
    for (std::int64_t i = 0; i < x.numel(); ++i) x.data()[i] = static_cast<float>(xd.data()[i]);
    Tensor xr(xd.shape());  // the float inputs, exactly, in double
    for (std::int64_t i = 0; i < x.numel(); ++i) xr.data()[i] = x.data()[i];
    check_close_rel(ad::unary_forward(ad::Exp{}, x), map(xr, [](double v) { return std::exp(v); }), 1e-5);
    check_close_rel(ad::unary_forward(ad::Tanh{}, x), map(xr, [](double v) { return std::tanh(v); }), 1e-5);
    check_close_rel(ad::unary_forward(ad::Sigmoid{}, x), map(xr, sigmoid), 1e-5);
    check_close_rel(ad::unary_forward(ad::Gelu{}, x), map(xr, [](double v) { return v * normal_cdf(v); }), 1e-5);
}

// ---- binary elementwise ops with broadcasting -----------------------------------------------------

namespace {

struct BroadcastCase {
    ad::Shape a, b;
};
const std::vector<BroadcastCase> broadcast_cases{
    {{2, 3, 1, 5}, {4, 1}},     // both broadcast, b along the last dimension
    {{5}, {2, 3, 4, 5}},        // a row vector against a rank-4 tensor
    {{}, {3, 4}},               // a scalar
    {{3, 4}, {}},
    {{3, 4}, {3, 4}},           // no broadcasting
    {{3, 1}, {1, 4}},           // an outer product
    {{2, 1, 4, 1}, {3, 1, 1}},  // output's last dimension has length 1
    {{2, 3, 4, 5}, {1, 3, 1, 5}},
};

// out[i] = f(a[i], b[i]) with numpy broadcasting; da[j] = Σ g[i]·∂f/∂a over the out indices i that read a[j].
template <class Op, class F, class GA, class GB>
void check_binary(const Op& op, F f, GA df_da, GB df_db, bool positive_b) {
    CAPTURE(std::string(Op::name));
    for (const BroadcastCase& c : broadcast_cases) {
        const std::string a_shape = c.a.str(), b_shape = c.b.str();
        CAPTURE(a_shape);
        CAPTURE(b_shape);
        const Tensor a = randn(c.a, 41);
        const Tensor b = positive_b ? ad::uniform<double>(c.b, 0.5, 2.0, 42) : randn(c.b, 42);
        const ad::Shape out_shape = ad::broadcast_shapes("test", c.a, "a", c.b, "b");
        const Tensor g = randn(out_shape, 43);
        Tensor out_want(out_shape), da_want = ad::zeros<double>(c.a), db_want = ad::zeros<double>(c.b);
        for_each_index(out_shape, [&](const Index& i) {
            const double av = a.data()[broadcast_offset(c.a, i)], bv = b.data()[broadcast_offset(c.b, i)];
            const double gv = g.data()[broadcast_offset(out_shape, i)];
            out_want.data()[broadcast_offset(out_shape, i)] = f(av, bv);
            da_want.data()[broadcast_offset(c.a, i)] += gv * df_da(av, bv);
            db_want.data()[broadcast_offset(c.b, i)] += gv * df_db(av, bv);
        });
        check_close(ad::binary_forward(op, a, b, out_shape), out_want);
        Tensor da, db;
        ad::binary_backward(op, g, a, b, c.a, c.b, &da, &db);
        check_close(da, da_want);
        check_close(db, db_want);
        Tensor da_only;
        ad::binary_backward(op, g, a, b, c.a, c.b, &da_only, static_cast<Tensor*>(nullptr));
        check_close(da_only, da_want);
    }
}

}  // namespace

TEST_CASE("binary Add with broadcasting: out = a + b; da, db = g summed to each operand's shape") {
    check_binary(ad::Add{}, [](double a, double b) { return a + b; }, [](double, double) { return 1.0; },
                 [](double, double) { return 1.0; }, false);
}

TEST_CASE("binary Sub with broadcasting: out = a − b; da = g, db = −g, summed to each operand's shape") {
    check_binary(ad::Sub{}, [](double a, double b) { return a - b; }, [](double, double) { return 1.0; },
                 [](double, double) { return -1.0; }, false);
}

TEST_CASE("binary Mul with broadcasting: out = a·b; da = g·b, db = g·a, summed") {
    check_binary(ad::Mul{}, [](double a, double b) { return a * b; }, [](double, double b) { return b; },
                 [](double a, double) { return a; }, false);
}

TEST_CASE("binary Div with broadcasting: out = a/b; da = g/b, db = −g·a/b², summed") {
    check_binary(ad::Div{}, [](double a, double b) { return a / b; }, [](double, double b) { return 1 / b; },
                 [](double a, double b) { return -a / (b * b); }, true);
}

TEST_CASE("binary Add and Sub backward need only the operands' shapes, not their values") {
    const ad::Shape as{3, 1, 5}, bs{4, 1};
    const ad::Shape out{3, 4, 5};
    const Tensor g = randn(out, 44);
    Tensor da, db;
    ad::binary_backward(ad::Sub{}, g, Tensor{}, Tensor{}, as, bs, &da, &db);
    check_close(da, naive_reduce(g, as));
    check_close(db, ad::unary_forward(ad::Neg{}, naive_reduce(g, bs)));
    ad::binary_backward(ad::Add{}, g, Tensor{}, Tensor{}, as, bs, &da, &db);
    check_close(da, naive_reduce(g, as));
    check_close(db, naive_reduce(g, bs));
}

// ---- permute ---------------------------------------------------------------------------------------

TEST_CASE("permute_forward: y[j] = x[i] with i[perm[k]] = j[k], for a rank-4 permutation") {
    const ad::Shape xs{2, 3, 4, 5};
    const Tensor x = randn(xs, 51);
    const ad::Permutation perm{2, 0, 3, 1};
    const Tensor y = ad::permute_forward(x, perm);
    REQUIRE(y.shape() == ad::Shape{4, 2, 5, 3});
    std::int64_t wrong = 0;
    for_each_index(y.shape(), [&](const Index& j) {
        Index i{};
        for (std::size_t k = 0; k < 4; ++k) i[static_cast<std::size_t>(perm[k])] = j[k];
        wrong += y(j[0], j[1], j[2], j[3]) != x(i[0], i[1], i[2], i[3]);
    });
    CHECK(wrong == 0);
}

TEST_CASE("permute_forward: the attention head split (n, L, h, d) -> (n, h, L, d) and a rank-2 transpose") {
    const Tensor x = randn({2, 5, 3, 4}, 52);
    const Tensor y = ad::permute_forward(x, {0, 2, 1, 3});
    REQUIRE(y.shape() == ad::Shape{2, 3, 5, 4});
    std::int64_t wrong = 0;
    for_each_index(x.shape(), [&](const Index& i) { wrong += y(i[0], i[2], i[1], i[3]) != x(i[0], i[1], i[2], i[3]); });
    CHECK(wrong == 0);

    const Tensor m = randn({3, 7}, 53);
    const Tensor mt = ad::permute_forward(m, {1, 0});
    REQUIRE(mt.shape() == ad::Shape{7, 3});
    wrong = 0;
    for (int r = 0; r < 3; ++r)
        for (int c = 0; c < 7; ++c) wrong += mt(c, r) != m(r, c);
    CHECK(wrong == 0);
}

TEST_CASE("inverse_permutation: permuting by perm then by its inverse gives x back") {
    CHECK(ad::inverse_permutation({2, 0, 3, 1}, 4) == ad::Permutation{1, 3, 0, 2});
    const Tensor x = randn({2, 3, 4, 5}, 54);
    for (const ad::Permutation& p : {ad::Permutation{2, 0, 3, 1}, ad::Permutation{3, 2, 1, 0}, ad::Permutation{0, 1, 2, 3},
                                      ad::Permutation{1, 2, 3, 0}}) {
        const Tensor back = ad::permute_forward(ad::permute_forward(x, p), ad::inverse_permutation(p, 4));
        CHECK(bitwise_equal(back, x));
    }
    const Tensor x3 = randn({3, 4, 5}, 55);
    const ad::Permutation p3{2, 0, 1};
    CHECK(bitwise_equal(ad::permute_forward(ad::permute_forward(x3, p3), ad::inverse_permutation(p3, 3)), x3));
}

TEST_CASE("permute_forward: a non-permutation throws naming it and the shape") {
    CHECK_THROWS_WITH_AS((void)ad::permute_forward(ad::zeros<double>({2, 3, 4, 5}), {0, 0, 1, 2}),
                         "permute: (0,0,1,2) is not a permutation of the 4 dimensions of (2,3,4,5)", ad::Error);
    CHECK_THROWS_WITH_AS((void)ad::permute_forward(ad::zeros<double>({2, 3}), {0, 2}),
                         "permute: (0,2) is not a permutation of the 2 dimensions of (2,3)", ad::Error);
}

// ---- sum and MSE loss --------------------------------------------------------------------------------

TEST_CASE("sum_forward: the sum of all elements") {
    // 1 + 2 + ... + n: integers below 2^53, so every partial sum is exact in any order.
    constexpr std::int64_t n = 100003;  // several chunks
    Tensor x({n});
    for (std::int64_t i = 0; i < n; ++i) x.data()[i] = static_cast<double>(i + 1);
    CHECK(ad::sum_forward(x) == static_cast<double>(n * (n + 1) / 2));
    CHECK(ad::sum_forward(ad::full<double>({}, 2.5)) == 2.5);
    CHECK(ad::sum_forward(ad::zeros<double>({0, 3})) == 0.0);
}

TEST_CASE("sum_forward: bitwise the same with 1 and 2 threads") {
    const Tensor x = randn({1 << 20}, 61);
    double s1 = 0, s2 = 0;
    {
        ThreadCount one(1);
        s1 = ad::sum_forward(x);
    }
    {
        ThreadCount two(2);
        s2 = ad::sum_forward(x);
    }
    CHECK(std::memcmp(&s1, &s2, sizeof(double)) == 0);
}

TEST_CASE("mse_loss_forward: mean((a − b)²)") {
    const Tensor a = randn({3, 4, 5}, 62), b = randn({3, 4, 5}, 63);
    double s = 0;
    for (std::int64_t i = 0; i < a.numel(); ++i) s += (a.data()[i] - b.data()[i]) * (a.data()[i] - b.data()[i]);
    CHECK(std::abs(ad::mse_loss_forward(a, b) - s / 60) < fp64_tol);
}

TEST_CASE("mse_loss_backward: da = dloss·2(a − b)/N, db = −da") {
    const Tensor a = randn({3, 4, 5}, 64), b = randn({3, 4, 5}, 65);
    const double dloss = 0.7;
    Tensor da, db;
    ad::mse_loss_backward(&da, &db, dloss, a, b);
    const Tensor want = map(ad::binary_forward(ad::Sub{}, a, b, a.shape()), [&](double d) { return dloss * 2 * d / 60; });
    check_close(da, want);
    check_close(db, ad::unary_forward(ad::Neg{}, want));
    Tensor db_only;
    ad::mse_loss_backward<double>(nullptr, &db_only, dloss, a, b);
    check_close(db_only, ad::unary_forward(ad::Neg{}, want));
}

TEST_CASE("mse_loss: different shapes or empty inputs throw") {
    CHECK_THROWS_WITH_AS((void)ad::mse_loss_forward(ad::zeros<double>({2, 3}), ad::zeros<double>({3, 2})),
                         "mse_loss: input and target must have the same shape, got input (2,3) and target (3,2)",
                         ad::Error);
    CHECK_THROWS_WITH_AS((void)ad::mse_loss_forward(ad::zeros<double>({0}), ad::zeros<double>({0})),
                         "mse_loss: inputs are empty (0)", ad::Error);
    Tensor da;
    CHECK_THROWS_WITH_AS(ad::mse_loss_backward<double>(&da, nullptr, 1.0, ad::zeros<double>({2}), ad::zeros<double>({3})),
                         "mse_loss_backward: input and target must have the same shape, got input (2) and target (3)",
                         ad::Error);
}

TEST_CASE("softmax and exp: a masked (−inf) entry is exactly 0 in every SIMD lane, float and double") {
    // Eigen's vectorised exp clamps its argument: e^−∞ would be ~1e-38 (float) or ~1e-308 (double)
    // in vectorised lanes. Masked keys must contribute nothing at all.
    auto check = [](auto zero) {
        using T = decltype(zero);
        const std::int64_t L = 67;  // vector lanes and a scalar tail
        ad::Tensor<T> x = ad::randn<T>({2, L, L}, 3);
        const ad::Tensor<T> y = ad::softmax_forward(x, ad::causal);
        for (std::int64_t b = 0; b < 2; ++b)
            for (std::int64_t i = 0; i < L; ++i)
                for (std::int64_t j = i + 1; j < L; ++j) CHECK(y(b, i, j) == T(0));
        ad::Tensor<T> minus_inf = ad::full<T>({L}, -std::numeric_limits<T>::infinity());
        const ad::Tensor<T> e = ad::unary_forward(ad::Exp{}, minus_inf);
        for (std::int64_t j = 0; j < L; ++j) CHECK(e(j) == T(0));
    };
    check(0.0f);
    check(0.0);
}

// ---- SIMD row helpers (src/kernels/simd.hpp, internal to the kernels) ----------------------------


namespace {
// Largest error of detail::exp_shifted against std::exp in long double, in units of T's epsilon,
// over [lo, hi] in `count` steps; lengths 1..3·lanes+1 exercise the vector body and the tail.
template <class T>
double exp_ulp_error(double lo, double hi, int count) {
    std::vector<T> x(static_cast<std::size_t>(count)), y(x.size());
    for (int i = 0; i < count; ++i) x[static_cast<std::size_t>(i)] = static_cast<T>(lo + (hi - lo) * i / (count - 1));
    double worst = 0;
    for (std::size_t off = 0; off < x.size(); off += 37) {
        const std::int64_t n = static_cast<std::int64_t>(std::min<std::size_t>(37, x.size() - off));
        autodiff::detail::exp_shifted(x.data() + off, y.data() + off, n, T(0));
    }
    for (std::size_t i = 0; i < x.size(); ++i) {
        const long double e = std::exp(static_cast<long double>(x[i]));
        worst = std::max(worst, static_cast<double>(std::abs(y[i] - e) / e / std::numeric_limits<T>::epsilon()));
    }
    return worst;
}
}  // namespace

TEST_CASE("simd exp: within 2 ulp of std::exp over the whole normal range, float and double") {
    CHECK(exp_ulp_error<float>(-86.5, 88.7, 200001) <= 2.0);
    CHECK(exp_ulp_error<float>(-1.0, 1.0, 100001) <= 2.0);
    CHECK(exp_ulp_error<double>(-707.0, 709.7, 200001) <= 2.0);
    CHECK(exp_ulp_error<double>(-1.0, 1.0, 100001) <= 2.0);
}

TEST_CASE("simd exp: e^-inf = 0 exactly, NaN propagates, overflow gives +inf, e^0 = 1, in every lane and the tail") {
    for (std::int64_t n : {1, 3, 8, 16, 17, 35}) {
        CAPTURE(n);
        for (std::int64_t at = 0; at < n; ++at) {
            std::vector<double> x(static_cast<std::size_t>(n), 0.0), y(x.size());
            x[static_cast<std::size_t>(at)] = -std::numeric_limits<double>::infinity();
            if (n > 2) x[static_cast<std::size_t>((at + 1) % n)] = std::numeric_limits<double>::quiet_NaN();
            if (n > 2) x[static_cast<std::size_t>((at + 2) % n)] = 1e4;
            const double sum = autodiff::detail::exp_shifted_sum(x.data(), y.data(), n, 0.0);
            CHECK(y[static_cast<std::size_t>(at)] == 0.0);
            if (n > 2) {
                CHECK(std::isnan(y[static_cast<std::size_t>((at + 1) % n)]));
                CHECK(y[static_cast<std::size_t>((at + 2) % n)] == std::numeric_limits<double>::infinity());
                CHECK(std::isnan(sum));
            } else {
                CHECK(sum == static_cast<double>(n - 1));  // the other entries are e^0 = 1
            }
        }
    }
    float tiny[2] = {-200.0f, -90.0f}, out[2];
    autodiff::detail::exp_shifted(tiny, out, 2, 0.0f);
    CHECK(out[0] == 0.0f);
    CHECK(out[1] < 1e-38f);
}

TEST_CASE("simd exp_shifted_sum: dst = e^(src - shift) in place, and returns its sum") {
    std::vector<float> x(53);
    for (std::size_t i = 0; i < x.size(); ++i) x[i] = std::sin(0.7f * static_cast<float>(i)) * 4.0f;
    std::vector<float> ref = x;
    const float sum = autodiff::detail::exp_shifted_sum(x.data(), x.data(), 53, 1.5f);
    double ref_sum = 0;
    for (std::size_t i = 0; i < x.size(); ++i) {
        CHECK(x[i] == doctest::Approx(std::exp(ref[i] - 1.5f)).epsilon(3e-7));
        ref_sum += std::exp(static_cast<double>(ref[i]) - 1.5);
    }
    CHECK(sum == doctest::Approx(ref_sum).epsilon(1e-6));
}

TEST_CASE("simd row_max: the maximum over any length, NaN anywhere gives NaN, empty gives -inf") {
    for (std::int64_t n : {1, 5, 16, 23, 64, 70}) {
        CAPTURE(n);
        std::vector<float> x(static_cast<std::size_t>(n));
        for (std::int64_t at = 0; at < n; ++at) {
            for (std::int64_t i = 0; i < n; ++i) x[static_cast<std::size_t>(i)] = -100.0f + static_cast<float>((i * 7) % 13);
            x[static_cast<std::size_t>(at)] = 50.0f;
            CHECK(autodiff::detail::row_max(x.data(), n) == 50.0f);
            x[static_cast<std::size_t>(at)] = std::numeric_limits<float>::quiet_NaN();
            CHECK(std::isnan(autodiff::detail::row_max(x.data(), n)));
        }
    }
    CHECK(autodiff::detail::row_max<float>(nullptr, 0) == -std::numeric_limits<float>::infinity());
}

TEST_CASE("tile_gemm: every row count 1..13 and column count (vector blocks, halves, scalars) equals the loops") {
    for (std::int64_t m = 1; m <= 13; ++m)
        for (std::int64_t n : {1, 3, 4, 8, 16, 17, 33, 64, 71}) {
            CAPTURE(m);
            CAPTURE(n);
            const std::int64_t k = 19;
            std::vector<double> A(static_cast<std::size_t>(m * k)), B(static_cast<std::size_t>(k * n)), C(static_cast<std::size_t>(m * n), 1.0);
            for (std::size_t i = 0; i < A.size(); ++i) A[i] = std::cos(0.3 * static_cast<double>(i));
            for (std::size_t i = 0; i < B.size(); ++i) B[i] = std::sin(0.2 * static_cast<double>(i));
            // op(A) = Aᵀ read through strides: A stored (k × m)
            autodiff::detail::tile_gemm<double>(m, n, k, 0.5, A.data(), 1, m, B.data(), n, 2.0, C.data(), n);
            double worst = 0;
            for (std::int64_t r = 0; r < m; ++r)
                for (std::int64_t c = 0; c < n; ++c) {
                    double s = 0;
                    for (std::int64_t p = 0; p < k; ++p) s += A[static_cast<std::size_t>(p * m + r)] * B[static_cast<std::size_t>(p * n + c)];
                    worst = std::max(worst, std::abs(C[static_cast<std::size_t>(r * n + c)] - (0.5 * s + 2.0)));
                }
            CHECK(worst < 1e-12);
        }
}

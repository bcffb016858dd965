// One implementation, two front doors: the functional (cuDNN-style) kernels called directly, against
// naive loops and against the expression engine, whose nodes call the same kernels.
//
// Tolerances: against loops, fp64 results are compared with 1e-12 absolute error on O(1) values: the
// sums here have at most a few hundred terms, so rounding stays below 1e-13. Where both doors call the
// same kernel on the same inputs, the results must be bitwise equal: any difference means the engine
// does something the functional API does not (or the other way round). The whole attention pipeline
// at the end is compared with 1e-12: the module computes the same formulas in a different association
// (one packed (3E, E) projection instead of three, the 1/√d scale after the GEMM instead of inside it),
// which changes O(1) values by a few ulps (~1e-15), three orders of magnitude below the tolerance.

#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include <fmt/format.h>

#include <autodiff/autodiff.hpp>

namespace ad = autodiff;

namespace {

using Tensor = ad::Tensor<double>;

constexpr double fp64_tol = 1e-12;  // see the file comment
constexpr double qnan = std::numeric_limits<double>::quiet_NaN();

Tensor randn(const ad::Shape& s, std::uint64_t seed) { return ad::randn<double>(s, seed); }

// Every element within `tol` (absolute), else one failure naming the first bad index and the worst error.
void check_close(const Tensor& got, const Tensor& want, double tol = fp64_tol) {
    REQUIRE(got.shape() == want.shape());
    std::int64_t bad = 0, first_bad = -1;
    double worst = 0;
    for (std::int64_t i = 0; i < got.numel(); ++i) {
        const double d = std::abs(got.data()[i] - want.data()[i]);
        if (!(d <= tol) && bad++ == 0) first_bad = i;
        if (d > worst || std::isnan(d)) worst = d;
    }
    CHECK_MESSAGE(bad == 0, fmt::format("{} of {} elements of {} differ by more than {}; first at flat index {} "
                                        "(got {}, want {}); max abs err {}",
                                        bad, got.numel(), got.shape(), tol, first_bad,
                                        first_bad >= 0 ? got.data()[first_bad] : 0.0,
                                        first_bad >= 0 ? want.data()[first_bad] : 0.0, worst));
}

// Same shape and the same bits in every element (NaN payloads included).
void check_bitwise(const Tensor& got, const Tensor& want) {
    REQUIRE(got.shape() == want.shape());
    std::int64_t bad = 0, first_bad = -1;
    for (std::int64_t i = 0; i < got.numel(); ++i)
        if (std::memcmp(got.data() + i, want.data() + i, sizeof(double)) != 0 && bad++ == 0) first_bad = i;
    CHECK_MESSAGE(bad == 0, fmt::format("{} of {} elements of {} are not bitwise equal; first at flat index {} (got {}, want {})",
                                        bad, got.numel(), got.shape(), first_bad, first_bad >= 0 ? got.data()[first_bad] : 0.0,
                                        first_bad >= 0 ? want.data()[first_bad] : 0.0));
}

Tensor scaled(const Tensor& x, double s) {
    Tensor y(x.shape());
    y.array() = s * x.array();
    return y;
}

// ---- naive GEMM and its gradients ------------------------------------------------------------------

struct Flags {
    bool ta, tb, tc;
};
std::vector<Flags> all_flags() {
    std::vector<Flags> f;
    for (int i = 0; i < 8; ++i) f.push_back({(i & 1) != 0, (i & 2) != 0, (i & 4) != 0});
    return f;
}
ad::GemmFlags gemm_flags(Flags f) { return {f.ta, f.tb, f.tc}; }

// A shape: the batch dimensions, then a (rows, cols) matrix stored transposed when `trans`.
ad::Shape matrix_shape(const ad::Shape& batch, std::int64_t rows, std::int64_t cols, bool trans = false) {
    ad::Shape s = batch;
    s.push_back(trans ? cols : rows);
    s.push_back(trans ? rows : cols);
    return s;
}

// Flat offset of element (r, c) of op(X) in batch b, for X of shape s; a rank-2 X is shared by every
// batch (broadcast).
std::int64_t op_offset(const ad::Shape& s, bool trans, std::int64_t b, std::int64_t r, std::int64_t c) {
    const std::int64_t rows = s.dim_from_end(2), cols = s.dim_from_end(1);
    const std::int64_t base = s.rank() > 2 ? b * rows * cols : 0;
    return trans ? base + c * cols + r : base + r * cols + c;
}
double op_at(const Tensor& X, bool trans, std::int64_t b, std::int64_t r, std::int64_t c) {
    return X.data()[op_offset(X.shape(), trans, b, r, c)];
}
double& op_at(Tensor& X, bool trans, std::int64_t b, std::int64_t r, std::int64_t c) {
    return X.data()[op_offset(X.shape(), trans, b, r, c)];
}

// The product's sizes: op_a(A) is (m, k), op_b(B) is (k, n), over `batch` matrices.
struct GemmSizes {
    std::int64_t batch, m, k, n;
};
GemmSizes sizes_of(const Tensor& A, bool ta, const Tensor& B, bool tb) {
    const std::int64_t batch = A.rank() > 2 ? A.shape().batch_count() : B.shape().batch_count();
    return {batch, A.shape().dim_from_end(ta ? 1 : 2), A.shape().dim_from_end(ta ? 2 : 1), B.shape().dim_from_end(tb ? 2 : 1)};
}

// C = beta·C0 + alpha·op_c(op_a(A)·op_b(B)); a rank-2 C with batched A or B receives the sum over the batch.
Tensor naive_gemm(double alpha, const Tensor& A, const Tensor& B, double beta, const Tensor& C0, Flags f) {
    const auto [batch, m, k, n] = sizes_of(A, f.ta, B, f.tb);
    Tensor C = ad::zeros<double>(C0.shape());
    if (beta != 0) C.array() = beta * C0.array();  // beta = 0: C0 is not read (it may hold NaN)
    for (std::int64_t b = 0; b < batch; ++b)
        for (std::int64_t i = 0; i < m; ++i)
            for (std::int64_t j = 0; j < n; ++j) {
                double s = 0;
                for (std::int64_t p = 0; p < k; ++p) s += op_at(A, f.ta, b, i, p) * op_at(B, f.tb, b, p, j);
                op_at(C, f.tc, b, i, j) += alpha * s;
            }
    return C;
}

// The gradients of C = alpha·op_c(op_a(A)·op_b(B)) by their definition, added to beta·dA0 and beta·dB0:
// with P = op_a(A)·op_b(B) and dP[i,j] = dC at P[i,j]'s place in C,
//   d op_a(A)[i,p] = alpha·Σ_j dP[i,j]·op_b(B)[p,j],   d op_b(B)[p,j] = alpha·Σ_i op_a(A)[i,p]·dP[i,j],
// written back through the transposes and summed over the batch for a rank-2 (broadcast) operand.
std::pair<Tensor, Tensor> naive_gemm_backward(double alpha, const Tensor& A, const Tensor& B, const Tensor& dC, double beta,
                                              const Tensor& dA0, const Tensor& dB0, Flags f) {
    const auto [batch, m, k, n] = sizes_of(A, f.ta, B, f.tb);
    Tensor dA = ad::zeros<double>(A.shape()), dB = ad::zeros<double>(B.shape());
    if (beta != 0) {
        dA.array() = beta * dA0.array();
        dB.array() = beta * dB0.array();
    }
    for (std::int64_t b = 0; b < batch; ++b) {
        for (std::int64_t i = 0; i < m; ++i)
            for (std::int64_t p = 0; p < k; ++p) {
                double s = 0;
                for (std::int64_t j = 0; j < n; ++j) s += op_at(dC, f.tc, b, i, j) * op_at(B, f.tb, b, p, j);
                op_at(dA, f.ta, b, i, p) += alpha * s;
            }
        for (std::int64_t p = 0; p < k; ++p)
            for (std::int64_t j = 0; j < n; ++j) {
                double s = 0;
                for (std::int64_t i = 0; i < m; ++i) s += op_at(A, f.ta, b, i, p) * op_at(dC, f.tc, b, i, j);
                op_at(dB, f.tb, b, p, j) += alpha * s;
            }
    }
    return {dA, dB};
}

// ∂f/∂X by central differences, for f linear in X. For a linear f the central difference is exact
// for any step, so the step is 1: the only error left is the rounding of f itself (~1e-15 here).
template <class F>
Tensor central_differences_of_linear(Tensor& X, F&& f) {
    Tensor g(X.shape());
    for (std::int64_t i = 0; i < X.numel(); ++i) {
        const double orig = X.data()[i];
        X.data()[i] = orig + 1;
        const double fp = f();
        X.data()[i] = orig - 1;
        const double fm = f();
        X.data()[i] = orig;
        g.data()[i] = (fp - fm) / 2;
    }
    return g;
}

// The operand batches a GEMM test runs over: both batched, one broadcast, rank 4, plain matrices.
struct BatchCase {
    const char* name;
    ad::Shape a, b;
};
const std::vector<BatchCase> batch_cases = {
    {"batched x batched", {3}, {3}},
    {"rank 4 (batch, heads)", {2, 3}, {2, 3}},
    {"A broadcast over B's batch", {}, {3}},
    {"B broadcast over A's batch", {3}, {}},
    {"plain matrices", {}, {}},
};

}  // namespace

// ---- strided_batched_gemm -------------------------------------------------------------------------

TEST_CASE("strided_batched_gemm: every alpha, beta and transpose flag, batched and broadcast, equals the loops") {
    // op(A) (4, 6), op(B) (6, 5): rows, inner and columns all differ, so a swapped index cannot pass.
    for (const BatchCase& bc : batch_cases)
        for (const Flags f : all_flags())
            for (double alpha : {1.0, 0.5, -2.0})
                for (double beta : {0.0, 1.0, 0.3}) {
                    CAPTURE(bc.name);
                    CAPTURE(f.ta);
                    CAPTURE(f.tb);
                    CAPTURE(f.tc);
                    CAPTURE(alpha);
                    CAPTURE(beta);
                    const Tensor A = randn(matrix_shape(bc.a, 4, 6, f.ta), 1);
                    const Tensor B = randn(matrix_shape(bc.b, 6, 5, f.tb), 2);
                    const ad::Shape batch = bc.a.rank() ? bc.a : bc.b;
                    // beta = 0: C must not be read, so it starts as NaN, which would show in the result.
                    Tensor C = beta == 0 ? ad::full<double>(matrix_shape(batch, 4, 5, f.tc), qnan)
                                         : randn(matrix_shape(batch, 4, 5, f.tc), 3);
                    const Tensor want = naive_gemm(alpha, A, B, beta, C, f);
                    ad::strided_batched_gemm<double>(alpha, A, B, beta, C, gemm_flags(f));
                    check_close(C, want);
                }
}

TEST_CASE("strided_batched_gemm: large products (the packed GEMM) equal the loops, over several row, column and k panels") {
    // Products of at least 96^3 multiply-adds run on the packed GEMM (panels of 256 k × 256 columns,
    // blocks of 192 rows): 197 × 300 × 301 spans two of each and ends in partial ones; 7 × 513 × 260
    // has fewer rows than one micro-kernel block height twice over and three column panels; the batched
    // case runs one packed product per batch entry. Sums of ≤ 301 O(1) terms: fp64_tol holds.
    struct Case {
        ad::Shape batch;
        std::int64_t m, k, n;
    };
    for (const Case& c : {Case{{}, 197, 301, 300}, Case{{}, 7, 260, 513}, Case{{2}, 100, 100, 100}})
        for (const Flags f : all_flags())
            for (double beta : {0.0, 0.3}) {
                CAPTURE(c.m);
                CAPTURE(f.ta);
                CAPTURE(f.tb);
                CAPTURE(f.tc);
                CAPTURE(beta);
                const Tensor A = randn(matrix_shape(c.batch, c.m, c.k, f.ta), 1);
                const Tensor B = randn(matrix_shape(c.batch, c.k, c.n, f.tb), 2);
                Tensor C = beta == 0 ? ad::full<double>(matrix_shape(c.batch, c.m, c.n, f.tc), qnan)
                                     : randn(matrix_shape(c.batch, c.m, c.n, f.tc), 3);
                const Tensor want = naive_gemm(0.5, A, B, beta, C, f);
                ad::strided_batched_gemm<double>(0.5, A, B, beta, C, gemm_flags(f));
                check_close(C, want);
            }
}

TEST_CASE("strided_batched_gemm and linear_forward: large products are bitwise identical on 1 and 2 threads") {
    const ad::Tensor<float> x = ad::randn<float>({3, 70, 300}, 1), W = ad::randn<float>({260, 300}, 2), b = ad::randn<float>({260}, 3);
    auto run = [&](int threads) {
        ad::set_num_threads(threads);
        ad::Tensor<float> C({3, 70, 260});
        ad::strided_batched_gemm<float>(1.f, x, W, 0.f, C, {false, true, false});
        return std::pair{C, ad::linear_forward(x, W, b)};
    };
    const auto [c1, y1] = run(1);
    const auto [c2, y2] = run(2);
    ad::set_num_threads(2);
    CHECK(std::memcmp(c1.data(), c2.data(), sizeof(float) * static_cast<std::size_t>(c1.numel())) == 0);
    CHECK(std::memcmp(y1.data(), y2.data(), sizeof(float) * static_cast<std::size_t>(y1.numel())) == 0);
}

TEST_CASE("linear_forward: a large product with its bias added in the GEMM's output pass equals the loops") {
    const Tensor x = randn({2, 150, 300}, 1), W = randn({270, 300}, 2), b = randn({270}, 3);
    const Tensor y = ad::linear_forward(x, W, b);
    Tensor want({2, 150, 270});
    for (std::int64_t r = 0; r < 300; ++r)
        for (std::int64_t o = 0; o < 270; ++o) {
            double s = b(o);
            for (std::int64_t i = 0; i < 300; ++i) s += x.data()[r * 300 + i] * W(o, i);
            want.data()[r * 270 + o] = s;
        }
    check_close(y, want);
}

TEST_CASE("strided_batched_gemm: a rank-2 C receives the sum over the batch, for every alpha, beta and flag") {
    for (const Flags f : all_flags())
        for (double alpha : {1.0, 0.5, -2.0})
            for (double beta : {0.0, 1.0, 0.3}) {
                CAPTURE(f.ta);
                CAPTURE(f.tb);
                CAPTURE(f.tc);
                CAPTURE(alpha);
                CAPTURE(beta);
                const Tensor A = randn(matrix_shape({3}, 4, 6, f.ta), 4);
                const Tensor B = randn(matrix_shape({3}, 6, 5, f.tb), 5);
                Tensor C = beta == 0 ? ad::full<double>(matrix_shape({}, 4, 5, f.tc), qnan) : randn(matrix_shape({}, 4, 5, f.tc), 6);
                const Tensor want = naive_gemm(alpha, A, B, beta, C, f);
                ad::strided_batched_gemm<double>(alpha, A, B, beta, C, gemm_flags(f));
                check_close(C, want);
            }
}

// ---- strided_batched_gemm_backward ----------------------------------------------------------------

TEST_CASE("strided_batched_gemm_backward: every flag, alpha and beta, batched and broadcast, equals the loops") {
    for (const BatchCase& bc : batch_cases)
        for (const Flags f : all_flags())
            for (double alpha : {1.0, 0.5, -2.0})
                for (double beta : {0.0, 1.0, 0.3}) {
                    CAPTURE(bc.name);
                    CAPTURE(f.ta);
                    CAPTURE(f.tb);
                    CAPTURE(f.tc);
                    CAPTURE(alpha);
                    CAPTURE(beta);
                    const Tensor A = randn(matrix_shape(bc.a, 4, 6, f.ta), 11);
                    const Tensor B = randn(matrix_shape(bc.b, 6, 5, f.tb), 12);
                    const ad::Shape batch = bc.a.rank() ? bc.a : bc.b;
                    const Tensor dC = randn(matrix_shape(batch, 4, 5, f.tc), 13);
                    // beta = 0: dA and dB must not be read, so they start as NaN.
                    const Tensor dA0 = beta == 0 ? ad::full<double>(A.shape(), qnan) : randn(A.shape(), 14);
                    const Tensor dB0 = beta == 0 ? ad::full<double>(B.shape(), qnan) : randn(B.shape(), 15);
                    const auto [dA_want, dB_want] = naive_gemm_backward(alpha, A, B, dC, beta, dA0, dB0, f);
                    Tensor dA = dA0.clone(), dB = dB0.clone();
                    ad::strided_batched_gemm_backward<double>(&dA, &dB, dC, alpha, A, B, beta, gemm_flags(f));
                    check_close(dA, dA_want);
                    check_close(dB, dB_want);
                }
}

TEST_CASE("strided_batched_gemm_backward: equals central differences of the forward <dC, C(A, B)>, every flag") {
    // f(A, B) = Σ dC ⊙ C with C = alpha·op_c(op_a(A)·op_b(B)) computed by the forward kernel: the
    // backward with beta = 0 must be exactly ∂f/∂A and ∂f/∂B.
    for (const BatchCase& bc : batch_cases)
        for (const Flags f : all_flags()) {
            CAPTURE(bc.name);
            CAPTURE(f.ta);
            CAPTURE(f.tb);
            CAPTURE(f.tc);
            const double alpha = -2.0;
            Tensor A = randn(matrix_shape(bc.a, 3, 4, f.ta), 21);
            Tensor B = randn(matrix_shape(bc.b, 4, 5, f.tb), 22);
            const ad::Shape batch = bc.a.rank() ? bc.a : bc.b;
            const Tensor dC = randn(matrix_shape(batch, 3, 5, f.tc), 23);
            auto f_of_AB = [&] {
                Tensor C(dC.shape());
                ad::strided_batched_gemm<double>(alpha, A, B, 0.0, C, gemm_flags(f));
                return (C.array() * dC.array()).sum();
            };
            const Tensor dA_numeric = central_differences_of_linear(A, f_of_AB);
            const Tensor dB_numeric = central_differences_of_linear(B, f_of_AB);
            Tensor dA(A.shape()), dB(B.shape());
            ad::strided_batched_gemm_backward<double>(&dA, &dB, dC, alpha, A, B, 0.0, gemm_flags(f));
            check_close(dA, dA_numeric);
            check_close(dB, dB_numeric);
        }
}

TEST_CASE("strided_batched_gemm_backward: beta = 1 accumulates, so two calls from zero give twice the gradient") {
    for (const Flags f : all_flags()) {
        CAPTURE(f.ta);
        CAPTURE(f.tb);
        CAPTURE(f.tc);
        const Tensor A = randn(matrix_shape({2}, 3, 4, f.ta), 31), B = randn(matrix_shape({2}, 4, 5, f.tb), 32);
        const Tensor dC = randn(matrix_shape({2}, 3, 5, f.tc), 33);
        Tensor dA_once(A.shape()), dB_once(B.shape());
        ad::strided_batched_gemm_backward<double>(&dA_once, &dB_once, dC, 0.5, A, B, 0.0, gemm_flags(f));
        Tensor dA = ad::zeros<double>(A.shape()), dB = ad::zeros<double>(B.shape());
        ad::strided_batched_gemm_backward<double>(&dA, &dB, dC, 0.5, A, B, 1.0, gemm_flags(f));
        ad::strided_batched_gemm_backward<double>(&dA, &dB, dC, 0.5, A, B, 1.0, gemm_flags(f));
        check_close(dA, scaled(dA_once, 2.0));
        check_close(dB, scaled(dB_once, 2.0));
    }
}

TEST_CASE("strided_batched_gemm_backward: nullptr skips that gradient and leaves the other one right") {
    const Flags f{true, false, true};
    const Tensor A = randn(matrix_shape({2}, 3, 4, f.ta), 41), B = randn(matrix_shape({2}, 4, 5, f.tb), 42);
    const Tensor dC = randn(matrix_shape({2}, 3, 5, f.tc), 43);
    const Tensor nan_A = ad::full<double>(A.shape(), qnan), nan_B = ad::full<double>(B.shape(), qnan);
    const auto [dA_want, dB_want] = naive_gemm_backward(1.0, A, B, dC, 0.0, nan_A, nan_B, f);
    SUBCASE("only dA") {
        Tensor dA(A.shape());
        ad::strided_batched_gemm_backward<double>(&dA, nullptr, dC, 1.0, A, B, 0.0, gemm_flags(f));
        check_close(dA, dA_want);
    }
    SUBCASE("only dB") {
        Tensor dB(B.shape());
        ad::strided_batched_gemm_backward<double>(nullptr, &dB, dC, 1.0, A, B, 0.0, gemm_flags(f));
        check_close(dB, dB_want);
    }
    SUBCASE("neither: nothing to do, and no error") {
        CHECK_NOTHROW(ad::strided_batched_gemm_backward<double>(nullptr, nullptr, dC, 1.0, A, B, 0.0, gemm_flags(f)));
    }
}

TEST_CASE("strided_batched_gemm_backward: dA, dB or dC of the wrong shape throws naming the shapes") {
    const Tensor A = randn({2, 3, 4}, 51), B = randn({2, 4, 5}, 52), dC = randn({2, 3, 5}, 53);
    const char* op = "strided_batched_gemm_backward";
    SUBCASE("dA") {
        Tensor dA = ad::zeros<double>({2, 4, 3}), dB = ad::zeros<double>(B.shape());
        CHECK_THROWS_WITH_AS(ad::strided_batched_gemm_backward<double>(&dA, &dB, dC, 1.0, A, B, 0.0),
                             fmt::format("{}: dA must have A's shape (2,3,4), got (2,4,3)", op).c_str(), ad::Error);
    }
    SUBCASE("dB") {
        Tensor dB = ad::zeros<double>({4, 5});  // B's matrix shape without the batch
        CHECK_THROWS_WITH_AS(ad::strided_batched_gemm_backward<double>(nullptr, &dB, dC, 1.0, A, B, 0.0),
                             fmt::format("{}: dB must have B's shape (2,4,5), got (4,5)", op).c_str(), ad::Error);
    }
    SUBCASE("dC: C is (2,5,3) when trans_c is set") {
        Tensor dA(A.shape());
        CHECK_THROWS_WITH_AS(ad::strided_batched_gemm_backward<double>(&dA, nullptr, dC, 1.0, A, B, 0.0, {false, false, true}),
                             fmt::format("{}: dC has shape (2,3,5) but C of A (2,3,4) and B (2,4,5) has shape (2,5,3)", op).c_str(),
                             ad::Error);
    }
    SUBCASE("dC summed over the batch (the forward's rank-2 C) is not a backward mode") {
        Tensor dA(A.shape());
        const Tensor dC2 = randn({3, 5}, 54);
        CHECK_THROWS_WITH_AS(ad::strided_batched_gemm_backward<double>(&dA, nullptr, dC2, 1.0, A, B, 0.0),
                             fmt::format("{}: dC has shape (3,5) but C of A (2,3,4) and B (2,4,5) has shape (2,3,5)", op).c_str(),
                             ad::Error);
    }
}

// ---- matmul: functional vs engine -----------------------------------------------------------------

TEST_CASE("matmul_forward and matmul_backward give bitwise the engine's matmul value and gradients") {
    struct Case {
        const char* name;
        ad::Shape a, b;  // stored shapes
        bool ta, tb;
    };
    const Case cases[] = {
        {"matmul(A, transpose(B)), as S = Q·Kᵀ", {2, 3, 5, 4}, {2, 3, 6, 4}, false, true},
        {"matmul(A, B)", {2, 5, 4}, {2, 4, 6}, false, false},
        {"matmul(transpose(A), B)", {2, 4, 5}, {2, 4, 6}, true, false},
        {"matmul(transpose(A), transpose(B))", {2, 4, 5}, {2, 6, 4}, true, true},
        {"matmul(X, transpose(W)) with a rank-2 W broadcast over the batch", {2, 5, 4}, {6, 4}, false, true},
    };
    for (const Case& c : cases) {
        CAPTURE(c.name);
        ad::Param<double> A(randn(c.a, 61)), B(randn(c.b, 62));
        ad::Var<double> C;
        if (!c.ta && !c.tb) C = ad::matmul(A, B);
        if (!c.ta && c.tb) C = ad::matmul(A, ad::transpose(B));
        if (c.ta && !c.tb) C = ad::matmul(ad::transpose(A), B);
        if (c.ta && c.tb) C = ad::matmul(ad::transpose(A), ad::transpose(B));
        const Tensor seed = randn(C.shape(), 63);
        C.backward(seed);

        const Tensor C_functional = ad::matmul_forward(A.value(), c.ta, B.value(), c.tb);
        Tensor dA, dB;
        ad::matmul_backward(&dA, &dB, seed, A.value(), c.ta, B.value(), c.tb);
        check_bitwise(C.value(), C_functional);
        check_bitwise(A.grad(), dA);
        check_bitwise(B.grad(), dB);
    }
}

// ---- linear: functional vs engine -----------------------------------------------------------------

TEST_CASE("linear_forward and linear_backward give bitwise the engine's linear value and gradients") {
    for (const ad::Shape& xs : {ad::Shape{5}, ad::Shape{4, 5}, ad::Shape{2, 3, 5}, ad::Shape{2, 2, 3, 5}})
        for (bool with_bias : {true, false}) {
            CAPTURE(xs.str());
            CAPTURE(with_bias);
            ad::Param<double> x(randn(xs, 71)), W(randn({3, 5}, 72)), b(randn({3}, 73));
            ad::Var<double> y = with_bias ? ad::Var<double>(ad::linear(x, W, b)) : ad::Var<double>(ad::linear(x, W));
            const Tensor dy = randn(y.shape(), 74);
            y.backward(dy);

            const Tensor y_functional = with_bias ? ad::linear_forward(x.value(), W.value(), b.value()) : ad::linear_forward(x.value(), W.value());
            Tensor dx, dW = ad::zeros<double>(W.shape()), db = ad::zeros<double>(b.shape());
            ad::linear_backward(&dx, &dW, with_bias ? &db : nullptr, dy, x.value(), W.value());
            check_bitwise(y.value(), y_functional);
            check_bitwise(x.grad(), dx);
            check_bitwise(W.grad(), dW);
            if (with_bias) check_bitwise(b.grad(), db);
            else CHECK_FALSE(b.has_grad());
        }
}

TEST_CASE("linear_backward accumulates dW and db like the engine's second backward() into a Param") {
    // The eigenMHA seed's linear backward adds into dW and db: called on buffers that already hold a
    // gradient it gives what two engine backward() calls leave in W.grad() and b.grad().
    ad::Param<double> W(randn({3, 5}, 81)), b(randn({3}, 82));
    const Tensor x1 = randn({2, 4, 5}, 83), x2 = randn({2, 4, 5}, 84);
    const Tensor dy1 = randn({2, 4, 3}, 85), dy2 = randn({2, 4, 3}, 86);
    ad::Var<double>(ad::linear(x1, W, b)).backward(dy1);
    ad::Var<double>(ad::linear(x2, W, b)).backward(dy2);

    Tensor dW = ad::zeros<double>(W.shape()), db = ad::zeros<double>(b.shape());
    ad::linear_backward<double>(nullptr, &dW, &db, dy1, x1, W.value());
    ad::linear_backward<double>(nullptr, &dW, &db, dy2, x2, W.value());
    // The engine adds the second gradient (computed from zeros) to the first; linear_backward adds the
    // second product straight into dW inside the GEMM: one rounding apart, so compared to 1e-12.
    check_close(W.grad(), dW);
    check_close(b.grad(), db);
}

// ---- softmax: functional vs engine ----------------------------------------------------------------

TEST_CASE("softmax_forward and softmax_backward give bitwise the engine's softmax with every mask kind") {
    const ad::Shape s{2, 3, 4, 6};
    const Tensor x = randn(s, 91), dy = randn(s, 92);
    ad::Tensor<bool> keep(ad::Shape{4, 6});
    for (std::int64_t i = 0; i < keep.numel(); ++i) keep.data()[i] = (i * 7) % 5 != 0;
    const ad::Tensor<bool> padding = ad::from_vector<bool>({2, 6}, {true, true, true, true, false, false,  //
                                                                    true, false, true, true, true, true});
    const Tensor additive = randn({3, 4, 6}, 93);
    struct Case {
        const char* name;
        ad::Mask mask;
        Tensor additive;
    };
    const Case cases[] = {
        {"no mask", {}, {}},
        {"causal", ad::causal, {}},
        {"keep (Lq, Lk)", ad::keep_mask(keep), {}},
        {"key padding (batch, Lk)", ad::key_padding_mask(padding), {}},
        {"additive (h, Lq, Lk)", {}, additive},
        {"causal | key padding, plus additive", ad::causal | ad::key_padding_mask(padding), additive},
        {"causal | keep | key padding", ad::causal | ad::keep_mask(keep) | ad::key_padding_mask(padding), {}},
    };
    for (const Case& c : cases) {
        CAPTURE(c.name);
        ad::Param<double> px(x.clone());
        ad::Var<double> y = ad::softmax(px, c.mask, c.additive);
        y.backward(dy);
        const Tensor y_functional = ad::softmax_forward(x, c.mask, c.additive);
        check_bitwise(y.value(), y_functional);
        check_bitwise(px.grad(), ad::softmax_backward(dy, y_functional));
    }
}

// ---- dropout: functional vs engine ----------------------------------------------------------------

TEST_CASE("dropout_forward gives bitwise the engine's dropout for the same descriptor, and dropout_backward its gradient") {
    // Enough elements for several Philox blocks per work chunk and a partial block at the end.
    const ad::Shape s{2, 3, 37, 41};
    const Tensor x = ad::uniform<double>(s, 1.0, 2.0, 101);  // never 0: a zero output means dropped
    const Tensor dy = randn(s, 102);
    for (const ad::DropoutDescriptor& d : {ad::DropoutDescriptor{0.3, 42, 0}, ad::DropoutDescriptor{0.5, 7, 9},
                                           ad::DropoutDescriptor{0.1, 1ull << 40, 3ull << 33}}) {
        CAPTURE(d.rate);
        CAPTURE(d.seed);
        CAPTURE(d.offset);
        ad::Param<double> px(x.clone());
        ad::Var<double> y = ad::dropout(px, d);
        y.backward(dy);
        const Tensor y_functional = ad::dropout_forward(d, x);
        const Tensor dx_functional = ad::dropout_backward(d, dy);
        check_bitwise(y.value(), y_functional);
        check_bitwise(px.grad(), dx_functional);

        // Both doors use the mask dropout_keeps describes, and the backward applies the forward's mask:
        // dx = dy/(1-rate) exactly where y = x/(1-rate), and 0 exactly where y = 0.
        const double scale = 1.0 / (1.0 - d.rate);
        std::int64_t wrong_forward = 0, wrong_backward = 0, dropped = 0;
        for (std::int64_t i = 0; i < x.numel(); ++i) {
            const bool keeps = ad::dropout_keeps(d, static_cast<std::uint64_t>(i));
            dropped += !keeps;
            wrong_forward += y_functional.data()[i] != (keeps ? x.data()[i] * scale : 0.0);
            wrong_backward += dx_functional.data()[i] != (y_functional.data()[i] != 0.0 ? dy.data()[i] * scale : 0.0);
        }
        CHECK(wrong_forward == 0);
        CHECK(wrong_backward == 0);
        CHECK(dropped > 0);  // the masks compared above really drop something
    }
}

TEST_CASE("dropout with training = false is the identity through both doors") {
    const Tensor x = randn({3, 20}, 111), dy = randn({3, 20}, 112);
    const ad::DropoutDescriptor d{0.5, 1, 2, false};
    ad::Param<double> px(x.clone());
    ad::Var<double> y = ad::dropout(px, d);
    y.backward(dy);
    check_bitwise(y.value(), x);
    check_bitwise(ad::dropout_forward(d, x), x);
    check_bitwise(px.grad(), dy);
    check_bitwise(ad::dropout_backward(d, dy), dy);
}

// ---- mse: functional vs engine --------------------------------------------------------------------

TEST_CASE("mse_loss_forward and mse_loss_backward give bitwise the engine's mse loss and gradients") {
    for (const ad::Shape& s : {ad::Shape{7}, ad::Shape{2, 3, 5}, ad::Shape{2, 2, 3, 4}}) {
        CAPTURE(s.str());
        ad::Param<double> a(randn(s, 121)), b(randn(s, 122));
        ad::Var<double> loss = ad::mse(a, b);
        loss.backward();
        const double loss_functional = ad::mse_loss_forward(a.value(), b.value());
        Tensor da, db;
        ad::mse_loss_backward(&da, &db, 1.0, a.value(), b.value());
        CHECK(std::memcmp(&loss.value().data()[0], &loss_functional, sizeof(double)) == 0);
        check_bitwise(a.grad(), da);
        check_bitwise(b.grad(), db);
    }
}

// ---- the eigenMHA pipeline (seeds/003) through the functional API only ----------------------------

namespace {

// The weights of one attention layer, as the seed names them: W (out, in), b (out).
struct AttentionWeights {
    Tensor Wq, bq, Wk, bk, Wv, bv, Wo, bo;
};

struct AttentionGradients {
    double loss = 0;
    Tensor dWq, dbq, dWk, dbk, dWv, dbv, dWo, dbo;
    Tensor dQin, dKin, dVin;
};

// (B, L, H·D) -> (B, H, L, D) and back; permute {0, 2, 1, 3} is its own inverse.
Tensor split_heads(const Tensor& x, std::int64_t H) {
    const ad::Shape s = x.shape();
    return ad::permute_forward(x.reshaped({s[0], s[1], H, s[2] / H}), {0, 2, 1, 3});
}
Tensor merge_heads(const Tensor& x) {
    const Tensor y = ad::permute_forward(x, {0, 2, 1, 3});
    return y.reshaped({y.dim(0), y.dim(1), y.dim(2) * y.dim(3)});
}

Tensor sum3(const Tensor& a, const Tensor& b, const Tensor& c) {
    Tensor s(a.shape());
    s.array() = a.array() + b.array() + c.array();
    return s;
}

// The seed's forward and backward, written with the functional kernels only:
//   Q = Qin·Wqᵀ + bq, K = Kin·Wkᵀ + bk, V = Vin·Wvᵀ + bv          (B, L, E), then split into H heads
//   S = Q·Kᵀ/√d (GEMM alpha = 1/√d), P = softmax(S, causal), P = dropout(P), O = P·V   (B, H, Lq, .)
//   Oout = merge(O)·Woᵀ + bo, loss = mse(Oout, target)
// and the backward chain in reverse, each step the *_backward of its forward.
AttentionGradients functional_attention(const AttentionWeights& w, const Tensor& Qin, const Tensor& Kin, const Tensor& Vin,
                                        const Tensor& target, std::int64_t H, const ad::DropoutDescriptor& drop) {
    const std::int64_t B = Qin.dim(0), Lq = Qin.dim(1), Lk = Kin.dim(1), E = Qin.dim(2), D = E / H;
    const double alpha = 1.0 / std::sqrt(static_cast<double>(D));

    // Forward.
    const Tensor Q = split_heads(ad::linear_forward(Qin, w.Wq, w.bq), H);  // (B, H, Lq, D)
    const Tensor K = split_heads(ad::linear_forward(Kin, w.Wk, w.bk), H);  // (B, H, Lk, D)
    const Tensor V = split_heads(ad::linear_forward(Vin, w.Wv, w.bv), H);  // (B, H, Lk, D)
    Tensor S({B, H, Lq, Lk});
    ad::strided_batched_gemm<double>(alpha, Q, K, 0.0, S, {false, true, false});
    const Tensor P = ad::softmax_forward(S, ad::causal);
    const Tensor Pd = ad::dropout_forward(drop, P);
    Tensor O({B, H, Lq, D});
    ad::strided_batched_gemm<double>(1.0, Pd, V, 0.0, O);
    const Tensor Om = merge_heads(O);  // (B, Lq, E)
    const Tensor Oout = ad::linear_forward(Om, w.Wo, w.bo);
    AttentionGradients g;
    g.loss = ad::mse_loss_forward(Oout, target);

    // Backward.
    Tensor dOout;
    ad::mse_loss_backward<double>(&dOout, nullptr, 1.0, Oout, target);
    Tensor dOm;
    g.dWo = ad::zeros<double>(w.Wo.shape());
    g.dbo = ad::zeros<double>(w.bo.shape());
    ad::linear_backward(&dOm, &g.dWo, &g.dbo, dOout, Om, w.Wo);
    const Tensor dO = split_heads(dOm, H);
    Tensor dPd(Pd.shape()), dV(V.shape());
    ad::strided_batched_gemm_backward<double>(&dPd, &dV, dO, 1.0, Pd, V, 0.0);
    const Tensor dP = ad::dropout_backward(drop, dPd);
    const Tensor dS = ad::softmax_backward(dP, P);
    Tensor dQ(Q.shape()), dK(K.shape());
    ad::strided_batched_gemm_backward<double>(&dQ, &dK, dS, alpha, Q, K, 0.0, {false, true, false});
    g.dWq = ad::zeros<double>(w.Wq.shape());
    g.dbq = ad::zeros<double>(w.bq.shape());
    g.dWk = ad::zeros<double>(w.Wk.shape());
    g.dbk = ad::zeros<double>(w.bk.shape());
    g.dWv = ad::zeros<double>(w.Wv.shape());
    g.dbv = ad::zeros<double>(w.bv.shape());
    ad::linear_backward(&g.dQin, &g.dWq, &g.dbq, merge_heads(dQ), Qin, w.Wq);
    ad::linear_backward(&g.dKin, &g.dWk, &g.dbk, merge_heads(dK), Kin, w.Wk);
    ad::linear_backward(&g.dVin, &g.dWv, &g.dbv, merge_heads(dV), Vin, w.Wv);
    return g;
}

AttentionWeights random_weights(std::int64_t E, std::uint64_t seed) {
    // Scaled so that the scores are O(1) and the softmax is neither uniform nor one-hot.
    auto w = [&](std::uint64_t k) { return scaled(randn({E, E}, seed + k), 1.0 / std::sqrt(static_cast<double>(E))); };
    auto b = [&](std::uint64_t k) { return scaled(randn({E}, seed + k), 0.5); };
    return {w(1), b(2), w(3), b(4), w(5), b(6), w(7), b(8)};
}

// Rows [row0, row0 + src.dim(0)) of dst's value (or of a rank-1 dst) become src.
void copy_rows(ad::Param<double>& dst, std::int64_t row0, const Tensor& src) {
    const std::int64_t row = dst.value().rank() == 2 ? dst.value().dim(1) : 1;
    REQUIRE(src.numel() == src.dim(0) * row);
    REQUIRE(row0 + src.dim(0) <= dst.value().dim(0));
    std::memcpy(dst.value().data() + row0 * row, src.data(), static_cast<std::size_t>(src.numel()) * sizeof(double));
}

// Rows [row0, row0 + n) of t (rank 1 or 2), as a copy.
Tensor rows(const Tensor& t, std::int64_t row0, std::int64_t n) { return ad::narrow_forward(t, 0, row0, n); }

ad::nn::MultiHeadAttention<double> module_with(const AttentionWeights& w, std::int64_t E, std::int64_t H, double dropout,
                                               std::uint64_t seed) {
    ad::nn::MultiHeadAttention<double> mha({.embed_dim = E, .num_heads = H, .dropout = dropout, .seed = seed});
    copy_rows(mha.in_proj_weight(), 0, w.Wq);
    copy_rows(mha.in_proj_weight(), E, w.Wk);
    copy_rows(mha.in_proj_weight(), 2 * E, w.Wv);
    copy_rows(mha.in_proj_bias(), 0, w.bq);
    copy_rows(mha.in_proj_bias(), E, w.bk);
    copy_rows(mha.in_proj_bias(), 2 * E, w.bv);
    copy_rows(mha.out_proj().weight(), 0, w.Wo);
    copy_rows(mha.out_proj().bias(), 0, w.bo);
    return mha;
}

void check_module_gradients(ad::nn::MultiHeadAttention<double>& mha, const AttentionGradients& g, std::int64_t E) {
    const Tensor& dW_in = mha.in_proj_weight().grad();
    const Tensor& db_in = mha.in_proj_bias().grad();
    SUBCASE("W_q, b_q: rows [0, E) of in_proj") {
        check_close(rows(dW_in, 0, E), g.dWq);
        check_close(rows(db_in, 0, E), g.dbq);
    }
    SUBCASE("W_k, b_k: rows [E, 2E) of in_proj") {
        check_close(rows(dW_in, E, E), g.dWk);
        check_close(rows(db_in, E, E), g.dbk);
    }
    SUBCASE("W_v, b_v: rows [2E, 3E) of in_proj") {
        check_close(rows(dW_in, 2 * E, E), g.dWv);
        check_close(rows(db_in, 2 * E, E), g.dbv);
    }
    SUBCASE("W_o, b_o: out_proj") {
        check_close(mha.out_proj().weight().grad(), g.dWo);
        check_close(mha.out_proj().bias().grad(), g.dbo);
    }
}

}  // namespace

TEST_CASE("eigenMHA pipeline in the functional API equals nn::MultiHeadAttention: loss, dW, db and dX (self-attention)") {
    // One input X feeds Q, K and V (the module's packed fast path); the seed's dQin, dKin and dVin then
    // add up to dX. Causal mask and dropout 0.2 in training: the module's first call uses Philox
    // offset 0 with its seed, so the functional pipeline is given that descriptor.
    const std::int64_t B = 2, L = 5, E = 8, H = 2;
    const double rate = 0.2;
    const std::uint64_t seed = 17;
    const AttentionWeights w = random_weights(E, 200);
    const Tensor X = randn({B, L, E}, 210), target = randn({B, L, E}, 211);
    const AttentionGradients g = functional_attention(w, X, X, X, target, H, {rate, seed, 0, true});

    ad::nn::MultiHeadAttention<double> mha = module_with(w, E, H, rate, seed);
    ad::Param<double> px(X.clone(), "X");
    const ad::Var<double> x(px);
    ad::Var<double> loss = ad::mse(mha(x, x, x, ad::causal), target);
    loss.backward();

    INFO("module loss ", loss.item(), ", functional loss ", g.loss);
    CHECK(std::abs(loss.item() - g.loss) <= fp64_tol);
    check_close(px.grad(), sum3(g.dQin, g.dKin, g.dVin));
    check_module_gradients(mha, g, E);
}

TEST_CASE("eigenMHA pipeline in the functional API equals nn::MultiHeadAttention: loss, dW, db and dQin, dKin, dVin (cross-attention)") {
    // Separate query, key and value inputs, Lq = 4 != Lk = 6, top-left causal mask, dropout 0.3.
    const std::int64_t B = 2, Lq = 4, Lk = 6, E = 8, H = 4;
    const double rate = 0.3;
    const std::uint64_t seed = 5;
    const AttentionWeights w = random_weights(E, 300);
    const Tensor Qin = randn({B, Lq, E}, 310), Kin = randn({B, Lk, E}, 311), Vin = randn({B, Lk, E}, 312);
    const Tensor target = randn({B, Lq, E}, 313);
    const AttentionGradients g = functional_attention(w, Qin, Kin, Vin, target, H, {rate, seed, 0, true});

    ad::nn::MultiHeadAttention<double> mha = module_with(w, E, H, rate, seed);
    ad::Param<double> pq(Qin.clone(), "query"), pk(Kin.clone(), "key"), pv(Vin.clone(), "value");
    ad::Var<double> loss = ad::mse(mha(ad::Var<double>(pq), ad::Var<double>(pk), ad::Var<double>(pv), ad::causal), target);
    loss.backward();

    INFO("module loss ", loss.item(), ", functional loss ", g.loss);
    CHECK(std::abs(loss.item() - g.loss) <= fp64_tol);
    check_close(pq.grad(), g.dQin);
    check_close(pk.grad(), g.dKin);
    check_close(pv.grad(), g.dVin);
    check_module_gradients(mha, g, E);
}

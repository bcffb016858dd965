// Shapes, tensor factories and handles, element access, printing, and the caching storage pool.

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "autodiff/error.hpp"
#include "autodiff/pool.hpp"
#include "autodiff/shape.hpp"
#include "autodiff/tensor.hpp"

namespace ad = autodiff;

namespace {

using Dims = std::array<std::int64_t, ad::max_rank>;

bool bitwise_equal(const ad::Tensor<double>& a, const ad::Tensor<double>& b) {
    return a.shape() == b.shape() &&
           std::memcmp(a.data(), b.data(), static_cast<std::size_t>(a.numel()) * sizeof(double)) == 0;
}

}  // namespace

// ---- Shape ---------------------------------------------------------------------------------------

TEST_CASE("Shape: rank, numel, dimensions and str() of an attention shape") {
    const ad::Shape s{2, 8, 128, 64};
    CHECK(s.rank() == 4);
    CHECK(s.numel() == 2 * 8 * 128 * 64);
    CHECK(s[0] == 2);
    CHECK(s[3] == 64);
    CHECK(s.dim_from_end(1) == 64);
    CHECK(s.dim_from_end(2) == 128);
    CHECK(s.batch_count() == 16);
    CHECK(s.str() == "(2,8,128,64)");
    CHECK(fmt::format("{}", s) == "(2,8,128,64)");
}

TEST_CASE("Shape: the rank-0 shape is a scalar with one element") {
    const ad::Shape s{};
    CHECK(s.rank() == 0);
    CHECK(s.numel() == 1);
    CHECK(s.batch_count() == 1);
    CHECK(s.str() == "()");
}

TEST_CASE("Shape: a zero dimension gives zero elements") {
    CHECK(ad::Shape{3, 0, 5}.numel() == 0);
    CHECK(ad::Shape{0}.str() == "(0)");
}

TEST_CASE("Shape: batch_count is the product of all but the last two dimensions") {
    CHECK(ad::Shape{7}.batch_count() == 1);
    CHECK(ad::Shape{4, 5}.batch_count() == 1);
    CHECK(ad::Shape{3, 4, 5}.batch_count() == 3);
    CHECK(ad::Shape{2, 3, 4, 5}.batch_count() == 6);
}

TEST_CASE("Shape: from_range builds a shape from any integer range") {
    const std::vector<int> dims{2, 3, 5};
    const ad::Shape s = ad::Shape::from_range(dims.begin(), dims.end());
    CHECK(s == ad::Shape{2, 3, 5});
}

TEST_CASE("Shape: padded() left-pads with 1 to rank 4") {
    CHECK(ad::Shape{3, 5}.padded() == Dims{1, 1, 3, 5});
    CHECK(ad::Shape{}.padded() == Dims{1, 1, 1, 1});
    CHECK(ad::Shape{2, 3, 4, 5}.padded() == Dims{2, 3, 4, 5});
}

TEST_CASE("Shape: broadcast_strides are row-major strides with 0 on every dimension of size 1") {
    CHECK(ad::Shape{2, 3, 4, 5}.broadcast_strides() == Dims{60, 20, 5, 1});
    // (3,1,5) pads to (1,3,1,5): the padded and the size-1 dimensions get stride 0.
    CHECK(ad::Shape{3, 1, 5}.broadcast_strides() == Dims{0, 5, 0, 1});
    CHECK(ad::Shape{4, 1}.broadcast_strides() == Dims{0, 0, 1, 0});
    CHECK(ad::Shape{}.broadcast_strides() == Dims{0, 0, 0, 0});
}

TEST_CASE("Shape: equality compares rank and every dimension") {
    CHECK(ad::Shape{2, 3} == ad::Shape{2, 3});
    CHECK(ad::Shape{2, 3} != ad::Shape{3, 2});
    CHECK(ad::Shape{1, 2, 3} != ad::Shape{2, 3});  // same numel, different rank
    CHECK(ad::Shape{} == ad::Shape{});
    CHECK(ad::Shape{} != ad::Shape{1});
}

TEST_CASE("Shape: rank above 4 throws with the rank in the message") {
    CHECK_THROWS_WITH_AS(ad::Shape({1, 2, 3, 4, 5}), "shape: rank 5 exceeds the maximum rank 4", ad::Error);
    ad::Shape s{1, 2, 3, 4};
    CHECK_THROWS_WITH_AS(s.push_back(5), "shape: rank would exceed the maximum rank 4 in (1,2,3,4)", ad::Error);
    CHECK(s == ad::Shape{1, 2, 3, 4});  // unchanged by the failed push_back
}

TEST_CASE("Shape: a negative dimension throws naming the dimension") {
    CHECK_THROWS_WITH_AS(ad::Shape({2, -1}), "shape: negative dimension -1 after (2)", ad::Error);
    CHECK_THROWS_WITH_AS(ad::Shape({-3}), "shape: negative dimension -3 after ()", ad::Error);
}

TEST_CASE("broadcast_shapes: numpy rules, aligned from the right") {
    CHECK(ad::broadcast_shapes("add", {8, 1, 5}, "a", {3, 1}, "b") == ad::Shape{8, 3, 5});
    CHECK(ad::broadcast_shapes("add", {2, 8, 128, 128}, "scores", {128, 128}, "bias") == ad::Shape{2, 8, 128, 128});
    CHECK(ad::broadcast_shapes("add", {1, 8, 1, 128}, "a", {2, 1, 16, 1}, "b") == ad::Shape{2, 8, 16, 128});
    CHECK(ad::broadcast_shapes("add", {}, "a", {3, 4}, "b") == ad::Shape{3, 4});
    CHECK(ad::broadcast_shapes("add", {}, "a", {}, "b") == ad::Shape{});
    CHECK(ad::broadcast_shapes("add", {3, 0}, "a", {1, 1}, "b") == ad::Shape{3, 0});
}

TEST_CASE("broadcast_shapes: incompatible shapes throw naming op, arguments and shapes") {
    CHECK_THROWS_WITH_AS(ad::broadcast_shapes("add", {2, 3}, "lhs", {4, 3}, "rhs"),
                         "add: cannot broadcast lhs (2,3) with rhs (4,3)", ad::Error);
    CHECK_THROWS_WITH_AS(ad::broadcast_shapes("attention", {2, 8, 16, 16}, "scores", {3, 16, 16}, "bias"),
                         "attention: cannot broadcast scores (2,8,16,16) with bias (3,16,16)", ad::Error);
}

TEST_CASE("broadcasts_to: true exactly when every dimension is 1 or equal and the rank is not larger") {
    const ad::Shape full{2, 8, 16, 32};
    CHECK(ad::broadcasts_to({16, 32}, full));
    CHECK(ad::broadcasts_to({8, 16, 32}, full));
    CHECK(ad::broadcasts_to({2, 1, 16, 32}, full));
    CHECK(ad::broadcasts_to({1, 8, 1, 32}, full));
    CHECK(ad::broadcasts_to({32}, full));
    CHECK(ad::broadcasts_to({}, full));
    CHECK(ad::broadcasts_to(full, full));
    CHECK_FALSE(ad::broadcasts_to({3, 16, 32}, full));
    CHECK_FALSE(ad::broadcasts_to({16}, full));
    // Broadcasting only goes one way: (2,8,16,32) does not broadcast to (1,8,16,32).
    CHECK_FALSE(ad::broadcasts_to(full, {1, 8, 16, 32}));
    // A higher rank never broadcasts to a lower one, even with leading ones.
    CHECK_FALSE(ad::broadcasts_to({1, 1, 16, 32}, {16, 32}));
}

TEST_CASE("check_rank: passes inside the range, throws outside with op, argument and shape") {
    CHECK_NOTHROW(ad::check_rank("matmul", "lhs", {3, 4}, 2, 4));
    CHECK_NOTHROW(ad::check_rank("matmul", "lhs", {2, 3, 4, 5}, 2, 4));
    CHECK_THROWS_WITH_AS(ad::check_rank("matmul", "lhs", {5}, 2, 4), "matmul: lhs must have rank 2..4, got (5)",
                         ad::Error);
    CHECK_THROWS_WITH_AS(ad::check_rank("linear", "weight", {2, 3, 4}, 2, 2),
                         "linear: weight must have rank 2, got (2,3,4)", ad::Error);
}

// ---- Tensor factories ----------------------------------------------------------------------------

TEST_CASE("Tensor: a default-constructed tensor is undefined and empty") {
    const ad::Tensor<double> t;
    CHECK_FALSE(t.defined());
    CHECK(t.numel() == 0);
    CHECK(t.data() == nullptr);
}

TEST_CASE("zeros, ones, full: every element has the value and the tensor has the shape") {
    const ad::Shape s{2, 3, 4};
    SUBCASE("zeros") {
        const auto t = ad::zeros<double>(s);
        CHECK(t.shape() == s);
        CHECK(t.numel() == 24);
        for (double v : t.to_vector()) CHECK(v == 0.0);
    }
    SUBCASE("ones") {
        const auto t = ad::ones<float>(s);
        CHECK(t.shape() == s);
        for (float v : t.to_vector()) CHECK(v == 1.0f);
    }
    SUBCASE("full") {
        const auto t = ad::full<double>(s, -2.5);
        CHECK(t.shape() == s);
        for (double v : t.to_vector()) CHECK(v == -2.5);
    }
}

TEST_CASE("zeros: a shape with a zero dimension gives a defined tensor with no elements") {
    const auto t = ad::zeros<double>({0, 3});
    CHECK(t.defined());
    CHECK(t.numel() == 0);
    CHECK(t.shape() == ad::Shape{0, 3});
}

TEST_CASE("from_vector: values are laid out row-major") {
    const auto t = ad::from_vector<double>({2, 3}, {0, 1, 2, 3, 4, 5});
    CHECK(t(0, 0) == 0.0);
    CHECK(t(0, 2) == 2.0);
    CHECK(t(1, 0) == 3.0);
    CHECK(t(1, 2) == 5.0);
    CHECK(t.to_vector() == std::vector<double>{0, 1, 2, 3, 4, 5});
}

TEST_CASE("from_vector: a wrong element count throws naming both counts and the shape") {
    CHECK_THROWS_WITH_AS(ad::from_vector<double>({2, 3}, {1, 2, 3, 4, 5}),
                         "from_vector: values has 5 elements but shape (2,3) needs 6", ad::Error);
}

TEST_CASE("randn: the same seed gives bitwise the same values, another seed other values") {
    const auto a = ad::randn<double>({4, 1000}, 7);
    const auto b = ad::randn<double>({4, 1000}, 7);
    const auto c = ad::randn<double>({4, 1000}, 8);
    CHECK(bitwise_equal(a, b));
    // Two independent normal samples coincide with probability 0; require every element to differ.
    std::int64_t equal = 0;
    for (std::int64_t i = 0; i < a.numel(); ++i) equal += a.data()[i] == c.data()[i];
    CHECK(equal == 0);
}

TEST_CASE("randn: element i depends only on (seed, i), not on the shape") {
    const auto small = ad::randn<double>({10}, 3);
    const auto large = ad::randn<double>({5, 20}, 3);
    for (std::int64_t i = 0; i < 10; ++i) CHECK(small.data()[i] == large.data()[i]);
}

TEST_CASE("randn: 100k samples have mean ~0 and variance ~1") {
    constexpr std::int64_t n = 100000;
    const auto t = ad::randn<double>({n}, 42);
    double sum = 0, sum_sq = 0;
    std::int64_t non_finite = 0;
    for (double v : t.to_vector()) {
        non_finite += !std::isfinite(v);
        sum += v;
    }
    CHECK(non_finite == 0);
    const double mean = sum / n;
    for (double v : t.to_vector()) sum_sq += (v - mean) * (v - mean);
    const double var = sum_sq / (n - 1);
    // Standard errors for N(0,1): mean 1/sqrt(n) = 3.2e-3, sample variance sqrt(2/(n-1)) = 4.5e-3.
    // Five standard errors: a correct generator fails with probability < 1e-6.
    CHECK(std::abs(mean) < 5 * std::sqrt(1.0 / n));
    CHECK(std::abs(var - 1.0) < 5 * std::sqrt(2.0 / (n - 1)));
}

TEST_CASE("uniform: samples lie in [lo, hi) and fill the range evenly") {
    constexpr std::int64_t n = 100000;
    const double lo = -3.0, hi = 5.0;
    const auto t = ad::uniform<double>({n}, lo, hi, 11);
    const auto v = t.to_vector();
    const auto [mn, mx] = std::minmax_element(v.begin(), v.end());
    CHECK(*mn >= lo);
    CHECK(*mx < hi);
    // With n samples, the gap between the extreme sample and the bound exceeds 1e-3 of the range
    // with probability (1 - 1e-3)^n = e^-100.
    CHECK(*mn < lo + 1e-3 * (hi - lo));
    CHECK(*mx > hi - 1e-3 * (hi - lo));
    double sum = 0;
    for (double x : v) sum += x;
    // Mean of U(lo, hi) is 1, standard deviation (hi - lo)/sqrt(12) = 2.31; five standard errors.
    CHECK(std::abs(sum / n - 1.0) < 5 * (hi - lo) / std::sqrt(12.0 * n));
}

TEST_CASE("uniform<float>: never returns hi, even when all 24 random bits are ones") {
    // At seed 2, element 1252943 draws u = 1 - 2^-24; 1 + u = 2 - 2^-24 rounds to 2 in float.
    // Found by scanning the generator; the range [lo, hi) must hold for every draw.
    constexpr std::int64_t n = 1252944;
    const auto t = ad::uniform<float>({n}, 1.0f, 2.0f, 2);
    const float* p = t.data();
    std::int64_t out_of_range = 0;
    for (std::int64_t i = 0; i < n; ++i) out_of_range += !(p[i] >= 1.0f && p[i] < 2.0f);
    CHECK(out_of_range == 0);
    CHECK(p[n - 1] < 2.0f);
}

TEST_CASE("uniform: the same seed gives the same values; element i depends only on (seed, i)") {
    const auto a = ad::uniform<double>({100}, 0.0, 1.0, 5);
    const auto b = ad::uniform<double>({10, 10}, 0.0, 1.0, 5);
    CHECK(a.to_vector() == b.to_vector());
    const auto c = ad::uniform<double>({100}, 0.0, 1.0, 6);
    CHECK(a.to_vector() != c.to_vector());
}

TEST_CASE("uniform: lo >= hi or a non-finite bound throws with both bounds in the message") {
    CHECK_THROWS_WITH_AS(ad::uniform<double>({3}, 1.0, 1.0), "uniform: need finite lo < hi, got lo = 1 and hi = 1",
                         ad::Error);
    CHECK_THROWS_WITH_AS(ad::uniform<double>({3}, 2.0, 1.0), "uniform: need finite lo < hi, got lo = 2 and hi = 1",
                         ad::Error);
    CHECK_THROWS_AS(ad::uniform<double>({3}, std::nan(""), 1.0), ad::Error);
    CHECK_THROWS_AS(ad::uniform<float>({3}, 0.0f, std::numeric_limits<float>::infinity()), ad::Error);
}

// ---- Tensor handles -------------------------------------------------------------------------------

TEST_CASE("Tensor: a copy shares storage, so writes through one handle are seen by the other") {
    auto a = ad::zeros<double>({2, 3});
    CHECK(a.is_unique());
    {
        ad::Tensor<double> b = a;
        CHECK(b.shares_storage_with(a));
        CHECK(a.shares_storage_with(b));
        CHECK_FALSE(a.is_unique());
        b(1, 2) = 7.0;
        CHECK(a(1, 2) == 7.0);
    }
    CHECK(a.is_unique());
}

TEST_CASE("Tensor: a moved-from handle is undefined and the target owns the storage") {
    auto a = ad::full<double>({4}, 3.0);
    const double* p = a.data();
    ad::Tensor<double> b = std::move(a);
    CHECK(b.data() == p);
    CHECK(b.is_unique());
    CHECK_FALSE(a.defined());  // NOLINT(bugprone-use-after-move): the moved-from state is specified
}

TEST_CASE("Tensor: clone copies the values into new storage") {
    auto a = ad::from_vector<double>({2, 2}, {1, 2, 3, 4});
    auto c = a.clone();
    CHECK_FALSE(c.shares_storage_with(a));
    CHECK(c.shape() == a.shape());
    CHECK(c.to_vector() == a.to_vector());
    c(0, 0) = 100.0;
    CHECK(a(0, 0) == 1.0);
}

TEST_CASE("Tensor: shares_storage_with is false for two undefined tensors") {
    const ad::Tensor<double> a, b;
    CHECK_FALSE(a.shares_storage_with(b));
}

TEST_CASE("reshaped: the same storage seen with another shape of equal element count") {
    auto a = ad::from_vector<double>({2, 3}, {0, 1, 2, 3, 4, 5});
    auto r = a.reshaped({3, 2});
    CHECK(r.shape() == ad::Shape{3, 2});
    CHECK(a.shape() == ad::Shape{2, 3});
    CHECK(r.shares_storage_with(a));
    CHECK(r(2, 1) == 5.0);
    CHECK(r(1, 0) == 2.0);
    r(0, 1) = -1.0;
    CHECK(a(0, 1) == -1.0);
}

TEST_CASE("reshaped: a different element count throws naming both shapes") {
    const auto a = ad::zeros<double>({2, 3});
    CHECK_THROWS_WITH_AS((void)a.reshaped({4, 2}), "reshape: cannot view (2,3) as (4,2): element counts differ",
                         ad::Error);
}

// ---- element access ------------------------------------------------------------------------------

TEST_CASE("at: checked access reads and writes the row-major element") {
    auto t = ad::from_vector<double>({2, 3, 4}, std::vector<double>(24));
    for (std::int64_t i = 0; i < 24; ++i) t.data()[i] = static_cast<double>(i);
    CHECK(t.at(1, 2, 3) == 23.0);
    CHECK(t.at(1, 0, 2) == 14.0);
    t.at(0, 1, 1) = -5.0;
    CHECK(t.data()[5] == -5.0);
}

TEST_CASE("at: an out-of-range index throws naming the index and the shape") {
    auto t = ad::zeros<double>({2, 3});
    CHECK_THROWS_WITH_AS((void)t.at(1, 3), "at: index (1,3) out of range for shape (2,3)", ad::Error);
    CHECK_THROWS_WITH_AS((void)t.at(2, 0), "at: index (2,0) out of range for shape (2,3)", ad::Error);
    CHECK_THROWS_WITH_AS((void)t.at(-1, 0), "at: index (-1,0) out of range for shape (2,3)", ad::Error);
}

TEST_CASE("at: the wrong number of indices throws") {
    const auto t = ad::zeros<double>({2, 3});
    CHECK_THROWS_WITH_AS((void)t.at(1), "at: index (1) out of range for shape (2,3)", ad::Error);
    CHECK_THROWS_WITH_AS((void)t.at(0, 0, 0), "at: index (0,0,0) out of range for shape (2,3)", ad::Error);
}

TEST_CASE("at: access on an undefined tensor throws instead of dereferencing null") {
    const ad::Tensor<double> t;
    CHECK_THROWS_AS((void)t.at(), ad::Error);
}

TEST_CASE("item: returns the single value of a one-element tensor of any rank") {
    CHECK(ad::full<double>({}, 4.5).item() == 4.5);
    CHECK(ad::full<double>({1, 1, 1}, -2.0).item() == -2.0);
}

TEST_CASE("item: a tensor with more than one element throws naming its shape") {
    CHECK_THROWS_WITH_AS((void)ad::zeros<double>({2}).item(), "item: tensor must have exactly one element, got (2)",
                         ad::Error);
    CHECK_THROWS_WITH_AS((void)ad::Tensor<double>().item(), "item: tensor must have exactly one element, got ()",
                         ad::Error);
}

TEST_CASE("matrix(b): the b-th slice of the last two dimensions, as a writable view") {
    auto t = ad::zeros<double>({2, 3, 4, 5});
    for (std::int64_t i = 0; i < t.numel(); ++i) t.data()[i] = static_cast<double>(i);
    // Slice b = 4 is (i0, i1) = (1, 1) of the (2,3) batch.
    auto m = t.matrix(4);
    CHECK(m.rows() == 4);
    CHECK(m.cols() == 5);
    for (std::int64_t r = 0; r < 4; ++r)
        for (std::int64_t c = 0; c < 5; ++c) CHECK(m(r, c) == t(1, 1, r, c));
    m(2, 3) = -1.0;
    CHECK(t(1, 1, 2, 3) == -1.0);
}

TEST_CASE("matrix: a rank-1 tensor is one row, a scalar is 1x1") {
    auto v = ad::from_vector<double>({3}, {1, 2, 3});
    CHECK(v.matrix().rows() == 1);
    CHECK(v.matrix().cols() == 3);
    CHECK(v.matrix()(0, 2) == 3.0);
    auto s = ad::full<double>({}, 9.0);
    CHECK(s.matrix().rows() == 1);
    CHECK(s.matrix().cols() == 1);
    CHECK(s.matrix()(0, 0) == 9.0);
}

TEST_CASE("max_abs_diff: the largest absolute elementwise difference; shapes must match") {
    const auto a = ad::from_vector<double>({3}, {1, 2, 3});
    const auto b = ad::from_vector<double>({3}, {1, 2.5, 1});
    CHECK(ad::max_abs_diff(a, b) == 2.0);
    CHECK(ad::max_abs_diff(a, a) == 0.0);
    CHECK_THROWS_WITH_AS((void)ad::max_abs_diff(a, ad::zeros<double>({1, 3})),
                         "max_abs_diff: shapes differ: a (3) vs b (1,3)", ad::Error);
}

// ---- printing ------------------------------------------------------------------------------------

TEST_CASE("to_string: shows the shape, then the nested values") {
    const auto t = ad::from_vector<double>({2, 3}, {1, 2, 3, 4, 5, 6.5});
    CHECK(ad::to_string(t) == "Tensor(2,3) [[1, 2, 3],\n [4, 5, 6.5]]");
    CHECK(fmt::format("{}", t) == ad::to_string(t));
}

TEST_CASE("to_string: contains the shape for every rank") {
    CHECK(ad::to_string(ad::zeros<double>({2, 8, 3, 4})).find("(2,8,3,4)") != std::string::npos);
    CHECK(ad::to_string(ad::zeros<float>({5})).find("(5)") != std::string::npos);
    CHECK(ad::to_string(ad::full<double>({}, 1.5)) == "Tensor() 1.5");
}

TEST_CASE("to_string: rank 4 nests one bracket per dimension, each level indented one more space") {
    auto t = ad::zeros<double>({2, 1, 2, 2});
    for (std::int64_t i = 0; i < 8; ++i) t.data()[i] = static_cast<double>(i);
    CHECK(ad::to_string(t) == "Tensor(2,1,2,2) [[[[0, 1],\n   [2, 3]]],\n [[[4, 5],\n   [6, 7]]]]");
}

TEST_CASE("to_string: a dimension of size 0 prints empty brackets at its level") {
    CHECK(ad::to_string(ad::zeros<double>({0, 3})) == "Tensor(0,3) []");
    CHECK(ad::to_string(ad::zeros<float>({2, 0})) == "Tensor(2,0) [[],\n []]");
}

TEST_CASE("to_string: elision applies per dimension, with offsets into the kept rows") {
    auto t = ad::zeros<double>({5, 2});
    for (std::int64_t i = 0; i < 10; ++i) t.data()[i] = static_cast<double>(i);
    CHECK(ad::to_string(t, 2) == "Tensor(5,2) [[0, 1],\n ..., [8, 9]]");
}

TEST_CASE("to_string: long dimensions are elided in the middle") {
    auto t = ad::zeros<double>({10});
    for (std::int64_t i = 0; i < 10; ++i) t.data()[i] = static_cast<double>(i);
    CHECK(ad::to_string(t) == "Tensor(10) [0, 1, 2, ..., 7, 8, 9]");
    CHECK(ad::to_string(t, 4) == "Tensor(10) [0, 1, ..., 8, 9]");
}

TEST_CASE("to_string: an undefined tensor says so") {
    CHECK(ad::to_string(ad::Tensor<double>()) == "Tensor(undefined)");
}

// ---- bool tensors (masks) ------------------------------------------------------------------------

TEST_CASE("Tensor<bool>: masks are created, indexed and printed as 0/1") {
    auto m = ad::full<bool>({2, 3}, true);
    m.at(1, 0) = false;
    CHECK(m.at(0, 0));
    CHECK_FALSE(m.at(1, 0));
    CHECK(m(1, 2));
    CHECK(ad::to_string(m) == "Tensor(2,3) [[1, 1, 1],\n [0, 1, 1]]");
    const auto v = ad::from_vector<bool>({3}, {true, false, true});
    CHECK(v.to_vector() == std::vector<bool>{true, false, true});
    CHECK(v.reshaped({1, 3}).shares_storage_with(v));
}

// ---- the storage pool ----------------------------------------------------------------------------
// Pool statistics are process-global: every check compares deltas taken around its own allocations.

TEST_CASE("pool::size_class: at least the request, a multiple of 64, at most 25 % above 512 bytes") {
    std::vector<std::size_t> sizes;
    for (std::size_t b = 0; b <= 4096; ++b) sizes.push_back(b);
    for (std::size_t p = 12; p <= 40; ++p)
        for (std::size_t d : {std::size_t{0}, std::size_t{1}}) {
            const std::size_t base = std::size_t{1} << p;
            sizes.push_back(base - d);
            sizes.push_back(base + d);
            sizes.push_back(base + base / 4 + d);
            sizes.push_back(base + base / 3);
        }
    std::size_t previous = 0;
    std::sort(sizes.begin(), sizes.end());
    for (std::size_t b : sizes) {
        const std::size_t c = ad::pool::size_class(b);
        CAPTURE(b);
        CAPTURE(c);
        CHECK(c >= b);
        CHECK(c % 64 == 0);
        CHECK(c >= 64);
        if (b > 512) CHECK(4 * c <= 5 * b);  // slack c - b at most b/4
        CHECK(c >= previous);                 // monotone: a larger request never gets a smaller block
        CHECK(ad::pool::size_class(c) == c);  // a block's capacity is its own class (reusable as such)
        previous = c;
    }
}

TEST_CASE("pool::size_class: small requests round up to 64 bytes, powers of two are exact") {
    CHECK(ad::pool::size_class(0) == 64);
    CHECK(ad::pool::size_class(1) == 64);
    CHECK(ad::pool::size_class(65) == 128);
    CHECK(ad::pool::size_class(512) == 512);
    CHECK(ad::pool::size_class(513) == 640);
    CHECK(ad::pool::size_class(std::size_t{1} << 20) == std::size_t{1} << 20);
}

TEST_CASE("pool: tensor storage is 64-byte aligned") {
    for (std::int64_t n : {1, 3, 17, 1000, 123457}) {
        const ad::Tensor<float> t({n});
        CHECK(reinterpret_cast<std::uintptr_t>(t.data()) % 64 == 0);
    }
}

TEST_CASE("pool: a freed 1 MiB block is reused by the next request of the same size class") {
    constexpr std::int64_t n = (1 << 20) / sizeof(double);
    { const ad::Tensor<double> warm({n}); }  // make sure one block of this class is cached
    const auto before = ad::pool::stats();
    {
        const ad::Tensor<double> t({n});
    }
    const auto after_first = ad::pool::stats();
    CHECK(after_first.requests == before.requests + 1);
    CHECK(after_first.reused == before.reused + 1);
    CHECK(after_first.system_allocs == before.system_allocs);
    // A slightly smaller request falls in the same size class and reuses the block too.
    { const ad::Tensor<double> t({n - 1}); }
    const auto after_second = ad::pool::stats();
    CHECK(after_second.reused == after_first.reused + 1);
    CHECK(after_second.system_allocs == after_first.system_allocs);
}

TEST_CASE("pool: copying a tensor never allocates") {
    const auto t = ad::zeros<double>({1000});
    const auto before = ad::pool::stats();
    {
        ad::Tensor<double> a = t;
        ad::Tensor<double> b = a.reshaped({10, 100});
        ad::Tensor<double> c = std::move(a);
        CHECK(b.shares_storage_with(c));
    }
    const auto after = ad::pool::stats();
    CHECK(after.requests == before.requests);
    CHECK(after.bytes_in_use == before.bytes_in_use);
}

TEST_CASE("pool: bytes_in_use counts live blocks by size class and goes back down when they are freed") {
    constexpr std::int64_t n = 300000;  // 2.4 MB of doubles: size class 2.5 MiB
    const std::size_t cls = ad::pool::size_class(n * sizeof(double));
    const auto before = ad::pool::stats();
    {
        const ad::Tensor<double> t({n});
        CHECK(ad::pool::stats().bytes_in_use == before.bytes_in_use + cls);
    }
    const auto after = ad::pool::stats();
    CHECK(after.bytes_in_use == before.bytes_in_use);
    CHECK(after.bytes_cached >= cls);
}

TEST_CASE("pool: release_cached returns every cached block, and the next request allocates afresh") {
    constexpr std::int64_t n = 123456;
    { const ad::Tensor<double> t({n}); }
    CHECK(ad::pool::stats().bytes_cached > 0);
    const auto in_use = ad::pool::stats().bytes_in_use;
    ad::pool::release_cached();
    CHECK(ad::pool::stats().bytes_cached == 0);
    CHECK(ad::pool::stats().bytes_in_use == in_use);  // live tensors are untouched
    const auto before = ad::pool::stats();
    { const ad::Tensor<double> t({n}); }
    const auto after = ad::pool::stats();
    CHECK(after.system_allocs == before.system_allocs + 1);
    CHECK(after.reused == before.reused);
}

TEST_CASE("pool: peak_bytes_in_use records the high-water mark; reset_stats restarts it from bytes_in_use") {
    ad::pool::reset_stats();
    const auto start = ad::pool::stats();
    CHECK(start.peak_bytes_in_use == start.bytes_in_use);
    CHECK(start.requests == 0);
    CHECK(start.reused == 0);
    CHECK(start.system_allocs == 0);
    constexpr std::int64_t n = 1 << 17;
    const std::size_t cls = ad::pool::size_class(n * sizeof(double));
    {
        const ad::Tensor<double> a({n});
        const ad::Tensor<double> b({n});
        CHECK(ad::pool::stats().peak_bytes_in_use == start.bytes_in_use + 2 * cls);
    }
    const auto after = ad::pool::stats();
    CHECK(after.bytes_in_use == start.bytes_in_use);
    CHECK(after.peak_bytes_in_use == start.bytes_in_use + 2 * cls);
    ad::pool::reset_stats();
    CHECK(ad::pool::stats().peak_bytes_in_use == start.bytes_in_use);
}

TEST_CASE("pool: with a cache limit of 0 freed blocks go back to the system") {
    ad::pool::release_cached();
    ad::pool::set_cache_limit(0);
    { const ad::Tensor<double> t({5000}); }
    const auto s = ad::pool::stats();
    ad::pool::set_cache_limit(std::numeric_limits<std::size_t>::max());  // the default: no limit
    CHECK(s.bytes_cached == 0);
}

// Regressions for the bugs the libFuzzer targets of tests/fuzz found (issue 10): one case per bug,
// named after what used to go wrong.
#include <doctest/doctest.h>

#include <autodiff/autodiff.hpp>

namespace ad = autodiff;

TEST_CASE("to_string with max_per_dim 0 or 1 elides without reading past the end (it read element n)") {
    const ad::Tensor<float> t = ad::from_vector<float>({3}, {1, 2, 3});
    CHECK(ad::to_string(t, 0) == "Tensor(3) [...]");
    CHECK(ad::to_string(t, 1) == "Tensor(3) [...]");
    CHECK(ad::to_string(t, 2) == "Tensor(3) [1, ..., 3]");
    CHECK(ad::to_string(ad::from_vector<float>({1}, {7}), 1) == "Tensor(1) [7]");
    const ad::Tensor<double> m = ad::zeros<double>({2, 3});
    CHECK(ad::to_string(m, 0) == "Tensor(2,3) [...]");
}

TEST_CASE("inverse_permutation refuses what is not a permutation (an entry out of range wrote past its array)") {
    CHECK_THROWS_WITH_AS((void)ad::inverse_permutation({-1, 0, 0, 0}, 2), "inverse_permutation: (-1,0) is not a permutation of the 2 dimensions of (1,1)",
                         ad::Error);
    CHECK_THROWS_WITH_AS((void)ad::inverse_permutation({0, 0, 1, 2}, 3), "inverse_permutation: (0,0,1) is not a permutation of the 3 dimensions of (1,1,1)",
                         ad::Error);
    CHECK_THROWS_WITH_AS((void)ad::inverse_permutation({0, 1, 2, 3}, 5), "inverse_permutation: rank must be in [0, 4], got 5", ad::Error);
    CHECK(ad::inverse_permutation({2, 0, 1, 3}, 3) == ad::Permutation{1, 2, 0, 3});
}

TEST_CASE("linear with zero input features gives the bias (it divided by the zero feature count)") {
    const ad::Tensor<double> x = ad::zeros<double>({3, 0}), W = ad::zeros<double>({2, 0});
    const ad::Tensor<double> b = ad::from_vector<double>({2}, {1.5, -2.0});
    const ad::Tensor<double> y = ad::linear_forward(x, W, b);
    REQUIRE(y.shape() == ad::Shape({3, 2}));
    for (std::int64_t i = 0; i < 3; ++i) {
        CHECK(y(i, 0) == 1.5);
        CHECK(y(i, 1) == -2.0);
    }
    ad::Param<double> px(x), pW(W), pb(b);
    ad::Var<double> loss = ad::sum(ad::linear(px, pW, pb));
    loss.backward();
    CHECK(px.grad().shape() == ad::Shape({3, 0}));
    CHECK(pW.grad().shape() == ad::Shape({2, 0}));
    CHECK(ad::max_abs_diff(pb.grad(), ad::full<double>({2}, 3.0)) == 0.0);
}

#include <doctest/doctest.h>

#include <autodiff/autodiff.hpp>

namespace ad = autodiff;

TEST_CASE("biased attention: gradcheck of Q, K, V and a full bias in double") {
    ad::Param<double> Q(ad::randn<double>({2, 4, 8, 16}, 1), "Q"), K(ad::randn<double>({2, 4, 8, 16}, 2), "K"),
        V(ad::randn<double>({2, 4, 8, 16}, 3), "V"), B(ad::randn<double>({2, 4, 8, 8}, 4), "B");
    auto report = ad::gradcheck(
        [&] { return ad::matmul(ad::softmax(ad::matmul(Q, ad::transpose(K)) * 0.25 + B), V); }, {Q, K, V, B});
    INFO(report.str());
    CHECK(report.passed);
    CHECK(report.max_rel_error() < 1e-6);
}

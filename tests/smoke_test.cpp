#include <doctest/doctest.h>

#include <autodiff/autodiff.hpp>

namespace ad = autodiff;

TEST_CASE("smoke: biased attention builds, evaluates and differentiates") {
    ad::Param<double> Q(ad::randn<double>({2, 4, 8, 16}, 1)), K(ad::randn<double>({2, 4, 8, 16}, 2)),
        V(ad::randn<double>({2, 4, 8, 16}, 3)), B(ad::randn<double>({2, 4, 8, 8}, 4));
    ad::Var<double> O = ad::matmul(ad::softmax(ad::matmul(Q, ad::transpose(K)) * 0.25 + B), V);
    ad::Var<double> loss = ad::sum(O * O);
    loss.backward();
    CHECK(Q.grad().shape() == ad::Shape{2, 4, 8, 16});
    auto report = ad::gradcheck([&] { return ad::sum(ad::matmul(ad::softmax(ad::matmul(Q, ad::transpose(K)) * 0.25 + B), V)); },
                                {Q, K, V, B});
    MESSAGE(report.str());
    CHECK(report.passed);
}

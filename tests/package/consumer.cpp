// A user's program: builds against the installed (or embedded) library and differentiates attention.
#include <cstdio>

#include <autodiff/autodiff.hpp>

namespace ad = autodiff;

int main() {
    ad::Param<double> Q(ad::randn<double>({1, 2, 4, 8}, 1)), K(ad::randn<double>({1, 2, 4, 8}, 2)),
        V(ad::randn<double>({1, 2, 4, 8}, 3)), B(ad::zeros<double>({4, 4}));
    const auto report = ad::gradcheck([&] { return ad::matmul(ad::softmax(ad::matmul(Q, ad::transpose(K)) + B), V); }, {Q, K, V, B});
    std::printf("%s", report.str().c_str());
    return report.passed ? 0 : 1;
}

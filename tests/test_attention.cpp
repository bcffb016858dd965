// Attention as a user writes it: the blog post's biased attention (seeds/000), checked against the
// post's hand-derived gradient formulas, and attention compositions checked by gradcheck.
#include <doctest/doctest.h>

#include <cmath>

#include <autodiff/autodiff.hpp>

namespace ad = autodiff;

namespace {

// The post's compute_gradients, written per (batch, head) slice with Eigen:
//   S = QKᵀ/√d + B, A = softmax(S), O = AV
//   dA = dO·Vᵀ, dV = Aᵀ·dO, dS = dA⊙A − rowsum(A⊙dA)⊙A, dB = dS, dQ = dS·K/√d, dK = dSᵀ·Q/√d
struct BlogGradients {
    ad::Tensor<double> O, dQ, dK, dV, dB;
};

BlogGradients blog_formulas(const ad::Tensor<double>& Q, const ad::Tensor<double>& K, const ad::Tensor<double>& V,
                            const ad::Tensor<double>& B, const ad::Tensor<double>& dO) {
    const auto d = static_cast<double>(Q.dim(3));
    BlogGradients g{ad::empty<double>(Q.shape()), ad::empty<double>(Q.shape()), ad::empty<double>(K.shape()),
                    ad::empty<double>(V.shape()), ad::empty<double>(B.shape())};
    for (std::int64_t s = 0; s < Q.shape().batch_count(); ++s) {
        const ad::RowMatrix<double> S = Q.matrix(s) * K.matrix(s).transpose() / std::sqrt(d) + B.matrix(s);
        ad::RowMatrix<double> A = (S.colwise() - S.rowwise().maxCoeff()).array().exp();
        A.array().colwise() /= A.rowwise().sum().array();
        g.O.matrix(s) = A * V.matrix(s);
        const ad::RowMatrix<double> dA = dO.matrix(s) * V.matrix(s).transpose();
        g.dV.matrix(s) = A.transpose() * dO.matrix(s);
        const Eigen::VectorXd rowdot = (A.array() * dA.array()).rowwise().sum();
        const ad::RowMatrix<double> dS = dA.cwiseProduct(A) - (A.array().colwise() * rowdot.array()).matrix();
        g.dB.matrix(s) = dS;
        g.dQ.matrix(s) = dS * K.matrix(s) / std::sqrt(d);
        g.dK.matrix(s) = dS.transpose() * Q.matrix(s) / std::sqrt(d);
    }
    return g;
}

}  // namespace

TEST_CASE("blog case (n=2, h=4, l=8, d=16): engine gradients equal the post's formulas to 1e-10") {
    const std::int64_t n = 2, h = 4, l = 8, d = 16;
    ad::Param<double> Q(ad::randn<double>({n, h, l, d}, 1)), K(ad::randn<double>({n, h, l, d}, 2)),
        V(ad::randn<double>({n, h, l, d}, 3)), B(ad::randn<double>({n, h, l, l}, 4));
    const ad::Tensor<double> dO = ad::randn<double>({n, h, l, d}, 5);

    ad::Var<double> O = ad::matmul(ad::softmax(ad::matmul(Q, ad::transpose(K)) / std::sqrt(double(d)) + B), V);
    O.backward(dO);

    const BlogGradients ref = blog_formulas(Q.value(), K.value(), V.value(), B.value(), dO);
    // Both sides do the same O(1)-valued arithmetic in double in a different order: 1e-10 leaves
    // three orders of magnitude above the rounding differences (~1e-14) and catches any wrong term.
    CHECK(ad::max_abs_diff(O.value(), ref.O) < 1e-10);
    CHECK(ad::max_abs_diff(Q.grad(), ref.dQ) < 1e-10);
    CHECK(ad::max_abs_diff(K.grad(), ref.dK) < 1e-10);
    CHECK(ad::max_abs_diff(V.grad(), ref.dV) < 1e-10);
    CHECK(ad::max_abs_diff(B.grad(), ref.dB) < 1e-10);
    // dB = dS exactly as in the post: the bias gradient has the bias's own (n,h,l,l) shape.
    CHECK(B.grad().shape() == ad::Shape{n, h, l, l});
}

TEST_CASE("biased attention: every row of the bias gradient sums to zero (softmax is shift invariant)") {
    // Softmax is shift invariant, so every row of dS (= dB) sums to zero: a property of the post's
    // dS = dA⊙A − rowsum(A⊙dA)⊙A that the engine's gradient must share.
    ad::Param<double> Q(ad::randn<double>({2, 4, 8, 16}, 11)), K(ad::randn<double>({2, 4, 8, 16}, 12)),
        V(ad::randn<double>({2, 4, 8, 16}, 13)), B(ad::randn<double>({2, 4, 8, 8}, 14));
    ad::Var<double> O = ad::matmul(ad::softmax(ad::matmul(Q, ad::transpose(K)) * 0.25 + B), V);
    O.backward(ad::randn<double>({2, 4, 8, 16}, 15));
    const auto rows = B.grad().reshaped({64, 8});
    CHECK(rows.matrix().rowwise().sum().cwiseAbs().maxCoeff() < 1e-14);
}

TEST_CASE("biased attention: gradcheck of Q, K, V and a full bias in double") {
    ad::Param<double> Q(ad::randn<double>({2, 4, 8, 16}, 1), "Q"), K(ad::randn<double>({2, 4, 8, 16}, 2), "K"),
        V(ad::randn<double>({2, 4, 8, 16}, 3), "V"), B(ad::randn<double>({2, 4, 8, 8}, 4), "B");
    auto report = ad::gradcheck(
        [&] { return ad::matmul(ad::softmax(ad::matmul(Q, ad::transpose(K)) * 0.25 + B), V); }, {Q, K, V, B});
    INFO(report.str());
    CHECK(report.passed);
    CHECK(report.max_rel_error() < 1e-6);
}

TEST_CASE("attention with a broadcast bias, causal mask and dropout: gradcheck in double") {
    ad::Param<double> Q(ad::randn<double>({2, 3, 5, 4}, 21), "Q"), K(ad::randn<double>({2, 3, 7, 4}, 22), "K"),
        V(ad::randn<double>({2, 3, 7, 4}, 23), "V"), B(ad::randn<double>({3, 5, 7}, 24), "B");
    const ad::DropoutDescriptor drop{0.25, 7, 3};
    auto report = ad::gradcheck(
        [&] { return ad::matmul(ad::dropout(ad::softmax(ad::add_bias(ad::matmul(Q, ad::transpose(K)) * 0.5, B), ad::causal), drop), V); },
        {Q, K, V, B});
    INFO(report.str());
    CHECK(report.passed);
    CHECK(report.max_rel_error() < 1e-6);
}

TEST_CASE("attention with key padding: a query whose keys are all padded outputs 0 and passes no gradient") {
    // Batch 1 keeps no key at all; batch 0 keeps the first three.
    ad::Tensor<bool> keep = ad::from_vector<bool>({2, 4}, {true, true, true, false, false, false, false, false});
    ad::Param<double> Q(ad::randn<double>({2, 2, 3, 4}, 31)), K(ad::randn<double>({2, 2, 4, 4}, 32)),
        V(ad::randn<double>({2, 2, 4, 4}, 33));
    ad::Var<double> O = ad::matmul(ad::softmax(ad::matmul(Q, ad::transpose(K)), ad::key_padding_mask(keep)), V);
    ad::Var<double> loss = ad::sum(O * O);
    loss.backward();
    for (std::int64_t h = 0; h < 2; ++h)
        for (std::int64_t i = 0; i < 3; ++i)
            for (std::int64_t c = 0; c < 4; ++c) {
                CHECK(O.value()(1, h, i, c) == 0.0);
                CHECK(Q.grad()(1, h, i, c) == 0.0);
            }
    // Padded keys of batch 0 get no gradient either.
    for (std::int64_t h = 0; h < 2; ++h)
        for (std::int64_t c = 0; c < 4; ++c) {
            CHECK(K.grad()(0, h, 3, c) == 0.0);
            CHECK(V.grad()(0, h, 3, c) == 0.0);
        }
    CHECK(std::isfinite(Q.grad().array().abs().sum()));
}

#pragma once
// The oracle check shared by the fused-path tests: the same expression through the fused kernels and
// through the generic path (NoFusionGuard), compared on the output and on every Param's gradient.
#include <algorithm>
#include <initializer_list>
#include <optional>
#include <utility>
#include <vector>

#include <autodiff/autodiff.hpp>
#include <doctest/doctest.h>

namespace test {

// Runs f() once fused and once generic (NoFusionGuard) with the same seed gradient, and returns the
// largest difference over the output and every Param's gradient.
template <class T, class F>
double fused_vs_generic(F&& f, std::vector<autodiff::Param<T>> params) {
    auto run = [&](bool fused) {
        for (auto& p : params) p.zero_grad();
        std::optional<autodiff::NoFusionGuard> guard;
        if (!fused) guard.emplace();
        autodiff::Var<T> out = f();
        out.backward(autodiff::randn<T>(out.shape(), 99));
        std::vector<autodiff::Tensor<T>> r{out.value().clone()};
        for (auto& p : params) r.push_back(p.grad().clone());
        return r;
    };
    const auto a = run(true), b = run(false);
    double worst = 0;
    for (std::size_t i = 0; i < a.size(); ++i) {
        const double scale = std::max<double>(1.0, b[i].array().abs().maxCoeff());
        worst = std::max(worst, static_cast<double>(autodiff::max_abs_diff(a[i], b[i])) / scale);
    }
    return worst;
}

// A float copy of a double tensor (for float-vs-double comparisons).
inline autodiff::Tensor<float> to_float(const autodiff::Tensor<double>& t) {
    autodiff::Tensor<float> f(t.shape());
    f.array() = t.array().cast<float>();
    return f;
}

// max |a − ref| / max |ref|: a float result against a double reference.
inline double relative_error(const autodiff::Tensor<float>& a, const autodiff::Tensor<double>& ref) {
    return (a.array().cast<double>() - ref.array()).abs().maxCoeff() / ref.array().abs().maxCoeff();
}

// Float results against their double references, each within relative 1e-5 of the reference's largest
// value (relative_error): a few units of float rounding over sums of ~100 terms.
inline void check_float_close_to_double(
    std::initializer_list<std::pair<const autodiff::Tensor<float>*, const autodiff::Tensor<double>*>> pairs) {
    int i = 0;
    for (const auto& [a, ref] : pairs) {
        CAPTURE(i++);
        CHECK(relative_error(*a, *ref) < 1e-5);
    }
}

}  // namespace test

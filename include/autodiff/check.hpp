#pragma once
// gradcheck: compares the engine's gradients with central differences, in double.
//
// The numeric derivative is the fourth-order central difference
//   f'(x) ≈ (f(x−2h) − 8f(x−h) + 8f(x+h) − f(x+2h)) / 12h,   h = eps = 1e-4:
// truncation error O(h⁴) ≈ 1e-16·f⁽⁵⁾ and rounding error ≈ 1e-16·|f|/h ≈ 1e-12·|f|, so the check
// stays sharp (1e-8 absolute) even when f sums thousands of outputs. A function with a kink (relu,
// abs) must be evaluated at least 2·eps away from it.
//
//   ad::Param<double> x(...), w(...);
//   auto report = ad::gradcheck([&] { return ad::Var<double>(ad::sum(ad::tanh(ad::matmul(x, w)))); }, {x, w});
//   if (!report.passed) fmt::print("{}\n", report.str());
//
// f is called with no arguments, must build its expression from the given Params (and anything
// else, held fixed) and return a Var<double> (or an expression). A non-scalar output is projected
// on a fixed random direction R: the checked function is <f(x), R>.
// The Params' existing gradients are left as they were.

#include <cmath>
#include <string>
#include <vector>

#include "autodiff/expr/variable.hpp"

namespace autodiff {

struct GradcheckOptions {
    double eps = 1e-4;    // central-difference step h
    double atol = 1e-8;   // an element passes when |analytic − numeric| <= atol + rtol·|numeric|
    double rtol = 1e-6;
    std::uint64_t seed = 1234;  // of the projection R for non-scalar outputs
};

struct GradcheckInput {
    std::string name;               // the Param's name, or "input <k>"
    double max_abs_error = 0;       // max |analytic − numeric|
    double max_rel_error = 0;       // max |analytic − numeric| / max(max |numeric|, atol/rtol) (normwise)
    std::int64_t worst_index = -1;  // flat index of the element with the largest |analytic − numeric|
    double analytic = 0, numeric = 0;  // at worst_index
    bool passed = true;
};

struct GradcheckReport {
    bool passed = true;
    std::vector<GradcheckInput> inputs;

    [[nodiscard]] double max_rel_error() const {
        double m = 0;
        for (const auto& i : inputs) m = std::max(m, i.max_rel_error);
        return m;
    }
    [[nodiscard]] std::string str() const {
        std::string s = fmt::format("gradcheck {}\n", passed ? "passed" : "FAILED");
        for (const auto& i : inputs)
            s += fmt::format("  {:<12} max abs err {:.3e}  max rel err {:.3e}  worst [{}] analytic {:.10g} numeric {:.10g}{}\n",
                             i.name, i.max_abs_error, i.max_rel_error, i.worst_index, i.analytic, i.numeric,
                             i.passed ? "" : "  FAILED");
        return s;
    }
};

template <class F>
GradcheckReport gradcheck(F&& f, std::vector<Param<double>> inputs, const GradcheckOptions& opt = {}) {
    if (!(opt.eps > 0) || !std::isfinite(opt.eps)) fail("gradcheck", "eps must be finite and > 0, got {}", opt.eps);
    if (!(opt.atol >= 0) || !(opt.rtol >= 0)) fail("gradcheck", "atol ({}) and rtol ({}) must be >= 0", opt.atol, opt.rtol);
    if (inputs.empty()) fail("gradcheck", "no inputs to check");
    auto call = [&] { return Var<double>(f()); };

    // Analytic gradients, on a private tape, with the Params' own gradients set aside.
    std::vector<Tensor<double>> saved_grads;
    for (auto& p : inputs) {
        saved_grads.push_back(p.has_grad() ? p.grad() : Tensor<double>());
        p.zero_grad();
    }
    // In reverse, so that a Param listed twice gets back the gradient saved at its first entry.
    auto restore_grads = [&] {
        for (std::size_t k = inputs.size(); k-- > 0;) inputs[k].state()->grad = saved_grads[k];
    };
    Tape tape;
    Tensor<double> R;
    std::vector<Tensor<double>> analytic;
    try {
        TapeGuard guard(tape);
        Var<double> out = call();
        R = out.value().numel() == 1 ? ones<double>(out.shape()) : randn<double>(out.shape(), opt.seed);
        if (out.requires_grad()) out.backward(R);
    } catch (...) {
        restore_grads();
        throw;
    }
    for (auto& p : inputs) analytic.push_back(p.grad().clone());
    restore_grads();

    auto projected = [&] {
        NoGradGuard no_grad;
        const Var<double> out = call();
        return (out.value().array() * R.array()).sum();
    };
    GradcheckReport report;
    for (std::size_t k = 0; k < inputs.size(); ++k) {
        GradcheckInput in;
        in.name = inputs[k].name().empty() ? fmt::format("input {}", k) : inputs[k].name();
        double* x = inputs[k].value().data();
        const double* a = analytic[k].data();
        double max_numeric = 0;
        for (std::int64_t i = 0; i < inputs[k].value().numel(); ++i) {
            const double orig = x[i];
            double fx[4] = {};  // f(x − 2h), f(x − h), f(x + h), f(x + 2h)
            try {
                const double steps[4] = {-2, -1, 1, 2};
                for (int s = 0; s < 4; ++s) {
                    x[i] = orig + steps[s] * opt.eps;
                    fx[s] = projected();
                }
            } catch (...) {
                x[i] = orig;  // a throwing f must not leave the Param perturbed
                throw;
            }
            x[i] = orig;
            const double numeric = (fx[0] - 8 * fx[1] + 8 * fx[2] - fx[3]) / (12 * opt.eps);
            const double err = std::abs(a[i] - numeric);
            max_numeric = std::max(max_numeric, std::abs(numeric));
            if (!(err <= opt.atol + opt.rtol * std::abs(numeric))) in.passed = false;
            if (!(err <= in.max_abs_error) || in.worst_index < 0) {
                in.max_abs_error = err;
                in.worst_index = i;
                in.analytic = a[i];
                in.numeric = numeric;
            }
        }
        // Relative to the gradient's size, but never to a size below atol/rtol: a gradient that is
        // exactly zero (numeric values at rounding level) has no meaningful relative error.
        const double scale = std::max(max_numeric, opt.rtol > 0 ? opt.atol / opt.rtol : 0.0);
        in.max_rel_error = scale > 0 ? in.max_abs_error / scale : in.max_abs_error;
        report.passed = report.passed && in.passed;
        report.inputs.push_back(std::move(in));
    }
    return report;
}

}  // namespace autodiff

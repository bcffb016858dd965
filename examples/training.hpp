// The training loop shared by the training examples: one optimiser step per fresh batch, the loss
// and gradient norm of every step in a CSV file, a progress line every `print_every` steps.
#pragma once

#include <chrono>
#include <cmath>
#include <cstdint>
#include <fstream>
#include <string>
#include <vector>

#include <fmt/core.h>

#include <autodiff/autodiff.hpp>

namespace examples {

struct LossRange {
    float first = 0;  // the loss of step 1
    float last = 0;   // the loss of the last step
};

inline std::int64_t count_parameters(const std::vector<autodiff::Param<float>>& params) {
    std::int64_t n = 0;
    for (const auto& p : params) n += p.value().numel();
    return n;
}

// Copies every parameter of `from` into `to` (same architecture, another value type).
template <class A, class B>
void copy_parameters(const std::vector<autodiff::Param<A>>& from, const std::vector<autodiff::Param<B>>& to) {
    for (std::size_t i = 0; i < from.size(); ++i)
        for (std::int64_t k = 0; k < from[i].value().numel(); ++k)
            to[i].state()->value.data()[k] = static_cast<B>(from[i].value().data()[k]);
}

// The loss log of a training run: every step's loss and gradient norm in a CSV file, a progress line
// every `print_every` steps (and the first and last). Shared by the CPU loop below and train_mha's GPU loop.
class LossLog {
public:
    LossLog(const std::string& csv_path, int steps, int print_every)
        : csv_(csv_path), steps_(steps), print_every_(print_every), start_(std::chrono::steady_clock::now()) {
        csv_ << "step,loss,grad_norm\n";
    }
    void record(int step, float loss, float grad_norm) {
        range_.last = loss;
        if (step == 1) range_.first = loss;
        csv_ << step << ',' << loss << ',' << grad_norm << '\n';
        if (step == 1 || step % print_every_ == 0 || step == steps_) {
            const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
            fmt::print("step {:4d}  loss {:.5f}  grad norm {:.3e}  {:6.1f} steps/s\n", step, loss, grad_norm, step / secs);
        }
    }
    [[nodiscard]] LossRange range() const { return range_; }

private:
    std::ofstream csv_;
    int steps_, print_every_;
    std::chrono::steady_clock::time_point start_;
    LossRange range_;
};

// Runs `steps` steps of `optimiser` over `params`; loss_of(step) builds the step's loss on the tape.
template <class Optimiser, class LossOf>
LossRange train(const std::vector<autodiff::Param<float>>& params, Optimiser& optimiser, int steps, int print_every,
                const std::string& csv_path, LossOf loss_of) {
    LossLog log(csv_path, steps, print_every);
    for (int step = 1; step <= steps; ++step) {
        optimiser.zero_grad();
        autodiff::Var<float> loss = loss_of(step);
        loss.backward();
        float grad_sq = 0;
        for (const auto& p : params) grad_sq += p.grad().array().square().sum();
        optimiser.step();
        log.record(step, loss.item(), std::sqrt(grad_sq));
    }
    return log.range();
}

}  // namespace examples

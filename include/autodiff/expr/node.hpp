#pragma once
// The expression machinery: every node derives from Expr<Node>, holds its children by value and its
// plain parameters, checks shapes when it is built and computes nothing. Evaluation lives in
// Evaluator<Node>, specialised next to each node type: it evaluates the children, calls the forward
// kernel, and records a closure that calls the backward kernel.
//
// A node type exposes:
//   using value_type = float | double;
//   static constexpr bool may_require_grad;   // false when every leaf below is a Const: no backward work
//   const Shape& shape() const;

#include <type_traits>
#include <utility>

#include "autodiff/tape.hpp"

namespace autodiff {

struct ExprTag {};

template <class Derived>
struct Expr : ExprTag {
    [[nodiscard]] const Derived& derived() const { return static_cast<const Derived&>(*this); }
    // Evaluates the expression into a Var on the current tape (defined in variable.hpp).
    [[nodiscard]] auto eval() const;
};

template <class E>
inline constexpr bool is_node_v = std::is_base_of_v<ExprTag, std::remove_cvref_t<E>>;

// An evaluated operand: its value and where its gradient goes (empty target: no gradient needed).
template <class T>
struct Value {
    Tensor<T> value;
    GradTarget<T> target;
};

// The tape to record on, or nullptr when nothing is recorded (NoGradGuard).
struct EvalContext {
    Tape* tape = nullptr;
};

template <class Node>
struct Evaluator;

template <class Node>
auto evaluate(const Node& node, EvalContext& ctx) {
    return Evaluator<Node>::eval(node, ctx);
}

// The value of an operation. When recording and `needs_grad`, records `backward`, a closure
// `void(const Tensor<T>& dy, Tape&)` that accumulates the inputs' gradients.
template <class T, class Backward>
Value<T> finish(EvalContext& ctx, Tensor<T> out, bool needs_grad, Backward&& backward) {
    if (!ctx.tape || !needs_grad) return {std::move(out), {}};
    GradTarget<T> target = ctx.tape->record<T>(std::forward<Backward>(backward));
    return {std::move(out), std::move(target)};
}

template <class... Nodes>
inline constexpr bool any_may_require_grad_v = (Nodes::may_require_grad || ...);

}  // namespace autodiff

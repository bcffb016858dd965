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

#include <string_view>
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

// The tape to record on, or nullptr when nothing is recorded (NoGradGuard). For the graph view
// (graph.hpp): `inputs` collects what the evaluation of the enclosing node met, and `fused` is set by
// an evaluator that records one fused record.
struct EvalContext {
    Tape* tape = nullptr;
    RecordInputs* inputs = nullptr;
    bool fused = false;
};

template <class Node>
struct Evaluator;

namespace detail {
// The C++ type of T as the compiler spells it (a view of a string with static storage).
template <class T>
constexpr std::string_view type_name() {
    const std::string_view p = __PRETTY_FUNCTION__;  // "... [with T = X; ...]" (GCC) or "... [T = X]" (Clang)
    const std::size_t start = p.find("T = ") + 4;
    return p.substr(start, p.find_first_of(";]", start) - start);
}
template <class T>
inline constexpr std::string_view type_name_v = type_name<T>();
}  // namespace detail

// Evaluates a node: its evaluator runs (and records), and when recording, the record it made is
// described for the graph view with the node's type, its output's shape and the inputs it met.
template <class Node>
auto evaluate(const Node& node, EvalContext& ctx) {
    if (!ctx.tape) return Evaluator<Node>::eval(node, ctx);
    RecordInputs mine;
    RecordInputs* const parent = std::exchange(ctx.inputs, &mine);
    struct Restore {
        EvalContext& ctx;
        RecordInputs* parent;
        ~Restore() { ctx.inputs = parent; }
    } restore{ctx, parent};
    const std::size_t records_before = ctx.tape->size();
    auto v = Evaluator<Node>::eval(node, ctx);
    using T = typename decltype(v.value)::value_type;
    const bool fused = std::exchange(ctx.fused, false);
    if (ctx.tape->size() > records_before && v.target.slot >= 0 && !v.target.leaf)  // this node recorded
        ctx.tape->describe_last<T>(v.target.slot, detail::type_name_v<Node>, v.value.shape(), fused, mine);
    if (parent) {
        RecordInput in;
        in.slot = v.target.leaf ? -1 : v.target.slot;
        in.param = v.target.leaf != nullptr;
        if (in.param) v.target.leaf->name.copy(in.name.data(), in.name.size() - 1);
        in.shape = v.value.shape();
        parent->add(in);
    }
    return v;
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

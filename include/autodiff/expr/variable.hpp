#pragma once
// The three kinds of leaf a user holds, and their expression nodes:
//   Param<T>  a trainable value; backward() accumulates into grad() until zero_grad().
//   Const<T>  a value that never gets a gradient (known at compile time: no backward work is done).
//   Var<T>    the result of evaluating an expression; it can be used in further expressions, and
//             backward() on it differentiates everything recorded since its inputs were made.
// A plain Tensor<T> in an expression is a Const.

#include <concepts>
#include <memory>
#include <string>

#include "autodiff/expr/node.hpp"

namespace autodiff {

template <class T>
class Param {
    static_assert(is_value_type_v<T>, "autodiff::Param<T>: T must be float or double");

public:
    using value_type = T;

    explicit Param(Tensor<T> value, std::string name = {}) {
        if (!value.defined()) fail("Param", "value{} is an undefined tensor", name.empty() ? "" : " of '" + name + "'");
        state_ = std::make_shared<ParamState<T>>(ParamState<T>{std::move(value), {}, std::move(name), {}});
    }

    [[nodiscard]] const Tensor<T>& value() const { return state_->value; }
    // The value, for in-place updates by optimisers (keep the shape).
    [[nodiscard]] Tensor<T>& value() { return state_->value; }
    // dL/dvalue accumulated by backward() since the last zero_grad() (zeros if none).
    [[nodiscard]] const Tensor<T>& grad() const {
        if (!state_->grad.defined()) state_->grad = zeros<T>(state_->value.shape());
        return state_->grad;
    }
    [[nodiscard]] bool has_grad() const { return state_->grad.defined(); }
    void zero_grad() { state_->grad = Tensor<T>(); }
    [[nodiscard]] const Shape& shape() const { return state_->value.shape(); }
    [[nodiscard]] const std::string& name() const { return state_->name; }
    [[nodiscard]] const std::shared_ptr<ParamState<T>>& state() const { return state_; }

private:
    std::shared_ptr<ParamState<T>> state_;
};

template <class T>
class Const {
    static_assert(is_value_type_v<T>, "autodiff::Const<T>: T must be float or double");

public:
    using value_type = T;
    explicit Const(Tensor<T> value) : value_(std::move(value)) {
        if (!value_.defined()) fail("Const", "value is an undefined tensor");
    }
    [[nodiscard]] const Tensor<T>& value() const { return value_; }
    [[nodiscard]] const Shape& shape() const { return value_.shape(); }

private:
    Tensor<T> value_;
};

template <class T>
class Var;

// ---- leaf nodes ---------------------------------------------------------------------------------

template <class T>
struct ParamLeaf : Expr<ParamLeaf<T>> {
    using value_type = T;
    static constexpr bool may_require_grad = true;
    std::shared_ptr<ParamState<T>> state;
    [[nodiscard]] const Shape& shape() const { return state->value.shape(); }
};

template <class T>
struct ConstLeaf : Expr<ConstLeaf<T>> {
    using value_type = T;
    static constexpr bool may_require_grad = false;
    Tensor<T> value;
    [[nodiscard]] const Shape& shape() const { return value.shape(); }
};

template <class T>
struct VarLeaf : Expr<VarLeaf<T>> {
    using value_type = T;
    static constexpr bool may_require_grad = true;
    Var<T> var;
    [[nodiscard]] const Shape& shape() const { return var.shape(); }
};

template <class T>
ParamLeaf<T> as_expr(const Param<T>& p) {
    return {{}, p.state()};
}
template <class T>
ConstLeaf<T> as_expr(const Const<T>& c) {
    return {{}, c.value()};
}
template <class T>
ConstLeaf<T> as_expr(const Tensor<T>& t) {
    if (!t.defined()) fail("expression", "a tensor operand is undefined");
    return {{}, t};
}
template <class T>
VarLeaf<T> as_expr(const Var<T>& v);
template <class E>
    requires is_node_v<E>
const E& as_expr(const E& e) {
    return e;
}

// Anything that can stand in an expression: a node, Param, Const, Var or Tensor.
template <class X>
concept ExprLike = requires(const X& x) { as_expr(x); };
template <class X>
using expr_t = std::remove_cvref_t<decltype(as_expr(std::declval<const X&>()))>;
template <class X>
using value_type_t = typename expr_t<X>::value_type;
// ExprLike, but not a bare Tensor: operators need one operand of this kind, so that tensor + tensor
// stays meaningless instead of silently building an expression.
template <class X>
concept Operand = ExprLike<X> && !std::same_as<std::remove_cvref_t<X>, Tensor<value_type_t<X>>>;

template <class A, class B>
inline constexpr bool same_value_type_v = std::is_same_v<value_type_t<A>, value_type_t<B>>;

// ---- Var ----------------------------------------------------------------------------------------

template <class T>
class Var {
    static_assert(is_value_type_v<T>, "autodiff::Var<T>: T must be float or double");

public:
    using value_type = T;

    Var() = default;
    // Evaluates `e` (the only entry point of evaluation), recording on `tape` unless grad is disabled.
    // If evaluation throws, the tape is left exactly as it was.
    template <class E>
        requires ExprLike<E> && (!std::same_as<std::remove_cvref_t<E>, Var>)
    Var(const E& e, Tape& tape = current_tape()) {  // NOLINT(google-explicit-constructor): `Var<float> y = expr;`
        static_assert(std::is_same_v<value_type_t<E>, T>,
                      "autodiff::Var<T>: the expression's value type differs from T (float vs double)");
        EvalContext ctx{grad_enabled() ? &tape : nullptr};
        const Tape::Checkpoint cp = tape.checkpoint();
        try {
            Value<T> v = evaluate(as_expr(e), ctx);
            value_ = std::move(v.value);
            target_ = std::move(v.target);
        } catch (...) {
            tape.rollback(cp);
            throw;
        }
        if (target_) {
            tape_ = &tape;
            tape_alive_ = tape.liveness();
            generation_ = tape.generation();
            record_end_ = tape.size();
        }
    }

    // One output of an evaluation that makes several values in one record (linear_heads, expr/heads.hpp):
    // `v` as that record made it on `tape`, which must be the tape's last record (or none when `v`
    // needs no gradient). Expressions go through the constructor above.
    explicit Var(Value<T> v, Tape& tape) : value_(std::move(v.value)), target_(std::move(v.target)) {
        if (target_) {
            tape_ = &tape;
            tape_alive_ = tape.liveness();
            generation_ = tape.generation();
            record_end_ = tape.size();
        }
    }

    [[nodiscard]] const Tensor<T>& value() const { return value_; }
    [[nodiscard]] const Shape& shape() const { return value_.shape(); }
    [[nodiscard]] T item() const { return value_.item(); }
    [[nodiscard]] bool requires_grad() const { return static_cast<bool>(target_); }
    // The same value as a constant: expressions using it record nothing for it.
    [[nodiscard]] Var detach() const {
        Var v;
        v.value_ = value_;
        return v;
    }

    // Differentiates a scalar Var: every Param in its expression gets grad() += dL/dParam.
    void backward(bool retain_graph = false) {
        if (value_.numel() != 1)
            fail("backward", "output has shape {}, not a scalar: pass a seed gradient of that shape, backward(seed)", shape());
        backward(ones<T>(shape()), retain_graph);
    }
    // Vector-Jacobian product with `seed` (same shape as the value).
    void backward(const Tensor<T>& seed, bool retain_graph = false) {
        recorded_tape("backward");
        if (!seed.defined() || seed.shape() != shape())
            fail("backward", "seed gradient has shape {} but the output has shape {}",
                 seed.defined() ? seed.shape().str() : std::string("(undefined)"), shape());
        tape_->backward(target_, seed, record_end_, retain_graph);
    }

    // The tape holding this Var's graph; throws Error from `op` when there is none (the Var does not
    // require grad, its tape was destroyed, or a backward() freed its graph).
    const Tape& recorded_tape(std::string_view op) const {
        if (!target_)
            fail(op, "this Var does not require grad: its expression has no Param, or it was "
                     "evaluated under NoGradGuard");
        if (tape_alive_.expired())
            fail(op, "the Tape this Var was recorded on has been destroyed; keep an explicit Tape alive "
                     "until backward()");
        if (tape_->generation() != generation_)
            fail(op, "the graph of this Var was already freed by an earlier backward(); pass "
                     "retain_graph = true to the first backward() to differentiate it again");
        return *tape_;
    }

    // For the evaluator of VarLeaf.
    [[nodiscard]] const GradTarget<T>& target() const { return target_; }
    [[nodiscard]] const Tape* tape() const { return tape_; }
    [[nodiscard]] std::uint64_t generation() const { return generation_; }

private:
    Tensor<T> value_;
    GradTarget<T> target_;
    Tape* tape_ = nullptr;
    std::weak_ptr<const void> tape_alive_;
    std::uint64_t generation_ = 0;
    std::size_t record_end_ = 0;
};

template <class T>
VarLeaf<T> as_expr(const Var<T>& v) {
    return {{}, v};
}

template <class Derived>
auto Expr<Derived>::eval() const {
    return Var<typename Derived::value_type>(derived());
}

// Evaluates any expression into a Var of its value type.
template <ExprLike E>
Var<value_type_t<E>> eval(const E& e) {
    return Var<value_type_t<E>>(e);
}

// ---- leaf evaluators ----------------------------------------------------------------------------

template <class T>
struct Evaluator<ParamLeaf<T>> {
    static Value<T> eval(const ParamLeaf<T>& p, EvalContext& ctx) {
        return {p.state->value, ctx.tape ? GradTarget<T>{p.state, -1} : GradTarget<T>{}};
    }
};

template <class T>
struct Evaluator<ConstLeaf<T>> {
    static Value<T> eval(const ConstLeaf<T>& c, EvalContext&) { return {c.value, {}}; }
};

template <class T>
struct Evaluator<VarLeaf<T>> {
    static Value<T> eval(const VarLeaf<T>& v, EvalContext& ctx) {
        if (!ctx.tape || !v.var.requires_grad()) return {v.var.value(), {}};
        if (v.var.tape() != ctx.tape)
            fail("expression", "a Var recorded on another tape is used here; evaluate it on the same tape or detach() it");
        if (v.var.generation() != ctx.tape->generation())
            fail("expression", "a Var whose graph was freed by backward() is used here; detach() it to use its value as a constant");
        return {v.var.value(), v.var.target()};
    }
};

// Zeroes the gradients of every parameter given.
template <class... P>
void zero_grad(P&... params) {
    (params.zero_grad(), ...);
}

}  // namespace autodiff

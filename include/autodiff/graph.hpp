#pragma once
// The graph view: the records a Var's value was computed by, as Graphviz DOT.
//
//   ad::Var<float> loss = ...;
//   std::ofstream("graph.dot") << ad::to_dot(loss);      // then: dot -Tpng graph.dot -o graph.png
//
// One box per tape record (the op, from the expression node's type; the output's shape; "fused" and a
// coloured box when a fused kernel computed a whole pattern in one record), one ellipse per Param (its
// name and shape) and per constant input, and an edge from each input to the record that used it.
// Only the records the Var depends on are drawn, in tape order. Records made outside an expression
// node's evaluation show as "record".

#include <string>

#include "autodiff/expr/variable.hpp"

namespace autodiff {

// The DOT text of the records `slot` (of value type double or float) depends on, on `tape`.
std::string tape_to_dot(const Tape& tape, std::int32_t slot, bool is_double);

// Throws Error (op "to_dot") when v recorded nothing (it does not require grad) or its graph is gone
// (the tape was destroyed, or a backward() without retain_graph freed it).
template <class T>
std::string to_dot(const Var<T>& v) {
    const Tape& tape = v.recorded_tape("to_dot");
    if (v.target().slot < 0)
        fail("to_dot", "this Var {} is a Param's value, not a recorded result: nothing to draw", v.shape());
    return tape_to_dot(tape, v.target().slot, std::is_same_v<T, double>);
}

}  // namespace autodiff

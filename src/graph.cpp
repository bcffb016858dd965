#include "autodiff/graph.hpp"

#include <algorithm>
#include <map>
#include <set>
#include <vector>

namespace autodiff {

namespace {

// "autodiff::Binary<autodiff::Mul, autodiff::VarLeaf<float>, ...>" -> "Mul"; "autodiff::Softmax<...>" ->
// "Softmax": the node's name, or for the elementwise families the operation's. (A fused record is
// drawn as "attention"; its full type is in the tooltip.)
std::string op_name(std::string_view type) {
    auto strip = [](std::string_view t) {
        for (;;) {
            const std::size_t colons = t.find("::");
            const std::size_t end = t.find_first_of("<, >");  // the end of the first name
            if (colons == std::string_view::npos || (end != std::string_view::npos && colons > end)) return t;
            t.remove_prefix(colons + 2);
        }
    };
    type = strip(type);
    const std::string_view name = type.substr(0, type.find('<'));
    if ((name == "Unary" || name == "Binary") && name.size() < type.size()) {
        std::string_view arg = strip(type.substr(name.size() + 1));
        return std::string(arg.substr(0, arg.find_first_of("<,> ")));
    }
    return std::string(name);
}

std::string escape(std::string_view s) {
    std::string out;
    for (const char c : s) {
        if (c == '"' || c == '\\') out += '\\';
        out += c;
    }
    return out;
}

}  // namespace

std::string tape_to_dot(const Tape& tape, std::int32_t slot, bool is_double) {
    // Record index of every output slot of this value type.
    std::map<std::int32_t, std::size_t> by_slot;
    for (std::size_t i = 0; i < tape.size(); ++i)
        if (tape.info(i).is_double == is_double)
            for (std::int32_t o = 0; o < tape.record_outputs(i); ++o) by_slot[tape.record_slot(i) + o] = i;
    const auto root = by_slot.find(slot);
    if (root == by_slot.end()) fail("to_dot", "slot {} has no record on this tape", slot);

    // The records the root depends on.
    std::set<std::size_t> needed;
    std::vector<std::size_t> stack{root->second};
    while (!stack.empty()) {
        const std::size_t i = stack.back();
        stack.pop_back();
        if (!needed.insert(i).second) continue;
        const RecordInputs& in = tape.info(i).inputs;
        for (int j = 0; j < std::min(in.count, RecordInputs::capacity); ++j) {
            const auto it = by_slot.find(in.input[static_cast<std::size_t>(j)].slot);
            if (in.input[static_cast<std::size_t>(j)].slot >= 0 && it != by_slot.end()) stack.push_back(it->second);
        }
    }

    std::string dot = "digraph tape {\n  rankdir=BT;\n  node [fontname=\"Helvetica\", fontsize=10];\n";
    std::set<std::string> params;
    int constants = 0;
    for (const std::size_t i : needed) {
        const RecordInfo& r = tape.info(i);
        const std::string op = r.fused ? "attention" : r.op.empty() ? "record" : op_name(r.op);
        dot += fmt::format("  r{} [shape=box, style=\"rounded,filled\", fillcolor=\"{}\", label=\"#{} {}{}\\n{}\", tooltip=\"{}\"];\n", i,
                           r.fused ? "#9ecae1" : "#f0f0f0", i, escape(op), r.fused ? " (fused)" : "", r.shape,
                           escape(r.op.substr(0, 300)));
        const RecordInputs& in = r.inputs;
        for (int j = 0; j < std::min(in.count, RecordInputs::capacity); ++j) {
            const RecordInput& x = in.input[static_cast<std::size_t>(j)];
            if (x.slot >= 0) {
                const auto it = by_slot.find(x.slot);
                if (it != by_slot.end()) dot += fmt::format("  r{} -> r{};\n", it->second, i);
            } else if (x.param) {
                const std::string name(x.name.data());
                const std::string key = name + x.shape.str();
                dot += fmt::format("  \"param {}\" -> r{};\n", escape(key), i);
                if (params.insert(key).second)
                    dot += fmt::format("  \"param {}\" [shape=ellipse, style=filled, fillcolor=\"#fdd0a2\", label=\"{}\\n{}\"];\n",
                                       escape(key), escape(name.empty() ? "param" : name), x.shape);
            } else {
                dot += fmt::format("  c{} [shape=ellipse, style=dashed, label=\"const\\n{}\"];\n  c{} -> r{};\n", constants, x.shape,
                                   constants, i);
                ++constants;
            }
        }
        if (in.count > RecordInputs::capacity)
            dot += fmt::format("  r{}_more [shape=plaintext, label=\"+{} inputs\"];\n  r{}_more -> r{};\n", i,
                               in.count - RecordInputs::capacity, i, i);
    }
    dot += "}\n";
    return dot;
}

}  // namespace autodiff

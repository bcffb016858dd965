#pragma once
// The tape: backward records in topological order, stored in an arena, walked in reverse.
//
// A record is a closure `void(const Tensor<T>& dy, Tape&)` written by an evaluator right under its
// forward; it reads the adjoint dy of its output slot and accumulates (+=) into its inputs' targets:
// a Param's grad() or another record's adjoint slot. Closures live in an arena whose chunks are
// kept across graphs, and slots and records live in vectors that keep their capacity, so a training
// loop allocates nothing here in steady state.

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <new>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "autodiff/tensor.hpp"

namespace autodiff {

// What a Param owns: its value and its accumulated gradient (undefined until the first backward).
template <class T>
struct ParamState {
    Tensor<T> value;
    Tensor<T> grad;
    std::string name;
    // The contributions of the backward() in progress, added to grad only when that backward
    // succeeds (Tape::backward): a backward that throws leaves grad as it was.
    Tensor<T> pending;
};

// Throws the Error of a value saved for a backward that was written into since (tape.cpp):
// "backward: <op>'s saved <which> (shape) was modified in place after it was recorded ...".
[[noreturn]] void saved_value_modified(const char* op, const char* which, const Shape& shape, std::uint64_t saved,
                                       std::uint64_t now);

// Checks that `t` is unmodified since a record saved it at version `version`.
template <class U>
void check_saved(const char* op, const char* which, const Tensor<U>& t, std::uint64_t version) {
    if (t.version() != version) [[unlikely]]
        saved_value_modified(op, which, t.shape(), version, t.version());
}

// A value a record keeps for its backward, with the version of its storage when it was saved (one
// integer). Tensors are shared handles: a write into the value between the forward and backward()
// (through any handle or view on its storage) would silently corrupt the gradient; get() throws instead.
template <class U>
class Saved {
public:
    Saved() = default;
    explicit Saved(Tensor<U> t) : tensor_(std::move(t)), version_(tensor_.version()) {}

    // The value, after checking that nothing wrote into it since it was saved. `op` and `which`
    // name the record and the value in the error ("matmul", "rhs").
    [[nodiscard]] const Tensor<U>& get(const char* op, const char* which) const {
        check_saved(op, which, tensor_, version_);
        return tensor_;
    }
    [[nodiscard]] bool defined() const { return tensor_.defined(); }

private:
    Tensor<U> tensor_;
    std::uint64_t version_ = 0;
};

// Where the gradient of a value goes: a Param's grad, an adjoint slot of the tape, or nowhere.
template <class T>
struct GradTarget {
    std::shared_ptr<ParamState<T>> leaf;
    std::int32_t slot = -1;

    [[nodiscard]] explicit operator bool() const { return leaf != nullptr || slot >= 0; }
};

// What a record computed, for the graph view (graph.hpp). evaluate() fills it in for the record an
// expression node makes; fixed-size, so describing records allocates nothing.
struct RecordInput {
    std::int32_t slot = -1;    // the output slot of the record that made this input, or -1
    bool param = false;        // a Param (then `name` holds its name, truncated), else a constant when slot < 0
    std::array<char, 40> name{};
    Shape shape;
};
struct RecordInputs {
    static constexpr int capacity = 6;
    std::array<RecordInput, capacity> input{};
    int count = 0;  // inputs met; only the first `capacity` are kept
    void add(const RecordInput& in) {
        if (count < capacity) input[static_cast<std::size_t>(count)] = in;
        ++count;
    }
};
struct RecordInfo {
    std::string_view op;   // the expression node's C++ type as the compiler spells it; empty if unknown
    Shape shape;           // of the output
    bool fused = false;    // computed by a fused kernel (one record for a whole pattern)
    bool is_double = false;
    RecordInputs inputs;
};

class Tape {
public:
    Tape();
    ~Tape();
    Tape(const Tape&) = delete;
    Tape& operator=(const Tape&) = delete;

    // Appends a record whose closure receives the adjoint of a fresh output slot; returns that slot
    // as the output's GradTarget.
    template <class T, class Backward>
    GradTarget<T> record(Backward&& backward);
    // A record of N outputs (one evaluation that makes several values, like linear_heads' q, k, v):
    // its closure `void(const std::array<Tensor<T>, N>& dys, Tape&)` receives the adjoints of N fresh
    // consecutive slots, an undefined one for an output that got no gradient, and runs when any is
    // defined. Returns the outputs' GradTargets. Like record's closure it reads the adjoints as const:
    // a root's adjoint is the caller's seed (backward).
    template <class T, std::size_t N, class Backward>
    std::array<GradTarget<T>, N> record_outputs(Backward&& backward);

    // target's gradient += g. Takes g's storage when nobody else holds it, otherwise copies. A
    // Param's share goes to its pending gradient, added to grad() when the backward succeeds.
    template <class T>
    void accumulate(const GradTarget<T>& target, Tensor<T> g);

    // Seeds `target` with `seed` and runs the records [0, end) in reverse. Without retain_graph the
    // tape is cleared afterwards (every Var recorded on it can no longer be differentiated).
    // If anything throws (a saved value modified in place, std::bad_alloc), every Param's grad() is
    // left as it was, the adjoints are released and the graph stays recorded.
    template <class T>
    void backward(const GradTarget<T>& target, const Tensor<T>& seed, std::size_t end, bool retain_graph);

    // Destroys every record, empties the slots and starts a new generation.
    void clear();

    [[nodiscard]] std::size_t size() const { return records_.size(); }
    // Changed by clear(), and unique across all tapes: a Var remembers the generation it was recorded in.
    [[nodiscard]] std::uint64_t generation() const { return generation_; }
    // Expires when the tape is destroyed: a Var checks it before touching its tape.
    [[nodiscard]] std::weak_ptr<const void> liveness() const { return alive_; }

    // The state before an evaluation, to undo its records if it throws.
    struct Checkpoint {
        std::size_t records, slots_f, slots_d, chunk, used;
    };
    [[nodiscard]] Checkpoint checkpoint() const;
    void rollback(const Checkpoint& cp);

    // Bytes held by the arena's chunks (kept across clears).
    [[nodiscard]] std::size_t arena_bytes() const;

    // The graph view's description of record i (graph.hpp), and the output slot it writes.
    [[nodiscard]] const RecordInfo& info(std::size_t i) const { return info_[i]; }
    [[nodiscard]] std::int32_t record_slot(std::size_t i) const { return records_[i].slot; }
    // How many consecutive output slots, from record_slot(i), record i writes (1 unless record_outputs made it).
    [[nodiscard]] std::int32_t record_outputs(std::size_t i) const { return records_[i].outputs; }
    // Describes the last record, if it is the one that wrote `slot` of value type T.
    template <class T>
    void describe_last(std::int32_t slot, std::string_view op, const Shape& shape, bool fused, const RecordInputs& inputs) noexcept {
        if (records_.empty() || records_.back().slot != slot || info_.back().is_double != std::is_same_v<T, double>) return;
        RecordInfo& r = info_.back();
        r.op = op;
        r.shape = shape;
        r.fused = fused;
        r.inputs = inputs;
    }

private:
    struct Record {
        void (*run)(void* closure, Tape& tape, std::int32_t slot);
        void (*destroy)(void* closure) noexcept;
        void* closure;
        std::int32_t slot;  // the first output slot
        std::int32_t outputs = 1;
    };
    struct Chunk {
        std::unique_ptr<std::byte[]> data;
        std::size_t size;
    };

    void* arena_allocate(std::size_t bytes, std::size_t align);
    void destroy_records_from(std::size_t first) noexcept;
    void clear_adjoints() noexcept;

    template <class T>
    std::vector<Tensor<T>>& adjoints() {
        if constexpr (std::is_same_v<T, float>) return adjoints_f_;
        else return adjoints_d_;
    }
    template <class T>
    Tensor<T> take_adjoint(std::int32_t slot) {
        return std::move(adjoints<T>()[static_cast<std::size_t>(slot)]);
    }
    template <class T>
    std::vector<ParamState<T>*>& touched() {
        if constexpr (std::is_same_v<T, float>) return touched_f_;
        else return touched_d_;
    }
    // Ends a backward: adds (commit) or drops every touched Param's pending gradient.
    void finish_params(bool commit) noexcept;

    std::vector<Record> records_;
    std::vector<RecordInfo> info_;  // parallel to records_
    std::vector<Tensor<float>> adjoints_f_;
    std::vector<Tensor<double>> adjoints_d_;
    // The Params given a pending gradient by the backward in progress (capacity kept across graphs).
    std::vector<ParamState<float>*> touched_f_;
    std::vector<ParamState<double>*> touched_d_;
    std::vector<Chunk> chunks_;
    std::size_t chunk_ = 0;  // current chunk
    std::size_t used_ = 0;   // bytes used in it
    std::uint64_t generation_ = 0;
    std::shared_ptr<const int> alive_ = std::make_shared<const int>(0);
};

// The tape that new Vars of this thread record on (a per-thread default unless a TapeGuard is active).
Tape& current_tape();

// Makes `tape` the current tape of this thread for the guard's lifetime.
class TapeGuard {
public:
    explicit TapeGuard(Tape& tape);
    ~TapeGuard();
    TapeGuard(const TapeGuard&) = delete;
    TapeGuard& operator=(const TapeGuard&) = delete;

private:
    Tape* previous_;
};

// While alive, evaluations on this thread record nothing and their results do not require grad.
class NoGradGuard {
public:
    NoGradGuard();
    ~NoGradGuard();
    NoGradGuard(const NoGradGuard&) = delete;
    NoGradGuard& operator=(const NoGradGuard&) = delete;

private:
    bool previous_;
};
bool grad_enabled();

// While alive, expressions that match a fused pattern are evaluated node by node instead (to
// compare the two paths, or to debug one).
class NoFusionGuard {
public:
    NoFusionGuard();
    ~NoFusionGuard();
    NoFusionGuard(const NoFusionGuard&) = delete;
    NoFusionGuard& operator=(const NoFusionGuard&) = delete;

private:
    bool previous_;
};
bool fusion_enabled();

// ---- template definitions ------------------------------------------------------------------------

template <class T, class Backward>
GradTarget<T> Tape::record(Backward&& backward) {
    using Closure = std::decay_t<Backward>;
    auto& slots = adjoints<T>();
    const auto slot = static_cast<std::int32_t>(slots.size());
    // Grow first: once the closure exists, nothing below may throw.
    if (records_.size() == records_.capacity()) records_.reserve(2 * records_.capacity() + 64);
    if (info_.size() == info_.capacity()) info_.reserve(records_.capacity());
    slots.emplace_back();
    void* mem = arena_allocate(sizeof(Closure), alignof(Closure));
    auto* closure = new (mem) Closure(std::forward<Backward>(backward));
    records_.push_back(Record{
        [](void* c, Tape& tape, std::int32_t s) {
            Tensor<T> dy = tape.take_adjoint<T>(s);
            if (dy.defined()) (*static_cast<Closure*>(c))(std::as_const(dy), tape);
        },
        [](void* c) noexcept { static_cast<Closure*>(c)->~Closure(); }, closure, slot});
    RecordInfo info;
    info.is_double = std::is_same_v<T, double>;
    info_.push_back(info);
    return GradTarget<T>{nullptr, slot};
}

template <class T, std::size_t N, class Backward>
std::array<GradTarget<T>, N> Tape::record_outputs(Backward&& backward) {
    static_assert(N >= 1);
    using Closure = std::decay_t<Backward>;
    auto& slots = adjoints<T>();
    const auto first = static_cast<std::int32_t>(slots.size());
    if (records_.size() == records_.capacity()) records_.reserve(2 * records_.capacity() + 64);
    if (info_.size() == info_.capacity()) info_.reserve(records_.capacity());
    slots.resize(slots.size() + N);
    void* mem = arena_allocate(sizeof(Closure), alignof(Closure));
    auto* closure = new (mem) Closure(std::forward<Backward>(backward));
    records_.push_back(Record{
        [](void* c, Tape& tape, std::int32_t s) {
            std::array<Tensor<T>, N> dys;
            bool any = false;
            for (std::size_t i = 0; i < N; ++i) {
                dys[i] = tape.take_adjoint<T>(s + static_cast<std::int32_t>(i));
                any = any || dys[i].defined();
            }
            if (any) (*static_cast<Closure*>(c))(std::as_const(dys), tape);
        },
        [](void* c) noexcept { static_cast<Closure*>(c)->~Closure(); }, closure, first, static_cast<std::int32_t>(N)});
    RecordInfo info;
    info.is_double = std::is_same_v<T, double>;
    info_.push_back(info);
    std::array<GradTarget<T>, N> targets;
    for (std::size_t i = 0; i < N; ++i) targets[i] = GradTarget<T>{nullptr, first + static_cast<std::int32_t>(i)};
    return targets;
}

template <class T>
void Tape::accumulate(const GradTarget<T>& target, Tensor<T> g) {
    if (target.leaf && !target.leaf->pending.defined()) touched<T>().push_back(target.leaf.get());  // may throw: nothing changed yet
    Tensor<T>& dst = target.leaf ? target.leaf->pending : adjoints<T>()[static_cast<std::size_t>(target.slot)];
    if (!dst.defined())
        dst = g.is_unique() ? std::move(g) : g.clone();
    else
        dst.array() += std::as_const(g).array();  // g may share a caller's storage: read it without bumping its version
}

template <class T>
void Tape::backward(const GradTarget<T>& target, const Tensor<T>& seed, std::size_t end, bool retain_graph) {
    try {
        // The root's adjoint slot shares the caller's seed instead of copying it: closures get their
        // adjoints as const, accumulate copies a shared one, and nothing else adds into the root's
        // slot (records after the root get no adjoint and do not run). A Param's pending gradient becomes its grad(), which later
        // backwards add into, so a leaf root gets a copy.
        if (target.leaf) accumulate(target, seed);
        else adjoints<T>()[static_cast<std::size_t>(target.slot)] = seed;
        for (std::size_t i = end; i-- > 0;) {
            const Record& r = records_[i];
            r.run(r.closure, *this, r.slot);
        }
    } catch (...) {
        finish_params(false);
        clear_adjoints();
        throw;
    }
    finish_params(true);
    if (retain_graph) clear_adjoints();
    else clear();
}

}  // namespace autodiff

#include "autodiff/tape.hpp"

#include <algorithm>
#include <atomic>

namespace autodiff {

namespace {
constexpr std::size_t chunk_bytes = 64 * 1024;
thread_local bool tls_grad_enabled = true;
thread_local bool tls_fusion_enabled = true;
thread_local Tape* tls_current = nullptr;

// Generations are unique across all tapes: a Var of a destroyed tape never matches a new tape that
// happens to be built at the same address.
std::uint64_t next_generation() {
    static std::atomic<std::uint64_t> counter{0};
    return counter.fetch_add(1, std::memory_order_relaxed) + 1;
}
}  // namespace

Tape::Tape() : generation_(next_generation()) {}

Tape::~Tape() { destroy_records_from(0); }

void* Tape::arena_allocate(std::size_t bytes, std::size_t align) {
    for (;; ++chunk_, used_ = 0) {
        if (chunk_ == chunks_.size()) {  // out of chunks: a new one, large enough for this closure
            const std::size_t size = std::max(chunk_bytes, bytes + align);
            chunks_.push_back(Chunk{std::make_unique<std::byte[]>(size), size});
        }
        Chunk& c = chunks_[chunk_];
        const auto base = reinterpret_cast<std::uintptr_t>(c.data.get());
        const std::size_t start = (base + used_ + align - 1) / align * align - base;
        if (start + bytes <= c.size) {
            used_ = start + bytes;
            return c.data.get() + start;
        }
    }
}

void Tape::destroy_records_from(std::size_t first) noexcept {
    for (std::size_t i = records_.size(); i-- > first;) records_[i].destroy(records_[i].closure);
    records_.resize(first);
    info_.resize(first);
}

namespace {
template <class T>
void finish(std::vector<ParamState<T>*>& touched, bool commit) noexcept {
    for (ParamState<T>* p : touched) {
        if (commit && p->pending.defined()) {
            if (!p->grad.defined()) p->grad = std::move(p->pending);
            else p->grad.array() += p->pending.array();
        }
        p->pending = Tensor<T>();
    }
    touched.clear();
}
}  // namespace

void Tape::finish_params(bool commit) noexcept {
    finish(touched_f_, commit);
    finish(touched_d_, commit);
}

void saved_value_modified(const char* op, const char* which, const Shape& shape, std::uint64_t saved, std::uint64_t now) {
    fail("backward",
         "{}'s saved {} {} was modified in place after it was recorded (storage version {}, saved at {}); tensors "
         "are shared handles: clone() a value before writing into it, or write after backward()",
         op, which, shape, now, saved);
}

void Tape::clear_adjoints() noexcept {
    for (auto& a : adjoints_f_) a = Tensor<float>();
    for (auto& a : adjoints_d_) a = Tensor<double>();
}

void Tape::clear() {
    destroy_records_from(0);
    adjoints_f_.clear();
    adjoints_d_.clear();
    chunk_ = 0;
    used_ = 0;
    generation_ = next_generation();
}

Tape::Checkpoint Tape::checkpoint() const {
    return {records_.size(), adjoints_f_.size(), adjoints_d_.size(), chunk_, used_};
}

void Tape::rollback(const Checkpoint& cp) {
    destroy_records_from(cp.records);
    adjoints_f_.resize(cp.slots_f);
    adjoints_d_.resize(cp.slots_d);
    chunk_ = cp.chunk;
    used_ = cp.used;
}

std::size_t Tape::arena_bytes() const {
    std::size_t n = 0;
    for (const Chunk& c : chunks_) n += c.size;
    return n;
}

Tape& current_tape() {
    thread_local Tape default_tape;
    return tls_current ? *tls_current : default_tape;
}

TapeGuard::TapeGuard(Tape& tape) : previous_(tls_current) { tls_current = &tape; }
TapeGuard::~TapeGuard() { tls_current = previous_; }

NoGradGuard::NoGradGuard() : previous_(tls_grad_enabled) { tls_grad_enabled = false; }
NoGradGuard::~NoGradGuard() { tls_grad_enabled = previous_; }

bool grad_enabled() { return tls_grad_enabled; }

NoFusionGuard::NoFusionGuard() : previous_(tls_fusion_enabled) { tls_fusion_enabled = false; }
NoFusionGuard::~NoFusionGuard() { tls_fusion_enabled = previous_; }

bool fusion_enabled() { return tls_fusion_enabled; }

}  // namespace autodiff

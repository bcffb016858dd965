#include "autodiff/pool.hpp"

#include <bit>
#include <limits>
#include <map>
#include <mutex>
#include <new>
#include <vector>

namespace autodiff::pool {

namespace {

constexpr std::size_t alignment = 64;

struct State {
    std::mutex mutex;
    std::map<std::size_t, std::vector<Block*>> free_lists;  // by size class
    Stats stats;
    std::size_t cache_limit = std::numeric_limits<std::size_t>::max();
    std::int64_t fail_after = -1;  // fail_acquire_after's countdown; < 0: off
};

// Never destroyed: tensors with static storage duration may be released after main returns.
State& state() {
    static State* s = new State;
    return *s;
}

void system_free(Block* b) noexcept {
    b->~Block();
    ::operator delete(static_cast<void*>(b), std::align_val_t{alignment});
}

}  // namespace

std::size_t size_class(std::size_t bytes) {
    if (bytes <= 512) return bytes == 0 ? alignment : (bytes + alignment - 1) / alignment * alignment;
    const std::size_t top = std::bit_floor(bytes - 1);  // largest power of two below bytes
    const std::size_t step = top / 4;
    return (bytes + step - 1) / step * step;
}

Block* acquire(std::size_t bytes) {
    if (bytes > max_bytes) throw std::bad_alloc();
    const std::size_t cls = size_class(bytes);
    State& s = state();
    {
        std::lock_guard lock(s.mutex);
        if (s.fail_after >= 0) [[unlikely]]
            if (s.fail_after-- == 0) throw std::bad_alloc();
        ++s.stats.requests;
        auto it = s.free_lists.find(cls);
        if (it != s.free_lists.end() && !it->second.empty()) {
            Block* b = it->second.back();
            it->second.pop_back();
            ++s.stats.reused;
            s.stats.bytes_cached -= cls;
            s.stats.bytes_in_use += cls;
            if (s.stats.bytes_in_use > s.stats.peak_bytes_in_use) s.stats.peak_bytes_in_use = s.stats.bytes_in_use;
            b->refs.store(1, std::memory_order_relaxed);
            return b;
        }
    }
    void* raw = ::operator new(Block::header_bytes + cls, std::align_val_t{alignment});
    auto* b = new (raw) Block;
    b->capacity = cls;
    std::lock_guard lock(s.mutex);
    ++s.stats.system_allocs;
    s.stats.bytes_in_use += cls;
    if (s.stats.bytes_in_use > s.stats.peak_bytes_in_use) s.stats.peak_bytes_in_use = s.stats.bytes_in_use;
    return b;
}

Block* adopt(void* data, std::size_t bytes, void (*on_release)(void* context) noexcept, void* context) {
    auto* b = new Block;
    b->capacity = bytes;
    b->adopted = true;
    b->external = data;
    b->on_release = on_release;
    b->context = context;
    return b;
}

void release(Block* b) noexcept {
    if (b->refs.fetch_sub(1, std::memory_order_acq_rel) != 1) return;
    if (b->adopted) {
        if (b->on_release) b->on_release(b->context);
        delete b;
        return;
    }
    State& s = state();
    bool keep = false;
    {
        std::lock_guard lock(s.mutex);
        s.stats.bytes_in_use -= b->capacity;
        if (s.stats.bytes_cached + b->capacity <= s.cache_limit) {
            try {
                s.free_lists[b->capacity].push_back(b);
                s.stats.bytes_cached += b->capacity;
                keep = true;
            } catch (...) {  // no memory for the free list entry: give the block back instead
            }
        }
    }
    if (!keep) system_free(b);
}

Stats stats() {
    std::lock_guard lock(state().mutex);
    return state().stats;
}

void reset_stats() {
    std::lock_guard lock(state().mutex);
    Stats& st = state().stats;
    st.requests = st.reused = st.system_allocs = 0;
    st.peak_bytes_in_use = st.bytes_in_use;
}

void release_cached() {
    std::vector<Block*> blocks;
    {
        std::lock_guard lock(state().mutex);
        for (auto& [cls, list] : state().free_lists) {
            blocks.insert(blocks.end(), list.begin(), list.end());
            list.clear();
        }
        state().stats.bytes_cached = 0;
    }
    for (Block* b : blocks) system_free(b);
}

void fail_acquire_after(std::int64_t n) {
    std::lock_guard lock(state().mutex);
    state().fail_after = n < 0 ? -1 : n;
}

void set_cache_limit(std::size_t bytes) {
    std::lock_guard lock(state().mutex);
    state().cache_limit = bytes;
}

}  // namespace autodiff::pool

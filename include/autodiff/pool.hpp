#pragma once
// The caching storage pool behind every Tensor.
//
// Why: on this project's machines a fresh 64 MiB allocation costs ~20 ms of page faults, more than the
// operation that uses it. Freed blocks are kept in per-size-class free lists and handed out again.
// Size classes are the multiples of a quarter power of two (at most 25 % slack), 64-byte aligned.
//
// A Block carries its own intrusive reference count, so a Tensor handle is one pointer and copying
// a Tensor never allocates.

#include <atomic>
#include <cstddef>
#include <cstdint>

namespace autodiff {

namespace pool {

struct Stats {
    std::uint64_t requests = 0;       // blocks handed out
    std::uint64_t reused = 0;         // of those, served from a free list (no system allocation)
    std::uint64_t system_allocs = 0;  // blocks obtained from the system
    std::size_t bytes_in_use = 0;     // bytes of the blocks currently held by tensors (size classes)
    std::size_t bytes_cached = 0;     // bytes of freed blocks kept for reuse
    std::size_t peak_bytes_in_use = 0;
};

// One block of storage: a 64-byte header followed by the payload.
// A block made by adopt() instead views memory owned by someone else (a torch tensor, a mapped file).
struct Block {
    std::atomic<std::int64_t> refs{1};
    std::size_t capacity = 0;  // payload bytes (the size class); for an adopted block, its byte size
    bool adopted = false;      // views `external` (else the payload follows this header)
    void* external = nullptr;
    void (*on_release)(void* context) noexcept = nullptr;  // adopted blocks: called when the last reference goes
    void* context = nullptr;
    // Bumped by every write access to the payload through a Tensor (Tensor::data() and what is built
    // on it); a tape record compares it with the value it saw when it saved the tensor. Never reset,
    // so it only moves forward over the block's lifetime, reuse included. Relaxed load + store, not a
    // read-modify-write: two threads writing one tensor at once race on its data anyway, and a lost
    // increment still moves the version away from every value a record saw.
    std::atomic<std::uint64_t> version{0};

    [[nodiscard]] void* data() { return adopted ? external : reinterpret_cast<std::byte*>(this) + header_bytes; }
    static constexpr std::size_t header_bytes = 64;
};
static_assert(sizeof(Block) <= Block::header_bytes, "pool::Block: the header must fit before the payload");

// The largest request acquire() serves (larger ones throw std::bad_alloc): size classes and the
// header are then computed without overflow.
inline constexpr std::size_t max_bytes = std::size_t{1} << 56;

// A block of at least `bytes` payload bytes, with refs == 1. Throws std::bad_alloc on exhaustion.
Block* acquire(std::size_t bytes);
// A block viewing `bytes` bytes at `data`, which the caller owns: the pool neither caches nor frees
// that memory; the last release calls on_release(context) (may be null). Not counted in stats().
Block* adopt(void* data, std::size_t bytes, void (*on_release)(void* context) noexcept, void* context);
// Drops one reference; the last one returns the block to its free list.
void release(Block* block) noexcept;
inline void retain(Block* block) noexcept { block->refs.fetch_add(1, std::memory_order_relaxed); }

// Testing hook (exception safety): after `n` more successful acquire() calls (counted over all
// threads), the next one throws std::bad_alloc, once; n < 0 (the default) disables it. Costs acquire()
// one predictable branch when disabled.
void fail_acquire_after(std::int64_t n);

// The payload size a request of `bytes` is rounded up to.
std::size_t size_class(std::size_t bytes);

Stats stats();
void reset_stats();  // zeroes the counters; keeps bytes_in_use/bytes_cached, sets peak to bytes_in_use
// Returns every cached block to the system.
void release_cached();
// Freed blocks beyond this many cached bytes go back to the system (default: no limit).
void set_cache_limit(std::size_t bytes);

}  // namespace pool

}  // namespace autodiff

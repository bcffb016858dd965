#include "profile.hpp"

#if defined(AUTODIFF_PROFILE_KERNELS)

#include <array>
#include <atomic>
#include <chrono>

#include <fmt/core.h>
#if defined(__x86_64__) || defined(__i386__)
#include <x86intrin.h>
#endif

namespace autodiff::detail::profile {

namespace {

constexpr const char* names[count] = {
    "forward: transpose K",  "QK^T product",        "bias, additive, masks", "forward: keep scores",
    "forward: online softmax", "dropout mask",      "PV product",            "forward: O and lse",
    "backward: K^T, V^T, D", "backward: read kept S", "backward: exp",       "dV product",
    "dO V^T product",        "dS",                  "bias gradient",         "dQ product",
    "dK product",            "modifier: classify tiles", "modifier: f(x)",  "modifier: f'(x), captured"};

struct alignas(64) Counter {
    std::atomic<std::uint64_t> ticks{0};
};

struct Totals {
    std::array<Counter, count> phases;
    ~Totals() {  // at exit: the table, largest share first
        std::uint64_t total = 0;
        for (const Counter& c : phases) total += c.ticks.load();
        if (total == 0) return;
        std::array<int, count> order{};
        for (int i = 0; i < count; ++i) order[static_cast<std::size_t>(i)] = i;
        auto ticks = [&](int i) { return phases[static_cast<std::size_t>(i)].ticks.load(); };
        for (int i = 1; i < count; ++i)  // insertion sort, descending
            for (int j = i; j > 0 && ticks(order[static_cast<std::size_t>(j)]) > ticks(order[static_cast<std::size_t>(j - 1)]); --j)
                std::swap(order[static_cast<std::size_t>(j)], order[static_cast<std::size_t>(j - 1)]);
        fmt::print(stderr, "autodiff kernel profile (share of the {:.3g} G ticks inside the fused attention kernels, all threads):\n",
                   static_cast<double>(total) * 1e-9);
        for (int i : order)
            if (ticks(i)) fmt::print(stderr, "  {:<26} {:6.2f} %\n", names[i], 100.0 * static_cast<double>(ticks(i)) / static_cast<double>(total));
    }
};

Totals& totals() {
    static Totals t;
    return t;
}

}  // namespace

std::uint64_t now() {
#if defined(__x86_64__) || defined(__i386__)
    return __rdtsc();
#else
    return static_cast<std::uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count());
#endif
}

void add(Phase phase, std::uint64_t ticks) {
    totals().phases[static_cast<std::size_t>(phase)].ticks.fetch_add(ticks, std::memory_order_relaxed);
}

}  // namespace autodiff::detail::profile

#endif

#pragma once
// Threading: OpenMP over independent work items; a kernel inside one item runs single-threaded.
// The thread count follows OMP_NUM_THREADS or set_num_threads(). Every parallel loop here splits
// work so that each output value is computed by exactly one thread in a fixed order: results are
// bit-identical for any thread count.

#include <cstdint>
#include <exception>

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace autodiff {

// Sets the threads used by the library's kernels and by Eigen's products; n >= 1.
void set_num_threads(int n);
int num_threads();

// Below this much work (roughly: scalar operations) a loop stays on one thread; starting a
// parallel region costs a few microseconds, more than small attention shapes take.
inline constexpr std::int64_t parallel_grain = 1 << 17;

// Calls body(i) for i in [0, n); in parallel when n > 1 and n * cost_per_item >= parallel_grain.
template <class Body>
void parallel_for(std::int64_t n, std::int64_t cost_per_item, Body&& body) {
#if defined(_OPENMP)
    if (n > 1 && n * cost_per_item >= parallel_grain && !omp_in_parallel() && omp_get_max_threads() > 1) {
        // An exception must not leave an OpenMP region (std::terminate): the first one is kept and
        // rethrown after it, as the serial loop would throw it.
        std::exception_ptr error;
#pragma omp parallel for schedule(static)
        for (std::int64_t i = 0; i < n; ++i) {
            try {
                body(i);
            } catch (...) {
#pragma omp critical(autodiff_parallel_for_error)
                if (!error) error = std::current_exception();
            }
        }
        if (error) std::rethrow_exception(error);
        return;
    }
#else
    (void)cost_per_item;
#endif
    for (std::int64_t i = 0; i < n; ++i) body(i);
}

// Calls body(begin, end) over fixed chunks of [0, n) of `chunk` items (the split never depends on
// the thread count).
template <class Body>
void parallel_chunks(std::int64_t n, std::int64_t chunk, Body&& body) {
    const std::int64_t chunks = (n + chunk - 1) / chunk;
    parallel_for(chunks, chunk, [&](std::int64_t c) { body(c * chunk, c * chunk + chunk < n ? c * chunk + chunk : n); });
}

}  // namespace autodiff

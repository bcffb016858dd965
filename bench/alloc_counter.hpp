#pragma once
// Counts calls of the global operator new in a benchmark program (alloc_counter.cpp replaces it).
#include <cstdint>

namespace bench {
std::uint64_t heap_allocations();
}

#pragma once
// The one random number generator of the library: Philox4x32-10 (Salmon et al., "Parallel random numbers:
// as easy as 1, 2, 3", SC 2011), a counter-based generator. Its output is a pure function of
// (key, counter), so the value for element i never depends on tiling, thread count or call order.
// Dropout keys it with the seed and uses (element index / 4, offset) as the counter.

#include <array>
#include <cmath>
#include <cstdint>

namespace autodiff {

struct Philox4x32 {
    using Counter = std::array<std::uint32_t, 4>;
    using Key = std::array<std::uint32_t, 2>;

    static constexpr Counter generate(Counter c, Key k) {
        constexpr std::uint32_t m0 = 0xD2511F53u, m1 = 0xCD9E8D57u;
        constexpr std::uint32_t w0 = 0x9E3779B9u, w1 = 0xBB67AE85u;
        for (int round = 0; round < 10; ++round) {
            const std::uint64_t p0 = std::uint64_t{m0} * c[0];
            const std::uint64_t p1 = std::uint64_t{m1} * c[2];
            c = {static_cast<std::uint32_t>(p1 >> 32) ^ c[1] ^ k[0], static_cast<std::uint32_t>(p1),
                 static_cast<std::uint32_t>(p0 >> 32) ^ c[3] ^ k[1], static_cast<std::uint32_t>(p0)};
            k[0] += w0;
            k[1] += w1;
        }
        return c;
    }

    // generate() for the N consecutive counters (first_block + k, offset), k < N, written lane by lane
    // so the compiler vectorises it: out[4k + l] = generate(block first_block + k)[l], i.e. the bits of
    // elements 4·first_block ... 4·(first_block + N) − 1 of stream (seed, offset).
    template <int N>
    static void generate_blocks(std::uint64_t first_block, std::uint64_t offset, Key k, std::uint32_t* out) {
        constexpr std::uint32_t m0 = 0xD2511F53u, m1 = 0xCD9E8D57u;
        constexpr std::uint32_t w0 = 0x9E3779B9u, w1 = 0xBB67AE85u;
        std::uint32_t c0[N], c1[N], c2[N], c3[N];
        for (int j = 0; j < N; ++j) {
            const std::uint64_t block = first_block + static_cast<std::uint64_t>(j);
            c0[j] = static_cast<std::uint32_t>(block);
            c1[j] = static_cast<std::uint32_t>(block >> 32);
            c2[j] = static_cast<std::uint32_t>(offset);
            c3[j] = static_cast<std::uint32_t>(offset >> 32);
        }
        for (int round = 0; round < 10; ++round) {
            for (int j = 0; j < N; ++j) {
                const std::uint64_t p0 = std::uint64_t{m0} * c0[j];
                const std::uint64_t p1 = std::uint64_t{m1} * c2[j];
                const std::uint32_t n0 = static_cast<std::uint32_t>(p1 >> 32) ^ c1[j] ^ k[0];
                const std::uint32_t n2 = static_cast<std::uint32_t>(p0 >> 32) ^ c3[j] ^ k[1];
                c1[j] = static_cast<std::uint32_t>(p1);
                c3[j] = static_cast<std::uint32_t>(p0);
                c0[j] = n0;
                c2[j] = n2;
            }
            k[0] += w0;
            k[1] += w1;
        }
        for (int j = 0; j < N; ++j) {
            out[4 * j] = c0[j];
            out[4 * j + 1] = c1[j];
            out[4 * j + 2] = c2[j];
            out[4 * j + 3] = c3[j];
        }
    }

    // The 32 random bits for element `index` of stream (seed, offset).
    static constexpr std::uint32_t bits(std::uint64_t seed, std::uint64_t offset, std::uint64_t index) {
        const std::uint64_t block = index >> 2;
        const Counter c = generate({static_cast<std::uint32_t>(block), static_cast<std::uint32_t>(block >> 32),
                                    static_cast<std::uint32_t>(offset), static_cast<std::uint32_t>(offset >> 32)},
                                   {static_cast<std::uint32_t>(seed), static_cast<std::uint32_t>(seed >> 32)});
        return c[index & 3];
    }
};

// Uniform in [0, 1) with 24 random bits (exactly representable in float and double).
inline double uniform01(std::uint32_t bits) { return static_cast<double>(bits >> 8) * 0x1.0p-24; }

}  // namespace autodiff

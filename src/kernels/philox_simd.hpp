#pragma once
// Philox4x32-10 for 16 consecutive counters at once (internal to src/kernels): the dropout factors
// of a 64-element row. The compiler vectorises Philox4x32::generate_blocks with 64-bit multiplies
// (vpmullq); with AVX-512 this version uses the 32×32→64 multiply (vpmuludq) on 8 counters per
// register and interleaves the four words with two permutes. The dropout factors of a 64-element
// row (dropout_factors) went from 68 to 39–44 ns on Zen 4 with it and the 32-bit threshold compare;
// they had been 19 % of a fused attention step with dropout. Same bits as Philox4x32::generate.

#include <cstdint>

#include "autodiff/random.hpp"
#include "autodiff/detail/simd.hpp"

namespace autodiff::detail {

#if defined(__GNUC__) && !defined(__clang__)
// GCC 12 reports the arguments of its own AVX-512 intrinsics as uninitialized here (bug 105593).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

// out[4k + l] = Philox4x32::generate({first_block + k, offset}, key)[l] for k < 16.
inline void philox_blocks16(std::uint64_t first_block, std::uint64_t offset, Philox4x32::Key key, std::uint32_t* out) {
#if defined(__AVX512F__)
    // Lanes hold one counter word in their low 32 bits; the high bits carry junk that never reaches
    // a low half (the multiply reads low halves only, xor and shifts keep halves apart) and is
    // cleared before the words are packed.
    const __m512i low = _mm512_set1_epi64(0xFFFFFFFF), m0 = _mm512_set1_epi64(0xD2511F53), m1 = _mm512_set1_epi64(0xCD9E8D57);
    const __m512i iota = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0);
    __m512i c0[2], c1[2], c2[2], c3[2];
    for (int h = 0; h < 2; ++h) {
        const __m512i block = _mm512_add_epi64(_mm512_set1_epi64(static_cast<long long>(first_block + 8 * static_cast<std::uint64_t>(h))), iota);
        c0[h] = block;
        c1[h] = _mm512_srli_epi64(block, 32);
        c2[h] = _mm512_set1_epi64(static_cast<long long>(offset & 0xFFFFFFFF));
        c3[h] = _mm512_set1_epi64(static_cast<long long>(offset >> 32));
    }
    for (int round = 0; round < 10; ++round) {
        const __m512i k0 = _mm512_set1_epi64(key[0]), k1 = _mm512_set1_epi64(key[1]);
        for (int h = 0; h < 2; ++h) {
            const __m512i p0 = _mm512_mul_epu32(c0[h], m0), p1 = _mm512_mul_epu32(c2[h], m1);
            c0[h] = _mm512_xor_si512(_mm512_xor_si512(_mm512_srli_epi64(p1, 32), c1[h]), k0);
            c2[h] = _mm512_xor_si512(_mm512_xor_si512(_mm512_srli_epi64(p0, 32), c3[h]), k1);
            c1[h] = p1;
            c3[h] = p0;
        }
        key[0] += 0x9E3779B9u;
        key[1] += 0xBB67AE85u;
    }
    const __m512i first_half = _mm512_set_epi64(11, 3, 10, 2, 9, 1, 8, 0), second_half = _mm512_set_epi64(15, 7, 14, 6, 13, 5, 12, 4);
    for (int h = 0; h < 2; ++h) {
        // 64-bit lane k of a: words 0 and 1 of counter k; of b: words 2 and 3.
        const __m512i a = _mm512_or_si512(_mm512_and_si512(c0[h], low), _mm512_slli_epi64(c1[h], 32));
        const __m512i b = _mm512_or_si512(_mm512_and_si512(c2[h], low), _mm512_slli_epi64(c3[h], 32));
        _mm512_storeu_si512(out + 32 * h, _mm512_permutex2var_epi64(a, first_half, b));
        _mm512_storeu_si512(out + 32 * h + 16, _mm512_permutex2var_epi64(a, second_half, b));
    }
#else
    Philox4x32::generate_blocks<16>(first_block, offset, key, out);
#endif
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

}  // namespace autodiff::detail

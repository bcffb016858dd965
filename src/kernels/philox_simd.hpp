#pragma once
// Philox4x32-10 for 16 consecutive counters at once (internal to src/kernels): the dropout keep mask
// of 64 consecutive elements as the bits of one word. The compiler vectorises
// Philox4x32::generate_blocks with 64-bit multiplies (vpmullq); with AVX-512 this version uses the
// 32×32→64 multiply (vpmuludq) on 8 counters per register, compares each word with the threshold in
// place (a masked 32-bit compare of the low halves) and interleaves the four words' masks with pdep,
// so no word is stored. Same bits as Philox4x32::generate. The mask of a 64-element row went from 68
// to 39–44 ns on Zen 4 with the vectorised rounds (it had been 19 % of a fused attention step with
// dropout); the in-register compare took it from 23–26 to 19 ns on the EPYC of 2026-12-03.
//
// Multiplying by a kept-bits mask (multiply_by_keep) is here too: the fused attention kernel and
// the dropout kernel both apply masks that way.

#include <cstdint>

#include "autodiff/detail/simd.hpp"
#include "autodiff/random.hpp"

namespace autodiff::detail {

#if defined(__GNUC__) && !defined(__clang__)
// GCC 12 reports the arguments of its own AVX-512 intrinsics as uninitialized here (bug 105593).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

// Bit 4k + l of the result is set when word l of Philox4x32::generate({first_block + k, offset}, key)
// is at least `threshold` (k < 16): the keep decisions of elements 4·first_block ... 4·first_block + 63.
inline std::uint64_t philox_keep_bits16(std::uint64_t first_block, std::uint64_t offset, Philox4x32::Key key,
                                        std::uint32_t threshold) {
#if defined(__AVX512F__) && defined(__BMI2__)
    // Lanes hold one counter word in their low 32 bits; the high bits carry junk that never reaches
    // a low half (the multiply reads low halves only, xor and shifts keep halves apart), and the
    // compares read the low halves only (the even 32-bit lanes).
    const __m512i m0 = _mm512_set1_epi64(0xD2511F53), m1 = _mm512_set1_epi64(0xCD9E8D57);
    const __m512i iota = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0);
    __m512i c0[2], c1[2], c2[2], c3[2];
    for (int h = 0; h < 2; ++h) {
        const __m512i block = _mm512_add_epi64(_mm512_set1_epi64(static_cast<long long>(first_block + 8 * static_cast<std::uint64_t>(h))), iota);
        c0[h] = block;
        c1[h] = _mm512_srli_epi64(block, 32);
        c2[h] = _mm512_set1_epi64(static_cast<long long>(offset & 0xFFFFFFFF));
        c3[h] = _mm512_set1_epi64(static_cast<long long>(offset >> 32));
    }
    // The round keys advance in vectors (their low halves wrap like 32-bit words): one add per round
    // instead of a broadcast from a general register.
    __m512i k0 = _mm512_set1_epi64(key[0]), k1 = _mm512_set1_epi64(key[1]);
    const __m512i w0 = _mm512_set1_epi64(0x9E3779B9), w1 = _mm512_set1_epi64(0xBB67AE85);
    for (int round = 0; round < 10; ++round) {
        for (int h = 0; h < 2; ++h) {
            const __m512i p0 = _mm512_mul_epu32(c0[h], m0), p1 = _mm512_mul_epu32(c2[h], m1);
            c0[h] = _mm512_xor_si512(_mm512_xor_si512(_mm512_srli_epi64(p1, 32), c1[h]), k0);
            c2[h] = _mm512_xor_si512(_mm512_xor_si512(_mm512_srli_epi64(p0, 32), c3[h]), k1);
            c1[h] = p1;
            c3[h] = p0;
        }
        k0 = _mm512_add_epi32(k0, w0);
        k1 = _mm512_add_epi32(k1, w1);
    }
    const __m512i t = _mm512_set1_epi32(static_cast<int>(threshold));
    constexpr __mmask16 low_halves = 0x5555;
    std::uint64_t bits = 0;
    for (int h = 0; h < 2; ++h) {
        // Bit 2k of w_l: word l of counter 8h + k kept. Words 0, 1 of counter k go to bits 4k, 4k + 1
        // of this half's 32 bits, words 2, 3 to bits 4k + 2, 4k + 3.
        const std::uint32_t w0 = _mm512_mask_cmpge_epu32_mask(low_halves, c0[h], t), w1 = _mm512_mask_cmpge_epu32_mask(low_halves, c1[h], t);
        const std::uint32_t w2 = _mm512_mask_cmpge_epu32_mask(low_halves, c2[h], t), w3 = _mm512_mask_cmpge_epu32_mask(low_halves, c3[h], t);
        const std::uint32_t half = _pdep_u32(w0 | (w1 << 1), 0x33333333u) | _pdep_u32(w2 | (w3 << 1), 0xCCCCCCCCu);
        bits |= std::uint64_t{half} << (32 * h);
    }
    return bits;
#else
    alignas(64) std::uint32_t words[64];
    Philox4x32::generate_blocks<16>(first_block, offset, key, words);
    std::uint64_t bits = 0;
    for (int e = 0; e < 64; ++e) bits |= std::uint64_t{words[e] >= threshold} << e;
    return bits;
#endif
}

// dst[c] = src[c]·(bit c of keep ? scale : 0) for c < n <= 64 (dst may be src). A multiply, not a
// select: a dropped NaN stays NaN, as in the generic dropout node.
template <class T>
inline void multiply_by_keep(const T* src, T* dst, std::int64_t n, std::uint64_t keep, T scale) {
#if defined(__AVX512F__)
    using V = typename Simd<T, simd_bytes>::type;
    constexpr int W = Simd<T, simd_bytes>::lanes;
    auto factor = [&](std::uint64_t bits) {
        if constexpr (sizeof(T) == 4) return bit_cast<V>(_mm512_maskz_mov_ps(static_cast<__mmask16>(bits), _mm512_set1_ps(scale)));
        else return bit_cast<V>(_mm512_maskz_mov_pd(static_cast<__mmask8>(bits), _mm512_set1_pd(scale)));
    };
    std::int64_t c = 0;
    for (; c + W <= n; c += W, keep >>= W) store(dst + c, load<V>(src + c) * factor(keep));
    if (c < n) store_first(dst + c, load_first(src + c, n - c, T(0)) * factor(keep), n - c);
#else
    for (std::int64_t c = 0; c < n; ++c) dst[c] = src[c] * ((keep >> c) & 1 ? scale : T(0));
#endif
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

}  // namespace autodiff::detail

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

#include <algorithm>
#include <array>
#include <cstdint>
#include <limits>
#include <utility>

#include "autodiff/detail/simd.hpp"
#include "autodiff/kernels/dropout.hpp"
#include "autodiff/random.hpp"

namespace autodiff::detail {

#if defined(__GNUC__) && !defined(__clang__)
// GCC 12 reports the arguments of its own AVX-512 intrinsics as uninitialized here (bug 105593).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

// Philox's ten round keys of `key`, worked out once per mask instead of advanced in every call, and
// stored as the vectors the rounds xor with (memory operands, no broadcast instructions): words
// k0, k1 of round r in every 64-bit lane of k[2r] and k[2r + 1] (high halves clear). The mask of a
// 64-element row went from 29.9-30.3 ns (dropout_keep_bits, keys advanced in every call) to
// 26.3-27.2 ns (DropoutKeepBits) on the EPYC of 2026-12-04.
// Without AVX-512 only the key itself is kept (the scalar Philox advances it).
struct PhiloxRoundKeys {
#if defined(__AVX512F__) && defined(__BMI2__)
    alignas(64) std::uint64_t k[20][8];
#endif
    Philox4x32::Key key;
};
inline PhiloxRoundKeys philox_round_keys(Philox4x32::Key key) {
    PhiloxRoundKeys rk;
    rk.key = key;
#if defined(__AVX512F__) && defined(__BMI2__)
    // Written row by row from two scalars. The first version (a lane loop storing key[0], key[1] and
    // advancing the std::array in the round loop) came out wrong when inlined into dropout.cpp's
    // apply_dropout_mask, whose lambda reaches an OpenMP region: with GCC 12 -O3 -fopenmp (no AVX-512)
    // every row after the first held other values (reproduced in isolation), and on the GPU machine's
    // host (GCC 13, AVX-512) the masks differed from dropout_keeps too; GCC 12 with AVX-512 was right.
    // tests/test_kernels.cpp and test_fused.cpp check the masks against dropout_keeps.
    std::uint64_t k0 = key[0], k1 = key[1];
    for (int round = 0; round < 10; ++round) {
        std::fill_n(rk.k[2 * round], 8, k0);
        std::fill_n(rk.k[2 * round + 1], 8, k1);
        k0 = (k0 + 0x9E3779B9u) & 0xFFFFFFFFu;
        k1 = (k1 + 0xBB67AE85u) & 0xFFFFFFFFu;
    }
#endif
    return rk;
}

// Bit 4k + l of the result is set when word l of Philox4x32::generate({first_block + k, offset}, key)
// is at least `threshold` (k < 16): the keep decisions of elements 4·first_block ... 4·first_block + 63.
// rk = philox_round_keys(key).
inline std::uint64_t philox_keep_bits16(std::uint64_t first_block, std::uint64_t offset, const PhiloxRoundKeys& rk,
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
    for (int round = 0; round < 10; ++round) {
        const __m512i k0 = _mm512_load_si512(rk.k[2 * round]), k1 = _mm512_load_si512(rk.k[2 * round + 1]);
        for (int h = 0; h < 2; ++h) {
            const __m512i p0 = _mm512_mul_epu32(c0[h], m0), p1 = _mm512_mul_epu32(c2[h], m1);
            c0[h] = _mm512_ternarylogic_epi64(_mm512_srli_epi64(p1, 32), c1[h], k0, 0x96);  // a ^ b ^ c
            c2[h] = _mm512_ternarylogic_epi64(_mm512_srli_epi64(p0, 32), c3[h], k1, 0x96);
            c1[h] = p1;
            c3[h] = p0;
        }
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
    Philox4x32::generate_blocks<16>(first_block, offset, rk.key, words);
    std::uint64_t bits = 0;
    for (int e = 0; e < 64; ++e) bits |= std::uint64_t{words[e] >= threshold} << e;
    return bits;
#endif
}
inline std::uint64_t philox_keep_bits16(std::uint64_t first_block, std::uint64_t offset, Philox4x32::Key key, std::uint32_t threshold) {
    return philox_keep_bits16(first_block, offset, philox_round_keys(key), threshold);
}

// dropout_keep_bits (dropout.hpp) with the descriptor's round keys and threshold worked out once:
// keep_bits(first, n) == dropout_keep_bits(d, first, n).
class DropoutKeepBits {
public:
    explicit DropoutKeepBits(const DropoutDescriptor& d)
        : rk_(philox_round_keys({static_cast<std::uint32_t>(d.seed), static_cast<std::uint32_t>(d.seed >> 32)})),
          offset_(d.offset),
          threshold_(dropout_threshold(d.rate)) {}

    [[nodiscard]] std::uint64_t operator()(std::uint64_t first, std::int64_t n) const {
        if (threshold_ > 0xFFFFFFFFu) return 0;  // a rate within 2^-33 of 1 drops everything
        // A 32-bit comparison: 16 lanes wide instead of widening every word to 64 bits.
        const auto threshold32 = static_cast<std::uint32_t>(threshold_);
        const std::uint64_t block = first >> 2;
        const auto skip = static_cast<int>(first & 3);
        std::uint64_t bits = philox_keep_bits16(block, offset_, rk_, threshold32) >> skip;
        if (skip + n > 64) {  // 64 elements starting inside a block of 4 words span 17 blocks
            const std::uint64_t last = block + 16;
            const auto words = Philox4x32::generate({static_cast<std::uint32_t>(last), static_cast<std::uint32_t>(last >> 32),
                                                     static_cast<std::uint32_t>(offset_), static_cast<std::uint32_t>(offset_ >> 32)},
                                                    rk_.key);
            for (int l = 0; l < skip; ++l) bits |= std::uint64_t{words[static_cast<std::size_t>(l)] >= threshold32} << (64 - skip + l);
        }
        return n < 64 ? bits & ((std::uint64_t{1} << n) - 1) : bits;
    }

private:
    PhiloxRoundKeys rk_;
    std::uint64_t offset_;
    std::uint64_t threshold_;
};

#if defined(__AVX512F__)
// The vector of scale where the low bits of `bits` are set and 0 elsewhere (one lane per bit): the
// factor the dropout passes below multiply by.
template <class T>
inline typename Simd<T, simd_bytes>::type keep_factor(std::uint64_t bits, T scale) {
    using V = typename Simd<T, simd_bytes>::type;
    if constexpr (sizeof(T) == 4) return bit_cast<V>(_mm512_maskz_mov_ps(static_cast<__mmask16>(bits), _mm512_set1_ps(scale)));
    else return bit_cast<V>(_mm512_maskz_mov_pd(static_cast<__mmask8>(bits), _mm512_set1_pd(scale)));
}
#endif

// dst[c] = src[c]·(bit c of keep ? scale : 0) for c < n <= 64 (dst may be src). A multiply, not a
// select: a dropped NaN stays NaN, as in the generic dropout node.
template <class T>
inline void multiply_by_keep(const T* src, T* dst, std::int64_t n, std::uint64_t keep, T scale) {
#if defined(__AVX512F__)
    using V = typename Simd<T, simd_bytes>::type;
    constexpr int W = Simd<T, simd_bytes>::lanes;
    auto factor = [&](std::uint64_t bits) { return keep_factor<T>(bits, scale); };
    std::int64_t c = 0;
    for (; c + W <= n; c += W, keep >>= W) store(dst + c, load<V>(src + c) * factor(keep));
    if (c < n) store_first(dst + c, load_first(src + c, n - c, T(0)) * factor(keep), n - c);
#else
    for (std::int64_t c = 0; c < n; ++c) dst[c] = src[c] * ((keep >> c) & 1 ? scale : T(0));
#endif
}

// The fused attention kernel's two dropout passes, each folded into a pass it makes anyway (the separate
// multiply_by_keep sweeps over the tile were a third of what dropout cost the fused step). Same
// products, in the same order, as the unfused sequences they replace, so results are bitwise those.
//
// dst[c] = e^(src[c] − shift)·(bit c of keep ? scale : 0) for c < n <= 64 (dst may be src); returns
// Σ e^(src[c] − shift) of the undropped values: exp_shifted_sum followed by multiply_by_keep.
template <class T>
inline T exp_shifted_sum_keep(const T* src, T* dst, std::int64_t n, T shift, std::uint64_t keep, T scale) {
#if defined(__AVX512F__)
    using V = typename Simd<T, simd_bytes>::type;
    constexpr int W = Simd<T, simd_bytes>::lanes;
    auto factor = [&](std::uint64_t bits) { return keep_factor<T>(bits, scale); };
    V acc = V{};
    std::int64_t c = 0;
    for (; c + W <= n; c += W, keep >>= W) {
        const V e = vexp<T, simd_bytes>(load<V>(src + c) - shift);
        store(dst + c, e * factor(keep));
        acc += e;
    }
    if (c < n) {  // the tail: lanes past n hold e^−∞ = 0
        const V e = vexp<T, simd_bytes>(load_first(src + c, n - c, -std::numeric_limits<T>::infinity()) - shift);
        acc += e;
        store_first(dst + c, e * factor(keep), n - c);
    }
    return reduce<T, simd_bytes>(acc, [](auto a, auto b) { return a + b; });
#else
    const T sum = exp_shifted_sum(src, dst, n, shift);
    multiply_by_keep(dst, dst, n, keep, scale);
    return sum;
#endif
}

// The backward's dS with dropout, for c < n <= 64, with f_c = (bit c of keep ? scale : 0):
//   ds[c] = p[c]·(ds[c]·f_c − D)   (dS = P ⊙ (mask ⊙ dP − D), ds holding dP = dO·Vᵀ on entry)
//   p[c]  = p[c]·f_c               (dropout(P), for dV = dropout(P)ᵀ·dO)
// in one pass: multiply_by_keep of ds and of p followed by ds = p·(ds − D). The product ds·f_c is
// kept out of a fused multiply-add (it was rounded through memory before), so results are bitwise
// those of the separate passes.
template <class T>
inline void dropout_ds(T* p, T* ds, std::int64_t n, std::uint64_t keep, T scale, T D) {
#if defined(__AVX512F__)
    using V = typename Simd<T, simd_bytes>::type;
    constexpr int W = Simd<T, simd_bytes>::lanes;
    auto factor = [&](std::uint64_t bits) { return keep_factor<T>(bits, scale); };
    auto step = [&](V pv, V dp, V f) {
        V masked = dp * f;
        asm("" : "+v"(masked));  // no FMA contraction of the product into the subtraction
        return std::pair<V, V>{pv * (masked - D), pv * f};
    };
    std::int64_t c = 0;
    for (; c + W <= n; c += W, keep >>= W) {
        const auto [d_new, p_new] = step(load<V>(p + c), load<V>(ds + c), factor(keep));
        store(ds + c, d_new);
        store(p + c, p_new);
    }
    if (c < n) {
        const auto [d_new, p_new] = step(load_first(p + c, n - c, T(0)), load_first(ds + c, n - c, T(0)), factor(keep));
        store_first(ds + c, d_new, n - c);
        store_first(p + c, p_new, n - c);
    }
#else
    multiply_by_keep(ds, ds, n, keep, scale);
    for (std::int64_t c = 0; c < n; ++c) ds[c] = p[c] * (ds[c] - D);
    multiply_by_keep(p, p, n, keep, scale);
#endif
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

}  // namespace autodiff::detail

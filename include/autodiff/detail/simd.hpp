#pragma once
// SIMD helpers for the row loops of the softmax and fused attention kernels and of the attention
// modifiers generated from expressions (expr/modifier.hpp): internal, not part of the public API,
// written with GCC/Clang vector extensions so that -march=native picks the widest registers.
//
// exp: Eigen's vectorised exp is accurate but is called through a Map per row, and its −∞ lanes come
// out as ~1e-38 instead of 0 (which needed a second blending pass). The exp here is Cephes' range
// reduction and polynomial (float: degree-6 minimax, ≤ 2 ulp; double: degree-13 Taylor, ≤ 2 ulp),
// with e^−∞ = 0 exactly, NaN propagated, +∞ above the largest finite result, and 0 below e^−86.6
// (float) / e^−707 (double) (AVX-512: subnormal results down to the smallest). Fused with the row's
// sum, one pass over a row replaces three.

#include <array>
#include <bit>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#if defined(__SSE2__)
#include <immintrin.h>
#endif

namespace autodiff::detail {

// The target's widest vector registers. With 32 of them (AVX-512) a 6-row block of a tile product
// holds 4 vectors per row in 24 accumulators; with 16 (AVX2, SSE) it holds 2.
#if defined(__AVX512F__)
inline constexpr int simd_bytes = 64, block_vectors = 4;
#elif defined(__AVX__)
inline constexpr int simd_bytes = 32, block_vectors = 2;
#else
inline constexpr int simd_bytes = 16, block_vectors = 2;
#endif

// A vector of Bytes/sizeof(T) lanes; narrower ones serve the columns left over by the widest.
template <class T, int Bytes>
struct Simd {
    using type [[gnu::vector_size(Bytes)]] = T;
    using bits [[gnu::vector_size(Bytes)]] = std::conditional_t<sizeof(T) == 4, std::int32_t, std::int64_t>;
    static constexpr int lanes = Bytes / static_cast<int>(sizeof(T));
};

template <class V, class T>
inline V load(const T* p) {
    V v;
    std::memcpy(&v, p, sizeof(v));
    return v;
}
template <class V, class T>
inline void store(T* p, V v) {
    std::memcpy(p, &v, sizeof(v));
}
using std::bit_cast;

// The first `count` (< lanes) elements at p as a full-width vector whose other lanes are `fill`, and
// the store of a vector's first `count` lanes: the tails of rows. AVX-512 masks its loads and
// stores; elsewhere a small buffer does.
template <class T>
inline typename Simd<T, simd_bytes>::type load_first(const T* p, std::int64_t count, T fill) {
    using V = typename Simd<T, simd_bytes>::type;
#if defined(__AVX512F__)
    const auto mask = static_cast<std::uint32_t>((std::uint64_t{1} << count) - 1);
    if constexpr (sizeof(T) == 4) return bit_cast<V>(_mm512_mask_loadu_ps(_mm512_set1_ps(fill), static_cast<__mmask16>(mask), p));
    else return bit_cast<V>(_mm512_mask_loadu_pd(_mm512_set1_pd(fill), static_cast<__mmask8>(mask), p));
#else
    V v = V{} + fill;
    for (std::int64_t i = 0; i < count; ++i) v[i] = p[i];
    return v;
#endif
}
template <class T>
inline void store_first(T* p, typename Simd<T, simd_bytes>::type v, std::int64_t count) {
#if defined(__AVX512F__)
    const auto mask = static_cast<std::uint32_t>((std::uint64_t{1} << count) - 1);
    if constexpr (sizeof(T) == 4) _mm512_mask_storeu_ps(p, static_cast<__mmask16>(mask), bit_cast<__m512>(v));
    else _mm512_mask_storeu_pd(p, static_cast<__mmask8>(mask), bit_cast<__m512d>(v));
#else
    for (std::int64_t i = 0; i < count; ++i) p[i] = v[i];
#endif
}

// Lane-wise select: where `mask` is all ones take a, else b (masks come from vector comparisons).
template <class V, class M>
inline V select(M mask, V a, V b) {
    return bit_cast<V>((bit_cast<M>(a) & mask) | (bit_cast<M>(b) & ~mask));
}

template <class T>
struct ExpConstants;
template <>
struct ExpConstants<float> {
    static constexpr float lo = -86.6f, hi = 88.7228f, log2e = 1.44269504088896341f, c1 = 0.693359375f, c2 = -2.12194440e-4f;
    static constexpr float shifter = 12582912.0f;  // 1.5·2^23: adding it rounds to an integer
    static constexpr int mantissa = 23, exponent_bias = 127;
    template <class V>
    static V poly(V r) {  // e^r − 1 − r over |r| ≤ ln2/2, Cephes expf
        V p = V{} + 1.9875691500e-4f;
        p = p * r + 1.3981999507e-3f;
        p = p * r + 8.3334519073e-3f;
        p = p * r + 4.1665795894e-2f;
        p = p * r + 1.6666665459e-1f;
        p = p * r + 5.0000001201e-1f;
        return p * (r * r);
    }
};
template <>
struct ExpConstants<double> {
    static constexpr double lo = -707.0, hi = 709.782712893384, log2e = 1.4426950408889634073599, c1 = 6.93145751953125e-1,
                            c2 = 1.42860682030941723212e-6;
    static constexpr double shifter = 6755399441055744.0;  // 1.5·2^52
    static constexpr int mantissa = 52, exponent_bias = 1023;
    template <class V>
    static V poly(V r) {  // Σ_{k=2..13} r^k / k!
        constexpr double inv_fact[] = {1.0 / 6227020800.0, 1.0 / 479001600.0, 1.0 / 39916800.0, 1.0 / 3628800.0,
                                       1.0 / 362880.0,     1.0 / 40320.0,     1.0 / 5040.0,      1.0 / 720.0,
                                       1.0 / 120.0,        1.0 / 24.0,        1.0 / 6.0,         1.0 / 2.0};
        V p = V{} + inv_fact[0];
        for (int i = 1; i < 12; ++i) p = p * r + inv_fact[i];
        return p * (r * r);
    }
};

#if defined(__AVX512F__)
// AVX-512: round and scale by 2^n in one instruction each (vrndscale, vscalef), which also give the
// ±∞, 0 and NaN cases without masks: 1.5× faster than the portable version below on Zen 4.
inline __m512 vexp512(__m512 x) {
    using C = ExpConstants<float>;
    // The all-lanes masked forms: GCC 12's unmasked max/roundscale/scalef start from an undefined
    // register that -Wuninitialized reports in users' code (GCC bug 105593); the code is the same.
    constexpr __mmask16 all = 0xFFFF;
    x = _mm512_mask_max_ps(x, all, _mm512_set1_ps(-104.0f), x);  // e^−104 underflows to 0; a NaN x is kept (2nd operand)
    const __m512 n = _mm512_mask_roundscale_ps(x, all, _mm512_mul_ps(x, _mm512_set1_ps(C::log2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(C::c1), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(C::c2), r);
    return _mm512_mask_scalef_ps(n, all, _mm512_add_ps(C::poly(r), _mm512_add_ps(r, _mm512_set1_ps(1.0f))), n);
}
inline __m512d vexp512(__m512d x) {
    using C = ExpConstants<double>;
    constexpr __mmask8 all = 0xFF;
    x = _mm512_mask_max_pd(x, all, _mm512_set1_pd(-746.0), x);
    const __m512d n = _mm512_mask_roundscale_pd(x, all, _mm512_mul_pd(x, _mm512_set1_pd(C::log2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512d r = _mm512_fnmadd_pd(n, _mm512_set1_pd(C::c1), x);
    r = _mm512_fnmadd_pd(n, _mm512_set1_pd(C::c2), r);
    return _mm512_mask_scalef_pd(n, all, _mm512_add_pd(C::poly(r), _mm512_add_pd(r, _mm512_set1_pd(1.0))), n);
}
#endif

// e^x lane by lane (see the top of the file).
template <class T, int Bytes>
inline typename Simd<T, Bytes>::type vexp(typename Simd<T, Bytes>::type x) {
    using V = typename Simd<T, Bytes>::type;
#if defined(__AVX512F__)
    if constexpr (Bytes == 64) {
        if constexpr (sizeof(T) == 4) return bit_cast<V>(vexp512(bit_cast<__m512>(x)));
        else return bit_cast<V>(vexp512(bit_cast<__m512d>(x)));
    }
#endif
    using M = typename Simd<T, Bytes>::bits;
    using C = ExpConstants<T>;
    const M too_big = x > C::hi, too_small = x < C::lo;  // NaN is neither: it flows through as NaN
    const V t = x * C::log2e + C::shifter;
    const V n = t - C::shifter;  // round(x·log2 e)
    const V r = (x - n * C::c1) - n * C::c2;
    const V p = C::poly(r) + r + T(1);
    // 2^n as 2·2^(n−1): n − 1 ≥ −126 (float) keeps the exponent field normal down to lo
    const M pow2 = ((bit_cast<M>(t) - bit_cast<M>(V{} + C::shifter)) + (C::exponent_bias - 1)) << C::mantissa;
    const V e = p * bit_cast<V>(pow2) * T(2);
    return select(too_big, V{} + std::numeric_limits<T>::infinity(), select(too_small, V{}, e));
}

// The lower and upper halves of v, in registers.
template <int Half, class V, int... I>
inline auto halves(V v, std::integer_sequence<int, I...>) {
    return std::pair{__builtin_shufflevector(v, v, I...), __builtin_shufflevector(v, v, (I + Half)...)};
}

// The lanes of v reduced by halving (the upper half onto the lower, down to one lane): a fixed order,
// and log2(lanes) vector operations instead of a chain of scalar ones.
template <class T, int Bytes, class Op>
inline T reduce(typename Simd<T, Bytes>::type v, Op op) {
    if constexpr (Bytes == static_cast<int>(sizeof(T))) {
        return v[0];
    } else {
        constexpr int half = Bytes / static_cast<int>(sizeof(T)) / 2;
        const auto [lo, hi] = halves<half>(v, std::make_integer_sequence<int, half>{});
        return reduce<T, Bytes / 2>(op(lo, hi), op);
    }
}
// Lane-wise maximum that propagates NaN (nothing compares greater than a NaN lane, so it stays).
template <class V>
inline V nan_max(V m, V v) {
    return select((v > m) | (v != v), v, m);
}

// Largest element of x[0, n); NaN if any is NaN; −∞ for n = 0.
template <class T>
inline T row_max(const T* x, std::int64_t n) {
    using V = typename Simd<T, simd_bytes>::type;
    constexpr int W = Simd<T, simd_bytes>::lanes;
    V m = V{} - std::numeric_limits<T>::infinity();
    std::int64_t c = 0;
    for (; c + W <= n; c += W) m = nan_max(m, load<V>(x + c));
    if (c < n) m = nan_max(m, load_first(x + c, n - c, -std::numeric_limits<T>::infinity()));
    return reduce<T, simd_bytes>(m, [](auto a, auto b) { return nan_max(a, b); });
}

// dst[c] = e^(src[c] − shift) for c < n (dst may be src); returns Σ dst, summed in a fixed order.
// shift must not be −∞ (the callers handle rows with nothing kept before calling).
template <class T>
inline T exp_shifted_sum(const T* src, T* dst, std::int64_t n, T shift) {
    using V = typename Simd<T, simd_bytes>::type;
    constexpr int W = Simd<T, simd_bytes>::lanes;
    V acc = V{};
    std::int64_t c = 0;
    for (; c + W <= n; c += W) {
        const V e = vexp<T, simd_bytes>(load<V>(src + c) - shift);
        store(dst + c, e);
        acc += e;
    }
    if (c < n) {  // the tail: lanes past n hold e^−∞ = 0
        const V e = vexp<T, simd_bytes>(load_first(src + c, n - c, -std::numeric_limits<T>::infinity()) - shift);
        acc += e;
        store_first(dst + c, e, n - c);
    }
    return reduce<T, simd_bytes>(acc, [](auto a, auto b) { return a + b; });
}

template <class T>
inline void exp_shifted(const T* src, T* dst, std::int64_t n, T shift) {
    (void)exp_shifted_sum(src, dst, n, shift);
}

// dst[0, n) = src[0, n) with non-temporal stores where dst is vector-aligned: for data written once
// and read much later (it bypasses the caches instead of evicting the working set). Call
// stream_fence() before other threads read what was streamed.
template <class T>
inline void stream_row(T* dst, const T* src, std::int64_t n) {
    std::int64_t c = 0;
#if defined(__SSE2__)
    constexpr int W = Simd<T, simd_bytes>::lanes;
    if (reinterpret_cast<std::uintptr_t>(dst) % simd_bytes == 0)
        for (; c + W <= n; c += W) {
#if defined(__AVX512F__)
            if constexpr (sizeof(T) == 4) _mm512_stream_ps(reinterpret_cast<float*>(dst + c), _mm512_loadu_ps(reinterpret_cast<const float*>(src + c)));
            else _mm512_stream_pd(reinterpret_cast<double*>(dst + c), _mm512_loadu_pd(reinterpret_cast<const double*>(src + c)));
#elif defined(__AVX__)
            if constexpr (sizeof(T) == 4) _mm256_stream_ps(reinterpret_cast<float*>(dst + c), _mm256_loadu_ps(reinterpret_cast<const float*>(src + c)));
            else _mm256_stream_pd(reinterpret_cast<double*>(dst + c), _mm256_loadu_pd(reinterpret_cast<const double*>(src + c)));
#else
            if constexpr (sizeof(T) == 4) _mm_stream_ps(reinterpret_cast<float*>(dst + c), _mm_loadu_ps(reinterpret_cast<const float*>(src + c)));
            else _mm_stream_pd(reinterpret_cast<double*>(dst + c), _mm_loadu_pd(reinterpret_cast<const double*>(src + c)));
#endif
        }
#endif
    for (; c < n; ++c) dst[c] = src[c];
}
inline void stream_fence() {
#if defined(__SSE2__)
    _mm_sfence();
#endif
}

// Where prefetch_rows brings the lines: into every level down to L1, or into L2 only (prefetcht1). A
// 64 × 64 float tile is 16 KiB: two such tiles fetched a whole tile ahead into a 32 KiB L1 evict each
// other and the tiles being worked on before they are read; L2 (1 MiB) keeps them.
enum class PrefetchTo { l1, l2 };

// Prefetches `rows` rows of `n` elements, `stride` elements apart, into the caches: a tile of a
// large row-major matrix, whose rows are too far apart for the hardware prefetchers to follow.
template <PrefetchTo To = PrefetchTo::l1, class T>
inline void prefetch_rows(const T* p, std::int64_t rows, std::int64_t n, std::int64_t stride) {
    constexpr std::int64_t line = 64 / sizeof(T);
    constexpr int locality = To == PrefetchTo::l1 ? 3 : 2;
    for (std::int64_t r = 0; r < rows; ++r)
        for (std::int64_t c = 0; c < n; c += line) __builtin_prefetch(p + r * stride + c, 0, locality);
}

}  // namespace autodiff::detail

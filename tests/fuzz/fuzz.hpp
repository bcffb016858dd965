#pragma once
// What the fuzz targets share: reading shapes, values and flags from the fuzzer's bytes, and the
// rule that only autodiff::Error may leave a public entry point on bad input.
#include <cmath>
#include <cstddef>
#include <optional>
#include <limits>
#include <cstdint>
#include <fuzzer/FuzzedDataProvider.h>
#include <vector>

#include <autodiff/autodiff.hpp>

namespace fuzz {

namespace ad = autodiff;

// Largest dimension and element count a harness allocates (the fuzzer explores shapes, not sizes).
inline constexpr std::int64_t max_dim = 9;
inline constexpr std::int64_t max_numel = 4096;

// A dimension: mostly small, sometimes 0, negative or huge (bad input the library must reject
// before allocating).
inline std::int64_t dim(FuzzedDataProvider& in) {
    switch (in.ConsumeIntegralInRange<int>(0, 15)) {
    case 0: return 0;
    case 1: return -in.ConsumeIntegralInRange<std::int64_t>(1, 3);
    case 2: return std::int64_t{1} << in.ConsumeIntegralInRange<int>(20, 62);
    default: return in.ConsumeIntegralInRange<std::int64_t>(1, max_dim);
    }
}

// A list of dimensions of rank 0..5 (5 is one too many).
inline std::vector<std::int64_t> dims(FuzzedDataProvider& in) {
    std::vector<std::int64_t> d(in.ConsumeIntegralInRange<std::size_t>(0, 5));
    for (auto& x : d) x = dim(in);
    return d;
}

// A Shape from dims, or nothing when the library rejects it (an Error, as it must).
inline bool make_shape(const std::vector<std::int64_t>& d, ad::Shape& out) {
    try {
        ad::Shape s;
        for (std::int64_t x : d) s.push_back(x);
        out = s;
        return true;
    } catch (const ad::Error&) {
        return false;
    }
}

// Whether a tensor of this shape is small enough to allocate here.
inline bool small(const ad::Shape& s) {
    std::int64_t n = 1;
    for (int i = 0; i < s.rank(); ++i) {
        if (s[i] > max_numel) return false;
        n *= s[i];
        if (n > max_numel) return false;
    }
    return true;
}

// A shape small enough to allocate (rank 0..4).
inline ad::Shape small_shape(FuzzedDataProvider& in, int min_rank = 0, int max_rank = 4) {
    ad::Shape s;
    const int r = in.ConsumeIntegralInRange<int>(min_rank, max_rank);
    for (int i = 0; i < r; ++i) s.push_back(in.ConsumeIntegralInRange<std::int64_t>(0, 5));
    return s;
}

// A value: mostly ordinary, sometimes ±inf, NaN, huge or tiny.
template <class T>
T value(FuzzedDataProvider& in) {
    switch (in.ConsumeIntegralInRange<int>(0, 19)) {
    case 0: return std::numeric_limits<T>::infinity();
    case 1: return -std::numeric_limits<T>::infinity();
    case 2: return std::numeric_limits<T>::quiet_NaN();
    case 3: return static_cast<T>(1e4);
    case 4: return static_cast<T>(-1e30);
    case 5: return std::numeric_limits<T>::denorm_min();
    default: return static_cast<T>(in.ConsumeFloatingPointInRange<double>(-4.0, 4.0));
    }
}

template <class T>
ad::Tensor<T> tensor(FuzzedDataProvider& in, const ad::Shape& s) {
    ad::Tensor<T> t(s);
    const bool special = in.ConsumeBool();
    for (std::int64_t i = 0; i < t.numel(); ++i)
        t.data()[i] = special ? value<T>(in) : static_cast<T>(std::sin(0.7 * static_cast<double>(i)));
    return t;
}

inline ad::Tensor<bool> bool_tensor(FuzzedDataProvider& in, const ad::Shape& s) {
    ad::Tensor<bool> t(s);
    const int mode = in.ConsumeIntegralInRange<int>(0, 2);  // all kept, all dropped, random
    for (std::int64_t i = 0; i < t.numel(); ++i) t.data()[i] = mode == 0 || (mode == 2 && in.ConsumeBool());
    return t;
}

// A rate: valid in [0, 1) mostly; sometimes 1, negative, NaN or infinite (rejected).
inline double rate(FuzzedDataProvider& in) {
    switch (in.ConsumeIntegralInRange<int>(0, 9)) {
    case 0: return 1.0;
    case 1: return -0.5;
    case 2: return std::numeric_limits<double>::quiet_NaN();
    case 3: return std::numeric_limits<double>::infinity();
    case 4: return 0.0;
    default: return in.ConsumeFloatingPointInRange<double>(0.0, 0.999);
    }
}

inline ad::DropoutDescriptor dropout(FuzzedDataProvider& in) {
    return {rate(in), in.ConsumeIntegral<std::uint64_t>(), in.ConsumeIntegral<std::uint64_t>(), in.ConsumeBool()};
}

// Runs f; an autodiff::Error is the documented answer to bad input, anything else escapes.
template <class F>
void guarded(F&& f) {
    try {
        f();
    } catch (const ad::Error&) {
    }
}

}  // namespace fuzz

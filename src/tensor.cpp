#include "autodiff/tensor.hpp"

#include <cmath>
#include <numbers>

#include "autodiff/random.hpp"

namespace autodiff {

namespace {
// Streams of the tensor factories, kept apart from dropout's offsets by a fixed high bit pattern.
constexpr std::uint64_t randn_stream = 0xA5A5'0000'0000'0001ull;
constexpr std::uint64_t uniform_stream = 0xA5A5'0000'0000'0002ull;
}  // namespace

template <class T>
Tensor<T> randn(const Shape& shape, std::uint64_t seed) {
    Tensor<T> t(shape);
    T* out = t.data();
    const std::int64_t n = t.numel();
    for (std::int64_t i = 0; i < n; ++i) {
        const auto k = static_cast<std::uint64_t>(i) * 2;
        // Box-Muller; u1 in (0, 1] so the logarithm is finite.
        const double u1 = uniform01(Philox4x32::bits(seed, randn_stream, k)) + 0x1.0p-24;
        const double u2 = uniform01(Philox4x32::bits(seed, randn_stream, k + 1));
        out[i] = static_cast<T>(std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * std::numbers::pi * u2));
    }
    return t;
}

template <class T>
Tensor<T> uniform(const Shape& shape, T lo, T hi, std::uint64_t seed) {
    if (!(lo < hi) || !std::isfinite(lo) || !std::isfinite(hi))
        fail("uniform", "need finite lo < hi, got lo = {} and hi = {}", lo, hi);
    Tensor<T> t(shape);
    T* out = t.data();
    // lo + (hi - lo)·u can round up to hi (u = 1 - 2^-24 with lo = 1, hi = 2 in float): such draws
    // are moved to the largest value below hi, keeping the range [lo, hi).
    const T below_hi = std::nextafter(hi, lo);
    for (std::int64_t i = 0; i < t.numel(); ++i) {
        const T v = lo + (hi - lo) * static_cast<T>(uniform01(Philox4x32::bits(seed, uniform_stream, static_cast<std::uint64_t>(i))));
        out[i] = v < hi ? v : below_hi;
    }
    return t;
}

namespace {
// Prints dimension Dim of the block starting at `offset` that holds `block` elements (the product of
// dimensions Dim.. of the shape). Dim is a template parameter so that the recursion ends at max_rank by
// construction: no instantiation indexes a dimension past Shape's storage, whatever rank() says at run
// time (GCC 13 cannot prove rank() <= max_rank through the inlined recursion and warns -Warray-bounds).
template <int Dim, class T>
void append_nested(std::string& s, const T* data, const Shape& shape, std::int64_t offset, std::int64_t block,
                   int max_per_dim) {
    if constexpr (Dim < max_rank) {
        if (Dim < shape.rank()) {
            const std::int64_t n = shape[Dim];
            const std::int64_t stride = n > 0 ? block / n : 0;
            s += '[';
            const int half = max_per_dim / 2;  // shown at each end of an elided dimension
            for (std::int64_t i = 0; i < n; ++i) {
                if (i == half && n > max_per_dim) {
                    s += "...";
                    if (half == 0) break;  // nothing to show after the ellipsis (i = n would read past the end)
                    s += ", ";
                    i = n - half;
                }
                append_nested<Dim + 1>(s, data, shape, offset + i * stride, stride, max_per_dim);
                if (i + 1 < n) s += Dim + 1 == shape.rank() ? ", " : ",\n" + std::string(std::size_t{Dim + 1}, ' ');
            }
            s += ']';
            return;
        }
    }
    if constexpr (std::is_same_v<T, bool>)
        s += data[offset] ? '1' : '0';
    else
        s += fmt::format("{:.6g}", data[offset]);
}
}  // namespace

template <class T>
std::string to_string(const Tensor<T>& t, int max_per_dim) {
    if (!t.defined()) return "Tensor(undefined)";
    std::string s = fmt::format("Tensor{} ", t.shape());
    append_nested<0>(s, t.data(), t.shape(), 0, t.numel(), max_per_dim);
    return s;
}

template <class T>
T max_abs_diff(const Tensor<T>& a, const Tensor<T>& b) {
    if (a.shape() != b.shape()) fail("max_abs_diff", "shapes differ: a {} vs b {}", a.shape(), b.shape());
    if (a.numel() == 0) return T(0);
    return (a.array() - b.array()).abs().maxCoeff();
}

#define AUTODIFF_INSTANTIATE(T)                                                         \
    template Tensor<T> randn<T>(const Shape&, std::uint64_t);                           \
    template Tensor<T> uniform<T>(const Shape&, T, T, std::uint64_t);                   \
    template std::string to_string<T>(const Tensor<T>&, int);                           \
    template T max_abs_diff<T>(const Tensor<T>&, const Tensor<T>&);
AUTODIFF_INSTANTIATE(float)
AUTODIFF_INSTANTIATE(double)
#undef AUTODIFF_INSTANTIATE
template std::string to_string<bool>(const Tensor<bool>&, int);

}  // namespace autodiff

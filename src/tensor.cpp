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
template <class T>
void append_nested(std::string& s, const T* data, const Shape& shape, int dim, std::int64_t offset, int max_per_dim) {
    if (dim == shape.rank()) {
        if constexpr (std::is_same_v<T, bool>)
            s += data[offset] ? '1' : '0';
        else
            s += fmt::format("{:.6g}", data[offset]);
        return;
    }
    std::int64_t stride = 1;
    for (int d = dim + 1; d < shape.rank(); ++d) stride *= shape[d];
    s += '[';
    const std::int64_t n = shape[dim];
    for (std::int64_t i = 0; i < n; ++i) {
        if (i == max_per_dim / 2 && n > max_per_dim) {
            s += "..., ";
            i = n - max_per_dim / 2;
        }
        append_nested(s, data, shape, dim + 1, offset + i * stride, max_per_dim);
        if (i + 1 < n) s += dim + 1 == shape.rank() ? ", " : ",\n" + std::string(static_cast<std::size_t>(dim + 1), ' ');
    }
    s += ']';
}
}  // namespace

template <class T>
std::string to_string(const Tensor<T>& t, int max_per_dim) {
    if (!t.defined()) return "Tensor(undefined)";
    std::string s = fmt::format("Tensor{} ", t.shape());
    append_nested(s, t.data(), t.shape(), 0, 0, max_per_dim);
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

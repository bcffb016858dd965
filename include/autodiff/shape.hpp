#pragma once
// Shape: the dimensions of a dense row-major tensor of rank 0 to 4, plus the one broadcasting helper.
//
// Indices and sizes are std::int64_t everywhere: n·h·Lq·Lk passes 2^31 at realistic sizes.

#include <array>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <string_view>

#include <fmt/format.h>

#include "autodiff/error.hpp"

namespace autodiff {

inline constexpr int max_rank = 4;

class Shape {
public:
    constexpr Shape() = default;
    Shape(std::initializer_list<std::int64_t> dims);

    template <class It>
    static Shape from_range(It first, It last) {
        Shape s;
        for (; first != last; ++first) s.push_back(static_cast<std::int64_t>(*first));
        return s;
    }

    [[nodiscard]] constexpr int rank() const { return rank_; }
    [[nodiscard]] constexpr std::int64_t operator[](int i) const { return dims_[static_cast<std::size_t>(i)]; }
    [[nodiscard]] constexpr std::int64_t& operator[](int i) { return dims_[static_cast<std::size_t>(i)]; }
    // Dimension counted from the end: dim_from_end(1) is the last one.
    [[nodiscard]] constexpr std::int64_t dim_from_end(int k) const { return dims_[static_cast<std::size_t>(rank_ - k)]; }
    [[nodiscard]] std::int64_t numel() const;
    // Product of all dimensions but the last two (1 for rank <= 2): the number of matrix slices.
    [[nodiscard]] std::int64_t batch_count() const;
    [[nodiscard]] const std::int64_t* begin() const { return dims_.data(); }
    [[nodiscard]] const std::int64_t* end() const { return dims_.data() + rank_; }

    void push_back(std::int64_t d);
    // The same dimensions left-padded with 1 to rank 4 (numpy broadcasting aligns from the right).
    [[nodiscard]] std::array<std::int64_t, max_rank> padded() const;
    // Row-major strides of padded(), with 0 wherever the padded dimension is 1 (a broadcast stride).
    [[nodiscard]] std::array<std::int64_t, max_rank> broadcast_strides() const;

    friend bool operator==(const Shape& a, const Shape& b);
    friend bool operator!=(const Shape& a, const Shape& b) { return !(a == b); }

    [[nodiscard]] std::string str() const;

private:
    std::array<std::int64_t, max_rank> dims_{};
    int rank_ = 0;
};

// numpy broadcasting of two shapes; throws "<op>: cannot broadcast <a_name> (..) with <b_name> (..)".
Shape broadcast_shapes(std::string_view op, const Shape& a, std::string_view a_name, const Shape& b,
                       std::string_view b_name);

// True when `from` broadcasts to exactly `to` (every dimension of `from` is 1 or equal, rank(from) <= rank(to)).
bool broadcasts_to(const Shape& from, const Shape& to);

// Throws unless the rank is within [lo, hi]: "<op>: <arg> must have rank lo..hi, got (..)".
void check_rank(std::string_view op, std::string_view arg, const Shape& s, int lo, int hi);

}  // namespace autodiff

template <>
struct fmt::formatter<autodiff::Shape> : fmt::formatter<std::string_view> {
    auto format(const autodiff::Shape& s, format_context& ctx) const {
        return fmt::formatter<std::string_view>::format(s.str(), ctx);
    }
};

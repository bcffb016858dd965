#include "autodiff/shape.hpp"

#include <algorithm>

namespace autodiff {

Shape::Shape(std::initializer_list<std::int64_t> dims) {
    if (dims.size() > static_cast<std::size_t>(max_rank))
        fail("shape", "rank {} exceeds the maximum rank {}", dims.size(), max_rank);
    for (std::int64_t d : dims) push_back(d);
}

void Shape::push_back(std::int64_t d) {
    if (rank_ == max_rank) fail("shape", "rank would exceed the maximum rank {} in {}", max_rank, str());
    if (d < 0) fail("shape", "negative dimension {} after {}", d, str());
    // numel(), batch_count() and the strides multiply the dimensions: their product (zeros left out,
    // as strides skip them) must fit in std::int64_t.
    std::int64_t n = d ? d : 1;
    for (int i = 0; i < rank_; ++i)
        if ((*this)[i] && __builtin_mul_overflow(n, (*this)[i], &n))
            fail("shape", "dimension {} after {} makes more than 2^63 - 1 elements", d, str());
    dims_[static_cast<std::size_t>(rank_++)] = d;
}

std::int64_t Shape::numel() const {
    std::int64_t n = 1;
    for (int i = 0; i < rank_; ++i) n *= (*this)[i];
    return n;
}

std::int64_t Shape::batch_count() const {
    std::int64_t n = 1;
    for (int i = 0; i + 2 < rank_; ++i) n *= (*this)[i];
    return n;
}

std::array<std::int64_t, max_rank> Shape::padded() const {
    std::array<std::int64_t, max_rank> p{1, 1, 1, 1};
    for (int i = 0; i < rank_; ++i) p[static_cast<std::size_t>(max_rank - rank_ + i)] = (*this)[i];
    return p;
}

std::array<std::int64_t, max_rank> Shape::broadcast_strides() const {
    const auto p = padded();
    std::array<std::int64_t, max_rank> s{};
    std::int64_t stride = 1;
    for (int i = max_rank - 1; i >= 0; --i) {
        const auto u = static_cast<std::size_t>(i);
        s[u] = p[u] == 1 ? 0 : stride;
        stride *= p[u];
    }
    return s;
}

bool operator==(const Shape& a, const Shape& b) {
    return a.rank_ == b.rank_ && std::equal(a.begin(), a.end(), b.begin());
}

std::string Shape::str() const {
    std::string s = "(";
    for (int i = 0; i < rank_; ++i) {
        if (i) s += ',';
        s += std::to_string((*this)[i]);
    }
    return s + ")";
}

Shape broadcast_shapes(std::string_view op, const Shape& a, std::string_view a_name, const Shape& b,
                       std::string_view b_name) {
    const int rank = std::max(a.rank(), b.rank());
    const auto pa = a.padded();
    const auto pb = b.padded();
    Shape out;
    for (int i = max_rank - rank; i < max_rank; ++i) {
        const auto u = static_cast<std::size_t>(i);
        if (pa[u] != pb[u] && pa[u] != 1 && pb[u] != 1)
            fail(op, "cannot broadcast {} {} with {} {}", a_name, a, b_name, b);
        out.push_back(pa[u] == 1 ? pb[u] : pa[u]);
    }
    return out;
}

bool broadcasts_to(const Shape& from, const Shape& to) {
    if (from.rank() > to.rank()) return false;
    const auto pf = from.padded();
    const auto pt = to.padded();
    for (std::size_t i = 0; i < max_rank; ++i)
        if (pf[i] != 1 && pf[i] != pt[i]) return false;
    return true;
}

void check_rank(std::string_view op, std::string_view arg, const Shape& s, int lo, int hi) {
    if (s.rank() < lo || s.rank() > hi) {
        if (lo == hi) fail(op, "{} must have rank {}, got {}", arg, lo, s);
        fail(op, "{} must have rank {}..{}, got {}", arg, lo, hi, s);
    }
}

}  // namespace autodiff

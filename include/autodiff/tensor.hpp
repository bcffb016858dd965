#pragma once
// Tensor<T>: a dense, contiguous, row-major array of rank 0..4 with shared (handle) semantics.
//
// Copying a Tensor shares its storage, like a torch.Tensor; clone() makes an independent copy.
// Storage comes from the caching pool (pool.hpp). T is float or double for values; bool is allowed
// for masks (true = keep), std::uint64_t for masks packed as bits (the fused attention's dropout mask).

#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <string>
#include <type_traits>
#include <vector>

#include <Eigen/Core>
#include <fmt/format.h>

#include "autodiff/error.hpp"
#include "autodiff/pool.hpp"
#include "autodiff/shape.hpp"

namespace autodiff {

template <class T>
inline constexpr bool is_value_type_v = std::is_same_v<T, float> || std::is_same_v<T, double>;

// Keeps T from being deduced from this parameter: a gradient pointer may then be passed as nullptr.
template <class T>
using NoDeduce = std::type_identity_t<T>;

template <class T>
using RowMatrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <class T>
using ArrayMap = Eigen::Map<Eigen::Array<T, Eigen::Dynamic, 1>>;
template <class T>
using ConstArrayMap = Eigen::Map<const Eigen::Array<T, Eigen::Dynamic, 1>>;

template <class T>
class Tensor {
    static_assert(is_value_type_v<T> || std::is_same_v<T, bool> || std::is_same_v<T, std::uint64_t>,
                  "autodiff::Tensor<T>: T must be float or double (or bool for masks, std::uint64_t for bit masks)");

public:
    using value_type = T;

    Tensor() = default;
    // Uninitialised storage of the given shape.
    explicit Tensor(const Shape& shape) : shape_(shape) {
        const auto n = static_cast<std::size_t>(shape.numel());
        if (n > pool::max_bytes / sizeof(T)) fail("tensor", "shape {} is too large to allocate ({} elements)", shape, n);
        block_ = pool::acquire(n * sizeof(T));
    }
    // A tensor viewing memory it does not own (no copy): `data` must hold shape.numel() contiguous
    // row-major elements and outlive every handle on it, or stay alive until on_release(context)
    // runs (when the last handle goes; on_release may be null).
    static Tensor adopt(T* data, const Shape& shape, void (*on_release)(void* context) noexcept = nullptr,
                        void* context = nullptr) {
        if (data == nullptr && shape.numel() > 0) fail("Tensor::adopt", "null data for shape {}", shape);
        Tensor t;
        t.shape_ = shape;
        t.block_ = pool::adopt(data, static_cast<std::size_t>(shape.numel()) * sizeof(T), on_release, context);
        return t;
    }
    Tensor(const Tensor& o) : shape_(o.shape_), block_(o.block_) {
        if (block_) pool::retain(block_);
    }
    Tensor(Tensor&& o) noexcept : shape_(o.shape_), block_(o.block_) { o.block_ = nullptr; }
    Tensor& operator=(const Tensor& o) {
        Tensor(o).swap(*this);
        return *this;
    }
    Tensor& operator=(Tensor&& o) noexcept {
        Tensor(std::move(o)).swap(*this);
        return *this;
    }
    ~Tensor() {
        if (block_) pool::release(block_);
    }
    void swap(Tensor& o) noexcept {
        std::swap(shape_, o.shape_);
        std::swap(block_, o.block_);
    }

    [[nodiscard]] bool defined() const { return block_ != nullptr; }
    [[nodiscard]] const Shape& shape() const { return shape_; }
    [[nodiscard]] int rank() const { return shape_.rank(); }
    [[nodiscard]] std::int64_t dim(int i) const { return shape_[i]; }
    [[nodiscard]] std::int64_t numel() const { return block_ ? shape_.numel() : 0; }
    // Write access: bumps the storage's version (see version()). Everything that can write through a
    // handle (array(), matrix(), operator(), at(), fill(), optimiser steps) goes through it; read
    // through a const handle (std::as_const(t)) to leave the version alone.
    [[nodiscard]] T* data() {
        if (!block_) return nullptr;
        block_->version.store(block_->version.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
        return static_cast<T*>(block_->data());
    }
    [[nodiscard]] const T* data() const { return block_ ? static_cast<const T*>(block_->data()) : nullptr; }
    // How many times the storage was opened for writing (shared by every handle and reshaped view on
    // it), like torch's Tensor._version. A tape record remembers the version of each value it saves
    // and its backward refuses to run if it moved (an in-place write would corrupt the gradient).
    [[nodiscard]] std::uint64_t version() const { return block_ ? block_->version.load(std::memory_order_relaxed) : 0; }
    // True when this handle is the only one on its storage (safe to modify in place).
    [[nodiscard]] bool is_unique() const { return block_ && block_->refs.load(std::memory_order_acquire) == 1; }
    // True when both handles share one storage block.
    [[nodiscard]] bool shares_storage_with(const Tensor& o) const { return block_ && block_ == o.block_; }

    // The whole tensor as a flat Eigen array.
    [[nodiscard]] ArrayMap<T> array() { return ArrayMap<T>(data(), numel()); }
    [[nodiscard]] ConstArrayMap<T> array() const { return ConstArrayMap<T>(data(), numel()); }

    // Matrix slice `b` of the last two dimensions (rank 1 is one row).
    [[nodiscard]] Eigen::Map<RowMatrix<T>> matrix(std::int64_t b = 0) {
        const auto [r, c] = matrix_dims();
        return Eigen::Map<RowMatrix<T>>(data() + b * r * c, r, c);
    }
    [[nodiscard]] Eigen::Map<const RowMatrix<T>> matrix(std::int64_t b = 0) const {
        const auto [r, c] = matrix_dims();
        return Eigen::Map<const RowMatrix<T>>(data() + b * r * c, r, c);
    }
    [[nodiscard]] std::pair<std::int64_t, std::int64_t> matrix_dims() const {
        if (rank() == 0) return {1, 1};
        if (rank() == 1) return {1, shape_[0]};
        return {shape_.dim_from_end(2), shape_.dim_from_end(1)};
    }

    // Unchecked element access by full index.
    template <class... I>
    [[nodiscard]] T& operator()(I... idx) {
        return data()[offset_of({static_cast<std::int64_t>(idx)...})];
    }
    template <class... I>
    [[nodiscard]] const T& operator()(I... idx) const {
        return data()[offset_of({static_cast<std::int64_t>(idx)...})];
    }
    // Checked element access: throws Error naming the index and the shape.
    template <class... I>
    [[nodiscard]] T& at(I... idx) {
        return data()[checked_offset({static_cast<std::int64_t>(idx)...})];
    }
    template <class... I>
    [[nodiscard]] const T& at(I... idx) const {
        return data()[checked_offset({static_cast<std::int64_t>(idx)...})];
    }
    // The single value of a tensor with one element.
    [[nodiscard]] T item() const {
        if (numel() != 1) fail("item", "tensor must have exactly one element, got {}", shape_);
        return data()[0];
    }

    // The same storage seen with another shape of equal element count (no copy).
    [[nodiscard]] Tensor reshaped(const Shape& s) const {
        if (s.numel() != shape_.numel()) fail("reshape", "cannot view {} as {}: element counts differ", shape_, s);
        Tensor t(*this);
        t.shape_ = s;
        return t;
    }
    [[nodiscard]] Tensor clone() const {
        Tensor t(shape_);
        if (numel()) std::memcpy(t.data(), data(), static_cast<std::size_t>(numel()) * sizeof(T));
        return t;
    }
    void fill(T v) { std::fill_n(data(), numel(), v); }

    [[nodiscard]] std::vector<T> to_vector() const { return std::vector<T>(data(), data() + numel()); }

private:
    [[nodiscard]] std::int64_t offset_of(std::initializer_list<std::int64_t> idx) const {
        std::int64_t off = 0;
        int d = 0;
        for (std::int64_t i : idx) off = off * shape_[d++] + i;
        return off;
    }
    [[nodiscard]] std::int64_t checked_offset(std::initializer_list<std::int64_t> idx) const {
        bool ok = static_cast<int>(idx.size()) == rank() && defined();
        int d = 0;
        for (std::int64_t i : idx) ok = ok && i >= 0 && i < shape_[d++];
        if (!ok) {
            std::string s;
            for (std::int64_t i : idx) {
                if (!s.empty()) s += ',';
                s += std::to_string(i);
            }
            fail("at", "index ({}) out of range for shape {}", s, shape_);
        }
        return offset_of(idx);
    }

    Shape shape_;
    pool::Block* block_ = nullptr;
};

// ---- factories ---------------------------------------------------------------------------------

template <class T>
Tensor<T> empty(const Shape& shape) {
    return Tensor<T>(shape);
}
template <class T>
Tensor<T> full(const Shape& shape, T value) {
    Tensor<T> t(shape);
    t.fill(value);
    return t;
}
template <class T>
Tensor<T> zeros(const Shape& shape) {
    return full<T>(shape, T(0));
}
template <class T>
Tensor<T> ones(const Shape& shape) {
    return full<T>(shape, T(1));
}
// A copy of `values`, which must hold exactly shape.numel() elements.
template <class T>
Tensor<T> from_vector(const Shape& shape, const std::vector<T>& values) {
    if (static_cast<std::int64_t>(values.size()) != shape.numel())
        fail("from_vector", "values has {} elements but shape {} needs {}", values.size(), shape, shape.numel());
    Tensor<T> t(shape);
    std::copy(values.begin(), values.end(), t.data());
    return t;
}
// Standard normal samples; element i depends only on (seed, i).
template <class T>
Tensor<T> randn(const Shape& shape, std::uint64_t seed = 0);
// Uniform samples in [lo, hi); element i depends only on (seed, i).
template <class T>
Tensor<T> uniform(const Shape& shape, T lo, T hi, std::uint64_t seed = 0);

// ---- printing ----------------------------------------------------------------------------------

template <class T>
std::string to_string(const Tensor<T>& t, int max_per_dim = 6);

// Max |a - b| over all elements (shapes must be equal); used by tests and examples.
template <class T>
T max_abs_diff(const Tensor<T>& a, const Tensor<T>& b);

}  // namespace autodiff

template <class T>
struct fmt::formatter<autodiff::Tensor<T>> : fmt::formatter<std::string_view> {
    auto format(const autodiff::Tensor<T>& t, format_context& ctx) const {
        return fmt::formatter<std::string_view>::format(autodiff::to_string(t), ctx);
    }
};

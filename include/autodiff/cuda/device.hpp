#pragma once
// Tensors in GPU memory (issue 12): DeviceTensor<T>, the caching device allocator behind it, and the
// explicit copies between host and device, `to(x, ad::cuda)` and `to(d, ad::cpu)`.
//
// DeviceTensor<T> is a type of its own, not a Tensor<T> that carries its device: Tensor<T> is the
// engine's value type (Eigen maps, the tape's version counters, every kernel's T* access), and making
// each of those refuse device memory is a change to the whole core. Keeping the two apart makes mixing
// devices a compile error rather than a run-time one; what is left to check at run time (a device
// pointer on the wrong GPU) throws autodiff::Error naming op, argument and device.
//
// This header needs no CUDA headers: a program that includes it builds with any C++20 compiler and
// links autodiff::attention_cuda.
//
// Element types on the device: float, bf16 and fp16 (storage only on the host; the kernels compute in
// fp32), double (the kernels compute and accumulate in fp64: gradient checks on the device; cuBLAS
// in CUBLAS_COMPUTE_64F), and bool for masks. Where an op has no double kernel it throws
// autodiff::Error naming the op and "float64".

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>

#include "autodiff/error.hpp"
#include "autodiff/shape.hpp"
#include "autodiff/tensor.hpp"

namespace autodiff {

// 16-bit floating-point storage (bfloat16: 8 exponent bits; fp16: IEEE half). Host code moves them;
// conversions happen on the device (to / from float, round to nearest even).
struct bf16 {
    std::uint16_t bits;
};
struct fp16 {
    std::uint16_t bits;
};

template <class T>
inline constexpr bool is_device_value_type_v =
    std::is_same_v<T, float> || std::is_same_v<T, bf16> || std::is_same_v<T, fp16> || std::is_same_v<T, double>;

// The type device kernels compute and accumulate in for element type T, and in which scalars (sums,
// losses, the attention's log-sum-exp) come back: double for double, float for the others.
template <class T>
using device_accum_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <class T>
constexpr const char* dtype_name() {
    if constexpr (std::is_same_v<T, float>) return "float32";
    else if constexpr (std::is_same_v<T, double>) return "float64";
    else if constexpr (std::is_same_v<T, bf16>) return "bfloat16";
    else if constexpr (std::is_same_v<T, fp16>) return "float16";
    else return "bool";
}

// Device tags for to(): `to(x, ad::cuda)`, `to(d, ad::cpu)`.
struct CpuDevice {};
struct CudaDevice {};
inline constexpr CpuDevice cpu{};
inline constexpr CudaDevice cuda{};

namespace device_pool {

struct Stats {
    std::uint64_t requests = 0;       // blocks handed out
    std::uint64_t reused = 0;         // of those, served from the cache (no cudaMalloc)
    std::uint64_t system_allocs = 0;  // cudaMalloc calls
    std::size_t bytes_in_use = 0;     // bytes of the blocks currently held by device tensors (size classes)
    std::size_t bytes_cached = 0;     // bytes of freed blocks kept for reuse
    std::size_t peak_bytes_in_use = 0;
};

// One block of device memory with an intrusive reference count (a DeviceTensor handle is one pointer).
struct Block {
    std::atomic<std::int64_t> refs{1};
    void* data = nullptr;      // device pointer
    std::size_t capacity = 0;  // bytes (the size class)
    int device = 0;            // the CUDA device it was allocated on
};

// A block of at least `bytes` bytes on the current device, refs == 1. The size classes are the host
// pool's (pool::size_class). Throws autodiff::Error when the device is out of memory or absent.
Block* acquire(std::size_t bytes);
void release(Block* block) noexcept;
inline void retain(Block* block) noexcept { block->refs.fetch_add(1, std::memory_order_relaxed); }

Stats stats();
void reset_stats();  // zeroes the counters; keeps bytes_in_use/bytes_cached, sets peak to bytes_in_use
// Returns every cached block to the device (cudaFree).
void release_cached();

}  // namespace device_pool

// Whether a CUDA device is usable; the tests skip (saying so) when it is not.
bool cuda_available();
// "NVIDIA H200 (sm_90, 132 SMs)": for messages and benchmark logs.
std::string cuda_device_name();
// Waits for all work queued on the device; throws autodiff::Error naming `op` if a kernel failed.
void cuda_synchronize(std::string_view op);

template <class T>
class DeviceTensor {
    static_assert(is_device_value_type_v<T> || std::is_same_v<T, bool>,
                  "autodiff::DeviceTensor<T>: T must be float, bf16, fp16, double (or bool for masks)");

public:
    using value_type = T;

    DeviceTensor() = default;
    // Uninitialised device storage of the given shape.
    explicit DeviceTensor(const Shape& shape) : shape_(shape) {
        const auto n = static_cast<std::size_t>(shape.numel());
        if (n > pool::max_bytes / sizeof(T)) fail("DeviceTensor", "shape {} is too large to allocate ({} elements)", shape, n);
        block_ = device_pool::acquire(n * sizeof(T));
    }
    DeviceTensor(const DeviceTensor& o) : shape_(o.shape_), block_(o.block_) {
        if (block_) device_pool::retain(block_);
    }
    DeviceTensor(DeviceTensor&& o) noexcept : shape_(o.shape_), block_(o.block_) { o.block_ = nullptr; }
    DeviceTensor& operator=(const DeviceTensor& o) {
        DeviceTensor(o).swap(*this);
        return *this;
    }
    DeviceTensor& operator=(DeviceTensor&& o) noexcept {
        DeviceTensor(std::move(o)).swap(*this);
        return *this;
    }
    ~DeviceTensor() {
        if (block_) device_pool::release(block_);
    }
    void swap(DeviceTensor& o) noexcept {
        std::swap(shape_, o.shape_);
        std::swap(block_, o.block_);
    }

    [[nodiscard]] bool defined() const { return block_ != nullptr; }
    [[nodiscard]] const Shape& shape() const { return shape_; }
    [[nodiscard]] int rank() const { return shape_.rank(); }
    [[nodiscard]] std::int64_t numel() const { return block_ ? shape_.numel() : 0; }
    [[nodiscard]] std::size_t bytes() const { return static_cast<std::size_t>(numel()) * sizeof(T); }
    [[nodiscard]] int device() const { return block_ ? block_->device : -1; }
    // Device pointers: dereference them in kernels only.
    [[nodiscard]] T* data() { return block_ ? static_cast<T*>(block_->data) : nullptr; }
    [[nodiscard]] const T* data() const { return block_ ? static_cast<const T*>(block_->data) : nullptr; }

    // The same storage viewed with another shape of as many elements.
    [[nodiscard]] DeviceTensor reshape(const Shape& s) const {
        if (s.numel() != shape_.numel()) fail("reshape", "cannot view {} (cuda) as {}: element counts differ", shape_, s);
        DeviceTensor t(*this);
        t.shape_ = s;
        return t;
    }
    // Sets every byte to zero (asynchronously on the default stream).
    void zero();

private:
    Shape shape_;
    device_pool::Block* block_ = nullptr;
};

// Host -> device: a copy of x on the current GPU, converted to T (float, bf16 or fp16).
template <class T = float>
DeviceTensor<T> to(const Tensor<float>& x, CudaDevice);
DeviceTensor<bool> to(const Tensor<bool>& x, CudaDevice);
// Host double -> device double (a plain copy, no rounding).
DeviceTensor<double> to(const Tensor<double>& x, CudaDevice);
// Device -> host: a float copy (bf16 and fp16 widen exactly). Waits for the device.
template <class T>
Tensor<float> to(const DeviceTensor<T>& x, CpuDevice);
Tensor<bool> to(const DeviceTensor<bool>& x, CpuDevice);
// Device double -> host double (exact). Waits for the device.
Tensor<double> to(const DeviceTensor<double>& x, CpuDevice);
// Double stays double both ways: a float host tensor is not rounded up to a device double, nor a device
// double down to a host float (a compile error here rather than a missing symbol at link time).
template <>
DeviceTensor<double> to<double>(const Tensor<float>& x, CudaDevice) = delete;
template <>
Tensor<float> to<double>(const DeviceTensor<double>& x, CpuDevice) = delete;

}  // namespace autodiff

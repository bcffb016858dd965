#include "autodiff/cuda/device.hpp"

#include <map>
#include <mutex>
#include <utility>
#include <vector>

#include "attention_kernels.hpp"
#include "cuda_check.hpp"
#include "dtype.hpp"

namespace autodiff {

namespace device_pool {

namespace {

struct State {
    std::mutex mutex;
    // (device, size class) -> freed blocks kept for reuse.
    std::map<std::pair<int, std::size_t>, std::vector<Block*>> free_lists;
    Stats stats;
};

State& state() {
    static State* s = new State;  // never destroyed: tensors in static storage may release at exit
    return *s;
}

int current_device(std::string_view op) {
    int device = 0;
    detail::cuda_check(cudaGetDevice(&device), op, "cudaGetDevice");
    return device;
}

}  // namespace

Block* acquire(std::size_t bytes) {
    const std::size_t cls = pool::size_class(bytes);
    const int device = current_device("device_pool::acquire");
    State& s = state();
    {
        std::lock_guard lock(s.mutex);
        ++s.stats.requests;
        auto it = s.free_lists.find({device, cls});
        if (it != s.free_lists.end() && !it->second.empty()) {
            Block* b = it->second.back();
            it->second.pop_back();
            ++s.stats.reused;
            s.stats.bytes_cached -= cls;
            s.stats.bytes_in_use += cls;
            s.stats.peak_bytes_in_use = std::max(s.stats.peak_bytes_in_use, s.stats.bytes_in_use);
            b->refs.store(1, std::memory_order_relaxed);
            return b;
        }
    }
    void* data = nullptr;
    cudaError_t status = cudaMalloc(&data, cls);
    if (status == cudaErrorMemoryAllocation) {
        // The cache may hold what is missing: give it back and try once more.
        cudaGetLastError();
        release_cached();
        status = cudaMalloc(&data, cls);
    }
    if (status != cudaSuccess) {
        cudaGetLastError();
        fail("device_pool::acquire", "cudaMalloc of {} bytes on cuda device {} failed: {}", cls, device, cudaGetErrorString(status));
    }
    auto* b = new Block;
    b->data = data;
    b->capacity = cls;
    b->device = device;
    std::lock_guard lock(s.mutex);
    ++s.stats.system_allocs;
    s.stats.bytes_in_use += cls;
    s.stats.peak_bytes_in_use = std::max(s.stats.peak_bytes_in_use, s.stats.bytes_in_use);
    return b;
}

void release(Block* block) noexcept {
    if (block->refs.fetch_sub(1, std::memory_order_acq_rel) != 1) return;
    State& s = state();
    std::lock_guard lock(s.mutex);
    s.stats.bytes_in_use -= block->capacity;
    s.stats.bytes_cached += block->capacity;
    // Reuse is safe without an event: every kernel of this library runs on the default stream, so work
    // queued with a reused block runs after the work queued with its last owner.
    s.free_lists[{block->device, block->capacity}].push_back(block);
}

Stats stats() {
    State& s = state();
    std::lock_guard lock(s.mutex);
    return s.stats;
}

void reset_stats() {
    State& s = state();
    std::lock_guard lock(s.mutex);
    s.stats.requests = s.stats.reused = s.stats.system_allocs = 0;
    s.stats.peak_bytes_in_use = s.stats.bytes_in_use;
}

void release_cached() {
    State& s = state();
    std::lock_guard lock(s.mutex);
    if (!s.free_lists.empty()) cudaDeviceSynchronize();  // a cached block may still be read by queued work
    for (auto& [key, blocks] : s.free_lists)
        for (Block* b : blocks) {
            cudaFree(b->data);
            s.stats.bytes_cached -= b->capacity;
            delete b;
        }
    s.free_lists.clear();
}

}  // namespace device_pool

bool cuda_available() {
    int count = 0;
    const cudaError_t status = cudaGetDeviceCount(&count);
    if (status != cudaSuccess) {
        cudaGetLastError();
        return false;
    }
    return count > 0;
}

std::string cuda_device_name() {
    int device = 0;
    detail::cuda_check(cudaGetDevice(&device), "cuda_device_name", "cudaGetDevice");
    cudaDeviceProp prop{};
    detail::cuda_check(cudaGetDeviceProperties(&prop, device), "cuda_device_name", "cudaGetDeviceProperties");
    return fmt::format("{} (sm_{}{}, {} SMs)", prop.name, prop.major, prop.minor, prop.multiProcessorCount);
}

void cuda_synchronize(std::string_view op) { detail::cuda_check(cudaDeviceSynchronize(), op, "a kernel"); }

template <class T>
void DeviceTensor<T>::zero() {
    if (numel()) detail::cuda_check(cudaMemsetAsync(data(), 0, bytes()), "DeviceTensor::zero", "cudaMemsetAsync");
}
template void DeviceTensor<float>::zero();
template void DeviceTensor<bf16>::zero();
template void DeviceTensor<fp16>::zero();
template void DeviceTensor<double>::zero();
template void DeviceTensor<bool>::zero();

template <class T>
DeviceTensor<T> to(const Tensor<float>& x, CudaDevice) {
    if (!x.defined()) fail("to(cuda)", "the host tensor is undefined");
    DeviceTensor<T> out(x.shape());
    const std::int64_t n = x.numel();
    if (n == 0) return out;
    const std::size_t bytes = static_cast<std::size_t>(n) * sizeof(float);
    if constexpr (std::is_same_v<T, float>) {
        detail::cuda_check(cudaMemcpy(out.data(), x.data(), bytes, cudaMemcpyHostToDevice), "to(cuda)", "cudaMemcpy");
    } else {
        DeviceTensor<float> staging(x.shape());
        detail::cuda_check(cudaMemcpy(staging.data(), x.data(), bytes, cudaMemcpyHostToDevice), "to(cuda)", "cudaMemcpy");
        detail::cuda_check(detail::launch_narrow(detail::dtype_of<T>(), staging.data(), out.data(), n), "to(cuda)", "the conversion kernel");
    }
    return out;
}
template DeviceTensor<float> to<float>(const Tensor<float>&, CudaDevice);
template DeviceTensor<bf16> to<bf16>(const Tensor<float>&, CudaDevice);
template DeviceTensor<fp16> to<fp16>(const Tensor<float>&, CudaDevice);

DeviceTensor<double> to(const Tensor<double>& x, CudaDevice) {
    if (!x.defined()) fail("to(cuda)", "the host tensor (float64) is undefined");
    DeviceTensor<double> out(x.shape());
    if (x.numel())
        detail::cuda_check(cudaMemcpy(out.data(), x.data(), static_cast<std::size_t>(x.numel()) * sizeof(double), cudaMemcpyHostToDevice),
                           "to(cuda)", "cudaMemcpy");
    return out;
}

DeviceTensor<bool> to(const Tensor<bool>& x, CudaDevice) {
    if (!x.defined()) fail("to(cuda)", "the host mask is undefined");
    DeviceTensor<bool> out(x.shape());
    if (x.numel())
        detail::cuda_check(cudaMemcpy(out.data(), x.data(), static_cast<std::size_t>(x.numel()), cudaMemcpyHostToDevice), "to(cuda)", "cudaMemcpy");
    return out;
}

template <class T>
Tensor<float> to(const DeviceTensor<T>& x, CpuDevice) {
    if (!x.defined()) fail("to(cpu)", "the device tensor is undefined");
    Tensor<float> out(x.shape());
    const std::int64_t n = x.numel();
    if (n == 0) return out;
    const std::size_t bytes = static_cast<std::size_t>(n) * sizeof(float);
    if constexpr (std::is_same_v<T, float>) {
        detail::cuda_check(cudaMemcpy(out.data(), x.data(), bytes, cudaMemcpyDeviceToHost), "to(cpu)", "cudaMemcpy");
    } else {
        DeviceTensor<float> staging(x.shape());
        detail::cuda_check(detail::launch_widen(detail::dtype_of<T>(), x.data(), staging.data(), n), "to(cpu)", "the conversion kernel");
        detail::cuda_check(cudaMemcpy(out.data(), staging.data(), bytes, cudaMemcpyDeviceToHost), "to(cpu)", "cudaMemcpy");
    }
    return out;
}
template Tensor<float> to<float>(const DeviceTensor<float>&, CpuDevice);
template Tensor<float> to<bf16>(const DeviceTensor<bf16>&, CpuDevice);
template Tensor<float> to<fp16>(const DeviceTensor<fp16>&, CpuDevice);

Tensor<double> to(const DeviceTensor<double>& x, CpuDevice) {
    if (!x.defined()) fail("to(cpu)", "the device tensor (float64) is undefined");
    Tensor<double> out(x.shape());
    if (x.numel())
        detail::cuda_check(cudaMemcpy(out.data(), x.data(), static_cast<std::size_t>(x.numel()) * sizeof(double), cudaMemcpyDeviceToHost),
                           "to(cpu)", "cudaMemcpy");
    return out;
}

Tensor<bool> to(const DeviceTensor<bool>& x, CpuDevice) {
    if (!x.defined()) fail("to(cpu)", "the device mask is undefined");
    Tensor<bool> out(x.shape());
    if (x.numel())
        detail::cuda_check(cudaMemcpy(out.data(), x.data(), static_cast<std::size_t>(x.numel()), cudaMemcpyDeviceToHost), "to(cpu)", "cudaMemcpy");
    return out;
}

}  // namespace autodiff

// The device functional layer's kernels: the named elementwise ops (each one expression of
// cuda/expr.cuh, run by its one evaluator), bias rows and column sums, the full sum, softmax, dropout
// and Adam. The maths and the API are in include/autodiff/cuda/ops.hpp and optim.hpp; validation and
// allocation in ops.cpp, blas.cpp and optim.cpp.

#include "ops_kernels.hpp"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "autodiff/cuda/expr.cuh"
#include "autodiff/random.hpp"

namespace autodiff::detail {

namespace {

namespace ex = device_expr;
using ex::load;
using ex::store;

constexpr int threads = 256;

template <class S>
using Inputs2 = ex::Inputs<S, 2>;

// The compute type of storage type S: double for double, float otherwise.
template <class S>
using acc_t = ex::acc_t<S>;

// Calls f with a null pointer of the storage type of dtype (float, __nv_bfloat16, __half, double).
template <class F>
cudaError_t with_storage(DeviceDType dtype, F&& f) {
    switch (dtype) {
        case DeviceDType::f32: return f(static_cast<float*>(nullptr));
        case DeviceDType::f64: return f(static_cast<double*>(nullptr));
        case DeviceDType::bf16: return f(static_cast<__nv_bfloat16*>(nullptr));
        case DeviceDType::f16: return f(static_cast<__half*>(nullptr));
    }
    return cudaErrorInvalidValue;
}

// Calls f with the expression of a named unary op applied to input 0.
template <class F>
cudaError_t with_unary(DeviceUnaryOp op, float alpha, F&& f) {
    constexpr auto x = ex::arg<0>();
    switch (op) {
        case DeviceUnaryOp::neg: return f(-x);
        case DeviceUnaryOp::scale: return f(ex::scale(x, alpha));
        case DeviceUnaryOp::exp: return f(ex::exp(x));
        case DeviceUnaryOp::log: return f(ex::log(x));
        case DeviceUnaryOp::tanh: return f(ex::tanh(x));
        case DeviceUnaryOp::sigmoid: return f(ex::sigmoid(x));
        case DeviceUnaryOp::relu: return f(ex::relu(x));
        case DeviceUnaryOp::square: return f(ex::square(x));
        case DeviceUnaryOp::sqrt: return f(ex::sqrt(x));
        case DeviceUnaryOp::gelu: return f(ex::gelu(x));
        case DeviceUnaryOp::gelu_tanh: return f(ex::gelu_tanh(x));
    }
    return cudaErrorInvalidValue;
}

// Calls f with the expression of a named binary op of inputs 0 and 1.
template <class F>
cudaError_t with_binary(DeviceBinaryOp op, F&& f) {
    constexpr auto a = ex::arg<0>();
    constexpr auto b = ex::arg<1>();
    switch (op) {
        case DeviceBinaryOp::add: return f(a + b);
        case DeviceBinaryOp::sub: return f(a - b);
        case DeviceBinaryOp::mul: return f(a * b);
        case DeviceBinaryOp::div: return f(a / b);
    }
    return cudaErrorInvalidValue;
}

int blocks_for(std::int64_t n, int per_block) {
    const std::int64_t b = (n + per_block - 1) / per_block;
    return static_cast<int>(b < 65535 * 32 ? b : 65535 * 32);
}

// ---- layout ----------------------------------------------------------------------------------------

struct Strided {
    std::int64_t shape[4];
    std::int64_t strides[4];
    std::int64_t base;
};

template <class S, bool Scatter>
__global__ void strided_copy_kernel(const S* in, S* out, Strided g, std::int64_t n) {
    for (std::int64_t i = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x; i < n; i += std::int64_t{gridDim.x} * blockDim.x) {
        std::int64_t rest = i, offset = g.base;
        for (int k = 3; k >= 0; --k) {
            offset += rest % g.shape[k] * g.strides[k];
            rest /= g.shape[k];
        }
        if constexpr (Scatter) out[offset] = in[i];
        else out[i] = in[offset];
    }
}

// ---- rows and reductions ------------------------------------------------------------------------

template <class S>
__global__ void broadcast_rows_kernel(const S* b, S* y, std::int64_t rows, std::int64_t n) {
    const std::int64_t total = rows * n;
    for (std::int64_t i = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x; i < total; i += std::int64_t{gridDim.x} * blockDim.x)
        y[i] = b[i % n];
}

// One thread per column, rows in order: each column's sum is the same sequence of fp32 (fp64 for
// double) additions on every run; neighbouring threads read neighbouring columns (coalesced).
template <class S>
__global__ void column_sums_kernel(const S* x, std::int64_t rows, std::int64_t n, S* out, bool accumulate) {
    const std::int64_t j = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x;
    if (j >= n) return;
    acc_t<S> s = 0;
    for (std::int64_t r = 0; r < rows; ++r) s += load(x[r * n + j]);
    out[j] = store<S>(accumulate ? load(out[j]) + s : s);
}

// Block reduction of one value (float or double) per thread (threads = 256); the result in thread 0,
// fixed tree order.
template <class V>
__device__ V block_sum(V v) {
    __shared__ V shared[threads / 32];
    for (int o = 16; o > 0; o /= 2) v += __shfl_down_sync(0xffffffffu, v, o);
    if (threadIdx.x % 32 == 0) shared[threadIdx.x / 32] = v;
    __syncthreads();
    v = threadIdx.x < threads / 32 ? shared[threadIdx.x] : V(0);
    if (threadIdx.x < 32)
        for (int o = 16; o > 0; o /= 2) v += __shfl_down_sync(0xffffffffu, v, o);
    return v;
}

// Pass 1: sum_partials blocks, block k sums the elements k·256 + t + s·(256·sum_partials) in a fixed
// order. Pass 2: one block adds the partials. The grid never depends on anything but n.
// The partials and the result are acc_t<S> (fp32, or fp64 for double).
template <class S>
__global__ void partial_sums_kernel(const S* x, std::int64_t n, acc_t<S>* partials) {
    acc_t<S> s = 0;
    for (std::int64_t i = blockIdx.x * std::int64_t{threads} + threadIdx.x; i < n; i += std::int64_t{threads} * sum_partials)
        s += load(x[i]);
    s = block_sum(s);
    if (threadIdx.x == 0) partials[blockIdx.x] = s;
}
template <class V>
__global__ void final_sum_kernel(const V* partials, V* out) {
    V s = 0;
    for (int i = threadIdx.x; i < sum_partials; i += threads) s += partials[i];
    s = block_sum(s);
    if (threadIdx.x == 0) *out = s;
}

// ---- softmax: one warp a row ----------------------------------------------------------------------

template <class V>
__device__ V warp_max(V v) {
    for (int o = 16; o > 0; o /= 2) v = ex::math::max(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
template <class V>
__device__ V warp_sum(V v) {
    for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Logit (r, j) with the masks applied: −inf where masked.
template <class S>
__device__ acc_t<S> masked_logit(const SoftmaxProblem& p, const S* x, std::int64_t r, std::int64_t t, std::int64_t i, std::int64_t j) {
    const std::int64_t b = t / p.heads, h = t % p.heads;
    if (p.causal && j > i) return -INFINITY;
    if (p.keep && !p.keep[b * p.keep_s[0] + h * p.keep_s[1] + i * p.keep_s[2] + j * p.keep_s[3]]) return -INFINITY;
    if (p.key_padding && !p.key_padding[(t / p.kp_div) * p.Lk + j]) return -INFINITY;
    acc_t<S> v = load(x[r * p.Lk + j]);
    if (p.additive)
        v += load(static_cast<const S*>(p.additive)[b * p.additive_s[0] + h * p.additive_s[1] + i * p.additive_s[2] + j * p.additive_s[3]]);
    return v;
}

// y = e^(x − m)/Σ e^(x − m) over kept keys, m the row's max; a row with m = −inf (all masked) gives 0.
// NaN: fmaxf skips it in m, but e^(NaN − m) makes the sum, hence the whole row, NaN (as the CPU's).
template <class S>
__global__ void softmax_forward_kernel(SoftmaxProblem p, const S* x, S* y) {
    const int lane = threadIdx.x % 32;
    for (std::int64_t r = blockIdx.x * std::int64_t{threads / 32} + threadIdx.x / 32; r < p.rows; r += std::int64_t{gridDim.x} * (threads / 32)) {
        using V = acc_t<S>;
        const std::int64_t t = r / p.Lq, i = r % p.Lq;
        V m = -INFINITY;
        for (std::int64_t j = lane; j < p.Lk; j += 32) m = ex::math::max(m, masked_logit(p, x, r, t, i, j));
        m = warp_max(m);
        S* row = y + r * p.Lk;
        if (m == -INFINITY) {
            for (std::int64_t j = lane; j < p.Lk; j += 32) row[j] = store<S>(V(0));
            continue;
        }
        V l = 0;
        for (std::int64_t j = lane; j < p.Lk; j += 32) l += ex::math::exp(masked_logit(p, x, r, t, i, j) - m);
        const V inv = V(1) / warp_sum(l);
        for (std::int64_t j = lane; j < p.Lk; j += 32) row[j] = store<S>(ex::math::exp(masked_logit(p, x, r, t, i, j) - m) * inv);
    }
}

// dx = y ⊙ (dy − rowsum(dy ⊙ y)).
template <class S>
__global__ void softmax_backward_kernel(std::int64_t rows, std::int64_t Lk, const S* dy, const S* y, S* dx) {
    const int lane = threadIdx.x % 32;
    for (std::int64_t r = blockIdx.x * std::int64_t{threads / 32} + threadIdx.x / 32; r < rows; r += std::int64_t{gridDim.x} * (threads / 32)) {
        const std::int64_t base = r * Lk;
        acc_t<S> d = 0;
        for (std::int64_t j = lane; j < Lk; j += 32) d += load(dy[base + j]) * load(y[base + j]);
        d = warp_sum(d);
        for (std::int64_t j = lane; j < Lk; j += 32) dx[base + j] = store<S>(load(y[base + j]) * (load(dy[base + j]) - d));
    }
}

// ---- dropout: one thread per Philox block of 4 elements -------------------------------------------

template <class S>
__global__ void dropout_kernel(std::uint64_t seed, std::uint64_t offset, std::uint32_t threshold, bool drop_all, acc_t<S> scale, const S* in,
                               S* out, std::int64_t n) {
    const std::int64_t blocks = (n + 3) / 4;
    const Philox4x32::Key key{static_cast<std::uint32_t>(seed), static_cast<std::uint32_t>(seed >> 32)};
    for (std::int64_t q = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x; q < blocks; q += std::int64_t{gridDim.x} * blockDim.x) {
        const auto block = static_cast<std::uint64_t>(q);
        const Philox4x32::Counter bits = Philox4x32::generate(
            {static_cast<std::uint32_t>(block), static_cast<std::uint32_t>(block >> 32), static_cast<std::uint32_t>(offset),
             static_cast<std::uint32_t>(offset >> 32)},
            key);
        for (int l = 0; l < 4; ++l) {
            const std::int64_t i = 4 * q + l;
            if (i >= n) break;
            const bool keep = !drop_all && bits[static_cast<std::size_t>(l)] >= threshold;
            out[i] = store<S>(load(in[i]) * (keep ? scale : acc_t<S>(0)));  // x·0 as the CPU: −0 and NaN kept
        }
    }
}

// ---- Adam: nn::Adam::step's update, element by element, in its order of operations ------------------

template <class S>
__global__ void adam_kernel(AdamStep s, S* w, const S* g, float* m, float* v, std::int64_t n) {
    for (std::int64_t i = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x; i < n; i += std::int64_t{gridDim.x} * blockDim.x) {
        float wi = load(w[i]), gi = load(g[i]);
        if (s.weight_decay != 0.f && !s.decoupled) gi += s.weight_decay * wi;
        if (s.weight_decay != 0.f && s.decoupled) wi *= 1.f - s.lr * s.weight_decay;
        const float mi = s.beta1 * m[i] + (1.f - s.beta1) * gi;
        const float vi = s.beta2 * v[i] + (1.f - s.beta2) * (gi * gi);
        m[i] = mi;
        v[i] = vi;
        w[i] = store<S>(wi - s.step_size * mi / (sqrtf(vi) / s.root_c2 + s.eps));
    }
}

}  // namespace

cudaError_t launch_unary(DeviceDType dtype, DeviceUnaryOp op, float alpha, const void* x, void* y, std::int64_t n) {
    return with_storage(dtype, [&]<class S>(S*) {
        return with_unary(op, alpha, [&](auto e) { return ex::evaluate<S, 1>(e, {{static_cast<const S*>(x)}}, static_cast<S*>(y), n); });
    });
}

cudaError_t launch_unary_backward(DeviceDType dtype, DeviceUnaryOp op, float alpha, const void* x, const void* dy, void* dx, std::int64_t n) {
    return with_storage(dtype, [&]<class S>(S*) {
        return with_unary(op, alpha, [&](auto e) {
            return ex::evaluate_gradients<S, 1>(e, {{static_cast<const S*>(x)}}, static_cast<const S*>(dy), {{static_cast<S*>(dx)}}, false, n);
        });
    });
}

cudaError_t launch_binary(DeviceDType dtype, DeviceBinaryOp op, const void* a, const void* b, void* out, std::int64_t n) {
    return with_storage(dtype, [&]<class S>(S*) {
        return with_binary(op, [&](auto e) {
            return ex::evaluate<S, 2>(e, {{static_cast<const S*>(a), static_cast<const S*>(b)}}, static_cast<S*>(out), n);
        });
    });
}

cudaError_t launch_binary_backward(DeviceDType dtype, DeviceBinaryOp op, const void* a, const void* b, const void* dy, void* da, void* db,
                                   std::int64_t n) {
    return with_storage(dtype, [&]<class S>(S*) {
        return with_binary(op, [&](auto e) {
            return ex::evaluate_gradients<S, 2>(e, {{static_cast<const S*>(a), static_cast<const S*>(b)}}, static_cast<const S*>(dy),
                                                {{static_cast<S*>(da), static_cast<S*>(db)}}, false, n);
        });
    });
}

cudaError_t launch_difference(DeviceDType dtype, bool square, double scale, const void* a, const void* b, void* out, std::int64_t n) {
    return with_storage(dtype, [&]<class S>(S*) {
        const Inputs2<S> in{{static_cast<const S*>(a), static_cast<const S*>(b)}};
        constexpr auto x = ex::arg<0>();
        constexpr auto y = ex::arg<1>();
        return square ? ex::evaluate<S, 2>(ex::square(x - y), in, static_cast<S*>(out), n)
                      : ex::evaluate<S, 2>(ex::scale(x - y, scale), in, static_cast<S*>(out), n);
    });
}

cudaError_t launch_strided_copy(DeviceDType dtype, const void* in, void* out, const std::int64_t shape[4], const std::int64_t strides[4],
                                std::int64_t base, bool scatter) {
    Strided g{};
    std::int64_t n = 1;
    for (int k = 0; k < 4; ++k) {
        g.shape[k] = shape[k];
        g.strides[k] = strides[k];
        n *= shape[k];
    }
    g.base = base;
    if (n == 0) return cudaSuccess;
    return with_storage(dtype, [&]<class S>(S*) {
        if (scatter) strided_copy_kernel<S, true><<<blocks_for(n, threads), threads>>>(static_cast<const S*>(in), static_cast<S*>(out), g, n);
        else strided_copy_kernel<S, false><<<blocks_for(n, threads), threads>>>(static_cast<const S*>(in), static_cast<S*>(out), g, n);
        return cudaGetLastError();
    });
}

cudaError_t launch_broadcast_rows(DeviceDType dtype, const void* b, void* y, std::int64_t rows, std::int64_t n) {
    if (rows * n == 0) return cudaSuccess;
    return with_storage(dtype, [&]<class S>(S*) {
        broadcast_rows_kernel<S><<<blocks_for(rows * n, threads), threads>>>(static_cast<const S*>(b), static_cast<S*>(y), rows, n);
        return cudaGetLastError();
    });
}

cudaError_t launch_column_sums(DeviceDType dtype, const void* x, std::int64_t rows, std::int64_t n, void* out, bool accumulate) {
    if (n == 0) return cudaSuccess;
    return with_storage(dtype, [&]<class S>(S*) {
        column_sums_kernel<S><<<static_cast<int>((n + threads - 1) / threads), threads>>>(static_cast<const S*>(x), rows, n,
                                                                                       static_cast<S*>(out), accumulate);
        return cudaGetLastError();
    });
}

cudaError_t launch_sum(DeviceDType dtype, const void* x, std::int64_t n, void* partials, void* out) {
    return with_storage(dtype, [&]<class S>(S*) {
        using V = acc_t<S>;
        partial_sums_kernel<S><<<sum_partials, threads>>>(static_cast<const S*>(x), n, static_cast<V*>(partials));
        final_sum_kernel<V><<<1, threads>>>(static_cast<const V*>(partials), static_cast<V*>(out));
        return cudaGetLastError();
    });
}

cudaError_t launch_softmax_forward(DeviceDType dtype, const SoftmaxProblem& p, const void* x, void* y) {
    if (p.rows * p.Lk == 0) return cudaSuccess;
    return with_storage(dtype, [&]<class S>(S*) {
        softmax_forward_kernel<S><<<blocks_for(p.rows, threads / 32), threads>>>(p, static_cast<const S*>(x), static_cast<S*>(y));
        return cudaGetLastError();
    });
}

cudaError_t launch_softmax_backward(DeviceDType dtype, std::int64_t rows, std::int64_t Lk, const void* dy, const void* y, void* dx) {
    if (rows * Lk == 0) return cudaSuccess;
    return with_storage(dtype, [&]<class S>(S*) {
        softmax_backward_kernel<S><<<blocks_for(rows, threads / 32), threads>>>(rows, Lk, static_cast<const S*>(dy), static_cast<const S*>(y),
                                                                               static_cast<S*>(dx));
        return cudaGetLastError();
    });
}

cudaError_t launch_dropout(DeviceDType dtype, std::uint64_t seed, std::uint64_t offset, std::uint32_t threshold, bool drop_all, double scale,
                           const void* in, void* out, std::int64_t n) {
    if (n == 0) return cudaSuccess;
    return with_storage(dtype, [&]<class S>(S*) {
        dropout_kernel<S><<<blocks_for((n + 3) / 4, threads), threads>>>(seed, offset, threshold, drop_all, static_cast<acc_t<S>>(scale),
                                                                        static_cast<const S*>(in),
                                                                        static_cast<S*>(out), n);
        return cudaGetLastError();
    });
}

cudaError_t launch_adam(DeviceDType dtype, const AdamStep& s, void* w, const void* g, float* m, float* v, std::int64_t n) {
    if (n == 0) return cudaSuccess;
    return with_storage(dtype, [&]<class S>(S*) {
        if constexpr (std::is_same_v<S, double>) {
            return cudaErrorInvalidValue;  // cuda/optim.hpp: float, bf16, fp16 (fp32 moments)
        } else {
            adam_kernel<S><<<blocks_for(n, threads), threads>>>(s, static_cast<S*>(w), static_cast<const S*>(g), m, v, n);
            return cudaGetLastError();
        }
    });
}

}  // namespace autodiff::detail

// The fused attention in fp64 on the GPU: forward, backward and the bias gradient's reduction for
// DeviceTensor<double>, every product, exponential and sum in double. Why kernels of their own:
// attention_fp64.hpp. The maths are cuda/attention.hpp's:
//   S = scale·Q·Kᵀ + bias_scale·bias (−inf where masked), P = softmax(S) (0 on a fully masked row),
//   O = dropout(P)·V;  D = rowsum(dO ⊙ O), dP = dropout_mask ⊙ (dO·Vᵀ), dS = P ⊙ (dP − D),
//   dQ = scale·dS·K, dK = scale·dSᵀ·Q, dV = dropout(P)ᵀ·dO, dbias = bias_scale·reduce(dS).
// Dropout decisions are the CPU's (Philox4x32-10, element index (t·Lq + i)·Lk + j).

#include "attention_fp64.hpp"

#include <cmath>
#include <cstdint>
#include <limits>

#include "autodiff/random.hpp"

namespace autodiff::detail {

namespace {

constexpr int threads = 128;
constexpr double neg_inf = -std::numeric_limits<double>::infinity();

unsigned blocks(std::int64_t n) { return static_cast<unsigned>((n + threads - 1) / threads); }

// The masked, biased score of (t, i, j); −inf where masked.
__device__ double score64(const AttentionProblem& p, const AttentionScales64& s, const double* Q, const double* K, std::int64_t t,
                          std::int64_t i, std::int64_t j) {
    if (p.causal && j > i) return neg_inf;
    if (p.key_padding && !p.key_padding[t / p.kp_div * p.Lk + j]) return neg_inf;
    const double* q = Q + (t * p.Lq + i) * p.d;
    const double* k = K + (t * p.Lk + j) * p.d;
    double dot = 0;
    for (int c = 0; c < p.d; ++c) dot = fma(q[c], k[c], dot);
    double x = s.scale * dot;
    if (p.bias) {
        const auto* b = static_cast<const double*>(p.bias);
        x += s.bias_scale * b[t / p.heads * p.bias_s[0] + t % p.heads * p.bias_s[1] + i * p.bias_s[2] + j * p.bias_s[3]];
    }
    return x;
}

// The dropout factor of (t, i, j): the CPU's decision times 1/(1 − rate), in double.
__device__ double dropout64(const AttentionProblem& p, const AttentionScales64& s, std::int64_t t, std::int64_t i, std::int64_t j) {
    if (!p.dropout) return 1.0;
    if (p.drop_all) return 0.0;
    const auto index = static_cast<std::uint64_t>((t * p.Lq + i) * p.Lk + j);
    return Philox4x32::bits(p.seed, p.offset, index) >= p.threshold ? s.drop_scale : 0.0;
}

// One thread per query row (t, i): the row's max, then Σ e^(x − m) and Σ e^(x − m)·dropout·V.
__global__ void forward_kernel(AttentionProblem p, AttentionScales64 s, const double* Q, const double* K, const double* V, double* O,
                               double* lse) {
    const std::int64_t r = blockIdx.x * std::int64_t{threads} + threadIdx.x;
    if (r >= p.items * p.Lq) return;
    const std::int64_t t = r / p.Lq, i = r % p.Lq;
    double m = neg_inf;
    for (std::int64_t j = 0; j < p.Lk; ++j) m = fmax(m, score64(p, s, Q, K, t, i, j));
    double o[max_head_dim];
    for (int c = 0; c < p.dv; ++c) o[c] = 0;
    double l = 0;
    if (m != neg_inf)
        for (std::int64_t j = 0; j < p.Lk; ++j) {
            const double x = score64(p, s, Q, K, t, i, j);
            if (x == neg_inf) continue;
            const double e = exp(x - m);
            l += e;
            const double w = e * dropout64(p, s, t, i, j);
            const double* v = V + (t * p.Lk + j) * p.dv;
            for (int c = 0; c < p.dv; ++c) o[c] = fma(w, v[c], o[c]);
        }
    const double inv = l > 0 ? 1.0 / l : 0.0;
    for (int c = 0; c < p.dv; ++c) O[r * p.dv + c] = o[c] * inv;
    lse[r] = l > 0 ? m + log(l) : neg_inf;
}

// One thread per query row: D_i, then dS_ij for every key (to the scratch) and dQ_i = scale·Σ_j dS_ij·K_j.
__global__ void dq_kernel(AttentionProblem p, AttentionScales64 s, const double* Q, const double* K, const double* V, const double* dO,
                          const double* O, const double* lse, double* D, double* dS, double* dQ) {
    const std::int64_t r = blockIdx.x * std::int64_t{threads} + threadIdx.x;
    if (r >= p.items * p.Lq) return;
    const std::int64_t t = r / p.Lq, i = r % p.Lq;
    const double* dout = dO + r * p.dv;
    double Di = 0;
    for (int c = 0; c < p.dv; ++c) Di = fma(dout[c], O[r * p.dv + c], Di);
    D[r] = Di;
    double dq[max_head_dim];
    for (int c = 0; c < p.d; ++c) dq[c] = 0;
    for (std::int64_t j = 0; j < p.Lk; ++j) {
        const double x = score64(p, s, Q, K, t, i, j);
        double g = 0;
        if (x != neg_inf && lse[r] != neg_inf) {
            const double P = exp(x - lse[r]);
            const double* v = V + (t * p.Lk + j) * p.dv;
            double dP = 0;
            for (int c = 0; c < p.dv; ++c) dP = fma(dout[c], v[c], dP);
            g = P * (dP * dropout64(p, s, t, i, j) - Di);
            const double* k = K + (t * p.Lk + j) * p.d;
            for (int c = 0; c < p.d; ++c) dq[c] = fma(g, k[c], dq[c]);
        }
        dS[r * p.Lk + j] = g;
    }
    if (dQ)
        for (int c = 0; c < p.d; ++c) dQ[r * p.d + c] = s.scale * dq[c];
}

// One thread per key row (t, j): dV_j = Σ_i dropout(P_ij)·dO_i and dK_j = scale·Σ_i dS_ij·Q_i (dS from dq_kernel).
__global__ void dkdv_kernel(AttentionProblem p, AttentionScales64 s, const double* Q, const double* K, const double* dO, const double* lse,
                            const double* dS, double* dK, double* dV) {
    const std::int64_t r = blockIdx.x * std::int64_t{threads} + threadIdx.x;
    if (r >= p.items * p.Lk) return;
    const std::int64_t t = r / p.Lk, j = r % p.Lk;
    double dk[max_head_dim], dv[max_head_dim];
    for (int c = 0; c < p.d; ++c) dk[c] = 0;
    for (int c = 0; c < p.dv; ++c) dv[c] = 0;
    for (std::int64_t i = 0; i < p.Lq; ++i) {
        const std::int64_t row = t * p.Lq + i;
        const double g = dS[row * p.Lk + j];
        const double* q = Q + row * p.d;
        for (int c = 0; c < p.d; ++c) dk[c] = fma(g, q[c], dk[c]);
        if (!dV) continue;
        const double x = score64(p, s, Q, K, t, i, j);
        if (x == neg_inf || lse[row] == neg_inf) continue;
        const double w = exp(x - lse[row]) * dropout64(p, s, t, i, j);
        const double* dout = dO + row * p.dv;
        for (int c = 0; c < p.dv; ++c) dv[c] = fma(w, dout[c], dv[c]);
    }
    if (dK)
        for (int c = 0; c < p.d; ++c) dK[r * p.d + c] = s.scale * dk[c];
    if (dV)
        for (int c = 0; c < p.dv; ++c) dV[r * p.dv + c] = dv[c];
}

struct Dims4 {
    std::int64_t n[4];
};

// dbias (bias dims) = bias_scale·Σ dS over the broadcast dimensions, one thread per element, fixed order.
__global__ void bias_gradient_kernel(const double* dS, Dims4 scores, Dims4 bias, double bias_scale, double* dbias, std::int64_t n) {
    const std::int64_t e = blockIdx.x * std::int64_t{threads} + threadIdx.x;
    if (e >= n) return;
    std::int64_t at[4], rest = e, lo[4], hi[4];
    for (int k = 3; k >= 0; --k) {
        at[k] = rest % bias.n[k];
        rest /= bias.n[k];
    }
    for (int k = 0; k < 4; ++k) {
        lo[k] = bias.n[k] == 1 ? 0 : at[k];
        hi[k] = bias.n[k] == 1 ? scores.n[k] : at[k] + 1;
    }
    double acc = 0;
    for (std::int64_t b = lo[0]; b < hi[0]; ++b)
        for (std::int64_t h = lo[1]; h < hi[1]; ++h)
            for (std::int64_t i = lo[2]; i < hi[2]; ++i)
                for (std::int64_t j = lo[3]; j < hi[3]; ++j) acc += dS[((b * scores.n[1] + h) * scores.n[2] + i) * scores.n[3] + j];
    dbias[e] = bias_scale * acc;
}

}  // namespace

cudaError_t launch_attention_forward_f64(const AttentionProblem& p, const AttentionScales64& s, const double* Q, const double* K,
                                         const double* V, double* O, double* lse) {
    const std::int64_t rows = p.items * p.Lq;
    if (rows == 0) return cudaSuccess;
    forward_kernel<<<blocks(rows), threads>>>(p, s, Q, K, V, O, lse);
    return cudaGetLastError();
}

cudaError_t launch_attention_backward_f64(const AttentionProblem& p, const AttentionScales64& s, const double* Q, const double* K,
                                          const double* V, const double* dO, const double* O, const double* lse, double* D, double* dS,
                                          double* dQ, double* dK, double* dV, double* dbias, const std::int64_t bias_dims[4]) {
    const std::int64_t rows = p.items * p.Lq, keys = p.items * p.Lk;
    if (rows == 0 || keys == 0) return cudaSuccess;
    dq_kernel<<<blocks(rows), threads>>>(p, s, Q, K, V, dO, O, lse, D, dS, dQ);
    if (const cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
    if (dK || dV) {
        dkdv_kernel<<<blocks(keys), threads>>>(p, s, Q, K, dO, lse, dS, dK, dV);
        if (const cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
    }
    if (dbias) {
        const Dims4 scores{{p.items / p.heads, p.heads, p.Lq, p.Lk}}, bias{{bias_dims[0], bias_dims[1], bias_dims[2], bias_dims[3]}};
        const std::int64_t n = bias_dims[0] * bias_dims[1] * bias_dims[2] * bias_dims[3];
        if (n > 0) bias_gradient_kernel<<<blocks(n), threads>>>(dS, scores, bias, s.bias_scale, dbias, n);
    }
    return cudaGetLastError();
}

}  // namespace autodiff::detail

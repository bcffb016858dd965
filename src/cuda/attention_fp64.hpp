#pragma once
// The launchers of the fp64 attention kernels (attention_fp64.cu), for attention.cpp: the fused
// attention of cuda/attention.hpp for DeviceTensor<double>, computed and accumulated in double. Plain
// types only (read by nvcc and by the host compiler), as attention_kernels.hpp.
//
// Why kernels of their own rather than the float32 staged kernels of attention_kernels.cu instantiated
// for double: those keep their scores, row statistics, lse, D and accumulators in fp32 shared memory
// and their scales (AttentionProblem::scale, bias_scale, drop_scale) in float, so a double
// instantiation would still round to fp32 at every step, which defeats a gradient check in fp64.
// These kernels are the reference formulas, one thread per query row (forward, dQ) or key row (dK, dV),
// summing in a fixed order (deterministic, no atomics); they are meant for checks on small problems,
// not for speed.

#include <cstdint>

#include <cuda_runtime.h>

#include "attention_kernels.hpp"

namespace autodiff::detail {

// The problem's scalars in double (AttentionProblem holds them as float for the fp32/16-bit kernels).
struct AttentionScales64 {
    double scale = 1, bias_scale = 1, drop_scale = 1;
};

// Q (t, Lq, d), K (t, Lk, d), V (t, Lk, dv), bias (double, p.bias) -> O (t, Lq, dv), lse (t, Lq); all double.
cudaError_t launch_attention_forward_f64(const AttentionProblem& p, const AttentionScales64& s, const double* Q, const double* K,
                                         const double* V, double* O, double* lse);

// dS (t, Lq, Lk) double scratch, always written (0 where masked); D (t, Lq) double scratch. dQ, dK, dV,
// dbias (the bias's padded shape bias_dims) may be null.
cudaError_t launch_attention_backward_f64(const AttentionProblem& p, const AttentionScales64& s, const double* Q, const double* K,
                                          const double* V, const double* dO, const double* O, const double* lse, double* D, double* dS,
                                          double* dQ, double* dK, double* dV, double* dbias, const std::int64_t bias_dims[4]);

}  // namespace autodiff::detail

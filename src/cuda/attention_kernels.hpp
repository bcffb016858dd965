#pragma once
// The launchers of the GPU attention kernels (attention_kernels.cu), for attention.cpp. Plain types
// only: this header is read by nvcc and by the host compiler, and pulls in neither fmt nor Eigen.
// Every launcher queues its kernels on the default stream and returns the launch's cudaError_t.

#include <cstdint>

#include <cuda_runtime.h>

namespace autodiff::detail {

// f64: the device functional layer's double (cuda/ops.hpp, blas.hpp) and the fp64 attention kernels of
// attention_fp64.cu (launch_attention_*_f64 in attention_fp64.hpp); the launchers of
// attention_kernels.cu refuse it (cudaErrorInvalidValue).
enum class DeviceDType : std::uint8_t { f32, bf16, f16, f64 };

// Everything a kernel needs to know about the problem, by value. Scores: padded rank 4 (B, H, Lq, Lk),
// leading index t = b·H + h.
struct AttentionProblem {
    std::int64_t items = 0, heads = 1, Lq = 0, Lk = 0;  // items = B·H leading indices
    int d = 0, dv = 0;                                   // at most max_head_dim
    float scale = 1, bias_scale = 1;
    const void* bias = nullptr;
    std::int64_t bias_s[4] = {0, 0, 0, 0};  // broadcast strides of the bias over (B, H, Lq, Lk)
    bool causal = false;
    const bool* key_padding = nullptr;  // (batch, Lk), true = keep
    std::int64_t kp_div = 1;            // batch = t / kp_div
    bool dropout = false;
    bool drop_all = false;  // a rate within 2^-33 of 1 drops everything
    std::uint32_t threshold = 0;
    float drop_scale = 1;
    std::uint64_t seed = 0, offset = 0;
    // The keep mask, broadcastable to (B, H, Lq, Lk), true = keep (null: none), and its broadcast strides.
    const bool* keep = nullptr;
    std::int64_t keep_s[4] = {0, 0, 0, 0};
    // The keep mask's tile table (launch_keep_tile_classify): one byte per (keep_tile × keep_tile) tile of
    // each (b, h) plane the mask has, keep_tile_empty / _partial / _full; null: no table (every tile is
    // partial). Plane of t = b·H + h at keep_tiles + b·keep_tiles_s[0] + h·keep_tiles_s[1] (0 where the
    // mask broadcasts), tile (qb, kb) at qb·keep_tiles_kb + kb.
    const std::uint8_t* keep_tiles = nullptr;
    std::int64_t keep_tiles_s[2] = {0, 0};
    std::int64_t keep_tiles_kb = 0;
    // Set by the 16-bit launchers: the grid is (planes, row blocks) instead of (row blocks, planes), so that
    // the plane varies fastest in dispatch order (causal problems of at most 65535 row blocks a plane).
    bool plane_fastest = false;
};

// The keep mask's tiles: queries and keys in blocks of keep_tile (the 16-bit kernels' 64 × 64 tiles; the
// float32 kernels' 32 × 32 tiles each lie in one). Empty: nothing kept (skipped); full: everything in
// range kept (no per-element test); partial: the rest.
inline constexpr int keep_tile = 64;
inline constexpr std::uint8_t keep_tile_empty = 0, keep_tile_partial = 1, keep_tile_full = 2;

inline constexpr int max_head_dim = 128;

// Q (t, Lq, d), K (t, Lk, d), V (t, Lk, dv) -> O (t, Lq, dv), lse (t, Lq).
cudaError_t launch_attention_forward(DeviceDType dtype, const AttentionProblem& p, const void* Q, const void* K, const void* V, void* O,
                                     float* lse);

// Classifies the tiles of p.keep into `tiles` (planes_b · planes_h · ceil(Lq/keep_tile) · ceil(Lk/keep_tile)
// bytes, planes_b × planes_h: the mask's padded leading dimensions), one block a tile.
cudaError_t launch_keep_tile_classify(const AttentionProblem& p, std::int64_t planes_b, std::int64_t planes_h, std::uint8_t* tiles);

// D (t, Lq) fp32 scratch; dQ, dK, dV, dbias_full (the full-shape bias gradient) and dS_scratch (fp32
// (t, Lq, Lk), for a broadcast bias) may be null. Tiles skipped under a mask are not written: the
// caller zeroes dbias_full / dS_scratch first when there is a mask.
cudaError_t launch_attention_backward(DeviceDType dtype, const AttentionProblem& p, const void* Q, const void* K, const void* V,
                                      const void* dO, const void* O, const float* lse, float* D, void* dQ, void* dK, void* dV,
                                      void* dbias_full, float* dS_scratch);

// dbias (bias dims, padded to rank 4) = bias_scale·Σ dS over the broadcast dimensions, each element
// summed in a fixed order. dS: fp32 (scores dims).
cudaError_t launch_bias_gradient_reduce(DeviceDType dtype, const float* dS, const std::int64_t scores[4], const std::int64_t bias[4],
                                        float bias_scale, void* dbias);

// out (dtype) = in (fp32), rounded to nearest even; and back, exactly.
cudaError_t launch_narrow(DeviceDType dtype, const float* in, void* out, std::int64_t n);
cudaError_t launch_widen(DeviceDType dtype, const void* in, float* out, std::int64_t n);

}  // namespace autodiff::detail

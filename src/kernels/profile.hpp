#pragma once
// Where the fused attention kernels spend their time, by phase (internal to src/kernels).
//
// Built only with -DAUTODIFF_PROFILE_KERNELS=ON (CMake option); otherwise AUTODIFF_PHASE expands to
// nothing. Each scope adds its elapsed time-stamp-counter ticks (or steady_clock nanoseconds where
// there is no TSC) to a per-phase total, summed over threads; at exit the library prints the shares
// to stderr. Shares, not absolute times: the TSC runs at a fixed rate, not at the core's clock.
// Usage: bench/attention_step.cpp prints the table of one run (docs/PERFORMANCE.md).

#include <cstdint>

namespace autodiff::detail::profile {

enum Phase : int {
    fwd_transpose,   // Kᵀ of one leading index, tile by tile
    qk_product,      // S = scale·Q·Kᵀ (forward, and backward when it recomputes S)
    bias_and_masks,  // + bias + additive, masked entries −∞
    keep_scores,     // forward: S streamed to the bias gradient's buffer
    fwd_softmax,     // online softmax of a tile
    dropout,         // dropout: a tile's keep bits (Philox or the stored mask) and applying them
    pv_product,      // acc += P·V
    fwd_output,      // O = acc / l, lse
    bwd_prologue,    // Kᵀ, Vᵀ and D = rowsum(dO ⊙ O) of one leading index
    bwd_scores,      // S read from the kept buffer (prefetch of the next tile)
    bwd_exp,         // P = e^(S − lse)
    dv_product,      // dV += dropout(P)ᵀ·dO
    dp_product,      // dP = dO·Vᵀ
    ds,              // dS = P ⊙ (dP − D)
    dbias,           // bias gradient of a tile
    dq_product,      // dQ += scale·dS·K
    dk_product,      // dK += scale·dSᵀ·Q
    mask_classify,      // a modifier's mask: is a tile empty, full or partial
    score_fn,           // a modifier's score function f(x) over a tile
    score_fn_backward,  // dx = dS ⊙ ∂f/∂x and the captured tensors' gradients
    count
};

#if defined(AUTODIFF_PROFILE_KERNELS)
std::uint64_t now();
void add(Phase phase, std::uint64_t ticks);

struct Scope {
    Phase phase;
    std::uint64_t start = now();
    explicit Scope(Phase p) : phase(p) {}
    Scope(const Scope&) = delete;
    Scope& operator=(const Scope&) = delete;
    ~Scope() { add(phase, now() - start); }
};
#define AUTODIFF_PHASE_CAT2(a, b) a##b
#define AUTODIFF_PHASE_CAT(a, b) AUTODIFF_PHASE_CAT2(a, b)
#define AUTODIFF_PHASE(name) \
    const ::autodiff::detail::profile::Scope AUTODIFF_PHASE_CAT(autodiff_phase_, __LINE__)(::autodiff::detail::profile::name)
#else
#define AUTODIFF_PHASE(name) static_cast<void>(0)
#endif

}  // namespace autodiff::detail::profile

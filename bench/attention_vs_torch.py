#!/usr/bin/env python3
"""Fused biased attention against PyTorch, side by side (BENCHMARKING.md).

fp32, n=2, h=8, d=64. For each L and thread count, alternating separate processes:
  ours            bench_attention_step (fused path; also the generic path with --generic)
  torch eager     softmax(Q Kᵀ/√d + B) V with B (n,h,L,L) requiring grad
  torch sdpa      scaled_dot_product_attention(attn_mask=B) with B requiring grad
and, without a bias, causal attention against scaled_dot_product_attention(is_causal=True).
Reports median (min-max) ms of forward and forward+backward, GFLOP/s (4·n·h·L²·d forward,
8·n·h·L²·d backward; causal counts half), and peak RSS of each process (VmHWM).

    pip install torch numpy
    python3 bench/attention_vs_torch.py --build build --lengths 256 512 1024 2048 [--threads 1 2] [--rounds 3]
"""
import argparse
import os
import sys

from benchlib import ATTENTION_TIMING, print_machine, run_alternating, timing_rows

TORCH = r"""
import json, sys, time, torch
mode, n, h, L, d, reps, threads = sys.argv[1], *map(int, sys.argv[2:8])
torch.set_num_threads(threads)
torch.manual_seed(0)
q, k, v = (torch.randn(n, h, L, d, requires_grad=True) for _ in range(3))
dO = torch.randn(n, h, L, d)
b = torch.randn(n, h, L, L, requires_grad=True) if mode in ("eager", "sdpa") else None
scale = d ** -0.5
F = torch.nn.functional
def fwd():
    if mode == "eager":
        return torch.softmax(q @ k.transpose(-2, -1) * scale + b, dim=-1) @ v
    if mode == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=b)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)
""" + ATTENTION_TIMING


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default="build")
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--generic", action="store_true", help="also time our generic (unfused) path")
    ap.add_argument("--no-limits", action="store_true")
    ap.add_argument("--cases", nargs="+", default=["bias", "causal"], choices=["bias", "causal"])
    a = ap.parse_args()
    import torch

    n, h, d = 2, 8, 64
    print_machine(a.no_limits)
    print(f"torch {torch.__version__}; n={n}, h={h}, d={d}, fp32; {a.rounds} alternating rounds x {a.reps} steps\n")
    ours = os.path.join(a.build, "bench", "bench_attention_step")
    print("| case | threads | L | side | fwd ms | fwd+bwd ms (min–max) | fwd+bwd GFLOP/s | peak RSS MiB | speed-up fwd+bwd vs ours |")
    print("|---|---|---|---|---|---|---|---|---|")
    for case in a.cases:
        for t in a.threads:
            for L in a.lengths:
                sides = {"ours": [ours, str(n), str(h), str(L), str(d), "1" if case == "bias" else "0",
                                  "0" if case == "bias" else "1", "0", str(a.reps)]}
                if a.generic:
                    sides["ours generic"] = sides["ours"] + ["generic"]
                for m in (("eager", "sdpa") if case == "bias" else ("causal",)):
                    sides[f"torch {m}"] = [sys.executable, "-c", TORCH, m, str(n), str(h), str(L), str(d), str(a.reps), str(t)]
                res = run_alternating(sides, a.rounds, t)
                for row in timing_rows(res, "ours", (12 if case == "bias" else 6) * n * h * L * L * d):
                    print(f"| {case} | {t} | {L} | " + " | ".join(row) + " |", flush=True)

if __name__ == "__main__":
    main()

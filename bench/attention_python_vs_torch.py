#!/usr/bin/env python3
"""The Python package's attention() against PyTorch on the CPU, side by side (BENCHMARKING.md).

Attention with a trainable bias (n, h, L, L), fp32, n=2, h=8, d=64, gradients of q, k, v and the bias.
For each L and thread count, alternating separate processes (never two thread pools in one process):
  ours (python)   autodiff_attention.attention(q, k, v, bias=b)      (pip install .)
  torch sdpa      scaled_dot_product_attention(q, k, v, attn_mask=b) (float mask: the math path on the CPU)
  torch eager     softmax(q kᵀ/√d + b) v
  ours (C++)      bench_attention_step from a C++ build (--build), when it exists: the same kernels
                  through the C++ tape, to show what the Python layer costs
Reports median (min-max) ms of forward and forward+backward, GFLOP/s (12·n·h·L²·d per step), peak RSS of
each process (VmHWM) and each side's time relative to ours (python).

    pip install .  &&  python3 bench/attention_python_vs_torch.py --lengths 512 1024 2048 --threads 2 [--build build]
"""
import argparse
import os
import sys

from benchlib import ATTENTION_TIMING, print_machine, run_alternating, timing_rows

SIDE = r"""
import json, sys, time, torch
mode, n, h, L, d, reps, threads = sys.argv[1], *map(int, sys.argv[2:8])
torch.set_num_threads(threads)
torch.manual_seed(0)
q, k, v = (torch.randn(n, h, L, d, requires_grad=True) for _ in range(3))
dO = torch.randn(n, h, L, d)
b = torch.randn(n, h, L, L, requires_grad=True)
scale = d ** -0.5
F = torch.nn.functional
if mode == "ours":
    import autodiff_attention as aa
def fwd():
    if mode == "ours":
        return aa.attention(q, k, v, bias=b)
    if mode == "eager":
        return torch.softmax(q @ k.transpose(-2, -1) * scale + b, dim=-1) @ v
    return F.scaled_dot_product_attention(q, k, v, attn_mask=b)
""" + ATTENTION_TIMING


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default=None, help="a C++ build folder with bench/bench_attention_step (optional)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048])
    ap.add_argument("--threads", type=int, nargs="+", default=[2])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-limits", action="store_true")
    a = ap.parse_args()
    import torch
    import autodiff_attention  # noqa: F401  (fail early when the package is not installed)

    n, h, d = 2, 8, 64
    print_machine(a.no_limits)
    print(f"torch {torch.__version__}; n={n}, h={h}, d={d}, fp32, bias (n,h,L,L) requiring grad; "
          f"{a.rounds} alternating rounds x {a.reps} steps\n")
    cpp = os.path.join(a.build, "bench", "bench_attention_step") if a.build else None
    if cpp and not os.path.exists(cpp):
        sys.exit(f"{cpp} does not exist: build the C++ benchmarks, or leave out --build")
    print("| threads | L | side | fwd ms | fwd+bwd ms (min–max) | fwd+bwd GFLOP/s | peak RSS MiB | time / ours (python) |")
    print("|---|---|---|---|---|---|---|---|")
    for t in a.threads:
        for L in a.lengths:
            sides = {}
            for name, mode in (("ours (python)", "ours"), ("torch sdpa (float mask)", "sdpa"), ("torch eager", "eager")):
                sides[name] = [sys.executable, "-c", SIDE, mode, str(n), str(h), str(L), str(d), str(a.reps), str(t)]
            if cpp:
                sides["ours (C++)"] = [cpp, str(n), str(h), str(L), str(d), "1", "0", "0", str(a.reps)]
            res = run_alternating(sides, a.rounds, t)
            for row in timing_rows(res, "ours (python)", 12 * n * h * L * L * d):
                print(f"| {t} | {L} | " + " | ".join(row) + " |", flush=True)

if __name__ == "__main__":
    main()

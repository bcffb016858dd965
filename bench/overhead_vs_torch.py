#!/usr/bin/env python3
"""Side-by-side per-call overhead: the blog post's biased attention, forward + backward, at tiny
shapes, ours (bench_overhead: generic path and fused path) against PyTorch eager, 1 thread, in
separate processes run alternately (BENCHMARKING.md: never in one process, never trust one timing).

    pip install torch numpy
    python3 bench/overhead_vs_torch.py --build build [--base BASE_BUILD] [--reps 5] [--no-limits]

--base adds the same benchmark from another build (the code before a change), run in the same
alternation, as rows `base generic` / `base fused`.

Prints a Markdown table for docs/PERFORMANCE.md.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

from benchlib import env_threads, print_machine

SHAPES = [(2, 4, 8, 16), (1, 1, 8, 16)]

TORCH_SNIPPET = r"""
import sys, time, torch
torch.set_num_threads(1)
n, h, l, d = map(int, sys.argv[1:5])
g = torch.Generator().manual_seed(0)
Q, K, V = (torch.randn(n, h, l, d, generator=g, requires_grad=True) for _ in range(3))
B = torch.randn(n, h, l, l, generator=g, requires_grad=True)
dO = torch.randn(n, h, l, d, generator=g)
scale = d ** -0.5
def step():
    O = torch.softmax(Q @ K.transpose(-2, -1) * scale + B, dim=-1) @ V
    O.backward(dO)
for _ in range(200):
    step()
best = []
for _ in range(5):
    iters = 2000
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    best.append((time.perf_counter() - t0) / iters * 1e6)
print(min(best))
"""


def ours(build):
    out = subprocess.run([os.path.join(build, "bench", "bench_overhead"), "--benchmark_format=json",
                          "--benchmark_min_time=0.5"], check=True, capture_output=True, text=True, env=env_threads(1))
    res = {}
    for b in json.loads(out.stdout)["benchmarks"]:
        path, *args = b["name"].split("/")
        res[(path.removeprefix("BM_"), tuple(int(x) for x in args[:4]))] = (b["real_time"], b["heap_allocs_per_iter"])
    return res


def torch_us(shape):
    out = subprocess.run([sys.executable, "-c", TORCH_SNIPPET, *map(str, shape)], check=True, capture_output=True,
                         text=True, env=env_threads(1))
    return float(out.stdout.strip())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default="build")
    ap.add_argument("--base", help="another build directory to time alternately (rows 'base ...')")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-limits", action="store_true", help="skip ../shared/tools/machine-limits/run.sh")
    a = ap.parse_args()
    import torch  # noqa: F401  (fail early with a clear message if missing)

    print_machine(a.no_limits)
    print(f"torch {torch.__version__}, 1 thread, {a.reps} alternating repetitions\n")
    paths = ("generic", "fused") + (("base generic", "base fused") if a.base else ())
    ours_t = {(p, s): [] for p in paths for s in SHAPES}
    torch_t = {s: [] for s in SHAPES}
    allocs = {}
    for r in range(a.reps):
        res = ours(a.build)
        if a.base:
            res.update({("base " + p, s): r for (p, s), r in ours(a.base).items()})
        for key in ours_t:
            ours_t[key].append(res[key][0])
            allocs[key] = res[key][1]
        for s in SHAPES:
            torch_t[s].append(torch_us(s))
        print(f"repetition {r + 1}/{a.reps} done", file=sys.stderr)
    print("| shape (n,h,l,d) | path | ours µs median (min–max) | PyTorch eager µs median (min–max) | speed-up (median) | heap allocs / iter (ours) |")
    print("|---|---|---|---|---|---|")
    for s in SHAPES:
        for p in paths:
            o, t = ours_t[(p, s)], torch_t[s]
            print(f"| {s} | {p} | {statistics.median(o):.2f} ({min(o):.2f}–{max(o):.2f}) | {statistics.median(t):.1f} "
                  f"({min(t):.1f}–{max(t):.1f}) | {statistics.median(t) / statistics.median(o):.1f}× | {allocs[(p, s)]:.0f} |")


if __name__ == "__main__":
    main()

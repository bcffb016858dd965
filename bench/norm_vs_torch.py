#!/usr/bin/env python3
"""layer_norm, rms_norm and the MLP's bias + gelu against PyTorch eager, side by side (BENCHMARKING.md).

    python3 bench/norm_vs_torch.py --build build [--rows 4096] [--n 1024] [--rounds 5] [--reps 20] [--threads 2]

Each round runs build/bench/bench_norm_step (x (rows, n) float, weight and bias (n) trainable, median of
reps steps) and then the same ops in torch in their own process, with the same threads; the table gives
the medians over the rounds and torch ÷ ours. torch's side: F.layer_norm(x, (n,), w, b),
F.rms_norm(x, (n,), w, 1e-6), F.gelu(x + b, approximate='none' | 'tanh'); ours: layer_norm, rms_norm,
bias_gelu (one fused record) and gelu(x + b) composed.
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402

TORCH = r"""
import json, sys, time, torch
import torch.nn.functional as F
rows, n, reps = (int(a) for a in sys.argv[1:4])
g = torch.Generator().manual_seed(0)
x = torch.randn(rows, n, generator=g, requires_grad=True)
w = torch.randn(n, generator=g, requires_grad=True)
b = torch.randn(n, generator=g, requires_grad=True)
dy = torch.randn(rows, n, generator=g)
ops = {
    "layer_norm": lambda: F.layer_norm(x, (n,), w, b),
    "rms_norm": lambda: F.rms_norm(x, (n,), w, 1e-6),
    "bias_gelu exact": lambda: F.gelu(x + b),
    "bias_gelu tanh": lambda: F.gelu(x + b, approximate="tanh"),
}
def median_ms(f):
    t = []
    for _ in range(reps):
        t0 = time.perf_counter(); f(); t.append((time.perf_counter() - t0) * 1e3)
    return sorted(t)[len(t) // 2]
out = {}
for name, make in ops.items():
    def fwd():
        with torch.no_grad():
            make()
    def step():
        for p in (x, w, b):
            p.grad = None
        make().backward(dy)
    for _ in range(3):
        step()
    out[name] = {"fwd_ms": median_ms(fwd), "fwd_bwd_ms": median_ms(step)}
print(json.dumps(out))
"""

LINE = re.compile(r"^(.+?)\s+rows \d+ n \d+ threads \d+: forward ([\d.]+) ms, forward\+backward ([\d.]+) ms")


def ours(binary, rows, n, reps, threads):
    out = subprocess.run([binary, str(rows), str(n), str(reps)], check=True, capture_output=True, text=True,
                         env=benchlib.env_threads(threads)).stdout
    res = {}
    for line in out.splitlines():
        m = LINE.match(line)
        if m:
            res[m.group(1).strip()] = {"fwd_ms": float(m.group(2)), "fwd_bwd_ms": float(m.group(3))}
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", default="build")
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-limits", action="store_true", help="skip the machine-limits run")
    a = ap.parse_args()
    binary = os.path.join(a.build, "bench", "bench_norm_step")
    if not os.path.exists(binary):
        sys.exit(f"{binary} not found: build the benchmarks first (cmake --build {a.build} --target bench_norm_step)")
    benchlib.print_machine(a.no_limits)
    print(f"x ({a.rows}, {a.n}) float, {a.threads} threads, {a.rounds} rounds alternating ours / torch, median of {a.reps} steps each\n")
    ours_r, torch_r = [], []
    for r in range(a.rounds):
        ours_r.append(ours(binary, a.rows, a.n, a.reps, a.threads))
        torch_r.append(benchlib.run_json([sys.executable, "-c", TORCH, str(a.rows), str(a.n), str(a.reps)], a.threads))
        print(f"round {r + 1}: ours {json.dumps(ours_r[-1])}\n         torch {json.dumps(torch_r[-1])}", flush=True)
    print("\n| op | ours fwd ms | torch fwd ms | torch ÷ ours | ours fwd+bwd ms | torch fwd+bwd ms | torch ÷ ours |")
    print("|---|---|---|---|---|---|---|")
    for name in ("layer_norm", "rms_norm", "bias_gelu exact", "bias_gelu tanh", "gelu(x + b)"):
        row = [name]
        for key in ("fwd_ms", "fwd_bwd_ms"):
            mine = statistics.median(r[name][key] for r in ours_r)
            torch_name = "bias_gelu exact" if name == "gelu(x + b)" else name
            theirs = statistics.median(r[torch_name][key] for r in torch_r)
            row += [f"{mine:.3f}", f"{theirs:.3f}", f"{theirs / mine:.2f}"]
        print("| " + " | ".join(row) + " |")
    print("\ngelu(x + b) is ours composed of two records (compared with torch's same spelling, exact gelu).")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""A full multi-head attention training step (forward + backward of the input and every parameter, then
an Adam step),
ours (build/bench/bench_mha_step) against torch.nn.MultiheadAttention(batch_first=True,
need_weights=False), fp32, E=512, 8 heads, batch 2, L = 256 and 512, dropout 0 and 0.1, 1 and 2
threads. Each configuration runs both sides in separate processes, alternating, several times
(BENCHMARKING.md); the table reports medians with min-max and the ratio of medians.

    pip install torch numpy
    python3 bench/mha_vs_torch.py --build build [--module mha|encoder] [--rounds 3] [--no-limits]
                                  [--threads 1 2] [--baseline OTHER/bench_mha_step]

--module encoder times one torch.nn.TransformerEncoderLayer(512, 8, dim_feedforward=2048,
batch_first=True) step against nn::TransformerEncoderLayer instead. --baseline times a second build of
bench_mha_step (e.g. the code before a change) in the same alternating rounds, in extra columns.
"""
import argparse
import os
import statistics
import sys

from benchlib import print_machine, run_json

TORCH_SNIPPET = r"""
import json, sys, time, torch
E, H, B, L, p, reps, threads = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7])
encoder = sys.argv[8] == "encoder"
torch.set_num_threads(threads)
torch.manual_seed(0)
if encoder:
    layer = torch.nn.TransformerEncoderLayer(E, H, dim_feedforward=4 * E, dropout=p, batch_first=True)
    module, call = layer, lambda x: layer(x)
else:
    mha = torch.nn.MultiheadAttention(E, H, dropout=p, batch_first=True)
    module, call = mha, lambda x: mha(x, x, x, need_weights=False)[0]
opt = torch.optim.Adam(module.parameters(), lr=1e-4)
x = torch.randn(B, L, E, requires_grad=True)
dO = torch.randn(B, L, E)
def step():
    module.zero_grad(set_to_none=True)
    x.grad = None
    out = call(x)
    out.backward(dO)
    opt.step()
for _ in range(3):
    step()
ms = []
for _ in range(reps):
    t0 = time.perf_counter()
    step()
    ms.append((time.perf_counter() - t0) * 1e3)
ms.sort()
print(json.dumps({"median_ms": ms[len(ms) // 2], "min_ms": ms[0], "max_ms": ms[-1]}))
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default="build")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds per configuration")
    ap.add_argument("--reps", type=int, default=10, help="timed steps per process")
    ap.add_argument("--no-limits", action="store_true")
    ap.add_argument("--module", choices=["mha", "encoder"], default="mha",
                    help="mha: nn.MultiheadAttention; encoder: nn.TransformerEncoderLayer (post-norm, ReLU, FF = 4E)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--baseline", help="another bench_mha_step binary, timed in the same rounds")
    a = ap.parse_args()
    import torch

    print_machine(a.no_limits)
    what = "nn.MultiheadAttention" if a.module == "mha" else "nn.TransformerEncoderLayer (post-norm, ReLU, FF=2048)"
    print(f"torch {torch.__version__}; {what}; E=512, heads=8, batch 2, fp32, fwd+bwd+Adam step; "
          f"{a.rounds} alternating rounds x {a.reps} steps\n")
    ours_bin = os.path.join(a.build, "bench", "bench_mha_step")
    base_cols = " baseline ms median (min–max) | baseline speed-up | ours vs baseline | baseline pool peak MiB |" if a.baseline else ""
    print(f"| threads | L | dropout | ours ms median (min–max) | torch ms median (min–max) | speed-up | ours pool peak MiB |{base_cols}")
    print("|---|---|---|---|---|---|---|" + ("---|---|---|---|" if a.baseline else ""))
    for t in a.threads:
        for L in (256, 512):
            for p in (0.0, 0.1):
                args = ["512", "8", "2", str(L), str(p), str(a.reps)]
                ours, theirs, base = [], [], []
                for _ in range(a.rounds):
                    o = run_json([ours_bin, *args, a.module], t)
                    ours.append(o["median_ms"])
                    theirs.append(run_json([sys.executable, "-c", TORCH_SNIPPET, *args, str(t), a.module], t)["median_ms"])
                    if a.baseline:
                        b = run_json([a.baseline, *args, a.module], t)
                        base.append(b["median_ms"])
                mo, mt = statistics.median(ours), statistics.median(theirs)
                row = (f"| {t} | {L} | {p} | {mo:.1f} ({min(ours):.1f}–{max(ours):.1f}) | {mt:.1f} ({min(theirs):.1f}–{max(theirs):.1f}) "
                       f"| {mt / mo:.2f}× | {o['peak_pool_mib']:.0f} |")
                if a.baseline:
                    mb = statistics.median(base)
                    row += f" {mb:.1f} ({min(base):.1f}–{max(base):.1f}) | {mt / mb:.2f}× | {mb / mo:.3f}× | {b['peak_pool_mib']:.0f} |"
                print(row, flush=True)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Fused attention variants against PyTorch, side by side (BENCHMARKING.md).

fp32, n=2, h=8, d=64, forward+backward with every input's gradient (the full trainable bias B
(n, h, L, L) and the variant's own parameters: ALiBi slopes, relative-position table, gate). For each
L and variant, alternating separate processes:
  ours            examples/custom_variants --bench VARIANT (fused: one tape record)
  ours generic    the same expression through the generic path (--generic; node by node)
  torch eager     the same variant written in PyTorch
  torch flex      torch.nn.attention.flex_attention (compiled) with score_mod/mask_mod (--flex), where
                  the installed PyTorch runs it on the CPU; what happens otherwise is printed
The variants and their definitions are listed at the top of examples/custom_variants.cpp.

    pip install torch numpy
    python3 bench/variants_vs_torch.py --build build --lengths 1024 2048 [--generic] [--flex] [--rounds 2]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

from benchlib import env_threads, print_machine

VARIANTS = ["plain", "softcap_inside", "softcap_outside", "alibi", "relative", "gated", "window", "document", "prefix_lm",
            "combined", "causal", "causal_window"]

TORCH = r"""
import json, sys, time, torch
mode, variant = sys.argv[1], sys.argv[2]
n, h, L, d, reps, threads = map(int, sys.argv[3:9])
torch.set_num_threads(threads)
torch.manual_seed(0)
R, W, c, p_drop = 128, 256, 5.0, 0.1
biased = variant not in ("causal", "causal_window")
q, k, v = (torch.randn(n, h, L, d, requires_grad=True) for _ in range(3))
B = torch.randn(n, h, L, L, requires_grad=True) if biased else None
slopes = torch.tensor([2.0 ** (-8.0 * (i + 1) / h) for i in range(h)], requires_grad=True)
table = torch.randn(h, 2 * R + 1, requires_grad=True)
gate = torch.randn(h, requires_grad=True)
seg = torch.stack([torch.arange(L) // max(1, (L // 3 if b % 2 else L // 4)) for b in range(n)])
prefix = torch.full((n,), L // 4)
dO = torch.randn(n, h, L, d)
scale = d ** -0.5
qi, ki = torch.arange(L).view(L, 1), torch.arange(L).view(1, L)

def eager():
    S = q @ k.transpose(-2, -1) * scale
    keep = None
    if variant == "plain": Z = S + B
    elif variant == "softcap_inside": Z = torch.tanh((S + B) / c) * c
    elif variant == "softcap_outside": Z = torch.tanh(S / c) * c + B
    elif variant == "alibi": Z = S + B + slopes.view(1, h, 1, 1) * (ki - qi)
    elif variant == "relative": Z = S + B + table[:, (qi - ki + R).clamp(0, 2 * R)]
    elif variant == "gated": Z = S * torch.sigmoid(gate).view(1, h, 1, 1) + B
    elif variant == "window": Z, keep = S + B, (qi - ki).abs() <= W
    elif variant == "document": Z, keep = S + B, seg[:, None, :, None] == seg[:, None, None, :]
    elif variant == "prefix_lm": Z, keep = S + B, (ki <= qi) | (ki < prefix.view(n, 1, 1, 1))
    elif variant == "combined": Z, keep = torch.tanh(S / c) * c + B + slopes.view(1, h, 1, 1) * (ki - qi), ki <= qi
    elif variant == "causal": Z, keep = S, ki <= qi
    elif variant == "causal_window": Z, keep = S, (ki <= qi) & (qi - ki < W)
    if keep is not None: Z = Z.masked_fill(~keep, float("-inf"))
    P = torch.softmax(Z, dim=-1)
    if variant == "combined": P = torch.nn.functional.dropout(P, p_drop)
    return P @ v

def make_flex():
    from torch.nn.attention.flex_attention import flex_attention, create_block_mask
    def score_mod(s, b, hh, i, j):
        if variant in ("causal", "causal_window"): return s
        if variant == "softcap_inside": return torch.tanh((s + B[b, hh, i, j]) / c) * c
        if variant == "softcap_outside": return torch.tanh(s / c) * c + B[b, hh, i, j]
        if variant == "alibi": return s + B[b, hh, i, j] + slopes[hh] * (j - i)
        if variant == "relative": return s + B[b, hh, i, j] + table[hh, (i - j + R).clamp(0, 2 * R)]
        if variant == "gated": return s * torch.sigmoid(gate[hh]) + B[b, hh, i, j]
        if variant == "combined": return torch.tanh(s / c) * c + B[b, hh, i, j] + slopes[hh] * (j - i)
        return s + B[b, hh, i, j]
    masks = {"window": lambda b, hh, i, j: (i - j).abs() <= W,
             "document": lambda b, hh, i, j: seg[b, i] == seg[b, j],
             "prefix_lm": lambda b, hh, i, j: (j <= i) | (j < prefix[b]),
             "combined": lambda b, hh, i, j: j <= i,
             "causal": lambda b, hh, i, j: j <= i,
             "causal_window": lambda b, hh, i, j: (j <= i) & (i - j < W)}
    block = create_block_mask(masks[variant], n if variant in ("document", "prefix_lm") else None, None, L, L, device="cpu") \
        if variant in masks else None
    fa = torch.compile(flex_attention)
    return lambda: fa(q, k, v, score_mod=score_mod, block_mask=block)

fwd = eager if mode == "eager" else make_flex()
def fwd_bwd():
    for t in (q, k, v, B, slopes, table, gate):
        if t is not None: t.grad = None
    fwd().backward(dO)
def timed(f):
    t0 = time.perf_counter(); f(); return (time.perf_counter() - t0) * 1e3
for _ in range(2):
    fwd_bwd()
fb = sorted(timed(fwd_bwd) for _ in range(reps))
hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"fwd_bwd_ms": fb[len(fb) // 2], "fwd_bwd_min_ms": fb[0], "fwd_bwd_max_ms": fb[-1], "rss_mib": int(hwm.split()[1]) / 1024}))
"""


def try_json(cmd, threads, timeout):
    """The JSON object a benchmark process prints last; a failure or a time-out as a string instead."""
    try:
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env_threads(threads), timeout=timeout)
        return json.loads(out.stdout.strip().splitlines()[-1])
    except subprocess.CalledProcessError as e:
        last = (e.stderr or "").strip().splitlines()
        return "fails: " + (last[-1] if last else f"exit {e.returncode}")[:160]
    except subprocess.TimeoutExpired:
        return f"did not finish in {timeout} s"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default="build")
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--generic", action="store_true", help="also time our generic (unfused) path")
    ap.add_argument("--no-torch", action="store_true", help="ours only")
    ap.add_argument("--flex", action="store_true", help="also try torch's flex_attention (compiled) on the CPU")
    ap.add_argument("--flex-timeout", type=int, default=900)
    ap.add_argument("--no-limits", action="store_true")
    a = ap.parse_args()

    n, h, d, t = 2, 8, 64, a.threads
    print_machine(a.no_limits)
    if not a.no_torch:
        import torch
        print(f"torch {torch.__version__}; ", end="")
    print(f"n={n}, h={h}, d={d}, fp32, {t} threads; {a.rounds} alternating rounds x {a.reps} steps, forward+backward\n")
    ours = os.path.join(a.build, "examples", "custom_variants")
    print("| L | variant | side | fwd+bwd ms (min–max) | × ours fused | fused / plain fused | peak MiB (ours: pool, torch: RSS) |")
    print("|---|---|---|---|---|---|---|")
    for L in a.lengths:
        sides = {}
        for variant in a.variants:
            sides[(variant, "ours")] = [ours, "--bench", variant, str(n), str(h), str(L), str(d), str(a.reps)]
            if a.generic:
                sides[(variant, "ours generic")] = sides[(variant, "ours")] + ["generic"]
            if not a.no_torch:
                sides[(variant, "torch eager")] = [sys.executable, "-c", TORCH, "eager", variant, str(n), str(h), str(L), str(d),
                                                   str(a.reps), str(t)]
        res = {s: [] for s in sides}
        for _ in range(a.rounds):  # every side once per round: slow drifts of the machine hit all alike
            for s, cmd in sides.items():
                r = try_json(cmd, t, None)
                if isinstance(r, dict):
                    res[s].append(r)
                else:
                    print(f"<!-- {s[1]} {s[0]} L={L}: {r} -->", flush=True)
        median = {s: statistics.median(r["fwd_bwd_ms"] for r in rs) for s, rs in res.items() if rs}
        plain = median.get(("plain", "ours"))
        for variant in a.variants:
            if a.flex:  # compiled once per process (its compile time is not part of the timing)
                flex = [sys.executable, "-c", TORCH, "flex", variant, str(n), str(h), str(L), str(d), str(a.reps), str(t)]
                r = try_json(flex, t, a.flex_timeout)
                if isinstance(r, dict):
                    res[(variant, "torch flex")] = [r]
                    median[(variant, "torch flex")] = r["fwd_bwd_ms"]
                else:
                    print(f"| {L} | {variant} | torch flex | {r} | | | |", flush=True)
            base = median.get((variant, "ours"), float("nan"))
            for side in ("ours", "ours generic", "torch eager", "torch flex"):
                rs = res.get((variant, side))
                if not rs:
                    continue
                fb = [r["fwd_bwd_ms"] for r in rs]
                m = median[(variant, side)]
                rel = f"{base / plain:.2f}" if side == "ours" and plain else ""
                mib = max(r.get("pool_peak_mib", r.get("rss_mib", 0)) for r in rs)
                print(f"| {L} | {variant} | {side} | {m:.1f} ({min(fb):.1f}–{max(fb):.1f}) | {m / base:.2f}× | {rel} | {mib:.0f} |", flush=True)


if __name__ == "__main__":
    main()

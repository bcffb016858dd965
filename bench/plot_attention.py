#!/usr/bin/env python3
"""Plots forward+backward time against L from the table printed by attention_vs_torch.py.

    python3 bench/attention_vs_torch.py ... > results.md
    python3 bench/plot_attention.py results.md [more tables ...] -o docs/attention_vs_torch.png
"""
import argparse
import collections

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("tables", nargs="+")
    ap.add_argument("-o", "--output", default="docs/attention_vs_torch.png")
    a = ap.parse_args()
    series = collections.defaultdict(dict)  # (case, threads, side) -> {L: ms}
    for path in a.tables:
        for line in open(path):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) < 6 or cells[0] not in ("bias", "causal"):
                continue
            case, threads, L, side, _, fwd_bwd = cells[:6]
            series[(case, int(threads), side)][int(L)] = float(fwd_bwd.split()[0])
    cases = sorted({(c, t) for c, t, _ in series})
    fig, axes = plt.subplots(1, len(cases), figsize=(5 * len(cases), 4.2), squeeze=False)
    for ax, (case, threads) in zip(axes[0], cases):
        for (c, t, side), points in sorted(series.items()):
            if (c, t) != (case, threads):
                continue
            Ls = sorted(points)
            ax.plot(Ls, [points[L] for L in Ls], marker="o", label=side, linewidth=2.5 if side == "ours" else 1.2)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length L")
        ax.set_ylabel("forward + backward, ms")
        title = "trainable (n,h,L,L) bias" if case == "bias" else "causal, no bias"
        ax.set_title(f"{title}, {threads} thread{'s' if threads > 1 else ''}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("fp32 attention, n=2, h=8, d=64 (AMD EPYC Zen 4, 2 vCPUs): ours vs PyTorch 2.15")
    fig.tight_layout()
    fig.savefig(a.output, dpi=110)
    print(f"wrote {a.output}")


if __name__ == "__main__":
    main()

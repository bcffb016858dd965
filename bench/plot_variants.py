#!/usr/bin/env python3
"""Plots the forward+backward time of each attention variant from the tables printed by
variants_vs_torch.py: one panel per sequence length, one group of bars per variant.

    python3 bench/variants_vs_torch.py ... > results.md
    python3 bench/plot_variants.py results.md [more tables ...] -o docs/variants_vs_torch.png
"""
import argparse
import collections

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("tables", nargs="+")
    ap.add_argument("-o", "--output", default="docs/variants_vs_torch.png")
    a = ap.parse_args()
    ms = collections.defaultdict(dict)  # L -> {(variant, side): ms}
    order = []
    for path in a.tables:
        for line in open(path):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) < 4 or not cells[0].isdigit() or not cells[3][:1].isdigit():
                continue
            L, variant, side = int(cells[0]), cells[1], cells[2]
            ms[L][(variant, side)] = float(cells[3].split()[0])
            if variant not in order:
                order.append(variant)
    sides = ["ours", "ours generic", "torch eager"]
    lengths = sorted(ms)
    fig, axes = plt.subplots(1, len(lengths), figsize=(5.5 * len(lengths), 0.45 * len(order) + 1.5), squeeze=False, sharey=True)
    for ax, L in zip(axes[0], lengths):
        for k, side in enumerate(sides):
            ys = [i + (k - 1) * 0.27 for i in range(len(order))]
            xs = [ms[L].get((v, side), 0) for v in order]
            ax.barh(ys, xs, height=0.27, label=side)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_yticks(range(len(order)), order)
        ax.invert_yaxis()
        ax.set_xlabel("forward + backward, ms (log)")
        ax.set_title(f"L = {L}")
        ax.grid(axis="x", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper right", ncol=3)
    fig.suptitle("Attention variants, fp32, n=2, h=8, d=64, 2 threads (ours: fused)", x=0.3)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(a.output, dpi=110)


if __name__ == "__main__":
    main()

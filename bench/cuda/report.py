"""Joins bench_cuda_attention's and torch_attention.py's CSV lines into the markdown tables of
docs/bench_cuda_*.md: milliseconds, TFLOP/s (forward 4·n·h·L²·d, backward 2.5 times that, halved under a
causal mask) next to the bf16 peak, ratios against ours, peak device memory."""
import sys

PEAK_TFLOPS = 989.0  # H100/H200 SXM dense bf16, datasheet
n, h = 2, 8


def flops(L, d, causal, both):
    f = 4 * n * h * L * L * d * (3.5 if both else 1.0)
    return f / 2 if causal else f


rows = {}
for line in open(sys.argv[1]):
    line = line.split("#")[0].strip()
    if not line:
        continue
    parts = line.split(",")
    if parts[0] == "ours":
        _, case, d, L, fwd, both, peak, base = parts
        rows[(case, int(d), int(L), "ours (cuda)")] = (fwd, both, int(peak), int(base))
    elif parts[0] == "torch":
        _, impl, case, d, L, fwd, both, peak = parts
        rows[(case, int(d), int(L), impl)] = (fwd, both, int(peak), None)

for d in sorted({k[1] for k in rows}):
    for case, title in (("bias", "full trainable bias (n, h, L, L), bf16"), ("causal", "no bias, causal, bf16")):
        print(f"\n### {title}, n={n}, h={h}, d={d}\n")
        print("| L | implementation | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | fwd+bwd vs ours | peak memory GiB |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for L in sorted({k[2] for k in rows if k[0] == case and k[1] == d}):
            ours = rows.get((case, d, L, "ours (cuda)"))
            for (c, dd, l, impl), (fwd, both, peak, base) in sorted(rows.items(), key=lambda kv: kv[0][3]):
                if c != case or dd != d or l != L:
                    continue
                causal = case == "causal"

                def tf(ms, b):
                    return f"{flops(L, d, causal, b) / (float(ms) * 1e-3) / 1e12:.0f}" if ms != "failed" else "-"
                ratio = f"{float(both) / float(ours[1]):.2f}x" if ours and both != "failed" else "-"
                mem = f"{peak / 2**30:.2f}" + (f" (inputs+bias+dbias {base / 2**30:.2f})" if base else "")
                print(f"| {L} | {impl} | {fwd} | {tf(fwd, False)} | {both} | {tf(both, True)} | {ratio} | {mem} |")
print(f"\nTFLOP/s against the bf16 dense peak of {PEAK_TFLOPS:.0f} (datasheet; KINDS.md measured about 790 for a "
      "cuBLAS 8192³ product on these machines). 'vs ours' = their fwd+bwd time over ours (above 1: ours is faster).")

# Optional plot (second argument): fwd+bwd milliseconds against L, one panel per (case, d).
if len(sys.argv) > 2:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = sorted({(k[0], k[1]) for k in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4), squeeze=False)
    for ax, (case, d) in zip(axes[0], panels):
        for impl in sorted({k[3] for k in rows if k[0] == case and k[1] == d}):
            pts = sorted((k[2], float(v[1])) for k, v in rows.items() if k[0] == case and k[1] == d and k[3] == impl and v[1] != "failed")
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("L")
        ax.set_ylabel("fwd+bwd ms (H200, bf16)")
        ax.set_title(f"{'full trainable bias' if case == 'bias' else 'no bias, causal'}, d={d}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(sys.argv[2], dpi=110)

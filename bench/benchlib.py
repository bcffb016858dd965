"""Helpers shared by the side-by-side benchmark scripts (BENCHMARKING.md)."""
import json
import os
import statistics
import subprocess

# The timing tail of a side-by-side attention script run as `python3 -c SCRIPT`: the script defines q, k, v,
# b (or None), dO, reps and fwd(); this times fwd alone and fwd+bwd (median of reps after 2 warm-ups) and
# prints the JSON line run_json reads.
ATTENTION_TIMING = r"""
def timed(f):
    t0 = time.perf_counter(); f(); return (time.perf_counter() - t0) * 1e3
def fwd_only():
    with torch.no_grad():
        fwd()
def fwd_bwd():
    for t in (q, k, v, b):
        if t is not None: t.grad = None
    fwd().backward(dO)
for _ in range(2):
    fwd_only(); fwd_bwd()
f = sorted(timed(fwd_only) for _ in range(reps))
fb = sorted(timed(fwd_bwd) for _ in range(reps))
hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))  # not ru_maxrss: it survives exec
print(json.dumps({"fwd_ms": f[len(f) // 2], "fwd_bwd_ms": fb[len(fb) // 2], "rss_mib": int(hwm.split()[1]) / 1024}))
"""


def env_threads(t):
    """The environment for a process limited to t threads, whichever runtime it uses."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(t), MKL_NUM_THREADS=str(t), OPENBLAS_NUM_THREADS=str(t), OMP_WAIT_POLICY="passive")
    return env


def run_json(cmd, threads):
    """Runs cmd in its own process with `threads` threads and parses the JSON object on its last line."""
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env_threads(threads))
    return json.loads(out.stdout.strip().splitlines()[-1])


def print_machine(skip_limits):
    """Prints the CPU model and, unless skipped, the machine's measured ceilings (FMA peak, DRAM)."""
    cpu = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True).stdout.strip()
    print(f"CPU: {cpu}")
    if skip_limits:
        return
    limits = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "tools", "machine-limits", "run.sh")
    if os.path.exists(limits):
        print("```\n" + subprocess.run(["bash", limits], capture_output=True, text=True).stdout + "```\n")


def run_alternating(sides, rounds, threads):
    """Runs each side's command once per round, sides alternating within a round (BENCHMARKING.md)."""
    res = {s: [] for s in sides}
    for _ in range(rounds):
        for s, cmd in sides.items():
            res[s].append(run_json(cmd, threads))
    return res


def timing_rows(res, base_side, flops):
    """One (side, fwd ms, 'median (min-max)' fwd+bwd ms, MFLOP/ms, peak RSS MiB, ratio to base) per side."""
    base = statistics.median(r["fwd_bwd_ms"] for r in res[base_side])
    for s, rs in res.items():
        fb = [r["fwd_bwd_ms"] for r in rs]
        m = statistics.median(fb)
        yield (s, f"{statistics.median(r['fwd_ms'] for r in rs):.1f}", f"{m:.1f} ({min(fb):.1f}–{max(fb):.1f})",
               f"{flops / m / 1e6:.0f}", f"{max(r['rss_mib'] for r in rs):.0f}", f"{m / base:.2f}×")

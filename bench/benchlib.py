"""Helpers shared by the side-by-side benchmark scripts (BENCHMARKING.md)."""
import json
import os
import subprocess


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

#!/usr/bin/env bash
# The GEMM backends side by side (bench/gemm_backends.cpp) next to this machine's measured peak, in one
# run (../shared/BENCHMARKING.md). Needs Debian's libopenblas0-{serial,openmp,pthread} and
# libblis4-{serial,openmp} for the library columns (missing ones are skipped).
#   bash bench/gemm_backends.sh [build dir]        (about five minutes)
set -eu
cd "$(dirname "$0")/.."
build=${1:-build}
echo "CPU: $(lscpu | grep 'Model name' | sed 's/Model name: *//')"
limits=../shared/tools/machine-limits/run.sh
[ -f "$limits" ] && bash "$limits"
# OMP_WAIT_POLICY=passive: the threaded libraries' pools and ours share two cores (BENCHMARKING.md).
OMP_WAIT_POLICY=passive "$build/bench/bench_gemm_backends" 1,2 7 2

#!/usr/bin/env bash
# The causal measurement of docs/bench_gpucausal_2026-12-04.md, on the GPU machine, from a copy of the
# tree that holds the base commit's sources under base/ (git archive f83b218 | tar -x -C base): the
# base/new alternating rounds of keep_skip_run.sh (which builds both, runs this tree's cuda tests, then
# PyTorch in the same session) with the causal defaults.
#   bash bench/cuda/causal_run.sh OUT_DIR [ROUNDS] [L ...]
# DIMS (64,128), CASES (causal) and IMPLS (sdpa_flash) pick the rows; EXTRA_CASES (e.g. bias,docmask) with
# EXTRA_L (4096) adds alternating rounds of other cases at one length (the paths that must not slow down).
set -uo pipefail
out=${1:?out dir}; rounds=${2:-3}; shift 2 || true
lengths=("$@"); [ ${#lengths[@]} -gt 0 ] || lengths=(1024 2048 4096 8192)
DIMS=${DIMS:-64,128} CASES=${CASES:-causal} IMPLS=${IMPLS:-sdpa_flash} \
  exec bash "$(dirname "$0")/keep_skip_run.sh" "$out" "$rounds" "${lengths[@]}"

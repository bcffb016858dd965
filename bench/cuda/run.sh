#!/usr/bin/env bash
# The GPU attention benchmark (issue 12), run on the GPU machine after a build with AUTODIFF_CUDA=ON:
#   bash bench/cuda/run.sh BUILD_DIR OUT_FILE [L ...]
# Runs bench_cuda_attention and torch_attention.py in the same session and writes the joined tables;
# with PLOT=path.png set, also the plot of the fwd+bwd times (matplotlib).
set -euo pipefail
build=${1:?build dir}
out=${2:?output file}
shift 2
here=$(dirname "$0")
raw=$(mktemp)
"$build/bench/cuda/bench_cuda_attention" "$@" | tee "$raw"
python3 "$here/torch_attention.py" "$@" | tee -a "$raw"
{ echo '```'; cat "$raw"; echo '```'; python3 "$here/report.py" "$raw" ${PLOT:+"$PLOT"}; } > "$out"
cat "$out"

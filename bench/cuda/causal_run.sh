#!/usr/bin/env bash
# The causal measurement of docs/bench_gpucausal_2026-12-04.md, on the GPU machine, from a copy of the
# tree that holds the base commit's sources under base/ (git archive f83b218 | tar -x -C base): builds the
# base library's benchmark (with this tree's bench source), runs this tree's cuda tests (tools/test_cuda.sh,
# which builds build-cuda), then base and new in alternating rounds, then SDPA's flash backend in the same
# session.
#   bash bench/cuda/causal_run.sh OUT_DIR [ROUNDS] [L ...]
# DIMS (64,128), CASES (causal) and IMPLS (sdpa_flash) pick the rows; EXTRA_CASES (e.g. bias,docmask) with
# EXTRA_L (4096) adds alternating rounds of other cases at one length (the paths that must not slow down).
set -uo pipefail
out=${1:?out dir}; rounds=${2:-3}; shift 2 || true
lengths=("$@"); [ ${#lengths[@]} -gt 0 ] || lengths=(1024 2048 4096 8192)
dims=${DIMS:-64,128}; cases=${CASES:-causal}; impls=${IMPLS:-sdpa_flash}
cp bench/cuda/attention.cpp base/bench/cuda/attention.cpp
( cmake -S base -B build-base -G Ninja -DCMAKE_BUILD_TYPE=Release -DAUTODIFF_CUDA=ON -DAUTODIFF_BUILD_EXAMPLES=OFF \
    -DAUTODIFF_PACKAGE_TESTS=OFF -DCMAKE_PREFIX_PATH="$PWD/deps" && cmake --build build-base -j8 --target bench_cuda_attention ) > "$out/base-build.log" 2>&1 &
base_pid=$!
AUTODIFF_BUILD_DIR=build-cuda bash tools/test_cuda.sh -DCMAKE_PREFIX_PATH="$PWD/deps" > "$out/test.log" 2>&1
echo "test_cuda.sh rc=$?" | tee -a "$out/test.log"
grep -E "tests passed|Failed|failed|Passed" "$out/test.log" | tail -8
wait $base_pid; echo "base build rc=$?"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu --format=csv,noheader
for r in $(seq "$rounds"); do
  for v in base cuda; do
    echo "# round $r $v"
    BENCH_DIMS=$dims BENCH_CASES=$cases "build-$v/bench/cuda/bench_cuda_attention" "${lengths[@]}" 2>/dev/null | sed "s/^ours/$v/"
    if [ -n "${EXTRA_CASES:-}" ]; then
      BENCH_DIMS=$dims BENCH_CASES=$EXTRA_CASES "build-$v/bench/cuda/bench_cuda_attention" ${EXTRA_L:-4096} 2>/dev/null | sed "s/^ours/$v/"
    fi
  done
done | tee "$out/ours.csv"
BENCH_DIMS=$dims BENCH_IMPLS=$impls python3 bench/cuda/torch_attention.py "${lengths[@]}" 2>&1 | grep -v Warning | tee "$out/torch.csv"

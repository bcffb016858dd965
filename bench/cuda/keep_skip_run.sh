#!/usr/bin/env bash
# The keep-mask tile skipping measurement of docs/bench_gpuskip_2026-12-04.md, on the GPU machine, from a
# copy of the tree that holds the base commit's sources under base/ (git archive 5a2d374 | tar -x -C base):
# builds the base library with this tree's bench source (same docmask case), runs the cuda tests of this
# tree, then the base and new benchmarks in alternating rounds, then PyTorch (flex_attention with the
# block mask, SDPA with the dense boolean mask, SDPA flash causal) in the same session.
#   bash bench/cuda/keep_skip_run.sh OUT_DIR [ROUNDS] [L ...]
# DIMS (64), CASES (docmask,causal) and IMPLS (flex_doc,sdpa_doc,sdpa_flash) pick the rows; EXTRA_CASES
# (e.g. bias,docmask) with EXTRA_L (4096) adds alternating rounds of other cases at one length.
set -uo pipefail
out=${1:?out dir}; rounds=${2:-3}; shift 2 || true
lengths=("$@"); [ ${#lengths[@]} -gt 0 ] || lengths=(4096)
dims=${DIMS:-64}; cases=${CASES:-docmask,causal}; impls=${IMPLS:-flex_doc,sdpa_doc,sdpa_flash}
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

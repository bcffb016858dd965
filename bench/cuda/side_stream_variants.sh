#!/usr/bin/env bash
# The side-stream comparison of docs/bench_gpuskip_2026-12-04.md, on the GPU machine: this tree as is
# (build-cuda, with the cuda tests) and built with -DAUTODIFF_NO_SIDE_STREAM (serial dK/dV then dQ, as
# before); causal no-bias rounds alternating over the two, then SDPA flash. (The third call also built the
# variants -DAUTODIFF_SIDE_STREAM_PRIORITY and -DAUTODIFF_DQ_FIRST of commit b58271d; measured no faster, removed.)
#   bash bench/cuda/side_stream_variants.sh OUT_DIR [ROUNDS] [L ...]
set -uo pipefail
out=${1:?out dir}; rounds=${2:-3}; shift 2 || true
lengths=("$@"); [ ${#lengths[@]} -gt 0 ] || lengths=(4096 8192)
dims=${DIMS:-64,128}
declare -A flag=([serial]=AUTODIFF_NO_SIDE_STREAM)
pids=()
for v in serial; do
  ( cmake -S . -B "build-$v" -G Ninja -DCMAKE_BUILD_TYPE=Release -DAUTODIFF_CUDA=ON -DAUTODIFF_BUILD_EXAMPLES=OFF -DAUTODIFF_PACKAGE_TESTS=OFF \
      -DCMAKE_PREFIX_PATH="$PWD/deps" -DCMAKE_CUDA_FLAGS="-D${flag[$v]}=1" && cmake --build "build-$v" -j4 --target bench_cuda_attention ) > "$out/build-$v.log" 2>&1 &
  pids+=($!)
done
AUTODIFF_BUILD_DIR=build-cuda bash tools/test_cuda.sh -DCMAKE_PREFIX_PATH="$PWD/deps" > "$out/test.log" 2>&1
echo "test_cuda.sh rc=$?" | tee -a "$out/test.log"
grep -E "tests passed|Failed|failed|Passed" "$out/test.log" | tail -8
for pid in "${pids[@]}"; do wait "$pid"; echo "variant build rc=$?"; done
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu --format=csv,noheader
for r in $(seq "$rounds"); do
  for v in serial cuda; do
    echo "# round $r $v"
    BENCH_DIMS=$dims BENCH_CASES=causal "build-$v/bench/cuda/bench_cuda_attention" "${lengths[@]}" 2>/dev/null | sed "s/^ours/$v/"
  done
done | tee "$out/ours.csv"
BENCH_DIMS=$dims BENCH_IMPLS=sdpa_flash python3 bench/cuda/torch_attention.py "${lengths[@]}" 2>&1 | grep -v Warning | tee "$out/torch.csv"

#!/usr/bin/env bash
# Compile-time variants of this tree's causal kernels against each other, on the GPU machine (after a
# build-cuda of this tree): builds build-v1 (-DAUTODIFF_NO_SIDE_STREAM: dQ after dK/dV on one stream) and
# build-v2 (-DAUTODIFF_MMA_PLAIN_DQ_BLOCKS=2), then alternating rounds cuda, v1, v2 of the causal case.
#   bash bench/cuda/causal_variants.sh OUT_DIR [ROUNDS] [L ...]
set -uo pipefail
out=${1:?out dir}; rounds=${2:-2}; shift 2 || true
lengths=("$@"); [ ${#lengths[@]} -gt 0 ] || lengths=(4096 8192)
cfg=(-G Ninja -DCMAKE_BUILD_TYPE=Release -DAUTODIFF_CUDA=ON -DAUTODIFF_BUILD_EXAMPLES=OFF -DAUTODIFF_PACKAGE_TESTS=OFF -DCMAKE_PREFIX_PATH="$PWD/deps")
( cmake -S . -B build-v1 "${cfg[@]}" -DCMAKE_CUDA_FLAGS=-DAUTODIFF_NO_SIDE_STREAM && cmake --build build-v1 -j8 --target bench_cuda_attention ) > "$out/v1-build.log" 2>&1 &
p1=$!
( cmake -S . -B build-v2 "${cfg[@]}" -DCMAKE_CUDA_FLAGS=-DAUTODIFF_MMA_PLAIN_DQ_BLOCKS=2 && cmake --build build-v2 -j8 --target bench_cuda_attention ) > "$out/v2-build.log" 2>&1 &
p2=$!
wait $p1; echo "v1 build rc=$?"; wait $p2; echo "v2 build rc=$?"
for r in $(seq "$rounds"); do
  for v in cuda v1 v2; do
    echo "# round $r $v"
    BENCH_DIMS=${DIMS:-64,128} BENCH_CASES=causal "build-$v/bench/cuda/bench_cuda_attention" "${lengths[@]}" 2>/dev/null | sed "s/^ours/$v/"
  done
done | tee "$out/variants.csv"

#!/usr/bin/env bash
# The GPU tests (ctest label `cuda`), on a machine with a CUDA device: configure with AUTODIFF_CUDA=ON,
# build the GPU library, its tests and its benchmark, run the tests. Fails if no device is found (the tests
# would skip).
# Extra arguments go to CMake's configure step. AUTODIFF_BUILD_DIR picks the build folder (build-cuda).
set -euo pipefail
cd "$(dirname "$0")/.."
build=${AUTODIFF_BUILD_DIR:-build-cuda}
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE="${CMAKE_BUILD_TYPE:-Release}" -DAUTODIFF_WERROR=ON -DAUTODIFF_CUDA=ON \
  -DAUTODIFF_BUILD_EXAMPLES=OFF -DAUTODIFF_BUILD_BENCHMARKS=OFF -DAUTODIFF_PACKAGE_TESTS=OFF "$@"
cmake --build "$build" -j"$(nproc)" --target test_cuda_attention test_cuda_ops test_cuda_mha test_cuda_fp64 bench_cuda_attention
# A skipped test (no device) fails this script: it exists to run them.
status=0
log=$(ctest --test-dir "$build" --output-on-failure -L cuda 2>&1) || status=$?
echo "$log"
if grep -q "Not Run\|Skipped" <<< "$log"; then
  echo "tools/test_cuda.sh: the cuda tests were skipped (no CUDA device found)"
  exit 1
fi
exit $status

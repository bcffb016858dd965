#!/usr/bin/env bash
# The whole test suite: install the dependencies if missing, build, run every test with ctest.
# Extra arguments go to CMake's configure step (e.g. -DAUTODIFF_SANITIZE=address,undefined).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/deps.sh
build=${AUTODIFF_BUILD_DIR:-build}
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE="${CMAKE_BUILD_TYPE:-Release}" "$@"
cmake --build "$build" -j"$(nproc)"
ctest --test-dir "$build" --output-on-failure -j"$(nproc)"

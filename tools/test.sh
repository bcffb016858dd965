#!/usr/bin/env bash
# The whole test suite: install the dependencies if missing, build, run every test with ctest.
# Warnings are errors here (-DAUTODIFF_WERROR=ON), as in CI. Extra arguments go to CMake's configure step
# and come last, so they win (e.g. -DAUTODIFF_SANITIZE=address,undefined, or -DAUTODIFF_WERROR=OFF).
# AUTODIFF_CTEST_ARGS goes to ctest, e.g. "-LE large" to skip the large-size test (docs/NUMERICS.md).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/deps.sh
build=${AUTODIFF_BUILD_DIR:-build}
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE="${CMAKE_BUILD_TYPE:-Release}" -DAUTODIFF_WERROR=ON "$@"
cmake --build "$build" -j"$(nproc)"
# shellcheck disable=SC2086  # AUTODIFF_CTEST_ARGS holds several words
ctest --test-dir "$build" --output-on-failure -j"$(nproc)" ${AUTODIFF_CTEST_ARGS:-}

# ---- Python package (issue 13) ---------------------------------------------------------------------
# Builds `pip install .` into a virtual environment under the build folder and runs its pytest suite,
# when python3 exists. AUTODIFF_PYTHON_TESTS=0 skips it (CI's second and later builds do).
if [ "${AUTODIFF_PYTHON_TESTS:-1}" != 0 ] && command -v python3 > /dev/null 2>&1; then
  bash tools/test_python.sh "$build"
fi

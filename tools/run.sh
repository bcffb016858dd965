#!/usr/bin/env bash
# The main job on a fresh machine: install the dependencies, build (Release, -march=native), and run
# the flagship example (biased multi-head attention: gradient checks, then a few hundred training steps).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/deps.sh
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release
cmake --build build -j"$(nproc)"
./build/examples/biased_attention "$@"

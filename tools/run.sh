#!/usr/bin/env bash
# The main job on a fresh machine: install the dependencies, build (Release, -march=native), and run
# the flagship example: multi-head self-attention with a trainable attention bias, trained with Adam
# for a few hundred steps (loss per 25 steps, loss curve in build/train_mha_loss.csv), then a
# gradient check of the loss at the trained parameters. Arguments: [steps].
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/deps.sh
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release
cmake --build build -j"$(nproc)"
./build/examples/train_mha "${1:-300}" build/train_mha_loss.csv

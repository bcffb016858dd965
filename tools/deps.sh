#!/usr/bin/env bash
# Installs the build dependencies from Debian's packages (Debian 12). Needs root (or sudo).
set -euo pipefail
packages=(cmake ninja-build g++ libeigen3-dev libfmt-dev doctest-dev libbenchmark-dev)
missing=()
for p in "${packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
[ ${#missing[@]} -eq 0 ] && exit 0
sudo_cmd=""
[ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
echo "installing: ${missing[*]}"
$sudo_cmd env DEBIAN_FRONTEND=noninteractive apt-get update -qq
$sudo_cmd env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"

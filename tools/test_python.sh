#!/usr/bin/env bash
# The Python package's tests (issue 13): a virtual environment in the build folder, torch, numpy,
# safetensors and pytest from PyPI, then `pip install .` (the extension built by scikit-build-core) and
# pytest. Called by tools/test.sh when python3 exists; also usable alone: bash tools/test_python.sh [build].
#
# The environment sees the system's site-packages, so a torch already installed for python3 is reused.
# Otherwise pip downloads it from PyPI: on Linux x86-64 that wheel pulls the CUDA libraries (about
# 2.7 GB to download, 5.4 GB installed; 110 s here with an empty pip cache).
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-${AUTODIFF_BUILD_DIR:-build}}
venv="$(realpath -m "$build")/venv-python"

# Debian's python3 needs python3-venv (ensurepip) and python3-dev (Python.h) for this.
if ! python3 -c 'import ensurepip, sysconfig, os, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' 2>/dev/null; then
  if command -v apt-get > /dev/null && [ "$(command -v python3)" = /usr/bin/python3 ]; then
    sudo_cmd=""
    [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
    echo "installing: python3-venv python3-dev"
    $sudo_cmd env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv python3-dev > /dev/null
  else
    echo "tools/test_python.sh: $(command -v python3) has no venv/ensurepip or no Python.h" >&2
    exit 1
  fi
fi

[ -x "$venv/bin/python" ] || python3 -m venv --system-site-packages "$venv"
py="$venv/bin/python"
start=$(date +%s)
"$py" -m pip install -q --disable-pip-version-check torch numpy safetensors pytest scikit-build-core nanobind
echo "python dependencies ready in $(( $(date +%s) - start )) s"
start=$(date +%s)
# Warnings are errors in the extension too, as in tools/test.sh. Without build isolation (the build
# requirements are installed above), so that a second run recompiles only what changed.
CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" "$py" -m pip install -q --disable-pip-version-check --no-build-isolation \
  --config-settings=cmake.define.AUTODIFF_WERROR=ON .
echo "pip install . in $(( $(date +%s) - start )) s"
# From another folder: the tests must import the installed package, not the source tree.
(cd "$build" && "$py" -m pytest -q -p no:cacheprovider "$OLDPWD/python/tests")

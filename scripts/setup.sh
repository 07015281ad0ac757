#!/usr/bin/env bash
# Idempotent set-up: Debian packages, a virtualenv in .venv, torch from pip, and this project.
#   bash scripts/setup.sh          (re-running it skips what is already done)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3

# Debian packages: redis-server for the serving tests, chromium for the browser-page test (driven by
# Playwright through executable_path; never `playwright install`); for the native runtime a C++
# toolchain, CMake and Ninja, nlohmann-json, libjpeg-turbo, libpng, OpenSSL's libcrypto (SHA-256), Python headers.
APT_PKGS="redis-server chromium cmake g++ make ninja-build nlohmann-json3-dev libstb-dev libjpeg62-turbo-dev libpng-dev libssl-dev python3-dev strace"
missing=""
if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
for p in $APT_PKGS; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  echo "setup: installing Debian packages:$missing"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $PY"
  if ! "$PY" -m venv .venv 2>/dev/null; then
    # Debian's python3.11 needs its venv module from a separate package
    rm -rf .venv
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3-venv >/dev/null
    "$PY" -m venv .venv
  fi
fi
VPY="$ROOT/.venv/bin/python"
stamp_src=$(cat pyproject.toml scripts/setup.sh CMakeLists.txt native/libtorch/CMakeLists.txt | sha256sum | cut -d' ' -f1)
native=1
if [ "${SHIPCLASSIFIER_SKIP_NATIVE:-0}" = 1 ]; then native=0; fi
# (re)install when the packaging changed, or when the native build folder is gone
if [ "$(cat .setup-stamp 2>/dev/null)" != "$stamp_src" ] || { [ $native = 1 ] && [ ! -f build/CMakeCache.txt ]; }; then
  echo "setup: installing Python packages into .venv and building the native runtime (first run takes several minutes)"
  "$VPY" -m pip install -q --upgrade pip setuptools wheel
  # torch first, exactly pinned: a CUDA build that also runs on the CPU.
  "$VPY" -m pip install -q torch==2.14.1 torchvision==0.29.1
  # Build requirements (pyproject's [build-system]) first: the install below runs without build isolation,
  # so that the native runtime compiles against the installed torch, never a second copy in an isolated env.
  "$VPY" -m pip install -q "scikit-build-core>=0.11" "pybind11>=2.12"
  # onnxruntime and onnxruntime-gpu (the dependency on Linux x86-64) install the same 'onnxruntime'
  # folder: a venv that has the CPU one swaps it, or the two packages overwrite each other's files.
  if [ "$(uname -s)-$(uname -m)" = Linux-x86_64 ] && "$VPY" -m pip show onnxruntime >/dev/null 2>&1; then
    "$VPY" -m pip uninstall -q -y onnxruntime
    "$VPY" -m pip install -q --force-reinstall --no-deps "onnxruntime-gpu>=1.31.1"
  fi
  # Editable install through scikit-build-core: CMake builds into build/ (build/bin/classify and
  # python/classify_native/_core*.so), .venv/bin/classify runs that binary, and a .pth puts the sources on
  # sys.path. SHIPCLASSIFIER_SKIP_NATIVE=1 installs the Python packages only.
  "$VPY" -m pip install -q --no-build-isolation -e ".[dev]"
  echo "$stamp_src" > .setup-stamp
fi
# Incremental rebuild of the native runtime, so re-running after C++ changes only recompiles what changed
# (the editable install reads build/ directly: nothing to reinstall).
if [ $native = 1 ]; then
  echo "setup: building the native runtime"
  cmake --build build -j "$(nproc)" >/dev/null
fi
echo "setup: ready ($("$VPY" -c 'import torch; print("torch", torch.__version__)'); classify: $(command -v .venv/bin/classify || echo 'not built'))"

#!/usr/bin/env bash
# Sets up fastcifar in ./.venv on Debian/Ubuntu: the system libraries FFCV compiles against (installed
# with apt-get when run as root, else the exact command is printed), PyTorch, and this package with its
# dev tools. Safe to re-run: what is already there is kept.
#   FASTCIFAR_TORCH   pip requirement(s) for PyTorch (default: torch==2.13.0; e.g. a CUDA-specific build)
#   PYTHON            interpreter for the virtual environment (default: python3, >= 3.10)
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v pkg-config >/dev/null 2>&1 || need+=(pkg-config)
pkg-config --exists opencv4 2>/dev/null || need+=(libopencv-dev)
pkg-config --exists libturbojpeg 2>/dev/null || need+=(libturbojpeg0-dev)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing ${need[*]} (FFCV builds against them)"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null
  else
    echo "setup: FFCV needs system packages; run:  sudo apt-get install -y ${need[*]}  (conda: see environment.yml)" >&2
    exit 1
  fi
fi

# tcmalloc: optional, a faster malloc for CPU training that the commands preload themselves (1.21x the fp32
# step measured on an EPYC; fastcifar/allocator.py). Without it everything works on the system's malloc.
have_tcmalloc() {
  local f
  for f in /usr/lib/*/libtcmalloc_minimal.so.4 /usr/lib/libtcmalloc_minimal.so.4 /usr/lib64/libtcmalloc_minimal.so.4; do
    [ -e "$f" ] && return 0
  done
  return 1
}
if ! have_tcmalloc && command -v apt-get >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    echo "setup: installing libtcmalloc-minimal4 (a faster allocator for CPU training)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends libtcmalloc-minimal4 >/dev/null 2>&1 ||
      { apt-get update -q >/dev/null 2>&1 &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends libtcmalloc-minimal4 >/dev/null 2>&1; } ||
      echo "setup: could not install libtcmalloc-minimal4; CPU training uses the system's malloc (slower)" >&2
  else
    echo "setup: optional, ~1.2x faster CPU training:  sudo apt-get install -y libtcmalloc-minimal4" >&2
  fi
fi

if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
# shellcheck disable=SC2086  # FASTCIFAR_TORCH may hold several words (e.g. an --index-url)
.venv/bin/python -m pip install -q ${FASTCIFAR_TORCH:-torch==2.13.0}
.venv/bin/python -m pip install -q -e ".[dev,ffcv]"
.venv/bin/python -c "import torch, ffcv; print(f'setup: ok (torch {torch.__version__}, ffcv from {ffcv.__path__[0]})')"

#!/usr/bin/env bash
# Installs what hwnas needs on a fresh Debian machine: the Fashion-MNIST files, tcmalloc (optional), a virtual environment,
# hwnas with its dev tools, and the TensorRT type stubs (alone: they pin a TensorRT wheel that only
# NVIDIA's registry serves). Safe to run again: each step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${HWNAS_VENV:-.venv}
PYTHON=${PYTHON:-python3}

SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
apt_updated=""
apt_install() {
  [ -n "$apt_updated" ] || { $SUDO apt-get update -qq; apt_updated=1; }
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@" >/dev/null
}
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  echo "setup: installing Debian's dataset-fashion-mnist"
  apt_install dataset-fashion-mnist
fi
# tcmalloc: CPU training runs faster under it (benchmarks/allocator_speed.py); optional, so a failure only warns.
if ! /sbin/ldconfig -p 2>/dev/null | grep -q libtcmalloc_minimal.so.4; then
  echo "setup: installing Debian's libtcmalloc-minimal4 (for LD_PRELOAD when training on a CPU)"
  apt_install libtcmalloc-minimal4 || echo "setup: warning: libtcmalloc-minimal4 not installed; CPU training still works"
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi

stamp="$VENV/.hwnas-installed"
# pip warns about every index location this workplace's pip configuration names but lacks; keep the rest.
quiet_pip() { "$VENV/bin/python" -m pip "$@" 2> >(grep -v "^WARNING: Location .* is ignored" >&2); }

if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setup: installing hwnas and its dependencies into $VENV (the first time takes a few minutes)"
  quiet_pip install -q --upgrade pip >/dev/null
  # torch first, pinned to the build this workplace keeps on disk; elsewhere pip resolves it as usual.
  quiet_pip install -q "torch==2.14.1" "torchvision==0.29.1" 2>/dev/null || quiet_pip install -q torch torchvision
  quiet_pip install -q -e ".[dev]"
  quiet_pip install -q --no-deps "tensorrt-stubs==10.13.0.35.1"
  touch "$stamp"
fi

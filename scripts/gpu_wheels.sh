#!/usr/bin/env bash
# GPU-side Python packages for an offline CUDA 13 / Python 3.12 host that has only PyTorch:
# megatron-core 0.19.2, Transformer Engine 2.20.2 and small extras, plus the shipped corpus as
# token rows (the host has no `datasets`), all under the git-ignored folder gpu_wheels/.
#
#   scripts/gpu_wheels.sh prepare   here, with network: gpu_wheels/base (~35 MiB: wheels, the TE torch sdist,
#                                   install_wheels.sh, pytest/pyyaml/numpy), gpu_wheels/te1..te6 (44 MiB each:
#                                   the TE core wheel in parts), gpu_wheels/corpus (~2 MiB)
#   scripts/gpu_wheels.sh stash     on the GPU host: copy whichever of those arrived into /tmp/mor_gpu
#   scripts/gpu_wheels.sh install   on the GPU host: stash, then install into /tmp/site (once; ~2 minutes)
#
# The device tool carries at most 64 MiB of ignored paths per call, so the pieces travel in turns
# (a warm machine keeps /tmp/mor_gpu and the carried folders between calls):
#   call 1     carry ["gpu_wheels/base", "gpu_wheels/corpus"]   command: scripts/gpu_wheels.sh stash
#   calls 2-7  carry ["gpu_wheels/teN"]  (N = 1..6)             command: scripts/gpu_wheels.sh stash
#   call 8     scripts/gpu_checks.sh install tests curves     (then bench-* phases, see gpu_checks.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=gpu_wheels
STASH=${MOR_GPU_STASH:-/tmp/mor_gpu}
SITE=${MOR_GPU_SITE:-/tmp/site}
TOOLS=${MOR_GPU_TOOLS:-/work/shared/gpu}   # prepare_wheels.sh and install_wheels.sh
PY=${PYTHON:-python3}

prepare() {
  bash "$TOOLS/prepare_wheels.sh" "$WHEELS"
  cp "$TOOLS/install_wheels.sh" "$WHEELS/base/"
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$WHEELS/base" pytest pluggy iniconfig packaging pyyaml numpy
  "$PY" -m mor_dist.bench.corpus --seq 128 2048 --out "$WHEELS/corpus"
  du -sh "$WHEELS"/*
}

stash() {
  mkdir -p "$STASH/base" "$STASH/parts" "$STASH/corpus"
  local d part
  for d in base corpus; do
    if [ -d "$WHEELS/$d" ]; then cp -u "$WHEELS/$d"/* "$STASH/$d/"; fi
  done
  for part in "$WHEELS"/te*/part*; do
    if [ -e "$part" ]; then cp -u "$part" "$STASH/parts/"; fi
  done
  echo "stashed in $STASH: base $(ls "$STASH/base" | wc -l) files, $(ls "$STASH/parts" | wc -l) TE parts," \
       "corpus $(ls "$STASH/corpus" | wc -l) files"
}

install() {
  stash
  if PYTHONPATH="$SITE" "$PY" -c "import transformer_engine.pytorch, megatron.core" 2>/dev/null; then
    echo "already installed in $SITE"
    return
  fi
  [ -f "$STASH/base/install_wheels.sh" ] || { echo "missing $STASH/base: carry gpu_wheels/base first" >&2; exit 1; }
  bash "$STASH/base/install_wheels.sh" "$STASH/base" "$STASH/parts" "$SITE"
}

case "${1:-}" in
  prepare) prepare ;;
  stash) stash ;;
  install) install ;;
  *) echo "usage: scripts/gpu_wheels.sh {prepare|stash|install}" >&2; exit 2 ;;
esac

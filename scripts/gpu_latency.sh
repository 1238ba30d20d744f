#!/usr/bin/env bash
# The GPU latency run behind the committed GPU tables: profile the 224 space on each CUDA profile,
# validate each table on random whole subnets, run the CUDA tests. Run from the repository root on
# a machine with an NVIDIA GPU; everything lands under $1 (default out/gpu), one tarball at the end.
set -uo pipefail
OUT_DIR=${1:-out/gpu}
N=${N:-200}
PROFILES=${PROFILES:-"cuda-torch-fp16 cuda-torch-graph cuda-torch-fp16-b64 cuda-torch-graph-b64"}
export PYTHONPATH=${PYTHONPATH:-.}${PYTHONPATH:+:.} PYTHONUNBUFFERED=1
mkdir -p "$OUT_DIR"
nvidia-smi > "$OUT_DIR/nvidia-smi.txt" 2>&1
python3 -c "import torch, onnxruntime; print(torch.__version__, torch.version.cuda, onnxruntime.__version__)" \
  > "$OUT_DIR/versions.txt" 2>&1
git rev-parse HEAD > "$OUT_DIR/commit.txt" 2>/dev/null || true
for profile in $PROFILES; do
  echo "== $profile"
  timeout 300 python3 -m hwnas.cli profile --profile "profiles/$profile.toml" --space mbv3-224 \
    --out "$OUT_DIR/latency_tables" 2>&1 | tail -5
  table=$(ls "$OUT_DIR"/latency_tables/mbv3-224/*__"$profile".csv 2>/dev/null | head -1)
  [ -n "$table" ] || { echo "no table for $profile"; continue; }
  timeout 300 python3 -m hwnas.cli latency validate --table "$table" --n "$N" \
    --out "$OUT_DIR/validation/$profile" 2>&1 | tail -12
done

#!/usr/bin/env bash
# The GPU latency run for a lent GPU, in one call of at most about 8 minutes: profile the 224 px space
# on each CUDA profile under fingerprint version 2 (the old H100 tables are refused for their format),
# validate each table on random whole subnets, and leave the tables, reports and one tarball in $1.
# Each step has its own time limit, so the whole fits the call; a validation cut short is scored on the
# subnets it measured (hwnas latency validate --no-measure).
#
#   run(command="bash scripts/gpu_latency.sh $OUT", timeout_s=540)         # on the device machine
#   PROFILES=cpu-onnxruntime SPACE=mbv3-32 N=4 PROFILE_S=120 VALIDATE_S=60 bash scripts/gpu_latency.sh /tmp/dry
#                                                                            # the dry run on a CPU
set -uo pipefail
OUT_DIR=${1:-out/gpu}
N=${N:-100}
SPACE=${SPACE:-mbv3-224}
PROFILES=${PROFILES:-"cuda-torch-graph cuda-torch-fp16"}
PROFILE_S=${PROFILE_S:-170}    # seconds per profile (the H100 took 142 s for cuda-torch-graph on 2026-11-23)
VALIDATE_S=${VALIDATE_S:-60}   # seconds per validation
export PYTHONPATH=${PYTHONPATH:-.}${PYTHONPATH:+:.} PYTHONUNBUFFERED=1
mkdir -p "$OUT_DIR"
started=$(date +%s)
{ nvidia-smi || echo "no nvidia-smi"; } > "$OUT_DIR/nvidia-smi.txt" 2>&1
python3 -c "import torch, onnxruntime; print(torch.__version__, torch.version.cuda, onnxruntime.__version__)" \
  > "$OUT_DIR/versions.txt" 2>&1
git rev-parse HEAD > "$OUT_DIR/commit.txt" 2>/dev/null || true
cat /proc/loadavg > "$OUT_DIR/loadavg-before.txt" 2>/dev/null || true
for profile in $PROFILES; do
  echo "== $profile ($(( $(date +%s) - started )) s in)"
  timeout "$PROFILE_S" python3 -m hwnas.cli profile --profile "profiles/$profile.toml" --space "$SPACE" \
    --out "$OUT_DIR/latency_tables" --quiet 2>&1 | tail -5
  table=$(ls "$OUT_DIR"/latency_tables/"$SPACE"/*__"$profile".csv 2>/dev/null | head -1)
  [ -n "$table" ] || { echo "no table for $profile"; continue; }
  report="$OUT_DIR/validation/$profile"
  timeout "$VALIDATE_S" python3 -m hwnas.cli latency validate --table "$table" --n "$N" --out "$report" \
    --quiet 2>&1 | tail -12
  if [ ! -f "$report/validation.json" ]; then  # cut short: score what it measured
    python3 -m hwnas.cli latency validate --table "$table" --n "$N" --out "$report" --no-measure --quiet 2>&1 | tail -12
  fi
done
cat /proc/loadavg > "$OUT_DIR/loadavg-after.txt" 2>/dev/null || true
tar -czf "$OUT_DIR/gpu_latency.tar.gz" -C "$OUT_DIR" latency_tables validation nvidia-smi.txt versions.txt \
  commit.txt 2>/dev/null
echo "done in $(( $(date +%s) - started )) s: $OUT_DIR/gpu_latency.tar.gz"

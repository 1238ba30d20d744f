#!/usr/bin/env bash
# The GPU run behind the shipped Fashion-MNIST supernet and its quality figures (issue 4): train the
# README's recipe for EPOCHS epochs and, beside it, SCRATCH stand-alone trainings of the same recipe
# dealt over NPROC processes that share the GPU (one small network leaves it mostly idle); then
# benchmarks/supernet_quality.py on the trained supernet, which finds the stand-alone results done.
#
# A lent GPU gives calls of 10 minutes, and 30 epochs with the first one's cuDNN plan building take
# about 11, so the run goes in stages that resume: each call works until BUDGET seconds are nearly
# spent, training stops at a step boundary on SIGTERM with its state saved, and every finished
# stand-alone result is kept. Call it again with the same RUN until it prints "done".
#
#   bash scripts/gpu_supernet.sh RUN PACK     # RUN: work directory, kept between calls (runs/ is ignored)
#                                             # PACK: where the files to take home go ($OUT on the device)
# Dry run on a CPU: DEVICE=cpu EPOCHS=1 STEPS=2 SCRATCH=3 SCRATCH_EPOCHS=1 SUBNETS=2 NPROC=1 bash ...
set -uo pipefail
RUN=${1:-runs/supernet-gpu}
PACK=${2:-$RUN/pack}
EPOCHS=${EPOCHS:-30}
SCRATCH=${SCRATCH:-8}
SCRATCH_EPOCHS=${SCRATCH_EPOCHS:-}
RANDOM_SUBNETS=${SUBNETS:-10}  # not RANDOM: bash's own
NPROC=${NPROC:-8}
DEVICE=${DEVICE:-cuda}
STEPS=${STEPS:-}
BUDGET=${BUDGET:-570}
export PYTHONPATH=${PYTHONPATH:-.}${PYTHONPATH:+:.} PYTHONUNBUFFERED=1
PY=${PY:-python3}
end=$(( $(date +%s) + BUDGET ))
left() { echo $(( end - $(date +%s) )); }
mkdir -p "$RUN" "$PACK"

# The device has no network: the dataset travels with the tree as .gpu/fashion-mnist (ignored by git).
DATA_DIR=/usr/share/datasets/fashion-mnist
if [ ! -e "$DATA_DIR/t10k-labels-idx1-ubyte.gz" ] && [ -d .gpu/fashion-mnist ]; then
  mkdir -p "$DATA_DIR" && cp .gpu/fashion-mnist/* "$DATA_DIR"/
fi

{ nvidia-smi || true; } > "$RUN/nvidia-smi.txt" 2>&1
$PY -c "import torch, onnxruntime; print(torch.__version__, torch.version.cuda, onnxruntime.__version__)" \
  > "$RUN/versions.txt" 2>&1
git rev-parse HEAD > "$RUN/commit.txt" 2>/dev/null || true

complete() {  # prints 1 when $1 is a checkpoint whose training schedule has finished
  $PY -c "import sys, torch; print(int(bool(torch.load(sys.argv[1], map_location='cpu', weights_only=False)['complete'])))" \
    "$1" 2>/dev/null || echo 0
}

ckpt="$RUN/train/supernet.pt"
quality() {  # benchmarks/supernet_quality.py over NPROC ranks, until the call's time is nearly spent
  timeout -s TERM -k 20 $(( $(left) - 25 )) $PY -m torch.distributed.run --standalone --nproc_per_node "$NPROC" \
    benchmarks/supernet_quality.py --out "$RUN/quality" --device "$DEVICE" --scratch-archs "$SCRATCH" \
    --random "$RANDOM_SUBNETS" ${SCRATCH_EPOCHS:+--scratch-epochs "$SCRATCH_EPOCHS"} "$@"
}
if [ "$(complete "$ckpt")" != 1 ]; then
  # The stand-alone trainings need only the recipe (train_config.json, written before the first step),
  # so they run beside the supernet's training: each alone leaves the GPU mostly idle.
  echo "== train, and the stand-alone networks beside it ($(left) s left)"
  timeout -s TERM -k 60 $(( $(left) - 40 )) $PY -m hwnas.cli train --space mbv3-32 --data fashion-mnist \
    --epochs "$EPOCHS" --batch-size 512 --lr 0.4 --num-sampled 2 --warmup-epochs 1 --device "$DEVICE" \
    ${STEPS:+--steps-per-epoch "$STEPS"} --out "$RUN/train" --resume --quiet &
  trainer=$!
  for _ in $(seq 120); do [ -e "$RUN/train/train_config.json" ] && break; sleep 1; done
  quality --checkpoint hwnas/checkpoints/mbv3-32_fashion-mnist.pt --recipe "$RUN/train/train_config.json" \
    --scratch-only > "$RUN/scratch.log" 2>&1 &
  scratch=$!
  wait $trainer; echo "train exit $?"
  wait $scratch; echo "stand-alone exit $? ($RUN/scratch.log)"
fi

if [ "$(complete "$ckpt")" = 1 ] && [ ! -e "$RUN/quality/summary.md" ] && [ "$(left)" -gt 90 ]; then
  echo "== quality ($(left) s left)"
  quality --checkpoint "$ckpt"
  echo "quality exit $?"
fi

# What comes home: the checkpoint on its own (the file the repository ships) and one tarball of the rest.
# Unfinished stand-alone states stay behind (up to tens of MB each, more than a carry holds): on a
# machine that went cold, those networks start again, a few minutes each on a GPU.
[ -e "$ckpt" ] && cp "$ckpt" "$PACK/supernet.pt"
tar -czf "$PACK/run.tar.gz" --exclude=supernet.pt --exclude='*.state.pt' --exclude=pack \
  -C "$(dirname "$RUN")" "$(basename "$RUN")"
if [ -e "$RUN/quality/summary.md" ]; then echo "done"; else echo "not done: call again with the same RUN"; fi

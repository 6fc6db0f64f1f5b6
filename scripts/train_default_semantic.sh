#!/usr/bin/env bash
# Reproduce the shipped default semantic checkpoint (engine/nucsynth/assets/default_semantic).
#
# Trains the `tiny` semantic preset on random 64 px crops of the CoNSeP 256 px training
# patches on CPU, then exports the EMA weights + config into the package.
# Usage: scripts/train_default_semantic.sh [CONSEP_TRAIN_DIR] [RUN_DIR]
# About 8-10 minutes on an idle 2-core CPU (one torch thread: on a busy machine OpenMP
# threads spin against each other); longer on a shared one.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${1:-../shared/data/consep256/Train}"
RUN="${2:-runs/default_semantic}"
BIN="${NUCSYNTH_BIN:-.venv/bin}"

"$BIN/nucsynth" train --family semantic --preset tiny --data "$DATA" --image-size 64 --prediction v \
    --steps 600 --batch-size 4 --lr 1e-3 --warmup 50 --ema 0.995 --cond-drop 0.2 \
    --checkpoint-every 200 --preview-every 400 --seed 0 --threads 1 --device cpu --out "$RUN"

"$BIN/python" -c "import sys; from nucsynth.checkpoint import export_checkpoint, default_checkpoint_dir; \
print(export_checkpoint(sys.argv[1], default_checkpoint_dir(), overwrite=True))" "$RUN"

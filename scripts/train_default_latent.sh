#!/usr/bin/env bash
# Reproduce the shipped default model (engine/nucsynth/assets/default_semantic): a 256 px
# LATENT semantic model with its label-aware autoencoder, trained on CPU on the CoNSeP
# TRAINING tiles only (the 5 `val` tiles that `nucsynth prepare` holds out are never seen).
#
#   scripts/train_default_latent.sh [CONSEP_TRAIN_DIR] [RUN_DIR] [LATENT_STEPS]
#
# 1. prepare: CoNSeP 256 px patches -> a store split by tile (22 train / 5 val tiles);
# 2. autoencoder: f = 4, 4 latent channels, label-aware decoder, 400 steps on 64 px crops;
# 3. latent model: `tiny` latent preset (1.9 M parameters), v-prediction, 128 px crops
#    (32 x 32 latents of the training patches, encoded once in their 8 rotations/flips),
#    condition dropout 0.1 throughout (so classifier-free guidance works), 8000 steps;
# 4. decoder fine-tuning: 600 more steps of the decoder alone on the frozen encoder;
# 5. export the EMA weights of both in float16 into the package (about 9 MB together), with
#    guidance 0 recorded as the model's default: unguided renders were the closest to real
#    `val` tissue for every judge, with class identity intact (docs/models.md, "Guidance").
# The trainings run one pass per batch (--micro-batches 1), as the shipped weights were
# trained before micro-batches existed.
# Times on the shared 2-core CPU are in docs/models.md. Both trainings resume exactly:
# re-run the same command after an interruption (the train steps are given --resume when
# their run folder already holds checkpoints).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${1:-../shared/data/consep256/Train}"
RUN="${2:-runs/default_latent}"
STEPS="${3:-8000}"
BIN="${NUCSYNTH_BIN:-.venv/bin}"
THREADS="${THREADS:-2}"
mkdir -p "$RUN"

[ -d "$RUN/consep.zarr" ] || "$BIN/nucsynth" prepare "$DATA" "$RUN/consep.zarr" --val-fraction 0.2 --seed 0

resume() { [ -d "$1/checkpoints" ] && echo --resume || true; }

"$BIN/nucsynth" train $(resume "$RUN/autoencoder") --family autoencoder --label-aware --preset tiny \
    --data "$RUN/consep.zarr" --split train --image-size 64 --steps 400 --batch-size 8 --lr 4e-4 --warmup 100 \
    --ema 0.999 --checkpoint-every 200 --preview-every 200 --seed 0 --threads "$THREADS" --device cpu \
    --micro-batches 1 --out "$RUN/autoencoder"

"$BIN/nucsynth" train $(resume "$RUN/latent") --family semantic --autoencoder "$RUN/autoencoder/checkpoints/step_0000400" \
    --preset tiny --data "$RUN/consep.zarr" --split train --image-size 128 --steps "$STEPS" --batch-size 8 \
    --lr 2e-4 --warmup 100 --ema 0.995 --cond-drop 0.1 --checkpoint-every 100 --keep-checkpoints 3 \
    --preview-every 500 --seed 0 --threads "$THREADS" --device cpu --precompute-latents --micro-batches 1 \
    --out "$RUN/latent"

# 4. a better decoder for the same latent space: 600 more steps of the decoder alone (frozen encoder)
"$BIN/nucsynth" train $(resume "$RUN/decoder") --family autoencoder --finetune-decoder "$RUN/autoencoder/checkpoints/step_0000400" \
    --data "$RUN/consep.zarr" --split train --steps 600 --batch-size 8 --lr 2e-4 --warmup 50 --ema 0.999 \
    --checkpoint-every 100 --seed 0 --threads "$THREADS" --device cpu --micro-batches 1 --out "$RUN/decoder"

# 5. layout statistics of the training patches (the demo's random layouts), then the export
"$BIN/nucsynth" stats "$RUN/consep.zarr" --split train --out "$RUN/latent/layout_stats.json"
"$BIN/python" -c "import sys; from nucsynth.checkpoint import export_checkpoint, default_checkpoint_dir; \
print(export_checkpoint(sys.argv[1], default_checkpoint_dir(), overwrite=True, half=True, autoencoder=sys.argv[2], guidance=0.0))" \
    "$RUN/latent" "$RUN/decoder"

#!/usr/bin/env bash
# Train the bundled pretrained AVSM brain model (CPU, 2 threads) and export it.
# Usage: scripts/train_pretrained.sh [RUN_DIR]   (from the repository root)
# Stages: prepare data -> affine (single-step, then 3-step) -> vSVF (affine frozen) -> export.
set -euo pipefail
RUN=${1:-runs/pretrained}
export PYTHONPATH=${PYTHONPATH:-src}
SEED=0
MODEL='{"working_spacing": 3.2, "affine_base": 8, "unet_base": 8, "affine_steps_train": 3, "affine_steps_test": 7, "vsvf_steps_train": 1, "vsvf_steps_test": 2}'
mkdir -p "$RUN"
python scripts/prepare_training_data.py --shared /work/shared/data --out "$RUN/prepared" --spacing 3.2
python -m avsm.cli.main -v train --data "$RUN/prepared" --out "$RUN/affine" --stage affine \
    --epochs 12 --iters-per-epoch 8 --single-step-epochs 5 --lr 5e-4 --seed $SEED \
    --threads 2 --max-minutes ${AFFINE_MINUTES:-24} --model "$MODEL"
python -m avsm.cli.main -v train --data "$RUN/prepared" --out "$RUN/vsvf" --stage vsvf \
    --init-from "$RUN/affine/best.pt" --epochs 60 --iters-per-epoch 8 --lr 5e-4 --seed $SEED \
    --threads 2 --max-minutes ${VSVF_MINUTES:-60}
python -m avsm.cli.main -v train --export "$RUN/vsvf/best.pt" --to src/avsm/data/weights/avsm_brain.pt

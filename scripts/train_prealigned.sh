#!/usr/bin/env bash
# Train the vSVF network on pairs pre-aligned by composed template affines (issue 18, item 3).
#
# Usage (from the repository root):  scripts/train_prealigned.sh [RUN_DIR]
#
#   0. every IXI training subject is registered once to the MNI 2009a template by affine-opt
#      (avsm.train.prealign.template_affines, cached in RUN/cache); a pair is aligned by T_i ∘ T_j⁻¹,
#      and each image is resampled once (shared augmentation ψ, residual affine ρ on the moving side);
#   1. "distill": a supervised warm start: a fixed set of pre-aligned training pairs with vSVF-opt's
#      maps as targets (computed once on the network's grid with the network's kernel and
#      integrator, cached), loss = the paper's unsupervised loss + DISTILL_WEIGHT · mean ‖Φ − Φ*‖² (voxels²);
#   2. "aligned": the paper's unsupervised loss on random pre-aligned pairs, from the warm start.
# Validation: 12 pre-aligned pairs of the held-out IXI validation subjects (never OASIS-TRT-20).
# Each stage resumes exactly with --resume RUN/<stage>/last.pt (checkpoints stay out of git);
# MINUTES bounds each stage's wall time, so a long run is a sequence of sessions.
set -euo pipefail
RUN=${1:-runs/prealigned}
SHARED=${SHARED:-../shared/data}
MINUTES=${MINUTES:-30}
SUBJECTS=${SUBJECTS:-0}
export PYTHONPATH=${PYTHONPATH:-src}
COMMON="--stage vsvf --shared $SHARED --cache $RUN/cache --threads 2 --val-pairs 12 --max-minutes $MINUTES \
    --subjects-limit $SUBJECTS"
resume() { [ -f "$1/last.pt" ] && echo "--resume $1/last.pt" || true; }
python -m avsm.cli.main -v train --sources distill=1 --distill-weight "${DISTILL_WEIGHT:-1.0}" \
    --distill-pairs "${DISTILL_PAIRS:-64}" --no-augment --epochs 100 --iters-per-epoch 16 --lr 2e-4 \
    --init-from src/avsm/data/weights/avsm_brain.pt --seed 2 --out "$RUN/distill" $(resume "$RUN/distill") $COMMON
python -m avsm.cli.main -v train --sources ixi-aligned=1 --epochs 400 --iters-per-epoch 20 --lr 1e-4 \
    --init-from "$RUN/distill/best.pt" --seed 3 --out "$RUN/aligned" $(resume "$RUN/aligned") $COMMON

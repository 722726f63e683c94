#!/usr/bin/env bash
# Train the bundled AVSM model on the real IXI cohort (and, optionally, synthesised images) and export it.
#
# Usage (from the repository root):  scripts/train_cohort.sh [RUN_DIR]
#
# The sequence that produced src/avsm/data/weights/avsm_brain.pt (see its MODEL_CARD.md):
#   0. warm start from the previous bundled model (trained on the MNI 2009a / FSL MNI152 templates);
#   1. stage "affine": the multi-step affine network (3 steps) on real cross-subject IXI pairs
#      (153 training subjects, whole head and skull-stripped) and SynthSeg-synthesised pairs (0.7 / 0.3),
#      each moving image posed by a large random affine and brought back by the automatic
#      initialisation of inference (avsm.train.data.pose_and_initialise);
#   2. stage "vsvf": the affine network frozen (7 steps); the mixture and the Dice term chosen on the
#      held-out IXI validation pairs (runs A-D below, 12 min each);
#   3. export with the affine guard and 2 test-time vSVF steps; store the input-domain reference.
# Validation: 12 fixed pairs of the held-out IXI validation subjects (avsm.train.cohort.split_held_out);
# never OASIS-TRT-20, Colin27 or MNI 2009c (avsm.train.cohort.check_training_sources refuses them).
# Resume any stage exactly with: avsm train ... --resume RUN/<stage>/last.pt
set -euo pipefail
RUN=${1:-runs/cohort}
SHARED=${SHARED:-../shared/data}
export PYTHONPATH=${PYTHONPATH:-src}
# the pose ranges the bundled model was trained with (PoseConfig's defaults are smaller since 2026-12)
COMMON="--shared $SHARED --cache $RUN/cache --threads 2 --val-pairs 12 --pose {\"scale\":0.15,\"shear\":0.05}"
python -m avsm.cli.main -v train --sources ixi=0.7,synthseg=0.3 --out "$RUN/affine" --stage affine \
    --epochs 200 --iters-per-epoch 25 --init-from src/avsm/data/weights/avsm_brain_templates.pt --seed 0 \
    --max-minutes 20 $COMMON
VSVF="--stage vsvf --epochs 400 --iters-per-epoch 20 --init-from $RUN/affine/best.pt --seed 1 --max-minutes 12 \
    --augmentation {\"warp_amplitude\":0.05} $COMMON"
# mixture study (lr 5e-4): A real only, B real + synthesised
python -m avsm.cli.main train --sources ixi=1 --out "$RUN/vsvfA" $VSVF
python -m avsm.cli.main train --sources ixi=0.5,synthseg=0.3,synth-ixi=0.2 --out "$RUN/vsvfB" $VSVF
# Dice-term ablation (lr 1e-4, the better mixture): C with the Dice term (weight 1), D without
python -m avsm.cli.main train --sources ixi=1 --out "$RUN/vsvfC" $VSVF --lr 1e-4 --dice-weight 1.0
python -m avsm.cli.main train --sources ixi=1 --out "$RUN/vsvfD" $VSVF --lr 1e-4
# the bundled model is run D (no Dice term; MODEL_CARD.md, step 3); BEST=... exports another
BEST=${BEST:-$RUN/vsvfD/best.pt}
python -m avsm.cli.main train --export "$BEST" --to "$RUN/export/avsm_brain.pt" \
    --override '{"vsvf_steps_test": 2, "affine_guard": true}'
python scripts/domain_reference.py --ixi-dir "$SHARED/ixi185" --train-only --max-subjects 40 \
    --out "$RUN/export/domain.json" --add-to "$RUN/export/avsm_brain.pt"

#!/usr/bin/env bash
# Train the VoxelMorph peer on the same data, augmentation and budget as the bundled AVSM model.
#
# Usage (from the repository root, after scripts/train_pretrained.sh has prepared RUN/prepared):
#     scripts/train_voxelmorph.sh [RUN_DIR]
# Writes RUN/voxelmorph/{best,last}.pt and metrics.jsonl, and copies best.pt to
# benchmarks/results/voxelmorph/vxm_brain.pt, where the `voxelmorph` baseline looks for it.
set -euo pipefail
RUN=${1:-runs/pretrained}
export PYTHONPATH=${PYTHONPATH:-src}
export OMP_NUM_THREADS=1
MINUTES=${VXM_MINUTES:-55}   # the AVSM vSVF stage's budget
VSVF_AUG='{"rotation_deg": 10.0, "scale": 0.12, "translation": 0.08, "shear": 0.06, "warp_amplitude": 0.05, "random_strength": true}'
python - "$RUN" "$MINUTES" "$VSVF_AUG" <<'PY'
import json, logging, sys
from avsm.baselines.voxelmorph import train_voxelmorph
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
run, minutes, aug = sys.argv[1], float(sys.argv[2]), json.loads(sys.argv[3])
print(json.dumps(train_voxelmorph(f"{run}/prepared", f"{run}/voxelmorph", minutes=minutes, seed=1,
                                  augmentation=aug, threads=1)))
PY
mkdir -p benchmarks/results/voxelmorph
cp "$RUN/voxelmorph/best.pt" benchmarks/results/voxelmorph/vxm_brain.pt
cp "$RUN/voxelmorph/metrics.jsonl" benchmarks/results/voxelmorph/metrics.jsonl

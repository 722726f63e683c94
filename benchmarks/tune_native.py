"""Choose the native preset's settings on OASIS-TRT-20 development pairs at 1 mm (never the evaluation pairs).

One registration per pair with the given overrides of a preset's stages (JSON), then Dice over
the labels present in both maps (label 74 excluded) with the labels warped nearest (fast; the
benchmark warps them as the pipeline does), the affine-only Dice, det J folds on the fixed grid
and the stage timings.  Only subjects 01-10 are development data (the issue's evaluation pairs
are 11-20).

Usage::

    python benchmarks/tune_native.py --base native --pairs 01-02,03-04 \\
        --cfg '{"vsvf": {"iterations": [60, 80]}}'

The runs behind the native preset are in ``benchmarks/results/native/tuning.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))

import avsm  # noqa: E402
from avsm.metrics.overlap import dice_per_label, mean_dice, shared_labels  # noqa: E402
from avsm.settings import preset  # noqa: E402

log = logging.getLogger("tune_native")
DEV = {f"{i:02d}" for i in range(1, 11)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", default=os.path.join(HERE, "..", "..", "shared", "data"))
    ap.add_argument("--pairs", default="01-02", help="fixed-moving subject numbers, comma separated")
    ap.add_argument("--base", default="native", help="preset to start from")
    ap.add_argument("--cfg", default="{}", help='JSON: {"vsvf": {...}, "affine": {...}, "spacing": ...}')
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    cfg = json.loads(args.cfg)
    s = preset(args.base)
    changes = {k: dataclasses.replace(getattr(s, k), **cfg[k]) for k in ("vsvf", "affine") if k in cfg}
    changes.update({k: cfg[k] for k in ("spacing", "init") if k in cfg})
    s = s.replace(method="opt", **changes)
    d = os.path.join(args.data_dir, "oasis-trt20")
    rows = []
    for pair in args.pairs.split(","):
        fi, mi = pair.split("-")
        if not {fi, mi} <= DEV:
            raise SystemExit(f"{pair}: only OASIS-TRT-20 subjects 01-10 are development data")
        F = avsm.load_image(os.path.join(d, f"trt{fi}.nii.gz"))
        M = avsm.load_image(os.path.join(d, f"trt{mi}.nii.gz"))
        FL = avsm.load_image(os.path.join(d, f"trt{fi}_labels.nii.gz"), label=True)
        ML = avsm.load_image(os.path.join(d, f"trt{mi}_labels.nii.gz"), label=True)
        t = time.perf_counter()
        r = avsm.register(fixed=F, moving=M, settings=s, progress=False)
        t_reg = time.perf_counter() - t
        labels = [lab for lab in shared_labels(FL.array, ML.array) if lab != 74]
        dice = mean_dice(dice_per_label(r.warp(ML, mode="nearest").array, FL.array, labels=labels))
        dice_aff = mean_dice(dice_per_label(r.warp(ML, mode="nearest", affine_only=True).array, FL.array,
                                            labels=labels))
        folds = int((r.jacobian_determinant() < 0).sum())
        log.info("%s dice %.4f affine %.4f registration %.1f s folds %d %s evaluations %s level s %s", pair, dice,
                 dice_aff, t_reg, folds, {k: round(v, 1) for k, v in r.timings.items()},
                 r.info.get("vsvf_evaluations"), r.info.get("vsvf_level_seconds"))
        rows.append((dice, dice_aff, t_reg))
    m = np.mean(rows, axis=0)
    log.info("MEAN dice %.4f affine %.4f registration %.1f s  %s %s", m[0], m[1], m[2], args.base, args.cfg)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

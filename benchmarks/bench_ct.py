"""CT intensity handling measured: Hounsfield windows against percentiles, with ANTs SyN beside.

Pair: the elastix chest CT of one patient, baseline (moving) → follow-up (fixed),
1.37×1.37×2.5 mm, with lung masks (``../shared/data/ct``, Apache-2.0).  Score:
Dice of the warped baseline lung mask against the follow-up lung mask.

Variants: the default (``avsm register``: ``opt`` with the ``native`` preset, modality detected),
and ``avsm register --method opt --preset fast`` with ``--modality ct`` and
the default window [−1000, 1000] HU, a narrower [−1000, 400] HU window, and
``--modality mr`` (0.1/99.9 percentiles, what CT got before); ANTs SyN (antspyx
``'SyN'``) on avsm's working inputs, one after another.

Usage::

    PYTHONPATH=src python benchmarks/bench_ct.py --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time


HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))

import torch  # noqa: E402

from avsm.api import identity_result, register  # noqa: E402
from avsm.io.image import load_image  # noqa: E402
from avsm.metrics.overlap import dice_per_label  # noqa: E402
from avsm.settings import preset  # noqa: E402

log = logging.getLogger("bench_ct")

VARIANTS = {
    "default (native preset)": {"preset": "native"},
    "opt ct -1000..1000 HU": {"modality": "ct"},
    "opt ct -1000..400 HU": {"modality": "ct", "ct_window": (-1000.0, 400.0)},
    "opt mr percentiles": {"modality": "mr"},
    "ants-syn": {},
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=os.path.join(HERE, "..", "..", "shared", "data"))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "ct.jsonl"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", str(args.threads))
    torch.set_num_threads(args.threads)
    d = os.path.join(os.path.abspath(args.data_dir), "ct")
    fixed, moving = load_image(f"{d}/3DCT_lung_followup.mha"), load_image(f"{d}/3DCT_lung_baseline.mha")
    fl = load_image(f"{d}/3DCT_lung_followup_mask.mha", label=True)
    ml = load_image(f"{d}/3DCT_lung_baseline_mask.mha", label=True)
    rows = []
    for name in args.variants.split(","):
        t0 = time.perf_counter()
        if name == "ants-syn":
            from avsm.baselines.ants import ants_syn, warmup

            warmup()
            t0 = time.perf_counter()
            res = ants_syn(fixed, moving)
        else:
            kw = dict(VARIANTS[name])
            res = register(fixed=fixed, moving=moving, settings=preset(kw.pop("preset", "fast"), method="opt", **kw),
                           progress=False)
        t = time.perf_counter() - t0
        dice = dice_per_label(res.warp(ml).array, fl.array, labels=[1])[1]
        dice_aff = dice_per_label(res.warp(ml, affine_only=True).array, fl.array, labels=[1])[1]
        row = {"variant": name, "lung_dice": round(float(dice), 4), "lung_dice_affine": round(float(dice_aff), 4),
               "folds": int((res.jacobian_determinant() < 0).sum()), "time_s": round(t, 2)}
        rows.append(row)
        log.info("%s", json.dumps(row))
    before = dice_per_label(identity_result(fixed, moving).warp(ml).array, fl.array, labels=[1])[1]
    rows.insert(0, {"variant": "no registration (headers)", "lung_dice": round(float(before), 4),
                    "lung_dice_affine": round(float(before), 4), "folds": 0, "time_s": 0.0})
    with open(args.out, "a") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    sys.stdout.write("\n| variant | lung Dice | lung Dice, affine stage | folds | time (s) |\n|---|---|---|---|---|\n")
    for r in rows:
        sys.stdout.write(f"| {r['variant']} | {r['lung_dice']:.4f} | {r['lung_dice_affine']:.4f} | {r['folds']} | "
                         f"{r['time_s']:.1f} |\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

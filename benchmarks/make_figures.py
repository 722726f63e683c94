"""QC figures for the real pair with the (fast) network and a baseline: Fig. 4 panels, det J, Fig. 5 and Fig. 8.

Usage::

    PYTHONPATH=src python benchmarks/make_figures.py --data-dir ../shared/data --methods net,demons

Writes ``benchmarks/results/figures/``.  The Dice box plot uses ``results/real_results.csv``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))
sys.path.insert(0, HERE)

from bench_real import STRUCTURES  # noqa: E402

from avsm.baselines.base import run_method  # noqa: E402
from avsm.io.image import load_image  # noqa: E402
from avsm.viz.qc import dice_boxplot, jacobian_figure, pair_figure, steps_curve  # noqa: E402

log = logging.getLogger("make_figures")


def main(argv: list[str] | None = None) -> int:
    """Make the figures; returns the exit code."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data-dir", default=os.path.join(HERE, "..", "..", "shared", "data"))
    ap.add_argument("--out", default=os.path.join(HERE, "results", "figures"))
    ap.add_argument("--methods", default="net,demons")
    ap.add_argument("--steps", action="store_true", help="also the Dice-vs-steps curve of the network")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    d = args.data_dir
    fixed, moving = load_image(os.path.join(d, "mni2009c_brain.nii.gz")), load_image(os.path.join(d, "colin27_brain.nii.gz"))
    fl = load_image(os.path.join(d, "mni2009c_dkt.nii.gz"), label=True)
    ml = load_image(os.path.join(d, "colin27_aal.nii.gz"), label=True)
    mapping = {s: a for _, a, s in STRUCTURES}
    import numpy as np

    fl = fl.with_array(np.where(np.isin(fl.array, list(mapping)), fl.array, 0).astype(fl.array.dtype))
    ml = ml.with_array(np.where(np.isin(ml.array, list(mapping.values())), ml.array, 0).astype(ml.array.dtype))
    os.makedirs(args.out, exist_ok=True)
    for m in args.methods.split(","):
        res = run_method(m, fixed, moving)
        pair_figure(fixed, moving, res, os.path.join(args.out, f"{m}_mni_from_colin_pair.png"), fl, ml,
                    title=f"{m}: MNI2009c (target) <- Colin27 (source)")
        jacobian_figure(res, os.path.join(args.out, f"{m}_mni_from_colin_detj.png"))
    rc = os.path.join(HERE, "results", "real_results.csv")
    if os.path.exists(rc):
        dice_boxplot(rc, os.path.join(args.out, "real_dice_boxplot.png"))
        dice_boxplot(rc, os.path.join(args.out, "real_dice_boxplot_per_label.png"), per_label=True)
    if args.steps:
        rec = steps_curve(fixed, moving, fl, ml, os.path.join(args.out, "net_steps_curve.png"), mapping=mapping,
                          vsvf_steps=(1, 2, 3), affine_steps=(1, 7))
        with open(os.path.join(args.out, "net_steps_curve.json"), "w") as fh:
            json.dump(rec, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

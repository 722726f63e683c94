"""Evaluate a trained AVSM model on the held-out real pair and on the bundled demo pair.

Held-out pair: Colin27 (AAL labels) ↔ MNI ICBM 2009c (aseg labels), Dice
over the 12 subcortical structures both protocols share, both directions,
through :func:`avsm.api.register` (``method='net'``) and
:meth:`RegistrationResult.warp` onto the fixed image's own 1 mm grid.
Neither image is used in training (see ``scripts/prepare_training_data.py``).

Usage::

    python -m avsm.train.evaluate_pretrained [--weights FILE] [--shared DIR] [--out result.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from avsm.api import identity_result, register
from avsm.data import demo_paths
from avsm.io.image import Volume, load_image
from avsm.metrics.overlap import dice_per_label

log = logging.getLogger(__name__)

#: AAL value -> aseg value of the 12 shared subcortical structures.
AAL_TO_ASEG: dict[int, int] = {77: 10, 78: 49, 71: 11, 72: 50, 73: 12, 74: 51,
                               75: 13, 76: 52, 37: 17, 38: 53, 41: 18, 42: 54}


def _keep(labels: Volume, values: list[int]) -> Volume:
    arr = np.where(np.isin(labels.array, values), labels.array, 0).astype(np.int16)
    return labels.with_array(arr)


def _mean(scores: dict[int, float]) -> float:
    vals = [v for v in scores.values() if not np.isnan(v)]
    return float(np.mean(vals)) if vals else float("nan")


def evaluate_pair(fixed: Volume, moving: Volume, fixed_labels: Volume, moving_labels: Volume,
                  truth_labels: list[int], mapping: dict[int, int] | None, model: Any,
                  *, extra_methods: tuple[str, ...] = ()) -> dict[str, Any]:
    """Dice (mean and per label), folds and timings of ``net``, its affine stage, identity (+ extras)."""
    rec: dict[str, Any] = {}
    t0 = time.perf_counter()
    res = register(fixed=fixed, moving=moving, method="net", model=model, progress=False)
    rec["net_seconds"] = time.perf_counter() - t0
    rec["net_timings"] = res.timings
    rec["folds_working_grid"] = res.folds()
    jd = res.jacobian_determinant()
    rec["folds_fixed_grid"] = int((jd < 0).sum())
    rec["jacobian_min"] = float(jd.min())
    rec["working_grid"] = list(res.fixed_grid.shape)
    for name, kw in (("net", {}), ("net_affine", {"affine_only": True})):
        warped = res.warp(moving_labels, **kw)
        d = dice_per_label(warped.array, fixed_labels.array, truth_labels, mapping)
        rec[name] = {"mean_dice": _mean(d), "per_label": d}
    ident = identity_result(fixed, moving)
    d = dice_per_label(ident.warp(moving_labels).array, fixed_labels.array, truth_labels, mapping)
    rec["identity"] = {"mean_dice": _mean(d), "per_label": d}
    for method in extra_methods:
        t0 = time.perf_counter()
        r = register(fixed=fixed, moving=moving, method=method, progress=False)
        d = dice_per_label(r.warp(moving_labels).array, fixed_labels.array, truth_labels, mapping)
        rec[method] = {"mean_dice": _mean(d), "per_label": d, "seconds": time.perf_counter() - t0,
                       "folds": r.folds()}
    return rec


def main(argv: list[str] | None = None) -> int:
    """Run the evaluation and write/log a JSON summary."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default=None, help="weights file (default: the bundled model)")
    p.add_argument("--shared", type=Path, default=Path("/work/shared/data"))
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--extra", nargs="*", default=[], help="also run these api methods (e.g. affine opt)")
    p.add_argument("--skip-heldout", action="store_true")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (timings depend on it)")
    p.add_argument("--vsvf-steps", type=int, default=None, help="test-time vSVF steps (default: the model's)")
    args = p.parse_args(argv)
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from avsm.models.pretrained import load_pretrained

    model = load_pretrained(args.weights)
    if args.vsvf_steps is not None:
        model.config.vsvf_steps_test = args.vsvf_steps
    summary: dict[str, Any] = {"weights": args.weights or "bundled", "config": model.config.to_dict(),
                               "threads": args.threads}
    dp = demo_paths()
    summary["demo"] = evaluate_pair(load_image(dp["fixed"]), load_image(dp["moving"]),
                                    load_image(dp["fixed_labels"], label=True),
                                    load_image(dp["moving_labels"], label=True),
                                    list(range(1, 13)), None, model, extra_methods=tuple(args.extra))
    log.info("demo: net %.4f, net affine %.4f, identity %.4f, folds %d",
             summary["demo"]["net"]["mean_dice"], summary["demo"]["net_affine"]["mean_dice"],
             summary["demo"]["identity"]["mean_dice"], summary["demo"]["folds_working_grid"])
    if not args.skip_heldout:
        sh = args.shared
        colin = load_image(sh / "colin27_brain.nii.gz")
        mni = load_image(sh / "mni2009c_brain.nii.gz")
        aal = _keep(load_image(sh / "colin27_aal.nii.gz", label=True), list(AAL_TO_ASEG))
        aseg = _keep(load_image(sh / "mni2009c_dkt.nii.gz", label=True), list(AAL_TO_ASEG.values()))
        summary["colin27_to_mni2009c"] = evaluate_pair(mni, colin, aseg, aal, list(AAL_TO_ASEG.values()),
                                                       {v: k for k, v in AAL_TO_ASEG.items()}, model,
                                                       extra_methods=tuple(args.extra))
        summary["mni2009c_to_colin27"] = evaluate_pair(colin, mni, aal, aseg, list(AAL_TO_ASEG),
                                                       AAL_TO_ASEG, model, extra_methods=tuple(args.extra))
        for key in ("colin27_to_mni2009c", "mni2009c_to_colin27"):
            r = summary[key]
            log.info("%s: net %.4f, net affine %.4f, identity %.4f, folds %d (fixed grid %d), %.1f s", key,
                     r["net"]["mean_dice"], r["net_affine"]["mean_dice"], r["identity"]["mean_dice"],
                     r["folds_working_grid"], r["folds_fixed_grid"], r["net_seconds"])
    text = json.dumps(summary, indent=2, default=float)
    if args.out:
        args.out.write_text(text)
    else:
        sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

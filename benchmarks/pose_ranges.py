"""How large are real inter-subject affines?  The ranges behind the training poses.

Every IXI training subject (the first ``--subjects``) is registered once to the MNI 2009a template
by affine-opt (:func:`avsm.train.prealign.template_affines`, cached in ``--cache``); a pair's
affine is ``T_i ∘ T_j⁻¹``.  In millimetres (``L_i A L_j⁻¹`` with ``L`` the unit → world linear
parts of the working grids) each pair affine is split by the polar decomposition ``A = R S``
into a rotation (angle, degrees) and a symmetric stretch ``S``
(:func:`avsm.train.prealign.decompose_mm`): its log-eigenvalues are the scales, and shear is
reported as the largest ``|S_ij|`` (i ≠ j) in the scanner frame.  Subjects whose template affine
is implausible (:func:`avsm.train.prealign.plausible_affine`) are counted and left out.  Prints percentiles over all ordered pairs, and the
ranges of :class:`avsm.train.data.PoseConfig` and :class:`avsm.train.augment.AugmentConfig`
beside them.

Usage::

    python benchmarks/pose_ranges.py --data-dir ../shared/data --subjects 60 --cache runs/cache
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", default=os.path.join(HERE, "..", "..", "shared", "data"))
    ap.add_argument("--subjects", type=int, default=60)
    ap.add_argument("--spacing", type=float, default=4.2)
    ap.add_argument("--cache", default="runs/cache")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "training", "pose_ranges.json"))
    args = ap.parse_args(argv)
    from avsm.train.augment import AugmentConfig
    from avsm.train.data import PoseConfig, prepare_cohort
    from avsm.train.mixture import template_volume, training_subjects
    from avsm.train.prealign import decompose_mm, pair_affine, plausible_affine, template_affines

    vols = prepare_cohort(training_subjects(args.data_dir, args.subjects), args.spacing, args.cache)
    tpl, tpl_u2w = template_volume(args.data_dir, args.spacing)
    T = template_affines(vols, tpl, tpl_u2w, cache=args.cache)
    keep = [k for k in range(len(vols)) if plausible_affine(T[k], vols[k].unit_to_world, tpl_u2w)]
    to_tpl = np.array([decompose_mm(T[k][0], vols[k].unit_to_world, tpl_u2w)[1] for k in keep])
    angles, scales, shears, trans = [], [], [], []
    for i in keep:
        for j in keep:
            if i == j:
                continue
            A, b = pair_affine(T[i], T[j])
            ang, ls, sh = decompose_mm(A, vols[i].unit_to_world, vols[j].unit_to_world)
            angles.append(ang)
            scales.append(np.abs(ls).max())
            shears.append(sh)
            trans.append(float(np.abs(b[0].numpy()).max()))
    pct = (50, 90, 99, 100)
    report = {
        "pairs": len(angles), "subjects": len(vols), "implausible_template_affines": len(vols) - len(keep),
        # the stretch's log-eigenvalues in ascending order (smallest, middle, largest scale), not per axis
        "subject_to_template_sorted_log_scales_mean": [round(float(x), 3) for x in to_tpl.mean(0)],
        "subject_to_template_sorted_log_scales_sd": [round(float(x), 3) for x in to_tpl.std(0)],
        "rotation_deg": {p: round(float(np.percentile(angles, p)), 2) for p in pct},
        "max_abs_log_scale": {p: round(float(np.percentile(scales, p)), 4) for p in pct},
        "max_abs_shear": {p: round(float(np.percentile(shears, p)), 4) for p in pct},
        "max_abs_translation_unit": {p: round(float(np.percentile(trans, p)), 4) for p in pct},
        "pose_config": PoseConfig().__dict__, "augment_config": {k: v for k, v in AugmentConfig().__dict__.items()
                                                                 if k in ("rotation_deg", "scale", "shear",
                                                                          "translation")},
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(report, fh, indent=1)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

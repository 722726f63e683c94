#!/usr/bin/env python
"""Fit the network's training-domain reference (:mod:`avsm.models.domain`) and store it.

Images are brought to the working grid exactly as :func:`avsm.api.register` does at
inference (:func:`avsm.api.working_grid_for` at ``--spacing`` + :func:`avsm.api.to_working`),
and the reference (mean intensity signature, distance threshold, head extent range, MR) is
written as JSON; ``--add-to`` also stores it in an exported weights file's
``meta["domain"]`` (and its sibling ``.json``), where :func:`avsm.api.register` finds it.

IXI subjects (``--ixi-dir``) give two variants each, as in training: the whole-head T1 and
the skull-stripped T1 (T1 × (DLMUSE labels > 0)).  The images synthesised from label maps
are not used: their intensities are random per label, so they would widen the reference to
almost anything.

Usage::

    python scripts/domain_reference.py --ixi-dir ../shared/data/ixi185 --train-only \\
        --out domain.json [--add-to runs/export/avsm_brain.pt] \\
        [--check ../shared/data/oasis-trt20/trt01.nii.gz ../shared/data/ct/3DCT_lung_baseline.mha]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from avsm.api import detect_modality, to_working, working_grid_for
from avsm.io.image import Volume, load_image
from avsm.models.domain import (
    DEFAULT_MARGIN,
    DomainReference,
    add_reference_to_weights,
    check_input,
    fit_reference,
)
from avsm.train.cohort import check_training_sources, ixi_subjects, split_subjects

log = logging.getLogger("domain_reference")

#: the working spacing of the bundled model (``AVSMConfig.working_spacing``), mm
DEFAULT_SPACING = 4.2
VARIANTS = ("whole", "stripped")


def working_image(volume: Volume, spacing: float, modality: str = "mr") -> np.ndarray:
    """``volume`` on its working grid, normalised as at inference: ``(D, H, W)`` float32 in [0, 1]."""
    grid = working_grid_for(volume.grid, spacing=spacing, keep_thick_slices=modality == "ct")
    return to_working(volume, grid, modality)


def skull_stripped(t1: Volume, labels: Volume) -> Volume:
    """T1 × (labels > 0), on the T1's grid (the labels must share it)."""
    if tuple(labels.array.shape) != tuple(t1.array.shape):
        raise ValueError(f"labels {labels.array.shape} and T1 {t1.array.shape} are not on one grid")
    return t1.with_array((t1.array * (labels.array > 0)).astype(np.float32))


def ixi_images(folder: str | Path, *, train_only: bool, spacing: float, max_subjects: int | None = None,
               variants: Sequence[str] = VARIANTS) -> list[tuple[str, np.ndarray]]:
    """``(name, working image)`` for each IXI subject and variant (``whole``, ``stripped``).

    ``train_only`` keeps the training side of :func:`avsm.train.cohort.split_subjects`;
    ``max_subjects`` the first subjects (by ID) of that list.  Subjects without labels have
    no ``stripped`` variant.
    """
    bad = set(variants) - set(VARIANTS)
    if bad:
        raise ValueError(f"unknown variants {sorted(bad)}; choose from {VARIANTS}")
    subjects = ixi_subjects(folder)
    if train_only:
        subjects = split_subjects(subjects)[0]
    if max_subjects is not None:
        subjects = subjects[:max_subjects]
    check_training_sources([s.image for s in subjects])
    out: list[tuple[str, np.ndarray]] = []
    for s in subjects:
        t1 = load_image(s.image)
        if "whole" in variants:
            out.append((f"{s.id}:whole", working_image(t1, spacing)))
        if "stripped" in variants and s.labels is not None:
            out.append((f"{s.id}:stripped", working_image(skull_stripped(t1, load_image(s.labels, label=True)),
                                                          spacing)))
    log.info("%d IXI subjects, %d images", len(subjects), len(out))
    return out


def check_images(paths: Sequence[str], reference: DomainReference, spacing: float) -> list[dict]:
    """Distance and reasons of each image (its modality detected as ``--modality auto`` does)."""
    rows = []
    for p in paths:
        v = load_image(p)
        mod = detect_modality(v)
        w = working_image(v, spacing, mod)
        rows.append({"image": p, "modality": mod, "extent_mm": [round(e, 1) for e in v.grid.extent_mm],
                     "distance": round(reference.distance_of(w), 4), "threshold": round(reference.threshold, 4),
                     "reasons": check_input(w, v.grid.extent_mm, mod, reference)})
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point (see the module doc)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ixi-dir", help="folder of IXI <ID>_T1.nii.gz (+ _T1_DLMUSE.nii.gz)")
    ap.add_argument("--train-only", action="store_true", help="only the IXI training split (never held-out)")
    ap.add_argument("--max-subjects", type=int, help="at most this many IXI subjects (first by ID)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma list of: whole, stripped")
    ap.add_argument("--images", nargs="*", default=[], help="more training images (MR), used as they are")
    ap.add_argument("--spacing", type=float, default=DEFAULT_SPACING,
                    help=f"working spacing in mm, the model's config.working_spacing (default {DEFAULT_SPACING})")
    ap.add_argument("--bins", type=int, default=32, help="histogram bins of the signature")
    ap.add_argument("--margin", type=float, default=DEFAULT_MARGIN,
                    help=f"threshold = margin x largest training distance (default {DEFAULT_MARGIN})")
    ap.add_argument("--out", required=True, help="reference JSON to write")
    ap.add_argument("--add-to", help="exported weights .pt to store the reference in (meta['domain'])")
    ap.add_argument("--check", nargs="*", default=[], help="images to test against the reference (printed)")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    named: list[tuple[str, np.ndarray]] = []
    if args.ixi_dir:
        named += ixi_images(args.ixi_dir, train_only=args.train_only, spacing=args.spacing,
                            max_subjects=args.max_subjects, variants=[v.strip() for v in args.variants.split(",")])
    if args.images:
        check_training_sources(args.images)
        named += [(p, working_image(load_image(p), args.spacing)) for p in args.images]
    if len(named) < 2:
        ap.error("need at least two images (--ixi-dir and/or --images)")
    desc = (f"{len(named)} images ({'IXI ' + ('training split' if args.train_only else 'all') if args.ixi_dir else ''}"
            f"{' + ' if args.ixi_dir and args.images else ''}{'extra images' if args.images else ''}; "
            f"variants {args.variants}) at {args.spacing} mm, avsm.api.to_working")
    ref = fit_reference([w for _, w in named], bins=args.bins, margin=args.margin, description=desc)
    Path(args.out).write_text(json.dumps(ref.to_dict(), indent=2))
    report: dict = {"reference": args.out, "n_images": ref.n_images, "training_max": round(ref.training_max, 4),
                    "threshold": round(ref.threshold, 4)}
    if args.add_to:
        report["weights"] = str(add_reference_to_weights(args.add_to, ref))
    if args.check:
        report["check"] = check_images(args.check, ref, args.spacing)
    sys.stdout.write(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

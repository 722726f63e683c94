#!/usr/bin/env python
"""Prepare the real training brains for ``avsm train``.

Reads the shared data folder (see ``/work/shared/data/README.md``) and writes,
onto ONE common canonical working grid (the MNI ICBM 2009a box, built with
:func:`avsm.api.working_grid_for` at ``--spacing``), intensities normalised
and resampled with :func:`avsm.api.to_working` (exactly the inference
preprocessing):

* ``mni2009a``: the 2009a T1 skull-stripped with ``gm_prob + wm_prob >
  --brain-threshold`` (holes filled, dilated by ``--dilate`` voxels of 1 mm);
  labels: tissue classes 1 = GM, 2 = WM (probability > 0.5);
* ``mni6``: the FSL MNI152 6th-gen T1 masked with its brain mask; labels:
  Harvard-Oxford cortical max-probability regions (48).

Colin27 and MNI 2009c are **never** read: they are the evaluation pair.
Whole-head scanner-space volumes (``itk_t1``, ``radiomics_brain*``) are not
used (the evaluation images are skull-stripped).

Usage::

    python scripts/prepare_training_data.py --shared /work/shared/data --out prepared/ --spacing 3.2
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

from avsm.api import to_working, working_grid_for
from avsm.io.image import Volume, load_image, resample, save_image

log = logging.getLogger("prepare_training_data")

EXCLUDED = ("colin27", "mni2009c")


def skull_strip_2009a(shared: Path, threshold: float, dilate: int) -> tuple[Volume, Volume]:
    """Brain-only 2009a T1 and its GM/WM tissue labels (on the T1's own grid)."""
    t1 = load_image(shared / "mni2009a_t1.nii.gz")
    gm = load_image(shared / "mni2009a_gm_prob.nii.gz").array.astype(np.float32)
    wm = load_image(shared / "mni2009a_wm_prob.nii.gz").array.astype(np.float32)
    scale = 255.0 if max(gm.max(), wm.max()) > 1.5 else 1.0
    gm, wm = gm / scale, wm / scale
    mask = (gm + wm) > threshold
    mask = ndimage.binary_closing(mask, iterations=2)
    mask = ndimage.binary_fill_holes(mask)
    lab, n = ndimage.label(mask)
    if n > 1:
        sizes = ndimage.sum(mask, lab, range(1, n + 1))
        mask = lab == (1 + int(np.argmax(sizes)))
    if dilate > 0:
        mask = ndimage.binary_dilation(mask, iterations=dilate)
    brain = t1.with_array((t1.array * mask).astype(np.float32))
    tissue = np.zeros(gm.shape, dtype=np.uint8)
    tissue[(gm > 0.5) & mask] = 1
    tissue[(wm > 0.5) & mask] = 2
    return brain, Volume(tissue, t1.grid, None, True)


def masked_mni6(shared: Path) -> tuple[Volume, Volume]:
    """FSL MNI152 T1 masked with its brain mask, and Harvard-Oxford cortical labels."""
    t1 = load_image(shared / "mni6_t1_2mm.nii.gz")
    mask = load_image(shared / "mni6_brainmask_2mm.nii.gz").array > 0
    ho = load_image(shared / "mni6_harvardoxford_2mm.nii.gz", label=True)
    return t1.with_array((t1.array * mask).astype(np.float32)), ho


def main(argv: list[str] | None = None) -> int:
    """Write the prepared folder; returns the exit code."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shared", type=Path, default=Path("/work/shared/data"))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--spacing", type=float, default=3.2, help="working spacing in mm (the model's)")
    p.add_argument("--brain-threshold", type=float, default=0.3)
    p.add_argument("--dilate", type=int, default=2)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)

    a_brain, a_lab = skull_strip_2009a(args.shared, args.brain_threshold, args.dilate)
    grid = working_grid_for(a_brain.grid, spacing=args.spacing)
    log.info("common grid: shape %s spacing %s", grid.shape, grid.spacing)
    items = [("mni2009a", a_brain, a_lab), ("mni6", *masked_mni6(args.shared))]
    volumes = []
    for name, img, lab in items:
        assert not any(name.startswith(x) for x in EXCLUDED)
        arr = to_working(img, grid)
        save_image(Volume(arr, grid), args.out / f"{name}.nii.gz")
        lab_w = resample(lab, grid, interpolation="nearest")
        save_image(lab_w, args.out / f"{name}_labels.nii.gz")
        volumes.append({"name": name, "subject": name, "image": f"{name}.nii.gz",
                        "labels": f"{name}_labels.nii.gz"})
        log.info("%s: %s, %d labels", name, arr.shape, len(np.unique(lab_w.array)) - 1)
    manifest = {"spacing": args.spacing, "grid": {"shape": list(grid.shape), "spacing": list(grid.spacing),
                                                  "origin": list(grid.origin), "direction": list(grid.direction)},
                "volumes": volumes, "excluded": list(EXCLUDED),
                "source": str(args.shared)}
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

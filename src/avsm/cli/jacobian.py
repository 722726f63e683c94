"""``avsm jacobian``: det J image of a transform on a reference grid, and its fold count."""

from __future__ import annotations

import argparse
import sys

import numpy as np
import SimpleITK as sitk
import torch

from avsm.io.image import Volume, load_image, save_image
from avsm.io.outputs import OutputTransaction
from avsm.transform import grid_world_points, world_jacobian_determinant


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register the ``jacobian`` sub-command."""
    p = sub.add_parser("jacobian", help="write the Jacobian determinant of a transform and count folds")
    p.add_argument("--transform", nargs="+", required=True,
                   help="transform files in antsApplyTransforms order (e.g. transform_1Warp.nii.gz "
                        "transform_0GenericAffine.mat, or transform_Composite.nii.gz)")
    p.add_argument("--reference", required=True, help="image whose grid the determinant is computed on")
    p.add_argument("--out", required=True, help="output det J image (NIfTI/NRRD/MHA)")
    p.add_argument("--log", action="store_true", help="write log(det J) (non-positive values become NaN)")
    p.set_defaults(func=run)


def world_map_of(transform: sitk.Transform, ref: Volume) -> torch.Tensor:
    """World points ``T(x)`` for every voxel ``x`` of ``ref``: ``(1, 3, D, H, W)`` float64."""
    f = sitk.TransformToDisplacementFieldFilter()
    f.SetReferenceImage(ref.grid.reference_image())
    f.SetOutputPixelType(sitk.sitkVectorFloat64)
    disp = sitk.GetArrayFromImage(f.Execute(transform))  # (D, H, W, 3) LPS mm, ITK order
    return grid_world_points(ref.grid) + torch.from_numpy(np.moveaxis(disp, -1, 0))[None]


def run(args: argparse.Namespace) -> int:
    """Run ``avsm jacobian``."""
    from avsm.export.itk import load_transform

    ref = load_image(args.reference)
    transform = load_transform(args.transform)
    with OutputTransaction(inputs=[args.reference, *args.transform]) as tx:
        out = tx.path(args.out)
        wm = world_map_of(transform, ref)
        det = world_jacobian_determinant(wm, ref.grid)
        folds = int((det < 0).sum())
        arr = np.log(np.where(det > 0, det, np.nan)) if args.log else det
        save_image(Volume(arr.astype(np.float32), ref.grid), out)
    sys.stdout.write(f"folds (det J < 0): {folds} of {det.size} voxels ({100.0 * folds / det.size:.4f} %); "
                     f"det J min {det.min():.4f} max {det.max():.4f}\n")
    return 0
